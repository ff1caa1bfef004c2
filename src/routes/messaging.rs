//! `POST /messaging`: the WhatsApp sender's messaging webhook, where Twilio posts the user's
//! answer to a call-permission request (`ButtonPayload=ACCEPTED|REJECTED`).

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use crate::domain::phone::{CallParty, Masked};
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
}

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
    let Ok(user) = CallParty::parse(&message.from) else {
        tracing::warn!(from = %Masked(&message.from), "a permission reply from an address that is not a phone number");
        return HttpResponse::NoContent().finish();
    };
    let now = state.clock.now_ms();
    match state
        .store
        .record_permission_reply(user.number.as_str(), &message.message_sid, reply, now)
        .await
    {
        Ok(new) => {
            tracing::info!(from = %Masked(user.number.as_str()), ?reply, duplicate = !new, "call permission answered");
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
