//! Events survive what a deployment does to processes: the real binary killed with SIGKILL
//! and restarted, two machines on one Postgres sharing the outbox (one of them killed midway),
//! and a business endpoint that never answers while calls go on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use callbridge::clock::{Clock, SystemClock};
use callbridge_testkit::business::{Answer, FakeBusiness};
use callbridge_testkit::realtime::FakeRealtime;
use callbridge_testkit::scratch::Scratch;

use crate::events::{enqueue_events, events_store};
use crate::fake_twilio::{agent_audio, frame};
use crate::helpers::{Binary, call_sid, spawn_app_with, test_config};
use crate::store::{FreshDatabase, fresh_databases};
use crate::stream::{connected_call, delta};

const EVENTS: &str = "/events";

/// The environment of a binary that delivers events to `business` as machine `machine`.
fn delivering<'a>(
    business_url: &'a str,
    database: &'a str,
    machine: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CALLBRIDGE_EVENTS_URL", business_url),
        ("CALLBRIDGE_WEBHOOK_SECRET", FakeBusiness::SECRET),
        ("DATABASE_URL", database),
        ("FLY_MACHINE_ID", machine),
    ]
}

/// How many times each event id was answered with a 2xx, counting only requests that arrived
/// after `since` (when the business started accepting).
fn deliveries_since(business: &FakeBusiness, since: Instant) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in business.requests() {
        if request.path == EVENTS && request.received_at >= since {
            assert!(request.verified, "every request is signed");
            let id = request
                .header("webhook-id")
                .expect("a webhook-id")
                .to_owned();
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

/// Every event in the outbox, sorted.
async fn outbox_ids(store: &callbridge::store::Store, users: usize) -> Vec<String> {
    enqueue_events(store, users, SystemClock.now_ms()).await;
    let mut ids: Vec<String> = sqlx::query_scalar("SELECT id FROM event_outbox")
        .fetch_all(store.pool())
        .await
        .unwrap();
    ids.sort();
    assert_eq!(ids.len(), 2 * users, "a grant and a revocation each");
    ids
}

/// Events the outbox has not recorded as delivered.
async fn undelivered(store: &callbridge::store::Store) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM event_outbox WHERE status <> 'delivered'")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

async fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn pending_events_survive_a_sigkill_and_arrive_once_after_the_restart() {
    let business = FakeBusiness::start().await;
    business.answer(EVENTS, Answer::status(503));
    let url = business.url(EVENTS);
    let scratch = Scratch::new();
    let database = scratch.sqlite_url();
    let store = events_store(&database, "writer").await;
    let ids = outbox_ids(&store, 3).await;

    let mut first = Binary::start(&delivering(&url, &database, "machine-a")).await;
    // Every event is tried once and refused, so each waits for its next attempt (5 s later).
    wait_until(
        Duration::from_secs(10),
        "a first attempt of every event",
        || {
            deliveries_since(&business, Instant::now() - Duration::from_secs(3600)).len()
                == ids.len()
        },
    )
    .await;
    first.signal("KILL");
    first.exit_status_within(Duration::from_secs(5)).await;

    let accepting_since = Instant::now();
    business.answer(EVENTS, Answer::status(204));
    let _second = Binary::start(&delivering(&url, &database, "machine-a")).await;
    wait_until(
        Duration::from_secs(20),
        "every event delivered after the restart",
        || deliveries_since(&business, accepting_since).len() == ids.len(),
    )
    .await;
    // Nothing is sent again once delivered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delivered = deliveries_since(&business, accepting_since);
    let mut delivered_ids: Vec<&String> = delivered.keys().collect();
    delivered_ids.sort();
    assert_eq!(delivered_ids, ids.iter().collect::<Vec<_>>());
    assert!(
        delivered.values().all(|&n| n == 1),
        "none twice: {delivered:?}"
    );
    assert_eq!(undelivered(&store).await, 0, "and the outbox knows it");
}

/// A Postgres database of its own, or `None` (the test is skipped) when none is configured.
async fn postgres_database() -> Option<FreshDatabase> {
    fresh_databases()
        .await
        .into_iter()
        .find(|url| url.starts_with("postgres"))
}

async fn delivered_count(binary: &Binary) -> u64 {
    let text = binary
        .http
        .get(format!("{}/metrics", binary.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|line| {
            line.starts_with(
                "callbridge_event_deliveries_total{type=\"call_permission.updated\",outcome=\"delivered\"}",
            )
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn two_machines_on_one_postgres_deliver_each_event_once() {
    let Some(database) = postgres_database().await else {
        return;
    };
    let business = FakeBusiness::start().await;
    business.answer(EVENTS, Answer::status(200).after(Duration::from_millis(20)));
    let url = business.url(EVENTS);
    let store = events_store(&database, "writer").await;
    let ids = outbox_ids(&store, 100).await;

    let since = Instant::now();
    let a = Binary::start(&delivering(&url, &database, "machine-a")).await;
    let b = Binary::start(&delivering(&url, &database, "machine-b")).await;
    wait_until(Duration::from_secs(60), "200 deliveries", || {
        deliveries_since(&business, since).len() == ids.len()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = deliveries_since(&business, since);
    let duplicates: usize = delivered.values().map(|n| n - 1).sum();
    let (by_a, by_b) = (delivered_count(&a).await, delivered_count(&b).await);
    eprintln!("two machines: {by_a} delivered by a, {by_b} by b, {duplicates} duplicates");
    assert_eq!(delivered.len(), 200);
    assert_eq!(
        duplicates, 0,
        "each event is sent by one machine: {delivered:?}"
    );
    assert_eq!(by_a + by_b, 200);
    assert_eq!(undelivered(&store).await, 0);
}

#[tokio::test]
async fn when_one_of_two_machines_is_killed_midway_the_other_delivers_the_rest() {
    let Some(database) = postgres_database().await else {
        return;
    };
    let business = FakeBusiness::start().await;
    // Slow enough answers that the kill lands while both machines hold claims.
    business.answer(
        EVENTS,
        Answer::status(200).after(Duration::from_millis(300)),
    );
    let url = business.url(EVENTS);
    let store = events_store(&database, "writer").await;
    let ids = outbox_ids(&store, 100).await;

    let since = Instant::now();
    let mut a = Binary::start(&delivering(&url, &database, "machine-a")).await;
    let _b = Binary::start(&delivering(&url, &database, "machine-b")).await;
    wait_until(Duration::from_secs(30), "the first 40 deliveries", || {
        deliveries_since(&business, since).len() >= 40
    })
    .await;
    a.signal("KILL");
    a.exit_status_within(Duration::from_secs(5)).await;
    let killed_at = Instant::now();
    // The events machine a had claimed (some of them already at the business, unrecorded)
    // wait for its claim (30 s) to lapse; then b sends them.
    let deadline = Instant::now() + Duration::from_secs(60);
    while undelivered(&store).await > 0 {
        assert!(Instant::now() < deadline, "the outbox never emptied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let delivered = deliveries_since(&business, since);
    let duplicates: usize = delivered.values().map(|n| n - 1).sum();
    eprintln!(
        "one machine killed: all {} delivered and recorded {:.1} s after the kill, {duplicates} \
         sent twice (in flight when the machine died)",
        delivered.len(),
        killed_at.elapsed().as_secs_f64()
    );
    let mut delivered_ids: Vec<&String> = delivered.keys().collect();
    delivered_ids.sort();
    assert_eq!(
        delivered_ids,
        ids.iter().collect::<Vec<_>>(),
        "every event, at least once"
    );
    assert!(
        duplicates <= 8,
        "at most one batch in flight is sent again: {duplicates}"
    );
}

#[tokio::test]
async fn an_endpoint_that_never_answers_holds_no_call_up() {
    let business = FakeBusiness::start().await;
    business.answer(EVENTS, Answer::status(200).after(Duration::from_secs(3600)));
    let fake = FakeRealtime::start().await;
    let url = business.url(EVENTS);
    let config = test_config(&[
        ("OPENAI_REALTIME_URL", fake.url.as_str()),
        ("CALLBRIDGE_WEBHOOK_SECRET", FakeBusiness::SECRET),
        ("CALLBRIDGE_EVENTS_URL", url.as_str()),
    ]);
    let app = spawn_app_with(config).await;
    const CALLS: usize = 10;
    const FRAMES: usize = 50;
    // Connected one after another (the fake hands out sessions in the order they open), then
    // all talking at once.
    let mut legs = Vec::new();
    for n in 0..CALLS {
        let sid = call_sid(8000 + n as u64);
        legs.push((n, connected_call(&app, &fake, &sid).await));
    }
    let calls = legs
        .into_iter()
        .map(|(n, (mut twilio, mut session))| async move {
            for i in 0..FRAMES {
                twilio.media(i, &frame(n, i)).await;
                let append = session.recv().await;
                assert_eq!(append["audio"], frame(n, i));
                session.send(delta("resp", "item", &agent_audio(20, 0x55)));
                assert_eq!(twilio.recv().await["event"], "media");
                twilio.recv().await; // its mark
            }
            twilio.stop().await;
            assert!(session.closed_within(Duration::from_secs(1)).await);
        });
    let started = Instant::now();
    futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    app.wait_until_no_call_is_live().await;
    // The endpoint holds every event's request open; the calls never noticed.
    assert!(!business.requests().is_empty(), "the events were sent");
    assert_eq!(
        app.state.metrics.frames_from_caller.get(),
        (CALLS * FRAMES) as u64
    );
    assert_eq!(
        app.state.metrics.frames_to_caller.get(),
        (CALLS * FRAMES) as u64
    );
    assert_eq!(app.state.metrics.store_records_dropped.get(), 0);
    assert_eq!(
        app.state.metrics.store_transcript_waits.get(),
        0,
        "the writer's queue never filled"
    );
    assert!(took < Duration::from_secs(20), "the calls took {took:?}");
}
