//! The JSON error body every API route answers with: `{"error":{"code":"…","message":"…"}}`,
//! plus, for some errors, fields that let a client act without parsing the message.

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(flatten)]
    details: Map<String, Value>,
}

pub fn json_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    json_error_with(status, code, message, Map::new())
}

pub fn json_error_with(
    status: StatusCode,
    code: &str,
    message: &str,
    details: Map<String, Value>,
) -> HttpResponse {
    HttpResponse::build(status).json(ErrorEnvelope {
        error: ErrorBody {
            code,
            message,
            details,
        },
    })
}
