//! Twilio's voice webhooks: `/voice` answers a call with TwiML, `/voice/status` hears progress.

use actix_web::{HttpResponse, web};
use askama::Template;
use serde::Deserialize;
use tokio::time::Instant;
use tracing_actix_web::RootSpan;

use crate::domain::phone::Masked;
use crate::state::AppState;
use crate::twilio::twiml::{self, ConnectStream, SayHangup};
use crate::twilio::webhook::SignedForm;

/// The fields of Twilio's voice request we use; Twilio sends more, and all of them are covered
/// by the signature check before this is parsed.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VoiceRequest {
    call_sid: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    direction: String,
}

pub async fn voice(
    state: web::Data<AppState>,
    span: RootSpan,
    SignedForm(call): SignedForm<VoiceRequest>,
) -> HttpResponse {
    span.record("call_sid", call.call_sid.as_str());
    if state.lifecycle.is_draining() {
        state.metrics.calls_refused_draining.inc();
        tracing::info!("turned a call away: draining for shutdown");
        return twiml_response(&SayHangup {
            message: twiml::BUSY,
        });
    }
    let token = match state.admission.issue(&call.call_sid, Instant::now()) {
        Ok(token) => token,
        Err(refusal) => {
            state.metrics.calls_refused_busy.inc();
            tracing::warn!(%refusal, "turned a call away: at capacity");
            return twiml_response(&SayHangup {
                message: twiml::BUSY,
            });
        }
    };
    tracing::info!(
        from = %Masked(&call.from),
        to = %Masked(&call.to),
        direction = %call.direction,
        "answering call with a media stream"
    );
    let stream_url = state.config.public_base_url.websocket_url("/stream");
    twiml_response(&ConnectStream {
        stream_url: &stream_url,
        parameters: &[
            ("token", &token),
            ("from", &call.from),
            ("to", &call.to),
            ("direction", &call.direction),
        ],
        apology: twiml::APOLOGY,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StatusCallback {
    call_sid: String,
    call_status: String,
    #[serde(default)]
    sequence_number: Option<String>,
    #[serde(default)]
    call_duration: Option<String>,
}

pub async fn status(span: RootSpan, SignedForm(event): SignedForm<StatusCallback>) -> HttpResponse {
    span.record("call_sid", event.call_sid.as_str());
    tracing::info!(
        call_status = %event.call_status,
        sequence_number = event.sequence_number.as_deref().unwrap_or(""),
        call_duration = event.call_duration.as_deref().unwrap_or(""),
        "call status"
    );
    HttpResponse::NoContent().finish()
}

fn twiml_response(document: &impl Template) -> HttpResponse {
    match document.render() {
        Ok(xml) => HttpResponse::Ok()
            .content_type("text/xml; charset=utf-8")
            .body(xml),
        Err(e) => {
            tracing::error!(error = %e, "TwiML template failed to render");
            HttpResponse::InternalServerError().finish()
        }
    }
}
