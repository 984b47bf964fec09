//! Finding a backend's processes and directories for the reconciler and
//! adoption, and what every backend's `backend_info` holds.

use std::collections::BTreeMap;
use std::path::Path;

use metald_core::ports::{VmmError, VmmRuntime};
use metald_core::vm::VmId;

use crate::process;

/// The VM ids that have a directory under `state_dir`.
pub fn vm_dirs(state_dir: &Path) -> Vec<VmId> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(state_dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir())
                && let Ok(id) = VmId::parse(&e.file_name().to_string_lossy(), "dir")
            {
                found.push(id);
            }
        }
    }
    found
}

/// The VM ids that have a directory under `state_dir` or a cgroup under
/// `cgroups`' parent (a cgroup left by a crash is found by its name, the
/// VM id), sorted, each once.
pub fn vm_dirs_and_cgroups(
    state_dir: &Path,
    cgroups: Option<&crate::cgroup::CgroupConfig>,
) -> Vec<VmId> {
    let mut dirs = vm_dirs(state_dir);
    if let Some(cg) = cgroups {
        dirs.extend(
            crate::cgroup::names(cg)
                .iter()
                .filter_map(|n| VmId::parse(n, "cgroup").ok()),
        );
        dirs.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        dirs.dedup();
    }
    dirs
}

/// Every live (not zombie) process: pid, start time and command line.
pub fn live_processes() -> Vec<(i32, u64, Vec<String>)> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in procs.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(args) = process::cmdline(pid) else {
            continue;
        };
        if let Ok(st) = process::stat(pid)
            && st.state != 'Z'
        {
            found.push((pid, st.start_time, args));
        }
    }
    found
}

/// The VM whose directory holds the socket a command line names after
/// `flag` (`--api-sock <state_dir>/<id>/<file>`; a `path=` prefix is
/// allowed): how a VMM process of this metald is recognised.
pub fn vm_of_socket_arg(args: &[String], flag: &str, state_dir: &Path, file: &str) -> Option<VmId> {
    let sock = args
        .iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))?;
    let sock = sock.strip_prefix("path=").unwrap_or(sock);
    let rel = Path::new(sock).strip_prefix(state_dir).ok()?;
    let mut parts = rel.components();
    let id = parts.next()?.as_os_str().to_str()?;
    (parts.as_path() == Path::new(file))
        .then(|| VmId::parse(id, "dir").ok())
        .flatten()
}

/// Live processes whose command line `owner` recognises as serving a VM,
/// with pid and start time.
pub fn find_processes(owner: impl Fn(&[String]) -> Option<VmId>) -> Vec<(VmId, i32, u64)> {
    live_processes()
        .into_iter()
        .filter_map(|(pid, start_time, args)| owner(&args).map(|id| (id, pid, start_time)))
        .collect()
}

/// First line of `<binary> --version`.
pub fn version_of(binary: &Path, var: &str) -> Result<String, String> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| format!("{var}: cannot run {}: {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{var}: {} --version failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// What every backend's `backend_info` holds: the VMM's name and version,
/// the console log when there is one, and the process (pid, socket,
/// whether it is alive) while one is recorded.
pub fn describe_base(
    name: &str,
    version: &str,
    vm_dir: &Path,
    rt: Option<&VmmRuntime>,
) -> BTreeMap<String, String> {
    let mut info = BTreeMap::new();
    info.insert("vmm".into(), name.into());
    info.insert("vmm_version".into(), version.into());
    let console = vm_dir.join("console.log");
    if console.exists() {
        info.insert("console_log".into(), console.to_string_lossy().into_owned());
    }
    if let Some(rt) = rt {
        info.insert("pid".into(), rt.pid.to_string());
        info.insert("socket".into(), rt.socket.to_string_lossy().into_owned());
        let alive = process::is_alive(rt.pid, rt.start_time);
        info.insert("process_alive".into(), alive.to_string());
    }
    info
}

/// Refuses a runtime another backend recorded (metald restarted with a
/// different `UNKEY_METALD_BACKEND`).
pub fn check_backend(rt: &VmmRuntime, name: &str) -> Result<(), VmmError> {
    if rt.backend == name {
        Ok(())
    } else {
        Err(VmmError::Gone(format!(
            "recorded backend is {:?}, this metald runs {name}",
            rt.backend
        )))
    }
}

/// Whether `pid` still is the recorded process and its command line holds
/// `needle` (its socket path): the identity check of adoption.
pub fn is_our_process(rt: &VmmRuntime, needle: &str) -> Result<(), VmmError> {
    if !process::is_alive(rt.pid, rt.start_time) {
        return Err(VmmError::Gone(format!(
            "process {} is gone or is another process now",
            rt.pid
        )));
    }
    let ours = process::cmdline(rt.pid)
        .map(|args| args.iter().any(|a| a.contains(needle)))
        .unwrap_or(false);
    if ours {
        Ok(())
    } else {
        Err(VmmError::Gone(format!(
            "process {} is not this VM's VMM",
            rt.pid
        )))
    }
}
