//! `POST /messaging`: the WhatsApp sender's messaging webhook, where Twilio posts the user's
//! answer to a call-permission request (`ButtonPayload=ACCEPTED|REJECTED`).

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use crate::consent::{Reply, ReplyEffect};
use crate::domain::phone::{E164, Masked};
use crate::state::AppState;
use crate::store::permissions::ReplyOutcome;
use crate::twilio::ids::{AccountSid, MessageSid};
use crate::twilio::webhook::{SignedForm, TwilioForm};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IncomingMessage {
    message_sid: MessageSid,
    account_sid: AccountSid,
    from: String,
    /// The message this one replies to, when the user answered one of ours: for a button
    /// press, the template message carrying the button.
    #[serde(default)]
    original_replied_message_sid: Option<MessageSid>,
    #[serde(default)]
    button_payload: Option<String>,
    #[serde(default)]
    button_text: Option<String>,
    #[serde(default)]
    body: Option<String>,
}

impl TwilioForm for IncomingMessage {
    fn account_sid(&self) -> &AccountSid {
        &self.account_sid
    }
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
    let replied_to = message
        .original_replied_message_sid
        .as_ref()
        .map(MessageSid::as_str);
    let recorded = state
        .store
        .record_permission_reply(
            user.as_str(),
            message.message_sid.as_str(),
            replied_to,
            reply,
            state.clock.now_ms(),
        )
        .await;
    let from = Masked(user.as_str());
    match recorded {
        Ok(ReplyOutcome::Repeated) => {
            tracing::info!(%from, ?reply, "a permission reply seen before: nothing changes");
        }
        Ok(ReplyOutcome::New(ReplyEffect::Ignore(why))) => {
            tracing::warn!(%from, ?reply, reason = why.as_str(), "ignored a permission reply");
        }
        Ok(ReplyOutcome::New(effect)) => {
            tracing::info!(%from, ?effect, "call permission answered");
        }
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "cannot store a call-permission reply"
            );
            return HttpResponse::InternalServerError().finish();
        }
    }
    HttpResponse::NoContent().finish()
}
