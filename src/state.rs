//! What every handler and bridge shares. One per application instance; no globals, so tests
//! can run many apps side by side in one process.

use std::sync::Arc;

use crate::admission::Admission;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::openai::client::RealtimeDialer;

pub struct AppState {
    pub config: Config,
    pub admission: Arc<Admission>,
    pub lifecycle: Lifecycle,
    pub metrics: Metrics,
    pub dialer: RealtimeDialer,
}

impl AppState {
    pub fn new(config: Config) -> Arc<Self> {
        let dialer = RealtimeDialer::new(
            &config.openai_realtime_url,
            &config.openai_realtime_model,
            config.openai_api_key.clone(),
        );
        Arc::new(Self {
            dialer,
            admission: Admission::new(config.max_concurrent_calls),
            config,
            lifecycle: Lifecycle::default(),
            metrics: Metrics::default(),
        })
    }
}
