//! Calling WhatsApp users: ask for their permission, place calls only while it is granted and
//! within Meta's limits, and hang calls up.

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::api::{ApiCaller, ApiError};
use crate::agents::Agents;
use crate::call::agent::Variables;
use crate::clock::MS_PER_DAY;
use crate::consent::{self, REQUEST_WINDOW_MS};
use crate::domain::phone::{E164, Masked};
use crate::error::ErrorEnvelope;
use crate::state::AppState;
use crate::store::permissions::OutboundCall;
use crate::twilio::call::CallStatus;
use crate::twilio::ids::{CallSid, ContentSid};
use crate::twilio::rest::ERROR_NO_CALL_PERMISSION;

const MAX_CONTEXT_BYTES: usize = 4096;
const MAX_AGENT_CHARS: usize = 64;
/// Variables end up in the agent's prompt: a handful of short values, not a document.
const MAX_VARIABLES: usize = 32;
const MAX_VARIABLE_NAME_CHARS: usize = 64;
const MAX_VARIABLE_VALUE_BYTES: usize = 1024;
/// How long a WhatsApp user's phone rings before the call counts as unanswered.
const RING_TIMEOUT_SECS: &str = "30";
/// Longer than placing a call takes (Twilio's REST timeout is 10 s), so a crashed request
/// cannot block a user for long.
const PLACING_LEASE_MS: i64 = 30_000;

/// What outbound calling needs from the configuration.
struct Outbound<'a> {
    business: &'a E164,
    content_sid: &'a ContentSid,
}

fn outbound(state: &AppState) -> Result<Outbound<'_>, ApiError> {
    let config = &state.config;
    match (
        &config.twilio_whatsapp_number,
        &config.twilio_call_permission_content_sid,
    ) {
        (Some(business), Some(content_sid)) => Ok(Outbound {
            business,
            content_sid,
        }),
        // The configuration refuses one without the other, so neither is set.
        _ => Err(ApiError::OutboundDisabled(
            "TWILIO_WHATSAPP_NUMBER and TWILIO_CALL_PERMISSION_CONTENT_SID",
        )),
    }
}

fn user_number(raw: &str) -> Result<E164, ApiError> {
    E164::parse(raw).map_err(|_| ApiError::InvalidPhoneNumber(raw.to_owned()))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PermissionRequest {
    /// The WhatsApp user, in E.164 (`+5511999990000`).
    to: String,
}

/// The template went out; the user's answer arrives on `/messaging`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PermissionRequested {
    to: String,
    /// Twilio's MessageSid of the template sent.
    message_sid: String,
    /// Always `pending` until the user answers.
    #[schema(value_type = String, example = "pending")]
    state: &'static str,
}

/// The call Twilio placed.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CallPlaced {
    call_sid: String,
    status: CallStatus,
}

/// The call is over (or already was).
#[derive(Serialize, utoipa::ToSchema)]
pub struct HungUp {
    call_sid: String,
    status: CallStatus,
}

impl PermissionRequest {
    /// The body's one check: the user's number.
    pub fn check(&self) -> Result<E164, ApiError> {
        user_number(&self.to)
    }
}

/// `POST /call-permissions`: sends the call-permission template, within Meta's request limits.
#[utoipa::path(
    post,
    path = "/call-permissions",
    tag = "outbound",
    request_body = PermissionRequest,
    responses(
        (status = 201, description = "The permission request was sent", body = PermissionRequested),
        (status = 400, description = "`invalid_json`: not a JSON body of this shape", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 413, description = "`body_too_large`", body = ErrorEnvelope),
        (status = 422, description = "`invalid_phone_number`", body = ErrorEnvelope),
        (status = 429, description = "`permission_request_limited`: Meta's limits; see `retry_at` and `Retry-After`", body = ErrorEnvelope),
        (status = 500, description = "`internal_error`", body = ErrorEnvelope),
        (status = 502, description = "`twilio_error` (see `twilio_code`) or `twilio_unreachable`", body = ErrorEnvelope),
        (status = 503, description = "`api_disabled` or `outbound_disabled`", body = ErrorEnvelope),
        (status = 504, description = "`twilio_timeout`", body = ErrorEnvelope),
    ),
)]
pub async fn request_permission(
    _caller: ApiCaller,
    state: web::Data<AppState>,
    body: web::Json<PermissionRequest>,
) -> Result<HttpResponse, ApiError> {
    let outbound = outbound(&state)?;
    let user = body.check()?;
    let now = state.clock.now_ms();
    let permission = state.store.permission(user.as_str()).await?;
    let recent = state
        .store
        .permission_requests_since(user.as_str(), now - REQUEST_WINDOW_MS)
        .await?;
    let limited = |until_ms| ApiError::PermissionRequestLimited {
        until_ms,
        now_ms: now,
    };
    if let Some(until_ms) = consent::request_blocked_until(&recent, permission.as_ref(), now) {
        return Err(limited(until_ms));
    }
    let previous = state.store.last_permission_request(user.as_str()).await?;
    if !state
        .store
        .claim_permission_request(user.as_str(), now)
        .await?
    {
        // Another request for this user got in first, just now.
        return Err(limited(now + consent::REQUEST_SPACING_MS));
    }
    let sent = state
        .twilio
        .send_message(&[
            ("ContentSid", outbound.content_sid.as_str()),
            ("From", &outbound.business.whatsapp_address()),
            ("To", &user.whatsapp_address()),
        ])
        .await;
    let message = match sent {
        Ok(message) => message,
        Err(error) => {
            state
                .store
                .release_permission_request(user.as_str(), now, previous)
                .await?;
            return Err(error.into());
        }
    };
    state
        .store
        .record_permission_request(user.as_str(), &message.sid, now)
        .await?;
    tracing::info!(to = %Masked(user.as_str()), message_sid = %message.sid, "call permission requested");
    Ok(HttpResponse::Created().json(PermissionRequested {
        to: user.as_str().to_owned(),
        message_sid: message.sid,
        state: "pending",
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceCall {
    /// The WhatsApp user, in E.164; they must have granted permission.
    to: String,
    /// The agent to answer with (by name); the default agent when absent.
    #[serde(default)]
    #[schema(max_length = 64)]
    agent: Option<String>,
    /// Text the agent is told about this call, at most 4096 bytes.
    #[serde(default)]
    context: Option<String>,
    /// Values for the agent's `{{placeholders}}`: at most 32, names of letters, digits and `_`.
    #[serde(default)]
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    variables: Variables,
}

impl PlaceCall {
    /// Every check of the body, in this order: the number, the context's size, the agent's name
    /// (its shape, then that `agents` has it) and the variables. Apart from the route so that
    /// the fuzz targets run exactly these checks on arbitrary bodies.
    pub fn check(&self, agents: &Agents) -> Result<E164, ApiError> {
        let user = user_number(&self.to)?;
        if let Some(context) = &self.context
            && context.len() > MAX_CONTEXT_BYTES
        {
            return Err(ApiError::ContextTooLong(context.len()));
        }
        if let Some(agent) = &self.agent {
            if agent.trim().is_empty() || agent.chars().count() > MAX_AGENT_CHARS {
                return Err(ApiError::InvalidAgent);
            }
            if agents.by_name(agent).is_none() {
                let names: Vec<&str> = agents.profiles().iter().map(|a| a.name.as_str()).collect();
                return Err(ApiError::UnknownAgent(agent.clone(), names.join(", ")));
            }
        }
        check_variables(&self.variables)?;
        Ok(user)
    }
}

/// Names like `{{first_name}}` use; values short enough for a prompt.
fn check_variables(variables: &Variables) -> Result<(), ApiError> {
    if variables.len() > MAX_VARIABLES {
        return Err(ApiError::InvalidVariables(format!(
            "variables has {} entries; at most {MAX_VARIABLES} are allowed",
            variables.len()
        )));
    }
    for (name, value) in variables {
        let valid_name = !name.is_empty()
            && name.chars().count() <= MAX_VARIABLE_NAME_CHARS
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(ApiError::InvalidVariables(format!(
                "variable names are 1 to {MAX_VARIABLE_NAME_CHARS} letters, digits or underscores; {name:?} is not"
            )));
        }
        if value.len() > MAX_VARIABLE_VALUE_BYTES {
            return Err(ApiError::InvalidVariables(format!(
                "variable {name:?} is {} bytes; at most {MAX_VARIABLE_VALUE_BYTES} are allowed",
                value.len()
            )));
        }
    }
    Ok(())
}

/// `POST /calls`: places a WhatsApp call to a user who granted permission.
#[utoipa::path(
    post,
    path = "/calls",
    tag = "outbound",
    request_body = PlaceCall,
    responses(
        (status = 201, description = "Twilio is placing the call", body = CallPlaced),
        (status = 400, description = "`invalid_json`", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 409, description = "`no_call_permission`, or `call_in_progress`: another call to this user is being placed", body = ErrorEnvelope),
        (status = 413, description = "`body_too_large`", body = ErrorEnvelope),
        (status = 422, description = "`invalid_phone_number`, `context_too_long`, `invalid_agent`, `unknown_agent` or `invalid_variables`", body = ErrorEnvelope),
        (status = 429, description = "`call_limit_reached`: OUTBOUND_CALLS_PER_DAY", body = ErrorEnvelope),
        (status = 500, description = "`internal_error`", body = ErrorEnvelope),
        (status = 502, description = "`twilio_error` or `twilio_unreachable`", body = ErrorEnvelope),
        (status = 503, description = "`api_disabled`, `outbound_disabled`, or `unavailable`: draining or every call slot taken", body = ErrorEnvelope),
        (status = 504, description = "`twilio_timeout`", body = ErrorEnvelope),
    ),
)]
pub async fn place_call(
    _caller: ApiCaller,
    state: web::Data<AppState>,
    body: web::Json<PlaceCall>,
) -> Result<HttpResponse, ApiError> {
    let outbound = outbound(&state)?;
    let user = body.check(&state.agents.current())?;
    // The call would reach /voice only to hear the busy message, and still count against the
    // user's daily limit.
    if state.lifecycle.is_draining() {
        return Err(ApiError::Unavailable("it is shutting down"));
    }
    let occupancy = state.admission.occupancy_at(state.clock.now_ms());
    if occupancy.live + occupancy.pending >= state.config.max_concurrent_calls {
        return Err(ApiError::Unavailable("all call slots are taken"));
    }
    let now = state.clock.now_ms();
    let permission = state.store.permission(user.as_str()).await?;
    consent::check_call(permission.as_ref(), now)
        .map_err(|refusal| ApiError::NoCallPermission(refusal.message()))?;
    // Checking the daily limit and creating the call happen under a short per-user lease, so
    // two requests (even on two machines) cannot both pass the check.
    let lease_until = now + PLACING_LEASE_MS;
    if !state
        .store
        .claim_call_placing(user.as_str(), now, lease_until)
        .await?
    {
        return Err(ApiError::CallBeingPlaced);
    }
    let placed = place_under_lease(&state, &outbound, &user, &body, now).await;
    state
        .store
        .release_call_placing(user.as_str(), lease_until)
        .await?;
    placed
}

async fn place_under_lease(
    state: &AppState,
    outbound: &Outbound<'_>,
    user: &E164,
    body: &PlaceCall,
    now: i64,
) -> Result<HttpResponse, ApiError> {
    let to = user.whatsapp_address();
    let limit = state.config.outbound_calls_per_day;
    let counted = state
        .store
        .outbound_calls_counted_since(&to, now - MS_PER_DAY)
        .await?;
    if counted >= i64::from(limit) {
        return Err(ApiError::CallLimitReached(limit));
    }

    let from = outbound.business.whatsapp_address();
    let base = &state.config.public_base_url;
    let (voice_url, status_url) = (base.join("/voice"), base.join("/voice/status"));
    let created = state
        .twilio
        .create_call(&[
            ("From", &from),
            ("To", &to),
            ("Url", &voice_url),
            ("Method", "POST"),
            ("StatusCallback", &status_url),
            ("StatusCallbackMethod", "POST"),
            ("StatusCallbackEvent", "initiated"),
            ("StatusCallbackEvent", "ringing"),
            ("StatusCallbackEvent", "answered"),
            ("StatusCallbackEvent", "completed"),
            ("Timeout", RING_TIMEOUT_SECS),
        ])
        .await;
    let call = match created {
        Ok(call) => call,
        Err(error) if error.code() == Some(ERROR_NO_CALL_PERMISSION) => {
            // WhatsApp says the user has not granted permission: our record is stale.
            state.store.revoke_permission(user.as_str(), now).await?;
            tracing::warn!(to = %Masked(user.as_str()), "WhatsApp refused the call: permission revoked");
            return Err(ApiError::NoCallPermission(format!(
                "WhatsApp reports that the user has not granted call permission ({error}); \
                 request it again with POST /call-permissions"
            )));
        }
        Err(error) => return Err(error.into()),
    };
    // Twilio creates every REST call `queued`. The call is placed whatever its answer says, so
    // a status this code does not know is recorded as that; the status callbacks then move it on.
    let status = call.status.parse().unwrap_or_else(|refusal| {
        tracing::warn!(%refusal, "Twilio answered a new call with an unknown status; recording it as queued");
        CallStatus::Queued
    });
    state
        .store
        .record_outbound_call(&OutboundCall {
            call_sid: &call.sid,
            from: &from,
            to: &to,
            agent: body.agent.as_deref(),
            context: body.context.as_deref(),
            variables: &body.variables,
            status,
            at_ms: now,
        })
        .await?;
    tracing::info!(call_sid = %call.sid, to = %Masked(&to), "outbound call placed");
    Ok(HttpResponse::Created().json(CallPlaced {
        call_sid: call.sid,
        status,
    }))
}

/// `POST /calls/{call_sid}/hangup`: ends the call; one that has already ended is fine too.
#[utoipa::path(
    post,
    path = "/calls/{call_sid}/hangup",
    tag = "calls",
    params(("call_sid" = String, Path, description = "Twilio's CallSid (`CA…`)")),
    responses(
        (status = 200, description = "The call is over", body = HungUp),
        (status = 400, description = "`invalid_parameter`: not a CallSid", body = ErrorEnvelope),
        (status = 401, description = "`unauthorized`", body = ErrorEnvelope),
        (status = 404, description = "`call_not_found`", body = ErrorEnvelope),
        (status = 500, description = "`internal_error`", body = ErrorEnvelope),
        (status = 502, description = "`twilio_error` or `twilio_unreachable`", body = ErrorEnvelope),
        (status = 503, description = "`api_disabled`", body = ErrorEnvelope),
        (status = 504, description = "`twilio_timeout`", body = ErrorEnvelope),
    ),
)]
/// A CallSid the store has never seen is most likely a typo or another account's call: it is
/// answered 404 without asking Twilio, which would report an unknown call as already ended.
pub async fn hang_up(
    _caller: ApiCaller,
    state: web::Data<AppState>,
    call_sid: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let call_sid = CallSid::parse(&call_sid)
        .map_err(|why| ApiError::InvalidParameter(format!("call_sid is {why}")))?;
    if state.store.call(call_sid.as_str()).await?.is_none() {
        return Err(ApiError::CallNotFound);
    }
    state.twilio.hang_up(call_sid.as_str()).await?;
    Ok(HttpResponse::Ok().json(HungUp {
        call_sid: call_sid.as_str().to_owned(),
        status: CallStatus::Completed,
    }))
}
