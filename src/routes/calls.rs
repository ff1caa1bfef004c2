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
pub struct CallListQuery {
    limit: Option<String>,
    before: Option<String>,
}

impl CallListQuery {
    /// The page asked for: how many calls, and from which position on.
    pub fn page(&self) -> Result<(i64, Option<ListCursor>), ApiError> {
        let limit = page_limit(self.limit.as_deref())?;
        let before = page_cursor(self.before.as_deref(), ListCursor::decode)?;
        Ok((limit, before))
    }
}

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
    Ok(HttpResponse::Ok().json(json!({"calls": calls, "next_before": next_before})))
}
