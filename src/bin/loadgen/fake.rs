//! `loadgen fake-realtime`: an OpenAI Realtime stand-in that speaks every caller frame straight
//! back, so a frame's round trip crosses the bridge twice. It accepts any key (the tests' fake
//! checks those) and does no more per frame than one string search and one copy, so it is not
//! what a benchmark run measures.

use std::io::Write;
use std::net::TcpListener as StdListener;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::wire::{self, APPEND, AUDIO, SESSION_UPDATE, TYPE};
use crate::workers;

/// What a real session says first; callbridge logs the id.
const SESSION_CREATED: &str = r#"{"type":"session.created","event_id":"event_bench0","session":{"id":"sess_bench","type":"realtime"}}"#;
/// The answer to `session.update`, with server VAD that interrupts by itself, as configured.
const SESSION_UPDATED: &str = r#"{"type":"session.updated","event_id":"event_bench1","session":{"type":"realtime","audio":{"input":{"turn_detection":{"type":"server_vad","interrupt_response":true}}}}}"#;

/// Listens on 127.0.0.1:`port` (0 picks a free one), prints `listening on ADDR` as its first
/// line of output so a script can find the port, and serves until killed.
pub fn serve(port: u16) -> anyhow::Result<()> {
    let listener = StdListener::bind(("127.0.0.1", port)).context("cannot bind")?;
    listener.set_nonblocking(true)?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    // Every worker thread accepts on its own copy of the socket: the kernel hands each
    // connection to one of them, and a session then stays on the thread that accepted it.
    let listeners = (0..workers::count())
        .map(|_| listener.try_clone())
        .collect::<Result<Vec<_>, _>>()?;
    let workers = workers::spawn(listeners, accept);
    // Accepting only stops on an error, such as running out of file descriptors.
    let failures: std::io::Result<Vec<()>> = workers.join().into_iter().collect();
    failures.context("stopped accepting")?;
    Ok(())
}

async fn accept(listener: StdListener) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    loop {
        let (tcp, _) = listener.accept().await?;
        tokio::spawn(session(tcp));
    }
}

async fn session(tcp: TcpStream) {
    if tcp.set_nodelay(true).is_err() {
        return;
    }
    let accepted = tokio_tungstenite::accept_async_with_config(tcp, Some(wire::websocket_config()));
    let Ok(mut socket) = accepted.await else {
        return;
    };
    if socket.send(Message::text(SESSION_CREATED)).await.is_err() {
        return;
    }
    while let Some(Ok(message)) = socket.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let reply = match wire::string_after(&text, TYPE) {
            Some(APPEND) => wire::string_after(&text, AUDIO).map(wire::audio_delta),
            Some(SESSION_UPDATE) => Some(SESSION_UPDATED.to_owned()),
            _ => None,
        };
        if let Some(reply) = reply
            && socket.send(Message::text(reply)).await.is_err()
        {
            return;
        }
    }
}
