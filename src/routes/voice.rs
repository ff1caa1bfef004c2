//! Twilio's voice webhooks: `/voice` answers a call with TwiML, `/voice/status` hears progress.

use actix_web::{HttpResponse, web};
use askama::Template;
use serde::Deserialize;
use tracing_actix_web::RootSpan;

use crate::admission::STREAM_TOKEN_TTL;
use crate::domain::phone::{E164, Masked};
use crate::state::AppState;
use crate::store::NewCall;
use crate::store::models::StatusUpdate;
use crate::twilio::call::{CallStatus, Direction};
use crate::twilio::ids::{AccountSid, CallSid};
use crate::twilio::rest::ERROR_NO_CALL_PERMISSION;
use crate::twilio::twiml::{self, ConnectStream, SayHangup};
use crate::twilio::webhook::{SignedForm, TwilioForm};

/// The fields of Twilio's voice request we use; Twilio sends more, and all of them are covered
/// by the signature check before this is parsed.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VoiceRequest {
    call_sid: CallSid,
    account_sid: AccountSid,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    direction: Option<Direction>,
    #[serde(default = "ringing")]
    call_status: CallStatus,
}

fn ringing() -> CallStatus {
    CallStatus::Ringing
}

impl TwilioForm for VoiceRequest {
    fn account_sid(&self) -> &AccountSid {
        &self.account_sid
    }
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
    // Signatures carry no nonce, so a captured /voice request can be replayed: a call whose
    // stream has started (or that has ended) never gets another one.
    match state
        .store
        .stream_started_or_ended(call.call_sid.as_str())
        .await
    {
        Ok(false) => {}
        Ok(true) => {
            tracing::warn!("refused /voice for a call whose stream already started or that ended");
            return twiml_response(&SayHangup {
                message: twiml::APOLOGY,
            });
        }
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "cannot read the call");
            return twiml_response(&SayHangup {
                message: twiml::APOLOGY,
            });
        }
    }
    let now = state.clock.now_ms();
    let candidate = match state.admission.issue(now) {
        Ok(token) => token,
        Err(refusal) => {
            state.metrics.calls_refused_busy.inc();
            tracing::warn!(%refusal, "turned a call away: at capacity");
            return twiml_response(&SayHangup {
                message: twiml::BUSY,
            });
        }
    };
    let ttl_ms = i64::try_from(STREAM_TOKEN_TTL.as_millis()).unwrap_or(i64::MAX);
    let token = match state
        .store
        .issue_stream_token(&candidate, call.call_sid.as_str(), now, now + ttl_ms)
        .await
    {
        Ok(token) => token,
        Err(error) => {
            state.admission.release(&candidate);
            tracing::error!(
                error = format!("{error:#}"),
                "cannot store the stream token"
            );
            return twiml_response(&SayHangup {
                message: twiml::APOLOGY,
            });
        }
    };
    if token != candidate {
        // A retry of this call's webhook: it keeps its first token (and that one's slot).
        state.admission.release(&candidate);
    }
    let agent = route_to_agent(&state, &call).await;
    let record = NewCall {
        call_sid: call.call_sid.as_str(),
        direction: call.direction,
        from: &call.from,
        to: &call.to,
        agent: &agent,
        status: call.call_status,
        at_ms: now,
    };
    if let Err(error) = state.store.record_call(&record).await {
        tracing::error!(error = format!("{error:#}"), "cannot record the call");
    }
    let direction = call.direction.map_or("", Direction::as_str);
    tracing::info!(
        from = %Masked(&call.from),
        to = %Masked(&call.to),
        direction,
        agent,
        "answering call with a media stream"
    );
    // Twilio signs the upgrade over this URL, so the token in it makes each call's upgrade
    // unique: a replay of one finds its token spent.
    let stream_url = state
        .config
        .public_base_url
        .websocket_url(&format!("/stream/{token}"));
    twiml_response(&ConnectStream {
        stream_url: &stream_url,
        parameters: &[
            ("token", &token),
            ("from", &call.from),
            ("to", &call.to),
            ("direction", direction),
            ("agent", &agent),
        ],
        apology: twiml::APOLOGY,
    })
}

/// The agent that answers the call: the one `POST /calls` named for a call it placed, else the
/// one claiming the number called, else the default.
async fn route_to_agent(state: &AppState, call: &VoiceRequest) -> String {
    let agents = state.agents.current();
    if call.direction == Some(Direction::OutboundApi) {
        match state.store.outbound_agent(call.call_sid.as_str()).await {
            Ok(Some(name)) => {
                if let Some(agent) = agents.by_name(&name) {
                    return agent.name.clone();
                }
                tracing::warn!(
                    agent = name,
                    "the agent POST /calls named is gone; the default answers"
                );
            }
            Ok(None) => {}
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "cannot read the call's agent")
            }
        }
        return agents.default_agent().name.clone();
    }
    agents.for_number(&call.to).name.clone()
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StatusCallback {
    call_sid: CallSid,
    account_sid: AccountSid,
    call_status: CallStatus,
    #[serde(default)]
    sequence_number: Option<String>,
    #[serde(default)]
    call_duration: Option<String>,
    #[serde(default)]
    direction: Option<Direction>,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    /// Set on `failed` calls; 37000 means WhatsApp refused for lack of call permission.
    #[serde(default)]
    error_code: Option<String>,
}

impl TwilioForm for StatusCallback {
    fn account_sid(&self) -> &AccountSid {
        &self.account_sid
    }
}

/// Stores the status event; Twilio retries callbacks, and a retry (same `SequenceNumber`) is
/// acknowledged without being stored twice. A 500 makes Twilio try again later.
pub async fn status(
    state: web::Data<AppState>,
    span: RootSpan,
    SignedForm(event): SignedForm<StatusCallback>,
) -> HttpResponse {
    span.record("call_sid", event.call_sid.as_str());
    let refused_for_permission = event.call_status == CallStatus::Failed
        && event.error_code.as_deref() == Some(ERROR_NO_CALL_PERMISSION.to_string().as_str());
    let update = StatusUpdate {
        sequence_number: event
            .sequence_number
            .as_deref()
            .and_then(|n| n.parse().ok()),
        duration_secs: event.call_duration.as_deref().and_then(|d| d.parse().ok()),
        call_sid: event.call_sid.into(),
        status: event.call_status,
        direction: event.direction,
        from: event.from,
        to: event.to,
        at_ms: state.clock.now_ms(),
    };
    match state.store.record_status(&update).await {
        Ok(stored) => {
            if stored && let Err(error) = count_outbound_outcome(&state, &update).await {
                tracing::error!(
                    error = format!("{error:#}"),
                    "cannot count the call's outcome"
                );
            }
            if stored && refused_for_permission {
                revoke_refused_permission(&state, &update).await;
            }
            tracing::info!(
                call_status = %update.status,
                sequence_number = update.sequence_number,
                call_duration = update.duration_secs,
                duplicate = !stored,
                "call status"
            );
            HttpResponse::NoContent().finish()
        }
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "cannot store a call status");
            HttpResponse::InternalServerError().finish()
        }
    }
}

/// Meta revokes a user's permission after four unanswered calls in a row; an answered call
/// starts the count again.
async fn count_outbound_outcome(state: &AppState, update: &StatusUpdate) -> anyhow::Result<()> {
    if update.direction != Some(Direction::OutboundApi) {
        return Ok(());
    }
    let answered = match update.status {
        CallStatus::Completed => true,
        CallStatus::NoAnswer | CallStatus::Busy => false,
        _ => return Ok(()),
    };
    let user = E164::from_address(&update.to)?;
    state
        .store
        .record_outbound_outcome(user.as_str(), answered, update.at_ms)
        .await
}

/// WhatsApp may report a missing permission only after the call was created (Twilio error
/// 37000 on the `failed` callback): the stored grant is stale, so it is revoked.
async fn revoke_refused_permission(state: &AppState, update: &StatusUpdate) {
    let Ok(user) = E164::from_address(&update.to) else {
        return;
    };
    tracing::warn!(to = %Masked(&update.to), "WhatsApp refused the call for lack of permission: revoking it");
    if let Err(error) = state
        .store
        .revoke_permission(user.as_str(), update.at_ms)
        .await
    {
        tracing::error!(error = format!("{error:#}"), "cannot revoke the permission");
    }
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
