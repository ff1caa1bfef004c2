//! The messages the load generator and the fake Realtime server put on the wire, and the cheap
//! string searches that read them back. Nothing here builds a `serde_json::Value` per frame:
//! at 800 calls the harness handles ~160,000 messages a second on the same two cores as the
//! server it measures, so every microsecond it spends is taken from the server.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The harness's WebSocket settings. tungstenite zero-fills its whole read buffer (128 KiB by
/// default) before every read, including reads that find nothing: with defaults that memset is
/// most of the harness's CPU per frame, and 128 KiB of RSS per socket. Every message here is
/// under 1 KiB, and bigger ones still work (the buffer grows to fit a frame).
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4 * 1024)
}

/// Twilio sends one 20 ms frame of 8 kHz µ-law: 160 bytes.
pub const FRAME_BYTES: usize = 160;
pub const FRAME_INTERVAL: Duration = Duration::from_millis(20);

/// Bytes at the start of every frame that say which call and frame it is. Six, because base64
/// encodes three bytes at a time: the id is then exactly the first eight characters, and the
/// rest of the frame encodes the same way whatever the id.
const ID_BYTES: usize = 6;
const ID_CHARS: usize = ID_BYTES / 3 * 4;

/// µ-law silence: what a caller's line mostly carries.
const SILENCE: u8 = 0xFF;

/// Builds frame payloads: an id, then silence, base64-encoded as Twilio sends them.
pub struct FrameAudio {
    /// The base64 of the silent bytes after the id, the same for every frame.
    tail: String,
}

impl Default for FrameAudio {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameAudio {
    pub fn new() -> Self {
        Self {
            tail: STANDARD.encode([SILENCE; FRAME_BYTES - ID_BYTES]),
        }
    }

    /// Appends the base64 payload of frame `seq` of call `call` to `out`.
    pub fn encode(&self, call: u16, seq: u32, out: &mut String) {
        let mut id = [0u8; ID_BYTES];
        id[..2].copy_from_slice(&call.to_be_bytes());
        id[2..].copy_from_slice(&seq.to_be_bytes());
        STANDARD.encode_string(id, out);
        out.push_str(&self.tail);
    }
}

/// The (call, frame) a payload was made for, read from its first eight base64 characters.
pub fn decode_id(payload: &str) -> Option<(u16, u32)> {
    let mut id = [0u8; ID_BYTES];
    let written = STANDARD
        .decode_slice(payload.get(..ID_CHARS)?, &mut id)
        .ok()?;
    (written == ID_BYTES).then(|| {
        (
            u16::from_be_bytes([id[0], id[1]]),
            u32::from_be_bytes([id[2], id[3], id[4], id[5]]),
        )
    })
}

/// The value of the first string field introduced by `pattern` (`"name":"`), found by plain
/// search. Only for values that carry no JSON escapes, which holds for everything read here:
/// base64, ids, event types and mark names as callbridge and the fake serialise them.
pub fn string_after<'a>(text: &'a str, pattern: &str) -> Option<&'a str> {
    let start = text.find(pattern)? + pattern.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// Field patterns for `string_after`.
pub const EVENT: &str = r#""event":""#;
pub const TYPE: &str = r#""type":""#;
pub const PAYLOAD: &str = r#""payload":""#;
pub const MARK_NAME: &str = r#""name":""#;
pub const AUDIO: &str = r#""audio":""#;
pub const DELTA: &str = r#""delta":""#;

pub const APPEND: &str = "input_audio_buffer.append";
pub const AUDIO_DELTA: &str = "response.output_audio.delta";
pub const SESSION_UPDATE: &str = "session.update";

/// What the fake Realtime server answers each `input_audio_buffer.append` with: the same audio
/// back as agent speech. One response and one item for the whole call, as when an agent talks
/// for a long time, so the bridge's playback ledger stays in its steady state.
pub fn audio_delta(audio: &str) -> String {
    const HEAD: &str = r#"{"type":"response.output_audio.delta","event_id":"event_bench","response_id":"resp_bench","item_id":"item_bench","output_index":0,"content_index":0,"delta":""#;
    const TAIL: &str = r#""}"#;
    let mut out = String::with_capacity(HEAD.len() + audio.len() + TAIL.len());
    out.push_str(HEAD);
    out.push_str(audio);
    out.push_str(TAIL);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_160_bytes_of_base64_that_carry_their_id() {
        let audio = FrameAudio::new();
        let mut payload = String::new();
        audio.encode(513, 70_000, &mut payload);
        let bytes = STANDARD.decode(&payload).unwrap();
        assert_eq!(bytes.len(), FRAME_BYTES);
        assert!(bytes[ID_BYTES..].iter().all(|&b| b == SILENCE));
        assert_eq!(decode_id(&payload), Some((513, 70_000)));
        assert_eq!(decode_id("short"), None);
        assert_eq!(decode_id("!!!!!!!!rest"), None);
    }

    #[test]
    fn fields_are_found_in_the_messages_callbridge_sends() {
        let media = callbridge::twilio::media::media("MZ1", "AAECAw==");
        assert_eq!(string_after(&media, EVENT), Some("media"));
        assert_eq!(string_after(&media, PAYLOAD), Some("AAECAw=="));
        let mark = callbridge::twilio::media::mark("MZ1", "m12");
        assert_eq!(string_after(&mark, EVENT), Some("mark"));
        assert_eq!(string_after(&mark, MARK_NAME), Some("m12"));
        let append = callbridge::openai::events::append_audio("AAECAw==");
        assert_eq!(string_after(&append, TYPE), Some(APPEND));
        assert_eq!(string_after(&append, AUDIO), Some("AAECAw=="));
        assert_eq!(string_after("{}", AUDIO), None);
    }

    #[test]
    fn the_fake_delta_is_an_audio_delta_to_callbridge() {
        use callbridge::openai::events::{ServerEvent, parse_server_event};
        let delta = audio_delta("AAECAw==");
        let Ok(ServerEvent::AudioDelta(audio, payload)) = parse_server_event(&delta) else {
            panic!("not an audio delta: {delta}");
        };
        assert_eq!(payload, "AAECAw==");
        assert_eq!(audio.item_id, "item_bench");
        assert_eq!(string_after(&delta, DELTA), Some("AAECAw=="));
    }
}
