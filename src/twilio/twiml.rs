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
