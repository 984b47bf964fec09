//! What a VM uses, read from its VMM process in `/proc`.
//!
//! - CPU: the sum over the VMM's threads of the first field of
//!   `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on a CPU). This is the
//!   VMM's CPU time, vCPU threads and device emulation together. VMMs start
//!   and end worker threads as they go; a [`CpuTracker`] keeps the last
//!   reading of every thread that has exited, so the total never goes
//!   back (the time an exited thread used after its last reading, at most
//!   one sample interval of one worker, is not counted).
//! - Memory: resident set size (`/proc/<pid>/statm`, field 2, in pages).
//! - Disk: `read_bytes` / `write_bytes` of `/proc/<pid>/io`: bytes the VMM
//!   made the host's storage layer read or write for the guest's disks.
//! - Network: the counters of the host side of the VM's veth pair
//!   (`/sys/class/net/<veth>/statistics`): what the host side receives
//!   the guest sent (`net_tx`), what it transmits the guest received
//!   (`net_rx`). Zero for a VM without an interface.

use std::collections::HashMap;
use std::io;

/// Cumulative usage of one VMM at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_ns: i64,
    pub memory_bytes: i64,
    pub disk_read: i64,
    pub disk_write: i64,
    pub net_rx: i64,
    pub net_tx: i64,
}

/// The cumulative counters (CPU time, disk bytes) a VM reached before its
/// current VMM process started. A VM booted again, or rebooted by a
/// backend that restarts its VMM, gets a fresh process whose own counters
/// start at zero; adding what the VM carried keeps its stream's counters
/// from ever going back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub cpu_ns: i64,
    pub disk_read: i64,
    pub disk_write: i64,
}

impl Carried {
    /// What a stream reporting `total` carries into its next process.
    pub fn from_total(total: Usage) -> Self {
        Carried {
            cpu_ns: total.cpu_ns,
            disk_read: total.disk_read,
            disk_write: total.disk_write,
        }
    }

    /// The VM's totals, given its current process's own usage.
    pub fn onto(self, own: Usage) -> Usage {
        Usage {
            cpu_ns: self.cpu_ns.saturating_add(own.cpu_ns),
            disk_read: self.disk_read.saturating_add(own.disk_read),
            disk_write: self.disk_write.saturating_add(own.disk_write),
            ..own
        }
    }
}

/// CPU time of one VMM across its threads' lives.
#[derive(Debug, Default, Clone)]
pub struct CpuTracker {
    /// Last reading per live thread id.
    threads: HashMap<u32, i64>,
    /// What threads that have exited had used at their last reading.
    exited: i64,
    /// The last total reported; totals never go below it.
    last: i64,
}

impl CpuTracker {
    /// Folds a reading of every live thread into the running total.
    fn total(&mut self, now: HashMap<u32, i64>) -> i64 {
        for (tid, ns) in &self.threads {
            if !now.contains_key(tid) {
                self.exited += ns;
            }
        }
        self.threads = now;
        let total = self.exited + self.threads.values().sum::<i64>();
        self.last = self.last.max(total);
        self.last
    }
}

/// Reads the usage of process `pid`.
pub fn read(pid: i32, cpu: &mut CpuTracker) -> io::Result<Usage> {
    let mut threads = HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let Ok(tid) = task.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A thread may exit between listing and reading: skip it.
        if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
            let ns = s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<i64>().ok());
            threads.insert(tid, ns.unwrap_or(0));
        }
    }
    let cpu_ns = cpu.total(threads);
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if pages == 0 {
        // Only an exiting process (or a zombie) has no resident memory; its
        // counters are no longer the VM's.
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {pid} has exited"),
        ));
    }
    let (disk_read, disk_write) = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .map(|io| (field(&io, "read_bytes:"), field(&io, "write_bytes:")))
        .unwrap_or((0, 0));
    Ok(Usage {
        cpu_ns,
        memory_bytes: pages * page_size(),
        disk_read,
        disk_write,
        net_rx: 0,
        net_tx: 0,
    })
}

/// Bytes the guest received and sent, from the host side of its veth.
pub fn veth_traffic(veth: &str) -> (i64, i64) {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{veth}/statistics/{name}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (read("tx_bytes"), read("rx_bytes"))
}

fn field(text: &str, name: &str) -> i64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn page_size() -> i64 {
    // x86-64 and arm64 Linux as metald runs them; statm counts these.
    4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_uses_cpu_and_memory_and_cpu_only_grows() {
        let me = std::process::id() as i32;
        let mut cpu = CpuTracker::default();
        let a = read(me, &mut cpu).unwrap();
        let mut x: u64 = 0;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = read(me, &mut cpu).unwrap();
        assert!(a.cpu_ns > 0 && a.memory_bytes > 0, "{a:?}");
        assert!(
            b.cpu_ns > a.cpu_ns,
            "busy work adds CPU time: {a:?} -> {b:?}"
        );
    }

    #[test]
    fn a_missing_process_is_an_error() {
        assert!(read(i32::MAX, &mut CpuTracker::default()).is_err());
    }

    #[test]
    fn carried_counters_add_to_a_fresh_process_and_leave_gauges_alone() {
        let first = Usage {
            cpu_ns: 900,
            memory_bytes: 4096,
            disk_read: 10,
            disk_write: 20,
            net_rx: 1,
            net_tx: 2,
        };
        let carried = Carried::from_total(first);
        let own = Usage {
            cpu_ns: 5,
            memory_bytes: 8192,
            disk_read: 1,
            disk_write: 0,
            net_rx: 3,
            net_tx: 4,
        };
        let total = carried.onto(own);
        assert_eq!(
            total,
            Usage {
                cpu_ns: 905,
                memory_bytes: 8192,
                disk_read: 11,
                disk_write: 20,
                net_rx: 3,
                net_tx: 4,
            }
        );
    }

    #[test]
    fn exited_threads_keep_their_time_and_the_total_never_drops() {
        let mut t = CpuTracker::default();
        assert_eq!(t.total(HashMap::from([(1, 100), (2, 50)])), 150);
        // Thread 2 exited; thread 3 is new.
        assert_eq!(t.total(HashMap::from([(1, 120), (3, 5)])), 175);
        // A thread id reused by a fresh thread with less time.
        assert_eq!(t.total(HashMap::from([(1, 120), (3, 1)])), 175);
    }
}
