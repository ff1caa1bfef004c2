//! Who may start a media stream, and how many calls this machine carries.
//!
//! `/voice` issues a single-use token bound to the CallSid and reserves a call slot with it; the
//! `/stream` socket redeems the token after Twilio's `start`. Reserving at `/voice` (not at
//! `/stream`) means capacity is decided before we promise the caller anything, and a token that
//! is never redeemed gives its slot back when it expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long Twilio has to open the stream after we answered `/voice`.
pub const STREAM_TOKEN_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("all {0} call slots are taken")]
    Full(usize),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedeemError {
    #[error("the stream token is unknown or was already used")]
    Unknown,
    #[error("the stream token has expired")]
    Expired,
    #[error("the stream token belongs to another call")]
    WrongCall,
}

struct PendingStream {
    call_sid: String,
    expires_at: Instant,
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

/// Proof that a call holds a slot; dropping it (when the bridge task ends, however it ends)
/// gives the slot back.
pub struct CallSlot {
    admission: Arc<Admission>,
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

    /// Reserves a slot for `call_sid` and returns the token Twilio must present in `start`.
    pub fn issue(&self, call_sid: &str, now: Instant) -> Result<String, Refusal> {
        let mut pending = self.lock_pending();
        pending.retain(|_, p| p.expires_at > now);
        let live = self.occupancy.borrow().live;
        if pending.len() + live >= self.max_calls {
            self.publish_pending(pending.len());
            return Err(Refusal::Full(self.max_calls));
        }
        let token = new_token();
        pending.insert(
            token.clone(),
            PendingStream {
                call_sid: call_sid.to_owned(),
                expires_at: now + STREAM_TOKEN_TTL,
            },
        );
        self.publish_pending(pending.len());
        Ok(token)
    }

    /// Consumes the token: it is gone after this call whether or not it was valid, so a replayed
    /// or guessed token can never be tried twice.
    pub fn redeem(
        self: &Arc<Self>,
        token: &str,
        call_sid: &str,
        now: Instant,
    ) -> Result<CallSlot, RedeemError> {
        let mut pending = self.lock_pending();
        let entry = pending.remove(token);
        self.publish_pending(pending.len());
        let entry = entry.ok_or(RedeemError::Unknown)?;
        if entry.expires_at <= now {
            return Err(RedeemError::Expired);
        }
        if entry.call_sid != call_sid {
            return Err(RedeemError::WrongCall);
        }
        self.occupancy.send_modify(|o| o.live += 1);
        Ok(CallSlot {
            admission: Arc::clone(self),
        })
    }

    pub fn occupancy(&self) -> Occupancy {
        *self.occupancy.borrow()
    }

    /// Drops expired tokens so a drain does not wait for calls that will never connect.
    pub fn expire(&self, now: Instant) {
        let mut pending = self.lock_pending();
        pending.retain(|_, p| p.expires_at > now);
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

    #[test]
    fn a_token_is_single_use_and_bound_to_its_call() {
        let admission = Admission::new(10);
        let now = Instant::now();
        let token = admission.issue("CA1", now).unwrap();
        assert!(
            token.len() >= 22,
            "128 bits need at least 22 base64 characters"
        );
        let slot = admission.redeem(&token, "CA1", now).unwrap();
        assert_eq!(
            admission.occupancy(),
            Occupancy {
                pending: 0,
                live: 1
            }
        );
        assert_eq!(
            admission.redeem(&token, "CA1", now).err(),
            Some(RedeemError::Unknown)
        );
        drop(slot);
        assert_eq!(
            admission.occupancy(),
            Occupancy {
                pending: 0,
                live: 0
            }
        );

        let token = admission.issue("CA2", now).unwrap();
        assert_eq!(
            admission.redeem(&token, "CA3", now).err(),
            Some(RedeemError::WrongCall)
        );
        assert_eq!(
            admission.redeem(&token, "CA2", now).err(),
            Some(RedeemError::Unknown)
        );
    }

    #[test]
    fn tokens_expire_after_sixty_seconds() {
        let admission = Admission::new(10);
        let now = Instant::now();
        let token = admission.issue("CA1", now).unwrap();
        let later = now + STREAM_TOKEN_TTL;
        assert_eq!(
            admission.redeem(&token, "CA1", later).err(),
            Some(RedeemError::Expired)
        );
        let token = admission.issue("CA1", now).unwrap();
        assert!(
            admission
                .redeem(&token, "CA1", later - Duration::from_millis(1))
                .is_ok()
        );
    }

    #[test]
    fn tokens_are_unique() {
        let admission = Admission::new(1000);
        let now = Instant::now();
        let tokens: std::collections::HashSet<_> = (0..500)
            .map(|i| admission.issue(&format!("CA{i}"), now).unwrap())
            .collect();
        assert_eq!(tokens.len(), 500);
    }

    #[test]
    fn capacity_counts_pending_and_live_calls_and_frees_expired_reservations() {
        let admission = Admission::new(2);
        let now = Instant::now();
        let first = admission.issue("CA1", now).unwrap();
        let _live = admission.redeem(&first, "CA1", now).unwrap();
        admission.issue("CA2", now).unwrap();
        assert_eq!(admission.issue("CA3", now), Err(Refusal::Full(2)));
        let later = now + STREAM_TOKEN_TTL + Duration::from_secs(1);
        assert!(
            admission.issue("CA3", later).is_ok(),
            "the expired reservation is released"
        );
        assert_eq!(
            admission.occupancy(),
            Occupancy {
                pending: 1,
                live: 1
            }
        );
        admission.expire(later + STREAM_TOKEN_TTL);
        assert_eq!(
            admission.occupancy(),
            Occupancy {
                pending: 0,
                live: 1
            }
        );
    }
}
