//! Call permissions and outbound calls: the compliance record Meta's rules are checked against.

use anyhow::Context;
use sqlx::Row;

use super::Store;
use crate::call::agent::Variables;
pub use crate::consent::Reply;
use crate::consent::{
    self, GRANT_VALIDITY_MS, IgnoredReply, Permission, PermissionState, REQUEST_SPACING_MS,
    ReplyEffect, SentRequest, UNANSWERED_CALLS_BEFORE_REVOCATION,
};
use crate::events::PermissionChange;
use crate::twilio::call::{CallProgress, CallStatus, Direction};

/// What became of a permission reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// A `MessageSid` seen before (Twilio retrying, or someone replaying it): nothing changes.
    Repeated,
    /// A reply seen for the first time, and what it did.
    New(ReplyEffect),
}

/// Closes every request of the user still open: an answer, a revocation or a newer request
/// means none of them may grant anything any more.
const CLOSE_OPEN_REQUESTS: &str = "UPDATE permission_requests SET closed_at = $2 \
     WHERE user_number = $1 AND closed_at IS NULL";

/// An outbound call as `POST /calls` placed it.
#[derive(Debug, Clone)]
pub struct OutboundCall<'a> {
    pub call_sid: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub agent: Option<&'a str>,
    pub context: Option<&'a str>,
    /// `{{name}}` values for the agent's prompt and greeting.
    pub variables: &'a Variables,
    pub status: CallStatus,
    pub at_ms: i64,
}

/// A `call_permissions` row, as `permission` reads it.
#[derive(sqlx::FromRow)]
struct PermissionRow {
    state: String,
    answered_at: Option<i64>,
    expires_at: Option<i64>,
    consecutive_unanswered: i64,
}

/// The request a reply answers.
#[derive(sqlx::FromRow)]
struct RequestRow {
    message_sid: String,
    requested_at: i64,
    /// `None` while the request is open.
    closed_at: Option<i64>,
}

/// What `POST /calls` gave an outbound call.
#[derive(sqlx::FromRow)]
struct BriefRow {
    context: Option<String>,
    /// A JSON object of strings, written only by `record_outbound_call`.
    variables: Option<String>,
}

impl Store {
    pub async fn permission(&self, user: &str) -> anyhow::Result<Option<Permission>> {
        let row = sqlx::query_as::<_, PermissionRow>(
            "SELECT state, answered_at, expires_at, consecutive_unanswered FROM call_permissions \
             WHERE user_number = $1",
        )
        .bind(user)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(Permission {
            state: PermissionState::parse(&row.state)
                .ok_or_else(|| anyhow::anyhow!("unknown permission state {:?}", row.state))?,
            answered_at_ms: row.answered_at,
            expires_at_ms: row.expires_at,
            consecutive_unanswered: row.consecutive_unanswered,
        }))
    }

    pub async fn permission_requests_since(
        &self,
        user: &str,
        since_ms: i64,
    ) -> anyhow::Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT requested_at FROM permission_requests WHERE user_number = $1 AND requested_at > $2",
        )
        .bind(user)
        .bind(since_ms)
        .fetch_all(self.pool())
        .await?)
    }

    /// Takes this user's one request of the day, atomically: of two requests racing (even on
    /// two machines) only one gets `true`. Call `release_permission_request` if sending fails.
    pub async fn claim_permission_request(&self, user: &str, at_ms: i64) -> anyhow::Result<bool> {
        let claimed = sqlx::query(
            "INSERT INTO call_permissions (user_number, state, requested_at, updated_at) \
             VALUES ($1, 'pending', $2, $2) \
             ON CONFLICT (user_number) DO UPDATE SET requested_at = $2, updated_at = $2 \
             WHERE call_permissions.requested_at IS NULL OR call_permissions.requested_at <= $3",
        )
        .bind(user)
        .bind(at_ms)
        .bind(at_ms - REQUEST_SPACING_MS)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(claimed == 1)
    }

    /// Gives back a claim whose message could not be sent, so it does not count.
    pub async fn release_permission_request(
        &self,
        user: &str,
        claimed_at_ms: i64,
        previous_request_ms: Option<i64>,
    ) -> anyhow::Result<()> {
        let query = match previous_request_ms {
            Some(previous) => sqlx::query(
                "UPDATE call_permissions SET requested_at = $3 WHERE user_number = $1 AND requested_at = $2",
            )
            .bind(user)
            .bind(claimed_at_ms)
            .bind(previous),
            // The claim created the row: remove it, unless the user has answered since.
            None => sqlx::query(
                "DELETE FROM call_permissions WHERE user_number = $1 AND requested_at = $2 AND answered_at IS NULL",
            )
            .bind(user)
            .bind(claimed_at_ms),
        };
        query.execute(self.pool()).await?;
        Ok(())
    }

    /// The claimed request was sent; it replaces any earlier request still open. A user with a
    /// valid grant keeps it until they answer again.
    pub async fn record_permission_request(
        &self,
        user: &str,
        message_sid: &str,
        at_ms: i64,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(CLOSE_OPEN_REQUESTS)
            .bind(user)
            .bind(at_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO permission_requests (message_sid, user_number, requested_at) VALUES ($1, $2, $3)")
            .bind(message_sid)
            .bind(user)
            .bind(at_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE call_permissions SET request_message_sid = $2, updated_at = $3, \
             state = CASE WHEN state = 'granted' AND expires_at > $3 THEN state ELSE 'pending' END \
             WHERE user_number = $1",
        )
        .bind(user)
        .bind(message_sid)
        .bind(at_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// When this user's last request was sent, if ever.
    pub async fn last_permission_request(&self, user: &str) -> anyhow::Result<Option<i64>> {
        let requested_at: Option<Option<i64>> =
            sqlx::query_scalar("SELECT requested_at FROM call_permissions WHERE user_number = $1")
                .bind(user)
                .fetch_optional(self.pool())
                .await?;
        Ok(requested_at.flatten())
    }

    /// Records the user's button press and applies it by Meta's rules (`consent::reply_effect`).
    /// `replied_to` is the message Twilio says was answered (`OriginalRepliedMessageSid`); without
    /// it the reply answers the user's latest request. Every reply's `MessageSid` is kept, even
    /// one that changes nothing, so that no replay of it can count later.
    pub async fn record_permission_reply(
        &self,
        user: &str,
        message_sid: &str,
        replied_to: Option<&str>,
        reply: Reply,
        at_ms: i64,
    ) -> anyhow::Result<ReplyOutcome> {
        let mut tx = self.pool().begin().await?;
        let new = sqlx::query(
            "INSERT INTO permission_replies (message_sid, user_number, payload, received_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(message_sid)
        .bind(user)
        .bind(reply.as_str())
        .bind(at_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !new {
            tx.rollback().await?;
            return Ok(ReplyOutcome::Repeated);
        }
        let answered = match replied_to {
            Some(request_sid) => sqlx::query_as::<_, RequestRow>(
                "SELECT message_sid, requested_at, closed_at FROM permission_requests \
                 WHERE message_sid = $1 AND user_number = $2",
            )
            .bind(request_sid)
            .bind(user),
            None => sqlx::query_as::<_, RequestRow>(
                "SELECT message_sid, requested_at, closed_at FROM permission_requests \
                 WHERE user_number = $1 ORDER BY requested_at DESC LIMIT 1",
            )
            .bind(user),
        }
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| {
            let request = SentRequest {
                sent_at_ms: row.requested_at,
                open: row.closed_at.is_none(),
            };
            (row.message_sid, request)
        });
        let mut effect =
            consent::reply_effect(reply, answered.as_ref().map(|(_, request)| request), at_ms);
        if let (ReplyEffect::Grant, Some((request_sid, _))) = (effect, &answered) {
            // Only one answer may take an open request: of two racing acceptances (or an
            // acceptance racing a rejection), the one that closes it first wins.
            let took_it = sqlx::query(
                "UPDATE permission_requests SET closed_at = $2 \
                 WHERE message_sid = $1 AND closed_at IS NULL",
            )
            .bind(request_sid)
            .bind(at_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !took_it {
                effect = ReplyEffect::Ignore(IgnoredReply::RequestClosed);
            }
        }
        let (state, expires_at, change) = match effect {
            ReplyEffect::Grant => (
                PermissionState::Granted,
                Some(at_ms + GRANT_VALIDITY_MS),
                PermissionChange::Granted,
            ),
            ReplyEffect::Reject => (PermissionState::Rejected, None, PermissionChange::Rejected),
            ReplyEffect::Ignore(_) => {
                tx.commit().await?;
                return Ok(ReplyOutcome::New(effect));
            }
        };
        sqlx::query(CLOSE_OPEN_REQUESTS)
            .bind(user)
            .bind(at_ms)
            .execute(&mut *tx)
            .await?;
        // A new grant's expiry is news again: it is announced once it comes.
        sqlx::query(
            "INSERT INTO call_permissions (user_number, state, answered_at, expires_at, reply_message_sid, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $3) \
             ON CONFLICT (user_number) DO UPDATE SET state = $2, answered_at = $3, expires_at = $4, \
             reply_message_sid = $5, consecutive_unanswered = 0, updated_at = $3, expiry_announced_at = NULL",
        )
        .bind(user)
        .bind(state.as_str())
        .bind(at_ms)
        .bind(expires_at)
        .bind(message_sid)
        .execute(&mut *tx)
        .await?;
        let announced = self
            .announce_permission(&mut tx, user, change, at_ms)
            .await?;
        tx.commit().await?;
        if announced {
            self.wake_events();
        }
        Ok(ReplyOutcome::New(effect))
    }

    /// WhatsApp no longer lets us call this user. Requests sent before now can no longer grant:
    /// only an acceptance of a new request gives the permission back.
    /// A permission already revoked stays as it is, and is not announced again.
    pub async fn revoke_permission(&self, user: &str, at_ms: i64) -> anyhow::Result<()> {
        let mut tx = self.pool().begin().await?;
        let revoked = sqlx::query(
            "UPDATE call_permissions SET state = 'revoked', updated_at = $1 \
             WHERE user_number = $2 AND state <> 'revoked'",
        )
        .bind(at_ms)
        .bind(user)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        sqlx::query(CLOSE_OPEN_REQUESTS)
            .bind(user)
            .bind(at_ms)
            .execute(&mut *tx)
            .await?;
        let announced = revoked
            && self
                .announce_permission(&mut tx, user, PermissionChange::Revoked, at_ms)
                .await?;
        tx.commit().await?;
        if announced {
            self.wake_events();
        }
        Ok(())
    }

    /// Counts an outbound call's outcome: an answered call resets the run of unanswered ones;
    /// the fourth unanswered call in a row revokes the permission (Meta's rule).
    pub async fn record_outbound_outcome(
        &self,
        user: &str,
        answered: bool,
        at_ms: i64,
    ) -> anyhow::Result<()> {
        if answered {
            sqlx::query(
                "UPDATE call_permissions SET consecutive_unanswered = 0, updated_at = $1 WHERE user_number = $2",
            )
            .bind(at_ms)
            .bind(user)
            .execute(self.pool())
            .await?;
            return Ok(());
        }
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "UPDATE call_permissions SET consecutive_unanswered = consecutive_unanswered + 1, updated_at = $1 \
             WHERE user_number = $2",
        )
        .bind(at_ms)
        .bind(user)
        .execute(&mut *tx)
        .await?;
        // Only the call that makes the run long enough revokes (and is announced): a later
        // unanswered call finds the permission revoked already.
        let revoked = sqlx::query(
            "UPDATE call_permissions SET state = 'revoked' \
             WHERE user_number = $1 AND consecutive_unanswered >= $2 AND state <> 'revoked'",
        )
        .bind(user)
        .bind(UNANSWERED_CALLS_BEFORE_REVOCATION)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        // As for any revocation, the requests sent before it can no longer grant.
        sqlx::query(
            "UPDATE permission_requests SET closed_at = $2 \
             WHERE user_number = $1 AND closed_at IS NULL AND EXISTS \
             (SELECT 1 FROM call_permissions WHERE user_number = $1 AND state = 'revoked')",
        )
        .bind(user)
        .bind(at_ms)
        .execute(&mut *tx)
        .await?;
        let announced = revoked
            && self
                .announce_permission(&mut tx, user, PermissionChange::Revoked, at_ms)
                .await?;
        tx.commit().await?;
        if announced {
            self.wake_events();
        }
        Ok(())
    }

    /// Outbound calls to `to` since `since_ms` that connected, or may still connect (placed and
    /// not yet ended): a call still ringing counts, or quick successive calls would all pass.
    pub async fn outbound_calls_counted_since(
        &self,
        to: &str,
        since_ms: i64,
    ) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM calls WHERE to_number = $1 AND direction = $3 \
             AND (answered_at > $2 OR (answered_at IS NULL AND status_rank < $4 AND created_at > $2))",
        )
        .bind(to)
        .bind(since_ms)
        .bind(Direction::OutboundApi.as_str())
        .bind(CallProgress::Ended.rank())
        .fetch_one(self.pool())
        .await?)
    }

    /// Takes the user's placing lease until `until_ms`; `false` if another request holds it.
    pub async fn claim_call_placing(
        &self,
        user: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> anyhow::Result<bool> {
        let claimed = sqlx::query(
            "UPDATE call_permissions SET placing_until = $2 \
             WHERE user_number = $1 AND (placing_until IS NULL OR placing_until <= $3)",
        )
        .bind(user)
        .bind(until_ms)
        .bind(now_ms)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(claimed == 1)
    }

    pub async fn release_call_placing(&self, user: &str, until_ms: i64) -> anyhow::Result<()> {
        sqlx::query("UPDATE call_permissions SET placing_until = NULL WHERE user_number = $1 AND placing_until = $2")
            .bind(user)
            .bind(until_ms)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn record_outbound_call(&self, call: &OutboundCall<'_>) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO calls (call_sid, direction, from_number, to_number, agent, context, status, status_rank, created_at, variables) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (call_sid) DO UPDATE SET agent = $5, context = $6, from_number = $3, to_number = $4, variables = $10",
        )
        .bind(call.call_sid)
        .bind(Direction::OutboundApi.as_str())
        .bind(call.from)
        .bind(call.to)
        .bind(call.agent)
        .bind(call.context)
        .bind(call.status.as_str())
        .bind(call.status.progress().rank())
        .bind(call.at_ms)
        .bind(serde_json::to_string(call.variables)?)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// `(context, variables)` that `POST /calls` gave this call, if it placed it.
    pub async fn outbound_brief(
        &self,
        call_sid: &str,
    ) -> anyhow::Result<Option<(Option<String>, Variables)>> {
        let row = sqlx::query_as::<_, BriefRow>(
            "SELECT context, variables FROM calls WHERE call_sid = $1 AND direction = $2",
        )
        .bind(call_sid)
        .bind(Direction::OutboundApi.as_str())
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            let variables = match row.variables {
                Some(text) => serde_json::from_str(&text)
                    .with_context(|| format!("call {call_sid} has unreadable stored variables"))?,
                None => Variables::new(),
            };
            Ok((row.context, variables))
        })
        .transpose()
    }

    /// The agent `POST /calls` named for this call, if it placed it and named one.
    pub async fn outbound_agent(&self, call_sid: &str) -> anyhow::Result<Option<String>> {
        let row = sqlx::query("SELECT agent FROM calls WHERE call_sid = $1 AND direction = $2")
            .bind(call_sid)
            .bind(Direction::OutboundApi.as_str())
            .fetch_optional(self.pool())
            .await?;
        Ok(row.and_then(|row| row.get::<Option<String>, _>(0)))
    }
}
