//! The binary as an operator runs it: configuration errors exit 2, a good `.env` serves on PORT,
//! SIGTERM drains and exits cleanly.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// Each test runs the binary in an empty directory of its own, removed with what the run left
// in it (its `.env`, its SQLite database) when the test ends.
use callbridge_testkit::scratch::Scratch;

const BINARY: &str = env!("CARGO_BIN_EXE_callbridge");
const REQUIRED: [&str; 4] = [
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "OPENAI_API_KEY",
    "PUBLIC_BASE_URL",
];

/// Runs the binary with `args` in an empty directory and environment, checks it exits 2 naming
/// every required variable, and returns what it printed.
fn unconfigured(args: &[&str]) -> String {
    let dir = Scratch::new();
    let output = Command::new(BINARY)
        .args(args)
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    for variable in REQUIRED {
        assert!(
            stderr.contains(&format!("{variable} is missing")),
            "{stderr}"
        );
    }
    stderr
}

#[test]
fn an_empty_environment_names_every_missing_variable_and_exits_2() {
    let stderr = unconfigured(&[]);
    assert_eq!(
        stderr.lines().count(),
        REQUIRED.len(),
        "one line per problem: {stderr}"
    );
    assert!(stderr.contains(".env.example"));
}

#[test]
fn a_malformed_value_is_named_and_exits_2() {
    let dir = Scratch::new();
    let output = Command::new(BINARY)
        .current_dir(dir.path())
        .env_clear()
        .env("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef")
        .env("TWILIO_AUTH_TOKEN", "super-secret-token")
        .env("OPENAI_API_KEY", "sk-live-secret")
        .env("PUBLIC_BASE_URL", "not a url")
        .env("PORT", "99999")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("PUBLIC_BASE_URL"), "{stderr}");
    assert!(stderr.contains("PORT"), "{stderr}");
    assert!(!stderr.contains("super-secret-token") && !stderr.contains("sk-live-secret"));
}

#[test]
fn an_unparsable_env_file_names_its_line_and_variable_but_not_the_value() {
    let dir = Scratch::new();
    std::fs::write(
        dir.path().join(".env"),
        "PORT=8080\nTWILIO_AUTH_TOKEN=abc def'ghi\n",
    )
    .unwrap();
    let output = Command::new(BINARY)
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains(".env:2: cannot parse the value of TWILIO_AUTH_TOKEN"),
        "{stderr}"
    );
    assert!(!stderr.contains("def'ghi"), "{stderr}");
}

#[test]
fn a_short_api_token_is_a_configuration_error() {
    let dir = Scratch::new();
    let output = Command::new(BINARY)
        .current_dir(dir.path())
        .env_clear()
        .env("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef")
        .env("TWILIO_AUTH_TOKEN", "super-secret-token")
        .env("OPENAI_API_KEY", "sk-live-secret")
        .env("PUBLIC_BASE_URL", "https://example.ngrok.app")
        .env("CALLBRIDGE_API_TOKEN", "a")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("CALLBRIDGE_API_TOKEN must be at least 32 characters"),
        "{stderr}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the binary in `dir` (whose `.env` sets PORT to `port`), waits until `/healthz`
/// answers 200, sends SIGTERM, and returns everything it logged once it exited with 0.
fn serve_until_sigterm(dir: &std::path::Path, port: u16) -> String {
    let mut child = Command::new(BINARY)
        .current_dir(dir)
        .env_clear()
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let healthy = loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::Write;
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut reply = String::new();
            let _ = stream.read_to_string(&mut reply);
            break reply.starts_with("HTTP/1.1 200");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("server did not start listening");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(healthy);

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let mut logs = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    logs
}

#[test]
fn a_complete_env_file_serves_on_port_and_sigterm_exits_cleanly() {
    let dir = Scratch::new();
    let port = free_port();
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "TWILIO_ACCOUNT_SID=AC0123456789abcdef0123456789abcdef\n\
             TWILIO_AUTH_TOKEN=super-secret-token\n\
             OPENAI_API_KEY=sk-live-secret\n\
             PUBLIC_BASE_URL=https://example.ngrok.app\n\
             PORT={port}\n\
             DATABASE_URL=sqlite://{}/callbridge.db?mode=rwc\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let logs = serve_until_sigterm(dir.path(), port);
    assert!(logs.contains("SIGTERM"), "{logs}");
    assert!(logs.contains("draining: no calls to wait for"), "{logs}");
    assert!(!logs.contains("super-secret-token") && !logs.contains("sk-live-secret"));
    // Loopback unless HOST says otherwise.
    assert!(logs.contains(&format!("127.0.0.1:{port}")), "{logs}");
    for url in ["/voice", "/voice/status", "/messaging"] {
        assert!(
            logs.lines().any(|line| line.contains("paste into Twilio")
                && line.contains(&format!("https://example.ngrok.app{url}"))),
            "{url}: {logs}"
        );
    }
    assert!(
        logs.lines()
            .any(|line| line.contains("features: outbound calling off")
                && line.contains("API off")
                && line.contains("agents by name off")
                && line.contains("events off")),
        "{logs}"
    );
    assert!(!logs.contains("example value"), "{logs}");
}

#[test]
fn the_example_env_file_starts_with_one_warning_per_placeholder() {
    let dir = Scratch::new();
    let port = free_port();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "{example}\nPORT={port}\nDATABASE_URL=sqlite://{}/callbridge.db?mode=rwc\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let logs = serve_until_sigterm(dir.path(), port);
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("still has the example value from .env.example"))
        .collect();
    assert_eq!(warnings.len(), REQUIRED.len(), "{logs}");
    for (warning, variable) in warnings.iter().zip(REQUIRED) {
        assert!(
            warning.contains("WARN") && warning.contains(variable),
            "{logs}"
        );
    }
}

#[test]
fn a_bad_agents_file_names_its_line_and_key_and_exits_2() {
    let dir = Scratch::new();
    let agents = dir.path().join("agents.toml");
    std::fs::write(
        &agents,
        "[[agent]]\nname = \"support\"\ninstructions = \"Help.\"\nvoice = \"cedar\"\nvoise = \"ash\"\n\n\
         [[agent]]\nname = \"support\"\ninstructions = \"Help.\"\n",
    )
    .unwrap();
    let output = Command::new(BINARY)
        .current_dir(dir.path())
        .env_clear()
        .env("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef")
        .env("TWILIO_AUTH_TOKEN", "super-secret-token")
        .env("OPENAI_API_KEY", "sk-live-secret")
        .env("PUBLIC_BASE_URL", "https://example.ngrok.app")
        .env("AGENTS_FILE", &agents)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let file = agents.display();
    assert!(
        stderr.contains(&format!(
            "{file}:5: agent \"support\": key `voise` is unknown"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{file}:8: agent \"support\": key `name` \"support\" is already the name of the agent on line 2"
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 2, "one line per problem: {stderr}");
}

#[test]
fn version_prints_the_package_version() {
    for flag in ["--version", "-V", "version"] {
        let output = Command::new(BINARY).arg(flag).env_clear().output().unwrap();
        assert_eq!(output.status.code(), Some(0));
        assert_eq!(
            String::from_utf8(output.stdout).unwrap(),
            format!("callbridge {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

/// The string literals of `source` (its test module left out) that `pick` accepts, e.g.
/// environment variable names. A small scanner: comments, `'"'` and raw strings are skipped so
/// their quotes do not shift which text counts as inside a literal.
fn literals(source: &str, pick: impl Fn(&str) -> bool) -> Vec<String> {
    let code = source.split("#[cfg(test)]").next().unwrap();
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("//") {
            rest = rest.find('\n').map_or("", |end| &rest[end..]);
        } else if rest.starts_with("'\"'") {
            rest = &rest[3..];
        } else if rest.starts_with("r#\"") {
            rest = rest[3..].find("\"#").map_or("", |end| &rest[3 + end + 2..]);
        } else if c == '"' {
            let mut literal = String::new();
            let mut chars = rest[1..].char_indices();
            let mut end = rest.len() - 1;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            literal.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => literal.push(c),
                }
            }
            if pick(&literal) {
                found.push(literal);
            }
            rest = &rest[1 + end..];
        } else {
            rest = &rest[c.len_utf8()..];
        }
    }
    found
}

#[test]
fn help_lists_the_commands_every_variable_and_every_route() {
    let output = Command::new(BINARY)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8(output.stdout).unwrap();
    for command in ["serve", "simulate", "help", "version"] {
        assert!(
            help.contains(&format!("\n  {command} ")),
            "{command}: {help}"
        );
    }

    let config =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/config.rs")).unwrap();
    // Every upper-case literal is a variable the configuration reads, except the prefixes it
    // checks names against (ending in `_`) and the list of other programs' variables it ignores.
    let (before, others) = config
        .split_once("const OTHER_PROGRAMS_VARIABLES")
        .expect("src/config.rs lists the other programs' variables");
    let after = others.split_once("];").unwrap().1;
    let config = format!("{before}{after}");
    let variables = literals(&config, |literal| {
        !literal.ends_with('_')
            && literal.len() > 2
            && literal.starts_with(|c: char| c.is_ascii_uppercase())
            && literal
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    });
    assert!(variables.len() > 20, "{variables:?}");
    for variable in variables.iter().map(String::as_str).chain(["RUST_LOG"]) {
        assert!(
            help.lines()
                .any(|line| line.trim_start().starts_with(&format!("{variable} "))),
            "{variable} is read but --help does not explain it"
        );
    }

    let routes =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/routes/mod.rs")).unwrap();
    let mut paths = literals(&routes, |literal| literal.starts_with('/'));
    assert!(paths.len() > 10, "{paths:?}");
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/routes/dashboard.rs"
    ))
    .unwrap();
    let dashboard_paths = literals(&dashboard, |literal| literal.starts_with("/dashboard"));
    assert!(dashboard_paths.len() >= 9, "{dashboard_paths:?}");
    paths.extend(dashboard_paths);
    for path in paths {
        assert!(
            help.contains(&format!(" {path} ")),
            "route {path} is not in --help"
        );
    }
}

#[test]
fn an_unknown_command_exits_2_and_points_at_help() {
    let output = Command::new(BINARY)
        .arg("srve")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("\"srve\"") && stderr.contains("--help"),
        "{stderr}"
    );
}

#[test]
fn simulate_explains_itself_without_configuration_and_then_needs_the_servers() {
    let help = Command::new(BINARY)
        .args(["simulate", "--help"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8(help.stdout).unwrap();
    for option in [
        "--audio",
        "--out",
        "--from",
        "--to",
        "--channel",
        "--seconds",
        "--dtmf",
        "--json",
        "--server",
    ] {
        assert!(text.contains(option), "{option}: {text}");
    }

    let no_audio = Command::new(BINARY)
        .arg("simulate")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(no_audio.status.code(), Some(2));
    assert!(
        String::from_utf8(no_audio.stderr)
            .unwrap()
            .contains("--audio")
    );

    // Past its options it reads the same configuration as the server, and fails the same way.
    unconfigured(&["simulate", "--audio", "caller.wav"]);
}
