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

/// The process's resident memory now.
pub fn current_rss_kib(pid: u32) -> anyhow::Result<u64> {
    read_usage(pid).map(|usage| usage.rss_kib)
}

/// Resident memory by kind (proc(5)): anonymous (the heap and stacks), file-backed (mapped
/// files: the binary, an mmapped database), shared memory (SQLite's WAL index, for one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RssParts {
    pub anon_kib: u64,
    pub file_kib: u64,
    pub shmem_kib: u64,
}

pub fn rss_parts(pid: u32) -> anyhow::Result<RssParts> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let field = |name: &str| {
        status_kib(&status, name).with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(RssParts {
        anon_kib: field("RssAnon:")?,
        file_kib: field("RssFile:")?,
        shmem_kib: field("RssShmem:")?,
    })
}

/// How many file descriptors the process has open.
pub fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("cannot list /proc/{pid}/fd"))?
        .count())
}

/// A TCP socket the process holds a descriptor of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local_port: u16,
    pub remote_port: u16,
    pub state: SocketState,
}

/// A TCP socket's state, as the kernel names it (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketState(u8);

impl SocketState {
    pub const LISTEN: Self = Self(0x0A);

    pub fn name(self) -> &'static str {
        const NAMES: [&str; 12] = [
            "?",
            "ESTABLISHED",
            "SYN_SENT",
            "SYN_RECV",
            "FIN_WAIT1",
            "FIN_WAIT2",
            "TIME_WAIT",
            "CLOSE",
            "CLOSE_WAIT",
            "LAST_ACK",
            "LISTEN",
            "CLOSING",
        ];
        NAMES.get(usize::from(self.0)).copied().unwrap_or("?")
    }
}

/// Every TCP socket (IPv4 and IPv6) the process has open: the kernel's socket table of its
/// network namespace, kept to the inodes among the process's descriptors.
pub fn tcp_sockets(pid: u32) -> anyhow::Result<Vec<TcpSocket>> {
    let mut inodes = std::collections::HashSet::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("cannot list /proc/{pid}/fd"))?;
    for fd in fds {
        // A descriptor closed while the directory is read is simply gone.
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            inodes.insert(inode);
        }
    }
    let mut sockets = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
            .with_context(|| format!("cannot read /proc/{pid}/net/{table}"))?;
        sockets.extend(
            text.lines()
                .skip(1)
                .filter_map(tcp_line)
                .filter(|(inode, _)| inodes.contains(inode))
                .map(|(_, socket)| socket),
        );
    }
    Ok(sockets)
}

/// One line of `/proc/net/tcp`: `sl local rem st … uid timeout inode …`, addresses as
/// `HEXIP:HEXPORT` (proc(5)).
fn tcp_line(line: &str) -> Option<(u64, TcpSocket)> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let port = |address: &str| u16::from_str_radix(address.rsplit_once(':')?.1, 16).ok();
    let socket = TcpSocket {
        local_port: port(fields.get(1)?)?,
        remote_port: port(fields.get(2)?)?,
        state: SocketState(u8::from_str_radix(fields.get(3)?, 16).ok()?),
    };
    Some((fields.get(9)?.parse().ok()?, socket))
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
    status_kib(status, "VmRSS:")
}

/// A `Name:   1234 kB` line of `/proc/<pid>/status`.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))?
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
        let parts = rss_parts(std::process::id()).unwrap();
        assert!(parts.anon_kib > 0 && parts.file_kib > 0, "{parts:?}");
    }

    #[test]
    fn finds_this_process_s_listening_and_connected_sockets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let sockets = tcp_sockets(std::process::id()).unwrap();
        let listen = TcpSocket {
            local_port: port,
            remote_port: 0,
            state: SocketState::LISTEN,
        };
        assert!(sockets.contains(&listen), "{sockets:?}");
        // Matched by both ports: other tests of this process have sockets of their own.
        let client_port = client.local_addr().unwrap().port();
        let pair = |s: &&TcpSocket| {
            (s.local_port, s.remote_port) == (client_port, port)
                || (s.local_port, s.remote_port) == (port, client_port)
        };
        assert_eq!(sockets.iter().filter(pair).count(), 2, "{sockets:?}");
        assert!(open_fds(std::process::id()).unwrap() >= 3);
        drop((client, accepted));
        let after = tcp_sockets(std::process::id()).unwrap();
        assert_eq!(after.iter().filter(pair).count(), 0, "{after:?}");
    }

    #[test]
    fn reads_a_socket_table_line() {
        let line = "   3: 0100007F:1F90 0100007F:D2B4 01 00000000:00000000 00:00000000 00000000  \
                    1000        0 123456 1 0000000000000000 20 4 30 10 -1";
        let (inode, socket) = tcp_line(line).unwrap();
        assert_eq!(inode, 123_456);
        assert_eq!((socket.local_port, socket.remote_port), (8080, 53940));
        assert_eq!(socket.state.name(), "ESTABLISHED");
        assert_eq!(SocketState::LISTEN.name(), "LISTEN");
        assert_eq!(tcp_line("  sl  local_address rem_address   st"), None);
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
