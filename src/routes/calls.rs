//! `GET /calls/{call_sid}` and `GET /calls`: what happened on each call.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::api::{ApiCaller, ApiError, page_cursor, page_limit};
use crate::state::AppState;
use crate::store::models::ListCursor;

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

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<String>,
    before: Option<String>,
}

pub async fn list_calls(
    _caller: ApiCaller,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = page_limit(query.limit.as_deref())?;
    let before = page_cursor(query.before.as_deref(), ListCursor::decode)?;
    let calls = state.store.list_calls(limit, before.as_ref()).await?;
    let next_before = (i64::try_from(calls.len()) == Ok(limit))
        .then(|| calls.last().map(|call| ListCursor::after(call).encode()))
        .flatten();
    Ok(HttpResponse::Ok().json(json!({"calls": calls, "next_before": next_before})))
}
