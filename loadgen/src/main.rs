//! `loadgen`: the benchmark harness. It simulates Twilio calls against a running callbridge,
//! plays OpenAI Realtime for it, and measures what each call costs; `bench/run.sh` drives it
//! end to end. `loadgen help` lists the subcommands.

mod args;
mod fake_realtime;
mod load;
mod procfs;
mod report;
mod soak;
mod stats;
mod workers;

use std::process::ExitCode;

use args::{Cli, Command};
use clap::{CommandFactory, Parser};
use load::{Bridge, Floor, Target};

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::FakeRealtime { port } => fake_realtime::serve(port),
        Command::Report { dir, json_out } => report::run(&dir, json_out.as_deref()),
        Command::Soak(args) => {
            args.validate().unwrap_or_else(usage_error);
            return match soak::run(&args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(error) => {
                    eprintln!("loadgen: {error:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::SoakAgents { lanes } => {
            let lanes = usize::try_from(lanes).unwrap_or(usize::MAX);
            print!("{}", soak::agents_file(lanes));
            Ok(())
        }
        Command::Run {
            server,
            public_base_url,
            auth_token,
            account_sid,
            load,
        } => {
            let bridge = Bridge::new(&server, &public_base_url, &auth_token, &account_sid)
                .unwrap_or_else(|e| usage_error(format!("{e:#}")));
            run_load(Target::Bridge(bridge), &load)
        }
        Command::Floor { realtime, load } => {
            let floor = Floor::new(&realtime).unwrap_or_else(|e| usage_error(format!("{e:#}")));
            run_load(Target::Floor(floor), &load)
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Options that parse one by one but not together are usage errors too: reported with clap's
/// usage line and exit status (2), like a missing option.
fn usage_error<T>(message: String) -> T {
    Cli::command()
        .error(clap::error::ErrorKind::ValueValidation, message)
        .exit()
}

fn run_load(target: Target, load: &args::Load) -> anyhow::Result<()> {
    let plan = load.plan().unwrap_or_else(usage_error);
    let report = load::run(target, plan)?;
    print_run(&report, load.json)
}

fn print_run(report: &stats::RunReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!(
        "{} x{}: {} connected, {} failed, {} dropped; frames {} sent, {} lost ({} in a first second)",
        report.mode,
        report.calls,
        report.calls_connected,
        report.failed_connects,
        report.dropped_calls,
        report.frames_sent,
        report.frames_lost,
        report.first_second_lost,
    );
    for (label, percentiles) in [
        ("round trip, steady", &report.rtt),
        ("round trip, all", &report.rtt_all),
        ("send lag", &report.send_lag),
    ] {
        if let Some(p) = percentiles {
            println!(
                "{label}: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} frames)",
                p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms, p.samples
            );
        }
    }
    for p in report.process.iter().chain(&report.harness) {
        println!(
            "pid {}: {:.1} µs CPU per frame ({:.2} s user, {:.2} s system), RSS {} → {} KiB \
             ({:.1} KiB per call)",
            p.pid,
            p.cpu_us_per_frame,
            p.user_seconds,
            p.system_seconds,
            p.rss_baseline_kib,
            p.rss_peak_kib,
            p.rss_kib_per_call
        );
    }
    for (step, failures) in &report.failures {
        println!("{step}: {} (e.g. {})", failures.count, failures.example);
    }
    Ok(())
}
