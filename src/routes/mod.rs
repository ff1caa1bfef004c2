//! HTTP routes, one module per group; `configure` is the single place they are mounted.

mod api;
mod calls;
mod health;
mod metrics;
mod stream;
mod voice;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(metrics::metrics))
        .route("/voice", web::post().to(voice::voice))
        .route("/voice/status", web::post().to(voice::status))
        .route("/stream", web::get().to(stream::stream))
        .route("/calls", web::get().to(calls::list_calls))
        .route("/calls/{call_sid}", web::get().to(calls::get_call));
}
