//! The media leg seam: everything the call core knows about the caller's side of the call.
//!
//! The core speaks in terms of caller audio in, agent audio and playback marks out, and "end the
//! call this way". How those look on the wire (Twilio Media Streams JSON, its `mark`/`clear`
//! events, its WebSocket close codes) is the leg's business, so a second ingress would be one
//! more implementation of [`MediaLeg`], not a fork of the core.

use std::future::Future;

use crate::call::playback::MarkName;
use crate::metrics::EndReason;
use crate::twilio::media::{self, Inbound, InboundError};
use crate::twilio::rest::{RestError, TwilioRest};

/// The wire format of one media leg. The core owns a value of it for the call's lifetime.
pub trait MediaLeg {
    /// Reads one text frame, borrowing the audio payload from it.
    fn parse<'a>(&self, text: &'a str) -> Result<Inbound<'a>, InboundError>;
    /// The leg's stream identifier is known (from its `start`); later frames address it.
    fn started(&mut self, stream_id: &str);
    /// Agent audio for the caller, the base64 payload copied unchanged.
    fn audio(&self, payload: &str) -> String;
    /// A marker whose echo tells the core that the audio sent before it has played.
    fn mark(&self, mark: MarkName) -> String;
    /// Drops every piece of agent audio the leg still holds (barge-in).
    fn clear(&self) -> String;
    /// The WebSocket close code that ends the leg for `reason`.
    fn close_code(reason: EndReason) -> u16;
}

/// Twilio Media Streams: JSON text frames addressed by `streamSid`.
#[derive(Debug, Default)]
pub struct TwilioLeg {
    stream_sid: String,
}

impl MediaLeg for TwilioLeg {
    fn parse<'a>(&self, text: &'a str) -> Result<Inbound<'a>, InboundError> {
        media::parse(text)
    }

    fn started(&mut self, stream_id: &str) {
        stream_id.clone_into(&mut self.stream_sid);
    }

    fn audio(&self, payload: &str) -> String {
        media::media(&self.stream_sid, payload)
    }

    fn mark(&self, mark: MarkName) -> String {
        media::mark(&self.stream_sid, mark)
    }

    fn clear(&self) -> String {
        media::clear(&self.stream_sid)
    }

    /// Any code but a normal close hands the call to the TwiML after `<Connect>` (the apology);
    /// the distinct codes tell an operator reading Twilio's debugger what happened.
    fn close_code(reason: EndReason) -> u16 {
        match reason {
            // The call ended as planned (or moved on): a normal close, so no apology plays.
            EndReason::CallerHungUp
            | EndReason::AgentEnded
            | EndReason::Transferred
            | EndReason::MaxDuration
            | EndReason::Silence => 1000,
            EndReason::Unauthorized => 1008,
            EndReason::ProtocolError => 1002,
            EndReason::InvalidText => 1007,
            EndReason::FrameTooLarge => 1009,
            EndReason::Shutdown => 1012,
            EndReason::AgentFailed | EndReason::AgentUnreachable | EndReason::Timeout => 1011,
        }
    }
}

/// Control of a call outside its media stream: Twilio's REST API for Twilio calls.
pub trait CallControl {
    /// Ends the call. A call that has already ended counts as success.
    fn hang_up(&self, call_sid: &str) -> impl Future<Output = Result<(), RestError>>;
}

impl CallControl for TwilioRest {
    fn hang_up(&self, call_sid: &str) -> impl Future<Output = Result<(), RestError>> {
        TwilioRest::hang_up(self, call_sid)
    }
}
