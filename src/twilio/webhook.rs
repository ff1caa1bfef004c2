//! The extractor every Twilio route goes through: the signature is checked against the URL
//! built from `PUBLIC_BASE_URL` (never the `Host` header) before the handler sees any field, and
//! the signed form must then be one Twilio sends, for our account.

use std::future::Future;
use std::pin::Pin;

use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;

use super::ids::AccountSid;
use super::signature::{self, SignatureError, SignedBody};
use crate::error::json_error;
use crate::state::AppState;

/// Form bodies Twilio sends are a few kilobytes; anything far larger is not Twilio.
const MAX_WEBHOOK_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("refused: {0}")]
    Forbidden(SignatureError),
    /// The signature matched but the fields are not what Twilio sends: the signature leaves
    /// room to move text between adjacent parameters, so this is how a folded request shows.
    #[error("refused a signed form Twilio would not send: {0}")]
    NotTwilioForm(String),
    #[error("refused a signed form for another Twilio account")]
    OtherAccount,
    #[error("the request body could not be read: {0}")]
    UnreadableBody(String),
}

impl ResponseError for WebhookError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Forbidden(_) | Self::NotTwilioForm(_) | Self::OtherAccount => {
                StatusCode::FORBIDDEN
            }
            Self::UnreadableBody(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            // An empty body tells a prober nothing about why it failed.
            Self::Forbidden(_) | Self::NotTwilioForm(_) | Self::OtherAccount => {
                HttpResponse::Forbidden().finish()
            }
            Self::UnreadableBody(_) => {
                json_error(self.status_code(), "unreadable_body", &self.to_string())
            }
        }
    }
}

/// A form Twilio posts to one of our webhooks. Every one names the account it was sent for, and
/// only ours is served: a request signed for us cannot carry another account's call or message.
pub trait TwilioForm: DeserializeOwned {
    fn account_sid(&self) -> &AccountSid;
}

/// Checks `X-Twilio-Signature` for `url` and counts and logs a refusal.
pub fn verify(
    req: &HttpRequest,
    state: &AppState,
    url: &str,
    body: SignedBody<'_>,
) -> Result<(), WebhookError> {
    signature::validate(
        state.config.twilio_auth_token.expose_secret().as_bytes(),
        url,
        body,
        signature_header(req),
    )
    .map_err(|reason| refused_signature(req, state, url, reason))
}

fn signature_header(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
}

/// Counts and logs a request whose signature does not hold.
fn refused_signature(
    req: &HttpRequest,
    state: &AppState,
    url: &str,
    reason: SignatureError,
) -> WebhookError {
    state.metrics.signature_failures.inc();
    // The URL checked, so an operator sees at once when PUBLIC_BASE_URL is not the URL
    // Twilio calls (a changed ngrok URL is the usual cause); never the signature itself.
    tracing::warn!(
        path = req.path(),
        %reason,
        checked_url = %loggable_url(url),
        "refused a request claiming to come from Twilio: its signature does not match the URL checked, which is PUBLIC_BASE_URL and the path; if this is Twilio, PUBLIC_BASE_URL must be the URL configured in Twilio"
    );
    WebhookError::Forbidden(reason)
}

/// Everything [`SignedForm`] checks once the body has been read, apart from the request and the
/// app around it: the size, the signature over `url` and the parameters exactly as received,
/// then the typed form `T` and its account. It is a function of bytes alone so that the fuzz
/// targets and the seed regression test drive the very code the webhooks run.
pub fn signed_form<T: TwilioForm>(
    auth_token: &[u8],
    account_sid: &AccountSid,
    url: &str,
    body: &[u8],
    signature_header: Option<&str>,
) -> Result<T, WebhookError> {
    if body.len() > MAX_WEBHOOK_BODY {
        return Err(WebhookError::UnreadableBody("the body is too large".into()));
    }
    let params: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|e| WebhookError::UnreadableBody(e.to_string()))?;
    signature::validate(auth_token, url, SignedBody::Form(&params), signature_header)
        .map_err(WebhookError::Forbidden)?;
    let form = serde_urlencoded::from_bytes::<T>(body)
        .map_err(|e| WebhookError::NotTwilioForm(e.to_string()))?;
    if form.account_sid() == account_sid {
        Ok(form)
    } else {
        Err(WebhookError::OtherAccount)
    }
}

/// `url` with a media stream's token left out: the token admits one stream, so it stays out of
/// the logs like every other credential.
fn loggable_url(url: &str) -> String {
    match url.split_once("/stream/") {
        Some((base, _token)) => format!("{base}/stream/{{token}}"),
        None => url.to_owned(),
    }
}

/// A form POST from Twilio whose signature has been verified, parsed from the same bytes into
/// `T` (whose typed ids reject folded values), and addressed to our account.
pub struct SignedForm<T>(pub T);

impl<T: TwilioForm + 'static> FromRequest for SignedForm<T> {
    type Error = WebhookError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let req = req.clone();
        let body = web::Bytes::from_request(&req, payload);
        Box::pin(async move {
            let body = body
                .await
                .map_err(|e| WebhookError::UnreadableBody(e.to_string()))?;
            let state = req
                .app_data::<web::Data<AppState>>()
                .expect("AppState is registered on every app");
            let path_and_query = req
                .uri()
                .path_and_query()
                .map_or_else(|| req.path(), |pq| pq.as_str());
            let url = state.config.public_base_url.join(path_and_query);
            let form = signed_form::<T>(
                state.config.twilio_auth_token.expose_secret().as_bytes(),
                &state.config.twilio_account_sid,
                &url,
                &body,
                signature_header(&req),
            );
            form.map(SignedForm).map_err(|refusal| match refusal {
                WebhookError::Forbidden(reason) => refused_signature(&req, state, &url, reason),
                WebhookError::UnreadableBody(_) => refusal,
                WebhookError::NotTwilioForm(_) | WebhookError::OtherAccount => {
                    state.metrics.webhooks_refused.inc();
                    // The reason names a field and what it should look like, never its value.
                    tracing::warn!(path = req.path(), %refusal, "refused a signed Twilio webhook");
                    refusal
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    const TOKEN: &[u8] = b"12345";
    const URL: &str = "https://example.com/voice";
    const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
    const CALL: &str = "CA0123456789abcdef0123456789abcdef";

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Form {
        account_sid: AccountSid,
        call_sid: super::super::ids::CallSid,
    }

    impl TwilioForm for Form {
        fn account_sid(&self) -> &AccountSid {
            &self.account_sid
        }
    }

    fn ours() -> AccountSid {
        AccountSid::parse(ACCOUNT).unwrap()
    }

    fn signed(body: &str) -> String {
        let params: Vec<(String, String)> = serde_urlencoded::from_str(body).unwrap();
        signature::compute(TOKEN, URL, SignedBody::Form(&params))
    }

    fn check(body: &str, signature: Option<&str>) -> Result<Form, WebhookError> {
        signed_form::<Form>(TOKEN, &ours(), URL, body.as_bytes(), signature)
    }

    #[test]
    fn a_form_signed_for_the_url_and_our_account_is_read() {
        let body = format!("AccountSid={ACCOUNT}&CallSid={CALL}&Extra=%2B1");
        let form = check(&body, Some(&signed(&body))).unwrap();
        assert_eq!(form.call_sid.as_str(), CALL);
    }

    #[test]
    fn a_signature_that_does_not_hold_is_refused_before_the_form_is_read() {
        // Not a form of ours at all: the signature is what refuses it.
        let body = "AccountSid=AC1";
        assert!(matches!(
            check(body, None),
            Err(WebhookError::Forbidden(SignatureError::Missing))
        ));
        let mut flipped = signed(body).into_bytes();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(matches!(
            check(body, Some(&flipped)),
            Err(WebhookError::Forbidden(SignatureError::Mismatch))
        ));
    }

    #[test]
    fn a_signed_form_twilio_would_not_send_or_for_another_account_is_refused() {
        let folded = format!("AccountSid={ACCOUNT}&CallSid=CA1");
        assert!(matches!(
            check(&folded, Some(&signed(&folded))),
            Err(WebhookError::NotTwilioForm(_))
        ));
        let other = format!("AccountSid=AC{}&CallSid={CALL}", "f".repeat(32));
        assert!(matches!(
            check(&other, Some(&signed(&other))),
            Err(WebhookError::OtherAccount)
        ));
    }

    #[test]
    fn a_body_too_large_is_unreadable() {
        let large = format!("AccountSid={ACCOUNT}&Pad={}", "a".repeat(MAX_WEBHOOK_BODY));
        assert!(matches!(
            check(&large, Some(&signed(&large))),
            Err(WebhookError::UnreadableBody(_))
        ));
    }

    #[test]
    fn a_stream_token_is_left_out_of_the_logged_url() {
        assert_eq!(
            loggable_url("wss://abc.ngrok.app/stream/s3cr3t-token"),
            "wss://abc.ngrok.app/stream/{token}"
        );
        assert_eq!(
            loggable_url("https://abc.ngrok.app/voice?x=1"),
            "https://abc.ngrok.app/voice?x=1"
        );
    }
}
