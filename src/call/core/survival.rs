//! Keeping the call when its OpenAI session is lost mid-call (a dropped socket, a transient
//! failure, OpenAI's session cap): the caller stays on the line while a fresh session is
//! dialled with the same agent settings, briefed with the call's instructions and context, and
//! re-seeded with what was said so far; the caller's audio meanwhile is held (bounded, as while
//! the first session opened) and sent on in order. Only after every attempt failed does the
//! call end with the apology.
//!
//! Rollover, before OpenAI's cap on a session's age: the successor is dialled and configured
//! beside the session in use, and takes over at a quiet moment, so the switch costs no
//! handshake and the caller hears no gap.

use std::time::{Duration, Instant};

use super::{Action, CallCore};
use crate::call::leg::MediaLeg;
use crate::call::link::{AgentLink, MediaLink};
use crate::call::transcript::Speaker;
use crate::openai::events::{self, ErrorSeverity, ServerEvent};

/// When each attempt is dialled, after the loss or the previous attempt's failure.
const ATTEMPT_DELAYS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_secs(2),
];

/// After the caller stops speaking the session normally answers; a rollover waits this long
/// for that answer to start, so the caller's question is not left in the old session.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

/// The newest whole transcript lines, up to this many characters, re-seed a fresh session.
const MAX_RESEED_CHARS: usize = 8000;

/// The session a rollover prepares to replace the one in use.
#[derive(Debug, Default)]
pub(super) enum Standby {
    /// None is needed yet.
    #[default]
    Idle,
    /// Being dialled (transport and authenticated upgrade in one go); `attempts` so far.
    Dialling { attempts: usize },
    /// Open and configured, waiting for a quiet moment to take over.
    Open {
        attempts: usize,
        session_id: Option<String>,
    },
    /// The last attempt failed; the next one is dialled `at`.
    Retrying { attempts: usize, at: Instant },
    /// Every attempt failed: the session in use runs on.
    GaveUp,
}

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
            // Answers to the lost session's function calls have nowhere to go: dropped, and
            // recorded as such, never sent twice.
            self.tools.clear();
            self.abandon_tool_requests(now);
            if matches!(self.standby, Standby::Open { .. }) {
                tracing::warn!(
                    reason = why,
                    "the OpenAI session was lost mid-call: its prepared successor takes over"
                );
                self.promote_standby(now);
                self.metrics.agent_reconnected.inc();
                self.record_event(
                    "agent_reconnected",
                    "prepared successor",
                    Some("0 ms without a session".to_owned()),
                    now,
                );
                return true;
            }
            if !matches!(self.standby, Standby::Idle) {
                self.actions.push_back(Action::CloseStandby);
                self.standby = Standby::Idle;
            }
            tracing::warn!(
                reason = why,
                "the OpenAI session was lost mid-call: opening a new one"
            );
            self.reconnect = Some(Reconnect {
                attempts: 0,
                dial_at: None,
                lost_at: now,
            });
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

    /// When the rollover next needs the timer: the session in use coming of age, or the next
    /// attempt at preparing its successor.
    pub(super) fn rollover_deadline(&self) -> Option<Instant> {
        if self.reconnect.is_some() || !matches!(self.link, AgentLink::Ready) {
            return None;
        }
        match self.standby {
            Standby::Idle => Some(self.session_ready_at? + self.settings.session_rollover),
            Standby::Retrying { at, .. } => Some(at),
            Standby::Dialling { .. } | Standby::Open { .. } | Standby::GaveUp => None,
        }
    }

    /// Starts preparing the successor once the session in use is old enough, or when a failed
    /// preparation is due for another attempt. The old session carries the call meanwhile.
    pub(super) fn rollover_timer(&mut self, now: Instant) {
        if self.rollover_deadline().is_none_or(|due| now < due) {
            return;
        }
        let attempts = match self.standby {
            Standby::Idle => {
                tracing::info!("the OpenAI session is due for rollover: preparing its successor");
                0
            }
            Standby::Retrying { attempts, .. } => attempts,
            Standby::Dialling { .. } | Standby::Open { .. } | Standby::GaveUp => return,
        };
        self.standby = Standby::Dialling {
            attempts: attempts + 1,
        };
        self.actions.push_back(Action::DialStandby {
            model: self.agent.model.clone(),
        });
    }

    /// The successor is open: it is configured now, like the session it will replace, so that
    /// the switch itself costs nothing but the re-seed.
    pub(super) fn on_standby_opened(&mut self) {
        let Standby::Dialling { attempts } = self.standby else {
            return;
        };
        self.standby = Standby::Open {
            attempts,
            session_id: None,
        };
        let update = events::session_update(&self.agent, &self.instructions);
        self.actions.push_back(Action::ToStandby(update));
        for message in &self.system_messages {
            self.actions
                .push_back(Action::ToStandby(events::system_message(message)));
        }
    }

    /// What the successor says before it takes over: only its id and its errors matter.
    pub(super) fn on_standby_text(&mut self, text: &str, now: Instant) {
        let event = match events::parse_server_event(text) {
            Ok(event) => event,
            Err(error) => {
                self.malformed_from_agent(&error.to_string());
                return;
            }
        };
        match event {
            ServerEvent::SessionCreated {
                session_id: created,
            } => {
                if let Standby::Open { session_id, .. } = &mut self.standby {
                    *session_id = created;
                }
            }
            ServerEvent::Error(error) if !matches!(error.severity(), ErrorSeverity::Benign) => {
                self.metrics.openai_errors.inc();
                let code = error.code.as_deref().unwrap_or("");
                tracing::warn!(code, message = %error.message, "the successor session reported an error");
                self.actions.push_back(Action::CloseStandby);
                self.standby_failed(now);
            }
            _ => {}
        }
    }

    /// The successor could not be opened, or broke before it took over. The session in use is
    /// still fine: try again a little later, and after the last attempt let it run on; if it
    /// then hits OpenAI's cap, the call reconnects as after any loss.
    pub(super) fn standby_failed(&mut self, now: Instant) {
        let attempts = match self.standby {
            Standby::Dialling { attempts } | Standby::Open { attempts, .. } => attempts,
            Standby::Idle | Standby::Retrying { .. } | Standby::GaveUp => return,
        };
        if let Some(delay) = ATTEMPT_DELAYS.get(attempts) {
            tracing::warn!(
                attempt = attempts,
                "the successor session failed: trying again"
            );
            self.standby = Standby::Retrying {
                attempts,
                at: now + *delay,
            };
        } else {
            tracing::warn!("no successor session could be prepared: the session in use runs on");
            self.metrics.session_rollover_failed.inc();
            self.standby = Standby::GaveUp;
        }
    }

    /// Hands the call to the prepared successor at the first moment nothing is going on: no
    /// response running or asked for, no agent audio unplayed, the caller not speaking, no tool
    /// pending, the call not ending. Caller audio goes to the old session up to this action
    /// and to the new one from it, so none reaches two sessions and none is lost.
    pub(super) fn roll_over_when_quiet(&mut self, now: Instant) {
        if !matches!(self.standby, Standby::Open { .. }) {
            return;
        }
        let quiet = self.nothing_going_on()
            && self
                .answer_awaited_since
                .is_none_or(|since| now >= since + ANSWER_WAIT)
            && !self.is_ending();
        if quiet {
            tracing::info!("rolling the call over to its successor session");
            self.promote_standby(now);
            self.metrics.session_rolled_over.inc();
            self.record_event("session_rollover", "switched", None, now);
        }
    }

    /// The successor becomes the session in use: the driver closes the old socket, and the
    /// conversation so far is re-seeded before anything else reaches the new one.
    fn promote_standby(&mut self, now: Instant) {
        let Standby::Open { session_id, .. } = std::mem::take(&mut self.standby) else {
            return;
        };
        self.actions.push_back(Action::PromoteStandby);
        for item in self.reseed_items() {
            self.actions.push_back(Action::ToAgent(item));
        }
        if session_id.is_some() {
            self.session_id = session_id;
        }
        self.link = AgentLink::Ready;
        self.agent_seen = now;
        self.session_ready_at = Some(now);
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
        self.standby = Standby::Idle;
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
