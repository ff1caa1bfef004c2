//! The store against every database a deployment can use: always SQLite, and Postgres when
//! `CALLBRIDGE_TEST_POSTGRES_URL` names a server (`.ci/run` starts one).

use callbridge::call::transcript::{Speaker, TranscriptLine};
use callbridge::clock::{Clock, SystemClock};
use callbridge::store::machines::{HEARTBEAT_INTERVAL, LEASE, MachineId, keep_lease};
use callbridge::store::models::{CallLatency, CallRecord, ListCursor, StatusUpdate, TokenUsage};
use callbridge::store::{CallTotals, NewCall, Record, Store};
use callbridge::twilio::call::{CallStatus, Direction};

fn now_ms() -> i64 {
    SystemClock.now_ms()
}

use callbridge_testkit::scratch::Scratch;

use crate::helpers::ManualClock;

/// A database of its own for one test, removed when dropped (also when the test panics): a
/// SQLite file in a scratch directory, or a Postgres database created for it. It dereferences
/// to its URL.
pub struct FreshDatabase {
    url: String,
    // Held only to be dropped with it: one or the other.
    _sqlite: Option<Scratch>,
    _postgres: Option<PostgresDatabase>,
}

impl std::ops::Deref for FreshDatabase {
    type Target = str;

    fn deref(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Display for FreshDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Fresh, empty databases: one SQLite file, and one Postgres database if a server is available.
pub async fn fresh_databases() -> Vec<FreshDatabase> {
    let scratch = Scratch::new();
    let mut databases = vec![FreshDatabase {
        url: scratch.sqlite_url(),
        _sqlite: Some(scratch),
        _postgres: None,
    }];
    match std::env::var("CALLBRIDGE_TEST_POSTGRES_URL") {
        Ok(admin_url) => databases.push(fresh_postgres_database(&admin_url).await),
        // CI sets CALLBRIDGE_REQUIRE_POSTGRES: there a skipped half is a failure.
        Err(_) if std::env::var_os("CALLBRIDGE_REQUIRE_POSTGRES").is_some() => {
            panic!("CALLBRIDGE_REQUIRE_POSTGRES is set but CALLBRIDGE_TEST_POSTGRES_URL is not")
        }
        Err(_) => eprintln!(
            "skipping the Postgres half of this test: CALLBRIDGE_TEST_POSTGRES_URL is not set"
        ),
    }
    databases
}

/// What every test database's name starts with; the test process's id follows, so a later run
/// can tell the databases of a run that died before dropping them.
const POSTGRES_PREFIX: &str = "callbridge_test_";

async fn fresh_postgres_database(admin_url: &str) -> FreshDatabase {
    use sqlx::Connection;
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    sqlx::any::install_default_drivers();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{POSTGRES_PREFIX}{}_{n}", std::process::id());
    let mut admin = sqlx::AnyConnection::connect(admin_url)
        .await
        .expect("Postgres reachable");
    if !SWEPT.swap(true, std::sync::atomic::Ordering::Relaxed) {
        drop_databases_of_dead_runs(&mut admin).await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let mut url = url::Url::parse(admin_url).unwrap();
    url.set_path(&name);
    FreshDatabase {
        url: url.to_string(),
        _sqlite: None,
        _postgres: Some(PostgresDatabase {
            admin_url: admin_url.to_owned(),
            name,
        }),
    }
}

/// A Postgres database created for a test; dropping it drops the database.
struct PostgresDatabase {
    admin_url: String,
    name: String,
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        use sqlx::Connection;
        // The test's pools may still be connected (`FORCE` ends their sessions), and this may
        // run on the test's runtime, which cannot block on a future itself: a thread with a
        // small runtime of its own sends the statement while the test waits.
        let dropped = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async {
                        let mut admin = sqlx::AnyConnection::connect(&self.admin_url).await?;
                        let statement =
                            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
                        sqlx::query(sqlx::AssertSqlSafe(statement))
                            .execute(&mut admin)
                            .await?;
                        admin.close().await?;
                        anyhow::Ok(())
                    })
                })
                .join()
        });
        // Panicking here could abort a test that is already failing; saying so is enough.
        if let Ok(Err(error)) = dropped {
            eprintln!("the test database {} was not dropped: {error}", self.name);
        }
    }
}

/// Drops the test databases of runs whose process has exited (killed, or aborted before the
/// databases' guards ran). A process is looked up in `/proc`, so this assumes the server is a
/// test server used from this machine; without `/proc` nothing is swept. A database somebody
/// is still connected to is left alone (no `FORCE`).
async fn drop_databases_of_dead_runs(admin: &mut sqlx::AnyConnection) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE $1")
            .bind(format!("{POSTGRES_PREFIX}%"))
            .fetch_all(&mut *admin)
            .await
            .expect("the databases can be listed");
    for name in names {
        // Only names these tests make (they go into the statement unquoted).
        let ours = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let Some(pid) = name
            .strip_prefix(POSTGRES_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .filter(|_| ours)
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let statement = format!("DROP DATABASE IF EXISTS {name}");
            let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut *admin)
                .await;
        }
    }
}

/// A status callback for `call_sid` arriving at `at_ms`.
fn status(call_sid: &str, status: CallStatus, sequence: i64, at_ms: i64) -> StatusUpdate {
    StatusUpdate {
        call_sid: call_sid.into(),
        status,
        sequence_number: Some(sequence),
        duration_secs: (status == CallStatus::Completed).then_some(42),
        direction: Some(Direction::Inbound),
        from: "whatsapp:+5511999990000".into(),
        to: "whatsapp:+558551234567".into(),
        at_ms,
    }
}

pub(crate) fn new_call(call_sid: &str, at_ms: i64) -> NewCall<'_> {
    NewCall {
        call_sid,
        direction: Some(Direction::Inbound),
        from: "whatsapp:+5511999990000",
        to: "whatsapp:+558551234567",
        agent: "default",
        status: CallStatus::Ringing,
        at_ms,
    }
}

fn line(sequence: u32, speaker: Speaker, text: &str) -> TranscriptLine {
    TranscriptLine {
        sequence,
        speaker,
        text: text.into(),
        offset_ms: u64::from(sequence) * 1000,
        truncated: speaker == Speaker::Agent && sequence == 4,
    }
}

#[tokio::test]
async fn stream_tokens_are_single_use_and_expire() {
    for url in fresh_databases().await {
        let store = Store::connect(&url).await.unwrap();
        store
            .issue_stream_token("tok1", "CA1", 0, 5_000)
            .await
            .unwrap();
        store
            .issue_stream_token("tok2", "CA2", 0, 1_000)
            .await
            .unwrap();
        assert_eq!(
            store.take_stream_token("tok1").await.unwrap(),
            Some(("CA1".into(), 5_000))
        );
        assert_eq!(
            store.take_stream_token("tok1").await.unwrap(),
            None,
            "{url}"
        );
        assert_eq!(store.purge_expired_tokens(2_000).await.unwrap(), 1);
        // One token per call: a second issue returns the first, until it has expired.
        let first = store
            .issue_stream_token("tok3", "CA3", 0, 100)
            .await
            .unwrap();
        assert_eq!(
            store
                .issue_stream_token("tok4", "CA3", 50, 150)
                .await
                .unwrap(),
            first
        );
        assert_eq!(
            store
                .issue_stream_token("tok5", "CA3", 100, 200)
                .await
                .unwrap(),
            "tok5",
            "{url}"
        );
        assert_eq!(store.take_stream_token("tok2").await.unwrap(), None);
    }
}

#[tokio::test]
async fn status_callbacks_are_idempotent_and_never_move_a_call_backwards() {
    for url in fresh_databases().await {
        let store = Store::connect(&url).await.unwrap();
        store.record_call(&new_call("CA1", now_ms())).await.unwrap();
        assert!(
            store
                .record_status(&status("CA1", CallStatus::Ringing, 1, 10))
                .await
                .unwrap()
        );
        assert!(
            !store
                .record_status(&status("CA1", CallStatus::Ringing, 1, 20))
                .await
                .unwrap(),
            "a retry is stored once"
        );
        assert!(
            store
                .record_status(&status("CA1", CallStatus::Completed, 3, 30))
                .await
                .unwrap()
        );
        // The in-progress callback arrives late: stored in the history, status stays completed.
        assert!(
            store
                .record_status(&status("CA1", CallStatus::InProgress, 2, 40))
                .await
                .unwrap()
        );
        assert!(
            !store
                .record_status(&status("CA1", CallStatus::Completed, 3, 50))
                .await
                .unwrap()
        );

        let detail = store.call("CA1").await.unwrap().unwrap();
        assert_eq!(detail.call.status, CallStatus::Completed, "{url}");
        assert_eq!(detail.call.duration_secs, Some(42));
        assert!(detail.call.ended_at_ms.is_some());
        let statuses: Vec<_> = detail
            .events
            .iter()
            .map(|e| (e.name.as_str(), e.sequence_number))
            .collect();
        // Listed in Twilio's order, though in-progress arrived last.
        assert_eq!(
            statuses,
            [
                ("ringing", Some(1)),
                ("in-progress", Some(2)),
                ("completed", Some(3))
            ]
        );
    }
}

#[tokio::test]
async fn a_status_callback_before_the_voice_webhook_creates_the_call() {
    for url in fresh_databases().await {
        let store = Store::connect(&url).await.unwrap();
        let without_direction = StatusUpdate {
            direction: None,
            ..status("CA2", CallStatus::Initiated, 0, now_ms())
        };
        store.record_status(&without_direction).await.unwrap();
        assert_eq!(record(&store, "CA2").await.direction, None, "{url}");
        store.record_call(&new_call("CA2", now_ms())).await.unwrap();
        let call = record(&store, "CA2").await;
        assert_eq!(
            (call.status, call.direction, call.to.as_str()),
            (
                CallStatus::Initiated,
                Some(Direction::Inbound),
                "whatsapp:+558551234567"
            )
        );
    }
}

/// The rule for every pair of statuses, in both orders of arrival: a callback moves the call to
/// a later stage of its life, or within a stage to a later `SequenceNumber`; never back.
#[tokio::test]
async fn every_pair_of_statuses_keeps_the_stage_order() {
    for url in fresh_databases().await {
        let store = Store::connect(&url).await.unwrap();
        let pairs = CallStatus::ALL
            .into_iter()
            .flat_map(|first| CallStatus::ALL.map(|second| (first, second)));
        for (n, (first, second)) in pairs.enumerate() {
            for (first_sequence, second_sequence) in [(1, 2), (2, 1)] {
                let call_sid = format!("CA{n}_{first_sequence}");
                for (update, sequence) in [(first, first_sequence), (second, second_sequence)] {
                    let update = status(&call_sid, update, sequence, now_ms());
                    assert!(store.record_status(&update).await.unwrap());
                }
                let moves_on = second.progress() > first.progress()
                    || (second.progress() == first.progress() && second_sequence > first_sequence);
                let expected = if moves_on { second } else { first };
                assert_eq!(
                    record(&store, &call_sid).await.status,
                    expected,
                    "{first} #{first_sequence} then {second} #{second_sequence}: {url}"
                );
            }
        }
    }
}

/// Every status and direction is stored from a parsed value, so other text in a row was put
/// there by hand: reading it is an error that names the call, not a panic or a guess.
#[tokio::test]
async fn a_stored_status_or_direction_this_code_does_not_know_is_an_error_naming_the_call() {
    for url in fresh_databases().await {
        let store = Store::connect(&url).await.unwrap();
        for (call_sid, column) in [("CA1", "status"), ("CA2", "direction")] {
            store
                .record_call(&new_call(call_sid, now_ms()))
                .await
                .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE calls SET {column} = 'sideways' WHERE call_sid = $1"
            )))
            .bind(call_sid)
            .execute(store.pool())
            .await
            .unwrap();
            let error = format!("{:#}", store.call(call_sid).await.unwrap_err());
            assert!(
                error.contains(call_sid) && error.contains(column),
                "{error}: {url}"
            );
            assert!(store.list_calls(10, None).await.is_err());
            sqlx::query("DELETE FROM calls WHERE call_sid = $1")
                .bind(call_sid)
                .execute(store.pool())
                .await
                .unwrap();
        }
    }
}

/// A call's totals with every field distinct, to see each stored and read back.
fn billed_totals() -> CallTotals {
    CallTotals {
        input_tokens: 10,
        output_tokens: 20,
        total_tokens: 30,
        usage: TokenUsage {
            input_text_tokens: 4,
            input_audio_tokens: 6,
            input_cached_text_tokens: 2,
            input_cached_audio_tokens: 3,
            output_text_tokens: 5,
            output_audio_tokens: 15,
        },
        model: "gpt-realtime".into(),
        cost_micro_usd: Some(1_234_567),
        latency: CallLatency {
            openai_connect_ms: Some(310),
            first_agent_audio_ms: Some(900),
            turns: 3,
            turn_p50_ms: Some(640),
            turn_max_ms: Some(1200),
        },
    }
}

#[tokio::test]
async fn bridge_records_make_up_the_call_history() {
    for url in fresh_databases().await {
        let store = Store::connect(&url).await.unwrap();
        store.record_call(&new_call("CA3", now_ms())).await.unwrap();
        let mut records = vec![Record::StreamStarted {
            call_sid: "CA3".into(),
            stream_sid: "MZ3".into(),
            agent: "support".into(),
            at_ms: now_ms(),
        }];
        let lines = [
            line(1, Speaker::Agent, "Hello, how can I help?"),
            line(2, Speaker::Caller, "I'd like to book a table."),
            line(3, Speaker::Agent, "For how many people?"),
            line(4, Speaker::Agent, "Sorry, go"),
        ];
        records.extend(lines.iter().rev().map(|l| Record::Transcript {
            call_sid: "CA3".into(),
            line: l.clone(),
        }));
        records.push(Record::Event {
            call_sid: "CA3".into(),
            kind: "openai_error",
            name: "invalid_value".into(),
            detail: Some("Audio content… 'quoted'".into()),
            data: Some(serde_json::json!({"quoted": "'it''s'"})),
            at_ms: now_ms() + 1,
        });
        records.push(Record::CallEnded {
            call_sid: "CA3".into(),
            end_reason: "caller_hung_up",
            openai_session_id: Some("sess_1".into()),
            totals: Box::new(billed_totals()),
            at_ms: now_ms(),
        });
        records.push(Record::TranscriptCorrection {
            call_sid: "CA3".into(),
            sequence: 3,
            text: "For how".into(),
            truncated: true,
        });
        store.apply(&records).await.unwrap();
        store.apply(&records[1..2]).await.unwrap();

        let detail = store.call("CA3").await.unwrap().unwrap();
        assert_eq!(detail.call.stream_sid.as_deref(), Some("MZ3"));
        assert_eq!(detail.call.end_reason.as_deref(), Some("caller_hung_up"));
        assert_eq!(detail.call.openai_session_id.as_deref(), Some("sess_1"));
        assert_eq!(
            (
                detail.call.input_tokens,
                detail.call.output_tokens,
                detail.call.total_tokens
            ),
            (10, 20, 30)
        );
        assert_eq!(detail.call.usage.input_cached_audio_tokens, 3, "{url}");
        assert_eq!(detail.call.usage.output_audio_tokens, 15, "{url}");
        assert_eq!(detail.call.model.as_deref(), Some("gpt-realtime"));
        assert_eq!(detail.call.latency.turn_max_ms, Some(1200), "{url}");
        let shown = serde_json::to_value(&detail.call).unwrap();
        assert_eq!(shown["cost_usd"], serde_json::json!(1.234567), "{url}");
        assert_eq!(shown["latency"]["turn_p50_ms"], 640);
        assert_eq!(shown["usage"]["input_cached_text_tokens"], 2);
        let transcript: Vec<_> = detail
            .transcript
            .iter()
            .map(|l| (l.sequence, l.speaker.as_str(), l.text.as_str(), l.truncated))
            .collect();
        assert_eq!(
            transcript,
            [
                (1, "agent", "Hello, how can I help?", false),
                (2, "caller", "I'd like to book a table.", false),
                (3, "agent", "For how", true),
                (4, "agent", "Sorry, go", true),
            ],
            "{url}"
        );
        assert_eq!(
            detail.events[0].detail.as_deref(),
            Some("Audio content… 'quoted'")
        );
        assert_eq!(
            detail.events[0].data,
            Some(serde_json::json!({"quoted": "'it''s'"})),
            "structured event data round-trips: {url}"
        );
        assert_eq!(detail.call.agent.as_deref(), Some("support"), "{url}");
        assert!(store.call("CA404").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn calls_are_listed_newest_first_with_cursor_paging() {
    for url in fresh_databases().await {
        let store = Store::connect(&url).await.unwrap();
        for i in 0..7 {
            // Two calls share a timestamp, so the cursor must break ties by CallSid.
            let at = 1_000 + (i / 2) * 10;
            let sid = format!("CA{i}");
            store.record_call(&new_call(&sid, at)).await.unwrap();
        }
        let first = store.list_calls(3, None).await.unwrap();
        let sids = |calls: &[callbridge::store::models::CallRecord]| {
            calls.iter().map(|c| c.call_sid.clone()).collect::<Vec<_>>()
        };
        assert_eq!(sids(&first), ["CA6", "CA5", "CA4"]);
        let second = store
            .list_calls(3, Some(&ListCursor::after(&first[2])))
            .await
            .unwrap();
        assert_eq!(sids(&second), ["CA3", "CA2", "CA1"]);
        let third = store
            .list_calls(3, Some(&ListCursor::after(&second[2])))
            .await
            .unwrap();
        assert_eq!(sids(&third), ["CA0"], "{url}");
    }
}

#[tokio::test]
async fn several_instances_can_start_against_one_database() {
    for url in fresh_databases().await {
        let (a, b, c) = tokio::join!(
            Store::connect(&url),
            Store::connect(&url),
            Store::connect(&url)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        c.unwrap();
        a.issue_stream_token("shared", "CA1", 0, i64::MAX)
            .await
            .unwrap();
        assert_eq!(
            b.take_stream_token("shared").await.unwrap(),
            Some(("CA1".into(), i64::MAX))
        );
        // A restart against the migrated database is a no-op.
        Store::connect(&url).await.unwrap();
    }
}

mod permissions {
    use super::*;
    use callbridge::consent::{IgnoredReply, PermissionState, ReplyEffect};
    use callbridge::store::permissions::{OutboundCall, Reply, ReplyOutcome};

    const GRANTED: ReplyOutcome = ReplyOutcome::New(ReplyEffect::Grant);
    const REJECTED: ReplyOutcome = ReplyOutcome::New(ReplyEffect::Reject);
    const CLOSED: ReplyOutcome =
        ReplyOutcome::New(ReplyEffect::Ignore(IgnoredReply::RequestClosed));

    const USER: &str = "+5511999990000";
    const T0: i64 = 1_800_000_000_000;
    const DAY: i64 = 86_400_000;

    #[tokio::test]
    async fn one_request_claim_per_day_even_when_racing() {
        for url in fresh_databases().await {
            let store = Store::connect(&url).await.unwrap();
            let (a, b) = tokio::join!(
                store.claim_permission_request(USER, T0),
                store.claim_permission_request(USER, T0)
            );
            assert_eq!(
                [a.unwrap(), b.unwrap()].iter().filter(|won| **won).count(),
                1,
                "{url}"
            );
            assert!(
                !store
                    .claim_permission_request(USER, T0 + DAY - 1)
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .claim_permission_request(USER, T0 + DAY)
                    .await
                    .unwrap()
            );
            // The send failed: the claim is given back and the day's slot reopens.
            store
                .release_permission_request(USER, T0 + DAY, Some(T0))
                .await
                .unwrap();
            assert_eq!(store.last_permission_request(USER).await.unwrap(), Some(T0));

            store
                .claim_permission_request("+14155550100", T0)
                .await
                .unwrap();
            store
                .release_permission_request("+14155550100", T0, None)
                .await
                .unwrap();
            assert_eq!(
                store.permission("+14155550100").await.unwrap(),
                None,
                "no trace of a request never sent"
            );
        }
    }

    #[tokio::test]
    async fn requests_and_replies_make_up_the_permission() {
        for url in fresh_databases().await {
            let store = Store::connect(&url).await.unwrap();
            assert!(store.claim_permission_request(USER, T0).await.unwrap());
            store
                .record_permission_request(USER, "SM1", T0)
                .await
                .unwrap();
            assert_eq!(
                store.permission_requests_since(USER, T0 - 1).await.unwrap(),
                [T0]
            );
            assert_eq!(
                store.permission(USER).await.unwrap().unwrap().state,
                PermissionState::Pending
            );

            assert_eq!(
                store
                    .record_permission_reply(USER, "SM2", None, Reply::Accepted, T0 + 10)
                    .await
                    .unwrap(),
                GRANTED
            );
            let granted = store.permission(USER).await.unwrap().unwrap();
            assert_eq!(granted.state, PermissionState::Granted);
            assert_eq!(granted.expires_at_ms, Some(T0 + 10 + 7 * DAY), "{url}");

            // A new request keeps a valid grant; a retried reply changes nothing, and neither
            // does a second acceptance of a request already answered.
            store
                .claim_permission_request(USER, T0 + DAY)
                .await
                .unwrap();
            store
                .record_permission_request(USER, "SM3", T0 + DAY)
                .await
                .unwrap();
            assert_eq!(
                store.permission(USER).await.unwrap().unwrap().state,
                PermissionState::Granted
            );
            assert_eq!(
                store
                    .record_permission_reply(USER, "SM4", None, Reply::Rejected, T0 + DAY + 5)
                    .await
                    .unwrap(),
                REJECTED
            );
            assert_eq!(
                store
                    .record_permission_reply(USER, "SM2", None, Reply::Accepted, T0 + DAY + 9)
                    .await
                    .unwrap(),
                ReplyOutcome::Repeated
            );
            assert_eq!(
                store
                    .record_permission_reply(USER, "SM5", None, Reply::Accepted, T0 + DAY + 9)
                    .await
                    .unwrap(),
                CLOSED
            );
            let rejected = store.permission(USER).await.unwrap().unwrap();
            assert_eq!(
                (rejected.state, rejected.answered_at_ms),
                (PermissionState::Rejected, Some(T0 + DAY + 5))
            );
        }
    }

    #[tokio::test]
    async fn only_an_answer_to_the_open_request_grants() {
        for url in fresh_databases().await {
            let store = Store::connect(&url).await.unwrap();
            let reply = |sid: &'static str, replied_to: Option<&'static str>, at_ms: i64| {
                store.record_permission_reply(USER, sid, replied_to, Reply::Accepted, at_ms)
            };
            assert_eq!(
                reply("SM10", None, T0).await.unwrap(),
                ReplyOutcome::New(ReplyEffect::Ignore(IgnoredReply::NoRequest)),
                "nothing was asked: {url}"
            );
            store
                .record_permission_request(USER, "SM1", T0)
                .await
                .unwrap();
            assert_eq!(
                reply("SM11", Some("SM9"), T0 + 1).await.unwrap(),
                ReplyOutcome::New(ReplyEffect::Ignore(IgnoredReply::NoRequest)),
                "an answer to a message that is not our request"
            );
            assert_eq!(reply("SM12", Some("SM1"), T0 + 2).await.unwrap(), GRANTED);

            store.revoke_permission(USER, T0 + 3).await.unwrap();
            assert_eq!(reply("SM13", None, T0 + 4).await.unwrap(), CLOSED);
            assert_eq!(
                store.permission(USER).await.unwrap().unwrap().state,
                PermissionState::Revoked
            );

            // A new request closes the old one: only an answer to it can grant.
            store
                .record_permission_request(USER, "SM2", T0 + DAY)
                .await
                .unwrap();
            assert_eq!(
                reply("SM14", Some("SM1"), T0 + DAY + 1).await.unwrap(),
                CLOSED
            );
            let (a, b) = tokio::join!(
                reply("SM15", Some("SM2"), T0 + DAY + 2),
                reply("SM16", None, T0 + DAY + 2)
            );
            let mut outcomes = [a.unwrap(), b.unwrap()];
            outcomes.sort_by_key(|outcome| *outcome != GRANTED);
            assert_eq!(outcomes, [GRANTED, CLOSED], "racing acceptances: {url}");
            assert_eq!(
                store.permission(USER).await.unwrap().unwrap().state,
                PermissionState::Granted
            );
        }
    }

    #[tokio::test]
    async fn outbound_calls_count_connections_and_unanswered_runs() {
        for url in fresh_databases().await {
            let store = Store::connect(&url).await.unwrap();
            store
                .record_permission_request(USER, "SM1", T0)
                .await
                .unwrap();
            store
                .record_permission_reply(USER, "SM2", None, Reply::Accepted, T0)
                .await
                .unwrap();
            let to = format!("whatsapp:{USER}");
            for (n, answered) in [(1, true), (2, false), (3, true)] {
                let call_sid = format!("CA{n}");
                store
                    .record_outbound_call(&OutboundCall {
                        call_sid: &call_sid,
                        from: "whatsapp:+558551234567",
                        to: &to,
                        agent: Some("sales"),
                        context: Some("context"),
                        variables: &[("name".to_owned(), "Ada".to_owned())].into(),
                        status: CallStatus::Queued,
                        at_ms: T0 + n,
                    })
                    .await
                    .unwrap();
                if answered {
                    let mut update = status(&call_sid, CallStatus::InProgress, 1, T0 + 100 * n);
                    update.direction = Some(Direction::OutboundApi);
                    update.to = to.clone();
                    store.record_status(&update).await.unwrap();
                }
            }
            assert_eq!(
                store.outbound_calls_counted_since(&to, T0).await.unwrap(),
                3,
                "two answered, one still ringing: {url}"
            );
            assert_eq!(
                store
                    .outbound_calls_counted_since(&to, T0 + 150)
                    .await
                    .unwrap(),
                1
            );
            assert_eq!(
                store.outbound_brief("CA1").await.unwrap(),
                Some((
                    Some("context".into()),
                    [("name".to_owned(), "Ada".to_owned())].into()
                ))
            );
            assert_eq!(
                store.outbound_agent("CA1").await.unwrap().as_deref(),
                Some("sales")
            );
            assert_eq!(store.outbound_brief("CA404").await.unwrap(), None);

            for _ in 0..3 {
                store
                    .record_outbound_outcome(USER, false, T0)
                    .await
                    .unwrap();
            }
            store.record_outbound_outcome(USER, true, T0).await.unwrap();
            for _ in 0..3 {
                store
                    .record_outbound_outcome(USER, false, T0)
                    .await
                    .unwrap();
            }
            assert_eq!(
                store.permission(USER).await.unwrap().unwrap().state,
                PermissionState::Granted
            );
            // A request sent while the grant held is closed by the revocation.
            store
                .record_permission_request(USER, "SM3", T0 + 1)
                .await
                .unwrap();
            store
                .record_outbound_outcome(USER, false, T0)
                .await
                .unwrap();
            let revoked = store.permission(USER).await.unwrap().unwrap();
            assert_eq!(
                (revoked.state, revoked.consecutive_unanswered),
                (PermissionState::Revoked, 4)
            );
            assert_eq!(
                store
                    .record_permission_reply(USER, "SM4", None, Reply::Accepted, T0 + 2)
                    .await
                    .unwrap(),
                CLOSED,
                "{url}"
            );
            assert_eq!(
                store.permission(USER).await.unwrap().unwrap().state,
                PermissionState::Revoked
            );
        }
    }
}

async fn machine(url: &str, name: &str, clock: &ManualClock) -> Store {
    let store = Store::connect_as(url, MachineId::parse(name).unwrap())
        .await
        .unwrap();
    store.claim_machine(clock.now_ms()).await.unwrap();
    store
}

/// A call `/voice` answered whose stream then started on `store`'s machine.
async fn call_carried_by(store: &Store, call_sid: &str, at_ms: i64) {
    store.record_call(&new_call(call_sid, at_ms)).await.unwrap();
    store
        .apply(&[Record::StreamStarted {
            call_sid: call_sid.into(),
            stream_sid: format!("MZ{call_sid}"),
            agent: "default".into(),
            at_ms,
        }])
        .await
        .unwrap();
}

async fn record(store: &Store, call_sid: &str) -> CallRecord {
    store.call(call_sid).await.unwrap().unwrap().call
}

fn ended(reason: &'static str, call_sid: &str, at_ms: i64) -> Record {
    Record::CallEnded {
        call_sid: call_sid.into(),
        end_reason: reason,
        openai_session_id: None,
        totals: Box::new(CallTotals {
            input_tokens: 0,
            output_tokens: 0,
            total_tokens: 0,
            usage: TokenUsage::default(),
            model: "gpt-realtime-mini".into(),
            cost_micro_usd: Some(0),
            latency: CallLatency::default(),
        }),
        at_ms,
    }
}

#[tokio::test]
async fn calls_of_a_machine_whose_lease_ran_out_are_recorded_as_lost() {
    for url in fresh_databases().await {
        let clock = ManualClock::default();
        let a = machine(&url, "machine-a", &clock).await;
        let b = machine(&url, "machine-b", &clock).await;
        call_carried_by(&a, "CA_A", clock.now_ms()).await;
        call_carried_by(&b, "CA_B", clock.now_ms()).await;

        // While A renews its lease its call stays live, however long it lasts.
        for _ in 0..20 {
            clock.advance(HEARTBEAT_INTERVAL);
            assert_eq!(keep_lease(&a, &clock).await.unwrap(), 0);
            assert_eq!(keep_lease(&b, &clock).await.unwrap(), 0, "{url}");
        }
        let a_renewed_at = clock.now_ms();

        // A is killed. Just before its lease runs out B leaves its call alone; then ends it.
        clock.advance(LEASE - std::time::Duration::from_millis(1));
        assert_eq!(keep_lease(&b, &clock).await.unwrap(), 0, "{url}");
        assert_eq!(record(&b, "CA_A").await.ended_at_ms, None);
        clock.advance(std::time::Duration::from_millis(1));
        assert_eq!(keep_lease(&b, &clock).await.unwrap(), 1, "{url}");
        let lost = record(&b, "CA_A").await;
        assert_eq!(lost.end_reason.as_deref(), Some("lost"));
        assert_eq!(lost.ended_at_ms, Some(a_renewed_at + 30_000));
        assert_eq!(keep_lease(&b, &clock).await.unwrap(), 0, "swept once");

        // A machine never sweeps its own calls, even when its clock jumps by a day.
        clock.advance(std::time::Duration::from_secs(86_400));
        assert_eq!(keep_lease(&b, &clock).await.unwrap(), 0);
        assert_eq!(record(&b, "CA_B").await.ended_at_ms, None, "{url}");

        // A was only slow: when its bridge records the call's end, that end is the true one.
        a.apply(&[ended("caller_hung_up", "CA_A", clock.now_ms())])
            .await
            .unwrap();
        let corrected = record(&a, "CA_A").await;
        assert_eq!(corrected.end_reason.as_deref(), Some("caller_hung_up"));
        assert_eq!(corrected.ended_at_ms, Some(clock.now_ms()), "{url}");
    }
}

#[tokio::test]
async fn a_restarted_machine_records_what_it_carried_as_lost_before_it_serves() {
    for url in fresh_databases().await {
        let clock = ManualClock::default();
        let before = machine(&url, "machine-a", &clock).await;
        call_carried_by(&before, "CA1", clock.now_ms()).await;
        call_carried_by(&before, "CA2", clock.now_ms()).await;
        before
            .apply(&[ended("caller_hung_up", "CA2", clock.now_ms())])
            .await
            .unwrap();
        let other = machine(&url, "machine-b", &clock).await;
        call_carried_by(&other, "CA3", clock.now_ms()).await;

        // Killed and started again under the same name, well within its lease.
        clock.advance(std::time::Duration::from_secs(2));
        let again = Store::connect_as(&url, MachineId::parse("machine-a").unwrap())
            .await
            .unwrap();
        assert_eq!(again.claim_machine(clock.now_ms()).await.unwrap(), 1);
        let lost = record(&again, "CA1").await;
        assert_eq!(
            (lost.end_reason.as_deref(), lost.ended_at_ms),
            (Some("lost"), Some(clock.now_ms())),
            "{url}"
        );
        assert_eq!(
            record(&again, "CA2").await.end_reason.as_deref(),
            Some("caller_hung_up")
        );
        assert_eq!(record(&again, "CA3").await.ended_at_ms, None, "{url}");
    }
}

#[tokio::test]
async fn a_machine_that_exits_records_its_live_calls_and_gives_up_its_lease() {
    for url in fresh_databases().await {
        let clock = ManualClock::default();
        let leaving = machine(&url, "machine-a", &clock).await;
        let staying = machine(&url, "machine-b", &clock).await;
        call_carried_by(&leaving, "CA1", clock.now_ms()).await;
        call_carried_by(&staying, "CA2", clock.now_ms()).await;
        assert_eq!(
            leaving
                .release_machine("shutdown", clock.now_ms())
                .await
                .unwrap(),
            1
        );
        let call = record(&staying, "CA1").await;
        assert_eq!(call.end_reason.as_deref(), Some("shutdown"), "{url}");
        assert_eq!(record(&staying, "CA2").await.ended_at_ms, None);
        // Its lease is gone at once: a call stamped with it later is swept without waiting.
        call_carried_by(&leaving, "CA3", clock.now_ms()).await;
        assert_eq!(keep_lease(&staying, &clock).await.unwrap(), 1, "{url}");
    }
}

#[tokio::test]
async fn a_caller_id_with_a_nul_is_stored_without_it() {
    for url in fresh_databases().await {
        let store = Store::connect(&url).await.unwrap();
        let call = NewCall {
            from: "whatsapp:+5511\u{0}999990000",
            ..new_call("CA1", now_ms())
        };
        store.record_call(&call).await.unwrap();
        let mut update = status("CA2", CallStatus::Ringing, 1, now_ms());
        update.to = "whatsapp:+55\u{0}8551234567".into();
        assert!(store.record_status(&update).await.unwrap(), "{url}");
        assert_eq!(record(&store, "CA1").await.from, "whatsapp:+5511999990000");
        assert_eq!(record(&store, "CA2").await.to, "whatsapp:+558551234567");
    }
}

/// Nothing listens on the port: the error comes at once and names the address, instead of the
/// pool's timeout after 10 s.
#[tokio::test]
async fn an_unreachable_postgres_fails_at_once_naming_its_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://callbridge:hunter2@127.0.0.1:{port}/callbridge");
    let started = std::time::Instant::now();
    let error = tokio::time::timeout(std::time::Duration::from_secs(3), Store::connect(&url))
        .await
        .expect("the connection error comes before the pool's timeout")
        .err()
        .expect("nothing listens there");
    let message = format!("{error:#}");
    assert!(
        message.contains(&format!("connection refused to 127.0.0.1:{port}")),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}

/// The dashboard's question: the calls live right now (stream started, not ended), newest
/// first, each with its barge-ins, tool calls and newest lines; on either database.
#[tokio::test]
async fn live_calls_are_the_started_unended_ones_with_their_counts_and_newest_lines() {
    for url in fresh_databases().await {
        let store = Store::connect(&url).await.unwrap();
        let started = |sid: &str, at_ms| Record::StreamStarted {
            call_sid: sid.into(),
            stream_sid: format!("MZ{sid}"),
            agent: "default".into(),
            at_ms,
        };
        let event = |sid: &str, kind: &'static str| Record::Event {
            call_sid: sid.into(),
            kind,
            name: "x".into(),
            detail: None,
            data: None,
            at_ms: 5,
        };
        for (sid, at) in [("CA1", 1), ("CA2", 2), ("CA3", 3), ("CA4", 4)] {
            store.record_call(&new_call(sid, at)).await.unwrap();
        }
        let mut records = vec![started("CA1", 1), started("CA2", 2), started("CA4", 4)];
        // CA3 was answered but its stream never started: not live.
        for n in 1..=10 {
            let speaker = if n % 2 == 0 {
                Speaker::Agent
            } else {
                Speaker::Caller
            };
            records.push(Record::Transcript {
                call_sid: "CA1".into(),
                line: line(n, speaker, &format!("line {n}")),
            });
        }
        records.extend([
            event("CA1", "barge_in"),
            event("CA1", "barge_in"),
            event("CA1", "tool_call"),
            event("CA1", "dtmf"),
            event("CA2", "tool_call"),
        ]);
        // CA4 has ended.
        records.push(ended("caller_hung_up", "CA4", 9));
        store.apply(&records).await.unwrap();

        let live = store.live_calls(50, 3).await.unwrap();
        assert_eq!(live.total, 2, "{url}");
        let sids: Vec<&str> = live
            .calls
            .iter()
            .map(|c| c.call.call_sid.as_str())
            .collect();
        assert_eq!(sids, ["CA2", "CA1"], "newest first ({url})");
        let (ca2, ca1) = (&live.calls[0], &live.calls[1]);
        assert_eq!((ca1.barge_ins, ca1.tool_calls), (2, 1), "{url}");
        assert_eq!((ca2.barge_ins, ca2.tool_calls), (0, 1), "{url}");
        let texts: Vec<&str> = ca1.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["line 8", "line 9", "line 10"], "{url}");
        assert_eq!(ca1.line_count, 10);
        assert!(ca2.lines.is_empty() && ca2.line_count == 0);

        // The newest one only, and the count of them all.
        let first = store.live_calls(1, 3).await.unwrap();
        assert_eq!((first.calls.len(), first.total), (1, 2));
        assert_eq!(first.calls[0].call.call_sid, "CA2");
    }
}

#[tokio::test]
async fn a_streams_end_closes_a_record_no_callback_closed_and_a_later_callback_still_counts() {
    for url in fresh_databases().await {
        let store = Store::connect(&url).await.unwrap();
        store
            .record_call(&new_call("CA70", now_ms()))
            .await
            .unwrap();
        store
            .apply(&[ended("caller_hung_up", "CA70", now_ms())])
            .await
            .unwrap();
        let call = record(&store, "CA70").await;
        assert_eq!(call.status, CallStatus::Completed, "{url}");
        assert!(call.ended_at_ms.is_some());
        // Twilio's own word, arriving later, still applies (its duration, say).
        store
            .record_status(&status("CA70", CallStatus::Completed, 3, now_ms()))
            .await
            .unwrap();
        assert_eq!(
            record(&store, "CA70").await.duration_secs,
            Some(42),
            "{url}"
        );

        // A transferred call goes on at Twilio: only a callback ends its record.
        store
            .record_call(&new_call("CA71", now_ms()))
            .await
            .unwrap();
        store
            .record_status(&status("CA71", CallStatus::InProgress, 1, now_ms()))
            .await
            .unwrap();
        store
            .apply(&[ended("transferred", "CA71", now_ms())])
            .await
            .unwrap();
        assert_eq!(
            record(&store, "CA71").await.status,
            CallStatus::InProgress,
            "{url}"
        );
    }
}

/// Whether the Postgres server has a database called `name`.
async fn postgres_has(admin: &mut sqlx::AnyConnection, name: &str) -> bool {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(admin)
        .await
        .unwrap();
    count > 0
}

#[tokio::test]
async fn a_fresh_database_is_gone_once_its_test_is_done_with_it() {
    use sqlx::Connection;
    for database in fresh_databases().await {
        // A pool still open when the test ends, as most tests leave theirs.
        let store = Store::connect(&database).await.unwrap();
        store.record_call(&new_call("CA1", now_ms())).await.unwrap();
        let url = database.to_string();
        drop(database);
        if let Some(file) = url.strip_prefix("sqlite://") {
            let file = std::path::Path::new(file.split('?').next().unwrap());
            let dir = file.parent().unwrap();
            assert!(!dir.exists(), "{} was left behind", dir.display());
        } else {
            let admin_url = std::env::var("CALLBRIDGE_TEST_POSTGRES_URL").unwrap();
            let mut admin = sqlx::AnyConnection::connect(&admin_url).await.unwrap();
            let name = url::Url::parse(&url).unwrap().path()[1..].to_owned();
            assert!(
                !postgres_has(&mut admin, &name).await,
                "{name} was left behind"
            );
        }
        drop(store);
    }
}

#[tokio::test]
async fn the_postgres_databases_of_a_run_that_died_are_dropped_by_the_next() {
    use sqlx::Connection;
    // The databases that `fresh_databases` makes need no more checks than it does.
    let Ok(admin_url) = std::env::var("CALLBRIDGE_TEST_POSTGRES_URL") else {
        return;
    };
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    sqlx::any::install_default_drivers();
    let mut admin = sqlx::AnyConnection::connect(&admin_url).await.unwrap();
    // No process has this id (Linux's are below 2^22); this process is alive.
    let dead = format!("{POSTGRES_PREFIX}{}_0", u32::MAX);
    let alive = format!("{POSTGRES_PREFIX}{}_alive", std::process::id());
    for name in [&dead, &alive] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name}"
        )))
        .execute(&mut admin)
        .await
        .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    drop_databases_of_dead_runs(&mut admin).await;
    assert!(!postgres_has(&mut admin, &dead).await, "{dead} was kept");
    let kept = postgres_has(&mut admin, &alive).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {alive}")))
        .execute(&mut admin)
        .await
        .unwrap();
    assert!(kept, "{alive} belongs to a running test and was dropped");
}
