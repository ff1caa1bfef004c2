//! The one HTTP client for every request callbridge makes to the business: tool calls, call
//! context and events all go through [`BusinessClient::post`], so each is signed the same way,
//! bounded by its caller's deadline, and read no further than [`MAX_ANSWER_BYTES`].

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::CONTENT_TYPE;

use super::{WebhookId, WebhookSecret, sign};
use crate::clock::Clock;

/// The most of an answer's body that is read. Every use of an answer (a tool's output, call
/// context) keeps far less; beyond this a misbehaving business would only cost memory.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// A business that does not accept a connection within this long is unreachable, whatever the
/// caller's own deadline (which bounds the whole exchange and is usually shorter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no answer came back. Never holds the URL, the secret or the signature.
#[derive(Debug, thiserror::Error)]
pub enum BusinessError {
    #[error("the business did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the business: {0}")]
    Network(String),
    #[error("no CALLBRIDGE_WEBHOOK_SECRET is configured, so the request cannot be signed")]
    NoSecret,
}

/// What the business answered. Any status counts as an answer; the caller decides what a
/// non-2xx means for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusinessAnswer {
    pub status: u16,
    /// At most [`MAX_ANSWER_BYTES`].
    pub body: Vec<u8>,
    /// The business sent more than [`MAX_ANSWER_BYTES`]; `body` holds the first of them.
    pub truncated: bool,
}

impl BusinessAnswer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Clone)]
pub struct BusinessClient {
    http: reqwest::Client,
    secret: Option<WebhookSecret>,
    clock: Arc<dyn Clock>,
}

impl BusinessClient {
    /// `secret` is `CALLBRIDGE_WEBHOOK_SECRET`; without one every `post` fails with
    /// [`BusinessError::NoSecret`] (an unsigned request would be refused by a business that
    /// verifies, and must not be accepted by one that does not). `clock` gives
    /// `webhook-timestamp`.
    pub fn new(secret: Option<WebhookSecret>, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect is the business's configuration gone stale: following it would send a
            // signed request somewhere nobody configured. It is answered as the 3xx it is.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("callbridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            secret,
            clock,
        })
    }

    /// POSTs `body` (JSON) to `url`, signed with `id` and the current time. `timeout` bounds
    /// everything: connecting, sending, and reading the answer's body.
    pub async fn post(
        &self,
        url: &str,
        id: &WebhookId,
        body: &str,
        timeout: Duration,
    ) -> Result<BusinessAnswer, BusinessError> {
        let secret = self.secret.as_ref().ok_or(BusinessError::NoSecret)?;
        let timestamp = self.clock.now_ms().div_euclid(1000);
        let signature = sign(secret, id.as_str(), timestamp, body.as_bytes());
        let request = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", id.as_str())
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_owned());
        tokio::time::timeout(timeout, exchange(request))
            .await
            .map_err(|_| BusinessError::Timeout(timeout))?
    }
}

async fn exchange(request: reqwest::RequestBuilder) -> Result<BusinessAnswer, BusinessError> {
    let mut response = request.send().await.map_err(network)?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    let mut truncated = false;
    while let Some(chunk) = response.chunk().await.map_err(network)? {
        let room = MAX_ANSWER_BYTES - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            truncated = true;
            // Dropping the response closes the connection instead of reading on.
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(BusinessAnswer {
        status,
        body,
        truncated,
    })
}

/// The error and its causes ("connection refused" is in a cause), without the URL: a business's
/// URL may carry a token in its query, and an error message is no place for it.
fn network(error: reqwest::Error) -> BusinessError {
    let error = error.without_url();
    let mut message = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cause = inner.source();
    }
    BusinessError::Network(message)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use callbridge_testkit::business::{Answer, FakeBusiness};
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::clock::SystemClock;

    struct FixedClock(i64);

    impl Clock for FixedClock {
        fn now_ms(&self) -> i64 {
            self.0
        }
    }

    fn client() -> BusinessClient {
        client_with_clock(Arc::new(SystemClock))
    }

    fn client_with_clock(clock: Arc<dyn Clock>) -> BusinessClient {
        let secret = WebhookSecret::parse(FakeBusiness::SECRET).unwrap();
        BusinessClient::new(Some(secret), clock).unwrap()
    }

    const SECOND: Duration = Duration::from_secs(1);
    /// Generous: these tests only prove the deadline is enforced at all, on a busy machine.
    const MARGIN: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn signs_every_request_as_standard_webhooks_verifiers_expect() {
        let business = FakeBusiness::start().await;
        business.answer(
            "/tools/lookup_order",
            Answer::json(200, json!({"status": "shipped"})),
        );
        // A minute and a half from now: within a verifier's tolerance, yet far enough from the
        // system clock to show the timestamp comes from the clock callbridge is given.
        let now_ms = SystemClock.now_ms() + 90_000;
        let client = client_with_clock(Arc::new(FixedClock(now_ms)));
        let id = WebhookId::random();
        let body = r#"{"type":"tool.call","arguments":{"order_id":"A1"}}"#;

        let answer = client
            .post(&business.url("/tools/lookup_order"), &id, body, 5 * SECOND)
            .await
            .unwrap();

        assert_eq!(answer.status, 200);
        assert!(answer.is_success());
        assert!(!answer.truncated);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&answer.body).unwrap(),
            json!({"status": "shipped"})
        );
        let request = business.next_request("/tools/lookup_order").await;
        assert!(
            request.verified,
            "the reference verifier accepts the signature"
        );
        assert_eq!(request.method, "POST");
        assert_eq!(request.body, body);
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.header("webhook-id"), Some(id.as_str()));
        let timestamp = (now_ms / 1000).to_string();
        assert_eq!(
            request.header("webhook-timestamp"),
            Some(timestamp.as_str())
        );
        let secret = WebhookSecret::parse(FakeBusiness::SECRET).unwrap();
        let expected = sign(&secret, id.as_str(), now_ms / 1000, body.as_bytes());
        assert_eq!(request.header("webhook-signature"), Some(expected.as_str()));
        let user_agent = format!("callbridge/{}", env!("CARGO_PKG_VERSION"));
        assert_eq!(request.header("user-agent"), Some(user_agent.as_str()));
    }

    #[tokio::test]
    async fn non_2xx_answers_are_answers_not_errors() {
        let business = FakeBusiness::start().await;
        business.answer("/context", Answer::text(503, "down for maintenance"));
        let answer = client()
            .post(
                &business.url("/context"),
                &WebhookId::random(),
                "{}",
                5 * SECOND,
            )
            .await
            .unwrap();
        assert_eq!(answer.status, 503);
        assert!(!answer.is_success());
        assert_eq!(answer.body, b"down for maintenance");
    }

    #[tokio::test]
    async fn without_a_secret_nothing_is_sent() {
        let business = FakeBusiness::start().await;
        let client = BusinessClient::new(None, Arc::new(SystemClock)).unwrap();
        let outcome = client
            .post(
                &business.url("/events"),
                &WebhookId::random(),
                "{}",
                5 * SECOND,
            )
            .await;
        assert!(
            matches!(outcome, Err(BusinessError::NoSecret)),
            "{outcome:?}"
        );
        assert!(business.requests().is_empty());
    }

    #[tokio::test]
    async fn a_business_that_never_answers_times_out_at_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/tools/slow", listener.local_addr().unwrap());
        // Accepts connections and reads requests, and never says a word.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let outcome = client()
            .post(&url, &WebhookId::random(), "{}", timeout)
            .await;
        let elapsed = started.elapsed();
        assert!(
            matches!(outcome, Err(BusinessError::Timeout(t)) if t == timeout),
            "{outcome:?}"
        );
        assert!(elapsed >= timeout, "{elapsed:?}");
        assert!(elapsed < timeout + MARGIN, "{elapsed:?}");
    }

    /// A raw HTTP server that answers every request with `head` then `body`, then holds the
    /// connection open without finishing.
    async fn stalling_server(head: String, body: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/stall", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                socket.write_all(head.as_bytes()).await.unwrap();
                socket.write_all(&body).await.unwrap();
                held.push(socket);
            }
        });
        url
    }

    #[tokio::test]
    async fn the_deadline_covers_reading_the_body() {
        let url = stalling_server(
            "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".to_owned(),
            b"{\"partial\":".to_vec(),
        )
        .await;
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let outcome = client()
            .post(&url, &WebhookId::random(), "{}", timeout)
            .await;
        assert!(
            matches!(outcome, Err(BusinessError::Timeout(_))),
            "{outcome:?}"
        );
        assert!(started.elapsed() < timeout + MARGIN);
    }

    #[tokio::test]
    async fn reading_stops_after_one_mebibyte() {
        // Announces 2 MiB, sends a little over 1 MiB, then stalls: only a reader that stops at
        // the cap returns an answer instead of waiting for the rest.
        let url = stalling_server(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                2 * MAX_ANSWER_BYTES
            ),
            vec![b'a'; MAX_ANSWER_BYTES + 10],
        )
        .await;
        let answer = client()
            .post(&url, &WebhookId::random(), "{}", 10 * SECOND)
            .await
            .unwrap();
        assert!(answer.truncated);
        assert_eq!(answer.body.len(), MAX_ANSWER_BYTES);
    }

    #[tokio::test]
    async fn answers_up_to_the_cap_are_whole_and_longer_ones_truncated() {
        let business = FakeBusiness::start().await;
        business.answer("/exact", Answer::text(200, "b".repeat(MAX_ANSWER_BYTES)));
        business.answer("/over", Answer::text(200, "c".repeat(MAX_ANSWER_BYTES + 1)));
        let client = client();

        let exact = client
            .post(
                &business.url("/exact"),
                &WebhookId::random(),
                "{}",
                10 * SECOND,
            )
            .await
            .unwrap();
        assert!(!exact.truncated);
        assert_eq!(exact.body.len(), MAX_ANSWER_BYTES);

        let over = client
            .post(
                &business.url("/over"),
                &WebhookId::random(),
                "{}",
                10 * SECOND,
            )
            .await
            .unwrap();
        assert!(over.truncated);
        assert_eq!(over.body, vec![b'c'; MAX_ANSWER_BYTES]);
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let business = FakeBusiness::start().await;
        business.answer(
            "/moved",
            Answer::status(307).header("location", &business.url("/elsewhere")),
        );
        let answer = client()
            .post(
                &business.url("/moved"),
                &WebhookId::random(),
                "{}",
                5 * SECOND,
            )
            .await
            .unwrap();
        assert_eq!(answer.status, 307);
        assert!(!answer.is_success());
        // Following would have happened before the answer came back.
        let paths: Vec<String> = business.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/moved"]);
    }

    #[tokio::test]
    async fn network_errors_say_why_without_the_url() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("http://127.0.0.1:{port}/tools/x?token=hunter2");
        let outcome = client()
            .post(&url, &WebhookId::random(), "{}", 5 * SECOND)
            .await;
        let Err(BusinessError::Network(message)) = outcome else {
            panic!("expected a network error, got {outcome:?}");
        };
        assert!(!message.contains("hunter2"), "{message}");
        assert!(!message.contains(&port.to_string()), "{message}");
        assert!(message.to_lowercase().contains("refused"), "{message}");
    }
}
