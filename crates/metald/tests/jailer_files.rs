//! The jailed Firecracker touches no host file it did not create, and a
//! compromised jailed VMM cannot point metald at another VM: the real
//! binary with the real jailer. They need Firecracker, its jailer and
//! `/dev/kvm`, so they are ignored by default; run them with
//! `FIRECRACKER_BIN=… JAILER_BIN=… cargo test -p metald --test jailer_files
//! -- --ignored` on a host that has them (as root).

#[path = "api/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use harness::{Assets, Daemon, state_of};
use serde_json::{Value, json};

const T: &str = "dev_customer_jailfiles";

fn binary(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var}: set it to the binary's path"))
}

fn cgroup_parent(tag: &str) -> String {
    format!("metald-jailfiles-{tag}")
}

/// Removes the (empty) parent cgroups the jailer made for test `tag`.
fn remove_parent_cgroups(tag: &str) {
    for c in ["cpu", "memory", ""] {
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(c).join(cgroup_parent(tag)));
    }
}

fn jailed_daemon(tag: &str, uid_start: &str) -> Daemon {
    let parent = cgroup_parent(tag);
    Daemon::start_with(&[
        "--auth-mode",
        "dev",
        "--backend",
        "firecracker",
        "--firecracker-binary",
        &binary("FIRECRACKER_BIN"),
        "--jailer-enabled",
        "true",
        "--jailer-binary",
        &binary("JAILER_BIN"),
        "--jailer-uid-start",
        uid_start,
        "--jailer-uid-count",
        "4",
        "--jailer-parent-cgroup",
        &parent,
    ])
}

/// A tenant's writable disk: owned by someone else, private.
fn tenant_disk(d: &Daemon, assets: &Assets) -> (PathBuf, std::fs::Metadata) {
    // Writable disks come from the customer's own asset root.
    let customer = T.trim_start_matches("dev_customer_");
    let dir = d.data_dir.join("assets/customers").join(customer);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("data.img");
    std::fs::copy(&assets.disk, &p).unwrap();
    std::os::unix::fs::chown(&p, Some(1234), Some(1234)).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let m = std::fs::metadata(&p).unwrap();
    (p, m)
}

fn reflinks_in(dir: &Path) -> bool {
    let a = dir.join(".probe-a");
    let b = dir.join(".probe-b");
    std::fs::write(&a, b"x").unwrap();
    let ok = rustix::fs::ioctl_ficlone(
        std::fs::File::create(&b).unwrap(),
        std::fs::File::open(&a).unwrap(),
    )
    .is_ok();
    let _ = std::fs::remove_file(a);
    let _ = std::fs::remove_file(b);
    ok
}

async fn info(d: &Daemon, id: &str) -> Value {
    d.ok(T, "GetVmInfo", json!({"vm_id": id})).await
}

/// The guest's state as Firecracker itself reports it (`GET /`). A jail's
/// socket path can be longer than a socket address holds: it is reached
/// through a handle on it.
fn vmm_state(socket: &Path) -> String {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let fd = rustix::fs::open(
        socket,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let mut s =
        std::os::unix::net::UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    // Firecracker keeps the connection open: read the head, then exactly
    // the body its Content-Length announces.
    let mut r = std::io::BufReader::new(s);
    let mut length = 0;
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    v["state"].as_str().unwrap_or("?").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Firecracker, its jailer and /dev/kvm (FIRECRACKER_BIN, JAILER_BIN), as root"]
async fn a_writable_drive_is_cloned_or_refused_and_the_original_never_changes() {
    let assets = Assets::load();
    let d = jailed_daemon("rw", "990200");
    let (data, before) = tenant_disk(&d, &assets);
    let mut config = assets.config();
    config["storage"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "data", "path": data.to_str().unwrap(), "read_only": false}));
    d.ok(T, "CreateVm", json!({"vm_id": "rw", "config": config}))
        .await;
    let booted = d.call(T, "BootVm", json!({"vm_id": "rw"})).await;
    if reflinks_in(&d.data_dir) {
        let v = booted.expect("a clone is made where reflinks work");
        assert_eq!(state_of(&v), "VM_STATE_RUNNING");
        let v = info(&d, "rw").await;
        let uid: u32 = v["backendInfo"]["uid"].as_str().unwrap().parse().unwrap();
        let key = v["backendInfo"]["vm_key"].as_str().unwrap();
        let clone = d
            .data_dir
            .join("jailer/firecracker")
            .join(key)
            .join("root/drive1");
        let m = std::fs::metadata(&clone).unwrap();
        assert_eq!(
            (m.uid(), m.mode() & 0o777),
            (uid, 0o600),
            "the VM's own clone"
        );
        assert_ne!(m.ino(), before.ino());
        // Each Firecracker process gets a clone of its own: what was
        // written to one is gone at the next boot, which clones the
        // untouched original again.
        use std::os::unix::fs::FileExt;
        let head = |p: &Path| {
            let mut b = [0u8; 8];
            std::fs::File::open(p)
                .unwrap()
                .read_exact_at(&mut b, 0)
                .unwrap();
            b
        };
        let original = head(&data);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&clone)
            .unwrap()
            .write_all_at(b"scribble", 0)
            .unwrap();
        d.ok(T, "ShutdownVm", json!({"vm_id": "rw", "force": true}))
            .await;
        keeps_owner_and_mode(&data, &before);
        assert_eq!(head(&data), original, "the original is never written");
        d.ok(T, "BootVm", json!({"vm_id": "rw"})).await;
        let again = std::fs::metadata(&clone).unwrap();
        assert_eq!(
            (again.uid(), again.mode() & 0o777),
            (uid, 0o600),
            "a new clone"
        );
        assert_eq!(head(&clone), original, "a fresh clone of the original");
    } else {
        let (code, message) = booted.expect_err("no clone without reflinks");
        assert_eq!(code, "failed_precondition", "{message}");
        assert!(
            message.contains("config.storage[id=data]") && message.contains("reflink"),
            "{message}"
        );
        assert!(!message.contains('/'), "no host path: {message}");
        assert!(d.vmm_pids().is_empty(), "no VMM left");
        assert!(
            harness::keyed(&d.data_dir.join("jailer/firecracker"), "rw").is_empty(),
            "no jail left"
        );
    }
    keeps_owner_and_mode(&data, &before);
    d.ok(T, "DeleteVm", json!({"vm_id": "rw", "force": true}))
        .await;
    keeps_owner_and_mode(&data, &before);
    remove_parent_cgroups("rw");
}

fn keeps_owner_and_mode(data: &Path, before: &std::fs::Metadata) {
    let after = std::fs::metadata(data).unwrap();
    assert_eq!(
        (after.uid(), after.gid(), after.mode()),
        (before.uid(), before.gid(), before.mode()),
        "the tenant's file keeps its owner and mode"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Firecracker, its jailer and /dev/kvm (FIRECRACKER_BIN, JAILER_BIN), as root"]
async fn a_socket_link_planted_in_a_jail_is_not_followed() {
    let assets = Assets::load();
    let d = jailed_daemon("link", "990210");
    for id in ["evil", "victim"] {
        d.ok(
            T,
            "CreateVm",
            json!({"vm_id": id, "config": assets.config()}),
        )
        .await;
        d.ok(T, "BootVm", json!({"vm_id": id})).await;
    }
    // What a compromised VMM can do in the jail it owns.
    let jails = d.data_dir.join("jailer/firecracker");
    let socket_of = |key: &str| jails.join(key).join("root/run/firecracker.socket");
    let evil = socket_of(&harness::vm_key(&d, T, "evil").await);
    let victim = socket_of(&harness::vm_key(&d, T, "victim").await);
    std::fs::remove_file(&evil).unwrap();
    std::os::unix::fs::symlink(&victim, &evil).unwrap();
    let paused = d.call(T, "PauseVm", json!({"vm_id": "evil"})).await;
    assert!(
        paused.is_err(),
        "metald followed the planted link: {paused:?}"
    );
    assert_eq!(
        vmm_state(&victim),
        "Running",
        "the other VM's guest is untouched"
    );
    for id in ["evil", "victim"] {
        d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
            .await;
    }
    remove_parent_cgroups("link");
}
