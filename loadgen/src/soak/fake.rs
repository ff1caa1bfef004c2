//! The soak's fake OpenAI Realtime server: the benchmark's echo (every caller frame comes back
//! as agent audio), plus the faults each call's plan asks for, and a log of every session it
//! accepted, refused and saw close. It finds a session's call by the lane in the upgrade's
//! `?model=` before it answers the upgrade, so it can refuse or delay a call's new sessions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

use super::ledger::{CallLog, Closer, Fault, Ledger, SLOW_HANDSHAKE, Upgrade};
use super::plan::lane_of_target;
use crate::workers;
use callbridge_testkit::wire::{self, APPEND, AUDIO, SESSION_UPDATE, TYPE};

const SESSION_CREATED: &str = r#"{"type":"session.created","event_id":"event_soak0","session":{"id":"sess_soak","type":"realtime"}}"#;
const SESSION_UPDATED: &str = r#"{"type":"session.updated","event_id":"event_soak1","session":{"type":"realtime","audio":{"input":{"turn_detection":{"type":"server_vad","interrupt_response":true}}}}}"#;
/// What OpenAI sends when a session reaches its maximum age.
const SESSION_EXPIRED: &str = r#"{"type":"error","event_id":"event_soak2","error":{"type":"invalid_request_error","code":"session_expired","message":"Your session hit the maximum duration of 60 minutes.","param":null,"event_id":null}}"#;
/// How long the request line of an upgrade may take to arrive.
const REQUEST_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long answering callbridge's close may take.
const CLOSE_ANSWER_TIMEOUT: Duration = Duration::from_millis(100);
/// The longest request line looked at; callbridge's are well under it.
const REQUEST_LINE_MAX: usize = 2048;

/// Serves on every core from `listener` until the process ends.
pub fn start(listener: std::net::TcpListener, ledger: &Arc<Ledger>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listeners = (0..workers::count())
        .map(|_| Ok((listener.try_clone()?, Arc::clone(ledger))))
        .collect::<std::io::Result<Vec<_>>>()?;
    // Never joined: the fake serves until the soak is over and the process exits.
    drop(workers::spawn(listeners, |(listener, ledger)| async move {
        let Ok(listener) = TcpListener::from_std(listener) else {
            return;
        };
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(session(tcp, Arc::clone(&ledger)));
        }
    }));
    Ok(())
}

/// Where a session is written down: with its call, or among the strays.
enum Owner {
    Call(Arc<CallLog>, usize),
    Stray(Arc<Ledger>, usize),
}

/// A session's frames and how it ended, written down once it is over.
struct Ended {
    at: Instant,
    closer: Closer,
    frames: u64,
    misrouted: u64,
}

impl Owner {
    fn audio_id(&self) -> Option<u16> {
        match self {
            Self::Call(call, _) => Some(call.audio_id()),
            Self::Stray(..) => None,
        }
    }

    fn finish(&self, ended: Ended) {
        match self {
            Self::Call(call, session) => {
                call.session_closed(*session, ended.at, ended.closer);
                call.frames(*session, ended.frames, ended.misrouted);
            }
            Self::Stray(ledger, session) => {
                ledger.stray_closed(*session, ended.at, ended.closer, ended.frames);
            }
        }
    }
}

async fn session(tcp: TcpStream, ledger: Arc<Ledger>) {
    if tcp.set_nodelay(true).is_err() {
        return;
    }
    let found = request_target(&tcp)
        .await
        .as_deref()
        .and_then(lane_of_target)
        .and_then(|lane| ledger.call_on_lane(lane));
    let decision = found
        .as_ref()
        .map_or(Upgrade::Accept(None), |(call, _)| call.on_upgrade());
    if decision == Upgrade::Slow {
        tokio::time::sleep(SLOW_HANDSHAKE).await;
    }
    // tungstenite's callback signature fixes the (large) error type.
    #[allow(clippy::result_large_err)]
    let answer = |_: &Request, response: Response| {
        if decision == Upgrade::Refuse {
            let mut refusal = ErrorResponse::new(None);
            *refusal.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Err(refusal)
        } else {
            Ok(response)
        }
    };
    let accepted = tokio_tungstenite::accept_hdr_async_with_config(
        tcp,
        answer,
        Some(wire::websocket_config()),
    )
    .await;
    let Ok(socket) = accepted else {
        return;
    };
    let opened = Instant::now();
    let owner = match found {
        Some((call, late)) => {
            let session = call.session_opened(opened, late);
            Owner::Call(call, session)
        }
        None => {
            let session = ledger.stray_opened(opened);
            Owner::Stray(ledger, session)
        }
    };
    let fault = match decision {
        Upgrade::Accept(fault) => fault,
        Upgrade::Refuse | Upgrade::Slow => None,
    };
    echo(socket, owner, fault, opened).await;
}

/// The upgrade's request target (`/v1/realtime?model=…`), read without consuming it: the
/// handshake then reads the request as usual.
async fn request_target(tcp: &TcpStream) -> Option<String> {
    let mut buffer = vec![0u8; REQUEST_LINE_MAX];
    let line = tokio::time::timeout(REQUEST_LINE_TIMEOUT, async {
        loop {
            let seen = tcp.peek(&mut buffer).await.ok()?;
            if seen == 0 {
                return None;
            }
            if let Some(end) = buffer[..seen].windows(2).position(|w| w == b"\r\n") {
                return Some(String::from_utf8_lossy(&buffer[..end]).into_owned());
            }
            if seen == buffer.len() {
                return None;
            }
            // Part of the line is in: peek finds the same bytes until more arrive.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .ok()??;
    line.split(' ').nth(1).map(str::to_owned)
}

/// Echoes the caller's audio until callbridge closes the session, breaking it as `fault` says.
async fn echo(
    mut socket: WebSocketStream<TcpStream>,
    owner: Owner,
    mut fault: Option<Fault>,
    opened: Instant,
) {
    let (mut frames, mut misrouted) = (0, 0);
    let fault_at = match fault {
        Some(Fault::Reset(after) | Fault::Expire(after)) => opened + after,
        None => opened,
    };
    let timer = tokio::time::sleep_until(fault_at.into());
    tokio::pin!(timer);
    let expected = owner.audio_id();
    let closer = if socket.send(Message::text(SESSION_CREATED)).await.is_err() {
        Closer::BridgeEof
    } else {
        loop {
            tokio::select! {
                () = &mut timer, if fault.is_some() => {
                    if let Owner::Call(call, session) = &owner {
                        let expired = matches!(fault, Some(Fault::Expire(_)));
                        call.fault(*session, Instant::now(), expired);
                    }
                    if matches!(fault.take(), Some(Fault::Reset(_))) {
                        // A reset, not a close: what a dropped connection looks like.
                        let _ = socket.get_ref().set_zero_linger();
                        break Closer::Fake;
                    }
                    if socket.send(Message::text(SESSION_EXPIRED)).await.is_err() {
                        break Closer::BridgeEof;
                    }
                }
                message = socket.next() => {
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) => {
                            // The close's answer, which tungstenite queued on reading it.
                            let flushed = socket.flush();
                            let _ = tokio::time::timeout(CLOSE_ANSWER_TIMEOUT, flushed).await;
                            break Closer::BridgeClose;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(error)) => break Closer::BridgeError(error.to_string()),
                        None => break Closer::BridgeEof,
                    };
                    let reply = match wire::string_after(&text, TYPE) {
                        Some(APPEND) => wire::string_after(&text, AUDIO).map(|audio| {
                            frames += 1;
                            let frame = wire::decode_id(audio);
                            match (&owner, frame) {
                                (Owner::Call(call, _), Some((id, seq))) if Some(id) == expected => {
                                    call.heard(seq);
                                }
                                (Owner::Call(..), _) => misrouted += 1,
                                (Owner::Stray(..), _) => {}
                            }
                            wire::audio_delta(audio)
                        }),
                        Some(SESSION_UPDATE) => Some(SESSION_UPDATED.to_owned()),
                        _ => None,
                    };
                    if let Some(reply) = reply
                        && socket.send(Message::text(reply)).await.is_err()
                    {
                        break Closer::BridgeEof;
                    }
                }
            }
        }
    };
    owner.finish(Ended {
        at: Instant::now(),
        closer,
        frames,
        misrouted,
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use callbridge::openai::client::{AgentDialer, RealtimeDialer};
    use futures_util::{SinkExt, StreamExt};
    use secrecy::SecretString;
    use tokio_tungstenite::tungstenite::Message;

    use super::*;
    use crate::soak::ledger::Closer;
    use crate::soak::plan::{CallPlan, Ending, Scenario, lane_model};

    fn plan(index: usize, scenario: Scenario) -> CallPlan {
        CallPlan {
            index,
            scenario,
            ending: Ending::Stop,
            talk: Duration::from_secs(1),
            fault_after: Duration::from_millis(150),
        }
    }

    struct Client {
        tx: <RealtimeDialer as AgentDialer>::Sink,
        rx: <RealtimeDialer as AgentDialer>::Stream,
    }

    /// Opens a session the way callbridge does, for `lane`'s model.
    async fn open(dialer: &RealtimeDialer, model: &str) -> Result<Client, String> {
        let transport = dialer.preconnect().await.map_err(|e| e.to_string())?;
        let (tx, rx) = dialer
            .open(transport, model)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Client { tx, rx })
    }

    impl Client {
        async fn next_text(&mut self) -> Result<String, String> {
            loop {
                match self.rx.next().await {
                    Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(error.to_string()),
                    None => return Err("ended".into()),
                }
            }
        }

        async fn append(&mut self, id: u16, seq: u32) {
            let mut payload = String::new();
            FrameAudio::new().encode(id, seq, &mut payload);
            let append = callbridge::openai::events::append_audio(&payload);
            self.tx.send(Message::text(append)).await.unwrap();
        }
    }

    use callbridge_testkit::wire::FrameAudio;

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what} did not happen");
    }

    #[tokio::test]
    async fn echoes_breaks_refuses_and_logs_sessions_as_each_call_s_plan_says() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}/v1/realtime", listener.local_addr().unwrap());
        let ledger = Arc::new(Ledger::new(4));
        start(listener, &ledger).unwrap();
        let dialer = RealtimeDialer::new(&url, SecretString::from("key"));

        let refused = ledger
            .start_call(plan(7, Scenario::Refused), "CA7".into())
            .unwrap();
        let mut first = open(&dialer, &lane_model(refused.lane)).await.unwrap();
        assert!(first.next_text().await.unwrap().contains("session.created"));
        first.append(7, 0).await;
        first.append(9, 1).await;
        let echo = first.next_text().await.unwrap();
        assert_eq!(
            wire::string_after(&echo, wire::DELTA).and_then(wire::decode_id),
            Some((7, 0))
        );
        // The reset comes at fault_after: the socket breaks without a close.
        let broken = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Err(error) = first.next_text().await {
                    return error;
                }
            }
        })
        .await
        .expect("the fake resets the first session");
        assert!(!broken.contains("ended"), "a reset, not a close: {broken}");
        assert!(refused.state().fault_at.is_some());
        let Err(refusal) = open(&dialer, &lane_model(refused.lane)).await else {
            panic!("a refused call's new session was accepted");
        };
        assert!(refusal.contains("503"), "{refusal}");
        assert!(open(&dialer, &lane_model(refused.lane)).await.is_err());
        {
            let state = refused.state();
            assert_eq!(state.refusals, 2);
            assert_eq!(state.sessions.len(), 1);
            let session = &state.sessions[0];
            assert!(matches!(session.closed, Some((_, Closer::Fake))));
            assert_eq!((session.frames, session.misrouted), (2, 1));
            assert_eq!(state.heard, vec![1]);
        }

        let expired = ledger
            .start_call(plan(8, Scenario::Expired), "CA8".into())
            .unwrap();
        let mut client = open(&dialer, &lane_model(expired.lane)).await.unwrap();
        let error = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let text = client.next_text().await.unwrap();
                if text.contains(r#""type":"error""#) {
                    return text;
                }
            }
        })
        .await
        .expect("the fake sends session_expired");
        assert!(error.contains("session_expired"), "{error}");
        client.tx.send(Message::Close(None)).await.unwrap();
        eventually("the close is logged", || {
            matches!(
                expired.state().sessions[0].closed,
                Some((_, Closer::BridgeClose))
            )
        })
        .await;
        assert!(expired.state().sessions[0].expired_sent.is_some());
        // Its next session is served as usual.
        let mut next = open(&dialer, &lane_model(expired.lane)).await.unwrap();
        next.append(8, 5).await;
        assert!(next.next_text().await.unwrap().contains("session.created"));
        drop(next);
        eventually(
            "the end is logged",
            || matches!(expired.state().sessions.get(1), Some(s) if s.closed.is_some()),
        )
        .await;

        // A model naming no lane of the soak is a stray, served all the same.
        let mut stray = open(&dialer, "gpt-realtime").await.unwrap();
        assert!(stray.next_text().await.unwrap().contains("session.created"));
        drop(stray);
        eventually("the stray is logged", || {
            ledger.strays().first().is_some_and(|s| s.closed.is_some())
        })
        .await;
    }
}
