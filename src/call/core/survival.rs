//! Keeping the call when its OpenAI session is lost mid-call (a dropped socket, a transient
//! failure, OpenAI's session cap): the caller stays on the line while a fresh session is
//! dialled with the same agent settings, briefed with the call's instructions and context, and
//! re-seeded with what was said so far; the caller's audio meanwhile is held (bounded, as while
//! the first session opened) and sent on in order. Only after every attempt failed does the
//! call end with the apology.

use std::time::{Duration, Instant};

use super::{Action, CallCore};
use crate::call::leg::MediaLeg;
use crate::call::link::{AgentLink, MediaLink};
use crate::call::transcript::Speaker;
use crate::openai::events;

/// When each attempt is dialled, after the loss or the previous attempt's failure.
const ATTEMPT_DELAYS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_secs(2),
];

/// The newest whole transcript lines, up to this many characters, re-seed a fresh session.
const MAX_RESEED_CHARS: usize = 8000;

#[derive(Debug)]
pub(super) struct Reconnect {
    /// Attempts dialled so far.
    attempts: usize,
    /// When the next attempt is dialled; `None` while one is in flight.
    dial_at: Option<Instant>,
    lost_at: Instant,
}

impl<L: MediaLeg> CallCore<L> {
    /// The session is gone. Returns `false` when the call cannot be kept (it never got going,
    /// or every attempt failed): the caller then ends it.
    pub(super) fn agent_lost(&mut self, why: &str, now: Instant) -> bool {
        let established = matches!(self.media, MediaLink::Streaming { .. })
            && (matches!(self.link, AgentLink::Ready) || self.reconnect.is_some());
        if !established {
            return false;
        }
        if self.reconnect.is_none() {
            tracing::warn!(
                reason = why,
                "the OpenAI session was lost mid-call: opening a new one"
            );
            self.reconnect = Some(Reconnect {
                attempts: 0,
                dial_at: None,
                lost_at: now,
            });
            // Answers to the lost session's function calls have nowhere to go: dropped, and
            // recorded as such, never sent twice.
            self.tools.clear();
            self.abandon_tool_requests(now);
        } else {
            tracing::warn!(reason = why, "a new OpenAI session could not be opened");
        }
        self.actions.push_back(Action::CloseAgent);
        self.link = AgentLink::Closed;
        self.schedule_attempt(now)
    }

    /// Delays count from when the session was lost or the last attempt failed (`now`).
    fn schedule_attempt(&mut self, now: Instant) -> bool {
        let Some(reconnect) = self.reconnect.as_mut() else {
            return false;
        };
        let Some(delay) = ATTEMPT_DELAYS.get(reconnect.attempts) else {
            self.metrics.agent_reconnect_failed.inc();
            self.reconnect = None;
            return false;
        };
        reconnect.attempts += 1;
        reconnect.dial_at = Some(now + *delay);
        true
    }

    pub(super) fn reconnect_deadline(&self) -> Option<Instant> {
        self.reconnect
            .as_ref()
            .and_then(|reconnect| reconnect.dial_at)
    }

    pub(super) fn reconnect_timer(&mut self, now: Instant) {
        let Some(reconnect) = self.reconnect.as_mut() else {
            return;
        };
        if reconnect.dial_at.is_some_and(|at| now >= at) {
            reconnect.dial_at = None;
            self.link = AgentLink::Authorised;
            self.actions.push_back(Action::PreconnectAgent);
        }
    }

    /// When the session in use is due for rollover; `None` once due (the switch then waits for
    /// a quiet moment, looked for after every input).
    pub(super) fn rollover_deadline(&self) -> Option<Instant> {
        let due = self.session_ready_at? + self.settings.session_rollover;
        (!self.rollover_waiting
            && self.reconnect.is_none()
            && matches!(self.link, AgentLink::Ready))
        .then_some(due)
    }

    /// Moves the call to a fresh session once the one in use is old enough and nothing is
    /// going on: no response running or asked for, no agent audio unplayed, the caller not
    /// speaking, no tool pending, the call not ending. Caller audio is held from that moment
    /// and goes to the new session only, so none reaches two sessions and none is lost.
    pub(super) fn roll_over_when_quiet(&mut self, now: Instant) {
        let Some(ready_at) = self.session_ready_at else {
            return;
        };
        let due = now >= ready_at + self.settings.session_rollover;
        let quiet = matches!(self.link, AgentLink::Ready)
            && !self.tools.is_response_active()
            && !self.tools.is_caller_speaking()
            && !self.tools.has_pending()
            && !self.playback.has_unplayed_audio()
            && !self.is_ending();
        if due && !quiet {
            // Due: from now on every input looks for the quiet moment; the timer need not.
            self.rollover_waiting = true;
        }
        if due && quiet {
            tracing::info!("the OpenAI session is due for rollover: moving to a new one");
            self.session_ready_at = None;
            self.rollover_waiting = false;
            if !self.agent_lost("rollover", now) {
                self.end(crate::metrics::EndReason::AgentFailed, now);
            }
        }
    }

    /// Whether the session now opening replaces a lost one.
    pub(super) fn is_reconnecting(&self) -> bool {
        self.reconnect.is_some()
    }

    /// Configures the fresh session like the first (the call's instructions, context), without
    /// a second greeting, then re-seeds it with the conversation so far and sends the caller's
    /// held audio.
    pub(super) fn configure_reconnected(&mut self, now: Instant) {
        let Some(reconnect) = self.reconnect.take() else {
            return;
        };
        let update = events::session_update(&self.agent, &self.instructions);
        self.actions.push_back(Action::ToAgent(update));
        for message in &self.system_messages {
            self.actions
                .push_back(Action::ToAgent(events::system_message(message)));
        }
        for item in self.reseed_items() {
            self.actions.push_back(Action::ToAgent(item));
        }
        self.flush_early_audio();
        self.link = AgentLink::Ready;
        self.session_ready_at = Some(now);
        self.metrics.agent_reconnected.inc();
        let gap = now.saturating_duration_since(reconnect.lost_at);
        tracing::info!(
            attempt = reconnect.attempts,
            gap_ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX),
            "a new OpenAI session took over the call"
        );
        self.record_event(
            "agent_reconnected",
            &format!("attempt {}", reconnect.attempts),
            Some(format!("{} ms without a session", gap.as_millis())),
            now,
        );
    }

    /// The newest whole lines totalling at most `MAX_RESEED_CHARS`, oldest first: caller lines
    /// as user text, agent lines as the caller heard them.
    fn reseed_items(&self) -> Vec<String> {
        let mut total = 0;
        let mut newest_first = Vec::new();
        for line in self.transcript.iter().rev() {
            total += line.text.chars().count();
            if total > MAX_RESEED_CHARS {
                break;
            }
            newest_first.push(match line.speaker {
                Speaker::Caller => events::user_text(&line.text),
                Speaker::Agent => events::assistant_text(&line.text),
            });
        }
        newest_first.reverse();
        newest_first
    }
}
