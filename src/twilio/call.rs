//! What Twilio's webhooks say about a call: its `CallStatus` and its `Direction`, parsed where a
//! request enters, like the ids in `ids.rs` and for the same reason: a field that took any text
//! could be rewritten by moving text across the separator-free signed string, while a value from
//! a short fixed list is left malformed by every such shift, and the request is refused.
//!
//! The store keeps each as the text Twilio wrote (`as_str`), so that a row reads the same in
//! SQL as in Twilio's console.
//!
//! Hand-written rather than derived (serde's or a crate's): each spelling is written once, in
//! `as_str`, and parsing reuses it, and a refusal names the field and the values it may take,
//! never the rejected text (it may be a folded request's payload), which serde's derived error
//! ("unknown variant `…`") would repeat.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Twilio's `CallStatus`: the status values of the Calls resource, plus `initiated`, which status
/// callbacks report once a REST call leaves the queue. (`answered` is the name of a
/// `StatusCallbackEvent`, not a status: its callback says `in-progress`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallStatus {
    Queued,
    Initiated,
    Ringing,
    InProgress,
    Completed,
    Busy,
    Failed,
    NoAnswer,
    Canceled,
}

/// The stages a call goes through, in order. A status callback never moves a call to an earlier
/// stage: callbacks can arrive out of order, and a late `ringing` must not undo `completed`.
/// Statuses of one stage are ordered by Twilio's `SequenceNumber` instead, so the stage, not the
/// status, carries the order (an `Ord` on the statuses themselves would have to rank, say, `busy`
/// against `canceled`, which the call's life does not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CallProgress {
    /// Created, not yet ringing: `queued`, `initiated`.
    Placed = 0,
    Ringing = 1,
    /// `in-progress`: someone answered.
    Answered = 2,
    /// Over, however it ended: `completed`, `busy`, `failed`, `no-answer`, `canceled`.
    Ended = 3,
}

impl CallProgress {
    /// The number stored beside the status (`calls.status_rank`), so SQL can keep the order.
    /// Existing rows hold these numbers: they must never change.
    pub fn rank(self) -> i64 {
        self as i64
    }
}

impl CallStatus {
    pub const ALL: [Self; 9] = [
        Self::Queued,
        Self::Initiated,
        Self::Ringing,
        Self::InProgress,
        Self::Completed,
        Self::Busy,
        Self::Failed,
        Self::NoAnswer,
        Self::Canceled,
    ];

    /// Exactly as Twilio writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Initiated => "initiated",
            Self::Ringing => "ringing",
            Self::InProgress => "in-progress",
            Self::Completed => "completed",
            Self::Busy => "busy",
            Self::Failed => "failed",
            Self::NoAnswer => "no-answer",
            Self::Canceled => "canceled",
        }
    }

    pub fn progress(self) -> CallProgress {
        match self {
            Self::Queued | Self::Initiated => CallProgress::Placed,
            Self::Ringing => CallProgress::Ringing,
            Self::InProgress => CallProgress::Answered,
            Self::Completed | Self::Busy | Self::Failed | Self::NoAnswer | Self::Canceled => {
                CallProgress::Ended
            }
        }
    }
}

/// Twilio's `Direction` of a call: `inbound` (someone called us), `outbound-api` (placed through
/// the REST API, as `POST /calls` does) or `outbound-dial` (placed by a `<Dial>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    OutboundApi,
    OutboundDial,
}

impl Direction {
    pub const ALL: [Self; 3] = [Self::Inbound, Self::OutboundApi, Self::OutboundDial];

    /// Exactly as Twilio writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::OutboundApi => "outbound-api",
            Self::OutboundDial => "outbound-dial",
        }
    }
}

/// Text that is none of a field's values. Says which field and what it may be, never the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a Twilio {field} ({allowed})")]
pub struct UnknownValue {
    field: &'static str,
    allowed: &'static str,
}

/// The parsing, display and serde impls both enums share, all through `as_str`.
macro_rules! twilio_words {
    ($ty:ty, $field:literal, $allowed:literal) => {
        impl FromStr for $ty {
            type Err = UnknownValue;

            fn from_str(raw: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .into_iter()
                    .find(|value| value.as_str() == raw)
                    .ok_or(UnknownValue {
                        field: $field,
                        allowed: $allowed,
                    })
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(deserializer)?;
                raw.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

twilio_words!(
    CallStatus,
    "CallStatus",
    "queued, initiated, ringing, in-progress, completed, busy, failed, no-answer or canceled"
);
twilio_words!(
    Direction,
    "Direction",
    "inbound, outbound-api or outbound-dial"
);

impl utoipa::PartialSchema for CallStatus {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::routes::string_enum(Self::ALL.map(Self::as_str))
    }
}

impl utoipa::ToSchema for CallStatus {}

impl utoipa::PartialSchema for Direction {
    /// As the API shows it: `""` while no webhook has said.
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::routes::string_enum(std::iter::once("").chain(Self::ALL.map(Self::as_str)))
    }
}

impl utoipa::ToSchema for Direction {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_and_direction_reads_back_from_its_text() {
        for status in CallStatus::ALL {
            assert_eq!(status.as_str().parse(), Ok(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::Value::from(status.as_str())
            );
        }
        for direction in Direction::ALL {
            assert_eq!(direction.as_str().parse(), Ok(direction));
        }
    }

    #[test]
    fn the_stored_ranks_stay_what_existing_rows_hold() {
        let ranks: Vec<_> = CallStatus::ALL
            .iter()
            .map(|status| (status.as_str(), status.progress().rank()))
            .collect();
        assert_eq!(
            ranks,
            [
                ("queued", 0),
                ("initiated", 0),
                ("ringing", 1),
                ("in-progress", 2),
                ("completed", 3),
                ("busy", 3),
                ("failed", 3),
                ("no-answer", 3),
                ("canceled", 3),
            ]
        );
        assert!(CallProgress::Placed < CallProgress::Ringing);
        assert!(CallProgress::Answered < CallProgress::Ended);
    }

    #[test]
    fn anything_else_is_refused_without_repeating_it() {
        for bad in ["", "Completed", "in_progress", "answered", "completed "] {
            let refusal = bad.parse::<CallStatus>().unwrap_err().to_string();
            assert!(
                refusal.starts_with("not a Twilio CallStatus ("),
                "{refusal}"
            );
        }
        for bad in ["", "outbound", "Inbound", "inbound "] {
            let refusal = bad.parse::<Direction>().unwrap_err().to_string();
            assert!(refusal.starts_with("not a Twilio Direction ("), "{refusal}");
        }
        // What a fold leaves in the field, e.g. CallStatus swallowing the Direction after it.
        let folded = "ringingDirectioninbound";
        let refusal = folded.parse::<CallStatus>().unwrap_err().to_string();
        assert!(!refusal.contains(folded), "{refusal}");
    }
}
