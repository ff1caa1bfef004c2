//! `callbridge simulate`, the real binary, against the app on port 0 and the fake OpenAI: what
//! it sends is what Twilio sends, and it plays the agent back at Twilio's pace.

use std::f64::consts::TAU;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::stream::{app_with, delta};
use callbridge_testkit::realtime::{API_KEY, FakeRealtime};

const API_TOKEN: &str = "simulate-test-token-0123456789abcdefghij";
/// µ-law of a loud constant: the agent's voice, easy to find in what was heard.
const AGENT_SOUND: u8 = 0x10;
/// µ-law silence.
const SILENCE: u8 = 0xFF;

fn port(app: &Client) -> &str {
    app.address
        .rsplit(':')
        .next()
        .expect("the address has a port")
}

/// A file or directory under the temp dir, removed when dropped, so a failing test leaves
/// nothing behind either.
struct Temp(PathBuf);

impl Temp {
    fn new(extension: &str) -> Self {
        Self(temp_path(extension))
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// 2 s of a 440 Hz tone at 16 kHz: a known length that has to be resampled on the way.
fn caller_wav() -> Temp {
    let wav = Temp::new("wav");
    let path = &wav.0;
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec).unwrap();
    for n in 0..32_000u32 {
        // Within ±12000, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let sample = ((f64::from(n) * 440.0 * TAU / 16_000.0).sin() * 12_000.0) as i16;
        writer.write_sample(sample).unwrap();
    }
    writer.finalize().unwrap();
    wav
}

/// The simulator with the test app's configuration (and `env`), in an empty directory so no
/// `.env` is read.
struct Simulator {
    child: Child,
    _dir: Temp,
    spawned: Instant,
}

impl Simulator {
    fn start(port: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = Temp::new("dir");
        std::fs::create_dir_all(&dir.0).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_callbridge"))
            .arg("simulate")
            .args(args)
            .current_dir(&dir.0)
            .env_clear()
            .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
            .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
            .env("OPENAI_API_KEY", API_KEY)
            .env("PUBLIC_BASE_URL", PUBLIC_BASE_URL)
            .env("PORT", port)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            child,
            _dir: dir,
            spawned: Instant::now(),
        }
    }

    /// Its output once it exited, and how long it ran; fails the test after `within`.
    async fn finished(self, within: Duration) -> (Output, Duration) {
        let Self {
            child,
            _dir,
            spawned,
        } = self;
        let pid = child.id().to_string();
        let waiting = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
        let output = tokio::time::timeout(within, waiting).await;
        let Ok(output) = output else {
            let _ = Command::new("kill").args(["-9", &pid]).status();
            panic!("callbridge simulate did not exit within {within:?}");
        };
        (output.unwrap(), spawned.elapsed())
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Every stdout line, each of which must be a JSON object with `t_ms` and `type`.
fn json_lines(output: &Output) -> Vec<Value> {
    text(&output.stdout)
        .lines()
        .map(|line| {
            let event: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert!(
                event["t_ms"].is_u64() && event["type"].is_string(),
                "{line}"
            );
            event
        })
        .collect()
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|event| event["type"] == kind)
        .collect()
}

fn read_heard(path: &Path) -> Vec<i16> {
    let mut reader = hound::WavReader::open(path).unwrap();
    let spec = reader.spec();
    assert_eq!(
        (spec.channels, spec.sample_rate, spec.bits_per_sample),
        (1, 8000, 16)
    );
    reader.samples::<i16>().map(Result::unwrap).collect()
}

/// 1 s of agent audio in ten 100 ms deltas, sent at once: OpenAI generates faster than real
/// time, and playing it at 8 kHz is the caller's side's job.
fn agent_answers(session: &callbridge_testkit::realtime::FakeSession) {
    session
        .send(json!({"type":"response.created","response":{"id":"resp_1","status":"in_progress"}}));
    for _ in 0..10 {
        session.send(delta(
            "resp_1",
            "item_1",
            &STANDARD.encode([AGENT_SOUND; 800]),
        ));
    }
}

/// Plays OpenAI for one call: after 0.5 s of the caller it says one second and a transcript
/// line each way. Returns the caller's frames and every other event, once the bridge closed.
async fn answer_half_a_second_in(fake: &FakeRealtime) -> (Vec<Vec<u8>>, Vec<Value>) {
    let mut session = fake.next_session().await;
    session.expect_session_update().await;
    let (mut appends, mut others) = (Vec::new(), Vec::new());
    while let Some(event) = session.next_text().await {
        let event: Value = serde_json::from_str(&event).unwrap();
        if event["type"] != "input_audio_buffer.append" {
            others.push(event);
            continue;
        }
        appends.push(STANDARD.decode(event["audio"].as_str().unwrap()).unwrap());
        if appends.len() == 25 {
            agent_answers(&session);
            session.send(json!({"type":"conversation.item.input_audio_transcription.completed","item_id":"item_u","content_index":0,"transcript":"What are your opening hours?"}));
            session.send(json!({"type":"response.output_audio_transcript.done","response_id":"resp_1","item_id":"item_1","output_index":0,"content_index":0,"transcript":"We open at nine."}));
            session.send(
                json!({"type":"response.done","response":{"id":"resp_1","status":"completed"}}),
            );
        }
    }
    (appends, others)
}

/// Each 100 ms delta's mark came back when its audio had played (from `first_ms` on), not
/// when it arrived.
fn assert_marks_paced(events: &[Value], first_ms: u64) {
    let marks: Vec<u64> = of_type(events, "mark")
        .iter()
        .map(|mark| {
            assert_eq!(mark["cleared"], false);
            mark["t_ms"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(marks.len(), 10, "{events:?}");
    for (n, at) in marks.iter().enumerate() {
        let expected = first_ms + 100 * (u64::try_from(n).unwrap() + 1);
        assert!(
            at.abs_diff(expected) <= 2,
            "mark {n} at {at} ms, not {expected}"
        );
    }
}

#[tokio::test]
async fn a_simulated_call_sends_the_wav_in_real_time_and_hears_the_agent_at_twilios_pace() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let (wav, heard) = (caller_wav(), Temp::new("wav"));
    let simulator = Simulator::start(
        port(&app),
        &[
            "--audio",
            wav.arg(),
            "--out",
            heard.arg(),
            "--seconds",
            "3",
            "--dtmf",
            "12#@1",
            "--json",
        ],
        &[("CALLBRIDGE_API_TOKEN", API_TOKEN)],
    );
    let (appends, others) = answer_half_a_second_in(&fake).await;
    let (output, _) = simulator.finished(Duration::from_secs(20)).await;
    assert!(output.status.success(), "{}", text(&output.stderr));

    // Twilio's frames: 160 bytes each, 3 s of them, the first 2 s the WAV's.
    assert!(appends.iter().all(|frame| frame.len() == 160));
    let sent: usize = appends.iter().map(Vec::len).sum();
    assert!(sent.abs_diff(24_000) <= 1200, "{sent} bytes for 3 s");
    let spoken: usize = appends
        .iter()
        .filter(|frame| frame.iter().any(|&byte| byte != SILENCE))
        .map(Vec::len)
        .sum();
    assert!(
        spoken.abs_diff(16_000) <= 800,
        "{spoken} bytes for a 2 s WAV"
    );
    assert!(
        others
            .iter()
            .any(|event| event.to_string().contains("The caller pressed: 1 2 #")),
        "{others:?}"
    );

    // What the caller heard: the agent's second, placed where it played.
    let events = json_lines(&output);
    let samples = read_heard(&heard.0);
    assert!(samples.len() >= 24_000, "the whole call: {}", samples.len());
    let loud: Vec<usize> = (0..samples.len()).filter(|&n| samples[n] != 0).collect();
    assert!(
        loud.len().abs_diff(8000) <= 400,
        "{} samples heard",
        loud.len()
    );
    let first_audio = of_type(&events, "first_agent_audio");
    let first_ms = first_audio[0]["t_ms"].as_u64().unwrap();
    assert!(
        (loud[0] / 8).abs_diff(usize::try_from(first_ms).unwrap()) <= 2,
        "heard from sample {} but reported at {first_ms} ms",
        loud[0]
    );
    assert!(first_audio[0]["after_ms"].as_u64().unwrap() >= 400);

    assert_marks_paced(&events, first_ms);
    let speech = of_type(&events, "agent_speech");
    assert_eq!(speech.len(), 1, "{events:?}");
    assert_eq!(speech[0]["marks"], 10);
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for expected in [
        "answered",
        "stream_started",
        "dtmf",
        "caller_audio_end",
        "ended",
    ] {
        assert!(types.contains(&expected), "{expected}: {types:?}");
    }
    let ended = of_type(&events, "ended");
    assert_eq!(ended[0]["by"], "caller");
    let heard_ms = ended[0]["heard_ms"].as_u64().unwrap();
    assert!(heard_ms.abs_diff(1000) <= 50, "{heard_ms} ms heard");
    assert_eq!(of_type(&events, "status_callback")[0]["status"], 204);
    let stored = of_type(&events, "stored_call");
    let transcript = stored[0]["transcript"].to_string();
    assert!(
        transcript.contains("What are your opening hours?")
            && transcript.contains("We open at nine."),
        "{stored:?}"
    );
    assert_eq!(stored[0]["end_reason"], "caller_hung_up");
    let call_sid = events[0]["call_sid"].as_str().unwrap();
    let record = app.state.store.call(call_sid).await.unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&record.call).unwrap()["status"],
        "completed"
    );
}

#[tokio::test]
async fn a_clear_mid_playback_cuts_what_was_heard_and_the_marks_came_back_at_real_time_pace() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let (wav, heard) = (caller_wav(), Temp::new("wav"));
    let simulator = Simulator::start(
        port(&app),
        &[
            "--audio",
            wav.arg(),
            "--out",
            heard.arg(),
            "--seconds",
            "3",
            "--json",
        ],
        &[],
    );
    let mut session = fake.next_session().await;
    session.expect_session_update().await;
    let (mut appends, mut truncates) = (0, Vec::new());
    let mut barge_in_at = None;
    loop {
        let wake =
            barge_in_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(60));
        tokio::select! {
            event = session.next_text() => {
                let Some(event) = event else { break };
                let event: Value = serde_json::from_str(&event).unwrap();
                if event["type"] == "conversation.item.truncate" {
                    truncates.push(event);
                } else if event["type"] == "input_audio_buffer.append" {
                    appends += 1;
                    if appends == 10 {
                        agent_answers(&session);
                        barge_in_at = Some(tokio::time::Instant::now() + Duration::from_millis(400));
                    }
                }
            }
            () = tokio::time::sleep_until(wake) => {
                // 0.4 s into the agent's second, the caller speaks.
                session.send(json!({"type":"input_audio_buffer.speech_started","audio_start_ms":600,"item_id":"item_user"}));
                barge_in_at = None;
            }
        }
    }
    let (output, _) = simulator.finished(Duration::from_secs(20)).await;
    assert!(output.status.success(), "{}", text(&output.stderr));

    // callbridge truncates at what the marks say played (about 400 ms), plus 50 ms: marks
    // echoed on arrival would have said all 1000 ms. The ranges leave room for a busy machine.
    assert_eq!(truncates.len(), 1, "{truncates:?}");
    let audio_end_ms = truncates[0]["audio_end_ms"].as_u64().unwrap();
    assert!(
        (200..=650).contains(&audio_end_ms),
        "truncated at {audio_end_ms} ms"
    );

    let events = json_lines(&output);
    let clear = of_type(&events, "clear");
    assert_eq!(clear.len(), 1, "{events:?}");
    let dropped_ms = clear[0]["dropped_ms"].as_u64().unwrap();
    assert!((350..=850).contains(&dropped_ms), "{dropped_ms} ms dropped");
    let cleared_marks = of_type(&events, "mark")
        .iter()
        .filter(|mark| mark["cleared"] == true)
        .count();
    assert_eq!(clear[0]["marks"], cleared_marks);
    assert!((4..=8).contains(&cleared_marks), "{cleared_marks}");

    let heard = read_heard(&heard.0).iter().filter(|&&s| s != 0).count();
    assert!(
        (1600..=5200).contains(&heard),
        "{heard} samples heard of the 8000 sent"
    );
}

/// The one line a failed simulation leaves on stderr.
fn reason(output: &Output) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!output.status.success());
    stderr
}

#[tokio::test]
async fn a_refused_openai_session_is_named_within_seconds() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[("OPENAI_API_KEY", "sk-not-the-fakes-key")]).await;
    let wav = caller_wav();
    let simulator = Simulator::start(port(&app), &["--audio", wav.arg()], &[]);
    let (output, took) = simulator.finished(Duration::from_secs(15)).await;
    let reason = reason(&output);
    assert!(
        reason.contains("callbridge could not open an OpenAI session: check OPENAI_API_KEY"),
        "{reason}"
    );
    assert!(
        reason.contains(callbridge::twilio::twiml::APOLOGY),
        "{reason}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(fake.upgrades(), 1);
}

#[tokio::test]
async fn openai_refusing_the_key_inside_the_session_is_named_with_its_code() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[("CALLBRIDGE_API_TOKEN", API_TOKEN)]).await;
    let wav = caller_wav();
    let simulator = Simulator::start(
        port(&app),
        &["--audio", wav.arg(), "--json"],
        &[("CALLBRIDGE_API_TOKEN", API_TOKEN)],
    );
    let mut session = fake.next_session().await;
    session.expect_session_update().await;
    session.send(json!({"type":"error","event_id":"ev","error":{"type":"invalid_request_error","code":"invalid_api_key","message":"Incorrect API key provided."}}));
    let (output, took) = simulator.finished(Duration::from_secs(15)).await;
    let reason = reason(&output);
    assert!(
        reason.contains("could not open an OpenAI session: check OPENAI_API_KEY (end reason agent_failed; OpenAI said invalid_api_key)"),
        "{reason}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let events = json_lines(&output);
    assert_eq!(events.last().unwrap()["type"], "error", "{events:?}");
}

#[tokio::test]
async fn an_unreachable_server_is_named_at_once() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    let wav = caller_wav();
    let simulator = Simulator::start(&port, &["--audio", wav.arg()], &[]);
    let (output, took) = simulator.finished(Duration::from_secs(15)).await;
    let reason = reason(&output);
    assert!(
        reason.contains(&format!(
            "cannot reach callbridge at http://127.0.0.1:{port}/"
        )),
        "{reason}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn a_wrong_auth_token_is_a_refused_signature() {
    let fake = FakeRealtime::start().await;
    let app = app_with(&fake, &[]).await;
    let wav = caller_wav();
    let simulator = Simulator::start(
        port(&app),
        &["--audio", wav.arg()],
        &[("TWILIO_AUTH_TOKEN", "not-the-servers-token")],
    );
    let (output, _) = simulator.finished(Duration::from_secs(15)).await;
    let reason = reason(&output);
    assert!(
        reason.contains("refused the signature of POST /voice (403)"),
        "{reason}"
    );
    assert_eq!(fake.upgrades(), 0);
}

#[tokio::test]
async fn a_server_that_never_answers_is_given_up_on_within_15_s() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let wav = caller_wav();
    let simulator = Simulator::start(&port, &["--audio", wav.arg()], &[]);
    let (output, took) = simulator.finished(Duration::from_secs(15)).await;
    silent.abort();
    let reason = reason(&output);
    assert!(
        reason.contains("did not answer POST /voice within 5s"),
        "{reason}"
    );
    assert!(took < Duration::from_secs(8), "{took:?}");
}

#[tokio::test]
async fn a_server_that_stops_mid_call_is_given_up_on_within_15_s() {
    let fake = FakeRealtime::start().await;
    let server = Binary::start(&[("OPENAI_REALTIME_URL", fake.url.as_str())]).await;
    let wav = caller_wav();
    let simulator = Simulator::start(
        port(&server),
        &["--audio", wav.arg(), "--seconds", "30"],
        &[],
    );
    let mut session = fake.next_session().await;
    session.expect_session_update().await;
    server.signal("STOP");
    let stopped = Instant::now();
    let (output, _) = simulator.finished(Duration::from_secs(15)).await;
    let took = stopped.elapsed();
    server.signal("CONT");
    let reason = reason(&output);
    assert!(reason.contains("callbridge stopped answering"), "{reason}");
    assert!(took < Duration::from_secs(8), "{took:?}");
}
