//! The call core on its own: inputs in, actions out. No sockets, no runtime, no database; time
//! is whatever instant the test passes in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::admission::StreamGrant;
use crate::call::ending::RestHangUp;
use crate::call::leg::TwilioLeg;
use crate::call::test_frames::{STREAM_SID, start_event};
use crate::twilio::ids::{AccountSid, CallSid, StreamSid};

const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
const OTHER_ACCOUNT_SID: &str = "ACffffffffffffffffffffffffffffffff";
const CALL_SID: &str = "CA0123456789abcdef0123456789abcdef";
const OTHER_CALL_SID: &str = "CAffffffffffffffffffffffffffffffff";
const TOKEN: &str = "q5mAbcDEFghiJKLmnoPQRs";

struct Harness {
    core: CallCore<TwilioLeg>,
    metrics: Arc<Metrics>,
    now: Instant,
}

fn agent() -> AgentProfile {
    AgentProfile::new("support", "Be brief.", "cedar", "gpt-realtime-mini")
}

impl Harness {
    fn new() -> Self {
        Self::with(agent(), CallSettings::default())
    }

    fn with(agent: AgentProfile, settings: CallSettings) -> Self {
        let metrics = Arc::new(Metrics::default());
        let now = Instant::now();
        let core = CallCore::new(
            TwilioLeg::default(),
            CallSetup {
                grant: StreamGrant {
                    token: TOKEN.into(),
                    call_sid: CallSid::parse(CALL_SID).unwrap(),
                },
                account_sid: AccountSid::parse(ACCOUNT_SID).unwrap(),
                agents: Arc::new(Agents::single(agent)),
                settings,
                metrics: Arc::clone(&metrics),
                accepted_at: now,
                accepted_at_ms: 1_800_000_000_000,
            },
        );
        Self { core, metrics, now }
    }

    fn feed(&mut self, input: Input<'_>) -> Vec<Action> {
        self.core.handle(input, self.now);
        self.actions()
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.core.poll_action()).collect()
    }

    fn twilio(&mut self, event: Value) -> Vec<Action> {
        let text = event.to_string();
        self.feed(Input::MediaText(&text))
    }

    fn agent(&mut self, event: Value) -> Vec<Action> {
        let text = event.to_string();
        self.feed(Input::AgentText(&text))
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    fn start_as(&mut self, account_sid: &str, call_sid: &str, token: &str) -> Vec<Action> {
        self.start_with(account_sid, call_sid, token, "inbound")
    }

    fn start_with(
        &mut self,
        account_sid: &str,
        call_sid: &str,
        token: &str,
        direction: &str,
    ) -> Vec<Action> {
        self.twilio(start_event(account_sid, call_sid, token, direction))
    }

    fn start(&mut self) -> Vec<Action> {
        self.start_as(ACCOUNT_SID, CALL_SID, TOKEN)
    }

    /// The `start` of a call placed by `POST /calls`, whose context is looked up.
    fn start_outbound(&mut self) -> Vec<Action> {
        self.start_with(ACCOUNT_SID, CALL_SID, TOKEN, "outbound-api")
    }

    /// Transport ready, `start` checked, session open: audio flows.
    fn ready(&mut self) -> Vec<Action> {
        let mut actions = self.feed(Input::AgentTransportReady);
        actions.extend(self.start());
        actions.extend(self.feed(Input::AgentOpened));
        assert_eq!(self.core.agent_link(), &AgentLink::Ready);
        actions
    }

    fn media(&mut self, payload: &str) -> Vec<Action> {
        self.twilio(json!({"event": "media", "media": {"payload": payload}}))
    }

    fn delta(&mut self, response: &str, item: &str, payload: &str) -> Vec<Action> {
        self.agent(json!({
            "type": "response.output_audio.delta",
            "response_id": response,
            "item_id": item,
            "output_index": 0,
            "content_index": 0,
            "delta": payload
        }))
    }
}

fn spawned(actions: &[Action]) -> TaskId {
    actions
        .iter()
        .find_map(|action| match action {
            Action::Spawn(id, SideTask::LookupCallContext { .. }) => Some(*id),
            _ => None,
        })
        .expect("the call's context is looked up")
}

fn to_agent(actions: &[Action]) -> Vec<Value> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::ToAgent(text) => Some(serde_json::from_str(text).unwrap()),
            _ => None,
        })
        .collect()
}

fn to_media(actions: &[Action]) -> Vec<Value> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::ToMedia(text) => Some(serde_json::from_str(text).unwrap()),
            _ => None,
        })
        .collect()
}

fn plan(actions: &[Action]) -> &EndPlan {
    match actions.last() {
        Some(Action::End(plan)) => plan,
        other => panic!("the call did not end: last action {other:?}"),
    }
}

/// 160 µ-law bytes (20 ms), base64.
const FRAME: &str = "/////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////////w==";

fn frame_of(byte: char) -> String {
    // 20 ms of audio, distinct per caller frame so order is visible.
    let mut payload: String = std::iter::repeat_n(byte, 212).collect();
    payload.push_str("AA==");
    payload
}

#[test]
fn the_transport_is_prepared_at_once_but_nothing_is_opened_before_start() {
    let mut h = Harness::new();
    assert_eq!(h.actions(), vec![Action::PreconnectAgent]);
    assert_eq!(h.core.agent_link(), &AgentLink::Preconnecting);
    assert!(h.feed(Input::AgentTransportReady).is_empty());
    assert_eq!(h.core.agent_link(), &AgentLink::Preconnected);

    let actions = h.start();
    assert!(actions.contains(&Action::OpenAgent {
        model: "gpt-realtime-mini".into()
    }));
    assert_eq!(h.core.agent_link(), &AgentLink::Opening);
    assert!(matches!(h.core.media_link(), MediaLink::Streaming { .. }));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Spawn(..))),
        "an inbound call has no stored context to look up"
    );
}

#[test]
fn a_start_before_the_transport_is_ready_opens_as_soon_as_it_is() {
    let mut h = Harness::new();
    h.actions();
    let actions = h.start();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::OpenAgent { .. }))
    );
    assert_eq!(h.core.agent_link(), &AgentLink::Authorised);
    let actions = h.feed(Input::AgentTransportReady);
    assert_eq!(
        actions,
        vec![Action::OpenAgent {
            model: "gpt-realtime-mini".into()
        }]
    );
}

#[test]
fn a_start_that_fails_any_check_never_opens_a_session() {
    for (account, call, token) in [
        (OTHER_ACCOUNT_SID, CALL_SID, TOKEN),
        (ACCOUNT_SID, OTHER_CALL_SID, TOKEN),
        (ACCOUNT_SID, CALL_SID, "another-token"),
        (ACCOUNT_SID, CALL_SID, ""),
    ] {
        let mut h = Harness::new();
        h.feed(Input::AgentTransportReady);
        let actions = h.start_as(account, call, token);
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::OpenAgent { .. } | Action::Spawn(..))),
            "{account} {call} {token}: {actions:?}"
        );
        let plan = plan(&actions);
        assert_eq!(plan.reason, EndReason::Unauthorized);
        assert_eq!(plan.close_code, 1008);
        assert_eq!(
            plan.call_sid, None,
            "nothing of the refused call is hung up"
        );
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Record(_))),
            "a refused stream records nothing: {actions:?}"
        );
    }
}

#[test]
fn the_agent_is_configured_with_its_own_settings_and_the_calls_context_first() {
    let greeting = AgentProfile {
        greeting: Some("Greet the caller.".into()),
        ..agent()
    };
    let mut h = Harness::with(greeting, CallSettings::default());
    h.feed(Input::AgentTransportReady);
    let task = spawned(&h.start_outbound());
    // The session opens before the context is read: nothing is sent until both are there.
    assert!(to_agent(&h.feed(Input::AgentOpened)).is_empty());
    assert_eq!(h.core.agent_link(), &AgentLink::AwaitingContext);
    let context = OutboundBrief {
        context: Some("Order 42 is late.".into()),
        variables: Default::default(),
    };
    let sent = to_agent(&h.feed(Input::TaskDone(
        task,
        TaskOutput::CallContext(Ok(Some(context))),
    )));
    assert_eq!(sent[0]["type"], "session.update");
    assert_eq!(sent[0]["session"]["instructions"], "Be brief.");
    assert_eq!(sent[0]["session"]["audio"]["output"]["voice"], "cedar");
    let brief = sent[1]["item"]["content"][0]["text"].as_str().unwrap();
    assert!(
        brief.contains("outbound call") && brief.contains("Order 42"),
        "{brief}"
    );
    assert_eq!(sent[2]["item"]["content"][0]["text"], "Greet the caller.");
    assert_eq!(sent[3]["type"], "response.create");
    assert_eq!(sent.len(), 4);
}

#[test]
fn a_failed_context_lookup_still_configures_the_agent() {
    let mut h = Harness::new();
    h.feed(Input::AgentTransportReady);
    let task = spawned(&h.start_outbound());
    h.feed(Input::AgentOpened);
    let sent = to_agent(&h.feed(Input::TaskDone(
        task,
        TaskOutput::CallContext(Err("database is down".into())),
    )));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["type"], "session.update");
    assert_eq!(h.core.agent_link(), &AgentLink::Ready);
}

#[test]
fn caller_audio_before_the_agent_is_ready_is_held_in_order_then_sent_after_the_update() {
    let mut h = Harness::new();
    h.feed(Input::AgentTransportReady);
    let task = spawned(&h.start_outbound());
    let early: Vec<String> = "abc".chars().map(frame_of).collect();
    for payload in &early {
        assert!(to_agent(&h.media(payload)).is_empty());
    }
    h.feed(Input::AgentOpened);
    let sent = to_agent(&h.feed(Input::TaskDone(task, TaskOutput::CallContext(Ok(None)))));
    assert_eq!(sent[0]["type"], "session.update");
    let appended: Vec<&str> = sent[1..]
        .iter()
        .map(|event| event["audio"].as_str().unwrap())
        .collect();
    assert_eq!(appended, early);
    assert_eq!(h.metrics.frames_buffered_before_agent.get(), 3);
}

#[test]
fn held_audio_is_bounded_by_duration_and_the_oldest_goes_first() {
    let settings = CallSettings {
        max_buffered_audio: Duration::from_millis(40),
        ..CallSettings::default()
    };
    let mut h = Harness::with(agent(), settings);
    h.feed(Input::AgentTransportReady);
    h.start();
    let frames: Vec<String> = "abcde".chars().map(frame_of).collect();
    for payload in &frames {
        h.media(payload);
    }
    let sent = to_agent(&h.feed(Input::AgentOpened));
    let appended: Vec<&str> = sent[1..]
        .iter()
        .map(|event| event["audio"].as_str().unwrap())
        .collect();
    assert_eq!(appended, [&frames[3], &frames[4]]);
    assert_eq!(h.metrics.frames_dropped_buffer_full.get(), 3);
}

#[test]
fn audio_passes_through_both_ways_as_one_action_each_with_the_payload_unchanged() {
    let mut h = Harness::new();
    h.ready();
    let caller = h.media(FRAME);
    assert_eq!(caller.len(), 1);
    let sent = to_agent(&caller);
    assert_eq!(sent[0]["type"], "input_audio_buffer.append");
    assert_eq!(sent[0]["audio"], FRAME);

    let played = to_media(&h.delta("resp_1", "item_1", FRAME));
    assert_eq!(played.len(), 2, "media, then its mark");
    assert_eq!(played[0]["event"], "media");
    assert_eq!(played[0]["streamSid"], STREAM_SID);
    assert_eq!(played[0]["media"]["payload"], FRAME);
    assert_eq!(played[1]["event"], "mark");
    assert_eq!(played[1]["mark"]["name"], "m1");
}

#[test]
fn media_before_start_and_a_second_start_are_counted_and_ignored() {
    let mut h = Harness::new();
    h.actions();
    assert!(h.media(FRAME).is_empty());
    h.ready();
    assert!(h.start().is_empty());
    assert_eq!(h.metrics.malformed_from_twilio.get(), 2);
    assert!(!h.core.is_ended());
}

#[test]
fn barge_in_sends_clear_before_anything_else_then_truncates_at_what_was_heard() {
    let mut h = Harness::new();
    h.ready();
    h.agent(json!({"type": "response.created", "response": {"id": "resp_1"}}));
    for _ in 0..5 {
        h.delta("resp_1", "item_1", FRAME);
    }
    // The agent's line arrives while its audio still plays: recorded in full, corrected later.
    let recorded = h.agent(json!({
        "type": "response.output_audio_transcript.done",
        "response_id": "resp_1",
        "item_id": "item_1",
        "output_index": 0,
        "content_index": 0,
        "transcript": "one two three four five six seven eight nine ten"
    }));
    assert!(matches!(recorded[0], Action::RecordDurably(_)));
    // Twilio has played two of the five frames (40 ms) when the caller speaks.
    h.twilio(json!({"event": "mark", "mark": {"name": "m2"}}));

    let actions = h.agent(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 900, "item_id": "item_2"}));
    let Action::ToMedia(first) = &actions[0] else {
        panic!("clear is not first: {actions:?}")
    };
    assert_eq!(
        serde_json::from_str::<Value>(first).unwrap(),
        json!({"event": "clear", "streamSid": STREAM_SID})
    );
    let sent = to_agent(&actions);
    assert_eq!(sent.len(), 1, "the session cancels by itself: {sent:?}");
    assert_eq!(sent[0]["type"], "conversation.item.truncate");
    assert_eq!(sent[0]["item_id"], "item_1");
    // min(sent 100 ms, played 40 ms + 50 ms).
    assert_eq!(sent[0]["audio_end_ms"], 90);
    assert!(matches!(
        &actions[actions.len() - 2],
        Action::RecordDurably(Record::TranscriptCorrection {
            truncated: true,
            ..
        })
    ));
    // The barge-in goes into the call's history, with how much of each item was heard.
    let Some(Action::Record(Record::Event {
        kind, name, data, ..
    })) = actions.last()
    else {
        panic!("the barge-in is not recorded last: {actions:?}")
    };
    assert_eq!((*kind, name.as_str()), ("barge_in", "caller"));
    assert_eq!(data.as_ref(), Some(&json!({"heard_ms": [90]})));
    // Later deltas of the interrupted response are dropped.
    assert!(h.delta("resp_1", "item_1", FRAME).is_empty());
    assert_eq!(h.metrics.dropped_interrupted_deltas.get(), 1);
}

#[test]
fn speaking_follows_the_callers_turns_and_the_agents_unplayed_audio() {
    use crate::call::speaking::Speaking;
    let mut h = Harness::new();
    h.ready();
    assert_eq!(h.core.speaking(), Speaking::default());
    h.agent(json!({"type": "input_audio_buffer.speech_started"}));
    assert_eq!(h.core.speaking().label(), "caller");
    h.agent(json!({"type": "input_audio_buffer.speech_stopped"}));
    assert_eq!(h.core.speaking().label(), "nobody");
    h.agent(json!({"type": "response.created", "response": {"id": "resp_1"}}));
    h.delta("resp_1", "item_1", FRAME);
    h.delta("resp_1", "item_1", FRAME);
    assert_eq!(h.core.speaking().label(), "agent");
    // Twilio played the first frame only: the agent is still being heard.
    h.twilio(json!({"event": "mark", "mark": {"name": "m1"}}));
    assert_eq!(h.core.speaking().label(), "agent");
    h.twilio(json!({"event": "mark", "mark": {"name": "m2"}}));
    assert_eq!(h.core.speaking().label(), "nobody");
}

#[test]
fn speech_while_a_response_is_active_but_before_its_audio_cancels_it_without_clear() {
    let mut h = Harness::new();
    h.ready();
    h.agent(json!({
        "type": "session.updated",
        "session": {"audio": {"input": {"turn_detection": {"type": "server_vad", "interrupt_response": false}}}}
    }));
    h.agent(json!({"type": "response.created", "response": {"id": "resp_1"}}));
    let actions = h.agent(json!({"type": "input_audio_buffer.speech_started"}));
    assert!(to_media(&actions).is_empty(), "nothing played: no clear");
    let sent = to_agent(&actions);
    assert_eq!(sent, vec![json!({"type": "response.cancel"})]);
    assert!(
        actions.iter().any(|action| matches!(
            action,
            Action::Record(Record::Event { kind: "barge_in", data: Some(data), .. })
                if data == &json!({"heard_ms": []})
        )),
        "the barge-in is recorded: {actions:?}"
    );
    // The response is dropped: its audio never reaches the caller.
    assert!(h.delta("resp_1", "item_1", FRAME).is_empty());
}

#[test]
fn speech_while_the_agent_is_silent_interrupts_nothing() {
    let mut h = Harness::new();
    h.ready();
    assert!(
        h.agent(json!({"type": "input_audio_buffer.speech_started"}))
            .is_empty()
    );
    assert_eq!(h.metrics.barge_ins.get(), 0);
}

#[test]
fn a_transport_failure_before_start_ends_the_call_at_start() {
    let mut h = Harness::new();
    h.actions();
    assert!(
        h.feed(Input::AgentTransportFailed("refused".into()))
            .is_empty()
    );
    assert_eq!(h.core.agent_link(), &AgentLink::Failed);
    let actions = h.start();
    let plan = plan(&actions);
    assert_eq!(plan.reason, EndReason::AgentUnreachable);
    assert_eq!(plan.rest_hang_up, RestHangUp::AfterApology);
    assert_eq!(plan.close_code, 1011);
}

#[test]
fn a_failed_open_ends_with_the_apology() {
    let mut h = Harness::new();
    h.feed(Input::AgentTransportReady);
    h.start();
    let actions = h.feed(Input::AgentOpenFailed("401".into()));
    assert_eq!(plan(&actions).reason, EndReason::AgentUnreachable);
    assert_eq!(h.core.agent_link(), &AgentLink::Failed);
}

/// Ends a ready call with `end` and checks the core's verdict, the record, and that nothing after
/// the end does anything.
fn assert_ends(
    name: &str,
    end: impl FnOnce(&mut Harness) -> Vec<Action>,
    expected: (EndReason, u16, RestHangUp),
) {
    let mut h = Harness::new();
    h.ready();
    let actions = end(&mut h);
    let plan = plan(&actions);
    assert_eq!(
        (plan.reason, plan.close_code, plan.rest_hang_up),
        expected,
        "{name}"
    );
    let reason = expected.0;
    assert_eq!(
        plan.call_sid.as_ref().map(CallSid::as_str),
        Some(CALL_SID),
        "{name}"
    );
    let ended = actions.iter().find_map(|a| match a {
        Action::RecordDurably(Record::CallEnded { end_reason, .. }) => Some(*end_reason),
        _ => None,
    });
    assert_eq!(ended, Some(reason.label()), "{name}: the end is recorded");
    assert!(h.core.is_ended());
    assert_eq!(h.core.poll_timeout(), None);
    assert_eq!(h.metrics.calls_ended(reason), 1, "{name}");
    // Nothing after the end does anything, even another ending.
    assert!(h.feed(Input::Shutdown).is_empty(), "{name}");
    assert!(h.media(FRAME).is_empty(), "{name}");
}

#[test]
fn every_way_the_media_leg_ends_a_call_has_its_reason_and_close_code() {
    use RestHangUp::Never;
    let stop = json!({"event": "stop", "streamSid": STREAM_SID});
    let hung_up = (EndReason::CallerHungUp, 1000, Never);
    assert_ends("stop", |h| h.twilio(stop), hung_up);
    assert_ends("close", |h| h.feed(Input::MediaClosed), hung_up);
    assert_ends("send failed", |h| h.feed(Input::MediaSendFailed), hung_up);
    let oversized = (EndReason::FrameTooLarge, 1009, Never);
    assert_ends("oversized", |h| h.feed(Input::MediaOverflow), oversized);
    let not_utf8 = (EndReason::InvalidText, 1007, Never);
    assert_ends("not utf-8", |h| h.feed(Input::MediaInvalidText), not_utf8);
    let broken = (EndReason::ProtocolError, 1002, Never);
    let input = || Input::MediaBroken("bad opcode".into());
    assert_ends("broken", |h| h.feed(input()), broken);
}

/// Loses the session with `loss`, then has each of the three attempts at a new one fail;
/// returns the actions of the last failure.
fn lose_and_fail_reconnects(h: &mut Harness, loss: Input<'_>) -> Vec<Action> {
    let actions = h.feed(loss);
    assert!(actions.contains(&Action::CloseAgent), "{actions:?}");
    assert!(!h.core.is_ended(), "a new session is tried first");
    let mut last = Vec::new();
    for delay in [0, 500, 2000] {
        h.advance(Duration::from_millis(delay));
        assert_eq!(
            h.core.poll_timeout(),
            Some(h.now),
            "attempt after {delay} ms"
        );
        assert!(h.feed(Input::Timer).contains(&Action::PreconnectAgent));
        last = h.feed(Input::AgentTransportFailed("refused".into()));
    }
    last
}

#[test]
fn every_way_the_agent_or_a_drain_ends_a_call_has_its_reason_close_code_and_hang_up() {
    let failed = (EndReason::AgentFailed, 1011, RestHangUp::AfterApology);
    // A lost session is replaced first; the call ends once three new ones were refused.
    let closed = || Input::AgentClosed("1000".into());
    assert_ends(
        "agent closed",
        |h| lose_and_fail_reconnects(h, closed()),
        failed,
    );
    let broken = || Input::AgentBroken("reset".into());
    assert_ends(
        "agent broken",
        |h| lose_and_fail_reconnects(h, broken()),
        failed,
    );
    assert_ends(
        "refused a frame",
        |h| lose_and_fail_reconnects(h, Input::AgentSendFailed),
        failed,
    );
    let fatal = json!({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_api_key", "message": "bad key"}});
    assert_ends("fatal error", |h| h.agent(fatal), failed);
    let drain = (EndReason::Shutdown, 1012, RestHangUp::BeforeClosing);
    assert_ends("shutdown", |h| h.feed(Input::Shutdown), drain);
}

#[test]
fn a_side_tasks_result_after_the_end_is_ignored() {
    let mut h = Harness::new();
    h.feed(Input::AgentTransportReady);
    let task = spawned(&h.start_outbound());
    h.feed(Input::AgentOpened);
    h.feed(Input::MediaClosed);
    let late = h.feed(Input::TaskDone(task, TaskOutput::CallContext(Ok(None))));
    assert!(late.is_empty(), "{late:?}");
}

#[test]
fn a_result_for_another_task_is_ignored() {
    let mut h = Harness::new();
    h.feed(Input::AgentTransportReady);
    let task = spawned(&h.start_outbound());
    h.feed(Input::AgentOpened);
    let stale = TaskId(task.0 + 100);
    assert!(
        h.feed(Input::TaskDone(stale, TaskOutput::CallContext(Ok(None))))
            .is_empty()
    );
    assert_eq!(h.core.agent_link(), &AgentLink::AwaitingContext);
}

#[test]
fn a_stream_that_never_starts_times_out_at_its_deadline() {
    let mut h = Harness::new();
    h.actions();
    let deadline = h.core.poll_timeout().unwrap();
    assert_eq!(deadline, h.now + CallSettings::default().start_timeout);
    h.advance(CallSettings::default().start_timeout);
    let actions = h.feed(Input::Timer);
    let plan = plan(&actions);
    assert_eq!(plan.reason, EndReason::Timeout);
    assert_eq!(plan.rest_hang_up, RestHangUp::Never, "no call to hang up");
}

#[test]
fn heartbeats_ping_both_peers_and_a_silent_peer_times_out() {
    let settings = CallSettings {
        heartbeat_interval: Duration::from_secs(1),
        peer_timeout: Duration::from_millis(2500),
        ..CallSettings::default()
    };
    let mut h = Harness::with(agent(), settings);
    h.ready();
    h.advance(Duration::from_secs(1));
    assert_eq!(
        h.feed(Input::Timer),
        vec![Action::PingMedia, Action::PingAgent]
    );
    // Twilio answers, OpenAI stays silent.
    h.advance(Duration::from_secs(1));
    h.feed(Input::MediaAlive);
    assert_eq!(
        h.feed(Input::Timer),
        vec![Action::PingMedia, Action::PingAgent]
    );
    h.advance(Duration::from_secs(1));
    h.feed(Input::MediaAlive);
    let actions = h.feed(Input::Timer);
    assert_eq!(plan(&actions).reason, EndReason::Timeout);
}

#[test]
fn an_early_timer_does_nothing() {
    let mut h = Harness::new();
    h.ready();
    h.advance(Duration::from_millis(10));
    assert!(h.feed(Input::Timer).is_empty());
}

#[test]
fn pings_from_twilio_are_answered_with_their_payload() {
    let mut h = Harness::new();
    h.actions();
    assert_eq!(
        h.feed(Input::MediaPing(b"hi".to_vec())),
        vec![Action::PongMedia(b"hi".to_vec())]
    );
}

#[test]
fn the_summary_has_the_transcript_in_order_with_speakers_and_usage() {
    let mut h = Harness::new();
    h.ready();
    h.agent(json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_0", "content_index": 0, "transcript": " Hello? "}));
    h.agent(json!({"type": "response.done", "response": {"id": "resp_1", "status": "completed", "usage": {"input_tokens": 10, "output_tokens": 20, "total_tokens": 30}}}));
    h.advance(Duration::from_secs(3));
    h.feed(Input::MediaClosed);
    let summary = h.core.summary();
    assert_eq!(
        summary.call_sid.as_ref().map(CallSid::as_str),
        Some(CALL_SID)
    );
    assert_eq!(
        summary.stream_sid.as_ref().map(StreamSid::as_str),
        Some(STREAM_SID)
    );
    assert_eq!(summary.transcript.len(), 1);
    assert_eq!(summary.transcript[0].speaker, Speaker::Caller);
    assert_eq!(summary.transcript[0].text, "Hello?");
    assert_eq!(summary.usage.total_tokens, 30);
    assert_eq!(summary.duration, Duration::from_secs(3));
}

mod acting;
mod properties;
mod survival;
