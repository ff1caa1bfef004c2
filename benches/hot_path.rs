//! Micro-benchmarks of the work callbridge does per message, without sockets: what the bridge
//! itself adds on top of WebSocket framing and the kernel. `bench/run.sh` measures the whole
//! process under load; these numbers say how much of that is our own code.
//!
//! Run with `cargo bench --bench hot_path`.

use std::borrow::Cow;

use askama::Template;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use callbridge::call::playback::{Playback, base64_decoded_len};
use callbridge::openai::events::{self, AudioRef, ServerEvent};
use callbridge::twilio::media::{self, Inbound};
use callbridge::twilio::signature::{self, SignedBody};
use callbridge::twilio::twiml::{self, ConnectStream};
use divan::{Bencher, black_box};

fn main() {
    divan::main();
}

const STREAM_SID: &str = "MZ18ad3ab5a668481ce02b83e7395059f0";

/// 20 ms of µ-law, base64: what every Twilio `media` and every echoed delta carries here.
fn frame_payload() -> String {
    STANDARD.encode((0..160u8).collect::<Vec<_>>())
}

/// A `media` message exactly as Twilio sends it, with every field Twilio includes.
fn twilio_media(payload: &str) -> String {
    format!(
        r#"{{"event":"media","sequenceNumber":"42","streamSid":"{STREAM_SID}","media":{{"track":"inbound","chunk":"41","timestamp":"820","payload":"{payload}"}}}}"#
    )
}

/// A GA `response.output_audio.delta` as OpenAI sends it.
fn realtime_delta(payload: &str) -> String {
    format!(
        r#"{{"type":"response.output_audio.delta","event_id":"event_CXeq6Ue1MslmEuVPYxU2T","response_id":"resp_CXeq5rGqjQXXHSBc3cBfb","item_id":"item_CXeq5OZRzkzqpSGxoIgpA","output_index":0,"content_index":0,"delta":"{payload}"}}"#
    )
}

/// Owns the inbound texts so each benchmark parses from a fixed buffer, like a socket read.
struct Frames {
    media: String,
    delta: String,
}

impl Frames {
    fn new() -> Self {
        let payload = frame_payload();
        Self {
            media: twilio_media(&payload),
            delta: realtime_delta(&payload),
        }
    }
}

/// Caller → agent: a Twilio `media` frame becomes an `input_audio_buffer.append`.
fn caller_media(text: &str) -> String {
    match media::parse(text) {
        Ok(Inbound::Media { payload }) => events::append_audio(&payload),
        other => panic!("not a media frame: {other:?}"),
    }
}

/// Agent → caller: a delta is booked in the playback ledger and becomes `media` + `mark`.
fn agent_delta(text: &str, playback: &mut Playback) -> (String, String) {
    let Ok(ServerEvent::AudioDelta(audio, delta)) = events::parse_server_event(text) else {
        panic!("not an audio delta");
    };
    let mark = playback
        .on_delta(&audio, base64_decoded_len(&delta))
        .expect("the response was not interrupted");
    (
        media::media(STREAM_SID, &delta),
        media::mark(STREAM_SID, mark),
    )
}

/// Twilio echoes a mark once the audio before it has played.
fn caller_mark_echo(text: &str, playback: &mut Playback) {
    match media::parse(text) {
        Ok(Inbound::Mark { name }) => {
            black_box(playback.on_mark(&name));
        }
        other => panic!("not a mark: {other:?}"),
    }
}

/// A ledger in the state of a call mid-answer: the agent item exists and one mark is pending.
fn speaking_ledger() -> (Playback, String) {
    let mut playback = Playback::default();
    playback.response_created("resp_CXeq5rGqjQXXHSBc3cBfb");
    let audio = AudioRef {
        response_id: Cow::Borrowed("resp_CXeq5rGqjQXXHSBc3cBfb"),
        item_id: Cow::Borrowed("item_CXeq5OZRzkzqpSGxoIgpA"),
        content_index: 0,
    };
    let mark = playback.on_delta(&audio, 160).expect("not interrupted");
    (playback, media::mark(STREAM_SID, mark))
}

#[divan::bench]
fn twilio_media_to_append(bencher: Bencher) {
    let frames = Frames::new();
    bencher.bench(|| caller_media(black_box(&frames.media)));
}

#[divan::bench]
fn realtime_delta_to_media_and_mark(bencher: Bencher) {
    let frames = Frames::new();
    bencher
        .with_inputs(|| speaking_ledger().0)
        .bench_local_refs(|playback| agent_delta(black_box(&frames.delta), playback));
}

#[divan::bench]
fn twilio_mark_echo(bencher: Bencher) {
    bencher
        .with_inputs(speaking_ledger)
        .bench_local_refs(|(playback, echo)| caller_mark_echo(black_box(echo), playback));
}

/// All three steps of one frame on one long-lived ledger; the mark the bridge sent is fed back
/// as Twilio's echo (Twilio adds a `sequenceNumber`, which the parser skips either way).
#[divan::bench]
fn frame_round_trip(bencher: Bencher) {
    let frames = Frames::new();
    let (mut playback, _) = speaking_ledger();
    bencher.bench_local(|| {
        let append = caller_media(black_box(&frames.media));
        let (media, mark) = agent_delta(black_box(&frames.delta), &mut playback);
        caller_mark_echo(&mark, &mut playback);
        (append, media)
    });
}

/// The form Twilio posts to `/voice` for a WhatsApp call, with its usual twenty-odd fields.
fn voice_form() -> Vec<(String, String)> {
    [
        ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
        ("ApiVersion", "2010-04-01"),
        ("ApplicationSid", "AP0123456789abcdef0123456789abcdef"),
        ("CallSid", "CA0123456789abcdef0123456789abcdef"),
        ("CallStatus", "ringing"),
        (
            "CallToken",
            "%7B%22parentCallInfoToken%22%3A%22eyJhbGciOiJFUzI1NiJ9%22%7D",
        ),
        ("Called", "whatsapp:+558551234567"),
        ("CalledCity", ""),
        ("CalledCountry", "BR"),
        ("CalledState", ""),
        ("CalledZip", ""),
        ("Caller", "whatsapp:+5511999990000"),
        ("CallerCity", ""),
        ("CallerCountry", "BR"),
        ("CallerName", "Maria"),
        ("CallerState", ""),
        ("CallerZip", ""),
        ("Direction", "inbound"),
        ("From", "whatsapp:+5511999990000"),
        ("FromCountry", "BR"),
        ("To", "whatsapp:+558551234567"),
        ("ToCountry", "BR"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect()
}

#[divan::bench]
fn signature_validate_voice_form(bencher: Bencher) {
    let token = b"0123456789abcdef0123456789abcdef";
    let url = "https://abc123.ngrok.app/voice";
    let form = voice_form();
    let header = signature::compute(token, url, SignedBody::Form(&form));
    bencher.bench(|| {
        signature::validate(
            token,
            black_box(url),
            SignedBody::Form(black_box(&form)),
            Some(&header),
        )
    });
}

#[divan::bench]
fn twiml_connect_stream(bencher: Bencher) {
    bencher.bench(|| {
        ConnectStream {
            stream_url: black_box("wss://abc123.ngrok.app/stream/q5mAbcDEFghiJKLmnoPQRs"),
            parameters: &[
                ("token", "q5mAbcDEFghiJKLmnoPQRs"),
                ("from", "whatsapp:+5511999990000"),
                ("to", "whatsapp:+558551234567"),
                ("direction", "inbound"),
            ],
            apology: twiml::APOLOGY,
        }
        .render()
        .expect("the template renders")
    });
}
