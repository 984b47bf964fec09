//! Starting a VMM process: joining the VM's network namespace and
//! dropping to its user between fork and exec, and the spawn record that
//! makes a process findable before the store knows it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::SPAWN_RECORD;
use crate::process::{self, Children};

/// Makes the child join network namespace `name` (`/run/netns/<name>`)
/// between fork and exec, like `ip netns exec`: namespace membership is
/// per thread, so this never touches a metald (tokio) thread.
pub fn join_netns_on_exec(cmd: &mut tokio::process::Command, name: &str) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let ns = std::fs::File::open(Path::new("/run/netns").join(name))
        .map_err(|e| std::io::Error::new(e.kind(), format!("network namespace {name}: {e}")))?;
    // SAFETY: the closure runs in the forked child before exec and only
    // makes the setns(2) system call on a descriptor it owns, which is
    // async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(std::io::Error::from)
        });
    }
    Ok(())
}

/// Makes the child drop to `uid`/`gid` (no supplementary groups) between
/// fork and exec. Register it after every other `pre_exec` step: joining a
/// namespace or a cgroup needs the privileges this gives up.
/// (`Command::uid` would switch before any `pre_exec` step runs.)
pub fn become_user_on_exec(cmd: &mut tokio::process::Command, uid: u32, gid: u32) {
    use rustix::process::{Gid, Uid};
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    // SAFETY: the closure runs in the forked child before exec and only
    // makes the setgroups, setresgid and setresuid system calls, which are
    // async-signal-safe; it allocates nothing and takes no lock. The child
    // has one thread, so the per-thread calls change the whole process.
    unsafe {
        cmd.pre_exec(move || {
            rustix::thread::set_thread_groups(&[])?;
            rustix::thread::set_thread_res_gid(gid, gid, gid)?;
            rustix::thread::set_thread_res_uid(uid, uid, uid)?;
            Ok(())
        });
    }
}

/// What a VM directory's spawn record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnRecord {
    pub pid: i32,
    pub start_time: u64,
}

/// Spawns `cmd` detached (see [`Children::spawn`]) and writes the spawn
/// record into `dir` at once, so a crash between here and the store update
/// still leaves the process findable by [`super::kill_and_remove`].
pub fn spawn_recorded(
    children: &Children,
    cmd: tokio::process::Command,
    dir: &Path,
) -> std::io::Result<SpawnRecord> {
    let (pid, start_time) = children.spawn(cmd)?;
    let rec = SpawnRecord { pid, start_time };
    // Written whole or not at all (temp file, then rename); a process
    // that can't be recorded is killed rather than left unknown.
    let write = || -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&rec).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!("{SPAWN_RECORD}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(SPAWN_RECORD))
    };
    if let Err(e) = write() {
        let _ = process::signal(pid, start_time, rustix::process::Signal::KILL);
        return Err(e);
    }
    Ok(rec)
}

/// The spawn record in `dir`, if one is there and readable.
pub fn recorded_spawn(dir: &Path) -> Option<SpawnRecord> {
    std::fs::read(dir.join(SPAWN_RECORD))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}
