//! HTTP routes, one module per group; `configure` is the single place they are mounted.

mod api;
mod calls;
pub mod dashboard;
mod events;
mod health;
mod messaging;
mod metrics;
mod outbound;
mod stream;
mod voice;

use actix_web::web;

/// What the routes read untrusted requests into, with the checks they make on them, so that the
/// fuzz targets and the seed regression test decode arbitrary bytes into exactly these types
/// rather than copies of them. The handlers stay private to this module.
pub mod inputs {
    pub use super::api::ApiError;
    pub use super::calls::CallListQuery;
    pub use super::events::{EventListQuery, EventPage};
    pub use super::messaging::IncomingMessage;
    pub use super::outbound::{PermissionRequest, PlaceCall};
    pub use super::voice::{StatusCallback, VoiceRequest};
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    let json = web::JsonConfig::default()
        .limit(api::MAX_JSON_BODY)
        .error_handler(api::json_error_handler);
    cfg.app_data(json)
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(metrics::metrics))
        .route("/voice", web::post().to(voice::voice))
        .route("/voice/status", web::post().to(voice::status))
        .route("/stream/{token}", web::get().to(stream::stream))
        .route("/messaging", web::post().to(messaging::messaging))
        .route(
            "/call-permissions",
            web::post().to(outbound::request_permission),
        )
        .route("/calls", web::get().to(calls::list_calls))
        .route("/calls", web::post().to(outbound::place_call))
        .route("/calls/{call_sid}", web::get().to(calls::get_call))
        .route(
            "/calls/{call_sid}/hangup",
            web::post().to(outbound::hang_up),
        )
        .route("/events", web::get().to(events::list_events))
        .route("/events/{id}/retry", web::post().to(events::retry_event))
        .configure(dashboard::configure);
}
