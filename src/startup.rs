//! Builds the HTTP server from a `Config` and runs it until a drain completes; reloads
//! `AGENTS_FILE` on `SIGHUP`.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::http::KeepAlive;
use actix_web::{App, HttpServer, middleware, web};
use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::Instant;
use tracing_actix_web::TracingLogger;

use crate::admission::Occupancy;
use crate::agents::file::{self as agents_file, AgentDefaults, AgentFileErrors};
use crate::clock::{Clock, SystemClock, rfc3339};
use crate::config::Config;
use crate::limits::{self, ConnectionBudget};
use crate::metrics::EndReason;
use crate::routes;
use crate::state::AppState;
use crate::telemetry::CallRootSpan;

/// After the drain timeout, how long bridges get to close their calls before the server stops.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// After a second signal, how long bridges get to record their calls' ends (usage, session)
/// before the server stops; whatever is still live then is recorded as ended on the way out.
const STOP_NOW_GRACE: Duration = Duration::from_secs(1);

pub struct Application {
    address: SocketAddr,
    server: Server,
    state: Arc<AppState>,
    /// `SIGHUP`, when there is an agents file to reload on it.
    hangup: Option<Signal>,
}

impl Application {
    /// Binds `{HOST}:{PORT}` (port 0 picks a free port, as tests do) and prepares the server.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As `build`, measuring consent windows and call limits by `clock` (tests move it by days).
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let requested = SocketAddr::new(config.host, config.port);
        let listener = TcpListener::bind(requested)
            .with_context(|| format!("cannot listen on {requested} (HOST and PORT)"))?;
        let address = listener.local_addr()?;
        let state = AppState::build_with_clock(config, clock).await?;
        announce(&state.config);
        // Installed before the server listens, so from the moment it answers a SIGHUP
        // reloads the agents instead of ending the process (the signal's default).
        let hangup = match state.config.agents_file {
            Some(_) => {
                Some(signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?)
            }
            None => None,
        };
        let connections = connection_budget(state.config.max_concurrent_calls);
        let data = web::Data::from(Arc::clone(&state));
        let request_timeout = state.config.request_timeout;
        let server = HttpServer::new(move || {
            App::new()
                .wrap(middleware::from_fn(move |req, next| {
                    limits::read_body_within(request_timeout, req, next)
                }))
                .wrap(TracingLogger::<CallRootSpan>::new())
                .app_data(data.clone())
                .configure(routes::configure)
        })
        .workers(connections.workers)
        // actix stops accepting (the kernel queues the rest) rather than run out of descriptors.
        .max_connections(connections.budget.per_worker)
        .client_request_timeout(limits::HEAD_TIMEOUT)
        // actix times the head of a connection's first request only: on a kept-alive
        // connection a client could dribble the next head forever. One request per connection
        // costs a TCP handshake per webhook, on the proxy's private network.
        .keep_alive(KeepAlive::Disabled)
        // Media frames are small and latency-bound: never hold one back to coalesce it.
        .tcp_nodelay(true)
        .disable_signals()
        .shutdown_timeout(CLOSE_GRACE.as_secs())
        .listen(listener)?
        .run();
        Ok(Self {
            address,
            server,
            state,
            hangup,
        })
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// The address the server listens on, as bound (`HOST`, and the port picked for port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Shared state, so callers (tests, `main`) can start a drain or read metrics.
    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Serves until SIGTERM/SIGINT (or `lifecycle.begin_drain()`) has led to a finished drain.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Self {
            server,
            state,
            hangup,
            ..
        } = self;
        let supervisor = supervise(Arc::clone(&state), server.handle());
        tokio::spawn(supervisor);
        let reloader =
            hangup.map(|hangup| tokio::spawn(reload_on_hangup(Arc::clone(&state), hangup)));
        let served = server.await;
        if let Some(reloader) = reloader {
            reloader.abort();
        }
        // The last calls' records are still queued: commit them before the process exits.
        state.records.flush().await;
        record_exit(&state).await;
        served
    }
}

/// What a new operator needs to see at startup: the URLs Twilio's console wants, which optional
/// features the configuration turns on, and any value still copied from `.env.example`.
fn announce(config: &Config) {
    for (setting, url) in twilio_urls(config) {
        tracing::info!("paste into Twilio, {setting}: {url}");
    }
    tracing::info!("features: {}", features(config));
    for name in &config.placeholders {
        tracing::warn!(
            "{name} still has the example value from .env.example: Twilio and OpenAI will refuse it; set your own"
        );
    }
}

/// Where each of our webhooks goes in Twilio's console, and its URL.
fn twilio_urls(config: &Config) -> [(&'static str, String); 3] {
    let base = &config.public_base_url;
    [
        ("TwiML App Voice Request URL (POST)", base.join("/voice")),
        (
            "TwiML App Status Callback URL (POST)",
            base.join("/voice/status"),
        ),
        (
            "WhatsApp sender's incoming-message webhook (POST)",
            base.join("/messaging"),
        ),
    ]
}

/// One phrase per optional feature: on, or off with the variable that turns it on.
fn features(config: &Config) -> String {
    let outbound = match (
        &config.twilio_whatsapp_number,
        &config.twilio_call_permission_content_sid,
    ) {
        (Some(_), Some(_)) => "outbound calling on".to_owned(),
        _ => "outbound calling off (set TWILIO_WHATSAPP_NUMBER and TWILIO_CALL_PERMISSION_CONTENT_SID)"
            .to_owned(),
    };
    let api = if config.api_token.is_some() {
        "API on"
    } else {
        "API off (set CALLBRIDGE_API_TOKEN)"
    };
    let agents = if config.agents_file.is_some() {
        let names: Vec<&str> = config
            .agents
            .profiles()
            .iter()
            .map(|agent| agent.name.as_str())
            .collect();
        format!("agents by name on ({})", names.join(", "))
    } else {
        "agents by name off (one agent, \"default\"; set AGENTS_FILE)".to_owned()
    };
    let events = if config.events_url.is_some() {
        "events on"
    } else {
        "events off (set CALLBRIDGE_EVENTS_URL)"
    };
    format!("{outbound}, {api}, {agents}, {events}")
}

struct Connections {
    workers: usize,
    budget: ConnectionBudget,
}

/// Raises the open-file limit, sizes the connection cap to it and `MAX_CONCURRENT_CALLS`, and
/// says what it found: a limit too low for the calls configured is an operator's problem to fix.
/// (`max_connection_rate` is not set: it limits TLS handshakes, and TLS ends at the proxy.)
fn connection_budget(max_calls: usize) -> Connections {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let open_files = match limits::raise_open_files_limit() {
        Ok(limit) => {
            tracing::info!(
                open_files = limit,
                "open-file limit (RLIMIT_NOFILE) raised to the hard limit"
            );
            limit
        }
        Err(error) => {
            // Nothing was changed; size the cap as if the usual default were in force.
            tracing::warn!(%error, "cannot read or raise the open-file limit (RLIMIT_NOFILE)");
            1024
        }
    };
    let budget = ConnectionBudget::new(max_calls, workers, open_files);
    if budget.is_short() {
        tracing::warn!(
            open_files,
            needed = ConnectionBudget::descriptors_wanted(max_calls),
            max_connections = budget.total,
            "the open-file limit is too low for MAX_CONCURRENT_CALLS: fewer connections are accepted; raise the hard limit (ulimit -Hn) or lower MAX_CONCURRENT_CALLS"
        );
    } else {
        tracing::info!(max_connections = budget.total, workers, "connection cap");
    }
    Connections { workers, budget }
}

/// Waits for a drain request, lets live calls finish up to the drain timeout, asks the rest to
/// close, then stops the HTTP server. A second signal stops at once.
async fn supervise(state: Arc<AppState>, server: ServerHandle) {
    tokio::select! {
        () = shutdown_signal() => state.lifecycle.begin_drain(),
        () = state.lifecycle.drain_requested() => {}
    }
    let occupancy = state.admission.occupancy_at(state.clock.now_ms());
    let timeout_ms = i64::try_from(state.config.drain_timeout.as_millis()).unwrap_or(i64::MAX);
    tracing::info!(
        live = occupancy.live,
        connecting = occupancy.pending,
        "{}",
        drain_plan(occupancy, state.clock.now_ms().saturating_add(timeout_ms))
    );
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
        () = drained => {
            tracing::info!("drain complete: stopping");
            state.lifecycle.stop_streams();
            server.stop(true).await;
        }
        () = shutdown_signal() => {
            tracing::warn!("second signal: stopping now");
            state.lifecycle.close_calls();
            let _ = tokio::time::timeout(STOP_NOW_GRACE, wait_until_idle(&state)).await;
            // No grace for open connections: the calls' ends are recorded by `record_exit`.
            state.lifecycle.stop_streams();
            server.stop(false).await;
        }
    }
}

/// What a drain waits for and until when, said when it starts: a stop that seems to hang is
/// most often a drain waiting for calls, and the operator should know how to cut it short.
fn drain_plan(occupancy: Occupancy, deadline_ms: i64) -> String {
    if occupancy.is_idle() {
        return "draining: no calls to wait for; stopping".to_owned();
    }
    format!(
        "draining: waiting for {} live calls and {} answered calls whose media stream has not opened yet, \
         until {} (DRAIN_TIMEOUT_SECS), then the rest are closed; a second SIGTERM or SIGINT stops at once",
        occupancy.live,
        occupancy.pending,
        rfc3339(deadline_ms)
    )
}

/// The server has stopped and the bridges' records are committed: every call this machine
/// still carries (its bridge was stopped before it could record its end) is recorded as ended
/// by the shutdown, and the machine's lease is given up.
async fn record_exit(state: &AppState) {
    state.lease_keeper.abort();
    // Events still pending stay in the outbox; the next start (or another machine) sends them.
    if let Some(worker) = &state.events_worker {
        worker.abort();
    }
    match state
        .store
        .release_machine(EndReason::Shutdown.label(), state.clock.now_ms())
        .await
    {
        Ok(0) => {}
        Ok(ended) => tracing::warn!(
            ended,
            "recorded calls that were still live as ended by the shutdown"
        ),
        Err(error) => tracing::error!(
            error = format!("{error:#}"),
            "cannot record the end of the calls still live; they will be recorded as lost"
        ),
    }
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
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler can be installed");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler can be installed");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Why `AGENTS_FILE` was not reloaded; the agents in use stay.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("AGENTS_FILE is not set: there is no agents file to reload")]
    NoAgentsFile,
    #[error("{0}")]
    Invalid(#[from] AgentFileErrors),
    #[error("the reload did not finish: the server is shutting down")]
    Interrupted,
}

/// Reads `AGENTS_FILE` again, checked as at startup (including that a webhook secret is
/// configured if any agent calls the business). Valid: calls that start from now on get the new
/// agents (live calls keep theirs), and the number of agents is returned. Invalid: every problem
/// is logged and the agents in use are kept. `SIGHUP` calls it; tests call it directly.
pub async fn reload_agents(state: &AppState) -> Result<usize, ReloadError> {
    let Some(path) = state.config.agents_file.clone() else {
        return Err(ReloadError::NoAgentsFile);
    };
    let file = path.display().to_string();
    let defaults = AgentDefaults {
        voice: state.config.openai_voice.clone(),
        model: state.config.openai_realtime_model.clone(),
    };
    let signed = state.config.webhook_secret.is_some();
    // File reads (the agents file and its instructions files) stay off the async threads.
    let loaded = tokio::task::spawn_blocking(move || {
        // The environment as the process started with it (`.env` included): the variables
        // `authorization_env` names.
        let agents = agents_file::load(&path, &defaults, &|name| std::env::var(name).ok())?;
        if !signed && let Some(problem) = agents_file::missing_webhook_secret(&agents) {
            return Err(AgentFileErrors::whole_file(&path, problem));
        }
        Ok(agents)
    })
    .await
    .map_err(|_| ReloadError::Interrupted)?;
    match loaded {
        Ok(agents) => {
            let names: Vec<&str> = agents
                .profiles()
                .iter()
                .map(|agent| agent.name.as_str())
                .collect();
            let count = names.len();
            tracing::info!(
                file,
                agents = names.join(", "),
                "AGENTS_FILE reloaded: calls that start from now on use these agents"
            );
            state.agents.replace(agents);
            Ok(count)
        }
        Err(errors) => {
            let problems: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            tracing::error!(
                file,
                problems = problems.join("; "),
                "AGENTS_FILE not reloaded: it has problems, so the agents in use are kept"
            );
            Err(errors.into())
        }
    }
}

/// Reloads the agents on every `SIGHUP` until the server stops.
async fn reload_on_hangup(state: Arc<AppState>, mut hangup: Signal) {
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading AGENTS_FILE");
        // Both outcomes are logged by `reload_agents`.
        let _ = reload_agents(&state).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Config {
        let mut all = vec![
            ("TWILIO_ACCOUNT_SID", "AC0123456789abcdef0123456789abcdef"),
            ("TWILIO_AUTH_TOKEN", "secret-token"),
            ("OPENAI_API_KEY", "sk-test"),
            ("PUBLIC_BASE_URL", "https://abc.ngrok.app/"),
        ];
        all.extend_from_slice(pairs);
        Config::from_lookup(|name| {
            all.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .unwrap()
    }

    #[test]
    fn the_drain_says_what_it_waits_for_and_how_to_stop_at_once() {
        let deadline = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        assert_eq!(
            drain_plan(
                Occupancy {
                    live: 3,
                    pending: 1
                },
                deadline
            ),
            "draining: waiting for 3 live calls and 1 answered calls whose media stream has not opened yet, \
             until 2026-01-01T00:00:00Z (DRAIN_TIMEOUT_SECS), then the rest are closed; a second SIGTERM or SIGINT stops at once"
        );
        assert_eq!(
            drain_plan(
                Occupancy {
                    live: 0,
                    pending: 0
                },
                deadline
            ),
            "draining: no calls to wait for; stopping"
        );
    }

    #[test]
    fn the_twilio_urls_are_built_from_the_public_base_url() {
        let urls: Vec<String> = twilio_urls(&config(&[]))
            .into_iter()
            .map(|(_, url)| url)
            .collect();
        assert_eq!(
            urls,
            [
                "https://abc.ngrok.app/voice",
                "https://abc.ngrok.app/voice/status",
                "https://abc.ngrok.app/messaging",
            ]
        );
    }

    #[test]
    fn features_say_what_is_on_and_what_turns_the_rest_on() {
        assert_eq!(
            features(&config(&[])),
            "outbound calling off (set TWILIO_WHATSAPP_NUMBER and TWILIO_CALL_PERMISSION_CONTENT_SID), \
             API off (set CALLBRIDGE_API_TOKEN), agents by name off (one agent, \"default\"; set AGENTS_FILE), \
             events off (set CALLBRIDGE_EVENTS_URL)"
        );
        let token = "t".repeat(32);
        let on = config(&[
            ("TWILIO_WHATSAPP_NUMBER", "+15550001111"),
            (
                "TWILIO_CALL_PERMISSION_CONTENT_SID",
                "HX0123456789abcdef0123456789abcdef",
            ),
            ("CALLBRIDGE_API_TOKEN", &token),
            ("CALLBRIDGE_EVENTS_URL", "http://127.0.0.1:9/events"),
            (
                "CALLBRIDGE_WEBHOOK_SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ),
            (
                "AGENTS_FILE",
                concat!(env!("CARGO_MANIFEST_DIR"), "/agents.example.toml"),
            ),
        ]);
        assert_eq!(
            features(&on),
            "outbound calling on, API on, agents by name on (support, sales), events on"
        );
    }
}
