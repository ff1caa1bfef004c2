//! Who may start a media stream, and how many calls this machine carries.
//!
//! `/voice` issues a single-use token bound to the CallSid and reserves a call slot with it; the
//! `/stream` socket redeems the token after Twilio's `start`. Reserving at `/voice` (not at
//! `/stream`) means capacity is decided before we promise the caller anything, and a token that
//! is never redeemed gives its slot back when it expires. The token itself lives in the store,
//! so a call whose webhook and stream land on different machines still connects; the slot
//! bookkeeping is per machine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::sync::watch;

use crate::store::Store;

/// How long Twilio has to open the stream after we answered `/voice`.
pub const STREAM_TOKEN_TTL: Duration = Duration::from_secs(60);
const STREAM_TOKEN_TTL_MS: i64 = STREAM_TOKEN_TTL.as_millis() as i64;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("all {0} call slots are taken")]
    Full(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    #[error("the stream token is unknown or was already used")]
    Unknown,
    #[error("the stream token has expired")]
    Expired,
    #[error("the stream token belongs to another call")]
    WrongCall,
    #[error("the stream token cannot be checked: {0:#}")]
    Store(#[from] anyhow::Error),
}

/// A reservation expires on the application's clock, the one the stored token's expiry is
/// measured by, so both end at the same moment.
struct PendingStream {
    expires_at_ms: i64,
}

/// Counts that a drain waits on: both must reach zero before the process may exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub pending: usize,
    pub live: usize,
}

impl Occupancy {
    pub fn is_idle(&self) -> bool {
        self.pending == 0 && self.live == 0
    }
}

pub struct Admission {
    max_calls: usize,
    pending: Mutex<HashMap<String, PendingStream>>,
    occupancy: watch::Sender<Occupancy>,
    /// Open stream sockets. The upgrade signature is the same for every call and can be
    /// replayed, so sockets are capped too, not only calls that passed `start`.
    open_streams: AtomicUsize,
}

/// An open stream socket, counted until dropped.
pub struct OpenStream {
    admission: Arc<Admission>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.admission.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Proof that a call holds a slot; dropping it (when the bridge task ends, however it ends)
/// gives the slot back.
pub struct CallSlot {
    admission: Arc<Admission>,
}

impl std::fmt::Debug for CallSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallSlot")
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.admission
            .occupancy
            .send_modify(|o| o.live = o.live.saturating_sub(1));
    }
}

impl Admission {
    pub fn new(max_calls: usize) -> Arc<Self> {
        Arc::new(Self {
            max_calls,
            pending: Mutex::new(HashMap::new()),
            occupancy: watch::Sender::new(Occupancy::default()),
            open_streams: AtomicUsize::new(0),
        })
    }

    /// Admits one more stream socket, unless as many are open as there are call slots: Twilio
    /// opens one per answered call, so more means replayed upgrades. (A socket that never
    /// sends `start` is closed after a few seconds by the bridge.)
    pub fn open_stream(self: &Arc<Self>) -> Option<OpenStream> {
        let admitted = self
            .open_streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_calls).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| OpenStream {
            admission: Arc::clone(self),
        })
    }

    /// Reserves a slot and returns a new token for Twilio to present in `start`; the caller
    /// stores it, bound to the CallSid, with `STREAM_TOKEN_TTL`.
    pub fn issue(&self, now_ms: i64) -> Result<String, Refusal> {
        let mut pending = self.lock_pending();
        pending.retain(|_, p| p.expires_at_ms > now_ms);
        let live = self.occupancy.borrow().live;
        if pending.len() + live >= self.max_calls {
            self.publish_pending(pending.len());
            return Err(Refusal::Full(self.max_calls));
        }
        let token = new_token();
        pending.insert(
            token.clone(),
            PendingStream {
                expires_at_ms: now_ms + STREAM_TOKEN_TTL_MS,
            },
        );
        self.publish_pending(pending.len());
        Ok(token)
    }

    /// Gives back a reservation whose token could not be stored.
    pub fn release(&self, token: &str) {
        let mut pending = self.lock_pending();
        pending.remove(token);
        self.publish_pending(pending.len());
    }

    /// Consumes the token: it is gone from the store after this, valid or not, so a replayed or
    /// guessed token can never be tried twice. A valid one turns into a live call slot.
    pub async fn redeem(
        self: &Arc<Self>,
        store: &Store,
        token: &str,
        call_sid: &str,
        now_ms: i64,
    ) -> Result<CallSlot, RedeemError> {
        let bound = store.take_stream_token(token).await?;
        // This machine's reservation (if it issued the token) ends either way.
        self.release(token);
        let (bound_call_sid, expires_at_ms) = bound.ok_or(RedeemError::Unknown)?;
        if expires_at_ms <= now_ms {
            return Err(RedeemError::Expired);
        }
        if bound_call_sid != call_sid {
            return Err(RedeemError::WrongCall);
        }
        self.occupancy.send_modify(|o| o.live += 1);
        Ok(CallSlot {
            admission: Arc::clone(self),
        })
    }

    /// The counts as last published: reservations that expired since the last `issue`,
    /// `expire` or `occupancy_at` are still in them.
    pub fn occupancy(&self) -> Occupancy {
        *self.occupancy.borrow()
    }

    /// The counts at `now_ms`, with expired reservations gone: what a metrics scrape or a
    /// capacity check must see even when no `/voice` came since they expired.
    pub fn occupancy_at(&self, now_ms: i64) -> Occupancy {
        self.expire(now_ms);
        self.occupancy()
    }

    /// Drops expired reservations so a drain does not wait for calls that will never connect.
    pub fn expire(&self, now_ms: i64) {
        let mut pending = self.lock_pending();
        pending.retain(|_, p| p.expires_at_ms > now_ms);
        self.publish_pending(pending.len());
    }

    pub fn subscribe(&self) -> watch::Receiver<Occupancy> {
        self.occupancy.subscribe()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingStream>> {
        // A panic while holding this lock cannot leave the map inconsistent (every mutation is a
        // single insert/remove/retain), so a poisoned lock is safe to keep using.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_pending(&self, pending: usize) {
        self.occupancy.send_if_modified(|o| {
            let changed = o.pending != pending;
            o.pending = pending;
            changed
        });
    }
}

/// 128 random bits, URL-safe so it survives TwiML attributes and JSON without escaping.
fn new_token() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, SystemClock};

    fn now_ms() -> i64 {
        SystemClock.now_ms()
    }

    async fn store() -> Store {
        let path = std::env::temp_dir().join(format!("callbridge-admission-{}.db", new_token()));
        Store::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap()
    }

    async fn issue_for(
        admission: &Admission,
        store: &Store,
        call_sid: &str,
        ttl_ms: i64,
    ) -> String {
        let token = admission.issue(now_ms()).unwrap();
        store
            .issue_stream_token(&token, call_sid, 0, now_ms() + ttl_ms)
            .await
            .unwrap();
        token
    }

    #[tokio::test]
    async fn a_token_is_single_use_and_bound_to_its_call() {
        let (admission, store) = (Admission::new(10), store().await);
        let token = issue_for(&admission, &store, "CA1", 60_000).await;
        assert!(
            token.len() >= 22,
            "128 bits need at least 22 base64 characters"
        );
        let slot = admission
            .redeem(&store, &token, "CA1", now_ms())
            .await
            .unwrap();
        assert_eq!(
            admission.occupancy(),
            Occupancy {
                pending: 0,
                live: 1
            }
        );
        assert!(matches!(
            admission.redeem(&store, &token, "CA1", now_ms()).await,
            Err(RedeemError::Unknown)
        ));
        drop(slot);
        assert_eq!(
            admission.occupancy(),
            Occupancy {
                pending: 0,
                live: 0
            }
        );

        let token = issue_for(&admission, &store, "CA2", 60_000).await;
        assert!(matches!(
            admission.redeem(&store, &token, "CA3", now_ms()).await,
            Err(RedeemError::WrongCall)
        ));
        assert!(matches!(
            admission.redeem(&store, &token, "CA2", now_ms()).await,
            Err(RedeemError::Unknown)
        ));
        assert_eq!(
            admission.occupancy(),
            Occupancy {
                pending: 0,
                live: 0
            }
        );
    }

    #[tokio::test]
    async fn expired_tokens_are_refused() {
        let (admission, store) = (Admission::new(10), store().await);
        let token = issue_for(&admission, &store, "CA1", 60_000).await;
        let later = now_ms() + 60_001;
        assert!(matches!(
            admission.redeem(&store, &token, "CA1", later).await,
            Err(RedeemError::Expired)
        ));
    }

    #[tokio::test]
    async fn a_token_issued_by_another_machine_is_honoured() {
        let store = store().await;
        let (webhook_machine, stream_machine) = (Admission::new(10), Admission::new(10));
        let token = issue_for(&webhook_machine, &store, "CA1", 60_000).await;
        let _slot = stream_machine
            .redeem(&store, &token, "CA1", now_ms())
            .await
            .unwrap();
        assert_eq!(stream_machine.occupancy().live, 1);
    }

    #[test]
    fn open_stream_sockets_are_capped_at_the_call_slots() {
        let admission = Admission::new(2);
        let first = admission.open_stream().expect("room");
        let _second = admission.open_stream().expect("room");
        assert!(admission.open_stream().is_none());
        drop(first);
        assert!(admission.open_stream().is_some());
    }

    #[test]
    fn tokens_are_unique() {
        let admission = Admission::new(1000);
        let now = now_ms();
        let tokens: std::collections::HashSet<_> =
            (0..500).map(|_| admission.issue(now).unwrap()).collect();
        assert_eq!(tokens.len(), 500);
    }

    #[test]
    fn capacity_counts_pending_calls_and_frees_expired_or_released_reservations() {
        let admission = Admission::new(2);
        let now = now_ms();
        let first = admission.issue(now).unwrap();
        admission.issue(now).unwrap();
        assert_eq!(admission.issue(now), Err(Refusal::Full(2)));
        admission.release(&first);
        let third = admission.issue(now).unwrap();
        assert_eq!(admission.issue(now), Err(Refusal::Full(2)));
        let later = now + STREAM_TOKEN_TTL_MS + 1_000;
        assert!(
            admission.issue(later).is_ok(),
            "expired reservations are released"
        );
        assert_eq!(
            admission.occupancy(),
            Occupancy {
                pending: 1,
                live: 0
            }
        );
        assert_eq!(admission.occupancy().pending, 1, "nothing expired yet");
        assert_eq!(
            admission.occupancy_at(later + STREAM_TOKEN_TTL_MS),
            Occupancy {
                pending: 0,
                live: 0
            }
        );
        admission.release(&third);
    }
}
