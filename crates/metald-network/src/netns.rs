//! Named network namespaces, compatible with `ip netns`, and the threads that
//! live in them.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::statfs::{NSFS_MAGIC, statfs};

/// Where named namespaces live (iproute2's `NETNS_RUN_DIR`).
pub(crate) const NETNS_RUN_DIR: &str = "/run/netns";

/// The path to hand to a VMM spawner so the child joins the namespace before
/// exec (`pre_exec` `setns(open(path), CLONE_NEWNET)`): `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 || name == "." || name == ".." || name.contains('/') {
        return Err(format!("invalid network namespace name {name:?}"));
    }
    Ok(())
}

/// Runs `f` on a dedicated OS thread that has joined netns `name` (path
/// `/run/netns/<name>`), returning its result; used by callers that must do
/// something inside the namespace.
///
/// Like `ip netns exec`, the thread also gets a private mount namespace (with
/// `/` made a slave, so nothing leaks back to the host) in which `/sys` is
/// remounted, so that `/sys/class/net` shows the namespace's devices. Network
/// sysctls under `/proc/sys/net` follow the thread's namespace by themselves.
/// Blocks the calling thread until `f` returns; from async code wrap it in
/// `tokio::task::spawn_blocking` (that is safe: the namespace is only ever
/// joined by the fresh thread, never by the caller's).
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    validate_name(name)?;
    let ns = File::open(netns_path(name))
        .map_err(|e| format!("opening network namespace {name}: {e}"))?;
    let label = name.to_string();
    let thread = std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || -> Result<T, String> {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("joining network namespace {label}: {e}"))?;
            drop(ns);
            private_sysfs().map_err(|e| format!("in network namespace {label}: {e}"))?;
            Ok(f())
        })
        .map_err(|e| format!("spawning a thread for network namespace {name}: {e}"))?;
    thread
        .join()
        .map_err(|_| format!("the closure run in network namespace {name} panicked"))?
}

/// Gives the calling thread its own mount namespace with a `/sys` that
/// belongs to the thread's current network namespace (what `ip netns exec`
/// does for a process).
fn private_sysfs() -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("making / a slave mount: {e}"))?;
    // Not mounted (or busy) is fine: the new sysfs goes on top either way.
    let _ = umount2("/sys", MntFlags::MNT_DETACH);
    mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| format!("mounting sysfs: {e}"))
}

/// The calling thread's network namespace.
pub(crate) fn current_netns() -> Result<OwnedFd, String> {
    File::open("/proc/thread-self/ns/net")
        .map(OwnedFd::from)
        .map_err(|e| format!("opening /proc/thread-self/ns/net: {e}"))
}

/// Makes `/run/netns` exist and be a shared mount point, like iproute2 does,
/// so that namespace mounts propagate to every mount namespace.
fn ensure_run_dir() -> Result<(), String> {
    static READY: Mutex<bool> = Mutex::new(false);
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if *ready {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(NETNS_RUN_DIR)
        .map_err(|e| format!("creating {NETNS_RUN_DIR}: {e}"))?;
    let mut bound = false;
    loop {
        match mount(
            Some(""),
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) => break,
            // Not a mount point yet: bind it onto itself, then retry.
            Err(Errno::EINVAL) if !bound => {
                mount(
                    Some(NETNS_RUN_DIR),
                    NETNS_RUN_DIR,
                    Some("none"),
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| format!("bind-mounting {NETNS_RUN_DIR} onto itself: {e}"))?;
                bound = true;
            }
            Err(e) => return Err(format!("making {NETNS_RUN_DIR} a shared mount: {e}")),
        }
    }
    *ready = true;
    Ok(())
}

/// Whether a network-namespace file is mounted at `path`.
pub(crate) fn is_mounted(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// Moves the calling thread into the named namespace.
pub(crate) fn enter(name: &str) -> Result<(), String> {
    validate_name(name)?;
    let ns = File::open(netns_path(name))
        .map_err(|e| format!("opening network namespace {name}: {e}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("joining network namespace {name}: {e}"))
}

/// Moves the calling thread into the named namespace, creating it first if it
/// does not exist; returns whether it was created. Only for dedicated threads.
pub(crate) fn enter_or_create(name: &str) -> Result<bool, String> {
    validate_name(name)?;
    ensure_run_dir()?;
    let path = netns_path(name);
    if is_mounted(&path) {
        enter(name)?;
        return Ok(false);
    }
    // The mount point. An unmounted leftover (a crash between these two
    // steps) is simply reused.
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o0)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
    if let Err(e) = mount(
        Some("/proc/thread-self/ns/net"),
        &path,
        Some("none"),
        MsFlags::MS_BIND,
        None::<&str>,
    ) {
        let _ = std::fs::remove_file(&path);
        return Err(format!(
            "bind-mounting the new namespace on {}: {e}",
            path.display()
        ));
    }
    Ok(true)
}

/// Deletes a named namespace like `ip netns del` (lazy unmount, unlink);
/// missing is fine. The namespace itself goes away once no process is in it.
pub(crate) fn delete(name: &str) -> Result<(), String> {
    validate_name(name)?;
    let path = netns_path(name);
    // Normally one mount; a few more only if something stacked them.
    for _ in 0..8 {
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) => {
                if !is_mounted(&path) {
                    break;
                }
            }
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(e) => return Err(format!("unmounting {}: {e}", path.display())),
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", path.display())),
    }
}

/// Names under `/run/netns`.
pub(crate) fn list() -> Result<Vec<String>, String> {
    let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("listing {NETNS_RUN_DIR}: {e}")),
    };
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect())
}

/// Runs `f` on a fresh OS thread with its own current-thread tokio runtime
/// and awaits its result. `f` may move that thread between namespaces at
/// will: the thread ends with it.
pub(crate) async fn on_thread<T, F, Fut>(what: &str, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, String>> + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("metald-netns".to_string())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(f()),
                Err(e) => Err(format!("building a runtime: {e}")),
            };
            let _ = tx.send(result);
        })
        .map_err(|e| format!("{what}: spawning a thread: {e}"))?;
    rx.await
        .map_err(|_| format!("{what}: the worker thread panicked"))?
}
