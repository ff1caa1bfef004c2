//! What the agent does besides talking, checked through the core's inputs and actions only:
//! function calls answered by the business, `end_call` and `transfer_call`, keypresses, the
//! time limit, the silence policy and the business's context at call start.
//!
//! Every timer is fired through [`Harness::tick`], which also checks the core never asks to be
//! woken for a deadline it has just passed (a driver would spin on it).

use crate::admission::Occupancy;
use crate::agents::{Builtin, SilencePolicy, ToolSpec, TransferTarget};
use crate::call::tools::{HOLDING_AFTER, HOLDING_INSTRUCTIONS};
use crate::domain::phone::E164;

use super::*;

const TOOL_URL: &str = "https://backend.example.com/tools/lookup_order";
const CONTEXT_URL: &str = "https://backend.example.com/callbridge/context";
/// The numbers `start_event` carries, as the business sees them.
const FROM: &str = "+5511999990000";
const TO: &str = "+558551234567";
const TRANSFER_TWIML: &str = "<Response><Dial><Number>+15557654321</Number></Dial></Response>";
/// Far enough that heartbeats never mix into what a test looks at.
const HOUR: Duration = Duration::from_secs(3600);

fn lookup_order() -> ToolSpec {
    ToolSpec {
        name: "lookup_order".into(),
        description: "Look up an order by its number.".into(),
        parameters: json!({"type": "object", "properties": {"order_id": {"type": "string"}}}),
        url: TOOL_URL.into(),
        timeout: Duration::from_millis(5000),
    }
}

/// An agent with a business tool and both built-ins.
fn acting_agent() -> AgentProfile {
    AgentProfile {
        tools: vec![lookup_order()],
        builtins: vec![Builtin::EndCall, Builtin::TransferCall],
        transfer_to: Some(TransferTarget::Number(E164::parse("+15557654321").unwrap())),
        ..agent()
    }
}

fn quiet_settings() -> CallSettings {
    CallSettings {
        heartbeat_interval: HOUR,
        peer_timeout: HOUR * 2,
        // No session rollover within these tests' hours.
        session_rollover: HOUR * 24,
        ..CallSettings::default()
    }
}

impl Harness {
    /// A call with `agent` and no heartbeats to speak of; the first action is taken already.
    fn acting(agent: AgentProfile) -> Self {
        let mut h = Self::with(agent, quiet_settings());
        h.actions();
        h
    }

    /// The timer fires now. Afterwards the core's next deadline must lie in the future:
    /// whatever was due has been acted on.
    fn tick(&mut self) -> Vec<Action> {
        let actions = self.feed(Input::Timer);
        if let Some(deadline) = self.core.poll_timeout() {
            assert!(
                deadline > self.now,
                "a timer at {:?} left a deadline {:?} behind it",
                self.now,
                deadline
            );
        }
        actions
    }

    fn tick_after(&mut self, by: Duration) -> Vec<Action> {
        self.advance(by);
        self.tick()
    }

    fn created(&mut self, response: &str) -> Vec<Action> {
        self.agent(json!({"type": "response.created", "response": {"id": response}}))
    }

    fn done(&mut self, response: &str) -> Vec<Action> {
        self.agent(json!({
            "type": "response.done",
            "response": {"id": response, "status": "completed",
                "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}}
        }))
    }

    /// A function call as `response.function_call_arguments.done` reports it.
    fn call(&mut self, response: &str, call_id: &str, name: &str, arguments: &str) -> Vec<Action> {
        self.agent(json!({
            "type": "response.function_call_arguments.done",
            "response_id": response,
            "item_id": format!("item_{call_id}"),
            "output_index": 0,
            "call_id": call_id,
            "name": name,
            "arguments": arguments
        }))
    }

    /// The same call as `response.output_item.done` reports it.
    fn call_item(
        &mut self,
        response: &str,
        call_id: &str,
        name: &str,
        arguments: &str,
    ) -> Vec<Action> {
        self.agent(json!({
            "type": "response.output_item.done",
            "response_id": response,
            "output_index": 0,
            "item": {"type": "function_call", "id": format!("item_{call_id}"),
                "status": "completed", "call_id": call_id, "name": name, "arguments": arguments}
        }))
    }

    fn answer(&mut self, task: TaskId, status: u16, body: &str) -> Vec<Action> {
        self.feed(Input::TaskDone(
            task,
            TaskOutput::Business(BusinessOutcome::Answered {
                status,
                body: body.as_bytes().to_vec(),
            }),
        ))
    }

    fn business(&mut self, task: TaskId, outcome: BusinessOutcome) -> Vec<Action> {
        self.feed(Input::TaskDone(task, TaskOutput::Business(outcome)))
    }

    fn echo(&mut self, mark: &str) -> Vec<Action> {
        self.twilio(json!({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": mark}}))
    }

    fn speech_started(&mut self) -> Vec<Action> {
        self.agent(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "item_u"}))
    }

    fn speech_stopped(&mut self) -> Vec<Action> {
        self.agent(json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 900, "item_id": "item_u"}))
    }

    fn dtmf(&mut self, digit: &str) -> Vec<Action> {
        self.twilio(json!({"event": "dtmf", "streamSid": STREAM_SID,
            "dtmf": {"track": "inbound_track", "digit": digit}}))
    }

    /// A response that starts and finishes at once, saying nothing.
    fn silent_response(&mut self, response: &str) -> Vec<Action> {
        let mut actions = self.created(response);
        actions.extend(self.done(response));
        actions
    }

    fn metric(&self, line: &str) -> bool {
        let text = self
            .metrics
            .render(
                Occupancy {
                    pending: 0,
                    live: 0,
                },
                false,
            )
            .unwrap();
        text.lines().any(|l| l == line)
    }
}

/// The one request to the business among `actions`: its task, url, body and timeout.
fn business_request(actions: &[Action]) -> (TaskId, String, Value, Duration) {
    let requests: Vec<_> = actions
        .iter()
        .filter_map(|action| match action {
            Action::Spawn(id, SideTask::AskBusiness { url, body, timeout }) => Some((
                *id,
                url.clone(),
                serde_json::from_str(body).unwrap(),
                *timeout,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        requests.len(),
        1,
        "one request to the business: {actions:?}"
    );
    requests.into_iter().next().unwrap()
}

fn spawns(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Spawn(..)))
        .count()
}

fn redirect(actions: &[Action]) -> Option<(TaskId, &CallSid, &str)> {
    actions.iter().find_map(|action| match action {
        Action::Spawn(id, SideTask::Redirect { call_sid, twiml }) => {
            Some((*id, call_sid, twiml.as_str()))
        }
        _ => None,
    })
}

fn ended(actions: &[Action]) -> bool {
    actions.iter().any(|a| matches!(a, Action::End(_)))
}

/// `(name, detail, data)` of every event of `kind` recorded among `actions`.
fn events_of(actions: &[Action], kind: &str) -> Vec<(String, Option<String>, Option<Value>)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Record(Record::Event {
                kind: k,
                name,
                detail,
                data,
                ..
            }) if *k == kind => Some((name.clone(), detail.clone(), data.clone())),
            _ => None,
        })
        .collect()
}

fn output_of(call_id: &str, output: &str) -> Value {
    json!({"type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": call_id, "output": output}})
}

fn response_create() -> Value {
    json!({"type": "response.create"})
}

/// The `{"error": …}` a function call's output holds, checked to be exactly that shape.
fn error_in(event: &Value) -> String {
    assert_eq!(event["item"]["type"], "function_call_output", "{event}");
    let output: Value = serde_json::from_str(event["item"]["output"].as_str().unwrap()).unwrap();
    let object = output.as_object().expect("the output is a JSON object");
    assert_eq!(object.len(), 1, "{output}");
    let reason = output["error"]
        .as_str()
        .expect("an error reason")
        .to_owned();
    assert!(!reason.is_empty());
    reason
}

/// A `response.create` with instructions of its own and no tools allowed.
/// What a response that may not call tools was asked to say, after the call's own
/// instructions (a response's instructions replace the session's, so they come first).
fn speech_only_response(event: &Value) -> &str {
    assert_eq!(event["type"], "response.create", "{event}");
    assert_eq!(event["response"]["tool_choice"], "none", "{event}");
    let instructions = event["response"]["instructions"].as_str().unwrap();
    let (own, extra) = instructions
        .rsplit_once("\n\n")
        .unwrap_or_else(|| panic!("the call's instructions come first: {instructions:?}"));
    assert!(!own.is_empty(), "{instructions:?}");
    extra
}

// --- Function calls.

#[test]
fn a_tool_call_is_asked_once_and_its_answer_follows_the_response_then_one_response() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    let arguments = r#"{"order_id":"42"}"#;
    let actions = h.call("resp_1", "call_1", "lookup_order", arguments);
    assert!(to_agent(&actions).is_empty());
    let (task, url, body, timeout) = business_request(&actions);
    assert_eq!(url, TOOL_URL);
    assert_eq!(timeout, Duration::from_millis(5000));
    assert_eq!(
        body,
        json!({"type": "tool.call", "call_sid": CALL_SID, "agent": "support",
            "tool": "lookup_order", "call_id": "call_1", "arguments": {"order_id": "42"},
            "caller": FROM, "business": TO, "channel": "whatsapp", "direction": "inbound"})
    );
    // OpenAI reports the same call again when its item is done: it runs once.
    let again = h.call_item("resp_1", "call_1", "lookup_order", arguments);
    assert_eq!(spawns(&again), 0, "{again:?}");
    assert!(to_agent(&again).is_empty());

    h.advance(Duration::from_millis(300));
    let answered = h.answer(task, 200, r#"{"status":"shipped"}"#);
    assert!(
        to_agent(&answered).is_empty(),
        "the response that called is still active: {answered:?}"
    );
    let recorded = events_of(&answered, "tool_call");
    assert_eq!(recorded.len(), 1);
    let (name, detail, data) = &recorded[0];
    assert_eq!(name, "lookup_order");
    assert_eq!(detail.as_deref(), Some("ok"));
    assert_eq!(
        data.as_ref().unwrap(),
        &json!({"tool": "lookup_order", "call_id": "call_1", "outcome": "ok", "latency_ms": 300,
            "arguments": arguments, "output": r#"{"status":"shipped"}"#})
    );
    assert!(h.metric(r#"callbridge_tool_calls_total{tool="lookup_order",outcome="ok"} 1"#));

    let sent = to_agent(&h.done("resp_1"));
    assert_eq!(
        sent,
        vec![
            output_of("call_1", r#"{"status":"shipped"}"#),
            response_create()
        ]
    );
    // Nothing is left to send later.
    assert!(to_agent(&h.tick_after(Duration::from_secs(5))).is_empty());
}

#[test]
fn an_answer_after_the_response_is_done_goes_out_at_once() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    let (task, ..) = business_request(&h.call_item("resp_1", "call_1", "lookup_order", "{}"));
    assert!(to_agent(&h.done("resp_1")).is_empty());
    assert_eq!(
        to_agent(&h.answer(task, 204, "")),
        vec![output_of("call_1", ""), response_create()]
    );
}

#[test]
fn long_answers_reach_the_agent_cut_to_16_kib_and_the_history_keeps_2_kib() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    let arguments = json!({"note": "a".repeat(3000)}).to_string();
    let (task, _, body, _) =
        business_request(&h.call("resp_1", "call_1", "lookup_order", &arguments));
    assert_eq!(body["arguments"]["note"].as_str().unwrap().len(), 3000);
    h.done("resp_1");
    let long = "b".repeat(20 * 1024);
    let actions = h.answer(task, 200, &long);
    let sent = to_agent(&actions);
    let output = sent[0]["item"]["output"].as_str().unwrap();
    assert_eq!(
        output,
        format!("{} [cut: answer longer than 16 KiB]", &long[..16 * 1024])
    );
    let (_, _, data) = &events_of(&actions, "tool_call")[0];
    let data = data.as_ref().unwrap();
    assert_eq!(data["arguments"], arguments[..2048]);
    assert_eq!(data["output"], long[..2048]);
}

#[test]
fn on_an_outbound_call_the_caller_is_still_the_customer() {
    let mut h = Harness::acting(acting_agent());
    h.feed(Input::AgentTransportReady);
    let lookup = spawned(&h.start_outbound());
    h.feed(Input::AgentOpened);
    h.feed(Input::TaskDone(lookup, TaskOutput::CallContext(Ok(None))));
    assert_eq!(h.core.agent_link(), &AgentLink::Ready);
    h.created("resp_1");
    let (_, _, body, _) = business_request(&h.call("resp_1", "call_1", "lookup_order", "{}"));
    // `POST /calls` dials from our number: Twilio's `To` is the customer.
    assert_eq!(body["caller"], TO);
    assert_eq!(body["business"], FROM);
    assert_eq!(body["direction"], "outbound");
}

#[test]
fn two_calls_of_one_response_answer_in_call_order_with_one_response() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    let (first, ..) =
        business_request(&h.call("resp_1", "call_a", "lookup_order", r#"{"order_id":"1"}"#));
    let (second, ..) =
        business_request(&h.call("resp_1", "call_b", "lookup_order", r#"{"order_id":"2"}"#));
    assert_ne!(first, second);
    assert!(to_agent(&h.done("resp_1")).is_empty());
    // The second answers first; nothing goes out until both have.
    assert!(to_agent(&h.answer(second, 200, "b")).is_empty());
    assert_eq!(
        to_agent(&h.answer(first, 200, "a")),
        vec![
            output_of("call_a", "a"),
            output_of("call_b", "b"),
            response_create()
        ]
    );
}

#[test]
fn failed_answers_become_error_outputs_and_the_call_goes_on() {
    let failures = [
        (
            BusinessOutcome::Answered {
                status: 500,
                body: b"oops".to_vec(),
            },
            "refused",
        ),
        (BusinessOutcome::TimedOut, "timeout"),
        (
            BusinessOutcome::Unreachable("connection refused".into()),
            "unreachable",
        ),
    ];
    let mut h = Harness::acting(acting_agent());
    h.ready();
    for (round, (outcome, label)) in failures.into_iter().enumerate() {
        let response = format!("resp_{round}");
        let call_id = format!("call_{round}");
        h.created(&response);
        let (task, ..) = business_request(&h.call(&response, &call_id, "lookup_order", "{}"));
        h.done(&response);
        let actions = h.business(task, outcome);
        let sent = to_agent(&actions);
        assert_eq!(sent.len(), 2, "{label}: {sent:?}");
        assert_eq!(sent[0]["item"]["call_id"], call_id.as_str());
        let reason = error_in(&sent[0]);
        assert!(
            !reason.contains("oops"),
            "the body of a refusal is not passed on"
        );
        assert_eq!(sent[1], response_create());
        let recorded = events_of(&actions, "tool_call");
        assert_eq!(recorded[0].1.as_deref(), Some(label));
        assert!(!ended(&actions));
        // The response asked for runs, so the next round finds none active.
        h.silent_response(&format!("resp_{round}_answer"));
    }
    assert!(!h.core.is_ended());
    assert!(h.metric(r#"callbridge_tool_calls_total{tool="lookup_order",outcome="timeout"} 1"#));
}

#[test]
fn arguments_that_are_not_an_object_and_unknown_tools_get_errors_without_a_request() {
    // The plain agent has no `transfer_call`: to it that name is as unknown as any other.
    let mut h = Harness::acting(AgentProfile {
        tools: vec![lookup_order()],
        ..agent()
    });
    h.ready();
    let cases = [
        ("lookup_order", "not json", "invalid_arguments"),
        ("lookup_order", "[1, 2]", "invalid_arguments"),
        ("lookup_order", r#""42""#, "invalid_arguments"),
        ("send_email", "{}", "unknown_tool"),
        ("transfer_call", "{}", "unknown_tool"),
    ];
    for (round, (tool, arguments, label)) in cases.into_iter().enumerate() {
        let response = format!("resp_{round}");
        let call_id = format!("call_{round}");
        h.created(&response);
        let actions = h.call(&response, &call_id, tool, arguments);
        assert_eq!(spawns(&actions), 0, "{tool} {arguments}: no request");
        assert!(
            to_agent(&actions).is_empty(),
            "the response is still active"
        );
        assert_eq!(
            events_of(&actions, "tool_call")[0].1.as_deref(),
            Some(label)
        );
        let sent = to_agent(&h.done(&response));
        assert_eq!(sent.len(), 2, "{tool} {arguments}: {sent:?}");
        assert_eq!(sent[0]["item"]["call_id"], call_id.as_str());
        error_in(&sent[0]);
        assert_eq!(sent[1], response_create());
        h.silent_response(&format!("resp_{round}_answer"));
    }
    assert!(!h.core.is_ended());
}

#[test]
fn while_the_caller_speaks_outputs_go_out_without_a_response() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    let (task, ..) = business_request(&h.call("resp_1", "call_1", "lookup_order", "{}"));
    h.done("resp_1");
    h.speech_started();
    assert_eq!(
        to_agent(&h.answer(task, 200, "{}")),
        vec![output_of("call_1", "{}")],
        "the VAD's own response reads the output"
    );
    assert!(to_agent(&h.speech_stopped()).is_empty());
}

#[test]
fn a_slow_tool_gets_one_holding_sentence_and_its_answer_waits_for_it() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    let asked_at = h.now;
    let (task, ..) = business_request(&h.call("resp_1", "call_1", "lookup_order", "{}"));
    // While the tool's own response is active nothing is due.
    assert_eq!(h.core.poll_timeout(), Some(asked_at + HOUR));
    h.done("resp_1");
    assert_eq!(h.core.poll_timeout(), Some(asked_at + HOLDING_AFTER));

    assert!(to_agent(&h.tick_after(HOLDING_AFTER - Duration::from_millis(1))).is_empty());
    let sent = to_agent(&h.tick_after(Duration::from_millis(1)));
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(speech_only_response(&sent[0]), HOLDING_INSTRUCTIONS);

    // Once per round: not again, however long the tool takes.
    h.created("resp_hold");
    assert!(to_agent(&h.tick_after(Duration::from_secs(2))).is_empty());
    // The answer arrives while the holding sentence is said: it waits for it.
    assert!(to_agent(&h.answer(task, 200, "late")).is_empty());
    assert_eq!(
        to_agent(&h.done("resp_hold")),
        vec![output_of("call_1", "late"), response_create()]
    );
    h.silent_response("resp_2");
    assert!(to_agent(&h.tick_after(Duration::from_secs(5))).is_empty());
}

#[test]
fn a_slow_tool_that_finishes_before_the_holding_sentence_starts_still_waits_for_it() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    let (task, ..) = business_request(&h.call("resp_1", "call_1", "lookup_order", "{}"));
    h.done("resp_1");
    assert_eq!(to_agent(&h.tick_after(HOLDING_AFTER)).len(), 1);
    // Asked for, not yet created: a second response now would be refused.
    assert!(to_agent(&h.answer(task, 200, "x")).is_empty());
    h.created("resp_hold");
    assert_eq!(
        to_agent(&h.done("resp_hold")),
        vec![output_of("call_1", "x"), response_create()]
    );
}

#[test]
fn no_holding_sentence_while_the_caller_speaks() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    let t0 = h.now;
    h.created("resp_1");
    let (task, ..) = business_request(&h.call("resp_1", "call_1", "lookup_order", "{}"));
    h.done("resp_1");
    h.advance(Duration::from_millis(500));
    h.speech_started();
    assert_eq!(
        h.core.poll_timeout(),
        Some(t0 + HOUR),
        "nothing is due while the caller speaks"
    );
    assert!(to_agent(&h.tick_after(Duration::from_secs(2))).is_empty());
    assert_eq!(
        to_agent(&h.answer(task, 200, "x")),
        vec![output_of("call_1", "x")]
    );
}

#[test]
fn audio_keeps_flowing_both_ways_while_a_tool_is_pending() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    let (task, ..) = business_request(&h.call("resp_1", "call_1", "lookup_order", "{}"));
    h.done("resp_1");
    for _ in 0..3 {
        let sent = to_agent(&h.media(FRAME));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["type"], "input_audio_buffer.append");
        assert_eq!(sent[0]["audio"], FRAME);
    }
    h.created("resp_2");
    let played = to_media(&h.delta("resp_2", "item_2", FRAME));
    assert_eq!(played.len(), 2);
    assert_eq!(played[0]["media"]["payload"], FRAME);
    assert_eq!(played[1]["event"], "mark");
    assert!(to_agent(&h.done("resp_2")).is_empty());
    assert_eq!(
        to_agent(&h.answer(task, 200, "x")),
        vec![output_of("call_1", "x"), response_create()]
    );
}

// --- end_call.

#[test]
fn end_call_waits_until_the_caller_heard_everything_then_hangs_up_through_twilio() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    for _ in 0..3 {
        h.delta("resp_1", "item_1", FRAME);
    }
    let actions = h.call("resp_1", "call_1", "end_call", r#"{"reason":"done"}"#);
    assert!(!ended(&actions));
    assert_eq!(events_of(&actions, "tool_call")[0].1.as_deref(), Some("ok"));
    let actions = h.done("resp_1");
    assert_eq!(
        to_agent(&actions),
        vec![output_of("call_1", r#"{"ok":true}"#)],
        "no response follows end_call"
    );
    assert!(!ended(&actions));
    assert!(!ended(&h.echo("m1")));
    assert!(!ended(&h.echo("m2")));
    let actions = h.echo("m3");
    let plan = plan(&actions);
    assert_eq!(plan.reason, EndReason::AgentEnded);
    assert_eq!(plan.rest_hang_up, RestHangUp::BeforeClosing);
    assert_eq!(plan.close_code, 1000);
    assert_eq!(plan.call_sid.as_ref().map(CallSid::as_str), Some(CALL_SID));
}

#[test]
fn end_call_with_nothing_playing_ends_at_once() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    let actions = h.call("resp_1", "call_1", "end_call", "{}");
    assert_eq!(plan(&actions).reason, EndReason::AgentEnded);
}

#[test]
fn end_call_waits_for_unechoed_marks_at_most_the_playback_wait() {
    let mut h = Harness::acting(acting_agent());
    let wait = CallSettings::default().playback_wait;
    h.ready();
    h.created("resp_1");
    h.delta("resp_1", "item_1", FRAME);
    let asked_at = h.now;
    h.call("resp_1", "call_1", "end_call", "{}");
    h.done("resp_1");
    assert_eq!(h.core.poll_timeout(), Some(asked_at + wait));
    assert!(!ended(&h.tick_after(wait - Duration::from_millis(1))));
    let actions = h.tick_after(Duration::from_millis(1));
    assert_eq!(plan(&actions).reason, EndReason::AgentEnded);
}

// --- transfer_call.

/// A call whose agent has said something (marks `m1`, `m2` unechoed) and called
/// `transfer_call`, with the response that called it done.
fn transfer_pending() -> Harness {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    h.delta("resp_1", "item_1", FRAME);
    h.delta("resp_1", "item_1", FRAME);
    let actions = h.call(
        "resp_1",
        "call_t",
        "transfer_call",
        r#"{"reason":"billing"}"#,
    );
    assert!(
        redirect(&actions).is_none(),
        "the caller is still hearing audio"
    );
    assert!(to_agent(&h.done("resp_1")).is_empty(), "no output yet");
    h
}

#[test]
fn transfer_call_redirects_after_playback_and_ends_when_twilio_moves_the_call() {
    let mut h = transfer_pending();
    assert!(redirect(&h.echo("m1")).is_none());
    let actions = h.echo("m2");
    let (task, call_sid, twiml) = redirect(&actions).expect("the transfer is asked for");
    assert_eq!(call_sid.as_str(), CALL_SID);
    assert_eq!(twiml, TRANSFER_TWIML);
    assert!(!ended(&actions));
    let actions = h.feed(Input::TaskDone(task, TaskOutput::Redirected(Ok(()))));
    assert!(to_agent(&actions).is_empty(), "no output, no response");
    assert_eq!(events_of(&actions, "tool_call")[0].1.as_deref(), Some("ok"));
    let actions = h.twilio(json!({"event": "stop", "streamSid": STREAM_SID}));
    let plan = plan(&actions);
    assert_eq!(plan.reason, EndReason::Transferred);
    assert_eq!(plan.rest_hang_up, RestHangUp::Never);
    assert_eq!(plan.close_code, 1000);
}

#[test]
fn a_transferred_stream_that_lingers_is_closed() {
    let mut h = transfer_pending();
    let actions = h.echo("m2");
    let (task, ..) = redirect(&actions).expect("the transfer is asked for");
    h.feed(Input::TaskDone(task, TaskOutput::Redirected(Ok(()))));
    let linger = CallSettings::default().transfer_linger;
    assert!(!ended(&h.tick_after(linger - Duration::from_millis(1))));
    let actions = h.tick_after(Duration::from_millis(1));
    assert_eq!(plan(&actions).reason, EndReason::Transferred);
}

#[test]
fn no_holding_sentence_while_a_transfer_waits_for_playback_or_for_twilio() {
    let mut h = transfer_pending();
    // The agent's last words are still playing well past the holding delay.
    let waiting = h.tick_after(HOLDING_AFTER * 2);
    assert!(to_agent(&waiting).is_empty(), "{waiting:?}");
    let actions = h.echo("m2");
    let (task, ..) = redirect(&actions).expect("the transfer is asked for");
    // Twilio takes its time to answer the redirect.
    let waiting = h.tick_after(HOLDING_AFTER * 2);
    assert!(to_agent(&waiting).is_empty(), "{waiting:?}");
    assert!(to_agent(&h.feed(Input::TaskDone(task, TaskOutput::Redirected(Ok(()))))).is_empty());
}

#[test]
fn a_refused_transfer_tells_the_agent_after_its_response_and_the_call_goes_on() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    // Nothing is playing: the transfer is asked for at once.
    let actions = h.call("resp_1", "call_t", "transfer_call", "{}");
    let (task, _, twiml) = redirect(&actions).expect("the transfer is asked for");
    assert_eq!(twiml, TRANSFER_TWIML);
    let actions = h.feed(Input::TaskDone(
        task,
        TaskOutput::Redirected(Err("21220 call not in progress".into())),
    ));
    assert!(
        to_agent(&actions).is_empty(),
        "the response is still active"
    );
    assert_eq!(
        events_of(&actions, "tool_call")[0].1.as_deref(),
        Some("refused")
    );
    let sent = to_agent(&h.done("resp_1"));
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0]["item"]["call_id"], "call_t");
    error_in(&sent[0]);
    assert_eq!(sent[1], response_create());
    // The call goes on: a caller hanging up now is just that.
    let actions = h.twilio(json!({"event": "stop", "streamSid": STREAM_SID}));
    assert_eq!(plan(&actions).reason, EndReason::CallerHungUp);
}

// --- Keypresses.

#[test]
fn keypresses_close_together_are_one_entry_and_a_response() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    for digit in ["1", "2", "3"] {
        assert!(h.dtmf(digit).is_empty());
        h.advance(Duration::from_millis(100));
    }
    // One second after the last key.
    let last = h.now - Duration::from_millis(100);
    assert_eq!(h.core.poll_timeout(), Some(last + Duration::from_secs(1)));
    assert!(to_agent(&h.tick_after(Duration::from_millis(850))).is_empty());
    let actions = h.tick_after(Duration::from_millis(50));
    assert_eq!(
        to_agent(&actions),
        vec![
            json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "The caller pressed: 1 2 3"}]}}),
            response_create()
        ]
    );
    let recorded = events_of(&actions, "dtmf");
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].0, "123");
    assert_eq!(recorded[0].2, Some(json!({"digits": "123"})));
    assert_eq!(h.metrics.dtmf_digits.get(), 3);
    assert!(to_agent(&h.tick_after(Duration::from_secs(2))).is_empty());
}

#[test]
fn keypresses_during_a_response_ask_for_none() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    h.dtmf("#");
    let sent = to_agent(&h.tick_after(Duration::from_secs(1)));
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        sent[0]["item"]["content"][0]["text"],
        "The caller pressed: #"
    );
}

#[test]
fn keys_a_second_apart_are_two_entries() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.dtmf("4");
    let first = to_agent(&h.tick_after(Duration::from_secs(1)));
    assert_eq!(
        first[0]["item"]["content"][0]["text"],
        "The caller pressed: 4"
    );
    h.created("resp_1");
    h.dtmf("*");
    let second = to_agent(&h.tick_after(Duration::from_secs(1)));
    assert_eq!(
        second[0]["item"]["content"][0]["text"],
        "The caller pressed: *"
    );
}

#[test]
fn keys_that_are_not_phone_keys_are_counted_and_ignored() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    let t0 = h.now;
    for digit in ["12", "x", "", "A"] {
        assert!(h.dtmf(digit).is_empty(), "{digit:?}");
    }
    assert!(
        h.twilio(json!({"event": "dtmf", "streamSid": STREAM_SID}))
            .is_empty()
    );
    assert_eq!(h.metrics.malformed_from_twilio.get(), 5);
    assert_eq!(h.metrics.dtmf_digits.get(), 0);
    assert_eq!(h.core.poll_timeout(), Some(t0 + HOUR), "nothing to tell");
}

// --- The time limit.

fn limited(limit: Duration) -> Harness {
    Harness::acting(AgentProfile {
        max_call_duration: Some(limit),
        ..acting_agent()
    })
}

#[test]
fn at_the_time_limit_the_agent_says_goodbye_and_the_call_ends_once_it_was_heard() {
    let limit = Duration::from_secs(60);
    let mut h = limited(limit);
    h.ready();
    let started = h.now;
    assert_eq!(h.core.poll_timeout(), Some(started + limit));
    assert!(to_agent(&h.tick_after(limit - Duration::from_millis(1))).is_empty());
    let sent = to_agent(&h.tick_after(Duration::from_millis(1)));
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(speech_only_response(&sent[0]).contains("time limit"));

    h.created("resp_bye");
    h.delta("resp_bye", "item_bye", FRAME);
    assert!(!ended(&h.done("resp_bye")), "the goodbye is still playing");
    let actions = h.echo("m1");
    let plan = plan(&actions);
    assert_eq!(plan.reason, EndReason::MaxDuration);
    assert_eq!(plan.rest_hang_up, RestHangUp::BeforeClosing);
    assert_eq!(plan.close_code, 1000);
}

#[test]
fn the_goodbye_waits_for_the_response_being_spoken() {
    let limit = Duration::from_secs(60);
    let mut h = limited(limit);
    h.ready();
    h.advance(limit - Duration::from_secs(1));
    h.created("resp_1");
    assert!(to_agent(&h.tick_after(Duration::from_secs(1))).is_empty());
    let sent = to_agent(&h.done("resp_1"));
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(speech_only_response(&sent[0]).contains("time limit"));
    assert!(!h.core.is_ended());
}

#[test]
fn a_goodbye_openai_never_says_ends_the_call_at_the_farewell_limit() {
    let limit = Duration::from_secs(60);
    let farewell_limit = CallSettings::default().farewell_limit;
    let mut h = limited(limit);
    h.ready();
    assert_eq!(to_agent(&h.tick_after(limit)).len(), 1);
    let asked_at = h.now;
    assert_eq!(h.core.poll_timeout(), Some(asked_at + farewell_limit));
    assert!(!ended(
        &h.tick_after(farewell_limit - Duration::from_millis(1))
    ));
    let actions = h.tick_after(Duration::from_millis(1));
    assert_eq!(plan(&actions).reason, EndReason::MaxDuration);
}

#[test]
fn no_holding_sentence_after_the_goodbye() {
    let limit = Duration::from_secs(60);
    let mut h = limited(limit);
    h.ready();
    h.advance(limit - Duration::from_millis(500));
    h.created("resp_1");
    let (task, ..) = business_request(&h.call("resp_1", "call_1", "lookup_order", "{}"));
    h.done("resp_1");
    // The limit comes before the holding delay: the goodbye is asked for instead.
    let sent = to_agent(&h.tick_after(Duration::from_millis(500)));
    assert!(speech_only_response(&sent[0]).contains("time limit"));
    h.created("resp_bye");
    h.delta("resp_bye", "item_bye", FRAME);
    h.done("resp_bye");
    // The goodbye plays on past the holding delay; the tool is still out.
    let waiting = h.tick_after(HOLDING_AFTER);
    assert!(to_agent(&waiting).is_empty(), "{waiting:?}");
    assert!(!h.core.is_ended());
    h.answer(task, 200, "x");
    assert_eq!(plan(&h.echo("m1")).reason, EndReason::MaxDuration);
}

// --- Silence.

fn silent_caller_agent() -> AgentProfile {
    AgentProfile {
        silence: Some(SilencePolicy {
            reprompt_after: Duration::from_secs(8),
            hang_up_after: 2,
        }),
        ..acting_agent()
    }
}

fn assert_check_in(actions: &[Action]) {
    let sent = to_agent(actions);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let instructions = speech_only_response(&sent[0]);
    assert!(instructions.contains("still there"), "{instructions}");
    assert_eq!(events_of(actions, "silence").len(), 1);
}

#[test]
fn silence_gets_check_ins_then_a_goodbye_and_caller_speech_starts_the_count_again() {
    let second = Duration::from_secs(1);
    let mut h = Harness::acting(silent_caller_agent());
    h.ready();
    let t0 = h.now;
    let heartbeat = Some(t0 + HOUR);
    assert_eq!(h.core.poll_timeout(), Some(t0 + second * 8));
    assert!(to_agent(&h.tick_after(second * 7)).is_empty());

    // 8 s of quiet: the first check-in. Its audio plays for a while; silence is not counted
    // until it was heard.
    assert_check_in(&h.tick_after(second));
    assert_eq!(h.core.poll_timeout(), heartbeat, "a response is on its way");
    h.created("resp_c1");
    h.delta("resp_c1", "item_c1", FRAME);
    h.done("resp_c1");
    assert_eq!(h.core.poll_timeout(), heartbeat, "the check-in still plays");
    assert!(to_agent(&h.tick_after(second * 10)).is_empty());
    h.echo("m1"); // heard at 18 s
    assert_eq!(h.core.poll_timeout(), Some(t0 + second * 26));
    assert_check_in(&h.tick_after(second * 8));
    h.silent_response("resp_c2"); // 26 s

    // The caller answers: the count starts again.
    h.advance(second * 3);
    h.speech_started();
    assert_eq!(h.core.poll_timeout(), heartbeat, "the caller is speaking");
    assert!(to_agent(&h.tick_after(second * 20)).is_empty());
    h.speech_stopped();
    h.silent_response("resp_answer"); // 49 s
    assert_check_in(&h.tick_after(second * 8));
    h.silent_response("resp_c3");
    assert_check_in(&h.tick_after(second * 8));
    h.silent_response("resp_c4");

    // Two check-ins unanswered: the next quiet period ends the call.
    let sent = to_agent(&h.tick_after(second * 8));
    assert_eq!(sent.len(), 1, "{sent:?}");
    let instructions = speech_only_response(&sent[0]);
    assert!(instructions.contains("goodbye"), "{instructions}");
    h.created("resp_bye");
    h.delta("resp_bye", "item_bye", FRAME);
    assert!(!ended(&h.done("resp_bye")));
    let actions = h.echo("m2");
    let plan = plan(&actions);
    assert_eq!(plan.reason, EndReason::Silence);
    assert_eq!(plan.rest_hang_up, RestHangUp::BeforeClosing);
    assert_eq!(plan.close_code, 1000);
}

#[test]
fn silence_is_not_counted_while_a_response_runs_or_a_tool_is_pending() {
    let second = Duration::from_secs(1);
    let mut h = Harness::acting(silent_caller_agent());
    h.ready();
    let t0 = h.now;
    h.created("resp_1");
    assert_eq!(h.core.poll_timeout(), Some(t0 + HOUR));
    assert!(to_agent(&h.tick_after(second * 20)).is_empty());
    let (task, ..) = business_request(&h.call("resp_1", "call_1", "lookup_order", "{}"));
    h.done("resp_1");
    // Only the holding sentence is due, no check-in.
    let sent = to_agent(&h.tick_after(HOLDING_AFTER));
    assert_eq!(speech_only_response(&sent[0]), HOLDING_INSTRUCTIONS);
    h.silent_response("resp_hold");
    assert!(to_agent(&h.tick_after(second * 20)).is_empty());
    h.answer(task, 200, "x");
    h.silent_response("resp_2");
    let quiet_from = h.now;
    assert_eq!(h.core.poll_timeout(), Some(quiet_from + second * 8));
}

// --- Context at call start.

fn context_agent() -> AgentProfile {
    AgentProfile {
        greeting: Some("Greet the caller.".into()),
        context_url: Some(CONTEXT_URL.into()),
        ..acting_agent()
    }
}

const ANSWER: &str =
    r#"{"instructions":"X","context":"Y","greeting":"Z {{name}}","variables":{"name":"Ada"}}"#;

fn system_text(event: &Value) -> &str {
    assert_eq!(event["type"], "conversation.item.create", "{event}");
    assert_eq!(event["item"]["role"], "system", "{event}");
    event["item"]["content"][0]["text"].as_str().unwrap()
}

#[test]
fn the_business_context_is_asked_for_beside_the_session_and_applied_before_anything_is_said() {
    let mut h = Harness::acting(context_agent());
    h.feed(Input::AgentTransportReady);
    let started = h.start();
    assert!(started.contains(&Action::OpenAgent {
        model: "gpt-realtime-mini".into()
    }));
    let (task, url, body, timeout) = business_request(&started);
    assert_eq!(url, CONTEXT_URL);
    assert_eq!(timeout, Duration::from_millis(1500));
    assert_eq!(
        body,
        json!({"type": "call.context", "call_sid": CALL_SID, "agent": "support",
            "caller": FROM, "business": TO, "channel": "whatsapp", "direction": "inbound",
            "variables": {}})
    );
    assert!(to_agent(&h.feed(Input::AgentOpened)).is_empty());
    assert_eq!(h.core.agent_link(), &AgentLink::AwaitingContext);

    let sent = to_agent(&h.answer(task, 200, ANSWER));
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert_eq!(sent[0]["type"], "session.update");
    assert_eq!(sent[0]["session"]["instructions"], "Be brief.\n\nX");
    assert_eq!(system_text(&sent[1]), "Y");
    assert_eq!(system_text(&sent[2]), "Z Ada");
    assert_eq!(sent[3], response_create());
    assert_eq!(h.core.agent_link(), &AgentLink::Ready);
    assert!(h.metric(r#"callbridge_context_requests_total{outcome="ok"} 1"#));
}

#[test]
fn an_answer_before_the_session_opens_is_applied_when_it_does() {
    let mut h = Harness::acting(context_agent());
    h.feed(Input::AgentTransportReady);
    let (task, ..) = business_request(&h.start());
    assert!(to_agent(&h.answer(task, 200, ANSWER)).is_empty());
    let sent = to_agent(&h.feed(Input::AgentOpened));
    assert_eq!(sent[0]["session"]["instructions"], "Be brief.\n\nX");
    assert_eq!(sent.len(), 4);
}

#[test]
fn a_late_context_leaves_the_agent_its_own_settings_and_is_never_applied() {
    let mut h = Harness::acting(context_agent());
    h.feed(Input::AgentTransportReady);
    let started_at = h.now;
    let (task, ..) = business_request(&h.start());
    h.feed(Input::AgentOpened);
    assert_eq!(
        h.core.poll_timeout(),
        Some(started_at + Duration::from_millis(1500))
    );
    assert!(to_agent(&h.tick_after(Duration::from_millis(1499))).is_empty());
    let actions = h.tick_after(Duration::from_millis(1));
    let sent = to_agent(&actions);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(sent[0]["session"]["instructions"], "Be brief.");
    assert_eq!(system_text(&sent[1]), "Greet the caller.");
    assert_eq!(sent[2], response_create());
    let failed = events_of(&actions, "context_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, "timeout");
    assert!(h.metric(r#"callbridge_context_requests_total{outcome="timeout"} 1"#));

    let late = h.answer(task, 200, ANSWER);
    assert!(late.is_empty(), "{late:?}");
}

#[test]
fn a_refused_or_unusable_context_configures_the_agent_at_once() {
    for (status, body) in [
        (500, ANSWER),
        (200, "not json"),
        (200, "[1]"),
        // An array is no answer either, though serde could read it field by field.
        (200, r#"["Be rude."]"#),
        (200, r#"{"greeting": 5}"#),
    ] {
        let mut h = Harness::acting(context_agent());
        h.feed(Input::AgentTransportReady);
        let (task, ..) = business_request(&h.start());
        h.feed(Input::AgentOpened);
        let actions = h.answer(task, status, body);
        let sent = to_agent(&actions);
        assert_eq!(
            sent[0]["session"]["instructions"], "Be brief.",
            "{status} {body}"
        );
        assert_eq!(events_of(&actions, "context_failed")[0].0, "refused");
        assert_eq!(h.core.agent_link(), &AgentLink::Ready);
    }
}

#[test]
fn an_outbound_calls_context_request_carries_the_variables_post_calls_stored() {
    let mut h = Harness::acting(AgentProfile {
        instructions: "Help {{name}}.".into(),
        ..context_agent()
    });
    h.feed(Input::AgentTransportReady);
    let started = h.start_outbound();
    let lookup = spawned(&started);
    assert_eq!(
        spawns(&started),
        1,
        "the context request waits for the variables"
    );
    assert!(to_agent(&h.feed(Input::AgentOpened)).is_empty());
    let brief = OutboundBrief {
        context: None,
        variables: [("name".to_owned(), "Grace".to_owned())].into(),
    };
    let looked_up_at = h.now;
    let actions = h.feed(Input::TaskDone(
        lookup,
        TaskOutput::CallContext(Ok(Some(brief))),
    ));
    assert!(to_agent(&actions).is_empty());
    let (task, _, body, _) = business_request(&actions);
    assert_eq!(body["variables"], json!({"name": "Grace"}));
    assert_eq!(body["direction"], "outbound");
    assert_eq!(body["caller"], TO);
    assert_eq!(
        h.core.poll_timeout(),
        Some(looked_up_at + Duration::from_millis(1500))
    );
    // The answer's variables win over the stored ones.
    let sent = to_agent(&h.answer(task, 200, ANSWER));
    assert_eq!(sent[0]["session"]["instructions"], "Help Ada.\n\nX");
    assert!(system_text(&sent[1]).contains("outbound call"));
    assert_eq!(system_text(&sent[2]), "Y");
    assert_eq!(system_text(&sent[3]), "Z Ada");
    assert_eq!(sent[4], response_create());
}

// --- Review findings.

#[test]
fn a_tool_still_out_when_the_call_ends_is_recorded_as_such() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    h.call("resp_1", "call_1", "lookup_order", r#"{"order_id":"42"}"#);
    let actions = h.twilio(json!({"event": "stop"}));
    let recorded = events_of(&actions, "tool_call");
    assert_eq!(recorded.len(), 1, "{actions:?}");
    assert_eq!(recorded[0].1.as_deref(), Some("call_ended"));
    assert!(h.metric(r#"callbridge_tool_calls_total{tool="lookup_order",outcome="call_ended"} 1"#));
}

#[test]
fn a_second_ending_while_one_is_under_way_is_refused_and_recorded() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    h.delta("resp_1", "item_1", FRAME);
    h.call("resp_1", "call_1", "end_call", "{}");
    let actions = h.call("resp_1", "call_2", "end_call", "{}");
    let recorded = events_of(&actions, "tool_call");
    assert_eq!(recorded[0].1.as_deref(), Some("refused"), "{actions:?}");
    let sent = to_agent(&h.done("resp_1"));
    assert_eq!(sent.len(), 2, "two outputs and no response: {sent:?}");
    assert!(error_in(&sent[1]).contains("already ending"), "{sent:?}");
}

#[test]
fn a_made_up_tool_name_is_counted_as_unknown() {
    let mut h = Harness::acting(acting_agent());
    h.ready();
    h.created("resp_1");
    h.call("resp_1", "call_1", "rm_rf_everything", "{}");
    assert!(h.metric(r#"callbridge_tool_calls_total{tool="unknown",outcome="unknown_tool"} 1"#));
}
