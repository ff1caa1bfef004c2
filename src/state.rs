//! What every handler and bridge shares. One per application instance; no globals, so tests
//! can run many apps side by side in one process.

use std::sync::Arc;

use anyhow::Context;

use crate::admission::Admission;
use crate::agents::{Agents, AgentsHandle};
use crate::call::speaking::SpeakingBoard;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::dashboard::OpenStreams;
use crate::events::worker::EventsWorker;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::openai::client::RealtimeDialer;
use crate::store::Store;
use crate::store::machines::{self, MachineId};
use crate::store::writer::RecordWriter;
use crate::twilio::rest::TwilioRest;
use crate::webhooks::BusinessClient;

pub struct AppState {
    pub config: Config,
    /// The agents new calls are answered by; `SIGHUP` replaces them when `AGENTS_FILE` is set.
    pub agents: AgentsHandle,
    pub admission: Arc<Admission>,
    pub lifecycle: Lifecycle,
    pub metrics: Arc<Metrics>,
    pub dialer: RealtimeDialer,
    pub store: Store,
    pub records: RecordWriter,
    pub clock: Arc<dyn Clock>,
    pub twilio: TwilioRest,
    /// Signs and sends every request to the business (tools, call context, events).
    pub business: BusinessClient,
    /// Renews this machine's lease until the process exits (see `store::machines`).
    pub lease_keeper: tokio::task::AbortHandle,
    /// Delivers events to `CALLBRIDGE_EVENTS_URL`, when it is set (see `events`).
    pub events_worker: Option<tokio::task::AbortHandle>,
    /// Who is speaking on the calls this machine carries, for the dashboard.
    pub speaking: SpeakingBoard,
    /// The dashboard's event streams open on this machine.
    pub dashboard_streams: OpenStreams,
}

impl AppState {
    /// Opens the database (applying migrations), takes this machine's lease (recording the calls
    /// its previous incarnation was cut off from as lost) and starts the record writer, and the
    /// events worker when `CALLBRIDGE_EVENTS_URL` is set.
    pub async fn build(config: Config) -> anyhow::Result<Arc<Self>> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As `build`, with the clock consent windows and call limits are measured by.
    pub async fn build_with_clock(
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Arc<Self>> {
        crate::tls::install_crypto_provider();
        let machine = config.machine_id.clone().unwrap_or_else(MachineId::random);
        let mut store = Store::connect_as(&config.database_url, machine)
            .await
            .context("DATABASE_URL")?;
        // Before any clone is made: every copy of the store then writes events.
        if config.events_url.is_some() {
            store.enable_events();
        }
        let lost = store
            .claim_machine(clock.now_ms())
            .await
            .context("cannot register this machine in the database")?;
        if lost > 0 {
            tracing::warn!(
                lost,
                machine = %store.machine(),
                "this machine stopped last time without recording the end of its calls: recorded them as lost"
            );
        }
        let metrics = Arc::new(Metrics::default());
        let records = RecordWriter::spawn(store.clone(), Arc::clone(&metrics), Arc::clone(&clock));
        let dialer =
            RealtimeDialer::new(&config.openai_realtime_url, config.openai_api_key.clone());
        let twilio = TwilioRest::new(
            &config.twilio_api_base_url,
            config.twilio_account_sid.as_str(),
            config.twilio_auth_token.clone(),
            config.twilio_request_timeout,
        )?;
        let business = BusinessClient::new(config.webhook_secret.clone(), Arc::clone(&clock))?;
        let lease_keeper = machines::spawn_lease_keeper(store.clone(), Arc::clone(&clock));
        let events_worker = config.events_url.as_ref().map(|url| {
            EventsWorker::new(
                store.clone(),
                business.clone(),
                url.clone(),
                config.events.clone(),
                Arc::clone(&metrics),
                Arc::clone(&clock),
            )
            .spawn()
        });
        Ok(Arc::new(Self {
            agents: AgentsHandle::new(Agents::clone(&config.agents)),
            twilio,
            business,
            admission: Admission::new(config.max_concurrent_calls),
            config,
            lifecycle: Lifecycle::default(),
            metrics,
            dialer,
            store,
            records,
            clock,
            lease_keeper,
            events_worker,
            speaking: SpeakingBoard::default(),
            dashboard_streams: OpenStreams::default(),
        }))
    }
}
