//! The call's timeline as it happens: one line a moment for people, or with `--json` one JSON
//! object a line (each with `t_ms`, milliseconds since the call began, and `type`) for scripts.

use std::io::Write;

use serde::Serialize;
use tokio::time::Instant;

/// One line of the stored transcript.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Line {
    pub speaker: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// `POST /voice` was answered with a stream.
    Answered {
        t_ms: u64,
        call_sid: String,
        from: String,
        to: String,
        agent: Option<String>,
    },
    StreamStarted {
        t_ms: u64,
        stream_sid: String,
    },
    /// The agent was first heard, `after_ms` after the stream started.
    FirstAgentAudio {
        t_ms: u64,
        after_ms: u64,
    },
    /// The agent was heard from `from_ms` until `t_ms`, with `marks` marks echoed as played.
    AgentSpeech {
        t_ms: u64,
        from_ms: u64,
        marks: usize,
    },
    /// A mark echoed: played, or flushed by a `clear`.
    Mark {
        t_ms: u64,
        name: String,
        cleared: bool,
    },
    /// Barge-in: callbridge sent `clear`.
    Clear {
        t_ms: u64,
        dropped_ms: u64,
        marks: usize,
    },
    Dtmf {
        t_ms: u64,
        keys: String,
    },
    /// The WAV has been sent; silence follows until the end.
    CallerAudioEnd {
        t_ms: u64,
    },
    /// The call ran to its end: `stop` was sent, or callbridge ended the call as planned.
    Ended {
        t_ms: u64,
        by: EndedBy,
        heard_ms: u64,
    },
    /// Twilio's `completed` status callback, and what callbridge answered.
    StatusCallback {
        t_ms: u64,
        status: u16,
    },
    /// The call as callbridge stored it (`GET /calls/{sid}`).
    StoredCall {
        t_ms: u64,
        end_reason: Option<String>,
        transcript: Vec<Line>,
    },
    Warning {
        t_ms: u64,
        message: String,
    },
    Error {
        t_ms: u64,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndedBy {
    /// The caller hung up (`stop`) when `--seconds` were over.
    Caller,
    /// callbridge closed the stream normally: the agent ended the call.
    Callbridge,
}

fn seconds(ms: u64) -> String {
    format!("{}.{:02} s", ms / 1000, ms % 1000 / 10)
}

impl Event {
    /// The line a person reads, or `None` for what only scripts want (each mark: the speech
    /// and barge-in lines count them).
    fn text(&self) -> Option<String> {
        let (t_ms, what) = match self {
            Self::Answered {
                t_ms,
                call_sid,
                from,
                to,
                agent,
            } => {
                let agent = agent
                    .as_deref()
                    .map(|agent| format!(" by agent {agent:?}"))
                    .unwrap_or_default();
                (
                    t_ms,
                    format!("{call_sid} from {from} to {to} answered{agent}"),
                )
            }
            Self::StreamStarted { t_ms, stream_sid } => (
                t_ms,
                format!("stream {stream_sid} started: the caller speaks"),
            ),
            Self::FirstAgentAudio { t_ms, after_ms } => (
                t_ms,
                format!("first agent audio, {after_ms} ms after the stream started"),
            ),
            Self::AgentSpeech {
                t_ms,
                from_ms,
                marks,
            } => (
                t_ms,
                format!(
                    "the agent spoke for {} (from {from_ms} ms); {marks} marks echoed as played",
                    seconds(t_ms - from_ms)
                ),
            ),
            Self::Mark { .. } => return None,
            Self::Clear {
                t_ms,
                dropped_ms,
                marks,
            } => (
                t_ms,
                format!(
                    "barge-in: clear dropped {} of unplayed agent audio; {marks} marks echoed at once",
                    seconds(*dropped_ms)
                ),
            ),
            Self::Dtmf { t_ms, keys } => (t_ms, format!("pressed {keys}")),
            Self::CallerAudioEnd { t_ms } => {
                (t_ms, "the WAV is over; silence until the end".to_owned())
            }
            Self::Ended { t_ms, by, heard_ms } => {
                let how = match by {
                    EndedBy::Caller => "stop sent: the call ran to its end",
                    EndedBy::Callbridge => "callbridge ended the call",
                };
                (
                    t_ms,
                    format!(
                        "{how}; the caller heard {} of agent audio",
                        seconds(*heard_ms)
                    ),
                )
            }
            Self::StatusCallback { t_ms, status } => (
                t_ms,
                format!("status callback (completed) answered {status}"),
            ),
            Self::StoredCall {
                t_ms,
                end_reason,
                transcript,
            } => {
                let reason = end_reason.as_deref().unwrap_or("not recorded");
                let mut text = format!("stored call, end reason {reason}; transcript:");
                if transcript.is_empty() {
                    text.push_str(" (empty)");
                }
                for line in transcript {
                    text.push_str(&format!("\n             {}: {}", line.speaker, line.text));
                }
                (t_ms, text)
            }
            Self::Warning { t_ms, message } => (t_ms, format!("warning: {message}")),
            Self::Error { t_ms, message } => (t_ms, format!("error: {message}")),
        };
        Some(format!("{t_ms:>8} ms  {what}"))
    }
}

/// Where the timeline goes: stdout in `callbridge simulate`, a buffer in tests.
pub struct Timeline {
    json: bool,
    out: Box<dyn Write + Send>,
    /// Time 0: when the call began (`begin`), or when the timeline was made.
    began: Instant,
}

impl Timeline {
    pub fn new(json: bool, out: Box<dyn Write + Send>) -> Self {
        Self {
            json,
            out,
            began: Instant::now(),
        }
    }

    /// The call begins now: every `t_ms` counts from here.
    pub fn begin(&mut self) -> Instant {
        self.began = Instant::now();
        self.began
    }

    /// Milliseconds since the call began.
    pub fn t_ms(&self) -> u64 {
        u64::try_from(self.began.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn emit(&mut self, event: &Event) {
        let line = if self.json {
            Some(serde_json::to_string(event).expect("events always serialise"))
        } else {
            event.text()
        };
        if let Some(line) = line {
            // A closed stdout (`| head`) must not stop the call.
            let _ = writeln!(self.out, "{line}");
            let _ = self.out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(bytes)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn events() -> Vec<Event> {
        vec![
            Event::StreamStarted {
                t_ms: 12,
                stream_sid: "MZ1".into(),
            },
            Event::Mark {
                t_ms: 900,
                name: "m1".into(),
                cleared: false,
            },
            Event::AgentSpeech {
                t_ms: 1740,
                from_ms: 500,
                marks: 3,
            },
            Event::Clear {
                t_ms: 1740,
                dropped_ms: 1250,
                marks: 4,
            },
            Event::StoredCall {
                t_ms: 4000,
                end_reason: Some("caller_hung_up".into()),
                transcript: vec![Line {
                    speaker: "caller".into(),
                    text: "Hi!".into(),
                }],
            },
        ]
    }

    fn render(json: bool) -> String {
        let out = Shared::default();
        let mut timeline = Timeline::new(json, Box::new(out.clone()));
        for event in events() {
            timeline.emit(&event);
        }
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_lines_carry_every_event_with_its_time_and_type() {
        let text = render(true);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[1]["type"], "mark");
        assert_eq!(lines[1]["name"], "m1");
        assert_eq!(lines[3]["type"], "clear");
        assert_eq!(lines[3]["dropped_ms"], 1250);
        assert_eq!(lines[4]["transcript"][0]["text"], "Hi!");
        assert!(lines.iter().all(|line| line["t_ms"].is_u64()));
    }

    #[test]
    fn people_read_one_line_a_moment_with_marks_counted_not_listed() {
        let text = render(false);
        assert!(!text.contains("m1"), "{text}");
        assert!(
            text.contains("    1740 ms  the agent spoke for 1.24 s (from 500 ms); 3 marks"),
            "{text}"
        );
        assert!(
            text.contains("barge-in: clear dropped 1.25 s of unplayed agent audio; 4 marks"),
            "{text}"
        );
        assert!(text.contains("end reason caller_hung_up"), "{text}");
        assert!(text.contains("caller: Hi!"), "{text}");
    }
}
