//! `GET /calls/{call_sid}` and `GET /calls`: what happened on each call.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::api::{ApiCaller, ApiError};
use crate::state::AppState;
use crate::store::models::ListCursor;

const DEFAULT_PAGE: i64 = 20;
const MAX_PAGE: i64 = 100;

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
    let limit = match query.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::InvalidParameter(format!(
                    "limit must be a whole number from 1 to {MAX_PAGE}, got {raw:?}"
                ))
            })?,
    };
    let before = match query.before.as_deref() {
        None => None,
        Some(raw) => Some(ListCursor::decode(raw).ok_or_else(|| {
            ApiError::InvalidParameter(
                "before must be the next_before value of a previous page".into(),
            )
        })?),
    };
    let calls = state.store.list_calls(limit, before.as_ref()).await?;
    let next_before = (i64::try_from(calls.len()) == Ok(limit))
        .then(|| calls.last().map(|call| ListCursor::after(call).encode()))
        .flatten();
    Ok(HttpResponse::Ok().json(json!({"calls": calls, "next_before": next_before})))
}
