//! The application's client for the business, as the application builds it: signed with the
//! configured `CALLBRIDGE_WEBHOOK_SECRET`, timestamped by the application's clock.

use std::sync::Arc;
use std::time::Duration;

use callbridge::clock::{Clock, SystemClock};
use callbridge::webhooks::{BusinessError, WebhookId};
use callbridge_testkit::business::FakeBusiness;

use crate::helpers::{spawn_app, spawn_app_with_clock, test_config};

/// A minute ahead of the system clock: within a verifier's tolerance, and far enough off to
/// show which clock stamped a request.
struct MinuteAhead;

const AHEAD_MS: i64 = 60_000;

impl Clock for MinuteAhead {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + AHEAD_MS
    }
}

#[tokio::test]
async fn the_app_signs_with_its_configured_secret_and_clock() {
    let business = FakeBusiness::start().await;
    let config = test_config(&[("CALLBRIDGE_WEBHOOK_SECRET", FakeBusiness::SECRET)]);
    let app = spawn_app_with_clock(config, Arc::new(MinuteAhead)).await;

    let before = (SystemClock.now_ms() + AHEAD_MS) / 1000;
    let answer = app
        .state
        .business
        .post(
            &business.url("/events"),
            &WebhookId::random(),
            r#"{"type":"call.started"}"#,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let after = (SystemClock.now_ms() + AHEAD_MS) / 1000;

    assert!(answer.is_success(), "{answer:?}");
    let request = business.next_request("/events").await;
    assert!(request.verified);
    let stamped: i64 = request
        .header("webhook-timestamp")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (before..=after).contains(&stamped),
        "{stamped} not in {before}..={after}"
    );
}

#[tokio::test]
async fn without_a_configured_secret_the_app_sends_nothing() {
    let business = FakeBusiness::start().await;
    let app = spawn_app(&[]).await;
    let outcome = app
        .state
        .business
        .post(
            &business.url("/events"),
            &WebhookId::random(),
            "{}",
            Duration::from_secs(5),
        )
        .await;
    assert!(
        matches!(outcome, Err(BusinessError::NoSecret)),
        "{outcome:?}"
    );
    assert!(business.requests().is_empty());
}
