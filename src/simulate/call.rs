//! One simulated call on the wire, as Twilio places it: the signed `POST /voice`, the signed
//! upgrade to the TwiML's stream URL, the stream itself, Twilio's `completed` status callback,
//! and the stored call read back through the API.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::{SinkExt, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::SimulateError;
use super::args::Keypress;
use super::audio::SILENCE;
use super::playback::{Playback, Played, SAMPLES_PER_MS};
use super::report::{EndedBy, Event, Line, Timeline};
use crate::config::PublicBaseUrl;
use crate::twilio::media::{self, Inbound};
use crate::twilio::media_stream::{CONNECTED, MediaStream};
use crate::twilio::signature::{self, SignedBody};
use crate::twilio::twiml;

/// How long callbridge may take to answer anything: well inside the 15 s Twilio gives a
/// webhook, and short enough that a hung server is reported promptly.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// A ping on the stream this often: callbridge answers pings, so a server that stops
/// answering them has stopped altogether.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Twilio's frames: 20 ms of 8 kHz µ-law.
const FRAME: Duration = Duration::from_millis(20);
const FRAME_BYTES: usize = 160;
/// How long to wait for callbridge to close the stream after `stop`.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);
/// How long the stored call may take to show its end.
const STORED_WITHIN: Duration = Duration::from_secs(5);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Everything one call needs, from the command line and the configuration.
pub struct Plan {
    /// Where callbridge listens, e.g. `http://127.0.0.1:8080/`.
    pub server: url::Url,
    pub public_base_url: PublicBaseUrl,
    pub account_sid: String,
    pub auth_token: SecretString,
    pub api_token: Option<SecretString>,
    /// The caller and the number called, as Twilio writes them in webhooks.
    pub from: String,
    pub to: String,
    /// 8 kHz µ-law.
    pub caller_audio: Vec<u8>,
    /// From the stream's start to `stop`.
    pub length: Duration,
    pub keypresses: Vec<Keypress>,
}

/// How the stream ended, before it is judged.
enum End {
    /// We sent `stop` at this moment: the call ran its length.
    Stopped(Instant),
    /// callbridge closed the stream, with this close frame.
    Closed(Option<CloseFrame>),
    /// The connection ended without a close frame.
    Dropped(String),
}

/// What a call leaves behind: the recording of what the caller heard, and its error if it
/// did not run to its end.
pub struct Outcome {
    pub heard: Vec<i16>,
    pub result: Result<(), SimulateError>,
}

/// Places the call. `Err` before the stream opened (nothing was heard); afterwards the
/// recording is kept whatever happened.
pub async fn run(plan: &Plan, timeline: &mut Timeline) -> Result<Outcome, SimulateError> {
    let started = timeline.begin();
    let http = reqwest::Client::builder()
        .timeout(ANSWER_WITHIN)
        .build()
        .map_err(|error| SimulateError::Http(error.to_string()))?;
    let call_sid = new_call_sid();
    let answer = answer(&http, plan, &call_sid).await?;
    let stream_url = answer
        .stream_url
        .clone()
        .ok_or_else(|| SimulateError::TurnedAway {
            said: answer.say.join(" "),
        })?;
    timeline.emit(&Event::Answered {
        t_ms: elapsed_ms(started),
        call_sid: call_sid.clone(),
        from: plan.from.clone(),
        to: plan.to.clone(),
        agent: answer.parameters.get("agent").cloned(),
    });
    let socket = open_stream(plan, &stream_url).await?;
    let mut call = Call {
        socket,
        stream: MediaStream::new(&call_sid, &plan.account_sid),
        playback: Playback::default(),
        timeline,
        started,
        stream_started: Instant::now(),
        first_audio_heard: false,
    };
    let end = call.converse(plan, &answer.parameters).await;
    // Twilio plays nothing after `stop`.
    let ended_at = match &end {
        Ok(End::Stopped(at)) => *at,
        _ => Instant::now(),
    };
    let heard_until = position(started, ended_at);
    let last_played = call.playback.hang_up(heard_until);
    call.report(last_played.into_iter().collect());
    if let Ok(End::Stopped(_)) = end {
        call.hang_up().await;
    }
    let Call {
        playback, timeline, ..
    } = call;
    let heard_ms = playback.played() / SAMPLES_PER_MS;
    let heard = playback.into_heard(heard_until);
    let result = match end {
        Ok(End::Stopped(_)) => Ok(EndedBy::Caller),
        Ok(End::Closed(Some(frame))) if u16::from(frame.code) == 1000 => Ok(EndedBy::Callbridge),
        Ok(End::Closed(frame)) => {
            let code = frame.map(|frame| u16::from(frame.code));
            let stored = stored_end(&http, plan, &call_sid).await;
            Err(closed_early(code, heard_ms > 0, stored, &answer.say))
        }
        Ok(End::Dropped(why)) => Err(SimulateError::Dropped(why)),
        Err(error) => Err(error),
    };
    let result = match result {
        Ok(by) => {
            timeline.emit(&Event::Ended {
                t_ms: heard_until / SAMPLES_PER_MS,
                by,
                heard_ms,
            });
            completed(&http, plan, &call_sid, started, timeline).await;
            Ok(())
        }
        Err(error) => Err(error),
    };
    Ok(Outcome { heard, result })
}

/// `CA` and 32 random hex digits, as Twilio's CallSids look.
fn new_call_sid() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("CA{hex}")
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Samples at 8 kHz from `since` to `now`.
fn position(since: Instant, now: Instant) -> u64 {
    u64::try_from(now.duration_since(since).as_micros() * 8 / 1000).unwrap_or(u64::MAX)
}

fn samples_to_duration(samples: u64) -> Duration {
    Duration::from_micros(samples * 1000 / 8)
}

/// A request to callbridge failed before it answered.
fn unanswered(what: &'static str, server: &url::Url, error: &reqwest::Error) -> SimulateError {
    if error.is_timeout() {
        SimulateError::NoAnswer {
            what,
            within: ANSWER_WITHIN,
        }
    } else if error.is_connect() {
        SimulateError::Unreachable {
            server: server.to_string(),
            why: root_cause(error),
        }
    } else {
        SimulateError::Http(format!("{what}: {}", root_cause(error)))
    }
}

/// The innermost cause of an error, which is the one that says what went wrong
/// ("Connection refused") rather than where ("error sending request").
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

/// The signed `POST /voice` Twilio sends when the call comes in, and the TwiML it gets back.
async fn answer(
    http: &reqwest::Client,
    plan: &Plan,
    call_sid: &str,
) -> Result<twiml::Document, SimulateError> {
    let form = call_form(plan, call_sid, "ringing", &[]);
    let response = post_signed(http, plan, "/voice", &form)
        .await
        .map_err(|error| unanswered("POST /voice", &plan.server, &error))?;
    let status = response.status().as_u16();
    match status {
        200 => {}
        403 => {
            return Err(SimulateError::SignatureRefused {
                what: "POST /voice",
            });
        }
        _ => {
            return Err(SimulateError::Status {
                what: "POST /voice",
                status,
            });
        }
    }
    let body = response
        .text()
        .await
        .map_err(|error| unanswered("POST /voice", &plan.server, &error))?;
    twiml::read(&body).map_err(|error| SimulateError::Twiml(error.to_string()))
}

/// The fields Twilio sends about an inbound call in every voice webhook, at `status`, then
/// `extra`.
fn call_form(
    plan: &Plan,
    call_sid: &str,
    status: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut form = pairs(&[
        ("CallSid", call_sid),
        ("AccountSid", &plan.account_sid),
        ("From", &plan.from),
        ("To", &plan.to),
        ("Caller", &plan.from),
        ("Called", &plan.to),
        ("CallStatus", status),
        ("Direction", "inbound"),
        ("ApiVersion", "2010-04-01"),
    ]);
    form.extend(pairs(extra));
    form
}

fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

/// POSTs `form` to `path` on the server, signed over the public URL as Twilio signs it.
async fn post_signed(
    http: &reqwest::Client,
    plan: &Plan,
    path: &str,
    form: &[(String, String)],
) -> Result<reqwest::Response, reqwest::Error> {
    let signature = signature::compute(
        plan.auth_token.expose_secret().as_bytes(),
        &plan.public_base_url.join(path),
        SignedBody::Form(form),
    );
    http.post(endpoint(&plan.server, path))
        .header("X-Twilio-Signature", signature)
        .form(form)
        .send()
        .await
}

fn endpoint(server: &url::Url, path: &str) -> String {
    format!("{}{path}", server.as_str().trim_end_matches('/'))
}

/// The signed upgrade: signed over the TwiML's URL as Twilio signs it, sent to the server.
async fn open_stream(plan: &Plan, stream_url: &str) -> Result<Socket, SimulateError> {
    let public =
        url::Url::parse(stream_url).map_err(|error| SimulateError::Twiml(error.to_string()))?;
    let mut target = plan.server.clone();
    let scheme = if plan.server.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    target.set_scheme(scheme).expect("http(s) becomes ws(s)");
    target.set_path(public.path());
    target.set_query(public.query());
    let signature = signature::compute(
        plan.auth_token.expose_secret().as_bytes(),
        stream_url,
        SignedBody::Form(&[]),
    );
    let mut request = target
        .as_str()
        .into_client_request()
        .map_err(|error| SimulateError::Upgrade(error.to_string()))?;
    request.headers_mut().insert(
        "x-twilio-signature",
        signature.parse().expect("base64 is a valid header value"),
    );
    let connecting = tokio_tungstenite::connect_async(request);
    match timeout(ANSWER_WITHIN, connecting).await {
        Err(_) => Err(SimulateError::NoAnswer {
            what: "the stream upgrade",
            within: ANSWER_WITHIN,
        }),
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(tungstenite::Error::Http(response))) if response.status() == 403 => {
            Err(SimulateError::SignatureRefused {
                what: "the stream upgrade",
            })
        }
        Ok(Err(tungstenite::Error::Http(response))) => Err(SimulateError::Status {
            what: "the stream upgrade",
            status: response.status().as_u16(),
        }),
        Ok(Err(tungstenite::Error::Io(error))) => Err(SimulateError::Unreachable {
            server: plan.server.to_string(),
            why: error.to_string(),
        }),
        Ok(Err(error)) => Err(SimulateError::Upgrade(error.to_string())),
    }
}

/// The stream while it lasts.
struct Call<'a> {
    socket: Socket,
    stream: MediaStream,
    playback: Playback,
    timeline: &'a mut Timeline,
    /// The call's start: time 0 of the timeline and of the recording.
    started: Instant,
    stream_started: Instant,
    first_audio_heard: bool,
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Call<'_> {
    /// `connected`, `start`, the caller's audio frame by frame, the keys, `stop`; the agent's
    /// audio played as it arrives.
    async fn converse(
        &mut self,
        plan: &Plan,
        parameters: &HashMap<String, String>,
    ) -> Result<End, SimulateError> {
        let parameters = serde_json::to_value(parameters).expect("strings serialise");
        self.send(CONNECTED.to_owned()).await?;
        let start = self.stream.start(&parameters);
        self.send(start).await?;
        self.stream_started = Instant::now();
        self.emit(Event::StreamStarted {
            t_ms: elapsed_ms(self.started),
            stream_sid: self.stream.stream_sid.clone(),
        });

        let total_frames = plan.length.as_millis().div_ceil(FRAME.as_millis());
        let total_frames = usize::try_from(total_frames).unwrap_or(usize::MAX);
        let caller_frames = plan.caller_audio.len().div_ceil(FRAME_BYTES);
        let mut keypresses: VecDeque<&Keypress> = plan.keypresses.iter().collect();
        keypresses
            .make_contiguous()
            .sort_by_key(|keypress| keypress.at);
        let mut frame = 0usize;
        let mut last_heard = Instant::now();
        let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            let next_frame = self.stream_started + FRAME * u32::try_from(frame).unwrap_or(u32::MAX);
            let next_playback = self
                .playback
                .next_event()
                .map(|at| self.started + samples_to_duration(at));
            let next_keypress = keypresses
                .front()
                .map(|keypress| self.stream_started + keypress.at);
            tokio::select! {
                () = sleep_until(next_frame) => {
                    if frame >= total_frames {
                        let stop = self.stream.stop();
                        let at = Instant::now();
                        self.send(stop).await?;
                        return Ok(End::Stopped(at));
                    }
                    self.send_frame(plan, frame).await?;
                    frame += 1;
                    if frame == caller_frames {
                        self.emit(Event::CallerAudioEnd { t_ms: elapsed_ms(self.started) });
                    }
                }
                () = until(next_playback) => {
                    let now = self.now();
                    let played = self.playback.advance(now);
                    self.played(played).await?;
                }
                () = until(next_keypress) => {
                    let keypress = keypresses.pop_front().expect("a keypress was due");
                    for &key in &keypress.keys {
                        let message = self.stream.dtmf(key);
                        self.send(message).await?;
                    }
                    let keys = keypress.keys.iter().map(char::to_string).collect::<Vec<_>>().join(" ");
                    self.emit(Event::Dtmf { t_ms: elapsed_ms(self.started), keys });
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > ANSWER_WITHIN {
                        return Err(SimulateError::StoppedAnswering { within: ANSWER_WITHIN });
                    }
                    self.send_message(Message::Ping(Vec::new().into())).await?;
                }
                message = self.socket.next() => {
                    last_heard = Instant::now();
                    match message {
                        Some(Ok(Message::Text(text))) => self.on_message(text.as_str()).await?,
                        Some(Ok(Message::Close(frame))) => return Ok(End::Closed(frame)),
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return Ok(End::Dropped(error.to_string())),
                        None => return Ok(End::Dropped("the connection ended".to_owned())),
                    }
                }
            }
        }
    }

    fn now(&self) -> u64 {
        position(self.started, Instant::now())
    }

    fn emit(&mut self, event: Event) {
        self.timeline.emit(&event);
    }

    /// Frame `n` of the caller's audio, µ-law silence once the WAV is over.
    async fn send_frame(&mut self, plan: &Plan, n: usize) -> Result<(), SimulateError> {
        let mut bytes = [SILENCE; FRAME_BYTES];
        if let Some(chunk) = plan.caller_audio.chunks(FRAME_BYTES).nth(n) {
            bytes[..chunk.len()].copy_from_slice(chunk);
        }
        let message = self.stream.media(n, &STANDARD.encode(bytes));
        self.send(message).await
    }

    async fn send(&mut self, text: String) -> Result<(), SimulateError> {
        self.send_message(Message::text(text)).await
    }

    /// Sends within `ANSWER_WITHIN`: a server that stopped reading fills the socket's buffers
    /// and then stalls the send.
    async fn send_message(&mut self, message: Message) -> Result<(), SimulateError> {
        match timeout(ANSWER_WITHIN, self.socket.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SimulateError::Dropped(error.to_string())),
            Err(_) => Err(SimulateError::StoppedAnswering {
                within: ANSWER_WITHIN,
            }),
        }
    }

    /// What callbridge sends Twilio: agent audio, marks and `clear`.
    async fn on_message(&mut self, text: &str) -> Result<(), SimulateError> {
        let now = self.now();
        let played = match media::parse(text) {
            Ok(Inbound::Media { payload }) => match STANDARD.decode(payload.as_bytes()) {
                Ok(audio) => self.playback.media(now, &audio),
                Err(_) => {
                    self.warn("callbridge sent media that is not base64");
                    return Ok(());
                }
            },
            Ok(Inbound::Mark { name }) => self.playback.mark(now, &name),
            Ok(Inbound::Other(event)) if event == "clear" => self.playback.clear(now),
            Ok(other) => {
                self.warn(&format!(
                    "callbridge sent Twilio something unexpected: {other:?}"
                ));
                return Ok(());
            }
            Err(error) => {
                self.warn(&format!("callbridge sent a malformed message ({error})"));
                return Ok(());
            }
        };
        self.played(played).await
    }

    fn warn(&mut self, message: &str) {
        self.emit(Event::Warning {
            t_ms: elapsed_ms(self.started),
            message: message.to_owned(),
        });
    }

    /// Echoes marks as Twilio would and puts what was played on the timeline.
    async fn played(&mut self, played: Vec<Played>) -> Result<(), SimulateError> {
        for event in &played {
            if let Played::Mark { name, .. } = event {
                let echo = self.stream.mark(name);
                self.send(echo).await?;
            }
        }
        self.report(played);
        Ok(())
    }

    /// Puts what was played on the timeline.
    fn report(&mut self, played: Vec<Played>) {
        let ms = |samples: u64| samples / SAMPLES_PER_MS;
        for event in played {
            match event {
                Played::SpeechStarted { at } => {
                    if !self.first_audio_heard {
                        self.first_audio_heard = true;
                        let stream_started = position(self.started, self.stream_started);
                        self.emit(Event::FirstAgentAudio {
                            t_ms: ms(at),
                            after_ms: ms(at.saturating_sub(stream_started)),
                        });
                    }
                }
                Played::Mark { name, at, cleared } => self.emit(Event::Mark {
                    t_ms: ms(at),
                    name,
                    cleared,
                }),
                Played::SpeechEnded { from, to, marks } => self.emit(Event::AgentSpeech {
                    t_ms: ms(to),
                    from_ms: ms(from),
                    marks,
                }),
                Played::Cleared { at, dropped, marks } => self.emit(Event::Clear {
                    t_ms: ms(at),
                    dropped_ms: ms(dropped),
                    marks,
                }),
            }
        }
    }

    /// Twilio closes the socket after `stop`; callbridge closes its side in answer.
    async fn hang_up(&mut self) {
        let _ = timeout(CLOSE_WITHIN, async {
            let _ = self.socket.close(None).await;
            while let Some(Ok(_)) = self.socket.next().await {}
        })
        .await;
    }
}

/// Why callbridge closed the stream before the call's end, from its close code (the agent's
/// troubles close it with 1011, which makes Twilio play the TwiML's apology) and, with the
/// API on, the end reason it stored.
fn closed_early(
    code: Option<u16>,
    agent_was_heard: bool,
    stored: Option<StoredEnd>,
    apology: &[String],
) -> SimulateError {
    let stored = stored.unwrap_or_default();
    let apology = apology.join(" ");
    match code {
        Some(1011)
            if !agent_was_heard || stored.end_reason.as_deref() == Some("agent_unreachable") =>
        {
            SimulateError::NoAgentSession {
                also: if stored.openai_errors.is_empty() {
                    " and that the server reaches OPENAI_REALTIME_URL"
                } else {
                    ""
                },
                detail: stored.describe(),
                apology,
            }
        }
        Some(1011) => SimulateError::AgentLost {
            detail: stored.describe(),
            apology,
        },
        Some(1008) => SimulateError::StreamRefused,
        Some(1012) => SimulateError::ShuttingDown,
        code => SimulateError::ClosedEarly {
            code,
            detail: stored.describe(),
        },
    }
}

/// What the stored call says about its end.
#[derive(Default)]
struct StoredEnd {
    end_reason: Option<String>,
    /// Codes of the errors OpenAI reported (`invalid_api_key`, …).
    openai_errors: Vec<String>,
}

impl StoredEnd {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(reason) = &self.end_reason {
            parts.push(format!("end reason {reason}"));
        }
        if !self.openai_errors.is_empty() {
            parts.push(format!("OpenAI said {}", self.openai_errors.join(", ")));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join("; "))
        }
    }
}

/// `GET /calls/{sid}` once the call shows its end, if the API is on.
async fn stored_call(
    http: &reqwest::Client,
    plan: &Plan,
    call_sid: &str,
) -> Option<Result<serde_json::Value, String>> {
    let token = plan.api_token.as_ref()?;
    let url = endpoint(&plan.server, &format!("/calls/{call_sid}"));
    let deadline = Instant::now() + STORED_WITHIN;
    loop {
        let response = http
            .get(&url)
            .bearer_auth(token.expose_secret())
            .send()
            .await;
        let detail: serde_json::Value = match response {
            Ok(response) if response.status().is_success() => match response.json().await {
                Ok(detail) => detail,
                Err(error) => return Some(Err(root_cause(&error))),
            },
            Ok(response) => {
                return Some(Err(format!(
                    "GET /calls/{call_sid} answered {}",
                    response.status().as_u16()
                )));
            }
            Err(error) => return Some(Err(root_cause(&error))),
        };
        if !detail["call"]["ended_at_ms"].is_null() || Instant::now() >= deadline {
            return Some(Ok(detail));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stored_end(http: &reqwest::Client, plan: &Plan, call_sid: &str) -> Option<StoredEnd> {
    let detail = stored_call(http, plan, call_sid).await?.ok()?;
    let openai_errors = detail["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|event| event["type"] == "openai_error")
        .filter_map(|event| event["name"].as_str())
        .filter(|code| !code.is_empty())
        .map(str::to_owned)
        .collect();
    Some(StoredEnd {
        end_reason: detail["call"]["end_reason"].as_str().map(str::to_owned),
        openai_errors,
    })
}

/// After the call: Twilio's `completed` status callback, then the stored call and its
/// transcript when the API is on. Neither decides whether the call worked.
async fn completed(
    http: &reqwest::Client,
    plan: &Plan,
    call_sid: &str,
    started: Instant,
    timeline: &mut Timeline,
) {
    let duration = started.elapsed().as_secs().to_string();
    let form = call_form(
        plan,
        call_sid,
        "completed",
        &[
            ("CallDuration", &duration),
            ("CallbackSource", "call-progress-events"),
        ],
    );
    match post_signed(http, plan, "/voice/status", &form).await {
        Ok(response) => timeline.emit(&Event::StatusCallback {
            t_ms: elapsed_ms(started),
            status: response.status().as_u16(),
        }),
        Err(error) => timeline.emit(&Event::Warning {
            t_ms: elapsed_ms(started),
            message: format!(
                "the status callback failed: {}",
                unanswered("POST /voice/status", &plan.server, &error)
            ),
        }),
    }
    match stored_call(http, plan, call_sid).await {
        None => {}
        Some(Ok(detail)) => timeline.emit(&Event::StoredCall {
            t_ms: elapsed_ms(started),
            end_reason: detail["call"]["end_reason"].as_str().map(str::to_owned),
            transcript: detail["transcript"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|line| Line {
                    speaker: line["speaker"].as_str().unwrap_or_default().to_owned(),
                    text: line["text"].as_str().unwrap_or_default().to_owned(),
                })
                .collect(),
        }),
        Some(Err(why)) => timeline.emit(&Event::Warning {
            t_ms: elapsed_ms(started),
            message: format!("cannot read the stored call: {why}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_sid_looks_like_twilios() {
        let sid = new_call_sid();
        assert!(crate::twilio::ids::CallSid::parse(&sid).is_ok(), "{sid}");
        assert_ne!(sid, new_call_sid());
    }

    #[test]
    fn an_early_close_is_told_apart_by_its_code_and_what_was_heard() {
        let apology = ["Sorry.".to_owned()];
        let refused = closed_early(Some(1011), false, None, &apology);
        assert!(matches!(refused, SimulateError::NoAgentSession { .. }));
        let message = refused.to_string();
        assert!(
            message
                .starts_with("callbridge could not open an OpenAI session: check OPENAI_API_KEY"),
            "{message}"
        );
        assert!(message.contains("\"Sorry.\""), "{message}");
        assert!(
            message.contains("and that the server reaches OPENAI_REALTIME_URL"),
            "OpenAI did not say why, so the network is a suspect too: {message}"
        );
        let said_why = StoredEnd {
            end_reason: Some("agent_failed".into()),
            openai_errors: vec!["invalid_api_key".into()],
        };
        let message = closed_early(Some(1011), false, Some(said_why), &apology).to_string();
        assert!(
            message.contains(
                "check OPENAI_API_KEY (end reason agent_failed; OpenAI said invalid_api_key);"
            ),
            "{message}"
        );
        assert!(!message.contains('\n'));

        let stored = StoredEnd {
            end_reason: Some("agent_failed".into()),
            openai_errors: vec!["invalid_api_key".into()],
        };
        let lost = closed_early(Some(1011), true, Some(stored), &apology).to_string();
        assert!(lost.contains("lost its OpenAI session"), "{lost}");
        assert!(
            lost.contains("(end reason agent_failed; OpenAI said invalid_api_key)"),
            "{lost}"
        );
        assert!(matches!(
            closed_early(Some(1008), false, None, &apology),
            SimulateError::StreamRefused
        ));
        assert!(matches!(
            closed_early(None, false, None, &apology),
            SimulateError::ClosedEarly { code: None, .. }
        ));
    }

    #[test]
    fn positions_are_8_khz_samples() {
        let start = Instant::now();
        assert_eq!(position(start, start + Duration::from_millis(1500)), 12_000);
        assert_eq!(samples_to_duration(12_000), Duration::from_millis(1500));
    }
}
