//! What every backend does around its VMM process, written once: a fresh
//! per-VM directory, joining the VM's network namespace, the spawn record
//! that makes a process findable before the store knows it, waiting for the
//! control socket while watching for an early exit, killing what a
//! directory records and removing it, and finding a backend's processes and
//! directories for the reconciler.
//!
//! Errors returned from here reach API callers (as a boot's reason or a
//! VM's `last_error`): they never hold host paths, the OS's words about
//! them, or what a VMM logged. Those details go to metald's own log.
//!
//! By job: `spawn.rs` (namespace, user, spawn record), `wait.rs` (the
//! start-up wait and its errors), `stop.rs` (stopping and removing),
//! `scan.rs` (finding processes and directories, identity, description).

mod scan;
mod spawn;
mod stop;
mod wait;

pub use scan::*;
pub use spawn::*;
pub use stop::*;
pub use wait::*;

use std::path::Path;
use std::time::Instant;

use metald_core::ports::{BootPhase, BootPhases, VmmError};
use metald_core::vm::{VmId, VmSpec};
use tracing::warn;

/// Longest Unix socket path the kernel accepts (`sun_path` minus the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Name of the spawn record in a VM directory.
pub const SPAWN_RECORD: &str = "vmm.json";

/// A failure on the host's side, for an API caller: `detail` (paths, OS
/// errors) goes to metald's log, the caller reads `cannot <what> on the
/// host`.
pub fn host_failure(what: &str, detail: impl std::fmt::Display) -> String {
    warn!(error = %detail, "cannot {what}");
    format!("cannot {what} on the host")
}

/// Removes VM `id`'s cgroups (made by metald; none when `cgroups` is
/// `None`) once its VMM is gone.
pub async fn remove_cgroups(
    cgroups: Option<&crate::cgroup::CgroupConfig>,
    id: &VmId,
) -> Result<(), VmmError> {
    match cgroups {
        Some(cg) => crate::cgroup::remove(cg, id.as_str())
            .await
            .map_err(|e| VmmError::Io(host_failure("remove the VM's cgroups", e))),
        None => Ok(()),
    }
}

/// Records that boot phase `phase` began at `since` and ends now (for
/// metald's boot phase metrics); returns now, the next phase's start.
pub fn phase_done(phase: BootPhase, since: Instant) -> Instant {
    BootPhases::record(phase, since.elapsed());
    Instant::now()
}

/// Removes whatever a previous run left in `dir` and creates it empty.
pub fn fresh_dir(dir: &Path) -> Result<(), VmmError> {
    let made = match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .and_then(|()| std::fs::create_dir_all(dir));
    made.map_err(|e| {
        VmmError::Io(host_failure(
            "prepare the VM's directory",
            format_args!("{}: {e}", dir.display()),
        ))
    })
}

/// Refuses socket paths the kernel cannot bind.
pub fn check_socket_path(socket: &Path) -> Result<(), String> {
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        warn!(socket = %socket.display(), "control socket path too long");
        return Err(format!(
            "the VMM's control socket path is longer than {MAX_SOCKET_PATH} bytes; \
             the operator must use a shorter UNKEY_METALD_DATA_DIR"
        ));
    }
    Ok(())
}

/// `text` (a VMM's own words) with every absolute path replaced by
/// `<path>` and cut to 300 characters, fit for an API caller.
pub fn redact(text: &str) -> String {
    const MAX: usize = 300;
    let mut out = String::with_capacity(text.len().min(MAX));
    let mut chars = text.chars().peekable();
    let mut prev: Option<char> = None;
    while let Some(c) = chars.next() {
        let starts_path =
            c == '/' && prev.is_none_or(|p| p.is_whitespace() || "'\"`([{=:,<".contains(p));
        if starts_path {
            while chars
                .peek()
                .is_some_and(|n| !n.is_whitespace() && !"'\"`)]},;>".contains(*n))
            {
                chars.next();
            }
            out.push_str("<path>");
            prev = Some('>');
        } else {
            out.push(c);
            prev = Some(c);
        }
        if out.chars().count() >= MAX {
            out.push('…');
            break;
        }
    }
    out
}

/// The guest's kernel command line: the VM's own arguments (or
/// `default`), then what its network interfaces tell the guest.
pub fn kernel_cmdline(spec: &VmSpec, default: &str) -> String {
    let mut cmdline = if spec.kernel_args().is_empty() {
        default.to_owned()
    } else {
        spec.kernel_args().to_owned()
    };
    for att in spec.nics().iter().filter_map(|n| n.attachment.as_ref()) {
        cmdline.push(' ');
        cmdline.push_str(&att.kernel_args());
    }
    cmdline
}

/// Runs blocking file-system work (a `/proc` scan, a tree removal) off
/// the async workers where the runtime allows it, so one slow disk cannot
/// stall the API; on a single-threaded runtime (unit tests) it runs as is.
pub fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// [`remove_dir`] on the blocking pool: a jail holding copied images can
/// take seconds to remove.
pub async fn remove_dir_off_runtime(dir: &Path) -> Result<(), VmmError> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || remove_dir(&dir))
        .await
        .map_err(|e| VmmError::Io(host_failure("remove the VM's files", e)))?
}

/// Removes a directory tree; a missing one is not an error.
pub fn remove_dir(dir: &Path) -> Result<(), VmmError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VmmError::Io(host_failure(
            "remove the VM's files",
            format_args!("{}: {e}", dir.display()),
        ))),
    }
}

#[cfg(test)]
mod tests;
