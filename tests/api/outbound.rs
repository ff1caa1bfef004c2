//! Outbound WhatsApp calls through the HTTP API, with wiremock standing in for Twilio's REST API
//! and a clock the tests move by days.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use callbridge::clock::Clock;
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

use crate::calls::API_TOKEN;
use crate::fake_twilio::FakeTwilio;
use crate::helpers::*;
use callbridge_testkit::realtime::FakeRealtime;

const BUSINESS: &str = "+558551234567";
const USER: &str = "+5511999990000";
const CONTENT_SID: &str = "HX0123456789abcdef0123456789abcdef";
const DAY: Duration = Duration::from_secs(86_400);

/// Matches a form body with exactly these fields (order of different names is free, as in
/// any form; repeated names must appear in this order).
struct ExactForm(Vec<(String, String)>);

impl Match for ExactForm {
    fn matches(&self, request: &Request) -> bool {
        let Ok(mut received) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&request.body)
        else {
            return false;
        };
        let mut expected = self.0.clone();
        received.sort_by(|a, b| a.0.cmp(&b.0));
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        received == expected
    }
}

fn exact_form(pairs: &[(&str, &str)]) -> ExactForm {
    ExactForm(form(pairs))
}

/// Answers each message send as Twilio does, with a new MessageSid every time.
struct NewMessageSids(AtomicI64);

impl wiremock::Respond for NewMessageSids {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        ResponseTemplate::new(201)
            .set_body_json(json!({"sid": format!("SM{n:032}"), "status": "queued"}))
    }
}

fn new_message_sids() -> NewMessageSids {
    NewMessageSids(AtomicI64::new(0))
}

/// The MessageSid of the user's reply numbered `n`; never one of our requests' (`SM0…`).
fn reply_sid(n: u64) -> String {
    format!("SMa{n:031}")
}

struct Outbound {
    app: TestApp,
    twilio: MockServer,
    clock: Arc<ManualClock>,
}

fn basic_auth() -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"))
    )
}

fn account_path(resource: &str) -> String {
    format!("/2010-04-01/Accounts/{ACCOUNT_SID}/{resource}")
}

async fn outbound_app(extra: &[(&str, &str)]) -> Outbound {
    let twilio = MockServer::start().await;
    let mut overrides = vec![
        ("TWILIO_API_BASE_URL", twilio.uri()),
        ("TWILIO_WHATSAPP_NUMBER", BUSINESS.into()),
        ("TWILIO_CALL_PERMISSION_CONTENT_SID", CONTENT_SID.into()),
        ("CALLBRIDGE_API_TOKEN", API_TOKEN.into()),
    ];
    overrides.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let pairs: Vec<(&str, &str)> = overrides.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let clock = Arc::new(ManualClock::default());
    let app = spawn_app_with_clock(test_config(&pairs), clock.clone()).await;
    Outbound { app, twilio, clock }
}

impl Outbound {
    async fn request_permission(&self) -> reqwest::Response {
        self.request_permission_to(USER).await
    }

    async fn request_permission_to(&self, to: &str) -> reqwest::Response {
        self.app
            .api_post("/call-permissions", json!({"to": to}))
            .await
    }

    async fn place_call(&self, body: Value) -> reqwest::Response {
        self.app.api_post("/calls", body).await
    }

    /// Twilio's messaging webhook with the user's button press.
    async fn reply(&self, message_sid: &str, payload: &str) -> reqwest::Response {
        let params = permission_reply_form(message_sid, payload);
        self.app.post_signed("/messaging", &params).await
    }

    /// Replays a signed acceptance as captured, then folded so that its MessageSid differs,
    /// then sends a fresh acceptance as if the MessageSid could have been changed: none counts.
    async fn replay_acceptance(&self, captured: &[(String, String)]) {
        let signature = twilio_signature(&format!("{PUBLIC_BASE_URL}/messaging"), captured);
        let exact = self
            .app
            .post_form("/messaging", captured, Some(&signature))
            .await;
        assert_eq!(exact.status(), 204, "an exact replay is acknowledged");
        let folded = swallow_next(captured, "MessageSid", 1);
        let folded = self
            .app
            .post_form("/messaging", &folded, Some(&signature))
            .await;
        assert_eq!(folded.status(), 403, "a folded replay is refused");
        let fresh = permission_reply_form(&reply_sid(999), "ACCEPTED");
        assert_eq!(
            self.app.post_signed("/messaging", &fresh).await.status(),
            204
        );
    }

    /// Asks the user and has them accept; returns the signed acceptance as Twilio sent it.
    async fn ask_and_accept(&self, reply: u64) -> Vec<(String, String)> {
        assert_eq!(self.request_permission().await.status(), 201);
        let accepted = permission_reply_form(&reply_sid(reply), "ACCEPTED");
        assert_eq!(
            self.app.post_signed("/messaging", &accepted).await.status(),
            204
        );
        accepted
    }

    /// The user is asked and accepts: the way every grant comes about.
    async fn grant(&self) {
        self.messages_succeed().await;
        assert_eq!(self.request_permission().await.status(), 201);
        let reply = self
            .reply(&reply_sid(self.clock.now_ms().unsigned_abs()), "ACCEPTED")
            .await;
        assert_eq!(reply.status(), 204);
    }

    /// Twilio accepts message sends.
    async fn messages_succeed(&self) {
        Mock::given(method("POST"))
            .and(path(account_path("Messages.json")))
            .respond_with(new_message_sids())
            .mount(&self.twilio)
            .await;
    }

    /// Twilio creates the calls numbered `sids` (see `call_sid`), one per request, in turn.
    async fn calls_succeed(&self, sids: std::ops::RangeInclusive<u64>) {
        for n in sids {
            Mock::given(method("POST"))
                .and(path(account_path("Calls.json")))
                .respond_with(
                    ResponseTemplate::new(201)
                        .set_body_json(json!({"sid": call_sid(n), "status": "queued"})),
                )
                .up_to_n_times(1)
                .with_priority(u8::try_from(n).unwrap())
                .mount(&self.twilio)
                .await;
        }
    }

    /// Places one call per sid in `sids`, each answered by Twilio's callbacks `statuses`.
    async fn place_calls(&self, sids: std::ops::RangeInclusive<u64>, statuses: &[&str]) {
        for n in sids {
            let placed = self.place_call(json!({"to": USER})).await;
            assert_eq!(placed.status(), 201, "call {n}");
            for (sequence, status) in (1..).zip(statuses) {
                self.status(&call_sid(n), status, sequence).await;
            }
        }
    }

    /// The next call is refused because the user's permission was revoked.
    async fn expect_revoked(&self) {
        let refused = self.place_call(json!({"to": USER})).await;
        let error = expect_error(refused, 409, "no_call_permission").await;
        assert!(
            error["message"].as_str().unwrap().contains("revoked"),
            "{error}"
        );
    }

    async fn calls_json_requests(&self) -> usize {
        self.twilio
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.url.path().ends_with("/Calls.json"))
            .count()
    }

    async fn status(&self, call_sid: &str, status: &str, sequence: u32) {
        let sequence = sequence.to_string();
        let params = form(&[
            ("CallSid", call_sid),
            ("AccountSid", ACCOUNT_SID),
            ("CallStatus", status),
            ("SequenceNumber", &sequence),
            ("Direction", "outbound-api"),
            ("From", &format!("whatsapp:{BUSINESS}")),
            ("To", &format!("whatsapp:{USER}")),
        ]);
        assert_eq!(
            self.app
                .post_signed("/voice/status", &params)
                .await
                .status(),
            204
        );
    }
}

async fn error_code(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["error"].clone())
}

/// Asserts the API answered `status` with error `code`, and returns the error object.
async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    let (actual, error) = error_code(response).await;
    assert_eq!(
        (actual, error["code"].as_str()),
        (status, Some(code)),
        "{error}"
    );
    error
}

#[tokio::test]
async fn a_permission_request_sends_the_template_within_metas_limits() {
    let o = outbound_app(&[]).await;
    Mock::given(method("POST"))
        .and(path(account_path("Messages.json")))
        .and(header("authorization", basic_auth().as_str()))
        .and(exact_form(&[
            ("ContentSid", CONTENT_SID),
            ("From", &format!("whatsapp:{BUSINESS}")),
            ("To", &format!("whatsapp:{USER}")),
        ]))
        .respond_with(new_message_sids())
        .expect(2)
        .mount(&o.twilio)
        .await;

    let first = o.request_permission().await;
    assert_eq!(first.status(), 201);
    let body: Value = first.json().await.unwrap();
    assert_eq!(
        body,
        json!({"to": USER, "message_sid": format!("SM{:032}", 1), "state": "pending"})
    );

    o.clock.advance(Duration::from_secs(3600));
    let second = o.request_permission().await;
    assert_eq!(second.status(), 429);
    let retry_after: i64 = second.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, 23 * 3600);
    let (_, error) = error_code(second).await;
    assert_eq!(error["code"], "permission_request_limited");
    assert_eq!(error["retry_at"], "2027-01-16T08:00:00Z");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("2027-01-16T08:00:00Z")
    );

    o.clock.advance(DAY);
    assert_eq!(
        o.request_permission().await.status(),
        201,
        "a day later, the second of the week"
    );
    o.clock.advance(DAY + Duration::from_secs(1));
    expect_error(
        o.request_permission().await,
        429,
        "permission_request_limited",
    )
    .await; // a third within 7 days
    o.clock.advance(6 * DAY);
    o.twilio.verify().await;
}

#[tokio::test]
async fn no_call_is_placed_without_a_valid_grant() {
    let o = outbound_app(&[]).await;
    o.messages_succeed().await;
    let error = expect_error(
        o.place_call(json!({"to": USER})).await,
        409,
        "no_call_permission",
    )
    .await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("/call-permissions")
    );

    assert_eq!(o.request_permission().await.status(), 201);
    expect_error(
        o.place_call(json!({"to": USER})).await,
        409,
        "no_call_permission",
    )
    .await; // pending is not granted
    assert_eq!(
        o.calls_json_requests().await,
        0,
        "Twilio's Calls.json is never called"
    );

    Mock::given(method("POST"))
        .and(path(account_path("Calls.json")))
        .and(header("authorization", basic_auth().as_str()))
        .and(exact_form(&[
            ("From", &format!("whatsapp:{BUSINESS}")),
            ("To", &format!("whatsapp:{USER}")),
            ("Url", "https://callbridge.test/voice"),
            ("Method", "POST"),
            ("StatusCallback", "https://callbridge.test/voice/status"),
            ("StatusCallbackMethod", "POST"),
            ("StatusCallbackEvent", "initiated"),
            ("StatusCallbackEvent", "ringing"),
            ("StatusCallbackEvent", "answered"),
            ("StatusCallbackEvent", "completed"),
            ("Timeout", "30"),
        ]))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"sid": call_sid(1), "status": "queued"})),
        )
        .expect(1)
        .mount(&o.twilio)
        .await;
    assert_eq!(o.reply(&reply_sid(1), "ACCEPTED").await.status(), 204);
    let placed = o.place_call(json!({"to": USER})).await;
    assert_eq!(placed.status(), 201);
    let body: Value = placed.json().await.unwrap();
    assert_eq!(body, json!({"call_sid": call_sid(1), "status": "queued"}));
    o.twilio.verify().await;

    o.clock.advance(7 * DAY);
    let error = expect_error(
        o.place_call(json!({"to": USER})).await,
        409,
        "no_call_permission",
    )
    .await; // the grant expired
    assert!(error["message"].as_str().unwrap().contains("expired"));
}

#[tokio::test]
async fn a_rejection_blocks_calls_and_retried_replies_count_once() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=1).await;
    o.messages_succeed().await;
    assert_eq!(o.request_permission().await.status(), 201);
    assert_eq!(o.reply(&reply_sid(1), "ACCEPTED").await.status(), 204);
    o.clock.advance(Duration::from_secs(60));
    assert_eq!(o.reply(&reply_sid(2), "REJECTED").await.status(), 204);
    // Twilio retries the earlier ACCEPTED webhook: it must not grant again.
    assert_eq!(o.reply(&reply_sid(1), "ACCEPTED").await.status(), 204);
    let error = expect_error(
        o.place_call(json!({"to": USER})).await,
        409,
        "no_call_permission",
    )
    .await;
    assert!(error["message"].as_str().unwrap().contains("declined"));
    // Ordinary chat messages are acknowledged and ignored.
    let chat = form(&[
        ("MessageSid", &reply_sid(3)),
        ("AccountSid", ACCOUNT_SID),
        ("From", &format!("whatsapp:{USER}")),
        ("Body", "hello"),
    ]);
    assert_eq!(o.app.post_signed("/messaging", &chat).await.status(), 204);
    assert_eq!(
        o.app.post_form("/messaging", &chat, None).await.status(),
        403
    );
    assert_eq!(o.calls_json_requests().await, 0);
}

#[tokio::test]
async fn the_sixth_connected_call_in_a_day_is_refused() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=6).await;
    o.grant().await;
    for n in 1..=5 {
        o.place_calls(n..=n, &["in-progress", "completed"]).await;
        o.clock.advance(Duration::from_secs(600));
    }
    expect_error(
        o.place_call(json!({"to": USER})).await,
        429,
        "call_limit_reached",
    )
    .await;
    assert_eq!(o.calls_json_requests().await, 5);
    o.clock.advance(DAY);
    assert_eq!(
        o.place_call(json!({"to": USER})).await.status(),
        201,
        "a day later the count is clear"
    );
}

#[tokio::test]
async fn four_unanswered_calls_in_a_row_revoke_the_permission() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=6).await;
    o.grant().await;
    // An answered call in between resets the run.
    for (n, outcome) in [
        (1, "no-answer"),
        (2, "completed"),
        (3, "no-answer"),
        (4, "busy"),
        (5, "no-answer"),
    ] {
        assert_eq!(
            o.place_call(json!({"to": USER})).await.status(),
            201,
            "call {n}"
        );
        o.status(&call_sid(n), outcome, 3).await;
    }
    assert_eq!(
        o.place_call(json!({"to": USER})).await.status(),
        201,
        "three in a row is allowed"
    );
    o.status(&call_sid(6), "no-answer", 3).await;
    o.status(&call_sid(6), "no-answer", 3).await; // a retried callback counts once
    o.expect_revoked().await;
}

#[tokio::test]
async fn twilio_errors_map_to_documented_outcomes() {
    let o = outbound_app(&[]).await;
    o.grant().await;
    Mock::given(method("POST"))
        .and(path(account_path("Calls.json")))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"code": 20500, "message": "Internal Server Error", "more_info": "https://www.twilio.com/docs/errors/20500", "status": 500})))
        .up_to_n_times(1)
        .mount(&o.twilio)
        .await;
    let (status, error) = error_code(o.place_call(json!({"to": USER})).await).await;
    assert_eq!(
        (
            status,
            error["code"].as_str(),
            error["twilio_code"].as_i64()
        ),
        (502, Some("twilio_error"), Some(20500))
    );
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Internal Server Error")
    );

    Mock::given(method("POST"))
        .and(path(account_path("Calls.json")))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"code": 37000, "message": "WhatsApp Voice: Call permission not granted by consumer", "more_info": "https://www.twilio.com/docs/errors/37000", "status": 400})))
        .up_to_n_times(1)
        .mount(&o.twilio)
        .await;
    expect_error(
        o.place_call(json!({"to": USER})).await,
        409,
        "no_call_permission",
    )
    .await;
    o.expect_revoked().await; // the 37000 revoked the stored grant
    assert_eq!(
        o.calls_json_requests().await,
        2,
        "the revoked grant stops calls before Twilio"
    );

    // A call this server knows (here from its status callback) that Twilio has already ended.
    let ended = call_sid(77);
    o.status(&ended, "completed", 1).await;
    Mock::given(method("POST"))
        .and(path(account_path(&format!("Calls/{ended}.json"))))
        .and(exact_form(&[("Status", "completed")]))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"code": 20404, "message": "The requested resource was not found", "status": 404})))
        .expect(1)
        .mount(&o.twilio)
        .await;
    let hung_up = o
        .app
        .api_post(&format!("/calls/{ended}/hangup"), json!({}))
        .await;
    assert_eq!(
        hung_up.status(),
        200,
        "an already-ended call counts as hung up"
    );

    // A call the store has never seen: 404, and Twilio is not asked.
    let unknown = call_sid(78);
    Mock::given(method("POST"))
        .and(path(account_path(&format!("Calls/{unknown}.json"))))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"sid": unknown, "status": "completed"})),
        )
        .expect(0)
        .mount(&o.twilio)
        .await;
    expect_error(
        o.app
            .api_post(&format!("/calls/{unknown}/hangup"), json!({}))
            .await,
        404,
        "call_not_found",
    )
    .await;
    o.twilio.verify().await;
}

#[tokio::test]
async fn a_twilio_timeout_is_a_504() {
    let o = outbound_app(&[]).await;
    o.grant().await;
    Mock::given(method("POST"))
        .and(path(account_path("Calls.json")))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"sid": call_sid(1), "status": "queued"}))
                .set_delay(TWILIO_TIMEOUT * 2),
        )
        .mount(&o.twilio)
        .await;
    let error = expect_error(
        o.place_call(json!({"to": USER})).await,
        504,
        "twilio_timeout",
    )
    .await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("may or may not")
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_error() {
    let o = outbound_app(&[]).await;
    let error = expect_error(
        o.place_call(json!({"to": "5511999990000"})).await,
        422,
        "invalid_phone_number",
    )
    .await;
    assert!(error["message"].as_str().unwrap().contains("E.164"));
    expect_error(
        o.request_permission_to("+12").await,
        422,
        "invalid_phone_number",
    )
    .await;
    expect_error(
        o.place_call(json!({"to": USER, "context": "x".repeat(4097)}))
            .await,
        422,
        "context_too_long",
    )
    .await;
    expect_error(
        o.place_call(json!({"to": USER, "agent": ""})).await,
        422,
        "invalid_agent",
    )
    .await;

    // Each malformed body gets a 400 whose message names the problem.
    for (body, content_type, named) in [
        ("{\"to\": ", "application/json", "EOF"),
        ("{\"too\": \"+5511999990000\"}", "application/json", "too"),
        (
            "to=+5511999990000",
            "application/x-www-form-urlencoded",
            "Content-Type",
        ),
    ] {
        let response = o
            .app
            .http
            .post(format!("{}/calls", o.app.address))
            .bearer_auth(API_TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let error = expect_error(response, 400, "invalid_json").await;
        assert!(
            error["message"].as_str().unwrap().contains(named),
            "{body}: {error}"
        );
    }

    // Over the API's body limit: 413, in the API's JSON error shape, saying the limit.
    let oversized = json!({"to": USER, "context": "x".repeat(20 * 1024)}).to_string();
    {
        let response = o
            .app
            .http
            .post(format!("{}/calls", o.app.address))
            .bearer_auth(API_TOKEN)
            .header("content-type", "application/json")
            .body(oversized)
            .send()
            .await
            .unwrap();
        let error = expect_error(response, 413, "body_too_large").await;
        assert!(
            error["message"].as_str().unwrap().contains("16384 bytes"),
            "{error}"
        );
        assert_eq!(error["limit_bytes"], 16384);
    }

    let anonymous = o
        .app
        .http
        .post(format!("{}/calls", o.app.address))
        .json(&json!({"to": USER}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(o.calls_json_requests().await, 0);

    let unconfigured = spawn_app(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let response = unconfigured
        .http
        .post(format!("{}/call-permissions", unconfigured.address))
        .bearer_auth(API_TOKEN)
        .json(&json!({"to": USER}))
        .send()
        .await
        .unwrap();
    let error = expect_error(response, 503, "outbound_disabled").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("TWILIO_WHATSAPP_NUMBER")
    );
}

#[tokio::test]
async fn an_outbound_calls_context_reaches_the_agent_before_its_first_response() {
    let fake = FakeRealtime::start().await;
    let o = outbound_app(&[
        ("OPENAI_REALTIME_URL", &fake.url),
        ("AGENT_GREETING", "Greet the user."),
    ])
    .await;
    o.calls_succeed(1..=1).await;
    o.grant().await;
    let context = "Order #4411 is late by two days; offer a 10% voucher.";
    let placed = o
        .place_call(json!({"to": USER, "agent": "default", "context": context}))
        .await;
    assert_eq!(placed.status(), 201);

    // The user picks up: Twilio requests /voice for the call, then opens the stream.
    let params = form(&[
        ("CallSid", &call_sid(1)),
        ("AccountSid", ACCOUNT_SID),
        ("From", &format!("whatsapp:{BUSINESS}")),
        ("To", &format!("whatsapp:{USER}")),
        ("Direction", "outbound-api"),
        ("CallStatus", "in-progress"),
    ]);
    let twiml = parse_twiml(
        &o.app
            .post_signed("/voice", &params)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(twiml.parameters["direction"], "outbound-api");
    assert_eq!(
        twiml.parameters["agent"], "default",
        "the agent POST /calls named"
    );
    let mut twilio = FakeTwilio::connect(&o.app, &twiml.parameters["token"]).await;
    let parameters = serde_json::to_value(&twiml.parameters).unwrap();
    twilio
        .start_with(&call_sid(1), ACCOUNT_SID, parameters)
        .await;

    let mut session = fake.next_session().await;
    session.expect_session_update().await;
    let brief = session.recv().await;
    assert_eq!(brief["type"], "conversation.item.create");
    assert_eq!(brief["item"]["role"], "system");
    let text = brief["item"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains(context) && text.contains("outbound call"),
        "{text}"
    );
    assert_eq!(
        session.recv().await["item"]["content"][0]["text"],
        "Greet the user."
    );
    assert_eq!(session.recv().await["type"], "response.create");
}

#[tokio::test]
async fn two_simultaneous_permission_requests_send_one_message() {
    let o = outbound_app(&[]).await;
    Mock::given(method("POST"))
        .and(path(account_path("Messages.json")))
        .respond_with(new_message_sids())
        .expect(1)
        .mount(&o.twilio)
        .await;
    let (a, b) = tokio::join!(o.request_permission(), o.request_permission());
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 429]);
    o.twilio.verify().await;
}

#[tokio::test]
async fn a_failed_send_does_not_use_up_the_days_request() {
    let o = outbound_app(&[]).await;
    Mock::given(method("POST"))
        .and(path(account_path("Messages.json")))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"code": 63016, "message": "Failed to send freeform message because you are outside the allowed window.", "status": 400})))
        .up_to_n_times(1)
        .mount(&o.twilio)
        .await;
    let (status, error) = error_code(o.request_permission().await).await;
    assert_eq!(
        (
            status,
            error["code"].as_str(),
            error["twilio_code"].as_i64()
        ),
        (502, Some("twilio_error"), Some(63016))
    );
    o.messages_succeed().await;
    assert_eq!(o.request_permission().await.status(), 201);
}

#[tokio::test]
async fn only_an_answer_to_our_open_request_grants_permission() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=1).await;
    // No request was ever sent: an ACCEPTED payload grants nothing.
    assert_eq!(o.reply(&reply_sid(1), "ACCEPTED").await.status(), 204);
    expect_error(
        o.place_call(json!({"to": USER})).await,
        409,
        "no_call_permission",
    )
    .await;

    o.messages_succeed().await;
    assert_eq!(o.request_permission().await.status(), 201);
    // A quick reply from another template that happens to say ACCEPTED grants nothing either.
    let other_template = form(&[
        ("MessageSid", &reply_sid(2)),
        ("AccountSid", ACCOUNT_SID),
        ("From", &format!("whatsapp:{USER}")),
        ("Body", "Yes, book it"),
        ("ButtonText", "Yes, book it"),
        ("ButtonPayload", "ACCEPTED"),
    ]);
    assert_eq!(
        o.app
            .post_signed("/messaging", &other_template)
            .await
            .status(),
        204
    );
    expect_error(
        o.place_call(json!({"to": USER})).await,
        409,
        "no_call_permission",
    )
    .await;

    // The request expires after 7 days unanswered.
    o.clock.advance(7 * DAY);
    assert_eq!(o.reply(&reply_sid(3), "ACCEPTED").await.status(), 204);
    expect_error(
        o.place_call(json!({"to": USER})).await,
        409,
        "no_call_permission",
    )
    .await;
    assert_eq!(o.calls_json_requests().await, 0);
}

#[tokio::test]
async fn no_call_is_placed_while_draining() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=1).await;
    o.grant().await;
    // An answered call keeps the draining server up long enough to ask it.
    o.app.answer_call(&call_sid(99)).await;
    o.app.state.lifecycle.begin_drain();
    expect_error(o.place_call(json!({"to": USER})).await, 503, "unavailable").await;
    assert_eq!(o.calls_json_requests().await, 0);
}

#[tokio::test]
async fn a_37000_reported_in_the_status_callback_revokes_the_permission() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=2).await;
    o.grant().await;
    assert_eq!(o.place_call(json!({"to": USER})).await.status(), 201);
    let params = form(&[
        ("CallSid", &call_sid(1)),
        ("AccountSid", ACCOUNT_SID),
        ("CallStatus", "failed"),
        ("SequenceNumber", "1"),
        ("ErrorCode", "37000"),
        ("Direction", "outbound-api"),
        ("From", &format!("whatsapp:{BUSINESS}")),
        ("To", &format!("whatsapp:{USER}")),
    ]);
    assert_eq!(
        o.app.post_signed("/voice/status", &params).await.status(),
        204
    );
    o.expect_revoked().await;
}

#[tokio::test]
async fn calls_still_ringing_count_toward_the_daily_limit() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=6).await;
    o.grant().await;
    o.place_calls(1..=5, &["ringing"]).await;
    expect_error(
        o.place_call(json!({"to": USER})).await,
        429,
        "call_limit_reached",
    )
    .await;
    assert_eq!(o.calls_json_requests().await, 5);
}

#[tokio::test]
async fn two_simultaneous_calls_to_one_user_place_one() {
    let o = outbound_app(&[]).await;
    o.grant().await;
    Mock::given(method("POST"))
        .and(path(account_path("Calls.json")))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"sid": call_sid(1), "status": "queued"}))
                .set_delay(Duration::from_millis(300)),
        )
        .expect(1)
        .mount(&o.twilio)
        .await;
    let (a, b) = tokio::join!(
        o.place_call(json!({"to": USER})),
        o.place_call(json!({"to": USER}))
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409]);
    o.twilio.verify().await;
}

#[tokio::test]
async fn a_replayed_acceptance_cannot_undo_a_rejection() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=1).await;
    o.messages_succeed().await;
    let accepted = o.ask_and_accept(1).await;
    o.clock.advance(Duration::from_secs(60));
    assert_eq!(o.reply(&reply_sid(2), "REJECTED").await.status(), 204);

    o.replay_acceptance(&accepted).await;
    let error = expect_error(
        o.place_call(json!({"to": USER})).await,
        409,
        "no_call_permission",
    )
    .await;
    assert!(error["message"].as_str().unwrap().contains("declined"));
    assert_eq!(o.calls_json_requests().await, 0);

    // Only the user accepting a new request gives the permission back.
    o.clock.advance(DAY);
    o.ask_and_accept(3).await;
    assert_eq!(o.place_call(json!({"to": USER})).await.status(), 201);
}

#[tokio::test]
async fn a_revocation_by_whatsapp_is_not_undone_by_an_older_acceptance() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=2).await;
    o.messages_succeed().await;
    let accepted = o.ask_and_accept(1).await;
    assert_eq!(o.place_call(json!({"to": USER})).await.status(), 201);
    let refused = form(&[
        ("CallSid", &call_sid(1)),
        ("AccountSid", ACCOUNT_SID),
        ("CallStatus", "failed"),
        ("SequenceNumber", "1"),
        ("ErrorCode", "37000"),
        ("Direction", "outbound-api"),
        ("From", &format!("whatsapp:{BUSINESS}")),
        ("To", &format!("whatsapp:{USER}")),
    ]);
    assert_eq!(
        o.app.post_signed("/voice/status", &refused).await.status(),
        204
    );
    o.expect_revoked().await;

    o.replay_acceptance(&accepted).await;
    o.expect_revoked().await;

    o.clock.advance(DAY);
    o.ask_and_accept(2).await;
    assert_eq!(o.place_call(json!({"to": USER})).await.status(), 201);
}

#[tokio::test]
async fn a_revocation_after_four_unanswered_calls_is_not_undone_by_an_older_acceptance() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=5).await;
    o.messages_succeed().await;
    let accepted = o.ask_and_accept(1).await;
    o.place_calls(1..=4, &["no-answer"]).await;
    o.expect_revoked().await;

    o.replay_acceptance(&accepted).await;
    o.expect_revoked().await;

    o.clock.advance(DAY);
    o.ask_and_accept(2).await;
    assert_eq!(o.place_call(json!({"to": USER})).await.status(), 201);
}

#[tokio::test]
async fn a_reply_to_another_message_grants_nothing() {
    let o = outbound_app(&[]).await;
    o.calls_succeed(1..=1).await;
    o.messages_succeed().await;
    let requested = o.request_permission().await;
    let request_sid = requested.json::<Value>().await.unwrap()["message_sid"]
        .as_str()
        .unwrap()
        .to_owned();
    let replying_to = |reply: u64, message_sid: &str| {
        let mut params = permission_reply_form(&reply_sid(reply), "ACCEPTED");
        params.push(("OriginalRepliedMessageSid".into(), message_sid.into()));
        params
    };

    let elsewhere = replying_to(1, &format!("MM{:032}", 42));
    assert_eq!(
        o.app.post_signed("/messaging", &elsewhere).await.status(),
        204
    );
    let error = expect_error(
        o.place_call(json!({"to": USER})).await,
        409,
        "no_call_permission",
    )
    .await;
    assert!(error["message"].as_str().unwrap().contains("not answered"));

    let ours = replying_to(2, &request_sid);
    assert_eq!(o.app.post_signed("/messaging", &ours).await.status(), 204);
    assert_eq!(o.place_call(json!({"to": USER})).await.status(), 201);
}
