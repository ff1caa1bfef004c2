//! `AGENTS_FILE` in a running server: the directory calls read, and reloading it (directly and
//! by `SIGHUP` to the real binary).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use callbridge::startup::{ReloadError, reload_agents};
use callbridge_testkit::scratch::Scratch;
use serde_json::Value;

use crate::helpers::*;

/// An agents file of its own, removed with its directory when the test ends.
struct AgentsFile {
    file: PathBuf,
    _scratch: Scratch,
}

impl AgentsFile {
    fn new(text: &str) -> Self {
        let scratch = Scratch::new();
        Self {
            file: scratch.write("agents.toml", text),
            _scratch: scratch,
        }
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.file, text).unwrap();
    }

    fn path(&self) -> &str {
        self.file.to_str().unwrap()
    }
}

fn agent(name: &str, number: &str) -> String {
    format!("[[agent]]\nname = \"{name}\"\nnumbers = [\"{number}\"]\ninstructions = \"Help.\"\n")
}

fn names(state: &callbridge::state::AppState) -> Vec<String> {
    state
        .agents
        .current()
        .profiles()
        .iter()
        .map(|agent| agent.name.clone())
        .collect()
}

#[tokio::test]
async fn a_reload_replaces_the_agents_for_new_calls_and_a_bad_file_keeps_them() {
    let file = AgentsFile::new(&agent("support", "+15551230001"));
    let app = spawn_app(&[("AGENTS_FILE", file.path())]).await;
    assert_eq!(names(&app.state), ["support"]);

    file.write(&format!(
        "{}{}",
        agent("support", "+15551230001"),
        agent("sales", "+15551230002")
    ));
    assert_eq!(reload_agents(&app.state).await.unwrap(), 2);
    assert_eq!(names(&app.state), ["support", "sales"]);
    assert_eq!(
        app.state
            .agents
            .current()
            .for_number("whatsapp:+15551230002")
            .name,
        "sales"
    );
    // `/voice` routes by the number called: the TwiML names the agent the stream will use.
    for (n, to, expected) in [
        (1, "whatsapp:+15551230002", "sales"),
        (2, "+15551230001", "support"),
        (3, "whatsapp:+15559999999", "support"),
    ] {
        let params = form(&[
            ("CallSid", &call_sid(n)),
            ("AccountSid", ACCOUNT_SID),
            ("From", "whatsapp:+5511999990000"),
            ("To", to),
            ("Direction", "inbound"),
            ("CallStatus", "ringing"),
        ]);
        let twiml = parse_twiml(
            &app.post_signed("/voice", &params)
                .await
                .text()
                .await
                .unwrap(),
        );
        assert_eq!(twiml.parameters["agent"], expected, "a call to {to}");
    }

    // A file with problems: every one is reported, and the agents in use stay.
    file.write(&format!(
        "{}voice = \"\"\n{}",
        agent("support", "+15551230001"),
        agent("support", "+15551230003")
    ));
    let Err(ReloadError::Invalid(errors)) = reload_agents(&app.state).await else {
        panic!("a bad file is refused");
    };
    let report = errors.to_string();
    assert!(report.contains(&format!("{}:5: ", file.path())), "{report}");
    assert!(report.contains("key `voice` must not be empty"), "{report}");
    assert!(report.contains(&format!("{}:7: ", file.path())), "{report}");
    assert!(
        report.contains("already the name of the agent on line 2"),
        "{report}"
    );
    assert_eq!(names(&app.state), ["support", "sales"]);

    // As at startup, agents that call the business need the webhook secret, which is not set.
    file.write(&format!(
        "{}context_url = \"https://backend.example.com/context\"\n",
        agent("support", "+15551230001")
    ));
    let Err(ReloadError::Invalid(errors)) = reload_agents(&app.state).await else {
        panic!("an agent calling the business without a secret is refused");
    };
    assert!(
        errors
            .to_string()
            .contains("CALLBRIDGE_WEBHOOK_SECRET is missing"),
        "{errors}"
    );
    assert_eq!(names(&app.state), ["support", "sales"]);

    // A file that cannot be read at all changes nothing either.
    let gone = file.file.with_extension("gone");
    std::fs::rename(&file.file, &gone).unwrap();
    let refused = reload_agents(&app.state).await;
    std::fs::rename(&gone, &file.file).unwrap();
    assert!(
        matches!(refused, Err(ReloadError::Invalid(_))),
        "{refused:?}"
    );
    assert_eq!(names(&app.state), ["support", "sales"]);
}

#[tokio::test]
async fn with_a_webhook_secret_agents_that_call_the_business_reload() {
    let file = AgentsFile::new(&agent("support", "+15551230001"));
    let app = spawn_app(&[
        ("AGENTS_FILE", file.path()),
        (
            "CALLBRIDGE_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
    ])
    .await;
    file.write(&format!(
        "{}context_url = \"https://backend.example.com/context\"\n",
        agent("support", "+15551230001")
    ));
    assert_eq!(reload_agents(&app.state).await.unwrap(), 1);
    assert!(app.state.agents.current().call_the_business());
}

#[tokio::test]
async fn without_an_agents_file_there_is_nothing_to_reload() {
    let app = spawn_app(&[]).await;
    assert_eq!(names(&app.state), ["default"]);
    assert!(matches!(
        reload_agents(&app.state).await,
        Err(ReloadError::NoAgentsFile)
    ));
    assert_eq!(names(&app.state), ["default"]);
}

/// The JSON log lines of `server` so far whose message starts with `prefix`.
fn logged(server: &Binary, prefix: &str) -> Vec<Value> {
    server
        .output()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| {
            event["message"]
                .as_str()
                .is_some_and(|message| message.starts_with(prefix))
        })
        .collect()
}

async fn wait_for_log(server: &Binary, prefix: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = logged(server, prefix);
        if events.len() >= count {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "no {prefix:?} logged:\n{}",
            server.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sighup_reloads_the_agents_file_and_a_bad_one_is_logged_and_kept() {
    let file = AgentsFile::new(&agent("support", "+15551230001"));
    let server = Binary::start(&[
        ("AGENTS_FILE", file.path()),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
    ])
    .await;

    file.write(&format!(
        "{}{}",
        agent("support", "+15551230001"),
        agent("sales", "+15551230002")
    ));
    server.signal("HUP");
    let reloaded = wait_for_log(&server, "AGENTS_FILE reloaded", 1).await;
    assert_eq!(reloaded[0]["agents"], "support, sales");
    assert_eq!(reloaded[0]["level"], "INFO");

    file.write("[[agent]]\nname = \"support\"\ninstructions = \"Help.\"\ncolour = \"red\"\n");
    server.signal("HUP");
    let refused = wait_for_log(&server, "AGENTS_FILE not reloaded", 1).await;
    assert_eq!(refused[0]["level"], "ERROR");
    let problems = refused[0]["problems"].as_str().unwrap();
    assert!(
        problems.contains(&format!("{}:4: ", file.path())) && problems.contains("`colour`"),
        "{problems}"
    );

    // Still serving, and a good file after a bad one is taken again.
    assert_eq!(server.get("/healthz").await.status(), 200);
    file.write(&agent("sales", "+15551230002"));
    server.signal("HUP");
    let reloaded = wait_for_log(&server, "AGENTS_FILE reloaded", 2).await;
    assert_eq!(reloaded[1]["agents"], "sales");
}
