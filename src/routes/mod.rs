//! HTTP routes, one module per group; `configure` is the single place they are mounted.

mod api;
mod calls;
pub mod dashboard;
mod events;
mod health;
mod messaging;
mod metrics;
mod openapi;
mod outbound;
mod stream;
mod voice;

use actix_web::http::Method;
use actix_web::web;

pub use openapi::{document as openapi_document, string_enum};

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

/// The bearer-authenticated API, as `(method, path)`: the one list they are mounted from, so
/// the OpenAPI document can be checked against every route a client can call.
pub fn bearer_routes() -> Vec<(Method, &'static str)> {
    bearer_api().into_iter().map(|(m, p, _)| (m, p)).collect()
}

fn bearer_api() -> Vec<(Method, &'static str, actix_web::Route)> {
    vec![
        api(
            Method::POST,
            "/call-permissions",
            outbound::request_permission,
        ),
        api(Method::GET, "/calls", calls::list_calls),
        api(Method::POST, "/calls", outbound::place_call),
        api(Method::GET, "/calls/{call_sid}", calls::get_call),
        api(Method::POST, "/calls/{call_sid}/hangup", outbound::hang_up),
        api(Method::GET, "/events", events::list_events),
        api(Method::POST, "/events/{id}/retry", events::retry_event),
    ]
}

/// One API route, with its method written once.
fn api<F, Args>(
    method: Method,
    path: &'static str,
    handler: F,
) -> (Method, &'static str, actix_web::Route)
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    (method.clone(), path, web::method(method).to(handler))
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
        .route("/openapi.json", web::get().to(openapi::openapi_json))
        .configure(dashboard::configure);
    for (_, path, route) in bearer_api() {
        cfg.route(path, route);
    }
}
