//! The driver: the thin, I/O-owning half of a call. It owns the two sockets, the timer, the
//! agent dial and the side tasks; it turns whatever happens into an [`Input`] for the core and
//! carries out the core's [`Action`]s. It makes no decisions of its own.
//!
//! The loop waits only for its next input. Side work (database reads, requests to the business,
//! a transfer) runs as futures beside it, polled by the same `select!`, and comes back as an input.
//!
//! Written against generic sinks and streams (and an [`AgentDialer`]), so tests drive a whole
//! call over channels; `routes::stream` plugs in the real actix-ws and tungstenite halves.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use futures_util::stream::FuturesUnordered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message as AgentMessage};
use tokio_util::sync::CancellationToken;

use crate::admission::CallSlot;
use crate::call::agent::OutboundBrief;
use crate::call::core::{
    Action, BusinessOutcome, CallCore, CallSetup, CallSummary, Input, SideTask, TaskId, TaskOutput,
};
use crate::call::ending::{self, EndPlan, EndingTimes};
use crate::call::leg::{CallControl, TwilioLeg};
use crate::call::link::MediaLink;
use crate::call::speaking::Presence;
use crate::metrics::EndReason;
use crate::openai::client::{AgentDialer, DialError};
use crate::state::AppState;
use crate::twilio::socket;
use crate::webhooks::{BusinessError, WebhookId};

type TwilioMessage = actix_ws::Message;

/// How long closing a lost or replaced session may hold the call's loop.
const LOST_SESSION_CLOSE: std::time::Duration = std::time::Duration::from_millis(100);
type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// The agent dial in flight: first the transport, then (once `start` was checked) the upgrade.
enum Dial<D: AgentDialer> {
    Transport(Result<D::Transport, DialError>),
    Session(Result<(D::Sink, D::Stream), DialError>),
}

/// A session's two halves, as a dial gives them.
type Session<D> = (<D as AgentDialer>::Sink, <D as AgentDialer>::Stream);

/// The remote services a call uses besides its media socket.
pub struct Peers<'a, D, C> {
    /// Opens the agent's session.
    pub dialer: &'a D,
    /// Ends the call outside its stream (Twilio's REST API).
    pub control: &'a C,
}

/// Runs one call to its end, including the ending's REST hang-ups, and only then gives the
/// call's slot back. `twilio_tx`/`twilio_rx` are the Media Stream socket's halves.
pub async fn run<TS, TR, D, C>(
    twilio_tx: TS,
    twilio_rx: TR,
    peers: Peers<'_, D, C>,
    state: &AppState,
    setup: CallSetup,
    slot: CallSlot,
    close_requested: CancellationToken,
) -> CallSummary
where
    TS: Sink<TwilioMessage> + Unpin,
    TS::Error: Debug,
    TR: Stream<Item = Result<AggregatedMessage, ProtocolError>> + Unpin,
    D: AgentDialer,
    C: CallControl,
{
    let times = setup.settings.ending;
    let mut core = CallCore::new(TwilioLeg::default(), setup);
    let mut io = CallIo {
        twilio_tx,
        twilio_rx,
        dialer: peers.dialer,
        state,
        dial: None,
        transport: None,
        agent_tx: None,
        agent_rx: None,
        standby_dial: None,
        standby: None,
        tasks: FuturesUnordered::new(),
        close_requested,
        shutdown_told: false,
    };
    let timer = tokio::time::sleep_until(Instant::now());
    let mut timer = std::pin::pin!(timer);
    let mut presence = Presence::new(&state.speaking);
    let plan = loop {
        match io.carry_out(&mut core).await {
            Carried::Ended(plan) => break plan,
            Carried::Failed(input) => {
                core.handle(input, now());
                continue;
            }
            Carried::Done => {}
        }
        let call_sid = match core.media_link() {
            MediaLink::Streaming { call_sid, .. } => Some(call_sid.as_str()),
            MediaLink::AwaitingStart => None,
        };
        presence.update(call_sid, core.speaking());
        // Read once per input: the timer moves only when the core's deadline does.
        let deadline = core.poll_timeout().map(Instant::from_std);
        if let Some(deadline) = deadline
            && timer.deadline() != deadline
        {
            timer.as_mut().reset(deadline);
        }
        io.next_input(&mut core, timer.as_mut(), deadline.is_some())
            .await;
    };
    drop(presence);
    io.close(&plan, peers.control, times).await;
    let summary = core.summary();
    tracing::info!(
        reason = summary.end_reason.label(),
        duration_ms = u64::try_from(summary.duration.as_millis()).unwrap_or(u64::MAX),
        transcript_lines = summary.transcript.len(),
        total_tokens = summary.usage.total_tokens,
        "call ended"
    );
    ending::hang_up_after_apology(&plan, peers.control, times).await;
    drop(slot);
    summary
}

/// Whether one round of actions wrote to a socket, and whether a write failed.
#[derive(Clone, Copy, Debug, Default)]
struct Written {
    fed: bool,
    failed: bool,
}

impl Written {
    fn fed(&mut self, failed: bool) {
        self.fed = true;
        self.failed |= failed;
    }

    fn needs_flush(self) -> bool {
        self.fed && !self.failed
    }
}

/// One round's writes, per socket.
#[derive(Debug, Default)]
struct Writes {
    media: Written,
    agent: Written,
    standby: Written,
}

/// What carrying out the queued actions came to.
enum Carried {
    /// Everything was sent; wait for the next input.
    Done,
    /// A socket refused a write: tell the core.
    Failed(Input<'static>),
    /// The core ended the call.
    Ended(EndPlan),
}

/// Everything one call does I/O with.
struct CallIo<'a, TS, TR, D: AgentDialer> {
    twilio_tx: TS,
    twilio_rx: TR,
    dialer: &'a D,
    state: &'a AppState,
    /// The agent dial in flight, if any.
    dial: Option<LocalFuture<'a, Dial<D>>>,
    /// The prepared transport, until the core asks to open the session over it.
    transport: Option<D::Transport>,
    agent_tx: Option<D::Sink>,
    agent_rx: Option<D::Stream>,
    /// A rollover's successor session being dialled, then open beside the one in use.
    standby_dial: Option<LocalFuture<'a, Result<Session<D>, DialError>>>,
    standby: Option<Session<D>>,
    tasks: FuturesUnordered<LocalFuture<'a, (TaskId, TaskOutput)>>,
    close_requested: CancellationToken,
    shutdown_told: bool,
}

impl<'a, TS, TR, D> CallIo<'a, TS, TR, D>
where
    TS: Sink<TwilioMessage> + Unpin,
    TS::Error: Debug,
    TR: Stream<Item = Result<AggregatedMessage, ProtocolError>> + Unpin,
    D: AgentDialer,
{
    /// Carries out everything the core queued, in order, then flushes each socket once.
    async fn carry_out(&mut self, core: &mut CallCore<TwilioLeg>) -> Carried {
        let mut ending = None;
        let mut writes = Writes::default();
        while let Some(action) = core.poll_action() {
            match action {
                Action::ToMedia(text) => {
                    let failed = self.send_media(TwilioMessage::Text(text.into())).await;
                    writes.media.fed(failed);
                }
                Action::PingMedia => {
                    let failed = self
                        .send_media(TwilioMessage::Ping(Default::default()))
                        .await;
                    writes.media.fed(failed);
                }
                Action::PongMedia(payload) => {
                    let failed = self.send_media(TwilioMessage::Pong(payload.into())).await;
                    writes.media.fed(failed);
                }
                Action::ToAgent(text) => {
                    let failed = self.send_agent(AgentMessage::text(text)).await;
                    writes.agent.fed(failed);
                }
                Action::PingAgent => {
                    let failed = self
                        .send_agent(AgentMessage::Ping(Default::default()))
                        .await;
                    writes.agent.fed(failed);
                }
                Action::PreconnectAgent => {
                    let dialer = self.dialer;
                    self.dial = Some(Box::pin(async move {
                        Dial::Transport(dialer.preconnect().await)
                    }));
                }
                // Mid-call the audio waits for this: a lost socket refuses at once, and a live one
                // (an expired session) takes its close frame at once too.
                Action::CloseAgent => self.close_agent(LOST_SESSION_CLOSE).await,
                Action::OpenAgent { model } => {
                    if let Some(prepared) = self.transport.take() {
                        let dialer = self.dialer;
                        self.dial = Some(Box::pin(async move {
                            Dial::Session(dialer.open(prepared, &model).await)
                        }));
                    }
                }
                Action::DialStandby { model } => {
                    let dialer = self.dialer;
                    self.standby_dial = Some(Box::pin(async move {
                        let transport = dialer.preconnect().await?;
                        dialer.open(transport, &model).await
                    }));
                }
                Action::ToStandby(text) => {
                    if let Some((tx, _)) = self.standby.as_mut() {
                        let failed = tx.feed(AgentMessage::text(text)).await.is_err();
                        writes.standby.fed(failed);
                    }
                }
                Action::PromoteStandby => self.promote_standby(&mut writes).await,
                Action::CloseStandby => {
                    self.close_standby(LOST_SESSION_CLOSE).await;
                    writes.standby = Written::default();
                }
                Action::Record(record) => self.state.records.record(record),
                Action::RecordDurably(record) => {
                    self.state.records.record_durably(record).await;
                }
                Action::Spawn(id, task) => {
                    self.tasks
                        .push(Box::pin(run_side_task(self.state, id, task)));
                }
                Action::End(plan) => ending = Some(plan),
            }
        }
        self.flush(writes, ending).await
    }

    /// Flushes each socket written to once, and says what the round came to.
    async fn flush(&mut self, mut writes: Writes, ending: Option<EndPlan>) -> Carried {
        if writes.media.needs_flush() {
            writes.media.failed = self.twilio_tx.flush().await.is_err();
        }
        if writes.agent.needs_flush()
            && let Some(tx) = self.agent_tx.as_mut()
        {
            writes.agent.failed = tx.flush().await.is_err();
        }
        if writes.standby.needs_flush()
            && let Some((tx, _)) = self.standby.as_mut()
        {
            writes.standby.failed = tx.flush().await.is_err();
        }
        if writes.standby.failed {
            self.standby = None;
        }
        match (
            ending,
            writes.media.failed,
            writes.agent.failed,
            writes.standby.failed,
        ) {
            (Some(plan), ..) => Carried::Ended(plan),
            (None, true, ..) => Carried::Failed(Input::MediaSendFailed),
            (None, false, true, _) => Carried::Failed(Input::AgentSendFailed),
            (None, false, false, true) => Carried::Failed(Input::StandbyFailed(
                "the successor session refused a frame".to_owned(),
            )),
            (None, false, false, false) => Carried::Done,
        }
    }

    /// The successor becomes the agent's socket. What the old session was sent in this round
    /// still leaves before its close frame; what the successor was sent is flushed with the
    /// agent's writes from here on.
    async fn promote_standby(&mut self, writes: &mut Writes) {
        if writes.agent.needs_flush()
            && let Some(tx) = self.agent_tx.as_mut()
        {
            let _ = tx.flush().await;
        }
        self.close_agent(LOST_SESSION_CLOSE).await;
        writes.agent = Written::default();
        if let Some((tx, rx)) = self.standby.take() {
            self.agent_tx = Some(tx);
            self.agent_rx = Some(rx);
            writes.agent = std::mem::take(&mut writes.standby);
        }
    }

    /// Whether feeding the Twilio socket failed.
    async fn send_media(&mut self, message: TwilioMessage) -> bool {
        self.twilio_tx.feed(message).await.is_err()
    }

    /// Whether feeding the agent's socket failed; nothing is sent before it is open.
    async fn send_agent(&mut self, message: AgentMessage) -> bool {
        match self.agent_tx.as_mut() {
            Some(tx) => tx.feed(message).await.is_err(),
            None => false,
        }
    }

    /// Waits for the next thing to happen and hands it to the core.
    async fn next_input(
        &mut self,
        core: &mut CallCore<TwilioLeg>,
        timer: Pin<&mut tokio::time::Sleep>,
        timer_armed: bool,
    ) {
        tokio::select! {
            () = self.close_requested.cancelled(), if !self.shutdown_told => {
                self.shutdown_told = true;
                core.handle(Input::Shutdown, now());
            }
            frame = self.twilio_rx.next() => media_input(core, frame),
            outcome = poll_dial(&mut self.dial), if self.dial.is_some() => {
                self.dial = None;
                self.on_dialled(core, outcome);
            }
            frame = next_agent_frame(&mut self.agent_rx), if self.agent_rx.is_some() => {
                self.on_agent_frame(core, frame);
            }
            dialled = poll_dial(&mut self.standby_dial), if self.standby_dial.is_some() => {
                self.standby_dial = None;
                match dialled {
                    Ok(session) => {
                        self.standby = Some(session);
                        core.handle(Input::StandbyOpened, now());
                    }
                    Err(error) => core.handle(Input::StandbyFailed(error.to_string()), now()),
                }
            }
            frame = next_standby_frame(&mut self.standby), if self.standby.is_some() => {
                self.on_standby_frame(core, frame);
            }
            Some((id, output)) = self.tasks.next(), if !self.tasks.is_empty() => {
                core.handle(Input::TaskDone(id, output), now());
            }
            () = timer, if timer_armed => core.handle(Input::Timer, now()),
        }
    }

    fn on_dialled(&mut self, core: &mut CallCore<TwilioLeg>, outcome: Dial<D>) {
        let input = match outcome {
            Dial::Transport(Ok(prepared)) => {
                self.transport = Some(prepared);
                Input::AgentTransportReady
            }
            Dial::Transport(Err(error)) => Input::AgentTransportFailed(error.to_string()),
            Dial::Session(Ok((tx, rx))) => {
                self.agent_tx = Some(tx);
                self.agent_rx = Some(rx);
                Input::AgentOpened
            }
            Dial::Session(Err(error)) => Input::AgentOpenFailed(error.to_string()),
        };
        core.handle(input, now());
    }

    fn on_agent_frame(
        &mut self,
        core: &mut CallCore<TwilioLeg>,
        frame: Option<Result<AgentMessage, tungstenite::Error>>,
    ) {
        let now = now();
        match frame {
            Some(Ok(AgentMessage::Text(text))) => core.handle(Input::AgentText(text.as_str()), now),
            Some(Ok(AgentMessage::Binary(_))) => core.handle(Input::AgentBinary, now),
            Some(Ok(AgentMessage::Ping(_) | AgentMessage::Pong(_) | AgentMessage::Frame(_))) => {
                core.handle(Input::AgentAlive, now);
            }
            Some(Ok(AgentMessage::Close(frame))) => {
                self.agent_rx = None;
                core.handle(Input::AgentClosed(format!("{frame:?}")), now);
            }
            Some(Err(error)) => {
                self.agent_rx = None;
                core.handle(Input::AgentBroken(error.to_string()), now);
            }
            None => {
                self.agent_rx = None;
                core.handle(Input::AgentClosed("the socket ended".to_owned()), now);
            }
        }
    }

    fn on_standby_frame(
        &mut self,
        core: &mut CallCore<TwilioLeg>,
        frame: Option<Result<AgentMessage, tungstenite::Error>>,
    ) {
        let failure = match frame {
            Some(Ok(AgentMessage::Text(text))) => {
                core.handle(Input::StandbyText(text.as_str()), now());
                return;
            }
            Some(Ok(_)) => return,
            Some(Err(error)) => error.to_string(),
            None => "the socket ended".to_owned(),
        };
        self.standby = None;
        core.handle(Input::StandbyFailed(failure), now());
    }

    async fn close_standby(&mut self, within: std::time::Duration) {
        self.standby_dial = None;
        if let Some((mut tx, _rx)) = self.standby.take() {
            close_socket(&mut tx, within).await;
        }
    }

    /// Closes the agent's socket (a close frame if it still takes one) and forgets it, so a
    /// lost session stops billing and a new one can take its place.
    async fn close_agent(&mut self, within: std::time::Duration) {
        if let Some(mut tx) = self.agent_tx.take() {
            close_socket(&mut tx, within).await;
        }
        self.agent_rx = None;
    }

    /// Closes both legs as the plan says: the agent first (it must stop billing), then a
    /// drain's hang-up, then the stream with the plan's code.
    async fn close(&mut self, plan: &EndPlan, control: &impl CallControl, times: EndingTimes) {
        self.close_agent(times.agent_close_timeout).await;
        self.close_standby(times.agent_close_timeout).await;
        self.dial = None;
        ending::hang_up_before_closing(plan, control, times).await;
        let reason = CloseReason {
            code: CloseCode::from(plan.close_code),
            description: None,
        };
        let _ = self
            .twilio_tx
            .send(TwilioMessage::Close(Some(reason)))
            .await;
        let _ = self.twilio_tx.close().await;
    }
}

fn media_input(
    core: &mut CallCore<TwilioLeg>,
    frame: Option<Result<AggregatedMessage, ProtocolError>>,
) {
    let now = now();
    match frame {
        Some(Ok(AggregatedMessage::Text(text))) => core.handle(Input::MediaText(&text), now),
        Some(Ok(AggregatedMessage::Binary(_))) => core.handle(Input::MediaBinary, now),
        Some(Ok(AggregatedMessage::Ping(payload))) => {
            core.handle(Input::MediaPing(payload.to_vec()), now);
        }
        Some(Ok(AggregatedMessage::Pong(_))) => core.handle(Input::MediaAlive, now),
        Some(Ok(AggregatedMessage::Close(_))) | None => core.handle(Input::MediaClosed, now),
        Some(Err(error)) => match socket::end_reason(&error) {
            EndReason::FrameTooLarge => core.handle(Input::MediaOverflow, now),
            EndReason::InvalidText => core.handle(Input::MediaInvalidText, now),
            _ => core.handle(Input::MediaBroken(error.to_string()), now),
        },
    }
}

/// The current time on tokio's clock (which tests pause and move), as the core takes it.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Sends a close frame if the socket still takes one, within `within`.
async fn close_socket<S: Sink<AgentMessage> + Unpin>(tx: &mut S, within: std::time::Duration) {
    let close = async {
        let _ = tx.send(AgentMessage::Close(None)).await;
        let _ = tx.close().await;
    };
    let _ = tokio::time::timeout(within, close).await;
}

async fn poll_dial<T>(dial: &mut Option<LocalFuture<'_, T>>) -> T {
    match dial.as_mut() {
        Some(dial) => dial.await,
        None => std::future::pending().await,
    }
}

async fn next_standby_frame<T, R: Stream + Unpin>(session: &mut Option<(T, R)>) -> Option<R::Item> {
    match session.as_mut() {
        Some((_, rx)) => rx.next().await,
        None => std::future::pending().await,
    }
}

async fn next_agent_frame<R: Stream + Unpin>(rx: &mut Option<R>) -> Option<R::Item> {
    match rx.as_mut() {
        Some(rx) => rx.next().await,
        None => std::future::pending().await,
    }
}

/// Runs one piece of side work to completion; its result goes back to the core.
async fn run_side_task(state: &AppState, id: TaskId, task: SideTask) -> (TaskId, TaskOutput) {
    let output = match task {
        SideTask::LookupCallContext { call_sid } => {
            let found = state.store.outbound_brief(call_sid.as_str()).await;
            TaskOutput::CallContext(
                found
                    .map(|row| row.map(|(context, variables)| OutboundBrief { context, variables }))
                    .map_err(|error| format!("{error:#}")),
            )
        }
        SideTask::AskBusiness { url, body, timeout } => {
            let answer = state
                .business
                .post(&url, &WebhookId::random(), &body, timeout)
                .await;
            TaskOutput::Business(match answer {
                Ok(answer) => BusinessOutcome::Answered {
                    status: answer.status,
                    body: answer.body,
                },
                Err(BusinessError::Timeout(_)) => BusinessOutcome::TimedOut,
                Err(error) => BusinessOutcome::Unreachable(error.to_string()),
            })
        }
        SideTask::Redirect { call_sid, twiml } => TaskOutput::Redirected(
            state
                .twilio
                .redirect(call_sid.as_str(), &twiml)
                .await
                .map_err(|error| error.to_string()),
        ),
    };
    (id, output)
}

#[cfg(test)]
mod tests;
