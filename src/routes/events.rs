//! `GET /events` and `POST /events/{id}/retry`: what became of the events sent to the business,
//! and a way to send one again once the endpoint is fixed.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::api::{ApiCaller, ApiError, page_cursor, page_limit};
use crate::error::ErrorEnvelope;
use crate::events::DeliveryStatus;
use crate::state::AppState;
use crate::store::models::{EventCursor, EventDelivery};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventListQuery {
    /// Only events in this state.
    #[param(value_type = Option<DeliveryStatus>)]
    status: Option<String>,
    /// How many events, 1 to 100 (default 20).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// The `next_before` of the previous page.
    before: Option<String>,
}

/// A page of events, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EventList {
    events: Vec<EventDelivery>,
    /// Pass as `before` for the next page; `null` on the last one.
    next_before: Option<String>,
}

/// An event made due again.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RetryScheduled {
    id: String,
    /// Always `pending`.
    status: DeliveryStatus,
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
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    params(EventListQuery),
    responses(
        (status = 200, description = "A page of events and how their delivery stands", body = EventList),
        (status = 400, description = "`invalid_parameter`: `status`, `limit` or `before` is not usable", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 500, description = "`internal_error`", body = ErrorEnvelope),
        (status = 503, description = "`api_disabled`, or `events_disabled`: CALLBRIDGE_EVENTS_URL is not set", body = ErrorEnvelope),
    ),
)]
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
    Ok(HttpResponse::Ok().json(EventList {
        events,
        next_before,
    }))
}

/// Makes the event due now, with the same `webhook-id` and body and a fresh 24 h of retries.
#[utoipa::path(
    post,
    path = "/events/{id}/retry",
    tag = "events",
    params(("id" = String, Path, description = "The event's `webhook-id` (`msg_…`)")),
    responses(
        (status = 200, description = "The event is due now", body = RetryScheduled),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 404, description = "`event_not_found`: unknown, or already delivered", body = ErrorEnvelope),
        (status = 500, description = "`internal_error`", body = ErrorEnvelope),
        (status = 503, description = "`api_disabled` or `events_disabled`", body = ErrorEnvelope),
    ),
)]
pub async fn retry_event(
    _caller: ApiCaller,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    events_configured(&state)?;
    if !state.store.retry_event(&id, state.clock.now_ms()).await? {
        return Err(ApiError::EventNotFound);
    }
    Ok(HttpResponse::Ok().json(RetryScheduled {
        id: id.into_inner(),
        status: DeliveryStatus::Pending,
    }))
}

fn events_configured(state: &AppState) -> Result<(), ApiError> {
    match state.config.events_url {
        Some(_) => Ok(()),
        None => Err(ApiError::EventsDisabled),
    }
}
