//! The GA Realtime events a call sends and reads.
//!
//! Server events are parsed into one flat, borrowing struct for the same reason as Twilio's
//! frames: the audio `delta` is borrowed and copied verbatim into the Twilio `media` message,
//! and unknown fields (there are many) are skipped without allocating.

use std::borrow::Cow;

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agents::{AgentProfile, Builtin, NoiseReduction};
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
        /// `completed`, `cancelled`, `failed` or `incomplete`; `""` when the server omits it.
        status: String,
        usage: Usage,
    },
    /// The model asks for a tool to be run. Reported twice for the same `call_id` (its
    /// arguments' `done`, then its item's `done`), so whoever runs it must run each id once.
    FunctionCall {
        response_id: String,
        item_id: String,
        call_id: String,
        name: String,
        /// A JSON string, as the model wrote it: not necessarily valid JSON.
        arguments: String,
    },
    /// The server VAD heard the caller stop speaking.
    SpeechStopped,
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

/// What a response was billed, by kind: the input counts include the cached ones, and each
/// kind has its own price.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy, Deserialize)]
#[serde(from = "UsageBody")]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    pub input_text_tokens: u64,
    pub input_audio_tokens: u64,
    /// Of `input_text_tokens`, those read from OpenAI's prompt cache.
    pub input_cached_text_tokens: u64,
    /// Of `input_audio_tokens`, those read from the cache.
    pub input_cached_audio_tokens: u64,
    pub output_text_tokens: u64,
    pub output_audio_tokens: u64,
}

impl Usage {
    /// Sums two responses' bills (or two sessions').
    pub fn add(&mut self, other: &Self) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.total_tokens += other.total_tokens;
        self.input_text_tokens += other.input_text_tokens;
        self.input_audio_tokens += other.input_audio_tokens;
        self.input_cached_text_tokens += other.input_cached_text_tokens;
        self.input_cached_audio_tokens += other.input_cached_audio_tokens;
        self.output_text_tokens += other.output_text_tokens;
        self.output_audio_tokens += other.output_audio_tokens;
    }
}

/// `response.usage` as OpenAI writes it; every part may be missing.
#[derive(Default, Deserialize)]
#[serde(default)]
struct UsageBody {
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
    input_token_details: InputTokenDetails,
    output_token_details: TokenKinds,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct InputTokenDetails {
    text_tokens: u64,
    audio_tokens: u64,
    cached_tokens: u64,
    cached_tokens_details: Option<TokenKinds>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct TokenKinds {
    text_tokens: u64,
    audio_tokens: u64,
}

impl From<UsageBody> for Usage {
    fn from(body: UsageBody) -> Self {
        let input = body.input_token_details;
        // Without the split of the cached tokens, they are counted as audio first: cached
        // audio is never the cheaper of the two, so the estimate errs high, not low.
        let (cached_text, cached_audio) = match input.cached_tokens_details {
            Some(kinds) => (kinds.text_tokens, kinds.audio_tokens),
            None => {
                let audio = input.cached_tokens.min(input.audio_tokens);
                (input.cached_tokens - audio, audio)
            }
        };
        Self {
            input_tokens: body.input_tokens,
            output_tokens: body.output_tokens,
            total_tokens: body.total_tokens,
            input_text_tokens: input.text_tokens,
            input_audio_tokens: input.audio_tokens,
            input_cached_text_tokens: cached_text.min(input.text_tokens),
            input_cached_audio_tokens: cached_audio.min(input.audio_tokens),
            output_text_tokens: body.output_token_details.text_tokens,
            output_audio_tokens: body.output_token_details.audio_tokens,
        }
    }
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
    // The function call fields below are absent from audio deltas, so they cost those nothing.
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    #[serde(default)]
    item: Option<ItemBody>,
}

#[derive(Deserialize)]
struct ResponseBody {
    id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    usage: Option<Usage>,
}

/// An item of `response.output_item.done`. Every field is optional: other events carry items
/// of other kinds (messages, MCP calls) that must still parse, as `Other`.
#[derive(Deserialize)]
struct ItemBody {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
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
                status: response.status,
                usage: response.usage.unwrap_or_default(),
            }
        }
        "response.function_call_arguments.done" => {
            const KIND: &str = "response.function_call_arguments.done";
            ServerEvent::FunctionCall {
                response_id: frame
                    .response_id
                    .ok_or(MissingField(KIND, "response_id"))?
                    .0
                    .into_owned(),
                item_id: frame
                    .item_id
                    .ok_or(MissingField(KIND, "item_id"))?
                    .0
                    .into_owned(),
                call_id: frame.call_id.ok_or(MissingField(KIND, "call_id"))?,
                name: frame.name.ok_or(MissingField(KIND, "name"))?,
                arguments: frame.arguments.ok_or(MissingField(KIND, "arguments"))?,
            }
        }
        "response.output_item.done" => function_call_item(frame)?,
        "input_audio_buffer.speech_stopped" => ServerEvent::SpeechStopped,
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

/// A finished output item: a function call when it is one, else nothing the bridge acts on.
fn function_call_item(frame: Frame<'_>) -> Result<ServerEvent<'static>, ServerEventError> {
    const KIND: &str = "response.output_item.done";
    use ServerEventError::MissingField;
    let item = frame.item.ok_or(MissingField(KIND, "item"))?;
    if item.kind.as_deref() != Some("function_call") {
        return Ok(ServerEvent::Other);
    }
    Ok(ServerEvent::FunctionCall {
        response_id: frame
            .response_id
            .ok_or(MissingField(KIND, "response_id"))?
            .0
            .into_owned(),
        item_id: item.id.ok_or(MissingField(KIND, "item.id"))?,
        call_id: item.call_id.ok_or(MissingField(KIND, "item.call_id"))?,
        name: item.name.ok_or(MissingField(KIND, "item.name"))?,
        arguments: item.arguments.ok_or(MissingField(KIND, "item.arguments"))?,
    })
}

/// The GA `session.update` that configures `agent`'s session: µ-law both ways so audio passes
/// through without transcoding, input transcription for the call's transcript, turn detection,
/// and the agent's tools.
///
/// `instructions` come apart from the agent because each call fills the agent's placeholders
/// (and the business may add to them). The model is not part of it: it is chosen in the URL the
/// session is opened with, and cannot change afterwards. This is the only client event that
/// carries an MCP server's authorization.
pub fn session_update(agent: &AgentProfile, instructions: &str) -> String {
    let tools: Vec<Tool<'_>> = agent
        .tools
        .iter()
        .map(|tool| Tool::Function {
            name: &tool.name,
            description: &tool.description,
            parameters: Cow::Borrowed(&tool.parameters),
        })
        .chain(agent.builtins.iter().map(|builtin| builtin_tool(*builtin)))
        .chain(agent.mcp.iter().map(|server| {
            Tool::Mcp {
                server_label: &server.server_label,
                server_url: &server.server_url,
                allowed_tools: server.allowed_tools.as_deref(),
                authorization: server
                    .authorization
                    .as_ref()
                    .map(ExposeSecret::expose_secret),
                // Nobody is there to approve a call mid-conversation: the allowed tools are the
                // approval.
                require_approval: "never",
            }
        }))
        .collect();
    to_json(&Update::new(Session {
        instructions,
        voice: &agent.voice,
        language: agent.transcription_language.as_deref(),
        turn_detection: agent.turn_detection.as_ref(),
        noise_reduction: agent.noise_reduction,
        tools,
    }))
}

/// How a built-in tool is declared. Both take an optional reason, which the call's record
/// keeps; the descriptions tell the model when to call them.
fn builtin_tool(builtin: Builtin) -> Tool<'static> {
    let (description, reason) = match builtin {
        Builtin::EndCall => (
            "Hang up the call. Call it after you said goodbye, when the conversation is over \
             or the caller asks to end it.",
            "Why the call ends",
        ),
        Builtin::TransferCall => (
            "Transfer the caller to a person. Call it after you told the caller you are \
             transferring them, when they ask for a person or you cannot help them further.",
            "Why the caller is transferred",
        ),
    };
    Tool::Function {
        name: builtin.name(),
        description,
        parameters: Cow::Owned(serde_json::json!({
            "type": "object",
            "properties": {"reason": {"type": "string", "description": reason}},
        })),
    }
}

#[derive(Serialize)]
struct Update<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session: SessionFields<'a>,
}

/// What differs between sessions; everything else in `session.update` is fixed.
struct Session<'a> {
    instructions: &'a str,
    voice: &'a str,
    language: Option<&'a str>,
    turn_detection: Option<&'a Value>,
    noise_reduction: NoiseReduction,
    tools: Vec<Tool<'a>>,
}

impl<'a> Update<'a> {
    fn new(session: Session<'a>) -> Self {
        // No tools, nothing to choose from: `tool_choice` would only restate the default.
        let tool_choice = (!session.tools.is_empty()).then_some("auto");
        Self {
            kind: "session.update",
            session: SessionFields {
                kind: "realtime",
                instructions: session.instructions,
                output_modalities: ["audio"],
                audio: Audio {
                    input: Input {
                        format: Typed { kind: "audio/pcmu" },
                        noise_reduction: Typed {
                            kind: session.noise_reduction.as_str(),
                        },
                        transcription: Transcription {
                            model: "gpt-4o-mini-transcribe",
                            language: session.language,
                        },
                        turn_detection: session
                            .turn_detection
                            .map_or(TurnDetection::ServerVad(ServerVad::DEFAULT), |given| {
                                TurnDetection::Given(given)
                            }),
                    },
                    output: Output {
                        format: Typed { kind: "audio/pcmu" },
                        voice: session.voice,
                    },
                },
                tools: session.tools,
                tool_choice,
            },
        }
    }
}

#[derive(Serialize)]
struct SessionFields<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    instructions: &'a str,
    output_modalities: [&'static str; 1],
    audio: Audio<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'static str>,
}

#[derive(Serialize)]
struct Audio<'a> {
    input: Input<'a>,
    output: Output<'a>,
}

#[derive(Serialize)]
struct Input<'a> {
    format: Typed,
    noise_reduction: Typed,
    transcription: Transcription<'a>,
    turn_detection: TurnDetection<'a>,
}

#[derive(Serialize)]
struct Output<'a> {
    format: Typed,
    voice: &'a str,
}

#[derive(Serialize)]
struct Typed {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Transcription<'a> {
    model: &'static str,
    /// A hint; without it the transcriber detects the language.
    #[serde(skip_serializing_if = "Option::is_none")]
    language: Option<&'a str>,
}

/// The agent's own turn detection, passed as it is, or server VAD.
#[derive(Serialize)]
#[serde(untagged)]
enum TurnDetection<'a> {
    Given(&'a Value),
    ServerVad(ServerVad),
}

#[derive(Serialize)]
struct ServerVad {
    #[serde(rename = "type")]
    kind: &'static str,
    threshold: f32,
    prefix_padding_ms: u32,
    silence_duration_ms: u32,
    create_response: bool,
    interrupt_response: bool,
}

impl ServerVad {
    /// OpenAI's own defaults, spelled out so `session.updated` can be checked against them.
    const DEFAULT: Self = Self {
        kind: "server_vad",
        threshold: 0.5,
        prefix_padding_ms: 300,
        silence_duration_ms: 500,
        create_response: true,
        interrupt_response: true,
    };
}

/// A tool as `session.tools` declares it.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Tool<'a> {
    /// Run by callbridge: the model's call comes back as a [`ServerEvent::FunctionCall`].
    Function {
        name: &'a str,
        description: &'a str,
        parameters: Cow<'a, Value>,
    },
    /// Run by OpenAI, which calls the server itself.
    Mcp {
        server_label: &'a str,
        server_url: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        allowed_tools: Option<&'a [String]>,
        #[serde(skip_serializing_if = "Option::is_none")]
        authorization: Option<&'a str>,
        require_approval: &'static str,
    },
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

/// `response.create` with instructions for this response only; with `tool_choice_none` the
/// model may only speak (a holding sentence while a tool runs must not call another).
pub fn response_create_with(instructions: &str, tool_choice_none: bool) -> String {
    #[derive(Serialize)]
    struct Create<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        response: Response<'a>,
    }
    #[derive(Serialize)]
    struct Response<'a> {
        instructions: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        tool_choice: Option<&'static str>,
    }
    to_json(&Create {
        kind: "response.create",
        response: Response {
            instructions,
            tool_choice: tool_choice_none.then_some("none"),
        },
    })
}

/// A system message added to the conversation (greeting instruction, call context).
pub fn system_message(text: &str) -> String {
    message("system", text)
}

/// A user text message added to the conversation (the keys the caller pressed).
pub fn user_text(text: &str) -> String {
    message("user", text)
}

/// What the agent said earlier, as the caller heard it: re-seeds a fresh session after the
/// previous one was lost (assistant items take `output_text`; audio items cannot be created).
pub fn assistant_text(text: &str) -> String {
    message("assistant", text)
}

fn message(role: &'static str, text: &str) -> String {
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
    item_create(&Item {
        kind: "message",
        role,
        content: [Content {
            kind: if role == "assistant" {
                "output_text"
            } else {
                "input_text"
            },
            text,
        }],
    })
}

/// A tool's result, answering the function call `call_id`.
pub fn function_call_output(call_id: &str, output: &str) -> String {
    #[derive(Serialize)]
    struct Item<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        call_id: &'a str,
        output: &'a str,
    }
    item_create(&Item {
        kind: "function_call_output",
        call_id,
        output,
    })
}

fn item_create(item: &impl Serialize) -> String {
    #[derive(Serialize)]
    struct Create<'a, T> {
        #[serde(rename = "type")]
        kind: &'static str,
        item: &'a T,
    }
    to_json(&Create {
        kind: "conversation.item.create",
        item,
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

    use std::time::Duration;

    use secrecy::SecretString;

    use crate::agents::{McpServer, ToolSpec};

    /// An agent with nothing but the defaults: no tools of any kind.
    fn plain_agent() -> AgentProfile {
        AgentProfile {
            builtins: Vec::new(),
            ..AgentProfile::new("support", "Unfilled {{name}}.", "marin", "gpt-realtime-1.5")
        }
    }

    fn lookup_order() -> ToolSpec {
        ToolSpec {
            name: "lookup_order".into(),
            description: "Look up an order by its number.".into(),
            parameters: json!({"type":"object","properties":{"order_id":{"type":"string"}},"required":["order_id"]}),
            url: "https://backend.example.com/tools/lookup_order".into(),
            timeout: Duration::from_secs(5),
        }
    }

    fn parsed(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn session_update_is_the_ga_shape_with_pcmu_both_ways() {
        let update = parsed(&session_update(&plain_agent(), "Be brief."));
        assert_eq!(update["type"], "session.update");
        let session = &update["session"];
        assert_eq!(session["type"], "realtime");
        assert_eq!(
            session["instructions"], "Be brief.",
            "the call's, not the agent's"
        );
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
            session["audio"]["input"]["turn_detection"],
            json!({"type":"server_vad","threshold":0.5,"prefix_padding_ms":300,"silence_duration_ms":500,"create_response":true,"interrupt_response":true})
        );
        assert_eq!(
            session["audio"]["input"]["transcription"],
            json!({"model": "gpt-4o-mini-transcribe"}),
            "no language unless the agent sets one"
        );
        assert_eq!(
            session["audio"]["input"]["noise_reduction"],
            json!({"type": "near_field"})
        );
        for absent in [
            // Beta fields, which the GA API rejects.
            "input_audio_format",
            "output_audio_format",
            "modalities",
            "voice",
            "turn_detection",
            "input_audio_transcription",
            "temperature",
            // Chosen in the URL.
            "model",
            // Nothing to choose from.
            "tools",
            "tool_choice",
        ] {
            assert!(session.get(absent).is_none(), "field {absent}");
        }
    }

    #[test]
    fn an_agent_without_tools_gets_the_plain_update_byte_for_byte() {
        let expected = r#"{"type":"session.update","session":{"type":"realtime","instructions":"Be brief.","output_modalities":["audio"],"audio":{"input":{"format":{"type":"audio/pcmu"},"noise_reduction":{"type":"near_field"},"transcription":{"model":"gpt-4o-mini-transcribe"},"turn_detection":{"type":"server_vad","threshold":0.5,"prefix_padding_ms":300,"silence_duration_ms":500,"create_response":true,"interrupt_response":true}},"output":{"format":{"type":"audio/pcmu"},"voice":"marin"}}}}"#;
        assert_eq!(session_update(&plain_agent(), "Be brief."), expected);
    }

    #[test]
    fn the_agents_audio_settings_are_passed_on() {
        let agent = AgentProfile {
            transcription_language: Some("pt".into()),
            turn_detection: Some(json!({"type":"semantic_vad","eagerness":"low"})),
            noise_reduction: NoiseReduction::FarField,
            voice: "cedar".into(),
            ..plain_agent()
        };
        let update = parsed(&session_update(&agent, "Seja breve."));
        let audio = &update["session"]["audio"];
        assert_eq!(
            audio["input"]["transcription"],
            json!({"model":"gpt-4o-mini-transcribe","language":"pt"})
        );
        assert_eq!(
            audio["input"]["turn_detection"],
            json!({"type":"semantic_vad","eagerness":"low"}),
            "verbatim, nothing added"
        );
        assert_eq!(
            audio["input"]["noise_reduction"],
            json!({"type":"far_field"})
        );
        assert_eq!(audio["output"]["voice"], "cedar");
    }

    #[test]
    fn tools_are_the_agents_then_the_builtins_then_mcp_servers_chosen_automatically() {
        let agent = AgentProfile {
            tools: vec![lookup_order()],
            builtins: vec![Builtin::TransferCall, Builtin::EndCall],
            mcp: vec![
                McpServer {
                    server_label: "crm".into(),
                    server_url: "https://mcp.example.com/sse".into(),
                    allowed_tools: Some(vec!["find_customer".into()]),
                    authorization: Some(SecretString::from("mcp-token-1")),
                },
                McpServer {
                    server_label: "docs".into(),
                    server_url: "https://docs.example.com/mcp".into(),
                    allowed_tools: None,
                    authorization: None,
                },
            ],
            ..plain_agent()
        };
        let update = parsed(&session_update(&agent, "Be brief."));
        let session = &update["session"];
        assert_eq!(session["tool_choice"], "auto");
        let tools = session["tools"].as_array().unwrap();
        assert_eq!(
            tools[0],
            json!({"type":"function","name":"lookup_order","description":"Look up an order by its number.","parameters":{"type":"object","properties":{"order_id":{"type":"string"}},"required":["order_id"]}})
        );
        let names: Vec<&str> = tools[1..3]
            .iter()
            .map(|tool| tool["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["transfer_call", "end_call"], "in the agent's order");
        for builtin in &tools[1..3] {
            assert_eq!(builtin["type"], "function");
            assert!(!builtin["description"].as_str().unwrap().is_empty());
            assert_eq!(builtin["parameters"]["type"], "object");
            assert_eq!(
                builtin["parameters"]["properties"]["reason"]["type"],
                "string"
            );
            assert!(
                builtin["parameters"].get("required").is_none(),
                "the reason is optional"
            );
        }
        assert!(
            tools[2]["description"]
                .as_str()
                .unwrap()
                .starts_with("Hang up the call.")
        );
        assert_eq!(
            tools[3],
            json!({"type":"mcp","server_label":"crm","server_url":"https://mcp.example.com/sse","allowed_tools":["find_customer"],"authorization":"mcp-token-1","require_approval":"never"})
        );
        assert_eq!(
            tools[4],
            json!({"type":"mcp","server_label":"docs","server_url":"https://docs.example.com/mcp","require_approval":"never"}),
            "what the file leaves out is left out"
        );
        assert_eq!(tools.len(), 5);
    }

    #[test]
    fn one_builtin_alone_is_declared_with_tool_choice() {
        let agent = AgentProfile {
            builtins: vec![Builtin::EndCall],
            ..plain_agent()
        };
        let update = parsed(&session_update(&agent, ""));
        assert_eq!(update["session"]["tool_choice"], "auto");
        assert_eq!(
            update["session"]["tools"][0]["parameters"],
            json!({"type":"object","properties":{"reason":{"type":"string","description":"Why the call ends"}}})
        );
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
        assert_eq!(
            system_message("say \"hi\""),
            r#"{"type":"conversation.item.create","item":{"type":"message","role":"system","content":[{"type":"input_text","text":"say \"hi\""}]}}"#
        );
        assert_eq!(
            user_text("The caller pressed: 1 2"),
            r#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"The caller pressed: 1 2"}]}}"#
        );
        assert_eq!(
            function_call_output("call_1", r#"{"status":"shipped"}"#),
            r#"{"type":"conversation.item.create","item":{"type":"function_call_output","call_id":"call_1","output":"{\"status\":\"shipped\"}"}}"#
        );
        assert_eq!(
            response_create_with("Say you are checking.", true),
            r#"{"type":"response.create","response":{"instructions":"Say you are checking.","tool_choice":"none"}}"#
        );
        assert_eq!(
            response_create_with("Say goodbye.", false),
            r#"{"type":"response.create","response":{"instructions":"Say goodbye."}}"#
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
            ServerEvent::ResponseDone { response_id: "resp_1".into(), status: "completed".into(), usage: Usage { input_tokens: 10, output_tokens: 20, total_tokens: 30, ..Usage::default() } }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.done","response":{"id":"resp_2","status":"cancelled","status_details":{"type":"cancelled","reason":"turn_detected"}}}"#).unwrap(),
            ServerEvent::ResponseDone { response_id: "resp_2".into(), status: "cancelled".into(), usage: Usage::default() }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.done","response":{"id":"resp_3"}}"#).unwrap(),
            ServerEvent::ResponseDone {
                response_id: "resp_3".into(),
                status: String::new(),
                usage: Usage::default()
            }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"input_audio_buffer.speech_stopped","event_id":"e","audio_end_ms":1200,"item_id":"item_u"}"#).unwrap(),
            ServerEvent::SpeechStopped
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

    fn call(response_id: &str, item_id: &str, call_id: &str) -> ServerEvent<'static> {
        ServerEvent::FunctionCall {
            response_id: response_id.into(),
            item_id: item_id.into(),
            call_id: call_id.into(),
            name: "lookup_order".into(),
            arguments: r#"{"order_id":"42"}"#.into(),
        }
    }

    #[test]
    fn function_calls_are_read_from_both_events_that_report_them() {
        assert_eq!(
            parse_server_event(r#"{"type":"response.function_call_arguments.done","event_id":"e","response_id":"resp_1","item_id":"item_f","output_index":0,"call_id":"call_1","name":"lookup_order","arguments":"{\"order_id\":\"42\"}"}"#).unwrap(),
            call("resp_1", "item_f", "call_1")
        );
        assert_eq!(
            parse_server_event(r#"{"type":"response.output_item.done","event_id":"e","response_id":"resp_1","output_index":0,"item":{"id":"item_f","type":"function_call","status":"completed","call_id":"call_1","name":"lookup_order","arguments":"{\"order_id\":\"42\"}","object":"realtime.item"}}"#).unwrap(),
            call("resp_1", "item_f", "call_1")
        );
    }

    #[test]
    fn other_finished_items_are_not_function_calls() {
        for item in [
            r#"{"id":"item_m","type":"message","role":"assistant","status":"completed","content":[{"type":"output_audio","transcript":"Hi."}]}"#,
            r#"{"id":"item_c","type":"mcp_call","server_label":"crm","name":"find_customer","arguments":"{}","output":"{}"}"#,
            r#"{"id":"item_x"}"#,
        ] {
            let text = format!(
                r#"{{"type":"response.output_item.done","response_id":"resp_1","output_index":0,"item":{item}}}"#
            );
            assert_eq!(
                parse_server_event(&text).unwrap(),
                ServerEvent::Other,
                "{item}"
            );
        }
        // Other events carry items too; they parse whatever the item holds.
        assert_eq!(
            parse_server_event(r#"{"type":"conversation.item.done","item":{"id":"item_u","type":"message","role":"user","content":[{"type":"input_audio","transcript":null}]}}"#).unwrap(),
            ServerEvent::Other
        );
    }

    #[test]
    fn a_function_call_without_a_field_names_it() {
        let arguments_done = r#"{"type":"response.function_call_arguments.done","response_id":"resp_1","item_id":"item_f","call_id":"call_1","name":"lookup_order","arguments":"{}"}"#;
        let item_done = r#"{"type":"response.output_item.done","response_id":"resp_1","item":{"id":"item_f","type":"function_call","call_id":"call_1","name":"lookup_order","arguments":"{}"}}"#;
        let without = |text: &str, field: &str| -> String {
            let mut value: Value = serde_json::from_str(text).unwrap();
            match field.strip_prefix("item.") {
                Some(inner) => value["item"].as_object_mut().unwrap().remove(inner),
                None => value.as_object_mut().unwrap().remove(field),
            };
            value.to_string()
        };
        let cases = [
            (arguments_done, "response_id"),
            (arguments_done, "item_id"),
            (arguments_done, "call_id"),
            (arguments_done, "name"),
            (arguments_done, "arguments"),
            (item_done, "response_id"),
            (item_done, "item"),
            (item_done, "item.id"),
            (item_done, "item.call_id"),
            (item_done, "item.name"),
            (item_done, "item.arguments"),
        ];
        for (text, field) in cases {
            let kind = if text == item_done {
                "response.output_item.done"
            } else {
                "response.function_call_arguments.done"
            };
            match parse_server_event(&without(text, field)) {
                Err(ServerEventError::MissingField(k, f)) => {
                    assert_eq!((k, f), (kind, field));
                }
                other => panic!("{kind} without {field}: {other:?}"),
            }
        }
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

    #[test]
    fn usage_is_read_by_kind_with_the_cached_tokens_split_out() {
        let done = r#"{"type":"response.done","response":{"id":"r","status":"completed","usage":{"total_tokens":1300,"input_tokens":1000,"output_tokens":300,"input_token_details":{"text_tokens":400,"audio_tokens":600,"image_tokens":0,"cached_tokens":700,"cached_tokens_details":{"text_tokens":300,"audio_tokens":400,"image_tokens":0}},"output_token_details":{"text_tokens":50,"audio_tokens":250}}}}"#;
        let ServerEvent::ResponseDone { usage, .. } = parse_server_event(done).unwrap() else {
            panic!("not a response.done");
        };
        assert_eq!(
            usage,
            Usage {
                input_tokens: 1000,
                output_tokens: 300,
                total_tokens: 1300,
                input_text_tokens: 400,
                input_audio_tokens: 600,
                input_cached_text_tokens: 300,
                input_cached_audio_tokens: 400,
                output_text_tokens: 50,
                output_audio_tokens: 250,
            }
        );
        // Without the split, cached tokens count as audio first, never more than there was.
        let unsplit = r#"{"type":"response.done","response":{"id":"r","usage":{"input_token_details":{"text_tokens":100,"audio_tokens":50,"cached_tokens":120}}}}"#;
        let ServerEvent::ResponseDone { usage, .. } = parse_server_event(unsplit).unwrap() else {
            panic!("not a response.done");
        };
        assert_eq!(
            (
                usage.input_cached_audio_tokens,
                usage.input_cached_text_tokens
            ),
            (50, 70)
        );
        let mut sum = usage;
        sum.add(&usage);
        assert_eq!(sum.input_cached_text_tokens, 140);
        assert_eq!(sum.input_audio_tokens, 100);
    }
}
