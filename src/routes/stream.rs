//! `GET /stream/{token}`: the Media Streams WebSocket. Twilio signs the upgrade over the stream's
//! full URL, token included, so a signed upgrade names the call it is for; the token is spent
//! before the socket exists, so a replay of the upgrade is refused with 403 and opens nothing.
//! Twilio's `start` is then checked against the token by the bridge.

use std::pin::Pin;
use std::time::Duration;

use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use actix_web::{FromRequest, HttpRequest, HttpResponse, dev, web};
use futures_util::Stream;
use tracing::Instrument;

use crate::admission::RedeemError;
use crate::bridge::{self, BridgeSettings, CallSummary, MAX_TWILIO_FRAME};
use crate::metrics::EndReason;
use crate::state::AppState;
use crate::twilio::signature::SignedBody;
use crate::twilio::socket::FrameLimit;
use crate::twilio::webhook;

pub async fn stream(
    req: HttpRequest,
    body: web::Payload,
    token: web::Path<String>,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    let url = state.config.public_base_url.websocket_url(req.path());
    webhook::verify(&req, &state, &url, SignedBody::Form(&[]))?;
    let body = limit_frames(&req, body).await?;
    // A request that is no WebSocket upgrade is refused here, before it can spend the token.
    let (response, session, messages) = actix_ws::handle(&req, body)?;
    let admitted = match state
        .admission
        .redeem(&state.store, &token, state.clock.now_ms())
        .await
    {
        Ok(admitted) => admitted,
        Err(RedeemError::Store(error)) => {
            tracing::error!(error = format!("{error:#}"), "cannot check a stream token");
            return Ok(HttpResponse::ServiceUnavailable().finish());
        }
        Err(refusal) => {
            tracing::warn!(%refusal, "refused a stream upgrade");
            return Ok(HttpResponse::Forbidden().finish());
        }
    };
    let messages = messages
        .max_frame_size(MAX_TWILIO_FRAME)
        .aggregate_continuations()
        .max_continuation_size(MAX_TWILIO_FRAME);
    let state = state.into_inner();
    // A root of its own: the call outlives the upgrade request, whose span carries the URL and
    // so the token.
    let span = tracing::info_span!(
        parent: None,
        "call",
        call_sid = admitted.call_sid(),
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
                admitted,
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
            make_sure_the_call_ends(&state, &summary).await;
        }
        .instrument(span),
    );
    Ok(response)
}

/// The upgrade's body (the socket's incoming bytes) behind `FrameLimit`, so that a frame
/// declaring more than `MAX_TWILIO_FRAME` is refused at its header rather than buffered.
async fn limit_frames(req: &HttpRequest, body: web::Payload) -> actix_web::Result<web::Payload> {
    let limited: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> =
        Box::pin(FrameLimit::new(body.into_inner(), MAX_TWILIO_FRAME));
    // `web::Payload` has no public constructor; its extractor takes the body as it is.
    web::Payload::from_request(req, &mut dev::Payload::from(limited)).await
}

/// Long enough for the apology after `</Connect>` to be heard.
const APOLOGY_GRACE: Duration = Duration::from_secs(10);

/// Closing the stream hands the call back to the TwiML, which apologises and hangs up; if that
/// TwiML was changed or Twilio keeps the line open, the REST hang-up ends the call for sure.
/// (A drain hangs up before closing the stream: see `bridge::finish`.)
async fn make_sure_the_call_ends(state: &AppState, summary: &CallSummary) {
    let Some(call_sid) = &summary.call_sid else {
        return;
    };
    match summary.end_reason {
        EndReason::AgentFailed | EndReason::AgentUnreachable | EndReason::Timeout => {
            tokio::time::sleep(APOLOGY_GRACE).await;
        }
        _ => return,
    }
    if let Err(error) = state.twilio.hang_up(call_sid).await {
        tracing::warn!(%error, "cannot hang the call up through Twilio's REST API");
    }
}
