//! The server as a process facing the network: what it logs, how it stops, how it holds up
//! against clients that never finish their requests.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use callbridge::store::Store;
use callbridge::store::models::CallRecord;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::fake_openai::FakeOpenAi;
use crate::helpers::*;
use crate::stream::connected_call;

const API_TOKEN: &str = "server-api-token-0123456789abcdef";
const CALL_SID: &str = "CA0123456789abcdef0123456789ab7001";

#[tokio::test]
async fn no_log_level_prints_a_secret() {
    let fake = FakeOpenAi::start().await;
    let twilio_rest = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!(
            "/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_SID}.json"
        )))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"sid": CALL_SID, "status": "completed"})),
        )
        .expect(1)
        .mount(&twilio_rest)
        .await;
    let twilio_url = twilio_rest.uri();
    let mut server = Binary::start(&[
        ("RUST_LOG", "trace"),
        ("OPENAI_REALTIME_URL", &fake.url),
        ("TWILIO_API_BASE_URL", &twilio_url),
        ("CALLBRIDGE_API_TOKEN", API_TOKEN),
    ])
    .await;

    // The OpenAI leg opens with the API key; the REST hang-up sends Twilio's Basic credential.
    let (mut twilio, _session) = connected_call(&server, &fake, CALL_SID).await;
    let hung_up = server
        .http
        .post(format!("{}/calls/{CALL_SID}/hangup", server.address))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(hung_up.status(), 200);
    twilio.stop(CALL_SID).await;
    twilio.closed_within(Duration::from_secs(5)).await;
    server.signal("TERM");
    assert!(
        server
            .exit_status_within(Duration::from_secs(20))
            .await
            .success()
    );

    let output = server.output();
    assert!(output.contains("TRACE"), "the server logged at trace level");
    let basic = STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"));
    let upgrade_signature = twilio_signature(
        &format!("{}/stream", PUBLIC_BASE_URL.replacen("https", "wss", 1)),
        &[],
    );
    for (secret, name) in [
        (crate::fake_openai::API_KEY, "the OpenAI key"),
        (AUTH_TOKEN, "the Twilio auth token"),
        (basic.as_str(), "the Basic credential"),
        (API_TOKEN, "the API token"),
        (upgrade_signature.as_str(), "a Twilio signature"),
    ] {
        let lines: Vec<&str> = output.lines().filter(|l| l.contains(secret)).collect();
        assert!(lines.is_empty(), "{name} was logged:\n{}", lines.join("\n"));
    }
}

/// Polls the call's row until `done` holds for it (records are committed asynchronously).
async fn wait_for_call(
    store: &Store,
    call_sid: &str,
    done: impl Fn(&CallRecord) -> bool,
) -> CallRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(detail) = store.call(call_sid).await.unwrap()
            && done(&detail.call)
        {
            return detail.call;
        }
        assert!(Instant::now() < deadline, "the call's row never got there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_second_sigterm_stops_at_once_and_still_records_the_live_call_as_ended() {
    let fake = FakeOpenAi::start().await;
    let mut server = Binary::start(&[("OPENAI_REALTIME_URL", &fake.url)]).await;
    let (_twilio, _session) = connected_call(&server, &fake, CALL_SID).await;
    let store = Store::connect(&server.database).await.unwrap();
    wait_for_call(&store, CALL_SID, |call| call.stream_sid.is_some()).await;

    // The first signal starts the drain; the call may go on for DRAIN_TIMEOUT_SECS (300).
    server.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.get("/readyz").await.status() != 503 {
        assert!(Instant::now() < deadline, "the drain did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.signal("TERM");
    let second_signal = Instant::now();
    let status = server.exit_status_within(Duration::from_secs(20)).await;
    let took = second_signal.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(3),
        "a second signal should stop the server at once; it took {took:?}"
    );

    let call = store.call(CALL_SID).await.unwrap().unwrap().call;
    assert!(call.ended_at_ms.is_some(), "{call:?}");
    assert_eq!(call.end_reason.as_deref(), Some("shutdown"));
}
