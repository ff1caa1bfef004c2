//! How a call ends: one policy for every path, so the close code, the apology, the REST
//! hang-up and the release of the call's slot are decided in one place.
//!
//! - A caller who hung up, a refused stream, a broken socket: the stream is closed, nothing
//!   else (Twilio already ended the call, or there was no call of ours).
//! - The agent failed or went silent: closing the stream with an error code hands the call to
//!   the TwiML after `<Connect>`, which apologises and hangs up. If that TwiML was changed, or
//!   Twilio keeps the line open, a REST hang-up after the apology's grace ends it for sure.
//! - A deploy (drain timeout) is no failure, nor is an agent ending the call (`end_call`, its
//!   time limit, silence): the call is hung up through Twilio first, so that closing the stream
//!   does not start the apology.
//! - A transfer: Twilio has moved the call on; the stream is closed, nothing else.
//!
//! The call's slot is held until the plan has been carried out completely: a drain waits for
//! every slot, so nothing is cut off halfway.

use std::time::Duration;

use tokio::time::Instant;

use crate::call::leg::CallControl;
use crate::metrics::EndReason;
use crate::twilio::ids::CallSid;
use crate::twilio::rest::RestError;

/// Backoff between REST hang-up attempts; a transient Twilio or network error gets retried.
const HANG_UP_RETRY_DELAYS: [Duration; 2] = [Duration::from_millis(250), Duration::from_secs(1)];

/// When the call must be ended through Twilio's REST API as well as by closing the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestHangUp {
    /// Closing the stream is enough.
    Never,
    /// Before closing the stream, so the apology after `</Connect>` does not play.
    BeforeClosing,
    /// After the apology had time to play.
    AfterApology,
}

/// The core's verdict on how to end a call, carried out by the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndPlan {
    pub reason: EndReason,
    /// The call to hang up, when the stream got as far as a checked `start`.
    pub call_sid: Option<CallSid>,
    /// The WebSocket close code for the media leg.
    pub close_code: u16,
    pub rest_hang_up: RestHangUp,
}

impl EndPlan {
    pub fn new(reason: EndReason, call_sid: Option<CallSid>, close_code: u16) -> Self {
        let rest_hang_up = match reason {
            // Without a checked `start` there is no call of ours to hang up.
            _ if call_sid.is_none() => RestHangUp::Never,
            // Hung up through Twilio before the stream closes, so the apology after
            // `</Connect>` never plays: the agent meant to end the call.
            EndReason::Shutdown
            | EndReason::AgentEnded
            | EndReason::MaxDuration
            | EndReason::Silence => RestHangUp::BeforeClosing,
            EndReason::AgentFailed | EndReason::AgentUnreachable | EndReason::Timeout => {
                RestHangUp::AfterApology
            }
            // Twilio moved the call to the transfer's `<Dial>`: it is no longer ours to end.
            EndReason::CallerHungUp
            | EndReason::Transferred
            | EndReason::Unauthorized
            | EndReason::ProtocolError
            | EndReason::InvalidText
            | EndReason::FrameTooLarge => RestHangUp::Never,
        };
        Self {
            reason,
            call_sid,
            close_code,
            rest_hang_up,
        }
    }
}

/// How long each REST step of an ending may take.
#[derive(Clone, Copy, Debug)]
pub struct EndingTimes {
    /// How long closing the OpenAI socket may take once the call is over.
    pub agent_close_timeout: Duration,
    /// Long enough for the apology after `</Connect>` to be heard.
    pub apology_grace: Duration,
    /// How long a planned ending waits for Twilio to confirm its hang-up before closing the
    /// stream anyway.
    pub hang_up_timeout: Duration,
}

impl Default for EndingTimes {
    fn default() -> Self {
        Self {
            agent_close_timeout: Duration::from_millis(500),
            apology_grace: Duration::from_secs(10),
            hang_up_timeout: Duration::from_secs(3),
        }
    }
}

/// The hang-up that must happen before the stream is closed, if the plan has one.
pub async fn hang_up_before_closing(
    plan: &EndPlan,
    control: &impl CallControl,
    times: EndingTimes,
) {
    if plan.rest_hang_up != RestHangUp::BeforeClosing {
        return;
    }
    let Some(call_sid) = &plan.call_sid else {
        return;
    };
    let deadline = Instant::now() + times.hang_up_timeout;
    match tokio::time::timeout_at(deadline, hang_up_with_retries(control, call_sid.as_str())).await
    {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, reason = plan.reason.label(), "cannot hang the call up through Twilio before closing the stream")
        }
        Err(_) => tracing::warn!(
            reason = plan.reason.label(),
            "Twilio did not confirm the hang-up in time; closing the stream"
        ),
    }
}

/// The hang-up that makes sure a failed call ends once its apology has played.
pub async fn hang_up_after_apology(plan: &EndPlan, control: &impl CallControl, times: EndingTimes) {
    if plan.rest_hang_up != RestHangUp::AfterApology {
        return;
    }
    let Some(call_sid) = &plan.call_sid else {
        return;
    };
    tokio::time::sleep(times.apology_grace).await;
    if let Err(error) = hang_up_with_retries(control, call_sid.as_str()).await {
        tracing::warn!(%error, "cannot hang the call up through Twilio's REST API");
    }
}

/// Twilio's answer is final when it is one: only a network failure, a timeout or a 5xx is
/// worth asking again.
async fn hang_up_with_retries(control: &impl CallControl, call_sid: &str) -> Result<(), RestError> {
    let mut delays = HANG_UP_RETRY_DELAYS.iter();
    loop {
        match control.hang_up(call_sid).await {
            Ok(()) => return Ok(()),
            Err(error) if is_transient(&error) => match delays.next() {
                Some(delay) => {
                    tracing::debug!(%error, ?delay, "retrying the REST hang-up");
                    tokio::time::sleep(*delay).await;
                }
                None => return Err(error),
            },
            Err(error) => return Err(error),
        }
    }
}

fn is_transient(error: &RestError) -> bool {
    match error {
        RestError::Network(_) | RestError::Timeout(_) => true,
        RestError::Api { status, .. } | RestError::Unexpected { status } => *status >= 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_has_one_way_to_end() {
        let sid = || CallSid::parse("CA0123456789abcdef0123456789abcdef").ok();
        let plan = |reason| EndPlan::new(reason, sid(), 1000).rest_hang_up;
        for reason in [
            EndReason::Shutdown,
            EndReason::AgentEnded,
            EndReason::MaxDuration,
            EndReason::Silence,
        ] {
            assert_eq!(plan(reason), RestHangUp::BeforeClosing, "{reason:?}");
        }
        for reason in [
            EndReason::AgentFailed,
            EndReason::AgentUnreachable,
            EndReason::Timeout,
        ] {
            assert_eq!(plan(reason), RestHangUp::AfterApology, "{reason:?}");
        }
        for reason in [
            EndReason::CallerHungUp,
            EndReason::Transferred,
            EndReason::Unauthorized,
            EndReason::ProtocolError,
            EndReason::InvalidText,
            EndReason::FrameTooLarge,
        ] {
            assert_eq!(plan(reason), RestHangUp::Never, "{reason:?}");
        }
        // Without a checked `start` there is no call of ours to hang up.
        for reason in EndReason::ALL {
            assert_eq!(
                EndPlan::new(reason, None, 1011).rest_hang_up,
                RestHangUp::Never
            );
        }
    }

    #[test]
    fn only_transient_rest_errors_are_retried() {
        assert!(is_transient(&RestError::Network("reset".into())));
        assert!(is_transient(&RestError::Timeout(Duration::from_secs(1))));
        assert!(is_transient(&RestError::Unexpected { status: 503 }));
        assert!(!is_transient(&RestError::Unexpected { status: 401 }));
        assert!(!is_transient(&RestError::Api {
            status: 400,
            code: 21220,
            message: "not in progress".into(),
            more_info: None,
        }));
    }
}
