//! `GET /calls/{call_sid}` and `GET /calls`: what happened on each call.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::api::{ApiCaller, ApiError, page_cursor, page_limit};
use crate::error::ErrorEnvelope;
use crate::state::AppState;
use crate::store::models::{CallDetail, CallRecord, ListCursor};

/// One call: its record, its status and stream events, and its transcript.
#[utoipa::path(
    get,
    path = "/calls/{call_sid}",
    tag = "calls",
    params(("call_sid" = String, Path, description = "Twilio's CallSid (`CA…`)")),
    responses(
        (status = 200, description = "The call", body = CallDetail),
        (status = 401, description = "`unauthorized`: no or a wrong bearer token", body = ErrorEnvelope),
        (status = 404, description = "`call_not_found`", body = ErrorEnvelope),
        (status = 500, description = "`internal_error`: the database failed", body = ErrorEnvelope),
        (status = 503, description = "`api_disabled`: CALLBRIDGE_API_TOKEN is not set", body = ErrorEnvelope),
    ),
)]
pub async fn get_call(
    _caller: ApiCaller,
    state: web::Data<AppState>,
    call_sid: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let detail = state
        .store
        .call(&call_sid)
        .await?
        .ok_or(ApiError::CallNotFound)?;
    Ok(HttpResponse::Ok().json(detail))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallListQuery {
    /// How many calls, 1 to 100 (default 20).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// The `next_before` of the previous page.
    before: Option<String>,
}

/// A page of calls, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CallPage {
    calls: Vec<CallRecord>,
    /// Pass as `before` for the next page; `null` on the last one.
    next_before: Option<String>,
}

impl CallListQuery {
    /// The page asked for: how many calls, and from which position on.
    pub fn page(&self) -> Result<(i64, Option<ListCursor>), ApiError> {
        let limit = page_limit(self.limit.as_deref())?;
        let before = page_cursor(self.before.as_deref(), ListCursor::decode)?;
        Ok((limit, before))
    }
}

/// The calls, newest first.
#[utoipa::path(
    get,
    path = "/calls",
    tag = "calls",
    params(CallListQuery),
    responses(
        (status = 200, description = "A page of calls", body = CallPage),
        (status = 400, description = "`invalid_parameter`: `limit` or `before` is not usable", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 500, description = "`internal_error`", body = ErrorEnvelope),
        (status = 503, description = "`api_disabled`", body = ErrorEnvelope),
    ),
)]
pub async fn list_calls(
    _caller: ApiCaller,
    state: web::Data<AppState>,
    query: web::Query<CallListQuery>,
) -> Result<HttpResponse, ApiError> {
    let (limit, before) = query.page()?;
    let calls = state.store.list_calls(limit, before.as_ref()).await?;
    let next_before = (i64::try_from(calls.len()) == Ok(limit))
        .then(|| calls.last().map(|call| ListCursor::after(call).encode()))
        .flatten();
    Ok(HttpResponse::Ok().json(CallPage { calls, next_before }))
}
