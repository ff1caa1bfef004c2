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
    Config::from_lookup(|k| env.get(k).cloned()).expect("test configuration is valid")
}

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
        self.0.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

pub fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
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

/// The parts of a `/voice` answer the tests look at, read with a real XML parser.
#[derive(Debug, Default)]
pub struct Twiml {
    pub elements: Vec<String>,
    pub stream_url: Option<String>,
    pub parameters: HashMap<String, String>,
    pub say: Vec<String>,
}

pub fn parse_twiml(xml: &str) -> Twiml {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut twiml = Twiml::default();
    let mut in_say = false;
    loop {
        match reader.read_event().expect("TwiML is well-formed XML") {
            Event::Start(e) | Event::Empty(e) => {
                let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                let attrs: HashMap<String, String> = e
                    .attributes()
                    .map(|a| {
                        let a = a.unwrap();
                        (
                            String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                            a.unescape_value().unwrap().into_owned(),
                        )
                    })
                    .collect();
                match name.as_str() {
                    "Stream" => twiml.stream_url = attrs.get("url").cloned(),
                    "Parameter" => {
                        twiml
                            .parameters
                            .insert(attrs["name"].clone(), attrs["value"].clone());
                    }
                    "Say" => in_say = true,
                    _ => {}
                }
                twiml.elements.push(name);
            }
            Event::Text(t) if in_say => {
                twiml.say.push(t.unescape().unwrap().into_owned());
                in_say = false;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    twiml
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
