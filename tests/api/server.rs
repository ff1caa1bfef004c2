//! The server as a process facing the network: what it logs, how it stops, how it holds up
//! against clients that never finish their requests.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
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
