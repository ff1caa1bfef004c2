//! Who may open a media stream, and how many calls this machine carries.
//!
//! `/voice` issues a single-use token bound to the CallSid, reserves a call slot with it, and
//! puts it in the stream's URL (`/stream/{token}`), which Twilio signs. The upgrade spends the
//! token before the socket exists, turning the reservation into the call's live slot, so a
//! replayed upgrade finds its token spent and opens nothing; Twilio's `start` must then carry the
//! same token and the CallSid it was issued for. Reserving at `/voice` (not at the upgrade) means
//! capacity is decided before we promise the caller anything, and a token that is never spent
//! gives its slot back when it expires. The token itself lives in the store, so a call whose
//! webhook and stream land on different machines still connects; the slot bookkeeping is per
//! machine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::sync::watch;

use crate::store::Store;
use crate::twilio::ids::CallSid;

/// How long Twilio has to open the stream after we answered `/voice`.
const STREAM_TOKEN_TTL_MS: i64 = 60_000;
pub const STREAM_TOKEN_TTL: Duration = Duration::from_millis(STREAM_TOKEN_TTL_MS.unsigned_abs());

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
    #[error("the stream token cannot be checked: {0:#}")]
    Store(#[from] anyhow::Error),
}

/// Why Twilio's `start` does not belong to the stream it arrived on.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StartMismatch {
    #[error("start carries another token than the stream's URL")]
    WrongToken,
    #[error("start names another call than the one the token was issued for")]
    WrongCall,
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
}

/// What a stream's upgrade was authorised for, by the token it spent: Twilio's `start` on that
/// socket must match it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamGrant {
    /// The single-use token from the stream's URL.
    pub token: String,
    /// The call `/voice` issued the token for.
    pub call_sid: CallSid,
}

impl StreamGrant {
    /// Twilio's `start` repeats the token as a `<Parameter>` and names the call: both must be
    /// the ones this stream was admitted for.
    pub fn check_start(&self, token: &str, call_sid: &CallSid) -> Result<(), StartMismatch> {
        if token != self.token {
            Err(StartMismatch::WrongToken)
        } else if *call_sid != self.call_sid {
            Err(StartMismatch::WrongCall)
        } else {
            Ok(())
        }
    }
}

/// A stream whose upgrade spent a valid token: what it was granted, and the call's slot, held
/// for as long as the call runs.
#[derive(Debug)]
pub struct AdmittedStream {
    pub grant: StreamGrant,
    pub slot: CallSlot,
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

    /// Spends the token, at the stream's upgrade: it is gone from the store after this, valid
    /// or not, so a replayed upgrade finds it spent. Atomic in the store, so of two machines
    /// racing for one token only one gets it. A valid one turns the call's reservation into its
    /// live slot.
    pub async fn redeem(
        self: &Arc<Self>,
        store: &Store,
        token: &str,
        now_ms: i64,
    ) -> Result<AdmittedStream, RedeemError> {
        let bound = store.take_stream_token(token).await?;
        // This machine's reservation (if it issued the token) ends either way.
        self.release(token);
        let (call_sid, expires_at_ms) = bound.ok_or(RedeemError::Unknown)?;
        if expires_at_ms <= now_ms {
            return Err(RedeemError::Expired);
        }
        // Only `/voice` stores tokens, for CallSids it parsed; anything else is a corrupt row.
        let call_sid = CallSid::parse(&call_sid).map_err(|why| {
            RedeemError::Store(anyhow::anyhow!("a stored stream token is bound to {why}"))
        })?;
        self.occupancy.send_modify(|o| o.live += 1);
        Ok(AdmittedStream {
            grant: StreamGrant {
                token: token.to_owned(),
                call_sid,
            },
            slot: CallSlot {
                admission: Arc::clone(self),
            },
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
    use callbridge_testkit::scratch::Scratch;

    use super::*;
    use crate::clock::{Clock, SystemClock};

    const CA1: &str = "CA00000000000000000000000000000001";
    const CA2: &str = "CA00000000000000000000000000000002";

    fn now_ms() -> i64 {
        SystemClock.now_ms()
    }

    /// A migrated store on a fresh database inside `scratch`.
    async fn store(scratch: &Scratch) -> Store {
        Store::connect(&scratch.sqlite_url()).await.unwrap()
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
        let scratch = Scratch::new();
        let (admission, store) = (Admission::new(10), store(&scratch).await);
        let token = issue_for(&admission, &store, CA1, 60_000).await;
        assert!(
            token.len() >= 22,
            "128 bits need at least 22 base64 characters"
        );
        assert_eq!(admission.occupancy().pending, 1);
        let admitted = admission.redeem(&store, &token, now_ms()).await.unwrap();
        assert_eq!(admitted.grant.call_sid.as_str(), CA1);
        assert_eq!(
            admission.occupancy(),
            Occupancy {
                pending: 0,
                live: 1
            },
            "the reservation became the live slot"
        );
        assert!(matches!(
            admission.redeem(&store, &token, now_ms()).await,
            Err(RedeemError::Unknown)
        ));
        let (ca1, ca2) = (CallSid::parse(CA1).unwrap(), CallSid::parse(CA2).unwrap());
        assert_eq!(admitted.grant.check_start(&token, &ca1), Ok(()));
        assert_eq!(
            admitted.grant.check_start("another", &ca1),
            Err(StartMismatch::WrongToken)
        );
        assert_eq!(
            admitted.grant.check_start(&token, &ca2),
            Err(StartMismatch::WrongCall)
        );
        drop(admitted);
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
        let scratch = Scratch::new();
        let (admission, store) = (Admission::new(10), store(&scratch).await);
        let token = issue_for(&admission, &store, CA1, 60_000).await;
        let later = now_ms() + 60_001;
        assert!(matches!(
            admission.redeem(&store, &token, later).await,
            Err(RedeemError::Expired)
        ));
        assert!(
            matches!(
                admission.redeem(&store, &token, now_ms()).await,
                Err(RedeemError::Unknown)
            ),
            "an expired token is spent by trying it"
        );
        assert_eq!(admission.occupancy(), Occupancy::default());
    }

    #[tokio::test]
    async fn a_token_issued_by_another_machine_is_honoured() {
        let scratch = Scratch::new();
        let store = store(&scratch).await;
        let (webhook_machine, stream_machine) = (Admission::new(10), Admission::new(10));
        let token = issue_for(&webhook_machine, &store, CA1, 60_000).await;
        let _admitted = stream_machine
            .redeem(&store, &token, now_ms())
            .await
            .unwrap();
        assert_eq!(stream_machine.occupancy().live, 1);
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
