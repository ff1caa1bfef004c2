//! `loadgen fake-realtime`: the testkit's echo Realtime server on every core, for a benchmark.

use std::io::Write;
use std::net::TcpListener;

use anyhow::Context;

use crate::workers;

/// Listens on 127.0.0.1:`port` (0 picks a free one), prints `listening on ADDR` as its first
/// line of output so a script can find the port, and serves until killed.
pub fn serve(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).context("cannot bind")?;
    listener.set_nonblocking(true)?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    // Every worker thread accepts on its own copy of the socket: the kernel hands each
    // connection to one of them, and a session then stays on the thread that accepted it.
    let listeners = (0..workers::count())
        .map(|_| listener.try_clone())
        .collect::<Result<Vec<_>, _>>()?;
    let workers = workers::spawn(listeners, callbridge_testkit::realtime::serve_echo);
    // Accepting only stops on an error, such as running out of file descriptors.
    let failures: std::io::Result<Vec<()>> = workers.join().into_iter().collect();
    failures.context("stopped accepting")?;
    Ok(())
}
