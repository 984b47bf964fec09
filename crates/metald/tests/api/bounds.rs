//! Host safety bounds, through the real binary and real QEMU guests: a
//! guest flooding its console leaves a log of at most
//! `UNKEY_METALD_CONSOLE_LOG_MAX` with its newest output, metald's memory
//! does not grow with it, and the cap holds across a metald restart (the
//! VMM outlives metald); a boot the VMM refuses tells the caller nothing
//! about the host's paths and leaves nothing behind; a guest that fills
//! its memory is charged to its VM's cgroup and runs on under its limit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::json;

use crate::harness::{Assets, Daemon, processes_mentioning, state_of};

const T: &str = "dev_customer_bounds";

/// The default cap (the tests run metald without setting it).
const CAP: u64 = 1 << 20;

/// How far over the cap a log may be between two checks of the trimmer
/// (every 100 ms): what a QEMU serial console writes in that time under
/// TCG here is far less (see docs/backends.md).
const SLACK: u64 = CAP / 4;

/// MiB each flooding guest writes: 8 × the cap, about 40 s under TCG here
/// (0.2 MB/s; 50 MiB would take over four minutes, docs/backends.md).
const SPAM_MIB: u64 = 8;

const DONE: &[u8] = b"METALD-SPAM-DONE";

/// A flooding guest keeps a core busy under TCG: one at a time, so the
/// suite's timing-sensitive tests keep some CPU.
static FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spam_config(assets: &Assets, mib: u64) -> serde_json::Value {
    let mut c = assets.config();
    c["boot"]["kernel_args"] = json!(format!("{} metald.spam={mib}", assets.kernel_args));
    c
}

async fn console_of(d: &Daemon, id: &str) -> PathBuf {
    let key = crate::harness::vm_key(d, T, id).await;
    d.data_dir.join("vms").join(key).join("console.log")
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The log, read only while it is small (the cap is the point).
fn read_small(p: &Path) -> Vec<u8> {
    let n = size(p);
    assert!(n <= CAP + SLACK, "{} is {n} bytes", p.display());
    std::fs::read(p).unwrap_or_default()
}

/// The last 4 KiB of the log.
fn tail(p: &Path) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = Vec::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let n = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(n.saturating_sub(4096))).is_ok() {
            let _ = f.take(4096).read_to_end(&mut out);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Resident memory of `pid`, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}

/// Polls (every 10 ms, bounded) until the console ends with the done
/// marker and is at most the cap; returns the largest size seen on the
/// way.
async fn wait_done_under_cap(console: &Path, limit: Duration) -> u64 {
    let start = Instant::now();
    let mut largest = 0;
    loop {
        let n = size(console);
        largest = largest.max(n);
        if n <= CAP && contains(&tail(console), DONE) {
            return largest;
        }
        assert!(
            start.elapsed() < limit,
            "no done marker under the cap after {limit:?}: {n} bytes, largest {largest}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooded_console_keeps_its_newest_mebibyte_and_metald_does_not_grow() {
    let _one = FLOOD.lock().await;
    let assets = Assets::load();
    let d = Daemon::start();
    let id = "flood";
    d.ok(
        T,
        "CreateVm",
        json!({"vm_id": id, "config": spam_config(&assets, SPAM_MIB)}),
    )
    .await;
    d.ok(T, "BootVm", json!({"vm_id": id})).await;
    let pid = d.pid().unwrap();
    let before = rss(pid);
    let console = console_of(&d, id).await;
    let start = Instant::now();
    let largest = wait_done_under_cap(&console, Duration::from_secs(300)).await;
    let took = start.elapsed();
    let after = rss(pid);
    eprintln!(
        "{SPAM_MIB} MiB of console output in {took:?} ({:.2} MB/s); largest log {largest} bytes; \
         metald RSS {before} -> {after} bytes",
        (SPAM_MIB << 20) as f64 / took.as_secs_f64() / 1e6
    );
    assert!(
        largest <= CAP + SLACK,
        "the log grew to {largest} bytes between trims"
    );
    let kept = read_small(&console);
    assert!(kept.len() as u64 >= CAP / 2 - 4096, "{} bytes", kept.len());
    let marker = format!("METALD-SPAM-DONE mib={SPAM_MIB}");
    let end = &kept[kept.len().saturating_sub(200)..];
    assert!(
        contains(end, marker.as_bytes()),
        "the newest output is kept: {:?}",
        String::from_utf8_lossy(end)
    );
    assert!(
        after.saturating_sub(before) < 16 << 20,
        "metald's RSS grew from {before} to {after} bytes with console output"
    );
    d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cap_holds_for_output_written_while_metald_was_down() {
    let _one = FLOOD.lock().await;
    let assets = Assets::load();
    let mut d = Daemon::start();
    let id = "flood-restart";
    d.ok(
        T,
        "CreateVm",
        json!({"vm_id": id, "config": spam_config(&assets, SPAM_MIB)}),
    )
    .await;
    d.ok(T, "BootVm", json!({"vm_id": id})).await;
    let console = console_of(&d, id).await;
    d.stop(Signal::KILL);
    // With no metald, nothing trims: the VMM keeps writing.
    let start = Instant::now();
    while size(&console) <= 2 * CAP {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the guest did not write 2 MiB"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.restart();
    // Adoption cut the log back before metald reported listening.
    let n = size(&console);
    assert!(n <= CAP + SLACK, "{n} bytes right after adoption");
    wait_done_under_cap(&console, Duration::from_secs(300)).await;
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": id})).await;
    assert_eq!(state_of(&info), "VM_STATE_RUNNING", "{info}");
    d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
        .await;
}

/// MiB a filling guest writes into RAM: a quarter of its 128 MiB (the
/// kernel and the unpacked initramfs hold most of the rest; 64 MiB ends
/// in the guest's own OOM killer).
const FILL_MIB: u64 = 32;

/// The memory cgroup files of VM `key` under the parent of the metald on
/// `data_dir`: (peak usage, limit, OOM events), for v1 or v2.
fn memory_files(data_dir: &Path, key: &str) -> Option<[PathBuf; 3]> {
    let parent = crate::harness::cgroup_parent(data_dir);
    let v1 = Path::new("/sys/fs/cgroup/memory").join(&parent).join(key);
    let v2 = Path::new("/sys/fs/cgroup").join(&parent).join(key);
    if v1.join("memory.limit_in_bytes").exists() {
        let f = |n: &str| v1.join(n);
        Some([
            f("memory.max_usage_in_bytes"),
            f("memory.limit_in_bytes"),
            f("memory.oom_control"),
        ])
    } else if v2.join("memory.max").exists() {
        let f = |n: &str| v2.join(n);
        Some([f("memory.peak"), f("memory.max"), f("memory.events")])
    } else {
        None
    }
}

fn read_u64(p: &Path) -> u64 {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}: {text:?}", p.display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_fills_its_memory_is_charged_to_its_cgroup_and_runs_on_under_the_limit() {
    let assets = Assets::load();
    let d = Daemon::start();
    let id = "fill";
    let mut config = assets.config();
    let guest = config["memory"]["size_bytes"].as_u64().unwrap();
    config["boot"]["kernel_args"] = json!(format!("{} metald.fill={FILL_MIB}", assets.kernel_args));
    d.ok(T, "CreateVm", json!({"vm_id": id, "config": config}))
        .await;
    d.ok(T, "BootVm", json!({"vm_id": id})).await;
    let console = console_of(&d, id).await;
    let (done, failed) = (
        format!("METALD-FILL-DONE mib={FILL_MIB}"),
        "METALD-FILL-ERROR",
    );
    let start = Instant::now();
    loop {
        let text = read_small(&console);
        assert!(
            !contains(&text, failed.as_bytes()),
            "the guest could not fill its memory: {}",
            String::from_utf8_lossy(&text)
        );
        if contains(&text, done.as_bytes()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no fill marker: {}",
            String::from_utf8_lossy(&text)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": id})).await;
    assert_eq!(state_of(&info), "VM_STATE_RUNNING", "{info}");
    assert_eq!(info["backendInfo"]["process_alive"], "true", "{info}");
    let key = info["backendInfo"]["vm_key"].as_str().unwrap();
    let [peak, limit, oom] = memory_files(&d.data_dir, key).expect("the VM's memory cgroup");
    let (peak, limit) = (read_u64(&peak), read_u64(&limit));
    // The guest's memory is the VM's cgroup's: what it filled is charged
    // there, under a limit of the guest's size and the VMM's allowance.
    assert!(
        peak >= FILL_MIB << 20,
        "peak {peak} bytes: the guest's pages are charged elsewhere"
    );
    assert!(
        limit > guest && limit < guest * 4,
        "limit {limit} for a {guest}-byte guest"
    );
    assert!(peak <= limit, "peak {peak} over the limit {limit}");
    let events = std::fs::read_to_string(&oom).unwrap();
    assert!(
        events.lines().any(|l| l == "oom_kill 0"),
        "the VMM's cgroup saw an OOM kill: {events}"
    );
    d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_boot_names_no_host_path_and_leaves_nothing() {
    let assets = Assets::load();
    let d = Daemon::start();
    let id = "refused-paths";
    // QEMU's own words about this kernel name its host path.
    std::fs::create_dir_all(d.data_dir.join("assets")).unwrap();
    let bogus = d.data_dir.join("assets/not-a-kernel");
    std::fs::write(&bogus, b"this is not a kernel").unwrap();
    let mut config = assets.config();
    config["boot"]["kernel_path"] = json!(bogus.to_str().unwrap());
    d.ok(T, "CreateVm", json!({"vm_id": id, "config": config}))
        .await;
    let (code, message) = d.call(T, "BootVm", json!({"vm_id": id})).await.unwrap_err();
    assert_eq!(code, "failed_precondition", "{message}");
    assert!(message.contains("qemu exited with status"), "{message}");
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": id})).await;
    let last_error = info["backendInfo"]["last_error"].as_str().unwrap_or("");
    assert!(!last_error.is_empty(), "{info}");
    // The caller's own path may be named; no other.
    let own = bogus.to_str().unwrap();
    for text in [&message.replace(own, ""), &last_error.replace(own, "")] {
        assert!(
            !text.contains('/'),
            "a host path reached the caller: {text}"
        );
        assert!(
            !text.contains("qemu-system"),
            "QEMU's output reached the caller: {text}"
        );
    }
    assert!(processes_mentioning(&format!("metald-{id}")).is_empty());
    assert!(crate::harness::vm_dirs(&d, id).is_empty());
    d.ok(T, "DeleteVm", json!({"vm_id": id})).await;
}
