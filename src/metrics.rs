//! Prometheus metrics, held per application instance (not in a global recorder) so that several
//! apps in one test process each count only their own calls. Counters are relaxed atomics: the
//! per-frame path pays one uncontended `fetch_add` and nothing else.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::admission::Occupancy;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds in seconds; chosen around what a caller notices (100 ms to a few seconds).
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Why a bridged call ended; a closed set so it can be a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

impl EndReason {
    pub const ALL: [EndReason; 9] = [
        Self::CallerHungUp,
        Self::AgentFailed,
        Self::AgentUnreachable,
        Self::Timeout,
        Self::Shutdown,
        Self::Unauthorized,
        Self::ProtocolError,
        Self::FrameTooLarge,
        Self::InvalidText,
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
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    pub signature_failures: Counter,
    pub webhooks_refused: Counter,
    pub calls_refused_busy: Counter,
    pub calls_refused_draining: Counter,
    pub calls_started: Counter,
    calls_ended: [Counter; EndReason::ALL.len()],
    pub frames_from_caller: Counter,
    pub frames_to_caller: Counter,
    pub frames_buffered_before_agent: Counter,
    pub frames_dropped_buffer_full: Counter,
    pub barge_ins: Counter,
    pub truncates: Counter,
    pub dropped_interrupted_deltas: Counter,
    pub malformed_from_twilio: Counter,
    pub malformed_from_openai: Counter,
    pub openai_errors: Counter,
    pub store_records_dropped: Counter,
    pub store_transcript_waits: Counter,
    pub store_write_failures: Counter,
    pub openai_connect: Histogram,
    pub first_agent_audio: Histogram,
}

impl Metrics {
    pub fn call_ended(&self, reason: EndReason) {
        self.calls_ended[reason as usize].inc();
    }

    pub fn calls_ended(&self, reason: EndReason) -> u64 {
        self.calls_ended[reason as usize].get()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, occupancy: Occupancy, draining: bool) -> String {
        let mut out = String::with_capacity(4096);
        gauge(
            &mut out,
            "callbridge_live_calls",
            "Calls currently bridged.",
            occupancy.live as u64,
        );
        gauge(
            &mut out,
            "callbridge_pending_streams",
            "Calls answered by /voice whose media stream has not opened yet.",
            occupancy.pending as u64,
        );
        gauge(
            &mut out,
            "callbridge_draining",
            "1 while the server is draining for shutdown.",
            u64::from(draining),
        );
        counter(
            &mut out,
            "callbridge_signature_failures_total",
            "Twilio requests refused for a missing or wrong X-Twilio-Signature.",
            &self.signature_failures,
        );
        counter(
            &mut out,
            "callbridge_webhooks_refused_total",
            "Correctly signed Twilio webhooks refused: fields Twilio would not send (such as a malformed or missing id) or another account's.",
            &self.webhooks_refused,
        );
        let _ = writeln!(
            out,
            "# HELP callbridge_calls_refused_total Calls answered with the busy message."
        );
        let _ = writeln!(out, "# TYPE callbridge_calls_refused_total counter");
        let _ = writeln!(
            out,
            "callbridge_calls_refused_total{{reason=\"capacity\"}} {}",
            self.calls_refused_busy.get()
        );
        let _ = writeln!(
            out,
            "callbridge_calls_refused_total{{reason=\"draining\"}} {}",
            self.calls_refused_draining.get()
        );
        counter(
            &mut out,
            "callbridge_calls_started_total",
            "Media streams that passed the token check and were bridged.",
            &self.calls_started,
        );
        let _ = writeln!(
            out,
            "# HELP callbridge_calls_ended_total Bridged or refused media streams, by why they ended."
        );
        let _ = writeln!(out, "# TYPE callbridge_calls_ended_total counter");
        for reason in EndReason::ALL {
            let _ = writeln!(
                out,
                "callbridge_calls_ended_total{{reason=\"{}\"}} {}",
                reason.label(),
                self.calls_ended(reason)
            );
        }
        counter(
            &mut out,
            "callbridge_frames_from_caller_total",
            "Twilio media frames forwarded to OpenAI.",
            &self.frames_from_caller,
        );
        counter(
            &mut out,
            "callbridge_frames_to_caller_total",
            "OpenAI audio deltas forwarded to Twilio.",
            &self.frames_to_caller,
        );
        counter(
            &mut out,
            "callbridge_frames_buffered_before_agent_total",
            "Caller frames held while the OpenAI session was opening.",
            &self.frames_buffered_before_agent,
        );
        counter(
            &mut out,
            "callbridge_frames_dropped_buffer_full_total",
            "Caller frames dropped because the pre-session buffer was full.",
            &self.frames_dropped_buffer_full,
        );
        counter(
            &mut out,
            "callbridge_barge_ins_total",
            "Times the caller interrupted agent audio.",
            &self.barge_ins,
        );
        counter(
            &mut out,
            "callbridge_truncates_total",
            "conversation.item.truncate events sent.",
            &self.truncates,
        );
        counter(
            &mut out,
            "callbridge_dropped_interrupted_deltas_total",
            "Agent audio deltas dropped because their response was interrupted.",
            &self.dropped_interrupted_deltas,
        );
        let _ = writeln!(
            out,
            "# HELP callbridge_malformed_messages_total Messages that could not be understood, by sender; each was ignored."
        );
        let _ = writeln!(out, "# TYPE callbridge_malformed_messages_total counter");
        let _ = writeln!(
            out,
            "callbridge_malformed_messages_total{{peer=\"twilio\"}} {}",
            self.malformed_from_twilio.get()
        );
        let _ = writeln!(
            out,
            "callbridge_malformed_messages_total{{peer=\"openai\"}} {}",
            self.malformed_from_openai.get()
        );
        counter(
            &mut out,
            "callbridge_openai_errors_total",
            "Error events received from OpenAI Realtime.",
            &self.openai_errors,
        );
        counter(
            &mut out,
            "callbridge_store_records_dropped_total",
            "Call records dropped because the database writer was too far behind.",
            &self.store_records_dropped,
        );
        counter(
            &mut out,
            "callbridge_store_transcript_waits_total",
            "Transcript lines that waited for room in the database writer's queue.",
            &self.store_transcript_waits,
        );
        counter(
            &mut out,
            "callbridge_store_write_failures_total",
            "Records the database refused after retries.",
            &self.store_write_failures,
        );
        histogram(
            &mut out,
            "callbridge_openai_connect_seconds",
            "Time from Twilio's start (token accepted) to the OpenAI session being open: the wait the pre-connect could not hide.",
            &self.openai_connect,
        );
        histogram(
            &mut out,
            "callbridge_first_agent_audio_seconds",
            "Time from Twilio start to the first agent audio sent to the caller.",
            &self.first_agent_audio,
        );
        out
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn counter(out: &mut String, name: &str, help: &str, value: &Counter) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        value.get()
    );
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{bound}\"}} {}",
            bucket.load(Ordering::Relaxed)
        );
    }
    let count = h.count();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(200));
        h.observe(Duration::from_secs(60));
        let metrics = Metrics::default();
        let mut out = String::new();
        histogram(&mut out, "x", "help", &h);
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"));
        assert!(out.contains("x_bucket{le=\"0.25\"} 2\n"));
        assert!(out.contains("x_bucket{le=\"30\"} 2\n"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count 3\n"));
        assert!(out.contains("x_sum 60.203\n"));
        metrics.call_ended(EndReason::Timeout);
        let text = metrics.render(
            Occupancy {
                pending: 2,
                live: 1,
            },
            true,
        );
        assert!(text.contains("callbridge_calls_ended_total{reason=\"timeout\"} 1\n"));
        assert!(text.contains("callbridge_live_calls 1\n"));
        assert!(text.contains("callbridge_pending_streams 2\n"));
        assert!(text.contains("callbridge_draining 1\n"));
    }
}
