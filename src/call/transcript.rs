//! Who said what during a call, in the order it was said, ready to be stored.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaker {
    Caller,
    Agent,
}

impl Speaker {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Agent => "agent",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranscriptLine {
    /// 1-based position within the call.
    pub sequence: u32,
    pub speaker: Speaker,
    pub text: String,
    /// When the line was complete, in ms since the media stream started.
    pub offset_ms: u64,
    /// The agent was interrupted: the text is cut to what the caller heard.
    pub truncated: bool,
}
