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
    let header = req
        .headers()
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok());
    signature::validate(
        state.config.twilio_auth_token.expose_secret().as_bytes(),
        url,
        body,
        header,
    )
    .map_err(|reason| {
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
    })
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
            if body.len() > MAX_WEBHOOK_BODY {
                return Err(WebhookError::UnreadableBody("the body is too large".into()));
            }
            let state = req
                .app_data::<web::Data<AppState>>()
                .expect("AppState is registered on every app");
            let params: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
                .map_err(|e| WebhookError::UnreadableBody(e.to_string()))?;
            let path_and_query = req
                .uri()
                .path_and_query()
                .map_or_else(|| req.path(), |pq| pq.as_str());
            let url = state.config.public_base_url.join(path_and_query);
            verify(&req, state, &url, SignedBody::Form(&params))?;
            let form = serde_urlencoded::from_bytes::<T>(&body)
                .map_err(|e| WebhookError::NotTwilioForm(e.to_string()))
                .and_then(|form| {
                    if form.account_sid() == &state.config.twilio_account_sid {
                        Ok(form)
                    } else {
                        Err(WebhookError::OtherAccount)
                    }
                });
            form.map(SignedForm).inspect_err(|refusal| {
                state.metrics.webhooks_refused.inc();
                // The reason names a field and what it should look like, never its value.
                tracing::warn!(path = req.path(), %refusal, "refused a signed Twilio webhook");
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::loggable_url;

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
