//! The bridge end to end: the real app on port 0, a fake Twilio client and a fake OpenAI server.

use std::sync::Arc;
use std::time::Duration;

use callbridge::admission::{Occupancy, STREAM_TOKEN_TTL};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::fake_twilio::{FakeTwilio, agent_audio, frame, stream_url};
use crate::helpers::*;
use callbridge_testkit::realtime::{FakeRealtime, FakeSession};

pub async fn app_with(fake: &FakeRealtime, extra: &[(&str, &str)]) -> TestApp {
    let mut overrides = vec![("OPENAI_REALTIME_URL", fake.url.as_str())];
    overrides.extend_from_slice(extra);
    spawn_app(&overrides).await
}

/// Starts a call and returns both ends with the session.update already consumed.
pub async fn connected_call(
    app: &Client,
    fake: &FakeRealtime,
    call_sid: &str,
) -> (FakeTwilio, FakeSession) {
    let twilio = FakeTwilio::start_call(app, call_sid).await;
    let mut session = fake.next_session().await;
    session.expect_session_update().await;
    (twilio, session)
}

pub fn delta(response_id: &str, item_id: &str, audio: &str) -> Value {
    json!({"type":"response.output_audio.delta","event_id":"ev","response_id":response_id,"item_id":item_id,"output_index":0,"content_index":0,"delta":audio})
}

#[tokio::test]
async fn the_session_is_configured_with_the_ga_shape() {
    let fake = FakeRealtime::start().await;
    let app = app_with(
        &fake,
        &[
            ("OPENAI_VOICE", "cedar"),
            ("AGENT_INSTRUCTIONS", "You sell <tea> & coffee."),
        ],
    )
    .await;
    let _twilio = FakeTwilio::start_call(&app, &call_sid(1001)).await;
    let mut session = fake.next_session().await;
    assert_eq!(
        session.path_and_query,
        "/v1/realtime?model=gpt-realtime-1.5"
    );
    let update = session.expect_session_update().await;
    let s = &update["session"];
    assert_eq!(s["type"], "realtime");
    assert_eq!(s["instructions"], "You sell <tea> & coffee.");
    assert_eq!(s["audio"]["input"]["format"], json!({"type":"audio/pcmu"}));
    assert_eq!(s["audio"]["output"]["format"], json!({"type":"audio/pcmu"}));
    assert_eq!(s["audio"]["output"]["voice"], "cedar");
    assert_eq!(s["audio"]["input"]["turn_detection"]["type"], "server_vad");
    assert!(s["audio"]["input"]["transcription"]["model"].is_string());
}

#[tokio::test]
async fn audio_passes_through_byte_for_byte_in_both_directions() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, mut session) = connected_call(&app, &fake, &call_sid(1002)).await;

    for n in 0..500 {
        twilio.media(n, &frame(0, n)).await;
    }
    for n in 0..500 {
        let expected = format!(
            r#"{{"type":"input_audio_buffer.append","audio":"{}"}}"#,
            frame(0, n)
        );
        assert_eq!(session.recv_text().await, expected, "frame {n}");
    }

    for n in 0..500 {
        session.send(delta("resp_1", "item_1", &frame(1, n)));
    }
    let mut marks = std::collections::HashSet::new();
    for n in 0..500 {
        let media = twilio.recv().await;
        assert_eq!(
            media,
            json!({"event":"media","streamSid":twilio.stream_sid,"media":{"payload":frame(1, n)}}),
            "delta {n}"
        );
        let mark = twilio.recv().await;
        assert_eq!(mark["event"], "mark");
        assert_eq!(mark["streamSid"], twilio.stream_sid);
        assert!(
            marks.insert(mark["mark"]["name"].as_str().unwrap().to_owned()),
            "mark names are unique"
        );
    }
    assert_eq!(app.state.metrics.frames_from_caller.get(), 500);
    assert_eq!(app.state.metrics.frames_to_caller.get(), 500);
}

#[tokio::test]
async fn barge_in_clears_twilio_truncates_at_played_plus_50_and_drops_late_deltas() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, mut session) = connected_call(&app, &fake, &call_sid(1003)).await;

    session
        .send(json!({"type":"response.created","response":{"id":"resp_1","status":"in_progress"}}));
    // 3 s of agent audio in 100 ms deltas.
    for _ in 0..30 {
        session.send(delta("resp_1", "item_1", &agent_audio(100, 0x7F)));
    }
    let mut mark_names = Vec::new();
    for _ in 0..30 {
        assert_eq!(twilio.recv().await["event"], "media");
        mark_names.push(
            twilio.recv().await["mark"]["name"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Twilio has played 1.2 s.
    for name in &mark_names[..12] {
        twilio.echo_mark(name).await;
    }
    // Make sure the echoes were processed before the caller speaks.
    twilio.media(0, &frame(0, 0)).await;
    assert_eq!(session.recv().await["type"], "input_audio_buffer.append");

    session.send(json!({"type":"input_audio_buffer.speech_started","audio_start_ms":1000,"item_id":"item_user"}));
    assert_eq!(
        twilio.recv().await,
        json!({"event":"clear","streamSid":twilio.stream_sid})
    );
    let truncate = session.recv().await;
    assert_eq!(
        truncate,
        json!({"type":"conversation.item.truncate","item_id":"item_1","content_index":0,"audio_end_ms":1250})
    );

    // Late deltas of the interrupted response arrive, then the next response starts.
    for _ in 0..5 {
        session.send(delta("resp_1", "item_1", &agent_audio(100, 0x11)));
    }
    session.send(json!({"type":"response.done","response":{"id":"resp_1","status":"cancelled"}}));
    session
        .send(json!({"type":"response.created","response":{"id":"resp_2","status":"in_progress"}}));
    session.send(delta("resp_2", "item_2", &agent_audio(100, 0x22)));
    session.send(delta("resp_2", "item_2", &agent_audio(100, 0x33)));
    let next = twilio.recv().await;
    assert_eq!(
        next["media"]["payload"],
        agent_audio(100, 0x22),
        "late deltas of resp_1 never reach Twilio"
    );
    let first_mark = twilio.recv().await["mark"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        twilio.recv().await["media"]["payload"],
        agent_audio(100, 0x33)
    );
    twilio.recv().await;

    // Twilio's echoes of the cleared marks arrive interleaved with the new response's echo;
    // only the latter counts as played.
    for name in &mark_names[12..20] {
        twilio.echo_mark(name).await;
    }
    twilio.echo_mark(&first_mark).await;
    for name in &mark_names[20..] {
        twilio.echo_mark(name).await;
    }
    twilio.media(1, &frame(0, 1)).await;
    assert_eq!(session.recv().await["type"], "input_audio_buffer.append");

    // A second barge-in truncates item_2 at what played (100 ms) + 50 ms, of 200 ms sent.
    session.send(json!({"type":"input_audio_buffer.speech_started","audio_start_ms":5000,"item_id":"item_user2"}));
    assert_eq!(twilio.recv().await["event"], "clear");
    assert_eq!(
        session.recv().await,
        json!({"type":"conversation.item.truncate","item_id":"item_2","content_index":0,"audio_end_ms":150})
    );
    assert_eq!(app.state.metrics.barge_ins.get(), 2);
    assert_eq!(app.state.metrics.dropped_interrupted_deltas.get(), 5);
}

#[tokio::test]
async fn speech_while_the_agent_is_silent_does_nothing() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, mut session) = connected_call(&app, &fake, &call_sid(1004)).await;

    // A finished answer that Twilio played to the end.
    session.send(json!({"type":"response.created","response":{"id":"resp_1"}}));
    session.send(delta("resp_1", "item_1", &agent_audio(200, 1)));
    session.send(json!({"type":"response.output_audio.done","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0}));
    session.send(json!({"type":"response.done","response":{"id":"resp_1","status":"completed"}}));
    assert_eq!(twilio.recv().await["event"], "media");
    let audio_mark = twilio.recv().await["mark"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let done_mark = twilio.recv().await["mark"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    twilio.echo_mark(&audio_mark).await;
    twilio.echo_mark(&done_mark).await;
    // The echoes are handled before the caller speaks (the two sockets race otherwise).
    twilio.media(0, &frame(0, 0)).await;
    assert_eq!(session.recv().await["type"], "input_audio_buffer.append");

    session.send(
        json!({"type":"input_audio_buffer.speech_started","audio_start_ms":0,"item_id":"u1"}),
    );
    twilio.media(1, &frame(0, 1)).await;
    // The first thing OpenAI hears after the speech event is the caller's audio, not a truncate.
    assert_eq!(session.recv().await["type"], "input_audio_buffer.append");
    session.send(delta("resp_2", "item_2", &agent_audio(20, 2)));
    assert_eq!(twilio.recv().await["event"], "media", "no clear was sent");
    assert_eq!(app.state.metrics.barge_ins.get(), 0);
    assert_eq!(app.state.metrics.truncates.get(), 0);
}

const OTHER_ACCOUNT_SID: &str = "ACffffffffffffffffffffffffffffffff";

#[tokio::test]
async fn a_start_that_does_not_match_its_upgrade_closes_the_stream_without_an_openai_session() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;

    let token = app.answer_call(&call_sid(1005)).await;
    let mut wrong_token = FakeTwilio::connect(&app, &token).await;
    wrong_token
        .start(&call_sid(1005), "not-the-token", ACCOUNT_SID)
        .await;
    assert_eq!(
        wrong_token.closed_within(Duration::from_secs(5)).await,
        Some(Some(1008))
    );

    let token = app.answer_call(&call_sid(1006)).await;
    let mut other_call = FakeTwilio::connect(&app, &token).await;
    other_call.start(&call_sid(9999), &token, ACCOUNT_SID).await;
    assert_eq!(
        other_call.closed_within(Duration::from_secs(5)).await,
        Some(Some(1008))
    );

    let token = app.answer_call(&call_sid(1020)).await;
    let mut wrong_account = FakeTwilio::connect(&app, &token).await;
    wrong_account
        .start(&call_sid(1020), &token, OTHER_ACCOUNT_SID)
        .await;
    assert_eq!(
        wrong_account.closed_within(Duration::from_secs(5)).await,
        Some(Some(1008))
    );

    app.wait_until_no_call_is_live().await;
    assert_eq!(fake.upgrades(), 0, "no Realtime session was ever requested");
    assert_eq!(
        app.state
            .metrics
            .calls_ended(callbridge::metrics::EndReason::Unauthorized),
        3
    );
}

#[tokio::test]
async fn a_wrong_account_start_spends_the_token() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let token = app.answer_call(&call_sid(1021)).await;
    let mut wrong_account = FakeTwilio::connect(&app, &token).await;
    wrong_account
        .start(&call_sid(1021), &token, OTHER_ACCOUNT_SID)
        .await;
    assert_eq!(
        wrong_account.closed_within(Duration::from_secs(5)).await,
        Some(Some(1008))
    );
    assert_eq!(
        FakeTwilio::refused_stream(&app, &token).await,
        403,
        "no correct start can follow with the same token"
    );
    assert_eq!(fake.upgrades(), 0);
}

#[tokio::test]
async fn a_replayed_upgrade_is_refused_before_the_socket_exists() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let token = app.answer_call(&call_sid(1007)).await;
    let mut first = FakeTwilio::connect(&app, &token).await;
    first.start(&call_sid(1007), &token, ACCOUNT_SID).await;
    let _session = fake.next_session().await;
    for _ in 0..3 {
        assert_eq!(FakeTwilio::refused_stream(&app, &token).await, 403);
    }
    assert_eq!(
        app.state.admission.occupancy().live,
        1,
        "replays hold no slot"
    );
    assert_eq!(fake.upgrades(), 1);
}

#[tokio::test]
async fn unsigned_or_forged_upgrades_are_refused_and_spend_no_token() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let token = app.answer_call(&call_sid(1022)).await;
    let path = format!("/stream/{token}");
    assert_eq!(FakeTwilio::refused_upgrade(&app, &path, None).await, 403);
    let forgeries = [
        // Signed as a webhook, over https.
        twilio_signature(&format!("{PUBLIC_BASE_URL}{path}"), &[]),
        // The one signature every call's upgrade used to share.
        twilio_signature("wss://callbridge.test/stream", &[]),
        // Another call's upgrade.
        twilio_signature(&stream_url("another-token"), &[]),
    ];
    for forged in &forgeries {
        assert_eq!(
            FakeTwilio::refused_upgrade(&app, &path, Some(forged)).await,
            403
        );
    }
    assert_eq!(app.state.metrics.signature_failures.get(), 4);
    // None of them spent the token: Twilio's own upgrade (in its default-port form) opens.
    let with_port = twilio_signature(&format!("wss://callbridge.test:443{path}"), &[]);
    assert!(
        FakeTwilio::connect_signed(&app, &path, Some(&with_port))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn unknown_and_expired_tokens_and_the_tokenless_route_open_nothing() {
    let fake = FakeRealtime::start().await;
    let clock = Arc::new(ManualClock::default());
    let config = test_config(&[("OPENAI_REALTIME_URL", fake.url.as_str())]);
    let app = spawn_app_with_clock(config, clock.clone()).await;
    assert_eq!(FakeTwilio::refused_stream(&app, "never-issued").await, 403);
    let token = app.answer_call(&call_sid(1023)).await;
    clock.advance(STREAM_TOKEN_TTL);
    assert_eq!(
        FakeTwilio::refused_stream(&app, &token).await,
        403,
        "expired"
    );
    let tokenless = twilio_signature("wss://callbridge.test/stream", &[]);
    assert_eq!(
        FakeTwilio::refused_upgrade(&app, "/stream", Some(&tokenless)).await,
        404
    );
    assert_eq!(app.state.admission.occupancy(), Occupancy::default());
}

#[tokio::test]
async fn twilio_stop_closes_the_openai_socket_within_a_second() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, mut session) = connected_call(&app, &fake, &call_sid(1008)).await;
    twilio.stop().await;
    assert!(session.closed_within(Duration::from_secs(1)).await);
    let _ = twilio.closed_within(Duration::from_secs(2)).await;
    app.wait_until_no_call_is_live().await;
}

#[tokio::test]
async fn openai_dropping_the_socket_with_no_replacement_closes_the_twilio_stream() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, session) = connected_call(&app, &fake, &call_sid(1009)).await;
    fake.refuse_new_sessions();
    drop(session);
    assert_eq!(
        twilio.closed_within(Duration::from_secs(8)).await,
        Some(Some(1011))
    );
    assert_eq!(
        fake.upgrades(),
        4,
        "the first session, then three attempts at another"
    );
}

#[tokio::test]
async fn a_fatal_openai_error_closes_the_twilio_stream() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, mut session) = connected_call(&app, &fake, &call_sid(1010)).await;
    session.send(json!({"type":"error","error":{"type":"invalid_request_error","code":"response_cancel_not_active","message":"no active response"}}));
    twilio.media(0, &frame(0, 0)).await;
    assert_eq!(
        session.recv().await["type"],
        "input_audio_buffer.append",
        "a benign error is survived"
    );
    session.send(json!({"type":"error","error":{"type":"invalid_request_error","code":"invalid_api_key","message":"Incorrect API key provided."}}));
    assert_eq!(
        twilio.closed_within(Duration::from_secs(5)).await,
        Some(Some(1011))
    );
}

#[tokio::test]
async fn garbage_from_both_sides_leaves_the_call_working() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, mut session) = connected_call(&app, &fake, &call_sid(1011)).await;

    twilio.send_text("not json".into()).await;
    twilio.send_text(r#"{"event":"media"}"#.into()).await;
    twilio
        .send_text(r#"{"event":"media","media":{"payload":17}}"#.into())
        .await;
    twilio
        .send_text(r#"{"event":"from-the-future"}"#.into())
        .await;
    twilio
        .send_raw(Message::binary(vec![0u8, 159, 146, 150]))
        .await;
    let (other_call, other_stream) = (call_sid(1099), format!("MZ{:032}", 1099));
    twilio.send(json!({"event":"start","streamSid":other_stream,"start":{"accountSid":ACCOUNT_SID,"streamSid":other_stream,"callSid":other_call,"customParameters":{}}})).await;
    twilio.media(7, &frame(2, 7)).await;
    assert_eq!(
        session.recv().await,
        json!({"type":"input_audio_buffer.append","audio":frame(2, 7)})
    );

    session.send_raw(Message::text("{{{{"));
    session.send_raw(Message::text(r#"{"type":"response.output_audio.delta"}"#));
    session.send_raw(Message::binary(vec![1u8, 2, 3]));
    session.send(json!({"type":"some.new_event","x":[1,2,3]}));
    session.send(delta("resp_1", "item_1", &frame(3, 0)));
    assert_eq!(twilio.recv().await["media"]["payload"], frame(3, 0));

    assert_eq!(app.state.metrics.malformed_from_twilio.get(), 5);
    assert_eq!(app.state.metrics.malformed_from_openai.get(), 3);
}

#[tokio::test]
async fn an_oversized_frame_closes_only_that_call_with_1009() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut victim, mut victim_session) = connected_call(&app, &fake, &call_sid(1012)).await;
    let (mut attacker, _attacker_session) = connected_call(&app, &fake, &call_sid(1013)).await;
    attacker.send_text("x".repeat(70 * 1024)).await;
    assert_eq!(
        attacker.closed_within(Duration::from_secs(5)).await,
        Some(Some(1009))
    );
    victim.media(0, &frame(4, 0)).await;
    assert_eq!(victim_session.recv().await["audio"], frame(4, 0));
}

/// What a peer sends after an oversized frame header: a few KiB, never the declared payload.
const TRICKLE: [u8; 1024] = [b'x'; 1024];

#[tokio::test]
async fn a_frame_declaring_more_than_64_kib_is_refused_at_its_header() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut attacker, mut session) = connected_call(&app, &fake, &call_sid(1017)).await;
    assert!(
        attacker
            .write_bytes(&text_frame_header(256 << 20, Some([1, 2, 3, 4])))
            .await
    );
    for _ in 0..4 {
        if !attacker.write_bytes(&TRICKLE).await {
            break;
        }
    }
    assert_eq!(
        attacker.closed_within(Duration::from_secs(5)).await,
        Some(Some(1009)),
        "closed after the header and a few KiB, not once 256 MiB have arrived"
    );
    assert!(
        session.closed_within(Duration::from_secs(1)).await,
        "the OpenAI session ends with the call"
    );
    assert_eq!(
        app.state
            .metrics
            .calls_ended(callbridge::metrics::EndReason::FrameTooLarge),
        1
    );
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_the_stream_with_1007() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, _session) = connected_call(&app, &fake, &call_sid(1019)).await;
    // An all-zero mask leaves the payload as written: a truncated two-byte sequence.
    let mut frame = text_frame_header(2, Some([0; 4]));
    frame.extend([0xC3, 0x28]);
    assert!(twilio.write_bytes(&frame).await);
    assert_eq!(
        twilio.closed_within(Duration::from_secs(5)).await,
        Some(Some(1007))
    );
}

#[tokio::test]
async fn an_openai_frame_declaring_more_than_1_mib_is_refused_at_its_header() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, mut session) = connected_call(&app, &fake, &call_sid(1018)).await;
    fake.refuse_new_sessions();
    session.write_bytes(&text_frame_header(2 << 20, None));
    for _ in 0..4 {
        session.write_bytes(&TRICKLE);
    }
    assert_eq!(
        twilio.closed_within(Duration::from_secs(5)).await,
        Some(Some(1011)),
        "the session is dropped after the header and a few KiB; with no replacement the call \
         ends and the apology plays"
    );
    assert!(session.closed_within(Duration::from_secs(1)).await);
    assert_eq!(
        app.state
            .metrics
            .calls_ended(callbridge::metrics::EndReason::AgentFailed),
        1
    );
}

#[tokio::test]
async fn fifty_concurrent_calls_keep_their_audio_separate() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let mut calls = Vec::new();
    for i in 0..50 {
        let call_sid = call_sid(2000 + i as u64);
        let twilio = FakeTwilio::start_call(&app, &call_sid).await;
        let mut session = fake.next_session().await;
        session.expect_session_update().await;
        calls.push((i, twilio, session));
    }
    assert_eq!(app.state.admission.occupancy().live, 50);
    let tasks = calls
        .into_iter()
        .map(|(i, mut twilio, mut session)| async move {
            for n in 0..20 {
                twilio.media(n, &frame(i, n)).await;
                session.send(delta(&format!("resp_{i}"), "item", &frame(100 + i, n)));
            }
            for n in 0..20 {
                assert_eq!(
                    session.recv().await["audio"],
                    frame(i, n),
                    "call {i} frame {n}"
                );
                assert_eq!(
                    twilio.recv().await["media"]["payload"],
                    frame(100 + i, n),
                    "call {i} delta {n}"
                );
                assert_eq!(twilio.recv().await["event"], "mark");
            }
        });
    futures_util::future::join_all(tasks).await;
}

#[tokio::test]
async fn caller_audio_sent_while_openai_is_still_connecting_all_arrives_in_order() {
    let fake = FakeRealtime::start_with_handshake_delay(Duration::from_millis(600)).await;
    let app = app_with(
        &fake,
        &[("AGENT_GREETING", "Greet the caller and offer help.")],
    )
    .await;
    let mut twilio = FakeTwilio::start_call(&app, &call_sid(1014)).await;
    // 500 ms of speech at the real 20 ms pace while the handshake is held up.
    for n in 0..25 {
        twilio.media(n, &frame(5, n)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut session = fake.next_session().await;
    session.expect_session_update().await;
    let greeting = session.recv().await;
    assert_eq!(greeting["type"], "conversation.item.create");
    assert_eq!(
        greeting["item"]["content"][0]["text"],
        "Greet the caller and offer help."
    );
    assert_eq!(session.recv().await["type"], "response.create");
    for n in 0..25 {
        assert_eq!(session.recv().await["audio"], frame(5, n), "frame {n}");
    }
    assert!(app.state.metrics.frames_buffered_before_agent.get() > 0);
    assert_eq!(app.state.metrics.frames_dropped_buffer_full.get(), 0);
}

#[tokio::test]
async fn metrics_describe_the_calls() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, mut session) = connected_call(&app, &fake, &call_sid(1015)).await;
    twilio.media(0, &frame(0, 0)).await;
    session.recv().await;
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(text.contains("callbridge_live_calls 1\n"), "{text}");
    assert!(text.contains("callbridge_frames_from_caller_total 1\n"));
    assert!(text.contains("callbridge_openai_connect_seconds_count 1\n"));
    assert!(!text.contains(&call_sid(1015)), "no CallSid in metrics");
}

#[tokio::test]
async fn draining_waits_for_live_calls_then_closes_them() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[("DRAIN_TIMEOUT_SECS", "1")]).await;
    let (mut twilio, mut session) = connected_call(&app, &fake, &call_sid(1016)).await;
    app.state.lifecycle.begin_drain();
    // The call goes on during the drain...
    twilio.media(0, &frame(0, 0)).await;
    assert_eq!(session.recv().await["type"], "input_audio_buffer.append");
    // ...and is closed politely once the drain timeout has passed.
    assert_eq!(
        twilio.closed_within(Duration::from_secs(5)).await,
        Some(Some(1012))
    );
    assert!(session.closed_within(Duration::from_secs(2)).await);
}

#[tokio::test]
async fn replayed_upgrades_of_an_idle_stream_take_no_call_slot() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[("MAX_CONCURRENT_CALLS", "2")]).await;
    let idle_token = app.answer_call(&call_sid(1024)).await;
    let _idle = FakeTwilio::connect(&app, &idle_token).await;
    for _ in 0..12 {
        assert_eq!(FakeTwilio::refused_stream(&app, &idle_token).await, 403);
    }
    assert_eq!(
        app.state.admission.occupancy(),
        Occupancy {
            pending: 0,
            live: 1
        }
    );
    // The other slot is a real call's; only a third call hears the busy message.
    let (_twilio, _session) = connected_call(&app, &fake, &call_sid(1025)).await;
    let busy = app
        .post_signed("/voice", &voice_form(&call_sid(1026)))
        .await;
    let twiml = parse_twiml(&busy.text().await.unwrap());
    assert_eq!(twiml.say, [callbridge::twilio::twiml::BUSY]);
}

#[tokio::test]
async fn a_stream_that_never_starts_is_closed_after_5_seconds_and_gives_its_slot_back() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let token = app.answer_call(&call_sid(1027)).await;
    let opened = std::time::Instant::now();
    let mut idle = FakeTwilio::connect(&app, &token).await;
    assert_eq!(
        idle.closed_within(Duration::from_secs(15)).await,
        Some(Some(1011))
    );
    assert!(opened.elapsed() >= Duration::from_secs(5), "not before 5 s");
    app.wait_until_no_call_is_live().await;
    assert_eq!(fake.upgrades(), 0);
}
