//! `GET /stream/{token}`: the Media Streams WebSocket. Twilio signs the upgrade over the stream's
//! full URL, token included, so a signed upgrade names the call it is for; the token is spent
//! before the socket exists, so a replay of the upgrade is refused with 403 and opens nothing.
//! Twilio's `start` is then checked against the token by the bridge.

use std::pin::Pin;
use std::sync::Arc;

use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use actix_web::{FromRequest, HttpRequest, HttpResponse, dev, web};
use futures_util::Stream;
use tracing::Instrument;

use crate::admission::{AdmittedStream, RedeemError};
use crate::call::core::CallSetup;
use crate::call::driver::{self, Peers};
use crate::state::AppState;
use crate::twilio::signature::SignedBody;
use crate::twilio::socket::{FrameLimit, MAX_TWILIO_FRAME};
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
    let accepted_at = tokio::time::Instant::now().into_std();
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
        call_sid = admitted.grant.call_sid.as_str(),
        stream_sid = tracing::field::Empty,
        agent = tracing::field::Empty
    );
    let AdmittedStream { grant, slot } = admitted;
    let setup = CallSetup {
        grant,
        account_sid: state.config.twilio_account_sid.clone(),
        agents: state.agents.current(),
        settings: state.config.call.clone(),
        metrics: Arc::clone(&state.metrics),
        accepted_at,
        accepted_at_ms: state.clock.now_ms(),
    };
    // The socket halves are tied to this worker's thread, so the call runs as a local task.
    actix_web::rt::spawn(
        async move {
            let peers = Peers {
                dialer: &state.dialer,
                control: &state.twilio,
            };
            let close = state.lifecycle.close_calls_token();
            driver::run(session, messages, peers, &state, setup, slot, close).await;
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
