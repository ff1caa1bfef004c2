//! Twilio's Media Streams client (`callbridge_testkit`) pointed at the test app: upgrades signed
//! with the test account's token, `start` with the `<Parameter>`s from our TwiML, and the
//! frames these tests send.

use std::ops::{Deref, DerefMut};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use callbridge_testkit::media_streams::MediaStreamClient;
use serde_json::json;

use crate::helpers::{ACCOUNT_SID, Client, PUBLIC_BASE_URL, twilio_signature};

/// The testkit client, plus the constructors that know the test app.
pub struct FakeTwilio(MediaStreamClient);

impl Deref for FakeTwilio {
    type Target = MediaStreamClient;

    fn deref(&self) -> &MediaStreamClient {
        &self.0
    }
}

impl DerefMut for FakeTwilio {
    fn deref_mut(&mut self) -> &mut MediaStreamClient {
        &mut self.0
    }
}

/// A distinct 20 ms µ-law frame (160 bytes), so reordering or mixing would show.
pub fn frame(call: usize, n: usize) -> String {
    let bytes: Vec<u8> = (0..160)
        .map(|i| u8::try_from((call * 31 + n * 7 + i) % 256).expect("below 256"))
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

/// Where the test app listens for `path`'s upgrade.
fn upgrade_url(app: &Client, path: &str) -> String {
    format!("{}{path}", app.address.replacen("http", "ws", 1))
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
        MediaStreamClient::connect(&upgrade_url(app, path), signature)
            .await
            .map(Self)
    }

    /// The HTTP status an upgrade to `path` is refused with; panics if it is accepted.
    pub async fn refused_upgrade(app: &Client, path: &str, signature: Option<&str>) -> u16 {
        MediaStreamClient::refused(&upgrade_url(app, path), signature).await
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

    pub async fn start(&mut self, call_sid: &str, token: &str, account_sid: &str) {
        let parameters = json!({"token": token, "from": "whatsapp:+5511999990000", "to": "whatsapp:+558551234567", "direction": "inbound"});
        self.start_with(call_sid, account_sid, parameters).await;
    }
}
