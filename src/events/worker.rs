//! The delivery worker: one task per machine, apart from every call, that sends due events.
//!
//! Each round it claims up to `concurrency` due events (so a round takes at most one request
//! timeout, well inside the claim's lease), sends them at once, and records each outcome while
//! it still holds the claim. Then it waits for the next poll, or less if this machine wrote an
//! event meanwhile. Now and then it also announces expired permissions and clears out old
//! delivered events. On startup there is nothing to recover: the pending events are in the
//! table, and the worker simply carries on with them.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::{EventSettings, random_spread};
use crate::clock::Clock;
use crate::metrics::{DeliveryOutcome, Metrics};
use crate::store::Store;
use crate::store::outbox::{AttemptOutcome, ClaimedEvent};
use crate::webhooks::{BusinessClient, WebhookId};

/// What one round did, for the loop (is there more to do at once?) and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub claimed: usize,
    pub delivered: usize,
    pub retried: usize,
    pub failed: usize,
    pub stopped: usize,
    /// Outcomes that could not be recorded: the claim was lost, or the database refused.
    pub unrecorded: usize,
    /// Permissions announced as expired by this round's sweep.
    pub expiries_announced: u64,
}

pub struct EventsWorker {
    store: Store,
    client: BusinessClient,
    url: String,
    settings: EventSettings,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// When the next expiry sweep is due; the first round sweeps.
    next_sweep_ms: i64,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl EventsWorker {
    /// Sends to `url` through `client` (which signs with `CALLBRIDGE_WEBHOOK_SECRET`); claims
    /// in the name of `store`'s machine.
    pub fn new(
        store: Store,
        client: BusinessClient,
        url: String,
        settings: EventSettings,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            client,
            url,
            settings,
            metrics,
            clock,
            next_sweep_ms: i64::MIN,
        }
    }

    /// Runs rounds until aborted.
    pub fn spawn(self) -> tokio::task::AbortHandle {
        tokio::spawn(self.run()).abort_handle()
    }

    async fn run(mut self) {
        match self.store.release_event_claims().await {
            Ok(0) => {}
            Ok(released) => tracing::info!(
                released,
                "took back the events this machine was sending when it last stopped"
            ),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "cannot take back this machine's earlier event claims; they lapse on their own"
            ),
        }
        let written = self.store.events_written();
        loop {
            let more = match self.round().await {
                // A full round may have left due events behind: go on at once.
                Ok(round) => round.claimed >= self.settings.concurrency,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "cannot look for events to deliver; trying again"
                    );
                    false
                }
            };
            if more {
                continue;
            }
            let poll = tokio::time::sleep(self.settings.poll_interval);
            match &written {
                Some(written) => {
                    tokio::select! {
                        () = poll => {}
                        () = written.notified() => {}
                    }
                }
                None => poll.await,
            }
        }
    }

    /// One round: the sweep if it is due, then one batch of due events, then the pending count.
    pub async fn round(&mut self) -> anyhow::Result<Round> {
        let mut round = Round::default();
        let now_ms = self.clock.now_ms();
        if now_ms >= self.next_sweep_ms {
            self.next_sweep_ms = now_ms.saturating_add(millis(self.settings.sweep_interval));
            round.expiries_announced = self.sweep(now_ms).await;
        }
        let limit = i64::try_from(self.settings.concurrency).unwrap_or(i64::MAX);
        let until_ms = now_ms.saturating_add(millis(self.settings.lease));
        let claimed = self.store.claim_events(now_ms, until_ms, limit).await?;
        round.claimed = claimed.len();
        let this = &*self;
        let outcomes: Vec<Option<DeliveryOutcome>> = futures_util::stream::iter(claimed)
            .map(|event| this.attempt(event))
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;
        for outcome in outcomes {
            match outcome {
                Some(DeliveryOutcome::Delivered) => round.delivered += 1,
                Some(DeliveryOutcome::Retried) => round.retried += 1,
                Some(DeliveryOutcome::Failed) => round.failed += 1,
                Some(DeliveryOutcome::Stopped) => round.stopped += 1,
                None => round.unrecorded += 1,
            }
        }
        match self.store.count_pending_events().await {
            Ok(pending) => {
                self.metrics.events_pending.set(pending);
            }
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "cannot count the events waiting for delivery"
            ),
        }
        Ok(round)
    }

    /// Announces expired grants (the delivery window is the look-back: an older expiry could
    /// not be delivered as news anyway) and deletes delivered events past their keeping time.
    async fn sweep(&self, now_ms: i64) -> u64 {
        let lookback = millis(self.settings.give_up_after);
        let announced = match self
            .store
            .announce_expired_permissions(now_ms, lookback)
            .await
        {
            Ok(announced) => announced,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot look for expired call permissions"
                );
                0
            }
        };
        let keep_since = now_ms.saturating_sub(millis(self.settings.keep_delivered));
        if let Err(error) = self.store.purge_delivered_events(keep_since).await {
            tracing::warn!(
                error = format!("{error:#}"),
                "cannot delete old delivered events"
            );
        }
        announced
    }

    /// Sends one event and records the outcome; `None` if it could not be recorded.
    async fn attempt(&self, event: ClaimedEvent) -> Option<DeliveryOutcome> {
        let answer = match WebhookId::parse(&event.id) {
            Ok(id) => Some(
                self.client
                    .post(&self.url, &id, &event.body, self.settings.request_timeout)
                    .await,
            ),
            // Only this code writes ids, so this is a damaged row: retrying cannot mend it.
            Err(_) => None,
        };
        let now_ms = self.clock.now_ms();
        let (outcome, stored) = match answer {
            None => (
                DeliveryOutcome::Failed,
                AttemptOutcome::Failed {
                    status: None,
                    error: "the stored id is not a webhook-id".to_owned(),
                },
            ),
            Some(Ok(answer)) if answer.is_success() => (
                DeliveryOutcome::Delivered,
                AttemptOutcome::Delivered {
                    status: answer.status,
                },
            ),
            Some(Ok(answer)) if answer.status == 410 => (
                DeliveryOutcome::Stopped,
                AttemptOutcome::Stopped {
                    status: answer.status,
                },
            ),
            Some(Ok(answer)) => self.failure(
                &event,
                Some(answer.status),
                format!("the business answered {}", answer.status),
                now_ms,
            ),
            // The error names no URL or secret (`BusinessError`), so it may be stored and logged.
            Some(Err(error)) => self.failure(&event, None, error.to_string(), now_ms),
        };
        match self.store.record_attempt(&event.id, &stored, now_ms).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    id = event.id,
                    "an event's claim lapsed during its delivery; the machine that took it over records it"
                );
                return None;
            }
            Err(error) => {
                tracing::warn!(
                    id = event.id,
                    error = format!("{error:#}"),
                    "cannot record an event's delivery; it is sent again once its claim lapses"
                );
                return None;
            }
        }
        self.metrics.event_delivered(&event.event_type, outcome);
        log_outcome(&event, &stored, now_ms);
        Some(outcome)
    }

    /// A failed attempt: retried after the schedule's delay, but never later than the window's
    /// deadline (so the last attempt is made at the deadline); failed for good once an attempt
    /// at or past the deadline fails.
    fn failure(
        &self,
        event: &ClaimedEvent,
        status: Option<u16>,
        error: String,
        now_ms: i64,
    ) -> (DeliveryOutcome, AttemptOutcome) {
        let attempts = event.attempts + 1;
        let deadline = event
            .window_start_ms
            .saturating_add(millis(self.settings.give_up_after));
        if now_ms >= deadline {
            return (
                DeliveryOutcome::Failed,
                AttemptOutcome::Failed { status, error },
            );
        }
        let delay = millis(self.settings.delay(attempts, random_spread()));
        (
            DeliveryOutcome::Retried,
            AttemptOutcome::Retry {
                status,
                error,
                next_attempt_ms: now_ms.saturating_add(delay).min(deadline),
            },
        )
    }
}

fn log_outcome(event: &ClaimedEvent, outcome: &AttemptOutcome, now_ms: i64) {
    let (id, kind, attempt) = (&event.id, &event.event_type, event.attempts + 1);
    match outcome {
        AttemptOutcome::Delivered { status } => {
            tracing::debug!(id, kind, attempt, status, "event delivered");
        }
        AttemptOutcome::Stopped { .. } => tracing::warn!(
            id,
            kind,
            attempt,
            "the business answered 410 Gone to an event: it is not sent again"
        ),
        AttemptOutcome::Retry {
            error,
            next_attempt_ms,
            ..
        } => tracing::warn!(
            id,
            kind,
            attempt,
            error,
            retry_in_ms = next_attempt_ms - now_ms,
            "an event was not delivered; it is tried again later"
        ),
        AttemptOutcome::Failed { error, .. } => tracing::error!(
            id,
            kind,
            attempt,
            last_error = error,
            "an event could not be delivered within its delivery window: marked failed"
        ),
    }
}
