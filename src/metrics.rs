//! Prometheus metrics, held per application instance (one `Registry` per `Metrics`, no global
//! recorder) so that several apps in one test process each count only their own calls.
//!
//! Every metric is a typed field. Counters bumped per audio frame are plain counters (one
//! relaxed `fetch_add`, no label lookup); labelled families exist only where the label set is a
//! closed enum, and their series are created once here, so call sites hold a ready counter and
//! never look one up.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::admission::Occupancy;

/// What `GET /metrics` answers with: the OpenMetrics text format `render` produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds in seconds; chosen around what a caller notices (100 ms to a few seconds).
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram fed with `Duration`s and exposed in seconds, so call sites never convert.
#[derive(Clone, Debug)]
pub struct Latency(Histogram);

impl Default for Latency {
    fn default() -> Self {
        Self(latency_histogram())
    }
}

impl Latency {
    pub fn observe(&self, value: Duration) {
        self.0.observe(value.as_secs_f64());
    }

    /// How many durations were observed (the crate exposes it to tests only).
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.0.count()
    }
}

/// Why a bridged call ended; a closed set so it can be a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// Twilio sent `stop` or closed the socket: the caller hung up.
    CallerHungUp,
    /// OpenAI closed its socket or sent a fatal error.
    AgentFailed,
    /// The OpenAI session could not be opened.
    AgentUnreachable,
    /// A peer stopped answering pings.
    Timeout,
    /// Closed by the drain after `DRAIN_TIMEOUT_SECS`.
    Shutdown,
    /// Refused at `start`: bad token or account.
    Unauthorized,
    /// The Twilio socket broke at the WebSocket protocol level.
    ProtocolError,
    /// Twilio's side sent a frame over 64 KiB; the stream was closed with 1009.
    FrameTooLarge,
    /// Twilio's side sent a text frame that is not UTF-8; the stream was closed with 1007.
    InvalidText,
    /// The agent called `end_call`.
    AgentEnded,
    /// The agent called `transfer_call` and Twilio moved the call.
    Transferred,
    /// The agent's `max_call_seconds` was reached.
    MaxDuration,
    /// Nobody answered the agent's check-ins.
    Silence,
}

impl EndReason {
    pub const ALL: [EndReason; 13] = [
        Self::CallerHungUp,
        Self::AgentFailed,
        Self::AgentUnreachable,
        Self::Timeout,
        Self::Shutdown,
        Self::Unauthorized,
        Self::ProtocolError,
        Self::FrameTooLarge,
        Self::InvalidText,
        Self::AgentEnded,
        Self::Transferred,
        Self::MaxDuration,
        Self::Silence,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::CallerHungUp => "caller_hung_up",
            Self::AgentFailed => "agent_failed",
            Self::AgentUnreachable => "agent_unreachable",
            Self::Timeout => "timeout",
            Self::Shutdown => "shutdown",
            Self::Unauthorized => "unauthorized",
            Self::ProtocolError => "protocol_error",
            Self::FrameTooLarge => "frame_too_large",
            Self::InvalidText => "invalid_text",
            Self::AgentEnded => "agent_ended",
            Self::Transferred => "transferred",
            Self::MaxDuration => "max_duration",
            Self::Silence => "silence",
        }
    }
}

// Label values are written by hand rather than derived: the derive writes the variant name
// (`CallerHungUp`), and the exposed values are snake_case (`caller_hung_up`), each type's
// `label()`.
macro_rules! label_value_from_label {
    ($($kind:ty),+) => {$(
        impl EncodeLabelValue for $kind {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                std::fmt::Write::write_str(encoder, self.label())
            }
        }
    )+};
}

label_value_from_label!(EndReason, ToolOutcome, ContextOutcome, DeliveryOutcome);

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndedLabels {
    reason: EndReason,
}

/// Why `/voice` answered with the busy message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum RefusalReason {
    Capacity,
    Draining,
}

impl EncodeLabelValue for RefusalReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        let label = match self {
            Self::Capacity => "capacity",
            Self::Draining => "draining",
        };
        std::fmt::Write::write_str(encoder, label)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    reason: RefusalReason,
}

/// Who sent a message we could not understand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Peer {
    Twilio,
    OpenAi,
}

impl EncodeLabelValue for Peer {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        let label = match self {
            Self::Twilio => "twilio",
            Self::OpenAi => "openai",
        };
        std::fmt::Write::write_str(encoder, label)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MalformedLabels {
    peer: Peer,
}

/// How a tool call ended, for `tool_calls_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ToolOutcome {
    /// A 2xx answer (or a built-in that did its work).
    Ok,
    /// A non-2xx answer.
    Refused,
    Timeout,
    /// The endpoint could not be reached.
    Unreachable,
    /// The agent's arguments were not a JSON object; no request was made.
    InvalidArguments,
    /// The agent named a tool it does not have (counted under the tool name `unknown`).
    UnknownTool,
    /// The call ended before the answer came.
    CallEnded,
}

impl ToolOutcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::InvalidArguments => "invalid_arguments",
            Self::UnknownTool => "unknown_tool",
            Self::CallEnded => "call_ended",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ToolLabels {
    tool: String,
    outcome: ToolOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ToolNameLabels {
    tool: String,
}

/// How a context request ended, for `context_requests_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContextOutcome {
    Ok,
    /// A non-2xx answer, or a body that is not the expected JSON.
    Refused,
    Timeout,
    Unreachable,
}

impl ContextOutcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ContextLabels {
    outcome: ContextOutcome,
}

/// What became of one attempt to deliver an event, for `event_deliveries_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryOutcome {
    /// The business answered 2xx.
    Delivered,
    /// Anything else, or no answer in time: it is tried again later.
    Retried,
    /// As `Retried`, after the last attempt of the delivery window: no more attempts.
    Failed,
    /// The business answered 410 Gone: no more attempts.
    Stopped,
}

impl DeliveryOutcome {
    pub const ALL: [DeliveryOutcome; 4] =
        [Self::Delivered, Self::Retried, Self::Failed, Self::Stopped];

    pub fn label(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Retried => "retried",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

/// `type` is the event's type as stored: only ever one of the types this code writes (or a
/// newer version's, sharing the database), so a bounded set.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeliveryLabels {
    r#type: String,
    outcome: DeliveryOutcome,
}

/// One field per metric. Counters are registered without `_total`: the encoder appends it, so
/// `calls_started` is exposed as `callbridge_calls_started_total`.
pub struct Metrics {
    registry: Registry,
    // Gauges are set at scrape time (`render`) from `Admission::occupancy()` and the drain flag:
    // those are the source of truth and cheap to read, so a snapshot per scrape is exact. Simpler
    // than the alternatives: mirroring every change would put `Metrics` in every place a slot or
    // reservation changes (expiry included), and a custom collector would have to own the
    // `Admission` and `Lifecycle`, which are built after `Metrics`.
    live_calls: Gauge,
    pending_streams: Gauge,
    draining: Gauge,
    pub signature_failures: Counter,
    pub webhooks_refused: Counter,
    /// `calls_refused_total{reason="capacity"}`.
    pub calls_refused_busy: Counter,
    /// `calls_refused_total{reason="draining"}`.
    pub calls_refused_draining: Counter,
    pub calls_started: Counter,
    /// `calls_ended_total{reason=…}`, indexed by `EndReason as usize`.
    calls_ended: [Counter; EndReason::ALL.len()],
    pub frames_from_caller: Counter,
    pub frames_to_caller: Counter,
    pub frames_buffered_before_agent: Counter,
    pub frames_dropped_buffer_full: Counter,
    pub barge_ins: Counter,
    pub truncates: Counter,
    pub dropped_interrupted_deltas: Counter,
    /// `malformed_messages_total{peer="twilio"}`.
    pub malformed_from_twilio: Counter,
    /// `malformed_messages_total{peer="openai"}`.
    pub malformed_from_openai: Counter,
    pub openai_errors: Counter,
    pub store_records_dropped: Counter,
    pub store_transcript_waits: Counter,
    pub store_write_failures: Counter,
    pub openai_connect: Latency,
    pub first_agent_audio: Latency,
    /// Per turn: the caller stopped speaking → the first agent audio after it.
    pub turn_latency: Latency,
    /// Labelled by tool name: the names come from the agents file, a bounded set (a name the
    /// model made up is counted as `unknown`).
    tool_calls: Family<ToolLabels, Counter>,
    tool_duration: Family<ToolNameLabels, Histogram, fn() -> Histogram>,
    context_requests: Family<ContextLabels, Counter>,
    pub dtmf_digits: Counter,
    event_deliveries: Family<DeliveryLabels, Counter>,
    /// Set by the delivery worker after each round from a count in the database, not at scrape
    /// time: a scrape must not wait on the database (nor fail with it), and with Postgres the
    /// count is the shared backlog of every machine, so any machine's value (take the max) is
    /// the whole picture. It lags by at most one poll; 0 on a machine without events.
    pub events_pending: Gauge,
    /// `agent_reconnects_total{outcome="ok"}`.
    pub agent_reconnected: Counter,
    /// `agent_reconnects_total{outcome="failed"}`: every attempt failed; the call ended.
    pub agent_reconnect_failed: Counter,
    /// `session_rollovers_total{outcome="ok"}`: a prepared successor took over an old session.
    pub session_rolled_over: Counter,
    /// `session_rollovers_total{outcome="failed"}`: no successor could be prepared; the old
    /// session ran on.
    pub session_rollover_failed: Counter,
}

impl Default for Metrics {
    /// One registration line per metric, in the order they are exposed (kept unformatted so
    /// each stays one line).
    #[rustfmt::skip]
    fn default() -> Self {
        let mut registry = Registry::with_prefix("callbridge");
        let r = &mut registry;
        let live_calls = register(r, "live_calls", "Calls currently bridged", Gauge::default());
        let pending_streams = register(r, "pending_streams", "Calls answered by /voice whose media stream has not opened yet", Gauge::default());
        let draining = register(r, "draining", "1 while the server is draining for shutdown", Gauge::default());
        let signature_failures = register(r, "signature_failures", "Twilio requests refused for a missing or wrong X-Twilio-Signature", Counter::default());
        let webhooks_refused = register(r, "webhooks_refused", "Correctly signed Twilio webhooks refused: fields Twilio would not send (such as a malformed or missing id) or another account's", Counter::default());
        let calls_refused = register(r, "calls_refused", "Calls answered with the busy message", Family::<RefusedLabels, Counter>::default());
        let calls_started = register(r, "calls_started", "Media streams that passed the token check and were bridged", Counter::default());
        let calls_ended = register(r, "calls_ended", "Bridged or refused media streams, by why they ended", Family::<EndedLabels, Counter>::default());
        let frames_from_caller = register(r, "frames_from_caller", "Twilio media frames forwarded to OpenAI", Counter::default());
        let frames_to_caller = register(r, "frames_to_caller", "OpenAI audio deltas forwarded to Twilio", Counter::default());
        let frames_buffered_before_agent = register(r, "frames_buffered_before_agent", "Caller frames held while the OpenAI session was opening", Counter::default());
        let frames_dropped_buffer_full = register(r, "frames_dropped_buffer_full", "Caller frames dropped because the pre-session buffer was full", Counter::default());
        let barge_ins = register(r, "barge_ins", "Times the caller interrupted agent audio", Counter::default());
        let truncates = register(r, "truncates", "conversation.item.truncate events sent", Counter::default());
        let dropped_interrupted_deltas = register(r, "dropped_interrupted_deltas", "Agent audio deltas dropped because their response was interrupted", Counter::default());
        let malformed = register(r, "malformed_messages", "Messages that could not be understood, by sender; each was ignored", Family::<MalformedLabels, Counter>::default());
        let openai_errors = register(r, "openai_errors", "Error events received from OpenAI Realtime", Counter::default());
        let store_records_dropped = register(r, "store_records_dropped", "Call records dropped because the database writer was too far behind", Counter::default());
        let store_transcript_waits = register(r, "store_transcript_waits", "Records kept at any cost (transcript lines, call starts and ends) that waited for room in the database writer's queue", Counter::default());
        let store_write_failures = register(r, "store_write_failures", "Records the database refused after retries", Counter::default());
        let openai_connect = register_seconds(r, "openai_connect", "Time from Twilio's start (token accepted) to the OpenAI session being open: the wait the pre-connect could not hide");
        let first_agent_audio = register_seconds(r, "first_agent_audio", "Time from Twilio start to the first agent audio sent to the caller");
        let turn_latency = register_seconds(r, "turn_latency", "Per turn, time from the end of the caller's speech (speech_stopped) to the first agent audio sent after it");
        let tool_calls = register(r, "tool_calls", "Function calls made by agents, by tool and outcome", Family::<ToolLabels, Counter>::default());
        let tool_duration = Family::<ToolNameLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        r.register_with_unit("tool_duration", "Time from a function call to its result, by tool", Unit::Seconds, tool_duration.clone());
        let context_requests = register(r, "context_requests", "Context lookups at call start, by outcome", Family::<ContextLabels, Counter>::default());
        let dtmf_digits = register(r, "dtmf_digits", "Keypresses (DTMF digits) received from callers", Counter::default());
        let agent_reconnects = register(r, "agent_reconnects", "OpenAI sessions lost mid-call, by whether a new one took over", Family::<OutcomeLabels, Counter>::default());
        let session_rollovers = register(r, "session_rollovers", "OpenAI sessions replaced before their age cap, by whether a prepared successor took over", Family::<OutcomeLabels, Counter>::default());
        let event_deliveries = register(r, "event_deliveries", "Attempts to deliver events to CALLBRIDGE_EVENTS_URL, by event type and outcome", Family::<DeliveryLabels, Counter>::default());
        let events_pending = register(r, "events_pending", "Events waiting in the outbox for delivery (every machine's, as of the last delivery round)", Gauge::default());
        // Every series of the types this code writes exists from the start, at 0.
        for kind in crate::events::EventType::ALL {
            for outcome in DeliveryOutcome::ALL {
                let _ = event_deliveries.get_or_create_owned(&DeliveryLabels { r#type: kind.as_str().to_owned(), outcome });
            }
        }
        Self {
            registry,
            live_calls,
            pending_streams,
            draining,
            signature_failures,
            webhooks_refused,
            calls_refused_busy: calls_refused.get_or_create_owned(&RefusedLabels {
                reason: RefusalReason::Capacity,
            }),
            calls_refused_draining: calls_refused.get_or_create_owned(&RefusedLabels {
                reason: RefusalReason::Draining,
            }),
            calls_started,
            calls_ended: EndReason::ALL
                .map(|reason| calls_ended.get_or_create_owned(&EndedLabels { reason })),
            frames_from_caller,
            frames_to_caller,
            frames_buffered_before_agent,
            frames_dropped_buffer_full,
            barge_ins,
            truncates,
            dropped_interrupted_deltas,
            malformed_from_twilio: malformed.get_or_create_owned(&MalformedLabels {
                peer: Peer::Twilio,
            }),
            malformed_from_openai: malformed.get_or_create_owned(&MalformedLabels {
                peer: Peer::OpenAi,
            }),
            openai_errors,
            store_records_dropped,
            store_transcript_waits,
            store_write_failures,
            openai_connect,
            first_agent_audio,
            turn_latency,
            tool_calls,
            tool_duration,
            context_requests,
            dtmf_digits,
            event_deliveries,
            events_pending,
            agent_reconnected: agent_reconnects.get_or_create_owned(&OutcomeLabels { outcome: "ok" }),
            agent_reconnect_failed: agent_reconnects.get_or_create_owned(&OutcomeLabels { outcome: "failed" }),
            session_rolled_over: session_rollovers.get_or_create_owned(&OutcomeLabels { outcome: "ok" }),
            session_rollover_failed: session_rollovers.get_or_create_owned(&OutcomeLabels { outcome: "failed" }),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Registers `metric` and returns the handle the application keeps (metrics are shared
/// handles: the clone in the registry and the one returned count the same thing). `help` has
/// no final full stop: the encoder adds one.
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// As `register`, for a latency histogram; the encoder appends `_seconds` to the name.
fn register_seconds(registry: &mut Registry, name: &str, help: &str) -> Latency {
    let latency = Latency::default();
    registry.register_with_unit(name, help, Unit::Seconds, latency.0.clone());
    latency
}

impl Metrics {
    pub fn call_ended(&self, reason: EndReason) {
        self.calls_ended[reason as usize].inc();
    }

    pub fn calls_ended(&self, reason: EndReason) -> u64 {
        self.calls_ended[reason as usize].get()
    }

    pub fn tool_called(&self, tool: &str, outcome: ToolOutcome, took: Duration) {
        self.tool_calls
            .get_or_create(&ToolLabels {
                tool: tool.to_owned(),
                outcome,
            })
            .inc();
        self.tool_duration
            .get_or_create(&ToolNameLabels {
                tool: tool.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn context_requested(&self, outcome: ContextOutcome) {
        self.context_requests
            .get_or_create(&ContextLabels { outcome })
            .inc();
    }

    pub fn event_delivered(&self, event_type: &str, outcome: DeliveryOutcome) {
        self.event_deliveries
            .get_or_create(&DeliveryLabels {
                r#type: event_type.to_owned(),
                outcome,
            })
            .inc();
    }

    pub fn event_deliveries(&self, event_type: &str, outcome: DeliveryOutcome) -> u64 {
        self.event_deliveries
            .get_or_create(&DeliveryLabels {
                r#type: event_type.to_owned(),
                outcome,
            })
            .get()
    }

    /// OpenMetrics text format (`CONTENT_TYPE`), ending with `# EOF`. Fails only if a metric
    /// cannot be encoded, which writing into a `String` never causes.
    pub fn render(&self, occupancy: Occupancy, draining: bool) -> Result<String, std::fmt::Error> {
        self.live_calls.set(gauge_value(occupancy.live));
        self.pending_streams.set(gauge_value(occupancy.pending));
        self.draining.set(i64::from(draining));
        let mut out = String::with_capacity(8192);
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(metrics: &Metrics) -> String {
        metrics.render(Occupancy::default(), false).unwrap()
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_in_seconds() {
        let metrics = Metrics::default();
        metrics.openai_connect.observe(Duration::from_millis(3));
        metrics.openai_connect.observe(Duration::from_millis(200));
        metrics.openai_connect.observe(Duration::from_secs(60));
        let text = render(&metrics);
        let name = "callbridge_openai_connect_seconds";
        assert!(
            text.contains(&format!("# TYPE {name} histogram\n")),
            "{text}"
        );
        assert!(text.contains(&format!("{name}_bucket{{le=\"0.005\"}} 1\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"0.1\"}} 1\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"0.25\"}} 2\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"30.0\"}} 2\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 3\n")));
        assert!(text.contains(&format!("{name}_count 3\n")));
        let sum: f64 = sample(&text, &format!("{name}_sum")).parse().unwrap();
        assert!((sum - 60.203).abs() < 1e-9, "{sum}");
        assert_eq!(
            text.matches(&format!("{name}_bucket{{")).count(),
            LATENCY_BUCKETS.len() + 1,
            "every configured bound and +Inf"
        );
    }

    #[test]
    fn calls_ended_are_counted_per_reason_and_every_reason_is_exposed() {
        let metrics = Metrics::default();
        metrics.call_ended(EndReason::Timeout);
        metrics.call_ended(EndReason::Timeout);
        metrics.call_ended(EndReason::CallerHungUp);
        assert_eq!(metrics.calls_ended(EndReason::Timeout), 2);
        let text = render(&metrics);
        for reason in EndReason::ALL {
            let expected = match reason {
                EndReason::Timeout => 2,
                EndReason::CallerHungUp => 1,
                _ => 0,
            };
            let series = format!(
                "callbridge_calls_ended_total{{reason=\"{}\"}}",
                reason.label()
            );
            assert_eq!(sample(&text, &series), expected.to_string(), "{series}");
        }
    }

    #[test]
    fn labelled_counters_expose_their_label_values() {
        let metrics = Metrics::default();
        metrics.calls_refused_busy.inc();
        metrics.calls_refused_draining.inc();
        metrics.calls_refused_draining.inc();
        metrics.malformed_from_openai.inc();
        let text = render(&metrics);
        assert_eq!(
            sample(&text, "callbridge_calls_refused_total{reason=\"capacity\"}"),
            "1"
        );
        assert_eq!(
            sample(&text, "callbridge_calls_refused_total{reason=\"draining\"}"),
            "2"
        );
        assert_eq!(
            sample(
                &text,
                "callbridge_malformed_messages_total{peer=\"twilio\"}"
            ),
            "0"
        );
        assert_eq!(
            sample(
                &text,
                "callbridge_malformed_messages_total{peer=\"openai\"}"
            ),
            "1"
        );
    }

    #[test]
    fn gauges_are_the_occupancy_and_drain_state_at_scrape_time() {
        let metrics = Metrics::default();
        let text = metrics
            .render(
                Occupancy {
                    pending: 2,
                    live: 1,
                },
                true,
            )
            .unwrap();
        assert!(
            text.contains("# TYPE callbridge_live_calls gauge\n"),
            "{text}"
        );
        assert_eq!(sample(&text, "callbridge_live_calls"), "1");
        assert_eq!(sample(&text, "callbridge_pending_streams"), "2");
        assert_eq!(sample(&text, "callbridge_draining"), "1");
        // The next scrape reflects the new occupancy, not what an earlier scrape saw.
        let text = metrics
            .render(
                Occupancy {
                    pending: 0,
                    live: 3,
                },
                false,
            )
            .unwrap();
        assert_eq!(sample(&text, "callbridge_live_calls"), "3");
        assert_eq!(sample(&text, "callbridge_pending_streams"), "0");
        assert_eq!(sample(&text, "callbridge_draining"), "0");
    }

    #[test]
    fn every_documented_sample_is_exposed_and_the_exposition_ends_with_eof() {
        let text = render(&Metrics::default());
        for name in [
            "callbridge_live_calls",
            "callbridge_pending_streams",
            "callbridge_draining",
            "callbridge_signature_failures_total",
            "callbridge_webhooks_refused_total",
            "callbridge_calls_started_total",
            "callbridge_frames_from_caller_total",
            "callbridge_frames_to_caller_total",
            "callbridge_frames_buffered_before_agent_total",
            "callbridge_frames_dropped_buffer_full_total",
            "callbridge_barge_ins_total",
            "callbridge_truncates_total",
            "callbridge_dropped_interrupted_deltas_total",
            "callbridge_openai_errors_total",
            "callbridge_store_records_dropped_total",
            "callbridge_store_transcript_waits_total",
            "callbridge_store_write_failures_total",
            "callbridge_openai_connect_seconds_count",
            "callbridge_first_agent_audio_seconds_count",
            "callbridge_events_pending",
            "callbridge_event_deliveries_total{type=\"call.ended\",outcome=\"failed\"}",
            "callbridge_event_deliveries_total{type=\"call_permission.updated\",outcome=\"delivered\"}",
        ] {
            assert_eq!(sample(&text, name), "0", "{name}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            !text.contains("..\n"),
            "help texts end with one full stop: {text}"
        );
    }

    #[test]
    fn event_deliveries_are_counted_by_type_and_outcome() {
        let metrics = Metrics::default();
        metrics.event_delivered("call.ended", DeliveryOutcome::Retried);
        metrics.event_delivered("call.ended", DeliveryOutcome::Retried);
        metrics.event_delivered("call.started", DeliveryOutcome::Delivered);
        metrics.events_pending.set(3);
        assert_eq!(
            metrics.event_deliveries("call.ended", DeliveryOutcome::Retried),
            2
        );
        let text = render(&metrics);
        assert_eq!(
            sample(
                &text,
                "callbridge_event_deliveries_total{type=\"call.ended\",outcome=\"retried\"}"
            ),
            "2"
        );
        assert_eq!(
            sample(
                &text,
                "callbridge_event_deliveries_total{type=\"call.started\",outcome=\"delivered\"}"
            ),
            "1"
        );
        assert_eq!(sample(&text, "callbridge_events_pending"), "3");
    }

    #[test]
    fn each_instance_counts_only_its_own_events() {
        let first = Metrics::default();
        let second = Metrics::default();
        first.frames_from_caller.inc();
        first.call_ended(EndReason::Shutdown);
        assert_eq!(
            sample(&render(&first), "callbridge_frames_from_caller_total"),
            "1"
        );
        assert_eq!(
            sample(&render(&second), "callbridge_frames_from_caller_total"),
            "0"
        );
        assert_eq!(second.calls_ended(EndReason::Shutdown), 0);
    }

    /// The value of the one sample named exactly `series` (name plus labels, if any).
    fn sample<'t>(text: &'t str, series: &str) -> &'t str {
        let mut values = text
            .lines()
            .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '));
        let value = values
            .next()
            .unwrap_or_else(|| panic!("no {series} in\n{text}"));
        assert!(values.next().is_none(), "{series} appears twice");
        value
    }
}
