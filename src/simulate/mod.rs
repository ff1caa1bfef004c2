//! `callbridge simulate`: a call without a phone.
//!
//! It calls a running callbridge the way Twilio does, with the same configuration the server
//! reads (so the signatures match), sends a WAV as the caller's voice in real time and plays the
//! agent back the way Twilio's media buffer does, so marks, barge-ins and latencies behave as on
//! a real call. What it shows is the call as Twilio and the caller would have seen it; what it
//! writes to `--out` is what the caller would have heard.
//!
//! - [`args`]: the command line.
//! - [`audio`]: the WAV in (resampled to 8 kHz µ-law) and the recording out.
//! - [`playback`]: Twilio's playback queue: marks echoed when played, `clear` flushing.
//! - [`call`]: the call on the wire.
//! - [`report`]: the timeline, for people or as JSON lines.

pub mod args;
mod audio;
mod call;
mod playback;
mod report;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub use args::Options;

use crate::config::Config;
use crate::domain::phone::E164;
use report::{Event, Timeline};

/// Why a simulated call did not run to its end, in one line that says what to check.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("cannot use {path} as the caller's audio: {source}")]
    Audio {
        path: PathBuf,
        source: audio::AudioError,
    },
    #[error("{0}")]
    NoServer(String),
    #[error("cannot reach callbridge at {server}: {why} (is it running? `callbridge serve`)")]
    Unreachable { server: String, why: String },
    #[error("callbridge did not answer {what} within {within:?}: it has stopped answering")]
    NoAnswer {
        what: &'static str,
        within: Duration,
    },
    #[error("callbridge stopped answering on the stream (nothing for {within:?}, not even a pong)")]
    StoppedAnswering { within: Duration },
    #[error(
        "callbridge refused the signature of {what} (403): TWILIO_AUTH_TOKEN and PUBLIC_BASE_URL here must be the server's"
    )]
    SignatureRefused { what: &'static str },
    #[error("callbridge answered {what} with {status}")]
    Status { what: &'static str, status: u16 },
    #[error("callbridge's answer to POST /voice is not TwiML Twilio could use: {0}")]
    Twiml(String),
    #[error("callbridge turned the call away (busy or draining): {said:?}")]
    TurnedAway { said: String },
    #[error("the stream upgrade failed: {0}")]
    Upgrade(String),
    #[error("the request failed: {0}")]
    Http(String),
    #[error(
        "callbridge could not open an OpenAI session: check OPENAI_API_KEY{also}{detail}; a caller would now hear {apology:?} and be hung up"
    )]
    NoAgentSession {
        /// What else to check when OpenAI did not say why.
        also: &'static str,
        detail: String,
        apology: String,
    },
    #[error(
        "callbridge lost its OpenAI session mid-call{detail}; a caller would now hear {apology:?} and be hung up"
    )]
    AgentLost { detail: String, apology: String },
    #[error(
        "callbridge refused the stream (1008): its start did not match the call (is TWILIO_ACCOUNT_SID the server's?)"
    )]
    StreamRefused,
    #[error("callbridge is shutting down and closed the stream (1012)")]
    ShuttingDown,
    #[error("callbridge closed the stream early (close code {code:?}){detail}")]
    ClosedEarly { code: Option<u16>, detail: String },
    #[error("the stream broke: {0}")]
    Dropped(String),
    #[error("cannot write what the caller heard to {path}: {source}")]
    Out { path: PathBuf, source: hound::Error },
}

/// Runs `callbridge simulate` with `options`; the environment (and `.env`) is already loaded.
pub fn main(options: Options) -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::from(2);
        }
    };
    crate::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a single-threaded runtime starts");
    let json = options.json;
    let mut timeline = Timeline::new(json, Box::new(std::io::stdout()));
    match runtime.block_on(simulate(&options, &config, &mut timeline)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if json {
                timeline.emit(&Event::Error {
                    t_ms: timeline.t_ms(),
                    message: error.to_string(),
                });
            }
            eprintln!("callbridge simulate: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn simulate(
    options: &Options,
    config: &Config,
    timeline: &mut Timeline,
) -> Result<(), SimulateError> {
    let caller_audio = audio::load(&options.audio).map_err(|source| SimulateError::Audio {
        path: options.audio.clone(),
        source,
    })?;
    let wav_length = Duration::from_millis(caller_audio.len() as u64 / playback::SAMPLES_PER_MS);
    let to = options
        .to
        .clone()
        .unwrap_or_else(|| first_agent_number(config));
    let plan = call::Plan {
        server: match &options.server {
            Some(server) => server.clone(),
            None => local_server(config)?,
        },
        public_base_url: config.public_base_url.clone(),
        account_sid: config.twilio_account_sid.as_str().to_owned(),
        auth_token: config.twilio_auth_token.clone(),
        api_token: config.api_token.clone(),
        from: options.channel.address(&options.from),
        to: options.channel.address(&to),
        caller_audio,
        length: options
            .seconds
            .unwrap_or(wav_length + Duration::from_secs(10)),
        keypresses: options.dtmf.clone(),
    };
    let outcome = call::run(&plan, timeline).await?;
    if let Some(path) = &options.out {
        audio::write_heard(path, &outcome.heard).map_err(|source| SimulateError::Out {
            path: path.clone(),
            source,
        })?;
    }
    outcome.result
}

/// The number the first agent answers, as a caller would dial it.
fn first_agent_number(config: &Config) -> E164 {
    config
        .agents
        .profiles()
        .first()
        .and_then(|agent| agent.numbers.first().cloned())
        .unwrap_or_else(|| E164::parse(args::DEFAULT_TO).expect("the default is E.164"))
}

/// Where the configured server listens, reached over loopback when it listens on every
/// address.
fn local_server(config: &Config) -> Result<url::Url, SimulateError> {
    if config.port == 0 {
        return Err(SimulateError::NoServer(
            "PORT is 0 (a port chosen at random): pass --server with the server's URL".into(),
        ));
    }
    let host = match config.host {
        IpAddr::V4(address) if address.is_unspecified() => "127.0.0.1".to_owned(),
        IpAddr::V6(address) if address.is_unspecified() => "[::1]".to_owned(),
        IpAddr::V4(address) => address.to_string(),
        IpAddr::V6(address) => format!("[{address}]"),
    };
    let url = format!("http://{host}:{}/", config.port);
    url::Url::parse(&url).map_err(|error| SimulateError::NoServer(format!("{url}: {error}")))
}
