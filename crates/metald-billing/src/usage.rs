//! What a VM uses, read from its VMM process in `/proc`.
//!
//! - CPU: the VMM process's CPU-time clock (`clock_getcpuclockid`, read
//!   with `clock_gettime`): nanoseconds on a CPU of all its threads, vCPUs
//!   and device emulation together, those that have exited included. It is
//!   the sum of what each thread's `/proc/<pid>/task/<tid>/schedstat`
//!   reports, kept by the kernel per process: one system call per sample
//!   however many threads the VMM runs, and no text to parse.
//! - Memory: resident set size (`/proc/<pid>/statm`, field 2, in pages).
//! - Disk: `read_bytes` / `write_bytes` of `/proc/<pid>/io`: bytes the VMM
//!   made the host's storage layer read or write for the guest's disks.
//! - Network: the counters of the host side of the VM's veth pair
//!   (`/sys/class/net/<veth>/statistics`): what the host side receives
//!   the guest sent (`net_tx`), what it transmits the guest received
//!   (`net_rx`). Zero for a VM without an interface.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::time::ClockId;
use nix::unistd::Pid;

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

/// Reads one VMM process's usage, sample after sample, with every `/proc`
/// file it needs kept open: a sample is one `clock_gettime` and one
/// `pread` per file, not an open, read and close of each (opening is most
/// of a `/proc` read's cost). The open files also pin the process: once
/// it exits they fail with `ESRCH`, even if its pid is reused. The CPU
/// clock is named by pid, so it is read first and counts only if the
/// pinned `statm` still reads after it: the process was alive then, so
/// the pid was still its own when the clock was read.
///
/// A process whose CPU time has not moved since the last read has not run:
/// it cannot have read or written a byte or faulted in a page (the kernel
/// counts those in the running task's context), so its memory and disk
/// counters are those of the last read and the sample is the clock alone.
/// Its resident memory can still shrink without it running (the host
/// reclaiming pages), so `statm` is read again at least every
/// [`REFRESH_EVERY`] samples; `io` only once the clock moved. A paused or
/// idle VMM costs one system call per sample (two every tenth); one that
/// ran costs three.
#[derive(Debug)]
pub struct Reader {
    pid: i32,
    clock: Option<ClockId>,
    statm: Option<File>,
    io: Option<File>,
    /// The last CPU total reported; totals never go below it.
    last: i64,
    /// The clock's reading at the last full read, and what that read gave.
    full: Option<(i64, Usage)>,
    /// Samples that may still reuse `full` while the clock stands still.
    reuse_left: u32,
    /// Reads that read `statm` and `io` (for tests and the bench).
    full_reads: u64,
    /// Reads of `io` (for tests).
    io_reads: u64,
    buf: Vec<u8>,
}

/// Most samples in a row answered from the clock alone: memory and disk
/// counters are at most this many samples old (1 s at 100 ms).
pub const REFRESH_EVERY: u32 = 10;

impl Reader {
    /// A reader of process `pid`; nothing is opened until the first read.
    pub fn new(pid: i32) -> Self {
        Reader {
            pid,
            clock: None,
            statm: None,
            io: None,
            last: 0,
            full: None,
            reuse_left: 0,
            full_reads: 0,
            io_reads: 0,
            buf: Vec::with_capacity(512),
        }
    }

    /// The process this reader reads.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// How many reads so far read the process's `/proc` files, not only
    /// its CPU clock.
    pub fn full_reads(&self) -> u64 {
        self.full_reads
    }

    /// How many reads so far read the process's `/proc/<pid>/io`.
    pub fn io_reads(&self) -> u64 {
        self.io_reads
    }

    /// The process's cumulative usage now (network counters zero).
    pub fn read(&mut self) -> io::Result<Usage> {
        if self.statm.is_none() {
            self.statm = Some(File::open(format!("/proc/{}/statm", self.pid))?);
            // Without /proc/<pid>/io (a kernel without task I/O
            // accounting) disk counters stay zero.
            self.io = File::open(format!("/proc/{}/io", self.pid)).ok();
            self.clock = Some(ClockId::pid_cpu_clock_id(Pid::from_raw(self.pid))?);
        }
        let cpu_ns = match self.clock.map(ClockId::now) {
            Some(Ok(t)) => t.tv_sec().saturating_mul(1_000_000_000) + t.tv_nsec(),
            _ => return Err(gone(self.pid)),
        };
        self.last = self.last.max(cpu_ns);
        if let Some((clock, kept)) = self.full
            && clock == cpu_ns
            && self.reuse_left > 0
        {
            // Not run since: nothing but time has changed. (A process that
            // exited and was reaped fails the clock above; a reused pid is
            // a process with a CPU time of its own.)
            self.reuse_left -= 1;
            return Ok(kept);
        }
        self.full_reads += 1;
        let pages = match self.statm.as_ref().map(|f| pread(f, &mut self.buf)) {
            Some(Ok(())) => nth_field(&self.buf, 1),
            _ => 0,
        };
        if pages == 0 {
            // Only an exiting process (or a zombie) has no resident memory;
            // its counters are no longer the VM's.
            return Err(gone(self.pid));
        }
        let (disk_read, disk_write) = match self.full {
            // Not run since the last full read: the kernel counts a task's
            // storage bytes in its own context, so they stand still too;
            // only resident memory can change (reclaim) and is read again.
            Some((clock, kept)) if clock == cpu_ns => (kept.disk_read, kept.disk_write),
            _ => match self.io.as_ref().map(|f| {
                self.io_reads += 1;
                pread(f, &mut self.buf)
            }) {
                Some(Ok(())) => {
                    let text = String::from_utf8_lossy(&self.buf);
                    (field(&text, "read_bytes:"), field(&text, "write_bytes:"))
                }
                _ => (0, 0),
            },
        };
        let usage = Usage {
            cpu_ns: self.last,
            memory_bytes: pages * page_size(),
            disk_read,
            disk_write,
            net_rx: 0,
            net_tx: 0,
        };
        self.full = Some((cpu_ns, usage));
        self.reuse_left = REFRESH_EVERY - 1;
        Ok(usage)
    }
}

fn gone(pid: i32) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("process {pid} has exited"))
}

/// Reads all of `f` from its start into `buf`. `/proc` files regenerate
/// their text on a read at offset 0.
fn pread(f: &File, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    buf.resize(buf.capacity().max(512), 0);
    let mut len = 0;
    loop {
        let n = f.read_at(&mut buf[len..], len as u64)?;
        if n == 0 {
            break;
        }
        len += n;
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
    }
    buf.truncate(len);
    if len == 0 {
        // A dead process's files read as empty on some kernels.
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    Ok(())
}

/// Whitespace-separated field `n` of `buf` as a number (0 if absent).
fn nth_field(buf: &[u8], n: usize) -> i64 {
    buf.split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .nth(n)
        .and_then(|f| std::str::from_utf8(f).ok())
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
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

    fn spin(n: u64) {
        let mut x: u64 = 0;
        for i in 0..n {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
    }

    #[test]
    fn own_process_uses_cpu_and_memory_and_cpu_only_grows() {
        let me = std::process::id() as i32;
        let mut r = Reader::new(me);
        let a = r.read().unwrap();
        spin(5_000_000);
        let b = r.read().unwrap();
        assert!(a.cpu_ns > 0 && a.memory_bytes > 0, "{a:?}");
        assert!(
            b.cpu_ns > a.cpu_ns,
            "busy work adds CPU time: {a:?} -> {b:?}"
        );
    }

    /// Waits until process `pid` runs `sleep` and is blocked in its
    /// nanosleep (`/proc/<pid>/syscall` names the call it is blocked in).
    fn asleep(pid: i32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let call = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
            let nr = call.split_whitespace().next().unwrap_or("");
            // x86-64 nanosleep and clock_nanosleep; arm64 clock_nanosleep.
            let in_sleep =
                matches!(nr, "35" | "230") || (cfg!(target_arch = "aarch64") && nr == "115");
            if comm.trim() == "sleep" && in_sleep {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} never blocked in its sleep: {comm:?} {call:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn a_process_that_does_not_run_is_read_from_its_clock_and_refreshed_every_tenth_sample() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // A busy host may not have run the child far yet: wait until it is
        // `sleep` itself, blocked in its one long nanosleep, so its CPU
        // time cannot move again.
        asleep(child.id() as i32);
        let mut r = Reader::new(child.id() as i32);
        let first = r.read().unwrap();
        // The clock must stand still between two reads before counting.
        let settled = loop {
            let before = r.full_reads();
            let u = r.read().unwrap();
            if r.full_reads() == before {
                break u;
            }
        };
        let base = r.full_reads();
        let io_base = r.io_reads();
        let mut reads = Vec::new();
        for _ in 0..3 * REFRESH_EVERY {
            reads.push(r.read().unwrap());
        }
        assert!(reads.iter().all(|u| *u == settled), "{settled:?} {reads:?}");
        assert_eq!(
            r.full_reads() - base,
            3,
            "a sleeping process's files are read once per {REFRESH_EVERY} samples"
        );
        assert_eq!(
            r.io_reads(),
            io_base,
            "a process that did not run has the same storage counters: io is not read again"
        );
        assert!(first.memory_bytes > 0);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            r.read().is_err(),
            "a reaped process has no usage, even from the clock path"
        );
    }

    #[test]
    fn a_process_that_runs_has_its_files_read_at_every_sample() {
        let me = std::process::id() as i32;
        let mut r = Reader::new(me);
        for _ in 0..2 * REFRESH_EVERY {
            spin(100_000);
            r.read().unwrap();
        }
        assert_eq!(r.full_reads(), 2 * REFRESH_EVERY as u64);
        assert_eq!(
            r.io_reads(),
            2 * REFRESH_EVERY as u64,
            "io is read whenever the process ran"
        );
    }

    #[test]
    fn a_missing_process_is_an_error() {
        assert!(Reader::new(i32::MAX).read().is_err());
    }

    #[test]
    fn a_process_that_exited_is_an_error_even_with_its_files_open() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut r = Reader::new(child.id() as i32);
        assert!(r.read().is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(r.read().is_err(), "a reaped process has no usage");
    }

    #[test]
    fn a_thread_started_later_is_counted_and_one_that_ended_keeps_its_time() {
        use std::sync::mpsc::channel;
        let me = std::process::id() as i32;
        let mut r = Reader::new(me);
        let before = r.read().unwrap().cpu_ns;
        // A thread that starts after the first read, burns CPU, reports its
        // own CPU time and waits to be let go.
        let (burnt_tx, burnt) = channel();
        let (go, go_rx) = channel::<()>();
        let thread = std::thread::spawn(move || {
            spin(20_000_000);
            let own = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
            burnt_tx.send(nth_field(own.as_bytes(), 0)).unwrap();
            let _ = go_rx.recv();
        });
        let spent = burnt.recv().unwrap();
        go.send(()).unwrap();
        thread.join().unwrap();
        let after = r.read().unwrap().cpu_ns;
        assert!(spent > 0);
        assert!(
            after - before >= spent,
            "the thread's {spent} ns count after it ended: {before} -> {after}"
        );
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
}
