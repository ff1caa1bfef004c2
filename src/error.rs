//! The JSON error body every API route answers with: `{"error":{"code":"…","message":"…"}}`,
//! plus, for some errors, fields that let a client act without parsing the message.

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use serde::Serialize;

/// `{"error": …}`: what every API error answers with.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ErrorBody<'a> {
    /// What went wrong, as a stable `snake_case` word to branch on.
    code: &'a str,
    /// What to fix, in a sentence.
    message: &'a str,
    #[serde(flatten)]
    details: ErrorDetails,
}

/// Fields some errors add, so a client can act without parsing the message.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct ErrorDetails {
    /// Twilio's error code, when Twilio refused the request (`twilio_error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub twilio_code: Option<i64>,
    /// When a permission request is allowed again (`permission_request_limited`), RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
    /// The most an API body may send (`body_too_large`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<usize>,
}

pub fn json_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    json_error_with(status, code, message, ErrorDetails::default())
}

pub fn json_error_with(
    status: StatusCode,
    code: &str,
    message: &str,
    details: ErrorDetails,
) -> HttpResponse {
    HttpResponse::build(status).json(ErrorEnvelope {
        error: ErrorBody {
            code,
            message,
            details,
        },
    })
}
