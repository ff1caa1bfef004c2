//! The properties the fuzz targets check: one public function per target, taking the target's
//! raw input. Each fuzz target (`fuzz_targets/<name>.rs`) is a one-line call of its function,
//! and the main crate's seed regression test (`tests/fuzz_seeds.rs`) includes this file and
//! runs every committed seed through the same functions on stable Rust, so a crash that was
//! found and fixed stays fixed.
//!
//! Every function must not panic on any input; where it is cheap, it also checks what a
//! successful parse means (against `serde_json::Value`'s reading of the same text), and that
//! what the bridge writes from parsed values reads back as those values.
//!
//! Inputs that carry several parts (a URL, a header and a body) are split on `\n`, and the
//! first byte picks among the routes a target covers, so a seed file stays readable text.

use std::path::Path;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use actix_web::ResponseError;
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use callbridge::agents::file::{AgentDefaults, parse as parse_agents};
use callbridge::agents::{AgentProfile, Agents, BUILTIN_NAMES, Builtin};
use callbridge::call::agent::{self, ContextAnswer, OutboundBrief, Parties, Variables};
use callbridge::domain::phone::{E164, Masked};
use callbridge::events::DeliveryStatus;
use callbridge::openai::events::{self as openai, AudioRef, ErrorDetail, ServerEvent, Usage};
use callbridge::routes::inputs::{
    ApiError, CallListQuery, EventListQuery, IncomingMessage, PermissionRequest, PlaceCall,
    StatusCallback, VoiceRequest,
};
use callbridge::store::models::{EventCursor, ListCursor};
use callbridge::twilio::call::Direction;
use callbridge::twilio::ids::{AccountSid, CallSid};
use callbridge::twilio::media::{self, Inbound};
use callbridge::twilio::signature::{self, SignatureError, SignedBody};
use callbridge::twilio::socket::{FrameLimit, MAX_TWILIO_FRAME};
use callbridge::twilio::webhook::{TwilioForm, WebhookError, signed_form};
use futures_util::Stream;
use futures_util::stream;
use serde_json::{Map, Value};

/// A target's checks, given its raw input.
pub type Check = fn(&[u8]);

/// Every target, by the name of its `fuzz_targets/` file and of its `seeds/` folder.
pub const TARGETS: &[(&str, Check)] = &[
    ("twilio_frame", twilio_frame),
    ("openai_event", openai_event),
    ("twilio_webhook", twilio_webhook),
    ("api_body", api_body),
    ("api_query", api_query),
    ("agents_file", agents_file),
    ("business_answers", business_answers),
    ("ws_frame_limit", ws_frame_limit),
];

const STREAM: &str = "MZ0123456789abcdef0123456789abcdef";
/// The auth token of Twilio's own signature test vectors.
const AUTH_TOKEN: &[u8] = b"12345";
const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";

/// What serde reads as a struct's field: the value under `key` in an object, or the element at
/// the field's `position` in an array (serde reads a struct from either).
fn member<'v>(value: &'v Value, key: &str, position: usize) -> &'v Value {
    match value {
        Value::Object(map) => map.get(key).unwrap_or(&Value::Null),
        Value::Array(items) => items.get(position).unwrap_or(&Value::Null),
        _ => &Value::Null,
    }
}

/// The JSON `Value` of a text a struct was read from, to compare the struct with. serde_json
/// skips the fields a struct ignores without checking them fully (a `\u` escape of a lone
/// surrogate, a raw control character or a number too large for an f64 passes there), so such
/// a text can be read into a struct while `Value` refuses it: then, and only then, there is
/// nothing to compare with.
fn value_of(text: &[u8]) -> Option<Value> {
    match serde_json::from_slice(text) {
        Ok(value) => Some(value),
        Err(error) => {
            let message = error.to_string();
            assert!(
                ["escape", "control character", "number out of range"]
                    .iter()
                    .any(|lax| message.contains(lax)),
                "a text that was read is not JSON: {message}"
            );
            None
        }
    }
}

/// Our own output, which must be JSON.
fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The first `n` parts of `data` split on `\n`, and the rest (which may hold `\n`).
fn parts(data: &[u8], n: usize) -> Option<(Vec<&[u8]>, &[u8])> {
    let mut heads = Vec::with_capacity(n);
    let mut rest = data;
    for _ in 0..n {
        let end = rest.iter().position(|&b| b == b'\n')?;
        heads.push(&rest[..end]);
        rest = &rest[end + 1..];
    }
    Some((heads, rest))
}

// --- Twilio Media Streams frames -----------------------------------------------------------

/// `twilio::media::parse` on a text frame; a frame that parses says what its JSON says, and
/// what the bridge writes from it (OpenAI's append, our own media and mark) reads back as it.
pub fn twilio_frame(data: &[u8]) {
    // The socket hands the parser text frames only, and a text frame is UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(frame) = media::parse(text) else {
        return;
    };
    let Some(value) = value_of(data) else {
        return;
    };
    let event = member(&value, "event", 0)
        .as_str()
        .expect("a frame that parses names its event");
    match &frame {
        Inbound::Connected => assert_eq!(event, "connected"),
        Inbound::Stop => assert_eq!(event, "stop"),
        Inbound::Other(other) => {
            assert_eq!(other, event);
            assert!(
                !["connected", "start", "media", "mark", "dtmf", "stop"].contains(&event),
                "{event} is a known event"
            );
        }
        Inbound::Start(start) => {
            assert_eq!(event, "start");
            let body = member(&value, "start", 3);
            assert_eq!(
                member(body, "streamSid", 0).as_str(),
                Some(start.stream_sid.as_str())
            );
            assert_eq!(
                member(body, "accountSid", 1).as_str(),
                Some(start.account_sid.as_str())
            );
            assert_eq!(
                member(body, "callSid", 2).as_str(),
                Some(start.call_sid.as_str())
            );
            let parameters = member(body, "customParameters", 3);
            for (name, value) in &start.custom_parameters {
                assert_eq!(parameters[name].as_str(), Some(value.as_str()));
            }
        }
        Inbound::Media { payload } => {
            assert_eq!(event, "media");
            let body = member(&value, "media", 1);
            assert_eq!(member(body, "payload", 0).as_str(), Some(payload.as_ref()));
            let append = json(&openai::append_audio(payload));
            assert_eq!(append["audio"].as_str(), Some(payload.as_ref()));
            let echoed = media::media(STREAM, payload);
            assert_eq!(
                media::parse(&echoed).expect("our media message parses"),
                frame
            );
        }
        Inbound::Mark { name } => {
            assert_eq!(event, "mark");
            let body = member(&value, "mark", 2);
            assert_eq!(member(body, "name", 0).as_str(), Some(name.as_ref()));
            let echoed = media::mark(STREAM, name);
            assert_eq!(media::parse(&echoed).expect("our mark parses"), frame);
        }
        Inbound::Dtmf { digit } => {
            assert_eq!(event, "dtmf");
            let body = member(&value, "dtmf", 4);
            assert_eq!(member(body, "digit", 0).as_str(), Some(digit.as_str()));
            let said = json(&openai::user_text(digit));
            assert_eq!(
                said["item"]["content"][0]["text"].as_str(),
                Some(digit.as_str())
            );
        }
    }
}

// --- OpenAI Realtime server events ---------------------------------------------------------

/// The event types `parse_server_event` gives a variant of their own.
const HANDLED_EVENTS: [&str; 13] = [
    "response.output_audio.delta",
    "response.output_audio.done",
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "response.created",
    "response.done",
    "response.function_call_arguments.done",
    "response.output_item.done",
    "response.output_audio_transcript.done",
    "conversation.item.input_audio_transcription.completed",
    "session.created",
    "session.updated",
    "error",
];

fn text_or_empty(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

fn check_audio_ref(value: &Value, audio: &AudioRef<'_>) {
    assert_eq!(
        member(value, "response_id", 2).as_str(),
        Some(audio.response_id.as_ref())
    );
    assert_eq!(
        member(value, "item_id", 3).as_str(),
        Some(audio.item_id.as_ref())
    );
    assert_eq!(
        member(value, "content_index", 4).as_u64().unwrap_or(0),
        u64::from(audio.content_index)
    );
    let truncate = json(&openai::truncate(&audio.item_id, audio.content_index, 1200));
    assert_eq!(truncate["item_id"].as_str(), Some(audio.item_id.as_ref()));
}

/// A function call's fields, as `(response_id, item_id, call_id, name, arguments)` read from
/// the event's JSON: top-level for `response.function_call_arguments.done`, in `item` for
/// `response.output_item.done`.
fn function_call_fields<'v>(value: &'v Value, kind: &str) -> [&'v str; 5] {
    let at = text_or_empty;
    let response_id = at(member(value, "response_id", 2));
    if kind == "response.output_item.done" {
        let item = member(value, "item", 12);
        [
            response_id,
            at(member(item, "id", 1)),
            at(member(item, "call_id", 2)),
            at(member(item, "name", 3)),
            at(member(item, "arguments", 4)),
        ]
    } else {
        [
            response_id,
            at(member(value, "item_id", 3)),
            at(member(value, "call_id", 9)),
            at(member(value, "name", 10)),
            at(member(value, "arguments", 11)),
        ]
    }
}

/// What the bridge does with a function call's strings: answers it by `call_id`, and sends a
/// business tool its arguments when they are a JSON object.
fn check_function_call_output(call_id: &str, name: &str, arguments: &str) {
    let output = json(&openai::function_call_output(call_id, arguments));
    assert_eq!(output["item"]["call_id"].as_str(), Some(call_id));
    assert_eq!(output["item"]["output"].as_str(), Some(arguments));
    if let Ok(parsed) = serde_json::from_str::<Map<String, Value>>(arguments) {
        let parties = Parties::from_stream("whatsapp:+15550001111", "whatsapp:+15552223333", None);
        let body = json(&agent::tool_request(
            "CA0123456789abcdef0123456789abcdef",
            "support",
            &parties,
            name,
            call_id,
            &parsed,
        ));
        assert_eq!(body["tool"].as_str(), Some(name));
        assert_eq!(body["arguments"], Value::Object(parsed));
    }
}

/// `openai::events::parse_server_event`; an event that parses holds what its JSON holds, and
/// the strings taken from it go out again intact.
pub fn openai_event(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(event) = openai::parse_server_event(text) else {
        return;
    };
    let Some(value) = value_of(data) else {
        return;
    };
    let kind = member(&value, "type", 0)
        .as_str()
        .expect("an event that parses names its type");
    let response = member(&value, "response", 6);
    match &event {
        ServerEvent::AudioDelta(audio, delta) => check_audio_delta(&value, kind, audio, delta),
        ServerEvent::AudioDone(audio) => {
            assert_eq!(kind, "response.output_audio.done");
            check_audio_ref(&value, audio);
        }
        ServerEvent::SpeechStarted => assert_eq!(kind, "input_audio_buffer.speech_started"),
        ServerEvent::SpeechStopped => assert_eq!(kind, "input_audio_buffer.speech_stopped"),
        ServerEvent::ResponseCreated { response_id } => {
            assert_eq!(kind, "response.created");
            assert_eq!(
                member(response, "id", 0).as_str(),
                Some(response_id.as_str())
            );
        }
        ServerEvent::ResponseDone {
            response_id,
            status,
            usage,
        } => {
            assert_eq!(kind, "response.done");
            assert_eq!(
                member(response, "id", 0).as_str(),
                Some(response_id.as_str())
            );
            assert_eq!(text_or_empty(member(response, "status", 1)), status);
            check_usage(member(response, "usage", 2), usage);
        }
        ServerEvent::FunctionCall {
            response_id,
            item_id,
            call_id,
            name,
            arguments,
        } => {
            assert!(
                kind == "response.function_call_arguments.done"
                    || kind == "response.output_item.done",
                "{kind} is no function call"
            );
            let parsed = [response_id, item_id, call_id, name, arguments].map(String::as_str);
            assert_eq!(function_call_fields(&value, kind), parsed);
            check_function_call_output(call_id, name, arguments);
        }
        ServerEvent::AgentTranscriptDone { .. } | ServerEvent::CallerTranscriptDone { .. } => {
            check_transcript(&event, &value, kind);
        }
        ServerEvent::SessionCreated { session_id } => {
            assert_eq!(kind, "session.created");
            let session = member(&value, "session", 7);
            assert_eq!(member(session, "id", 0).as_str(), session_id.as_deref());
        }
        ServerEvent::SessionUpdated { interrupt_response } => {
            assert_eq!(kind, "session.updated");
            let session = member(&value, "session", 7);
            let audio = member(session, "audio", 1);
            let turn_detection = member(member(audio, "input", 0), "turn_detection", 0);
            // No turn detection: nothing interrupts; with it, interrupting is the default.
            let expected = !turn_detection.is_null()
                && member(turn_detection, "interrupt_response", 0)
                    .as_bool()
                    .unwrap_or(true);
            assert_eq!(*interrupt_response, expected);
        }
        ServerEvent::Error(detail) => {
            assert_eq!(kind, "error");
            let error = member(&value, "error", 8);
            let read = ErrorDetail {
                kind: text_or_empty(member(error, "type", 0)).to_owned(),
                code: member(error, "code", 1).as_str().map(str::to_owned),
                message: text_or_empty(member(error, "message", 2)).to_owned(),
            };
            assert_eq!(*detail, read);
            let _ = detail.severity();
        }
        ServerEvent::Other => {
            let item_kind = member(member(&value, "item", 12), "type", 0).as_str();
            assert!(
                !HANDLED_EVENTS.contains(&kind)
                    || (kind == "response.output_item.done" && item_kind != Some("function_call")),
                "{kind} was not given its own variant"
            );
        }
    }
}

/// A transcript line holds what the event's JSON holds, and goes out again intact: the caller's
/// lines as user text and the agent's as assistant text when a replacement session is seeded.
fn check_transcript(event: &ServerEvent<'_>, value: &Value, kind: &str) {
    let (transcript, said) = match event {
        ServerEvent::AgentTranscriptDone {
            item_id,
            transcript,
        } => {
            assert_eq!(kind, "response.output_audio_transcript.done");
            assert_eq!(member(value, "item_id", 3).as_str(), Some(item_id.as_ref()));
            (transcript, openai::assistant_text(transcript))
        }
        ServerEvent::CallerTranscriptDone { transcript } => {
            assert_eq!(
                kind,
                "conversation.item.input_audio_transcription.completed"
            );
            (transcript, openai::user_text(transcript))
        }
        _ => unreachable!("only transcripts are checked here"),
    };
    assert_eq!(text_or_empty(member(value, "transcript", 5)), transcript);
    assert_eq!(
        json(&said)["item"]["content"][0]["text"].as_str(),
        Some(transcript.as_str())
    );
}

fn check_audio_delta(value: &Value, kind: &str, audio: &AudioRef<'_>, delta: &str) {
    assert_eq!(kind, "response.output_audio.delta");
    assert_eq!(member(value, "delta", 1).as_str(), Some(delta));
    check_audio_ref(value, audio);
    // The delta goes to Twilio unchanged.
    let forwarded = media::media(STREAM, delta);
    let Inbound::Media { payload } = media::parse(&forwarded).expect("our media message parses")
    else {
        panic!("our media message is not media")
    };
    assert_eq!(payload, delta);
}

fn check_usage(counted: &Value, usage: &Usage) {
    let count = |key, position| member(counted, key, position).as_u64().unwrap_or(0);
    assert_eq!(
        [usage.input_tokens, usage.output_tokens, usage.total_tokens],
        [
            count("input_tokens", 0),
            count("output_tokens", 1),
            count("total_tokens", 2)
        ]
    );
}

// --- Twilio webhooks: signature and form ----------------------------------------------------

fn our_account() -> AccountSid {
    AccountSid::parse(ACCOUNT).expect("a well-formed AccountSid")
}

/// A signed form of type `T`: whatever was sent is refused or read without a panic; the right
/// signature gets past the signature check, a signature with one bit changed does not, and a
/// form that is read names our account exactly once.
fn check_signed_form<T: TwilioForm>(url: &str, header: Option<&str>, body: &[u8]) {
    let account = our_account();
    let _ = signed_form::<T>(AUTH_TOKEN, &account, url, body, header);
    let Ok(params) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body) else {
        return;
    };
    for (name, value) in &params {
        check_masked(name);
        check_masked(value);
    }
    let right = signature::compute(AUTH_TOKEN, url, SignedBody::Form(&params));
    // Header values arrive with surrounding spaces at times; they are not part of it.
    let padded = format!(" {right} ");
    match signed_form::<T>(AUTH_TOKEN, &account, url, body, Some(&padded)) {
        Ok(_) => {
            let accounts: Vec<&str> = params
                .iter()
                .filter(|(name, _)| name == "AccountSid")
                .map(|(_, value)| value.as_str())
                .collect();
            assert_eq!(accounts, [ACCOUNT], "a form read for another account");
        }
        Err(WebhookError::Forbidden(reason)) => {
            panic!("the right signature was refused ({reason}) for {url:?}")
        }
        Err(WebhookError::UnreadableBody(_)) => assert!(
            body.len() > 64 * 1024,
            "a body that decodes to parameters was called unreadable"
        ),
        Err(WebhookError::NotTwilioForm(_) | WebhookError::OtherAccount) => {}
    }
    let mut mac = STANDARD.decode(&right).expect("compute gives base64");
    let at = body.len() % mac.len();
    mac[at] ^= 1u8 << (url.len() % 8);
    let wrong = STANDARD.encode(&mac);
    assert!(
        matches!(
            signed_form::<T>(AUTH_TOKEN, &account, url, body, Some(&wrong)),
            Err(WebhookError::Forbidden(SignatureError::Mismatch))
        ),
        "a changed signature was not refused as a mismatch"
    );
}

/// What the logs show of a number: at most its last four digits, in a text as long as it.
fn check_masked(raw: &str) {
    let shown = Masked(raw).to_string();
    assert_eq!(shown.chars().count(), raw.chars().count());
    let digits = |text: &str| text.bytes().filter(u8::is_ascii_digit).count();
    assert!(digits(&shown) <= 4, "{raw:?} shown as {shown:?}");
}

/// `twilio::webhook::signed_form` for the forms of /voice, /voice/status and /messaging. Input:
/// a byte choosing the form, then the URL checked, `\n`, the `X-Twilio-Signature` header (an
/// empty line: no header), `\n`, and the body.
pub fn twilio_webhook(data: &[u8]) {
    let Some((&route, rest)) = data.split_first() else {
        return;
    };
    let Some((heads, body)) = parts(rest, 2) else {
        return;
    };
    // Both come from an HTTP request's head, which actix hands over as text.
    let (Ok(url), Ok(header)) = (std::str::from_utf8(heads[0]), std::str::from_utf8(heads[1]))
    else {
        return;
    };
    let header = (!header.is_empty()).then_some(header);
    match route % 3 {
        0 => check_signed_form::<VoiceRequest>(url, header, body),
        1 => check_signed_form::<StatusCallback>(url, header, body),
        _ => check_signed_form::<IncomingMessage>(url, header, body),
    }
}

// --- The business API ------------------------------------------------------------------------

/// The agents `POST /calls` may name.
fn api_agents() -> &'static Agents {
    static AGENTS: OnceLock<Agents> = OnceLock::new();
    AGENTS.get_or_init(|| {
        Agents::new(vec![
            AgentProfile::new("support", "You help.", "marin", "gpt-realtime"),
            AgentProfile::new("sales", "You sell.", "cedar", "gpt-realtime"),
        ])
    })
}

/// A refusal of what a client sent is the client's error, never a 5xx, and renders.
fn check_client_error(error: &ApiError) {
    let status = error.status_code();
    assert!(status.is_client_error(), "{error} answered {status}");
    assert_eq!(error.error_response().status(), status);
}

/// `POST /calls` and `POST /call-permissions` bodies: the JSON the routes deserialize and the
/// checks they make. Input: a byte choosing the route, then the body.
pub fn api_body(data: &[u8]) {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    if route % 2 == 0 {
        let Ok(call) = serde_json::from_slice::<PlaceCall>(body) else {
            return;
        };
        let Some(value) = value_of(body) else {
            return;
        };
        match call.check(api_agents()) {
            Ok(user) => {
                assert_eq!(member(&value, "to", 0).as_str(), Some(user.as_str()));
                let context = member(&value, "context", 2).as_str().unwrap_or("");
                assert!(
                    context.len() <= 4096,
                    "a context of {} bytes",
                    context.len()
                );
                if let Some(agent) = member(&value, "agent", 1).as_str() {
                    assert!(api_agents().by_name(agent).is_some(), "agent {agent:?}");
                }
                let variables = member(&value, "variables", 3);
                assert!(variables.as_object().is_none_or(|v| v.len() <= 32));
            }
            Err(error) => check_client_error(&error),
        }
    } else {
        let Ok(request) = serde_json::from_slice::<PermissionRequest>(body) else {
            return;
        };
        let Some(value) = value_of(body) else {
            return;
        };
        match request.check() {
            Ok(user) => {
                assert_eq!(member(&value, "to", 0).as_str(), Some(user.as_str()));
                assert_eq!(E164::parse(user.as_str()), Ok(user.clone()));
            }
            Err(error) => check_client_error(&error),
        }
    }
}

/// The query strings of `GET /calls` and `GET /events` and the CallSid in the path of
/// `POST /calls/{call_sid}/hangup`. Input: a byte choosing which, then the query or segment.
pub fn api_query(data: &[u8]) {
    let Some((&route, rest)) = data.split_first() else {
        return;
    };
    match route % 3 {
        0 => {
            let Ok(query) = serde_urlencoded::from_bytes::<CallListQuery>(rest) else {
                return;
            };
            match query.page() {
                Ok((limit, before)) => {
                    assert!((1..=100).contains(&limit), "limit {limit}");
                    if let Some(cursor) = before {
                        assert_eq!(ListCursor::decode(&cursor.encode()), Some(cursor));
                    }
                }
                Err(error) => check_client_error(&error),
            }
        }
        1 => {
            let Ok(query) = serde_urlencoded::from_bytes::<EventListQuery>(rest) else {
                return;
            };
            match query.page() {
                Ok((status, limit, before)) => {
                    assert!((1..=100).contains(&limit), "limit {limit}");
                    if let Some(status) = status {
                        assert_eq!(DeliveryStatus::parse(status.as_str()), Some(status));
                    }
                    if let Some(cursor) = before {
                        assert_eq!(EventCursor::decode(&cursor.encode()), Some(cursor));
                    }
                }
                Err(error) => check_client_error(&error),
            }
        }
        _ => {
            // actix decodes a path segment to text before the handler sees it.
            let Ok(raw) = std::str::from_utf8(rest) else {
                return;
            };
            match CallSid::parse(raw) {
                Ok(sid) => {
                    assert_eq!(sid.as_str(), raw);
                    assert!(raw.len() == 34 && raw.starts_with("CA"));
                }
                // It says what was expected, never what was sent: the same for every refusal.
                Err(why) => assert_eq!(
                    why.to_string(),
                    CallSid::parse("").expect_err("empty").to_string()
                ),
            }
        }
    }
}

// --- The agents file ---------------------------------------------------------------------------

/// `instructions_file` as the fuzz target sees it: one file with a prompt, one empty, and
/// nothing else (the file system is never read).
fn instructions_file(path: &Path) -> std::io::Result<String> {
    match path.file_name().and_then(|name| name.to_str()) {
        Some("prompt.txt") => Ok("You answer questions about orders.\n".to_owned()),
        Some("empty.txt") => Ok(" \n".to_owned()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file",
        )),
    }
}

fn agents_env(name: &str) -> Option<String> {
    name.starts_with("CRM_")
        .then(|| "Bearer crm-token".to_owned())
}

/// `agents::file::parse` on any text: every problem has a line inside the file and they come in
/// line order, the same text gives the same problems, and the agents of a file that loads keep
/// the rules the loader states (unique names and numbers, one default at most, tools that are
/// not built-ins) and configure a session that is JSON.
pub fn agents_file(data: &[u8]) {
    // The loader reads the file as UTF-8 before it parses anything.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/callbridge/agents.toml");
    let defaults = AgentDefaults {
        voice: "marin".into(),
        model: "gpt-realtime".into(),
    };
    let load = || parse_agents(path, text, &defaults, &agents_env, &instructions_file);
    match load() {
        Ok(agents) => check_agents(&agents),
        Err(problems) => {
            assert!(!problems.0.is_empty(), "an error without a problem");
            let lines = text.bytes().filter(|&b| b == b'\n').count() + 1;
            for problem in &problems.0 {
                assert_eq!(problem.file, path.display().to_string());
                if let Some(line) = problem.line {
                    assert!((1..=lines).contains(&line), "line {line} of {lines}");
                }
                assert!(!problem.message.is_empty());
            }
            assert!(
                problems.0.windows(2).all(|w| w[0].line <= w[1].line),
                "problems out of line order"
            );
            assert_eq!(
                load().expect_err("the same text loads the second time"),
                problems,
                "the same text gave other problems"
            );
        }
    }
}

fn check_agents(agents: &Agents) {
    let profiles = agents.profiles();
    assert!(!profiles.is_empty());
    assert!(profiles.iter().filter(|agent| agent.is_default).count() <= 1);
    let mut names = std::collections::HashSet::new();
    let mut numbers = std::collections::HashSet::new();
    for agent in profiles {
        assert!(
            names.insert(agent.name.as_str()),
            "two agents {:?}",
            agent.name
        );
        assert!(
            (1..=64).contains(&agent.name.len())
                && agent
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "agent name {:?}",
            agent.name
        );
        assert!(!agent.instructions.is_empty());
        assert_eq!(agent.instructions.trim(), agent.instructions);
        for number in &agent.numbers {
            assert!(numbers.insert(number.clone()), "{number} claimed twice");
            assert_eq!(agents.for_number(number.as_str()).name, agent.name);
        }
        let mut tools = std::collections::HashSet::new();
        for tool in &agent.tools {
            assert!(
                tools.insert(tool.name.as_str()),
                "two tools {:?}",
                tool.name
            );
            assert!(!BUILTIN_NAMES.contains(&tool.name.as_str()));
            assert!(tool.timeout.as_millis() <= 30_000);
            assert!(tool.parameters.is_object());
        }
        assert!(agent.context_timeout.as_millis() <= 5000);
        if agent.builtins.contains(&Builtin::TransferCall) {
            assert!(
                agent.transfer_to.is_some(),
                "transfer_call without transfer_to"
            );
        }
        let update = json(&openai::session_update(agent, &agent.instructions));
        assert_eq!(update["type"], "session.update");
        assert_eq!(
            update["session"]["instructions"].as_str(),
            Some(agent.instructions.as_str())
        );
    }
    let _ = callbridge::agents::file::missing_webhook_secret(agents);
}

// --- What the business and the model answer -----------------------------------------------------

/// The agent's own prompt and greeting, with the placeholders a context answer may fill.
const INSTRUCTIONS: &str = "You help {{first_name}} with order {{ order }}.";
const GREETING: &str = "Greet {{first_name}}.";

/// What comes back from the business and the model during a call. Input: a byte choosing
/// which, then a context answer's body (`agent::ContextAnswer::parse`, then the agent's brief),
/// a tool answer's body (sent to the model as the call's output), or `from\nto\n` and a
/// function call's arguments (the request sent to the business's tool).
pub fn business_answers(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => context_answer(rest),
        1 => {
            // The call core sends a tool's answer to the model as text, whatever its bytes.
            let text = String::from_utf8_lossy(rest);
            let output = json(&openai::function_call_output("call_1", &text));
            assert_eq!(output["item"]["output"].as_str(), Some(text.as_ref()));
        }
        _ => {
            let Some((heads, arguments)) = parts(rest, 2) else {
                return;
            };
            let from = String::from_utf8_lossy(heads[0]);
            let to = String::from_utf8_lossy(heads[1]);
            for direction in [None, Some(Direction::Inbound), Some(Direction::OutboundApi)] {
                let parties = Parties::from_stream(&from, &to, direction);
                let caller = if direction == Some(Direction::OutboundApi) {
                    &to
                } else {
                    &from
                };
                if let Ok(number) = E164::from_address(caller) {
                    assert_eq!(parties.caller, number.as_str());
                }
            }
            let Ok(arguments) = std::str::from_utf8(arguments) else {
                return;
            };
            check_function_call_output("call_1", "lookup_order", arguments);
        }
    }
}

fn context_answer(body: &[u8]) {
    let Ok(answer) = ContextAnswer::parse(body) else {
        return;
    };
    let value: Value = serde_json::from_slice(body).expect("an answer is read through Value");
    assert!(value.is_object(), "an answer that is not an object");
    let outbound = OutboundBrief {
        context: Some("Ask about the delivery.".into()),
        variables: Variables::from([("first_name".to_owned(), "Ada".to_owned())]),
    };
    let brief = agent::brief(INSTRUCTIONS, Some(GREETING), Some(&outbound), Some(&answer));
    let mut variables = outbound.variables.clone();
    variables.extend(answer.variables.clone());
    let name = variables.get("first_name").map_or("", String::as_str);
    let order = variables.get("order").map_or("", String::as_str);
    assert!(
        brief
            .instructions
            .starts_with(&format!("You help {name} with order {order}.")),
        "{:?}",
        brief.instructions
    );
    if let Some(extra) = answer.instructions.as_deref().map(str::trim)
        && !extra.is_empty()
    {
        assert!(brief.instructions.ends_with(&format!("\n\n{extra}")));
    }
    let context_given = answer
        .context
        .as_deref()
        .is_some_and(|context| !context.trim().is_empty());
    assert_eq!(brief.system_messages.len(), 1 + usize::from(context_given));
    for message in &brief.system_messages {
        let sent = json(&openai::system_message(message));
        assert_eq!(
            sent["item"]["content"][0]["text"].as_str(),
            Some(message.as_str())
        );
    }
    if let Some(greeting) = &brief.greeting {
        assert!(!greeting.trim().is_empty());
        let sent = json(&openai::response_create_with(greeting, false));
        assert_eq!(
            sent["response"]["instructions"].as_str(),
            Some(greeting.as_str())
        );
    }
    if answer.greeting.is_none() {
        assert_eq!(brief.greeting, Some(format!("Greet {name}.")));
    }
}

// --- The Media Streams socket's frame limit -----------------------------------------------------

/// How a limited socket body ended: the bytes it passed, and the refusal, if any.
#[derive(Debug, PartialEq)]
struct Drained {
    passed: Vec<u8>,
    refusal: Option<&'static str>,
}

fn drain(bytes: &[u8], chunk_lengths: impl Iterator<Item = usize>, limit: usize) -> Drained {
    let mut chunks = Vec::new();
    let mut rest = bytes;
    for length in chunk_lengths {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(length.clamp(1, rest.len()));
        chunks.push(Ok::<_, PayloadError>(Bytes::copy_from_slice(chunk)));
        rest = tail;
    }
    if !rest.is_empty() {
        chunks.push(Ok(Bytes::copy_from_slice(rest)));
    }
    let mut limited = FrameLimit::new(stream::iter(chunks), limit);
    let mut cx = Context::from_waker(Waker::noop());
    let mut drained = Drained {
        passed: Vec::new(),
        refusal: None,
    };
    loop {
        match Pin::new(&mut limited).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(chunk))) => drained.passed.extend_from_slice(&chunk),
            Poll::Ready(Some(Err(error))) => {
                drained.refusal = Some(match error {
                    PayloadError::Overflow => "overflow",
                    PayloadError::Io(_) => "invalid frame",
                    _ => "other",
                });
                assert!(
                    matches!(Pin::new(&mut limited).poll_next(&mut cx), Poll::Ready(None)),
                    "the body went on after its refusal"
                );
                return drained;
            }
            Poll::Ready(None) => return drained,
            Poll::Pending => panic!("a body made of ready chunks is pending"),
        }
    }
}

/// `twilio::socket::FrameLimit` on a socket's raw incoming bytes, cut into chunks three ways
/// (whole, one byte at a time, and lengths the input picks): the verdict never depends on the
/// cuts, what passes is the input unchanged, and a refusal passes only a prefix of it. Input:
/// a byte whose low bit picks the real limit or the next two bytes as one, a byte seeding the
/// chunk lengths, then the socket's bytes.
pub fn ws_frame_limit(data: &[u8]) {
    let [pick, low, high, seed, bytes @ ..] = data else {
        return;
    };
    let limit = if pick & 1 == 0 {
        MAX_TWILIO_FRAME
    } else {
        usize::from(u16::from_le_bytes([*low, *high]))
    };
    let whole = drain(bytes, std::iter::empty(), limit);
    match whole.refusal {
        None => assert_eq!(whole.passed, bytes, "bytes changed on their way"),
        Some(_) => assert!(whole.passed.is_empty()),
    }
    let single = drain(bytes, std::iter::repeat(1), limit);
    let mut state = usize::from(*seed);
    let picked = drain(
        bytes,
        std::iter::from_fn(|| {
            state = (state * 37 + 11) % 97;
            Some(state % 19 + 1)
        }),
        limit,
    );
    for cut in [&single, &picked] {
        assert_eq!(
            cut.refusal, whole.refusal,
            "the verdict depends on the chunks"
        );
        assert!(
            bytes.starts_with(&cut.passed),
            "passed bytes are not the input's"
        );
        if cut.refusal.is_none() {
            assert_eq!(cut.passed, bytes);
        }
    }
}
