//! Keeping the call across OpenAI sessions, through the core's inputs and actions only: a lost
//! session replaced with the conversation re-seeded and the gap's audio held, and a rollover
//! whose successor is prepared beside the session in use and takes over at a quiet moment.

use super::*;

fn rolling_settings() -> CallSettings {
    CallSettings {
        session_rollover: Duration::from_secs(3),
        heartbeat_interval: Duration::from_secs(3600),
        ..CallSettings::default()
    }
}

fn to_standby(actions: &[Action]) -> Vec<Value> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::ToStandby(text) => Some(serde_json::from_str(text).unwrap()),
            _ => None,
        })
        .collect()
}

const MODEL: &str = "gpt-realtime-mini";

fn dial_standby() -> Action {
    Action::DialStandby {
        model: MODEL.into(),
    }
}

const R0_DONE: &str = r#"{"type":"response.done","response":{"id":"r0","status":"completed"}}"#;

/// A call whose session came of age while a response (`r0`, without audio) runs: its
/// successor is dialled and open, waiting for `R0_DONE` to make the moment quiet.
fn with_open_standby() -> Harness {
    let mut h = Harness::with(agent(), rolling_settings());
    h.ready();
    h.agent(json!({"type":"conversation.item.input_audio_transcription.completed","item_id":"u1","content_index":0,"transcript":"Where is my order?"}));
    h.agent(json!({"type":"response.created","response":{"id":"r0"}}));
    h.advance(Duration::from_secs(3));
    assert_eq!(h.feed(Input::Timer), vec![dial_standby()]);
    let configured = to_standby(&h.feed(Input::StandbyOpened));
    assert_eq!(configured[0]["type"], "session.update");
    assert_eq!(configured[0]["session"]["instructions"], "Be brief.");
    h
}

#[test]
fn a_lost_session_is_replaced_reseeded_and_fed_the_audio_of_the_gap_in_order() {
    let mut h = Harness::new();
    h.ready();
    h.agent(json!({"type":"conversation.item.input_audio_transcription.completed","item_id":"u1","content_index":0,"transcript":"Where is my order?"}));
    h.agent(json!({"type":"response.output_audio_transcript.done","response_id":"r1","item_id":"a1","output_index":0,"content_index":0,"transcript":"It ships tomorrow."}));
    let lost = h.feed(Input::AgentBroken("reset".into()));
    assert!(lost.contains(&Action::CloseAgent), "{lost:?}");
    assert_eq!(h.core.agent_link(), &AgentLink::Closed);

    // The caller keeps talking while there is no session: held, not lost.
    let gap: Vec<String> = ['A', 'B', 'C'].into_iter().map(frame_of).collect();
    for payload in &gap {
        assert!(to_agent(&h.media(payload)).is_empty());
    }
    assert!(h.feed(Input::Timer).contains(&Action::PreconnectAgent));
    assert!(
        h.feed(Input::AgentTransportReady)
            .contains(&Action::OpenAgent {
                model: "gpt-realtime-mini".into()
            })
    );
    let sent = to_agent(&h.feed(Input::AgentOpened));
    assert_eq!(sent[0]["type"], "session.update");
    assert_eq!(sent[0]["session"]["instructions"], "Be brief.");
    assert_eq!(sent[1]["item"]["role"], "user");
    assert_eq!(
        sent[1]["item"]["content"][0],
        json!({"type":"input_text","text":"Where is my order?"})
    );
    assert_eq!(sent[2]["item"]["role"], "assistant");
    assert_eq!(
        sent[2]["item"]["content"][0],
        json!({"type":"output_text","text":"It ships tomorrow."})
    );
    let appended: Vec<&str> = sent[3..]
        .iter()
        .map(|event| event["audio"].as_str().unwrap())
        .collect();
    assert_eq!(appended, gap.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(h.core.agent_link(), &AgentLink::Ready);
    assert_eq!(h.metrics.agent_reconnected.get(), 1);
    // Audio flows straight to the new session again.
    assert_eq!(to_agent(&h.media(FRAME))[0]["audio"], FRAME);
}

#[test]
fn an_expired_session_moves_the_call_to_a_new_one_at_once() {
    let mut h = Harness::new();
    h.ready();
    let expired = json!({"type":"error","error":{"type":"invalid_request_error","code":"session_expired","message":"Your session hit the maximum duration of 60 minutes."}});
    let actions = h.agent(expired);
    assert!(actions.contains(&Action::CloseAgent), "{actions:?}");
    assert!(!h.core.is_ended());
    assert_eq!(h.core.poll_timeout(), Some(h.now), "dialled without delay");
    assert!(h.feed(Input::Timer).contains(&Action::PreconnectAgent));
}

#[test]
fn an_old_session_is_replaced_by_a_prepared_successor_at_the_next_quiet_moment_only() {
    let mut h = Harness::with(agent(), rolling_settings());
    h.ready();
    assert_eq!(h.core.poll_timeout(), Some(h.now + Duration::from_secs(3)));
    // The agent is talking when the session comes of age: its successor is prepared now, and
    // the old session keeps the call meanwhile.
    h.agent(json!({"type":"response.created","response":{"id":"r1"}}));
    h.delta("r1", "a1", FRAME);
    h.advance(Duration::from_secs(3));
    assert_eq!(h.feed(Input::Timer), vec![dial_standby()]);
    assert!(
        h.core.poll_timeout().is_none_or(|at| at > h.now),
        "no busy timer while it is dialled"
    );
    let opened = h.feed(Input::StandbyOpened);
    assert_eq!(to_standby(&opened)[0]["type"], "session.update");
    assert!(to_agent(&opened).is_empty(), "{opened:?}");
    let created = json!({"type":"session.created","session":{"id":"sess_2"}}).to_string();
    assert!(h.feed(Input::StandbyText(&created)).is_empty());
    // Caller audio still goes to the old session, and only there.
    let during = h.media(FRAME);
    assert_eq!(to_agent(&during)[0]["audio"], FRAME);
    assert!(to_standby(&during).is_empty());
    let done = h.agent(json!({"type":"response.done","response":{"id":"r1","status":"completed"}}));
    assert!(
        !done.contains(&Action::PromoteStandby),
        "its audio is still playing"
    );
    // The last mark echoed: nothing is playing, nothing is running.
    let quiet = h.twilio(json!({"event":"mark","mark":{"name":"m1"}}));
    assert_eq!(quiet[0], Action::PromoteStandby, "{quiet:?}");
    assert!(
        !quiet.contains(&Action::CloseAgent),
        "the driver closes the old one itself"
    );
    let reseed = to_agent(&quiet);
    assert!(
        reseed
            .iter()
            .all(|item| item["type"] == "conversation.item.create")
    );
    assert_eq!(h.core.agent_link(), &AgentLink::Ready);
    // From here the caller's audio goes straight to the successor.
    assert_eq!(to_agent(&h.media(FRAME))[0]["audio"], FRAME);
    assert_eq!(h.metrics.session_rolled_over.get(), 1);
    // The new session is young: the next rollover is a full period away.
    assert_eq!(h.core.poll_timeout(), Some(h.now + Duration::from_secs(3)));
    h.feed(Input::MediaClosed);
    assert_eq!(
        h.core.summary().openai_session_id.as_deref(),
        Some("sess_2")
    );
}

#[test]
fn the_successor_is_re_seeded_with_the_lines_said_up_to_the_switch() {
    let mut h = with_open_standby();
    // A line said after the successor was configured still reaches it.
    h.agent(json!({"type":"response.output_audio_transcript.done","response_id":"r0","item_id":"a1","output_index":0,"content_index":0,"transcript":"It ships tomorrow."}));
    let switched = h.agent(json!({"type":"response.done","response":{"id":"r0","status":"completed","usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}}));
    assert_eq!(switched[0], Action::PromoteStandby, "{switched:?}");
    let sent = to_agent(&switched);
    assert_eq!(sent[0]["item"]["content"][0]["text"], "Where is my order?");
    assert_eq!(sent[1]["item"]["content"][0]["text"], "It ships tomorrow.");
    assert_eq!(sent.len(), 2);
    assert_eq!(to_agent(&h.media(FRAME))[0]["audio"], FRAME);
    // Usage of the successor adds to the old session's.
    h.agent(json!({"type":"response.done","response":{"id":"r2","status":"completed","usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}}));
    h.feed(Input::MediaClosed);
    assert_eq!(h.core.summary().usage.total_tokens, 15);
}

#[test]
fn a_caller_speaking_holds_the_switch_until_the_answer_is_done() {
    let mut h = with_open_standby();
    h.agent(json!({"type":"input_audio_buffer.speech_started","audio_start_ms":0,"item_id":"u2"}));
    assert!(
        !h.feed(Input::AgentText(R0_DONE))
            .contains(&Action::PromoteStandby)
    );
    assert!(!h.media(FRAME).contains(&Action::PromoteStandby));
    // The end of speech makes the session answer: switching now would lose the question.
    let stopped = h.agent(
        json!({"type":"input_audio_buffer.speech_stopped","audio_end_ms":900,"item_id":"u2"}),
    );
    assert!(!stopped.contains(&Action::PromoteStandby), "{stopped:?}");
    assert!(!h.media(FRAME).contains(&Action::PromoteStandby));
    h.agent(json!({"type":"response.created","response":{"id":"r2"}}));
    let done = h.agent(json!({"type":"response.done","response":{"id":"r2","status":"completed"}}));
    assert_eq!(done[0], Action::PromoteStandby, "{done:?}");
}

#[test]
fn an_end_of_speech_no_answer_follows_holds_the_switch_only_for_a_while() {
    let mut h = with_open_standby();
    h.agent(json!({"type":"input_audio_buffer.speech_started","audio_start_ms":0,"item_id":"u2"}));
    h.feed(Input::AgentText(R0_DONE));
    h.agent(json!({"type":"input_audio_buffer.speech_stopped","audio_end_ms":900,"item_id":"u2"}));
    h.advance(Duration::from_secs(1));
    assert!(!h.media(FRAME).contains(&Action::PromoteStandby));
    h.advance(Duration::from_secs(2));
    let switched = h.media(FRAME);
    // This frame went to the old session; the switch follows it.
    assert_eq!(to_agent(&switched)[0]["audio"], FRAME);
    assert!(switched.contains(&Action::PromoteStandby), "{switched:?}");
}

#[test]
fn a_failed_successor_is_dialled_again_and_the_old_session_runs_on_after_the_last_attempt() {
    let mut h = Harness::with(agent(), rolling_settings());
    h.ready();
    h.advance(Duration::from_secs(3));
    assert_eq!(h.feed(Input::Timer), vec![dial_standby()]);
    assert!(h.feed(Input::StandbyFailed("refused".into())).is_empty());
    assert!(!h.core.is_ended());
    // Three attempts in all, as for a lost session: 0.5 s, then 2 s after a failure.
    for delay in [Duration::from_millis(500), Duration::from_secs(2)] {
        assert_eq!(h.core.poll_timeout(), Some(h.now + delay));
        h.advance(delay);
        assert_eq!(h.feed(Input::Timer), vec![dial_standby()]);
        h.feed(Input::StandbyFailed("refused".into()));
    }
    assert_eq!(h.core.agent_link(), &AgentLink::Ready);
    assert_eq!(h.metrics.session_rollover_failed.get(), 1);
    assert!(
        h.core
            .poll_timeout()
            .is_none_or(|at| at >= h.now + Duration::from_secs(60)),
        "no more attempts"
    );
    assert_eq!(to_agent(&h.media(FRAME))[0]["audio"], FRAME);
}

#[test]
fn a_successor_reporting_an_error_is_closed_and_dialled_again() {
    let mut h = with_open_standby();
    let error = json!({"type":"error","error":{"type":"server_error","code":"server_error","message":"boom"}}).to_string();
    let actions = h.feed(Input::StandbyText(&error));
    assert_eq!(actions, vec![Action::CloseStandby]);
    assert_eq!(
        h.core.poll_timeout(),
        Some(h.now + Duration::from_millis(500))
    );
    h.advance(Duration::from_millis(500));
    assert_eq!(h.feed(Input::Timer), vec![dial_standby()]);
    // A harmless race on the successor changes nothing.
    let benign = json!({"type":"error","error":{"type":"invalid_request_error","code":"response_cancel_not_active","message":"none"}}).to_string();
    to_standby(&h.feed(Input::StandbyOpened));
    assert!(h.feed(Input::StandbyText(&benign)).is_empty());
    assert_eq!(h.feed(Input::AgentText(R0_DONE))[0], Action::PromoteStandby);
}

#[test]
fn a_session_lost_while_its_successor_is_open_hands_over_without_a_gap() {
    let mut h = with_open_standby();
    h.agent(json!({"type":"input_audio_buffer.speech_started","audio_start_ms":0,"item_id":"u2"}));
    let expired = json!({"type":"error","error":{"type":"invalid_request_error","code":"session_expired","message":"Your session hit the maximum duration of 60 minutes."}});
    let lost = h.agent(expired);
    assert!(lost.contains(&Action::PromoteStandby), "{lost:?}");
    assert!(!lost.contains(&Action::CloseAgent), "{lost:?}");
    assert!(!lost.contains(&Action::PreconnectAgent), "{lost:?}");
    assert_eq!(
        to_agent(&lost)[0]["item"]["content"][0]["text"],
        "Where is my order?"
    );
    assert_eq!(h.core.agent_link(), &AgentLink::Ready);
    assert_eq!(
        to_agent(&h.media(FRAME))[0]["audio"],
        FRAME,
        "no audio held"
    );
    assert_eq!(h.metrics.agent_reconnected.get(), 1);
}

#[test]
fn a_session_lost_while_its_successor_is_dialled_drops_it_and_reconnects() {
    let mut h = Harness::with(agent(), rolling_settings());
    h.ready();
    h.advance(Duration::from_secs(3));
    h.feed(Input::Timer);
    let lost = h.feed(Input::AgentBroken("reset".into()));
    assert!(lost.contains(&Action::CloseStandby), "{lost:?}");
    assert!(lost.contains(&Action::CloseAgent), "{lost:?}");
    // A late answer from the abandoned dial is ignored.
    assert!(h.feed(Input::StandbyOpened).is_empty());
    assert!(h.feed(Input::Timer).contains(&Action::PreconnectAgent));
}
