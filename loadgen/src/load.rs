//! `loadgen run` and `loadgen floor`: N simulated calls, each sending one 160-byte µ-law frame
//! every 20 ms in real time and timing every frame until its audio comes back.
//!
//! Through the bridge, a call is what Twilio does: `POST /voice` (signed) for the TwiML and its
//! stream token, the upgrade to the TwiML's stream URL (`/stream/{token}`, signed over that URL),
//! `connected`, `start`, then `media` frames from
//! the first moment (while callbridge is still connecting to OpenAI), every `mark` echoed on
//! arrival (Twilio echoes once the audio before it has played; the server's work is the
//! same), `stop` at the end. The floor sends the same frames as
//! `input_audio_buffer.append` straight to the fake Realtime server: the same harness, the same
//! loopback and the same fake, minus callbridge. The difference between the two is what the
//! bridge adds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use callbridge::config::PublicBaseUrl;
use callbridge::openai::events;
use callbridge::twilio::media_stream::{CONNECTED, MediaStream};
use callbridge::twilio::signature::{self, SignedBody};
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
// AsyncRead/WriteExt need tokio's `io-util`, which tokio-tungstenite always enables.
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::procfs::{Spent, Tracker};
use crate::stats::{Failures, Percentiles, ProcessReport, RunReport};
use crate::workers;
use callbridge_testkit::wire::{
    self, AUDIO_DELTA, DELTA, EVENT, FRAME_INTERVAL, FrameAudio, MARK_NAME, PAYLOAD, TYPE,
};

/// What a run does, from the command line.
#[derive(Clone, Debug)]
pub struct Plan {
    pub calls: usize,
    /// Audio each call sends.
    pub duration: Duration,
    /// Calls start evenly spread over this long, as calls arrive at a real server.
    pub ramp: Duration,
    /// How long a call waits for its last frames to come back before counting them lost.
    pub grace: Duration,
    /// The process whose CPU and memory are measured (callbridge, or the fake for the floor).
    pub pid: Option<u32>,
    /// `getconf CLK_TCK`: the unit of CPU times in `/proc/<pid>/stat`.
    pub clk_tck: u64,
}

/// Who the calls talk to.
pub enum Target {
    Bridge(Bridge),
    Floor(Floor),
}

/// callbridge, reached as Twilio reaches it.
pub struct Bridge {
    /// `host:port` the server listens on.
    pub(crate) address: String,
    /// The public URL Twilio signs `/voice` requests over.
    voice_url: String,
    auth_token: String,
    pub(crate) account_sid: String,
}

impl Bridge {
    pub fn new(
        server: &str,
        public_base_url: &str,
        auth_token: &str,
        account_sid: &str,
    ) -> anyhow::Result<Self> {
        let server = url::Url::parse(server).context("--server is not a URL")?;
        let address = socket_address(&server)?;
        let public = PublicBaseUrl::parse(public_base_url)
            .map_err(|e| anyhow::anyhow!("--public-base-url {e}"))?;
        Ok(Self {
            address,
            voice_url: public.join("/voice"),
            auth_token: auth_token.to_owned(),
            account_sid: account_sid.to_owned(),
        })
    }
}

/// The fake Realtime server, reached as callbridge reaches it.
pub struct Floor {
    address: String,
    url: String,
}

impl Floor {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url).context("--realtime is not a URL")?;
        ensure!(parsed.scheme() == "ws", "--realtime must be a ws:// URL");
        Ok(Self {
            address: socket_address(&parsed)?,
            url: url.to_owned(),
        })
    }
}

fn socket_address(url: &url::Url) -> anyhow::Result<String> {
    let host = url.host_str().context("the URL has no host")?;
    let port = url.port_or_known_default().context("the URL has no port")?;
    Ok(format!("{host}:{port}"))
}

/// A call's first second, in frames.
const FIRST_SECOND: usize = 50;
/// Time for the worker threads to start before the first call.
const STARTUP: Duration = Duration::from_millis(200);
/// How often memory is sampled for its peak.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Sentinel in `Frame::rtt_us`: the frame has not come back.
const NOT_RECEIVED: u32 = u32::MAX;

pub(crate) type Socket = WebSocketStream<TcpStream>;

/// Everything the calls of every worker thread share.
struct Context {
    target: Target,
    plan: Plan,
    go: Instant,
    audio: FrameAudio,
    /// Calls whose setup is over, connected or failed.
    settled: AtomicUsize,
    /// Frames back so far, over all calls: the CPU measurement's denominator.
    received: AtomicU64,
}

/// One frame's timing, in microseconds since the run started.
#[derive(Clone, Copy)]
struct Frame {
    sent_us: u32,
    /// How late it was sent against its 20 ms schedule.
    lag_us: u32,
    rtt_us: u32,
}

/// Why a call failed, by step.
pub(crate) struct Failure {
    pub(crate) step: &'static str,
    pub(crate) error: String,
}

impl Failure {
    pub(crate) fn new(step: &'static str, error: impl std::fmt::Display) -> Self {
        Self {
            step,
            error: format!("{error:#}"),
        }
    }

    /// For `map_err`: the failure of `step`.
    pub(crate) fn at<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> Self {
        move |error| Self::new(step, error)
    }
}

#[derive(Default)]
struct CallRecord {
    connect_failure: Option<Failure>,
    dropped: Option<Failure>,
    frames: Vec<Frame>,
    duplicates: u64,
    misrouted: u64,
}

/// Runs the calls and measures them; blocks until the last call has ended.
pub fn run(target: Target, plan: Plan) -> anyhow::Result<RunReport> {
    let process = plan.pid.map(Tracker::new).transpose()?;
    let harness = Tracker::new(std::process::id())?;
    let mode = match target {
        Target::Bridge(_) => "bridge",
        Target::Floor(_) => "floor",
    };
    let context = Arc::new(Context {
        target,
        plan: plan.clone(),
        go: Instant::now() + STARTUP,
        audio: FrameAudio::new(),
        settled: AtomicUsize::new(0),
        received: AtomicU64::new(0),
    });
    // Calls are dealt round-robin, so every thread carries calls from the whole ramp.
    let threads = workers::count().min(plan.calls);
    let assignments: Vec<Vec<usize>> = (0..threads)
        .map(|thread| (thread..plan.calls).step_by(threads).collect())
        .collect();
    let shared = Arc::clone(&context);
    let workers = workers::spawn(assignments, move |calls| async move {
        join_all(calls.into_iter().map(|index| call(index, &shared))).await
    });
    let window = observe(&context, process, harness);
    let records: Vec<CallRecord> = workers.join().into_iter().flatten().collect();
    Ok(summarise(mode, &context, &records, &window?))
}

/// One call, from its place in the ramp to its `stop`.
async fn call(index: usize, context: &Context) -> CallRecord {
    let plan = &context.plan;
    let offset = plan.ramp.mul_f64(index as f64 / plan.calls as f64);
    tokio::time::sleep_until((context.go + offset).into()).await;
    let opened = match &context.target {
        Target::Bridge(bridge) => open_media_stream(index, bridge).await,
        Target::Floor(floor) => open_realtime(floor).await,
    };
    context.settled.fetch_add(1, Ordering::Relaxed);
    match opened {
        Ok(session) => stream(index, session, context).await,
        Err(failure) => CallRecord {
            connect_failure: Some(failure),
            ..CallRecord::default()
        },
    }
}

/// An open call: its socket and who is on the other end.
struct Session {
    socket: Socket,
    peer: Peer,
}

enum Peer {
    Twilio(MediaStream),
    Realtime,
}

enum Incoming<'a> {
    Audio(&'a str),
    Mark(&'a str),
    Other,
}

impl Peer {
    /// The message carrying frame `frame`, as this peer expects it.
    fn audio(&mut self, frame: usize, payload: &str) -> String {
        match self {
            Self::Twilio(stream) => stream.media(frame, payload),
            Self::Realtime => events::append_audio(payload),
        }
    }

    fn read<'a>(&self, text: &'a str) -> Incoming<'a> {
        let (kind, audio, field) = match self {
            Self::Twilio(_) => (wire::string_after(text, EVENT), "media", PAYLOAD),
            Self::Realtime => (wire::string_after(text, TYPE), AUDIO_DELTA, DELTA),
        };
        match kind {
            Some(kind) if kind == audio => {
                wire::string_after(text, field).map_or(Incoming::Other, Incoming::Audio)
            }
            Some("mark") => {
                wire::string_after(text, MARK_NAME).map_or(Incoming::Other, Incoming::Mark)
            }
            _ => Incoming::Other,
        }
    }

    /// Twilio echoes each mark once the audio before it has played; here that is at once.
    fn mark_echo(&mut self, name: &str) -> Option<String> {
        let Self::Twilio(stream) = self else {
            return None;
        };
        Some(stream.mark(name))
    }

    fn stop(&mut self) -> Option<String> {
        let Self::Twilio(stream) = self else {
            return None;
        };
        Some(stream.stop())
    }
}

async fn open_media_stream(index: usize, bridge: &Bridge) -> Result<Session, Failure> {
    // Unique per process and call, so runs against one server never reuse a CallSid.
    let call_sid = format!("CA{:08x}{index:024x}", std::process::id());
    let (mut socket, answer) = upgrade(bridge, &call_sid, BUSINESS).await?;
    let mut stream = MediaStream::new(&call_sid, &bridge.account_sid);
    let start = start_message(&mut stream, &answer);
    for message in [CONNECTED.to_owned(), start] {
        socket
            .feed(Message::text(message))
            .await
            .map_err(Failure::at("start"))?;
    }
    socket.flush().await.map_err(Failure::at("start"))?;
    Ok(Session {
        socket,
        peer: Peer::Twilio(stream),
    })
}

/// What Twilio does to open a call's Media Stream up to its first message: `POST /voice` to
/// `to` for the TwiML, then the signed upgrade to the TwiML's stream URL.
pub(crate) async fn upgrade(
    bridge: &Bridge,
    call_sid: &str,
    to: &str,
) -> Result<(Socket, Answer), Failure> {
    let answer = answer_call(bridge, call_sid, to)
        .await
        .map_err(Failure::at("POST /voice"))?;
    let mut request = answer
        .upgrade_url(&bridge.address)
        .map_err(Failure::at("/stream upgrade"))?
        .into_client_request()
        .map_err(Failure::at("/stream upgrade"))?;
    // Each call's URL holds its own token, so each upgrade has its own signature.
    let stream_signature = signature::compute(
        bridge.auth_token.as_bytes(),
        &answer.stream_url,
        SignedBody::Form(&[]),
    );
    request.headers_mut().insert(
        "x-twilio-signature",
        stream_signature
            .parse()
            .map_err(Failure::at("/stream upgrade"))?,
    );
    let socket = websocket(&bridge.address, request)
        .await
        .map_err(Failure::at("/stream upgrade"))?;
    Ok((socket, answer))
}

/// Twilio's `start` for the stream `/voice` answered, carrying the TwiML's `<Parameter>`s as
/// its `customParameters`, as Twilio does.
pub(crate) fn start_message(stream: &mut MediaStream, answer: &Answer) -> String {
    stream.start(&serde_json::Value::Object(answer.parameters.clone()))
}

const CALLER: &str = "whatsapp:+5511999990000";
const BUSINESS: &str = "whatsapp:+558551234567";

/// What `/voice` answered: where to open the stream, and the token `start` repeats.
pub(crate) struct Answer {
    /// The `<Stream url>`, public (`wss://…/stream/{token}`): what Twilio signs.
    stream_url: String,
    /// The TwiML's `<Parameter>`s, the stream token among them.
    parameters: serde_json::Map<String, serde_json::Value>,
}

impl Answer {
    /// The stream URL's path on the server at `address` (the public host is a proxy's).
    fn upgrade_url(&self, address: &str) -> anyhow::Result<String> {
        let public = url::Url::parse(&self.stream_url).context("the <Stream> URL")?;
        Ok(format!("ws://{address}{}", public.path()))
    }
}

/// `POST /voice` as Twilio sends it, signed; returns the stream URL and token from the TwiML.
async fn answer_call(bridge: &Bridge, call_sid: &str, to: &str) -> anyhow::Result<Answer> {
    let form: Vec<(String, String)> = [
        ("CallSid", call_sid),
        ("AccountSid", &bridge.account_sid),
        ("From", CALLER),
        ("To", to),
        ("Direction", "inbound"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    let signature = signature::compute(
        bridge.auth_token.as_bytes(),
        &bridge.voice_url,
        SignedBody::Form(&form),
    );
    let body = serde_urlencoded::to_string(&form)?;
    let request = format!(
        "POST /voice HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         X-Twilio-Signature: {signature}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        bridge.address,
        body.len(),
    );
    let mut tcp = TcpStream::connect(&bridge.address).await?;
    tcp.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let status = response.lines().next().unwrap_or_default();
    ensure!(
        status.split(' ').nth(1) == Some("200"),
        "answered {status:?}"
    );
    let parameters = twiml_parameters(&response);
    ensure!(
        parameters.contains_key("token"),
        "the TwiML has no token <Parameter> (busy or draining?)"
    );
    let stream_url = wire::string_after(&response, r#"<Stream url=""#)
        .context("the TwiML has no <Stream url>")?;
    Ok(Answer {
        stream_url: stream_url.to_owned(),
        parameters,
    })
}

/// Every `<Parameter name="…" value="…"/>` of a TwiML document. The values callbridge puts
/// there (the URL-safe token, `whatsapp:+…` numbers, a direction, an agent name) carry no XML
/// escapes, so they are read as they appear.
fn twiml_parameters(twiml: &str) -> serde_json::Map<String, serde_json::Value> {
    const NAME: &str = r#"<Parameter name=""#;
    const VALUE: &str = r#"" value=""#;
    let mut parameters = serde_json::Map::new();
    let mut rest = twiml;
    while let Some(start) = rest.find(NAME) {
        rest = &rest[start + NAME.len()..];
        let Some((name, after)) = rest.split_once(VALUE) else {
            break;
        };
        let Some(end) = after.find('"') else {
            break;
        };
        parameters.insert(name.to_owned(), after[..end].into());
        rest = &after[end..];
    }
    parameters
}

async fn open_realtime(floor: &Floor) -> Result<Session, Failure> {
    let request = floor
        .url
        .as_str()
        .into_client_request()
        .map_err(Failure::at("upgrade"))?;
    let mut socket = websocket(&floor.address, request)
        .await
        .map_err(Failure::at("upgrade"))?;
    let update = r#"{"type":"session.update","session":{"type":"realtime"}}"#;
    socket
        .send(Message::text(update))
        .await
        .map_err(Failure::at("session.update"))?;
    Ok(Session {
        socket,
        peer: Peer::Realtime,
    })
}

async fn websocket(address: &str, request: Request) -> anyhow::Result<Socket> {
    let tcp = TcpStream::connect(address).await?;
    // Twilio and callbridge both send each frame at once; so must the harness.
    tcp.set_nodelay(true)?;
    let (socket, _) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(wire::websocket_config()))
            .await?;
    Ok(socket)
}

/// Sends the call's frames on schedule and times each one back, until every frame is back or
/// the grace period after the last one is over.
async fn stream(index: usize, session: Session, context: &Context) -> CallRecord {
    let total = (context.plan.duration.as_micros() / FRAME_INTERVAL.as_micros()) as usize;
    let mut call = LiveCall {
        // At most 65536 calls (the command line's limit), so the index fits.
        id: u16::try_from(index).expect("--calls is at most 65536"),
        session,
        first: Instant::now(),
        received: 0,
        payload: String::new(),
        record: CallRecord {
            frames: Vec::with_capacity(total),
            ..CallRecord::default()
        },
    };
    // Due time of the next frame; after the last frame, the end of the grace period.
    let timer = tokio::time::sleep_until(call.first.into());
    tokio::pin!(timer);
    let outcome = loop {
        if call.received == total {
            break Ok(());
        }
        tokio::select! {
            () = &mut timer => {
                let sent = call.record.frames.len();
                if sent == total {
                    break Ok(());
                }
                if let Err(failure) = call.send_frame(context).await {
                    break Err(failure);
                }
                let next = match sent + 1 {
                    last if last == total => Instant::now() + context.plan.grace,
                    next => call.due(next),
                };
                timer.as_mut().reset(next.into());
            }
            message = call.session.socket.next() => {
                if let Err(failure) = call.on_message(message, context).await {
                    break Err(failure);
                }
            }
        }
    };
    match outcome {
        Ok(()) => hang_up(&mut call.session).await,
        Err(failure) => call.record.dropped = Some(failure),
    }
    call.record
}

/// A call while its audio flows.
struct LiveCall {
    id: u16,
    session: Session,
    /// When the first frame was due; frame n is due n × 20 ms later.
    first: Instant,
    received: usize,
    /// Reused for every frame's payload.
    payload: String,
    record: CallRecord,
}

impl LiveCall {
    fn due(&self, frame: usize) -> Instant {
        self.first + FRAME_INTERVAL * u32::try_from(frame).unwrap_or(u32::MAX)
    }

    async fn send_frame(&mut self, context: &Context) -> Result<(), Failure> {
        let frame = self.record.frames.len();
        self.payload.clear();
        context.audio.encode(
            self.id,
            u32::try_from(frame).unwrap_or(u32::MAX),
            &mut self.payload,
        );
        let message = self.session.peer.audio(frame, &self.payload);
        let now = Instant::now();
        self.record.frames.push(Frame {
            sent_us: micros_since(context.go, now),
            lag_us: micros_since(self.due(frame), now),
            rtt_us: NOT_RECEIVED,
        });
        self.session
            .socket
            .send(Message::text(message))
            .await
            .map_err(Failure::at("sending"))
    }

    async fn on_message(
        &mut self,
        message: Option<tungstenite::Result<Message>>,
        context: &Context,
    ) -> Result<(), Failure> {
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                return Err(Failure::new("closed by the server", format!("{frame:?}")));
            }
            Some(Ok(_)) => return Ok(()),
            Some(Err(error)) => return Err(Failure::new("socket error", error)),
            None => {
                return Err(Failure::new(
                    "closed by the server",
                    "without a close frame",
                ));
            }
        };
        match self.session.peer.read(text.as_str()) {
            Incoming::Audio(payload) => self.on_audio(payload, context),
            Incoming::Mark(name) => {
                if let Some(echo) = self.session.peer.mark_echo(name) {
                    self.session
                        .socket
                        .send(Message::text(echo))
                        .await
                        .map_err(Failure::at("sending"))?;
                }
            }
            Incoming::Other => {}
        }
        Ok(())
    }

    /// Times the frame this audio carries, if it is one of this call's, not yet back.
    fn on_audio(&mut self, payload: &str, context: &Context) {
        let frame = match wire::decode_id(payload) {
            Some((call, seq)) if call == self.id => self.record.frames.get_mut(seq as usize),
            _ => {
                self.record.misrouted += 1;
                return;
            }
        };
        match frame {
            Some(frame) if frame.rtt_us == NOT_RECEIVED => {
                frame.rtt_us = micros_since(context.go, Instant::now()) - frame.sent_us;
                self.received += 1;
                context.received.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.record.duplicates += 1,
        }
    }
}

/// Ends a call the way its peer expects: Twilio sends `stop` and lets callbridge close the
/// stream (closing at once could cut off the `stop`), callbridge closes its Realtime socket.
async fn hang_up(session: &mut Session) {
    let closed = async {
        match session.peer.stop() {
            Some(stop) => {
                let _ = session.socket.send(Message::text(stop)).await;
                while let Some(Ok(_)) = session.socket.next().await {}
            }
            None => {
                let _ = session.socket.close(None).await;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, closed).await;
}

fn micros_since(start: Instant, at: Instant) -> u32 {
    u32::try_from(at.saturating_duration_since(start).as_micros()).unwrap_or(NOT_RECEIVED - 1)
}

/// The steady state: every call connected, none finished.
struct Window {
    start: Instant,
    end: Instant,
    /// Frames that came back between `start` and `end`.
    frames: u64,
    /// What the `--pid` process spent, when one was given.
    process: Option<Spent>,
    harness: Spent,
}

/// Waits until every call is set up, then measures until the shortest call's audio ends.
/// The trackers hold each process's memory from before the first call.
fn observe(
    context: &Context,
    mut process: Option<Tracker>,
    mut harness: Tracker,
) -> anyhow::Result<Window> {
    let plan = &context.plan;
    let end = context.go + plan.duration;
    while context.settled.load(Ordering::Relaxed) < plan.calls && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = Instant::now();
    if start >= end {
        bail!(
            "the calls took longer than --seconds to connect: no steady-state window was left \
             (use a shorter --ramp-seconds or more --seconds)"
        );
    }
    let received_at_start = context.received.load(Ordering::Relaxed);
    for tracker in process.iter_mut().chain([&mut harness]) {
        tracker.start_window()?;
    }
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        std::thread::sleep(left.min(RSS_SAMPLE_INTERVAL));
        for tracker in process.iter_mut().chain([&mut harness]) {
            tracker.sample()?;
        }
    }
    Ok(Window {
        start,
        end: Instant::now(),
        frames: context.received.load(Ordering::Relaxed) - received_at_start,
        process: process.map(Tracker::end_window).transpose()?,
        harness: harness.end_window()?,
    })
}

fn summarise(mode: &str, context: &Context, records: &[CallRecord], window: &Window) -> RunReport {
    let plan = &context.plan;
    let mut failures: BTreeMap<String, Failures> = BTreeMap::new();
    for failure in records
        .iter()
        .flat_map(|r| r.connect_failure.iter().chain(&r.dropped))
    {
        let entry = failures.entry(failure.step.to_owned()).or_default();
        entry.count += 1;
        if entry.example.is_empty() {
            entry.example.clone_from(&failure.error);
        }
    }
    let frames = || records.iter().flat_map(|r| &r.frames);
    let back = |f: &&Frame| f.rtt_us != NOT_RECEIVED;
    let window_us = micros_since(context.go, window.start)..=micros_since(context.go, window.end);
    let frames_sent = frames().count() as u64;
    let frames_received = frames().filter(back).count() as u64;
    let calls_connected = records
        .iter()
        .filter(|r| r.connect_failure.is_none())
        .count();
    let process_report =
        |spent: &Spent| ProcessReport::new(spent, window.frames, plan.clk_tck, calls_connected);
    RunReport {
        mode: mode.to_owned(),
        calls: plan.calls,
        seconds: plan.duration.as_secs_f64(),
        ramp_seconds: plan.ramp.as_secs_f64(),
        calls_connected,
        failed_connects: plan.calls - calls_connected,
        dropped_calls: records.iter().filter(|r| r.dropped.is_some()).count(),
        failures,
        frames_sent,
        frames_received,
        frames_lost: frames_sent - frames_received,
        first_second_lost: records
            .iter()
            .flat_map(|r| r.frames.iter().take(FIRST_SECOND))
            .filter(|f| f.rtt_us == NOT_RECEIVED)
            .count() as u64,
        duplicates: records.iter().map(|r| r.duplicates).sum(),
        misrouted: records.iter().map(|r| r.misrouted).sum(),
        window_start_s: f64::from(*window_us.start()) / 1e6,
        window_end_s: f64::from(*window_us.end()) / 1e6,
        rtt: Percentiles::of_micros(
            frames()
                .filter(back)
                .filter(|f| window_us.contains(&f.sent_us))
                .map(|f| f.rtt_us),
        ),
        rtt_all: Percentiles::of_micros(frames().filter(back).map(|f| f.rtt_us)),
        send_lag: Percentiles::of_micros(frames().map(|f| f.lag_us)),
        process: window.process.as_ref().map(process_report),
        harness: Some(process_report(&window.harness)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use askama::Template;
    use callbridge::twilio::twiml::ConnectStream;

    #[test]
    fn every_parameter_of_callbridge_s_twiml_is_read_back() {
        let twiml = ConnectStream {
            stream_url: "wss://abc.ngrok.app/stream/q5mAbc-_9",
            parameters: &[
                ("token", "q5mAbc-_9"),
                ("from", CALLER),
                ("to", "whatsapp:+15550000007"),
                ("direction", "inbound"),
                ("agent", "lane-7"),
            ],
            apology: "Sorry.",
        }
        .render()
        .unwrap();
        let parameters = twiml_parameters(&twiml);
        let expected = serde_json::json!({
            "token": "q5mAbc-_9",
            "from": CALLER,
            "to": "whatsapp:+15550000007",
            "direction": "inbound",
            "agent": "lane-7",
        });
        assert_eq!(serde_json::Value::Object(parameters), expected);
        assert!(twiml_parameters("<Response><Say>Busy.</Say></Response>").is_empty());
    }
}
