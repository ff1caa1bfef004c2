use actix_web::{HttpResponse, web};

use crate::metrics::CONTENT_TYPE;
use crate::state::AppState;

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    match state.metrics.render(
        state.admission.occupancy_at(state.clock.now_ms()),
        state.lifecycle.is_draining(),
    ) {
        Ok(body) => HttpResponse::Ok().content_type(CONTENT_TYPE).body(body),
        Err(error) => {
            tracing::error!(%error, "metrics could not be encoded");
            HttpResponse::InternalServerError().finish()
        }
    }
}
