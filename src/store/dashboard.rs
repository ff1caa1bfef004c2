//! What the dashboard reads: the calls live right now, on every machine that shares the
//! database, each with its counts and its newest transcript lines. The dashboard polls these
//! twice a second while someone watches, so each statement starts from the `calls_live` index,
//! which holds only the calls live now, and reaches their events and lines through the indexes
//! keyed by CallSid: the cost does not grow with the calls ever recorded.

use std::collections::HashMap;

use super::{CallRow, LineRow, Store};
use crate::store::models::{CallRecord, StoredLine};

/// A call is live from its media stream's start to its end. A call on a machine that died
/// stays live until another machine's sweep records it as lost (see `machines`).
macro_rules! live {
    () => {
        "stream_sid IS NOT NULL AND ended_at IS NULL"
    };
}

/// The events the dashboard counts per live call.
pub const BARGE_IN: &str = "barge_in";
pub const TOOL_CALL: &str = "tool_call";

/// One live call as the dashboard shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveCall {
    pub call: CallRecord,
    pub barge_ins: i64,
    pub tool_calls: i64,
    /// The newest lines, oldest first.
    pub lines: Vec<StoredLine>,
    /// All the call's lines, of which `lines` are the newest.
    pub line_count: i64,
}

/// The live calls, newest first, and how many there are in all.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LiveCalls {
    pub calls: Vec<LiveCall>,
    pub total: i64,
}

#[derive(sqlx::FromRow)]
struct CountRow {
    call_sid: String,
    kind: String,
    count: i64,
}

#[derive(sqlx::FromRow)]
struct NewestLineRow {
    call_sid: String,
    #[sqlx(flatten)]
    line: LineRow,
    line_count: i64,
}

impl Store {
    /// The newest `limit` live calls, each with its barge-in and tool-call counts and its
    /// newest `lines` transcript lines. Four statements on one connection; a call that starts
    /// or ends between them is shown as it stands at the next poll.
    pub async fn live_calls(&self, limit: i64, lines: i64) -> anyhow::Result<LiveCalls> {
        let mut conn = self.pool.acquire().await?;
        let total: i64 = sqlx::query_scalar(concat!("SELECT COUNT(*) FROM calls WHERE ", live!()))
            .fetch_one(&mut *conn)
            .await?;
        let rows = sqlx::query_as::<_, CallRow>(concat!(
            "SELECT ",
            call_columns!(),
            " FROM calls WHERE ",
            live!(),
            " ORDER BY created_at DESC, call_sid DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        if rows.is_empty() {
            return Ok(LiveCalls {
                calls: Vec::new(),
                total,
            });
        }
        let counts = sqlx::query_as::<_, CountRow>(concat!(
            "SELECT call_sid, kind, COUNT(*) AS count FROM call_events \
             WHERE call_sid IN (SELECT call_sid FROM calls WHERE ",
            live!(),
            ") AND kind IN ($1, $2) GROUP BY call_sid, kind"
        ))
        .bind(BARGE_IN)
        .bind(TOOL_CALL)
        .fetch_all(&mut *conn)
        .await?;
        let mut counted: HashMap<(String, String), i64> = counts
            .into_iter()
            .map(|row| ((row.call_sid, row.kind), row.count))
            .collect();
        let newest = sqlx::query_as::<_, NewestLineRow>(concat!(
            "SELECT call_sid, sequence, speaker, text, offset_ms, truncated, line_count FROM (\
             SELECT t.call_sid, t.sequence, t.speaker, t.text, t.offset_ms, t.truncated, \
             ROW_NUMBER() OVER (PARTITION BY t.call_sid ORDER BY t.sequence DESC) AS newest, \
             COUNT(*) OVER (PARTITION BY t.call_sid) AS line_count \
             FROM transcript_lines t WHERE t.call_sid IN (SELECT call_sid FROM calls WHERE ",
            live!(),
            ")) lines WHERE newest <= $1 ORDER BY call_sid, sequence"
        ))
        .bind(lines)
        .fetch_all(&mut *conn)
        .await?;
        let mut transcripts: HashMap<String, (Vec<StoredLine>, i64)> = HashMap::new();
        for row in newest {
            let entry = transcripts.entry(row.call_sid).or_default();
            entry.0.push(StoredLine::from(row.line));
            entry.1 = row.line_count;
        }
        let mut calls = Vec::with_capacity(rows.len());
        for row in rows {
            let call = row.into_record()?;
            let (lines, line_count) = transcripts.remove(&call.call_sid).unwrap_or_default();
            let mut count = |kind: &str| {
                counted
                    .remove(&(call.call_sid.clone(), kind.to_owned()))
                    .unwrap_or(0)
            };
            let (barge_ins, tool_calls) = (count(BARGE_IN), count(TOOL_CALL));
            calls.push(LiveCall {
                barge_ins,
                tool_calls,
                call,
                lines,
                line_count,
            });
        }
        Ok(LiveCalls { calls, total })
    }
}
