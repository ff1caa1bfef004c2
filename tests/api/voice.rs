use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use callbridge::admission::STREAM_TOKEN_TTL;
use callbridge::twilio::twiml::{ConnectStream, SayHangup};

use crate::helpers::*;

#[tokio::test]
async fn signed_voice_webhook_gets_twiml_that_connects_the_stream() {
    let app = spawn_app(&[]).await;
    let response = app.post_signed("/voice", &voice_form(&call_sid(1))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/xml; charset=utf-8"
    );
    let twiml = parse_twiml(&response.text().await.unwrap());
    assert_eq!(
        twiml.elements,
        [
            "Response",
            "Connect",
            "Stream",
            "Parameter",
            "Parameter",
            "Parameter",
            "Parameter",
            "Parameter",
            "Say",
            "Hangup"
        ]
    );
    let token = &twiml.parameters["token"];
    assert!(
        token.len() >= 22,
        "token {token:?} carries at least 128 bits"
    );
    assert_eq!(
        twiml.stream_url,
        Some(format!("wss://callbridge.test/stream/{token}")),
        "each call's upgrade is signed over its own URL"
    );
    assert_eq!(twiml.parameters["from"], "whatsapp:+5511999990000");
    assert_eq!(twiml.parameters["to"], "whatsapp:+558551234567");
    assert_eq!(twiml.parameters["direction"], "inbound");
    assert_eq!(twiml.parameters["agent"], "default");
    assert_eq!(app.state.admission.occupancy().pending, 1);
}

#[tokio::test]
async fn plain_phone_number_calls_are_answered_and_http_base_urls_give_ws() {
    let app = spawn_app(&[("PUBLIC_BASE_URL", "http://localhost:8080")]).await;
    let params = form(&[
        ("CallSid", &call_sid(2)),
        ("AccountSid", ACCOUNT_SID),
        ("From", "+14158675309"),
        ("To", "+18005551212"),
        ("Direction", "outbound-api"),
    ]);
    let signature = twilio_signature("http://localhost:8080/voice", &params);
    let response = app.post_form("/voice", &params, Some(&signature)).await;
    assert_eq!(response.status(), 200);
    let twiml = parse_twiml(&response.text().await.unwrap());
    assert_eq!(
        twiml.stream_url,
        Some(format!(
            "ws://localhost:8080/stream/{}",
            twiml.parameters["token"]
        ))
    );
    assert_eq!(twiml.parameters["from"], "+14158675309");
    assert_eq!(twiml.parameters["direction"], "outbound-api");
}

#[tokio::test]
async fn bad_signatures_are_refused_with_an_empty_403() {
    let app = spawn_app(&[]).await;
    let params = voice_form(&call_sid(3));

    let missing = app.post_form("/voice", &params, None).await;
    assert_eq!(missing.status(), 403);
    assert_eq!(missing.text().await.unwrap(), "");

    let wrong = app
        .post_form("/voice", &params, Some("RSOYDt4T1cUTdK1PDd93/VVr8B8="))
        .await;
    assert_eq!(wrong.status(), 403);

    let signature = twilio_signature(&format!("{PUBLIC_BASE_URL}/voice"), &params);
    let mut replayed = params.clone();
    replayed[2].1 = "whatsapp:+5511888880000".into();
    let replay = app.post_form("/voice", &replayed, Some(&signature)).await;
    assert_eq!(replay.status(), 403);
    assert_eq!(replay.text().await.unwrap(), "");

    let signed_for_host_header = twilio_signature(&format!("{}/voice", app.address), &params);
    let host = app
        .post_form("/voice", &params, Some(&signed_for_host_header))
        .await;
    assert_eq!(host.status(), 403, "the Host header is never trusted");

    assert_eq!(app.state.metrics.signature_failures.get(), 4);
    assert_eq!(
        app.state.admission.occupancy().pending,
        0,
        "no token was issued"
    );
}

#[tokio::test]
async fn signature_over_the_default_port_form_is_accepted() {
    let app = spawn_app(&[]).await;
    let params = voice_form(&call_sid(4));
    let signature = twilio_signature("https://callbridge.test:443/voice", &params);
    let response = app.post_form("/voice", &params, Some(&signature)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn query_strings_are_part_of_the_signed_url() {
    let app = spawn_app(&[]).await;
    let params = voice_form(&call_sid(5));
    let signed = twilio_signature(&format!("{PUBLIC_BASE_URL}/voice?agent=sales"), &params);
    let response = app
        .post_form("/voice?agent=sales", &params, Some(&signed))
        .await;
    assert_eq!(response.status(), 200);
    let response = app
        .post_form("/voice?agent=support", &params, Some(&signed))
        .await;
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn status_callbacks_are_signature_checked_and_acknowledged() {
    let app = spawn_app(&[]).await;
    let params = form(&[
        ("CallSid", &call_sid(6)),
        ("AccountSid", ACCOUNT_SID),
        ("CallStatus", "completed"),
        ("CallDuration", "42"),
        ("SequenceNumber", "3"),
        ("CallbackSource", "call-progress-events"),
    ]);
    let response = app.post_signed("/voice/status", &params).await;
    assert_eq!(response.status(), 204);
    let forged = app.post_form("/voice/status", &params, Some("AAAA")).await;
    assert_eq!(forged.status(), 403);
    let unsigned = app.post_form("/voice/status", &params, None).await;
    assert_eq!(unsigned.status(), 403);
}

#[tokio::test]
async fn a_signed_form_without_a_call_sid_is_refused() {
    let app = spawn_app(&[]).await;
    let response = app
        .post_signed(
            "/voice",
            &form(&[("AccountSid", ACCOUNT_SID), ("From", "+14158675309")]),
        )
        .await;
    assert_eq!(response.status(), 403);
    assert_eq!(response.text().await.unwrap(), "");
    assert_eq!(app.state.metrics.webhooks_refused.get(), 1);
    assert_eq!(app.state.metrics.signature_failures.get(), 0);
}

#[tokio::test]
async fn calls_beyond_capacity_hear_the_busy_message() {
    let app = spawn_app(&[("MAX_CONCURRENT_CALLS", "2")]).await;
    app.answer_call(&call_sid(11)).await;
    app.answer_call(&call_sid(12)).await;
    let response = app.post_signed("/voice", &voice_form(&call_sid(13))).await;
    assert_eq!(response.status(), 200);
    let twiml = parse_twiml(&response.text().await.unwrap());
    assert_eq!(twiml.elements, ["Response", "Say", "Hangup"]);
    assert!(twiml.say[0].contains("busy"));
    assert_eq!(app.state.metrics.calls_refused_busy.get(), 1);
}

#[tokio::test]
async fn draining_fails_readiness_and_turns_new_calls_away() {
    let app = spawn_app(&[]).await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
    // A pending call keeps the drain (and the server) alive long enough to observe it.
    app.answer_call(&call_sid(21)).await;

    app.state.lifecycle.begin_drain();
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "draining");
    assert_eq!(app.get("/healthz").await.status(), 200);

    let response = app.post_signed("/voice", &voice_form(&call_sid(22))).await;
    let twiml = parse_twiml(&response.text().await.unwrap());
    assert_eq!(twiml.elements, ["Response", "Say", "Hangup"]);
    assert_eq!(app.state.metrics.calls_refused_draining.get(), 1);
}

#[tokio::test]
async fn metrics_are_exposed_in_openmetrics_text_format() {
    let app = spawn_app(&[]).await;
    app.post_form("/voice", &voice_form(&call_sid(31)), None)
        .await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    assert!(
        text.contains("callbridge_signature_failures_total 1\n"),
        "{text}"
    );
    assert!(text.contains("# TYPE callbridge_live_calls gauge"));
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[tokio::test]
async fn control_characters_in_a_caller_id_are_dropped_from_the_twiml() {
    let app = spawn_app(&[]).await;
    let mut params = voice_form(&call_sid(2));
    params[2].1 = "whatsapp:+55\u{1}1199999\u{b}0000\u{ffff}\t".into();
    params[3].1 = "whatsapp:\u{1b}[2J+558551234567".into();
    let response = app.post_signed("/voice", &params).await;
    assert_eq!(response.status(), 200);
    let xml = response.text().await.unwrap();
    assert!(
        !xml.chars()
            .any(|c| c < ' ' && !matches!(c, '\t' | '\n' | '\r') || c == '\u{ffff}'),
        "characters XML 1.0 does not allow: {xml:?}"
    );
    let twiml = parse_twiml(&xml);
    assert_eq!(twiml.parameters["from"], "whatsapp:+5511999990000\t");
    assert_eq!(twiml.parameters["to"], "whatsapp:[2J+558551234567");
}

#[tokio::test]
async fn the_pending_streams_gauge_falls_when_a_reservation_expires() {
    let clock = Arc::new(ManualClock::default());
    let app = spawn_app_with_clock(test_config(&[]), clock.clone()).await;
    app.answer_call(&call_sid(51)).await;
    let scrape = || async { app.get("/metrics").await.text().await.unwrap() };
    let text = scrape().await;
    assert!(text.contains("callbridge_pending_streams 1\n"), "{text}");
    clock.advance(STREAM_TOKEN_TTL - Duration::from_millis(1));
    let text = scrape().await;
    assert!(text.contains("callbridge_pending_streams 1\n"), "{text}");
    // No other /voice comes: the scrape itself sees the reservation gone.
    clock.advance(Duration::from_millis(1));
    let text = scrape().await;
    assert!(text.contains("callbridge_pending_streams 0\n"), "{text}");
}

#[test]
fn hostile_values_are_escaped_and_parse_back_unchanged() {
    let hostile = r#"<&"'>"/><Hangup/>"#;
    let xml = ConnectStream {
        stream_url: "wss://x.example/stream?a=1&b=2",
        parameters: &[("from", hostile), (hostile, "v")],
        apology: hostile,
    }
    .render()
    .unwrap();
    assert!(!xml.contains(hostile));
    let twiml = parse_twiml(&xml);
    assert_eq!(
        twiml.elements,
        [
            "Response",
            "Connect",
            "Stream",
            "Parameter",
            "Parameter",
            "Say",
            "Hangup"
        ]
    );
    assert_eq!(
        twiml.stream_url.as_deref(),
        Some("wss://x.example/stream?a=1&b=2")
    );
    assert_eq!(twiml.parameters["from"], hostile);
    assert_eq!(twiml.parameters[hostile], "v");
    assert_eq!(twiml.say, [hostile]);

    let busy = parse_twiml(&SayHangup { message: hostile }.render().unwrap());
    assert_eq!(busy.say, [hostile]);
}

#[tokio::test]
async fn a_replayed_voice_webhook_gets_the_same_token_and_none_after_the_stream_started() {
    let app = spawn_app(&[]).await;
    let first = app.answer_call(&call_sid(41)).await;
    let retry = app.answer_call(&call_sid(41)).await;
    assert_eq!(
        first, retry,
        "one token per call, however often /voice is requested"
    );
    assert_eq!(app.state.admission.occupancy().pending, 1);

    let started = callbridge::store::Record::StreamStarted {
        call_sid: call_sid(41),
        stream_sid: format!("MZ{:032}", 41),
        agent: "default".into(),
        at_ms: 1,
    };
    app.state.records.record(started);
    app.state.records.flush().await;
    let replay = app.post_signed("/voice", &voice_form(&call_sid(41))).await;
    let twiml = parse_twiml(&replay.text().await.unwrap());
    assert_eq!(
        twiml.elements,
        ["Response", "Say", "Hangup"],
        "no new stream for a started call"
    );
}
