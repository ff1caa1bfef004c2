//! The events outbox: events for the business, written in the transaction of the change they
//! announce, and the delivery bookkeeping the worker (`events::worker`) and the API read.
//!
//! Delivery is claimed, not locked: a machine stamps the due events it takes with its id and a
//! lease (`claimed_by`, `claim_until`), sends them outside any transaction, and records each
//! outcome only while it still holds the claim. A machine that dies mid-delivery just lets its
//! lease run out; another then takes the events, which at worst sends one twice (delivery is at
//! least once, and the business deduplicates by the unchanged `webhook-id`).

use std::sync::Arc;

use serde::Serialize;
use sqlx::{AnyConnection, Row};
use tokio::sync::Notify;

use super::models::{EventCursor, EventDelivery};
use super::{Backend, Store, call_detail};
use crate::clock::rfc3339_millis;
use crate::events::{DeliveryStatus, EventType, PermissionChange};
use crate::webhooks::WebhookId;

/// The body of every event: `{"type","timestamp","data"}`, in that order.
#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: EventType,
    timestamp: String,
    data: &'a T,
}

/// `call_permission.updated`'s data.
#[derive(Serialize)]
struct PermissionData<'a> {
    to: &'a str,
    status: &'static str,
}

/// Writes one event on `conn` (a transaction's, so it commits or rolls back with its change):
/// its id and body are fixed now, and every attempt sends exactly these. `at_ms` is when the
/// change happened (the body's `timestamp`); `created_at_ms` starts the delivery window.
pub(super) async fn enqueue<T: Serialize>(
    conn: &mut AnyConnection,
    kind: EventType,
    at_ms: i64,
    created_at_ms: i64,
    data: &T,
) -> anyhow::Result<WebhookId> {
    let id = WebhookId::random();
    let body = serde_json::to_string(&Envelope {
        kind,
        timestamp: rfc3339_millis(at_ms),
        data,
    })?;
    sqlx::query(
        "INSERT INTO event_outbox (id, event_type, body, created_at, window_start, status, attempts, next_attempt_at) \
         VALUES ($1, $2, $3, $4, $4, 'pending', 0, $4)",
    )
    .bind(id.as_str())
    .bind(kind.as_str())
    .bind(body)
    .bind(created_at_ms)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// Writes `call.ended` for a call that just ended: its data is what `GET /calls/{sid}` returns,
/// read on `conn` after the change. Returns `false` for a call with no record.
pub(super) async fn enqueue_call_ended(
    conn: &mut AnyConnection,
    call_sid: &str,
    at_ms: i64,
) -> anyhow::Result<bool> {
    let Some(detail) = call_detail(conn, call_sid).await? else {
        return Ok(false);
    };
    enqueue(conn, EventType::CallEnded, at_ms, at_ms, &detail).await?;
    Ok(true)
}

/// An event a machine has claimed for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedEvent {
    /// As stored; `WebhookId::parse` checks it before it is sent.
    pub id: String,
    pub event_type: String,
    /// The exact bytes to send.
    pub body: String,
    /// Attempts made before this one (since the window started).
    pub attempts: i64,
    /// When the current delivery window began (the give-up deadline counts from here).
    pub window_start_ms: i64,
}

/// What one attempt came to, as `record_attempt` stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A 2xx answer.
    Delivered { status: u16 },
    /// 410 Gone: the business wants no more attempts.
    Stopped { status: u16 },
    /// Any other answer, or none: try again at `next_attempt_ms`.
    Retry {
        status: Option<u16>,
        error: String,
        next_attempt_ms: i64,
    },
    /// As `Retry`, but the delivery window is over.
    Failed { status: Option<u16>, error: String },
}

/// The SQL that claims due events. Postgres locks the rows it picks and skips rows another
/// machine's claim is locking, so two machines claiming at once take different events; SQLite
/// has a single writer, so the statement alone is atomic. The pick is a materialized CTE, not
/// an `IN (SELECT … LIMIT)`: Postgres may run such a subquery again for each row it updates,
/// and so claim more than the limit. The outer conditions repeat the inner ones, so only an
/// unclaimed (or lapsed), due, pending event is taken.
macro_rules! claim_sql {
    ($lock:literal) => {
        concat!(
            "WITH picked AS MATERIALIZED (SELECT id FROM event_outbox \
                 WHERE status = 'pending' AND next_attempt_at <= $3 \
                 AND (claim_until IS NULL OR claim_until <= $3) \
                 ORDER BY next_attempt_at, created_at LIMIT $4",
            $lock,
            ") UPDATE event_outbox SET claimed_by = $1, claim_until = $2 \
             WHERE id IN (SELECT id FROM picked) \
             AND status = 'pending' AND (claim_until IS NULL OR claim_until <= $3) \
             RETURNING id, event_type, body, attempts, window_start"
        )
    };
}

/// The columns `DeliveryRow` reads.
macro_rules! delivery_columns {
    () => {
        "id, event_type, status, attempts, created_at, next_attempt_at, last_error, last_status, \
         delivered_at"
    };
}

/// Newest first, ties broken by id (the cursor's order).
macro_rules! deliveries_sql {
    ($where:literal, $limit:literal) => {
        concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM event_outbox ",
            $where,
            " ORDER BY created_at DESC, id DESC LIMIT ",
            $limit
        )
    };
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: String,
    event_type: String,
    status: String,
    attempts: i64,
    created_at: i64,
    next_attempt_at: Option<i64>,
    last_error: Option<String>,
    last_status: Option<i64>,
    delivered_at: Option<i64>,
}

impl DeliveryRow {
    fn into_delivery(self) -> anyhow::Result<EventDelivery> {
        let status = DeliveryStatus::parse(&self.status)
            .ok_or_else(|| anyhow::anyhow!("event {} has an unknown stored status", self.id))?;
        Ok(EventDelivery {
            id: self.id,
            event_type: self.event_type,
            status,
            attempts: self.attempts,
            created_at_ms: self.created_at,
            next_attempt_at_ms: self.next_attempt_at,
            last_error: self.last_error,
            last_status: self.last_status.and_then(|s| u16::try_from(s).ok()),
            delivered_at_ms: self.delivered_at,
        })
    }
}

impl Store {
    /// From now on, changes write their events to the outbox (`CALLBRIDGE_EVENTS_URL` is
    /// set). Call it before the store is cloned: clones made earlier write none.
    pub fn enable_events(&mut self) {
        self.events.get_or_insert_with(|| Arc::new(Notify::new()));
    }

    pub fn events_enabled(&self) -> bool {
        self.events.is_some()
    }

    /// Notified after each commit of this store (or its clones) that wrote an event, so this
    /// machine's worker sends it at once instead of at its next poll.
    pub(crate) fn events_written(&self) -> Option<Arc<Notify>> {
        self.events.clone()
    }

    pub(super) fn wake_events(&self) {
        if let Some(events) = &self.events {
            events.notify_one();
        }
    }

    /// Writes `call_permission.updated` on `conn` if events are enabled; returns whether it did.
    pub(super) async fn announce_permission(
        &self,
        conn: &mut AnyConnection,
        user: &str,
        change: PermissionChange,
        at_ms: i64,
    ) -> anyhow::Result<bool> {
        if !self.events_enabled() {
            return Ok(false);
        }
        let data = PermissionData {
            to: user,
            status: change.as_str(),
        };
        enqueue(conn, EventType::CallPermissionUpdated, at_ms, at_ms, &data).await?;
        Ok(true)
    }

    /// Writes `call.ended` on `conn` for each call in `call_sids` if events are enabled (calls
    /// ended by a sweep, not by their bridge); returns how many it wrote.
    pub(super) async fn announce_calls_ended(
        &self,
        conn: &mut AnyConnection,
        call_sids: &[String],
        at_ms: i64,
    ) -> anyhow::Result<usize> {
        if !self.events_enabled() {
            return Ok(0);
        }
        let mut written = 0;
        for call_sid in call_sids {
            written += usize::from(enqueue_call_ended(conn, call_sid, at_ms).await?);
        }
        Ok(written)
    }

    /// Takes up to `limit` due events for this machine until `until_ms`.
    pub async fn claim_events(
        &self,
        now_ms: i64,
        until_ms: i64,
        limit: i64,
    ) -> anyhow::Result<Vec<ClaimedEvent>> {
        let sql = match self.backend {
            Backend::Postgres => claim_sql!(" FOR UPDATE SKIP LOCKED"),
            Backend::Sqlite => claim_sql!(""),
        };
        let rows = sqlx::query(sql)
            .bind(self.machine.as_str())
            .bind(until_ms)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(ClaimedEvent {
                    id: row.try_get(0)?,
                    event_type: row.try_get(1)?,
                    body: row.try_get(2)?,
                    attempts: row.try_get(3)?,
                    window_start_ms: row.try_get(4)?,
                })
            })
            .collect()
    }

    /// Records how an attempt at event `id` went and gives up the claim, but only if this
    /// machine still holds it: one whose lease ran out while it waited may have been taken
    /// over, and the new holder's bookkeeping stands. Returns whether it was recorded.
    pub async fn record_attempt(
        &self,
        id: &str,
        outcome: &AttemptOutcome,
        now_ms: i64,
    ) -> anyhow::Result<bool> {
        let (status, next_attempt_at, error, answered, delivered_at) = match outcome {
            AttemptOutcome::Delivered { status } => (
                DeliveryStatus::Delivered,
                None,
                None,
                Some(*status),
                Some(now_ms),
            ),
            AttemptOutcome::Stopped { status } => (
                DeliveryStatus::Stopped,
                None,
                Some("the business answered 410 Gone: no more attempts".to_owned()),
                Some(*status),
                None,
            ),
            AttemptOutcome::Retry {
                status,
                error,
                next_attempt_ms,
            } => (
                DeliveryStatus::Pending,
                Some(*next_attempt_ms),
                Some(error.clone()),
                *status,
                None,
            ),
            AttemptOutcome::Failed { status, error } => (
                DeliveryStatus::Failed,
                None,
                Some(error.clone()),
                *status,
                None,
            ),
        };
        let recorded = sqlx::query(
            "UPDATE event_outbox SET status = $1, attempts = attempts + 1, next_attempt_at = $2, \
             last_error = $3, last_status = $4, delivered_at = $5, claimed_by = NULL, claim_until = NULL \
             WHERE id = $6 AND claimed_by = $7 AND status = 'pending'",
        )
        .bind(status.as_str())
        .bind(next_attempt_at)
        .bind(error)
        .bind(answered.map(i64::from))
        .bind(delivered_at)
        .bind(id)
        .bind(self.machine.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(recorded == 1)
    }

    /// Gives up every claim this machine id holds. Only at the worker's start: whatever the id
    /// held then was held by a previous process under the same name, which is gone, so its
    /// events need not wait for the lease to run out.
    pub async fn release_event_claims(&self) -> anyhow::Result<u64> {
        let released = sqlx::query(
            "UPDATE event_outbox SET claimed_by = NULL, claim_until = NULL \
             WHERE claimed_by = $1 AND status = 'pending'",
        )
        .bind(self.machine.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(released)
    }

    /// Events waiting for delivery (due or not, claimed or not), across every machine.
    pub async fn count_pending_events(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM event_outbox WHERE status = 'pending'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Announces every grant that has expired since it was given (`call_permission.updated`,
    /// `expired`), once: each is marked announced in the same transaction, so of two machines
    /// sweeping at once only one announces it. Expiries older than `lookback_ms` are marked
    /// without an event: news that old (the server was down for days, or events were just
    /// turned on) would only flood the business. Returns how many were announced. Does
    /// nothing while events are disabled, so turning them on later announces recent expiries.
    pub async fn announce_expired_permissions(
        &self,
        now_ms: i64,
        lookback_ms: i64,
    ) -> anyhow::Result<u64> {
        if !self.events_enabled() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let expired = sqlx::query(
            "UPDATE call_permissions SET expiry_announced_at = $1 \
             WHERE state = 'granted' AND expires_at <= $1 AND expiry_announced_at IS NULL \
             RETURNING user_number, expires_at",
        )
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let mut announced = 0;
        for row in expired {
            let user: String = row.try_get(0)?;
            let expired_at: i64 = row.try_get(1)?;
            if expired_at <= now_ms.saturating_sub(lookback_ms) {
                continue;
            }
            let data = PermissionData {
                to: &user,
                status: PermissionChange::Expired.as_str(),
            };
            enqueue(
                &mut tx,
                EventType::CallPermissionUpdated,
                expired_at,
                now_ms,
                &data,
            )
            .await?;
            announced += 1;
        }
        tx.commit().await?;
        if announced > 0 {
            self.wake_events();
        }
        Ok(announced)
    }

    /// Deletes delivered events delivered before `before_ms`; failed and stopped ones stay until
    /// someone retries them. Returns how many it deleted.
    pub async fn purge_delivered_events(&self, before_ms: i64) -> anyhow::Result<u64> {
        let purged = sqlx::query(
            "DELETE FROM event_outbox WHERE status = 'delivered' AND delivered_at < $1",
        )
        .bind(before_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(purged)
    }

    /// Events newest first, all of them or those in `status`; `before` continues after the
    /// last event of the previous page.
    pub async fn list_event_deliveries(
        &self,
        status: Option<DeliveryStatus>,
        limit: i64,
        before: Option<&EventCursor>,
    ) -> anyhow::Result<Vec<EventDelivery>> {
        let query = match (status, before) {
            (None, None) => sqlx::query_as::<_, DeliveryRow>(deliveries_sql!("", "$1")).bind(limit),
            (Some(status), None) => {
                sqlx::query_as::<_, DeliveryRow>(deliveries_sql!("WHERE status = $2", "$1"))
                    .bind(limit)
                    .bind(status.as_str())
            }
            (None, Some(cursor)) => sqlx::query_as::<_, DeliveryRow>(deliveries_sql!(
                "WHERE (created_at < $2 OR (created_at = $2 AND id < $3))",
                "$1"
            ))
            .bind(limit)
            .bind(cursor.created_at_ms)
            .bind(&cursor.id),
            (Some(status), Some(cursor)) => sqlx::query_as::<_, DeliveryRow>(deliveries_sql!(
                "WHERE status = $4 AND (created_at < $2 OR (created_at = $2 AND id < $3))",
                "$1"
            ))
            .bind(limit)
            .bind(cursor.created_at_ms)
            .bind(&cursor.id)
            .bind(status.as_str()),
        };
        query
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(DeliveryRow::into_delivery)
            .collect()
    }

    /// Makes event `id` due now with a fresh delivery window, whatever became of it (failed,
    /// stopped by a 410, or still pending): same id, same body. A delivered event is left alone.
    /// An attempt in progress keeps its claim, so the event is still sent by one machine at a
    /// time. Returns `false` when there is no such event, or it was delivered.
    pub async fn retry_event(&self, id: &str, now_ms: i64) -> anyhow::Result<bool> {
        let retried = sqlx::query(
            "UPDATE event_outbox SET attempts = 0, window_start = $1, next_attempt_at = $1, \
             claimed_by = CASE WHEN status = 'pending' THEN claimed_by ELSE NULL END, \
             claim_until = CASE WHEN status = 'pending' THEN claim_until ELSE NULL END, \
             status = 'pending' \
             WHERE id = $2 AND status <> 'delivered'",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if retried == 1 {
            self.wake_events();
        }
        Ok(retried == 1)
    }
}
