//! What happened on a call, read back through the API: persisted through `/voice`, `/stream` and
//! `/voice/status`, surviving restarts and even SIGKILL.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_twilio::frame;
use crate::helpers::*;
use crate::stream::{app_with, connected_call};
use callbridge_testkit::realtime::FakeRealtime;
use callbridge_testkit::scratch::Scratch;

pub const API_TOKEN: &str = "test-api-token-0123456789abcdef0123";

impl Client {
    pub async fn api_get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.address))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .expect("request reaches the app")
    }

    pub async fn api_post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.address))
            .bearer_auth(API_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("request reaches the app")
    }

    pub async fn post_status(
        &self,
        call_sid: &str,
        status: &str,
        sequence: u32,
    ) -> reqwest::Response {
        let sequence = sequence.to_string();
        let mut params = vec![
            ("CallSid", call_sid),
            ("AccountSid", ACCOUNT_SID),
            ("CallStatus", status),
            ("SequenceNumber", sequence.as_str()),
            ("Direction", "inbound"),
            ("From", "whatsapp:+5511999990000"),
            ("To", "whatsapp:+558551234567"),
        ];
        if status == "completed" {
            params.push(("CallDuration", "7"));
        }
        self.post_signed("/voice/status", &form(&params)).await
    }

    /// Polls until the call's transcript has `lines` lines (the writer commits asynchronously).
    pub async fn call_with_lines(&self, call_sid: &str, lines: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let response = self.api_get(&format!("/calls/{call_sid}")).await;
            if response.status() == 200 {
                let body: Value = response.json().await.unwrap();
                if body["transcript"].as_array().map_or(0, Vec::len) >= lines {
                    return body;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the transcript never reached {lines} lines"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn api_app(fake: &FakeRealtime, extra: &[(&str, &str)]) -> TestApp {
    let mut overrides = vec![("CALLBRIDGE_API_TOKEN", API_TOKEN)];
    overrides.extend_from_slice(extra);
    app_with(fake, &overrides).await
}

fn caller_said(text: &str) -> Value {
    json!({"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","content_index":0,"transcript":text})
}

fn agent_said(item_id: &str, text: &str) -> Value {
    json!({"type":"response.output_audio_transcript.done","response_id":"resp","item_id":item_id,"output_index":0,"content_index":0,"transcript":text})
}

#[tokio::test]
async fn a_call_is_recorded_end_to_end_with_its_status_history_and_both_speakers() {
    let fake = FakeRealtime::start().await;
    let app = api_app(&fake, &[]).await;
    assert_eq!(
        app.post_status(&call_sid(3001), "ringing", 0)
            .await
            .status(),
        204
    );
    let (mut twilio, session) = connected_call(&app, &fake, &call_sid(3001)).await;
    assert_eq!(
        app.post_status(&call_sid(3001), "in-progress", 1)
            .await
            .status(),
        204
    );
    session.send(json!({"type":"session.created","session":{"id":"sess_abc","type":"realtime"}}));
    session.send(agent_said("item_a1", "Hello! How can I help you today?"));
    session.send(caller_said("I want to change my booking."));
    session.send(agent_said(
        "item_a2",
        "Of course, what is the booking number?",
    ));
    session.send(json!({"type":"response.done","response":{"id":"resp","status":"completed","usage":{"input_tokens":120,"output_tokens":80,"total_tokens":200}}}));
    app.call_with_lines(&call_sid(3001), 3).await;
    twilio.stop().await;
    twilio.closed_within(Duration::from_secs(2)).await;
    assert_eq!(
        app.post_status(&call_sid(3001), "completed", 2)
            .await
            .status(),
        204
    );
    // Twilio retries a callback: acknowledged, stored once.
    assert_eq!(
        app.post_status(&call_sid(3001), "completed", 2)
            .await
            .status(),
        204
    );
    app.state.records.flush().await;

    let body: Value = app
        .api_get(&format!("/calls/{}", call_sid(3001)))
        .await
        .json()
        .await
        .unwrap();
    let call = &body["call"];
    assert_eq!(call["call_sid"], call_sid(3001));
    assert_eq!(call["status"], "completed");
    assert_eq!(call["stream_sid"], format!("MZ{:032}", 3001));
    assert_eq!(call["from"], "whatsapp:+5511999990000");
    assert_eq!(call["direction"], "inbound");
    assert_eq!(call["duration_secs"], 7);
    assert_eq!(call["end_reason"], "caller_hung_up");
    assert_eq!(call["openai_session_id"], "sess_abc");
    assert_eq!(call["total_tokens"], 200);
    assert!(call["answered_at_ms"].is_i64() && call["ended_at_ms"].is_i64());

    let statuses: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "status")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["ringing", "in-progress", "completed"]);
    let stream: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "stream")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(stream, ["started", "ended"]);

    let lines: Vec<(&str, &str)> = body["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["speaker"].as_str().unwrap(), l["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        lines,
        [
            ("agent", "Hello! How can I help you today?"),
            ("caller", "I want to change my booking."),
            ("agent", "Of course, what is the booking number?"),
        ]
    );
}

#[tokio::test]
async fn the_api_needs_the_bearer_token_and_names_unknown_calls() {
    let fake = FakeRealtime::start().await;
    let app = api_app(&fake, &[]).await;
    let anonymous = app.get("/calls/CA1").await;
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let wrong = app
        .http
        .get(format!("{}/calls", app.address))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    // The scheme is case-insensitive; the token is not.
    for scheme in ["bearer", "BEARER", "Bearer", "bEaReR"] {
        let response = app
            .http
            .get(format!("{}/calls", app.address))
            .header("authorization", format!("{scheme} {API_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
    }
    let shouted = app
        .http
        .get(format!("{}/calls", app.address))
        .header(
            "authorization",
            format!("Bearer {}", API_TOKEN.to_uppercase()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(shouted.status(), 401);
    let basic = app
        .http
        .get(format!("{}/calls", app.address))
        .header("authorization", format!("Basic {API_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);

    let missing = app.api_get("/calls/CA404").await;
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "call_not_found");
    assert!(body["error"]["message"].as_str().unwrap().len() > 10);

    for bad in [
        "/calls?limit=0",
        "/calls?limit=101",
        "/calls?limit=ten",
        "/calls?before=%21%21",
    ] {
        let response = app.api_get(bad).await;
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_parameter");
    }

    let disabled = spawn_app(&[]).await;
    let response = disabled.get("/calls").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "api_disabled");
}

#[tokio::test]
async fn calls_are_listed_newest_first_page_by_page() {
    let fake = FakeRealtime::start().await;
    let app = api_app(&fake, &[]).await;
    for i in 0..5 {
        app.answer_call(&call_sid(400 + i)).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let first: Value = app.api_get("/calls?limit=2").await.json().await.unwrap();
    let sids = |page: &Value| -> Vec<String> {
        page["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["call_sid"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(sids(&first), [call_sid(404), call_sid(403)]);
    let cursor = first["next_before"].as_str().unwrap();
    let second: Value = app
        .api_get(&format!("/calls?limit=2&before={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(sids(&second), [call_sid(402), call_sid(401)]);
    let cursor = second["next_before"].as_str().unwrap();
    let last: Value = app
        .api_get(&format!("/calls?limit=2&before={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(sids(&last), [call_sid(400)]);
    assert!(last["next_before"].is_null());
}

#[tokio::test]
async fn data_survives_a_restart_on_the_same_sqlite_file() {
    let fake = FakeRealtime::start().await;
    let scratch = Scratch::new();
    let database = scratch.sqlite_url();
    let first = api_app(&fake, &[("DATABASE_URL", &database)]).await;
    let (mut twilio, session) = connected_call(&first, &fake, &call_sid(5001)).await;
    session.send(caller_said("Remember me."));
    first.call_with_lines(&call_sid(5001), 1).await;
    twilio.stop().await;
    twilio.closed_within(Duration::from_secs(2)).await;
    first.state.lifecycle.begin_drain();
    first.server.await.unwrap().unwrap();

    let second = api_app(&fake, &[("DATABASE_URL", &database)]).await;
    let body = second.call_with_lines(&call_sid(5001), 1).await;
    assert_eq!(body["transcript"][0]["text"], "Remember me.");
    assert_eq!(body["call"]["end_reason"], "caller_hung_up");
}

/// SIGKILL gives no chance to record anything: the transcript must already be durable, and the
/// machine, restarted under the same name (as Fly restarts a Machine), records the call as lost.
#[tokio::test]
async fn sigkill_mid_call_loses_at_most_the_last_second_of_transcript_and_the_call_ends_lost() {
    let fake = FakeRealtime::start().await;
    let env = [
        ("OPENAI_REALTIME_URL", fake.url.as_str()),
        ("FLY_MACHINE_ID", "machine-6001"),
    ];
    let mut server = Binary::start(&env).await;
    let (mut twilio, session) = connected_call(&server, &fake, &call_sid(6001)).await;
    let mut produced = Vec::new();
    for n in 0..30 {
        twilio.media(n, &frame(0, n)).await;
        let text = format!("line number {n}");
        session.send(caller_said(&text));
        produced.push((Instant::now(), text));
        // An agent answer whose audio is still playing (no mark echoed) is durable too.
        let item = format!("item_{n}");
        session.send(crate::stream::delta(
            "resp",
            &item,
            &crate::fake_twilio::agent_audio(500, 1),
        ));
        let answer = format!("answer number {n}");
        session.send(agent_said(&item, &answer));
        produced.push((Instant::now(), answer));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.signal("KILL");
    let killed_at = Instant::now();
    server.exit_status_within(Duration::from_secs(5)).await;

    let store = callbridge::store::Store::connect(&server.database)
        .await
        .unwrap();
    let detail = store
        .call(&call_sid(6001))
        .await
        .unwrap()
        .expect("the call was recorded");
    let stored: Vec<&str> = detail.transcript.iter().map(|l| l.text.as_str()).collect();
    let must_survive: Vec<&str> = produced
        .iter()
        .filter(|(at, _)| killed_at.duration_since(*at) > Duration::from_secs(1))
        .map(|(_, text)| text.as_str())
        .collect();
    assert!(
        must_survive.len() >= 19,
        "the call ran long enough to test something"
    );
    for text in &must_survive {
        assert!(
            stored.contains(text),
            "{text:?} was lost; stored: {stored:?}"
        );
    }
    assert_eq!(
        detail.call.ended_at_ms, None,
        "nothing could record the end"
    );

    let database = [("DATABASE_URL", server.database.as_str())];
    let restarted = Binary::start(&[env.as_slice(), &database].concat()).await;
    let call = store.call(&call_sid(6001)).await.unwrap().unwrap().call;
    assert_eq!(call.end_reason.as_deref(), Some("lost"), "{call:?}");
    assert!(call.ended_at_ms.is_some());
    drop(restarted);
}

/// A call known only from a status callback that named no direction reads back as stored: its
/// status exactly as Twilio wrote it, its direction empty.
#[tokio::test]
async fn a_call_known_only_from_a_status_callback_reads_back_as_twilio_wrote_it() {
    let app = spawn_app(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let callback = form(&[
        ("CallSid", &call_sid(3200)),
        ("AccountSid", ACCOUNT_SID),
        ("CallStatus", "no-answer"),
        ("SequenceNumber", "2"),
    ]);
    assert_eq!(
        app.post_signed("/voice/status", &callback).await.status(),
        204
    );
    let page: Value = app.api_get("/calls").await.json().await.unwrap();
    let call = &page["calls"][0];
    assert_eq!(
        (&call["call_sid"], &call["status"], &call["direction"]),
        (&json!(call_sid(3200)), &json!("no-answer"), &json!(""))
    );
}
