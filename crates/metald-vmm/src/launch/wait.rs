//! Waiting for a VMM to answer while watching for an early exit, and
//! turning a failed start into a caller's reason (the VMM's logs go to
//! metald's log only).

use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use metald_core::ports::{VmmError, VmmExit, VmmRuntime};
use tracing::warn;

use crate::process::{self, Children};

/// How much of a log's end [`log_tail`] reads.
const TAIL_BYTES: u64 = 4096;

/// The last `lines` non-empty lines within the last 4 KiB of a log file,
/// joined by `; `, to explain a failed start in metald's log; `no output`
/// when there are none. Never reads more than those 4 KiB.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut raw = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
            .is_ok()
        {
            let _ = f.take(TAIL_BYTES).read_to_end(&mut raw);
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = all[all.len().saturating_sub(lines)..].join("; ");
    if tail.is_empty() {
        "no output".into()
    } else {
        tail
    }
}

/// How a start-up wait ended badly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// The VMM exited first, like this.
    Exited(VmmExit),
    /// Nothing answered within the limit; the text is the last probe error.
    TimedOut(String),
}

/// The last lines of each of `logs`, for an error message.
fn tails(logs: &[&Path]) -> String {
    logs.iter()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            format!("{name}: {}", log_tail(p, 3))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A failed start as a [`VmmError`]. A VMM that exited with a status on
/// its own refused what it was given (its logs, copied to metald's log,
/// say why); one killed by a signal (the OOM killer, an operator) is gone;
/// one silent until the limit timed out.
pub fn not_ready(
    e: NotReady,
    vmm: &str,
    socket: &Path,
    limit: Duration,
    logs: &[&Path],
) -> VmmError {
    match e {
        NotReady::Exited(exit) => {
            warn!(vmm, socket = %socket.display(), exit = %exit.describe(), logs = %tails(logs),
                "VMM exited while starting");
            let msg = format!("{vmm} {} while starting", exit.describe());
            if exit.signal.is_some() {
                VmmError::Gone(msg)
            } else {
                VmmError::Refused(format!(
                    "{msg}: it refused the VM's configuration (its output is in metald's log)"
                ))
            }
        }
        NotReady::TimedOut(last) => {
            warn!(vmm, socket = %socket.display(), last_error = %last, logs = %tails(logs),
                "VMM did not answer while starting");
            VmmError::Timeout(format!("{vmm} did not answer within {limit:?}"))
        }
    }
}

/// Adds how the VMM ended to a start-up error when the VMM died under the
/// request (the API error alone would only say the connection broke); the
/// tails of its logs go to metald's log. The kind of error stays.
pub async fn explain(
    children: &Children,
    rt: &VmmRuntime,
    e: VmmError,
    vmm: &str,
    logs: &[&Path],
) -> VmmError {
    if process::is_alive(rt.pid, rt.start_time) {
        return e;
    }
    let exit = tokio::time::timeout(
        Duration::from_secs(1),
        children.wait_exit(rt.pid, rt.start_time),
    )
    .await
    .map(|x| x.describe())
    .unwrap_or_else(|_| "exited".into());
    warn!(vmm, pid = rt.pid, exit = %exit, logs = %tails(logs), "VMM died while starting");
    e.map_message(|m| format!("{m} ({vmm} {exit})"))
}

/// Calls `probe` with backoff (1 ms doubling to 20 ms) until it succeeds,
/// the process in `rt` exits, or `limit` passes: a bounded retry, never a
/// fixed sleep.
pub async fn until_ready<T, F, Fut>(
    children: &Children,
    rt: &VmmRuntime,
    limit: Duration,
    mut probe: F,
) -> Result<T, NotReady>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let exited = children.wait_exit(rt.pid, rt.start_time);
    let mut last = String::from("not tried");
    let attempts = async {
        let mut delay = Duration::from_millis(1);
        loop {
            match probe().await {
                Ok(v) => return v,
                Err(e) => last = e,
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    };
    tokio::select! {
        exit = exited => Err(NotReady::Exited(exit)),
        r = tokio::time::timeout(limit, attempts) => match r {
            Ok(v) => Ok(v),
            Err(_) => Err(NotReady::TimedOut(last)),
        },
    }
}
