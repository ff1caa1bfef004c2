//! Which machine carries each live call, so that a call is never left live forever.
//!
//! A process that is killed (SIGKILL, the out-of-memory killer, a host that dies) cannot record
//! the end of the calls it was bridging. So each process holds a lease in the `machines` table,
//! renewed every `HEARTBEAT_INTERVAL`, and stamps the calls whose streams it carries with its
//! machine id. Every machine sweeps now and then: a call that has not ended and whose machine's
//! lease ran out (`LEASE`) is recorded as ended with reason `lost`. With Postgres this works
//! across machines; with SQLite it is the same process after a restart. A process restarted
//! under the same machine id (Fly keeps `FLY_MACHINE_ID` across restarts) knows at once that
//! whatever its id still carries was cut off, and records it before it serves.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use super::Store;
use crate::clock::Clock;

/// How often a process renews its lease, and sweeps.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Six missed heartbeats: long enough that a database hiccup or a busy machine is not taken for
/// a dead one, short enough that a dashboard does not show a dead call as live for long.
pub const LEASE: Duration = Duration::from_secs(30);

/// The end reason of a call whose machine stopped without recording its end.
pub const END_REASON_LOST: &str = "lost";

/// Names one server process (or the Fly Machine it runs on) in the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineId(String);

impl MachineId {
    /// Up to 64 letters, digits, `-`, `_` or `.`: what Fly's machine ids and hostnames use.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if raw.is_empty() || raw.len() > 64 || !raw.chars().all(allowed) {
            return Err(format!(
                "must be 1 to 64 letters, digits, '-', '_' or '.', got {raw:?}"
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// A fresh id for a process with no stable name: its calls are swept once its lease runs out.
    pub fn random() -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the operating system's random source is available");
        Self(format!(
            "process-{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    pub fn machine(&self) -> &MachineId {
        &self.machine
    }

    /// Takes this machine's lease at startup, before any call is served. Calls still live under
    /// this machine id were carried by its previous incarnation, which ended without recording
    /// them: they are recorded as lost now, and their number returned.
    pub async fn claim_machine(&self, now_ms: i64) -> anyhow::Result<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO machines (machine_id, started_at, heartbeat_at) VALUES ($1, $2, $2) \
             ON CONFLICT (machine_id) DO UPDATE SET started_at = excluded.started_at, \
             heartbeat_at = excluded.heartbeat_at",
        )
        .bind(self.machine.as_str())
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        let lost: Vec<String> = sqlx::query_scalar(
            "UPDATE calls SET ended_at = $1, end_reason = $2 WHERE machine_id = $3 AND ended_at IS NULL \
             RETURNING call_sid",
        )
        .bind(now_ms)
        .bind(END_REASON_LOST)
        .bind(self.machine.as_str())
        .fetch_all(&mut *tx)
        .await?;
        self.commit_ended(tx, &lost, now_ms).await
    }

    /// Announces the calls a sweep just ended (`call.ended`, as for any call that ends), commits,
    /// and returns how many there were. A call recorded as lost whose machine was only slow
    /// gets a second `call.ended` when its true end is recorded.
    async fn commit_ended(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Any>,
        ended: &[String],
        now_ms: i64,
    ) -> anyhow::Result<u64> {
        let announced = self.announce_calls_ended(&mut tx, ended, now_ms).await?;
        tx.commit().await?;
        if announced > 0 {
            self.wake_events();
        }
        Ok(u64::try_from(ended.len()).unwrap_or(u64::MAX))
    }

    /// Renews this machine's lease. Re-creates it if a sweep removed it while this process was
    /// too slow to renew (its calls have then been swept, and are corrected when they end).
    pub async fn renew_machine_lease(&self, now_ms: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO machines (machine_id, started_at, heartbeat_at) VALUES ($1, $2, $2) \
             ON CONFLICT (machine_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(self.machine.as_str())
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records as lost every live call carried by another machine whose lease ran out (or that
    /// has none), forgets those machines, and returns how many calls it ended. Never touches
    /// this machine's own calls: this process is alive, whatever its clock says.
    pub async fn end_lost_calls(&self, now_ms: i64) -> anyhow::Result<u64> {
        let expired_before = now_ms.saturating_sub(millis(LEASE));
        let mut tx = self.pool.begin().await?;
        let lost: Vec<String> = sqlx::query_scalar(
            "UPDATE calls SET ended_at = $1, end_reason = $2 \
             WHERE ended_at IS NULL AND machine_id IS NOT NULL AND machine_id <> $3 \
             AND NOT EXISTS (SELECT 1 FROM machines \
                 WHERE machines.machine_id = calls.machine_id AND machines.heartbeat_at > $4) \
             RETURNING call_sid",
        )
        .bind(now_ms)
        .bind(END_REASON_LOST)
        .bind(self.machine.as_str())
        .bind(expired_before)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM machines WHERE heartbeat_at <= $1 AND machine_id <> $2")
            .bind(expired_before)
            .bind(self.machine.as_str())
            .execute(&mut *tx)
            .await?;
        self.commit_ended(tx, &lost, now_ms).await
    }

    /// At exit: records every call this machine still carries as ended for `end_reason` (the
    /// bridges that could not record their own end in time), then gives up the lease so no
    /// other machine waits for it. Returns how many calls it ended.
    pub async fn release_machine(&self, end_reason: &str, now_ms: i64) -> anyhow::Result<u64> {
        let mut tx = self.pool.begin().await?;
        let ended: Vec<String> = sqlx::query_scalar(
            "UPDATE calls SET ended_at = $1, end_reason = $2 WHERE machine_id = $3 AND ended_at IS NULL \
             RETURNING call_sid",
        )
        .bind(now_ms)
        .bind(end_reason)
        .bind(self.machine.as_str())
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM machines WHERE machine_id = $1")
            .bind(self.machine.as_str())
            .execute(&mut *tx)
            .await?;
        self.commit_ended(tx, &ended, now_ms).await
    }
}

/// One heartbeat: renews this machine's lease, then sweeps other machines' lost calls. Returns
/// how many calls the sweep ended.
pub async fn keep_lease(store: &Store, clock: &dyn Clock) -> anyhow::Result<u64> {
    let now_ms = clock.now_ms();
    store.renew_machine_lease(now_ms).await?;
    store.end_lost_calls(now_ms).await
}

/// Runs `keep_lease` every `HEARTBEAT_INTERVAL`, the first time at once, until aborted.
pub fn spawn_lease_keeper(store: Store, clock: Arc<dyn Clock>) -> tokio::task::AbortHandle {
    let keeper = async move {
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            heartbeat.tick().await;
            match keep_lease(&store, &*clock).await {
                Ok(0) => {}
                Ok(lost) => tracing::warn!(
                    lost,
                    "recorded calls of a machine that stopped renewing its lease as lost"
                ),
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot renew this machine's lease"
                ),
            }
        }
    };
    tokio::spawn(keeper).abort_handle()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ids_are_short_plain_names() {
        assert_eq!(
            MachineId::parse("148e21ea7e4089").unwrap().as_str(),
            "148e21ea7e4089"
        );
        assert!(MachineId::parse("web-1.iad_2").is_ok());
        for bad in ["", "a b", "x'; DROP TABLE calls; --", &"a".repeat(65)] {
            assert!(MachineId::parse(bad).is_err(), "{bad:?}");
        }
        assert_ne!(MachineId::random(), MachineId::random());
        assert!(MachineId::parse(MachineId::random().as_str()).is_ok());
    }
}
