//! What the business-facing API routes share: bearer authentication and the error type that
//! maps every failure to a status and a `{"error":{"code","message"}}` body in one place.

use std::future::{Ready, ready};

use actix_web::error::JsonPayloadError;
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::clock::rfc3339;
use crate::error::{ErrorDetails, json_error_with};
use crate::state::AppState;
use crate::twilio::rest::RestError;

/// Largest API body accepted: a 4 KB call context plus room for the JSON around it.
pub const MAX_JSON_BODY: usize = 16 * 1024;

const DEFAULT_PAGE: i64 = 20;
const MAX_PAGE: i64 = 100;

/// A list route's `limit`: 20 when absent, 1 to 100 when given.
pub fn page_limit(raw: Option<&str>) -> Result<i64, ApiError> {
    match raw {
        None => Ok(DEFAULT_PAGE),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::InvalidParameter(format!(
                    "limit must be a whole number from 1 to {MAX_PAGE}, got {raw:?}"
                ))
            }),
    }
}

/// A list route's `before`, which only a previous page's `next_before` can give.
pub fn page_cursor<T>(
    raw: Option<&str>,
    decode: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    raw.map(|raw| {
        decode(raw).ok_or_else(|| {
            ApiError::InvalidParameter(
                "before must be the next_before value of a previous page".into(),
            )
        })
    })
    .transpose()
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the API is disabled: set CALLBRIDGE_API_TOKEN to enable it")]
    Disabled,
    #[error("send the API token as 'Authorization: Bearer <CALLBRIDGE_API_TOKEN>'")]
    Unauthorized,
    #[error("no call with this CallSid is known")]
    CallNotFound,
    #[error("no event with this id is waiting or failed (a delivered event is not sent again)")]
    EventNotFound,
    #[error("events are not configured: set CALLBRIDGE_EVENTS_URL (see .env.example)")]
    EventsDisabled,
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("the body is larger than {0} bytes, the most an API request may send")]
    BodyTooLarge(usize),
    #[error(
        "{0:?} is not an E.164 number: use '+' followed by 8 to 15 digits, e.g. +5511999990000"
    )]
    InvalidPhoneNumber(String),
    #[error("context is {0} bytes; at most 4096 are allowed")]
    ContextTooLong(usize),
    #[error("agent must be 1 to 64 characters")]
    InvalidAgent,
    #[error("there is no agent named {0:?}; the agents are: {1}")]
    UnknownAgent(String, String),
    #[error("{0}")]
    InvalidVariables(String),
    #[error("outbound calling is not configured: set {0} (see .env.example)")]
    OutboundDisabled(&'static str),
    #[error("Meta allows 1 call-permission request per 24 h and 2 per 7 days, and none for 24 h after a rejection: the next request for this user is allowed at {}", rfc3339(*until_ms))]
    PermissionRequestLimited { until_ms: i64, now_ms: i64 },
    #[error("{0}")]
    NoCallPermission(String),
    #[error(
        "this user has had {0} connected calls in the last 24 hours, the most allowed (OUTBOUND_CALLS_PER_DAY)"
    )]
    CallLimitReached(u32),
    #[error("another call to this user is being placed right now; retry in a few seconds")]
    CallBeingPlaced,
    #[error("this server cannot take another call now ({0}); retry in a moment")]
    Unavailable(&'static str),
    #[error("Twilio refused the request: error {code}: {message}")]
    Twilio { code: i64, message: String },
    #[error("Twilio cannot be reached: {0}")]
    TwilioUnreachable(String),
    #[error("Twilio did not answer in time; the request may or may not have taken effect")]
    TwilioTimeout,
    #[error("an internal error occurred; it has been logged")]
    Internal(#[source] anyhow::Error),
}

impl From<RestError> for ApiError {
    fn from(error: RestError) -> Self {
        match error {
            RestError::Api { code, message, .. } => Self::Twilio { code, message },
            RestError::Timeout(_) => Self::TwilioTimeout,
            RestError::Network(detail) => Self::TwilioUnreachable(detail),
            RestError::Unexpected { status } => {
                Self::TwilioUnreachable(format!("unexpected HTTP {status}"))
            }
        }
    }
}

/// Turns actix's JSON extractor errors into messages that say what to fix.
pub fn json_error_handler(error: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let message = match &error {
        JsonPayloadError::ContentType => {
            "send the body as JSON with 'Content-Type: application/json'".to_owned()
        }
        JsonPayloadError::Deserialize(e) => {
            format!("the body is not the JSON this route expects: {e}")
        }
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => {
            return ApiError::BodyTooLarge(*limit).into();
        }
        other => format!("the body cannot be read: {other}"),
    };
    ApiError::InvalidJson(message).into()
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            Self::Disabled => "api_disabled",
            Self::Unauthorized => "unauthorized",
            Self::CallNotFound => "call_not_found",
            Self::EventNotFound => "event_not_found",
            Self::EventsDisabled => "events_disabled",
            Self::InvalidParameter(_) => "invalid_parameter",
            Self::InvalidJson(_) => "invalid_json",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::InvalidPhoneNumber(_) => "invalid_phone_number",
            Self::ContextTooLong(_) => "context_too_long",
            Self::InvalidAgent => "invalid_agent",
            Self::UnknownAgent(..) => "unknown_agent",
            Self::InvalidVariables(_) => "invalid_variables",
            Self::OutboundDisabled(_) => "outbound_disabled",
            Self::PermissionRequestLimited { .. } => "permission_request_limited",
            Self::NoCallPermission(_) => "no_call_permission",
            Self::CallLimitReached(_) => "call_limit_reached",
            Self::Unavailable(_) => "unavailable",
            Self::CallBeingPlaced => "call_in_progress",
            Self::Twilio { .. } => "twilio_error",
            Self::TwilioUnreachable(_) => "twilio_unreachable",
            Self::TwilioTimeout => "twilio_timeout",
            Self::Internal(_) => "internal_error",
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        Self::Internal(error)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Disabled
            | Self::OutboundDisabled(_)
            | Self::EventsDisabled
            | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::CallNotFound | Self::EventNotFound => StatusCode::NOT_FOUND,
            Self::InvalidParameter(_) | Self::InvalidJson(_) => StatusCode::BAD_REQUEST,
            Self::InvalidPhoneNumber(_)
            | Self::ContextTooLong(_)
            | Self::InvalidAgent
            | Self::UnknownAgent(..)
            | Self::InvalidVariables(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PermissionRequestLimited { .. } | Self::CallLimitReached(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::NoCallPermission(_) | Self::CallBeingPlaced => StatusCode::CONFLICT,
            Self::Twilio { .. } | Self::TwilioUnreachable(_) => StatusCode::BAD_GATEWAY,
            Self::TwilioTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Internal(cause) = self {
            tracing::error!(error = format!("{cause:#}"), "API request failed");
        }
        let mut details = ErrorDetails::default();
        match self {
            Self::Twilio { code, .. } => details.twilio_code = Some(*code),
            Self::PermissionRequestLimited { until_ms, .. } => {
                details.retry_at = Some(rfc3339(*until_ms));
            }
            Self::BodyTooLarge(limit) => details.limit_bytes = Some(*limit),
            _ => {}
        }
        let mut response =
            json_error_with(self.status_code(), self.code(), &self.to_string(), details);
        let headers = response.headers_mut();
        match self {
            Self::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::PermissionRequestLimited { until_ms, now_ms } => {
                let seconds = ((until_ms - now_ms + 999) / 1000).max(1);
                headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
            }
            _ => {}
        }
        response
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is matched in any case, as
/// HTTP auth schemes are case-insensitive (RFC 9110 section 11.1) and clients do send `bearer`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// Whether `presented` is the API token. Compared as SHA-256 digests so the time taken does
/// not depend on how much of a guess was right; an empty guess never matches.
pub fn token_matches(presented: &str, expected: &secrecy::SecretString) -> bool {
    !presented.is_empty()
        && Sha256::digest(presented.as_bytes())
            == Sha256::digest(expected.expose_secret().as_bytes())
}

/// Proof the request carried `CALLBRIDGE_API_TOKEN` (see `token_matches`).
pub struct ApiCaller;

impl FromRequest for ApiCaller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let state = req
            .app_data::<web::Data<AppState>>()
            .expect("AppState is registered on every app");
        let Some(expected) = &state.config.api_token else {
            return ready(Err(ApiError::Disabled));
        };
        let presented = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        ready(if token_matches(presented, expected) {
            Ok(ApiCaller)
        } else {
            Err(ApiError::Unauthorized)
        })
    }
}
