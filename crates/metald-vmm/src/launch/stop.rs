//! Stopping a VMM (graceful, then SIGKILL) and removing what a VM
//! directory records.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use metald_core::ports::{StopMode, VmmError, VmmRuntime};
use tracing::warn;

use super::{recorded_spawn, remove_dir_off_runtime};
use crate::process::{self, Children};

/// Stops the VMM in `rt`: in graceful mode asks the guest to power off
/// with `ask` (the ACPI power button, Ctrl-Alt-Del, ...) and waits up to
/// the limit, then SIGKILLs whatever still runs. Removes the control
/// socket, which most VMMs leave behind when killed.
pub async fn stop<F, Fut>(
    children: &Children,
    rt: &VmmRuntime,
    mode: StopMode,
    request: &str,
    ask: F,
) -> Result<(), VmmError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), VmmError>>,
{
    if process::is_alive(rt.pid, rt.start_time) {
        if let StopMode::Graceful(limit) = mode {
            match ask().await {
                Ok(()) if exits_within(children, rt, limit).await => {}
                Ok(()) => warn!(
                    pid = rt.pid,
                    ?limit,
                    "guest ignored the {request}; killing its VMM"
                ),
                Err(e) => {
                    warn!(pid = rt.pid, error = %e, "cannot send the {request}; killing its VMM")
                }
            }
        }
        children.kill(rt.pid, rt.start_time).await?;
    }
    let _ = std::fs::remove_file(&rt.socket);
    Ok(())
}

/// Whether the process in `rt` exits within `limit`.
pub async fn exits_within(children: &Children, rt: &VmmRuntime, limit: Duration) -> bool {
    tokio::time::timeout(limit, children.wait_exit(rt.pid, rt.start_time))
        .await
        .is_ok()
}

/// Kills the process `rt` names and the one `dir`'s spawn record names (if
/// each is still the recorded process), then removes `dir`. Idempotent.
pub async fn kill_and_remove(
    children: &Children,
    dir: &Path,
    rt: Option<&VmmRuntime>,
) -> Result<(), VmmError> {
    let mut known: Vec<(i32, u64)> = rt.map(|r| (r.pid, r.start_time)).into_iter().collect();
    if let Some(rec) = recorded_spawn(dir) {
        known.push((rec.pid, rec.start_time));
    }
    for (pid, start_time) in known {
        children.kill_and_forget(pid, start_time).await?;
    }
    remove_dir_off_runtime(dir).await
}
