//! The soak's verdict: what every call, session, record and gauge came to, the checks, and the
//! summary printed (Markdown tables) and written as JSON.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::caller::Outcome;
use super::ledger::{CallLog, CallState, Closer, SessionLog};
use super::plan::{Ending, Scenario};
use super::probe::{Row, Snapshot};
use crate::stats::{Failures, Percentiles};

/// The longest a session may stay open after its call ended.
pub const CLOSE_LIMIT: Duration = Duration::from_secs(1);
/// How far memory after the soak may be from memory after the warm-up.
const RSS_TOLERANCE_PERCENT: f64 = 10.0;
/// callbridge's close code for a call its agent failed (the apology follows).
const APOLOGY_CLOSE_CODE: u16 = 1011;
/// Attempts callbridge makes to replace a lost session before it gives up.
const RECONNECT_ATTEMPTS: u32 = 3;

/// The run's settings, echoed in the report.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub calls: usize,
    pub warmup_calls: usize,
    pub concurrency: usize,
    pub lanes: usize,
    pub rollover_secs: u64,
    pub mix: String,
    pub seed: u64,
}

/// What the run gathered, for `build`.
pub struct Gathered {
    pub settings: Settings,
    pub calls: Vec<(Arc<CallLog>, Outcome)>,
    pub strays: Vec<SessionLog>,
    pub idle: Snapshot,
    pub warm: Snapshot,
    pub end: Snapshot,
    pub peak_rss_kib: u64,
    pub checkpoints: Vec<Checkpoint>,
    pub cpu_seconds: f64,
    pub soak_seconds: f64,
    pub hang_ups: HashMap<String, usize>,
    pub rows: HashMap<String, Row>,
}

/// callbridge at a quiet moment after some of the soak's calls.
#[derive(Clone, Debug, Serialize)]
pub struct Checkpoint {
    /// Soak calls run so far (after the warm-up).
    pub calls: usize,
    pub rss_kib: u64,
    pub rss: crate::procfs::RssParts,
    pub live_calls: i64,
    pub pending_streams: i64,
    pub openai_sockets: usize,
    pub inbound_sockets: usize,
}

impl Checkpoint {
    pub fn new(calls: usize, quiet: &Snapshot) -> Self {
        Self {
            calls,
            rss_kib: quiet.rss_kib,
            rss: quiet.rss,
            live_calls: quiet.live_calls,
            pending_streams: quiet.pending_streams,
            openai_sockets: quiet.sockets.openai,
            inbound_sockets: quiet.sockets.inbound,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct ScenarioRow {
    pub scenario: String,
    pub calls: usize,
    /// Calls the harness saw fail (a step that broke, or waited in vain).
    pub failed: usize,
    /// Calls whose stream callbridge closed on its own.
    pub ended_by_callbridge: usize,
    pub sessions: usize,
    /// Calls that had more than one session.
    pub with_new_session: usize,
    pub refused_upgrades: u32,
    pub frames_sent: u64,
    /// Caller frames no OpenAI session received.
    pub frames_never_heard: u64,
    /// Caller frames more than one session received (counted once per extra session).
    pub frames_heard_twice: u64,
    /// Frames sent whose echo (the fake's agent audio) never came back to the caller.
    pub echoes_lost: u64,
    /// Calls whose last frame came back (of calls that sent any).
    pub last_frame_back: usize,
    pub rows_ended: usize,
    /// The first call with a caller frame lost or heard twice, told in full.
    pub audio_example: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct OpenaiReport {
    pub sessions: usize,
    pub refused_upgrades: u32,
    /// Sessions still open when the soak was over.
    pub leaked: usize,
    /// A few of them: the call, and when the session opened against the call's end.
    pub leaked_examples: Vec<String>,
    /// Sessions dialled for a call that had already ended (and closed again).
    pub dialled_after_end: usize,
    /// Sessions for no call of the soak.
    pub strays: usize,
    /// Frames a session received that carried another call's id.
    pub misrouted_frames: u64,
    /// How long after its call's end each session open at that moment closed (after its
    /// opening, for one opened later), by how the call ended.
    pub close_after_end: BTreeMap<String, Percentiles>,
    pub max_close_after_end_ms: f64,
    /// The calls whose sessions took longest to close after their end.
    pub slowest_closes: Vec<String>,
    /// From `session_expired` to callbridge closing that session.
    pub close_after_expired: Option<Percentiles>,
}

#[derive(Debug, Serialize)]
pub struct MemoryReport {
    pub idle_kib: u64,
    pub after_warmup_kib: u64,
    pub peak_kib: u64,
    pub after_soak_kib: u64,
    /// After the soak against after the warm-up.
    pub change_percent: f64,
    /// At each quiet checkpoint, the last being the end of the soak.
    pub checkpoints: Vec<Checkpoint>,
}

#[derive(Debug, Default, Serialize)]
pub struct RowsReport {
    /// Calls `/voice` answered, so that a record exists.
    pub looked_up: usize,
    pub ended: usize,
    pub open: usize,
    pub missing: usize,
    pub end_reasons: BTreeMap<String, usize>,
    /// Rows without an end, by scenario and how the call ended: how many, and one CallSid.
    pub open_by_ending: BTreeMap<String, (usize, String)>,
}

#[derive(Debug, Default, Serialize)]
pub struct HangUpReport {
    /// `refused` calls that callbridge ended.
    pub refused_calls: usize,
    pub refused_ended_with_apology_code: usize,
    pub refused_hung_up_once: usize,
    pub refused_with_all_attempts_refused: usize,
    pub other_calls_hung_up: usize,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub check: String,
    pub measured: String,
    pub ok: bool,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub settings: Settings,
    pub calls_run: usize,
    pub soak_seconds: f64,
    pub calls_per_second: f64,
    pub callbridge_cpu_seconds: f64,
    pub scenarios: Vec<ScenarioRow>,
    pub openai: OpenaiReport,
    pub memory: MemoryReport,
    pub idle: Snapshot,
    pub after_warmup: Snapshot,
    pub after_soak: Snapshot,
    pub rows: RowsReport,
    pub hang_ups: HangUpReport,
    pub failures: BTreeMap<String, Failures>,
    /// Audio the harness received that was another call's.
    pub misrouted_to_callers: u64,
    pub checks: Vec<Check>,
}

impl SoakReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|check| check.ok)
    }
}

fn micros(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

fn openai_report(calls: &[(Arc<CallLog>, Outcome)], strays: &[SessionLog]) -> OpenaiReport {
    let mut delays: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut slowest = Vec::new();
    let mut expired = Vec::new();
    let mut report = OpenaiReport {
        sessions: 0,
        refused_upgrades: 0,
        leaked: strays.iter().filter(|s| s.closed.is_none()).count(),
        leaked_examples: Vec::new(),
        dialled_after_end: 0,
        strays: strays.len(),
        misrouted_frames: 0,
        close_after_end: BTreeMap::new(),
        max_close_after_end_ms: 0.0,
        slowest_closes: Vec::new(),
        close_after_expired: None,
    };
    for (call, _) in calls {
        let state = call.state();
        report.sessions += state.sessions.len();
        report.refused_upgrades += state.refusals;
        let end = state.end.at.zip(state.end.ending);
        for session in &state.sessions {
            report.misrouted_frames += session.misrouted;
            report.dialled_after_end += usize::from(session.late);
            let Some((closed, closer)) = &session.closed else {
                report.leaked += 1;
                if report.leaked_examples.len() < LEAK_EXAMPLES {
                    report
                        .leaked_examples
                        .push(leak_example(call, session, end));
                }
                continue;
            };
            if let Some(sent) = session.expired_sent {
                expired.push(micros(closed.saturating_duration_since(sent)));
            }
            // Sessions the fake reset, or that callbridge closed before the call ended, were
            // not open at its end. One that opened only after it (a handshake the fake held
            // while callbridge was giving up on it) is timed from its opening: callbridge could
            // not close it before it existed.
            if let Some((ended, ending)) = end
                && *closer != Closer::Fake
                && *closed >= ended
            {
                let delay = *closed - ended.max(session.opened);
                delays
                    .entry(ending.label().to_owned())
                    .or_default()
                    .push(micros(delay));
                slowest.push((delay, call.call_sid.clone(), call.plan.scenario, ending));
            }
        }
    }
    slowest.sort_by_key(|slow| std::cmp::Reverse(slow.0));
    report.slowest_closes = slowest
        .into_iter()
        .take(SLOWEST_SHOWN)
        .map(|(delay, sid, scenario, ending)| {
            format!(
                "{sid} ({scenario}, {}): {} ms",
                ending.label(),
                delay.as_millis()
            )
        })
        .collect();
    report.max_close_after_end_ms = delays
        .values()
        .flatten()
        .max()
        .map_or(0.0, |&us| f64::from(us) / 1000.0);
    report.close_after_end = delays
        .into_iter()
        .filter_map(|(ending, samples)| Some((ending, Percentiles::of_micros(samples)?)))
        .collect();
    report.close_after_expired = Percentiles::of_micros(expired);
    report
}

/// Leaked sessions described in the report, at most.
const LEAK_EXAMPLES: usize = 5;
/// Slowest closes listed in the report.
const SLOWEST_SHOWN: usize = 3;

fn leak_example(call: &CallLog, session: &SessionLog, end: Option<(Instant, Ending)>) -> String {
    let (when, ending) = match end {
        Some((ended, ending)) if session.opened >= ended => (
            format!("{} ms after", (session.opened - ended).as_millis()),
            ending.label(),
        ),
        Some((ended, ending)) => (
            format!("{} ms before", (ended - session.opened).as_millis()),
            ending.label(),
        ),
        None => ("with no end for".to_owned(), "-"),
    };
    format!(
        "{} ({}, {ending}): a session opened {when} the call ended",
        call.call_sid, call.plan.scenario
    )
}

fn scenario_rows(
    calls: &[(Arc<CallLog>, Outcome)],
    rows: &HashMap<String, Row>,
) -> Vec<ScenarioRow> {
    let mut by_scenario: BTreeMap<Scenario, ScenarioRow> = BTreeMap::new();
    for (call, outcome) in calls {
        let state = call.state();
        let row = by_scenario
            .entry(call.plan.scenario)
            .or_insert_with(|| ScenarioRow {
                scenario: call.plan.scenario.label().to_owned(),
                ..ScenarioRow::default()
            });
        row.calls += 1;
        row.failed += usize::from(outcome.failure.is_some());
        row.ended_by_callbridge += usize::from(outcome.server_closed.is_some());
        row.sessions += state.sessions.len();
        row.with_new_session += usize::from(state.sessions.len() > 1);
        row.refused_upgrades += state.refusals;
        row.frames_sent += outcome.frames_sent;
        let (never, twice) = heard(&state.heard, outcome.frames_sent);
        row.frames_never_heard += never;
        row.frames_heard_twice += twice;
        if (never > 0 || twice > 0) && row.audio_example.is_none() {
            row.audio_example = Some(timeline(call, &state, outcome));
        }
        row.echoes_lost += outcome.frames_sent - outcome.frames_back;
        row.last_frame_back += usize::from(outcome.last_frame_back);
        row.rows_ended += usize::from(matches!(rows.get(&call.call_sid), Some(Row::Ended(_))));
    }
    by_scenario.into_values().collect()
}

/// A call's story in milliseconds from its first frame: which frames no session heard (or
/// more than one did), each session's life, the fault, the end.
fn timeline(call: &CallLog, state: &CallState, outcome: &Outcome) -> String {
    let Some(first) = state.first_frame else {
        return format!("{}: no frame sent", call.call_sid);
    };
    let at = |instant: Instant| {
        let ms = |d: Duration| d.as_millis().to_string();
        instant.checked_duration_since(first).map_or_else(
            || format!("-{}", ms(first - instant)),
            |after| format!("+{}", ms(after)),
        )
    };
    let odd: Vec<String> = (0..usize::try_from(outcome.frames_sent).unwrap_or(0))
        .filter(|&seq| state.heard.get(seq).copied().unwrap_or(0) != 1)
        .take(8)
        .map(|seq| format!("{seq}×{}", state.heard.get(seq).copied().unwrap_or(0)))
        .collect();
    let sessions: Vec<String> = state
        .sessions
        .iter()
        .map(|s| {
            let closed = s.closed.as_ref().map_or_else(
                || "never closed".to_owned(),
                |(when, closer)| format!("closed {} ({closer:?})", at(*when)),
            );
            let expired = s.expired_sent.map(|e| format!(", expired {}", at(e)));
            format!(
                "opened {} {closed}{}",
                at(s.opened),
                expired.unwrap_or_default()
            )
        })
        .collect();
    format!(
        "{}: {} frames sent; frames × sessions that heard them: {}; sessions: {}; fault {}; \
         ended {} ({})",
        call.call_sid,
        outcome.frames_sent,
        odd.join(" "),
        sessions.join("; "),
        state.fault_at.map_or_else(|| "-".to_owned(), at),
        state.end.at.map_or_else(|| "-".to_owned(), at),
        state.end.ending.map_or("-", Ending::label),
    )
}

/// Of the first `sent` frames, how many no session received, and how many extra times some
/// were received.
fn heard(counts: &[u8], sent: u64) -> (u64, u64) {
    let sent = usize::try_from(sent).unwrap_or(usize::MAX);
    let never = (0..sent)
        .filter(|&seq| counts.get(seq).is_none_or(|&n| n == 0))
        .count() as u64;
    let twice = counts.iter().map(|&n| u64::from(n.saturating_sub(1))).sum();
    (never, twice)
}

fn rows_report(calls: &[(Arc<CallLog>, Outcome)], rows: &HashMap<String, Row>) -> RowsReport {
    let mut report = RowsReport::default();
    for (call, _) in calls {
        let Some(row) = rows.get(&call.call_sid) else {
            continue;
        };
        report.looked_up += 1;
        match row {
            Row::Ended(reason) => {
                report.ended += 1;
                *report.end_reasons.entry(reason.clone()).or_default() += 1;
            }
            Row::Open | Row::Missing => {
                if *row == Row::Open {
                    report.open += 1;
                } else {
                    report.missing += 1;
                }
                let ending = call.state().end.ending.map_or("no end", Ending::label);
                let key = format!("{}, {ending}", call.plan.scenario);
                let entry = report
                    .open_by_ending
                    .entry(key)
                    .or_insert_with(|| (0, call.call_sid.clone()));
                entry.0 += 1;
            }
        }
    }
    report
}

fn hang_up_report(
    calls: &[(Arc<CallLog>, Outcome)],
    hang_ups: &HashMap<String, usize>,
) -> HangUpReport {
    let mut report = HangUpReport::default();
    for (call, outcome) in calls {
        let count = hang_ups.get(&call.call_sid).copied().unwrap_or(0);
        if call.plan.scenario != Scenario::Refused {
            report.other_calls_hung_up += usize::from(count > 0);
            continue;
        }
        if outcome.server_closed.is_none() {
            continue;
        }
        report.refused_calls += 1;
        report.refused_ended_with_apology_code +=
            usize::from(outcome.server_closed == Some(Some(APOLOGY_CLOSE_CODE)));
        report.refused_hung_up_once += usize::from(count == 1);
        report.refused_with_all_attempts_refused +=
            usize::from(call.state().refusals == RECONNECT_ATTEMPTS);
    }
    report
}

fn failures(calls: &[(Arc<CallLog>, Outcome)]) -> BTreeMap<String, Failures> {
    let mut failures: BTreeMap<String, Failures> = BTreeMap::new();
    for (call, outcome) in calls {
        let unexpected_close = outcome
            .server_closed
            .filter(|_| call.plan.scenario != Scenario::Refused)
            .map(|code| {
                (
                    "callbridge closed the stream unasked",
                    format!("{} call, close code {code:?}", call.plan.scenario),
                )
            });
        for (step, error) in outcome.failure.iter().cloned().chain(unexpected_close) {
            let entry = failures.entry(step.to_owned()).or_default();
            entry.count += 1;
            if entry.example.is_empty() {
                entry.example = format!("{}: {error}", call.call_sid);
            }
        }
        if call.state().end.at.is_none() {
            failures
                .entry("no end recorded".to_owned())
                .or_default()
                .count += 1;
        }
    }
    failures
}

pub fn build(gathered: Gathered) -> SoakReport {
    let calls = &gathered.calls;
    let openai = openai_report(calls, &gathered.strays);
    let rows = rows_report(calls, &gathered.rows);
    let hang_ups = hang_up_report(calls, &gathered.hang_ups);
    let warm = gathered.warm.rss_kib as f64;
    let memory = MemoryReport {
        idle_kib: gathered.idle.rss_kib,
        after_warmup_kib: gathered.warm.rss_kib,
        peak_kib: gathered.peak_rss_kib,
        after_soak_kib: gathered.end.rss_kib,
        change_percent: (gathered.end.rss_kib as f64 - warm) * 100.0 / warm.max(1.0),
        checkpoints: gathered.checkpoints,
    };
    let mut report = SoakReport {
        calls_run: calls.len(),
        soak_seconds: gathered.soak_seconds,
        calls_per_second: gathered.settings.calls as f64 / gathered.soak_seconds.max(0.001),
        callbridge_cpu_seconds: gathered.cpu_seconds,
        scenarios: scenario_rows(calls, &gathered.rows),
        failures: failures(calls),
        misrouted_to_callers: calls.iter().map(|(_, o)| o.misrouted).sum(),
        settings: gathered.settings,
        openai,
        memory,
        idle: gathered.idle,
        after_warmup: gathered.warm,
        after_soak: gathered.end,
        rows,
        hang_ups,
        checks: Vec::new(),
    };
    report.checks = checks(&report, calls);
    report
}

fn check(check: &str, measured: String, ok: bool) -> Check {
    Check {
        check: check.to_owned(),
        measured,
        ok,
    }
}

fn checks(report: &SoakReport, calls: &[(Arc<CallLog>, Outcome)]) -> Vec<Check> {
    let openai = &report.openai;
    let end = &report.after_soak;
    let expired_max = openai
        .close_after_expired
        .as_ref()
        .map_or(0.0, |p| p.max_ms);
    let failed: usize = report.failures.values().map(|f| f.count).sum();
    let rows = &report.rows;
    vec![
        check(
            "every OpenAI session was closed",
            format!(
                "{} sessions, {} still open",
                openai.sessions + openai.strays,
                openai.leaked
            ),
            openai.leaked == 0,
        ),
        check(
            "each session open at its call's end closed within 1 s of it",
            format!("max {:.1} ms", openai.max_close_after_end_ms),
            openai.max_close_after_end_ms <= CLOSE_LIMIT.as_secs_f64() * 1000.0,
        ),
        check(
            "every call slot given back (callbridge_live_calls, callbridge_pending_streams)",
            format!("{} live, {} pending", end.live_calls, end.pending_streams),
            end.live_calls == 0 && end.pending_streams == 0,
        ),
        check(
            "callbridge holds no OpenAI or media socket afterwards",
            format!(
                "{} to OpenAI, {} inbound{}",
                end.sockets.openai,
                end.sockets.inbound,
                if end.sockets.details.is_empty() {
                    String::new()
                } else {
                    format!(": {}", end.sockets.details.join("; "))
                }
            ),
            end.sockets.openai == 0 && end.sockets.inbound == 0,
        ),
        check(
            "RSS after the soak within ±10 % of after the warm-up",
            format!(
                "{} → {} KiB ({:+.1} %)",
                report.memory.after_warmup_kib,
                report.memory.after_soak_kib,
                report.memory.change_percent
            ),
            report.memory.change_percent.abs() <= RSS_TOLERANCE_PERCENT,
        ),
        check(
            "every call's record has an end",
            format!(
                "{} records, {} without an end, {} missing",
                rows.looked_up, rows.open, rows.missing
            ),
            rows.open == 0 && rows.missing == 0,
        ),
        refused_check(&report.hang_ups),
        survival_check(calls),
        audio_check(&report.scenarios),
        check(
            "a session_expired session is closed within 1 s",
            format!("max {expired_max:.1} ms"),
            expired_max <= CLOSE_LIMIT.as_secs_f64() * 1000.0,
        ),
        check(
            "no call failed or was closed unasked; no audio reached another call",
            format!(
                "{failed} failed, {} + {} misrouted frames, {} stray sessions",
                report.misrouted_to_callers, openai.misrouted_frames, openai.strays
            ),
            failed == 0
                && report.misrouted_to_callers == 0
                && openai.misrouted_frames == 0
                && openai.strays == 0,
        ),
    ]
}

/// The apology path, end to end: every new session refused, the stream closed with the
/// apology's code, the call hung up through REST once (and no other call hung up).
fn refused_check(hang_ups: &HangUpReport) -> Check {
    let all_refused = [
        hang_ups.refused_with_all_attempts_refused,
        hang_ups.refused_ended_with_apology_code,
        hang_ups.refused_hung_up_once,
    ]
    .iter()
    .all(|&n| n == hang_ups.refused_calls);
    check(
        "refused calls: 3 refused attempts, then the apology close (1011) and one REST hang-up",
        format!(
            "{} calls: {} all attempts refused, {} closed 1011, {} hung up once; {} other calls \
             hung up",
            hang_ups.refused_calls,
            hang_ups.refused_with_all_attempts_refused,
            hang_ups.refused_ended_with_apology_code,
            hang_ups.refused_hung_up_once,
            hang_ups.other_calls_hung_up
        ),
        all_refused && hang_ups.other_calls_hung_up == 0,
    )
}

/// A call that lost its session had a new one, and its last frame came back through it.
fn survival_check(calls: &[(Arc<CallLog>, Outcome)]) -> Check {
    let survivors: Vec<_> = calls
        .iter()
        .filter(|(call, outcome)| {
            call.plan.scenario.survives_a_new_session() && outcome.failure.is_none()
        })
        .collect();
    let survived = survivors
        .iter()
        .filter(|(call, outcome)| call.state().sessions.len() > 1 && outcome.last_frame_back)
        .count();
    check(
        "calls that lose their session (drop, session_expired, rollover) go on in a new one to \
         the end",
        format!("{survived} of {}", survivors.len()),
        survived == survivors.len(),
    )
}

/// Caller audio goes to one session at a time, and calls that never lost a socket lose none.
fn audio_check(scenarios: &[ScenarioRow]) -> Check {
    let whole = [Scenario::Stop, Scenario::Expired, Scenario::Rollover].map(Scenario::label);
    let never: u64 = scenarios
        .iter()
        .filter(|row| whole.contains(&row.scenario.as_str()))
        .map(|row| row.frames_never_heard)
        .sum();
    let twice: u64 = scenarios.iter().map(|row| row.frames_heard_twice).sum();
    check(
        "no caller frame reached two sessions; none was lost in stop, expired and rollover calls",
        format!("{twice} twice, {never} lost"),
        twice == 0 && never == 0,
    )
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

impl SoakReport {
    pub fn render(&self) -> String {
        let s = &self.settings;
        let mut out = format!(
            "soak: {} calls ({} warm-up, then {}) with {} at once, SESSION_ROLLOVER_SECS={}, \
             mix {}, seed {}\nthe soak's {} calls took {:.1} s ({:.1} calls/s); callbridge used \
             {:.1} s of CPU\n\n",
            self.calls_run,
            s.warmup_calls,
            s.calls,
            s.concurrency,
            s.rollover_secs,
            s.mix,
            s.seed,
            s.calls,
            self.soak_seconds,
            self.calls_per_second,
            self.callbridge_cpu_seconds,
        );
        out += "| scenario | calls | failed | ended by callbridge | OpenAI sessions | calls with a \
                new session | refused upgrades | caller frames | never reached OpenAI | reached two \
                sessions | echoes not back | last frame back | records ended |\n\
                |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for row in &self.scenarios {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.scenario,
                row.calls,
                row.failed,
                row.ended_by_callbridge,
                row.sessions,
                row.with_new_session,
                row.refused_upgrades,
                row.frames_sent,
                row.frames_never_heard,
                row.frames_heard_twice,
                row.echoes_lost,
                row.last_frame_back,
                row.rows_ended,
            );
        }
        for row in &self.scenarios {
            if let Some(example) = &row.audio_example {
                let _ = writeln!(out, "  {}: e.g. {example}", row.scenario);
            }
        }
        out += &self.render_openai();
        out += &self.render_server();
        out
    }

    fn render_openai(&self) -> String {
        let o = &self.openai;
        let mut out = format!(
            "\nOpenAI sessions: {} opened, {} upgrades refused, {} still open at the end, {} dialled \
             after their call ended, {} for no call\n",
            o.sessions, o.refused_upgrades, o.leaked, o.dialled_after_end, o.strays
        );
        for example in &o.leaked_examples {
            let _ = writeln!(out, "  still open: {example}");
        }
        out += "\n| call ended by | sessions open then | closed after p50 (ms) | p99 (ms) | max (ms) |\n\
                |---|---:|---:|---:|---:|\n";
        for (ending, p) in &o.close_after_end {
            let _ = writeln!(
                out,
                "| {ending} | {} | {:.1} | {:.1} | {:.1} |",
                p.samples, p.p50_ms, p.p99_ms, p.max_ms
            );
        }
        for slow in &o.slowest_closes {
            let _ = writeln!(out, "  slowest: {slow}");
        }
        let expired = o.close_after_expired.as_ref();
        let _ = writeln!(
            out,
            "\nsession_expired → that session closed: p50 {} ms, p99 {} ms, max {} ms ({} sessions)",
            ms(expired.map(|p| p.p50_ms)),
            ms(expired.map(|p| p.p99_ms)),
            ms(expired.map(|p| p.max_ms)),
            expired.map_or(0, |p| p.samples),
        );
        out
    }

    fn render_server(&self) -> String {
        let (idle, warm, end) = (&self.idle, &self.after_warmup, &self.after_soak);
        let m = &self.memory;
        let mut out = format!(
            "callbridge afterwards: {} live, {} pending (drained {} s after the last call); \
             sockets: {} to OpenAI, {} inbound, {} to Twilio's REST API (idle pool), {} listening; \
             descriptors {} idle, {} after warm-up, {} after the soak\n\
             memory (RSS): {} KiB idle, {} KiB after warm-up, {} KiB peak, {} KiB after the soak \
             ({:+.1} %)\n",
            end.live_calls,
            end.pending_streams,
            ms(end.drained_after_ms.map(|ms| ms as f64 / 1000.0)),
            end.sockets.openai,
            end.sockets.inbound,
            end.sockets.twilio_rest,
            end.sockets.listening,
            idle.open_fds,
            warm.open_fds,
            end.open_fds,
            m.idle_kib,
            m.after_warmup_kib,
            m.peak_kib,
            m.after_soak_kib,
            m.change_percent,
        );
        let trend: Vec<String> = m
            .checkpoints
            .iter()
            .map(|c| {
                format!(
                    "{}: {} ({} anon, {} file, {} shmem)",
                    c.calls, c.rss_kib, c.rss.anon_kib, c.rss.file_kib, c.rss.shmem_kib
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "RSS at quiet moments, KiB after N soak calls: warm-up: {} ({} anon, {} file, {} \
             shmem), {}",
            m.after_warmup_kib,
            self.after_warmup.rss.anon_kib,
            self.after_warmup.rss.file_kib,
            self.after_warmup.rss.shmem_kib,
            trend.join(", ")
        );
        let r = &self.rows;
        let reasons: Vec<String> = r
            .end_reasons
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            out,
            "records: {} looked up, {} with an end ({}), {} without, {} missing",
            r.looked_up,
            r.ended,
            reasons.join(", "),
            r.open,
            r.missing
        );
        for (key, (count, example)) in &r.open_by_ending {
            let _ = writeln!(out, "  without an end: {count} × {key} (e.g. {example})");
        }
        for (step, failure) in &self.failures {
            let _ = writeln!(
                out,
                "failed at {step}: {} (e.g. {})",
                failure.count, failure.example
            );
        }
        out += "\n";
        for check in &self.checks {
            let verdict = if check.ok { "ok" } else { "FAILED" };
            let _ = writeln!(out, "- {verdict}: {} ({})", check.check, check.measured);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::plan::CallPlan;

    fn call(index: usize, scenario: Scenario) -> Arc<CallLog> {
        let plan = CallPlan {
            index,
            scenario,
            ending: Ending::Stop,
            talk: Duration::from_secs(1),
            fault_after: Duration::from_millis(700),
        };
        Arc::new(CallLog::new(plan, format!("CA{index}"), index))
    }

    #[test]
    fn sessions_are_timed_from_their_call_s_end_or_their_own_later_opening() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Closed 30 ms after its stop; an earlier session closed mid-call does not count.
        let stopped = call(0, Scenario::Rollover);
        let old = stopped.session_opened(at(0), false);
        stopped.session_closed(old, at(500), Closer::BridgeClose);
        let new = stopped.session_opened(at(510), false);
        stopped.session_closed(new, at(1030), Closer::BridgeClose);
        stopped.ended(at(1000), Ending::Stop);
        // Opened 400 ms after the caller left (a handshake held by the fake), closed 5 ms later.
        let dropped = call(1, Scenario::DropMidReconnect);
        let reset = dropped.session_opened(at(0), false);
        dropped.session_closed(reset, at(700), Closer::Fake);
        let late = dropped.session_opened(at(1200), true);
        dropped.session_closed(late, at(1205), Closer::BridgeEof);
        dropped.ended(at(800), Ending::DropReset);
        // Never closed; its session_expired predecessor closed 12 ms after the error.
        let leaking = call(2, Scenario::Expired);
        let expired = leaking.session_opened(at(0), false);
        leaking.fault(expired, at(700), true);
        leaking.session_closed(expired, at(712), Closer::BridgeClose);
        leaking.session_opened(at(720), false);
        leaking.ended(at(2000), Ending::Stop);

        let calls: Vec<_> = [stopped, dropped, leaking]
            .into_iter()
            .map(|c| (c, Outcome::default()))
            .collect();
        let report = openai_report(&calls, &[]);
        assert_eq!(report.sessions, 6);
        assert_eq!((report.leaked, report.dialled_after_end), (1, 1));
        assert!(report.leaked_examples[0].starts_with("CA2 (expired, stop)"));
        // The histogram keeps three significant digits.
        let about = |ms: f64, expected: f64| (ms - expected).abs() <= expected / 500.0;
        let stop = &report.close_after_end["stop"];
        assert!(stop.samples == 1 && about(stop.max_ms, 30.0), "{stop:?}");
        let reset = &report.close_after_end["drop (RST)"];
        assert!(reset.samples == 1 && about(reset.max_ms, 5.0), "{reset:?}");
        assert_eq!(report.max_close_after_end_ms, 30.0);
        let expired = report.close_after_expired.unwrap();
        assert!(about(expired.max_ms, 12.0), "{expired:?}");
        assert!(report.slowest_closes[0].starts_with("CA0 (rollover, stop): 30 ms"));
    }

    #[test]
    fn frames_never_heard_and_heard_twice_are_counted() {
        assert_eq!(heard(&[1, 0, 2, 1], 4), (1, 1));
        assert_eq!(
            heard(&[1, 1], 4),
            (2, 0),
            "frames past the end were never heard"
        );
        assert_eq!(heard(&[], 0), (0, 0));
        let rows = [ScenarioRow {
            scenario: "rollover".into(),
            frames_never_heard: 1,
            ..ScenarioRow::default()
        }];
        assert!(!audio_check(&rows).ok);
        let rows = [ScenarioRow {
            scenario: "openai-drop".into(),
            frames_never_heard: 3,
            ..ScenarioRow::default()
        }];
        assert!(
            audio_check(&rows).ok,
            "a reset socket may take frames with it"
        );
    }
}
