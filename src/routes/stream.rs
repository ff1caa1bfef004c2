//! `GET /stream`: the Media Streams WebSocket. The upgrade itself is signature-checked (over the
//! ws/wss URL with no parameters) before any socket exists; the call's token is checked later,
//! on Twilio's `start`, by the bridge.

use actix_web::{HttpRequest, HttpResponse, web};
use tracing::Instrument;

use crate::bridge::{self, BridgeSettings, MAX_TWILIO_FRAME};
use crate::state::AppState;
use crate::twilio::signature::SignedBody;
use crate::twilio::webhook;

pub async fn stream(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    let url = state.config.public_base_url.websocket_url(req.path());
    webhook::verify(&req, &state, &url, SignedBody::Form(&[]))?;
    let (response, session, messages) = actix_ws::handle(&req, body)?;
    let messages = messages
        .max_frame_size(MAX_TWILIO_FRAME)
        .aggregate_continuations()
        .max_continuation_size(MAX_TWILIO_FRAME);
    let state = state.into_inner();
    let span = tracing::info_span!(
        "call",
        call_sid = tracing::field::Empty,
        stream_sid = tracing::field::Empty
    );
    // The socket halves are tied to this worker's thread, so the call runs as a local task.
    actix_web::rt::spawn(
        async move {
            let summary = bridge::run(
                session,
                messages,
                &state.dialer,
                &state,
                state.lifecycle.close_calls_token(),
                BridgeSettings::default(),
            )
            .await;
            tracing::info!(
                reason = summary.end_reason.label(),
                duration_ms = u64::try_from(summary.duration.as_millis()).unwrap_or(u64::MAX),
                transcript_lines = summary.transcript.len(),
                total_tokens = summary.usage.total_tokens,
                "call ended"
            );
        }
        .instrument(span),
    );
    Ok(response)
}
