//! The result of one load run, as printed with `--json` and read back by `loadgen report`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::procfs::Spent;

/// Latency distribution in milliseconds, from an HDR histogram of microsecond samples: exact
/// to three significant digits (1 µs below 2 ms), whatever the number of frames in a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// From samples in microseconds; `None` when there are none.
    pub fn of_micros(samples: impl IntoIterator<Item = u32>) -> Option<Self> {
        let mut histogram =
            Histogram::<u64>::new(SIGNIFICANT_DIGITS).expect("3 significant digits are valid");
        for sample in samples {
            // Auto-resizing: recording only fails for a value no u64 histogram could hold.
            histogram.record(u64::from(sample)).expect("a u32 fits");
        }
        if histogram.is_empty() {
            return None;
        }
        // `value_at_quantile` is nearest rank: the smallest value with at least `p` of all
        // samples at or below it.
        let at = |p: f64| ms(histogram.value_at_quantile(p));
        Some(Self {
            samples: usize::try_from(histogram.len()).unwrap_or(usize::MAX),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: ms(histogram.max()),
        })
    }
}

/// Enough for a 1 µs resolution up to 2 ms and 0.1% relative error beyond.
const SIGNIFICANT_DIGITS: u8 = 3;

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}
/// Calls that did not make it, by the step that failed, with one example message.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Failures {
    pub count: usize,
    pub example: String,
}

/// CPU and memory of one process over the measurement window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessReport {
    pub pid: u32,
    /// CPU time (user + system) in the window ÷ frames that completed their round trip in it.
    pub cpu_us_per_frame: f64,
    pub user_seconds: f64,
    /// Kernel time; on loopback a sender also pays for the receiver's TCP processing.
    pub system_seconds: f64,
    pub frames_in_window: u64,
    /// RSS before the first call, and the highest seen until the window's end.
    pub rss_baseline_kib: u64,
    pub rss_peak_kib: u64,
    /// (peak − baseline) ÷ calls connected.
    pub rss_kib_per_call: f64,
}

impl ProcessReport {
    pub fn new(spent: &Spent, frames: u64, clk_tck: u64, calls: usize) -> Self {
        let seconds = |ticks: u64| ticks as f64 / clk_tck as f64;
        let (user_seconds, system_seconds) =
            (seconds(spent.user_ticks), seconds(spent.system_ticks));
        Self {
            pid: spent.pid,
            cpu_us_per_frame: (user_seconds + system_seconds) * 1e6 / frames.max(1) as f64,
            user_seconds,
            system_seconds,
            frames_in_window: frames,
            rss_baseline_kib: spent.baseline_rss_kib,
            rss_peak_kib: spent.peak_rss_kib,
            rss_kib_per_call: spent.peak_rss_kib.saturating_sub(spent.baseline_rss_kib) as f64
                / calls.max(1) as f64,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `bridge` (through callbridge) or `floor` (straight to the fake Realtime server).
    pub mode: String,
    pub calls: usize,
    pub seconds: f64,
    pub ramp_seconds: f64,
    pub calls_connected: usize,
    pub failed_connects: usize,
    /// Calls whose socket closed or broke before all their frames were sent.
    pub dropped_calls: usize,
    pub failures: BTreeMap<String, Failures>,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub frames_lost: u64,
    /// Frames of a call's first second that never came back (the bridge holds them while
    /// OpenAI connects; none may be dropped).
    pub first_second_lost: u64,
    /// Echoes of a frame already received, or of a frame this call never sent.
    pub duplicates: u64,
    pub misrouted: u64,
    /// The steady state: from the moment every call was connected to the end of the shortest
    /// call's audio, in seconds since the run started.
    pub window_start_s: f64,
    pub window_end_s: f64,
    /// Round trips of frames sent in the window.
    pub rtt: Option<Percentiles>,
    /// Round trips of every frame, ramp-up and each call's first second included.
    pub rtt_all: Option<Percentiles>,
    /// How late the generator sent frames against their 20 ms schedule: if this grows, the
    /// harness itself is saturated and the run says little about the server.
    pub send_lag: Option<Percentiles>,
    /// The `--pid` process: callbridge in a bridge run, the fake in a floor run.
    pub process: Option<ProcessReport>,
    /// The load generator itself, to show how much of the machine the harness took.
    pub harness: Option<ProcessReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of_micros((1..=1000).rev()).unwrap();
        assert_eq!(p.samples, 1000);
        assert_eq!(p.p50_ms, 0.5);
        assert_eq!(p.p90_ms, 0.9);
        assert_eq!(p.p99_ms, 0.99);
        assert_eq!(p.p999_ms, 0.999);
        assert_eq!(p.max_ms, 1.0);
        let one = Percentiles::of_micros([7]).unwrap();
        assert_eq!((one.p50_ms, one.p999_ms), (0.007, 0.007));
        assert_eq!(Percentiles::of_micros([]), None);
        // Beyond 2 ms the histogram keeps three significant digits.
        let slow = Percentiles::of_micros([123_456]).unwrap();
        assert!((slow.max_ms - 123.456).abs() < 0.2, "{slow:?}");
    }
}
