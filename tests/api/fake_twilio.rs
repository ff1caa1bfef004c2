//! A Media Streams client that behaves like Twilio: signed upgrade, `connected`, `start` with the
//! `<Parameter>`s from our TwiML, 20 ms µ-law frames, mark echoes, `stop`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::{ACCOUNT_SID, Client, PUBLIC_BASE_URL, twilio_signature};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct FakeTwilio {
    socket: Socket,
    pub stream_sid: String,
}

/// A distinct 20 ms µ-law frame (160 bytes), so reordering or mixing would show.
pub fn frame(call: usize, n: usize) -> String {
    let bytes: Vec<u8> = (0..160)
        .map(|i| ((call * 31 + n * 7 + i) % 256) as u8)
        .collect();
    STANDARD.encode(bytes)
}

/// `ms` milliseconds of agent audio as base64 µ-law.
pub fn agent_audio(ms: usize, seed: u8) -> String {
    STANDARD.encode(vec![seed; ms * 8])
}

/// The stream URL `/voice` hands Twilio for `token`'s call, which Twilio signs as it is.
pub fn stream_url(token: &str) -> String {
    format!(
        "{}/stream/{token}",
        PUBLIC_BASE_URL.replacen("https", "wss", 1)
    )
}

impl FakeTwilio {
    /// Opens the stream of the call `token` was issued for, signed as Twilio signs it.
    pub async fn connect(app: &Client, token: &str) -> Self {
        let signature = twilio_signature(&stream_url(token), &[]);
        Self::connect_signed(app, &format!("/stream/{token}"), Some(&signature))
            .await
            .expect("upgrade accepted")
    }

    /// Upgrades `path` on the app with `signature` as the `X-Twilio-Signature`.
    pub async fn connect_signed(
        app: &Client,
        path: &str,
        signature: Option<&str>,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let url = format!("{}{path}", app.address.replacen("http", "ws", 1));
        let mut request = url.into_client_request().unwrap();
        if let Some(signature) = signature {
            request
                .headers_mut()
                .insert("x-twilio-signature", signature.parse().unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Self {
            socket,
            stream_sid: String::new(),
        })
    }

    /// The HTTP status an upgrade to `path` is refused with; panics if it is accepted.
    pub async fn refused_upgrade(app: &Client, path: &str, signature: Option<&str>) -> u16 {
        match Self::connect_signed(app, path, signature).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                response.status().as_u16()
            }
            Err(other) => panic!("the upgrade to {path} failed without an answer: {other}"),
            Ok(_) => panic!("the upgrade to {path} was accepted"),
        }
    }

    /// The HTTP status a genuine (signed) upgrade for `token` is refused with.
    pub async fn refused_stream(app: &Client, token: &str) -> u16 {
        let signature = twilio_signature(&stream_url(token), &[]);
        Self::refused_upgrade(app, &format!("/stream/{token}"), Some(&signature)).await
    }

    /// Answers `call_sid` through `/voice`, opens the stream and starts it with the token.
    pub async fn start_call(app: &Client, call_sid: &str) -> Self {
        let token = app.answer_call(call_sid).await;
        let mut twilio = Self::connect(app, &token).await;
        twilio.start(call_sid, &token, ACCOUNT_SID).await;
        twilio
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
            unreachable!("the test app speaks plain ws://")
        };
        tcp.write_all(bytes).await.is_ok() && tcp.flush().await.is_ok()
    }

    pub async fn start(&mut self, call_sid: &str, token: &str, account_sid: &str) {
        let parameters = json!({"token": token, "from": "whatsapp:+5511999990000", "to": "whatsapp:+558551234567", "direction": "inbound"});
        self.start_with(call_sid, account_sid, parameters).await;
    }

    /// `start` carrying `parameters` as its `customParameters`: Twilio passes the TwiML's
    /// `<Parameter>`s through unchanged.
    pub async fn start_with(&mut self, call_sid: &str, account_sid: &str, parameters: Value) {
        self.stream_sid = format!("MZ{}", &call_sid[2..]);
        self.send(json!({"event":"connected","protocol":"Call","version":"1.0.0"}))
            .await;
        self.send(json!({
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": self.stream_sid,
            "start": {
                "accountSid": account_sid,
                "streamSid": self.stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "customParameters": parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
            }
        }))
        .await;
    }

    pub async fn media(&mut self, n: usize, payload: &str) {
        let message = json!({
            "event": "media",
            "sequenceNumber": (n + 2).to_string(),
            "streamSid": self.stream_sid,
            "media": {"track": "inbound", "chunk": (n + 1).to_string(), "timestamp": (n * 20).to_string(), "payload": payload}
        });
        self.send(message).await;
    }

    pub async fn echo_mark(&mut self, name: &str) {
        let message = json!({"event":"mark","sequenceNumber":"9","streamSid":self.stream_sid,"mark":{"name":name}});
        self.send(message).await;
    }

    pub async fn stop(&mut self, call_sid: &str) {
        let message = json!({"event":"stop","sequenceNumber":"99","streamSid":self.stream_sid,"stop":{"accountSid":ACCOUNT_SID,"callSid":call_sid}});
        self.send(message).await;
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
