//! Per-VM cgroups, v1 and v2: a VMM's CPU time is capped at its vCPUs and
//! its memory at the guest's plus the VMM's own overhead. For QEMU and
//! Cloud Hypervisor and an unjailed Firecracker metald makes them and puts
//! the VMM in them between fork and exec; for a jailed Firecracker the
//! jailer makes its own, and metald only removes those when the VM goes.
//!
//! Layout: `<mount>/<parent>/<name>` for each v1 controller mount (cpu,
//! memory) or for the one v2 mount.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where and how VM cgroups are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupConfig {
    /// 1 or 2.
    pub version: u8,
    /// Parent cgroup of every VM's cgroup.
    pub parent: String,
}

/// Microseconds per CPU-quota period.
const PERIOD_US: u64 = 100_000;
/// Memory a VMM needs besides the guest's.
const OVERHEAD_BYTES: u64 = 128 << 20;

/// The limits for a VM: `(file, value)` pairs per controller file.
pub fn limits(version: u8, vcpus: u32, memory_bytes: u64) -> Vec<(String, String)> {
    let quota = PERIOD_US * u64::from(vcpus);
    let mem = memory_bytes + OVERHEAD_BYTES;
    if version == 2 {
        vec![
            ("cpu.max".into(), format!("{quota} {PERIOD_US}")),
            ("memory.max".into(), mem.to_string()),
        ]
    } else {
        vec![
            ("cpu.cfs_period_us".into(), PERIOD_US.to_string()),
            ("cpu.cfs_quota_us".into(), quota.to_string()),
            ("memory.limit_in_bytes".into(), mem.to_string()),
        ]
    }
}

/// The host's cgroup mounts: (mount point, controllers) for v1; the v2
/// mount has controllers `["unified"]`.
fn mounts(version: u8) -> Vec<(PathBuf, Vec<String>)> {
    let Ok(text) = std::fs::read_to_string("/proc/mounts") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (at, kind, opts) = (f.get(1)?, f.get(2)?, f.get(3)?);
            match (version, *kind) {
                (2, "cgroup2") => Some((PathBuf::from(at), vec!["unified".to_owned()])),
                (1, "cgroup") => Some((
                    PathBuf::from(at),
                    opts.split(',').map(str::to_owned).collect(),
                )),
                _ => None,
            }
        })
        .collect()
}

/// The directories of cgroup `name` under `parent` that exist now.
pub fn existing(config: &CgroupConfig, name: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = mounts(config.version)
        .into_iter()
        .map(|(at, _)| at.join(&config.parent).join(name))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// The names of every cgroup under `parent`, in any hierarchy: what the
/// reconciler compares with the VM rows.
pub fn names(config: &CgroupConfig) -> Vec<String> {
    let mut out: Vec<String> = mounts(config.version)
        .into_iter()
        .filter_map(|(at, _)| std::fs::read_dir(at.join(&config.parent)).ok())
        .flat_map(|entries| entries.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Makes cgroup `name` with the VM's limits; returns the opened files the
/// VMM writes itself into before exec (see [`join_file`]).
pub fn create(
    config: &CgroupConfig,
    name: &str,
    vcpus: u32,
    memory_bytes: u64,
) -> Result<Vec<File>, String> {
    let found = mounts(config.version);
    let mut procs = Vec::new();
    if config.version == 2 {
        let (root, _) = found
            .first()
            .ok_or("no cgroup2 hierarchy is mounted (set the cgroup version to 1)")?;
        let parent = root.join(&config.parent);
        mkdir(&parent)?;
        // Controllers must be enabled on the way down to the VM's cgroup.
        for dir in [root.as_path(), parent.as_path()] {
            write(&dir.join("cgroup.subtree_control"), "+cpu +memory")?;
        }
        let dir = parent.join(name);
        mkdir(&dir)?;
        for (file, value) in limits(2, vcpus, memory_bytes) {
            write(&dir.join(file), &value)?;
        }
        procs.push(open_join(&dir, 2)?);
    } else {
        let mut lim = limits(1, vcpus, memory_bytes);
        for controller in ["cpu", "memory"] {
            let (at, _) = found
                .iter()
                .find(|(_, c)| c.iter().any(|x| x == controller))
                .ok_or_else(|| format!("no cgroup v1 hierarchy has the {controller} controller"))?;
            let dir = at.join(&config.parent).join(name);
            mkdir(&dir)?;
            let prefix = format!("{controller}.");
            for (file, value) in lim.iter().filter(|(f, _)| f.starts_with(&prefix)) {
                write(&dir.join(file), value)?;
            }
            lim.retain(|(f, _)| !f.starts_with(&prefix));
            procs.push(open_join(&dir, 1)?);
        }
    }
    Ok(procs)
}

/// Makes cgroup `name` with the VM's limits and has the process `cmd`
/// starts join it between fork and exec; nothing when `config` is `None`
/// (cgroups off).
pub fn enter_on_exec(
    config: Option<&CgroupConfig>,
    cmd: &mut tokio::process::Command,
    name: &str,
    vcpus: u32,
    memory_bytes: u64,
) -> Result<(), String> {
    if let Some(cg) = config {
        join_on_exec(cmd, create(cg, name, vcpus, memory_bytes)?);
    }
    Ok(())
}

/// Removes cgroup `name` once its processes have exited. The kernel may
/// report a cgroup busy for a moment after its last task was reaped, so a
/// busy one is retried for up to a second.
pub async fn remove(config: &CgroupConfig, name: &str) -> Result<(), String> {
    for dir in existing(config, name) {
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
                        && tries < 50 =>
                {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(format!("removing cgroup {}: {e}", dir.display())),
            }
        }
    }
    Ok(())
}

/// Makes the child write itself into `procs` between fork and exec, so the
/// VMM never runs outside its cgroups.
pub fn join_on_exec(cmd: &mut tokio::process::Command, procs: Vec<File>) {
    use std::os::fd::AsFd;
    // SAFETY: the closure runs in the forked child before exec and only
    // makes write(2) calls on descriptors it owns, which is
    // async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            for f in &procs {
                rustix::io::write(f.as_fd(), b"0").map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
}

fn mkdir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating cgroup {}: {e}", dir.display()))
}

fn write(file: &Path, value: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("writing {value:?} to {}: {e}", file.display()))
}

/// The file a VMM writes "0" into, between fork and exec, to join its
/// cgroup. On v1 that is `tasks`, which moves only the writing thread: the
/// forked child has just the one, and every thread the VMM starts after
/// exec is born in the cgroup. Moving one thread that is the writer itself
/// skips the kernel's threadgroup lock, whose write side waits for an RCU
/// grace period (5–12 ms on the test hosts, on the boot's critical path);
/// `cgroup.procs` takes it. v2's `cgroup.threads` only works in threaded
/// cgroups, so v2 writes `cgroup.procs` and pays the wait (a
/// `clone3(CLONE_INTO_CGROUP)` spawn would avoid it; not built).
pub fn join_file(version: u8) -> &'static str {
    if version == 2 {
        "cgroup.procs"
    } else {
        "tasks"
    }
}

fn open_join(dir: &Path, version: u8) -> Result<File, String> {
    let file = join_file(version);
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(file))
        .map_err(|e| format!("opening {}/{file}: {e}", dir.display()))
}

/// 2 when the host's cgroup2 hierarchy at /sys/fs/cgroup offers the cpu
/// and memory controllers, else 1.
pub fn host_version() -> u8 {
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    if has("cpu") && has("memory") { 2 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_cap_cpu_at_the_vcpus_and_memory_at_guest_plus_overhead() {
        assert_eq!(
            limits(2, 2, 256 << 20),
            vec![
                ("cpu.max".to_string(), "200000 100000".to_string()),
                ("memory.max".to_string(), (384u64 << 20).to_string()),
            ]
        );
        let v1 = limits(1, 1, 128 << 20);
        assert!(v1.contains(&("cpu.cfs_quota_us".to_string(), "100000".to_string())));
        assert!(v1.contains(&(
            "memory.limit_in_bytes".to_string(),
            (256u64 << 20).to_string()
        )));
    }

    /// Needs root and a cgroup hierarchy with cpu and memory (every test
    /// host has one: v1 here, v2 on most production hosts).
    #[tokio::test]
    async fn a_child_starts_inside_its_cgroup_with_the_limits_and_the_cgroup_goes_after() {
        let config = CgroupConfig {
            version: host_version(),
            parent: "metald-unit-test".into(),
        };
        let name = format!("cg-{}", std::process::id());
        let procs = create(&config, &name, 1, 64 << 20).unwrap();
        let dirs = existing(&config, &name);
        assert!(!dirs.is_empty());
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30");
        join_on_exec(&mut cmd, procs);
        let mut child = cmd.spawn().unwrap();
        let pid = child.id().unwrap().to_string();
        for d in &dirs {
            let members = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(
                members.lines().any(|l| l == pid),
                "{} holds {pid}",
                d.display()
            );
        }
        let quota_file = if config.version == 2 {
            "cpu.max"
        } else {
            "cpu.cfs_quota_us"
        };
        let quota = dirs
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(quota_file)).ok())
            .unwrap();
        assert!(quota.starts_with("100000"), "{quota}");
        child.kill().await.unwrap();
        child.wait().await.unwrap();
        assert!(names(&config).contains(&name), "found by the sweep");
        remove(&config, &name).await.unwrap();
        assert!(existing(&config, &name).is_empty());
        assert!(!names(&config).contains(&name));
        for (at, _) in mounts(config.version) {
            let _ = std::fs::remove_dir(at.join(&config.parent));
        }
    }
}
