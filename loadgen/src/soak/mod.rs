//! `loadgen soak`: thousands of short calls against a running callbridge, each with something
//! going wrong on purpose (a Twilio socket dropped without `stop`, an OpenAI socket reset, new
//! sessions refused, `session_expired`, a rollover), with the fake OpenAI Realtime and Twilio
//! REST servers in this process. Then it checks that nothing was left behind: every OpenAI
//! socket closed soon after its call ended, every call slot given back, memory back where the
//! warm-up left it, every call's record ended. `bench/soak.sh` runs it end to end.

mod caller;
mod fake;
mod ledger;
mod plan;
mod probe;
mod report;
mod twilio;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use futures_util::future::join_all;

use crate::load::Bridge;
use crate::procfs::Tracker;
use crate::workers;
use callbridge_testkit::wire::FrameAudio;
use caller::Outcome;
use ledger::{CallLog, Ledger};
use plan::{CallPlan, MIN_ROLLOVER_SECS, Mix, Timings};
use probe::{Ports, Probe};

pub use plan::agents_file;

/// Frames carry a 16-bit call number.
const MAX_CALLS: u64 = 1 << 16;
/// The calls' first calls start spread over this long, as calls arrive at a real server.
const RAMP: Duration = Duration::from_secs(1);
/// How often memory is sampled for its peak during the soak.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// How often progress is printed.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(15);

/// The options of `loadgen soak`.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Where callbridge listens, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
    /// The server's PUBLIC_BASE_URL: the URL Twilio signs requests over.
    #[arg(long)]
    public_base_url: String,
    /// The server's TWILIO_AUTH_TOKEN, to sign as Twilio does.
    #[arg(long)]
    auth_token: String,
    /// The server's TWILIO_ACCOUNT_SID (AC...).
    #[arg(long)]
    account_sid: String,
    /// The server's CALLBRIDGE_API_TOKEN, to read each call's record.
    #[arg(long)]
    api_token: String,
    /// callbridge's process id: its memory and sockets are read from /proc.
    #[arg(long)]
    pid: u32,
    /// The fake OpenAI Realtime server listens on 127.0.0.1 at this port: the server's
    /// OPENAI_REALTIME_URL must be ws://127.0.0.1:PORT/v1/realtime.
    #[arg(long)]
    realtime_port: u16,
    /// The fake Twilio REST API listens on 127.0.0.1 at this port: the server's
    /// TWILIO_API_BASE_URL must be http://127.0.0.1:PORT.
    #[arg(long)]
    twilio_port: u16,
    /// Calls in the soak proper, after the warm-up.
    #[arg(long, default_value_t = 6000, value_parser = clap::value_parser!(u64).range(1..MAX_CALLS))]
    calls: u64,
    /// Calls before memory is measured, with the same mix and concurrency: over its first
    /// thousand calls callbridge's heap grows to its working size.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..MAX_CALLS))]
    warmup_calls: u64,
    /// The soak stops starting calls after every this many, lets the slots drain and reads
    /// callbridge's memory at that quiet moment, so a growth shows as a trend.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_calls: u64,
    /// Calls up at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    concurrency: u64,
    /// Agents in the server's agents file (`loadgen soak-agents --lanes N`): at least twice
    /// --concurrency.
    #[arg(long, default_value_t = 160, value_parser = clap::value_parser!(u64).range(1..=65536))]
    lanes: u64,
    /// The server's SESSION_ROLLOVER_SECS.
    #[arg(long, default_value_t = MIN_ROLLOVER_SECS)]
    rollover_secs: u64,
    /// The share of each scenario: stop, twilio-drop, openai-drop, refused, expired, rollover,
    /// drop-mid-reconnect.
    #[arg(long, default_value_t = Mix::default())]
    mix: Mix,
    /// Seeds the choice of scenarios and durations: the same seed plays the same calls.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long the call slots may take to come back after the last call (a call that ended
    /// with the apology holds its slot for the apology's 10 s).
    #[arg(long, default_value = "30", value_parser = crate::args::seconds)]
    drain_timeout: Duration,
    /// After the slots are back, how long to wait before memory and sockets are read.
    #[arg(long, default_value = "3", value_parser = crate::args::seconds)]
    quiet_seconds: Duration,
    /// `getconf CLK_TCK`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    clk_tck: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

impl SoakArgs {
    /// The options that do not fit together, as a usage error.
    pub fn validate(&self) -> Result<(), String> {
        if self.lanes < 2 * self.concurrency {
            return Err(format!(
                "--lanes ({}) must be at least twice --concurrency ({}), so that a lane is reused \
                 only long after its last call",
                self.lanes, self.concurrency
            ));
        }
        if self.calls + self.warmup_calls > MAX_CALLS {
            return Err(format!(
                "--calls and --warmup-calls add up to at most {MAX_CALLS}"
            ));
        }
        if self.rollover_secs < MIN_ROLLOVER_SECS {
            return Err(format!(
                "--rollover-secs must be at least {MIN_ROLLOVER_SECS}: a broken call's new \
                 session must not be due for rollover before the call ends"
            ));
        }
        Ok(())
    }
}

/// Everything the calls of every worker thread share.
struct Run {
    ledger: Arc<Ledger>,
    bridge: Bridge,
    audio: FrameAudio,
    concurrency: usize,
}

fn count(n: u64) -> usize {
    usize::try_from(n).expect("bounded by the command line")
}

/// Runs the soak; `Ok(false)` when a check failed.
pub fn run(args: &SoakArgs) -> anyhow::Result<bool> {
    callbridge::tls::install_crypto_provider();
    let concurrency = count(args.concurrency);
    let ledger = Arc::new(Ledger::new(count(args.lanes)));
    let realtime =
        std::net::TcpListener::bind(("127.0.0.1", args.realtime_port)).with_context(|| {
            format!(
                "cannot bind the fake Realtime server to port {}",
                args.realtime_port
            )
        })?;
    fake::start(realtime, &ledger)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let twilio = runtime.block_on(twilio::TwilioRest::start(args.twilio_port))?;
    let server_port = url::Url::parse(&args.server)
        .ok()
        .and_then(|u| u.port_or_known_default())
        .context("--server has no port")?;
    let ports = Ports {
        server: server_port,
        realtime: args.realtime_port,
        twilio_rest: args.twilio_port,
    };
    let soak = Soak {
        args,
        probe: Probe::new(&args.server, &args.api_token, args.pid, ports)?,
        run: Arc::new(Run {
            ledger: Arc::clone(&ledger),
            bridge: Bridge::new(
                &args.server,
                &args.public_base_url,
                &args.auth_token,
                &args.account_sid,
            )?,
            audio: FrameAudio::new(),
            concurrency,
        }),
        runtime,
        timings: Timings {
            rollover: Duration::from_secs(args.rollover_secs),
        },
    };
    let (warmup, calls) = (count(args.warmup_calls), count(args.calls));
    let idle = soak.runtime.block_on(soak.probe.snapshot(None))?;
    eprintln!("==> warm-up: {warmup} calls, {concurrency} at once");
    let mut results = soak.calls(0..warmup);
    let warm = soak.quiet()?;
    eprintln!("==> soak: {calls} calls, {concurrency} at once");
    let phase = soak.soak(warmup, calls, &mut results)?;

    eprintln!("==> reading {} call records", results.len());
    let hang_ups = soak.runtime.block_on(twilio.hang_ups());
    // Calls `/voice` did not answer have no record to look for.
    let answered: Vec<String> = results
        .iter()
        .filter(|(_, outcome)| {
            outcome
                .failure
                .as_ref()
                .is_none_or(|(step, _)| *step != "POST /voice")
        })
        .map(|(call, _)| call.call_sid.clone())
        .collect();
    let rows = soak.runtime.block_on(soak.probe.rows(&answered))?;
    let report = report::build(report::Gathered {
        settings: report::Settings {
            calls,
            warmup_calls: warmup,
            concurrency,
            lanes: count(args.lanes),
            rollover_secs: args.rollover_secs,
            mix: args.mix.to_string(),
            seed: args.seed,
        },
        calls: results,
        strays: ledger.strays(),
        idle,
        warm,
        end: phase.end,
        peak_rss_kib: phase.peak_rss_kib,
        checkpoints: phase.checkpoints,
        cpu_seconds: phase.cpu_seconds,
        soak_seconds: phase.soak_seconds,
        hang_ups,
        rows: answered.into_iter().zip(rows).collect(),
    });
    print!("{}", report.render());
    if let Some(path) = &args.json_out {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report.passed())
}

/// The soak's parts, once set up.
struct Soak<'a> {
    args: &'a SoakArgs,
    probe: Probe,
    run: Arc<Run>,
    runtime: tokio::runtime::Runtime,
    timings: Timings,
}

/// What the soak proper (after the warm-up) came to.
struct Phase {
    end: probe::Snapshot,
    checkpoints: Vec<report::Checkpoint>,
    peak_rss_kib: u64,
    cpu_seconds: f64,
    /// Time spent making calls, the checkpoints' quiet moments left out.
    soak_seconds: f64,
}

impl Soak<'_> {
    /// Calls `range` of the plan, `--concurrency` at once.
    fn calls(&self, range: std::ops::Range<usize>) -> Vec<(Arc<CallLog>, Outcome)> {
        let args = self.args;
        run_calls(&self.run, self.timings.plans(&args.mix, args.seed, range))
    }

    /// Waits for callbridge to give every slot back, and looks at it.
    fn quiet(&self) -> anyhow::Result<probe::Snapshot> {
        let args = self.args;
        self.runtime
            .block_on(self.probe.settle(args.drain_timeout, args.quiet_seconds))
    }

    /// The `calls` after the `warmup`, with a quiet checkpoint every `--checkpoint-calls`.
    fn soak(
        &self,
        warmup: usize,
        calls: usize,
        results: &mut Vec<(Arc<CallLog>, Outcome)>,
    ) -> anyhow::Result<Phase> {
        let pid = self.args.pid;
        let mut cpu = Tracker::new(pid)?;
        cpu.start_window()?;
        let sampler = RssSampler::start(pid);
        let mut soak_seconds = 0.0;
        let mut checkpoints = Vec::new();
        let last = warmup + calls;
        let mut from = warmup;
        let end = loop {
            let to = (from + count(self.args.checkpoint_calls)).min(last);
            let started = Instant::now();
            results.extend(self.calls(from..to));
            soak_seconds += started.elapsed().as_secs_f64();
            from = to;
            let quiet = self.quiet()?;
            checkpoints.push(report::Checkpoint::new(to - warmup, &quiet));
            if to == last {
                break quiet;
            }
            eprintln!("    after {} calls: RSS {} KiB", to - warmup, quiet.rss_kib);
        };
        let spent = cpu.end_window()?;
        Ok(Phase {
            peak_rss_kib: sampler.stop().max(end.rss_kib),
            end,
            checkpoints,
            cpu_seconds: (spent.user_ticks + spent.system_ticks) as f64 / self.args.clk_tck as f64,
            soak_seconds,
        })
    }
}

/// Runs `plans` with `run.concurrency` calls up at once, each worker starting its next call as
/// soon as its last one ended; blocks until every call has ended.
fn run_calls(run: &Arc<Run>, plans: Vec<CallPlan>) -> Vec<(Arc<CallLog>, Outcome)> {
    let total = plans.len();
    let plans = Arc::new(plans);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let threads = workers::count().min(run.concurrency);
    let assignments: Vec<Vec<usize>> = (0..threads)
        .map(|thread| (thread..run.concurrency).step_by(threads).collect())
        .collect();
    let shared = (
        Arc::clone(run),
        Arc::clone(&plans),
        Arc::clone(&next),
        Arc::clone(&done),
    );
    let workers = workers::spawn(assignments, move |slots| async move {
        let (run, plans, next, done) = &shared;
        join_all(
            slots
                .into_iter()
                .map(|slot| worker(slot, run, plans, next, done)),
        )
        .await
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
    });
    let started = Instant::now();
    let finished = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut last = Instant::now();
            while !finished.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= PROGRESS_INTERVAL {
                    last = Instant::now();
                    eprintln!(
                        "    {} of {total} calls done after {:.0} s",
                        done.load(Ordering::Relaxed),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        });
        let results = workers.join().into_iter().flatten().collect();
        finished.store(true, Ordering::Relaxed);
        results
    })
}

/// One of the `concurrency` callers: calls back to back until the plans run out.
async fn worker(
    slot: usize,
    run: &Run,
    plans: &[CallPlan],
    next: &AtomicUsize,
    done: &AtomicUsize,
) -> Vec<(Arc<CallLog>, Outcome)> {
    let offset = RAMP.mul_f64(slot as f64 / run.concurrency as f64);
    tokio::time::sleep(offset).await;
    let mut results = Vec::new();
    loop {
        let Some(plan) = plans.get(next.fetch_add(1, Ordering::Relaxed)) else {
            return results;
        };
        // Unique per process and call, so runs against one server never reuse a CallSid.
        let call_sid = format!("CA{:08x}{:024x}", std::process::id(), plan.index);
        let call = loop {
            // With twice as many lanes as callers one is always free; this only waits if not.
            match run.ledger.start_call(plan.clone(), call_sid.clone()) {
                Some(call) => break call,
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let outcome = caller::run(&call, &run.bridge, &run.audio).await;
        run.ledger.finish_call(&call);
        done.fetch_add(1, Ordering::Relaxed);
        results.push((call, outcome));
    }
}

/// Samples a process's memory on a thread of its own, for its peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (stopping, highest) = (Arc::clone(&stop), Arc::clone(&peak));
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                if let Ok(rss) = crate::procfs::current_rss_kib(pid) {
                    highest.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(RSS_SAMPLE_INTERVAL);
            }
        });
        Self { stop, peak, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(Ordering::Relaxed)
    }
}
