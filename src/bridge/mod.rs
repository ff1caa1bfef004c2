//! The per-call bridge: one task per call that joins a Twilio Media Stream to an OpenAI Realtime
//! session and passes µ-law audio straight through both ways.
//!
//! The loop is written against generic sinks and streams (and an `AgentDialer`), so unit tests
//! drive it with channels; `routes::stream` plugs in the real actix-ws and tungstenite halves.

pub mod playback;
pub mod transcript;

use std::collections::VecDeque;
use std::fmt::Debug;
use std::time::Duration;

use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message as AgentMessage;
use tokio_util::sync::CancellationToken;

use crate::admission::{AdmittedStream, CallSlot};
use crate::domain::phone::Masked;
use crate::metrics::EndReason;
use crate::openai::client::{AgentDialer, DialError};
use crate::openai::events::{self, ErrorSeverity, ServerEvent, SessionSettings, Usage};
use crate::state::AppState;
use crate::store::Record;
use crate::twilio::media::{self, Inbound, Start};
use crate::twilio::socket;
use playback::{BYTES_PER_MS, LineCorrection, Playback, base64_decoded_len};
use transcript::{Speaker, TranscriptLine};

type TwilioMessage = actix_ws::Message;

/// Twilio sends a frame every 20 ms; anything near this size is not Twilio.
pub const MAX_TWILIO_FRAME: usize = 64 * 1024;

/// How long a drain waits for Twilio to confirm each hang-up before closing the stream anyway.
const SHUTDOWN_HANG_UP_TIMEOUT: Duration = Duration::from_secs(3);

/// Log the first few malformed messages of a call in full; after that only count them, so a
/// misbehaving peer cannot flood the logs.
const MALFORMED_LOG_LIMIT: u32 = 5;

#[derive(Clone, Debug)]
pub struct BridgeSettings {
    /// How often both peers are pinged.
    pub heartbeat_interval: Duration,
    /// A peer silent for this long (no frame, no pong) is considered gone.
    pub peer_timeout: Duration,
    /// Caller audio kept while the OpenAI session opens; older audio is dropped beyond it.
    pub max_buffered_audio: Duration,
    /// How long closing the OpenAI socket may take once the caller is gone.
    pub close_timeout: Duration,
    /// A stream that has not sent `start` this long after its upgrade is closed: Twilio sends
    /// it at once, so the socket is not a call and its slot is better given back.
    pub start_timeout: Duration,
}

impl Default for BridgeSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            peer_timeout: Duration::from_secs(20),
            max_buffered_audio: Duration::from_secs(10),
            close_timeout: Duration::from_millis(500),
            start_timeout: Duration::from_secs(5),
        }
    }
}

/// What is known about a call when its bridge ends; the storage layer persists it.
#[derive(Debug)]
pub struct CallSummary {
    pub call_sid: Option<String>,
    pub stream_sid: Option<String>,
    pub end_reason: EndReason,
    pub openai_session_id: Option<String>,
    pub usage: Usage,
    pub transcript: Vec<TranscriptLine>,
    pub duration: Duration,
    /// The call's capacity slot, held until whoever ran the call is done with it (a last REST
    /// hang-up): a drain waits for every slot, so nothing is cut off halfway.
    pub slot: CallSlot,
}

enum Step {
    Continue,
    Authorized,
    End(EndReason),
}

/// Per-call state; lives exactly as long as the call's task.
struct Call<'a> {
    state: &'a AppState,
    settings: BridgeSettings,
    /// The call the upgrade's token was issued for, and its slot.
    admitted: AdmittedStream,
    started: Option<Start>,
    started_at: Option<Instant>,
    playback: Playback,
    /// Caller audio received before the OpenAI session was ready, in order.
    early_audio: VecDeque<String>,
    early_audio_bytes: u64,
    /// Whether the session cancels responses itself on speech (`interrupt_response`).
    session_auto_interrupts: bool,
    first_audio_sent: bool,
    session_id: Option<String>,
    usage: Usage,
    transcript: Vec<TranscriptLine>,
    malformed: u32,
    /// What `POST /calls` told the agent about this outbound call.
    outbound_brief: Option<String>,
}

/// The system message that briefs the agent on an outbound call it is placing.
pub fn outbound_brief(agent: Option<&str>, context: Option<&str>) -> String {
    let mut brief = String::from(
        "This is an outbound call: you are calling the user on behalf of the business.",
    );
    if let Some(agent) = agent {
        brief.push_str(&format!(" Act as the agent \"{agent}\"."));
    }
    if let Some(context) = context {
        brief.push_str("\nContext for this call:\n");
        brief.push_str(context);
    }
    brief
}

/// Runs one call to its end. `twilio_tx`/`twilio_rx` are the Media Stream socket's halves;
/// `admitted` is what its upgrade's token was issued for, which `start` must match.
pub async fn run<TS, TR, D>(
    mut twilio_tx: TS,
    mut twilio_rx: TR,
    dialer: &D,
    state: &AppState,
    admitted: AdmittedStream,
    close_requested: CancellationToken,
    settings: BridgeSettings,
) -> CallSummary
where
    TS: Sink<TwilioMessage> + Unpin,
    TS::Error: Debug,
    TR: Stream<Item = Result<AggregatedMessage, ProtocolError>> + Unpin,
    D: AgentDialer,
{
    let accepted_at = Instant::now();
    let mut call = Call {
        state,
        settings: settings.clone(),
        admitted,
        started: None,
        started_at: None,
        playback: Playback::default(),
        early_audio: VecDeque::new(),
        early_audio_bytes: 0,
        session_auto_interrupts: true,
        first_audio_sent: false,
        session_id: None,
        usage: Usage::default(),
        transcript: Vec::new(),
        malformed: 0,
        outbound_brief: None,
    };

    // The transport is prepared right away, in parallel with waiting for Twilio's `start`; the
    // authenticated upgrade waits for the token check (see `openai::client`).
    let (authorize, authorized) = oneshot::channel::<()>();
    let mut authorize = Some(authorize);
    let connect = async {
        let transport = dialer.preconnect().await?;
        authorized.await.map_err(|_| DialError::Abandoned)?;
        dialer.open(transport).await
    };
    let mut connect = std::pin::pin!(connect);
    let mut connecting = true;
    let mut agent_tx: Option<D::Sink> = None;
    let mut agent_rx: Option<D::Stream> = None;

    let mut heartbeat = tokio::time::interval_at(
        accepted_at + settings.heartbeat_interval,
        settings.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut twilio_seen = accepted_at;
    let mut agent_seen = accepted_at;
    let start_deadline = tokio::time::sleep_until(accepted_at + settings.start_timeout);
    let mut start_deadline = std::pin::pin!(start_deadline);

    let reason = loop {
        tokio::select! {
            () = close_requested.cancelled() => break EndReason::Shutdown,

            () = &mut start_deadline, if call.started.is_none() => {
                tracing::warn!("Twilio never sent start");
                break EndReason::Timeout;
            }

            frame = twilio_rx.next() => {
                twilio_seen = Instant::now();
                let step = match frame {
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        call.on_twilio_text(&text, agent_tx.as_mut()).await
                    }
                    Some(Ok(AggregatedMessage::Ping(payload))) => {
                        match twilio_tx.send(TwilioMessage::Pong(payload)).await {
                            Ok(()) => Step::Continue,
                            Err(_) => Step::End(EndReason::CallerHungUp),
                        }
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => Step::Continue,
                    Some(Ok(AggregatedMessage::Binary(_))) => {
                        call.malformed_from_twilio("a binary frame (Media Streams only sends text)");
                        Step::Continue
                    }
                    Some(Ok(AggregatedMessage::Close(_))) | None => Step::End(EndReason::CallerHungUp),
                    Some(Err(error)) => match socket::end_reason(&error) {
                        EndReason::FrameTooLarge => {
                            call.malformed_from_twilio("a frame over 64 KiB");
                            break EndReason::FrameTooLarge;
                        }
                        reason => {
                            tracing::warn!(%error, "the Twilio socket broke");
                            break reason;
                        }
                    },
                };
                match step {
                    Step::Continue => {}
                    Step::Authorized => {
                        if let Some(authorize) = authorize.take() {
                            let _ = authorize.send(());
                        }
                        if !connecting && agent_tx.is_none() {
                            // The transport failed before `start` arrived.
                            break EndReason::AgentUnreachable;
                        }
                    }
                    Step::End(reason) => break reason,
                }
            }

            result = &mut connect, if connecting => {
                connecting = false;
                match result {
                    Ok((mut tx, rx)) => {
                        let waited_since = call.started_at.unwrap_or(accepted_at);
                        state.metrics.openai_connect.observe(waited_since.elapsed());
                        agent_seen = Instant::now();
                        if let Err(error) = call.on_agent_ready(&mut tx).await {
                            tracing::warn!(%error, "the OpenAI session closed while being configured");
                            break EndReason::AgentFailed;
                        }
                        agent_tx = Some(tx);
                        agent_rx = Some(rx);
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot open the OpenAI Realtime session");
                        if call.started.is_some() {
                            break EndReason::AgentUnreachable;
                        }
                    }
                }
            }

            frame = next_agent_frame(&mut agent_rx), if agent_rx.is_some() => {
                agent_seen = Instant::now();
                let Some(tx) = agent_tx.as_mut() else { break EndReason::AgentFailed };
                let step = match frame {
                    Some(Ok(AgentMessage::Text(text))) => {
                        call.on_agent_text(text.as_str(), &mut twilio_tx, tx).await
                    }
                    Some(Ok(AgentMessage::Binary(_))) => {
                        call.malformed_from_agent("a binary frame (Realtime only sends text)");
                        Step::Continue
                    }
                    Some(Ok(AgentMessage::Ping(_) | AgentMessage::Pong(_) | AgentMessage::Frame(_))) => Step::Continue,
                    Some(Ok(AgentMessage::Close(frame))) => {
                        tracing::warn!(close = ?frame, "OpenAI closed the session");
                        Step::End(EndReason::AgentFailed)
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "the OpenAI socket broke");
                        Step::End(EndReason::AgentFailed)
                    }
                    None => Step::End(EndReason::AgentFailed),
                };
                if let Step::End(reason) = step {
                    break reason;
                }
            }

            _ = heartbeat.tick() => {
                let now = Instant::now();
                if now.duration_since(twilio_seen) > settings.peer_timeout {
                    tracing::warn!("Twilio stopped answering");
                    break EndReason::Timeout;
                }
                if agent_tx.is_some() && now.duration_since(agent_seen) > settings.peer_timeout {
                    tracing::warn!("OpenAI stopped answering");
                    break EndReason::Timeout;
                }
                if twilio_tx.send(TwilioMessage::Ping(Default::default())).await.is_err() {
                    break EndReason::CallerHungUp;
                }
                if let Some(tx) = agent_tx.as_mut()
                    && tx.send(AgentMessage::Ping(Default::default())).await.is_err()
                {
                    break EndReason::AgentFailed;
                }
            }
        }
    };

    finish(&mut call, reason, &mut twilio_tx, agent_tx.as_mut()).await;
    state.metrics.call_ended(reason);
    let cut_off = call.playback.finish();
    call.apply_corrections(cut_off).await;
    if let Some(start) = &call.started {
        call.record_event("stream", "ended", Some(reason.label().to_owned()));
        let usage = call.usage;
        let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        state.records.record(Record::CallEnded {
            call_sid: start.call_sid.clone(),
            end_reason: reason.label(),
            openai_session_id: call.session_id.clone(),
            input_tokens: tokens(usage.input_tokens),
            output_tokens: tokens(usage.output_tokens),
            total_tokens: tokens(usage.total_tokens),
            at_ms: state.clock.now_ms(),
        });
    }
    let started = call.started.take();
    CallSummary {
        call_sid: started.as_ref().map(|s| s.call_sid.clone()),
        stream_sid: started.map(|s| s.stream_sid),
        end_reason: reason,
        openai_session_id: call.session_id,
        usage: call.usage,
        transcript: call.transcript,
        duration: call.started_at.map_or(Duration::ZERO, |at| at.elapsed()),
        slot: call.admitted.slot,
    }
}

async fn next_agent_frame<R: Stream + Unpin>(rx: &mut Option<R>) -> Option<R::Item> {
    match rx.as_mut() {
        Some(rx) => rx.next().await,
        None => std::future::pending().await,
    }
}

/// Closes whichever side is still open. Closing Twilio's socket (rather than hanging up) lets
/// the TwiML after `<Connect>` play its apology when the agent side failed.
async fn finish<TS, AS>(
    call: &mut Call<'_>,
    reason: EndReason,
    twilio: &mut TS,
    agent: Option<&mut AS>,
) where
    TS: Sink<TwilioMessage> + Unpin,
    AS: Sink<AgentMessage> + Unpin,
{
    if let Some(agent) = agent {
        let close = async {
            let _ = agent.send(AgentMessage::Close(None)).await;
            let _ = agent.close().await;
        };
        let _ = tokio::time::timeout(call.settings.close_timeout, close).await;
    }
    // A deploy is no failure: end the call through Twilio first, so that closing the stream
    // does not start the apology after `</Connect>`.
    if let (EndReason::Shutdown, Some(start)) = (reason, &call.started) {
        let hang_up = call.state.twilio.hang_up(&start.call_sid);
        match tokio::time::timeout(SHUTDOWN_HANG_UP_TIMEOUT, hang_up).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot hang the call up for the drain"),
            Err(_) => tracing::warn!("Twilio did not confirm the drain's hang-up in time"),
        }
    }
    let code = match reason {
        EndReason::CallerHungUp => CloseCode::Normal,
        EndReason::Unauthorized => CloseCode::Policy,
        EndReason::ProtocolError => CloseCode::Protocol,
        EndReason::FrameTooLarge => CloseCode::Size,
        EndReason::InvalidText => CloseCode::Invalid,
        EndReason::Shutdown => CloseCode::Restart,
        EndReason::AgentFailed | EndReason::AgentUnreachable | EndReason::Timeout => {
            CloseCode::Error
        }
    };
    let reason = CloseReason {
        code,
        description: None,
    };
    let _ = twilio.send(TwilioMessage::Close(Some(reason))).await;
    let _ = twilio.close().await;
}

impl Call<'_> {
    fn stream_sid(&self) -> &str {
        self.started.as_ref().map_or("", |s| s.stream_sid.as_str())
    }

    fn offset_ms(&self) -> u64 {
        self.started_at.map_or(0, |at| {
            u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX)
        })
    }

    async fn on_twilio_text<AS>(&mut self, text: &str, agent: Option<&mut AS>) -> Step
    where
        AS: Sink<AgentMessage> + Unpin,
    {
        let message = match media::parse(text) {
            Ok(message) => message,
            Err(error) => {
                self.malformed_from_twilio(&error.to_string());
                return Step::Continue;
            }
        };
        match message {
            Inbound::Media { payload } => {
                if self.started.is_none() {
                    self.malformed_from_twilio("media before start");
                    return Step::Continue;
                }
                self.state.metrics.frames_from_caller.inc();
                match agent {
                    Some(agent) => {
                        let append = events::append_audio(&payload);
                        if agent.send(AgentMessage::text(append)).await.is_err() {
                            return Step::End(EndReason::AgentFailed);
                        }
                    }
                    None => self.hold_early_audio(payload.into_owned()),
                }
                Step::Continue
            }
            Inbound::Mark { name } => {
                let echo = self.playback.on_mark(&name);
                tracing::trace!(mark = %name, ?echo, "mark echoed");
                Step::Continue
            }
            Inbound::Start(start) => self.on_start(start).await,
            Inbound::Stop => {
                tracing::info!("Twilio stopped the stream");
                Step::End(EndReason::CallerHungUp)
            }
            Inbound::Connected => Step::Continue,
            Inbound::Dtmf { digit } => {
                tracing::debug!(%digit, "caller pressed a key");
                Step::Continue
            }
            Inbound::Other(event) => {
                tracing::debug!(%event, "ignored a Media Streams event");
                Step::Continue
            }
        }
    }

    /// Checks the stream belongs to a call we answered: our account, and the token and CallSid
    /// its upgrade was admitted for. Until this passes nothing reaches OpenAI.
    async fn on_start(&mut self, start: Start) -> Step {
        if self.started.is_some() {
            self.malformed_from_twilio("a second start");
            return Step::Continue;
        }
        let span = tracing::Span::current();
        span.record("stream_sid", start.stream_sid.as_str());
        if start.account_sid != self.state.config.twilio_account_sid {
            tracing::warn!("refused a stream: start names another Twilio account");
            return Step::End(EndReason::Unauthorized);
        }
        let token = start
            .custom_parameters
            .get("token")
            .map_or("", String::as_str);
        if let Err(mismatch) = self.admitted.check_start(token, &start.call_sid) {
            tracing::warn!(%mismatch, "refused a stream");
            return Step::End(EndReason::Unauthorized);
        }
        let parameter = |name: &str| start.custom_parameters.get(name).map_or("", String::as_str);
        tracing::info!(
            from = %Masked(parameter("from")),
            to = %Masked(parameter("to")),
            direction = parameter("direction"),
            "media stream started"
        );
        match self.state.store.outbound_brief(&start.call_sid).await {
            Ok(Some((agent, context))) => {
                self.outbound_brief = Some(outbound_brief(agent.as_deref(), context.as_deref()));
            }
            Ok(None) => {}
            Err(error) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    "cannot read the outbound call's context"
                );
            }
        }
        self.state.metrics.calls_started.inc();
        self.state.records.record(Record::StreamStarted {
            call_sid: start.call_sid.clone(),
            stream_sid: start.stream_sid.clone(),
            at_ms: self.state.clock.now_ms(),
        });
        self.started = Some(start);
        self.started_at = Some(Instant::now());
        self.record_event("stream", "started", None);
        Step::Authorized
    }

    fn hold_early_audio(&mut self, payload: String) {
        self.state.metrics.frames_buffered_before_agent.inc();
        self.early_audio_bytes += base64_decoded_len(&payload);
        self.early_audio.push_back(payload);
        let limit = u64::try_from(self.settings.max_buffered_audio.as_millis()).unwrap_or(u64::MAX)
            * BYTES_PER_MS;
        while self.early_audio_bytes > limit {
            let Some(oldest) = self.early_audio.pop_front() else {
                break;
            };
            self.early_audio_bytes -= base64_decoded_len(&oldest);
            self.state.metrics.frames_dropped_buffer_full.inc();
        }
    }

    /// Configures the fresh session, then sends the caller audio that arrived meanwhile.
    async fn on_agent_ready<AS>(&mut self, agent: &mut AS) -> Result<(), String>
    where
        AS: Sink<AgentMessage> + Unpin,
    {
        let config = &self.state.config;
        let update = events::session_update(&SessionSettings {
            instructions: &config.agent_instructions,
            voice: &config.openai_voice,
        });
        let mut opening = vec![update];
        // Context goes in before anything can make the agent speak.
        if let Some(brief) = &self.outbound_brief {
            opening.push(events::system_message(brief));
        }
        if let Some(greeting) = &config.agent_greeting {
            opening.push(events::system_message(greeting));
            opening.push(events::response_create());
        }
        let early = std::mem::take(&mut self.early_audio);
        self.early_audio_bytes = 0;
        if !early.is_empty() {
            tracing::debug!(
                frames = early.len(),
                "sending caller audio held while OpenAI connected"
            );
        }
        let frames = opening
            .into_iter()
            .chain(early.iter().map(|payload| events::append_audio(payload)));
        for frame in frames {
            agent
                .feed(AgentMessage::text(frame))
                .await
                .map_err(|_| "send failed".to_owned())?;
        }
        agent.flush().await.map_err(|_| "flush failed".to_owned())
    }

    async fn on_agent_text<TS, AS>(&mut self, text: &str, twilio: &mut TS, agent: &mut AS) -> Step
    where
        TS: Sink<TwilioMessage> + Unpin,
        AS: Sink<AgentMessage> + Unpin,
    {
        let event = match events::parse_server_event(text) {
            Ok(event) => event,
            Err(error) => {
                self.malformed_from_agent(&error.to_string());
                return Step::Continue;
            }
        };
        let sent = match event {
            ServerEvent::AudioDelta(audio, delta) => {
                let Some(mark) = self.playback.on_delta(&audio, base64_decoded_len(&delta)) else {
                    self.state.metrics.dropped_interrupted_deltas.inc();
                    return Step::Continue;
                };
                let stream_sid = self.stream_sid();
                let media = media::media(stream_sid, &delta);
                let mark = media::mark(stream_sid, mark);
                if !self.first_audio_sent {
                    self.first_audio_sent = true;
                    if let Some(at) = self.started_at {
                        self.state.metrics.first_agent_audio.observe(at.elapsed());
                    }
                }
                self.state.metrics.frames_to_caller.inc();
                let forwarded = twilio.feed(TwilioMessage::Text(media.into())).await.is_ok();
                forwarded && twilio.send(TwilioMessage::Text(mark.into())).await.is_ok()
            }
            ServerEvent::AudioDone(audio) => match self.playback.on_audio_done(&audio) {
                Some(mark) => {
                    let mark = media::mark(self.stream_sid(), mark);
                    twilio.send(TwilioMessage::Text(mark.into())).await.is_ok()
                }
                None => true,
            },
            ServerEvent::SpeechStarted => {
                return self.on_speech_started(twilio, agent).await;
            }
            ServerEvent::ResponseCreated { response_id } => {
                self.playback.response_created(&response_id);
                true
            }
            ServerEvent::ResponseDone { response_id, usage } => {
                self.playback.response_done(&response_id);
                self.usage.input_tokens += usage.input_tokens;
                self.usage.output_tokens += usage.output_tokens;
                self.usage.total_tokens += usage.total_tokens;
                true
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
                    self.record_line(Speaker::Agent, text, truncated).await;
                }
                true
            }
            ServerEvent::CallerTranscriptDone { transcript } => {
                self.record_line(Speaker::Caller, transcript, false).await;
                true
            }
            ServerEvent::SessionCreated { session_id } => {
                tracing::info!(
                    openai_session_id = session_id.as_deref().unwrap_or(""),
                    "OpenAI session created"
                );
                self.session_id = session_id;
                true
            }
            ServerEvent::SessionUpdated { interrupt_response } => {
                self.session_auto_interrupts = interrupt_response;
                true
            }
            ServerEvent::Error(error) => {
                self.state.metrics.openai_errors.inc();
                let code = error.code.as_deref().unwrap_or("");
                self.record_event("openai_error", code, Some(error.message.clone()));
                match error.severity() {
                    ErrorSeverity::Benign => {
                        tracing::debug!(code, message = %error.message, "OpenAI reported a harmless race");
                    }
                    ErrorSeverity::Recoverable => {
                        tracing::warn!(code, kind = %error.kind, message = %error.message, "OpenAI reported an error");
                    }
                    ErrorSeverity::Fatal => {
                        tracing::error!(code, kind = %error.kind, message = %error.message, "OpenAI ended the session");
                        return Step::End(EndReason::AgentFailed);
                    }
                }
                true
            }
            ServerEvent::Other => true,
        };
        if sent {
            Step::Continue
        } else {
            Step::End(EndReason::CallerHungUp)
        }
    }

    async fn on_speech_started<TS, AS>(&mut self, twilio: &mut TS, agent: &mut AS) -> Step
    where
        TS: Sink<TwilioMessage> + Unpin,
        AS: Sink<AgentMessage> + Unpin,
    {
        let Some(interruption) = self.playback.interrupt(self.session_auto_interrupts) else {
            return Step::Continue;
        };
        self.state.metrics.barge_ins.inc();
        tracing::debug!(?interruption, "caller barged in");
        let corrections = self.playback.take_corrections();
        self.apply_corrections(corrections).await;
        // Silence first: stopping playback is what the caller notices.
        if interruption.clear {
            let clear = media::clear(self.stream_sid());
            if twilio
                .send(TwilioMessage::Text(clear.into()))
                .await
                .is_err()
            {
                return Step::End(EndReason::CallerHungUp);
            }
        }
        let cancel = interruption.cancel.then(events::response_cancel);
        let truncates = interruption.truncations.iter().map(|t| {
            self.state.metrics.truncates.inc();
            events::truncate(&t.item_id, t.content_index, t.audio_end_ms)
        });
        for event in cancel.into_iter().chain(truncates) {
            if agent.feed(AgentMessage::text(event)).await.is_err() {
                return Step::End(EndReason::AgentFailed);
            }
        }
        match agent.flush().await {
            Ok(()) => Step::Continue,
            Err(_) => Step::End(EndReason::AgentFailed),
        }
    }

    /// Stream lifecycle and OpenAI errors, for the call's history. Never waits.
    fn record_event(&self, kind: &'static str, name: &str, detail: Option<String>) {
        if let Some(start) = &self.started {
            self.state.records.record(Record::Event {
                call_sid: start.call_sid.clone(),
                kind,
                name: name.to_owned(),
                detail,
                at_ms: self.state.clock.now_ms(),
            });
        }
    }

    fn next_line_sequence(&self) -> u32 {
        u32::try_from(self.transcript.len() + 1).unwrap_or(u32::MAX)
    }

    /// Replaces recorded agent lines with what the caller actually heard of them.
    async fn apply_corrections(&mut self, corrections: Vec<LineCorrection>) {
        for correction in corrections {
            let index = correction.sequence as usize - 1;
            let Some(line) = self.transcript.get_mut(index) else {
                continue;
            };
            line.text.clone_from(&correction.text);
            line.truncated = correction.truncated;
            if let Some(start) = &self.started {
                let record = Record::TranscriptCorrection {
                    call_sid: start.call_sid.clone(),
                    sequence: correction.sequence,
                    text: correction.text,
                    truncated: correction.truncated,
                };
                self.state.records.record_transcript(record).await;
            }
        }
    }

    async fn record_line(&mut self, speaker: Speaker, text: String, truncated: bool) {
        let text = text.trim().to_owned();
        if text.is_empty() {
            return;
        }
        let line = TranscriptLine {
            sequence: self.next_line_sequence(),
            speaker,
            text,
            offset_ms: self.offset_ms(),
            truncated,
        };
        tracing::debug!(
            speaker = line.speaker.as_str(),
            offset_ms = line.offset_ms,
            truncated = line.truncated,
            text = %line.text,
            "transcript"
        );
        if let Some(start) = &self.started {
            let record = Record::Transcript {
                call_sid: start.call_sid.clone(),
                line: line.clone(),
            };
            self.state.records.record_transcript(record).await;
        }
        self.transcript.push(line);
    }

    fn malformed_from_twilio(&mut self, what: &str) {
        self.state.metrics.malformed_from_twilio.inc();
        self.log_malformed("Twilio", what);
    }

    fn malformed_from_agent(&mut self, what: &str) {
        self.state.metrics.malformed_from_openai.inc();
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

#[cfg(test)]
mod tests;
