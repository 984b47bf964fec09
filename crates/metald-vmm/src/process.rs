//! Process handling every backend shares: spawning a VMM detached from
//! metald, knowing a process by pid *and* start time (so a reused pid is
//! never mistaken for a VM), watching for exit through a pidfd, and
//! signalling only the process that is really ours.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use metald_core::ports::{VmmError, VmmExit};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// A process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// One-letter state (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Start time in clock ticks after boot (field 22).
    pub start_time: u64,
}

/// Reads a process's state and start time.
pub fn stat(pid: i32) -> io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unreadable /proc/{pid}/stat"),
        )
    })
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Field 3 is the state; field 22 the start time: 19 fields later.
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// Whether `pid` is alive and is the process that started at `start_time`.
pub fn is_alive(pid: i32, start_time: u64) -> bool {
    matches!(stat(pid), Ok(s) if s.start_time == start_time && s.state != 'Z' && s.state != 'X')
}

/// A process's command line, one argument per element.
pub fn cmdline(pid: i32) -> io::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// A pidfd for `pid`, only if it still is the process that started at
/// `start_time`. Checking after opening makes the pidfd a stable handle:
/// whatever happens to the pid later, signals go to this process.
fn open_ours(pid: i32, start_time: u64) -> Option<rustix::fd::OwnedFd> {
    let fd = pidfd_open(Pid::from_raw(pid)?, PidfdFlags::empty()).ok()?;
    is_alive(pid, start_time).then_some(fd)
}

/// Sends `sig` to the process if it is still ours. Returns whether it was.
/// Only a process that is gone (or another one now) is `Ok(false)`; any
/// other failure to get a handle on it is an error, never "gone".
pub fn signal(pid: i32, start_time: u64, sig: Signal) -> io::Result<bool> {
    let Some(p) = Pid::from_raw(pid) else {
        return Ok(false);
    };
    let fd = match pidfd_open(p, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if !is_alive(pid, start_time) {
        return Ok(false);
    }
    match pidfd_send_signal(&fd, sig) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::SRCH) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Resolves when a process that is not metald's child exits. The exit
/// status of such a process is not available to metald.
async fn wait_foreign(pid: i32, start_time: u64) -> VmmExit {
    let unknown = VmmExit {
        code: None,
        signal: None,
    };
    let Some(fd) = open_ours(pid, start_time) else {
        return unknown;
    };
    // SAFETY: an OwnedFd is a valid open descriptor that keeps referring to
    // the same pidfd until the AsyncFd (which owns it) is dropped.
    let registered = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
    match registered {
        // A pidfd turns readable when the process exits.
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            // No reactor registration possible: fall back to a slow poll.
            while is_alive(pid, start_time) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    unknown
}

/// The VMM processes this metald started, with their exit status once
/// reaped. Processes adopted after a restart are not here; they are
/// watched through pidfds instead.
#[derive(Clone, Default)]
pub struct Children {
    exits: Arc<Mutex<ExitMap>>,
}

/// Exit status per (pid, start time), `None` while the child runs.
type ExitMap = HashMap<(i32, u64), watch::Receiver<Option<VmmExit>>>;

impl Children {
    /// Spawns `cmd` in its own process group, so a signal to metald's
    /// group (Ctrl-C in a terminal) does not reach it and it outlives
    /// metald. Returns the pid and its start time. The caller decides
    /// where stdin/stdout/stderr go; they must not be pipes to metald.
    pub fn spawn(&self, mut cmd: tokio::process::Command) -> io::Result<(i32, u64)> {
        cmd.process_group(0).kill_on_drop(false);
        let mut child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("child exited before it had a pid"))?
            as i32;
        // The start time does not change across exec, so reading it while
        // the child may still be between fork and exec is fine.
        let start_time = match stat(pid) {
            Ok(st) => st.start_time,
            Err(e) => {
                // Unknowable identity: never leave it running untracked.
                let _ = child.start_kill();
                return Err(e);
            }
        };
        let (tx, rx) = watch::channel(None);
        self.lock().insert((pid, start_time), rx);
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    VmmExit {
                        code: status.code(),
                        signal: status.signal(),
                    }
                }
                Err(_) => VmmExit {
                    code: None,
                    signal: None,
                },
            };
            let _ = tx.send(Some(exit));
        });
        Ok((pid, start_time))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExitMap> {
        self.exits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves when the process exits, with its status when it is
    /// metald's own child.
    pub fn wait_exit(&self, pid: i32, start_time: u64) -> BoxFuture<'static, VmmExit> {
        match self.lock().get(&(pid, start_time)).cloned() {
            Some(mut rx) => async move {
                match rx.wait_for(Option::is_some).await {
                    Ok(exit) => exit.clone().unwrap_or(VmmExit {
                        code: None,
                        signal: None,
                    }),
                    Err(_) => VmmExit {
                        code: None,
                        signal: None,
                    },
                }
            }
            .boxed(),
            None => wait_foreign(pid, start_time).boxed(),
        }
    }

    /// Drops what is remembered about a process that is gone for good.
    pub fn forget(&self, pid: i32, start_time: u64) {
        self.lock().remove(&(pid, start_time));
    }

    /// [`Self::kill`], then [`Self::forget`]: for a process that will not
    /// be asked about again.
    pub async fn kill_and_forget(&self, pid: i32, start_time: u64) -> Result<(), VmmError> {
        self.kill(pid, start_time).await?;
        self.forget(pid, start_time);
        Ok(())
    }

    /// SIGKILLs the process if it is still ours and waits (bounded) until
    /// it is gone.
    pub async fn kill(&self, pid: i32, start_time: u64) -> Result<(), VmmError> {
        let exited = self.wait_exit(pid, start_time);
        match signal(pid, start_time, Signal::KILL) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return Err(VmmError::Io(format!("cannot kill VMM process {pid}: {e}"))),
        }
        match tokio::time::timeout(Duration::from_secs(10), exited).await {
            Ok(_) => Ok(()),
            Err(_) => Err(VmmError::Timeout(format!(
                "VMM process {pid} did not exit within 10 s of SIGKILL"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let line = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 1000 200";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            ProcStat {
                state: 'S',
                start_time: 987654
            }
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let st = stat(me).unwrap().start_time;
        assert!(is_alive(me, st));
        assert!(
            !is_alive(me, st + 1),
            "a different start time means a different process"
        );
    }

    fn sleeper(secs: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg(secs).stdin(std::process::Stdio::null());
        cmd
    }

    #[tokio::test]
    async fn child_exit_status_is_reported() {
        let children = Children::default();
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "exit 3"]);
        let (pid, st) = children.spawn(cmd).unwrap();
        let exit = children.wait_exit(pid, st).await;
        assert_eq!(exit.code, Some(3));
        // A late waiter still sees the status.
        assert_eq!(children.wait_exit(pid, st).await.code, Some(3));
    }

    #[tokio::test]
    async fn kill_reports_the_signal_and_child_runs_in_its_own_group() {
        let children = Children::default();
        let (pid, st) = children.spawn(sleeper("30")).unwrap();
        let pgid = rustix::process::getpgid(Pid::from_raw(pid)).unwrap();
        assert_eq!(
            pgid.as_raw_nonzero().get(),
            pid,
            "VMMs lead their own process group"
        );
        let exited = children.wait_exit(pid, st);
        children.kill(pid, st).await.unwrap();
        assert_eq!(exited.await.signal, Some(9));
        assert!(!is_alive(pid, st));
    }

    #[tokio::test]
    async fn a_wrong_start_time_is_never_signalled() {
        let children = Children::default();
        let (pid, st) = children.spawn(sleeper("30")).unwrap();
        assert!(!signal(pid, st + 1, Signal::KILL).unwrap());
        assert!(is_alive(pid, st), "the real process must survive");
        children.kill(pid, st).await.unwrap();
    }

    #[tokio::test]
    async fn foreign_processes_are_watched_through_a_pidfd() {
        // A process that is not a child of this Children (std spawn).
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let st = stat(pid).unwrap().start_time;
        let watcher = Children::default();
        let exited = tokio::spawn(watcher.wait_exit(pid, st));
        assert!(!exited.is_finished());
        child.kill().unwrap();
        child.wait().unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(5), exited)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            exit,
            VmmExit {
                code: None,
                signal: None
            }
        );
    }
}
