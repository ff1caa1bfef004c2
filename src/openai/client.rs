//! Opens the Realtime WebSocket in two steps so a call pays for only one round trip after
//! Twilio's `start`: TCP and TLS are set up while we wait for `start` (no key is sent and no
//! session exists yet), and the authenticated upgrade goes out only once the caller's stream
//! token has been checked. An unauthorised stream therefore never opens a (billed) session.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, Stream, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const READ_BUFFER_BYTES: usize = 4 * 1024;

/// The largest Realtime event accepted. Events are a few KiB (audio deltas, transcripts) and the
/// largest, `session.created`/`updated`, echo the instructions, bounded by the model's context
/// (tens of KiB), so 1 MiB is far above any genuine one. tungstenite checks `max_frame_size` at
/// each frame header, before buffering (and reserves the declared length there);
/// `max_message_size` only once a frame is complete. Both are set, so no frame over this is
/// ever buffered and a fragmented event stops growing at it.
const MAX_AGENT_MESSAGE: usize = 1 << 20;

/// Connecting longer than this means the caller is already listening to silence.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("the Realtime URL is not usable: {0}")]
    BadUrl(String),
    #[error("cannot reach the Realtime server: {0}")]
    Network(#[from] std::io::Error),
    #[error("the Realtime WebSocket handshake failed: {0}")]
    Handshake(#[from] tungstenite::Error),
    #[error("the Realtime server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the call ended before the session was opened")]
    Abandoned,
}

/// How the bridge reaches an agent. The real one speaks WebSocket to OpenAI; tests can hand the
/// bridge channel halves instead.
pub trait AgentDialer {
    type Transport;
    type Sink: Sink<Message, Error = tungstenite::Error> + Unpin;
    type Stream: Stream<Item = Result<Message, tungstenite::Error>> + Unpin;

    /// Everything that can happen before we know the call is genuine (no credentials sent).
    fn preconnect(&self) -> impl Future<Output = Result<Self::Transport, DialError>>;

    /// The authenticated upgrade that starts a session of `model` (each call's agent has its own).
    fn open(
        &self,
        transport: Self::Transport,
        model: &str,
    ) -> impl Future<Output = Result<(Self::Sink, Self::Stream), DialError>>;
}

pub type RealtimeSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Clone)]
pub struct RealtimeDialer {
    /// `OPENAI_REALTIME_URL`, without the `model` query parameter each session adds.
    base_url: String,
    api_key: SecretString,
}

impl RealtimeDialer {
    pub fn new(base_url: &str, api_key: SecretString) -> Self {
        Self {
            base_url: base_url.to_owned(),
            api_key,
        }
    }

    /// The session URL for one call's model.
    fn session_url(&self, model: &str) -> String {
        let model: String = url::form_urlencoded::byte_serialize(model.as_bytes()).collect();
        format!("{}?model={model}", self.base_url)
    }
}

impl AgentDialer for RealtimeDialer {
    type Transport = MaybeTlsStream<TcpStream>;
    type Sink = SplitSink<RealtimeSocket, Message>;
    type Stream = SplitStream<RealtimeSocket>;

    async fn preconnect(&self) -> Result<Self::Transport, DialError> {
        tokio::time::timeout(CONNECT_TIMEOUT, transport(&self.base_url))
            .await
            .map_err(|_| DialError::Timeout(CONNECT_TIMEOUT))?
    }

    async fn open(
        &self,
        transport: Self::Transport,
        model: &str,
    ) -> Result<(Self::Sink, Self::Stream), DialError> {
        let mut request = self.session_url(model).into_client_request()?;
        let bearer = HeaderValue::from_str(&format!("Bearer {}", self.api_key.expose_secret()))
            .map_err(|_| {
                DialError::BadUrl(
                    "OPENAI_API_KEY contains characters not allowed in a header".into(),
                )
            })?;
        request.headers_mut().insert("authorization", bearer);
        // tungstenite zero-fills its whole read buffer before every read; the 128 KiB default
        // was most of a call's memory and its largest CPU cost (profiled in the benchmark).
        // Realtime events are a few KiB, and larger ones still arrive over several reads.
        let config = WebSocketConfig::default()
            .max_frame_size(Some(MAX_AGENT_MESSAGE))
            .max_message_size(Some(MAX_AGENT_MESSAGE))
            .read_buffer_size(READ_BUFFER_BYTES);
        let handshake =
            tokio_tungstenite::client_async_with_config(request, transport, Some(config));
        let (socket, _response) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| DialError::Timeout(CONNECT_TIMEOUT))??;
        Ok(socket.split())
    }
}

async fn transport(url: &str) -> Result<MaybeTlsStream<TcpStream>, DialError> {
    let parsed = url::Url::parse(url).map_err(|e| DialError::BadUrl(e.to_string()))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| DialError::BadUrl("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| DialError::BadUrl("no port".into()))?;
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    // Audio frames are small and latency-bound: never wait to coalesce them.
    tcp.set_nodelay(true)?;
    match parsed.scheme() {
        "ws" => Ok(MaybeTlsStream::Plain(tcp)),
        "wss" => {
            let server_name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| DialError::BadUrl(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(tls_config())
                .connect(server_name, tcp)
                .await?;
            Ok(MaybeTlsStream::Rustls(tls))
        }
        other => Err(DialError::BadUrl(format!("unsupported scheme {other}"))),
    }
}

/// Built once: loading the root store per call would cost more than the call's audio.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let roots =
            rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_session_appends_its_model_as_a_query_parameter() {
        let dialer =
            RealtimeDialer::new("wss://api.openai.com/v1/realtime", SecretString::from("k"));
        assert_eq!(
            dialer.session_url("gpt-realtime-1.5"),
            "wss://api.openai.com/v1/realtime?model=gpt-realtime-1.5"
        );
        assert_eq!(
            dialer.session_url("gpt-realtime-mini"),
            "wss://api.openai.com/v1/realtime?model=gpt-realtime-mini"
        );
        let odd = RealtimeDialer::new("ws://127.0.0.1:9/x", SecretString::from("k"));
        assert_eq!(odd.session_url("a b&c"), "ws://127.0.0.1:9/x?model=a+b%26c");
    }
}
