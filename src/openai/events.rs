//! The GA Realtime events a call sends and reads.
//!
//! Server events are parsed into one flat, borrowing struct for the same reason as Twilio's
//! frames: the audio `delta` is borrowed and copied verbatim into the Twilio `media` message,
//! and unknown fields (there are many) are skipped without allocating.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::json;

/// A server event, classified; only what the bridge acts on has its own variant.
#[derive(Debug, PartialEq)]
pub enum ServerEvent<'a> {
    SessionCreated {
        session_id: Option<String>,
    },
    SessionUpdated {
        interrupt_response: bool,
    },
    SpeechStarted,
    ResponseCreated {
        response_id: String,
    },
    AudioDelta(AudioRef<'a>, Cow<'a, str>),
    AudioDone(AudioRef<'a>),
    AgentTranscriptDone {
        item_id: Cow<'a, str>,
        transcript: String,
    },
    CallerTranscriptDone {
        transcript: String,
    },
    ResponseDone {
        response_id: String,
        usage: Usage,
    },
    Error(ErrorDetail),
    /// A valid event this bridge has no use for (rate limits, text deltas, …).
    Other,
}

/// Identifies the audio content part a delta belongs to.
#[derive(Debug, PartialEq, Clone)]
pub struct AudioRef<'a> {
    pub response_id: Cow<'a, str>,
    pub item_id: Cow<'a, str>,
    pub content_index: u32,
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

#[derive(Debug, PartialEq, Eq, Clone, Deserialize)]
pub struct ErrorDetail {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: String,
}

/// How the bridge should treat an `error` event.
#[derive(Debug, PartialEq, Eq)]
pub enum ErrorSeverity {
    /// Races the protocol makes unavoidable (a cancel after the response ended, …).
    Benign,
    /// The session stays usable; worth a warning.
    Recoverable,
    /// The session cannot continue: end the call so the apology plays.
    Fatal,
}

impl ErrorDetail {
    pub fn severity(&self) -> ErrorSeverity {
        match self.code.as_deref() {
            Some(
                "response_cancel_not_active"
                | "item_truncate_invalid_item_id"
                | "conversation_already_has_active_response"
                | "input_audio_buffer_commit_empty",
            ) => ErrorSeverity::Benign,
            Some(
                "invalid_api_key"
                | "session_expired"
                | "insufficient_quota"
                | "beta_api_shape_disabled"
                | "model_not_found",
            ) => ErrorSeverity::Fatal,
            _ if self.kind == "authentication_error" => ErrorSeverity::Fatal,
            _ => ErrorSeverity::Recoverable,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerEventError {
    #[error("not a Realtime server event: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a {0} event without its {1} field")]
    MissingField(&'static str, &'static str),
}

/// serde borrows a `Cow<str>` only when it is a field's whole type, not inside an `Option`;
/// this newtype restores borrowing for optional fields.
#[derive(Deserialize, Clone)]
#[serde(transparent)]
struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    delta: Option<Borrowed<'a>>,
    #[serde(borrow, default)]
    response_id: Option<Borrowed<'a>>,
    #[serde(borrow, default)]
    item_id: Option<Borrowed<'a>>,
    #[serde(default)]
    content_index: Option<u32>,
    #[serde(default)]
    transcript: Option<String>,
    #[serde(default)]
    response: Option<ResponseBody>,
    #[serde(default)]
    session: Option<SessionBody>,
    #[serde(default)]
    error: Option<ErrorDetail>,
}

#[derive(Deserialize)]
struct ResponseBody {
    id: String,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct SessionBody {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    audio: Option<SessionAudio>,
}

#[derive(Deserialize)]
struct SessionAudio {
    #[serde(default)]
    input: Option<SessionAudioInput>,
}

#[derive(Deserialize)]
struct SessionAudioInput {
    #[serde(default)]
    turn_detection: Option<TurnDetectionBody>,
}

#[derive(Deserialize)]
struct TurnDetectionBody {
    #[serde(default)]
    interrupt_response: Option<bool>,
}

pub fn parse_server_event(text: &str) -> Result<ServerEvent<'_>, ServerEventError> {
    use ServerEventError::MissingField;
    let frame: Frame<'_> = serde_json::from_str(text)?;
    let audio_ref = |kind: &'static str| -> Result<AudioRef<'_>, ServerEventError> {
        Ok(AudioRef {
            response_id: frame
                .response_id
                .clone()
                .ok_or(MissingField(kind, "response_id"))?
                .0,
            item_id: frame
                .item_id
                .clone()
                .ok_or(MissingField(kind, "item_id"))?
                .0,
            content_index: frame.content_index.unwrap_or(0),
        })
    };
    Ok(match frame.kind.as_ref() {
        "response.output_audio.delta" => {
            let audio = audio_ref("response.output_audio.delta")?;
            let delta = frame
                .delta
                .clone()
                .ok_or(MissingField("response.output_audio.delta", "delta"))?
                .0;
            ServerEvent::AudioDelta(audio, delta)
        }
        "response.output_audio.done" => {
            ServerEvent::AudioDone(audio_ref("response.output_audio.done")?)
        }
        "input_audio_buffer.speech_started" => ServerEvent::SpeechStarted,
        "response.created" => ServerEvent::ResponseCreated {
            response_id: frame
                .response
                .ok_or(MissingField("response.created", "response"))?
                .id,
        },
        "response.done" => {
            let response = frame
                .response
                .ok_or(MissingField("response.done", "response"))?;
            ServerEvent::ResponseDone {
                response_id: response.id,
                usage: response.usage.unwrap_or_default(),
            }
        }
        "response.output_audio_transcript.done" => ServerEvent::AgentTranscriptDone {
            item_id: frame
                .item_id
                .ok_or(MissingField(
                    "response.output_audio_transcript.done",
                    "item_id",
                ))?
                .0,
            transcript: frame.transcript.unwrap_or_default(),
        },
        "conversation.item.input_audio_transcription.completed" => {
            ServerEvent::CallerTranscriptDone {
                transcript: frame.transcript.unwrap_or_default(),
            }
        }
        "session.created" => ServerEvent::SessionCreated {
            session_id: frame.session.and_then(|s| s.id),
        },
        "session.updated" => {
            let turn_detection = frame
                .session
                .and_then(|s| s.audio)
                .and_then(|a| a.input)
                .and_then(|i| i.turn_detection);
            // No turn detection means no VAD: nothing will auto-interrupt.
            ServerEvent::SessionUpdated {
                interrupt_response: turn_detection
                    .is_some_and(|t| t.interrupt_response.unwrap_or(true)),
            }
        }
        "error" => ServerEvent::Error(frame.error.ok_or(MissingField("error", "error"))?),
        _ => ServerEvent::Other,
    })
}

/// What the agent session is configured with; everything comes from `Config`.
pub struct SessionSettings<'a> {
    pub instructions: &'a str,
    pub voice: &'a str,
}

/// The GA `session.update`: µ-law both ways so audio passes through without transcoding.
pub fn session_update(settings: &SessionSettings<'_>) -> String {
    #[derive(Serialize)]
    struct Update<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        session: Session<'a>,
    }
    #[derive(Serialize)]
    struct Session<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        instructions: &'a str,
        output_modalities: [&'static str; 1],
        audio: Audio<'a>,
    }
    #[derive(Serialize)]
    struct Audio<'a> {
        input: Input,
        output: Output<'a>,
    }
    #[derive(Serialize)]
    struct Input {
        format: Format,
        noise_reduction: Typed,
        transcription: Transcription,
        turn_detection: TurnDetection,
    }
    #[derive(Serialize)]
    struct Output<'a> {
        format: Format,
        voice: &'a str,
    }
    #[derive(Serialize)]
    struct Format {
        #[serde(rename = "type")]
        kind: &'static str,
    }
    #[derive(Serialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: &'static str,
    }
    #[derive(Serialize)]
    struct Transcription {
        model: &'static str,
    }
    #[derive(Serialize)]
    struct TurnDetection {
        #[serde(rename = "type")]
        kind: &'static str,
        threshold: f32,
        prefix_padding_ms: u32,
        silence_duration_ms: u32,
        create_response: bool,
        interrupt_response: bool,
    }
    to_json(&Update {
        kind: "session.update",
        session: Session {
            kind: "realtime",
            instructions: settings.instructions,
            output_modalities: ["audio"],
            audio: Audio {
                input: Input {
                    format: Format { kind: "audio/pcmu" },
                    // Phone handsets are held close to the mouth.
                    noise_reduction: Typed { kind: "near_field" },
                    transcription: Transcription {
                        model: "gpt-4o-mini-transcribe",
                    },
                    turn_detection: TurnDetection {
                        kind: "server_vad",
                        threshold: 0.5,
                        prefix_padding_ms: 300,
                        silence_duration_ms: 500,
                        create_response: true,
                        interrupt_response: true,
                    },
                },
                output: Output {
                    format: Format { kind: "audio/pcmu" },
                    voice: settings.voice,
                },
            },
        },
    })
}

/// `input_audio_buffer.append` carrying the caller's base64 µ-law exactly as Twilio sent it.
pub fn append_audio(audio: &str) -> String {
    let mut out = String::with_capacity(48 + audio.len());
    out.push_str(r#"{"type":"input_audio_buffer.append","audio":""#);
    json::push_str_content(&mut out, audio);
    out.push_str(r#""}"#);
    out
}

pub fn truncate(item_id: &str, content_index: u32, audio_end_ms: u64) -> String {
    #[derive(Serialize)]
    struct Truncate<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        item_id: &'a str,
        content_index: u32,
        audio_end_ms: u64,
    }
    to_json(&Truncate {
        kind: "conversation.item.truncate",
        item_id,
        content_index,
        audio_end_ms,
    })
}

pub fn response_cancel() -> String {
    r#"{"type":"response.cancel"}"#.to_owned()
}

pub fn response_create() -> String {
    r#"{"type":"response.create"}"#.to_owned()
}

/// A system message added to the conversation (greeting instruction, call context).
pub fn system_message(text: &str) -> String {
    #[derive(Serialize)]
    struct Create<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        item: Item<'a>,
    }
    #[derive(Serialize)]
    struct Item<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        role: &'static str,
        content: [Content<'a>; 1],
    }
    #[derive(Serialize)]
    struct Content<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        text: &'a str,
    }
    to_json(&Create {
        kind: "conversation.item.create",
        item: Item {
            kind: "message",
            role: "system",
            content: [Content {
                kind: "input_text",
                text,
            }],
        },
    })
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("plain structs of strings always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    #[test]
    fn session_update_is_the_ga_shape_with_pcmu_both_ways() {
        let update: Value = serde_json::from_str(&session_update(&SessionSettings {
            instructions: "Be brief.",
            voice: "marin",
        }))
        .unwrap();
        assert_eq!(update["type"], "session.update");
        let session = &update["session"];
        assert_eq!(session["type"], "realtime");
        assert_eq!(session["instructions"], "Be brief.");
        assert_eq!(session["output_modalities"], json!(["audio"]));
        assert_eq!(
            session["audio"]["input"]["format"],
            json!({"type": "audio/pcmu"})
        );
        assert_eq!(
            session["audio"]["output"]["format"],
            json!({"type": "audio/pcmu"})
        );
        assert_eq!(session["audio"]["output"]["voice"], "marin");
        assert_eq!(
            session["audio"]["input"]["turn_detection"]["type"],
            "server_vad"
        );
        assert!(session["audio"]["input"]["transcription"]["model"].is_string());
        for beta_field in [
            "input_audio_format",
            "output_audio_format",
            "modalities",
            "voice",
            "turn_detection",
            "input_audio_transcription",
            "temperature",
        ] {
            assert!(session.get(beta_field).is_none(), "beta field {beta_field}");
        }
    }

    #[test]
    fn client_events_have_exact_shapes() {
        assert_eq!(
            append_audio("//7+"),
            r#"{"type":"input_audio_buffer.append","audio":"//7+"}"#
        );
        assert_eq!(
            truncate("item_1", 0, 1250),
            r#"{"type":"conversation.item.truncate","item_id":"item_1","content_index":0,"audio_end_ms":1250}"#
        );
        assert_eq!(response_cancel(), r#"{"type":"response.cancel"}"#);
        assert_eq!(response_create(), r#"{"type":"response.create"}"#);
        let message: Value = serde_json::from_str(&system_message("say \"hi\"")).unwrap();
        assert_eq!(
            message,
            json!({"type":"conversation.item.create","item":{"type":"message","role":"system","content":[{"type":"input_text","text":"say \"hi\""}]}})
        );
    }

    #[test]
    fn parses_the_events_the_bridge_uses() {
        let delta = r#"{"type":"response.output_audio.delta","event_id":"e1","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"delta":"/v7+"}"#;
        let ServerEvent::AudioDelta(audio, payload) = parse_server_event(delta).unwrap() else {
            panic!()
        };
        assert_eq!(
            (
                audio.response_id.as_ref(),
                audio.item_id.as_ref(),
                audio.content_index
            ),
            ("resp_1", "item_1", 0)
        );
        assert!(matches!(payload, Cow::Borrowed("/v7+")));

        assert_eq!(
            parse_server_event(
                r#"{"type":"input_audio_buffer.speech_started","audio_start_ms":100,"item_id":"i"}"#
            )
            .unwrap(),
            ServerEvent::SpeechStarted
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.created","response":{"id":"resp_1","status":"in_progress","output":[]}}"#).unwrap(),
            ServerEvent::ResponseCreated { response_id: "resp_1".into() }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.done","response":{"id":"resp_1","status":"completed","usage":{"total_tokens":30,"input_tokens":10,"output_tokens":20,"input_token_details":{}}}}"#).unwrap(),
            ServerEvent::ResponseDone { response_id: "resp_1".into(), usage: Usage { input_tokens: 10, output_tokens: 20, total_tokens: 30 } }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.output_audio_transcript.done","response_id":"r","item_id":"item_1","output_index":0,"content_index":0,"transcript":"Hello there."}"#).unwrap(),
            ServerEvent::AgentTranscriptDone { item_id: "item_1".into(), transcript: "Hello there.".into() }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"i","content_index":0,"transcript":"Hi!"}"#).unwrap(),
            ServerEvent::CallerTranscriptDone { transcript: "Hi!".into() }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"session.created","session":{"id":"sess_1","type":"realtime","audio":{"input":{"turn_detection":null}}}}"#).unwrap(),
            ServerEvent::SessionCreated { session_id: Some("sess_1".into()) }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"session.updated","session":{"audio":{"input":{"turn_detection":{"type":"server_vad","interrupt_response":false}}}}}"#).unwrap(),
            ServerEvent::SessionUpdated { interrupt_response: false }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"session.updated","session":{"audio":{"input":{"turn_detection":null}}}}"#).unwrap(),
            ServerEvent::SessionUpdated { interrupt_response: false }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"rate_limits.updated","rate_limits":[]}"#).unwrap(),
            ServerEvent::Other
        );
    }

    #[test]
    fn error_severity() {
        let error = |code: &str| {
            let text = format!(
                r#"{{"type":"error","error":{{"type":"invalid_request_error","code":"{code}","message":"m"}}}}"#
            );
            let ServerEvent::Error(detail) = parse_server_event(&text).unwrap() else {
                panic!()
            };
            detail.severity()
        };
        assert_eq!(error("response_cancel_not_active"), ErrorSeverity::Benign);
        assert_eq!(
            error("item_truncate_invalid_item_id"),
            ErrorSeverity::Benign
        );
        assert_eq!(error("session_expired"), ErrorSeverity::Fatal);
        assert_eq!(error("invalid_api_key"), ErrorSeverity::Fatal);
        assert_eq!(error("invalid_value"), ErrorSeverity::Recoverable);
    }

    #[test]
    fn malformed_events_are_errors() {
        for bad in [
            "",
            "{}",
            r#"{"type":1}"#,
            r#"{"type":"response.output_audio.delta","item_id":"i","delta":"x"}"#,
            r#"{"type":"error"}"#,
            r#"{"type":"response.done"}"#,
        ] {
            assert!(parse_server_event(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in ".{0,200}") {
            let _ = parse_server_event(&text);
        }
    }
}
