use std::process::ExitCode;

use callbridge::config::Config;
use callbridge::startup::Application;

const USAGE: &str = "usage: callbridge [serve]\n\nRuns the callbridge server. Configuration comes from the environment \
and a .env file in the working directory; see .env.example.";

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {}
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("unknown command {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    // Before any thread exists: loading .env mutates the process environment.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("configuration error: .env cannot be read ({e})");
        return ExitCode::from(2);
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::from(2);
        }
    };
    callbridge::telemetry::init(config.log_format);
    match actix_web::rt::System::new().block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "callbridge stopped with an error");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let app = Application::build(config).await?;
    tracing::info!(address = %app.address(), "callbridge listening");
    app.run_until_stopped().await?;
    Ok(())
}
