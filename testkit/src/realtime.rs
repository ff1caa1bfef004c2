//! A fake OpenAI Realtime server speaking the real wire protocol (tokio-tungstenite), in two
//! roles: [`FakeRealtime`] checks the bearer key, records every client event and lets a test
//! script the server's events; [`serve_echo`] speaks every caller frame straight back, for the
//! load generator, so that a frame's round trip crosses the bridge twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

use crate::wire::{self, APPEND, AUDIO, SESSION_UPDATE, TYPE};

/// The only key [`FakeRealtime`] accepts.
pub const API_KEY: &str = "sk-test-key";

pub struct FakeRealtime {
    /// Base URL to put in `OPENAI_REALTIME_URL`.
    pub url: String,
    upgrades: Arc<AtomicUsize>,
    /// Set by [`FakeRealtime::refuse_new_sessions`]: upgrades are then answered 503.
    refusing: Arc<AtomicBool>,
    sessions: Mutex<mpsc::UnboundedReceiver<FakeSession>>,
}

/// One accepted Realtime WebSocket.
pub struct FakeSession {
    pub path_and_query: String,
    received: mpsc::UnboundedReceiver<Message>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
}

/// What a test has the fake send: a WebSocket message, or bytes written below the framing.
enum Outgoing {
    Message(Message),
    Bytes(Vec<u8>),
}

impl FakeRealtime {
    pub async fn start() -> Self {
        Self::start_with_handshake_delay(Duration::ZERO).await
    }

    /// The WebSocket upgrade is answered only after `delay`, like a slow network would.
    pub async fn start_with_handshake_delay(delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/realtime", listener.local_addr().unwrap());
        let upgrades = Arc::new(AtomicUsize::new(0));
        let refusing = Arc::new(AtomicBool::new(false));
        let (session_tx, session_rx) = mpsc::unbounded_channel();
        let counter = Arc::clone(&upgrades);
        let refuse = Arc::clone(&refusing);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let session_tx = session_tx.clone();
                let counter = Arc::clone(&counter);
                let refuse = Arc::clone(&refuse);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let mut path_and_query = String::new();
                    // tungstenite's callback signature fixes the (large) error type.
                    #[allow(clippy::result_large_err)]
                    let check = |request: &Request, response: Response| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        path_and_query = request.uri().to_string();
                        let authorized = request
                            .headers()
                            .get("authorization")
                            .is_some_and(|v| v == format!("Bearer {API_KEY}").as_str());
                        let beta = request.headers().contains_key("openai-beta");
                        if refuse.load(Ordering::SeqCst) {
                            let mut refusal = ErrorResponse::new(None);
                            *refusal.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            Err(refusal)
                        } else if authorized && !beta {
                            Ok(response)
                        } else {
                            let mut refusal = ErrorResponse::new(None);
                            *refusal.status_mut() = StatusCode::UNAUTHORIZED;
                            Err(refusal)
                        }
                    };
                    let Ok(socket) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
                        return;
                    };
                    let mut socket = socket;
                    let (received_tx, received) = mpsc::unbounded_channel();
                    let (outgoing, mut outgoing_rx) = mpsc::unbounded_channel::<Outgoing>();
                    let _ = session_tx.send(FakeSession {
                        path_and_query,
                        received,
                        outgoing,
                    });
                    loop {
                        tokio::select! {
                            incoming = socket.next() => match incoming {
                                Some(Ok(message)) => { let _ = received_tx.send(message); }
                                _ => break,
                            },
                            out = outgoing_rx.recv() => match out {
                                Some(Outgoing::Message(message)) => {
                                    if socket.send(message).await.is_err() { break }
                                }
                                Some(Outgoing::Bytes(bytes)) => {
                                    if socket.get_mut().write_all(&bytes).await.is_err() { break }
                                }
                                // The test dropped its handle: drop the connection abruptly.
                                None => break,
                            },
                        }
                    }
                });
            }
        });
        Self {
            url,
            upgrades,
            refusing,
            sessions: Mutex::new(session_rx),
        }
    }

    /// From now on every upgrade is refused (503), as an OpenAI that cannot be reached would:
    /// a call whose session is lost then finds no replacement.
    pub fn refuse_new_sessions(&self) {
        self.refusing.store(true, Ordering::SeqCst);
    }

    /// WebSocket upgrade requests seen (each would be a billed session at OpenAI).
    pub fn upgrades(&self) -> usize {
        self.upgrades.load(Ordering::SeqCst)
    }

    pub async fn next_session(&self) -> FakeSession {
        tokio::time::timeout(Duration::from_secs(10), self.sessions.lock().await.recv())
            .await
            .expect("the bridge opened a Realtime session")
            .unwrap()
    }
}

impl FakeSession {
    /// The next client event (text frames only; pings are skipped).
    pub async fn recv(&mut self) -> Value {
        serde_json::from_str(&self.recv_text().await).unwrap()
    }

    /// The next client event's raw text, to compare byte for byte.
    pub async fn recv_text(&mut self) -> String {
        let next_text = async {
            loop {
                match self.received.recv().await.expect("the socket is open") {
                    Message::Text(text) => return text.as_str().to_owned(),
                    Message::Close(_) => panic!("the bridge closed the session"),
                    _ => continue,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), next_text)
            .await
            .expect("an event from the bridge within 10 s")
    }

    /// The next client event's raw text, or `None` once the bridge has closed the session:
    /// for a test that reads a call to its end.
    pub async fn next_text(&mut self) -> Option<String> {
        let next_text = async {
            loop {
                match self.received.recv().await {
                    Some(Message::Text(text)) => return Some(text.as_str().to_owned()),
                    Some(Message::Close(_)) | None => return None,
                    Some(_) => continue,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), next_text)
            .await
            .expect("an event from the bridge, or its close, within 10 s")
    }

    pub fn send(&self, event: Value) {
        self.send_raw(Message::text(event.to_string()));
    }

    pub fn send_raw(&self, message: Message) {
        self.outgoing
            .send(Outgoing::Message(message))
            .expect("the fake session is running");
    }

    /// Writes `bytes` to the TCP stream as they are, below the WebSocket framing: a frame header
    /// without its payload, or a payload trickled in pieces. Ignored once the socket is gone.
    pub fn write_bytes(&self, bytes: &[u8]) {
        let _ = self.outgoing.send(Outgoing::Bytes(bytes.to_vec()));
    }

    /// Resolves when the bridge closed the socket (close frame or EOF), or fails after `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                match self.received.recv().await {
                    None | Some(Message::Close(_)) => return,
                    Some(_) => continue,
                }
            }
        })
        .await
        .is_ok()
    }

    /// Every client event until the bridge closes the socket, or `None` if it is still open
    /// after `within`.
    pub async fn events_until_closed(&mut self, within: Duration) -> Option<Vec<Value>> {
        tokio::time::timeout(within, async {
            let mut events = Vec::new();
            loop {
                match self.received.recv().await {
                    None | Some(Message::Close(_)) => return events,
                    Some(Message::Text(text)) => {
                        events.push(serde_json::from_str(text.as_str()).unwrap());
                    }
                    Some(_) => continue,
                }
            }
        })
        .await
        .ok()
    }

    /// Consumes the session.update every session starts with.
    pub async fn expect_session_update(&mut self) -> Value {
        let update = self.recv().await;
        assert_eq!(update["type"], "session.update", "{update}");
        update
    }
}

/// What a real session says first; callbridge logs the id.
const SESSION_CREATED: &str = r#"{"type":"session.created","event_id":"event_bench0","session":{"id":"sess_bench","type":"realtime"}}"#;
/// The answer to `session.update`, with server VAD that interrupts by itself, as configured.
const SESSION_UPDATED: &str = r#"{"type":"session.updated","event_id":"event_bench1","session":{"type":"realtime","audio":{"input":{"turn_detection":{"type":"server_vad","interrupt_response":true}}}}}"#;

/// Serves echo sessions on `listener` until accepting fails (out of file descriptors, say):
/// every `input_audio_buffer.append` is answered with a `response.output_audio.delta` carrying
/// the same audio. It accepts any key ([`FakeRealtime`] is the one that checks them) and does no
/// more per frame than one string search and one copy, so it is not what a benchmark measures.
pub async fn serve_echo(listener: std::net::TcpListener) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(echo_session(tcp));
    }
}

async fn echo_session(tcp: TcpStream) {
    if tcp.set_nodelay(true).is_err() {
        return;
    }
    let accepted = tokio_tungstenite::accept_async_with_config(tcp, Some(wire::websocket_config()));
    let Ok(mut socket) = accepted.await else {
        return;
    };
    if socket.send(Message::text(SESSION_CREATED)).await.is_err() {
        return;
    }
    while let Some(Ok(message)) = socket.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let reply = match wire::string_after(&text, TYPE) {
            Some(APPEND) => wire::string_after(&text, AUDIO).map(wire::audio_delta),
            Some(SESSION_UPDATE) => Some(SESSION_UPDATED.to_owned()),
            _ => None,
        };
        if let Some(reply) = reply
            && socket.send(Message::text(reply)).await.is_err()
        {
            return;
        }
    }
}
