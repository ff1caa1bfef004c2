//! The states of a call's two links, as enums so that impossible combinations (a session that
//! is open but was never authorised, audio flowing before `start`) cannot be represented.

use std::time::Instant;

use crate::twilio::ids::{CallSid, StreamSid};

/// The agent (OpenAI Realtime) connection.
///
/// ```text
/// Preconnecting ──transport──▶ Preconnected ──start──▶ Opening ──opened──▶ AwaitingContext ──context──▶ Ready
///       │                                               ▲
///       └──────start──────▶ Authorised ──transport──────┘
/// any state ──failure──▶ Failed / Closed
/// ```
/// The transport (TCP, TLS) is prepared while we wait for Twilio's `start`; the authenticated
/// upgrade, which creates a billed session, goes out only once `start` has been checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentLink {
    /// The transport is being prepared; `start` has not been checked yet.
    Preconnecting,
    /// The transport is ready; waiting for `start` before sending any credentials.
    Preconnected,
    /// `start` was checked; the transport is still being prepared.
    Authorised,
    /// The authenticated upgrade is in flight.
    Opening,
    /// The session is open but not configured: the call's context has not been read yet.
    AwaitingContext,
    /// Configured: caller audio flows straight to the session.
    Ready,
    /// The session ended (closed, broken, or refused a frame).
    Closed,
    /// The session could not be reached or opened.
    Failed,
}

/// The media (Twilio) leg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MediaLink {
    /// The socket is open; Twilio's `start` has not arrived (or was refused).
    AwaitingStart,
    /// `start` was checked: this is the call it names.
    Streaming {
        call_sid: CallSid,
        stream_sid: StreamSid,
        started_at: Instant,
    },
}
