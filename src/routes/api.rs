//! What the business-facing API routes share: bearer authentication and the error type that
//! maps every failure to a status and a `{"error":{"code","message"}}` body in one place.

use std::future::{Ready, ready};

use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::error::json_error;
use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the API is disabled: set CALLBRIDGE_API_TOKEN to enable it")]
    Disabled,
    #[error("send the API token as 'Authorization: Bearer <CALLBRIDGE_API_TOKEN>'")]
    Unauthorized,
    #[error("no call with this CallSid is known")]
    CallNotFound,
    #[error("{0}")]
    InvalidParameter(String),
    #[error("an internal error occurred; it has been logged")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            Self::Disabled => "api_disabled",
            Self::Unauthorized => "unauthorized",
            Self::CallNotFound => "call_not_found",
            Self::InvalidParameter(_) => "invalid_parameter",
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
            Self::Disabled => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::CallNotFound => StatusCode::NOT_FOUND,
            Self::InvalidParameter(_) => StatusCode::BAD_REQUEST,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Internal(cause) = self {
            tracing::error!(error = format!("{cause:#}"), "API request failed");
        }
        let mut response = json_error(self.status_code(), self.code(), &self.to_string());
        if matches!(self, Self::Unauthorized) {
            response.headers_mut().insert(
                actix_web::http::header::WWW_AUTHENTICATE,
                actix_web::http::header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Proof the request carried `CALLBRIDGE_API_TOKEN`. Compared as SHA-256 digests so the time
/// taken does not depend on how much of a guess was right.
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
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let matches = Sha256::digest(presented.as_bytes())
            == Sha256::digest(expected.expose_secret().as_bytes());
        ready(if matches && !presented.is_empty() {
            Ok(ApiCaller)
        } else {
            Err(ApiError::Unauthorized)
        })
    }
}
