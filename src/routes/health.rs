use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::state::AppState;

/// Liveness: the process runs and serves HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Readiness: fails while draining so the load balancer stops sending new calls here.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.lifecycle.is_draining() {
        HttpResponse::ServiceUnavailable().json(json!({"status": "draining"}))
    } else {
        HttpResponse::Ok().json(json!({"status": "ready"}))
    }
}
