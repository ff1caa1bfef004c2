//! Twilio's side of a Media Stream: the messages Twilio sends on the stream socket, written as
//! Twilio writes them (every number a string, `sequenceNumber` counting up from 1). The server
//! reads them with [`super::media::parse`]; `callbridge simulate`, the end-to-end tests and the
//! load generator speak them.
//!
//! The messages are written with `format!` rather than built as `serde_json::Value`s: the load
//! generator sends tens of thousands a second from the cores it measures the server on. Ids,
//! numbers and base64 need no JSON escaping; a mark name is the server's and could hold
//! anything, so it is escaped.

use serde_json::Value;

use crate::json;

/// The first message of every stream, before `start`.
pub const CONNECTED: &str = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;

/// One Media Stream's ids and the running `sequenceNumber` Twilio puts on each message.
pub struct MediaStream {
    pub call_sid: String,
    pub account_sid: String,
    /// `MZ` and the CallSid's digits, so a test can tell which call a stream belongs to.
    pub stream_sid: String,
    sequence: u64,
}

impl MediaStream {
    pub fn new(call_sid: &str, account_sid: &str) -> Self {
        Self {
            stream_sid: format!("MZ{}", call_sid.get(2..).unwrap_or_default()),
            call_sid: call_sid.to_owned(),
            account_sid: account_sid.to_owned(),
            sequence: 0,
        }
    }

    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }

    /// `start`, carrying `parameters` (a JSON object) as its `customParameters`: Twilio passes
    /// the TwiML's `<Parameter>`s through unchanged.
    pub fn start(&mut self, parameters: &Value) -> String {
        format!(
            r#"{{"event":"start","sequenceNumber":"{}","streamSid":"{sid}","start":{{"accountSid":"{}","streamSid":"{sid}","callSid":"{}","tracks":["inbound"],"customParameters":{parameters},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}}}}"#,
            self.next_sequence(),
            self.account_sid,
            self.call_sid,
            sid = self.stream_sid,
        )
    }

    /// Frame `n` (from 0) of the caller's audio, `payload` being base64 µ-law. Twilio's frames
    /// are 20 ms each, so the frame's `timestamp` is `20 n` ms.
    pub fn media(&mut self, n: usize, payload: &str) -> String {
        format!(
            r#"{{"event":"media","sequenceNumber":"{}","streamSid":"{}","media":{{"track":"inbound","chunk":"{}","timestamp":"{}","payload":"{payload}"}}}}"#,
            self.next_sequence(),
            self.stream_sid,
            n + 1,
            n * 20,
        )
    }

    /// Twilio echoes each mark once the audio sent before it has played.
    pub fn mark(&mut self, name: &str) -> String {
        let mut out = format!(
            r#"{{"event":"mark","sequenceNumber":"{}","streamSid":"{}","mark":{{"name":""#,
            self.next_sequence(),
            self.stream_sid,
        );
        json::push_str_content(&mut out, name);
        out.push_str(r#""}}"#);
        out
    }

    /// A key the caller pressed: one message per key.
    pub fn dtmf(&mut self, key: char) -> String {
        let sequence = self.next_sequence();
        let mut out = format!(
            r#"{{"event":"dtmf","streamSid":"{}","sequenceNumber":"{sequence}","dtmf":{{"track":"inbound_track","digit":""#,
            self.stream_sid,
        );
        let mut buffer = [0u8; 4];
        json::push_str_content(&mut out, key.encode_utf8(&mut buffer));
        out.push_str(r#""}}"#);
        out
    }

    pub fn stop(&mut self) -> String {
        format!(
            r#"{{"event":"stop","sequenceNumber":"{}","streamSid":"{}","stop":{{"accountSid":"{}","callSid":"{}"}}}}"#,
            self.next_sequence(),
            self.stream_sid,
            self.account_sid,
            self.call_sid,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twilio::media::{Inbound, parse};

    #[test]
    fn callbridge_reads_every_message_as_twilio_sends_it() {
        let (call_sid, account_sid) = (format!("CA{:032}", 7), format!("AC{:032}", 9));
        let mut stream = MediaStream::new(&call_sid, &account_sid);
        assert_eq!(stream.stream_sid, format!("MZ{:032}", 7));
        let start = stream.start(&serde_json::json!({"token": "t"}));
        let media = stream.media(0, "AAECAw==");
        let mark = stream.mark("m1");
        let dtmf = stream.dtmf('#');
        let stop = stream.stop();
        for text in [&start, &media, &mark, &dtmf, &stop] {
            if let Err(error) = parse(text) {
                panic!("{text}: {error:?}");
            }
        }
        assert_eq!(parse(&mark).unwrap(), Inbound::Mark { name: "m1".into() });
        assert_eq!(parse(&dtmf).unwrap(), Inbound::Dtmf { digit: "#".into() });
        assert!(matches!(parse(&stop), Ok(Inbound::Stop)), "{stop}");
        let numbers: Vec<Value> = [&start, &media, &mark, &dtmf, &stop]
            .iter()
            .map(|text| serde_json::from_str::<Value>(text).unwrap()["sequenceNumber"].clone())
            .collect();
        assert_eq!(numbers, ["1", "2", "3", "4", "5"]);
    }

    #[test]
    fn a_mark_name_that_needs_escaping_comes_back_unchanged() {
        let mut stream = MediaStream::new(&format!("CA{:032}", 1), &format!("AC{:032}", 1));
        let echo = stream.mark("m\"1\\");
        assert_eq!(
            parse(&echo).unwrap(),
            Inbound::Mark {
                name: "m\"1\\".into()
            }
        );
    }
}
