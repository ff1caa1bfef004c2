//! Meta's rules for calling a WhatsApp user, as pure functions of
//! stored facts and the current time, so every rule is unit-tested without a database or clock.
//!
//! - A business may call a user only while the user's permission is granted: a grant lasts
//!   7 days from the user's answer.
//! - Permission requests: at most 1 per 24 h and 2 per 7 days per user; none for 24 h after
//!   the user rejected one.
//! - Four unanswered calls in a row revoke the permission.
//! - An answer counts only for a request we sent in the last 7 days. Only an answer to the
//!   user's latest request, while nothing has closed it (an earlier answer, a revocation, a newer
//!   request), can grant: so a rejection or revocation is never undone by an old acceptance,
//!   only by the user accepting a new request.

use crate::clock::{MS_PER_DAY, rfc3339};

pub const GRANT_VALIDITY_MS: i64 = 7 * MS_PER_DAY;
/// An unanswered request expires after 7 days; a later answer to it grants nothing.
pub const REQUEST_VALIDITY_MS: i64 = 7 * MS_PER_DAY;
pub const REQUEST_SPACING_MS: i64 = MS_PER_DAY;
pub const REQUEST_WINDOW_MS: i64 = 7 * MS_PER_DAY;
pub const REQUESTS_PER_WINDOW: usize = 2;
pub const QUIET_AFTER_REJECTION_MS: i64 = MS_PER_DAY;
pub const UNANSWERED_CALLS_BEFORE_REVOCATION: i64 = 4;

/// The user's answer to a permission request (the button's `ButtonPayload`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Accepted,
    Rejected,
}

impl Reply {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "ACCEPTED",
            Self::Rejected => "REJECTED",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PermissionState {
    Pending,
    Granted,
    Rejected,
    Revoked,
}

impl PermissionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Granted => "granted",
            Self::Rejected => "rejected",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "pending" => Self::Pending,
            "granted" => Self::Granted,
            "rejected" => Self::Rejected,
            "revoked" => Self::Revoked,
            _ => return None,
        })
    }
}

/// What is stored about one user's call permission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    pub state: PermissionState,
    pub answered_at_ms: Option<i64>,
    pub expires_at_ms: Option<i64>,
    pub consecutive_unanswered: i64,
}

/// Why a call may not be placed now; the message tells the API client what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallRefusal {
    NeverAsked,
    AwaitingAnswer,
    Rejected,
    Expired { at_ms: i64 },
    Revoked,
}

impl CallRefusal {
    pub fn message(&self) -> String {
        match self {
            Self::NeverAsked => "this user has not been asked for call permission: POST /call-permissions first".into(),
            Self::AwaitingAnswer => "the user has not answered the call-permission request yet".into(),
            Self::Rejected => "the user declined the call-permission request".into(),
            Self::Expired { at_ms } => format!(
                "the user's call permission expired at {}: request it again with POST /call-permissions",
                rfc3339(*at_ms)
            ),
            Self::Revoked => "the user's call permission was revoked (declined by WhatsApp or too many unanswered calls): request it again with POST /call-permissions".into(),
        }
    }
}

/// A permission request we sent, as the store knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentRequest {
    pub sent_at_ms: i64,
    /// Nothing has closed it yet: no answer, no revocation, no newer request to the user.
    pub open: bool,
}

/// What a new reply does to the user's permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyEffect {
    Grant,
    Reject,
    Ignore(IgnoredReply),
}

/// Why a reply changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IgnoredReply {
    /// We never sent this user the request it answers.
    NoRequest,
    /// The request it answers is more than 7 days old.
    RequestExpired,
    /// An acceptance of a request that an earlier answer, a revocation or a newer request has
    /// closed: it must not bring back a permission the user or WhatsApp has since taken away.
    RequestClosed,
}

impl IgnoredReply {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRequest => "no request of ours to answer",
            Self::RequestExpired => "the request expired",
            Self::RequestClosed => "the request was already answered, revoked or replaced",
        }
    }
}

/// What a new reply does, given the request it answers (`None` if we sent none). A rejection
/// always counts while its request is valid: declining can only make calls less likely.
pub fn reply_effect(reply: Reply, answers: Option<&SentRequest>, now_ms: i64) -> ReplyEffect {
    let Some(request) = answers else {
        return ReplyEffect::Ignore(IgnoredReply::NoRequest);
    };
    if now_ms - request.sent_at_ms >= REQUEST_VALIDITY_MS {
        return ReplyEffect::Ignore(IgnoredReply::RequestExpired);
    }
    match reply {
        Reply::Rejected => ReplyEffect::Reject,
        Reply::Accepted if request.open => ReplyEffect::Grant,
        Reply::Accepted => ReplyEffect::Ignore(IgnoredReply::RequestClosed),
    }
}

/// Whether the business may call this user at `now_ms`.
pub fn check_call(permission: Option<&Permission>, now_ms: i64) -> Result<(), CallRefusal> {
    let Some(permission) = permission else {
        return Err(CallRefusal::NeverAsked);
    };
    match permission.state {
        PermissionState::Granted => match permission.expires_at_ms {
            Some(at_ms) if at_ms <= now_ms => Err(CallRefusal::Expired { at_ms }),
            _ => Ok(()),
        },
        PermissionState::Pending => Err(CallRefusal::AwaitingAnswer),
        PermissionState::Rejected => Err(CallRefusal::Rejected),
        PermissionState::Revoked => Err(CallRefusal::Revoked),
    }
}

/// When a new permission request may be sent, if not now. `recent_requests_ms` are the times
/// of this user's requests in the last 7 days (any order).
pub fn request_blocked_until(
    recent_requests_ms: &[i64],
    permission: Option<&Permission>,
    now_ms: i64,
) -> Option<i64> {
    let mut in_window: Vec<i64> = recent_requests_ms
        .iter()
        .copied()
        .filter(|at| now_ms - at < REQUEST_WINDOW_MS)
        .collect();
    in_window.sort_unstable();
    let spacing = in_window.last().map(|last| last + REQUEST_SPACING_MS);
    // With the window full, the next request waits until the oldest one in it ages out.
    let window = (in_window.len() >= REQUESTS_PER_WINDOW)
        .then(|| in_window[in_window.len() - REQUESTS_PER_WINDOW] + REQUEST_WINDOW_MS);
    let quiet = permission
        .filter(|p| p.state == PermissionState::Rejected)
        .and_then(|p| p.answered_at_ms)
        .map(|at| at + QUIET_AFTER_REJECTION_MS);
    [spacing, window, quiet]
        .into_iter()
        .flatten()
        .filter(|until| *until > now_ms)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = MS_PER_DAY;
    const NOW: i64 = 1_800_000_000_000;

    fn permission(state: PermissionState, answered: i64, expires: Option<i64>) -> Permission {
        Permission {
            state,
            answered_at_ms: Some(answered),
            expires_at_ms: expires,
            consecutive_unanswered: 0,
        }
    }

    #[test]
    fn a_grant_is_valid_for_seven_days() {
        let granted = permission(PermissionState::Granted, NOW, Some(NOW + GRANT_VALIDITY_MS));
        assert_eq!(check_call(Some(&granted), NOW), Ok(()));
        assert_eq!(check_call(Some(&granted), NOW + 7 * DAY - 1), Ok(()));
        assert_eq!(
            check_call(Some(&granted), NOW + 7 * DAY),
            Err(CallRefusal::Expired {
                at_ms: NOW + 7 * DAY
            })
        );
    }

    #[test]
    fn only_a_grant_allows_a_call() {
        assert_eq!(check_call(None, NOW), Err(CallRefusal::NeverAsked));
        let pending = Permission {
            state: PermissionState::Pending,
            answered_at_ms: None,
            expires_at_ms: None,
            consecutive_unanswered: 0,
        };
        assert_eq!(
            check_call(Some(&pending), NOW),
            Err(CallRefusal::AwaitingAnswer)
        );
        let rejected = permission(PermissionState::Rejected, NOW, None);
        assert_eq!(check_call(Some(&rejected), NOW), Err(CallRefusal::Rejected));
        let revoked = permission(PermissionState::Revoked, NOW, None);
        assert_eq!(check_call(Some(&revoked), NOW), Err(CallRefusal::Revoked));
        for refusal in [
            CallRefusal::NeverAsked,
            CallRefusal::Expired { at_ms: NOW },
            CallRefusal::Revoked,
        ] {
            assert!(
                refusal.message().contains("/call-permissions"),
                "{refusal:?}"
            );
        }
    }

    #[test]
    fn only_an_open_request_can_be_accepted() {
        let open = SentRequest {
            sent_at_ms: NOW - DAY,
            open: true,
        };
        let closed = SentRequest {
            open: false,
            ..open
        };
        assert_eq!(
            reply_effect(Reply::Accepted, Some(&open), NOW),
            ReplyEffect::Grant
        );
        assert_eq!(
            reply_effect(Reply::Accepted, Some(&closed), NOW),
            ReplyEffect::Ignore(IgnoredReply::RequestClosed)
        );
        assert_eq!(
            reply_effect(Reply::Accepted, None, NOW),
            ReplyEffect::Ignore(IgnoredReply::NoRequest)
        );
    }

    #[test]
    fn a_rejection_counts_even_after_an_answer() {
        for open in [true, false] {
            let request = SentRequest {
                sent_at_ms: NOW - DAY,
                open,
            };
            assert_eq!(
                reply_effect(Reply::Rejected, Some(&request), NOW),
                ReplyEffect::Reject
            );
        }
        assert_eq!(
            reply_effect(Reply::Rejected, None, NOW),
            ReplyEffect::Ignore(IgnoredReply::NoRequest)
        );
    }

    #[test]
    fn no_answer_counts_after_seven_days() {
        let request = SentRequest {
            sent_at_ms: NOW,
            open: true,
        };
        for reply in [Reply::Accepted, Reply::Rejected] {
            assert_ne!(
                reply_effect(reply, Some(&request), NOW + REQUEST_VALIDITY_MS - 1),
                ReplyEffect::Ignore(IgnoredReply::RequestExpired)
            );
            assert_eq!(
                reply_effect(reply, Some(&request), NOW + REQUEST_VALIDITY_MS),
                ReplyEffect::Ignore(IgnoredReply::RequestExpired)
            );
        }
    }

    #[test]
    fn one_request_per_day() {
        assert_eq!(request_blocked_until(&[], None, NOW), None);
        let asked = [NOW - 2 * 3_600_000];
        assert_eq!(
            request_blocked_until(&asked, None, NOW),
            Some(asked[0] + DAY)
        );
        assert_eq!(request_blocked_until(&asked, None, asked[0] + DAY), None);
    }

    #[test]
    fn two_requests_per_seven_days() {
        let asked = [NOW - 3 * DAY, NOW - 5 * DAY];
        assert_eq!(
            request_blocked_until(&asked, None, NOW),
            Some(NOW - 5 * DAY + 7 * DAY)
        );
        assert_eq!(request_blocked_until(&asked, None, NOW + 2 * DAY), None);
        let old = [NOW - 8 * DAY, NOW - 9 * DAY];
        assert_eq!(request_blocked_until(&old, None, NOW), None);
    }

    #[test]
    fn a_rejection_means_a_day_of_quiet() {
        let rejected = permission(PermissionState::Rejected, NOW - 3_600_000, None);
        assert_eq!(
            request_blocked_until(&[], Some(&rejected), NOW),
            Some(NOW - 3_600_000 + DAY)
        );
        assert_eq!(request_blocked_until(&[], Some(&rejected), NOW + DAY), None);
        let granted = permission(PermissionState::Granted, NOW - 3_600_000, Some(NOW + DAY));
        assert_eq!(request_blocked_until(&[], Some(&granted), NOW), None);
    }

    #[test]
    fn the_latest_constraint_wins() {
        // Spacing allows NOW+22h, the rejection NOW+24h-1s, the 7-day window NOW+24h.
        let rejected = permission(PermissionState::Rejected, NOW - 1000, None);
        let asked = [NOW - 6 * DAY, NOW - 2 * 3_600_000];
        assert_eq!(
            request_blocked_until(&asked, Some(&rejected), NOW),
            Some(NOW + DAY)
        );
        let rejected_late = permission(PermissionState::Rejected, NOW + 1000, None);
        assert_eq!(
            request_blocked_until(&asked, Some(&rejected_late), NOW),
            Some(NOW + 1000 + DAY)
        );
    }
}
