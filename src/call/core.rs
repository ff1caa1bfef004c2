//! The call core: one call's logic as a plain state machine, with no sockets, no runtime and no
//! clock of its own.
//!
//! The driver feeds it [`Input`]s (a frame from either leg, a dial's outcome, a side task's
//! result, the timer, a shutdown), each with the current time, and carries out the [`Action`]s
//! it queues (send this to the caller, send this to the agent, dial, record, start side work,
//! end the call this way). Because the core never waits, nothing slow can stall the audio: work
//! that takes time is asked for as a [`SideTask`] and its result comes back as an input.
//!
//! The hot path stays borrowed: a caller frame is parsed in place and its base64 payload is
//! copied once, into the outgoing `input_audio_buffer.append`; an agent delta likewise into the
//! outgoing Twilio `media` frame and its mark.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::StreamGrant;
use crate::agents::{AgentProfile, Agents};
use crate::call::agent::{OutboundBrief, Parties};
use crate::call::ending::{EndPlan, EndingTimes};
use crate::call::latency::Latencies;
use crate::call::leg::MediaLeg;
use crate::call::link::{AgentLink, MediaLink};
use crate::call::playback::{BYTES_PER_MS, LineCorrection, Playback, base64_decoded_len};
use crate::call::speaking::Speaking;
use crate::call::tools::ToolLedger;
use crate::call::transcript::{Speaker, TranscriptLine};
use crate::domain::phone::Masked;
use crate::metrics::{EndReason, Metrics};
use crate::openai::events::{self, ErrorSeverity, ServerEvent, Usage};
use crate::openai::pricing;
use crate::store::models::TokenUsage;
use crate::store::{CallTotals, Record};
use crate::twilio::call::Direction;
use crate::twilio::ids::{AccountSid, CallSid, StreamSid};
use crate::twilio::media::{Inbound, Start};

/// Log the first few malformed messages of a call in full; after that only count them, so a
/// misbehaving peer cannot flood the logs.
const MALFORMED_LOG_LIMIT: u32 = 5;

/// Timing of one call; tests shorten these.
#[derive(Clone, Debug)]
pub struct CallSettings {
    /// How often both peers are pinged.
    pub heartbeat_interval: Duration,
    /// A peer silent for this long (no frame, no pong) is considered gone.
    pub peer_timeout: Duration,
    /// How long Twilio has to send `start` once the socket is open.
    pub start_timeout: Duration,
    /// Caller audio kept while the OpenAI session opens; older audio is dropped beyond it.
    pub max_buffered_audio: Duration,
    /// How long each step of ending the call may take.
    pub ending: EndingTimes,
    /// Before `end_call` or a transfer, how long the caller may still be hearing what was said.
    pub playback_wait: Duration,
    /// How long a goodbye (time limit, silence) may take before the call ends anyway.
    pub farewell_limit: Duration,
    /// After Twilio accepted a transfer, how long its stream may linger before it is closed.
    pub transfer_linger: Duration,
    /// `SESSION_ROLLOVER_SECS`: a session this old is replaced by a fresh one at the next quiet
    /// moment, before OpenAI's cap on a session's age cuts it.
    pub session_rollover: Duration,
}

impl Default for CallSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            peer_timeout: Duration::from_secs(20),
            start_timeout: Duration::from_secs(5),
            max_buffered_audio: Duration::from_secs(10),
            ending: EndingTimes::default(),
            playback_wait: Duration::from_secs(10),
            farewell_limit: Duration::from_secs(15),
            transfer_linger: Duration::from_secs(10),
            session_rollover: Duration::from_secs(3300),
        }
    }
}

/// Everything the core needs to know when the socket opens.
pub struct CallSetup {
    pub grant: StreamGrant,
    /// Our Twilio account: a `start` naming another one is refused.
    pub account_sid: AccountSid,
    /// The agents as they were when the socket opened; the call picks its own at `start`.
    pub agents: Arc<Agents>,
    pub settings: CallSettings,
    pub metrics: Arc<Metrics>,
    /// When the socket was accepted, on the monotonic clock and on the wall clock (records
    /// carry wall-clock milliseconds; the core derives them from monotonic time).
    pub accepted_at: Instant,
    pub accepted_at_ms: i64,
}

/// Identifies one piece of side work, so its result finds its way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TaskId(pub u64);

/// Work that must not block the audio: the driver runs it beside the call and reports back
/// with [`Input::TaskDone`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SideTask {
    /// What `POST /calls` said about this call (context, variables), if it placed it.
    LookupCallContext { call_sid: CallSid },
    /// A signed request to the business (a tool call, the call's context).
    AskBusiness {
        url: String,
        body: String,
        timeout: Duration,
    },
    /// Replace what the call does with this TwiML (a transfer), through Twilio's REST API.
    Redirect { call_sid: CallSid, twiml: String },
}

/// The result of a [`SideTask`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskOutput {
    CallContext(Result<Option<OutboundBrief>, String>),
    Business(BusinessOutcome),
    Redirected(Result<(), String>),
}

/// How a request to the business ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusinessOutcome {
    Answered { status: u16, body: Vec<u8> },
    TimedOut,
    Unreachable(String),
}

/// One thing that happened, fed to [`CallCore::handle`].
#[derive(Debug)]
pub enum Input<'a> {
    /// A text frame from the media leg.
    MediaText(&'a str),
    /// A binary frame from the media leg (Media Streams never sends one).
    MediaBinary,
    /// A WebSocket ping from the media leg, to be answered with its payload.
    MediaPing(Vec<u8>),
    /// A WebSocket pong (or any other sign of life) from the media leg.
    MediaAlive,
    /// The media leg closed its socket, or the stream ended.
    MediaClosed,
    /// The media leg sent a frame over the size limit.
    MediaOverflow,
    /// The media leg sent a text frame that is not UTF-8.
    MediaInvalidText,
    /// The media leg's socket broke at the protocol level.
    MediaBroken(String),
    /// Writing to the media leg failed: it is gone.
    MediaSendFailed,

    /// The agent's transport (TCP, TLS) is ready; no credentials were sent yet.
    AgentTransportReady,
    AgentTransportFailed(String),
    /// The authenticated upgrade succeeded: a session exists.
    AgentOpened,
    AgentOpenFailed(String),
    /// A text frame from the agent.
    AgentText(&'a str),
    /// A binary frame from the agent (Realtime never sends one).
    AgentBinary,
    /// A ping, pong or other control frame from the agent.
    AgentAlive,
    /// The agent closed its socket.
    AgentClosed(String),
    /// The agent's socket broke.
    AgentBroken(String),
    /// Writing to the agent failed.
    AgentSendFailed,

    /// The successor session a rollover asked for is open.
    StandbyOpened,
    /// A text frame from the successor session, before it took over.
    StandbyText(&'a str),
    /// The successor session could not be opened, or its socket failed before it took over
    /// (the driver has dropped it).
    StandbyFailed(String),

    /// Side work finished.
    TaskDone(TaskId, TaskOutput),
    /// The time given by [`CallCore::poll_timeout`] has come.
    Timer,
    /// The process is shutting down: end the call politely.
    Shutdown,
}

/// One thing the driver must do, taken from [`CallCore::poll_action`] in order.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Send this text frame to the media leg.
    ToMedia(String),
    PingMedia,
    PongMedia(Vec<u8>),
    /// Send this client event to the agent.
    ToAgent(String),
    PingAgent,
    /// Prepare the agent's transport (no credentials yet).
    PreconnectAgent,
    /// Close the agent's session (it was lost, or is being replaced); a new one may follow.
    CloseAgent,
    /// Open the authenticated agent session with this model, over the prepared transport.
    OpenAgent {
        model: String,
    },
    /// Dial a successor session with this model beside the one in use (transport and upgrade
    /// in one go), and report [`Input::StandbyOpened`] or [`Input::StandbyFailed`].
    DialStandby {
        model: String,
    },
    /// Send this client event to the successor session.
    ToStandby(String),
    /// Close the session in use and make the successor the agent's socket: every later
    /// [`Action::ToAgent`] goes to it, and its frames arrive as agent input.
    PromoteStandby,
    /// Close the successor session, if any, without using it.
    CloseStandby,
    /// Hand this record to the writer; it may be dropped if the writer is hopelessly behind.
    Record(Record),
    /// Hand this record to the writer, waiting for room rather than losing it: transcript
    /// lines, and the call's start and end (the business's events are written with them).
    RecordDurably(Record),
    /// Run this side work and report back.
    Spawn(TaskId, SideTask),
    /// The call is over: close both legs as the plan says. Always the last action.
    End(EndPlan),
}

/// What is known about a call when it ends.
#[derive(Debug)]
pub struct CallSummary {
    pub call_sid: Option<CallSid>,
    pub stream_sid: Option<StreamSid>,
    pub end_reason: EndReason,
    pub openai_session_id: Option<String>,
    pub usage: Usage,
    pub transcript: Vec<TranscriptLine>,
    pub duration: Duration,
}

/// Caller audio that arrived before the agent was ready, oldest first, bounded by duration.
#[derive(Debug, Default)]
struct EarlyAudio {
    frames: VecDeque<String>,
    bytes: u64,
}

pub struct CallCore<L: MediaLeg> {
    leg: L,
    grant: StreamGrant,
    account_sid: AccountSid,
    agents: Arc<Agents>,
    /// The default agent until `start` names the call's own.
    agent: Arc<AgentProfile>,
    parties: Parties,
    /// The agent's instructions as this call filled them (placeholders, the business's
    /// additions), once the session is configured.
    instructions: String,
    settings: CallSettings,
    metrics: Arc<Metrics>,
    accepted_at: Instant,
    accepted_at_ms: i64,

    media: MediaLink,
    link: AgentLink,
    briefing: briefing::Briefing,
    ended: Option<(EndReason, Instant)>,

    media_seen: Instant,
    agent_seen: Instant,
    next_heartbeat: Instant,

    playback: Playback,
    early_audio: EarlyAudio,
    /// Whether the session cancels responses itself on speech (`interrupt_response`).
    session_auto_interrupts: bool,
    first_audio_sent: bool,
    session_id: Option<String>,
    usage: Usage,
    latencies: Latencies,
    transcript: Vec<TranscriptLine>,
    malformed: u32,
    next_task: u64,
    actions: VecDeque<Action>,

    tools: ToolLedger,
    /// Requests to the business for function calls, by the task running each.
    tool_requests: HashMap<TaskId, acting::ToolRequest>,
    wrap_up: Option<acting::WrapUp>,
    transfer: acting::Transfer,
    max_duration_at: Option<Instant>,
    silence: acting::Silence,
    keypad: acting::Keypad,
    /// The system messages the session was briefed with, for a session that replaces it.
    system_messages: Vec<String>,
    reconnect: Option<survival::Reconnect>,
    /// When the session in use became ready, for its rollover.
    session_ready_at: Option<Instant>,
    /// The successor a rollover prepares.
    standby: survival::Standby,
    /// Since when the caller's finished turn waits for the session's answer to start.
    answer_awaited_since: Option<Instant>,
}

impl<L: MediaLeg> CallCore<L> {
    /// A call whose socket was just accepted. Its first action prepares the agent's transport,
    /// in parallel with waiting for Twilio's `start`.
    pub fn new(leg: L, setup: CallSetup) -> Self {
        let at = setup.accepted_at;
        let mut actions = VecDeque::with_capacity(8);
        actions.push_back(Action::PreconnectAgent);
        let agent = Arc::clone(setup.agents.default_agent());
        Self {
            leg,
            grant: setup.grant,
            account_sid: setup.account_sid,
            agents: setup.agents,
            agent,
            parties: Parties::default(),
            instructions: String::new(),
            next_heartbeat: at + setup.settings.heartbeat_interval,
            settings: setup.settings,
            metrics: setup.metrics,
            accepted_at: at,
            accepted_at_ms: setup.accepted_at_ms,
            media: MediaLink::AwaitingStart,
            link: AgentLink::Preconnecting,
            briefing: briefing::Briefing::default(),
            ended: None,
            media_seen: at,
            agent_seen: at,
            playback: Playback::default(),
            early_audio: EarlyAudio::default(),
            session_auto_interrupts: true,
            first_audio_sent: false,
            session_id: None,
            usage: Usage::default(),
            latencies: Latencies::default(),
            transcript: Vec::new(),
            malformed: 0,
            next_task: 0,
            actions,
            tools: ToolLedger::default(),
            tool_requests: HashMap::new(),
            wrap_up: None,
            transfer: acting::Transfer::None,
            max_duration_at: None,
            silence: acting::Silence::default(),
            keypad: acting::Keypad::default(),
            system_messages: Vec::new(),
            reconnect: None,
            session_ready_at: None,
            standby: survival::Standby::Idle,
            answer_awaited_since: None,
        }
    }

    /// The next thing to do, in order; `None` once the queue is empty.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the core next wants [`Input::Timer`], if ever. Every deadline here is one the timer
    /// acts on when it comes, so the driver never wakes for nothing.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended.is_some() {
            return None;
        }
        let start_deadline = matches!(self.media, MediaLink::AwaitingStart)
            .then(|| self.accepted_at + self.settings.start_timeout);
        [
            Some(self.next_heartbeat),
            start_deadline,
            self.briefing.deadline(),
            self.acting_deadline(),
            self.reconnect_deadline(),
            self.rollover_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn is_ended(&self) -> bool {
        self.ended.is_some()
    }

    pub fn agent_link(&self) -> &AgentLink {
        &self.link
    }

    pub fn media_link(&self) -> &MediaLink {
        &self.media
    }

    /// Who is making sound now: the caller between `speech_started` and `speech_stopped`, the
    /// agent while Twilio holds audio of it that has not played.
    pub fn speaking(&self) -> Speaking {
        Speaking {
            caller: self.tools.is_caller_speaking(),
            agent: self.playback.has_unplayed_audio(),
        }
    }

    pub fn handle(&mut self, input: Input<'_>, now: Instant) {
        if self.ended.is_some() {
            // Late results (a side task, a frame already in flight) have nothing left to act on.
            return;
        }
        match input {
            Input::MediaText(text) => {
                self.media_seen = now;
                self.on_media_text(text, now);
            }
            Input::MediaBinary => {
                self.media_seen = now;
                self.malformed_from_media("a binary frame (Media Streams only sends text)");
            }
            Input::MediaPing(payload) => {
                self.media_seen = now;
                self.actions.push_back(Action::PongMedia(payload));
            }
            Input::MediaAlive => self.media_seen = now,
            // A closed socket and one that refuses writes both mean the caller is gone (or,
            // after a transfer, moved on).
            Input::MediaClosed | Input::MediaSendFailed => self.end(self.media_end_reason(), now),
            Input::MediaOverflow => {
                self.malformed_from_media("a frame over 64 KiB");
                self.end(EndReason::FrameTooLarge, now);
            }
            Input::MediaInvalidText => {
                self.malformed_from_media("a text frame that is not UTF-8");
                self.end(EndReason::InvalidText, now);
            }
            Input::MediaBroken(error) => {
                tracing::warn!(%error, "the Twilio socket broke");
                self.end(EndReason::ProtocolError, now);
            }

            Input::AgentTransportReady => self.on_transport_ready(),
            Input::AgentTransportFailed(error) => self.on_transport_failed(&error, now),
            Input::AgentOpened => self.on_agent_opened(now),
            Input::AgentOpenFailed(error) => {
                tracing::error!(%error, "cannot open the OpenAI Realtime session");
                // A session that replaces a lost one failing is the call's agent failing.
                let reason = if self.is_reconnecting() {
                    EndReason::AgentFailed
                } else {
                    EndReason::AgentUnreachable
                };
                if !self.agent_lost(&error, now) {
                    self.link = AgentLink::Failed;
                    self.end(reason, now);
                }
            }
            Input::AgentText(text) => {
                self.agent_seen = now;
                self.on_agent_text(text, now);
            }
            Input::AgentBinary => {
                self.agent_seen = now;
                self.malformed_from_agent("a binary frame (Realtime only sends text)");
            }
            Input::AgentAlive => self.agent_seen = now,
            Input::AgentClosed(detail) => {
                tracing::warn!(close = %detail, "OpenAI closed the session");
                self.session_gone(&detail, now);
            }
            Input::AgentBroken(error) => {
                tracing::warn!(%error, "the OpenAI socket broke");
                self.session_gone(&error, now);
            }
            Input::AgentSendFailed => {
                tracing::warn!("the OpenAI socket refused a frame");
                self.session_gone("a frame was refused", now);
            }
            Input::StandbyOpened => self.on_standby_opened(),
            Input::StandbyText(text) => self.on_standby_text(text, now),
            Input::StandbyFailed(error) => {
                tracing::warn!(%error, "the successor OpenAI session failed");
                self.standby_failed(now);
            }

            Input::TaskDone(id, output) => self.on_task_done(id, output, now),
            Input::Timer => self.on_timer(now),
            Input::Shutdown => self.end(EndReason::Shutdown, now),
        }
        if self.ended.is_none() {
            self.after_input(now);
        }
    }

    /// What is known about the call; complete once it has ended.
    pub fn summary(&mut self) -> CallSummary {
        let (reason, ended_at) = self
            .ended
            .unwrap_or((EndReason::CallerHungUp, self.accepted_at));
        let (call_sid, stream_sid, duration) = match &self.media {
            MediaLink::Streaming {
                call_sid,
                stream_sid,
                started_at,
            } => (
                Some(call_sid.clone()),
                Some(stream_sid.clone()),
                ended_at.saturating_duration_since(*started_at),
            ),
            MediaLink::AwaitingStart => (None, None, Duration::ZERO),
        };
        CallSummary {
            call_sid,
            stream_sid,
            end_reason: reason,
            openai_session_id: self.session_id.clone(),
            usage: self.usage,
            transcript: std::mem::take(&mut self.transcript),
            duration,
        }
    }

    // --- The media leg.

    fn on_media_text(&mut self, text: &str, now: Instant) {
        let message = match self.leg.parse(text) {
            Ok(message) => message,
            Err(error) => {
                self.malformed_from_media(&error.to_string());
                return;
            }
        };
        match message {
            Inbound::Media { payload } => {
                if !matches!(self.media, MediaLink::Streaming { .. }) {
                    self.malformed_from_media("media before start");
                    return;
                }
                self.metrics.frames_from_caller.inc();
                if matches!(self.link, AgentLink::Ready) {
                    self.actions
                        .push_back(Action::ToAgent(events::append_audio(&payload)));
                } else {
                    self.hold_early_audio(payload.into_owned());
                }
            }
            Inbound::Mark { name } => {
                let echo = self.playback.on_mark(&name);
                tracing::trace!(mark = %name, ?echo, "mark echoed");
            }
            Inbound::Start(start) => self.on_start(start, now),
            Inbound::Stop => {
                tracing::info!("Twilio stopped the stream");
                self.end(self.media_end_reason(), now);
            }
            Inbound::Connected => {}
            Inbound::Dtmf { digit } => self.on_keypress(&digit, now),
            Inbound::Other(event) => tracing::debug!(%event, "ignored a Media Streams event"),
        }
    }

    /// Checks the stream belongs to the call its upgrade was authorised for: our account, the
    /// same token and the same CallSid. Until this passes nothing reaches OpenAI.
    fn on_start(&mut self, start: Start, now: Instant) {
        if !matches!(self.media, MediaLink::AwaitingStart) {
            self.malformed_from_media("a second start");
            return;
        }
        tracing::Span::current().record("stream_sid", start.stream_sid.as_str());
        let parameter = |name: &str| start.custom_parameters.get(name).map_or("", String::as_str);
        let refusal = if start.account_sid != self.account_sid {
            Err("start names another Twilio account".to_owned())
        } else {
            self.grant
                .check_start(parameter("token"), &start.call_sid)
                .map_err(|mismatch| mismatch.to_string())
        };
        if let Err(refusal) = refusal {
            tracing::warn!(%refusal, "refused a stream");
            self.end(EndReason::Unauthorized, now);
            return;
        }
        tracing::info!(
            from = %Masked(parameter("from")),
            to = %Masked(parameter("to")),
            direction = parameter("direction"),
            "media stream started"
        );
        self.leg.started(start.stream_sid.as_str());
        self.metrics.calls_started.inc();
        // `/voice` names the agent it routed the call to; a name a reload removed since falls
        // back to routing by the number called.
        self.agent = Arc::clone(
            self.agents
                .by_name(parameter("agent"))
                .unwrap_or_else(|| self.agents.for_number(parameter("to"))),
        );
        tracing::Span::current().record("agent", self.agent.name.as_str());
        let direction = parameter("direction").parse().ok();
        self.parties = Parties::from_stream(parameter("from"), parameter("to"), direction);
        self.max_duration_at = self.agent.max_call_duration.map(|limit| now + limit);
        self.actions
            .push_back(Action::RecordDurably(Record::StreamStarted {
                call_sid: start.call_sid.to_string(),
                stream_sid: start.stream_sid.to_string(),
                agent: self.agent.name.clone(),
                at_ms: self.wall_ms(now),
            }));
        self.media = MediaLink::Streaming {
            call_sid: start.call_sid,
            stream_sid: start.stream_sid,
            started_at: now,
        };
        // Only `POST /calls` stores a context, so only the calls it placed look one up.
        self.start_briefing(direction == Some(Direction::OutboundApi), now);
        self.record_event("stream", "started", None, now);
        match self.link {
            AgentLink::Preconnecting => self.link = AgentLink::Authorised,
            AgentLink::Preconnected => self.open_agent(),
            AgentLink::Failed => {
                // The transport failed before `start` arrived.
                self.end(EndReason::AgentUnreachable, now);
            }
            AgentLink::Authorised
            | AgentLink::Opening
            | AgentLink::AwaitingContext
            | AgentLink::Ready
            | AgentLink::Closed => {}
        }
    }

    fn hold_early_audio(&mut self, payload: String) {
        self.metrics.frames_buffered_before_agent.inc();
        let early = &mut self.early_audio;
        early.bytes += base64_decoded_len(&payload);
        early.frames.push_back(payload);
        let limit = u64::try_from(self.settings.max_buffered_audio.as_millis()).unwrap_or(u64::MAX)
            * BYTES_PER_MS;
        while early.bytes > limit {
            let Some(oldest) = early.frames.pop_front() else {
                break;
            };
            early.bytes -= base64_decoded_len(&oldest);
            self.metrics.frames_dropped_buffer_full.inc();
        }
    }

    // --- The agent link.

    fn on_transport_ready(&mut self) {
        match self.link {
            AgentLink::Preconnecting => self.link = AgentLink::Preconnected,
            AgentLink::Authorised => self.open_agent(),
            _ => {}
        }
    }

    /// The session's socket is gone: a new session takes over if it can, else the call ends.
    fn session_gone(&mut self, why: &str, now: Instant) {
        if !self.agent_lost(why, now) {
            self.link = AgentLink::Closed;
            self.end(EndReason::AgentFailed, now);
        }
    }

    fn on_transport_failed(&mut self, error: &str, now: Instant) {
        tracing::error!(%error, "cannot reach the OpenAI Realtime server");
        if self.is_reconnecting() {
            if !self.agent_lost(error, now) {
                self.end(EndReason::AgentFailed, now);
            }
            return;
        }
        let authorised = matches!(self.link, AgentLink::Authorised);
        self.link = AgentLink::Failed;
        if authorised {
            self.end(EndReason::AgentUnreachable, now);
        }
    }

    fn open_agent(&mut self) {
        self.link = AgentLink::Opening;
        self.actions.push_back(Action::OpenAgent {
            model: self.agent.model.clone(),
        });
    }

    fn on_agent_opened(&mut self, now: Instant) {
        if !matches!(self.link, AgentLink::Opening) {
            return;
        }
        if let MediaLink::Streaming { started_at, .. } = &self.media {
            let after = now.saturating_duration_since(*started_at);
            if !self.is_reconnecting() {
                self.metrics.openai_connect.observe(after);
            }
            self.latencies.session_opened(after);
        }
        self.agent_seen = now;
        self.link = AgentLink::AwaitingContext;
        self.configure_agent_when_ready(now);
    }

    fn on_task_done(&mut self, id: TaskId, output: TaskOutput, now: Instant) {
        match output {
            TaskOutput::CallContext(result) => self.on_outbound_brief(id, result, now),
            TaskOutput::Business(outcome) => {
                if let Some(request) = self.tool_requests.remove(&id) {
                    self.on_tool_answer(request, outcome, now);
                } else {
                    self.on_context_answer(id, outcome, now);
                }
            }
            TaskOutput::Redirected(result) => self.on_redirected(id, result, now),
        }
    }

    /// Sends the caller audio that arrived while the session was being prepared.
    fn flush_early_audio(&mut self) {
        let early = std::mem::take(&mut self.early_audio);
        if !early.frames.is_empty() {
            tracing::debug!(
                frames = early.frames.len(),
                "sending caller audio held while OpenAI connected"
            );
        }
        self.actions.extend(
            early
                .frames
                .iter()
                .map(|payload| Action::ToAgent(events::append_audio(payload))),
        );
    }

    fn on_agent_text(&mut self, text: &str, now: Instant) {
        let event = match events::parse_server_event(text) {
            Ok(event) => event,
            Err(error) => {
                self.malformed_from_agent(&error.to_string());
                return;
            }
        };
        match event {
            ServerEvent::AudioDelta(audio, delta) => {
                let Some(mark) = self.playback.on_delta(&audio, base64_decoded_len(&delta)) else {
                    self.metrics.dropped_interrupted_deltas.inc();
                    return;
                };
                if let MediaLink::Streaming { started_at, .. } = &self.media {
                    let since_start = now.saturating_duration_since(*started_at);
                    if !self.first_audio_sent {
                        self.first_audio_sent = true;
                        self.metrics.first_agent_audio.observe(since_start);
                    }
                    if let Some(turn) = self.latencies.agent_audio_sent(now, since_start) {
                        self.metrics.turn_latency.observe(turn);
                    }
                }
                self.metrics.frames_to_caller.inc();
                self.actions
                    .push_back(Action::ToMedia(self.leg.audio(&delta)));
                self.actions.push_back(Action::ToMedia(self.leg.mark(mark)));
            }
            ServerEvent::AudioDone(audio) => {
                if let Some(mark) = self.playback.on_audio_done(&audio) {
                    self.actions.push_back(Action::ToMedia(self.leg.mark(mark)));
                }
            }
            ServerEvent::SpeechStarted => {
                self.latencies.speech_started();
                self.tools.speech_started();
                self.silence.caller_spoke();
                self.on_speech_started(now);
            }
            ServerEvent::SpeechStopped => {
                self.latencies.speech_stopped(now);
                self.tools.speech_stopped();
                self.answer_awaited_since = Some(now);
            }
            ServerEvent::FunctionCall {
                response_id,
                call_id,
                name,
                arguments,
                ..
            } => self.on_function_call(&response_id, call_id, &name, &arguments, now),
            ServerEvent::ResponseCreated { response_id } => {
                self.answer_awaited_since = None;
                self.playback.response_created(&response_id);
                self.tools.response_created(&response_id);
                self.farewell_started(&response_id);
            }
            ServerEvent::ResponseDone {
                response_id, usage, ..
            } => {
                self.playback.response_done(&response_id);
                self.tools.response_done(&response_id);
                self.farewell_done(&response_id);
                self.usage.add(&usage);
            }
            ServerEvent::AgentTranscriptDone {
                item_id,
                transcript,
            } => {
                let transcript = transcript.trim().to_owned();
                if !transcript.is_empty() {
                    let sequence = self.next_line_sequence();
                    let (text, truncated) = self
                        .playback
                        .agent_transcript(&item_id, transcript, sequence);
                    self.record_line(Speaker::Agent, text, truncated, now);
                }
            }
            ServerEvent::CallerTranscriptDone { transcript } => {
                self.record_line(Speaker::Caller, transcript, false, now);
            }
            ServerEvent::SessionCreated { session_id } => {
                tracing::info!(
                    openai_session_id = session_id.as_deref().unwrap_or(""),
                    "OpenAI session created"
                );
                self.session_id = session_id;
            }
            ServerEvent::SessionUpdated { interrupt_response } => {
                self.session_auto_interrupts = interrupt_response;
            }
            ServerEvent::Error(error) => self.on_agent_error(&error, now),
            ServerEvent::Other => {}
        }
    }

    fn on_agent_error(&mut self, error: &events::ErrorDetail, now: Instant) {
        self.metrics.openai_errors.inc();
        let code = error.code.as_deref().unwrap_or("");
        self.record_event("openai_error", code, Some(error.message.clone()), now);
        // The error may be the refusal of a response we asked for: it will not come.
        self.tools.response_refused();
        if code == "session_expired" {
            // OpenAI's cap on a session's age: the call moves to a fresh one.
            tracing::info!("the OpenAI session reached its time limit: moving to a new one");
            self.session_gone("the session expired", now);
            return;
        }
        match error.severity() {
            ErrorSeverity::Benign => {
                tracing::debug!(code, message = %error.message, "OpenAI reported a harmless race");
            }
            ErrorSeverity::Recoverable => {
                tracing::warn!(code, kind = %error.kind, message = %error.message, "OpenAI reported an error");
            }
            ErrorSeverity::Fatal => {
                tracing::error!(code, kind = %error.kind, message = %error.message, "OpenAI ended the session");
                self.end(EndReason::AgentFailed, now);
            }
        }
    }

    /// Barge-in. Silence first: stopping playback is what the caller notices, so `clear` is
    /// queued before anything else, records included.
    fn on_speech_started(&mut self, now: Instant) {
        let Some(interruption) = self.playback.interrupt(self.session_auto_interrupts) else {
            return;
        };
        if interruption.clear {
            self.actions.push_back(Action::ToMedia(self.leg.clear()));
        }
        self.metrics.barge_ins.inc();
        tracing::debug!(?interruption, "caller barged in");
        if interruption.cancel {
            self.actions
                .push_back(Action::ToAgent(events::response_cancel()));
        }
        for truncation in &interruption.truncations {
            self.metrics.truncates.inc();
            self.actions.push_back(Action::ToAgent(events::truncate(
                &truncation.item_id,
                truncation.content_index,
                truncation.audio_end_ms,
            )));
        }
        let corrections = self.playback.take_corrections();
        self.apply_corrections(corrections);
        // In the call's history, so the dashboard (and `GET /calls/{sid}`) can count them.
        let heard_ms: Vec<u64> = interruption
            .truncations
            .iter()
            .map(|truncation| truncation.audio_end_ms)
            .collect();
        self.record_event_with(
            "barge_in",
            "caller",
            None,
            Some(serde_json::json!({"heard_ms": heard_ms})),
            now,
        );
    }

    // --- Time.

    fn on_timer(&mut self, now: Instant) {
        if matches!(self.media, MediaLink::AwaitingStart)
            && now >= self.accepted_at + self.settings.start_timeout
        {
            tracing::warn!("Twilio never sent start");
            self.end(EndReason::Timeout, now);
            return;
        }
        self.briefing_timer(now);
        self.acting_timer(now);
        self.reconnect_timer(now);
        self.rollover_timer(now);
        if self.ended.is_some() || now < self.next_heartbeat {
            return;
        }
        // A late beat is not made up for: the next one is a full interval away.
        self.next_heartbeat = now + self.settings.heartbeat_interval;
        if now.saturating_duration_since(self.media_seen) > self.settings.peer_timeout {
            tracing::warn!("Twilio stopped answering");
            self.end(EndReason::Timeout, now);
            return;
        }
        let agent_open = matches!(self.link, AgentLink::AwaitingContext | AgentLink::Ready);
        if agent_open && now.saturating_duration_since(self.agent_seen) > self.settings.peer_timeout
        {
            tracing::warn!("OpenAI stopped answering");
            self.end(EndReason::Timeout, now);
            return;
        }
        self.actions.push_back(Action::PingMedia);
        if agent_open {
            self.actions.push_back(Action::PingAgent);
        }
    }

    // --- The end.

    /// The one way a call ends: whatever was said is corrected to what was heard, the end is
    /// recorded, and the driver is told how to close both legs.
    fn end(&mut self, reason: EndReason, now: Instant) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some((reason, now));
        self.metrics.call_ended(reason);
        self.tools.clear();
        self.abandon_tool_requests(now);
        let cut_off = self.playback.finish();
        self.apply_corrections(cut_off);
        let call_sid = self.streaming_call_sid();
        self.record_event("stream", "ended", Some(reason.label().to_owned()), now);
        // A stream that ended before its `start` was checked still spent the token `/voice`
        // issued for this call, whose record would otherwise never end: its end is recorded
        // too (but nothing is hung up through REST for it, as the plan below has no CallSid).
        let ended_sid = call_sid
            .clone()
            .unwrap_or_else(|| self.grant.call_sid.clone());
        let usage = self.usage;
        let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.actions
            .push_back(Action::RecordDurably(Record::CallEnded {
                call_sid: ended_sid.to_string(),
                end_reason: reason.label(),
                openai_session_id: self.session_id.clone(),
                totals: Box::new(CallTotals {
                    input_tokens: tokens(usage.input_tokens),
                    output_tokens: tokens(usage.output_tokens),
                    total_tokens: tokens(usage.total_tokens),
                    usage: TokenUsage {
                        input_text_tokens: tokens(usage.input_text_tokens),
                        input_audio_tokens: tokens(usage.input_audio_tokens),
                        input_cached_text_tokens: tokens(usage.input_cached_text_tokens),
                        input_cached_audio_tokens: tokens(usage.input_cached_audio_tokens),
                        output_text_tokens: tokens(usage.output_text_tokens),
                        output_audio_tokens: tokens(usage.output_audio_tokens),
                    },
                    model: self.agent.model.clone(),
                    cost_micro_usd: pricing::cost_micro_usd(&self.agent.model, &usage).map(tokens),
                    latency: self.latencies.summary(),
                }),
                at_ms: self.wall_ms(now),
            }));
        self.actions.push_back(Action::End(EndPlan::new(
            reason,
            call_sid,
            L::close_code(reason),
        )));
    }

    // --- Records.

    fn spawn(&mut self, task: SideTask) -> TaskId {
        self.next_task += 1;
        let id = TaskId(self.next_task);
        self.actions.push_back(Action::Spawn(id, task));
        id
    }

    fn wall_ms(&self, now: Instant) -> i64 {
        let elapsed = now.saturating_duration_since(self.accepted_at).as_millis();
        self.accepted_at_ms
            .saturating_add(i64::try_from(elapsed).unwrap_or(i64::MAX))
    }

    fn offset_ms(&self, now: Instant) -> u64 {
        match &self.media {
            MediaLink::Streaming { started_at, .. } => {
                u64::try_from(now.saturating_duration_since(*started_at).as_millis())
                    .unwrap_or(u64::MAX)
            }
            MediaLink::AwaitingStart => 0,
        }
    }

    fn streaming_call_sid(&self) -> Option<CallSid> {
        match &self.media {
            MediaLink::Streaming { call_sid, .. } => Some(call_sid.clone()),
            MediaLink::AwaitingStart => None,
        }
    }

    fn call_sid(&self) -> Option<&str> {
        match &self.media {
            MediaLink::Streaming { call_sid, .. } => Some(call_sid.as_str()),
            MediaLink::AwaitingStart => None,
        }
    }

    /// Stream lifecycle and OpenAI errors, for the call's history.
    fn record_event(
        &mut self,
        kind: &'static str,
        name: &str,
        detail: Option<String>,
        now: Instant,
    ) {
        self.record_event_with(kind, name, detail, None, now);
    }

    /// As `record_event`, with structured data (a tool call's latency and outcome, say).
    fn record_event_with(
        &mut self,
        kind: &'static str,
        name: &str,
        detail: Option<String>,
        data: Option<serde_json::Value>,
        now: Instant,
    ) {
        let Some(call_sid) = self.call_sid() else {
            return;
        };
        let record = Record::Event {
            call_sid: call_sid.to_owned(),
            kind,
            name: name.to_owned(),
            detail,
            data,
            at_ms: self.wall_ms(now),
        };
        self.actions.push_back(Action::Record(record));
    }

    fn next_line_sequence(&self) -> u32 {
        u32::try_from(self.transcript.len() + 1).unwrap_or(u32::MAX)
    }

    /// Replaces recorded agent lines with what the caller actually heard of them.
    fn apply_corrections(&mut self, corrections: Vec<LineCorrection>) {
        for correction in corrections {
            let index = correction.sequence as usize - 1;
            let Some(line) = self.transcript.get_mut(index) else {
                continue;
            };
            line.text.clone_from(&correction.text);
            line.truncated = correction.truncated;
            if let Some(call_sid) = self.call_sid() {
                let record = Record::TranscriptCorrection {
                    call_sid: call_sid.to_owned(),
                    sequence: correction.sequence,
                    text: correction.text,
                    truncated: correction.truncated,
                };
                self.actions.push_back(Action::RecordDurably(record));
            }
        }
    }

    fn record_line(&mut self, speaker: Speaker, text: String, truncated: bool, now: Instant) {
        let text = text.trim().to_owned();
        if text.is_empty() {
            return;
        }
        let line = TranscriptLine {
            sequence: self.next_line_sequence(),
            speaker,
            text,
            offset_ms: self.offset_ms(now),
            truncated,
        };
        tracing::debug!(
            speaker = line.speaker.as_str(),
            offset_ms = line.offset_ms,
            truncated = line.truncated,
            text = %line.text,
            "transcript"
        );
        if let Some(call_sid) = self.call_sid() {
            let record = Record::Transcript {
                call_sid: call_sid.to_owned(),
                line: line.clone(),
            };
            self.actions.push_back(Action::RecordDurably(record));
        }
        self.transcript.push(line);
    }

    fn malformed_from_media(&mut self, what: &str) {
        self.metrics.malformed_from_twilio.inc();
        self.log_malformed("Twilio", what);
    }

    fn malformed_from_agent(&mut self, what: &str) {
        self.metrics.malformed_from_openai.inc();
        self.log_malformed("OpenAI", what);
    }

    fn log_malformed(&mut self, peer: &str, what: &str) {
        self.malformed += 1;
        if self.malformed <= MALFORMED_LOG_LIMIT {
            tracing::warn!(
                peer,
                problem = what,
                "ignored a message that could not be used"
            );
        } else {
            tracing::debug!(
                peer,
                problem = what,
                "ignored a message that could not be used"
            );
        }
    }
}

mod acting;
mod briefing;
mod survival;
#[cfg(test)]
mod tests;
