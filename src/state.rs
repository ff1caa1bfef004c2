//! What every handler and bridge shares. One per application instance; no globals, so tests
//! can run many apps side by side in one process.

use std::sync::Arc;

use crate::admission::Admission;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;

pub struct AppState {
    pub config: Config,
    pub admission: Arc<Admission>,
    pub lifecycle: Lifecycle,
    pub metrics: Metrics,
}

impl AppState {
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Self {
            admission: Admission::new(config.max_concurrent_calls),
            config,
            lifecycle: Lifecycle::default(),
            metrics: Metrics::default(),
        })
    }
}
