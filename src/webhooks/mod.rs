//! Requests callbridge makes to the business (tool calls, call context, events), signed as the
//! Standard Webhooks specification says, so the business verifies them with a stock library.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretBox};

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
