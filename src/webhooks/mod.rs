//! Requests callbridge makes to the business (tool calls, call context, events), signed as the
//! Standard Webhooks specification says, so the business verifies them with a stock library:
//! `webhook-signature: v1,<base64 HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{body}">`,
//! keyed with the bytes the secret's base64 (after `whsec_`) decodes to.

mod client;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretBox};
use sha2::Sha256;

pub use client::{BusinessAnswer, BusinessClient, BusinessError, MAX_ANSWER_BYTES};

/// `CALLBRIDGE_WEBHOOK_SECRET`: `whsec_` then the base64 of the HMAC key.
#[derive(Clone)]
pub struct WebhookSecret(std::sync::Arc<SecretBox<Vec<u8>>>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(redacted)")
    }
}

impl WebhookSecret {
    /// Parses `whsec_<base64>`; the error never repeats the value.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let encoded = raw
            .strip_prefix("whsec_")
            .ok_or_else(|| "must start with whsec_ (a Standard Webhooks secret)".to_owned())?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| "must be whsec_ followed by base64".to_owned())?;
        if key.len() < 24 {
            return Err(format!(
                "holds a key of {} bytes; use at least 24 (e.g. whsec_$(openssl rand -base64 32))",
                key.len()
            ));
        }
        Ok(Self(std::sync::Arc::new(SecretBox::new(Box::new(key)))))
    }

    pub(crate) fn key(&self) -> &[u8] {
        self.0.expose_secret()
    }
}

/// The `webhook-signature` value for one request: `v1,` and the base64 of
/// HMAC-SHA256(key, `"{msg_id}.{timestamp_secs}.{body}"`). The body is signed as the exact
/// bytes sent; the business must verify the raw body, not a re-serialised parse of it.
pub fn sign(secret: &WebhookSecret, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.key()).expect("HMAC accepts keys of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The `webhook-id` of one message. The business uses it as an idempotency key, so a retried
/// delivery carries the same id as the first attempt (which is why it can be read back from
/// storage with [`WebhookId::parse`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WebhookId(String);

/// Longest id [`WebhookId::parse`] accepts: far above the 36 characters of [`WebhookId::random`],
/// short enough to keep a header small.
const MAX_ID_CHARS: usize = 128;

impl WebhookId {
    /// `msg_` and 32 lowercase hex digits (128 random bits): no two messages share an id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the operating system's random source is available");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self(format!("msg_{hex}"))
    }

    /// An id as stored or received: `msg_` then letters, digits, `_` or `-`. A `.` is refused
    /// above all, because it delimits the signed string's parts: an id holding one could make
    /// two different messages sign the same bytes.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
        match raw.strip_prefix("msg_") {
            Some(rest)
                if !rest.is_empty() && raw.len() <= MAX_ID_CHARS && rest.chars().all(allowed) =>
            {
                Ok(Self(raw.to_owned()))
            }
            _ => Err(format!(
                "must be msg_ followed by up to {} letters, digits, '_' or '-', got {raw:?}",
                MAX_ID_CHARS - 4
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WebhookId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks reference library for Rust (`test_sign`).
    #[test]
    fn signs_the_reference_rust_vector() {
        let secret = WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(
            sign(
                &secret,
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1_649_367_553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    /// The test vector of the Standard Webhooks reference library for JavaScript ("sign
    /// function works"); its body has a space, so a signer that re-serialised JSON would fail.
    #[test]
    fn signs_the_reference_javascript_vector() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn every_part_of_the_message_is_signed() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let reference = sign(&secret, "msg_a", 1, b"{}");
        assert_ne!(sign(&secret, "msg_b", 1, b"{}"), reference);
        assert_ne!(sign(&secret, "msg_a", 2, b"{}"), reference);
        assert_ne!(sign(&secret, "msg_a", 1, b"{ }"), reference);
        let other = WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_ne!(sign(&other, "msg_a", 1, b"{}"), reference);
    }

    #[test]
    fn secrets_must_be_whsec_base64_of_at_least_24_bytes() {
        assert!(WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(WebhookSecret::parse("whsec_not base64!").is_err());
        // 18 bytes: too short to resist guessing.
        let short = WebhookSecret::parse("whsec_AAAAAAAAAAAAAAAAAAAAAAAA").unwrap_err();
        assert!(short.contains("18 bytes"), "{short}");
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(format!("{secret:?}"), "WebhookSecret(redacted)");
    }

    fn config_with_secret(raw: &str) -> Result<crate::config::Config, Vec<String>> {
        let lookup = |name: &str| {
            match name {
                "TWILIO_ACCOUNT_SID" => Some("AC0123456789abcdef0123456789abcdef"),
                "TWILIO_AUTH_TOKEN" => Some("secret-token"),
                "OPENAI_API_KEY" => Some("sk-test"),
                "PUBLIC_BASE_URL" => Some("https://abc.ngrok.app"),
                "CALLBRIDGE_WEBHOOK_SECRET" => Some(raw),
                _ => None,
            }
            .map(str::to_owned)
        };
        crate::config::Config::from_lookup(lookup).map_err(|errors| errors.0)
    }

    #[test]
    fn the_secret_is_read_from_the_environment_and_never_echoed() {
        let config = config_with_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let secret = config.webhook_secret.expect("a configured secret");
        assert_eq!(
            sign(
                &secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert!(config_with_secret("").unwrap().webhook_secret.is_none());

        let problems = config_with_secret("whsec_c2hvcnQ=").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("CALLBRIDGE_WEBHOOK_SECRET "),
            "{problems:?}"
        );
        assert!(!problems[0].contains("c2hvcnQ"), "{problems:?}");
    }

    #[test]
    fn random_ids_are_fresh_and_parse_back() {
        let first = WebhookId::random();
        let second = WebhookId::random();
        assert_ne!(first, second);
        assert!(first.as_str().starts_with("msg_"));
        assert_eq!(first.as_str().len(), 36);
        assert_eq!(WebhookId::parse(first.as_str()).unwrap(), first);
        assert_eq!(first.to_string(), first.as_str());
    }

    #[test]
    fn parse_accepts_stored_ids_and_refuses_what_could_confuse_the_signature() {
        // The id the specification's own examples use.
        assert!(WebhookId::parse("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W").is_ok());
        for bad in [
            "",
            "msg_",
            "2KWPBgLlAfxdpx2AI54pPJ85f4W",
            "msg_a.b",
            "msg_a b",
            "msg_\u{e9}",
        ] {
            assert!(WebhookId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(WebhookId::parse(&format!("msg_{}", "a".repeat(124))).is_ok());
        assert!(WebhookId::parse(&format!("msg_{}", "a".repeat(125))).is_err());
    }
}
