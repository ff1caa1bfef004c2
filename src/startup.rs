//! Builds the HTTP server from a `Config` and runs it until a drain completes.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use tokio::time::Instant;
use tracing_actix_web::TracingLogger;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::routes;
use crate::state::AppState;
use crate::telemetry::CallRootSpan;

/// After the drain timeout, how long bridges get to close their calls before the server stops.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

pub struct Application {
    port: u16,
    server: Server,
    state: Arc<AppState>,
}

impl Application {
    /// Binds `0.0.0.0:{PORT}` (port 0 picks a free port, as tests do) and prepares the server.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As `build`, measuring consent windows and call limits by `clock` (tests move it by days).
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("0.0.0.0", config.port))
            .with_context(|| format!("cannot listen on port {}", config.port))?;
        let port = listener.local_addr()?.port();
        let state = AppState::build_with_clock(config, clock).await?;
        let data = web::Data::from(Arc::clone(&state));
        let server = HttpServer::new(move || {
            App::new()
                .wrap(TracingLogger::<CallRootSpan>::new())
                .app_data(data.clone())
                .configure(routes::configure)
        })
        // Media frames are small and latency-bound: never hold one back to coalesce it.
        .tcp_nodelay(true)
        .disable_signals()
        .shutdown_timeout(CLOSE_GRACE.as_secs())
        .listen(listener)?
        .run();
        Ok(Self {
            port,
            server,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Shared state, so callers (tests, `main`) can start a drain or read metrics.
    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serves until SIGTERM/SIGINT (or `lifecycle.begin_drain()`) has led to a finished drain.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let supervisor = supervise(Arc::clone(&self.state), self.server.handle());
        tokio::spawn(supervisor);
        let served = self.server.await;
        // The last calls' records are still queued: commit them before the process exits.
        self.state.records.flush().await;
        served
    }
}

/// Waits for a drain request, lets live calls finish up to the drain timeout, asks the rest to
/// close, then stops the HTTP server. A second signal stops at once.
async fn supervise(state: Arc<AppState>, server: ServerHandle) {
    tokio::select! {
        () = shutdown_signal() => state.lifecycle.begin_drain(),
        () = state.lifecycle.drain_requested() => {}
    }
    let drained = async {
        let deadline = Instant::now() + state.config.drain_timeout;
        if tokio::time::timeout_at(deadline, wait_until_idle(&state))
            .await
            .is_err()
        {
            let live = state.admission.occupancy().live;
            tracing::warn!(live, "drain timeout reached: closing the remaining calls");
            state.lifecycle.close_calls();
            let _ = tokio::time::timeout(CLOSE_GRACE, wait_until_idle(&state)).await;
        }
    };
    tokio::select! {
        () = drained => tracing::info!("drain complete: stopping"),
        () = shutdown_signal() => tracing::warn!("second signal: stopping now"),
    }
    server.stop(true).await;
}

/// Returns once no call is live and no answered call is still about to connect.
async fn wait_until_idle(state: &AppState) {
    let mut occupancy = state.admission.subscribe();
    loop {
        state.admission.expire(state.clock.now_ms());
        if occupancy.borrow_and_update().is_idle() {
            return;
        }
        // Pending tokens expire on their own clock, so look again at least once a second.
        let _ = tokio::time::timeout(Duration::from_secs(1), occupancy.changed()).await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler can be installed");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler can be installed");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
