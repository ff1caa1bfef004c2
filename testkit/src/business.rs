//! A fake of the business's HTTP endpoints (tool URLs, `context_url`, `CALLBRIDGE_EVENTS_URL`):
//! [`FakeBusiness`] checks every request's Standard Webhooks signature with the reference
//! library (`standardwebhooks`), so a test proves what a real business would accept, not merely
//! that callbridge agrees with itself. Tests script an [`Answer`] per path (status, body, a delay
//! before answering) and read back every request as a [`BusinessRequest`].
//!
//! Served by wiremock: it already runs on its own thread and runtime, honours per-answer delays,
//! and takes a custom responder, which is where the verification and recording happen.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use standardwebhooks::Webhook;
use tokio::sync::watch;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// How long [`FakeBusiness::next_request`] waits before failing the test.
const WAIT: Duration = Duration::from_secs(10);

pub struct FakeBusiness {
    port: u16,
    shared: Arc<Shared>,
    // Kept for its lifetime: dropping it stops the server.
    _server: MockServer,
}

/// What the fake answers on a path.
#[derive(Clone, Debug)]
pub struct Answer {
    status: u16,
    body: Option<(Vec<u8>, &'static str)>,
    headers: Vec<(String, String)>,
    delay: Duration,
}

impl Answer {
    pub fn json(status: u16, body: Value) -> Self {
        Self::with_body(status, body.to_string().into_bytes(), "application/json")
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::with_body(status, body.into().into_bytes(), "text/plain")
    }

    /// No body.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: None,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    fn with_body(status: u16, body: Vec<u8>, content_type: &'static str) -> Self {
        Self {
            body: Some((body, content_type)),
            ..Self::status(status)
        }
    }

    /// Answers only `delay` after the request arrived.
    #[must_use]
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn template(&self) -> ResponseTemplate {
        let mut template = ResponseTemplate::new(self.status).set_delay(self.delay);
        if let Some((body, content_type)) = &self.body {
            template = template.set_body_raw(body.clone(), content_type);
        }
        for (name, value) in &self.headers {
            template = template.insert_header(name.as_str(), value.as_str());
        }
        template
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct BusinessRequest {
    pub method: String,
    /// Without the query.
    pub path: String,
    /// Names lowercase, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The raw body (lossily decoded if it is not UTF-8).
    pub body: String,
    /// The body parsed, when it is JSON.
    pub json: Option<Value>,
    /// The reference library accepted the signature (and its timestamp is within its 5 min
    /// tolerance of now). Unverified requests were answered 401.
    pub verified: bool,
    pub received_at: Instant,
}

impl BusinessRequest {
    /// The first value of the header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Shared {
    verifier: Webhook,
    script: Mutex<Script>,
    log: Mutex<Log>,
    /// Bumped on each arrival, so waiters wake without polling.
    arrivals: watch::Sender<usize>,
}

struct Script {
    default: Answer,
    standing: HashMap<String, Answer>,
    once: HashMap<String, VecDeque<Answer>>,
}

impl Script {
    fn answer_for(&mut self, path: &str) -> Answer {
        if let Some(answer) = self.once.get_mut(path).and_then(VecDeque::pop_front) {
            return answer;
        }
        self.standing.get(path).unwrap_or(&self.default).clone()
    }
}

#[derive(Default)]
struct Log {
    requests: Vec<BusinessRequest>,
    /// Per path, how many of its requests `next_request` has handed out.
    handed_out: HashMap<String, usize>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock has already failed; its data is still fine.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Responder(Arc<Shared>);

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let received_at = Instant::now();
        let shared = &self.0;
        let verified = shared
            .verifier
            .verify(&request.body, &request.headers)
            .is_ok();
        let path = request.url.path().to_owned();
        let answer = if verified {
            lock(&shared.script).answer_for(&path)
        } else {
            Answer::text(401, "webhook signature verification failed")
        };
        let headers = request
            .headers
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect();
        lock(&shared.log).requests.push(BusinessRequest {
            method: request.method.to_string(),
            path,
            headers,
            body: String::from_utf8_lossy(&request.body).into_owned(),
            json: serde_json::from_slice(&request.body).ok(),
            verified,
            received_at,
        });
        shared.arrivals.send_modify(|count| *count += 1);
        answer.template()
    }
}

impl FakeBusiness {
    /// The secret the fake verifies with: put it in `CALLBRIDGE_WEBHOOK_SECRET`. A 32-byte key.
    pub const SECRET: &str = "whsec_b5MVDMTFXGkynZ/fuyHGQYQu4kWcJHnI8NTgjML/4oc=";

    /// Listens on 127.0.0.1 (a port of its own), verifying with [`Self::SECRET`]. Every path
    /// answers 200 `{}` until scripted otherwise.
    pub async fn start() -> Self {
        Self::start_with_secret(Self::SECRET).await
    }

    /// As [`Self::start`], verifying with another `whsec_` secret: a business whose secret
    /// differs from callbridge's.
    pub async fn start_with_secret(secret: &str) -> Self {
        let verifier = Webhook::new(secret).expect("a whsec_ secret holding base64");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("a bound address").port();
        let server = MockServer::builder()
            .listener(listener)
            .disable_request_recording()
            .start()
            .await;
        let shared = Arc::new(Shared {
            verifier,
            script: Mutex::new(Script {
                default: Answer::json(200, Value::Object(serde_json::Map::new())),
                standing: HashMap::new(),
                once: HashMap::new(),
            }),
            log: Mutex::new(Log::default()),
            arrivals: watch::Sender::new(0),
        });
        Mock::given(wiremock::matchers::any())
            .respond_with(Responder(Arc::clone(&shared)))
            .mount(&server)
            .await;
        Self {
            port,
            shared,
            _server: server,
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// From now on, every verified request to `path` gets `answer`.
    pub fn answer(&self, path: &str, answer: Answer) {
        lock(&self.shared.script)
            .standing
            .insert(path.to_owned(), answer);
    }

    /// The next verified request to `path` gets `answer`, before any standing one; several
    /// queue up in order (e.g. fail twice, then accept).
    pub fn answer_once(&self, path: &str, answer: Answer) {
        lock(&self.shared.script)
            .once
            .entry(path.to_owned())
            .or_default()
            .push_back(answer);
    }

    /// What paths without an answer of their own get.
    pub fn answer_by_default(&self, answer: Answer) {
        lock(&self.shared.script).default = answer;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<BusinessRequest> {
        lock(&self.shared.log).requests.clone()
    }

    /// The oldest request to `path` not yet returned by this method, waiting for it to arrive
    /// (at most 10 s, then the test fails).
    pub async fn next_request(&self, path: &str) -> BusinessRequest {
        let mut arrivals = self.shared.arrivals.subscribe();
        let wait = async {
            loop {
                if let Some(request) = self.take_next(path) {
                    return request;
                }
                arrivals
                    .changed()
                    .await
                    .expect("the fake business outlives its waiters");
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("no request to {path} reached the business within {WAIT:?}"))
    }

    fn take_next(&self, path: &str) -> Option<BusinessRequest> {
        let mut log = lock(&self.shared.log);
        let Log {
            requests,
            handed_out,
        } = &mut *log;
        let seen = handed_out.entry(path.to_owned()).or_default();
        let request = requests.iter().filter(|r| r.path == path).nth(*seen)?;
        *seen += 1;
        Some(request.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use callbridge::clock::{Clock, SystemClock};
    use callbridge::webhooks::{BusinessClient, BusinessError, WebhookId, WebhookSecret, sign};
    use serde_json::json;

    use super::*;

    fn client() -> BusinessClient {
        let secret = WebhookSecret::parse(FakeBusiness::SECRET).unwrap();
        BusinessClient::new(Some(secret), Arc::new(SystemClock)).unwrap()
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn verifies_and_records_what_callbridge_sends() {
        let business = FakeBusiness::start().await;
        business.answer(
            "/tools/lookup_order",
            Answer::json(200, json!({"eta": "Monday"})),
        );
        let id = WebhookId::random();
        let body = r#"{"type":"tool.call","tool":"lookup_order"}"#;

        let answer = client()
            .post(&business.url("/tools/lookup_order"), &id, body, TIMEOUT)
            .await
            .unwrap();

        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, br#"{"eta":"Monday"}"#);
        let request = business.next_request("/tools/lookup_order").await;
        assert!(request.verified);
        assert_eq!(request.path, "/tools/lookup_order");
        assert_eq!(request.body, body);
        assert_eq!(
            request.json,
            Some(json!({"type": "tool.call", "tool": "lookup_order"}))
        );
        assert_eq!(request.header("Webhook-Id"), Some(id.as_str()));
    }

    /// A request signed for one body and sent with another.
    async fn send_signed(business: &FakeBusiness, signed: &str, sent: &str) -> u16 {
        let secret = WebhookSecret::parse(FakeBusiness::SECRET).unwrap();
        let id = WebhookId::random();
        let timestamp = SystemClock.now_ms() / 1000;
        // reqwest is built without a crypto provider of its own; callbridge installs its one.
        callbridge::tls::install_crypto_provider();
        reqwest::Client::new()
            .post(business.url("/events"))
            .header("webhook-id", id.as_str())
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                sign(&secret, id.as_str(), timestamp, signed.as_bytes()),
            )
            .body(sent.to_owned())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn a_tampered_body_is_refused_with_401() {
        let business = FakeBusiness::start().await;
        business.answer("/events", Answer::status(204));
        // The same request untampered passes, so the 401 below is the tampering's doing.
        assert_eq!(
            send_signed(&business, r#"{"a":1}"#, r#"{"a":1}"#).await,
            204
        );
        assert_eq!(
            send_signed(&business, r#"{"a":1}"#, r#"{"a":2}"#).await,
            401
        );
        let verified: Vec<bool> = business.requests().iter().map(|r| r.verified).collect();
        assert_eq!(verified, [true, false]);
    }

    #[tokio::test]
    async fn a_business_with_another_secret_refuses() {
        let business =
            FakeBusiness::start_with_secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").await;
        let answer = client()
            .post(
                &business.url("/events"),
                &WebhookId::random(),
                "{}",
                TIMEOUT,
            )
            .await
            .unwrap();
        assert_eq!(answer.status, 401);
        assert!(!business.next_request("/events").await.verified);
    }

    #[tokio::test]
    async fn delays_are_honoured() {
        let business = FakeBusiness::start().await;
        let delay = Duration::from_millis(600);
        business.answer("/slow", Answer::text(200, "late").after(delay));
        let started = Instant::now();
        let answer = client()
            .post(&business.url("/slow"), &WebhookId::random(), "{}", TIMEOUT)
            .await
            .unwrap();
        assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
        assert_eq!(answer.body, b"late");

        // Longer than the caller waits: it gives up, and the request is still on record.
        business.answer(
            "/slower",
            Answer::text(200, "too late").after(Duration::from_secs(30)),
        );
        let outcome = client()
            .post(
                &business.url("/slower"),
                &WebhookId::random(),
                "{}",
                Duration::from_millis(300),
            )
            .await;
        assert!(
            matches!(outcome, Err(BusinessError::Timeout(_))),
            "{outcome:?}"
        );
        assert!(business.next_request("/slower").await.verified);
    }

    #[tokio::test]
    async fn one_off_answers_come_first_then_the_standing_one_then_the_default() {
        let business = FakeBusiness::start().await;
        business.answer("/events", Answer::status(204));
        business.answer_once("/events", Answer::status(500));
        business.answer_once("/events", Answer::status(503));
        business.answer_by_default(Answer::text(404, "no such tool"));
        let client = client();
        let mut statuses = Vec::new();
        for path in ["/events", "/events", "/events", "/events", "/other"] {
            let answer = client
                .post(&business.url(path), &WebhookId::random(), "{}", TIMEOUT)
                .await
                .unwrap();
            statuses.push(answer.status);
        }
        assert_eq!(statuses, [500, 503, 204, 204, 404]);
    }

    #[tokio::test]
    async fn unscripted_paths_answer_an_empty_json_object() {
        let business = FakeBusiness::start().await;
        let answer = client()
            .post(
                &business.url("/anything"),
                &WebhookId::random(),
                "{}",
                TIMEOUT,
            )
            .await
            .unwrap();
        assert_eq!((answer.status, answer.body.as_slice()), (200, &b"{}"[..]));
    }

    #[tokio::test]
    async fn next_request_waits_for_each_request_in_turn() {
        let business = Arc::new(FakeBusiness::start().await);
        let sender = Arc::clone(&business);
        tokio::spawn(async move {
            let client = client();
            for n in 1..=2 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let body = json!({"n": n}).to_string();
                let _ = client
                    .post(&sender.url("/events"), &WebhookId::random(), &body, TIMEOUT)
                    .await;
            }
        });
        // Asked before either request exists: each call waits for the next one.
        let first = business.next_request("/events").await;
        let second = business.next_request("/events").await;
        assert_eq!(first.json, Some(json!({"n": 1})));
        assert_eq!(second.json, Some(json!({"n": 2})));
        assert!(second.received_at >= first.received_at);
        assert_eq!(business.requests().len(), 2);
    }
}
