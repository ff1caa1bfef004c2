use actix_web::{HttpResponse, web};

use crate::state::AppState;

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let body = state.metrics.render(
        state.admission.occupancy_at(state.clock.now_ms()),
        state.lifecycle.is_draining(),
    );
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}
