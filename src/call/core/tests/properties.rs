//! The call core under random input sequences: frames from both peers in any order (sane,
//! out of order, or garbage), dial outcomes, lost sessions, rollovers, tool answers and time
//! jumps. Whatever comes, the core must not panic and must keep the promises a caller relies on:
//!
//! - every caller frame reaches at most one session, and never a successor that has not taken
//!   over yet;
//! - a `truncate` never claims more audio than was forwarded for its item;
//! - no delta of a response the caller interrupted is forwarded;
//! - after the timer fires, the core never asks to be woken at or before that instant (the
//!   driver would spin);
//! - nothing follows the end.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::agents::{Builtin, ToolSpec};

/// One thing that happens to a call.
#[derive(Clone, Debug)]
enum Step {
    CallerFrame,
    /// Echo the `n`th mark sent so far (modulo how many), in whatever order that makes.
    MarkEcho(usize),
    Keypress,
    ResponseCreated(u8),
    Delta {
        response: u8,
        ms: u8,
    },
    AudioDone(u8),
    ResponseDone(u8),
    SpeechStarted,
    SpeechStopped,
    AgentTranscript(u8),
    CallerTranscript,
    FunctionCall(u8),
    /// Answer the oldest request to the business still out.
    ToolAnswer {
        ok: bool,
    },
    BenignError,
    SessionExpired,
    AgentBroken,
    TransportReady,
    AgentOpened,
    OpenFailed,
    StandbyOpened,
    StandbyFailed,
    StandbyError,
    Garbage,
    /// Let this many milliseconds pass, then fire the timer.
    Wait(u16),
}

/// At most this many response ids, so the core's bounded memory of interrupted responses is
/// never what decides the outcome.
const RESPONSES: u8 = 5;

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => Just(Step::CallerFrame),
        3 => any::<usize>().prop_map(Step::MarkEcho),
        1 => Just(Step::Keypress),
        2 => (0..RESPONSES).prop_map(Step::ResponseCreated),
        4 => (0..RESPONSES, 1..200u8).prop_map(|(response, ms)| Step::Delta { response, ms }),
        1 => (0..RESPONSES).prop_map(Step::AudioDone),
        2 => (0..RESPONSES).prop_map(Step::ResponseDone),
        2 => Just(Step::SpeechStarted),
        2 => Just(Step::SpeechStopped),
        1 => (0..RESPONSES).prop_map(Step::AgentTranscript),
        1 => Just(Step::CallerTranscript),
        1 => (0..RESPONSES).prop_map(Step::FunctionCall),
        1 => any::<bool>().prop_map(|ok| Step::ToolAnswer { ok }),
        1 => Just(Step::BenignError),
        1 => Just(Step::SessionExpired),
        1 => Just(Step::AgentBroken),
        1 => Just(Step::TransportReady),
        1 => Just(Step::AgentOpened),
        1 => Just(Step::OpenFailed),
        1 => Just(Step::StandbyOpened),
        1 => Just(Step::StandbyFailed),
        1 => Just(Step::StandbyError),
        1 => Just(Step::Garbage),
        3 => (0..2500u16).prop_map(Step::Wait),
    ]
}

/// An agent with a business tool and `end_call`, so function calls and wrap-ups happen too.
fn property_agent() -> AgentProfile {
    AgentProfile {
        tools: vec![ToolSpec {
            name: "lookup_order".into(),
            description: "Look up an order.".into(),
            parameters: json!({"type": "object", "properties": {}}),
            url: "https://backend.example.com/tools/lookup_order".into(),
            timeout: Duration::from_millis(3000),
        }],
        builtins: vec![Builtin::EndCall],
        ..agent()
    }
}

/// What the checks remember of the call so far.
#[derive(Default)]
struct Observed {
    frames_sent: u64,
    /// How many times each caller frame reached any session.
    appended: HashMap<String, u32>,
    /// Audio bytes forwarded to the caller, by item.
    forwarded: HashMap<String, u64>,
    marks: Vec<String>,
    /// The response the core considers running, as far as the events show.
    active: Option<String>,
    interrupted: HashSet<String>,
    tasks: Vec<TaskId>,
    functions: u64,
}

impl Observed {
    fn note_actions(&mut self, actions: &[Action]) -> Result<(), TestCaseError> {
        for action in actions {
            match action {
                Action::ToAgent(text) => self.note_to_session(text)?,
                Action::ToStandby(text) => {
                    let event: Value = serde_json::from_str(text).unwrap();
                    prop_assert_ne!(
                        &event["type"],
                        "input_audio_buffer.append",
                        "caller audio reached a successor before it took over"
                    );
                }
                Action::ToMedia(text) => {
                    let frame: Value = serde_json::from_str(text).unwrap();
                    if frame["event"] == "mark" {
                        self.marks
                            .push(frame["mark"]["name"].as_str().unwrap().to_owned());
                    }
                }
                Action::Spawn(id, SideTask::AskBusiness { .. }) => self.tasks.push(*id),
                _ => {}
            }
        }
        Ok(())
    }

    fn note_to_session(&mut self, text: &str) -> Result<(), TestCaseError> {
        let event: Value = serde_json::from_str(text).unwrap();
        match event["type"].as_str().unwrap() {
            "input_audio_buffer.append" => {
                let payload = event["audio"].as_str().unwrap().to_owned();
                let count = self.appended.entry(payload).or_default();
                *count += 1;
                prop_assert_eq!(*count, 1, "a caller frame reached a session twice");
            }
            "conversation.item.truncate" => {
                let item = event["item_id"].as_str().unwrap();
                let end_ms = event["audio_end_ms"].as_u64().unwrap();
                let forwarded = self.forwarded.get(item).copied().unwrap_or(0);
                prop_assert!(
                    end_ms * BYTES_PER_MS <= forwarded,
                    "truncate of {} at {} ms, but only {} bytes were forwarded",
                    item,
                    end_ms,
                    forwarded
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// A barge-in that visibly interrupted (a `clear`, a cancel or a truncate) discarded the
    /// running response and every response whose audio was cut.
    fn note_interruption(&mut self, actions: &[Action]) {
        let mut visible = false;
        for event in to_agent(actions) {
            match event["type"].as_str().unwrap() {
                "conversation.item.truncate" => {
                    visible = true;
                    let item = event["item_id"].as_str().unwrap();
                    self.interrupted
                        .insert(item.trim_start_matches("item_").to_owned());
                }
                "response.cancel" => visible = true,
                _ => {}
            }
        }
        visible |= to_media(actions)
            .iter()
            .any(|frame| frame["event"] == "clear");
        if visible {
            self.interrupted.extend(self.active.take());
        }
    }
}

fn response_id(n: u8) -> String {
    format!("resp_{n}")
}

/// Each response has one audio item, named after it.
fn item_id(n: u8) -> String {
    format!("item_resp_{n}")
}

fn run(steps: &[Step]) -> Result<(), TestCaseError> {
    let settings = CallSettings {
        session_rollover: Duration::from_secs(2),
        ..CallSettings::default()
    };
    let mut h = Harness::with(property_agent(), settings);
    let mut seen = Observed::default();
    let opening = h.ready();
    seen.note_actions(&opening)?;
    for step in steps {
        if h.core.is_ended() {
            let after = h.media(FRAME);
            prop_assert!(after.is_empty(), "actions after the end: {:?}", after);
            return Ok(());
        }
        let actions = feed(&mut h, &mut seen, step)?;
        seen.note_actions(&actions)?;
        if let Step::Wait(_) = step {
            prop_assert!(
                h.core.poll_timeout().is_none_or(|at| at > h.now),
                "the timer fired and the core wants it again at once"
            );
        }
    }
    Ok(())
}

fn feed(h: &mut Harness, seen: &mut Observed, step: &Step) -> Result<Vec<Action>, TestCaseError> {
    let event = |value: Value| value.to_string();
    let actions = match step {
        Step::CallerFrame => {
            seen.frames_sent += 1;
            let payload = format!("{:0>212}AA==", seen.frames_sent);
            h.media(&payload)
        }
        Step::MarkEcho(n) => match seen.marks.len() {
            0 => Vec::new(),
            len => {
                let name = seen.marks[n % len].clone();
                h.twilio(json!({"event": "mark", "mark": {"name": name}}))
            }
        },
        Step::Keypress => h.twilio(json!({"event": "dtmf", "dtmf": {"digit": "5"}})),
        Step::ResponseCreated(n) => {
            seen.active = Some(response_id(*n));
            h.agent(json!({"type": "response.created", "response": {"id": response_id(*n)}}))
        }
        Step::Delta { response, ms } => {
            let bytes = usize::from(*ms) * 8;
            let payload = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                vec![0xff_u8; bytes],
            );
            let actions = h.delta(&response_id(*response), &item_id(*response), &payload);
            let forwarded = to_media(&actions).iter().any(|f| f["event"] == "media");
            if seen.interrupted.contains(&response_id(*response)) {
                prop_assert!(
                    !forwarded,
                    "a delta of interrupted {} was forwarded",
                    response_id(*response)
                );
            }
            if forwarded {
                *seen.forwarded.entry(item_id(*response)).or_default() += bytes as u64;
            }
            actions
        }
        Step::AudioDone(n) => h.agent(json!({"type": "response.output_audio.done", "response_id": response_id(*n), "item_id": item_id(*n), "output_index": 0, "content_index": 0})),
        Step::ResponseDone(n) => {
            let id = response_id(*n);
            if seen.active.as_deref() == Some(id.as_str()) {
                seen.active = None;
            }
            seen.interrupted.remove(&id);
            h.agent(json!({"type": "response.done", "response": {"id": id, "status": "completed", "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}}))
        }
        Step::SpeechStarted => {
            let actions = h.agent(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "u"}));
            seen.note_interruption(&actions);
            actions
        }
        Step::SpeechStopped => h.agent(json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 900, "item_id": "u"})),
        Step::AgentTranscript(n) => h.agent(json!({"type": "response.output_audio_transcript.done", "response_id": response_id(*n), "item_id": item_id(*n), "output_index": 0, "content_index": 0, "transcript": "Your order ships tomorrow morning."})),
        Step::CallerTranscript => h.agent(json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": "u", "content_index": 0, "transcript": "Where is it?"})),
        Step::FunctionCall(n) => {
            seen.functions += 1;
            let name = if seen.functions.is_multiple_of(4) { "end_call" } else { "lookup_order" };
            h.agent(json!({"type": "response.function_call_arguments.done", "response_id": response_id(*n), "item_id": format!("fc_{}", seen.functions), "output_index": 1, "call_id": format!("call_{}", seen.functions), "name": name, "arguments": "{}"}))
        }
        Step::ToolAnswer { ok } => {
            if seen.tasks.is_empty() {
                Vec::new()
            } else {
                let task = seen.tasks.remove(0);
                let outcome = if *ok {
                    BusinessOutcome::Answered { status: 200, body: br#"{"status":"shipped"}"#.to_vec() }
                } else {
                    BusinessOutcome::TimedOut
                };
                h.feed(Input::TaskDone(task, TaskOutput::Business(outcome)))
            }
        }
        Step::BenignError => h.agent(json!({"type": "error", "error": {"type": "invalid_request_error", "code": "response_cancel_not_active", "message": "none"}})),
        Step::SessionExpired => h.agent(json!({"type": "error", "error": {"type": "invalid_request_error", "code": "session_expired", "message": "Your session hit the maximum duration of 60 minutes."}})),
        Step::AgentBroken => h.feed(Input::AgentBroken("reset".into())),
        Step::TransportReady => h.feed(Input::AgentTransportReady),
        Step::AgentOpened => h.feed(Input::AgentOpened),
        Step::OpenFailed => h.feed(Input::AgentOpenFailed("503".into())),
        Step::StandbyOpened => h.feed(Input::StandbyOpened),
        Step::StandbyFailed => h.feed(Input::StandbyFailed("reset".into())),
        Step::StandbyError => {
            let text = event(json!({"type": "error", "error": {"type": "server_error", "message": "boom"}}));
            h.feed(Input::StandbyText(&text))
        }
        Step::Garbage => {
            let mut actions = h.feed(Input::AgentText("{\"type\":\"response.output_audio.delta\""));
            actions.extend(h.feed(Input::MediaText("{\"event\":\"media\",\"media\":7}")));
            actions
        }
        Step::Wait(ms) => {
            h.advance(Duration::from_millis(u64::from(*ms)));
            h.feed(Input::Timer)
        }
    };
    Ok(actions)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_core_keeps_its_promises_whatever_the_peers_send(steps in proptest::collection::vec(step(), 1..120)) {
        run(&steps)?;
    }
}
