//! The event streams (`text/event-stream`) that keep an open dashboard page up to date.
//!
//! Each stream polls the database every [`POLL_INTERVAL`] and sends a page section, rendered
//! and escaped like the page itself, only when what it shows has changed: a line stored by any
//! machine reaches the page within about half a second. Durations tick in the page's script,
//! so an unchanged call costs nothing to send.
//!
//! A stream ends when its client goes away (actix drops the response body, and with it the
//! poller), when the session expires (`signed-out`, so the page goes to sign-in), when the call
//! it follows ends (`end`), and when the server is about to stop (`Lifecycle::stop_streams`),
//! so a stop never waits for an open page. During a drain streams go on, and the board says
//! the server is draining.

use std::convert::Infallible;
use std::time::Duration;

use actix_web::web::{Bytes, Data};
use askama::Template;
use futures_util::Stream;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::views::{
    HistoryFragment, HistoryView, LiveFragment, LiveView, RecentFragment, RecentView,
};
use super::{LINES_PER_CARD, LIVE_CALLS_SHOWN, RECENT_CALLS};
use crate::call::speaking::Speaking;
use crate::state::AppState;
use crate::store::dashboard::LiveCalls;
use crate::store::models::{CallDetail, CallRecord};

/// How often a stream reads the database: well within the second a page may lag the store.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A comment sent when nothing else was for this long. actix notices a client that went away
/// only when a write to it fails (the second after it left), so this bounds how long a closed
/// page's stream goes on polling: about two seconds, for three bytes a second. It also keeps
/// proxies from closing a quiet connection.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long the browser waits before reconnecting a dropped stream.
const RETRY_MS: u32 = 2000;

/// What one kind of page follows.
pub(crate) trait Watch: 'static {
    /// Reads what the page shows and appends an event for each section that changed since the
    /// last call (every section on the first). `Ok(true)` when nothing will change any more.
    async fn poll(
        &mut self,
        state: &AppState,
        now_ms: i64,
        out: &mut String,
    ) -> anyhow::Result<bool>;
}

/// Appends one event to `out`. Every line break the data holds (CR, LF or both) starts a new
/// `data:` line, so nothing in a transcript can end the event early or forge a field.
pub fn push_event(out: &mut String, event: &str, data: &str) {
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    for line in data.split("\r\n").flat_map(|part| part.split(['\r', '\n'])) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
}

/// The stream of `watch`'s events for a session that expires at `expires_at_secs`.
pub(crate) fn stream<W: Watch>(
    state: Data<AppState>,
    watch: W,
    expires_at_secs: i64,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    state.dashboard_streams.opened();
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let feed = Feed {
        stopping: state.lifecycle.streams_stopping_token(),
        state,
        watch,
        expires_at_secs,
        interval,
        last_sent: Instant::now(),
        started: false,
        finished: false,
        failing: false,
    };
    futures_util::stream::unfold(feed, |mut feed| async move {
        let chunk = feed.next_chunk().await?;
        Some((Ok(Bytes::from(chunk)), feed))
    })
}

struct Feed<W> {
    state: Data<AppState>,
    watch: W,
    expires_at_secs: i64,
    stopping: CancellationToken,
    interval: tokio::time::Interval,
    last_sent: Instant,
    started: bool,
    finished: bool,
    /// Whether the last poll failed, so a database outage is logged once, not twice a second.
    failing: bool,
}

impl<W: Watch> Feed<W> {
    /// The next bytes to send, or `None` to end the stream.
    async fn next_chunk(&mut self) -> Option<String> {
        if self.finished {
            return None;
        }
        if !self.started {
            self.started = true;
            return Some(format!("retry: {RETRY_MS}\n\n"));
        }
        loop {
            tokio::select! {
                () = self.stopping.cancelled() => return None,
                _ = self.interval.tick() => {}
            }
            let now_ms = self.state.clock.now_ms();
            if now_ms.div_euclid(1000) >= self.expires_at_secs {
                self.finished = true;
                let mut out = String::new();
                push_event(&mut out, "signed-out", "");
                return Some(out);
            }
            let mut out = String::new();
            let polled = tokio::select! {
                () = self.stopping.cancelled() => return None,
                polled = self.watch.poll(&self.state, now_ms, &mut out) => polled,
            };
            match polled {
                Ok(done) => {
                    self.failing = false;
                    self.finished = done;
                }
                Err(error) => {
                    if !self.failing {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "the dashboard cannot read the calls; retrying"
                        );
                    }
                    self.failing = true;
                }
            }
            if !out.is_empty() {
                self.last_sent = Instant::now();
                return Some(out);
            }
            if self.finished {
                return None;
            }
            if self.last_sent.elapsed() >= HEARTBEAT {
                self.last_sent = Instant::now();
                return Some(":\n\n".to_owned());
            }
        }
    }
}

impl<W> Drop for Feed<W> {
    fn drop(&mut self) {
        self.state.dashboard_streams.closed();
    }
}

/// The board: live calls and the newest recent calls.
#[derive(Default)]
pub(crate) struct BoardWatch {
    live: Option<(LiveCalls, Vec<Option<Speaking>>, bool)>,
    recent: Option<Vec<CallRecord>>,
}

impl Watch for BoardWatch {
    async fn poll(
        &mut self,
        state: &AppState,
        now_ms: i64,
        out: &mut String,
    ) -> anyhow::Result<bool> {
        let live = state
            .store
            .live_calls(LIVE_CALLS_SHOWN, LINES_PER_CARD)
            .await?;
        let speaking = live
            .calls
            .iter()
            .map(|call| state.speaking.get(&call.call.call_sid))
            .collect();
        let snapshot = (live, speaking, state.lifecycle.is_draining());
        if self.live.as_ref() != Some(&snapshot) {
            let (live, speaking, draining) = &snapshot;
            let view = LiveView::new(live, speaking, *draining, now_ms);
            push_event(out, "live", &LiveFragment { live: &view }.render()?);
            self.live = Some(snapshot);
        }
        let recent = state.store.list_calls(RECENT_CALLS, None).await?;
        if self.recent.as_ref() != Some(&recent) {
            let limit = usize::try_from(RECENT_CALLS).unwrap_or(usize::MAX);
            let view = RecentView::new(&recent, limit, true, now_ms);
            push_event(out, "recent", &RecentFragment { recent: &view }.render()?);
            self.recent = Some(recent);
        }
        Ok(false)
    }
}

/// One call's page, until the call ends.
pub(crate) struct CallWatch {
    call_sid: String,
    last: Option<(CallDetail, Option<Speaking>)>,
}

impl CallWatch {
    pub fn new(call_sid: String) -> Self {
        Self {
            call_sid,
            last: None,
        }
    }
}

impl Watch for CallWatch {
    async fn poll(
        &mut self,
        state: &AppState,
        now_ms: i64,
        out: &mut String,
    ) -> anyhow::Result<bool> {
        let Some(detail) = state.store.call(&self.call_sid).await? else {
            push_event(out, "end", "");
            return Ok(true);
        };
        let ended = detail.call.ended_at_ms.is_some();
        let snapshot = (detail, state.speaking.get(&self.call_sid));
        if self.last.as_ref() != Some(&snapshot) {
            let view = HistoryView::new(&snapshot.0, snapshot.1, now_ms);
            push_event(
                out,
                "history",
                &HistoryFragment { history: &view }.render()?,
            );
            self.last = Some(snapshot);
        }
        if ended {
            push_event(out, "end", "");
        }
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_in_data_cannot_forge_fields_or_end_the_event() {
        let mut out = String::new();
        push_event(
            &mut out,
            "live",
            "<p>a</p>\r\nevent: end\r\rdata: x\n\nretry: 1",
        );
        assert_eq!(
            out,
            "event: live\ndata: <p>a</p>\ndata: event: end\ndata: \ndata: data: x\ndata: \ndata: retry: 1\n\n"
        );
        let mut empty = String::new();
        push_event(&mut empty, "end", "");
        assert_eq!(empty, "event: end\ndata: \n\n");
    }
}
