//! Drives a whole call through `driver::run` over channels instead of sockets: the test plays
//! Twilio on one pair of channels and OpenAI on another (handed over by `ChannelDialer`), and
//! Twilio's REST API through `RecordingControl`. It polls the call alongside whatever it waits
//! for, so `run` need not be `Send` or `'static`-spawnable. (The core's decisions have their own
//! tests; these check that the driver carries them out over real streams and sinks.)
//!
//! Time is paused except while the database is in use (building the state, reserving the call's
//! slot): waiting costs nothing, timeouts are deterministic, and "settling" means running the
//! call until it has nothing left to do. Paused time must not be on while real I/O is in
//! flight, or the clock jumps ahead while the database answers.

use std::fmt::Debug;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use callbridge_testkit::scratch::Scratch;
use futures_channel::mpsc::{self, SendError, UnboundedReceiver, UnboundedSender};
use futures_util::SinkExt;
use futures_util::StreamExt;
use futures_util::sink::SinkMapErr;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;

use super::{AgentMessage, Peers, TwilioMessage, run};
use crate::admission::StreamGrant;
use crate::admission::{CallSlot, STREAM_TOKEN_TTL};
use crate::call::core::{CallSettings, CallSetup, CallSummary};
use crate::call::leg::CallControl;
use crate::call::test_frames::{STREAM_SID, start_event};
use crate::call::transcript::Speaker;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::metrics::{EndReason, Metrics};
use crate::openai::client::{AgentDialer, DialError};
use crate::state::AppState;
use crate::twilio::ids::{CallSid, StreamSid};
use crate::twilio::rest::RestError;

const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
const OTHER_ACCOUNT_SID: &str = "ACffffffffffffffffffffffffffffffff";
const CALL_SID: &str = "CA0123456789abcdef0123456789abcdef";
const OTHER_CALL_SID: &str = "CAffffffffffffffffffffffffffffffff";
/// The longest a test waits for the bridge (virtual time, so it costs nothing).
const PATIENCE: Duration = Duration::from_secs(60);
/// Heartbeat used by the heartbeat tests; the others effectively turn it off.
const BEAT: Duration = Duration::from_secs(1);
const TWELVE_WORDS: &str = "one two three four five six seven eight nine ten eleven twelve";

type WsError = tungstenite::Error;
type AgentSink = SinkMapErr<UnboundedSender<AgentMessage>, fn(SendError) -> WsError>;
type AgentStream = UnboundedReceiver<Result<AgentMessage, WsError>>;
type TwilioFrame = Result<AggregatedMessage, ProtocolError>;

// ---------------------------------------------------------------------------------------------
// The agent side: a dialer that hands the bridge channel halves.

#[derive(Clone, Copy, Default, PartialEq)]
enum DialFailure {
    #[default]
    None,
    Preconnect,
    Open,
}

#[derive(Default)]
struct DialLog {
    preconnects: AtomicUsize,
    opens: AtomicUsize,
    models: Mutex<Vec<String>>,
}

// ---------------------------------------------------------------------------------------------
// Twilio's REST API: hang-ups are recorded; `failures` of them fail first (as a 503 would).

#[derive(Default)]
struct RecordingControl {
    hang_ups: Mutex<Vec<String>>,
    /// How many hang-ups fail before one succeeds.
    failures: AtomicUsize,
    /// How long each hang-up takes to answer.
    delay: Duration,
}

impl RecordingControl {
    fn hang_ups(&self) -> Vec<String> {
        self.hang_ups.lock().unwrap().clone()
    }
}

impl CallControl for RecordingControl {
    async fn hang_up(&self, call_sid: &str) -> Result<(), RestError> {
        self.hang_ups.lock().unwrap().push(call_sid.to_owned());
        tokio::time::sleep(self.delay).await;
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        match failing {
            true => Err(RestError::Unexpected { status: 503 }),
            false => Ok(()),
        }
    }
}

struct ChannelDialer {
    log: Arc<DialLog>,
    open_delay: Duration,
    failure: DialFailure,
    halves: Mutex<Option<(AgentSink, AgentStream)>>,
}

impl AgentDialer for ChannelDialer {
    type Transport = ();
    type Sink = AgentSink;
    type Stream = AgentStream;

    async fn preconnect(&self) -> Result<(), DialError> {
        self.log.preconnects.fetch_add(1, Ordering::SeqCst);
        match self.failure {
            DialFailure::Preconnect => Err(DialError::Timeout(Duration::ZERO)),
            _ => Ok(()),
        }
    }

    async fn open(&self, (): (), model: &str) -> Result<(AgentSink, AgentStream), DialError> {
        self.log.opens.fetch_add(1, Ordering::SeqCst);
        self.log.models.lock().unwrap().push(model.to_owned());
        tokio::time::sleep(self.open_delay).await;
        if self.failure == DialFailure::Open {
            return Err(DialError::Timeout(self.open_delay));
        }
        // The fake has one session's halves: a second session (replacing a lost one) is
        // refused, as an unreachable OpenAI would refuse it.
        self.halves
            .lock()
            .unwrap()
            .take()
            .ok_or(DialError::Timeout(Duration::ZERO))
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.

struct Options {
    env: Vec<(&'static str, &'static str)>,
    settings: CallSettings,
    control: RecordingControl,
    open_delay: Duration,
    failure: DialFailure,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            // No heartbeat unless a test asks for one: pings would interleave with the events.
            settings: CallSettings {
                heartbeat_interval: Duration::from_secs(3600),
                peer_timeout: Duration::from_secs(7200),
                start_timeout: Duration::from_secs(3600),
                ..CallSettings::default()
            },
            open_delay: Duration::ZERO,
            failure: DialFailure::None,
            control: RecordingControl::default(),
        }
    }
}

fn heartbeat_options() -> Options {
    Options {
        settings: CallSettings {
            heartbeat_interval: BEAT,
            // Between beats: a timeout on a beat would hinge on sub-millisecond timing.
            peer_timeout: BEAT * 5 / 2,
            start_timeout: BEAT,
            ..CallSettings::default()
        },
        ..Options::default()
    }
}

/// The bridge's future, polled whenever the test waits for something.
struct Bridge {
    running: Option<Pin<Box<dyn Future<Output = CallSummary>>>>,
    summary: Option<CallSummary>,
}

impl Bridge {
    /// Awaits `future` while running the bridge. The bridge is polled first so that it handles
    /// anything due at the same instant before the test looks.
    async fn drive<F: Future>(&mut self, future: F) -> F::Output {
        let mut future = pin!(future);
        if let Some(running) = self.running.as_mut() {
            let summary = tokio::select! {
                biased;
                summary = running => summary,
                output = &mut future => return output,
            };
            self.running = None;
            self.summary = Some(summary);
        }
        future.await
    }
}

struct Harness {
    state: Arc<AppState>,
    dials: Arc<DialLog>,
    control: Arc<RecordingControl>,
    token: String,
    close: CancellationToken,
    twilio_in: UnboundedSender<TwilioFrame>,
    twilio_out: UnboundedReceiver<TwilioMessage>,
    agent_in: UnboundedSender<Result<AgentMessage, WsError>>,
    agent_out: UnboundedReceiver<AgentMessage>,
    bridge: Bridge,
    /// Holds the database; removed with it when the harness is dropped.
    _database: Scratch,
    time_paused: bool,
}

impl Drop for Harness {
    fn drop(&mut self) {
        // The next harness of the same test opens its database on real time.
        if self.time_paused && !std::thread::panicking() {
            tokio::time::resume();
        }
    }
}

/// The slot `/voice` reserves and the stream's upgrade turns into a live call, with its token.
async fn reserve_slot(state: &Arc<AppState>) -> (StreamGrant, CallSlot) {
    let now_ms = SystemClock.now_ms();
    let token = state.admission.issue(now_ms).expect("a free call slot");
    let ttl_ms = i64::try_from(STREAM_TOKEN_TTL.as_millis()).unwrap();
    state
        .store
        .issue_stream_token(&token, CALL_SID, now_ms, now_ms + ttl_ms)
        .await
        .expect("the stream token is stored");
    let admitted = state
        .admission
        .redeem(&state.store, &token, now_ms)
        .await
        .expect("the token is valid");
    (admitted.grant, admitted.slot)
}

impl Harness {
    async fn new() -> Self {
        Self::with(Options::default()).await
    }

    /// Builds the state on real time (it opens a database), issues the stream token `/voice`
    /// would have issued, and pauses time.
    async fn with(options: Options) -> Self {
        let database = Scratch::new();
        let database_url = database.sqlite_url();
        let mut env = vec![
            ("TWILIO_ACCOUNT_SID", ACCOUNT_SID),
            ("TWILIO_AUTH_TOKEN", "test-auth-token"),
            ("OPENAI_API_KEY", "sk-test-key"),
            ("PUBLIC_BASE_URL", "https://callbridge.test"),
            ("DATABASE_URL", &database_url),
        ];
        env.extend(options.env);
        let config = Config::from_lookup(|name| {
            env.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        })
        .expect("the test configuration is valid");
        let state = AppState::build(config)
            .await
            .expect("the test database opens");
        let (grant, slot) = reserve_slot(&state).await;
        let token = grant.token.clone();
        let control = Arc::new(options.control);
        let setup = CallSetup {
            grant,
            account_sid: state.config.twilio_account_sid.clone(),
            agents: state.agents.current(),
            settings: options.settings,
            metrics: Arc::clone(&state.metrics),
            accepted_at: Instant::now().into_std(),
            accepted_at_ms: state.clock.now_ms(),
        };

        let (twilio_in, twilio_rx) = mpsc::unbounded();
        let (twilio_tx, twilio_out) = mpsc::unbounded();
        let (agent_tx, agent_out) = mpsc::unbounded::<AgentMessage>();
        let (agent_in, agent_rx) = mpsc::unbounded();
        let closed: fn(SendError) -> WsError = |_| WsError::ConnectionClosed;
        let dials = Arc::new(DialLog::default());
        let dialer = ChannelDialer {
            log: Arc::clone(&dials),
            open_delay: options.open_delay,
            failure: options.failure,
            halves: Mutex::new(Some((agent_tx.sink_map_err(closed), agent_rx))),
        };
        let close = CancellationToken::new();
        let running = {
            let state = Arc::clone(&state);
            let control = Arc::clone(&control);
            let close = close.clone();
            Box::pin(async move {
                let peers = Peers {
                    dialer: &dialer,
                    control: &*control,
                };
                run(twilio_tx, twilio_rx, peers, &state, setup, slot, close).await
            })
        };
        Self {
            state,
            dials,
            control,
            token,
            close,
            twilio_in,
            twilio_out,
            agent_in,
            agent_out,
            bridge: Bridge {
                running: Some(running),
                summary: None,
            },
            _database: database,
            time_paused: false,
        }
        .paused()
    }

    fn paused(mut self) -> Self {
        self.pause_time(true);
        self
    }

    fn pause_time(&mut self, paused: bool) {
        if paused {
            tokio::time::pause();
        } else {
            tokio::time::resume();
        }
        self.time_paused = paused;
    }

    fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    fn opens(&self) -> usize {
        self.dials.opens.load(Ordering::SeqCst)
    }

    fn preconnects(&self) -> usize {
        self.dials.preconnects.load(Ordering::SeqCst)
    }

    fn is_running(&self) -> bool {
        self.bridge.running.is_some()
    }

    // --- What Twilio sends.

    fn twilio_frame(&self, frame: AggregatedMessage) {
        self.twilio_in
            .unbounded_send(Ok(frame))
            .expect("the bridge is reading Twilio");
    }

    fn twilio(&self, event: Value) {
        self.twilio_frame(AggregatedMessage::Text(event.to_string().into()));
    }

    fn twilio_text(&self, text: &str) {
        self.twilio_frame(AggregatedMessage::Text(text.to_owned().into()));
    }

    /// `connected` then a genuine `start`.
    async fn start(&mut self) {
        let token = self.token.clone();
        self.start_as(ACCOUNT_SID, CALL_SID, &token).await;
    }

    /// Sends `connected` and `start`, and lets the call handle them.
    async fn start_as(&mut self, account_sid: &str, call_sid: &str, token: &str) {
        self.twilio(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}));
        self.twilio(start_event(account_sid, call_sid, token, "inbound"));
        self.settle().await;
    }

    fn media(&self, payload: &str) {
        self.twilio(json!({
            "event": "media",
            "sequenceNumber": "3",
            "streamSid": STREAM_SID,
            "media": {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": payload}
        }));
    }

    fn echo_marks(&self, names: &[String]) {
        for name in names {
            self.twilio(json!({
                "event": "mark",
                "sequenceNumber": "9",
                "streamSid": STREAM_SID,
                "mark": {"name": name}
            }));
        }
    }

    fn stop(&self) {
        self.twilio(json!({
            "event": "stop",
            "sequenceNumber": "99",
            "streamSid": STREAM_SID,
            "stop": {"accountSid": ACCOUNT_SID, "callSid": CALL_SID}
        }));
    }

    // --- What OpenAI sends.

    fn agent_frame(&self, frame: AgentMessage) {
        self.agent_in
            .unbounded_send(Ok(frame))
            .expect("the agent channel is open");
    }

    fn agent(&self, event: Value) {
        self.agent_frame(AgentMessage::text(event.to_string()));
    }

    /// The OpenAI socket ends without a close frame.
    fn agent_vanishes(&self) {
        self.agent_in.close_channel();
    }

    // --- What the bridge sends.

    async fn twilio_says(&mut self) -> TwilioMessage {
        recv(&mut self.bridge, &mut self.twilio_out, "Twilio").await
    }

    async fn agent_says(&mut self) -> AgentMessage {
        recv(&mut self.bridge, &mut self.agent_out, "OpenAI").await
    }

    async fn twilio_event(&mut self) -> Value {
        event_of(&self.twilio_says().await)
    }

    async fn agent_event(&mut self) -> Value {
        event_of(&self.agent_says().await)
    }

    /// Everything the bridge has sent to Twilio and not yet read.
    fn twilio_pending(&mut self) -> Vec<TwilioMessage> {
        std::iter::from_fn(|| self.twilio_out.try_recv().ok()).collect()
    }

    fn agent_pending(&mut self) -> Vec<AgentMessage> {
        std::iter::from_fn(|| self.agent_out.try_recv().ok()).collect()
    }

    // --- Time and lifecycle.

    async fn advance(&mut self, by: Duration) {
        self.bridge.drive(tokio::time::sleep(by)).await;
    }

    /// Lets the bridge handle everything sent so far. On paused time the clock only moves once
    /// every task is idle, so this returns after the bridge has run out of work.
    async fn settle(&mut self) {
        self.advance(Duration::from_millis(1)).await;
    }

    /// Starts the call and reads the `session.update` that opens the OpenAI session.
    async fn ready(&mut self) {
        self.start().await;
        let update = self.agent_event().await;
        assert_eq!(update["type"], "session.update");
    }

    async fn ended(&mut self) -> CallSummary {
        if let Some(summary) = self.bridge.summary.take() {
            return summary;
        }
        let running = self.bridge.running.take().expect("the bridge ran");
        tokio::time::timeout(PATIENCE, running)
            .await
            .expect("the call did not end")
    }

    /// Sends one response item's deltas and checks that each reaches Twilio unchanged as `media`
    /// immediately followed by its `mark`. Returns the mark names.
    async fn play(&mut self, response_id: &str, item_id: &str, payloads: &[String]) -> Vec<String> {
        for payload in payloads {
            self.agent(audio_delta(response_id, item_id, payload));
        }
        let mut marks = Vec::new();
        for payload in payloads {
            assert_eq!(
                self.twilio_event().await,
                json!({"event": "media", "streamSid": STREAM_SID, "media": {"payload": payload}})
            );
            marks.push(self.expect_mark().await);
        }
        marks
    }

    async fn expect_mark(&mut self) -> String {
        let mark = self.twilio_event().await;
        assert_eq!(mark["event"], "mark", "{mark}");
        assert_eq!(mark["streamSid"], STREAM_SID);
        mark["mark"]["name"]
            .as_str()
            .expect("a mark has a name")
            .to_owned()
    }

    /// The agent is answering: `response.created`, then 30 deltas of 100 ms for `item_1`; Twilio
    /// confirms the first 1.2 s played. Returns the mark names.
    async fn agent_speaking(&mut self) -> Vec<String> {
        self.agent(json!({"type": "response.created", "response": {"id": "resp_1"}}));
        let payloads: Vec<String> = (0..30).map(|i| audio(i, 800)).collect();
        let marks = self.play("resp_1", "item_1", &payloads).await;
        self.echo_marks(&marks[..12]);
        self.settle().await;
        marks
    }

    /// A 2 s answer whose generation has finished (transcript, audio and response done) while
    /// Twilio has confirmed only its first 500 ms played.
    async fn finished_answer_partly_played(&mut self) {
        self.agent(json!({"type": "response.created", "response": {"id": "resp_1"}}));
        let payloads: Vec<String> = (0..20).map(|i| audio(i, 800)).collect();
        let marks = self.play("resp_1", "item_1", &payloads).await;
        self.agent(agent_said("item_1", TWELVE_WORDS));
        self.agent(audio_done("resp_1", "item_1"));
        self.expect_mark().await;
        self.agent(response_done("resp_1", 1, 1));
        self.echo_marks(&marks[..5]);
        self.settle().await;
    }

    /// Lets `beats` heartbeats pass; each side answers the pings it got if told to. Returns
    /// every message each side received meanwhile.
    async fn heartbeats(
        &mut self,
        beats: u32,
        twilio_answers: bool,
        agent_answers: bool,
    ) -> (Vec<TwilioMessage>, Vec<AgentMessage>) {
        let (mut twilio_seen, mut agent_seen) = (Vec::new(), Vec::new());
        for _ in 0..beats {
            self.advance(BEAT).await;
            let twilio = self.twilio_pending();
            let agent = self.agent_pending();
            if self.is_running() {
                for message in &twilio {
                    if let (true, TwilioMessage::Ping(payload)) = (twilio_answers, message) {
                        self.twilio_frame(AggregatedMessage::Pong(payload.clone()));
                    }
                }
                for message in &agent {
                    if let (true, AgentMessage::Ping(payload)) = (agent_answers, message) {
                        self.agent_frame(AgentMessage::Pong(payload.clone()));
                    }
                }
            }
            twilio_seen.extend(twilio);
            agent_seen.extend(agent);
        }
        (twilio_seen, agent_seen)
    }
}

async fn recv<T>(bridge: &mut Bridge, rx: &mut UnboundedReceiver<T>, peer: &str) -> T {
    match bridge
        .drive(tokio::time::timeout(PATIENCE, rx.next()))
        .await
    {
        Ok(Some(message)) => message,
        Ok(None) => panic!("the bridge closed its {peer} side while a message was expected"),
        Err(_) => panic!("nothing reached {peer} within {PATIENCE:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Messages.

trait TextFrame: Debug {
    fn text(&self) -> Option<&str>;
}

impl TextFrame for TwilioMessage {
    fn text(&self) -> Option<&str> {
        match self {
            TwilioMessage::Text(text) => Some(text),
            _ => None,
        }
    }
}

impl TextFrame for AgentMessage {
    fn text(&self) -> Option<&str> {
        match self {
            AgentMessage::Text(text) => Some(text.as_str()),
            _ => None,
        }
    }
}

fn event_of(message: &impl TextFrame) -> Value {
    let text = message
        .text()
        .unwrap_or_else(|| panic!("expected a JSON text frame, got {message:?}"));
    serde_json::from_str(text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

fn types(messages: &[AgentMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| match m.text() {
            Some(_) => event_of(m)["type"].as_str().unwrap_or("").to_owned(),
            None => format!("{m:?}"),
        })
        .collect()
}

fn times<T>(n: usize, make: impl Fn() -> T) -> Vec<T> {
    (0..n).map(|_| make()).collect()
}

fn twilio_close(code: CloseCode) -> TwilioMessage {
    TwilioMessage::Close(Some(CloseReason {
        code,
        description: None,
    }))
}

/// `bytes` of distinct µ-law, base64 like both APIs carry it; `seed` makes each payload unique.
fn audio(seed: usize, bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes)
        .map(|i| u8::try_from((seed * 37 + i) % 256).expect("below 256"))
        .collect();
    BASE64.encode(raw)
}

fn append(payload: &str) -> Value {
    json!({"type": "input_audio_buffer.append", "audio": payload})
}

fn audio_delta(response_id: &str, item_id: &str, payload: &str) -> Value {
    json!({
        "type": "response.output_audio.delta",
        "event_id": "event_1",
        "response_id": response_id,
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": payload
    })
}

fn audio_done(response_id: &str, item_id: &str) -> Value {
    json!({
        "type": "response.output_audio.done",
        "response_id": response_id,
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0
    })
}

fn response_done(response_id: &str, input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "type": "response.done",
        "response": {
            "id": response_id,
            "status": "completed",
            "usage": {
                "total_tokens": input_tokens + output_tokens,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens
            }
        }
    })
}

fn speech_started() -> Value {
    json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 1000, "item_id": "item_c"})
}

fn truncate(item_id: &str, audio_end_ms: u64) -> Value {
    json!({
        "type": "conversation.item.truncate",
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": audio_end_ms
    })
}

fn openai_error(code: &str) -> Value {
    json!({
        "type": "error",
        "error": {"type": "invalid_request_error", "code": code, "message": "m"}
    })
}

fn caller_said(text: &str) -> Value {
    json!({
        "type": "conversation.item.input_audio_transcription.completed",
        "item_id": "item_c",
        "content_index": 0,
        "transcript": text
    })
}

fn agent_said(item_id: &str, text: &str) -> Value {
    json!({
        "type": "response.output_audio_transcript.done",
        "response_id": "resp_1",
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "transcript": text
    })
}

// ---------------------------------------------------------------------------------------------
// 1. Audio passes through both ways.

#[tokio::test]
async fn audio_passes_through_both_ways_unchanged() {
    let mut h = Harness::new().await;
    h.start().await;
    let caller: Vec<String> = (0..20).map(|i| audio(i, 160)).collect();
    for payload in &caller {
        h.media(payload);
    }

    let update = h.agent_event().await;
    assert_eq!(update["type"], "session.update");
    assert_eq!(update["session"]["type"], "realtime");
    assert_eq!(
        update["session"]["audio"]["input"]["format"]["type"],
        "audio/pcmu"
    );
    assert_eq!(
        update["session"]["audio"]["output"]["format"]["type"],
        "audio/pcmu"
    );
    for payload in &caller {
        assert_eq!(h.agent_event().await, append(payload));
    }
    assert_eq!((h.preconnects(), h.opens()), (1, 1));

    h.agent(json!({"type": "response.created", "response": {"id": "resp_1"}}));
    let agent: Vec<String> = (100..120).map(|i| audio(i, 800)).collect();
    let marks = h.play("resp_1", "item_1", &agent).await;
    let mut unique = marks.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        marks.len(),
        "mark names are unique: {marks:?}"
    );

    h.settle().await;
    assert_eq!(h.twilio_pending(), []);
    assert_eq!(h.agent_pending(), []);
    let m = h.metrics();
    assert_eq!(m.calls_started.get(), 1);
    assert_eq!(m.frames_from_caller.get(), 20);
    assert_eq!(m.frames_to_caller.get(), 20);
    assert_eq!(m.openai_connect.count(), 1);
    assert_eq!(m.first_agent_audio.count(), 1);
    assert_eq!(
        h.state.admission.occupancy().live,
        1,
        "the call holds a slot"
    );
    assert!(h.is_running());
}

// 2. Only the call /voice answered may open a session.

#[tokio::test]
async fn a_stream_that_fails_the_start_check_never_opens_a_session() {
    let cases = [
        (
            "a wrong token",
            ACCOUNT_SID,
            CALL_SID,
            Some("not-the-token"),
        ),
        ("another account", OTHER_ACCOUNT_SID, CALL_SID, None),
        ("another call's token", ACCOUNT_SID, OTHER_CALL_SID, None),
    ];
    for (case, account_sid, call_sid, token) in cases {
        let mut h = Harness::new().await;
        // The transport is ready and waiting when `start` comes, as it usually is.
        h.settle().await;
        assert_eq!(h.preconnects(), 1);
        let token = token.map_or_else(|| h.token.clone(), str::to_owned);
        h.start_as(account_sid, call_sid, &token).await;

        let summary = h.ended().await;
        assert_eq!(summary.end_reason, EndReason::Unauthorized, "{case}");
        assert_eq!(h.opens(), 0, "{case}: the session was opened");
        assert_eq!(
            h.twilio_pending(),
            [twilio_close(CloseCode::Policy)],
            "{case}"
        );
        assert_eq!(h.agent_pending(), [], "{case}");
        let m = h.metrics();
        assert_eq!(m.calls_ended(EndReason::Unauthorized), 1, "{case}");
        assert_eq!(m.calls_started.get(), 0, "{case}");
        assert_eq!(h.state.admission.occupancy().live, 0, "{case}");
    }
}

// 3. Audio that arrives while the session opens is kept, in order.

#[tokio::test]
async fn caller_audio_during_a_slow_open_is_buffered_in_order() {
    let mut h = Harness::with(Options {
        open_delay: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    h.start().await;
    let early: Vec<String> = (0..10).map(|i| audio(i, 160)).collect();
    for payload in &early {
        h.media(payload);
    }
    h.settle().await;
    assert_eq!(
        h.opens(),
        1,
        "the upgrade started once the token checked out"
    );
    assert_eq!(h.agent_pending(), []);
    assert_eq!(h.metrics().frames_buffered_before_agent.get(), 10);

    assert_eq!(h.agent_event().await["type"], "session.update");
    for payload in &early {
        assert_eq!(h.agent_event().await, append(payload));
    }
    let late = audio(50, 160);
    h.media(&late);
    assert_eq!(h.agent_event().await, append(&late));
    let m = h.metrics();
    assert_eq!(m.frames_buffered_before_agent.get(), 10);
    assert_eq!(m.frames_from_caller.get(), 11);
    assert_eq!(m.frames_dropped_buffer_full.get(), 0);
}

#[tokio::test]
async fn the_oldest_buffered_audio_is_dropped_beyond_the_limit() {
    let mut h = Harness::with(Options {
        open_delay: Duration::from_millis(300),
        settings: CallSettings {
            max_buffered_audio: Duration::from_millis(100),
            ..Options::default().settings
        },
        ..Options::default()
    })
    .await;
    h.start().await;
    // Ten 20 ms frames; only the newest 100 ms fit.
    let frames: Vec<String> = (0..10).map(|i| audio(i, 160)).collect();
    for payload in &frames {
        h.media(payload);
    }
    assert_eq!(h.agent_event().await["type"], "session.update");
    for payload in &frames[5..] {
        assert_eq!(h.agent_event().await, append(payload));
    }
    h.settle().await;
    assert_eq!(h.agent_pending(), []);
    assert_eq!(h.metrics().frames_buffered_before_agent.get(), 10);
    assert_eq!(h.metrics().frames_dropped_buffer_full.get(), 5);
}

// 4. The greeting is asked for before any caller audio.

#[tokio::test]
async fn a_greeting_is_requested_before_any_caller_audio() {
    let greeting = "Greet the caller and offer help.";
    let mut h = Harness::with(Options {
        env: vec![("AGENT_GREETING", greeting)],
        open_delay: Duration::from_millis(100),
        ..Options::default()
    })
    .await;
    h.start().await;
    let frames: Vec<String> = (0..3).map(|i| audio(i, 160)).collect();
    for payload in &frames {
        h.media(payload);
    }

    assert_eq!(h.agent_event().await["type"], "session.update");
    assert_eq!(
        h.agent_event().await,
        json!({
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "system",
                "content": [{"type": "input_text", "text": greeting}]
            }
        })
    );
    assert_eq!(h.agent_event().await, json!({"type": "response.create"}));
    for payload in &frames {
        assert_eq!(h.agent_event().await, append(payload));
    }
}

// 5. Barge-in.

#[tokio::test]
async fn barge_in_clears_twilio_and_truncates_at_what_the_caller_heard() {
    let mut h = Harness::new().await;
    h.ready().await;
    let marks = h.agent_speaking().await;

    h.agent(speech_started());
    assert_eq!(
        h.twilio_event().await,
        json!({"event": "clear", "streamSid": STREAM_SID})
    );
    // 12 × 100 ms confirmed played, plus 50 ms the caller probably heard too.
    assert_eq!(h.agent_event().await, truncate("item_1", 1250));

    // Twilio echoes the marks the clear flushed; the interrupted response's tail arrives late.
    h.echo_marks(&marks[12..]);
    for i in 30..33 {
        h.agent(audio_delta("resp_1", "item_1", &audio(i, 800)));
    }
    h.settle().await;
    assert_eq!(h.twilio_pending(), [], "interrupted audio reached Twilio");
    assert_eq!(
        types(&h.agent_pending()),
        Vec::<String>::new(),
        "no response.cancel: the session interrupts by itself"
    );
    let m = h.metrics();
    assert_eq!(m.barge_ins.get(), 1);
    assert_eq!(m.truncates.get(), 1);
    assert_eq!(m.dropped_interrupted_deltas.get(), 3);

    // The next answer plays normally.
    h.agent(json!({"type": "response.created", "response": {"id": "resp_2"}}));
    h.play("resp_2", "item_2", &[audio(40, 800)]).await;

    // The interrupted item's transcript is cut to what was heard.
    let words = TWELVE_WORDS;
    h.agent(agent_said("item_1", words));
    h.settle().await;
    h.stop();
    let summary = h.ended().await;
    let line = &summary.transcript[0];
    assert!(line.truncated, "{line:?}");
    assert!(
        words.starts_with(&line.text) && line.text.len() < words.len(),
        "{line:?}"
    );
}

#[tokio::test]
async fn barge_in_cancels_the_response_when_the_session_does_not() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.agent(json!({
        "type": "session.updated",
        "session": {"audio": {"input": {"turn_detection": {"type": "server_vad", "interrupt_response": false}}}}
    }));
    h.agent_speaking().await;

    h.agent(speech_started());
    assert_eq!(
        h.twilio_event().await,
        json!({"event": "clear", "streamSid": STREAM_SID})
    );
    assert_eq!(h.agent_event().await, json!({"type": "response.cancel"}));
    assert_eq!(h.agent_event().await, truncate("item_1", 1250));
    h.settle().await;
    assert_eq!(h.agent_pending(), []);
}

#[tokio::test]
async fn barge_in_after_generation_finished_still_stops_playback() {
    let mut h = Harness::new().await;
    h.ready().await;
    // Even a session that leaves cancelling to us needs no cancel: nothing is generating.
    h.agent(json!({
        "type": "session.updated",
        "session": {"audio": {"input": {"turn_detection": {"type": "server_vad", "interrupt_response": false}}}}
    }));
    h.finished_answer_partly_played().await;

    h.agent(speech_started());
    assert_eq!(
        h.twilio_event().await,
        json!({"event": "clear", "streamSid": STREAM_SID})
    );
    assert_eq!(h.agent_event().await, truncate("item_1", 550));
    h.settle().await;
    assert_eq!(h.agent_pending(), []);
}

#[tokio::test]
async fn barge_in_after_the_transcript_arrived_still_cuts_the_transcript() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.finished_answer_partly_played().await;
    h.agent(speech_started());
    h.settle().await;
    h.stop();
    let summary = h.ended().await;
    let line = &summary.transcript[0];
    // 550 ms of 2000 ms heard.
    assert!(line.truncated, "{line:?}");
    assert_eq!(line.text, "one two three");
}

// 6. Speech with nothing playing.

#[tokio::test]
async fn speech_while_the_agent_is_silent_interrupts_nothing() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.agent(speech_started());
    h.settle().await;
    assert_eq!(h.twilio_pending(), []);
    assert_eq!(h.agent_pending(), []);

    // An answer that has fully played (its final mark echoed) is not interrupted either.
    h.agent(json!({"type": "response.created", "response": {"id": "resp_1"}}));
    let mut marks = h
        .play("resp_1", "item_1", &[audio(1, 800), audio(2, 800)])
        .await;
    h.agent(audio_done("resp_1", "item_1"));
    marks.push(h.expect_mark().await);
    h.agent(response_done("resp_1", 1, 1));
    h.echo_marks(&marks);
    h.settle().await;

    h.agent(speech_started());
    h.settle().await;
    assert_eq!(h.twilio_pending(), []);
    assert_eq!(h.agent_pending(), []);
    assert_eq!(h.metrics().barge_ins.get(), 0);
}

// 7. Garbage is counted and ignored.

#[tokio::test]
async fn garbage_from_twilio_is_counted_and_ignored() {
    let mut h = Harness::new().await;
    h.media(&audio(1, 160)); // before start
    h.start().await;
    h.twilio_text("this is not JSON");
    h.twilio_frame(AggregatedMessage::Binary(vec![0xff, 0x00].into()));
    h.twilio(json!({"event": "some-future-event", "streamSid": STREAM_SID}));
    h.twilio(start_event(
        ACCOUNT_SID,
        CALL_SID,
        "second-start",
        "inbound",
    ));
    h.twilio(json!({"event": "media", "streamSid": STREAM_SID}));
    h.twilio(
        json!({"event": "dtmf", "streamSid": STREAM_SID, "dtmf": {"track": "inbound_track", "digit": "5"}}),
    );
    let good = audio(2, 160);
    h.media(&good);

    assert_eq!(h.agent_event().await["type"], "session.update");
    assert_eq!(h.agent_event().await, append(&good));
    h.settle().await;
    assert_eq!(h.agent_pending(), [], "only the good frame was forwarded");
    assert!(h.is_running());
    let m = h.metrics();
    // media before start, non-JSON, binary, a second start, media without its body.
    assert_eq!(m.malformed_from_twilio.get(), 5);
    assert_eq!(m.frames_from_caller.get(), 1);
    assert_eq!(m.calls_started.get(), 1);
}

#[tokio::test]
async fn garbage_from_openai_is_counted_and_ignored() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.agent_frame(AgentMessage::text("this is not JSON"));
    h.agent_frame(AgentMessage::Binary(vec![1, 2, 3].into()));
    h.agent(json!({"type": "rate_limits.updated", "rate_limits": []}));
    h.agent(json!({"type": "response.output_audio.delta", "item_id": "item_1", "delta": "AAAA"}));
    h.agent(json!({"type": "error"}));
    let payload = audio(1, 800);
    h.play("resp_1", "item_1", std::slice::from_ref(&payload))
        .await;

    let caller = audio(2, 160);
    h.media(&caller);
    assert_eq!(h.agent_event().await, append(&caller));
    assert!(h.is_running());
    let m = h.metrics();
    // non-JSON, binary, a delta without its response_id, an error without its body.
    assert_eq!(m.malformed_from_openai.get(), 4);
    assert_eq!(m.malformed_from_twilio.get(), 0);
}

// 8. How calls end.

#[tokio::test]
async fn twilio_stop_closes_the_openai_session() {
    let mut h = Harness::new().await;
    h.ready().await;
    assert_eq!(h.state.admission.occupancy().live, 1);
    h.stop();
    assert_eq!(h.agent_says().await, AgentMessage::Close(None));
    let summary = h.ended().await;
    assert_eq!(summary.end_reason, EndReason::CallerHungUp);
    assert_eq!(h.metrics().calls_ended(EndReason::CallerHungUp), 1);
    assert_eq!(h.state.admission.occupancy().live, 0, "the slot is back");
    assert_eq!(
        h.control.hang_ups(),
        [] as [String; 0],
        "Twilio ended the call"
    );
}

#[tokio::test]
async fn a_failed_agent_is_hung_up_after_the_apology_and_holds_its_slot_until_then() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.agent_vanishes();
    // Three attempts at a new session (at once, 0.5 s and 2 s later) are refused first.
    h.advance(Duration::from_secs(3)).await;
    assert_eq!(
        h.dials.opens.load(Ordering::SeqCst),
        4,
        "the first and three more"
    );
    assert_eq!(h.twilio_pending(), [twilio_close(CloseCode::Error)]);
    assert_eq!(
        h.control.hang_ups(),
        [] as [String; 0],
        "the apology plays first"
    );
    assert_eq!(h.state.admission.occupancy().live, 1);
    h.advance(CallSettings::default().ending.apology_grace)
        .await;
    assert_eq!(h.control.hang_ups(), [CALL_SID]);
    assert_eq!(h.ended().await.end_reason, EndReason::AgentFailed);
    assert_eq!(h.state.admission.occupancy().live, 0);
}

#[tokio::test]
async fn a_failing_hang_up_is_retried() {
    let mut h = Harness::with(Options {
        control: RecordingControl {
            failures: AtomicUsize::new(2),
            ..RecordingControl::default()
        },
        ..Options::default()
    })
    .await;
    h.ready().await;
    h.agent(openai_error("invalid_api_key"));
    assert_eq!(h.ended().await.end_reason, EndReason::AgentFailed);
    assert_eq!(h.control.hang_ups(), [CALL_SID, CALL_SID, CALL_SID]);
}

#[tokio::test]
async fn a_refused_stream_is_never_hung_up() {
    let mut h = Harness::new().await;
    h.start_as(OTHER_ACCOUNT_SID, CALL_SID, &h.token.clone())
        .await;
    assert_eq!(h.ended().await.end_reason, EndReason::Unauthorized);
    h.advance(CallSettings::default().ending.apology_grace * 2)
        .await;
    assert_eq!(h.control.hang_ups(), [] as [String; 0]);
}

#[tokio::test]
async fn twilio_closing_its_socket_is_a_hang_up() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.twilio_frame(AggregatedMessage::Close(None));
    assert_eq!(h.agent_says().await, AgentMessage::Close(None));
    assert_eq!(h.ended().await.end_reason, EndReason::CallerHungUp);
}

#[tokio::test]
async fn the_openai_socket_ending_closes_twilio_with_an_error() {
    for close_frame in [false, true] {
        let mut h = Harness::new().await;
        h.ready().await;
        if close_frame {
            h.agent_frame(AgentMessage::Close(None));
        } else {
            h.agent_vanishes();
        }
        let summary = h.ended().await;
        assert_eq!(summary.end_reason, EndReason::AgentFailed, "{close_frame}");
        assert_eq!(h.twilio_pending(), [twilio_close(CloseCode::Error)]);
        assert_eq!(h.metrics().calls_ended(EndReason::AgentFailed), 1);
    }
}

#[tokio::test]
async fn a_fatal_openai_error_ends_the_call() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.agent(openai_error("invalid_api_key"));
    assert_eq!(h.ended().await.end_reason, EndReason::AgentFailed);
    assert_eq!(h.twilio_pending(), [twilio_close(CloseCode::Error)]);
    assert_eq!(h.metrics().openai_errors.get(), 1);
}

#[tokio::test]
async fn a_benign_openai_error_does_not_end_the_call() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.agent(openai_error("response_cancel_not_active"));
    h.settle().await;
    let payload = audio(1, 160);
    h.media(&payload);
    assert_eq!(h.agent_event().await, append(&payload));
    assert!(h.is_running());
    assert_eq!(h.metrics().openai_errors.get(), 1);
}

#[tokio::test]
async fn an_unreachable_agent_closes_twilio_so_the_apology_plays() {
    for failure in [DialFailure::Preconnect, DialFailure::Open] {
        let mut h = Harness::with(Options {
            failure,
            ..Options::default()
        })
        .await;
        // A failing transport has failed by the time `start` comes.
        h.settle().await;
        assert_eq!(h.preconnects(), 1);
        h.start().await;
        assert_eq!(h.ended().await.end_reason, EndReason::AgentUnreachable);
        assert_eq!(h.twilio_pending(), [twilio_close(CloseCode::Error)]);
        assert_eq!(h.metrics().calls_started.get(), 1);
    }
}

#[tokio::test]
async fn an_oversized_twilio_frame_is_closed_once_with_size() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.twilio_in
        .unbounded_send(Err(ProtocolError::Overflow))
        .unwrap();
    assert_eq!(h.ended().await.end_reason, EndReason::FrameTooLarge);
    assert_eq!(h.metrics().malformed_from_twilio.get(), 1);
    assert_eq!(h.twilio_pending(), [twilio_close(CloseCode::Size)]);
}

// 9. Heartbeat.

#[tokio::test]
async fn a_silent_twilio_times_out() {
    let mut h = Harness::with(heartbeat_options()).await;
    h.ready().await;
    let (twilio, agent) = h.heartbeats(6, false, true).await;
    // Pings at 1 and 2 s; at 3 s Twilio has been silent for longer than 2.5 s.
    assert_eq!(h.ended().await.end_reason, EndReason::Timeout);
    let mut expected = times(2, || TwilioMessage::Ping(Default::default()));
    expected.push(twilio_close(CloseCode::Error));
    assert_eq!(twilio, expected);
    let mut expected = times(2, || AgentMessage::Ping(Default::default()));
    expected.push(AgentMessage::Close(None));
    assert_eq!(agent, expected);
    assert_eq!(h.metrics().calls_ended(EndReason::Timeout), 1);
}

#[tokio::test]
async fn a_silent_openai_times_out() {
    let mut h = Harness::with(heartbeat_options()).await;
    h.ready().await;
    let (twilio, agent) = h.heartbeats(6, true, false).await;
    assert_eq!(h.ended().await.end_reason, EndReason::Timeout);
    assert_eq!(twilio.last(), Some(&twilio_close(CloseCode::Error)));
    assert_eq!(agent.last(), Some(&AgentMessage::Close(None)));
}

#[tokio::test]
async fn answered_heartbeats_keep_a_quiet_call_up() {
    let mut h = Harness::with(heartbeat_options()).await;
    h.ready().await;
    let (twilio, agent) = h.heartbeats(10, true, true).await;
    assert!(h.is_running());
    assert_eq!(
        twilio,
        times(10, || TwilioMessage::Ping(Default::default()))
    );
    assert_eq!(agent, times(10, || AgentMessage::Ping(Default::default())));
}

#[tokio::test]
async fn a_stream_that_never_starts_times_out_at_the_first_beat() {
    let mut h = Harness::with(heartbeat_options()).await;
    h.twilio(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}));
    h.advance(BEAT).await;
    assert!(!h.is_running());
    assert_eq!(h.ended().await.end_reason, EndReason::Timeout);
    assert_eq!(h.opens(), 0);
    assert_eq!(h.twilio_pending(), [twilio_close(CloseCode::Error)]);
}

#[tokio::test]
async fn twilio_pings_are_answered() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.twilio_frame(AggregatedMessage::Ping(b"are-you-there".to_vec().into()));
    assert_eq!(
        h.twilio_says().await,
        TwilioMessage::Pong(b"are-you-there".to_vec().into())
    );
}

// 10. Drain.

#[tokio::test]
async fn closing_for_shutdown_hangs_up_before_closing_the_stream() {
    let mut h = Harness::with(Options {
        control: RecordingControl {
            delay: Duration::from_secs(1),
            ..RecordingControl::default()
        },
        ..Options::default()
    })
    .await;
    h.ready().await;
    h.close.cancel();
    h.settle().await;
    // Twilio is ending the call: the stream stays open, so no apology starts.
    assert_eq!(h.control.hang_ups(), [CALL_SID]);
    assert_eq!(h.twilio_pending(), [] as [TwilioMessage; 0]);
    assert_eq!(h.agent_pending(), [AgentMessage::Close(None)]);
    assert_eq!(h.ended().await.end_reason, EndReason::Shutdown);
    assert_eq!(h.twilio_pending(), [twilio_close(CloseCode::Restart)]);
    assert_eq!(h.metrics().calls_ended(EndReason::Shutdown), 1);
}

#[tokio::test]
async fn a_drain_does_not_wait_for_twilio_forever() {
    let mut h = Harness::with(Options {
        control: RecordingControl {
            delay: Duration::from_secs(3600),
            ..RecordingControl::default()
        },
        ..Options::default()
    })
    .await;
    h.ready().await;
    h.close.cancel();
    assert_eq!(h.ended().await.end_reason, EndReason::Shutdown);
    assert_eq!(h.twilio_pending(), [twilio_close(CloseCode::Restart)]);
}

// 11. The summary.

#[tokio::test]
async fn the_summary_has_the_transcript_in_order_with_speakers() {
    let mut h = Harness::new().await;
    h.ready().await;
    h.agent(json!({"type": "session.created", "session": {"id": "sess_1", "type": "realtime"}}));
    h.agent(caller_said("Hi, is this the pharmacy?"));
    h.advance(Duration::from_secs(2)).await;
    h.agent(agent_said("item_1", "Yes. How can I help?"));
    h.agent(response_done("resp_1", 10, 20));
    h.advance(Duration::from_secs(2)).await;
    h.agent(caller_said("  I need a refill.  "));
    h.agent(caller_said("   "));
    h.agent(response_done("resp_2", 5, 7));
    h.settle().await;
    h.stop();

    let summary = h.ended().await;
    assert_eq!(summary.end_reason, EndReason::CallerHungUp);
    let lines: Vec<_> = summary
        .transcript
        .iter()
        .map(|l| (l.sequence, l.speaker, l.text.as_str(), l.truncated))
        .collect();
    assert_eq!(
        lines,
        [
            (1, Speaker::Caller, "Hi, is this the pharmacy?", false),
            (2, Speaker::Agent, "Yes. How can I help?", false),
            (3, Speaker::Caller, "I need a refill.", false),
        ]
    );
    let offsets: Vec<u64> = summary.transcript.iter().map(|l| l.offset_ms).collect();
    assert!(
        offsets[0] < 2000 && offsets[1] >= 2000 && offsets[2] >= 4000,
        "{offsets:?}"
    );
    assert_eq!(
        summary.call_sid.as_ref().map(CallSid::as_str),
        Some(CALL_SID)
    );
    assert_eq!(
        summary.stream_sid.as_ref().map(StreamSid::as_str),
        Some(STREAM_SID)
    );
    assert_eq!(summary.openai_session_id.as_deref(), Some("sess_1"));
    assert_eq!(
        (
            summary.usage.input_tokens,
            summary.usage.output_tokens,
            summary.usage.total_tokens
        ),
        (15, 27, 42)
    );
    assert!(summary.duration >= Duration::from_secs(4));
}
