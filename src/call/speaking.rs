//! Who is speaking on each call this machine carries, for the dashboard.
//!
//! The database records what was said, not who is talking right now: writing every change of
//! turn would cost a write per turn on every call for a picture only an operator watching looks
//! at. So each driver publishes its call's state here, in memory, when it changes, and the
//! dashboard reads it for the calls this machine carries. A call carried by another machine
//! (several machines on one Postgres) has no entry: the dashboard shows it as not known.

use std::collections::HashMap;
use std::sync::Mutex;

/// Who is making sound on a call at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Speaking {
    /// The caller's turn has started (OpenAI's voice activity detection) and not yet stopped.
    pub caller: bool,
    /// Agent audio sent to Twilio has not all been played to the caller yet.
    pub agent: bool,
}

impl Speaking {
    pub fn label(self) -> &'static str {
        match (self.caller, self.agent) {
            (true, true) => "both",
            (true, false) => "caller",
            (false, true) => "agent",
            (false, false) => "nobody",
        }
    }
}

/// The live calls of this machine, by CallSid.
#[derive(Debug, Default)]
pub struct SpeakingBoard(Mutex<HashMap<String, Speaking>>);

impl SpeakingBoard {
    pub fn get(&self, call_sid: &str) -> Option<Speaking> {
        self.lock().get(call_sid).copied()
    }

    fn set(&self, call_sid: &str, speaking: Speaking) {
        self.lock().insert(call_sid.to_owned(), speaking);
    }

    fn remove(&self, call_sid: &str) {
        self.lock().remove(call_sid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Speaking>> {
        // A panic elsewhere while holding the lock leaves the map as it was: still usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One call's entry on the board: written only when the state changes (the board is locked a
/// few times per turn, never per frame), and removed when the call's driver ends, even by a
/// panic.
pub struct Presence<'a> {
    board: &'a SpeakingBoard,
    call_sid: Option<String>,
    last: Speaking,
}

impl<'a> Presence<'a> {
    pub fn new(board: &'a SpeakingBoard) -> Self {
        Self {
            board,
            call_sid: None,
            last: Speaking::default(),
        }
    }

    /// The call's state after a round of the driver; `call_sid` is `None` until `start`.
    pub fn update(&mut self, call_sid: Option<&str>, speaking: Speaking) {
        let Some(call_sid) = call_sid else {
            return;
        };
        if self.call_sid.as_deref() != Some(call_sid) {
            if let Some(previous) = self.call_sid.take() {
                self.board.remove(&previous);
            }
            self.call_sid = Some(call_sid.to_owned());
            self.board.set(call_sid, speaking);
        } else if speaking != self.last {
            self.board.set(call_sid, speaking);
        }
        self.last = speaking;
    }
}

impl Drop for Presence<'_> {
    fn drop(&mut self) {
        if let Some(call_sid) = &self.call_sid {
            self.board.remove(call_sid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_appears_at_start_follows_its_turns_and_leaves_when_its_driver_ends() {
        let board = SpeakingBoard::default();
        let mut presence = Presence::new(&board);
        presence.update(None, Speaking::default());
        assert_eq!(board.lock().len(), 0, "no entry before start");
        presence.update(Some("CA1"), Speaking::default());
        assert_eq!(board.get("CA1").map(Speaking::label), Some("nobody"));
        let caller = Speaking {
            caller: true,
            agent: false,
        };
        presence.update(Some("CA1"), caller);
        assert_eq!(board.get("CA1"), Some(caller));
        presence.update(Some("CA1"), Speaking::default());
        assert_eq!(board.get("CA1").map(Speaking::label), Some("nobody"));
        drop(presence);
        assert_eq!(board.get("CA1"), None);
    }

    #[test]
    fn labels() {
        let both = Speaking {
            caller: true,
            agent: true,
        };
        let agent = Speaking {
            caller: false,
            agent: true,
        };
        assert_eq!(both.label(), "both");
        assert_eq!(agent.label(), "agent");
    }
}
