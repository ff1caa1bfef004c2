//! The command line (clap): a subcommand, then its options in any order.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::load::Plan;

/// The benchmark harness: simulated Twilio calls against a running callbridge, a fake OpenAI
/// Realtime server for it, and the report of what each call costs.
#[derive(Debug, Parser)]
#[command(name = "loadgen")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// A fake OpenAI Realtime server on 127.0.0.1:PORT; the first line printed is `listening on
    /// ADDR`. Every input_audio_buffer.append is answered with a response.output_audio.delta
    /// carrying the same audio.
    FakeRealtime {
        /// 0 picks a free port.
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// N calls through callbridge at --server, as Twilio makes them.
    Run {
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
        #[command(flatten)]
        load: Load,
    },
    /// The same frames sent straight to the fake Realtime server: the no-bridge floor.
    Floor {
        /// The fake's URL, ws://HOST:PORT/PATH.
        #[arg(long)]
        realtime: String,
        #[command(flatten)]
        load: Load,
    },
    /// Thousands of short calls through callbridge at --server, with Twilio and OpenAI dropping
    /// out on purpose (the fake Realtime and Twilio REST servers run in this process), then
    /// checks that every socket, slot, record and byte of memory came back. Exits 1 when a
    /// check fails.
    Soak(Box<crate::soak::SoakArgs>),
    /// Prints the agents file `soak` needs the server to run with: one agent per lane.
    SoakAgents {
        #[arg(long, default_value_t = 160, value_parser = clap::value_parser!(u64).range(1..=65536))]
        lanes: u64,
    },
    /// The table from DIR/floor-N.json and DIR/bridge-N.json (outputs of --json), the highest
    /// N held and the targets.
    Report {
        dir: PathBuf,
        /// Also write it all as JSON to this file.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
}

/// Frames carry a 16-bit call number.
const MAX_CALLS: u64 = 1 << 16;

/// The options of `run` and `floor`.
#[derive(Debug, Args)]
pub struct Load {
    /// Calls to make.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_CALLS))]
    calls: u64,
    /// Audio each call sends.
    #[arg(long, default_value = "20", value_parser = seconds)]
    seconds: Duration,
    /// Calls start evenly spread over this long.
    #[arg(long, default_value = "2", value_parser = seconds)]
    ramp_seconds: Duration,
    /// How long a call waits for its last frames before counting them lost.
    #[arg(long, default_value = "1", value_parser = seconds)]
    grace_seconds: Duration,
    /// Measure this process's CPU per frame and RSS per call (callbridge for `run`).
    #[arg(long)]
    pid: Option<u32>,
    /// `getconf CLK_TCK`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    clk_tck: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn seconds(value: &str) -> Result<Duration, String> {
    value
        .parse()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("{value:?} is not a number of seconds"))
}

impl Load {
    /// The run these options describe; an error names the options that do not fit together.
    pub fn plan(&self) -> Result<Plan, String> {
        if self.seconds < Duration::from_secs(1) || self.ramp_seconds * 2 > self.seconds {
            return Err(
                "--seconds must be at least 1 and at least twice --ramp-seconds, \
                        so that every call is up for a while"
                    .into(),
            );
        }
        Ok(Plan {
            calls: usize::try_from(self.calls).map_err(|e| e.to_string())?,
            duration: self.seconds,
            ramp: self.ramp_seconds,
            grace: self.grace_seconds,
            pid: self.pid,
            clk_tck: self.clk_tck,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse_str(line: &str) -> Result<Command, String> {
        Cli::try_parse_from(std::iter::once("loadgen").chain(line.split_whitespace()))
            .map(|cli| cli.command)
            .map_err(|e| e.to_string())
    }

    fn plan(line: &str) -> Result<Plan, String> {
        match parse_str(line)? {
            Command::Floor { load, .. } | Command::Run { load, .. } => load.plan(),
            _ => panic!("{line}: not a load command"),
        }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn options_come_in_any_order_with_defaults() {
        let Ok(Command::Floor { load, realtime }) =
            parse_str("floor --json --calls 40 --realtime ws://127.0.0.1:9/v1/realtime")
        else {
            panic!("not a floor command");
        };
        assert_eq!(realtime, "ws://127.0.0.1:9/v1/realtime");
        assert!(load.json);
        let plan = load.plan().unwrap();
        assert_eq!(plan.calls, 40);
        assert_eq!(plan.duration, Duration::from_secs(20));
        assert_eq!(plan.ramp, Duration::from_secs(2));
        assert_eq!(plan.grace, Duration::from_secs(1));
        assert_eq!((plan.pid, plan.clk_tck), (None, 100));
        let Ok(Command::Report { dir, json_out }) = parse_str("report --json-out out.json runs")
        else {
            panic!("not a report command");
        };
        assert_eq!((dir, json_out), ("runs".into(), Some("out.json".into())));
        assert!(matches!(
            parse_str("fake-realtime"),
            Ok(Command::FakeRealtime { port: 0 })
        ));
    }

    #[test]
    fn mistakes_are_reported() {
        let floor = "floor --realtime ws://127.0.0.1:9/v1/realtime";
        let cases = [
            ("floor --calls 5".to_owned(), "--realtime <REALTIME>"),
            (floor.to_owned(), "--calls <CALLS>"),
            (format!("{floor} --calls x"), "'x' for '--calls <CALLS>'"),
            (format!("{floor} --calls 0"), "0 is not in 1..=65536"),
            (format!("{floor} --calls 65537"), "not in 1..=65536"),
            (
                format!("{floor} --calls 5 --seconds x"),
                "not a number of seconds",
            ),
            (format!("{floor} --calls 5 --seconds 3"), "at least twice"),
            (
                format!("{floor} --calls 5 --seconds 0.5 --ramp-seconds 0"),
                "at least 1",
            ),
            (
                format!("{floor} --calls 5 --clk-tck 0 --pid 1"),
                "not in 1..",
            ),
            (
                format!("{floor} --calls 5 --verbose"),
                "unexpected argument",
            ),
            (
                format!("{floor} --calls"),
                "a value is required for '--calls <CALLS>'",
            ),
            ("fly".to_owned(), "unrecognized subcommand"),
        ];
        for (line, error) in cases {
            match plan(&line) {
                Err(message) => assert!(message.contains(error), "{line}: {message}"),
                Ok(_) => panic!("{line} accepted"),
            }
        }
    }
}
