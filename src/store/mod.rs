//! Durable records: calls, their events and transcripts, stream tokens and call permissions.
//!
//! One code path for both databases through sqlx's `Any` driver: SQLite embedded by default
//! (one machine), Postgres when several machines share state. The schema is portable (TEXT and
//! BIGINT only), so one migration folder serves both. Writes from the audio path go through
//! `writer::RecordWriter`, never straight here.

pub mod machines;
pub mod models;
pub mod outbox;
pub mod permissions;
pub mod writer;

use std::sync::{Arc, Once};
use std::time::Duration;

use anyhow::Context;
use sqlx::any::{AnyArguments, AnyPoolOptions};
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, AnyPool, Executor, Row};
use tokio::sync::Notify;

use crate::call::transcript::TranscriptLine;
use crate::events::EventType;
use crate::twilio::call::{CallProgress, CallStatus, Direction};
use machines::MachineId;
use models::{
    CallDetail, CallEvent, CallLatency, CallRecord, ListCursor, StatusUpdate, StoredLine,
    TokenUsage,
};

/// The columns `CallRow` reads, as a literal so queries stay static SQL.
macro_rules! call_columns {
    () => {
        "call_sid, stream_sid, direction, from_number, to_number, agent, status, created_at, \
         answered_at, ended_at, duration_secs, end_reason, openai_session_id, input_tokens, \
         output_tokens, total_tokens, input_text_tokens, input_audio_tokens, \
         input_cached_text_tokens, input_cached_audio_tokens, output_text_tokens, \
         output_audio_tokens, model, cost_micro_usd, openai_connect_ms, first_agent_audio_ms, \
         turns, turn_p50_ms, turn_max_ms"
    };
}

// After `call_columns!`, which it uses.
pub mod dashboard;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A call answered by `/voice`, before its stream starts.
#[derive(Debug, Clone)]
pub struct NewCall<'a> {
    pub call_sid: &'a str,
    pub direction: Option<Direction>,
    pub from: &'a str,
    pub to: &'a str,
    /// The agent routed to answer it.
    pub agent: &'a str,
    pub status: CallStatus,
    pub at_ms: i64,
}

/// Everything the bridge reports, in the order it happened; applied by the writer in batches.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    StreamStarted {
        call_sid: String,
        stream_sid: String,
        /// The agent the call was given.
        agent: String,
        at_ms: i64,
    },
    Transcript {
        call_sid: String,
        line: TranscriptLine,
    },
    /// The agent was cut off: the recorded line becomes what the caller heard.
    TranscriptCorrection {
        call_sid: String,
        sequence: u32,
        text: String,
        truncated: bool,
    },
    Event {
        call_sid: String,
        kind: &'static str,
        name: String,
        detail: Option<String>,
        /// Structured details (a tool call's latency and outcome), stored as JSON text.
        data: Option<serde_json::Value>,
        at_ms: i64,
    },
    CallEnded {
        call_sid: String,
        end_reason: &'static str,
        openai_session_id: Option<String>,
        /// Boxed: every transcript line travels as a `Record` too, and should not carry room
        /// for these.
        totals: Box<CallTotals>,
        at_ms: i64,
    },
}

/// What a call used and how long its caller waited, stored with its end.
#[derive(Debug, Clone, PartialEq)]
pub struct CallTotals {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    pub usage: TokenUsage,
    pub model: String,
    pub cost_micro_usd: Option<i64>,
    pub latency: CallLatency,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Stamped on the calls whose streams this process carries (see `machines`).
    machine: MachineId,
    backend: Backend,
    /// Set when events are delivered to the business (`enable_events`): changes then write
    /// their events to the outbox, and this wakes this machine's delivery worker after each
    /// commit that wrote one.
    events: Option<Arc<Notify>>,
}

/// A `calls` row as `call_columns!` selects it.
#[derive(sqlx::FromRow)]
struct CallRow {
    call_sid: String,
    stream_sid: Option<String>,
    direction: String,
    from_number: String,
    to_number: String,
    agent: Option<String>,
    status: String,
    created_at: i64,
    answered_at: Option<i64>,
    ended_at: Option<i64>,
    duration_secs: Option<i64>,
    end_reason: Option<String>,
    openai_session_id: Option<String>,
    input_tokens: i64,
    output_tokens: i64,
    total_tokens: i64,
    input_text_tokens: i64,
    input_audio_tokens: i64,
    input_cached_text_tokens: i64,
    input_cached_audio_tokens: i64,
    output_text_tokens: i64,
    output_audio_tokens: i64,
    model: Option<String>,
    cost_micro_usd: Option<i64>,
    openai_connect_ms: Option<i64>,
    first_agent_audio_ms: Option<i64>,
    turns: i64,
    turn_p50_ms: Option<i64>,
    turn_max_ms: Option<i64>,
}

impl CallRow {
    /// Only this code writes the status and direction, from parsed values; text that is neither
    /// names the call, so the row can be found and mended.
    fn into_record(self) -> anyhow::Result<CallRecord> {
        let call_sid = self.call_sid;
        let status = self
            .status
            .parse()
            .with_context(|| format!("call {call_sid} has an unknown stored status"))?;
        let direction = match self.direction.as_str() {
            UNKNOWN_DIRECTION => None,
            text => Some(
                text.parse()
                    .with_context(|| format!("call {call_sid} has an unknown stored direction"))?,
            ),
        };
        Ok(CallRecord {
            call_sid,
            stream_sid: self.stream_sid,
            direction,
            from: self.from_number,
            to: self.to_number,
            agent: self.agent,
            status,
            created_at_ms: self.created_at,
            answered_at_ms: self.answered_at,
            ended_at_ms: self.ended_at,
            duration_secs: self.duration_secs,
            end_reason: self.end_reason,
            openai_session_id: self.openai_session_id,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            total_tokens: self.total_tokens,
            usage: TokenUsage {
                input_text_tokens: self.input_text_tokens,
                input_audio_tokens: self.input_audio_tokens,
                input_cached_text_tokens: self.input_cached_text_tokens,
                input_cached_audio_tokens: self.input_cached_audio_tokens,
                output_text_tokens: self.output_text_tokens,
                output_audio_tokens: self.output_audio_tokens,
            },
            model: self.model,
            cost_usd: self.cost_micro_usd,
            latency: CallLatency {
                openai_connect_ms: self.openai_connect_ms,
                first_agent_audio_ms: self.first_agent_audio_ms,
                turns: self.turns,
                turn_p50_ms: self.turn_p50_ms,
                turn_max_ms: self.turn_max_ms,
            },
        })
    }
}

/// A `call_events` row; `data` is JSON text, written only by this code.
#[derive(sqlx::FromRow)]
struct EventRow {
    kind: String,
    name: String,
    sequence_number: Option<i64>,
    detail: Option<String>,
    data: Option<String>,
    at: i64,
}

impl From<EventRow> for CallEvent {
    fn from(row: EventRow) -> Self {
        Self {
            kind: row.kind,
            name: row.name,
            sequence_number: row.sequence_number,
            detail: row.detail,
            data: row.data.and_then(|text| serde_json::from_str(&text).ok()),
            at_ms: row.at,
        }
    }
}

/// A `transcript_lines` row: `truncated` is stored as 0 or 1 (the schema has no boolean type
/// both databases share, and sqlx's `Any` decodes a `bool` from a real boolean only).
#[derive(sqlx::FromRow)]
struct LineRow {
    sequence: i64,
    speaker: String,
    text: String,
    offset_ms: i64,
    truncated: i64,
}

impl From<LineRow> for StoredLine {
    fn from(row: LineRow) -> Self {
        Self {
            sequence: row.sequence,
            speaker: row.speaker,
            text: row.text,
            offset_ms: row.offset_ms,
            truncated: row.truncated != 0,
        }
    }
}

/// What `calls.direction` holds while no webhook has said (the column's default).
const UNKNOWN_DIRECTION: &str = "";

fn stored_direction(direction: Option<Direction>) -> &'static str {
    direction.map_or(UNKNOWN_DIRECTION, Direction::as_str)
}

fn random_id() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    /// Opens the database named by `DATABASE_URL` and brings its schema up to date. Safe to run
    /// from several machines at once: sqlx serialises migrations with a database lock. The
    /// store speaks for a machine of its own, with a random id.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Self::connect_as(url, MachineId::random()).await
    }

    /// As `connect`, for the machine `machine`: the calls whose streams start through this store
    /// are recorded as carried by it.
    pub async fn connect_as(url: &str, machine: MachineId) -> anyhow::Result<Self> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        if backend == Backend::Postgres {
            first_connection(url).await?;
        }
        let options = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 10 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers (the API) run beside the writer, and a commit survives
                        // the process being killed.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            });
        let pool = options
            .connect(url)
            .await
            .with_context(|| format!("cannot open the database ({})", redact_url(url)))?;
        migrate(&pool).await?;
        Ok(Self {
            pool,
            machine,
            backend,
            events: None,
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Binds `candidate` to the call unless the call already has an unexpired token, and
    /// returns the call's token either way: Twilio retrying `/voice` (or anyone replaying it)
    /// gets the same single-use token, never a second one.
    pub async fn issue_stream_token(
        &self,
        candidate: &str,
        call_sid: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> anyhow::Result<String> {
        sqlx::query(
            "INSERT INTO stream_tokens (token, call_sid, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (call_sid) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at \
             WHERE stream_tokens.expires_at <= $4",
        )
        .bind(candidate)
        .bind(call_sid)
        .bind(expires_at_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT token FROM stream_tokens WHERE call_sid = $1")
            .bind(call_sid)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Whether the call's media stream has already started, or the call has ended: either way
    /// no new stream may be opened for it.
    pub async fn stream_started_or_ended(&self, call_sid: &str) -> anyhow::Result<bool> {
        let row = sqlx::query(
            "SELECT 1 FROM calls WHERE call_sid = $1 AND (stream_sid IS NOT NULL OR status_rank = $2)",
        )
        .bind(call_sid)
        .bind(CallProgress::Ended.rank())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Removes the token and returns what it was bound to: `(call_sid, expires_at_ms)`. Atomic,
    /// so a token can be redeemed once even when two machines race for it.
    pub async fn take_stream_token(&self, token: &str) -> anyhow::Result<Option<(String, i64)>> {
        let row = sqlx::query(
            "DELETE FROM stream_tokens WHERE token = $1 RETURNING call_sid, expires_at",
        )
        .bind(token)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| (row.get::<String, _>(0), row.get::<i64, _>(1))))
    }

    pub async fn purge_expired_tokens(&self, now_ms: i64) -> anyhow::Result<u64> {
        let done = sqlx::query("DELETE FROM stream_tokens WHERE expires_at <= $1")
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Creates the call's row when `/voice` answers it (or fills in what an earlier status
    /// callback could not know).
    pub async fn record_call(&self, call: &NewCall<'_>) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO calls (call_sid, direction, from_number, to_number, status, status_rank, created_at, agent) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (call_sid) DO UPDATE SET direction = $2, agent = COALESCE(calls.agent, $8), \
             from_number = CASE WHEN calls.from_number = '' THEN $3 ELSE calls.from_number END, \
             to_number = CASE WHEN calls.to_number = '' THEN $4 ELSE calls.to_number END",
        )
        .bind(call.call_sid)
        .bind(stored_direction(call.direction))
        .bind(storable(call.from).into_owned())
        .bind(storable(call.to).into_owned())
        .bind(call.status.as_str())
        .bind(call.status.progress().rank())
        .bind(call.at_ms)
        .bind(call.agent)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Applies a status callback. Returns `false` for a retry of one already stored (same
    /// `SequenceNumber`). A late callback is stored as an event but never moves the call back.
    pub async fn record_status(&self, update: &StatusUpdate) -> anyhow::Result<bool> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO call_events (id, call_sid, kind, name, sequence_number, detail, at) \
             VALUES ($1, $2, 'status', $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(random_id())
        .bind(&update.call_sid)
        .bind(update.status.as_str())
        .bind(update.sequence_number)
        .bind(update.duration_secs.map(|d| format!("duration {d}s")))
        .bind(update.at_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !inserted {
            tx.rollback().await?;
            return Ok(false);
        }
        let progress = update.status.progress();
        let sequence = update.sequence_number.unwrap_or(0);
        sqlx::query(
            "INSERT INTO calls (call_sid, direction, from_number, to_number, status, status_rank, status_sequence, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (call_sid) DO NOTHING",
        )
        .bind(&update.call_sid)
        .bind(stored_direction(update.direction))
        .bind(storable(&update.from).into_owned())
        .bind(storable(&update.to).into_owned())
        .bind(update.status.as_str())
        .bind(progress.rank())
        .bind(sequence)
        .bind(update.at_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE calls SET status = $1, status_rank = $2, status_sequence = $3, \
             answered_at = CASE WHEN $4 = 1 AND answered_at IS NULL THEN $5 ELSE answered_at END, \
             ended_at = CASE WHEN $6 = 1 THEN COALESCE(ended_at, $5) ELSE ended_at END, \
             duration_secs = COALESCE($7, duration_secs) \
             WHERE call_sid = $8 AND (status_rank < $2 OR (status_rank = $2 AND status_sequence <= $3))",
        )
        .bind(update.status.as_str())
        .bind(progress.rank())
        .bind(sequence)
        .bind(i64::from(progress == CallProgress::Answered))
        .bind(update.at_ms)
        .bind(i64::from(progress == CallProgress::Ended))
        .bind(update.duration_secs)
        .bind(&update.call_sid)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Applies the bridge's records in one transaction: one commit per batch keeps SQLite's
    /// fsyncs to a few per second however many calls are live. With events enabled, a stream's
    /// start and a call's end write their events in the same transaction, so they exist exactly
    /// when the change does.
    pub async fn apply(&self, records: &[Record]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let mut announced = false;
        for record in records {
            record_query(record, &self.machine)
                .execute(&mut *tx)
                .await?;
            announced |= self.announce_record(&mut tx, record).await?;
        }
        tx.commit().await?;
        if announced {
            self.wake_events();
        }
        Ok(())
    }

    /// The event a record announces, written to the outbox: `call.started` with the call as
    /// it now stands, `call.ended` with the whole call as `GET /calls/{sid}` shows it (the
    /// core records the last transcript lines and corrections before the end, in the same
    /// batch or an earlier one). Returns whether an event was written.
    async fn announce_record(
        &self,
        conn: &mut AnyConnection,
        record: &Record,
    ) -> anyhow::Result<bool> {
        if !self.events_enabled() {
            return Ok(false);
        }
        match record {
            Record::StreamStarted {
                call_sid, at_ms, ..
            } => {
                let Some(call) = call_record(conn, call_sid).await? else {
                    return Ok(false);
                };
                outbox::enqueue(conn, EventType::CallStarted, *at_ms, *at_ms, &call).await?;
                Ok(true)
            }
            Record::CallEnded {
                call_sid, at_ms, ..
            } => outbox::enqueue_call_ended(conn, call_sid, *at_ms).await,
            Record::Transcript { .. }
            | Record::TranscriptCorrection { .. }
            | Record::Event { .. } => Ok(false),
        }
    }

    /// The call, its events and its transcript, as `GET /calls/{sid}` shows them.
    pub async fn call(&self, call_sid: &str) -> anyhow::Result<Option<CallDetail>> {
        let mut conn = self.pool.acquire().await?;
        call_detail(&mut conn, call_sid).await
    }

    /// Newest first; `before` continues after the last call of the previous page.
    pub async fn list_calls(
        &self,
        limit: i64,
        before: Option<&ListCursor>,
    ) -> anyhow::Result<Vec<CallRecord>> {
        let rows = match before {
            Some(cursor) => {
                sqlx::query_as::<_, CallRow>(concat!(
                    "SELECT ",
                    call_columns!(),
                    " FROM calls WHERE created_at < $1 OR (created_at = $1 AND call_sid < $2) \
                     ORDER BY created_at DESC, call_sid DESC LIMIT $3"
                ))
                .bind(cursor.created_at_ms)
                .bind(&cursor.call_sid)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as::<_, CallRow>(concat!(
                    "SELECT ",
                    call_columns!(),
                    " FROM calls ORDER BY created_at DESC, call_sid DESC LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.into_iter().map(CallRow::into_record).collect()
    }
}

/// The statement that applies one record.
fn record_query<'q>(record: &'q Record, machine: &'q MachineId) -> Query<'q, Any, AnyArguments> {
    match record {
        Record::StreamStarted {
            call_sid,
            stream_sid,
            agent,
            at_ms,
        } => sqlx::query(
            "UPDATE calls SET stream_sid = $1, answered_at = COALESCE(answered_at, $2), machine_id = $3, \
             agent = $4 WHERE call_sid = $5",
        )
        .bind(stream_sid)
        .bind(*at_ms)
        .bind(machine.as_str())
        .bind(agent)
        .bind(call_sid),
        Record::Transcript { call_sid, line } => sqlx::query(
            "INSERT INTO transcript_lines (call_sid, sequence, speaker, text, offset_ms, truncated) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(call_sid)
        .bind(i64::from(line.sequence))
        .bind(line.speaker.as_str())
        .bind(storable(&line.text).into_owned())
        .bind(i64::try_from(line.offset_ms).unwrap_or(i64::MAX))
        .bind(i64::from(line.truncated)),
        Record::TranscriptCorrection {
            call_sid,
            sequence,
            text,
            truncated,
        } => sqlx::query(
            "UPDATE transcript_lines SET text = $1, truncated = $2 WHERE call_sid = $3 AND sequence = $4",
        )
        .bind(storable(text).into_owned())
        .bind(i64::from(*truncated))
        .bind(call_sid)
        .bind(i64::from(*sequence)),
        Record::Event {
            call_sid,
            kind,
            name,
            detail,
            data,
            at_ms,
        } => sqlx::query(
            "INSERT INTO call_events (id, call_sid, kind, name, detail, data, at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(random_id())
        .bind(call_sid)
        .bind(*kind)
        .bind(storable(name).into_owned())
        .bind(detail.as_deref().map(|d| storable(d).into_owned()))
        .bind(data.as_ref().map(|d| storable(&d.to_string()).into_owned()))
        .bind(*at_ms),
        Record::CallEnded {
            call_sid,
            end_reason,
            openai_session_id,
            totals,
            at_ms,
        } => call_ended_query(call_sid, end_reason, openai_session_id.as_deref(), totals, *at_ms),
    }
}

fn call_ended_query<'q>(
    call_sid: &'q str,
    end_reason: &'q str,
    openai_session_id: Option<&'q str>,
    totals: &'q CallTotals,
    at_ms: i64,
) -> Query<'q, Any, AnyArguments> {
    let CallTotals {
        input_tokens,
        output_tokens,
        total_tokens,
        usage,
        model,
        cost_micro_usd,
        latency,
    } = totals;
    sqlx::query(
            // A call swept as lost whose machine was only slow, not dead, gets its true
            // end after all.
            "UPDATE calls SET end_reason = $1, openai_session_id = COALESCE($2, openai_session_id), \
             input_tokens = $3, output_tokens = $4, total_tokens = $5, \
             ended_at = CASE WHEN end_reason = $8 THEN $6 ELSE COALESCE(ended_at, $6) END, \
             input_text_tokens = $9, input_audio_tokens = $10, input_cached_text_tokens = $11, \
             input_cached_audio_tokens = $12, output_text_tokens = $13, output_audio_tokens = $14, \
             model = $15, cost_micro_usd = $16, openai_connect_ms = $17, \
             first_agent_audio_ms = $18, turns = $19, turn_p50_ms = $20, turn_max_ms = $21, \
             status = CASE WHEN status_rank < $22 AND $1 <> $23 THEN $24 ELSE status END, \
             status_sequence = CASE WHEN status_rank < $22 AND $1 <> $23 THEN -1 ELSE status_sequence END, \
             status_rank = CASE WHEN status_rank < $22 AND $1 <> $23 THEN $22 ELSE status_rank END \
             WHERE call_sid = $7",
        )
        .bind(end_reason)
        .bind(openai_session_id)
        .bind(*input_tokens)
        .bind(*output_tokens)
        .bind(*total_tokens)
        .bind(at_ms)
        .bind(call_sid)
        .bind(machines::END_REASON_LOST)
        .bind(usage.input_text_tokens)
        .bind(usage.input_audio_tokens)
        .bind(usage.input_cached_text_tokens)
        .bind(usage.input_cached_audio_tokens)
        .bind(usage.output_text_tokens)
        .bind(usage.output_audio_tokens)
        .bind(model)
        .bind(*cost_micro_usd)
        .bind(latency.openai_connect_ms)
        .bind(latency.first_agent_audio_ms)
        .bind(latency.turns)
        .bind(latency.turn_p50_ms)
        .bind(latency.turn_max_ms)
        // Without a status callback nothing else would close the record: the stream's end
        // does, as `completed` ranked below any callback Twilio may still send (sequence -1).
        // A transferred call goes on at Twilio, so only a callback can end it.
        .bind(CallProgress::Ended.rank())
        .bind(crate::metrics::EndReason::Transferred.label())
        .bind(CallStatus::Completed.as_str())
}

/// The call's record, read on `conn`: the pool's, or a transaction's (which then sees its
/// own changes).
async fn call_record(
    conn: &mut AnyConnection,
    call_sid: &str,
) -> anyhow::Result<Option<CallRecord>> {
    sqlx::query_as::<_, CallRow>(concat!(
        "SELECT ",
        call_columns!(),
        " FROM calls WHERE call_sid = $1"
    ))
    .bind(call_sid)
    .fetch_optional(&mut *conn)
    .await?
    .map(CallRow::into_record)
    .transpose()
}

/// What `Store::call` returns, read on `conn` (see `call_record`).
async fn call_detail(
    conn: &mut AnyConnection,
    call_sid: &str,
) -> anyhow::Result<Option<CallDetail>> {
    let Some(call) = call_record(conn, call_sid).await? else {
        return Ok(None);
    };
    let mut events: Vec<CallEvent> = sqlx::query_as::<_, EventRow>(
        "SELECT kind, name, sequence_number, detail, data, at FROM call_events WHERE call_sid = $1 \
         ORDER BY at, COALESCE(sequence_number, 0), id",
    )
    .bind(call_sid)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(CallEvent::from)
    .collect();
    order_status_events(&mut events);
    let transcript = sqlx::query_as::<_, LineRow>(
        "SELECT sequence, speaker, text, offset_ms, truncated FROM transcript_lines \
         WHERE call_sid = $1 ORDER BY sequence",
    )
    .bind(call_sid)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(StoredLine::from)
    .collect();
    Ok(Some(CallDetail {
        call,
        events,
        transcript,
    }))
}

/// Status callbacks can arrive out of order; Twilio's `SequenceNumber` is their true order. They
/// keep the places they arrived in among the other events and are re-ordered among themselves.
fn order_status_events(events: &mut [CallEvent]) {
    let mut statuses: Vec<CallEvent> = events
        .iter()
        .filter(|e| e.kind == "status")
        .cloned()
        .collect();
    statuses.sort_by_key(|e| e.sequence_number);
    let slots = events.iter_mut().filter(|e| e.kind == "status");
    for (slot, status) in slots.zip(statuses) {
        *slot = status;
    }
}

/// Postgres refuses NUL in TEXT (SQLite stores it), and one such line would fail a whole batch
/// (or a caller ID with one, the call's record); the character carries no meaning in a
/// transcript or a number, so it is dropped.
fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', ""))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// Postgres serialises concurrent migrators with an advisory lock; SQLite has no such lock, so
/// a second process starting at the same moment may lose the race once. Its migration is rolled
/// back, and on retry it finds the schema in place.
async fn migrate(pool: &AnyPool) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        match MIGRATOR.run(pool).await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < 3 => {
                attempt += 1;
                tracing::debug!(%error, attempt, "migration raced another instance; retrying");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(error) => return Err(error).context("cannot apply the database migrations"),
        }
    }
}

/// The URL without its password, for error messages.
/// One connection to Postgres before the pool is built: the pool retries a refused connection
/// until its 10 s acquire timeout and then reports only the timeout, while one attempt fails at
/// once with the reason (nothing listening, a bad password, no such database).
async fn first_connection(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    match AnyConnection::connect(url).await {
        Ok(conn) => {
            let _ = conn.close().await;
            Ok(())
        }
        Err(sqlx::Error::Io(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            let address = url::Url::parse(url)
                .ok()
                .and_then(|parsed| {
                    let host = parsed.host_str()?.to_owned();
                    Some(format!("{host}:{}", parsed.port().unwrap_or(5432)))
                })
                .unwrap_or_else(|| redact_url(url));
            anyhow::bail!(
                "cannot open the database ({}): connection refused to {address}; is Postgres running and listening there?",
                redact_url(url)
            )
        }
        Err(error) => Err(anyhow::Error::new(error)
            .context(format!("cannot open the database ({})", redact_url(url)))),
    }
}

fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
