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

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use metald_core::ports::{BootError, StopMode, VmmExit, VmmRuntime};
use metald_core::vm::{VmId, VmSpec};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::process::{self, Children};

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

/// Removes whatever a previous run left in `dir` and creates it empty.
pub fn fresh_dir(dir: &Path) -> Result<(), String> {
    let made = match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .and_then(|()| std::fs::create_dir_all(dir));
    made.map_err(|e| {
        host_failure(
            "prepare the VM's directory",
            format_args!("{}: {e}", dir.display()),
        )
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
/// still leaves the process findable by [`kill_and_remove`].
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

/// A failed start as a [`BootError`]. A VMM that exited with a status on
/// its own refused what it was given (its logs, copied to metald's log,
/// say why); one killed by a signal (the OOM killer, an operator) or
/// silent until the limit failed.
pub fn not_ready(
    e: NotReady,
    vmm: &str,
    socket: &Path,
    limit: Duration,
    logs: &[&Path],
) -> BootError {
    match e {
        NotReady::Exited(exit) => {
            warn!(vmm, socket = %socket.display(), exit = %exit.describe(), logs = %tails(logs),
                "VMM exited while starting");
            let msg = format!("{vmm} {} while starting", exit.describe());
            if exit.signal.is_some() {
                BootError::Failed(msg)
            } else {
                BootError::Refused(format!(
                    "{msg}: it refused the VM's configuration (its output is in metald's log)"
                ))
            }
        }
        NotReady::TimedOut(last) => {
            warn!(vmm, socket = %socket.display(), last_error = %last, logs = %tails(logs),
                "VMM did not answer while starting");
            BootError::Failed(format!("{vmm} did not answer within {limit:?}"))
        }
    }
}

/// Adds how the VMM ended to a start-up error when the VMM died under the
/// request (the API error alone would only say the connection broke); the
/// tails of its logs go to metald's log. The kind of error stays.
pub async fn explain(
    children: &Children,
    rt: &VmmRuntime,
    e: BootError,
    vmm: &str,
    logs: &[&Path],
) -> BootError {
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
    let more = format!(" ({vmm} {exit})");
    match e {
        BootError::Refused(m) => BootError::Refused(m + &more),
        BootError::Failed(m) => BootError::Failed(m + &more),
    }
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
) -> Result<(), String>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), String>>,
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

/// The guest's kernel command line: the VM's own arguments (or
/// `default`), then what its network interfaces tell the guest.
pub fn kernel_cmdline(spec: &VmSpec, default: &str) -> String {
    let mut cmdline = if spec.kernel_args.is_empty() {
        default.to_owned()
    } else {
        spec.kernel_args.clone()
    };
    for att in spec.nics.iter().filter_map(|n| n.attachment.as_ref()) {
        cmdline.push(' ');
        cmdline.push_str(&att.kernel_args());
    }
    cmdline
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
) -> Result<(), String> {
    let mut known: Vec<(i32, u64)> = rt.map(|r| (r.pid, r.start_time)).into_iter().collect();
    if let Some(rec) = recorded_spawn(dir) {
        known.push((rec.pid, rec.start_time));
    }
    for (pid, start_time) in known {
        children.kill_and_forget(pid, start_time).await?;
    }
    remove_dir(dir)
}

/// Removes a directory tree; a missing one is not an error.
pub fn remove_dir(dir: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(host_failure(
            "remove the VM's files",
            format_args!("{}: {e}", dir.display()),
        )),
    }
}

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
pub fn check_backend(rt: &VmmRuntime, name: &str) -> Result<(), String> {
    if rt.backend == name {
        Ok(())
    } else {
        Err(format!(
            "recorded backend is {:?}, this metald runs {name}",
            rt.backend
        ))
    }
}

/// Whether `pid` still is the recorded process and its command line holds
/// `needle` (its socket path): the identity check of adoption.
pub fn is_our_process(rt: &VmmRuntime, needle: &str) -> Result<(), String> {
    if !process::is_alive(rt.pid, rt.start_time) {
        return Err(format!(
            "process {} is gone or is another process now",
            rt.pid
        ));
    }
    let ours = process::cmdline(rt.pid)
        .map(|args| args.iter().any(|a| a.contains(needle)))
        .unwrap_or(false);
    if ours {
        Ok(())
    } else {
        Err(format!("process {} is not this VM's VMM", rt.pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_vmm_exiting_during_the_wait_ends_it_with_its_status() {
        let children = Children::default();
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "exit 3"]);
        let rec = spawn_recorded(&children, cmd, dir.path()).unwrap();
        assert_eq!(recorded_spawn(dir.path()), Some(rec));
        let rt = VmmRuntime {
            backend: "test".into(),
            pid: rec.pid,
            start_time: rec.start_time,
            socket: dir.path().join("none.sock"),
        };
        let r: Result<(), _> = until_ready(&children, &rt, Duration::from_secs(30), || async {
            Err("no socket".to_string())
        })
        .await;
        let e = r.unwrap_err();
        assert_eq!(
            e,
            NotReady::Exited(VmmExit {
                code: Some(3),
                signal: None
            })
        );
        // An exit status is the VMM refusing; its log says why, to
        // metald's log only.
        std::fs::write(dir.path().join("vmm.log"), "bad kernel /k/vmlinux\n").unwrap();
        let log = dir.path().join("vmm.log");
        match not_ready(e, "vmm", &rt.socket, Duration::from_secs(1), &[&log]) {
            BootError::Refused(m) => {
                assert!(
                    m.starts_with("vmm exited with status 3 while starting"),
                    "{m}"
                );
                assert!(!m.contains("bad kernel") && !m.contains('/'), "{m}");
            }
            other => panic!("{other:?}"),
        }
        let timed_out = NotReady::TimedOut(format!("cannot connect to {}", rt.socket.display()));
        match not_ready(
            timed_out,
            "vmm",
            &rt.socket,
            Duration::from_secs(1),
            &[&log],
        ) {
            BootError::Failed(m) => assert_eq!(m, "vmm did not answer within 1s"),
            other => panic!("{other:?}"),
        }
        let killed = NotReady::Exited(VmmExit {
            code: None,
            signal: Some(9),
        });
        assert!(matches!(
            not_ready(killed, "vmm", &rt.socket, Duration::from_secs(1), &[]),
            BootError::Failed(_)
        ));
    }

    #[tokio::test]
    async fn kill_and_remove_kills_the_recorded_process_and_removes_the_dir() {
        let children = Children::default();
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("vm-1");
        fresh_dir(&dir).unwrap();
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("600");
        let rec = spawn_recorded(&children, cmd, &dir).unwrap();
        assert_eq!(
            vm_dirs(base.path()),
            vec![VmId::parse("vm-1", "t").unwrap()]
        );
        // The store never learned the runtime: the record alone suffices.
        kill_and_remove(&children, &dir, None).await.unwrap();
        assert!(!process::is_alive(rec.pid, rec.start_time));
        assert!(!dir.exists());
        kill_and_remove(&children, &dir, None).await.unwrap();
    }

    #[test]
    fn log_tail_keeps_the_last_lines_and_reads_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        assert_eq!(log_tail(&p, 2), "no output");
        std::fs::write(&p, "a\n\nb\nc\n").unwrap();
        assert_eq!(log_tail(&p, 2), "b; c");
        // A line longer than the window is cut to the window.
        let mut big = "x".repeat(100_000);
        big.push_str("\nlast\n");
        std::fs::write(&p, big).unwrap();
        let t = log_tail(&p, 2);
        assert!(t.ends_with("; last") && t.len() < 4200, "{}", t.len());
    }

    #[test]
    fn redact_hides_paths_but_keeps_the_reason() {
        assert_eq!(
            redact("Could not open '/var/lib/metald/vms/a/k': No such file or directory"),
            "Could not open '<path>': No such file or directory"
        );
        assert_eq!(
            redact("BackingFile(Os { code: 2 }, \"/srv/d.img\") at /x/y; HTTP 400"),
            "BackingFile(Os { code: 2 }, \"<path>\") at <path>; HTTP 400"
        );
        assert_eq!(redact("ratio 1/2 and a/b stay"), "ratio 1/2 and a/b stay");
        assert!(redact(&"y".repeat(1000)).chars().count() <= 301);
    }
}
