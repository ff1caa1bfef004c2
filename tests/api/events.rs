//! Events for the business: written to the outbox with the change they announce, claimed by
//! one machine at a time, delivered with a stable id and body on the contract's schedule. On
//! every database a deployment can use (see `store::fresh_databases`).

use std::sync::Arc;
use std::time::Duration;

use callbridge::call::transcript::Speaker;
use callbridge::clock::{Clock, SystemClock, rfc3339_millis};
use callbridge::consent::GRANT_VALIDITY_MS;
use callbridge::events::worker::{EventsWorker, Round};
use callbridge::events::{DeliveryStatus, EventSettings};
use callbridge::metrics::{DeliveryOutcome, Metrics};
use callbridge::store::machines::{LEASE, MachineId};
use callbridge::store::models::{CallLatency, EventCursor, EventDelivery, TokenUsage};
use callbridge::store::outbox::AttemptOutcome;
use callbridge::store::permissions::Reply;
use callbridge::store::{CallTotals, Record, Store};
use callbridge::webhooks::{BusinessClient, WebhookSecret};
use callbridge_testkit::business::{Answer, BusinessRequest, FakeBusiness};
use serde_json::{Value, json};

use crate::calls::API_TOKEN;
use crate::fake_twilio::{agent_audio, frame};
use crate::helpers::{ManualClock, call_sid, spawn_app_with, test_config};
use crate::store::{fresh_databases, new_call};
use crate::stream::{connected_call, delta};
use callbridge_testkit::realtime::FakeRealtime;

const USER: &str = "+5511999990000";
const DAY: i64 = 86_400_000;
const SECOND: Duration = Duration::from_secs(1);

/// A store that writes events, speaking for `machine`.
pub(crate) async fn events_store(url: &str, machine: &str) -> Store {
    let mut store = Store::connect_as(url, MachineId::parse(machine).unwrap())
        .await
        .unwrap();
    store.enable_events();
    store
}

/// Every event's body, oldest first.
async fn bodies(store: &Store) -> Vec<Value> {
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT body FROM event_outbox ORDER BY created_at, id")
            .fetch_all(store.pool())
            .await
            .unwrap();
    rows.iter()
        .map(|body| serde_json::from_str(body).unwrap())
        .collect()
}

async fn all_events(store: &Store) -> Vec<EventDelivery> {
    store.list_event_deliveries(None, 100, None).await.unwrap()
}

fn started(call_sid: &str, at_ms: i64) -> Record {
    Record::StreamStarted {
        call_sid: call_sid.into(),
        stream_sid: format!("MZ{call_sid}"),
        agent: "support".into(),
        at_ms,
    }
}

fn ended(call_sid: &str, at_ms: i64) -> Record {
    Record::CallEnded {
        call_sid: call_sid.into(),
        end_reason: "caller_hung_up",
        openai_session_id: Some("sess_1".into()),
        totals: Box::new(CallTotals {
            input_tokens: 1,
            output_tokens: 2,
            total_tokens: 3,
            usage: TokenUsage::default(),
            model: "gpt-realtime".into(),
            cost_micro_usd: Some(99),
            latency: CallLatency::default(),
        }),
        at_ms,
    }
}

fn transcript(call_sid: &str, sequence: u32, text: &str) -> Record {
    Record::Transcript {
        call_sid: call_sid.into(),
        line: callbridge::call::transcript::TranscriptLine {
            sequence,
            speaker: Speaker::Agent,
            text: text.into(),
            offset_ms: 10,
            truncated: false,
        },
    }
}

/// A permission granted at `at_ms` (a request, then its acceptance); `n` tells this user's
/// messages apart.
async fn grant(store: &Store, user: &str, n: u32, at_ms: i64) {
    store
        .record_permission_request(user, &format!("SMq{n}{user}"), at_ms)
        .await
        .unwrap();
    store
        .record_permission_reply(user, &format!("SMa{n}{user}"), None, Reply::Accepted, at_ms)
        .await
        .unwrap();
}

#[tokio::test]
async fn call_events_carry_the_call_as_the_api_shows_it() {
    for url in fresh_databases().await {
        let store = events_store(&url, "machine-a").await;
        let t0 = 1_800_000_000_123;
        store.record_call(&new_call("CA1", t0)).await.unwrap();
        store.apply(&[started("CA1", t0 + 5)]).await.unwrap();
        let at_start = store.call("CA1").await.unwrap().unwrap();

        // The end comes with the last line and a correction in the same batch.
        store
            .apply(&[
                transcript("CA1", 1, "Hello, how can I help?"),
                transcript("CA1", 2, "Goodbye for"),
                Record::TranscriptCorrection {
                    call_sid: "CA1".into(),
                    sequence: 2,
                    text: "Goodbye".into(),
                    truncated: true,
                },
                ended("CA1", t0 + 9_000),
            ])
            .await
            .unwrap();
        let at_end = store.call("CA1").await.unwrap().unwrap();

        let bodies = bodies(&store).await;
        assert_eq!(bodies.len(), 2, "{url}");
        assert_eq!(
            bodies[0],
            json!({
                "type": "call.started",
                "timestamp": rfc3339_millis(t0 + 5),
                "data": serde_json::to_value(&at_start.call).unwrap(),
            })
        );
        assert_eq!(bodies[0]["data"]["stream_sid"], "MZCA1");
        assert_eq!(bodies[0]["data"]["agent"], "support");
        // Exactly what GET /calls/{sid} answers (it serialises the same `CallDetail`).
        assert_eq!(
            bodies[1],
            json!({
                "type": "call.ended",
                "timestamp": rfc3339_millis(t0 + 9_000),
                "data": serde_json::to_value(&at_end).unwrap(),
            }),
            "{url}"
        );
        assert_eq!(bodies[1]["data"]["transcript"][1]["text"], "Goodbye");
        assert_eq!(bodies[1]["data"]["call"]["end_reason"], "caller_hung_up");

        let events = all_events(&store).await;
        assert!(events.iter().all(|e| e.status == DeliveryStatus::Pending
            && e.attempts == 0
            && e.id.starts_with("msg_")));
        assert_eq!(events[0].event_type, "call.ended", "newest first");
        assert_eq!(events[0].next_attempt_at_ms, Some(t0 + 9_000));

        // Without events enabled (no CALLBRIDGE_EVENTS_URL) nothing is written.
        let quiet = Store::connect(&url).await.unwrap();
        quiet.record_call(&new_call("CA2", t0)).await.unwrap();
        quiet
            .apply(&[started("CA2", t0), ended("CA2", t0 + 1)])
            .await
            .unwrap();
        grant(&quiet, "+5511966660000", 1, t0).await;
        quiet
            .revoke_permission("+5511966660000", t0 + 1)
            .await
            .unwrap();
        assert_eq!(all_events(&quiet).await.len(), 2, "{url}");
    }
}

#[tokio::test]
async fn an_event_exists_exactly_when_its_change_does() {
    for url in fresh_databases().await {
        let store = events_store(&url, "machine-a").await;
        store.record_call(&new_call("CA1", 1_000)).await.unwrap();
        grant(&store, USER, 1, 1_000).await;
        let before = all_events(&store).await.len();

        // A batch that fails after the stream's start leaves neither the start nor its event.
        sqlx::query("DROP TABLE transcript_lines")
            .execute(store.pool())
            .await
            .unwrap();
        let failed = store
            .apply(&[started("CA1", 2_000), transcript("CA1", 1, "lost")])
            .await;
        assert!(failed.is_err(), "{url}");
        assert_eq!(all_events(&store).await.len(), before, "{url}");
        let stream_sid: Option<String> =
            sqlx::query_scalar("SELECT stream_sid FROM calls WHERE call_sid = 'CA1'")
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(stream_sid, None, "{url}");

        // And a change whose event cannot be written does not happen either.
        sqlx::query("ALTER TABLE event_outbox RENAME TO event_outbox_gone")
            .execute(store.pool())
            .await
            .unwrap();
        assert!(store.revoke_permission(USER, 3_000).await.is_err());
        assert_eq!(
            store.permission(USER).await.unwrap().unwrap().state,
            callbridge::consent::PermissionState::Granted,
            "{url}"
        );
    }
}

fn permission_statuses(bodies: &[Value]) -> Vec<(String, String)> {
    bodies
        .iter()
        .filter(|b| b["type"] == "call_permission.updated")
        .map(|b| {
            (
                b["data"]["to"].as_str().unwrap().to_owned(),
                b["data"]["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn every_permission_change_is_announced_once() {
    for url in fresh_databases().await {
        let store = events_store(&url, "machine-a").await;
        let other = "+5511988880000";
        let t0 = 1_800_000_000_000;
        grant(&store, USER, 1, t0).await;
        store
            .record_permission_reply(USER, "SMr1", None, Reply::Rejected, t0 + 10)
            .await
            .unwrap();
        // A replayed reply changes nothing and says nothing.
        store
            .record_permission_reply(USER, "SMr1", None, Reply::Rejected, t0 + 11)
            .await
            .unwrap();
        grant(&store, USER, 2, t0 + DAY).await;
        store.revoke_permission(USER, t0 + DAY + 1).await.unwrap();
        // Already revoked: nothing new to say.
        store.revoke_permission(USER, t0 + DAY + 2).await.unwrap();

        // The fourth unanswered call in a row revokes; the fifth finds it revoked.
        grant(&store, other, 3, t0 + 1).await;
        for _ in 0..5 {
            store
                .record_outbound_outcome(other, false, t0 + 100)
                .await
                .unwrap();
        }

        let bodies = bodies(&store).await;
        let expect = |to: &str, status: &str| (to.to_owned(), status.to_owned());
        assert_eq!(
            permission_statuses(&bodies),
            [
                expect(USER, "granted"),
                expect(other, "granted"),
                expect(USER, "rejected"),
                expect(other, "revoked"),
                expect(USER, "granted"),
                expect(USER, "revoked"),
            ],
            "{url}"
        );
        let revoked = bodies
            .iter()
            .find(|b| b["data"]["to"] == USER && b["data"]["status"] == "revoked")
            .unwrap();
        assert_eq!(revoked["timestamp"], rfc3339_millis(t0 + DAY + 1));
        assert_eq!(
            revoked.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["data", "timestamp", "type"]
        );
        assert_eq!(revoked["data"].as_object().unwrap().len(), 2);
    }
}

#[tokio::test]
async fn an_expired_grant_is_announced_once_and_a_new_grant_again() {
    for url in fresh_databases().await {
        let store = events_store(&url, "machine-a").await;
        let t0 = 1_800_000_000_000;
        let lookback = DAY;
        grant(&store, USER, 1, t0).await;
        let expiry = t0 + GRANT_VALIDITY_MS;

        let sweep = |now| store.announce_expired_permissions(now, lookback);
        assert_eq!(sweep(expiry - 1).await.unwrap(), 0, "{url}");
        assert_eq!(sweep(expiry).await.unwrap(), 1, "{url}");
        assert_eq!(sweep(expiry + 60_000).await.unwrap(), 0, "announced once");

        // A new grant expires in its turn, and is announced again.
        grant(&store, USER, 2, expiry + DAY).await;
        let second_expiry = expiry + DAY + GRANT_VALIDITY_MS;
        assert_eq!(sweep(second_expiry + 5_000).await.unwrap(), 1, "{url}");

        // An expiry older than the look-back is marked, never announced.
        let old = "+5511977770000";
        grant(&store, old, 3, t0).await;
        assert_eq!(sweep(expiry + 2 * DAY).await.unwrap(), 0, "{url}");
        assert_eq!(sweep(expiry + 2 * DAY + 1).await.unwrap(), 0, "{url}");

        let bodies = bodies(&store).await;
        let expired: Vec<&Value> = bodies
            .iter()
            .filter(|b| b["data"]["status"] == "expired")
            .collect();
        assert_eq!(expired.len(), 2, "{url}");
        assert_eq!(expired[0]["timestamp"], rfc3339_millis(expiry));
        assert_eq!(expired[1]["timestamp"], rfc3339_millis(second_expiry));
        assert!(expired.iter().all(|b| b["data"]["to"] == USER));
    }
}

#[tokio::test]
async fn calls_ended_by_a_sweep_are_announced_too() {
    for url in fresh_databases().await {
        let t0 = 1_800_000_000_000;
        let a = events_store(&url, "machine-a").await;
        let b = events_store(&url, "machine-b").await;
        a.claim_machine(t0).await.unwrap();
        b.claim_machine(t0).await.unwrap();
        for (store, sid) in [(&a, "CA1"), (&b, "CA2")] {
            store.record_call(&new_call(sid, t0)).await.unwrap();
            store.apply(&[started(sid, t0)]).await.unwrap();
        }

        // A stops renewing its lease: B records its call as lost, and announces its end.
        let later = t0 + i64::try_from(LEASE.as_millis()).unwrap();
        assert_eq!(b.end_lost_calls(later).await.unwrap(), 1);
        // B shuts down with its call still live.
        assert_eq!(b.release_machine("shutdown", later + 1).await.unwrap(), 1);

        let ends: Vec<(String, String)> = bodies(&a)
            .await
            .iter()
            .filter(|body| body["type"] == "call.ended")
            .map(|body| {
                let call = &body["data"]["call"];
                (
                    call["call_sid"].as_str().unwrap().to_owned(),
                    call["end_reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            ends,
            [
                ("CA1".to_owned(), "lost".to_owned()),
                ("CA2".to_owned(), "shutdown".to_owned())
            ],
            "{url}"
        );
    }
}

/// Enqueues `n` events (revocations of distinct users) and returns their ids.
pub(crate) async fn enqueue_events(store: &Store, n: usize, at_ms: i64) -> Vec<String> {
    for i in 0..n {
        let user = format!("+55119{i:08}");
        grant(store, &user, 9000, at_ms).await;
        store.revoke_permission(&user, at_ms).await.unwrap();
    }
    let mut ids: Vec<String> = all_events(store).await.into_iter().map(|e| e.id).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_claim_is_exclusive_between_machines_until_it_lapses() {
    for url in fresh_databases().await {
        let a = events_store(&url, "machine-a").await;
        let b = events_store(&url, "machine-b").await;
        let now = 1_800_000_000_000;
        let lease = 60_000;
        let ids = enqueue_events(&a, 10, now).await;
        assert_eq!(ids.len(), 20, "a grant and a revocation each");

        // Racing for them, the two machines take every event once between them.
        let (mine, theirs) = tokio::join!(
            a.claim_events(now, now + lease, 15),
            b.claim_events(now, now + lease, 15)
        );
        let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
        assert!(mine.len() <= 15 && theirs.len() <= 15, "{url}");
        let mut taken: Vec<String> = mine.iter().chain(&theirs).map(|e| e.id.clone()).collect();
        taken.sort();
        assert_eq!(taken, ids, "{url}");
        // Nothing more to claim while the claims hold.
        assert!(
            a.claim_events(now + lease - 1, now + 2 * lease, 100)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            b.claim_events(now + lease - 1, now + 2 * lease, 100)
                .await
                .unwrap()
                .is_empty()
        );

        // Machine A dies holding its claims: once they lapse, B takes them over, and A (only
        // slow after all) can no longer record anything for them.
        let later = now + lease;
        let taken_over = b.claim_events(later, later + lease, 100).await.unwrap();
        let mut taken_over_ids: Vec<&str> = taken_over.iter().map(|e| e.id.as_str()).collect();
        taken_over_ids.sort_unstable();
        let mut a_ids: Vec<&str> = mine.iter().map(|e| e.id.as_str()).collect();
        a_ids.sort_unstable();
        let mut b_ids: Vec<&str> = theirs.iter().map(|e| e.id.as_str()).collect();
        b_ids.sort_unstable();
        // B's own earlier claims lapsed too, so it takes everything.
        let mut expected: Vec<&str> = a_ids.iter().chain(&b_ids).copied().collect();
        expected.sort_unstable();
        assert_eq!(taken_over_ids, expected, "{url}");
        let delivered = AttemptOutcome::Delivered { status: 200 };
        if let Some(first) = a_ids.first() {
            assert!(!a.record_attempt(first, &delivered, later).await.unwrap());
            assert!(b.record_attempt(first, &delivered, later).await.unwrap());
            // Recorded once: a delivered event is not claimed again.
            assert!(!b.record_attempt(first, &delivered, later).await.unwrap());
        }
        assert_eq!(b.count_pending_events().await.unwrap(), 19, "{url}");

        // A machine restarted under the same name takes back what it held at once.
        assert_eq!(b.release_event_claims().await.unwrap(), 19);
        assert_eq!(
            a.claim_events(later, later + lease, 100)
                .await
                .unwrap()
                .len(),
            19
        );
    }
}

#[tokio::test]
async fn deliveries_are_listed_newest_first_by_status_page_by_page() {
    for url in fresh_databases().await {
        let store = events_store(&url, "machine-a").await;
        for n in 0..5 {
            // Two events share each timestamp, so the cursor must break ties by id.
            let user = format!("+55119000000{n}");
            grant(&store, &user, 7000 + n, 1_000 + i64::from(n) * 10).await;
            store
                .revoke_permission(&user, 1_000 + i64::from(n) * 10)
                .await
                .unwrap();
        }
        let every = all_events(&store).await;
        assert_eq!(every.len(), 10);
        let mut paged = Vec::new();
        let mut before: Option<EventCursor> = None;
        loop {
            let page = store
                .list_event_deliveries(None, 3, before.as_ref())
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            before = Some(EventCursor::after(page.last().unwrap()));
            // Through the cursor's text form, as the API hands it out and back.
            before = EventCursor::decode(&before.unwrap().encode());
            paged.extend(page);
        }
        assert_eq!(paged, every, "{url}");
        assert!(
            every
                .windows(2)
                .all(|w| (w[0].created_at_ms, &w[0].id) > (w[1].created_at_ms, &w[1].id))
        );

        // One fails for good; it alone is listed as failed, and pages by status too.
        let claimed = store.claim_events(2_000, 62_000, 2).await.unwrap();
        let failed = AttemptOutcome::Failed {
            status: Some(500),
            error: "the business answered 500".into(),
        };
        for event in &claimed {
            assert!(
                store
                    .record_attempt(&event.id, &failed, 2_000)
                    .await
                    .unwrap()
            );
        }
        let listed = store
            .list_event_deliveries(Some(DeliveryStatus::Failed), 1, None)
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        let rest = store
            .list_event_deliveries(
                Some(DeliveryStatus::Failed),
                10,
                Some(&EventCursor::after(&listed[0])),
            )
            .await
            .unwrap();
        let mut failed_ids: Vec<&str> = listed.iter().chain(&rest).map(|e| e.id.as_str()).collect();
        failed_ids.sort_unstable();
        let mut claimed_ids: Vec<&str> = claimed.iter().map(|e| e.id.as_str()).collect();
        claimed_ids.sort_unstable();
        assert_eq!(failed_ids, claimed_ids, "{url}");
        assert_eq!(
            (
                listed[0].attempts,
                listed[0].last_status,
                listed[0].next_attempt_at_ms
            ),
            (1, Some(500), None)
        );
        let pending = store
            .list_event_deliveries(Some(DeliveryStatus::Pending), 100, None)
            .await
            .unwrap();
        assert_eq!(pending.len(), 8, "{url} {:#?}", all_events(&store).await);
    }
}

/// A short schedule: 5 s then 30 s (repeating), give up after a minute, no jitter.
fn quick() -> EventSettings {
    EventSettings {
        retry_delays: vec![5 * SECOND, 30 * SECOND],
        give_up_after: 60 * SECOND,
        request_timeout: Duration::from_millis(300),
        lease: 60 * SECOND,
        poll_interval: Duration::from_millis(20),
        jitter: 0.0,
        concurrency: 8,
        sweep_interval: 60 * SECOND,
        keep_delivered: Duration::from_secs(7 * 86_400),
    }
}

struct Delivery {
    business: FakeBusiness,
    store: Store,
    clock: Arc<ManualClock>,
    metrics: Arc<Metrics>,
    worker: EventsWorker,
}

async fn delivery(url: &str, settings: EventSettings) -> Delivery {
    let business = FakeBusiness::start().await;
    let store = events_store(url, "machine-a").await;
    let clock = Arc::new(ManualClock::default());
    let metrics = Arc::new(Metrics::default());
    let worker = worker(&business, &store, &clock, &metrics, settings);
    Delivery {
        business,
        store,
        clock,
        metrics,
        worker,
    }
}

/// The business verifies timestamps against the real time, so the client signs with the
/// system clock; the outbox runs on the manual one.
fn worker(
    business: &FakeBusiness,
    store: &Store,
    clock: &Arc<ManualClock>,
    metrics: &Arc<Metrics>,
    settings: EventSettings,
) -> EventsWorker {
    let secret = WebhookSecret::parse(FakeBusiness::SECRET).unwrap();
    let client = BusinessClient::new(Some(secret), Arc::new(SystemClock)).unwrap();
    EventsWorker::new(
        store.clone(),
        client,
        business.url("/events"),
        settings,
        Arc::clone(metrics),
        Arc::clone(clock) as Arc<dyn Clock>,
    )
}

impl Delivery {
    async fn one_event(&self) -> String {
        grant(&self.store, USER, 1, self.clock.now_ms()).await;
        let events = all_events(&self.store).await;
        assert_eq!(events.len(), 1);
        events[0].id.clone()
    }

    async fn event(&self, id: &str) -> EventDelivery {
        all_events(&self.store)
            .await
            .into_iter()
            .find(|e| e.id == id)
            .unwrap()
    }

    fn sent(&self) -> Vec<BusinessRequest> {
        self.business.requests()
    }
}

fn round(claimed: usize) -> Round {
    Round {
        claimed,
        ..Round::default()
    }
}

#[tokio::test]
async fn a_failing_business_gets_the_same_id_and_bytes_on_every_attempt() {
    for url in fresh_databases().await {
        let mut d = delivery(&url, quick()).await;
        d.business.answer_once("/events", Answer::text(500, "oops"));
        // No answer within the request timeout counts as a failure too.
        d.business
            .answer_once("/events", Answer::status(200).after(Duration::from_secs(2)));
        let id = d.one_event().await;

        assert_eq!(
            d.worker.round().await.unwrap(),
            Round {
                retried: 1,
                ..round(1)
            }
        );
        let first = d.event(&id).await;
        assert_eq!(
            (first.status, first.attempts, first.last_status),
            (DeliveryStatus::Pending, 1, Some(500))
        );
        assert_eq!(
            first.last_error.as_deref(),
            Some("the business answered 500")
        );
        let failed_at = d.clock.now_ms();
        assert_eq!(first.next_attempt_at_ms, Some(failed_at + 5_000), "{url}");
        assert_eq!(d.metrics.events_pending.get(), 1);

        // Not due yet.
        d.clock.advance(Duration::from_millis(4_999));
        assert_eq!(d.worker.round().await.unwrap(), round(0));
        d.clock.advance(Duration::from_millis(1));
        assert_eq!(d.worker.round().await.unwrap().retried, 1);
        let second = d.event(&id).await;
        assert_eq!((second.attempts, second.last_status), (2, None));
        assert!(
            second
                .last_error
                .as_deref()
                .unwrap()
                .contains("did not answer within"),
            "{second:?}"
        );
        assert_eq!(second.next_attempt_at_ms, Some(d.clock.now_ms() + 30_000));

        d.clock.advance(30 * SECOND);
        assert_eq!(d.worker.round().await.unwrap().delivered, 1, "{url}");
        let done = d.event(&id).await;
        assert_eq!(
            (
                done.status,
                done.attempts,
                done.last_status,
                done.last_error
            ),
            (DeliveryStatus::Delivered, 3, Some(200), None)
        );
        assert_eq!(done.delivered_at_ms, Some(d.clock.now_ms()));
        assert_eq!(d.metrics.events_pending.get(), 0);

        let sent = d.sent();
        assert_eq!(sent.len(), 3, "{url}");
        assert!(sent.iter().all(|r| r.verified));
        assert!(
            sent.iter()
                .all(|r| r.header("webhook-id") == Some(id.as_str()))
        );
        assert!(
            sent.iter().all(|r| r.body == sent[0].body),
            "byte-identical"
        );
        assert_eq!(
            sent[0].json.as_ref().unwrap()["type"],
            "call_permission.updated"
        );
        let kind = "call_permission.updated";
        assert_eq!(
            d.metrics.event_deliveries(kind, DeliveryOutcome::Retried),
            2
        );
        assert_eq!(
            d.metrics.event_deliveries(kind, DeliveryOutcome::Delivered),
            1
        );

        // Delivered is final: nothing more is sent, and it cannot be retried by hand.
        d.clock.advance(Duration::from_secs(3600));
        assert_eq!(d.worker.round().await.unwrap(), round(0));
        assert!(!d.store.retry_event(&id, d.clock.now_ms()).await.unwrap());
        assert!(
            !d.store
                .retry_event("msg_unknown", d.clock.now_ms())
                .await
                .unwrap()
        );
    }
}

#[tokio::test]
async fn a_410_stops_delivery_until_retried_by_hand() {
    for url in fresh_databases().await {
        let mut d = delivery(&url, quick()).await;
        d.business.answer_once("/events", Answer::status(410));
        let id = d.one_event().await;
        assert_eq!(d.worker.round().await.unwrap().stopped, 1);
        let stopped = d.event(&id).await;
        assert_eq!(
            (
                stopped.status,
                stopped.last_status,
                stopped.next_attempt_at_ms
            ),
            (DeliveryStatus::Stopped, Some(410), None),
            "{url}"
        );
        d.clock.advance(Duration::from_secs(600));
        assert_eq!(d.worker.round().await.unwrap(), round(0));
        assert_eq!(d.sent().len(), 1);

        // Retried by hand: due at once, same id and body.
        assert!(d.store.retry_event(&id, d.clock.now_ms()).await.unwrap());
        let again = d.event(&id).await;
        assert_eq!(
            (again.status, again.attempts, again.next_attempt_at_ms),
            (DeliveryStatus::Pending, 0, Some(d.clock.now_ms()))
        );
        assert_eq!(d.worker.round().await.unwrap().delivered, 1, "{url}");
        let sent = d.sent();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[1].header("webhook-id"), Some(id.as_str()));
        assert_eq!(sent[1].body, sent[0].body);
        assert_eq!(
            d.metrics
                .event_deliveries("call_permission.updated", DeliveryOutcome::Stopped),
            1
        );
    }
}

#[tokio::test]
async fn delivery_gives_up_at_the_end_of_its_window_and_a_retry_opens_a_new_one() {
    for url in fresh_databases().await {
        let mut d = delivery(&url, quick()).await;
        d.business.answer("/events", Answer::status(503));
        let id = d.one_event().await;
        let created = d.clock.now_ms();

        // t = 0, 5 s, 35 s fail; the next would be at 65 s, past the one-minute window, so the
        // last attempt is made at the deadline itself; when it fails too, the event has failed.
        for (wait, next) in [(0, 5_000), (5_000, 35_000), (30_000, 60_000)] {
            d.clock.advance(Duration::from_millis(wait));
            assert_eq!(d.worker.round().await.unwrap().retried, 1, "{url}");
            assert_eq!(d.event(&id).await.next_attempt_at_ms, Some(created + next));
        }
        d.clock.advance(Duration::from_millis(25_000));
        assert_eq!(d.worker.round().await.unwrap().failed, 1, "{url}");
        let failed = d.event(&id).await;
        assert_eq!(
            (
                failed.status,
                failed.attempts,
                failed.last_status,
                failed.next_attempt_at_ms
            ),
            (DeliveryStatus::Failed, 4, Some(503), None)
        );
        assert_eq!(
            failed.last_error.as_deref(),
            Some("the business answered 503")
        );
        assert_eq!(
            d.metrics
                .event_deliveries("call_permission.updated", DeliveryOutcome::Failed),
            1
        );
        d.clock.advance(Duration::from_secs(3600));
        assert_eq!(d.worker.round().await.unwrap(), round(0));

        // A retry by hand gets a whole new window, not a single last attempt.
        assert!(d.store.retry_event(&id, d.clock.now_ms()).await.unwrap());
        assert_eq!(d.worker.round().await.unwrap().retried, 1, "{url}");
        assert_eq!(d.event(&id).await.attempts, 1);
        assert_eq!(d.sent().len(), 5);
    }
}

#[tokio::test]
async fn the_sweep_runs_at_the_first_round_and_then_every_interval() {
    for url in fresh_databases().await {
        let mut d = delivery(&url, quick()).await;
        let t0 = d.clock.now_ms() - GRANT_VALIDITY_MS - 1_000;
        grant(&d.store, USER, 1, t0).await;
        let granted = all_events(&d.store).await;
        assert_eq!(granted.len(), 1);

        // The first round (at startup) announces the expiry and delivers both events.
        let first = d.worker.round().await.unwrap();
        assert_eq!((first.expiries_announced, first.delivered), (1, 2), "{url}");
        let statuses: Vec<String> = d
            .sent()
            .iter()
            .map(|r| {
                r.json.as_ref().unwrap()["data"]["status"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let mut statuses = statuses;
        statuses.sort();
        assert_eq!(statuses, ["expired", "granted"]);

        // A grant that expires next is found at the next sweep, not before.
        grant(
            &d.store,
            "+5511988880000",
            2,
            d.clock.now_ms() - GRANT_VALIDITY_MS + 10_000,
        )
        .await;
        d.clock.advance(Duration::from_secs(30));
        assert_eq!(d.worker.round().await.unwrap().expiries_announced, 0);
        d.clock.advance(Duration::from_secs(30));
        assert_eq!(
            d.worker.round().await.unwrap().expiries_announced,
            1,
            "{url}"
        );

        // Delivered events are deleted once past their keeping time.
        let kept = all_events(&d.store).await.len();
        assert_eq!(kept, 4);
        d.clock.advance(Duration::from_secs(8 * 86_400));
        d.worker.round().await.unwrap();
        assert!(all_events(&d.store).await.is_empty(), "{url}");
    }
}

#[tokio::test]
async fn the_running_worker_sends_at_once_what_its_machine_writes() {
    for url in fresh_databases().await {
        // Polling hourly: after its first round, only the wake-up of a write can explain a
        // prompt delivery.
        let settings = EventSettings {
            poll_interval: Duration::from_secs(3600),
            ..quick()
        };
        let d = delivery(&url, settings).await;
        grant(&d.store, USER, 1, d.clock.now_ms()).await;
        let handle = d.worker.spawn();
        let first = d.business.next_request("/events").await;
        assert_eq!(first.json.unwrap()["data"]["status"], "granted", "{url}");

        d.store
            .revoke_permission(USER, d.clock.now_ms())
            .await
            .unwrap();
        let second = d.business.next_request("/events").await;
        assert_eq!(second.json.unwrap()["data"]["status"], "revoked", "{url}");
        handle.abort();
    }
}

#[tokio::test]
async fn a_restarted_worker_resumes_what_its_machine_was_sending() {
    for url in fresh_databases().await {
        let d = delivery(&url, quick()).await;
        let id = d.one_event().await;
        // The previous process claimed the event and was killed before it recorded anything.
        let now = d.clock.now_ms();
        assert_eq!(
            d.store
                .claim_events(now, now + 60_000, 10)
                .await
                .unwrap()
                .len(),
            1
        );

        // Started again under the same machine id, it sends the event without waiting for
        // the old claim to lapse (the clock does not move).
        let again = events_store(&url, "machine-a").await;
        let restarted = worker(&d.business, &again, &d.clock, &d.metrics, quick());
        let handle = restarted.spawn();
        let request = d.business.next_request("/events").await;
        assert_eq!(request.header("webhook-id"), Some(id.as_str()), "{url}");
        handle.abort();
    }
}

#[tokio::test]
async fn a_call_announces_its_start_and_its_end_as_the_api_shows_it() {
    let business = FakeBusiness::start().await;
    let fake = FakeRealtime::start().await;
    let events_url = business.url("/events");
    let mut config = test_config(&[
        ("OPENAI_REALTIME_URL", fake.url.as_str()),
        ("CALLBRIDGE_API_TOKEN", API_TOKEN),
        ("CALLBRIDGE_WEBHOOK_SECRET", FakeBusiness::SECRET),
        ("CALLBRIDGE_EVENTS_URL", events_url.as_str()),
    ]);
    config.events.poll_interval = Duration::from_millis(50);
    let app = spawn_app_with(config).await;
    assert!(app.state.store.events_enabled());
    assert!(app.state.events_worker.is_some());

    let sid = call_sid(7001);
    let (mut twilio, session) = connected_call(&app, &fake, &sid).await;
    let started = business.next_request("/events").await;
    assert!(started.verified);
    let started_body = started.json.clone().unwrap();
    assert_eq!(started_body["type"], "call.started");
    assert_eq!(started_body["data"]["call_sid"], sid);
    assert_eq!(
        started_body["data"]["stream_sid"],
        format!("MZ{:032}", 7001)
    );
    assert_eq!(started_body["data"]["ended_at_ms"], Value::Null);

    // The agent says a line, 2 s of audio; the caller hears 0.5 s of it, then barges in.
    session
        .send(json!({"type":"response.created","response":{"id":"resp","status":"in_progress"}}));
    let mut marks = Vec::new();
    for _ in 0..20 {
        session.send(delta("resp", "item_a1", &agent_audio(100, 0x7F)));
    }
    for _ in 0..20 {
        assert_eq!(twilio.recv().await["event"], "media");
        marks.push(
            twilio.recv().await["mark"]["name"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    session.send(json!({"type":"response.output_audio_transcript.done","response_id":"resp","item_id":"item_a1","output_index":0,"content_index":0,"transcript":"Hello! How can I help you with your order today, or with anything else?"}));
    app.call_with_lines(&sid, 1).await;
    for name in &marks[..5] {
        twilio.echo_mark(name).await;
    }
    twilio.media(0, &frame(0, 0)).await;
    session.send(json!({"type":"input_audio_buffer.speech_started","audio_start_ms":500,"item_id":"item_user"}));
    assert_eq!(twilio.recv().await["event"], "clear");
    twilio.stop().await;
    twilio.closed_within(Duration::from_secs(2)).await;

    let ended = business.next_request("/events").await;
    assert!(ended.verified);
    let ended_body = ended.json.clone().unwrap();
    assert_eq!(ended_body["type"], "call.ended");
    let shown: Value = app
        .api_get(&format!("/calls/{sid}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ended_body["data"], shown);
    let line = &shown["transcript"][0];
    assert_eq!(
        line["truncated"], true,
        "the event has the corrected line: {line}"
    );
    assert!(
        line["text"].as_str().unwrap().len()
            < "Hello! How can I help you with your order today, or with anything else?".len(),
        "{line}"
    );
    assert_ne!(started.header("webhook-id"), ended.header("webhook-id"));
    // The outcome is recorded once the business's answer is back.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while app
        .state
        .metrics
        .event_deliveries("call.ended", DeliveryOutcome::Delivered)
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn without_an_events_url_the_app_writes_and_sends_no_events() {
    let app = spawn_app_with(test_config(&[])).await;
    assert!(!app.state.store.events_enabled());
    assert!(app.state.events_worker.is_none());
}

#[tokio::test]
async fn operators_list_deliveries_and_send_a_stopped_one_again() {
    let business = FakeBusiness::start().await;
    business.answer("/events", Answer::status(410));
    let events_url = business.url("/events");
    let mut config = test_config(&[
        ("CALLBRIDGE_API_TOKEN", API_TOKEN),
        ("CALLBRIDGE_WEBHOOK_SECRET", FakeBusiness::SECRET),
        ("CALLBRIDGE_EVENTS_URL", events_url.as_str()),
    ]);
    config.events.poll_interval = Duration::from_millis(50);
    let app = spawn_app_with(config).await;
    grant(&app.state.store, USER, 1, app.state.clock.now_ms()).await;
    let first = business.next_request("/events").await;
    let id = first.header("webhook-id").unwrap().to_owned();

    let stopped = wait_for_listed(&app, "stopped", &id).await;
    assert_eq!(stopped["type"], "call_permission.updated");
    assert_eq!(stopped["last_status"], 410);
    assert_eq!(stopped["attempts"], 1);
    let pending: Value = app
        .api_get("/events?status=pending")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(pending["events"], json!([]));

    business.answer("/events", Answer::status(204));
    let retried = app
        .http
        .post(format!("{}/events/{id}/retry", app.address))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    let again = business.next_request("/events").await;
    assert_eq!(again.header("webhook-id"), Some(id.as_str()));
    assert_eq!(again.body, first.body, "the same bytes");
    wait_for_listed(&app, "delivered", &id).await;

    // What the API refuses, and how.
    for (request, status, code) in [
        (
            app.http
                .post(format!("{}/events/msg_nope/retry", app.address)),
            404,
            "event_not_found",
        ),
        (
            app.http.get(format!("{}/events?status=lost", app.address)),
            400,
            "invalid_parameter",
        ),
        (
            app.http.get(format!("{}/events?limit=0", app.address)),
            400,
            "invalid_parameter",
        ),
        (
            app.http.get(format!("{}/events?before=zz", app.address)),
            400,
            "invalid_parameter",
        ),
    ] {
        let response = request.bearer_auth(API_TOKEN).send().await.unwrap();
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
    }
    let anonymous = app
        .http
        .get(format!("{}/events", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    let without = spawn_app_with(test_config(&[("CALLBRIDGE_API_TOKEN", API_TOKEN)])).await;
    let response = without.api_get("/events").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "events_disabled");
}

/// The delivery of event `id` once it is listed under `status`.
async fn wait_for_listed(app: &crate::helpers::TestApp, status: &str, id: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let page: Value = app
            .api_get(&format!("/events?status={status}&limit=100"))
            .await
            .json()
            .await
            .unwrap();
        if let Some(found) = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
        {
            return found.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} never became {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
