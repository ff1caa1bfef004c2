//! What the measured process (callbridge, or the fake in a floor run) spends, read from
//! `/proc/<pid>`: the kernel's own accounting, so the harness adds nothing to it.

use anyhow::Context;

/// CPU time (all threads, in clock ticks) and resident memory at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    user_ticks: u64,
    /// Kernel time: on loopback this includes delivering what the process sends to its peers.
    system_ticks: u64,
    rss_kib: u64,
}

/// One process followed over a measurement window: memory from before the load to its peak,
/// CPU over the window.
pub struct Tracker {
    pid: u32,
    baseline_rss_kib: u64,
    start: Option<Usage>,
    peak_rss_kib: u64,
}

/// What a tracked process spent in the window.
pub struct Spent {
    pub pid: u32,
    pub user_ticks: u64,
    pub system_ticks: u64,
    pub baseline_rss_kib: u64,
    pub peak_rss_kib: u64,
}

impl Tracker {
    /// Reads the baseline: call it before the load starts.
    pub fn new(pid: u32) -> anyhow::Result<Self> {
        let baseline = read_usage(pid)?;
        Ok(Self {
            pid,
            baseline_rss_kib: baseline.rss_kib,
            start: None,
            peak_rss_kib: baseline.rss_kib,
        })
    }

    pub fn start_window(&mut self) -> anyhow::Result<()> {
        self.start = Some(self.read()?);
        Ok(())
    }

    /// Looks at the process's memory again, for its peak.
    pub fn sample(&mut self) -> anyhow::Result<()> {
        self.read().map(drop)
    }

    fn read(&mut self) -> anyhow::Result<Usage> {
        let usage = read_usage(self.pid)?;
        self.peak_rss_kib = self.peak_rss_kib.max(usage.rss_kib);
        Ok(usage)
    }

    pub fn end_window(mut self) -> anyhow::Result<Spent> {
        let end = self.read()?;
        let start = self.start.context("the window was never started")?;
        Ok(Spent {
            pid: self.pid,
            user_ticks: end.user_ticks - start.user_ticks,
            system_ticks: end.system_ticks - start.system_ticks,
            baseline_rss_kib: self.baseline_rss_kib,
            peak_rss_kib: self.peak_rss_kib,
        })
    }
}

fn read_usage(pid: u32) -> anyhow::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat: is the process running?"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let (user_ticks, system_ticks) =
        cpu_ticks(&stat).context("unexpected /proc/<pid>/stat format")?;
    Ok(Usage {
        user_ticks,
        system_ticks,
        rss_kib: rss_kib(&status).context("no VmRSS in /proc/<pid>/status")?,
    })
}

/// `utime` and `stime` in clock ticks (proc(5) fields 14 and 15). Fields are counted after
/// the command name's closing parenthesis, because the name itself may contain spaces.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

fn rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_this_process() {
        let usage = read_usage(std::process::id()).unwrap();
        assert!(usage.rss_kib > 0);
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_fields() {
        let stat = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 3 0 1000";
        assert_eq!(cpu_ticks(stat), Some((17, 5)));
        assert_eq!(
            rss_kib("Name:\tx\nVmRSS:\t   1234 kB\nThreads: 3\n"),
            Some(1234)
        );
    }
}
