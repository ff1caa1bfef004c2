use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use callbridge::clock::{Clock, SystemClock};
use callbridge::config::Config;
use callbridge::startup::Application;
use callbridge::state::AppState;
use callbridge::twilio::signature::{self, SignedBody};

pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
/// Some other Twilio account, well-formed.
pub const OTHER_ACCOUNT_SID: &str = "ACffffffffffffffffffffffffffffffff";
pub const AUTH_TOKEN: &str = "test-auth-token";
pub const PUBLIC_BASE_URL: &str = "https://callbridge.test";

/// Talks to a running callbridge (in this process or a spawned binary) the way Twilio does.
pub struct Client {
    pub address: String,
    pub http: reqwest::Client,
}

pub struct TestApp {
    pub client: Client,
    pub state: Arc<AppState>,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestApp {
    /// Waits until every bridge has ended and given its call slot back.
    pub async fn wait_until_no_call_is_live(&self) {
        let mut occupancy = self.state.admission.subscribe();
        tokio::time::timeout(Duration::from_secs(10), occupancy.wait_for(|o| o.live == 0))
            .await
            .expect("every call ended within 10 s")
            .expect("the admission is alive");
    }
}

impl std::ops::Deref for TestApp {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Client {
    pub fn new(address: String) -> Self {
        // reqwest is built without a default TLS provider; a test that talks to a spawned
        // binary may be the first in this process to need one.
        callbridge::tls::install_crypto_provider();
        Self {
            address,
            http: reqwest::Client::new(),
        }
    }
}

/// Environment for a test app: the required variables plus `overrides`.
pub fn test_config(overrides: &[(&str, &str)]) -> Config {
    let mut env: HashMap<String, String> = [
        ("TWILIO_ACCOUNT_SID", ACCOUNT_SID),
        ("TWILIO_AUTH_TOKEN", AUTH_TOKEN),
        ("OPENAI_API_KEY", "sk-test-key"),
        ("PUBLIC_BASE_URL", PUBLIC_BASE_URL),
        ("PORT", "0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert("DATABASE_URL".into(), sqlite_url(&temp_path("db")));
    // Nothing listens on the discard port: REST calls a test did not plan for fail at once,
    // on this machine.
    env.insert("TWILIO_API_BASE_URL".into(), "http://127.0.0.1:9".into());
    for (k, v) in overrides {
        env.insert(k.to_string(), v.to_string());
    }
    let mut config =
        Config::from_lookup(|k| env.get(k).cloned()).expect("test configuration is valid");
    // The fakes answer in milliseconds; a test of Twilio not answering need not wait 10 s.
    config.twilio_request_timeout = TWILIO_TIMEOUT;
    config
}

/// The Twilio REST timeout of every test app.
pub const TWILIO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A fresh path under the system temp dir; each test gets its own database file.
pub fn temp_path(extension: &str) -> std::path::PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "callbridge-test-{}-{n}.{extension}",
        std::process::id()
    ))
}

pub fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

pub async fn spawn_app(overrides: &[(&str, &str)]) -> TestApp {
    spawn_app_with(test_config(overrides)).await
}

pub async fn spawn_app_with(config: Config) -> TestApp {
    spawn_app_with_clock(config, Arc::new(SystemClock)).await
}

pub async fn spawn_app_with_clock(config: Config, clock: Arc<dyn Clock>) -> TestApp {
    let app = Application::build_with_clock(config, clock)
        .await
        .expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let state = app.state();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp {
        client: Client::new(address),
        state,
        server,
    }
}

/// A clock that only moves when a test says so.
pub struct ManualClock(AtomicI64);

impl Default for ManualClock {
    /// 2027-01-15: any fixed moment will do.
    fn default() -> Self {
        Self(AtomicI64::new(1_800_000_000_000))
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        self.0
            .fetch_add(i64::try_from(by.as_millis()).unwrap(), Ordering::SeqCst);
    }
}

pub fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A CallSid as Twilio writes them (`CA` and 32 hex digits), numbered so tests tell calls apart.
pub fn call_sid(n: u64) -> String {
    format!("CA{n:032}")
}

/// The voice webhook Twilio sends for an inbound WhatsApp call.
pub fn voice_form(call_sid: &str) -> Vec<(String, String)> {
    form(&[
        ("CallSid", call_sid),
        ("AccountSid", ACCOUNT_SID),
        ("From", "whatsapp:+5511999990000"),
        ("To", "whatsapp:+558551234567"),
        ("CallStatus", "ringing"),
        ("Direction", "inbound"),
        ("ApiVersion", "2010-04-01"),
    ])
}

/// The messaging webhook Twilio sends when the user presses the call-permission button.
pub fn permission_reply_form(message_sid: &str, payload: &str) -> Vec<(String, String)> {
    form(&[
        ("MessageSid", message_sid),
        ("SmsMessageSid", message_sid),
        ("AccountSid", ACCOUNT_SID),
        ("From", "whatsapp:+5511999990000"),
        ("To", "whatsapp:+558551234567"),
        ("WaId", "5511999990000"),
        ("MessageType", "interactive"),
        ("Body", "VOICE_CALL_REQUEST"),
        ("ButtonText", "VOICE_CALL_REQUEST"),
        ("ButtonPayload", payload),
    ])
}

/// `params` folded the way the signature allows: in the sorted order Twilio signs them in, the
/// value of `name` swallows the `count` parameters after it (names and values appended). The
/// string Twilio signed, and so the signature, stays the same.
pub fn swallow_next(
    params: &[(String, String)],
    name: &str,
    count: usize,
) -> Vec<(String, String)> {
    let mut sorted = params.to_vec();
    sorted.sort();
    let at = sorted
        .iter()
        .position(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} to fold"));
    let swallowed: Vec<_> = sorted.drain(at + 1..at + 1 + count).collect();
    for (next_name, next_value) in swallowed {
        sorted[at].1.push_str(&next_name);
        sorted[at].1.push_str(&next_value);
    }
    sorted
}

pub fn twilio_signature(url: &str, params: &[(String, String)]) -> String {
    signature::compute(AUTH_TOKEN.as_bytes(), url, SignedBody::Form(params))
}

impl Client {
    /// POSTs a form to `path`, signed the way Twilio signs it (over the public URL).
    pub async fn post_signed(&self, path: &str, params: &[(String, String)]) -> reqwest::Response {
        let signature = twilio_signature(&format!("{PUBLIC_BASE_URL}{path}"), params);
        self.post_form(path, params, Some(&signature)).await
    }

    pub async fn post_form(
        &self,
        path: &str,
        params: &[(String, String)],
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}{path}", self.address))
            .form(params);
        if let Some(signature) = signature {
            request = request.header("X-Twilio-Signature", signature);
        }
        request.send().await.expect("request reaches the app")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("request reaches the app")
    }

    /// Answers a call through `/voice` and returns the stream token from the TwiML.
    pub async fn answer_call(&self, call_sid: &str) -> String {
        let response = self.post_signed("/voice", &voice_form(call_sid)).await;
        assert_eq!(response.status(), 200);
        let twiml = parse_twiml(&response.text().await.unwrap());
        twiml.parameters["token"].clone()
    }
}

/// The parts of a `/voice` answer the tests look at, read as Twilio (and `callbridge simulate`)
/// reads them.
pub use callbridge::twilio::twiml::Document as Twiml;

pub fn parse_twiml(xml: &str) -> Twiml {
    callbridge::twilio::twiml::read(xml).expect("TwiML is well-formed XML")
}

/// The real `callbridge` binary, configured like `test_config` plus `env`, for what only a
/// process shows: signals, SIGKILL, what reaches stdout and stderr. Its output goes to a file
/// (a pipe nobody reads would fill up and stall a verbose server); it is killed, and that file
/// removed, when dropped.
pub struct Binary {
    pub client: Client,
    /// The `DATABASE_URL` it runs on.
    pub database: String,
    child: std::process::Child,
    output: std::path::PathBuf,
}

impl Binary {
    /// Starts it and waits until `/healthz` answers.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        Self::start_with(
            std::process::Command::new(env!("CARGO_BIN_EXE_callbridge")),
            env,
        )
        .await
    }

    /// As `start`, running `command` (the binary, or a shell that execs it) with the environment.
    pub async fn start_with(mut command: std::process::Command, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string();
        let database = env
            .iter()
            .find(|(name, _)| *name == "DATABASE_URL")
            .map_or_else(|| sqlite_url(&temp_path("db")), |(_, url)| url.to_string());
        let output = temp_path("log");
        let log = std::fs::File::create(&output).unwrap();
        command
            .env_clear()
            .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
            .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
            .env("OPENAI_API_KEY", callbridge_testkit::realtime::API_KEY)
            .env("PUBLIC_BASE_URL", PUBLIC_BASE_URL)
            .env("PORT", &port)
            .env("DATABASE_URL", &database)
            // As in `test_config`: a REST call nobody planned for fails at once, on this machine.
            .env("TWILIO_API_BASE_URL", "http://127.0.0.1:9")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut binary = Self {
            client: Client::new(format!("http://127.0.0.1:{port}")),
            database,
            child: command.spawn().unwrap(),
            output,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while binary
            .client
            .http
            .get(format!("{}/healthz", binary.client.address))
            .send()
            .await
            .is_err()
        {
            if let Some(status) = binary.child.try_wait().unwrap() {
                panic!("the server exited ({status}):\n{}", binary.output());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        binary
    }

    /// Sends `signal` (a name `kill` knows: `TERM`, `KILL`, …).
    pub fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit; fails the test after `within`.
    pub async fn exit_status_within(
        &mut self,
        within: std::time::Duration,
    ) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not exit within {within:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Everything it wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.output).unwrap()).into_owned()
    }
}

impl std::ops::Deref for Binary {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The output file was only for this test to read.
        let _ = std::fs::remove_file(&self.output);
    }
}

/// The header of a final text frame declaring `length` payload bytes, masked with `mask` (a
/// client's frames must be, a server's must not): the bytes a peer sends before its payload.
pub fn text_frame_header(length: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        mask,
        ..FrameHeader::default()
    };
    let mut bytes = Vec::new();
    header
        .format(length, &mut bytes)
        .expect("a header formats into memory");
    bytes
}
