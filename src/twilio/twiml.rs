//! TwiML documents, rendered from askama templates in `templates/twiml/`. Askama escapes every
//! value for XML, so a hostile caller ID cannot break the document.

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

/// Says one sentence and hangs up: used when the server is full or draining.
#[derive(Template)]
#[template(path = "twiml/say_hangup.xml")]
pub struct SayHangup<'a> {
    pub message: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_xml::Reader;
    use quick_xml::events::Event;

    /// (element name, attributes, text content)
    type Element = (String, Vec<(String, String)>, String);

    /// Parses the document and returns its elements in order: proof it is well-formed XML.
    fn parse(xml: &str) -> Vec<Element> {
        let mut reader = Reader::from_str(xml);
        let mut out = Vec::new();
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Start(e) | Event::Empty(e) => {
                    let attrs = e
                        .attributes()
                        .map(|a| {
                            let a = a.unwrap();
                            (
                                String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                                a.unescape_value().unwrap().into_owned(),
                            )
                        })
                        .collect();
                    out.push((
                        String::from_utf8(e.name().as_ref().to_vec()).unwrap(),
                        attrs,
                        String::new(),
                    ));
                }
                Event::Text(t) => {
                    let text = t.unescape().unwrap().trim().to_owned();
                    if let (false, Some(last)) = (text.is_empty(), out.last_mut()) {
                        last.2 = text;
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        out
    }

    #[test]
    fn connect_stream_snapshot() {
        let xml = ConnectStream {
            stream_url: "wss://abc.ngrok.app/stream",
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

    #[test]
    fn hostile_values_are_escaped_and_round_trip() {
        let hostile = r#"<&"'>"/><Hangup/>"#;
        let xml = ConnectStream {
            stream_url: "wss://x.example/stream?a=1&b=2",
            parameters: &[("from", hostile), (hostile, "v")],
            apology: hostile,
        }
        .render()
        .unwrap();
        assert!(!xml.contains(hostile));
        let elements = parse(&xml);
        let names: Vec<&str> = elements.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
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
            elements[2].1,
            [(
                "url".to_owned(),
                "wss://x.example/stream?a=1&b=2".to_owned()
            )]
        );
        assert_eq!(elements[3].1[1], ("value".to_owned(), hostile.to_owned()));
        assert_eq!(elements[4].1[0], ("name".to_owned(), hostile.to_owned()));
        assert_eq!(elements[5].2, hostile);

        let busy = SayHangup { message: hostile }.render().unwrap();
        let elements = parse(&busy);
        assert_eq!(elements[1].2, hostile);
    }
}
