//! The command line, parsed by hand: a subcommand, then `--name value` options and `--flag`s
//! in any order.

use std::fmt::Display;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::load::{Bridge, Floor, Plan, Target};

pub const USAGE: &str = "\
usage:
  loadgen fake-realtime [--port P]
      A fake OpenAI Realtime server on 127.0.0.1:P (0, the default, picks a free port; the
      first line printed is `listening on ADDR`). Every input_audio_buffer.append is answered
      with a response.output_audio.delta carrying the same audio.

  loadgen run --server URL --public-base-url URL --auth-token T --account-sid AC... LOAD
      N calls through callbridge at --server, as Twilio makes them.

  loadgen floor --realtime ws://HOST:PORT/PATH LOAD
      The same frames sent straight to the fake Realtime server: the no-bridge floor.

  LOAD: --calls N [--seconds 20] [--ramp-seconds 2] [--grace-seconds 1]
        [--pid PID [--clk-tck 100]] [--json]
      --pid measures that process's CPU per frame and RSS per call (callbridge for `run`);
      --clk-tck is `getconf CLK_TCK`; --json prints the report as JSON.

  loadgen report DIR [--json-out FILE]
      The table from DIR/floor-N.json and DIR/bridge-N.json (outputs of --json), the highest
      N held and the issue's targets; --json-out also writes it all as JSON.";

pub enum Command {
    FakeRealtime {
        port: u16,
    },
    Load {
        target: Target,
        plan: Plan,
        json: bool,
    },
    Report {
        dir: PathBuf,
        json_out: Option<PathBuf>,
    },
    Help,
}

/// Frames carry a 16-bit call number.
const MAX_CALLS: usize = 1 << 16;

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = Args(args.into_iter().collect());
    let command = match args.positional().as_deref() {
        None | Some("help" | "-h" | "--help") => return Ok(Command::Help),
        Some("fake-realtime") => Command::FakeRealtime {
            port: args.option("--port")?.unwrap_or(0),
        },
        Some("run") => {
            let bridge = Bridge::new(
                &args.required::<String>("--server")?,
                &args.required::<String>("--public-base-url")?,
                &args.required::<String>("--auth-token")?,
                &args.required::<String>("--account-sid")?,
            )
            .map_err(|e| format!("{e:#}"))?;
            load(&mut args, Target::Bridge(bridge))?
        }
        Some("floor") => {
            let floor = Floor::new(&args.required::<String>("--realtime")?)
                .map_err(|e| format!("{e:#}"))?;
            load(&mut args, Target::Floor(floor))?
        }
        Some("report") => Command::Report {
            dir: args.positional().ok_or("report needs a directory")?.into(),
            json_out: args.option("--json-out")?,
        },
        Some(other) => return Err(format!("unknown command {other:?}")),
    };
    args.finish()?;
    Ok(command)
}

fn load(args: &mut Args, target: Target) -> Result<Command, String> {
    let calls: usize = args.required("--calls")?;
    if !(1..=MAX_CALLS).contains(&calls) {
        return Err(format!("--calls must be between 1 and {MAX_CALLS}"));
    }
    let duration = seconds(args, "--seconds", 20.0)?;
    let ramp = seconds(args, "--ramp-seconds", 2.0)?;
    if duration < Duration::from_secs(1) || ramp * 2 > duration {
        return Err(
            "--seconds must be at least 1 and at least twice --ramp-seconds, \
                    so that every call is up for a while"
                .into(),
        );
    }
    let plan = Plan {
        calls,
        duration,
        ramp,
        grace: seconds(args, "--grace-seconds", 1.0)?,
        pid: args.option("--pid")?,
        clk_tck: args.option("--clk-tck")?.unwrap_or(100),
    };
    if plan.clk_tck == 0 {
        return Err("--clk-tck must be positive".into());
    }
    Ok(Command::Load {
        target,
        plan,
        json: args.flag("--json"),
    })
}

fn seconds(args: &mut Args, name: &str, default: f64) -> Result<Duration, String> {
    let value = args.option(name)?.unwrap_or(default);
    Duration::try_from_secs_f64(value).map_err(|_| format!("{name} must be a number of seconds"))
}

/// The arguments not consumed yet.
struct Args(Vec<String>);

impl Args {
    /// Removes and returns the first argument that is not an option.
    fn positional(&mut self) -> Option<String> {
        let index = self.0.iter().position(|a| !a.starts_with("--"))?;
        Some(self.0.remove(index))
    }

    fn flag(&mut self, name: &str) -> bool {
        let found = self.0.iter().position(|a| a == name);
        found.map(|index| self.0.remove(index)).is_some()
    }

    /// Removes `name VALUE` and parses VALUE.
    fn option<T: FromStr>(&mut self, name: &str) -> Result<Option<T>, String>
    where
        T::Err: Display,
    {
        let Some(index) = self.0.iter().position(|a| a == name) else {
            return Ok(None);
        };
        if index + 1 >= self.0.len() {
            return Err(format!("{name} needs a value"));
        }
        let value = self.0.drain(index..=index + 1).nth(1).unwrap_or_default();
        value
            .parse()
            .map(Some)
            .map_err(|e| format!("{name} {value:?}: {e}"))
    }

    fn required<T: FromStr>(&mut self, name: &str) -> Result<T, String>
    where
        T::Err: Display,
    {
        self.option(name)?
            .ok_or_else(|| format!("{name} is required"))
    }

    fn finish(self) -> Result<(), String> {
        match self.0.first() {
            Some(extra) => Err(format!("unexpected argument {extra:?}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Result<Command, String> {
        parse(line.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn options_come_in_any_order_with_defaults() {
        let Ok(Command::Load { plan, json, .. }) =
            parse_str("floor --json --calls 40 --realtime ws://127.0.0.1:9/v1/realtime")
        else {
            panic!("not a load command");
        };
        assert!(json);
        assert_eq!(plan.calls, 40);
        assert_eq!(plan.duration, Duration::from_secs(20));
        assert_eq!(plan.ramp, Duration::from_secs(2));
        assert_eq!((plan.pid, plan.clk_tck), (None, 100));
    }

    #[test]
    fn mistakes_are_reported() {
        let floor = "floor --realtime ws://127.0.0.1:9/v1/realtime";
        let cases = [
            ("floor --calls 5".to_owned(), "--realtime is required"),
            (floor.to_owned(), "--calls is required"),
            (format!("{floor} --calls x"), "--calls \"x\""),
            (format!("{floor} --calls 0"), "--calls must be between"),
            (format!("{floor} --calls 5 --seconds 3"), "at least twice"),
            (
                format!("{floor} --calls 5 --verbose"),
                "unexpected argument",
            ),
            (format!("{floor} --calls"), "--calls needs a value"),
            ("fly".to_owned(), "unknown command"),
        ];
        for (line, error) in cases {
            match parse_str(&line) {
                Err(message) => assert!(message.contains(error), "{line}: {message}"),
                Ok(_) => panic!("{line} accepted"),
            }
        }
    }
}
