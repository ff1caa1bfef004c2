//! Twilio Media Streams messages: what Twilio sends on the stream socket (`connected`, `start`,
//! `media`, `mark`, `dtmf`, `stop`) and what we send back (`media`, `mark`, `clear`).
//!
//! Inbound frames are parsed into one flat, borrowing struct rather than a tagged enum: serde's
//! internally tagged enums buffer every field into an owned map first, which would cost an
//! allocation per 20 ms frame. The base64 `payload` is borrowed from the frame and later copied
//! verbatim into the outgoing OpenAI event.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;

use super::ids::{AccountSid, CallSid, StreamSid};
use crate::json;

/// A message from Twilio, already classified.
#[derive(Debug, PartialEq)]
pub enum Inbound<'a> {
    Connected,
    Start(Start),
    Media {
        payload: Cow<'a, str>,
    },
    Mark {
        name: Cow<'a, str>,
    },
    Dtmf {
        digit: String,
    },
    Stop,
    /// A well-formed message of an event type this server does not use.
    Other(String),
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Start {
    pub stream_sid: StreamSid,
    pub account_sid: AccountSid,
    pub call_sid: CallSid,
    #[serde(default)]
    pub custom_parameters: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("not a Media Streams message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a {0:?} message without its {0:?} object")]
    MissingBody(&'static str),
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    media: Option<MediaBody<'a>>,
    #[serde(borrow, default)]
    mark: Option<MarkBody<'a>>,
    #[serde(default)]
    start: Option<Start>,
    #[serde(default)]
    dtmf: Option<DtmfBody>,
}

#[derive(Deserialize)]
struct MediaBody<'a> {
    #[serde(borrow)]
    payload: Cow<'a, str>,
}

#[derive(Deserialize)]
struct MarkBody<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

#[derive(Deserialize)]
struct DtmfBody {
    digit: String,
}

pub fn parse(text: &str) -> Result<Inbound<'_>, InboundError> {
    let frame: Frame<'_> = serde_json::from_str(text)?;
    Ok(match frame.event.as_ref() {
        "media" => Inbound::Media {
            payload: frame
                .media
                .ok_or(InboundError::MissingBody("media"))?
                .payload,
        },
        "mark" => Inbound::Mark {
            name: frame.mark.ok_or(InboundError::MissingBody("mark"))?.name,
        },
        "start" => Inbound::Start(frame.start.ok_or(InboundError::MissingBody("start"))?),
        "connected" => Inbound::Connected,
        "stop" => Inbound::Stop,
        "dtmf" => Inbound::Dtmf {
            digit: frame.dtmf.ok_or(InboundError::MissingBody("dtmf"))?.digit,
        },
        other => Inbound::Other(other.to_owned()),
    })
}

/// `{"event":"media","streamSid":…,"media":{"payload":…}}` with the payload copied unchanged.
pub fn media(stream_sid: &str, payload: &str) -> String {
    let mut out = String::with_capacity(64 + stream_sid.len() + payload.len());
    out.push_str(r#"{"event":"media","streamSid":""#);
    json::push_str_content(&mut out, stream_sid);
    out.push_str(r#"","media":{"payload":""#);
    json::push_str_content(&mut out, payload);
    out.push_str(r#""}}"#);
    out
}

pub fn mark(stream_sid: &str, name: impl fmt::Display) -> String {
    let mut out = String::with_capacity(64 + stream_sid.len());
    out.push_str(r#"{"event":"mark","streamSid":""#);
    json::push_str_content(&mut out, stream_sid);
    out.push_str(r#"","mark":{"name":""#);
    json::push_display_content(&mut out, name);
    out.push_str(r#""}}"#);
    out
}

pub fn clear(stream_sid: &str) -> String {
    let mut out = String::with_capacity(40 + stream_sid.len());
    out.push_str(r#"{"event":"clear","streamSid":""#);
    json::push_str_content(&mut out, stream_sid);
    out.push_str(r#""}"#);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
    const CALL: &str = "CA0123456789abcdef0123456789abcdef";
    const STREAM: &str = "MZ0123456789abcdef0123456789abcdef";

    fn start_message(account_sid: &str, call_sid: &str, stream_sid: &str) -> String {
        format!(
            r#"{{"event":"start","sequenceNumber":"1","streamSid":"{stream_sid}","start":{{"accountSid":"{account_sid}","streamSid":"{stream_sid}","callSid":"{call_sid}","tracks":["inbound"],"customParameters":{{"token":"t","from":"whatsapp:+5511999990000"}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}}}}"#
        )
    }

    #[test]
    fn parses_every_documented_message() {
        assert_eq!(
            parse(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#).unwrap(),
            Inbound::Connected
        );
        let Inbound::Start(start) = parse(&start_message(ACCOUNT, CALL, STREAM)).unwrap() else {
            panic!("not a start")
        };
        assert_eq!(start.stream_sid.as_str(), STREAM);
        assert_eq!(start.account_sid.as_str(), ACCOUNT);
        assert_eq!(start.call_sid.as_str(), CALL);
        assert_eq!(start.custom_parameters["token"], "t");

        let media = r#"{"event":"media","sequenceNumber":"3","streamSid":"MZ1","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"//7+/g=="}}"#;
        let Inbound::Media { payload } = parse(media).unwrap() else {
            panic!("not media")
        };
        assert_eq!(payload, "//7+/g==");
        assert!(
            matches!(payload, Cow::Borrowed(_)),
            "the payload is not copied"
        );

        assert_eq!(
            parse(
                r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"m7"}}"#
            )
            .unwrap(),
            Inbound::Mark { name: "m7".into() }
        );
        assert_eq!(
            parse(r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}"#).unwrap(),
            Inbound::Dtmf { digit: "1".into() }
        );
        assert_eq!(
            parse(r#"{"event":"stop","sequenceNumber":"5","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}"#).unwrap(),
            Inbound::Stop
        );
        assert_eq!(
            parse(r#"{"event":"future-thing","streamSid":"MZ1"}"#).unwrap(),
            Inbound::Other("future-thing".into())
        );
    }

    #[test]
    fn a_start_whose_ids_are_not_twilios_is_malformed() {
        for (account_sid, call_sid, stream_sid) in [
            ("AC1", CALL, STREAM),
            (ACCOUNT, "CA1", STREAM),
            (ACCOUNT, CALL, "MZ1"),
            (ACCOUNT, STREAM, CALL),
            (ACCOUNT, &format!("{CALL}0"), STREAM),
        ] {
            let message = start_message(account_sid, call_sid, stream_sid);
            assert!(parse(&message).is_err(), "{message} accepted");
        }
    }

    #[test]
    fn escaped_payloads_are_unescaped() {
        let Inbound::Media { payload } =
            parse(r#"{"event":"media","media":{"payload":"ab\/cd"}}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(payload, "ab/cd");
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bad in [
            "",
            "{",
            "null",
            "[]",
            r#"{"event":5}"#,
            r#"{"event":"media"}"#,
            r#"{"event":"media","media":{"payload":7}}"#,
            r#"{"event":"mark","mark":{}}"#,
            r#"{"event":"start","start":{"callSid":"CA1"}}"#,
            r#"{"no":"event"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn outbound_messages_have_the_documented_shape() {
        assert_eq!(
            media("MZ1", "//7+"),
            r#"{"event":"media","streamSid":"MZ1","media":{"payload":"//7+"}}"#
        );
        assert_eq!(
            mark("MZ1", "m1"),
            r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"m1"}}"#
        );
        assert_eq!(clear("MZ1"), r#"{"event":"clear","streamSid":"MZ1"}"#);
        // Whatever a peer sent, the output is valid JSON carrying it unchanged.
        let odd: serde_json::Value = serde_json::from_str(&media("MZ\"1", "a\\b")).unwrap();
        assert_eq!(
            (odd["streamSid"].as_str(), odd["media"]["payload"].as_str()),
            (Some("MZ\"1"), Some("a\\b"))
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in ".{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn parse_never_panics_on_near_valid_json(event in "(media|mark|start|stop|dtmf|x)", body in "[{}\\[\\]\",:a-z0-9 ]{0,40}") {
            let _ = parse(&format!(r#"{{"event":"{event}","{event}":{body}}}"#));
        }
    }
}
