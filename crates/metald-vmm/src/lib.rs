//! metald's hypervisor backends: implementations of
//! [`metald_core::ports::Vmm`], one VMM process per VM.
//!
//! [`process`] holds what every backend needs about processes (detached
//! spawning, identity by pid + start time, exit watching through pidfds,
//! killing only the process that is really ours); [`launch`] what every
//! backend does around its process (per-VM directory, spawn record, socket
//! wait, kill and clean-up, scanning); [`http`] the HTTP/1.1 client for
//! VMM APIs on Unix sockets. [`qemu`] drives `qemu-system-x86_64 -M
//! microvm` over QMP. What a VMM writes or answers is bounded:
//! [`logcap`] keeps console and VMM logs under a size cap, [`bounded`]
//! reads lines with a limit, and [`beneath`] opens what a VMM can write
//! without following links it could have planted.

pub mod beneath;
pub mod bounded;
pub mod cgroup;
pub mod cloudhypervisor;
pub mod firecracker;
pub mod guest_end;
pub mod http;
pub mod launch;
pub mod logcap;
pub mod process;
pub mod qemu;
pub mod ratelimit;

use std::path::{Path, PathBuf};

/// Finds an executable on `PATH`, like `command -v`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_sh_and_not_nonsense() {
        assert!(super::find_on_path("sh").is_some());
        assert!(super::find_on_path("metald-no-such-binary").is_none());
    }
}
