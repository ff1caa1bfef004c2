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

use crate::helpers::*;
use crate::stream::connected_call;
use callbridge_testkit::realtime::FakeRealtime;

const API_TOKEN: &str = "server-api-token-0123456789abcdef";
const CALL_SID: &str = "CA0123456789abcdef0123456789ab7001";

#[tokio::test]
async fn no_log_level_prints_a_secret() {
    let fake = FakeRealtime::start().await;
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
    twilio.stop().await;
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
        (callbridge_testkit::realtime::API_KEY, "the OpenAI key"),
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
    let fake = FakeRealtime::start().await;
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

/// A client that sends `head`, then one `unit` of body every 100 ms, as long as the server
/// lets it. Returns what the server answered once it closed the connection, or `None` if the
/// connection was still open after `within`.
async fn dribble(address: &str, head: &str, unit: &[u8], within: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let give_up = tokio::time::Instant::now() + within;
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut drip = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            read = stream.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return Some(String::from_utf8_lossy(&answer).into_owned()),
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            },
            _ = drip.tick() => {
                // Writing into a closed connection fails; the read then reports the close.
                let _ = stream.write_all(unit).await;
            }
            () = tokio::time::sleep_until(give_up) => return None,
        }
    }
}

#[tokio::test]
async fn a_request_body_that_does_not_arrive_in_time_is_answered_408_and_cut_off() {
    let app = spawn_app(&[("REQUEST_TIMEOUT_SECS", "1")]).await;
    let form = "Content-Type: application/x-www-form-urlencoded\r\n";
    for (head, unit) in [
        (
            format!("POST /voice HTTP/1.1\r\nHost: x\r\n{form}Content-Length: 4000\r\n\r\n"),
            &b"a"[..],
        ),
        (
            format!("POST /voice HTTP/1.1\r\nHost: x\r\n{form}Transfer-Encoding: chunked\r\n\r\n"),
            b"1\r\na\r\n",
        ),
        // Only a WebSocket handshake (a GET) may keep its connection past the deadline.
        (
            format!(
                "POST /voice HTTP/1.1\r\nHost: x\r\n{form}Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 4000\r\n\r\n"
            ),
            b"a",
        ),
        // No route reads this body; a chunked one actix would otherwise read to its end.
        (
            "POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            b"1\r\na\r\n",
        ),
    ] {
        let answer = dribble(&app.address, &head, unit, Duration::from_secs(6))
            .await
            .unwrap_or_else(|| panic!("still open 6 s into a 1 s deadline: {head:?}"));
        assert!(answer.starts_with("HTTP/1.1 408"), "{head:?}: {answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
    }
}

#[tokio::test]
async fn a_connection_cannot_dribble_the_head_of_a_second_request() {
    let app = spawn_app(&[]).await;
    let answer = dribble(
        &app.address,
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G",
        Duration::from_secs(10),
    )
    .await
    .expect("the connection is closed after its first request (or its next head times out)");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// With the soft open-file limit at 256, as many clients as that dribbling their bodies: the
/// server raises its limit, and `/healthz` still answers.
#[tokio::test]
async fn healthz_answers_while_hundreds_of_clients_hold_unfinished_requests() {
    const DRIBBLERS: usize = 300;
    let mut shell = std::process::Command::new("sh");
    shell.args([
        "-c",
        r#"ulimit -S -n 256 && exec "$0""#,
        env!("CARGO_BIN_EXE_callbridge"),
    ]);
    let server = Binary::start_with(shell, &[]).await;
    let address = server.address.trim_start_matches("http://").to_owned();
    let mut dribblers = Vec::with_capacity(DRIBBLERS);
    for _ in 0..DRIBBLERS {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream
            .write_all(b"POST /voice HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\na")
            .await
            .unwrap();
        dribblers.push(stream);
    }
    // A new client: the one that saw the server start could reuse its connection.
    let prober = Client::new(server.address.clone());
    let health = tokio::time::timeout(Duration::from_secs(5), prober.get("/healthz")).await;
    assert_eq!(health.expect("/healthz answered within 5 s").status(), 200);
    drop(dribblers);
}

/// The most common first-hour failure is a PUBLIC_BASE_URL that is not the URL Twilio calls: the
/// refusal names the URL that was checked, and never the signature.
#[tokio::test]
async fn a_refused_signature_logs_the_url_it_was_checked_against() {
    let mut server = Binary::start(&[]).await;
    let response = server
        .http
        .post(format!("{}/voice", server.address))
        .header("x-twilio-signature", "c2lnbmF0dXJlLW5vdC12YWxpZA==")
        .form(&[("CallSid", CALL_SID), ("AccountSid", ACCOUNT_SID)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    server.signal("TERM");
    assert!(
        server
            .exit_status_within(Duration::from_secs(20))
            .await
            .success()
    );
    let output = server.output();
    let refusal: Vec<&str> = output
        .lines()
        .filter(|line| line.contains("refused a request claiming to come from Twilio"))
        .collect();
    assert_eq!(refusal.len(), 1, "{output}");
    assert!(
        refusal[0].contains(&format!("{PUBLIC_BASE_URL}/voice")),
        "{output}"
    );
    assert!(refusal[0].contains("PUBLIC_BASE_URL"), "{output}");
    assert!(!output.contains("c2lnbmF0dXJlLW5vdC12YWxpZA=="), "{output}");
}
