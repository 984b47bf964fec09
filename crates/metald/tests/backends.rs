//! One lifecycle suite, run once per backend through the metald API: QEMU
//! always; Firecracker (plain and jailed) and Cloud Hypervisor when their
//! binaries are found (`FIRECRACKER_BIN`, `JAILER_BIN`,
//! `CLOUD_HYPERVISOR_BIN`, else on `PATH`) and `/dev/kvm` opens. A backend
//! that can't run here is reported as *ignored*, with the reason printed,
//! never as passed.
//!
//! After each step the VMM's own view (QMP `query-status`, Firecracker's
//! `GET /` and `GET /vm/config`, Cloud Hypervisor's `vm.info`) is compared
//! with metald's. Guests are not waited for: under nested KVM Firecracker
//! and Cloud Hypervisor guests boot too slowly to test (see the README).

#[path = "api/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{Assets, Daemon, keyed, state_of};
use libtest_mimic::{Arguments, Failed, Trial};
use rustix::process::{Pid, Signal, kill_process};
use serde_json::{Value, json};

const T: &str = "dev_customer_suite";

/// A metald sweeps the cgroups under its parent that none of its VMs
/// claims, so daemons running side by side (as the trials do) each get a
/// parent of their own, named after the trial's VM.
fn cgroup_parent(id: &str) -> String {
    format!("metald-suite-{id}")
}

/// A backend as the suite runs it.
#[derive(Clone)]
struct Backend {
    /// Trial name prefix.
    name: &'static str,
    /// Which VMM answers on the socket.
    kind: Kind,
    /// metald flags selecting and configuring the backend.
    args: Vec<String>,
    /// Why it can't run here, if it can't.
    skip: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Qemu,
    Firecracker { jailed: bool },
    CloudHypervisor,
}

/// A binary from `var`, else `name` on PATH.
fn find(var: &str, name: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{var}={} is not a file", p.display()))
        };
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{var} is not set and {name} is not on PATH"))
}

fn kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm: {e}"))
}

fn backends() -> Vec<Backend> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let mut out = vec![Backend {
        name: "qemu",
        kind: Kind::Qemu,
        args: s(&["--backend", "qemu"]),
        skip: None,
    }];
    let fc = find("FIRECRACKER_BIN", "firecracker").and_then(|b| kvm().map(|()| b));
    out.push(match &fc {
        Ok(b) => Backend {
            name: "firecracker",
            kind: Kind::Firecracker { jailed: false },
            args: vec![
                "--backend".into(),
                "firecracker".into(),
                "--firecracker-binary".into(),
                b.display().to_string(),
                "--jailer-enabled".into(),
                "false".into(),
            ],
            skip: None,
        },
        Err(e) => Backend {
            name: "firecracker",
            kind: Kind::Firecracker { jailed: false },
            args: Vec::new(),
            skip: Some(e.clone()),
        },
    });
    let jailed = fc.and_then(|b| find("JAILER_BIN", "jailer").map(|j| (b, j)));
    out.push(match jailed {
        Ok((b, j)) => Backend {
            name: "firecracker_jailed",
            kind: Kind::Firecracker { jailed: true },
            args: vec![
                "--backend".into(),
                "firecracker".into(),
                "--firecracker-binary".into(),
                b.display().to_string(),
                "--jailer-enabled".into(),
                "true".into(),
                "--jailer-binary".into(),
                j.display().to_string(),
                "--jailer-uid-start".into(),
                "990100".into(),
                "--jailer-uid-count".into(),
                "8".into(),
            ],
            skip: None,
        },
        Err(e) => Backend {
            name: "firecracker_jailed",
            kind: Kind::Firecracker { jailed: true },
            args: Vec::new(),
            skip: Some(e),
        },
    });
    let ch = find("CLOUD_HYPERVISOR_BIN", "cloud-hypervisor").and_then(|b| kvm().map(|()| b));
    out.push(match ch {
        Ok(b) => Backend {
            name: "cloudhypervisor",
            kind: Kind::CloudHypervisor,
            args: vec![
                "--backend".into(),
                "cloudhypervisor".into(),
                "--cloud-hypervisor-binary".into(),
                b.display().to_string(),
            ],
            skip: None,
        },
        Err(e) => Backend {
            name: "cloudhypervisor",
            kind: Kind::CloudHypervisor,
            args: Vec::new(),
            skip: Some(e),
        },
    });
    out
}

type Case = fn(Backend) -> Result<(), Failed>;

fn main() {
    let args = Arguments::from_args();
    let cases: [(&str, Case); 6] = [
        ("what_no_vm_row_claims_is_swept_at_start", orphans_swept),
        ("a_networked_vm_runs_in_its_namespace_on_its_tap", networked),
        ("a_restarted_metald_adopts_its_running_vmms", restart_adopts),
        ("full_lifecycle_matches_the_vmms_own_view", full_lifecycle),
        (
            "a_vmm_killed_from_outside_is_reported_and_can_boot_again",
            killed_vmm,
        ),
        (
            "a_config_the_vmm_refuses_leaves_nothing_and_gives_its_reason",
            refused_config,
        ),
    ];
    let mut trials = Vec::new();
    for b in backends() {
        if let Some(why) = &b.skip {
            eprintln!("backend suite: {} skipped: {why}", b.name);
        }
        for (case, f) in cases {
            let ignored = b.skip.is_some();
            let backend = b.clone();
            trials.push(
                Trial::test(format!("{}::{case}", b.name), move || {
                    if let Some(why) = &backend.skip {
                        return Err(format!("{} cannot run here: {why}", backend.name).into());
                    }
                    f(backend)
                })
                .with_ignored_flag(ignored),
            );
        }
    }
    let root = rustix::process::geteuid().is_root();
    trials.push(
        Trial::test(
            "firecracker::as_root_without_an_explicit_jailer_setting_metald_refuses_to_start",
            refuses_root_without_jailer,
        )
        .with_ignored_flag(!root),
    );
    trials.push(Trial::test(
        "firecracker_jailed::a_dynamically_linked_firecracker_is_refused_at_start",
        refuses_dynamic_firecracker,
    ));
    libtest_mimic::run(&args, trials).exit();
}

fn block_on<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
}

fn daemon(b: &Backend, id: &str) -> Daemon {
    let parent = cgroup_parent(id);
    let mut args: Vec<&str> = vec![
        "--auth-mode",
        "dev",
        "--cgroup-parent",
        &parent,
        "--jailer-parent-cgroup",
        &parent,
    ];
    args.extend(b.args.iter().map(String::as_str));
    Daemon::start_with(&args)
}

/// A host bridge and subnets of one trial's own, removed afterwards.
struct Lan {
    bridge: String,
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        // The bridge's nftables tables go with the test's bridge.
        let _ = metald_network::remove_host_tables(&self.bridge);
    }
}

/// metald with networking on, on a bridge and subnets no other trial uses.
fn networked_daemon(b: &Backend, n: u8, id: &str) -> (Daemon, Lan) {
    let parent = cgroup_parent(id);
    let tag = (std::process::id() % 200) as u8;
    let lan = Lan {
        bridge: format!("mtbk{n}{tag}"),
    };
    let v4 = format!("10.{}.{tag}.0/24", 240 + n);
    let v6 = format!("fd00:6b6e:{n:x}:{tag:x}::/64");
    let mut args: Vec<&str> = vec![
        "--auth-mode",
        "dev",
        "--network-enabled",
        "true",
        "--network-bridge",
        &lan.bridge,
        "--network-ipv4-subnet",
        &v4,
        "--network-ipv6-subnet",
        &v6,
        "--cgroup-parent",
        &parent,
        "--jailer-parent-cgroup",
        &parent,
    ];
    args.extend(b.args.iter().map(String::as_str));
    (Daemon::start_with(&args), lan)
}

/// metald for trial `prefix` on backend `b`, with one VM created and
/// booted (metald and the VMM agreeing it runs): the daemon, the VM id and
/// the VMM's pid.
async fn booted(b: &Backend, prefix: &str) -> (Daemon, String, i32) {
    let assets = Assets::load();
    let id = format!("{prefix}-{}", b.name.replace('_', "-"));
    let d = daemon(b, &id);
    d.ok(
        T,
        "CreateVm",
        json!({"vm_id": id, "config": config(&assets, None)}),
    )
    .await;
    d.ok(T, "BootVm", json!({"vm_id": id})).await;
    let pid = pid_of(&agree(&d, b, &id, "running").await);
    (d, id, pid)
}

/// A file's (device, inode), to compare namespaces and directories.
fn file_id(path: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.dev(), m.ino())
}

/// A config for the test guest; `kernel` replaces the kernel path.
fn config(assets: &Assets, kernel: Option<&str>) -> Value {
    let mut c = assets.config();
    if let Some(k) = kernel {
        c["boot"]["kernel_path"] = json!(k);
    }
    c
}

/// The guest's state as the VMM itself reports it, normalised to
/// `running` / `paused`.
fn vmm_state(kind: Kind, socket: &str) -> String {
    match kind {
        Kind::Qemu => qmp_status(socket),
        Kind::Firecracker { .. } => {
            let v = curl(socket, "GET", "/");
            v["state"].as_str().unwrap_or("?").to_lowercase()
        }
        Kind::CloudHypervisor => {
            let v = curl(socket, "GET", "/api/v1/vm.info");
            v["state"].as_str().unwrap_or("?").to_lowercase()
        }
    }
}

/// One request to a VMM API socket with curl, as an operator would. A
/// jail's socket can have a host path longer than a socket address holds:
/// curl then goes through a short symlink to it.
fn curl(socket: &str, method: &str, path: &str) -> Value {
    let short = (socket.len() > 107).then(|| {
        let dir = tempfile::Builder::new()
            .prefix("mtbk")
            .tempdir_in("/tmp")
            .unwrap();
        std::os::unix::fs::symlink(socket, dir.path().join("s")).unwrap();
        dir
    });
    let link = short.as_ref().map(|d| d.path().join("s"));
    let socket = link.as_deref().map_or(socket, |l| l.to_str().unwrap());
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--unix-socket",
            socket,
            "-X",
            method,
        ])
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{path}: {e}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        )
    })
}

/// QMP `query-status` over the VM's socket.
fn qmp_status(socket: &str) -> String {
    let s = UnixStream::connect(socket).expect("QMP socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let answer = |r: &mut BufReader<UnixStream>, line: &mut String| -> Value {
        loop {
            line.clear();
            r.read_line(line).expect("QMP read");
            let v: Value = serde_json::from_str(line).expect("QMP json");
            if v.get("return").is_some() || v.get("QMP").is_some() {
                return v;
            }
        }
    };
    answer(&mut r, &mut line);
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    answer(&mut r, &mut line);
    w.write_all(b"{\"execute\":\"query-status\"}\n").unwrap();
    let v = answer(&mut r, &mut line);
    v["return"]["status"].as_str().unwrap_or("?").to_owned()
}

/// Checks the VMM holds the configuration metald gave it.
fn check_vmm_config(kind: Kind, socket: &str, assets: &Assets) {
    match kind {
        Kind::Firecracker { .. } => {
            let c = curl(socket, "GET", "/vm/config");
            assert_eq!(c["machine-config"]["vcpu_count"], 1, "{c}");
            assert_eq!(c["machine-config"]["mem_size_mib"], 128, "{c}");
            assert_eq!(c["machine-config"]["smt"], false, "{c}");
            let args = c["boot-source"]["boot_args"].as_str().unwrap_or_default();
            assert!(args.contains(&assets.kernel_args), "{c}");
            let drives = c["drives"].as_array().cloned().unwrap_or_default();
            assert_eq!(drives.len(), 1, "{c}");
            assert_eq!(drives[0]["drive_id"], "root");
            assert_eq!(drives[0]["is_root_device"], true);
            assert_eq!(drives[0]["is_read_only"], true);
        }
        Kind::CloudHypervisor => {
            let i = curl(socket, "GET", "/api/v1/vm.info");
            let c = &i["config"];
            assert_eq!(c["cpus"]["boot_vcpus"], 1, "{i}");
            assert_eq!(c["memory"]["size"], 134217728u64, "{i}");
            let disks = c["disks"].as_array().cloned().unwrap_or_default();
            assert_eq!(disks.len(), 1, "{i}");
            assert_eq!(disks[0]["readonly"], true, "{i}");
        }
        Kind::Qemu => {}
    }
}

/// metald's state and socket for a VM.
async fn info(d: &Daemon, id: &str) -> Value {
    d.ok(T, "GetVmInfo", json!({"vm_id": id})).await
}

fn socket_of(v: &Value) -> String {
    v["backendInfo"]["socket"]
        .as_str()
        .unwrap_or_else(|| panic!("no socket in {v}"))
        .to_owned()
}

fn pid_of(v: &Value) -> i32 {
    v["backendInfo"]["pid"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {v}"))
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits (bounded) for a killed process to be gone: its pidfd turns
/// readable when it exits.
fn wait_dead(pid: i32) {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let Ok(fd) = rustix::process::pidfd_open(
        Pid::from_raw(pid).unwrap(),
        rustix::process::PidfdFlags::empty(),
    ) else {
        return; // already gone
    };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let limit = Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    let ready = poll(&mut fds, Some(&limit)).unwrap();
    assert_eq!(ready, 1, "process {pid} still alive 5 s after SIGKILL");
}

/// Asserts metald and the VMM agree the guest is in `want`.
async fn agree(d: &Daemon, b: &Backend, id: &str, want: &str) -> Value {
    let v = info(d, id).await;
    assert_eq!(
        state_of(&v),
        format!("VM_STATE_{}", want.to_uppercase()),
        "{v}"
    );
    assert_eq!(
        vmm_state(b.kind, &socket_of(&v)),
        want,
        "VMM's view of {id}"
    );
    v
}

/// Nothing of the VM is left on the host: process, directory, jail,
/// cgroups.
fn assert_gone(d: &Daemon, b: &Backend, id: &str, pids: &[i32]) {
    for &p in pids {
        assert!(!alive(p), "VMM process {p} of {id} still runs");
    }
    let left = keyed(&d.data_dir.join("vms"), id);
    assert!(left.is_empty(), "{id}'s directory is left: {left:?}");
    if b.kind == (Kind::Firecracker { jailed: true }) {
        let jails = keyed(&d.data_dir.join("jailer/firecracker"), id);
        assert!(jails.is_empty(), "jail is left: {jails:?}");
    }
    for parent in cgroup_parents(id) {
        let left = keyed(&parent, id);
        assert!(left.is_empty(), "cgroups are left: {left:?}");
        // The trial's own parent goes too (the jailer or metald made it).
        let _ = std::fs::remove_dir(parent);
    }
}

/// Where the cgroups of trial `id`'s VMs are (one directory per VM, named
/// by its key), on a v1 (cpu, memory) or v2 host.
fn cgroup_parents(id: &str) -> Vec<PathBuf> {
    ["cpu", "memory", ""]
        .iter()
        .map(|c| Path::new("/sys/fs/cgroup").join(c).join(cgroup_parent(id)))
        .collect()
}

/// Where a VM's cgroups are: under its trial's parent, named by its key.
fn cgroup_dirs(id: &str, key: &str) -> Vec<PathBuf> {
    cgroup_parents(id).iter().map(|p| p.join(key)).collect()
}

/// Asserts the VMM, and every thread it has started, runs in the cgroups
/// of VM `key` (of trial `id`). On v1 the VMM joins by moving its one
/// thread before exec, so the threads check is what shows the whole
/// process followed.
fn assert_in_cgroups(id: &str, key: &str, pid: i32) {
    let homes: Vec<PathBuf> = cgroup_dirs(id, key)
        .into_iter()
        .filter(|d| d.join("cgroup.procs").exists())
        .collect();
    assert!(!homes.is_empty(), "no cgroup for {key}");
    for d in homes {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "VMM {pid} is not in {}",
            d.display()
        );
        let threads = ["tasks", "cgroup.threads"]
            .iter()
            .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
            .unwrap();
        let members: Vec<&str> = threads.lines().collect();
        let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(tids.len() > 1, "the VMM has started its threads: {tids:?}");
        for tid in &tids {
            assert!(
                members.contains(&tid.as_str()),
                "thread {tid} of VMM {pid} is not in {}",
                d.display()
            );
        }
    }
}

fn full_lifecycle(b: Backend) -> Result<(), Failed> {
    block_on(async move {
        let assets = Assets::load();
        let id = format!("life-{}", b.name.replace('_', "-"));
        let id = id.as_str();
        let d = daemon(&b, id);
        d.ok(
            T,
            "CreateVm",
            json!({"vm_id": id, "config": config(&assets, None)}),
        )
        .await;
        let mut pids = Vec::new();

        d.ok(T, "BootVm", json!({"vm_id": id})).await;
        let v = agree(&d, &b, id, "running").await;
        let socket = socket_of(&v);
        check_vmm_config(b.kind, &socket, &assets);
        pids.push(pid_of(&v));
        if b.kind != Kind::Qemu {
            // Disk and network metrics come from the VMM's own counters
            // (Firecracker's metrics FIFO, Cloud Hypervisor's vm.counters).
            assert_eq!(v["backendInfo"]["device_counters"], "vmm", "{v}");
        }
        // Every VMM runs in cgroups of its own (the jailer's or metald's).
        assert_in_cgroups(id, v["backendInfo"]["vm_key"].as_str().unwrap(), pid_of(&v));
        if let Kind::Firecracker { jailed: true } = b.kind {
            let pid = pid_of(&v);
            let uid = v["backendInfo"]["uid"]
                .as_str()
                .expect("uid in backend_info");
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            assert!(
                line.split_whitespace().skip(1).all(|u| u == uid),
                "firecracker runs as uid {uid}: {line}"
            );
            // In its own mount namespace /proc/<pid>/root reads as "/":
            // compare the directories as files.
            use std::os::unix::fs::MetadataExt;
            let root = std::fs::metadata(format!("/proc/{pid}/root")).unwrap();
            let jail = std::fs::metadata(
                d.data_dir
                    .join("jailer/firecracker")
                    .join(v["backendInfo"]["vm_key"].as_str().unwrap())
                    .join("root"),
            )
            .unwrap();
            assert_eq!(
                (root.dev(), root.ino()),
                (jail.dev(), jail.ino()),
                "chrooted in its jail"
            );
        }

        d.ok(T, "PauseVm", json!({"vm_id": id})).await;
        agree(&d, &b, id, "paused").await;
        d.ok(T, "ResumeVm", json!({"vm_id": id})).await;
        agree(&d, &b, id, "running").await;

        d.ok(T, "RebootVm", json!({"vm_id": id})).await;
        let v = agree(&d, &b, id, "running").await;
        pids.push(pid_of(&v));

        // Graceful: the guest may still be booting and ignore the request;
        // the VMM is then killed after the timeout.
        d.ok(T, "ShutdownVm", json!({"vm_id": id, "timeout_seconds": 1}))
            .await;
        let v = info(&d, id).await;
        assert_eq!(state_of(&v), "VM_STATE_SHUTDOWN", "{v}");
        for &p in &pids {
            assert!(!alive(p), "VMM {p} gone after shutdown");
        }
        assert!(!Path::new(&socket_of_or(&v, &socket)).exists());

        d.ok(T, "BootVm", json!({"vm_id": id})).await;
        let v = agree(&d, &b, id, "running").await;
        pids.push(pid_of(&v));
        check_vmm_config(b.kind, &socket_of(&v), &assets);

        d.ok(T, "ShutdownVm", json!({"vm_id": id, "force": true}))
            .await;
        let v = info(&d, id).await;
        assert_eq!(state_of(&v), "VM_STATE_SHUTDOWN", "{v}");
        assert!(!alive(*pids.last().unwrap()), "forced shutdown kills");

        d.ok(T, "BootVm", json!({"vm_id": id})).await;
        let v = agree(&d, &b, id, "running").await;
        pids.push(pid_of(&v));

        // Forced: a guest still booting under nested KVM would ignore the
        // graceful request for the whole default timeout.
        d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
            .await;
        let e = d.call(T, "GetVmInfo", json!({"vm_id": id})).await;
        assert_eq!(e.unwrap_err().0, "not_found");
        assert_gone(&d, &b, id, &pids);
    });
    Ok(())
}

/// The socket a stopped VM had (it has none in backend_info any more).
fn socket_of_or(v: &Value, fallback: &str) -> String {
    v["backendInfo"]["socket"]
        .as_str()
        .unwrap_or(fallback)
        .to_owned()
}

fn killed_vmm(b: Backend) -> Result<(), Failed> {
    block_on(async move {
        let (d, id, pid) = booted(&b, "kill").await;
        let id = id.as_str();
        kill_process(Pid::from_raw(pid).unwrap(), Signal::KILL).unwrap();
        wait_dead(pid);
        // The first read after the process is gone tells the truth.
        let v = info(&d, id).await;
        assert_eq!(state_of(&v), "VM_STATE_FAILED", "{v}");
        let reason = v["backendInfo"]["last_error"].as_str().unwrap_or_default();
        assert!(reason.contains("signal 9"), "exit reason recorded: {v}");

        d.ok(T, "BootVm", json!({"vm_id": id})).await;
        let v = agree(&d, &b, id, "running").await;
        let again = pid_of(&v);
        d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
            .await;
        assert_gone(&d, &b, id, &[pid, again]);
    });
    Ok(())
}

fn networked(b: Backend) -> Result<(), Failed> {
    block_on(async move {
        let assets = Assets::load();
        let n = match b.kind {
            Kind::Qemu => 0,
            Kind::Firecracker { jailed: false } => 1,
            Kind::Firecracker { jailed: true } => 2,
            Kind::CloudHypervisor => 3,
        };
        let id = format!("net-{}", b.name.replace('_', "-"));
        let id = id.as_str();
        let (d, _lan) = networked_daemon(&b, n, id);
        let mut c = config(&assets, None);
        c["network"] = json!([{"id": "eth0", "ipv4_config": {}, "ipv6_config": {}}]);
        d.ok(T, "CreateVm", json!({"vm_id": id, "config": c})).await;
        d.ok(T, "BootVm", json!({"vm_id": id})).await;
        let v = agree(&d, &b, id, "running").await;
        let net = &v["networkInfo"];
        let (ns, tap) = (
            net["networkNamespace"]
                .as_str()
                .expect("namespace")
                .to_owned(),
            net["tapDevice"].as_str().expect("tap").to_owned(),
        );
        let mac = net["macAddress"].as_str().expect("mac").to_owned();
        // The VMM runs inside the VM's namespace ...
        let pid = pid_of(&v);
        assert_eq!(
            file_id(&format!("/proc/{pid}/ns/net")),
            file_id(&format!("/run/netns/{ns}")),
            "VMM {pid} runs in namespace {ns}"
        );
        // ... and drives the TAP metald made there, with metald's MAC.
        let socket = socket_of(&v);
        match b.kind {
            Kind::Firecracker { .. } => {
                let c = curl(&socket, "GET", "/vm/config");
                let nic = &c["network-interfaces"][0];
                assert_eq!(nic["host_dev_name"], tap.as_str(), "{c}");
                assert_eq!(nic["guest_mac"], mac.as_str(), "{c}");
                let args = c["boot-source"]["boot_args"].as_str().unwrap_or_default();
                let v4 = net["ipAddress"]
                    .as_str()
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap();
                assert!(args.contains(&format!("ip={v4}:")), "{args}");
            }
            Kind::CloudHypervisor => {
                let i = curl(&socket, "GET", "/api/v1/vm.info");
                let nic = &i["config"]["net"][0];
                assert_eq!(nic["tap"], tap.as_str(), "{i}");
                assert_eq!(nic["mac"], mac.as_str(), "{i}");
            }
            Kind::Qemu => {}
        }
        d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
            .await;
        assert_gone(&d, &b, id, &[pid]);
        assert!(
            !Path::new("/run/netns").join(&ns).exists(),
            "namespace {ns} removed"
        );
    });
    Ok(())
}

fn orphans_swept(b: Backend) -> Result<(), Failed> {
    block_on(async move {
        let (mut d, id, pid) = booted(&b, "orph").await;
        let id = id.as_str();

        // A crash loses the row while the VMM, its files and cgroups stay;
        // another crash left a cgroup of a VM that never got a row.
        d.stop(Signal::KILL);
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
                 c.execute('delete from vms where name=?',(sys.argv[2],)); c.commit()",
            ])
            .arg(d.data_dir.join("metald.db"))
            .arg(id)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let ghost: Vec<PathBuf> = cgroup_parents(id)
            .into_iter()
            .filter(|c| c.exists())
            .map(|c| c.join("ghost-vm"))
            .collect();
        assert!(!ghost.is_empty(), "the VM's cgroup parents");
        for g in &ghost {
            std::fs::create_dir(g).unwrap();
        }
        assert!(alive(pid));

        // The start-up pass removes all of it before the API serves.
        d.restart();
        assert!(!alive(pid), "orphan VMM {pid} killed");
        for g in &ghost {
            assert!(!g.exists(), "orphan cgroup {} removed", g.display());
        }
        assert_gone(&d, &b, id, &[pid]);
        let e = d.call(T, "GetVmInfo", json!({"vm_id": id})).await;
        assert_eq!(e.unwrap_err().0, "not_found");
    });
    Ok(())
}

fn restart_adopts(b: Backend) -> Result<(), Failed> {
    block_on(async move {
        let (mut d, id, pid) = booted(&b, "adopt").await;
        let id = id.as_str();

        // metald dies without a chance to clean up; its VMM lives on.
        d.stop(Signal::KILL);
        assert!(alive(pid), "the VMM outlives metald");
        d.restart();
        let v = agree(&d, &b, id, "running").await;
        assert_eq!(pid_of(&v), pid, "the same process is adopted");
        d.ok(T, "PauseVm", json!({"vm_id": id})).await;
        agree(&d, &b, id, "paused").await;
        d.ok(T, "ResumeVm", json!({"vm_id": id})).await;
        agree(&d, &b, id, "running").await;
        // An adopted VMM's exit is still noticed.
        kill_process(Pid::from_raw(pid).unwrap(), Signal::KILL).unwrap();
        wait_dead(pid);
        assert_eq!(state_of(&info(&d, id).await), "VM_STATE_FAILED");
        d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
            .await;
        assert_gone(&d, &b, id, &[pid]);
    });
    Ok(())
}

/// Starts metald on the Firecracker backend with `env` (`None` removes
/// the variable) and expects it to refuse; its stderr. Bounded: a metald
/// that accepted the settings would serve forever.
fn refused_at_start(env: &[(&str, Option<&str>)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new("timeout");
    cmd.arg("20")
        .arg(harness::bin())
        .args([
            "--backend",
            "firecracker",
            "--auth-mode",
            "dev",
            "--port",
            "0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("UNKEY_METALD_BILLING_ENABLED", "false")
        .env("UNKEY_METALD_NETWORK_ENABLED", "false");
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "metald started: {stderr}");
    stderr
}

/// As root, Firecracker without the jailer must be chosen explicitly.
fn refuses_root_without_jailer() -> Result<(), Failed> {
    let stderr = refused_at_start(&[("UNKEY_METALD_JAILER_ENABLED", None)]);
    assert!(
        stderr.contains("UNKEY_METALD_JAILER_ENABLED"),
        "the error names the setting: {stderr}"
    );
    Ok(())
}

/// With the jailer, a `firecracker` that needs libraries (which the jail
/// does not hold) is refused before metald serves, naming the setting.
/// (Any dynamically linked binary that answers `--version` stands in for
/// both binaries: metald looks at them before it runs a VM.)
fn refuses_dynamic_firecracker() -> Result<(), Failed> {
    let stderr = refused_at_start(&[
        ("UNKEY_METALD_JAILER_ENABLED", Some("true")),
        ("UNKEY_METALD_FIRECRACKER_BINARY", Some("/bin/true")),
        ("UNKEY_METALD_JAILER_BINARY", Some("/bin/true")),
    ]);
    assert!(
        stderr.contains("UNKEY_METALD_FIRECRACKER_BINARY: /bin/true is dynamically linked"),
        "the error names the setting and why: {stderr}"
    );
    Ok(())
}

fn refused_config(b: Backend) -> Result<(), Failed> {
    block_on(async move {
        let assets = Assets::load();
        let id = format!("refused-{}", b.name.replace('_', "-"));
        let id = id.as_str();
        let d = daemon(&b, id);
        // A regular file that is no kernel: metald's validation accepts it,
        // the VMM refuses it.
        d.ok(
            T,
            "CreateVm",
            json!({"vm_id": id, "config": config(&assets, Some(&assets.disk))}),
        )
        .await;
        let (code, message) = d
            .call(T, "BootVm", json!({"vm_id": id}))
            .await
            .expect_err("a disk image is not a kernel");
        assert_eq!(code, "failed_precondition", "{message}");
        let vmm = match b.kind {
            Kind::Qemu => "qemu",
            Kind::Firecracker { .. } => "firecracker",
            Kind::CloudHypervisor => "cloud-hypervisor",
        };
        assert!(
            message.to_lowercase().contains(vmm),
            "the VMM's reason: {message}"
        );
        let v = info(&d, id).await;
        assert_eq!(state_of(&v), "VM_STATE_CREATED", "{v}");
        assert!(v["backendInfo"].get("pid").is_none(), "{v}");
        assert!(
            d.vmm_pids().is_empty(),
            "no VMM process left: {:?}",
            d.vmm_pids()
        );
        assert_gone(&d, &b, id, &[]);
        d.ok(T, "DeleteVm", json!({"vm_id": id})).await;
    });
    Ok(())
}
