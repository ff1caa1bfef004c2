//! A call outlives its OpenAI session: the fake Realtime server drops the socket mid-call, or
//! expires it, and the caller stays on the line while a new session takes over; an old session
//! is rolled over to a prepared successor at a quiet moment.

use std::time::Duration;

use callbridge_testkit::realtime::FakeRealtime;
use serde_json::json;

use crate::calls::API_TOKEN;
use crate::fake_twilio::frame;
use crate::helpers::call_sid;
use crate::stream::{app_with, connected_call};

#[tokio::test]
async fn a_dropped_session_is_replaced_and_the_caller_audio_of_the_gap_arrives_in_order() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let (mut twilio, mut session) = connected_call(&app, &fake, &call_sid(9100)).await;
    session.send(json!({"type":"conversation.item.input_audio_transcription.completed","item_id":"u1","content_index":0,"transcript":"Where is my order?"}));
    session.send(json!({"type":"response.output_audio_transcript.done","response_id":"r1","item_id":"a1","output_index":0,"content_index":0,"transcript":"It ships tomorrow."}));
    twilio.media(0, &frame(1, 0)).await;
    assert_eq!(session.recv().await["audio"], frame(1, 0));

    // OpenAI's side vanishes without a close frame. Audio written into the socket before the
    // bridge learns of it is gone with the socket; from then on the caller's audio is held.
    drop(session);
    wait_for_upgrades(&fake, 2).await;
    let gap: Vec<String> = (1..=25).map(|n| frame(1, n)).collect();
    for (n, payload) in gap.iter().enumerate() {
        twilio.media(n + 1, payload).await;
    }
    let mut replacement = fake.next_session().await;
    replacement.expect_session_update().await;
    let caller_line = replacement.recv().await;
    assert_eq!(caller_line["item"]["role"], "user");
    assert_eq!(
        caller_line["item"]["content"][0]["text"],
        "Where is my order?"
    );
    let agent_line = replacement.recv().await;
    assert_eq!(agent_line["item"]["role"], "assistant");
    assert_eq!(agent_line["item"]["content"][0]["type"], "output_text");
    assert_eq!(
        agent_line["item"]["content"][0]["text"],
        "It ships tomorrow."
    );
    for payload in &gap {
        let append = replacement.recv().await;
        assert_eq!(append["type"], "input_audio_buffer.append");
        assert_eq!(&append["audio"], payload, "in order, none lost or repeated");
    }
    // The stream never closed: audio goes on to the new session.
    twilio.media(99, &frame(1, 99)).await;
    assert_eq!(replacement.recv().await["audio"], frame(1, 99));
    assert_eq!(fake.upgrades(), 2);
    assert_eq!(app.state.metrics.agent_reconnected.get(), 1);
    let detail = app.call_with_lines(&call_sid(9100), 2).await;
    let reconnected = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|event| event["type"] == "agent_reconnected");
    assert!(reconnected, "{detail}");
    twilio.stop().await;
    assert!(replacement.closed_within(Duration::from_secs(1)).await);
}

/// Waits (at most 5 s) until the fake has seen `count` upgrades.
async fn wait_for_upgrades(fake: &FakeRealtime, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fake.upgrades() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "no new session was dialled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends caller frames `range` 20 ms apart, as Twilio would.
async fn talk(twilio: &mut crate::fake_twilio::FakeTwilio, range: std::ops::Range<usize>) {
    for n in range {
        twilio.media(n, &frame(2, n)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_old_session_rolls_over_to_a_prepared_successor_at_a_quiet_moment() {
    let fake = FakeRealtime::start().await;
    let app = app_with(
        &fake,
        &[
            ("SESSION_ROLLOVER_SECS", "3"),
            ("CALLBRIDGE_API_TOKEN", API_TOKEN),
        ],
    )
    .await;
    let (mut twilio, mut old) = connected_call(&app, &fake, &call_sid(9200)).await;
    old.send(json!({"type":"conversation.item.input_audio_transcription.completed","item_id":"u1","content_index":0,"transcript":"Can I change my address?"}));
    old.send(json!({"type":"response.output_audio_transcript.done","response_id":"r0","item_id":"a0","output_index":0,"content_index":0,"transcript":"Yes, what is the new one?"}));
    // The agent is answering when the session comes of age.
    old.send(json!({"type":"response.created","response":{"id":"r1"}}));
    talk(&mut twilio, 0..150).await;
    wait_for_upgrades(&fake, 2).await;
    let mut successor = fake.next_session().await;
    successor.expect_session_update().await;

    // Still answering: every frame goes to the old session, none to the successor.
    talk(&mut twilio, 150..175).await;
    for n in 0..175 {
        assert_eq!(old.recv().await["audio"], frame(2, n), "frame {n}");
    }
    old.send(json!({"type":"response.done","response":{"id":"r1","status":"completed"}}));
    talk(&mut twilio, 175..250).await;

    let rest = old
        .events_until_closed(Duration::from_secs(2))
        .await
        .expect("the old session is closed after the switch");
    let switched_at = 175 + rest.len();
    assert!(switched_at < 250, "the switch happened");
    for (event, n) in rest.iter().zip(175..) {
        assert_eq!(event["audio"], frame(2, n), "frame {n} to the old session");
    }
    // The successor is re-seeded, then gets exactly the frames the old one did not.
    let caller_line = successor.recv().await;
    assert_eq!(
        caller_line["item"]["content"][0]["text"],
        "Can I change my address?"
    );
    let agent_line = successor.recv().await;
    assert_eq!(
        agent_line["item"]["content"][0]["text"],
        "Yes, what is the new one?"
    );
    for n in switched_at..250 {
        let append = successor.recv().await;
        assert_eq!(
            append["audio"],
            frame(2, n),
            "frame {n} to the successor, once"
        );
    }
    assert_eq!(fake.upgrades(), 2);
    assert_eq!(app.state.metrics.session_rolled_over.get(), 1);
    twilio.stop().await;
    assert!(successor.closed_within(Duration::from_secs(1)).await);
}

#[tokio::test]
async fn an_expired_session_is_replaced_at_once() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (mut twilio, old) = connected_call(&app, &fake, &call_sid(9300)).await;
    old.send(json!({"type":"conversation.item.input_audio_transcription.completed","item_id":"u1","content_index":0,"transcript":"Still there?"}));
    // OpenAI's cap: the error, then the socket closes.
    old.send(json!({"type":"error","event_id":"ev_9","error":{"type":"invalid_request_error","code":"session_expired","message":"Your session hit the maximum duration of 60 minutes."}}));
    let expired_at = std::time::Instant::now();
    drop(old);
    let mut replacement = fake.next_session().await;
    assert!(
        expired_at.elapsed() < Duration::from_millis(500),
        "dialled at once, not after a back-off: {:?}",
        expired_at.elapsed()
    );
    replacement.expect_session_update().await;
    let line = replacement.recv().await;
    assert_eq!(line["item"]["content"][0]["text"], "Still there?");
    twilio.media(1, &frame(3, 1)).await;
    assert_eq!(replacement.recv().await["audio"], frame(3, 1));
    assert_eq!(app.state.metrics.agent_reconnected.get(), 1);
    twilio.stop().await;
    assert!(replacement.closed_within(Duration::from_secs(1)).await);
}
