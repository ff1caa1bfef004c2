//! `GET /events` and `POST /events/{id}/retry`: what became of the events sent to the business,
//! and a way to send one again once the endpoint is fixed.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::api::{ApiCaller, ApiError, page_cursor, page_limit};
use crate::events::DeliveryStatus;
use crate::state::AppState;
use crate::store::models::EventCursor;

#[derive(Deserialize)]
pub struct EventListQuery {
    status: Option<String>,
    limit: Option<String>,
    before: Option<String>,
}

/// What `GET /events` asks for: the status to narrow to, how many, from which position on.
pub type EventPage = (Option<DeliveryStatus>, i64, Option<EventCursor>);

impl EventListQuery {
    /// The query's checks, apart from the route so that the fuzz targets run them alone.
    pub fn page(&self) -> Result<EventPage, ApiError> {
        let status = self
            .status
            .as_deref()
            .map(|raw| {
                DeliveryStatus::parse(raw).ok_or_else(|| {
                    ApiError::InvalidParameter(format!(
                        "status must be pending, failed, stopped or delivered, got {raw:?}"
                    ))
                })
            })
            .transpose()?;
        let limit = page_limit(self.limit.as_deref())?;
        let before = page_cursor(self.before.as_deref(), EventCursor::decode)?;
        Ok((status, limit, before))
    }
}

/// Newest first; `status` narrows the list to `pending`, `failed`, `stopped` or `delivered`.
pub async fn list_events(
    _caller: ApiCaller,
    state: web::Data<AppState>,
    query: web::Query<EventListQuery>,
) -> Result<HttpResponse, ApiError> {
    events_configured(&state)?;
    let (status, limit, before) = query.page()?;
    let events = state
        .store
        .list_event_deliveries(status, limit, before.as_ref())
        .await?;
    let next_before = (i64::try_from(events.len()) == Ok(limit))
        .then(|| {
            events
                .last()
                .map(|event| EventCursor::after(event).encode())
        })
        .flatten();
    Ok(HttpResponse::Ok().json(json!({"events": events, "next_before": next_before})))
}

/// Makes the event due now, with the same `webhook-id` and body and a fresh 24 h of retries.
pub async fn retry_event(
    _caller: ApiCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    events_configured(&state)?;
    if !state.store.retry_event(&id, state.clock.now_ms()).await? {
        return Err(ApiError::EventNotFound);
    }
    Ok(HttpResponse::Ok().json(json!({"id": id.as_str(), "status": "pending"})))
}

fn events_configured(state: &AppState) -> Result<(), ApiError> {
    match state.config.events_url {
        Some(_) => Ok(()),
        None => Err(ApiError::EventsDisabled),
    }
}
