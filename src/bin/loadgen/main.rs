//! `loadgen`: the benchmark harness of issue 6. It simulates Twilio calls against a running
//! callbridge, plays OpenAI Realtime for it, and measures what each call costs; `bench/run.sh`
//! drives it end to end. `loadgen help` lists the subcommands.

mod args;
mod fake;
mod load;
mod procfs;
mod report;
mod stats;
mod wire;
mod workers;

use std::process::ExitCode;

use args::Command;

fn main() -> ExitCode {
    let command = match args::parse(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(error) => {
            eprintln!("loadgen: {error}\n\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    let outcome = match command {
        Command::Help => {
            println!("{}", args::USAGE);
            Ok(())
        }
        Command::FakeRealtime { port } => fake::serve(port),
        Command::Load { target, plan, json } => {
            load::run(target, plan).and_then(|report| print_run(&report, json))
        }
        Command::Report { dir, json_out } => report::run(&dir, json_out.as_deref()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
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
