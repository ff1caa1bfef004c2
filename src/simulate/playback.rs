//! Playing the agent's audio the way Twilio does, so that the marks callbridge counts on come
//! back when they would on a real call.
//!
//! Twilio queues every `media` message it is sent and plays the queue in order at 8000 µ-law
//! bytes a second. A `mark` is echoed once all audio queued before it has played (at once when
//! nothing is queued); a `clear` drops whatever has not played yet and echoes every pending mark
//! at once. Positions are samples at 8 kHz since the call started, which is also where each
//! piece of audio lands in the recording of what the caller heard.

use std::collections::VecDeque;

use super::audio;

/// µ-law at 8 kHz: one byte, one sample, 8 a millisecond.
pub const SAMPLES_PER_MS: u64 = 8;

/// What playing the queue did, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Played {
    /// The agent started to be heard (the queue was empty until then).
    SpeechStarted { at: u64 },
    /// A mark to echo: the audio before it has played, or a `clear` flushed it.
    Mark {
        name: String,
        at: u64,
        cleared: bool,
    },
    /// The queue ran dry (or was cleared): the agent was heard from `from` to `to`.
    SpeechEnded { from: u64, to: u64, marks: usize },
    /// A `clear` dropped `dropped` samples that had not played yet.
    Cleared { at: u64, dropped: u64, marks: usize },
}

struct PendingMark {
    name: String,
    /// Where the audio queued before it ends.
    due: u64,
}

#[derive(Default)]
pub struct Playback {
    /// What the caller heard, from the call's start; silence (0) where nothing played.
    heard: Vec<i16>,
    /// Where the queued audio ends: new audio starts playing here, or at once if this is past.
    queue_end: u64,
    pending: VecDeque<PendingMark>,
    /// The running stretch of agent speech: where it started and the marks echoed in it.
    speaking: Option<(u64, usize)>,
    /// Agent audio played so far (ended stretches only).
    played: u64,
}

impl Playback {
    /// Queues µ-law `audio` that arrived at `now`.
    pub fn media(&mut self, now: u64, audio: &[u8]) -> Vec<Played> {
        let mut played = self.advance(now);
        if audio.is_empty() {
            return played;
        }
        let start = self.queue_end.max(now);
        if self.speaking.is_none() {
            self.speaking = Some((start, 0));
            played.push(Played::SpeechStarted { at: start });
        }
        let start_index = index(start);
        let end_index = start_index + audio.len();
        if self.heard.len() < end_index {
            self.heard.resize(end_index, 0);
        }
        for (slot, byte) in self.heard[start_index..end_index].iter_mut().zip(audio) {
            *slot = audio::decode_sample(*byte);
        }
        self.queue_end = start + audio.len() as u64;
        played
    }

    /// A mark that arrived at `now`: echoed once the audio queued so far has played.
    pub fn mark(&mut self, now: u64, name: &str) -> Vec<Played> {
        let mut played = self.advance(now);
        self.pending.push_back(PendingMark {
            name: name.to_owned(),
            due: self.queue_end.max(now),
        });
        played.extend(self.advance(now));
        played
    }

    /// Barge-in: everything not yet played is dropped and every pending mark echoed.
    pub fn clear(&mut self, now: u64) -> Vec<Played> {
        let mut played = self.advance(now);
        let dropped = self.queue_end.saturating_sub(now);
        if dropped > 0 {
            // Nothing but queued agent audio lies past `now`.
            self.heard.truncate(index(now));
            self.queue_end = now;
        }
        let marks = self.pending.len();
        for mark in self.pending.drain(..) {
            played.push(Played::Mark {
                name: mark.name,
                at: now,
                cleared: true,
            });
        }
        played.extend(self.end_speech(now));
        played.push(Played::Cleared {
            at: now,
            dropped,
            marks,
        });
        played
    }

    /// Plays the queue up to `now`: the marks whose audio has played, and the end of the
    /// agent's speech once the queue has run dry.
    pub fn advance(&mut self, now: u64) -> Vec<Played> {
        let mut played = Vec::new();
        while let Some(mark) = self.pending.front() {
            if mark.due > now {
                break;
            }
            let mark = self.pending.pop_front().expect("a front exists");
            if let Some((_, echoed)) = self.speaking.as_mut() {
                *echoed += 1;
            }
            played.push(Played::Mark {
                name: mark.name,
                at: mark.due,
                cleared: false,
            });
        }
        if self.queue_end <= now {
            played.extend(self.end_speech(self.queue_end));
        }
        played
    }

    /// The call is over at `now`: the agent's speech ends there (or where it ran out), and
    /// marks still pending are never echoed, since the stream is gone.
    pub fn hang_up(&mut self, now: u64) -> Option<Played> {
        self.pending.clear();
        self.end_speech(now.min(self.queue_end))
    }

    fn end_speech(&mut self, to: u64) -> Option<Played> {
        let (from, marks) = self.speaking.take()?;
        self.played += to - from;
        Some(Played::SpeechEnded { from, to, marks })
    }

    /// Agent audio the caller has heard, in samples, up to the last stretch that ended.
    pub fn played(&self) -> u64 {
        self.played
    }

    /// When `advance` next has something to report, if ever.
    pub fn next_event(&self) -> Option<u64> {
        let drained = self.speaking.map(|_| self.queue_end);
        match (self.pending.front().map(|mark| mark.due), drained) {
            (Some(mark), Some(drained)) => Some(mark.min(drained)),
            (mark, drained) => mark.or(drained),
        }
    }

    /// What the caller heard over a call of `length` samples: audio still queued when the call
    /// ended was never heard.
    pub fn into_heard(mut self, length: u64) -> Vec<i16> {
        self.heard.resize(index(length), 0);
        self.heard
    }
}

fn index(position: u64) -> usize {
    usize::try_from(position).expect("a call's samples fit in memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// µ-law of a loud constant: decodes to a non-zero sample.
    const LOUD: u8 = 0x10;

    fn names(played: &[Played]) -> Vec<(String, u64, bool)> {
        played
            .iter()
            .filter_map(|event| match event {
                Played::Mark { name, at, cleared } => Some((name.clone(), *at, *cleared)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_mark_is_echoed_when_the_audio_before_it_has_played_at_real_time_pace() {
        let mut playback = Playback::default();
        assert_eq!(
            playback.media(1000, &[LOUD; 800]),
            [Played::SpeechStarted { at: 1000 }]
        );
        assert!(playback.mark(1000, "m1").is_empty(), "100 ms still to play");
        playback.media(1010, &[LOUD; 800]);
        playback.mark(1010, "m2");
        assert_eq!(playback.next_event(), Some(1800));
        assert!(playback.advance(1799).is_empty());
        assert_eq!(names(&playback.advance(1800)), [("m1".into(), 1800, false)]);
        assert_eq!(playback.next_event(), Some(2600));
        assert_eq!(
            playback.advance(3000),
            [
                Played::Mark {
                    name: "m2".into(),
                    at: 2600,
                    cleared: false
                },
                Played::SpeechEnded {
                    from: 1000,
                    to: 2600,
                    marks: 2
                }
            ]
        );
        assert_eq!(playback.next_event(), None);
        assert_eq!(playback.played(), 1600);
        let heard = playback.into_heard(4000);
        assert_eq!(heard.len(), 4000);
        assert!(heard[..1000].iter().all(|&s| s == 0));
        assert!(heard[1000..2600].iter().all(|&s| s != 0));
        assert!(heard[2600..].iter().all(|&s| s == 0));
    }

    #[test]
    fn a_mark_with_nothing_queued_is_echoed_at_once() {
        let mut playback = Playback::default();
        assert_eq!(names(&playback.mark(50, "m0")), [("m0".into(), 50, false)]);
        playback.media(100, &[LOUD; 80]);
        playback.advance(500);
        assert_eq!(
            names(&playback.mark(500, "m1")),
            [("m1".into(), 500, false)]
        );
    }

    #[test]
    fn audio_after_a_gap_starts_when_it_arrives() {
        let mut playback = Playback::default();
        playback.media(0, &[LOUD; 80]);
        let later = playback.media(400, &[LOUD; 80]);
        assert_eq!(
            later,
            [
                Played::SpeechEnded {
                    from: 0,
                    to: 80,
                    marks: 0
                },
                Played::SpeechStarted { at: 400 }
            ]
        );
        let heard = playback.into_heard(480);
        assert!(heard[80..400].iter().all(|&s| s == 0));
        assert!(heard[400..].iter().all(|&s| s != 0));
    }

    #[test]
    fn clear_drops_what_has_not_played_and_echoes_every_pending_mark() {
        let mut playback = Playback::default();
        for n in 0..10 {
            playback.media(0, &[LOUD; 800]);
            playback.mark(0, &format!("m{n}"));
        }
        // 250 ms in: m0 and m1 have played.
        assert_eq!(playback.advance(2000).len(), 2);
        let cleared = playback.clear(2000);
        let echoed = names(&cleared);
        assert_eq!(echoed.len(), 8);
        assert!(
            echoed
                .iter()
                .all(|(_, at, cleared)| *at == 2000 && *cleared)
        );
        assert_eq!(echoed[0].0, "m2");
        assert!(cleared.contains(&Played::SpeechEnded {
            from: 0,
            to: 2000,
            marks: 2
        }));
        assert_eq!(
            cleared.last(),
            Some(&Played::Cleared {
                at: 2000,
                dropped: 6000,
                marks: 8
            })
        );
        assert_eq!(playback.next_event(), None);
        // Audio after the clear plays at once.
        assert_eq!(
            playback.media(2100, &[LOUD; 80]),
            [Played::SpeechStarted { at: 2100 }]
        );
        playback.advance(3000);
        assert_eq!(
            playback.played(),
            2000 + 80,
            "what played before the clear, and after"
        );
        let heard = playback.into_heard(8000);
        assert_eq!(heard.iter().filter(|&&s| s != 0).count(), 2000 + 80);
        assert!(heard[2000..2100].iter().all(|&s| s == 0));
    }

    #[test]
    fn hanging_up_after_the_agent_finished_counts_only_what_played() {
        let mut playback = Playback::default();
        playback.media(0, &[LOUD; 800]);
        assert_eq!(
            playback.hang_up(5000),
            Some(Played::SpeechEnded {
                from: 0,
                to: 800,
                marks: 0
            })
        );
        assert_eq!(playback.played(), 800);
        assert_eq!(playback.hang_up(6000), None);
    }

    #[test]
    fn a_clear_with_nothing_queued_drops_nothing() {
        let mut playback = Playback::default();
        assert_eq!(
            playback.clear(10),
            [Played::Cleared {
                at: 10,
                dropped: 0,
                marks: 0
            }]
        );
    }

    #[test]
    fn audio_still_queued_when_the_call_ends_was_never_heard() {
        let mut playback = Playback::default();
        playback.media(0, &[LOUD; 8000]);
        playback.mark(0, "m1");
        assert_eq!(
            playback.hang_up(4000),
            Some(Played::SpeechEnded {
                from: 0,
                to: 4000,
                marks: 0
            })
        );
        assert_eq!(playback.next_event(), None, "the mark is never echoed");
        assert_eq!(playback.played(), 4000);
        let heard = playback.into_heard(4000);
        assert_eq!(heard.len(), 4000);
        assert!(heard.iter().all(|&s| s != 0));
    }
}
