//! The driver: the thin, I/O-owning half of a call. It owns the two sockets, the timer, the
//! agent dial and the side tasks; it turns whatever happens into an [`Input`] for the core and
//! carries out the core's [`Action`]s. It makes no decisions of its own.
//!
//! The loop waits only for its next input. Side work (database reads, and later tools and
//! lookups) runs as futures beside it, polled by the same `select!`, and comes back as an input.
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
use tokio_tungstenite::tungstenite::Message as AgentMessage;
use tokio_util::sync::CancellationToken;

use crate::admission::CallSlot;
use crate::call::core::{
    Action, CallCore, CallSetup, CallSummary, Input, OutboundContext, SideTask, TaskId, TaskOutput,
};
use crate::call::ending::{self, EndPlan};
use crate::call::leg::{CallControl, TwilioLeg};
use crate::openai::client::{AgentDialer, DialError};
use crate::state::AppState;

type TwilioMessage = actix_ws::Message;
type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// The agent dial in flight: first the transport, then (once `start` was checked) the upgrade.
enum Dial<D: AgentDialer> {
    Transport(Result<D::Transport, DialError>),
    Session(Result<(D::Sink, D::Stream), DialError>),
}

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
    mut twilio_tx: TS,
    mut twilio_rx: TR,
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
    let Peers { dialer, control } = peers;
    let times = setup.settings.ending;
    let mut core = CallCore::new(TwilioLeg::default(), setup);
    let mut dial: Option<LocalFuture<'_, Dial<D>>> = None;
    let mut transport: Option<D::Transport> = None;
    let mut agent_tx: Option<D::Sink> = None;
    let mut agent_rx: Option<D::Stream> = None;
    let mut tasks: FuturesUnordered<LocalFuture<'_, (TaskId, TaskOutput)>> =
        FuturesUnordered::new();
    let mut shutdown_told = false;
    let timer = tokio::time::sleep_until(Instant::now());
    let mut timer = std::pin::pin!(timer);

    let plan = loop {
        // Carry out everything the last input asked for, then flush each socket once.
        let mut ending: Option<EndPlan> = None;
        let (mut media_fed, mut agent_fed) = (false, false);
        let (mut media_failed, mut agent_failed) = (false, false);
        while let Some(action) = core.poll_action() {
            match action {
                Action::ToMedia(text) => {
                    media_fed = true;
                    media_failed |= twilio_tx
                        .feed(TwilioMessage::Text(text.into()))
                        .await
                        .is_err();
                }
                Action::PingMedia => {
                    media_fed = true;
                    media_failed |= twilio_tx
                        .feed(TwilioMessage::Ping(Default::default()))
                        .await
                        .is_err();
                }
                Action::PongMedia(payload) => {
                    media_fed = true;
                    media_failed |= twilio_tx
                        .feed(TwilioMessage::Pong(payload.into()))
                        .await
                        .is_err();
                }
                Action::ToAgent(text) => {
                    if let Some(tx) = agent_tx.as_mut() {
                        agent_fed = true;
                        agent_failed |= tx.feed(AgentMessage::text(text)).await.is_err();
                    }
                }
                Action::PingAgent => {
                    if let Some(tx) = agent_tx.as_mut() {
                        agent_fed = true;
                        agent_failed |= tx
                            .feed(AgentMessage::Ping(Default::default()))
                            .await
                            .is_err();
                    }
                }
                Action::PreconnectAgent => {
                    dial = Some(Box::pin(async {
                        Dial::Transport(dialer.preconnect().await)
                    }));
                }
                Action::OpenAgent { model } => {
                    if let Some(prepared) = transport.take() {
                        dial = Some(Box::pin(async move {
                            Dial::Session(dialer.open(prepared, &model).await)
                        }));
                    }
                }
                Action::Record(record) => state.records.record(record),
                Action::RecordTranscript(record) => state.records.record_transcript(record).await,
                Action::Spawn(id, task) => tasks.push(Box::pin(run_side_task(state, id, task))),
                Action::End(plan) => ending = Some(plan),
            }
        }
        if media_fed && !media_failed {
            media_failed = twilio_tx.flush().await.is_err();
        }
        if agent_fed && !agent_failed {
            agent_failed = match agent_tx.as_mut() {
                Some(tx) => tx.flush().await.is_err(),
                None => false,
            };
        }
        if let Some(plan) = ending {
            break plan;
        }
        if media_failed {
            core.handle(Input::MediaSendFailed, now());
            continue;
        }
        if agent_failed {
            core.handle(Input::AgentSendFailed, now());
            continue;
        }

        if let Some(deadline) = core.poll_timeout() {
            let deadline = Instant::from_std(deadline);
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
        }
        tokio::select! {
            () = close_requested.cancelled(), if !shutdown_told => {
                shutdown_told = true;
                core.handle(Input::Shutdown, now());
            }

            frame = twilio_rx.next() => {
                let now = now();
                match frame {
                    Some(Ok(AggregatedMessage::Text(text))) => core.handle(Input::MediaText(&text), now),
                    Some(Ok(AggregatedMessage::Binary(_))) => core.handle(Input::MediaBinary, now),
                    Some(Ok(AggregatedMessage::Ping(payload))) => {
                        core.handle(Input::MediaPing(payload.to_vec()), now);
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => core.handle(Input::MediaAlive, now),
                    Some(Ok(AggregatedMessage::Close(_))) | None => core.handle(Input::MediaClosed, now),
                    Some(Err(ProtocolError::Overflow)) => core.handle(Input::MediaOverflow, now),
                    Some(Err(error)) => core.handle(Input::MediaBroken(error.to_string()), now),
                }
            }

            outcome = poll_dial(&mut dial), if dial.is_some() => {
                dial = None;
                let now = now();
                match outcome {
                    Dial::Transport(Ok(prepared)) => {
                        transport = Some(prepared);
                        core.handle(Input::AgentTransportReady, now);
                    }
                    Dial::Transport(Err(error)) => {
                        core.handle(Input::AgentTransportFailed(error.to_string()), now);
                    }
                    Dial::Session(Ok((tx, rx))) => {
                        agent_tx = Some(tx);
                        agent_rx = Some(rx);
                        core.handle(Input::AgentOpened, now);
                    }
                    Dial::Session(Err(error)) => {
                        core.handle(Input::AgentOpenFailed(error.to_string()), now);
                    }
                }
            }

            frame = next_agent_frame(&mut agent_rx), if agent_rx.is_some() => {
                let now = now();
                match frame {
                    Some(Ok(AgentMessage::Text(text))) => core.handle(Input::AgentText(text.as_str()), now),
                    Some(Ok(AgentMessage::Binary(_))) => core.handle(Input::AgentBinary, now),
                    Some(Ok(AgentMessage::Ping(_) | AgentMessage::Pong(_) | AgentMessage::Frame(_))) => {
                        core.handle(Input::AgentAlive, now);
                    }
                    Some(Ok(AgentMessage::Close(frame))) => {
                        agent_rx = None;
                        core.handle(Input::AgentClosed(format!("{frame:?}")), now);
                    }
                    Some(Err(error)) => {
                        agent_rx = None;
                        core.handle(Input::AgentBroken(error.to_string()), now);
                    }
                    None => {
                        agent_rx = None;
                        core.handle(Input::AgentClosed("the socket ended".to_owned()), now);
                    }
                }
            }

            Some((id, output)) = tasks.next(), if !tasks.is_empty() => {
                core.handle(Input::TaskDone(id, output), now());
            }

            () = &mut timer, if core.poll_timeout().is_some() => {
                core.handle(Input::Timer, now());
            }
        }
    };

    // The ending, as the plan says: the agent first (it must stop billing), then a drain's
    // hang-up, then the stream; a failed call's last hang-up waits for its apology.
    if let Some(tx) = agent_tx.as_mut() {
        let close = async {
            let _ = tx.send(AgentMessage::Close(None)).await;
            let _ = tx.close().await;
        };
        let _ = tokio::time::timeout(times.agent_close_timeout, close).await;
    }
    drop(agent_rx);
    drop(dial);
    ending::hang_up_before_closing(&plan, control, times).await;
    let reason = CloseReason {
        code: CloseCode::from(plan.close_code),
        description: None,
    };
    let _ = twilio_tx.send(TwilioMessage::Close(Some(reason))).await;
    let _ = twilio_tx.close().await;
    let summary = core.summary();
    tracing::info!(
        reason = summary.end_reason.label(),
        duration_ms = u64::try_from(summary.duration.as_millis()).unwrap_or(u64::MAX),
        transcript_lines = summary.transcript.len(),
        total_tokens = summary.usage.total_tokens,
        "call ended"
    );
    ending::hang_up_after_apology(&plan, control, times).await;
    drop(slot);
    summary
}

/// The current time on tokio's clock (which tests pause and move), as the core takes it.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

async fn poll_dial<D: AgentDialer>(dial: &mut Option<LocalFuture<'_, Dial<D>>>) -> Dial<D> {
    match dial.as_mut() {
        Some(dial) => dial.await,
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
                    .map(|row| row.map(|(agent, context)| OutboundContext { agent, context }))
                    .map_err(|error| format!("{error:#}")),
            )
        }
    };
    (id, output)
}

#[cfg(test)]
mod tests;
