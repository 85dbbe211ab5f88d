//! What the machine is, and what a process costs: CPU time and resident memory read
//! from `/proc` (Linux only; elsewhere the figures are absent).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

/// Nanoseconds each thread of a process now alive has spent ready to run but
/// waiting for a core (field 2 of `/proc/<pid>/task/<tid>/schedstat`), by thread id.
/// `None` for "self" means this process.
fn thread_waits(pid: Option<u32>) -> Option<HashMap<u32, u64>> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/task"),
        None => "/proc/self/task".to_string(),
    };
    let mut waits = HashMap::new();
    for task in std::fs::read_dir(dir).ok()? {
        let Ok(task) = task else { continue };
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ends while we read is simply not counted.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = stat.split_whitespace().nth(1).and_then(|v| v.parse().ok()) {
            waits.insert(tid, ns);
        }
    }
    Some(waits)
}

/// How often [`WaitTally`] reads the threads' waits: a thread that exits loses at
/// most this much of its count.
const WAIT_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Time a process's threads waited for a core over an interval, threads that exit
/// before its end included (the node's blocking threads come and go): a thread of
/// the tool reads every thread's wait every [`WAIT_SAMPLE_EVERY`].
#[derive(Debug)]
struct WaitTally {
    /// Each thread's wait when first seen: at the start, or 0 if it began later.
    first: HashMap<u32, u64>,
    /// Each thread's wait when last seen.
    last: HashMap<u32, u64>,
}

impl WaitTally {
    fn start(pid: Option<u32>) -> Option<Arc<Mutex<WaitTally>>> {
        let now = thread_waits(pid)?;
        let tally = Arc::new(Mutex::new(WaitTally {
            first: now.clone(),
            last: now,
        }));
        let weak = Arc::downgrade(&tally);
        // The sampler ends when the meter is dropped. Without it (no thread to be
        // had) the figure still counts the threads alive at the end.
        let _ = std::thread::Builder::new()
            .name("bench-waits".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(WAIT_SAMPLE_EVERY);
                    let Some(tally) = weak.upgrade() else { return };
                    let Some(now) = thread_waits(pid) else { return };
                    tally.lock().unwrap_or_else(|e| e.into_inner()).see(now);
                }
            });
        Some(tally)
    }

    fn see(&mut self, now: HashMap<u32, u64>) {
        for (tid, ns) in now {
            self.first.entry(tid).or_insert(0);
            self.last.insert(tid, ns);
        }
    }

    /// Seconds waited since the start, with a last reading now.
    fn seconds(&mut self, pid: Option<u32>) -> f64 {
        if let Some(now) = thread_waits(pid) {
            self.see(now);
        }
        let waited: u64 = self
            .last
            .iter()
            .map(|(tid, last)| last.saturating_sub(self.first.get(tid).copied().unwrap_or(0)))
            .sum();
        waited as f64 / 1e9
    }
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
#[derive(Debug)]
pub struct CpuMeter {
    node_pid: Option<u32>,
    wall: std::time::Instant,
    bench: Option<f64>,
    node: Option<f64>,
    bench_wait: Option<Arc<Mutex<WaitTally>>>,
    node_wait: Option<Arc<Mutex<WaitTally>>>,
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
            bench_wait: WaitTally::start(None),
            node_wait: node_pid.and_then(|p| WaitTally::start(Some(p))),
        }
    }

    /// What was used since [`CpuMeter::start`].
    pub fn stop(&self) -> CpuUse {
        let wall_s = self.wall.elapsed().as_secs_f64();
        let since = |start: Option<f64>, now: Option<f64>| match (start, now) {
            (Some(a), Some(b)) => Some((b - a).max(0.0)),
            _ => None,
        };
        let bench_cpu_s = since(self.bench, cpu_seconds(None));
        let node_cpu_s = since(self.node, self.node_pid.and_then(|p| cpu_seconds(Some(p))));
        let waited = |tally: &Option<Arc<Mutex<WaitTally>>>, pid: Option<u32>| {
            tally
                .as_ref()
                .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).seconds(pid))
        };
        let bench_cpu_wait_s = waited(&self.bench_wait, None);
        let node_cpu_wait_s = waited(&self.node_wait, self.node_pid);
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
        assert!(thread_waits(None).is_some_and(|t| !t.is_empty()));
        assert!(thread_waits(Some(pid)).is_some_and(|t| t.contains_key(&pid)));
        assert!(Machine::detect().cores >= 1);
    }

    #[test]
    fn the_waits_of_threads_that_exit_during_the_interval_still_count() {
        let meter = CpuMeter::start(None);
        // Four busy threads per core make each other wait, then end.
        let busy: Vec<_> = (0..4 * std::thread::available_parallelism().map_or(2, |n| n.get()))
            .map(|_| {
                std::thread::spawn(|| {
                    let until = std::time::Instant::now() + std::time::Duration::from_millis(600);
                    let mut x = 0u64;
                    while std::time::Instant::now() < until {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                })
            })
            .collect();
        for t in busy {
            let _ = t.join();
        }
        // Gone now: only the sampled readings still hold their waits.
        let waited = meter.stop().bench_cpu_wait_s.expect("waits read");
        assert!(
            waited > 0.2,
            "threads busy on every core for 0.6 s waited {waited} s in all"
        );
    }
}
