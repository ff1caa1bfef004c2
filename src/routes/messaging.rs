//! `POST /messaging`: the WhatsApp sender's messaging webhook, where Twilio posts the user's
//! answer to a call-permission request (`ButtonPayload=ACCEPTED|REJECTED`).

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use crate::consent::REQUEST_VALIDITY_MS;
use crate::domain::phone::{E164, Masked};
use crate::state::AppState;
use crate::store::permissions::Reply;
use crate::twilio::webhook::SignedForm;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IncomingMessage {
    message_sid: String,
    from: String,
    #[serde(default)]
    button_payload: Option<String>,
    #[serde(default)]
    button_text: Option<String>,
    #[serde(default)]
    body: Option<String>,
}

/// What Twilio sends as `Body`/`ButtonText` for the call-permission button; a quick reply from
/// any other template that happens to carry `ACCEPTED` must not grant anything.
const PERMISSION_BUTTON: &str = "VOICE_CALL_REQUEST";

pub async fn messaging(
    state: web::Data<AppState>,
    SignedForm(message): SignedForm<IncomingMessage>,
) -> HttpResponse {
    let reply = match message.button_payload.as_deref() {
        Some("ACCEPTED") => Reply::Accepted,
        Some("REJECTED") => Reply::Rejected,
        // Any other message from the user is not ours to handle.
        _ => return HttpResponse::NoContent().finish(),
    };
    let from_our_button = [&message.button_text, &message.body]
        .into_iter()
        .any(|text| text.as_deref() == Some(PERMISSION_BUTTON));
    if !from_our_button {
        return HttpResponse::NoContent().finish();
    }
    let Ok(user) = E164::from_address(&message.from) else {
        tracing::warn!(from = %Masked(&message.from), "a permission reply from an address that is not a phone number");
        return HttpResponse::NoContent().finish();
    };
    let now = state.clock.now_ms();
    // An answer counts only to a request we sent and that has not expired (Meta: 7 days).
    match state.store.last_permission_request(user.as_str()).await {
        Ok(Some(requested_at)) if now - requested_at < REQUEST_VALIDITY_MS => {}
        Ok(_) => {
            tracing::warn!(from = %Masked(user.as_str()), "ignored a permission reply with no open request");
            return HttpResponse::NoContent().finish();
        }
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "cannot read the permission request"
            );
            return HttpResponse::InternalServerError().finish();
        }
    }
    match state
        .store
        .record_permission_reply(user.as_str(), &message.message_sid, reply, now)
        .await
    {
        Ok(new) => {
            tracing::info!(from = %Masked(user.as_str()), ?reply, duplicate = !new, "call permission answered");
            HttpResponse::NoContent().finish()
        }
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "cannot store a call-permission reply"
            );
            HttpResponse::InternalServerError().finish()
        }
    }
}
