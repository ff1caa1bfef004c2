//! Every way a call ends, end to end: the real app, the fake OpenAI server, the fake Twilio
//! Media Streams client, and a fake Twilio REST API that records the hang-ups it is sent.

use std::time::{Duration, Instant};

use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::fake_twilio::FakeTwilio;
use crate::helpers::*;
use callbridge_testkit::realtime::FakeRealtime;

const GRACE: Duration = Duration::from_millis(300);

/// The path Twilio's REST API ends `call_sid` on.
fn hang_up_path(call_sid: &str) -> String {
    format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{call_sid}.json")
}

struct Ending {
    app: TestApp,
    fake: FakeRealtime,
    twilio_rest: MockServer,
}

async fn ending_app() -> Ending {
    let fake = FakeRealtime::start().await;
    let twilio_rest = MockServer::start().await;
    let mut config = test_config(&[
        ("OPENAI_REALTIME_URL", fake.url.as_str()),
        ("TWILIO_API_BASE_URL", twilio_rest.uri().as_str()),
    ]);
    // A failed call's REST hang-up waits for its apology: here GRACE, not 10 s.
    config.call.ending.apology_grace = GRACE;
    let app = spawn_app_with(config).await;
    Ending {
        app,
        fake,
        twilio_rest,
    }
}

impl Ending {
    /// Twilio answers every hang-up of `call_sid` with `status`, and expects `times` of them.
    async fn expect_hang_ups(&self, call_sid: &str, status: u16, times: u64) {
        Mock::given(method("POST"))
            .and(path(hang_up_path(call_sid)))
            .and(body_string_contains("Status=completed"))
            .respond_with(
                ResponseTemplate::new(status)
                    .set_body_json(serde_json::json!({"sid": call_sid, "status": "completed"})),
            )
            .up_to_n_times(times)
            .expect(times)
            .mount(&self.twilio_rest)
            .await;
    }

    /// The hang-ups Twilio's REST API has been sent so far.
    async fn hang_ups(&self) -> usize {
        self.twilio_rest
            .received_requests()
            .await
            .unwrap_or_default()
            .len()
    }

    async fn wait_for_hang_ups(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.hang_ups().await < count {
            assert!(
                Instant::now() < deadline,
                "Twilio was not sent {count} hang-ups"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn a_failed_agent_closes_the_stream_for_the_apology_then_hangs_up_through_twilio() {
    let e = ending_app().await;
    let sid = call_sid(8001);
    e.expect_hang_ups(&sid, 200, 1).await;
    let mut twilio = FakeTwilio::start_call(&e.app, &sid).await;
    let mut session = e.fake.next_session().await;
    session.expect_session_update().await;
    e.fake.refuse_new_sessions();
    drop(session);
    let closed_at = Instant::now();
    assert_eq!(
        twilio.closed_within(Duration::from_secs(5)).await,
        Some(Some(1011)),
        "closed with an error, so the TwiML's apology plays"
    );
    assert_eq!(
        e.hang_ups().await,
        0,
        "the apology plays before the hang-up"
    );
    e.wait_for_hang_ups(1).await;
    assert!(
        closed_at.elapsed() >= GRACE,
        "hung up before the apology's grace"
    );
    e.twilio_rest.verify().await;
}

#[tokio::test]
async fn a_failing_rest_hang_up_is_retried_until_twilio_takes_it() {
    let e = ending_app().await;
    let sid = call_sid(8002);
    e.expect_hang_ups(&sid, 500, 2).await;
    e.expect_hang_ups(&sid, 200, 1).await;
    let mut twilio = FakeTwilio::start_call(&e.app, &sid).await;
    let mut session = e.fake.next_session().await;
    session.expect_session_update().await;
    session.send(serde_json::json!({"type": "error", "error": {"type": "invalid_request_error", "code": "insufficient_quota", "message": "no quota"}}));
    assert_eq!(
        twilio.closed_within(Duration::from_secs(5)).await,
        Some(Some(1011))
    );
    e.wait_for_hang_ups(3).await;
    e.twilio_rest.verify().await;
}

#[tokio::test]
async fn a_caller_who_hangs_up_is_not_hung_up_again() {
    let e = ending_app().await;
    let sid = call_sid(8003);
    let mut twilio = FakeTwilio::start_call(&e.app, &sid).await;
    let mut session = e.fake.next_session().await;
    session.expect_session_update().await;
    twilio.stop().await;
    assert!(session.closed_within(Duration::from_secs(1)).await);
    wait_until_idle(&e.app).await;
    tokio::time::sleep(GRACE * 2).await;
    assert_eq!(e.hang_ups().await, 0);
}

#[tokio::test]
async fn closing_calls_for_a_drain_hangs_up_before_closing_the_stream() {
    let e = ending_app().await;
    let sid = call_sid(8004);
    e.expect_hang_ups(&sid, 200, 1).await;
    let mut twilio = FakeTwilio::start_call(&e.app, &sid).await;
    let mut session = e.fake.next_session().await;
    session.expect_session_update().await;
    e.app.state.lifecycle.begin_drain();
    e.app.state.lifecycle.close_calls();
    assert!(session.closed_within(Duration::from_secs(2)).await);
    assert_eq!(
        twilio.closed_within(Duration::from_secs(5)).await,
        Some(Some(1012)),
        "a restart, not an error: no apology"
    );
    assert_eq!(
        e.hang_ups().await,
        1,
        "Twilio was asked to end the call before its stream closed"
    );
    wait_until_idle(&e.app).await;
    e.twilio_rest.verify().await;
}

async fn wait_until_idle(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app.state.admission.occupancy().is_idle() {
        assert!(Instant::now() < deadline, "the call kept its slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
