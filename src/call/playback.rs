//! The playback ledger behind barge-in.
//!
//! OpenAI generates audio faster than real time, so Twilio may hold seconds of it when the
//! caller starts talking. Only Twilio knows what was played, and it tells us through mark
//! echoes: after every forwarded delta we send a uniquely numbered mark, and its echo means the
//! audio before it has played. A `clear` makes Twilio echo every pending mark at once, so those
//! echoes must not count as played. Everything is measured in µ-law bytes (8 bytes = 1 ms), from
//! base64 lengths, never from wall clocks.

use std::collections::VecDeque;
use std::fmt;

use crate::openai::events::AudioRef;

/// µ-law at 8 kHz mono: one byte per sample.
pub const BYTES_PER_MS: u64 = 8;

/// Audio after the last echoed mark that the caller has probably heard too: 50 ms.
const SLACK_BYTES: u64 = 50 * BYTES_PER_MS;

/// Responses interrupted but not yet `response.done`; a handful at most in a sane call.
const MAX_DISCARDED: usize = 32;
const MAX_TRUNCATED: usize = 8;

/// The name of a mark we sent: `m{sequence}`, unique within a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkName(pub u64);

impl MarkName {
    pub fn parse(name: &str) -> Option<Self> {
        name.strip_prefix('m')?.parse().ok().map(Self)
    }
}

impl fmt::Display for MarkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "m{}", self.0)
    }
}

/// Decoded length of a base64 string, without decoding it.
pub fn base64_decoded_len(encoded: &str) -> u64 {
    let bytes = encoded.as_bytes();
    let padding = bytes
        .iter()
        .rev()
        .take(2)
        .take_while(|&&b| b == b'=')
        .count();
    ((bytes.len() / 4 * 3).saturating_sub(padding)) as u64
}

/// One assistant audio content part, from its first delta until Twilio confirms it fully played.
#[derive(Debug)]
struct PlayItem {
    serial: u64,
    response_id: String,
    item_id: String,
    content_index: u32,
    sent_bytes: u64,
    played_bytes: u64,
    /// The agent's line for this item, already recorded in full, kept until we know how much
    /// of it was heard: `(line sequence, text)`.
    transcript: Option<(u32, String)>,
}

impl PlayItem {
    /// A correction for the held line, if the caller heard less than all of it by `heard_ms`.
    fn correct_transcript(&mut self, heard_ms: u64) -> Option<LineCorrection> {
        let (sequence, text) = self.transcript.take()?;
        let (text, truncated) = cut_to_share(text, heard_ms, self.sent_bytes / BYTES_PER_MS);
        truncated.then_some(LineCorrection {
            sequence,
            text,
            truncated,
        })
    }

    fn is(&self, audio: &AudioRef<'_>) -> bool {
        self.content_index == audio.content_index
            && self.item_id == audio.item_id
            && self.response_id == audio.response_id
    }
}

#[derive(Debug)]
enum MarkKind {
    /// Echo means the item has played up to `end_bytes`.
    Audio { end_bytes: u64 },
    /// Echo means the item has played to its end.
    Done,
}

#[derive(Debug)]
struct PendingMark {
    seq: u64,
    item_serial: u64,
    kind: MarkKind,
}

/// An item cut short, remembered until its transcript arrives so the transcript can be cut too.
#[derive(Debug)]
struct TruncatedItem {
    item_id: String,
    played_ms: u64,
    generated_bytes: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Truncation {
    pub item_id: String,
    pub content_index: u32,
    pub audio_end_ms: u64,
}

/// What to send when the caller barges in.
#[derive(Debug, PartialEq, Eq)]
pub struct Interruption {
    /// Send Twilio `clear`: there is agent audio at Twilio that has not played.
    pub clear: bool,
    /// Send `response.cancel`: a response is generating and the session will not cancel it.
    pub cancel: bool,
    pub truncations: Vec<Truncation>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum MarkEcho {
    /// Audio before the mark has played.
    Played,
    /// An item has played to its end and left the ledger.
    Finished,
    /// An echo caused by our `clear`: the audio was flushed, not played.
    Cleared,
    /// Not a mark we have pending (a duplicate, or not one of ours).
    Unknown,
}

#[derive(Debug, Default)]
pub struct Playback {
    items: Vec<PlayItem>,
    pending_marks: VecDeque<PendingMark>,
    next_seq: u64,
    next_serial: u64,
    /// Every mark numbered up to here was flushed by a `clear` unless already echoed.
    cleared_through: Option<u64>,
    active_response: Option<String>,
    discarded: Vec<String>,
    truncated: Vec<TruncatedItem>,
    /// Recorded agent lines that turned out to be cut short.
    corrections: Vec<LineCorrection>,
}

/// A recorded agent line replaced by what the caller actually heard of it.
#[derive(Debug, PartialEq, Eq)]
pub struct LineCorrection {
    pub sequence: u32,
    pub text: String,
    pub truncated: bool,
}

impl Playback {
    pub fn response_created(&mut self, response_id: &str) {
        self.active_response = Some(response_id.to_owned());
    }

    pub fn response_done(&mut self, response_id: &str) {
        if self.active_response.as_deref() == Some(response_id) {
            self.active_response = None;
        }
        // No delta can follow `response.done`, so its id need not be remembered any longer.
        self.discarded.retain(|id| id != response_id);
    }

    /// Whether Twilio still holds agent audio the caller has not heard: a mark sent after it
    /// has not come back.
    pub fn has_unplayed_audio(&self) -> bool {
        !self.pending_marks.is_empty()
    }

    pub fn is_discarded(&self, response_id: &str) -> bool {
        self.discarded.iter().any(|id| id == response_id)
    }

    /// Accounts a delta of `bytes` µ-law bytes. Returns the mark to send after forwarding it,
    /// or `None` when the delta belongs to an interrupted response and must be dropped.
    pub fn on_delta(&mut self, audio: &AudioRef<'_>, bytes: u64) -> Option<MarkName> {
        if self.is_discarded(&audio.response_id) {
            if let Some(t) = self
                .truncated
                .iter_mut()
                .find(|t| t.item_id == audio.item_id)
            {
                t.generated_bytes += bytes;
            }
            return None;
        }
        let index = match self.items.iter().rposition(|item| item.is(audio)) {
            Some(index) => index,
            None => {
                self.next_serial += 1;
                self.items.push(PlayItem {
                    serial: self.next_serial,
                    response_id: audio.response_id.to_string(),
                    item_id: audio.item_id.to_string(),
                    content_index: audio.content_index,
                    sent_bytes: 0,
                    played_bytes: 0,
                    transcript: None,
                });
                self.items.len() - 1
            }
        };
        let item = &mut self.items[index];
        item.sent_bytes += bytes;
        let end_bytes = item.sent_bytes;
        let serial = item.serial;
        Some(self.push_mark(serial, MarkKind::Audio { end_bytes }))
    }

    /// The agent finished generating this item: send one more mark whose echo means "all heard".
    pub fn on_audio_done(&mut self, audio: &AudioRef<'_>) -> Option<MarkName> {
        let serial = self.items.iter().find(|item| item.is(audio))?.serial;
        Some(self.push_mark(serial, MarkKind::Done))
    }

    fn push_mark(&mut self, item_serial: u64, kind: MarkKind) -> MarkName {
        self.next_seq += 1;
        self.pending_marks.push_back(PendingMark {
            seq: self.next_seq,
            item_serial,
            kind,
        });
        MarkName(self.next_seq)
    }

    pub fn on_mark(&mut self, name: &str) -> MarkEcho {
        let Some(MarkName(seq)) = MarkName::parse(name) else {
            return MarkEcho::Unknown;
        };
        // Marks are numbered consecutively and leave only from the front (or all at once on a
        // clear), so the pending ones are exactly the range front..=back.
        let pending = match (self.pending_marks.front(), self.pending_marks.back()) {
            (Some(first), Some(last)) => (first.seq..=last.seq).contains(&seq),
            _ => false,
        };
        if !pending {
            return match self.cleared_through {
                Some(through) if seq <= through => MarkEcho::Cleared,
                _ => MarkEcho::Unknown,
            };
        }
        // Twilio plays in order, so an echo also vouches for any earlier mark it skipped.
        let mut outcome = MarkEcho::Played;
        while let Some(mark) = self.pending_marks.pop_front() {
            let position = self.items.iter().position(|i| i.serial == mark.item_serial);
            match (mark.kind, position) {
                (MarkKind::Audio { end_bytes }, Some(i)) => {
                    let item = &mut self.items[i];
                    item.played_bytes = item.played_bytes.max(end_bytes);
                }
                (MarkKind::Done, Some(i)) => {
                    // Heard to the end: the line as recorded stands.
                    self.items.remove(i);
                    outcome = MarkEcho::Finished;
                }
                (_, None) => {}
            }
            if mark.seq == seq {
                break;
            }
        }
        outcome
    }

    /// The caller started speaking. `None` when the agent is silent: nothing to interrupt.
    pub fn interrupt(&mut self, session_auto_interrupts: bool) -> Option<Interruption> {
        let unplayed = self
            .items
            .iter()
            .any(|item| item.played_bytes < item.sent_bytes);
        if !unplayed && self.active_response.is_none() {
            return None;
        }
        let mut truncations = Vec::with_capacity(self.items.len());
        for item in self.items.iter_mut().filter(|item| item.sent_bytes > 0) {
            let audio_end_ms = item.sent_bytes.min(item.played_bytes + SLACK_BYTES) / BYTES_PER_MS;
            truncations.push(Truncation {
                item_id: item.item_id.clone(),
                content_index: item.content_index,
                audio_end_ms,
            });
            match item.transcript.is_some() {
                true => self
                    .corrections
                    .extend(item.correct_transcript(audio_end_ms)),
                // The transcript is still to come: remember how much was heard.
                false => remember_bounded(
                    &mut self.truncated,
                    TruncatedItem {
                        item_id: item.item_id.clone(),
                        played_ms: audio_end_ms,
                        generated_bytes: item.sent_bytes,
                    },
                    MAX_TRUNCATED,
                ),
            }
        }
        let active = self.active_response.take();
        let cancel = active.is_some() && !session_auto_interrupts;
        let interrupted = active
            .into_iter()
            .chain(self.items.iter().map(|item| item.response_id.clone()));
        for response_id in interrupted {
            if !self.is_discarded(&response_id) {
                remember_bounded(&mut self.discarded, response_id, MAX_DISCARDED);
            }
        }
        self.items.clear();
        self.pending_marks.clear();
        if self.next_seq > 0 {
            self.cleared_through = Some(self.next_seq);
        }
        Some(Interruption {
            clear: unplayed,
            cancel,
            truncations,
        })
    }

    /// The agent's transcript for `item_id`, to be recorded now as line `sequence`: cut to
    /// what was heard if the item was already interrupted. If its audio is still playing, the
    /// line is recorded in full and remembered, and a `LineCorrection` follows if the caller
    /// ends up hearing less (recording at once is what makes the line durable).
    pub fn agent_transcript(
        &mut self,
        item_id: &str,
        transcript: String,
        sequence: u32,
    ) -> (String, bool) {
        if let Some(index) = self.truncated.iter().position(|t| t.item_id == item_id) {
            let truncated = self.truncated.remove(index);
            let generated_ms = truncated.generated_bytes / BYTES_PER_MS;
            return cut_to_share(transcript, truncated.played_ms, generated_ms);
        }
        if let Some(item) = self.items.iter_mut().find(|item| item.item_id == item_id) {
            item.transcript = Some((sequence, transcript.clone()));
        }
        (transcript, false)
    }

    /// Corrections to recorded agent lines, in the order they became known.
    pub fn take_corrections(&mut self) -> Vec<LineCorrection> {
        std::mem::take(&mut self.corrections)
    }

    /// The call is over: lines whose audio was still playing are cut to what had been heard.
    pub fn finish(&mut self) -> Vec<LineCorrection> {
        let mut corrections = std::mem::take(&mut self.corrections);
        for item in &mut self.items {
            let heard_ms = item.played_bytes / BYTES_PER_MS;
            corrections.extend(item.correct_transcript(heard_ms));
        }
        corrections
    }
}

fn remember_bounded<T>(list: &mut Vec<T>, value: T, max: usize) {
    if list.len() == max {
        list.remove(0);
    }
    list.push(value);
}

/// Keeps the first `played / generated` of the text, ending at a word boundary. Speech rate is
/// close enough to uniform within one utterance for this to match what the caller heard.
pub fn cut_to_share(text: String, played_ms: u64, generated_ms: u64) -> (String, bool) {
    if generated_ms == 0 || played_ms >= generated_ms {
        return (text, false);
    }
    let chars = text.chars().count() as u64;
    let keep = usize::try_from(chars * played_ms / generated_ms).unwrap_or(usize::MAX);
    let cut_at = text
        .char_indices()
        .nth(keep)
        .map_or(text.len(), |(byte, _)| byte);
    let head = &text[..cut_at];
    let at_word_boundary = text[cut_at..].starts_with(char::is_whitespace) || cut_at == text.len();
    let head = if at_word_boundary {
        head
    } else {
        head.rfind(char::is_whitespace)
            .map_or("", |space| &head[..space])
    };
    (head.trim_end().to_owned(), true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn audio<'a>(response_id: &'a str, item_id: &'a str) -> AudioRef<'a> {
        AudioRef {
            response_id: Cow::Borrowed(response_id),
            item_id: Cow::Borrowed(item_id),
            content_index: 0,
        }
    }

    /// Sends `ms` of audio for one item in deltas of `chunk_ms`, returning the mark names.
    fn send(playback: &mut Playback, a: &AudioRef<'_>, ms: u64, chunk_ms: u64) -> Vec<MarkName> {
        (0..ms / chunk_ms)
            .map(|_| {
                playback
                    .on_delta(a, chunk_ms * BYTES_PER_MS)
                    .expect("forwarded")
            })
            .collect()
    }

    #[test]
    fn base64_length_gives_the_decoded_byte_count() {
        use base64::Engine;
        for n in 0..50usize {
            let encoded = base64::engine::general_purpose::STANDARD.encode(vec![0xFFu8; n]);
            assert_eq!(base64_decoded_len(&encoded), n as u64, "{encoded}");
        }
    }

    #[test]
    fn mark_names_round_trip() {
        assert_eq!(MarkName(17).to_string(), "m17");
        assert_eq!(MarkName::parse("m17"), Some(MarkName(17)));
        assert_eq!(MarkName::parse("responsePart"), None);
        assert_eq!(MarkName::parse("m"), None);
    }

    #[test]
    fn the_issue_scenario_truncates_at_played_plus_fifty() {
        // 3 s sent in 100 ms deltas, marks echoed for the first 1.2 s.
        let mut p = Playback::default();
        p.response_created("resp_1");
        let a = audio("resp_1", "item_1");
        let marks = send(&mut p, &a, 3000, 100);
        for mark in &marks[..12] {
            assert_eq!(p.on_mark(&mark.to_string()), MarkEcho::Played);
        }
        let interruption = p.interrupt(true).expect("agent was speaking");
        assert_eq!(
            interruption,
            Interruption {
                clear: true,
                cancel: false,
                truncations: vec![Truncation {
                    item_id: "item_1".into(),
                    content_index: 0,
                    audio_end_ms: 1250
                }],
            }
        );
        // Echoes of the cleared marks do not count as played.
        for mark in &marks[12..] {
            assert_eq!(p.on_mark(&mark.to_string()), MarkEcho::Cleared);
        }
        // Late deltas of the interrupted response are dropped.
        assert_eq!(p.on_delta(&a, 800), None);
        assert!(p.interrupt(true).is_none(), "nothing is playing any more");
    }

    #[test]
    fn the_first_delta_creates_an_item_and_a_mark() {
        let mut p = Playback::default();
        let a = audio("resp_1", "item_1");
        assert_eq!(p.on_delta(&a, 160), Some(MarkName(1)));
        let interruption = p.interrupt(true).unwrap();
        // Nothing echoed yet: the caller may have heard up to 50 ms, capped by what was sent.
        assert_eq!(interruption.truncations[0].audio_end_ms, 20);
    }

    #[test]
    fn interruption_before_any_audio_cancels_without_truncating() {
        let mut p = Playback::default();
        p.response_created("resp_1");
        let interruption = p.interrupt(false).unwrap();
        assert_eq!(
            interruption,
            Interruption {
                clear: false,
                cancel: true,
                truncations: vec![]
            }
        );
        assert_eq!(
            p.on_delta(&audio("resp_1", "item_1"), 160),
            None,
            "its audio is dropped"
        );
        p.response_done("resp_1");
        assert!(!p.is_discarded("resp_1"));
    }

    #[test]
    fn cancel_is_left_to_a_session_that_auto_interrupts() {
        let mut p = Playback::default();
        p.response_created("resp_1");
        send(&mut p, &audio("resp_1", "item_1"), 500, 100);
        assert!(!p.interrupt(true).unwrap().cancel);
        let mut p = Playback::default();
        p.response_created("resp_1");
        send(&mut p, &audio("resp_1", "item_1"), 500, 100);
        assert!(p.interrupt(false).unwrap().cancel);
    }

    #[test]
    fn a_finished_response_still_playing_at_twilio_is_interrupted() {
        // All audio sent and the response done, but Twilio still has it buffered.
        let mut p = Playback::default();
        p.response_created("resp_1");
        let a = audio("resp_1", "item_1");
        let marks = send(&mut p, &a, 2000, 200);
        p.on_audio_done(&a).unwrap();
        p.response_done("resp_1");
        p.on_mark(&marks[0].to_string());
        let interruption = p.interrupt(false).unwrap();
        assert!(interruption.clear);
        assert!(!interruption.cancel, "no response is active any more");
        assert_eq!(interruption.truncations[0].audio_end_ms, 250);
    }

    #[test]
    fn audio_that_all_played_is_not_interrupted_even_without_a_done_mark() {
        // The response failed before output_audio.done, but Twilio played all that was sent.
        let mut p = Playback::default();
        p.response_created("resp_1");
        let marks = send(&mut p, &audio("resp_1", "item_1"), 400, 200);
        p.response_done("resp_1");
        for mark in &marks {
            p.on_mark(&mark.to_string());
        }
        assert!(p.interrupt(true).is_none());
    }

    #[test]
    fn an_item_that_played_to_the_end_leaves_the_ledger() {
        let mut p = Playback::default();
        p.response_created("resp_1");
        let a = audio("resp_1", "item_1");
        let marks = send(&mut p, &a, 1000, 500);
        let done = p.on_audio_done(&a).unwrap();
        p.response_done("resp_1");
        assert_eq!(p.on_mark(&marks[0].to_string()), MarkEcho::Played);
        assert_eq!(p.on_mark(&marks[1].to_string()), MarkEcho::Played);
        assert_eq!(p.on_mark(&done.to_string()), MarkEcho::Finished);
        assert!(
            p.interrupt(true).is_none(),
            "speech while the agent is silent does nothing"
        );
    }

    #[test]
    fn multiple_items_are_each_truncated() {
        let mut p = Playback::default();
        p.response_created("resp_1");
        let first = audio("resp_1", "item_1");
        let second = audio("resp_1", "item_2");
        let first_marks = send(&mut p, &first, 1000, 100);
        p.on_audio_done(&first);
        send(&mut p, &second, 600, 100);
        for mark in &first_marks[..4] {
            p.on_mark(&mark.to_string());
        }
        let interruption = p.interrupt(true).unwrap();
        assert_eq!(
            interruption.truncations,
            vec![
                Truncation {
                    item_id: "item_1".into(),
                    content_index: 0,
                    audio_end_ms: 450
                },
                Truncation {
                    item_id: "item_2".into(),
                    content_index: 0,
                    audio_end_ms: 50
                },
            ]
        );
    }

    #[test]
    fn a_skipped_echo_is_vouched_for_by_a_later_one() {
        let mut p = Playback::default();
        let a = audio("resp_1", "item_1");
        let marks = send(&mut p, &a, 1000, 100);
        assert_eq!(p.on_mark(&marks[5].to_string()), MarkEcho::Played);
        assert_eq!(
            p.on_mark(&marks[2].to_string()),
            MarkEcho::Unknown,
            "already accounted"
        );
        assert_eq!(p.interrupt(true).unwrap().truncations[0].audio_end_ms, 650);
    }

    #[test]
    fn marks_after_a_clear_count_again() {
        let mut p = Playback::default();
        p.response_created("resp_1");
        let old = send(&mut p, &audio("resp_1", "item_1"), 500, 100);
        p.interrupt(true).unwrap();
        p.response_created("resp_2");
        let new = send(&mut p, &audio("resp_2", "item_2"), 500, 100);
        // A late cleared echo arriving amid the new response's echoes changes nothing.
        assert_eq!(p.on_mark(&new[0].to_string()), MarkEcho::Played);
        assert_eq!(p.on_mark(&old[4].to_string()), MarkEcho::Cleared);
        assert_eq!(p.on_mark(&new[1].to_string()), MarkEcho::Played);
        assert_eq!(p.interrupt(true).unwrap().truncations[0].audio_end_ms, 250);
    }

    #[test]
    fn unknown_marks_are_ignored() {
        let mut p = Playback::default();
        assert_eq!(p.on_mark("m5"), MarkEcho::Unknown);
        assert_eq!(p.on_mark("something-else"), MarkEcho::Unknown);
    }

    #[test]
    fn interrupted_transcripts_are_cut_to_what_was_heard() {
        let mut p = Playback::default();
        p.response_created("resp_1");
        let a = audio("resp_1", "item_1");
        let marks = send(&mut p, &a, 2000, 100);
        for mark in &marks[..9] {
            p.on_mark(&mark.to_string());
        }
        p.interrupt(true).unwrap(); // heard 950 ms of 2000 ms generated so far
        p.on_delta(&a, 2000 * BYTES_PER_MS); // the rest arrives late and is dropped: 4000 ms in all
        let cut = p.agent_transcript("item_1", SIXTEEN_WORDS.into(), 1);
        assert_eq!(cut, ("one two three four".to_owned(), true));
        let untouched = p.agent_transcript("item_9", "untouched".into(), 2);
        assert_eq!(untouched, ("untouched".to_owned(), false));
        assert_eq!(p.take_corrections(), []);
    }

    const SIXTEEN_WORDS: &str = "one two three four five six seven eight nine ten eleven twelve \
                                 thirteen fourteen fifteen sixteen";

    fn correction(sequence: u32, text: &str) -> LineCorrection {
        LineCorrection {
            sequence,
            text: text.to_owned(),
            truncated: true,
        }
    }

    #[test]
    fn a_line_recorded_while_its_audio_plays_is_corrected_if_cut_short() {
        // Heard in full: recorded in full at once, and never corrected.
        let mut p = Playback::default();
        let a = audio("resp_1", "item_1");
        let marks = send(&mut p, &a, 1000, 500);
        let done = p.on_audio_done(&a).unwrap();
        assert_eq!(
            p.agent_transcript("item_1", "all of it".into(), 1),
            ("all of it".to_owned(), false)
        );
        p.on_mark(&marks[1].to_string());
        p.on_mark(&done.to_string());
        assert_eq!(p.take_corrections(), []);
        assert_eq!(p.finish(), []);

        // Interrupted after 750 ms of 2000 ms (700 played + 50): corrected at once.
        let mut p = Playback::default();
        let marks = send(&mut p, &a, 2000, 100);
        let (_, cut) = p.agent_transcript("item_1", SIXTEEN_WORDS.into(), 3);
        assert!(!cut, "recorded in full while it plays");
        p.on_mark(&marks[6].to_string());
        p.interrupt(true).unwrap();
        assert_eq!(
            p.take_corrections(),
            [correction(3, "one two three four five six seven")]
        );

        // The call ends mid-sentence: cut to what was heard by then.
        let mut p = Playback::default();
        let marks = send(&mut p, &a, 1600, 100);
        p.agent_transcript("item_1", SIXTEEN_WORDS.into(), 5);
        p.on_mark(&marks[7].to_string());
        assert_eq!(
            p.finish(),
            [correction(
                5,
                "one two three four five six seven eight nine ten"
            )]
        );
    }

    #[test]
    fn cut_to_share_respects_words_and_unicode() {
        assert_eq!(
            cut_to_share("héllo wörld".into(), 1, 2),
            ("héllo".into(), true)
        );
        assert_eq!(cut_to_share("abc".into(), 5, 5), ("abc".into(), false));
        assert_eq!(cut_to_share("abc def".into(), 0, 5), ("".into(), true));
        assert_eq!(cut_to_share("abc".into(), 1, 0), ("abc".into(), false));
    }
}
