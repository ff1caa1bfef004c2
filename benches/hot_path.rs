//! Micro-benchmarks of the work callbridge does per message, without sockets: the call core fed
//! frames exactly as the driver feeds it, i.e. what callbridge itself adds on top of WebSocket
//! framing and the kernel. `bench/run.sh` measures the whole
//! process under load; these numbers say how much of that is our own code.
//!
//! Run with `cargo bench --bench hot_path`.

use std::sync::Arc;
use std::time::Instant;

use askama::Template;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use callbridge::admission::StreamGrant;
use callbridge::agents::{AgentProfile, Agents};
use callbridge::call::core::{Action, CallCore, CallSettings, CallSetup, Input};
use callbridge::call::leg::TwilioLeg;
use callbridge::metrics::Metrics;
use callbridge::twilio::ids::{AccountSid, CallSid};
use callbridge::twilio::signature::{self, SignedBody};
use callbridge::twilio::twiml::{self, ConnectStream};
use divan::{Bencher, black_box};

fn main() {
    divan::main();
}

const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
const CALL_SID: &str = "CA0123456789abcdef0123456789abcdef";
const STREAM_SID: &str = "MZ18ad3ab5a668481ce02b83e7395059f0";
const TOKEN: &str = "q5mAbcDEFghiJKLmnoPQRs";

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

/// A call core mid-answer, as the driver holds it: `start` checked, the session configured, a
/// response playing.
fn live_call() -> CallCore<TwilioLeg> {
    let now = Instant::now();
    let mut core = CallCore::new(
        TwilioLeg::default(),
        CallSetup {
            grant: StreamGrant {
                token: TOKEN.to_owned(),
                call_sid: CallSid::parse(CALL_SID).expect("a CallSid"),
            },
            account_sid: AccountSid::parse(ACCOUNT_SID).expect("an AccountSid"),
            agents: Arc::new(Agents::single(AgentProfile::new(
                "default",
                "Be brief.",
                "marin",
                "gpt-realtime-1.5",
            ))),
            settings: CallSettings::default(),
            metrics: Arc::new(Metrics::default()),
            accepted_at: now,
            accepted_at_ms: 0,
        },
    );
    let start = format!(
        r#"{{"event":"start","streamSid":"{STREAM_SID}","start":{{"accountSid":"{ACCOUNT_SID}","streamSid":"{STREAM_SID}","callSid":"{CALL_SID}","customParameters":{{"token":"{TOKEN}","direction":"inbound"}}}}}}"#
    );
    let created = r#"{"type":"response.created","response":{"id":"resp_CXeq5rGqjQXXHSBc3cBfb"}}"#;
    for input in [
        Input::AgentTransportReady,
        Input::MediaText(&start),
        Input::AgentOpened,
        Input::AgentText(created),
    ] {
        core.handle(input, now);
    }
    drain(&mut core);
    core
}

/// What the driver does with the actions: hand each to its socket (here: let it go).
fn drain(core: &mut CallCore<TwilioLeg>) -> usize {
    let mut count = 0;
    while let Some(action) = core.poll_action() {
        black_box(&action);
        count += usize::from(matches!(action, Action::ToAgent(_) | Action::ToMedia(_)));
    }
    count
}

/// Caller → agent: a Twilio `media` frame becomes one `input_audio_buffer.append`.
#[divan::bench]
fn twilio_media_to_append(bencher: Bencher) {
    let frames = Frames::new();
    let mut core = live_call();
    let now = Instant::now();
    bencher.bench_local(|| {
        core.handle(Input::MediaText(black_box(&frames.media)), now);
        drain(&mut core)
    });
}

/// Agent → caller: a delta is booked in the playback ledger and becomes `media` + `mark`.
#[divan::bench]
fn realtime_delta_to_media_and_mark(bencher: Bencher) {
    let frames = Frames::new();
    let mut core = live_call();
    let now = Instant::now();
    bencher.bench_local(|| {
        core.handle(Input::AgentText(black_box(&frames.delta)), now);
        drain(&mut core)
    });
}

/// All three steps of one frame on one long-lived call: caller audio in, agent audio out, and
/// Twilio's echo of the mark that followed it.
#[divan::bench]
fn frame_round_trip(bencher: Bencher) {
    let frames = Frames::new();
    let mut core = live_call();
    let now = Instant::now();
    let mut mark = 0u64;
    bencher.bench_local(|| {
        core.handle(Input::MediaText(black_box(&frames.media)), now);
        core.handle(Input::AgentText(black_box(&frames.delta)), now);
        mark += 1;
        let echo =
            format!(r#"{{"event":"mark","streamSid":"{STREAM_SID}","mark":{{"name":"m{mark}"}}}}"#);
        core.handle(Input::MediaText(&echo), now);
        drain(&mut core)
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
