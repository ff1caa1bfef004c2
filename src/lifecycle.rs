//! Graceful shutdown: SIGTERM starts a drain (readiness fails, new calls hear "busy"), live calls
//! may finish for up to `DRAIN_TIMEOUT_SECS`, then they are asked to close politely.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    drain_requested: CancellationToken,
    close_calls: CancellationToken,
    stopping: CancellationToken,
}

impl Lifecycle {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn begin_drain(&self) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            tracing::info!("drain started: readiness now fails and new calls are turned away");
        }
        self.drain_requested.cancel();
    }

    pub async fn drain_requested(&self) {
        self.drain_requested.cancelled().await
    }

    /// Tells every live bridge to end its call now (the drain timeout has passed).
    pub fn close_calls(&self) {
        self.close_calls.cancel();
    }

    /// Each bridge holds a child of this token and ends its call when it fires.
    pub fn close_calls_token(&self) -> CancellationToken {
        self.close_calls.child_token()
    }

    /// The HTTP server is about to stop: long-lived responses (the dashboard's event streams)
    /// end now, so the server's graceful stop does not wait out its timeout for them. Streams
    /// keep running during the drain itself, so an operator can watch the last calls finish.
    pub fn stop_streams(&self) {
        self.stopping.cancel();
    }

    /// A handle that fires with `stop_streams`, for a response that outlives its handler.
    pub fn streams_stopping_token(&self) -> CancellationToken {
        self.stopping.child_token()
    }
}
