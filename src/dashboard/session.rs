//! The dashboard's sign-in session: a cookie that proves its holder typed
//! `CALLBRIDGE_API_TOKEN`, without holding the token.
//!
//! The value is `{expiry}.{mac}`: the expiry in Unix seconds, and an HMAC-SHA256 of it under a
//! key derived from the API token. Nothing is stored, so every machine behind one database
//! accepts the cookie another issued, and a restart signs no one out. Changing the API token
//! changes the key, which ends every session at once. A cookie copied out of a browser stays
//! valid until its expiry: signing out removes it from the browser that signs out.
//!
//! Written with `hmac` and `sha2` directly (already used for Twilio's and the webhooks'
//! signatures) rather than a session framework: the whole format is these few lines, and a
//! framework would bring a store and a second key to configure.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The cookie's name.
pub const COOKIE: &str = "callbridge_session";

/// How long a sign-in lasts: a working day and then some, so an operator signs in once a day.
pub const LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// What each MAC is over, so a MAC made for one purpose is never accepted for another.
const KEY_LABEL: &[u8] = b"callbridge dashboard session key v1";
const SESSION_LABEL: &[u8] = b"session:";
const CSRF_LABEL: &[u8] = b"csrf:";

/// The key sessions are signed with, derived from the API token.
pub struct SessionKey([u8; 32]);

/// A signed-in session, as its cookie carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The cookie's value.
    pub value: String,
    pub expires_at_secs: i64,
}

/// Why a cookie does not sign its holder in. Never says more to the client than "sign in".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the session cookie is not one callbridge issues")]
    Malformed,
    #[error("the session cookie's signature does not match (forged, or the API token changed)")]
    Forged,
    #[error("the session has expired")]
    Expired,
}

impl SessionKey {
    pub fn derive(api_token: &SecretString) -> Self {
        let mut mac = HmacSha256::new_from_slice(api_token.expose_secret().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(KEY_LABEL);
        Self(mac.finalize().into_bytes().into())
    }

    fn mac(&self, label: &[u8], message: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        mac.update(label);
        mac.update(message);
        mac
    }

    /// A new session, valid for [`LIFETIME`] from `now_ms`.
    pub fn issue(&self, now_ms: i64) -> Session {
        let lifetime = i64::try_from(LIFETIME.as_secs()).expect("12 hours fit in i64");
        let expires_at_secs = now_ms.div_euclid(1000) + lifetime;
        let expiry = expires_at_secs.to_string();
        let tag = self
            .mac(SESSION_LABEL, expiry.as_bytes())
            .finalize()
            .into_bytes();
        Session {
            value: format!("{expiry}.{}", URL_SAFE_NO_PAD.encode(tag)),
            expires_at_secs,
        }
    }

    /// The session `value` stands for, if this key signed it and it has not expired. The MAC
    /// is checked in constant time (`verify_slice`), before the expiry is looked at.
    pub fn verify(&self, value: &str, now_ms: i64) -> Result<Session, Refused> {
        let (expiry, tag) = value.split_once('.').ok_or(Refused::Malformed)?;
        let expires_at_secs: i64 = expiry
            .parse()
            .ok()
            .filter(|_| expiry.bytes().all(|b| b.is_ascii_digit()))
            .ok_or(Refused::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| Refused::Malformed)?;
        self.mac(SESSION_LABEL, expiry.as_bytes())
            .verify_slice(&tag)
            .map_err(|_| Refused::Forged)?;
        if expires_at_secs <= now_ms.div_euclid(1000) {
            return Err(Refused::Expired);
        }
        Ok(Session {
            value: value.to_owned(),
            expires_at_secs,
        })
    }

    /// The token a form posted within `session` must carry (sign-out): a page another site
    /// makes the browser post from cannot know it, as it cannot read the cookie.
    pub fn csrf_token(&self, session: &Session) -> String {
        let tag = self
            .mac(CSRF_LABEL, session.value.as_bytes())
            .finalize()
            .into_bytes();
        URL_SAFE_NO_PAD.encode(tag)
    }

    /// Whether `presented` is `session`'s token, compared in constant time.
    pub fn check_csrf(&self, session: &Session, presented: &str) -> bool {
        let Ok(tag) = URL_SAFE_NO_PAD.decode(presented) else {
            return false;
        };
        self.mac(CSRF_LABEL, session.value.as_bytes())
            .verify_slice(&tag)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_800_000_000_123;

    fn key(token: &str) -> SessionKey {
        SessionKey::derive(&SecretString::from(token.to_owned()))
    }

    #[test]
    fn an_issued_session_verifies_until_it_expires() {
        let key = key("a-token-of-at-least-thirty-two-characters");
        let session = key.issue(NOW_MS);
        assert_eq!(session.expires_at_secs, 1_800_000_000 + 12 * 3600);
        assert_eq!(key.verify(&session.value, NOW_MS), Ok(session.clone()));
        let last_ms = (session.expires_at_secs - 1) * 1000 + 999;
        assert!(key.verify(&session.value, last_ms).is_ok());
        assert_eq!(
            key.verify(&session.value, session.expires_at_secs * 1000),
            Err(Refused::Expired)
        );
    }

    #[test]
    fn the_cookie_does_not_contain_the_token() {
        let token = "a-token-of-at-least-thirty-two-characters";
        let session = key(token).issue(NOW_MS);
        assert!(!session.value.contains(token));
        assert!(!session.value.contains(&URL_SAFE_NO_PAD.encode(token)));
    }

    #[test]
    fn forged_and_malformed_cookies_are_refused() {
        let key = key("a-token-of-at-least-thirty-two-characters");
        let session = key.issue(NOW_MS);
        let (expiry, tag) = session.value.split_once('.').unwrap();
        // A later expiry with the old signature.
        let extended = format!("{}.{tag}", expiry.parse::<i64>().unwrap() + 3600);
        assert_eq!(key.verify(&extended, NOW_MS), Err(Refused::Forged));
        // Another token's key.
        let other = self::key("another-token-of-at-least-thirty-two-chars").issue(NOW_MS);
        assert_eq!(key.verify(&other.value, NOW_MS), Err(Refused::Forged));
        // One bit of the signature changed.
        let mut bytes = URL_SAFE_NO_PAD.decode(tag).unwrap();
        bytes[0] ^= 1;
        let flipped = format!("{expiry}.{}", URL_SAFE_NO_PAD.encode(bytes));
        assert_eq!(key.verify(&flipped, NOW_MS), Err(Refused::Forged));
        for garbage in [
            "",
            ".",
            "abc",
            "123",
            "x.y",
            "+123.AAAA",
            "123.!!!",
            &session.value[..10],
        ] {
            assert!(key.verify(garbage, NOW_MS).is_err(), "{garbage:?} accepted");
        }
    }

    #[test]
    fn the_csrf_token_belongs_to_its_session() {
        let key = key("a-token-of-at-least-thirty-two-characters");
        let session = key.issue(NOW_MS);
        let later = key.issue(NOW_MS + 1000);
        let token = key.csrf_token(&session);
        assert!(key.check_csrf(&session, &token));
        assert!(!key.check_csrf(&later, &token));
        assert!(!key.check_csrf(&session, ""));
        assert!(!key.check_csrf(&session, &token[1..]));
        assert!(!key.check_csrf(&session, "not base64!"));
    }
}
