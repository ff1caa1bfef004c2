//! What the store reads and writes, shaped for the JSON API.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Serialize, Serializer};

use crate::events::DeliveryStatus;
use crate::twilio::call::{CallStatus, Direction};

/// A status callback from Twilio, as stored.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    pub call_sid: String,
    pub status: CallStatus,
    pub sequence_number: Option<i64>,
    pub duration_secs: Option<i64>,
    /// `None` when the callback did not say.
    pub direction: Option<Direction>,
    pub from: String,
    pub to: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CallRecord {
    pub call_sid: String,
    pub stream_sid: Option<String>,
    /// `None` while no webhook has said; shown as `""`, as it is stored.
    #[serde(serialize_with = "direction_or_empty")]
    #[schema(value_type = Direction)]
    pub direction: Option<Direction>,
    pub from: String,
    pub to: String,
    pub agent: Option<String>,
    pub status: CallStatus,
    pub created_at_ms: i64,
    pub answered_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    pub duration_secs: Option<i64>,
    pub end_reason: Option<String>,
    pub openai_session_id: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    /// The same tokens by kind, each of which has its own price.
    pub usage: TokenUsage,
    /// The model the call's sessions ran, once it has ended.
    pub model: Option<String>,
    /// The estimated cost in dollars from the built-in price table; `null` while the call
    /// runs and for a model without known prices.
    #[serde(serialize_with = "micro_usd_as_dollars")]
    #[schema(value_type = Option<f64>)]
    pub cost_usd: Option<i64>,
    pub latency: CallLatency,
}

/// A call's tokens by kind, summed over all its OpenAI sessions. The input counts include the
/// cached ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TokenUsage {
    pub input_text_tokens: i64,
    pub input_audio_tokens: i64,
    pub input_cached_text_tokens: i64,
    pub input_cached_audio_tokens: i64,
    pub output_text_tokens: i64,
    pub output_audio_tokens: i64,
}

/// How long the caller waited, in milliseconds: for the first OpenAI session to open and for
/// the first agent audio (both from the stream's start), and per turn from the end of their
/// speech to the first agent audio after it (median and slowest of `turns`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CallLatency {
    pub openai_connect_ms: Option<i64>,
    pub first_agent_audio_ms: Option<i64>,
    pub turns: i64,
    pub turn_p50_ms: Option<i64>,
    pub turn_max_ms: Option<i64>,
}

/// Micro-dollars are stored as integers (the schema shares no decimal type between the two
/// databases) and shown as dollars.
#[allow(clippy::cast_precision_loss, clippy::ref_option)]
fn micro_usd_as_dollars<S: Serializer>(
    micro: &Option<i64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match micro {
        Some(micro) => serializer.serialize_f64(*micro as f64 / 1_000_000.0),
        None => serializer.serialize_none(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CallEvent {
    /// `status`, `stream`, `tool_call`, `dtmf`, `context_failed`, `openai_error`, …
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub sequence_number: Option<i64>,
    pub detail: Option<String>,
    /// Structured details, for the events that have them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StoredLine {
    pub sequence: i64,
    pub speaker: String,
    pub text: String,
    pub offset_ms: i64,
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CallDetail {
    pub call: CallRecord,
    pub events: Vec<CallEvent>,
    pub transcript: Vec<StoredLine>,
}

fn direction_or_empty<S: Serializer>(
    direction: &Option<Direction>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(direction.map_or("", Direction::as_str))
}

/// Position in the newest-first list; opaque to API clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at_ms: i64,
    pub call_sid: String,
}

impl ListCursor {
    pub fn after(call: &CallRecord) -> Self {
        Self {
            created_at_ms: call.created_at_ms,
            call_sid: call.call_sid.clone(),
        }
    }

    pub fn encode(&self) -> String {
        encode_position(self.created_at_ms, &self.call_sid)
    }

    pub fn decode(raw: &str) -> Option<Self> {
        let (created_at_ms, call_sid) = decode_position(raw)?;
        Some(Self {
            created_at_ms,
            call_sid,
        })
    }
}

/// A newest-first position, `(time, key)`, as an opaque token: clients hand it back and never
/// build one.
fn encode_position(at_ms: i64, key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{at_ms}:{key}"))
}

fn decode_position(raw: &str) -> Option<(i64, String)> {
    let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (at, key) = text.split_once(':')?;
    Some((at.parse().ok()?, key.to_owned()))
}

/// One event for the business and how its delivery stands, for the API.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EventDelivery {
    /// The `webhook-id` every attempt carries (`msg_…`).
    pub id: String,
    /// `call.started`, `call.ended`, `call_permission.updated`.
    #[serde(rename = "type")]
    pub event_type: String,
    pub status: DeliveryStatus,
    /// Attempts made since the event was written (or last retried by hand).
    pub attempts: i64,
    pub created_at_ms: i64,
    /// When the next attempt is due; `None` once the event is delivered, failed or stopped.
    pub next_attempt_at_ms: Option<i64>,
    /// Why the last attempt failed (a status, a timeout, a network error).
    pub last_error: Option<String>,
    /// The HTTP status of the last answer, if one came.
    pub last_status: Option<u16>,
    pub delivered_at_ms: Option<i64>,
}

/// Position in the newest-first list of events; opaque to API clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventCursor {
    pub created_at_ms: i64,
    pub id: String,
}

impl EventCursor {
    pub fn after(event: &EventDelivery) -> Self {
        Self {
            created_at_ms: event.created_at_ms,
            id: event.id.clone(),
        }
    }

    pub fn encode(&self) -> String {
        encode_position(self.created_at_ms, &self.id)
    }

    pub fn decode(raw: &str) -> Option<Self> {
        let (created_at_ms, id) = decode_position(raw)?;
        Some(Self { created_at_ms, id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_rejected() {
        let cursor = ListCursor {
            created_at_ms: 1_700_000_000_123,
            call_sid: "CA1".into(),
        };
        assert_eq!(ListCursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(ListCursor::decode("!!"), None);
        assert_eq!(ListCursor::decode(&URL_SAFE_NO_PAD.encode("x:CA1")), None);
        assert_eq!(ListCursor::decode(&URL_SAFE_NO_PAD.encode("12")), None);
    }

    #[test]
    fn event_cursors_round_trip() {
        let cursor = EventCursor {
            created_at_ms: 1_700_000_000_123,
            id: "msg_0123abcd".into(),
        };
        assert_eq!(EventCursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(EventCursor::decode("!!"), None);
        assert_eq!(
            EventCursor::decode(&URL_SAFE_NO_PAD.encode("x:msg_1")),
            None
        );
    }
}
