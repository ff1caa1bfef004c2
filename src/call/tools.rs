//! The ordering rules of function calls, as a ledger the call core consults.
//!
//! OpenAI rejects a `response.create` while a response is active, and a tool's output is only
//! useful once the response that asked for it is over. So outputs are held per *round* (the
//! function calls of one response) until every call of the round has its result, the
//! response's `response.done` has arrived and no other response is running (one that started
//! meanwhile could not read them); then they go out together, followed by exactly one
//! `response.create`, unless the caller is speaking (the VAD's own response will read them).
//!
//! A slow tool must not leave dead air: if a round's results are not in 1.2 s after its first
//! request and nothing is being said, the agent is asked for one short holding sentence
//! (`tool_choice:"none"`, so it cannot call the tool again), and the round's outputs wait for
//! that response to finish.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How long a tool may take before the agent says a holding sentence.
pub const HOLDING_AFTER: Duration = Duration::from_millis(1200);

/// What the agent is asked to say while a tool is slow.
pub const HOLDING_INSTRUCTIONS: &str = "A tool you called is still working. Tell the caller in \
one short sentence that you are checking and it will take a moment. Do not answer the question yet.";

/// Remembered call ids; a call makes few tool calls, but the set must not grow without end.
const MAX_REMEMBERED_CALLS: usize = 4096;

/// What the core sends the agent when a round is complete.
#[derive(Debug, PartialEq, Eq)]
pub struct Release {
    /// `(call_id, output)` in the order the calls were made.
    pub outputs: Vec<(String, String)>,
    /// Whether to follow the outputs with `response.create`.
    pub respond: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Holding {
    /// No holding sentence was asked for in this round.
    NotAsked,
    /// Asked for; its `response.created` has not arrived.
    Requested,
    /// The holding response is being spoken.
    Speaking(String),
    /// Said; it is over.
    Said,
}

#[derive(Debug)]
struct PendingCall {
    call_id: String,
    output: Option<String>,
    /// `false` for a call whose effect makes a new response pointless (the call is ending).
    wants_response: bool,
}

#[derive(Debug)]
struct Round {
    response_id: String,
    response_done: bool,
    calls: Vec<PendingCall>,
    first_request_at: Instant,
    holding: Holding,
}

impl Round {
    fn is_complete(&self) -> bool {
        self.response_done
            && self.calls.iter().all(|call| call.output.is_some())
            && matches!(self.holding, Holding::NotAsked | Holding::Said)
    }

    /// Results are outstanding, the tool's own response is over and no holding sentence was
    /// said yet in this round.
    fn may_hold(&self) -> bool {
        self.holding == Holding::NotAsked
            && self.response_done
            && self.calls.iter().any(|call| call.output.is_none())
    }
}

/// The function calls of one agent session.
#[derive(Debug, Default)]
pub struct ToolLedger {
    seen: HashSet<String>,
    rounds: Vec<Round>,
    active_response: Option<String>,
    /// A `response.create` was sent and its `response.created` has not arrived: a second one
    /// now would be refused.
    response_requested: bool,
    caller_speaking: bool,
}

impl ToolLedger {
    /// Registers a function call; `false` when its `call_id` was seen before (OpenAI reports
    /// each call twice, in `function_call_arguments.done` and in `output_item.done`).
    pub fn add_call(&mut self, response_id: &str, call_id: &str, now: Instant) -> bool {
        if self.seen.contains(call_id) {
            return false;
        }
        if self.seen.len() >= MAX_REMEMBERED_CALLS {
            self.seen.clear();
        }
        self.seen.insert(call_id.to_owned());
        let call = PendingCall {
            call_id: call_id.to_owned(),
            output: None,
            wants_response: true,
        };
        match self
            .rounds
            .iter_mut()
            .find(|round| round.response_id == response_id)
        {
            Some(round) => round.calls.push(call),
            None => self.rounds.push(Round {
                response_id: response_id.to_owned(),
                // Every output item of a response is reported before its `response.done`.
                response_done: false,
                calls: vec![call],
                first_request_at: now,
                holding: Holding::NotAsked,
            }),
        }
        true
    }

    /// The result of a call; `wants_response` is `false` when no new response should follow
    /// because of it.
    pub fn set_output(&mut self, call_id: &str, output: String, wants_response: bool) {
        if let Some(call) = self
            .rounds
            .iter_mut()
            .flat_map(|round| round.calls.iter_mut())
            .find(|call| call.call_id == call_id && call.output.is_none())
        {
            call.output = Some(output);
            call.wants_response = wants_response;
        }
    }

    /// A call that will get no output at all (a transfer that succeeded: the call is leaving).
    pub fn withdraw(&mut self, call_id: &str) {
        for round in &mut self.rounds {
            round.calls.retain(|call| call.call_id != call_id);
        }
        self.rounds.retain(|round| {
            !round.calls.is_empty() || matches!(round.holding, Holding::Speaking(_))
        });
    }

    /// The core sent a `response.create` of its own (greeting, keypress, check-in, farewell).
    pub fn note_response_requested(&mut self) {
        self.response_requested = true;
    }

    /// OpenAI reported an error, perhaps refusing a `response.create` (one was already
    /// active, say): none is counted as pending any more, so a refused request cannot block
    /// every later one. At worst the next request meets a running response and is refused too.
    pub fn response_refused(&mut self) {
        self.response_requested = false;
        // A refused holding sentence is not retried: its round goes on without it.
        for round in &mut self.rounds {
            if round.holding == Holding::Requested {
                round.holding = Holding::Said;
            }
        }
    }

    pub fn response_created(&mut self, response_id: &str) {
        self.active_response = Some(response_id.to_owned());
        self.response_requested = false;
        if let Some(round) = self
            .rounds
            .iter_mut()
            .find(|round| round.holding == Holding::Requested)
        {
            round.holding = Holding::Speaking(response_id.to_owned());
        }
    }

    pub fn response_done(&mut self, response_id: &str) {
        if self.active_response.as_deref() == Some(response_id) {
            self.active_response = None;
        }
        for round in &mut self.rounds {
            if round.response_id == response_id {
                round.response_done = true;
            }
            if round.holding == Holding::Speaking(response_id.to_owned()) {
                round.holding = Holding::Said;
            }
        }
    }

    pub fn speech_started(&mut self) {
        self.caller_speaking = true;
    }

    pub fn speech_stopped(&mut self) {
        self.caller_speaking = false;
    }

    /// Whether a response is running or about to: nothing else may ask for one.
    pub fn is_response_active(&self) -> bool {
        self.active_response.is_some() || self.response_requested
    }

    pub fn is_caller_speaking(&self) -> bool {
        self.caller_speaking
    }

    /// Whether any function call is still waiting for its result or its turn.
    pub fn has_pending(&self) -> bool {
        !self.rounds.is_empty()
    }

    /// The next complete round's outputs, oldest round first. `may_respond` is `false` while
    /// the call is on its way out: the outputs still go, but nothing new is said.
    pub fn release(&mut self, may_respond: bool) -> Option<Release> {
        // A response running or already asked for could not read outputs sent now, and a second
        // `response.create` would be refused: they wait for it to finish.
        if self.is_response_active() {
            return None;
        }
        let index = self.rounds.iter().position(Round::is_complete)?;
        let round = self.rounds.remove(index);
        let wants_response = round.calls.iter().all(|call| call.wants_response);
        let outputs: Vec<(String, String)> = round
            .calls
            .into_iter()
            .filter_map(|call| Some((call.call_id, call.output?)))
            .collect();
        let respond = may_respond
            && wants_response
            && !outputs.is_empty()
            && !self.caller_speaking
            && !self.is_response_active();
        self.response_requested |= respond;
        Some(Release { outputs, respond })
    }

    /// When a holding sentence will be due if nothing changes meanwhile (any change is an
    /// input, after which this is asked again).
    pub fn holding_due_at(&self) -> Option<Instant> {
        if self.is_response_active() || self.caller_speaking {
            return None;
        }
        self.rounds
            .iter()
            .filter(|round| round.may_hold())
            .map(|round| round.first_request_at + HOLDING_AFTER)
            .min()
    }

    /// Whether to ask for a holding sentence now: a round's results are late, it has not had
    /// one, and nobody is speaking. Marks the round as having asked.
    pub fn take_holding_due(&mut self, now: Instant) -> bool {
        if self.is_response_active() || self.caller_speaking {
            return false;
        }
        let Some(round) = self
            .rounds
            .iter_mut()
            .find(|round| round.may_hold() && now >= round.first_request_at + HOLDING_AFTER)
        else {
            return false;
        };
        round.holding = Holding::Requested;
        self.response_requested = true;
        true
    }

    /// The session is gone (the call is ending): nothing held can be sent any more.
    pub fn clear(&mut self) {
        self.rounds.clear();
        self.active_response = None;
        self.response_requested = false;
        self.caller_speaking = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger_with_call(response: &str, call: &str, at: Instant) -> ToolLedger {
        let mut ledger = ToolLedger::default();
        ledger.response_created(response);
        assert!(ledger.add_call(response, call, at));
        ledger
    }

    #[test]
    fn outputs_wait_for_the_response_to_finish_then_one_response_follows() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        ledger.set_output("call_1", "{\"ok\":1}".into(), true);
        assert_eq!(ledger.release(true), None, "response.done has not arrived");
        ledger.response_done("resp_1");
        assert_eq!(
            ledger.release(true),
            Some(Release {
                outputs: vec![("call_1".into(), "{\"ok\":1}".into())],
                respond: true
            })
        );
        assert_eq!(ledger.release(true), None);
        assert!(!ledger.has_pending());
    }

    #[test]
    fn two_calls_of_one_response_go_out_together_in_order() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_a", t0);
        assert!(ledger.add_call("resp_1", "call_b", t0));
        ledger.response_done("resp_1");
        ledger.set_output("call_b", "b".into(), true);
        assert_eq!(ledger.release(true), None, "call_a has no result yet");
        ledger.set_output("call_a", "a".into(), true);
        let release = ledger.release(true).unwrap();
        assert_eq!(
            release.outputs,
            vec![("call_a".into(), "a".into()), ("call_b".into(), "b".into())]
        );
        assert!(release.respond);
    }

    #[test]
    fn a_call_id_is_run_once() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        assert!(!ledger.add_call("resp_1", "call_1", t0));
    }

    #[test]
    fn no_response_while_the_caller_speaks_and_none_while_the_call_ends() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        ledger.response_done("resp_1");
        ledger.speech_started();
        ledger.set_output("call_1", "x".into(), true);
        assert!(!ledger.release(true).unwrap().respond);

        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        ledger.response_done("resp_1");
        ledger.set_output("call_1", "x".into(), true);
        assert!(!ledger.release(false).unwrap().respond);
        assert!(!ledger.is_response_active());
    }

    #[test]
    fn outputs_wait_for_a_response_that_started_meanwhile() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        ledger.response_done("resp_1");
        ledger.response_created("resp_2");
        ledger.set_output("call_1", "x".into(), true);
        assert_eq!(ledger.release(true), None, "resp_2 could not read them");
        ledger.response_done("resp_2");
        assert!(ledger.release(true).unwrap().respond);
    }

    #[test]
    fn an_error_clears_a_pending_request() {
        let mut ledger = ToolLedger::default();
        ledger.note_response_requested();
        assert!(ledger.is_response_active());
        ledger.response_refused();
        assert!(!ledger.is_response_active());
    }

    #[test]
    fn only_one_response_is_asked_for_until_it_starts() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        assert!(ledger.add_call("resp_2", "call_2", t0));
        ledger.response_done("resp_1");
        ledger.response_done("resp_2");
        ledger.set_output("call_1", "1".into(), true);
        ledger.set_output("call_2", "2".into(), true);
        assert!(ledger.release(true).unwrap().respond);
        assert_eq!(ledger.release(true), None, "the first one is on its way");
        ledger.response_created("resp_3");
        assert!(ledger.is_response_active());
        assert_eq!(ledger.release(true), None);
        ledger.response_done("resp_3");
        assert!(!ledger.is_response_active());
        let second = ledger.release(true).unwrap();
        assert_eq!(second.outputs, vec![("call_2".into(), "2".into())]);
        assert!(second.respond, "its own response, after the first one");
    }

    #[test]
    fn outputs_wait_for_a_response_the_call_asked_for() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        ledger.response_done("resp_1");
        ledger.set_output("call_1", "x".into(), true);
        ledger.note_response_requested();
        assert_eq!(ledger.release(true), None);
        ledger.response_created("resp_keys");
        ledger.response_done("resp_keys");
        assert!(ledger.release(true).unwrap().respond);
    }

    #[test]
    fn a_refused_holding_sentence_does_not_hold_the_round() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        ledger.response_done("resp_1");
        assert!(ledger.take_holding_due(t0 + HOLDING_AFTER));
        ledger.response_refused();
        ledger.set_output("call_1", "x".into(), true);
        assert!(ledger.release(true).unwrap().respond);
    }

    #[test]
    fn a_call_that_ends_the_call_asks_for_no_response() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        ledger.set_output("call_1", "{\"ok\":true}".into(), false);
        ledger.response_done("resp_1");
        assert!(!ledger.release(true).unwrap().respond);
    }

    #[test]
    fn a_slow_round_gets_one_holding_sentence_and_waits_for_it() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        assert_eq!(
            ledger.holding_due_at(),
            None,
            "the tool's own response is active"
        );
        assert!(!ledger.take_holding_due(t0 + HOLDING_AFTER));
        ledger.response_done("resp_1");
        assert_eq!(ledger.holding_due_at(), Some(t0 + HOLDING_AFTER));
        assert!(!ledger.take_holding_due(t0 + Duration::from_millis(1100)));
        assert!(ledger.take_holding_due(t0 + HOLDING_AFTER));
        assert!(
            ledger.is_response_active(),
            "the holding response is on its way"
        );
        ledger.response_created("resp_hold");
        ledger.response_done("resp_hold");
        assert!(
            !ledger.take_holding_due(t0 + HOLDING_AFTER * 3),
            "once per round"
        );
        assert_eq!(ledger.holding_due_at(), None);
    }

    #[test]
    fn a_result_during_the_holding_sentence_waits_for_it() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        ledger.response_done("resp_1");
        assert!(ledger.take_holding_due(t0 + HOLDING_AFTER));
        ledger.response_created("resp_hold");
        ledger.set_output("call_1", "late".into(), true);
        assert_eq!(
            ledger.release(true),
            None,
            "the holding sentence is being said"
        );
        ledger.response_done("resp_hold");
        let release = ledger.release(true).unwrap();
        assert_eq!(release.outputs, vec![("call_1".into(), "late".into())]);
        assert!(release.respond);
    }

    #[test]
    fn no_holding_sentence_while_the_caller_speaks() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        ledger.response_done("resp_1");
        ledger.speech_started();
        assert!(!ledger.take_holding_due(t0 + HOLDING_AFTER * 2));
        ledger.speech_stopped();
        assert!(ledger.take_holding_due(t0 + HOLDING_AFTER * 2));
    }

    #[test]
    fn a_withdrawn_call_leaves_the_rest_of_its_round() {
        let t0 = Instant::now();
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        assert!(ledger.add_call("resp_1", "call_2", t0));
        ledger.response_done("resp_1");
        ledger.set_output("call_2", "two".into(), true);
        ledger.withdraw("call_1");
        assert_eq!(
            ledger.release(true).unwrap().outputs,
            vec![("call_2".into(), "two".into())]
        );
        let mut ledger = ledger_with_call("resp_1", "call_1", t0);
        ledger.withdraw("call_1");
        assert!(!ledger.has_pending());
    }
}
