//! How long the caller waited, per call: for the OpenAI session to open, for the agent's first
//! audio, and at every turn from the end of their speech to the agent's answer. Kept in the
//! call core (times come in as arguments) and stored with the call's end.

use std::time::{Duration, Instant};

use crate::store::models::CallLatency;

/// A call's turn latencies kept for its p50 and max; a longer call's later turns still count
/// toward the histogram in `/metrics`, just not toward its own p50.
const MAX_TURNS_KEPT: usize = 4096;

#[derive(Debug, Default)]
pub struct Latencies {
    openai_connect: Option<Duration>,
    first_agent_audio: Option<Duration>,
    /// When the caller last stopped speaking, while no agent audio has answered it yet.
    turn_ended_at: Option<Instant>,
    turns: Vec<Duration>,
    turn_count: u64,
}

impl Latencies {
    /// The first session opened, `after` the stream started. A reconnect's session is not the
    /// wait the caller had at the start, so only the first counts.
    pub fn session_opened(&mut self, after: Duration) {
        self.openai_connect.get_or_insert(after);
    }

    pub fn speech_started(&mut self) {
        // The caller goes on: the turn ends when they stop again.
        self.turn_ended_at = None;
    }

    pub fn speech_stopped(&mut self, now: Instant) {
        self.turn_ended_at = Some(now);
    }

    /// Agent audio went to the caller, `since_start` into the stream. Returns the turn's
    /// latency when this audio is the answer to the caller's last turn.
    pub fn agent_audio_sent(&mut self, now: Instant, since_start: Duration) -> Option<Duration> {
        self.first_agent_audio.get_or_insert(since_start);
        let ended_at = self.turn_ended_at.take()?;
        let latency = now.saturating_duration_since(ended_at);
        self.turn_count += 1;
        if self.turns.len() < MAX_TURNS_KEPT {
            self.turns.push(latency);
        }
        Some(latency)
    }

    /// What the call's record keeps: milliseconds, the median turn (the lower one of an even
    /// count) and the slowest.
    pub fn summary(&self) -> CallLatency {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let mut turns = self.turns.clone();
        turns.sort_unstable();
        CallLatency {
            openai_connect_ms: self.openai_connect.map(ms),
            first_agent_audio_ms: self.first_agent_audio.map(ms),
            turns: i64::try_from(self.turn_count).unwrap_or(i64::MAX),
            turn_p50_ms: turns
                .get(turns.len().saturating_sub(1) / 2)
                .copied()
                .map(ms),
            turn_max_ms: turns.last().copied().map(ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn each_turn_runs_from_the_last_end_of_speech_to_the_first_audio_after_it() {
        let start = Instant::now();
        let mut latencies = Latencies::default();
        latencies.session_opened(300 * MS);
        latencies.session_opened(900 * MS);
        // The greeting is the first audio, but answers no turn.
        assert_eq!(latencies.agent_audio_sent(start, 1200 * MS), None);
        // The caller pauses, goes on, then stops: the turn counts from the last stop.
        latencies.speech_stopped(start + 2000 * MS);
        latencies.speech_started();
        latencies.speech_stopped(start + 3000 * MS);
        assert_eq!(
            latencies.agent_audio_sent(start + 3600 * MS, 3600 * MS),
            Some(600 * MS)
        );
        // The rest of that answer is not another turn.
        assert_eq!(
            latencies.agent_audio_sent(start + 3700 * MS, 3700 * MS),
            None
        );
        for (stop, answer) in [(5000, 5400), (7000, 8000), (9000, 9200)] {
            latencies.speech_stopped(start + stop * MS);
            latencies.agent_audio_sent(start + answer * MS, answer * MS);
        }
        assert_eq!(
            latencies.summary(),
            CallLatency {
                openai_connect_ms: Some(300),
                first_agent_audio_ms: Some(1200),
                turns: 4,
                // 200, 400, 600, 1000: the lower median.
                turn_p50_ms: Some(400),
                turn_max_ms: Some(1000),
            }
        );
    }

    #[test]
    fn a_call_without_turns_has_no_turn_figures() {
        let summary = Latencies::default().summary();
        assert_eq!(summary, CallLatency::default());
        assert_eq!(summary.turn_p50_ms, None);
    }
}
