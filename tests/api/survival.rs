//! A call outlives its OpenAI session: the fake Realtime server drops the socket mid-call and
//! the caller stays on the line while a new session takes over.

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
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fake.upgrades() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no new session was dialled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
