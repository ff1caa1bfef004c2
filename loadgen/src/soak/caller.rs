//! One soak call from Twilio's side: `POST /voice`, the stream, audio in real time (every
//! echo timed, every mark answered), and the end its plan asks for: `stop`, a dropped socket,
//! or waiting for callbridge to end it.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::ledger::CallLog;
use super::plan::{Ending, Scenario, lane_number};
use crate::load::{self, Bridge, Failure, Socket};
use callbridge::twilio::media_stream::{CONNECTED, MediaStream};
use callbridge_testkit::wire::{self, EVENT, FRAME_INTERVAL, FrameAudio, MARK_NAME, PAYLOAD};

/// How long a call that ends with `stop` waits for its last frames to come back first.
const LAST_FRAMES_GRACE: Duration = Duration::from_millis(500);
/// How long callbridge may take to close the stream after `stop`.
const CLOSE_AFTER_STOP: Duration = Duration::from_secs(3);
/// How long a call waits for a fault the fake was to cause (`drop-mid-reconnect`).
const FAULT_WAIT: Duration = Duration::from_secs(10);
/// How long a `refused` call waits for callbridge to give up and end it.
const SERVER_END_WAIT: Duration = Duration::from_secs(15);

/// What the harness saw of one call.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The step that failed, if the call never got going or broke unexpectedly.
    pub failure: Option<(&'static str, String)>,
    pub frames_sent: u64,
    /// Distinct frames of this call that came back.
    pub frames_back: u64,
    /// Whether the last frame sent before the end came back: audio still flowed at the end.
    pub last_frame_back: bool,
    /// Agent audio carrying another call's frames.
    pub misrouted: u64,
    /// callbridge closed the stream on its own, with this close code (`None`: without one).
    pub server_closed: Option<Option<u16>>,
    /// For calls ended with `stop`: how long callbridge took to close the stream.
    pub stop_to_close: Option<Duration>,
}

impl Outcome {
    fn failed(step: &'static str, error: impl std::fmt::Display) -> Self {
        Self {
            failure: Some((step, format!("{error:#}"))),
            ..Self::default()
        }
    }
}

/// Runs `call` to its end; the ledger then has its end time.
pub async fn run(call: &CallLog, bridge: &Bridge, audio: &FrameAudio) -> Outcome {
    let to = format!("whatsapp:{}", lane_number(call.lane));
    let (mut socket, answer) = match load::upgrade(bridge, &call.call_sid, &to).await {
        Ok(opened) => opened,
        Err(Failure { step, error }) => {
            call.ended(Instant::now(), call.plan.ending);
            return Outcome::failed(step, error);
        }
    };
    if call.plan.ending == Ending::DropBeforeStart {
        call.ended(Instant::now(), Ending::DropBeforeStart);
        drop(socket);
        return Outcome::default();
    }
    let mut stream = MediaStream::new(&call.call_sid, &bridge.account_sid);
    let start = load::start_message(&mut stream, &answer);
    for message in [CONNECTED.to_owned(), start] {
        if let Err(error) = socket.feed(Message::text(message)).await {
            call.ended(Instant::now(), call.plan.ending);
            return Outcome::failed("start", error);
        }
    }
    if let Err(error) = socket.flush().await {
        call.ended(Instant::now(), call.plan.ending);
        return Outcome::failed("start", error);
    }
    let first = Instant::now();
    call.talking_from(first);
    let mut live = Live {
        socket,
        stream,
        id: call.audio_id(),
        first,
        back: Vec::new(),
        payload: String::new(),
        outcome: Outcome::default(),
    };
    let talked = live.talk(call, audio).await;
    live.end(call, talked).await;
    live.outcome.frames_sent = live.back.len() as u64;
    live.outcome.frames_back = live.back.iter().filter(|&&b| b).count() as u64;
    live.outcome.last_frame_back = live.back.last().copied().unwrap_or(false);
    live.outcome
}

/// How the talking ended.
enum Talked {
    /// The plan's time is up: the harness ends the call.
    Done,
    /// callbridge closed the stream (at this moment, with this code).
    ServerClosed(Instant, Option<u16>),
    /// Something failed, or waited too long.
    Failed(&'static str, String),
}

struct Live {
    socket: Socket,
    stream: MediaStream,
    id: u16,
    first: Instant,
    /// Per frame sent, whether it came back.
    back: Vec<bool>,
    payload: String,
    outcome: Outcome,
}

impl Live {
    /// Sends audio every 20 ms, answering marks and counting echoes, until the plan's time is
    /// up or callbridge ends the call.
    async fn talk(&mut self, call: &CallLog, audio: &FrameAudio) -> Talked {
        let plan = &call.plan;
        let waits_for_fault = plan.scenario == Scenario::DropMidReconnect;
        let deadline = match plan.scenario {
            Scenario::DropMidReconnect => self.first + FAULT_WAIT,
            Scenario::Refused => self.first + SERVER_END_WAIT,
            _ => self.first + plan.talk,
        };
        let end = tokio::time::sleep_until(deadline.into());
        tokio::pin!(end);
        let mut faulted = waits_for_fault;
        let frame_timer = tokio::time::sleep_until(self.first.into());
        tokio::pin!(frame_timer);
        loop {
            tokio::select! {
                () = &mut end => {
                    return match plan.scenario {
                        Scenario::Refused => Talked::Failed(
                            "callbridge ending the refused call",
                            format!("still up after {SERVER_END_WAIT:?}"),
                        ),
                        _ if faulted => Talked::Failed(
                            "the fake breaking the session",
                            format!("no fault within {FAULT_WAIT:?}"),
                        ),
                        _ => Talked::Done,
                    };
                }
                () = call.faulted.notified(), if faulted => {
                    faulted = false;
                    end.as_mut().reset((Instant::now() + plan.talk).into());
                }
                () = &mut frame_timer => {
                    if let Err(error) = self.send_frame(audio).await {
                        return Talked::Failed("sending audio", error.to_string());
                    }
                    let next = self.first + FRAME_INTERVAL * u32::try_from(self.back.len()).unwrap_or(u32::MAX);
                    frame_timer.as_mut().reset(next.into());
                }
                message = self.socket.next() => {
                    if let Some(closed) = self.on_message(message).await {
                        return closed;
                    }
                }
            }
        }
    }

    async fn send_frame(
        &mut self,
        audio: &FrameAudio,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let frame = self.back.len();
        self.payload.clear();
        audio.encode(
            self.id,
            u32::try_from(frame).unwrap_or(u32::MAX),
            &mut self.payload,
        );
        let message = self.stream.media(frame, &self.payload);
        self.back.push(false);
        self.socket.send(Message::text(message)).await
    }

    /// Handles one incoming message; `Some` when the stream is over.
    async fn on_message(
        &mut self,
        message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Option<Talked> {
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|f| u16::from(f.code));
                return Some(Talked::ServerClosed(Instant::now(), code));
            }
            Some(Ok(_)) => return None,
            Some(Err(error)) => {
                return Some(Talked::Failed("the media stream", error.to_string()));
            }
            None => return Some(Talked::ServerClosed(Instant::now(), None)),
        };
        match wire::string_after(&text, EVENT) {
            Some("media") => {
                match wire::string_after(&text, PAYLOAD).and_then(wire::decode_id) {
                    Some((id, seq)) if id == self.id => {
                        if let Some(back) = self.back.get_mut(seq as usize) {
                            *back = true;
                        }
                    }
                    _ => self.outcome.misrouted += 1,
                }
                None
            }
            // Twilio echoes a mark once the audio before it has played: here, at once.
            Some("mark") => {
                let name = wire::string_after(&text, MARK_NAME)?;
                let echo = self.stream.mark(name);
                match self.socket.send(Message::text(echo)).await {
                    Ok(()) => None,
                    Err(error) => Some(Talked::Failed("answering a mark", error.to_string())),
                }
            }
            _ => None,
        }
    }

    /// Ends the call as planned, and writes down when.
    async fn end(&mut self, call: &CallLog, talked: Talked) {
        let ending = call.plan.ending;
        match talked {
            Talked::ServerClosed(at, code) => {
                self.outcome.server_closed = Some(code);
                call.ended(at, Ending::ByServer);
                return;
            }
            Talked::Failed(step, error) => {
                self.outcome.failure = Some((step, error));
                // The call still ends: as planned if it can, else by closing the socket.
                if ending != Ending::Stop {
                    call.ended(Instant::now(), Ending::DropFin);
                    return;
                }
            }
            Talked::Done => {}
        }
        match ending {
            Ending::Stop | Ending::ByServer => self.stop(call).await,
            Ending::DropFin | Ending::DropBeforeStart => {
                call.ended(Instant::now(), Ending::DropFin)
            }
            Ending::DropReset => {
                let _ = self.socket.get_ref().set_zero_linger();
                call.ended(Instant::now(), Ending::DropReset);
            }
        }
        // The socket closes when the call's state is dropped: a FIN, or a reset after
        // `set_zero_linger`.
    }

    /// Waits briefly for the last frames to come back, sends `stop`, and times callbridge's
    /// close of the stream.
    async fn stop(&mut self, call: &CallLog) {
        let grace = tokio::time::sleep(LAST_FRAMES_GRACE);
        tokio::pin!(grace);
        while !self.back.last().copied().unwrap_or(true) {
            tokio::select! {
                () = &mut grace => break,
                message = self.socket.next() => {
                    if let Some(talked) = self.on_message(message).await {
                        if let Talked::ServerClosed(at, code) = talked {
                            self.outcome.server_closed = Some(code);
                            call.ended(at, Ending::ByServer);
                        }
                        return;
                    }
                }
            }
        }
        let stop = self.stream.stop();
        let sent = self.socket.send(Message::text(stop)).await;
        let stopped = Instant::now();
        call.ended(stopped, Ending::Stop);
        if let Err(error) = sent {
            self.outcome.failure = Some(("sending stop", error.to_string()));
            return;
        }
        let closed = async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
        };
        match tokio::time::timeout(CLOSE_AFTER_STOP, closed).await {
            Ok(()) => self.outcome.stop_to_close = Some(stopped.elapsed()),
            Err(_) => {
                self.outcome.failure = Some((
                    "callbridge closing the stream after stop",
                    format!("not closed within {CLOSE_AFTER_STOP:?}"),
                ));
            }
        }
    }
}
