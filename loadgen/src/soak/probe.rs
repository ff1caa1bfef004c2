//! What the soak reads from callbridge itself: its `/metrics` gauges, its call records through
//! the API, and its memory and sockets from `/proc`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde::Serialize;

use crate::procfs::{self, SocketState};

/// How often the gauges are read while waiting for the calls to drain.
const POLL: Duration = Duration::from_millis(200);
/// Record look-ups in flight at once.
const LOOKUPS_IN_FLIGHT: usize = 8;

/// The ports that tell callbridge's sockets apart.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub server: u16,
    pub realtime: u16,
    pub twilio_rest: u16,
}

pub struct Probe {
    base: String,
    api_token: String,
    pid: u32,
    ports: Ports,
    http: reqwest::Client,
}

/// callbridge at one quiet moment.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub rss_kib: u64,
    pub rss: procfs::RssParts,
    pub open_fds: usize,
    pub sockets: SocketCounts,
    pub live_calls: i64,
    pub pending_streams: i64,
    /// How long the gauges took to reach zero once the calls were over.
    pub drained_after_ms: Option<u64>,
    pub metrics: BTreeMap<String, f64>,
}

/// callbridge's TCP sockets by what they are connected to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SocketCounts {
    pub listening: usize,
    /// To the (fake) OpenAI Realtime server.
    pub openai: usize,
    /// Accepted on callbridge's own port: media streams and HTTP requests.
    pub inbound: usize,
    /// To the (fake) Twilio REST API: reqwest's pool may keep some idle.
    pub twilio_rest: usize,
    pub other: usize,
    /// The OpenAI and inbound sockets, with their state: none should be left.
    pub details: Vec<String>,
}

/// A call's record, as `GET /calls/{sid}` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Row {
    Missing,
    Ended(String),
    /// No `ended_at_ms` or no `end_reason`.
    Open,
}

/// The metrics the soak reports, before and after.
const REPORTED_METRICS: [&str; 6] = [
    "callbridge_calls_started_total",
    "callbridge_agent_reconnects_total",
    "callbridge_calls_ended_total",
    "callbridge_openai_errors_total",
    "callbridge_frames_dropped_buffer_full_total",
    "callbridge_store_records_dropped_total",
];

impl Probe {
    pub fn new(server: &str, api_token: &str, pid: u32, ports: Ports) -> anyhow::Result<Self> {
        Ok(Self {
            base: server.trim_end_matches('/').to_owned(),
            api_token: api_token.to_owned(),
            pid,
            ports,
            // No idle connections kept: they would be counted as callbridge's inbound sockets.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(0)
                .build()?,
        })
    }

    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        procfs::current_rss_kib(self.pid)
    }

    /// The metrics, by series (`name{labels}`).
    pub async fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let response = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .context("GET /metrics")?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("GET /metrics answered {status}");
        }
        Ok(parse_metrics(&text))
    }

    /// Waits (up to `within`) until no call holds a slot, then `quiet` more, and looks.
    pub async fn settle(&self, within: Duration, quiet: Duration) -> anyhow::Result<Snapshot> {
        let start = Instant::now();
        let mut drained_after_ms = None;
        while start.elapsed() < within {
            let metrics = self.metrics().await?;
            if gauge(&metrics, "callbridge_live_calls") == 0
                && gauge(&metrics, "callbridge_pending_streams") == 0
            {
                drained_after_ms = Some(u64::try_from(start.elapsed().as_millis()).unwrap_or(0));
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        tokio::time::sleep(quiet).await;
        self.snapshot(drained_after_ms).await
    }

    pub async fn snapshot(&self, drained_after_ms: Option<u64>) -> anyhow::Result<Snapshot> {
        // Before this probe's own request, whose connection is inbound while it lasts.
        let sockets = self.sockets()?;
        let metrics = self.metrics().await?;
        Ok(Snapshot {
            rss_kib: self.rss_kib()?,
            rss: procfs::rss_parts(self.pid)?,
            open_fds: procfs::open_fds(self.pid)?,
            sockets,
            live_calls: gauge(&metrics, "callbridge_live_calls"),
            pending_streams: gauge(&metrics, "callbridge_pending_streams"),
            drained_after_ms,
            metrics: metrics
                .into_iter()
                .filter(|(series, _)| REPORTED_METRICS.iter().any(|m| series.starts_with(m)))
                .collect(),
        })
    }

    fn sockets(&self) -> anyhow::Result<SocketCounts> {
        let mut counts = SocketCounts::default();
        for socket in procfs::tcp_sockets(self.pid)? {
            let slot = if socket.state == SocketState::LISTEN {
                &mut counts.listening
            } else if socket.remote_port == self.ports.realtime {
                counts
                    .details
                    .push(format!("OpenAI, {}", socket.state.name()));
                &mut counts.openai
            } else if socket.local_port == self.ports.server {
                counts.details.push(format!(
                    "inbound from port {}, {}",
                    socket.remote_port,
                    socket.state.name()
                ));
                &mut counts.inbound
            } else if socket.remote_port == self.ports.twilio_rest {
                &mut counts.twilio_rest
            } else {
                &mut counts.other
            };
            *slot += 1;
        }
        Ok(counts)
    }

    /// Each call's record, through the API.
    pub async fn rows(&self, call_sids: &[String]) -> anyhow::Result<Vec<Row>> {
        futures_util::stream::iter(call_sids)
            .map(|sid| self.row(sid))
            .buffered(LOOKUPS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    async fn row(&self, call_sid: &str) -> anyhow::Result<Row> {
        let response = self
            .http
            .get(format!("{}/calls/{call_sid}", self.base))
            .bearer_auth(&self.api_token)
            .send()
            .await
            .context("GET /calls/{sid}")?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Row::Missing);
        }
        if !status.is_success() {
            bail!("GET /calls/{{sid}} answered {status}");
        }
        let detail: serde_json::Value = serde_json::from_str(&response.text().await?)?;
        let call = &detail["call"];
        Ok(
            match (call["ended_at_ms"].as_i64(), call["end_reason"].as_str()) {
                (Some(_), Some(reason)) => Row::Ended(reason.to_owned()),
                _ => Row::Open,
            },
        )
    }
}

fn gauge(metrics: &BTreeMap<String, f64>, name: &str) -> i64 {
    // Gauges are whole numbers of calls; a missing one reads as -1, which never passes as 0.
    #[allow(clippy::cast_possible_truncation)]
    metrics.get(name).map_or(-1, |v| *v as i64)
}

/// OpenMetrics text: `series value` per line, comments skipped.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_by_series() {
        let metrics = callbridge::metrics::Metrics::default();
        metrics.agent_reconnected.inc();
        let occupancy = callbridge::admission::Occupancy {
            pending: 2,
            live: 3,
        };
        let text = metrics.render(occupancy, false).unwrap();
        let parsed = parse_metrics(&text);
        assert_eq!(gauge(&parsed, "callbridge_live_calls"), 3);
        assert_eq!(gauge(&parsed, "callbridge_pending_streams"), 2);
        assert_eq!(
            parsed[r#"callbridge_agent_reconnects_total{outcome="ok"}"#],
            1.0
        );
        assert_eq!(gauge(&parsed, "callbridge_no_such_gauge"), -1);
    }
}
