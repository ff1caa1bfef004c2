//! What a call cost and how long its caller waited, end to end: the fake Realtime server bills
//! responses by kind and answers a turn after a pause, and the call's record and `/metrics`
//! show the sums, the estimate and the latencies.

use std::time::Duration;

use callbridge_testkit::realtime::FakeRealtime;
use serde_json::json;

use crate::calls::API_TOKEN;
use crate::fake_twilio::agent_audio;
use crate::helpers::call_sid;
use crate::stream::{app_with, connected_call, delta};

fn billed(
    response_id: &str,
    text_in: u64,
    audio_in: u64,
    cached_audio: u64,
    audio_out: u64,
) -> serde_json::Value {
    json!({"type":"response.done","response":{"id":response_id,"status":"completed","usage":{
        "total_tokens": text_in + audio_in + audio_out,
        "input_tokens": text_in + audio_in,
        "output_tokens": audio_out,
        "input_token_details":{"text_tokens":text_in,"audio_tokens":audio_in,"image_tokens":0,"cached_tokens":cached_audio,
            "cached_tokens_details":{"text_tokens":0,"audio_tokens":cached_audio,"image_tokens":0}},
        "output_token_details":{"text_tokens":0,"audio_tokens":audio_out}}}})
}

/// The call's detail once its end is stored (the record writer batches it).
async fn ended_call(app: &crate::helpers::Client, sid: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let detail: serde_json::Value = app
            .api_get(&format!("/calls/{sid}"))
            .await
            .json()
            .await
            .unwrap();
        if !detail["call"]["end_reason"].is_null() {
            return detail;
        }
        assert!(std::time::Instant::now() < deadline, "{detail}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_calls_record_has_its_usage_by_kind_its_cost_and_its_latencies() {
    let fake = FakeRealtime::start().await;
    let app = app_with(
        &fake,
        &[
            ("CALLBRIDGE_API_TOKEN", API_TOKEN),
            ("OPENAI_REALTIME_MODEL", "gpt-realtime-mini"),
        ],
    )
    .await;
    let sid = call_sid(9400);
    let (mut twilio, session) = connected_call(&app, &fake, &sid).await;
    // The greeting: first audio, but no turn answered.
    session.send(json!({"type":"response.created","response":{"id":"r1"}}));
    session.send(delta("r1", "a1", &agent_audio(100, 0x11)));
    assert_eq!(twilio.recv().await["event"], "media");
    session.send(billed("r1", 1000, 0, 0, 600));
    // The caller speaks; the agent answers 300 ms after they stop.
    session.send(
        json!({"type":"input_audio_buffer.speech_started","audio_start_ms":0,"item_id":"u1"}),
    );
    session.send(
        json!({"type":"input_audio_buffer.speech_stopped","audio_end_ms":900,"item_id":"u1"}),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    session.send(json!({"type":"response.created","response":{"id":"r2"}}));
    session.send(delta("r2", "a2", &agent_audio(100, 0x22)));
    loop {
        if twilio.recv().await["event"] == "media" {
            break;
        }
    }
    session.send(billed("r2", 1200, 400, 300, 900));
    tokio::time::sleep(Duration::from_millis(100)).await;
    twilio.stop().await;
    let detail = ended_call(&app, &sid).await;
    let call = &detail["call"];
    assert_eq!(
        call["usage"],
        json!({
            "input_text_tokens": 2200,
            "input_audio_tokens": 400,
            "input_cached_text_tokens": 0,
            "input_cached_audio_tokens": 300,
            "output_text_tokens": 0,
            "output_audio_tokens": 1500
        }),
        "{detail}"
    );
    assert_eq!(call["model"], "gpt-realtime-mini");
    assert_eq!(
        call["status"], "completed",
        "with no status callback, the stream's end closes the record"
    );
    // Mini prices per million: text in $0.60, audio in $10, cached audio $0.30, audio out $20:
    // 2200 × 0.6 + 100 × 10 + 300 × 0.3 + 1500 × 20 = 32,410 millionths of a dollar.
    assert_eq!(call["cost_usd"], json!(0.03241), "{detail}");
    let latency = &call["latency"];
    assert_eq!(latency["turns"], 1, "{detail}");
    let turn = latency["turn_p50_ms"].as_i64().unwrap();
    assert!((300..1500).contains(&turn), "{detail}");
    assert_eq!(latency["turn_max_ms"], latency["turn_p50_ms"]);
    let connect = latency["openai_connect_ms"].as_i64().unwrap();
    let first_audio = latency["first_agent_audio_ms"].as_i64().unwrap();
    assert!(connect <= first_audio, "{detail}");

    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("callbridge_turn_latency_seconds_count 1"),
        "{metrics}"
    );
    assert!(metrics.contains("callbridge_first_agent_audio_seconds_count 1"));
}

#[tokio::test]
async fn a_model_without_known_prices_has_no_cost() {
    let fake = FakeRealtime::start().await;
    let app = app_with(
        &fake,
        &[
            ("CALLBRIDGE_API_TOKEN", API_TOKEN),
            ("OPENAI_REALTIME_MODEL", "gpt-realtime-experimental"),
        ],
    )
    .await;
    let sid = call_sid(9401);
    let (mut twilio, session) = connected_call(&app, &fake, &sid).await;
    session.send(billed("r1", 10, 10, 0, 10));
    tokio::time::sleep(Duration::from_millis(100)).await;
    twilio.stop().await;
    let detail = ended_call(&app, &sid).await;
    assert_eq!(
        detail["call"]["usage"]["output_audio_tokens"], 10,
        "{detail}"
    );
    assert!(detail["call"]["cost_usd"].is_null(), "{detail}");
    assert_eq!(detail["call"]["latency"]["turns"], 0);
}

#[tokio::test]
async fn a_stream_closed_before_its_start_still_ends_the_calls_record() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let sid = call_sid(9402);
    let token = app.answer_call(&sid).await;
    let twilio = crate::fake_twilio::FakeTwilio::connect(&app, &token).await;
    // Twilio's side goes away before sending `start`.
    drop(twilio);
    let detail = ended_call(&app, &sid).await;
    assert_eq!(detail["call"]["end_reason"], "caller_hung_up", "{detail}");
    assert_eq!(detail["call"]["status"], "completed", "{detail}");
}
