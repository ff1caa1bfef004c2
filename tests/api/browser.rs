//! The dashboard in a real browser: headless Chromium, driven over WebDriver (chromedriver,
//! which the test starts on a free loopback port), signs in, watches a call that Twilio and
//! OpenAI's fakes drive, opens the call's page and signs out. It saves what it saw as
//! `target/dashboard-live-call.png` (and `-phone.png`, at a phone's width).
//!
//! It needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without
//! chromedriver it says it skipped, except under CI (`CI=true`) or with
//! `CALLBRIDGE_REQUIRE_CHROMIUM` set, where a skipped browser test is a failure.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client as WebDriver, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::calls::API_TOKEN;
use crate::dashboard::{assert_no_full_number, dashboard_app};
use crate::fake_twilio::agent_audio;
use crate::helpers::*;
use crate::stream::{connected_call, delta};
use callbridge_testkit::realtime::FakeRealtime;
use callbridge_testkit::scratch::Scratch;

/// How long Chromium may take to do what a step asks (the machine may be busy).
const STEP: Duration = Duration::from_secs(15);

/// The first program of `names` found on `PATH`.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

fn browser_required() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
        || std::env::var_os("CALLBRIDGE_REQUIRE_CHROMIUM").is_some()
}

/// A chromedriver this test started, in a process group of its own (Chromium's processes
/// join it), with a scratch directory for Chromium's profile, the log and every temp file they
/// make (it is their `TMPDIR`). Dropping it kills the group, then the scratch goes with it.
struct ChromeDriver {
    child: Child,
    url: String,
    profile: PathBuf,
    log: PathBuf,
    chromium: Option<PathBuf>,
    _scratch: Scratch,
}

impl ChromeDriver {
    /// `None` (with a notice) when chromedriver is not installed and not required.
    async fn start() -> Option<Self> {
        let Some(program) = on_path(&["chromedriver"]) else {
            assert!(
                !browser_required(),
                "chromedriver is not installed, and CI=true or CALLBRIDGE_REQUIRE_CHROMIUM asks for \
                 the browser test: install Debian's chromium and chromium-driver \
                 (apt-get install chromium chromium-driver; .ci/run does)"
            );
            eprintln!(
                "skipping the dashboard's browser test: chromedriver is not installed \
                 (apt-get install chromium chromium-driver)"
            );
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let scratch = Scratch::new();
        let profile = scratch.path().join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let log = scratch.path().join("chromedriver.log");
        let output = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .env("TMPDIR", scratch.path())
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            profile,
            log,
            chromium: on_path(&["chromium", "chromium-browser", "google-chrome"]),
            _scratch: scratch,
        };
        callbridge::tls::install_crypto_provider();
        let http = reqwest::Client::new();
        let deadline = Instant::now() + STEP;
        loop {
            let status = http.get(format!("{}/status", driver.url)).send().await;
            if status.is_ok_and(|response| response.status().is_success()) {
                return Some(driver);
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on {}:\n{}",
                driver.url,
                driver.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A headless Chromium session with a `width`×`height` window.
    async fn session(&self, width: u32, height: u32) -> WebDriver {
        let mut options = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                format!("--user-data-dir={}", self.profile.display()),
                format!("--window-size={width},{height}"),
                "--hide-scrollbars",
            ],
        });
        if let Some(chromium) = &self.chromium {
            options["binary"] = Value::String(chromium.display().to_string());
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("goog:chromeOptions".into(), options);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        tokio::time::timeout(
            Duration::from_secs(60),
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&self.url),
        )
        .await
        .expect("Chromium started within 60 s")
        .unwrap_or_else(|error| panic!("no Chromium session: {error}\n{}", self.output()))
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and every Chromium process it started.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// The text of the first element `css` finds, once it contains `expected`.
async fn text_containing(browser: &WebDriver, css: &str, expected: &str) -> String {
    let deadline = Instant::now() + STEP;
    let mut last = String::new();
    loop {
        if let Ok(element) = browser.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
        {
            if text.contains(expected) {
                return text;
            }
            last = text;
        }
        assert!(
            Instant::now() < deadline,
            "{css} never showed {expected:?}; it showed:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn path_becomes(browser: &WebDriver, path: &str) {
    let deadline = Instant::now() + STEP;
    loop {
        let url = browser.current_url().await.unwrap();
        if url.path() == path {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the browser is at {url}, not {path}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where the screenshots go: the target directory (`CARGO_TARGET_TMPDIR` is inside it).
fn artifact(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join(name)
}

async fn screenshot(browser: &WebDriver, name: &str) {
    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(artifact(name), png).unwrap();
}

fn caller_said(text: &str) -> Value {
    json!({"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","content_index":0,"transcript":text})
}

fn agent_said(item_id: &str, text: &str) -> Value {
    json!({"type":"response.output_audio_transcript.done","response_id":"resp_1","item_id":item_id,"output_index":0,"content_index":0,"transcript":text})
}

#[tokio::test]
async fn the_dashboard_follows_a_live_call_in_headless_chromium() {
    let Some(driver) = ChromeDriver::start().await else {
        return;
    };
    let fake = FakeRealtime::start().await;
    let app = dashboard_app(&fake, &[]).await;
    let browser = driver.session(1100, 820).await;
    // Should a step fail, dropping the driver ends Chromium all the same.
    drive(&app, &fake, &browser).await;
    browser.close().await.unwrap();
}

/// Everything the browser does.
async fn drive(app: &TestApp, fake: &FakeRealtime, browser: &WebDriver) {
    // Not signed in: the dashboard sends the browser to sign in.
    browser
        .goto(&format!("{}/dashboard", app.address))
        .await
        .unwrap();
    path_becomes(browser, "/dashboard/login").await;
    let token = browser.find(Locator::Css("#token")).await.unwrap();
    token.send_keys(API_TOKEN).await.unwrap();
    browser
        .find(Locator::Css("form.login button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    path_becomes(browser, "/dashboard").await;
    text_containing(browser, "#live", "No live calls.").await;
    text_containing(browser, "#connection", "live").await;

    // A call arrives, and its lines appear as OpenAI's fake produces them.
    let sid = call_sid(9001);
    let (mut twilio, session) = connected_call(app, fake, &sid).await;
    let card = format!(r#".card[data-call="{sid}"]"#);
    text_containing(browser, &card, "+*********0000").await;
    session.send(caller_said(
        "Hello, I'd like to move my delivery to Friday.",
    ));
    text_containing(browser, &card, "move my delivery to Friday").await;
    session.send(delta("resp_1", "item_a1", &agent_audio(400, 1)));
    assert_eq!(twilio.recv().await["event"], "media");
    session.send(agent_said(
        "item_a1",
        "Of course. Can you confirm the number on the order?",
    ));
    text_containing(browser, &card, "confirm the number on the order").await;
    session.send(caller_said(
        "It's 5511 9999 0000, the one I'm calling from.",
    ));
    let shown = text_containing(browser, &card, "the one I'm calling from").await;
    assert!(shown.contains("**** **** 0000"), "{shown}");
    // The agent's audio has not been played out yet: it is the one speaking.
    text_containing(browser, &format!("{card} .speaking"), "agent").await;

    // The duration is ticked by the page's script.
    let duration = format!("{card} [data-since]");
    let before = text_containing(browser, &duration, ":").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let after = text_containing(browser, &duration, ":").await;
    assert_ne!(before, after, "the duration does not tick");

    let source = browser.source().await.unwrap();
    assert_no_full_number(&source, "the board in Chromium");
    screenshot(browser, "dashboard-live-call.png").await;
    browser.set_window_size(412, 915).await.unwrap();
    screenshot(browser, "dashboard-live-call-phone.png").await;
    browser.set_window_size(1100, 820).await.unwrap();

    // The call's page has the whole transcript, and keeps following the call.
    browser
        .find(Locator::Css(&format!("{card} a.who")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    path_becomes(browser, &format!("/dashboard/calls/{sid}")).await;
    text_containing(browser, "#history", "move my delivery to Friday").await;
    session.send(agent_said("item_a2", "Thank you, it is moved to Friday."));
    text_containing(browser, "#history", "it is moved to Friday").await;
    assert_no_full_number(
        &browser.source().await.unwrap(),
        "the call's page in Chromium",
    );

    twilio.stop().await;
    twilio.closed_within(Duration::from_secs(2)).await;
    text_containing(browser, "#history", "caller_hung_up").await;
    text_containing(browser, "#connection", "call ended").await;

    // Signing out clears the session: the dashboard asks to sign in again.
    browser
        .find(Locator::Css("#sign-out"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    path_becomes(browser, "/dashboard/login").await;
    browser
        .goto(&format!("{}/dashboard", app.address))
        .await
        .unwrap();
    path_becomes(browser, "/dashboard/login").await;
}
