//! Events for the business (`CALLBRIDGE_EVENTS_URL`): what happened to calls and call
//! permissions, delivered at least once.
//!
//! Each event is written to the `event_outbox` table in the same transaction as the change it
//! announces (`store::outbox`), so an event exists exactly when its change does, whatever
//! crashes. A worker per machine (`worker`) sends what is due, as Standard Webhooks requests
//! with the stored id and body, and retries on a fixed schedule until the business accepts it,
//! answers 410, or a day has passed.

pub mod worker;

use std::time::Duration;

use serde::Serialize;

/// How delivery behaves. Not environment variables: the contract fixes them; tests shorten
/// them so a day of retries runs in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct EventSettings {
    /// Wait after the first, second, … failed attempt; the last entry repeats.
    pub retry_delays: Vec<Duration>,
    /// How long after an event was written (or manually retried) attempts continue; the last
    /// attempt is made at this deadline, and if it fails too the event is marked failed.
    pub give_up_after: Duration,
    /// One attempt's whole exchange (connect, send, read the answer).
    pub request_timeout: Duration,
    /// How long a machine holds the events it claimed. Longer than an attempt, so an event is
    /// sent by one machine at a time; short enough that a machine that dies mid-delivery holds
    /// up its events only briefly.
    pub lease: Duration,
    /// How often the worker looks for due events when nothing woke it sooner.
    pub poll_interval: Duration,
    /// Each retry delay is varied by up to this fraction either way (0.2 = ±20 %), so events
    /// that failed together (the business was down) are not all retried in the same instant.
    pub jitter: f64,
    /// How many events one machine sends at once.
    pub concurrency: usize,
    /// How often grants past their expiry are looked for (and announced as `expired`).
    pub sweep_interval: Duration,
    /// Delivered events are kept this long (for the API's listing), then deleted.
    pub keep_delivered: Duration,
}

const MINUTE: Duration = Duration::from_secs(60);

impl Default for EventSettings {
    /// The contract's schedule: 5 s, 30 s, 2 min, 10 min, 30 min, then hourly, ±20 %, for 24 h.
    fn default() -> Self {
        Self {
            retry_delays: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                2 * MINUTE,
                10 * MINUTE,
                30 * MINUTE,
                60 * MINUTE,
            ],
            give_up_after: 24 * 60 * MINUTE,
            request_timeout: Duration::from_secs(10),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            jitter: 0.2,
            concurrency: 8,
            sweep_interval: MINUTE,
            keep_delivered: 7 * 24 * 60 * MINUTE,
        }
    }
}

impl EventSettings {
    /// The wait after the `attempts`-th failed attempt (1 = the first), before jitter.
    pub fn base_delay(&self, attempts: i64) -> Duration {
        let index = usize::try_from(attempts.saturating_sub(1)).unwrap_or(0);
        self.retry_delays
            .get(index)
            .or(self.retry_delays.last())
            .copied()
            .unwrap_or(Duration::ZERO)
    }

    /// `base_delay` varied by `±jitter`, `spread` in [-1, 1] choosing where in that range.
    pub fn delay(&self, attempts: i64, spread: f64) -> Duration {
        let factor = 1.0 + self.jitter.clamp(0.0, 1.0) * spread.clamp(-1.0, 1.0);
        self.base_delay(attempts).mul_f64(factor)
    }
}

/// A uniformly random number in [-1, 1], for `EventSettings::delay`. The operating system's
/// source (already used for ids) is plenty for spreading retries; no generator is kept.
pub fn random_spread() -> f64 {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    let draw = f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX);
    draw.mul_add(2.0, -1.0)
}

/// What an event announces: the `type` of its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    CallStarted,
    CallEnded,
    CallPermissionUpdated,
}

impl EventType {
    pub const ALL: [EventType; 3] = [
        Self::CallStarted,
        Self::CallEnded,
        Self::CallPermissionUpdated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::CallStarted => "call.started",
            Self::CallEnded => "call.ended",
            Self::CallPermissionUpdated => "call_permission.updated",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == raw)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Where an event stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    /// Waiting for its next attempt (possibly being sent right now).
    Pending,
    /// The business answered 2xx.
    Delivered,
    /// Every attempt in the delivery window failed.
    Failed,
    /// The business answered 410 Gone: it wants no more attempts.
    Stopped,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 4] =
        [Self::Pending, Self::Delivered, Self::Failed, Self::Stopped];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == raw)
    }
}

impl Serialize for DeliveryStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl utoipa::PartialSchema for DeliveryStatus {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::routes::string_enum(Self::ALL.map(Self::as_str))
    }
}

impl utoipa::ToSchema for DeliveryStatus {}

/// What `call_permission.updated` says the permission became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PermissionChange {
    Granted,
    Rejected,
    Revoked,
    Expired,
}

impl PermissionChange {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Rejected => "rejected",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_is_the_contracts_and_repeats_hourly() {
        let settings = EventSettings::default();
        let minutes = |m: u64| Duration::from_secs(60 * m);
        let delays: Vec<Duration> = (1..=8).map(|n| settings.base_delay(n)).collect();
        assert_eq!(
            delays,
            [
                Duration::from_secs(5),
                Duration::from_secs(30),
                minutes(2),
                minutes(10),
                minutes(30),
                minutes(60),
                minutes(60),
                minutes(60),
            ]
        );
        assert_eq!(settings.give_up_after, minutes(24 * 60));
        assert_eq!(settings.request_timeout, Duration::from_secs(10));
        // An event is never sent by two machines at once: a claim outlives a whole batch.
        assert!(settings.lease > settings.request_timeout);
    }

    #[test]
    fn jitter_spreads_a_delay_by_at_most_its_fraction_either_way() {
        let settings = EventSettings::default();
        let base = Duration::from_secs(30);
        assert_eq!(settings.delay(2, 0.0), base);
        assert_eq!(settings.delay(2, -1.0), Duration::from_secs(24));
        assert_eq!(settings.delay(2, 1.0), Duration::from_secs(36));
        let spreads: Vec<f64> = (0..1000).map(|_| random_spread()).collect();
        assert!(spreads.iter().all(|s| (-1.0..=1.0).contains(s)));
        // Both halves of the range are drawn from: the spread is not one-sided or constant.
        assert!(spreads.iter().any(|s| *s < -0.5) && spreads.iter().any(|s| *s > 0.5));
        let none = EventSettings {
            jitter: 0.0,
            ..EventSettings::default()
        };
        assert_eq!(none.delay(2, 1.0), base);
    }

    #[test]
    fn names_round_trip() {
        for kind in EventType::ALL {
            assert_eq!(EventType::parse(kind.as_str()), Some(kind));
        }
        for status in DeliveryStatus::ALL {
            assert_eq!(DeliveryStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(EventType::parse("call.exploded"), None);
        assert_eq!(DeliveryStatus::parse("lost"), None);
    }
}
