//! What the machine is, and what a process costs: CPU time and resident memory read
//! from `/proc` (Linux only; elsewhere the figures are absent).

use serde::Serialize;

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical cores available to this process.
    pub cores: usize,
    /// CPU model, from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// Total memory in MiB, from `/proc/meminfo`.
    pub memory_mib: Option<u64>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// Open-file limit of this process (soft).
    pub open_file_limit: Option<u64>,
}

impl Machine {
    /// Reads the machine's description.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string());
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| kib_field(&m, "MemTotal:"))
            .map(|kib| kib / 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string());
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_mib,
            kernel,
            open_file_limit: open_file_limit(),
        }
    }
}

fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur)
}

/// A `kB` field of a `/proc` status-like file, in KiB.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// CPU seconds (user + system) a process has used so far: `/proc/<pid>/stat`
/// fields 14 and 15. `None` for "self" means this process.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start past ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 is index 0, so utime (14) is index 11 and stime (15) index 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Some((utime + stime) / ticks)
}

/// Seconds the threads of a process now alive have spent ready to run but waiting
/// for a core: the sum of field 2 of `/proc/<pid>/task/*/schedstat`. `None` for
/// "self" means this process. On two shared cores this is how much the node and
/// the tool slow each other down; threads that have exited are not counted.
pub fn cpu_wait_seconds(pid: Option<u32>) -> Option<f64> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/task"),
        None => "/proc/self/task".to_string(),
    };
    let mut waited_ns: u64 = 0;
    for task in std::fs::read_dir(dir).ok()? {
        let Ok(task) = task else { continue };
        // A thread that ends while we read is simply not counted.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        waited_ns += stat
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())?;
    }
    Some(waited_ns as f64 / 1e9)
}

/// Resident memory of a process in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, "VmRSS:")
}

/// Open file descriptors of a process (entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// CPU use of this tool and of the node over a measured interval.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    node_pid: Option<u32>,
    wall: std::time::Instant,
    bench: Option<f64>,
    node: Option<f64>,
    bench_wait: Option<f64>,
    node_wait: Option<f64>,
}

/// CPU seconds used over an interval, by the tool and by the node(s).
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    /// Wall-clock seconds of the interval.
    pub wall_s: f64,
    /// CPU seconds this tool used (all its threads).
    pub bench_cpu_s: Option<f64>,
    /// CPU seconds the node used.
    pub node_cpu_s: Option<f64>,
    /// The tool's use as a share of one core (100 = one core busy).
    pub bench_cpu_pct: Option<f64>,
    /// The node's use as a share of one core.
    pub node_cpu_pct: Option<f64>,
    /// Seconds the tool's threads were ready to run but waited for a core.
    pub bench_cpu_wait_s: Option<f64>,
    /// Seconds the node's threads were ready to run but waited for a core.
    pub node_cpu_wait_s: Option<f64>,
}

impl CpuMeter {
    /// Starts measuring now.
    pub fn start(node_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            node_pid,
            wall: std::time::Instant::now(),
            bench: cpu_seconds(None),
            node: node_pid.and_then(|p| cpu_seconds(Some(p))),
            bench_wait: cpu_wait_seconds(None),
            node_wait: node_pid.and_then(|p| cpu_wait_seconds(Some(p))),
        }
    }

    /// What was used since [`CpuMeter::start`].
    pub fn stop(&self) -> CpuUse {
        let wall_s = self.wall.elapsed().as_secs_f64();
        let since = |start: Option<f64>, now: Option<f64>| match (start, now) {
            // Threads that exited take their waits with them: never below zero.
            (Some(a), Some(b)) => Some((b - a).max(0.0)),
            _ => None,
        };
        let bench_cpu_s = since(self.bench, cpu_seconds(None));
        let node_cpu_s = since(self.node, self.node_pid.and_then(|p| cpu_seconds(Some(p))));
        let bench_cpu_wait_s = since(self.bench_wait, cpu_wait_seconds(None));
        let node_cpu_wait_s = since(
            self.node_wait,
            self.node_pid.and_then(|p| cpu_wait_seconds(Some(p))),
        );
        let pct = |s: Option<f64>| s.map(|s| 100.0 * s / wall_s.max(1e-9));
        CpuUse {
            bench_cpu_wait_s,
            node_cpu_wait_s,
            wall_s,
            bench_cpu_pct: pct(bench_cpu_s),
            node_cpu_pct: pct(node_cpu_s),
            bench_cpu_s,
            node_cpu_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|k| k > 0));
        assert!(cpu_seconds(None).is_some());
        assert!(cpu_seconds(Some(pid)).is_some());
        assert!(cpu_wait_seconds(None).is_some_and(|s| s >= 0.0));
        assert!(cpu_wait_seconds(Some(pid)).is_some_and(|s| s >= 0.0));
        assert!(Machine::detect().cores >= 1);
    }
}
