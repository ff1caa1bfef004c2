//! `loadgen report DIR`: pairs each N's floor and bridge runs into one table (Markdown, so it
//! goes into the README as printed), finds the highest N held and checks the performance targets.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::stats::{Percentiles, ProcessReport, RunReport};

/// "Held": nothing lost, nobody turned away, and the bridge adds at most this much at p99.
const HELD_ADDED_P99_MS: f64 = 10.0;
/// The load at which the per-call performance targets are measured.
const TARGET_CALLS: usize = 400;

#[derive(Serialize)]
struct Row {
    calls: usize,
    /// Bridge percentile minus floor percentile (steady window); not a percentile of
    /// per-frame differences, which cannot be paired across two runs.
    added_p50_ms: Option<f64>,
    added_p99_ms: Option<f64>,
    held: bool,
    floor: RunReport,
    bridge: RunReport,
}

impl Row {
    fn new(calls: usize, floor: RunReport, bridge: RunReport) -> Self {
        let added = |pick: fn(&Percentiles) -> f64| {
            Some(pick(bridge.rtt.as_ref()?) - pick(floor.rtt.as_ref()?))
        };
        let added_p50_ms = added(|p| p.p50_ms);
        let added_p99_ms = added(|p| p.p99_ms);
        let held = bridge.frames_lost == 0
            && bridge.failed_connects == 0
            && bridge.dropped_calls == 0
            && added_p99_ms.is_some_and(|added| added <= HELD_ADDED_P99_MS);
        Self {
            calls,
            added_p50_ms,
            added_p99_ms,
            held,
            floor,
            bridge,
        }
    }
}

#[derive(Serialize)]
struct Check {
    target: &'static str,
    measured: String,
    /// `None` when the runs needed were not made.
    met: Option<bool>,
}

#[derive(Serialize)]
struct Summary {
    cpus: usize,
    /// The highest N such that it and every smaller N run held.
    highest_held: usize,
    targets: Vec<Check>,
    runs: Vec<Row>,
}

pub fn run(dir: &Path, json_out: Option<&Path>) -> anyhow::Result<()> {
    let rows = read_rows(dir)?;
    anyhow::ensure!(
        !rows.is_empty(),
        "no floor-N.json / bridge-N.json pairs in {}",
        dir.display()
    );
    let highest_held = rows
        .iter()
        .take_while(|row| row.held)
        .last()
        .map_or(0, |row| row.calls);
    let summary = Summary {
        cpus: crate::workers::count(),
        highest_held,
        targets: checks(&rows, highest_held),
        runs: rows,
    };
    print!("{}", render(&summary));
    if let Some(path) = json_out {
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Rows by N, ascending; a run without its partner is skipped with a warning.
fn read_rows(dir: &Path) -> anyhow::Result<Vec<Row>> {
    let mut runs: BTreeMap<usize, (Option<RunReport>, Option<RunReport>)> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((mode, calls)) = name
            .strip_suffix(".json")
            .and_then(|stem| stem.split_once('-'))
            .and_then(|(mode, n)| Some((mode, n.parse::<usize>().ok()?)))
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        let report: RunReport = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a loadgen --json report", path.display()))?;
        let pair = runs.entry(calls).or_default();
        match mode {
            "floor" => pair.0 = Some(report),
            "bridge" => pair.1 = Some(report),
            _ => {}
        }
    }
    Ok(runs
        .into_iter()
        .filter_map(|(calls, pair)| match pair {
            (Some(floor), Some(bridge)) => Some(Row::new(calls, floor, bridge)),
            _ => {
                eprintln!("warning: N={calls} has no floor/bridge pair; left out");
                None
            }
        })
        .collect())
}

fn checks(rows: &[Row], highest_held: usize) -> Vec<Check> {
    let at = rows.iter().find(|row| row.calls == TARGET_CALLS);
    let not_run = || format!("not run (no N={TARGET_CALLS})");
    let process = at.and_then(|row| row.bridge.process.as_ref());
    let first_second_lost: u64 = rows.iter().map(|row| row.bridge.first_second_lost).sum();
    vec![
        Check {
            target: "server CPU <= 15 µs per frame round trip at 400 calls",
            measured: process.map_or_else(not_run, |p| format!("{:.1} µs", p.cpu_us_per_frame)),
            met: process.map(|p| p.cpu_us_per_frame <= 15.0),
        },
        Check {
            target: "at 400 calls: 0 lost frames, 0 failed connects, p99 within 2 ms of the floor",
            measured: at.map_or_else(not_run, |row| {
                format!(
                    "{} lost, {} failed, p99 {} ms against a floor of {} ms",
                    row.bridge.frames_lost,
                    row.bridge.failed_connects,
                    ms(row.bridge.rtt.as_ref().map(|p| p.p99_ms)),
                    ms(row.floor.rtt.as_ref().map(|p| p.p99_ms)),
                )
            }),
            met: at.map(|row| {
                row.bridge.frames_lost == 0
                    && row.bridge.failed_connects == 0
                    && row.added_p99_ms.is_some_and(|added| added <= 2.0)
            }),
        },
        Check {
            target: "highest N held >= 600 (0 lost, added p99 <= 10 ms)",
            measured: highest_held.to_string(),
            met: Some(highest_held >= 600),
        },
        Check {
            target: "server memory <= 32 KiB per live call at 400 calls",
            measured: process.map_or_else(not_run, |p| format!("{:.1} KiB", p.rss_kib_per_call)),
            met: process.map(|p| p.rss_kib_per_call <= 32.0),
        },
        Check {
            target: "every caller frame of a call's first second arrives",
            measured: format!("{first_second_lost} lost over all bridge runs"),
            met: Some(first_second_lost == 0),
        },
    ]
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

fn render(summary: &Summary) -> String {
    let cpu = |report: Option<&ProcessReport>| {
        report.map_or_else(|| "-".to_owned(), |p| format!("{:.1}", p.cpu_us_per_frame))
    };
    let mut out = String::from(
        "| N | floor p50 / p99 (ms) | bridge p50 / p99 / max (ms) | added p50 / p99 (ms) \
         | frames lost | failed connects | server CPU µs/frame | server RSS KiB/call | held |\n\
         |---:|---|---|---|---:|---:|---:|---:|---|\n",
    );
    for row in &summary.runs {
        let (floor, bridge) = (row.floor.rtt.as_ref(), row.bridge.rtt.as_ref());
        let process = row.bridge.process.as_ref();
        out += &format!(
            "| {} | {} / {} | {} / {} / {} | {} / {} | {} | {} | {} | {} | {} |\n",
            row.calls,
            ms(floor.map(|p| p.p50_ms)),
            ms(floor.map(|p| p.p99_ms)),
            ms(bridge.map(|p| p.p50_ms)),
            ms(bridge.map(|p| p.p99_ms)),
            ms(bridge.map(|p| p.max_ms)),
            ms(row.added_p50_ms),
            ms(row.added_p99_ms),
            row.bridge.frames_lost,
            row.bridge.failed_connects,
            cpu(process),
            process.map_or_else(|| "-".into(), |p| format!("{:.1}", p.rss_kib_per_call)),
            if row.held { "yes" } else { "no" },
        );
    }
    out += "\nThe harness, on the same cores (CPU per frame round trip; send lag is how late the \
            generator sent frames against their 20 ms schedule):\n\n\
            | N | fake CPU µs/frame (floor) | loadgen CPU µs/frame floor / bridge \
            | loadgen send lag p99 floor / bridge (ms) |\n|---:|---:|---|---|\n";
    for row in &summary.runs {
        out += &format!(
            "| {} | {} | {} / {} | {} / {} |\n",
            row.calls,
            cpu(row.floor.process.as_ref()),
            cpu(row.floor.harness.as_ref()),
            cpu(row.bridge.harness.as_ref()),
            ms(row.floor.send_lag.as_ref().map(|p| p.p99_ms)),
            ms(row.bridge.send_lag.as_ref().map(|p| p.p99_ms)),
        );
    }
    out += &format!("\nhighest N held: {}\n\n", summary.highest_held);
    for check in &summary.targets {
        let verdict = match check.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        out += &format!(
            "- {verdict}: {} (measured: {})\n",
            check.target, check.measured
        );
    }
    out
}
