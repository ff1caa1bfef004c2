//! The Media Streams socket below its messages: a bound on what a frame may declare, enforced as
//! each frame header goes by, and what the socket's errors mean for the call.
//!
//! Hand-written because the stack has no such bound: actix-http's WebSocket parser compares a
//! frame's length with its limit only once the whole frame has arrived, and actix-ws's
//! `MessageStream` moves every byte the connection delivers into its buffer before parsing. A
//! peer that declares a 256 MiB frame is buffered until the frame completes, and one that never
//! completes it holds its call (and the memory) for as long as it trickles. `FrameLimit` sits
//! between the connection and actix-ws, reads each frame header with tungstenite's parser (already
//! a dependency), and ends the body at the first header that declares too much, before any of
//! that frame's payload is held.

use std::io::{self, Cursor};
use std::pin::Pin;
use std::str::Utf8Error;
use std::task::{Context, Poll, ready};

use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use actix_ws::ProtocolError;
use futures_util::{Stream, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::metrics::EndReason;

/// Twilio sends a frame every 20 ms, a few hundred bytes; anything near this size is not Twilio.
pub const MAX_TWILIO_FRAME: usize = 64 * 1024;

/// RFC 6455 §5.2: two bytes, up to eight of extended length, four of mask.
const MAX_HEADER_LEN: usize = 14;

/// A WebSocket connection's incoming bytes, refused (`PayloadError::Overflow`) at the first
/// frame header that declares a payload, or a fragment taking its message, over the limit; a
/// connection that ends without a close frame ends them, after every byte it delivered.
pub struct FrameLimit<S> {
    body: S,
    max_message: u64,
    /// The start of a header whose rest is still on the wire.
    header: Vec<u8>,
    /// Payload bytes of the current frame still to pass before the next header.
    payload_left: u64,
    /// What the data message being received has declared so far, over all its fragments.
    message_len: u64,
    /// Nothing more passes: a frame was refused, or the connection ended.
    refused: bool,
}

impl<S> FrameLimit<S> {
    pub fn new(body: S, max_message: usize) -> Self {
        Self {
            body,
            max_message: u64::try_from(max_message).unwrap_or(u64::MAX),
            header: Vec::with_capacity(MAX_HEADER_LEN),
            payload_left: 0,
            message_len: 0,
            refused: false,
        }
    }

    /// Follows the framing through `chunk`, checking each header it completes.
    fn follow(&mut self, mut chunk: &[u8]) -> Result<(), PayloadError> {
        while !chunk.is_empty() {
            if self.payload_left > 0 {
                let skipped = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                chunk = &chunk[skipped..];
                self.payload_left -= skipped as u64;
                continue;
            }
            let held = self.header.len();
            let taken = (MAX_HEADER_LEN - held).min(chunk.len());
            self.header.extend_from_slice(&chunk[..taken]);
            let mut cursor = Cursor::new(self.header.as_slice());
            match FrameHeader::parse(&mut cursor) {
                Ok(Some((header, length))) => {
                    let header_len = usize::try_from(cursor.position()).unwrap_or(MAX_HEADER_LEN);
                    chunk = &chunk[header_len - held..];
                    self.header.clear();
                    self.check(&header, length)?;
                    self.payload_left = length;
                }
                // Fewer than the longest header's bytes are held, so all of `chunk` was taken.
                Ok(None) => chunk = &[],
                Err(error) => {
                    return Err(PayloadError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        error,
                    )));
                }
            }
        }
        Ok(())
    }

    fn check(&mut self, header: &FrameHeader, length: u64) -> Result<(), PayloadError> {
        let declared = match header.opcode {
            OpCode::Data(Data::Continue) => self.message_len.saturating_add(length),
            OpCode::Data(_) => length,
            // Control frames may come between fragments and are no part of the message.
            OpCode::Control(_) => return self.bound(length),
        };
        self.message_len = if header.is_final { 0 } else { declared };
        self.bound(declared)
    }

    fn bound(&self, declared: u64) -> Result<(), PayloadError> {
        if declared > self.max_message {
            Err(PayloadError::Overflow)
        } else {
            Ok(())
        }
    }
}

impl<S> Stream for FrameLimit<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.refused {
            return Poll::Ready(None);
        }
        let item = ready!(self.body.poll_next_unpin(cx));
        // The connection ended without a close frame (the peer's socket closed or was reset).
        // That ends the stream, but it is no reason to lose what came before: actix-ws drops
        // the frames it has buffered when the body fails, and those may be the call's `start`
        // or `stop`, sent just before the caller's socket went away. Ending the body instead
        // lets it read them, then end.
        if let Some(Err(PayloadError::Incomplete(_))) = &item {
            self.refused = true;
            return Poll::Ready(None);
        }
        if let Some(Ok(chunk)) = &item
            && let Err(refusal) = self.follow(chunk)
        {
            self.refused = true;
            return Poll::Ready(Some(Err(refusal)));
        }
        Poll::Ready(item)
    }
}

/// How a call ends when its Media Streams socket fails with `error`: a frame over the limit
/// (whether actix-ws or `FrameLimit` noticed) is `FrameTooLarge`, a text frame that is not UTF-8
/// is `InvalidText`, anything else a `ProtocolError`. (actix-ws reports invalid UTF-8 in a
/// *fragmented* text message as a bare string, which stays a `ProtocolError`; Twilio never
/// fragments its messages.)
pub fn end_reason(error: &ProtocolError) -> EndReason {
    let ProtocolError::Io(error) = error else {
        return match error {
            ProtocolError::Overflow => EndReason::FrameTooLarge,
            _ => EndReason::ProtocolError,
        };
    };
    let Some(inner) = error.get_ref() else {
        return EndReason::ProtocolError;
    };
    if matches!(inner.downcast_ref(), Some(PayloadError::Overflow)) {
        EndReason::FrameTooLarge
    } else if inner.is::<Utf8Error>() {
        EndReason::InvalidText
    } else {
        EndReason::ProtocolError
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    const LIMIT: usize = 64 * 1024;

    fn header(opcode: OpCode, is_final: bool, length: u64) -> Vec<u8> {
        let header = FrameHeader {
            is_final,
            opcode,
            mask: Some([7, 7, 7, 7]),
            ..FrameHeader::default()
        };
        let mut bytes = Vec::new();
        header.format(length, &mut bytes).unwrap();
        bytes
    }

    fn frame(opcode: OpCode, is_final: bool, length: usize) -> Vec<u8> {
        let mut bytes = header(opcode, is_final, length as u64);
        bytes.resize(bytes.len() + length, b'a');
        bytes
    }

    const TEXT: OpCode = OpCode::Data(Data::Text);
    const CONTINUE: OpCode = OpCode::Data(Data::Continue);

    /// Feeds `bytes` in chunks of `chunk_len` and returns how many chunks passed and whether the
    /// stream was refused.
    async fn feed(bytes: &[u8], chunk_len: usize) -> (usize, bool) {
        let chunks: Vec<Result<Bytes, PayloadError>> = bytes
            .chunks(chunk_len)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut limited = FrameLimit::new(stream::iter(chunks), LIMIT);
        let mut passed = 0;
        while let Some(item) = limited.next().await {
            match item {
                Ok(_) => passed += 1,
                Err(PayloadError::Overflow) => {
                    assert!(limited.next().await.is_none(), "nothing after the refusal");
                    return (passed, true);
                }
                Err(other) => panic!("unexpected {other}"),
            }
        }
        (passed, false)
    }

    #[tokio::test]
    async fn frames_up_to_the_limit_pass_in_any_chunking() {
        let mut bytes = frame(TEXT, true, 10);
        bytes.extend(frame(TEXT, true, LIMIT));
        bytes.extend(frame(OpCode::Data(Data::Binary), true, 200));
        bytes.extend(frame(TEXT, false, LIMIT / 2));
        bytes.extend(frame(
            OpCode::Control(tokio_tungstenite::tungstenite::protocol::frame::coding::Control::Ping),
            true,
            4,
        ));
        bytes.extend(frame(CONTINUE, true, LIMIT / 2));
        for chunk_len in [1, 3, 13, 14, 1000, bytes.len()] {
            assert_eq!(
                feed(&bytes, chunk_len).await,
                (bytes.len().div_ceil(chunk_len), false),
                "chunks of {chunk_len}"
            );
        }
    }

    #[tokio::test]
    async fn a_header_declaring_too_much_is_refused_before_its_payload() {
        let mut bytes = frame(TEXT, true, 100);
        let first_frame = bytes.len();
        bytes.extend(header(TEXT, true, 256 << 20));
        bytes.extend([b'a'; 4096]);
        // The chunk that completes the oversized header is the last one through.
        assert_eq!(feed(&bytes, first_frame).await, (1, true));
        let (passed, refused) = feed(&bytes, 1).await;
        assert!(refused);
        assert_eq!(
            passed,
            first_frame + 13,
            "refused at the header's last byte"
        );
    }

    #[tokio::test]
    async fn fragments_count_towards_their_message() {
        let mut bytes = frame(TEXT, false, LIMIT / 2);
        bytes.extend(frame(CONTINUE, false, LIMIT / 2));
        bytes.extend(header(CONTINUE, true, 1));
        assert!(feed(&bytes, 64).await.1);
    }

    /// A client's text frame, masked as `header` says (every mask byte 7).
    fn text(message: &str) -> Vec<u8> {
        let mut bytes = header(TEXT, true, message.len() as u64);
        bytes.extend(message.bytes().map(|b| b ^ 7));
        bytes
    }

    #[tokio::test]
    async fn frames_that_arrive_with_the_connection_s_end_are_still_read() {
        use actix_web::{FromRequest, dev, web};
        let request = actix_web::test::TestRequest::get()
            .insert_header(("upgrade", "websocket"))
            .insert_header(("connection", "upgrade"))
            .insert_header(("sec-websocket-version", "13"))
            .insert_header(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="))
            .to_http_request();
        // `connected` and `start` in the same read as the end of a connection that sent no
        // close frame, as actix-http hands them over: the bytes, then `Incomplete`.
        let mut bytes = text("connected");
        bytes.extend(text("start"));
        let body: Vec<Result<Bytes, PayloadError>> =
            vec![Ok(Bytes::from(bytes)), Err(PayloadError::Incomplete(None))];
        let limited: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> =
            Box::pin(FrameLimit::new(stream::iter(body), LIMIT));
        let payload = web::Payload::from_request(&request, &mut dev::Payload::from(limited))
            .await
            .unwrap();
        let (_response, _session, messages) = actix_ws::handle(&request, payload).unwrap();
        let read: Vec<String> = messages
            .aggregate_continuations()
            .map(|message| match message {
                Ok(actix_ws::AggregatedMessage::Text(text)) => text.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
            .await;
        assert_eq!(read, ["connected", "start"]);
    }

    #[test]
    fn socket_errors_map_to_end_reasons() {
        let overflow = ProtocolError::Io(io::Error::other(PayloadError::Overflow));
        assert_eq!(end_reason(&overflow), EndReason::FrameTooLarge);
        assert_eq!(
            end_reason(&ProtocolError::Overflow),
            EndReason::FrameTooLarge
        );
        let truncated_sequence = vec![0xC3, 0x28];
        let utf8 = String::from_utf8(truncated_sequence)
            .unwrap_err()
            .utf8_error();
        let invalid = ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, utf8));
        assert_eq!(end_reason(&invalid), EndReason::InvalidText);
        let reserved = ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, "bits"));
        assert_eq!(end_reason(&reserved), EndReason::ProtocolError);
        assert_eq!(
            end_reason(&ProtocolError::UnmaskedFrame),
            EndReason::ProtocolError
        );
    }
}
