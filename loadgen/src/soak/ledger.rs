//! What the harness and the fake Realtime server know about each call, shared between them
//! (they run in one process): the fake writes down every session it accepts or refuses and
//! when it closed, the harness when and how the call ended. The checks read it at the end.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::plan::{CallPlan, Ending, Scenario};

/// How long the fake holds the handshake of a `drop-mid-reconnect` call's new session: longer
/// than the call has left, so Twilio goes away while callbridge is still dialling.
pub const SLOW_HANDSHAKE: Duration = Duration::from_millis(600);

/// Who closed a session, as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closer {
    /// callbridge sent a WebSocket close.
    BridgeClose,
    /// callbridge's side of the TCP connection ended without a WebSocket close.
    BridgeEof,
    /// Reading failed (a reset, a protocol error).
    BridgeError(String),
    /// The fake reset it (an `openai-drop` style fault).
    Fake,
}

/// One session the fake accepted.
#[derive(Clone, Debug)]
pub struct SessionLog {
    pub opened: Instant,
    pub closed: Option<(Instant, Closer)>,
    /// Opened while its lane had no live call: dialled for a call that had already ended.
    pub late: bool,
    /// When the fake sent `session_expired` on it.
    pub expired_sent: Option<Instant>,
    /// Caller frames it received.
    pub frames: u64,
    /// Frames that carried another call's id.
    pub misrouted: u64,
}

/// What the fake does with a new upgrade for a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// Accept it, and break the session this long after it opened if `fault` says so.
    Accept(Option<Fault>),
    /// Refuse it (503), as an OpenAI that cannot be reached would.
    Refuse,
    /// Answer it only after `SLOW_HANDSHAKE`.
    Slow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Reset the TCP connection after this long.
    Reset(Duration),
    /// Send `session_expired` after this long.
    Expire(Duration),
}

/// How the harness saw its end of the call.
#[derive(Clone, Debug, Default)]
pub struct CallEnd {
    /// When the call ended: `stop` sent, the socket dropped, or callbridge closed the stream.
    pub at: Option<Instant>,
    pub ending: Option<Ending>,
}

#[derive(Debug, Default)]
pub struct CallState {
    pub sessions: Vec<SessionLog>,
    /// When the fake broke the first session.
    pub fault_at: Option<Instant>,
    pub refusals: u32,
    pub slow_handshakes: u32,
    pub end: CallEnd,
    /// Per caller frame (by its number), how many sessions received it.
    pub heard: Vec<u8>,
    /// When the harness sent the call's first frame (frame n went about n × 20 ms later).
    pub first_frame: Option<Instant>,
}

/// One call of the soak.
pub struct CallLog {
    pub plan: CallPlan,
    pub call_sid: String,
    pub lane: usize,
    state: Mutex<CallState>,
    /// Woken when the fake breaks the first session.
    pub faulted: Notify,
}

impl CallLog {
    pub fn new(plan: CallPlan, call_sid: String, lane: usize) -> Self {
        Self {
            plan,
            call_sid,
            lane,
            state: Mutex::new(CallState::default()),
            faulted: Notify::new(),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, CallState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The audio id the harness stamps on this call's frames.
    pub fn audio_id(&self) -> u16 {
        // Plans are numbered below 65536 (the command line's limit).
        u16::try_from(self.plan.index).unwrap_or(u16::MAX)
    }

    /// Decides what the fake does with a new session for this call: the first one is broken as
    /// the scenario says; after that, `refused` calls get no new session and
    /// `drop-mid-reconnect` calls a slow one.
    pub fn on_upgrade(&self) -> Upgrade {
        let mut state = self.state();
        let scenario = self.plan.scenario;
        if state.fault_at.is_none() {
            if !state.sessions.is_empty() || !scenario.breaks_first_session() {
                return Upgrade::Accept(None);
            }
            let after = self.plan.fault_after;
            return Upgrade::Accept(Some(if scenario == Scenario::Expired {
                Fault::Expire(after)
            } else {
                Fault::Reset(after)
            }));
        }
        match scenario {
            Scenario::Refused => {
                state.refusals += 1;
                Upgrade::Refuse
            }
            Scenario::DropMidReconnect => {
                state.slow_handshakes += 1;
                Upgrade::Slow
            }
            _ => Upgrade::Accept(None),
        }
    }

    /// A session was accepted; returns its number within the call.
    pub fn session_opened(&self, at: Instant, late: bool) -> usize {
        let mut state = self.state();
        state.sessions.push(SessionLog {
            opened: at,
            closed: None,
            late,
            expired_sent: None,
            frames: 0,
            misrouted: 0,
        });
        state.sessions.len() - 1
    }

    pub fn session_closed(&self, session: usize, at: Instant, closer: Closer) {
        if let Some(log) = self.state().sessions.get_mut(session)
            && log.closed.is_none()
        {
            log.closed = Some((at, closer));
        }
    }

    /// The fake broke the call's first session (`expired`: `session_expired` on `session`).
    pub fn fault(&self, session: usize, at: Instant, expired: bool) {
        {
            let mut state = self.state();
            state.fault_at.get_or_insert(at);
            if expired && let Some(log) = state.sessions.get_mut(session) {
                log.expired_sent = Some(at);
            }
        }
        self.faulted.notify_one();
    }

    pub fn frames(&self, session: usize, frames: u64, misrouted: u64) {
        if let Some(log) = self.state().sessions.get_mut(session) {
            log.frames += frames;
            log.misrouted += misrouted;
        }
    }

    /// A session received the call's frame `seq`.
    pub fn heard(&self, seq: u32) {
        let mut state = self.state();
        let Ok(seq) = usize::try_from(seq) else {
            return;
        };
        if state.heard.len() <= seq {
            state.heard.resize(seq + 1, 0);
        }
        state.heard[seq] = state.heard[seq].saturating_add(1);
    }

    pub fn talking_from(&self, at: Instant) {
        self.state().first_frame = Some(at);
    }

    pub fn ended(&self, at: Instant, ending: Ending) {
        let mut state = self.state();
        state.end = CallEnd {
            at: Some(at),
            ending: Some(ending),
        };
    }
}

#[derive(Default)]
struct Lane {
    /// The call now using the lane.
    current: Option<Arc<CallLog>>,
    /// The call that used it last, to which a session dialled after its end belongs.
    last: Option<Arc<CallLog>>,
}

/// The lanes and every call, for the fake to find a session's call and the checks to read.
pub struct Ledger {
    lanes: Vec<Mutex<Lane>>,
    /// Free lanes, the longest free first: a lane is reused as late as possible, so a session
    /// dialled after its call ended is not taken for the next call's.
    free: Mutex<VecDeque<usize>>,
    /// Sessions whose upgrade named no lane, or a lane no call ever used.
    strays: Mutex<Vec<SessionLog>>,
}

impl Ledger {
    pub fn new(lanes: usize) -> Self {
        Self {
            lanes: (0..lanes).map(|_| Mutex::new(Lane::default())).collect(),
            free: Mutex::new((0..lanes).collect()),
            strays: Mutex::new(Vec::new()),
        }
    }

    /// Takes a free lane for a new call, or `None` when every lane is busy.
    pub fn start_call(&self, plan: CallPlan, call_sid: String) -> Option<Arc<CallLog>> {
        let lane = lock(&self.free).pop_front()?;
        let call = Arc::new(CallLog::new(plan, call_sid, lane));
        lock(&self.lanes[lane]).current = Some(Arc::clone(&call));
        Some(call)
    }

    /// The call is over for the harness: its lane is free again.
    pub fn finish_call(&self, call: &CallLog) {
        let mut lane = lock(&self.lanes[call.lane]);
        lane.last = lane.current.take();
        drop(lane);
        lock(&self.free).push_back(call.lane);
    }

    /// The call a session on `lane` is for, and whether it was dialled after that call ended.
    pub fn call_on_lane(&self, lane: usize) -> Option<(Arc<CallLog>, bool)> {
        let lane = lock(self.lanes.get(lane)?);
        match (&lane.current, &lane.last) {
            (Some(call), _) => Some((Arc::clone(call), false)),
            (None, Some(call)) => Some((Arc::clone(call), true)),
            (None, None) => None,
        }
    }

    /// A session for no call of the soak was accepted; returns its number among those.
    pub fn stray_opened(&self, at: Instant) -> usize {
        let mut strays = lock(&self.strays);
        strays.push(SessionLog {
            opened: at,
            closed: None,
            late: false,
            expired_sent: None,
            frames: 0,
            misrouted: 0,
        });
        strays.len() - 1
    }

    pub fn stray_closed(&self, session: usize, at: Instant, closer: Closer, frames: u64) {
        if let Some(log) = lock(&self.strays).get_mut(session) {
            log.closed.get_or_insert((at, closer));
            log.frames += frames;
        }
    }

    pub fn strays(&self) -> Vec<SessionLog> {
        lock(&self.strays).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(index: usize, scenario: Scenario) -> CallPlan {
        CallPlan {
            index,
            scenario,
            ending: Ending::Stop,
            talk: Duration::from_secs(1),
            fault_after: Duration::from_millis(700),
        }
    }

    #[test]
    fn only_the_first_session_is_broken_and_then_refused_or_slowed_as_planned() {
        let now = Instant::now();
        let fault = Some(Fault::Reset(Duration::from_millis(700)));
        for (scenario, first, then) in [
            (Scenario::Stop, Upgrade::Accept(None), Upgrade::Accept(None)),
            (
                Scenario::OpenaiDrop,
                Upgrade::Accept(fault),
                Upgrade::Accept(None),
            ),
            (Scenario::Refused, Upgrade::Accept(fault), Upgrade::Refuse),
            (
                Scenario::DropMidReconnect,
                Upgrade::Accept(fault),
                Upgrade::Slow,
            ),
            (
                Scenario::Expired,
                Upgrade::Accept(Some(Fault::Expire(Duration::from_millis(700)))),
                Upgrade::Accept(None),
            ),
        ] {
            let call = CallLog::new(plan(1, scenario), "CA1".into(), 0);
            assert_eq!(call.on_upgrade(), first, "{scenario}");
            let session = call.session_opened(now, false);
            if first != Upgrade::Accept(None) {
                call.fault(session, now, scenario == Scenario::Expired);
            }
            assert_eq!(call.on_upgrade(), then, "{scenario}");
            assert_eq!(call.on_upgrade(), then, "{scenario}, again");
        }
        let refused = CallLog::new(plan(2, Scenario::Refused), "CA2".into(), 0);
        refused.on_upgrade();
        let session = refused.session_opened(now, false);
        refused.fault(session, now, false);
        refused.on_upgrade();
        refused.on_upgrade();
        assert_eq!(refused.state().refusals, 2);
    }

    #[test]
    fn a_lane_is_reused_last_and_a_late_session_belongs_to_its_last_call() {
        let ledger = Ledger::new(2);
        let first = ledger
            .start_call(plan(0, Scenario::Stop), "CA0".into())
            .unwrap();
        let second = ledger
            .start_call(plan(1, Scenario::Stop), "CA1".into())
            .unwrap();
        assert_eq!((first.lane, second.lane), (0, 1));
        assert!(
            ledger
                .start_call(plan(2, Scenario::Stop), "CA2".into())
                .is_none()
        );
        let (on_lane, late) = ledger.call_on_lane(0).unwrap();
        assert!(Arc::ptr_eq(&on_lane, &first) && !late);
        ledger.finish_call(&first);
        let (on_lane, late) = ledger.call_on_lane(0).unwrap();
        assert!(Arc::ptr_eq(&on_lane, &first) && late);
        ledger.finish_call(&second);
        let third = ledger
            .start_call(plan(2, Scenario::Stop), "CA2".into())
            .unwrap();
        assert_eq!(third.lane, 0, "the lane free the longest");
        assert!(ledger.call_on_lane(5).is_none());
    }
}
