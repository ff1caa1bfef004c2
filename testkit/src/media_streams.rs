//! Twilio's side of a Media Stream as a test drives it: a client that opens the socket and
//! speaks the messages callbridge's own `twilio::media_stream` writes as Twilio does.

use std::time::Duration;

use callbridge::twilio::media_stream::{CONNECTED, MediaStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A Media Streams socket driven step by step, as a test drives it. Each step panics on a
/// broken socket or a silent peer (10 s), which is how a test should fail.
pub struct MediaStreamClient {
    socket: Socket,
    /// Empty until `start_with`.
    pub stream_sid: String,
    stream: Option<MediaStream>,
}

impl MediaStreamClient {
    /// Upgrades `url` (`ws://…`) with `signature` as the `X-Twilio-Signature`.
    pub async fn connect(url: &str, signature: Option<&str>) -> Result<Self, tungstenite::Error> {
        let mut request = url.into_client_request()?;
        if let Some(signature) = signature {
            let value = signature
                .parse()
                .map_err(|e| tungstenite::Error::HttpFormat(tungstenite::http::Error::from(e)))?;
            request.headers_mut().insert("x-twilio-signature", value);
        }
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Self {
            socket,
            stream_sid: String::new(),
            stream: None,
        })
    }

    /// The HTTP status an upgrade of `url` is refused with; panics if it is accepted.
    pub async fn refused(url: &str, signature: Option<&str>) -> u16 {
        match Self::connect(url, signature).await {
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(other) => panic!("the upgrade to {url} failed without an answer: {other}"),
            Ok(_) => panic!("the upgrade to {url} was accepted"),
        }
    }

    pub async fn send(&mut self, value: Value) {
        self.send_text(value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.socket
            .send(Message::text(text))
            .await
            .expect("socket open");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("socket open");
    }

    /// Writes `bytes` to the TCP stream as they are, below the WebSocket framing: a frame header
    /// without its payload, or a payload trickled in pieces, as no WebSocket library would.
    /// Returns `false` once the server has closed the connection.
    pub async fn write_bytes(&mut self, bytes: &[u8]) -> bool {
        let MaybeTlsStream::Plain(tcp) = self.socket.get_mut() else {
            unreachable!("the fakes speak plain ws://")
        };
        tcp.write_all(bytes).await.is_ok() && tcp.flush().await.is_ok()
    }

    /// `connected`, then `start` carrying `parameters` as its `customParameters`.
    pub async fn start_with(&mut self, call_sid: &str, account_sid: &str, parameters: Value) {
        let mut stream = MediaStream::new(call_sid, account_sid);
        self.stream_sid = stream.stream_sid.clone();
        let start = stream.start(&parameters);
        self.stream = Some(stream);
        self.send_text(CONNECTED.to_owned()).await;
        self.send_text(start).await;
    }

    fn started(&mut self) -> &mut MediaStream {
        self.stream.as_mut().expect("the stream was started")
    }

    pub async fn media(&mut self, n: usize, payload: &str) {
        let message = self.started().media(n, payload);
        self.send_text(message).await;
    }

    pub async fn echo_mark(&mut self, name: &str) {
        let message = self.started().mark(name);
        self.send_text(message).await;
    }

    pub async fn stop(&mut self) {
        let message = self.started().stop();
        self.send_text(message).await;
    }

    /// The next JSON message from the bridge; pings are answered as Twilio's stack would.
    pub async fn recv(&mut self) -> Value {
        let next_text = async {
            loop {
                let message = self
                    .socket
                    .next()
                    .await
                    .expect("the socket is open")
                    .expect("a valid frame");
                match message {
                    Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
                    Message::Close(frame) => panic!("the bridge closed the stream: {frame:?}"),
                    _ => continue,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), next_text)
            .await
            .expect("a message from the bridge within 10 s")
    }

    /// Waits for the bridge to close the stream; returns the close code if one was sent.
    pub async fn closed_within(&mut self, within: Duration) -> Option<Option<u16>> {
        tokio::time::timeout(within, async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                    None | Some(Err(_)) => return None,
                    Some(Ok(_)) => continue,
                }
            }
        })
        .await
        .ok()
    }
}
