//! TwiML documents, rendered from askama templates in `templates/twiml/`. Every value goes
//! through the `Xml` escaper (`askama.toml` maps the `.xml` extension to it), so a hostile caller
//! ID cannot break the document.

use std::collections::HashMap;
use std::fmt::{self, Write};

use askama::Template;

pub const APOLOGY: &str =
    "Sorry, we could not connect you to our assistant. Please try again later.";
pub const BUSY: &str =
    "Sorry, all our lines are busy right now. Please call again in a few minutes.";

/// Connects the call to our media stream; the trailing `<Say>` and `<Hangup/>` play only when
/// the stream ends without the call having ended (the bridge failed).
#[derive(Template)]
#[template(path = "twiml/connect_stream.xml")]
pub struct ConnectStream<'a> {
    pub stream_url: &'a str,
    pub parameters: &'a [(&'a str, &'a str)],
    pub apology: &'a str,
}

/// Moves a live call to a person (`transfer_call`): Twilio leaves the media stream and dials.
#[derive(Template)]
#[template(path = "twiml/transfer.xml")]
pub struct Transfer<'a> {
    /// `Number`, `Sip` or `Client`: the `<Dial>` noun for the target.
    pub noun: &'a str,
    pub target: &'a str,
}

impl<'a> Transfer<'a> {
    pub fn to(target: &'a crate::agents::TransferTarget) -> Self {
        use crate::agents::TransferTarget;
        match target {
            TransferTarget::Number(number) => Self {
                noun: "Number",
                target: number.as_str(),
            },
            TransferTarget::Sip(uri) => Self {
                noun: "Sip",
                target: uri,
            },
            TransferTarget::Client(identity) => Self {
                noun: "Client",
                target: identity,
            },
        }
    }
}

/// Says one sentence and hangs up: used when the server is full or draining.
#[derive(Template)]
#[template(path = "twiml/say_hangup.xml")]
pub struct SayHangup<'a> {
    pub message: &'a str,
}

/// Escapes for XML text and attribute values alike, and drops what XML 1.0 cannot carry at all.
///
/// Askama's HTML escaper (its default for `.xml`) leaves control characters alone, and one
/// U+0001 in a caller ID made the whole answer malformed, so Twilio could not connect the call.
/// Written here because no XML crate both escapes and drops invalid characters. Tab, line feed
/// and carriage return are valid but written as character references: a parser turns them into
/// spaces (and CR LF into LF) when they appear raw, and the value must come back unchanged.
#[derive(Clone, Copy, Debug, Default)]
pub struct Xml;

impl askama::filters::Escaper for Xml {
    fn write_escaped_str<W: Write>(&self, mut dest: W, string: &str) -> fmt::Result {
        let mut unwritten = 0;
        for (at, c) in string.char_indices() {
            let replacement = match c {
                '<' => "&lt;",
                '>' => "&gt;",
                '&' => "&amp;",
                '"' => "&quot;",
                '\'' => "&#39;",
                '\t' => "&#9;",
                '\n' => "&#10;",
                '\r' => "&#13;",
                c if is_xml_char(c) => continue,
                _ => "",
            };
            dest.write_str(&string[unwritten..at])?;
            dest.write_str(replacement)?;
            unwritten = at + c.len_utf8();
        }
        dest.write_str(&string[unwritten..])
    }
}

/// XML 1.0's `Char` production. Surrogates cannot occur in a Rust `char`.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{FFFD}' | '\u{10000}'..)
        && !matches!(c, '\u{FFFE}' | '\u{FFFF}')
}

/// A TwiML document as Twilio reads it: what `callbridge simulate` (and the tests) act on after
/// `POST /voice`, read with a real XML parser so an escaped value comes back as Twilio sees it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Document {
    /// Every element's name, in document order.
    pub elements: Vec<String>,
    /// The `<Stream url>`, when the document connects a stream.
    pub stream_url: Option<String>,
    /// The stream's `<Parameter>`s, which Twilio passes to the stream's `start` unchanged.
    pub parameters: HashMap<String, String>,
    /// The text of each `<Say>`, in order.
    pub say: Vec<String>,
}

/// Reads `xml` as Twilio would. Attribute values are normalised as XML 1.0 §3.3.3 says (raw
/// tab, line feed and carriage return become spaces before references are resolved), which
/// is why the escaper above writes those three as references.
pub fn read(xml: &str) -> Result<Document, quick_xml::Error> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut document = Document::default();
    let mut in_say = false;
    loop {
        match reader.read_event()? {
            Event::Start(element) | Event::Empty(element) => {
                let name = String::from_utf8_lossy(element.name().as_ref()).into_owned();
                let mut attributes = HashMap::new();
                for attribute in element.attributes() {
                    let attribute = attribute?;
                    let raw =
                        String::from_utf8_lossy(&attribute.value).replace(['\t', '\n', '\r'], " ");
                    attributes.insert(
                        String::from_utf8_lossy(attribute.key.as_ref()).into_owned(),
                        quick_xml::escape::unescape(&raw)?.into_owned(),
                    );
                }
                match name.as_str() {
                    "Stream" => document.stream_url = attributes.remove("url"),
                    "Parameter" => {
                        if let (Some(name), Some(value)) =
                            (attributes.remove("name"), attributes.remove("value"))
                        {
                            document.parameters.insert(name, value);
                        }
                    }
                    "Say" => in_say = true,
                    _ => {}
                }
                document.elements.push(name);
            }
            Event::Text(text) if in_say => {
                document.say.push(text.unescape()?.into_owned());
                in_say = false;
            }
            Event::End(_) => in_say = false,
            Event::Eof => return Ok(document),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use quick_xml::events::Event;

    #[test]
    fn a_transfer_dials_the_target_with_its_noun() {
        use crate::agents::TransferTarget;
        use crate::domain::phone::E164;
        let number = TransferTarget::Number(E164::parse("+15557654321").unwrap());
        assert_eq!(
            Transfer::to(&number).render().unwrap(),
            "<Response><Dial><Number>+15557654321</Number></Dial></Response>"
        );
        let sip = TransferTarget::Sip("sip:desk@example.com?x=1&y=2".into());
        assert_eq!(
            Transfer::to(&sip).render().unwrap(),
            "<Response><Dial><Sip>sip:desk@example.com?x=1&amp;y=2</Sip></Dial></Response>"
        );
        let client = TransferTarget::Client("agent<1>".into());
        assert_eq!(
            Transfer::to(&client).render().unwrap(),
            "<Response><Dial><Client>agent&lt;1&gt;</Client></Dial></Response>"
        );
    }

    /// The values of every `<Parameter>` and the text of every `<Say>`, read the way a
    /// conforming XML parser reads them: raw whitespace in an attribute value becomes a space
    /// (XML 1.0 §3.3.3) before references are resolved.
    fn read_back(xml: &str) -> (Vec<(String, String)>, Vec<String>) {
        let mut reader = quick_xml::Reader::from_str(xml);
        let (mut parameters, mut said) = (Vec::new(), Vec::new());
        let mut in_say = false;
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Empty(e) if e.name().as_ref() == b"Parameter" => {
                    let attribute = |key: &[u8]| {
                        let raw = e.try_get_attribute(key).unwrap().unwrap().value;
                        let normalised = String::from_utf8(raw.to_vec())
                            .unwrap()
                            .replace(['\t', '\n', '\r'], " ");
                        quick_xml::escape::unescape(&normalised)
                            .unwrap()
                            .into_owned()
                    };
                    parameters.push((attribute(b"name"), attribute(b"value")));
                }
                Event::Start(e) => in_say = e.name().as_ref() == b"Say",
                Event::Text(text) if in_say => said.push(text.unescape().unwrap().into_owned()),
                Event::End(_) => in_say = false,
                Event::Eof => return (parameters, said),
                _ => {}
            }
        }
    }

    /// XML 1.0 `Char`, spelled out from the specification rather than shared with the code.
    fn allowed_in_xml(c: char) -> bool {
        matches!(u32::from(c), 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..)
    }

    proptest! {
        #[test]
        fn any_value_renders_to_valid_twiml_that_reads_back(
            from in any::<String>(),
            to in "\\PC*|[\\x00-\\x20\\u{FFFE}\\u{FFFF}<>&\"']*",
            direction in any::<String>(),
        ) {
            let xml = ConnectStream {
                stream_url: "wss://abc.ngrok.app/stream",
                parameters: &[("from", &from), ("to", &to), ("direction", &direction)],
                apology: &to,
            }
            .render()
            .unwrap();
            prop_assert!(xml.chars().all(allowed_in_xml), "{xml:?}");
            let kept = |value: &str| value.chars().filter(|c| allowed_in_xml(*c)).collect::<String>();
            let (parameters, said) = read_back(&xml);
            prop_assert_eq!(
                parameters,
                vec![
                    ("from".to_owned(), kept(&from)),
                    ("to".to_owned(), kept(&to)),
                    ("direction".to_owned(), kept(&direction)),
                ]
            );
            // Text content keeps LF as is; a parser only folds CR LF and lone CR into LF.
            prop_assert_eq!(said, if kept(&to).is_empty() { vec![] } else { vec![kept(&to)] });
        }
    }

    #[test]
    fn a_rendered_answer_reads_back_as_twilio_reads_it() {
        let xml = ConnectStream {
            stream_url: "wss://abc.ngrok.app/stream/t0k",
            parameters: &[("token", "t0k"), ("from", "whatsapp:+1555\t<x> & \"y\"")],
            apology: APOLOGY,
        }
        .render()
        .unwrap();
        let document = read(&xml).unwrap();
        assert_eq!(
            document.elements,
            [
                "Response",
                "Connect",
                "Stream",
                "Parameter",
                "Parameter",
                "Say",
                "Hangup"
            ]
        );
        assert_eq!(
            document.stream_url.as_deref(),
            Some("wss://abc.ngrok.app/stream/t0k")
        );
        assert_eq!(document.parameters["token"], "t0k");
        assert_eq!(document.parameters["from"], "whatsapp:+1555\t<x> & \"y\"");
        assert_eq!(document.say, [APOLOGY]);

        let busy = read(&SayHangup { message: BUSY }.render().unwrap()).unwrap();
        assert_eq!((busy.stream_url, busy.say), (None, vec![BUSY.to_owned()]));
        assert!(read("<Response></Say>").is_err());
    }

    #[test]
    fn connect_stream_snapshot() {
        let xml = ConnectStream {
            stream_url: "wss://abc.ngrok.app/stream/q5mAbcDEFghiJKLmnoPQRs",
            parameters: &[
                ("token", "q5mAbcDEFghiJKLmnoPQRs"),
                ("from", "whatsapp:+5511999990000"),
                ("to", "whatsapp:+558551234567"),
                ("direction", "inbound"),
            ],
            apology: APOLOGY,
        }
        .render()
        .unwrap();
        insta::assert_snapshot!(xml);
    }

    #[test]
    fn busy_snapshot() {
        insta::assert_snapshot!(SayHangup { message: BUSY }.render().unwrap());
    }
}
