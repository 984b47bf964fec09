//! The benches of `metald-stress bench` that start a metald of their own
//! (boot, throughput, density, billing, adopt), each at a tiny size on
//! real QEMU guests: each prints its result line with the bar and leaves
//! no VM, no process and no file. No timing is asserted.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{assets_dir, processes_mentioning};

/// Runs `metald-stress bench <args>` with its temporary files in a
/// directory of its own; its stdout, after checking it succeeded and that
/// nothing it made is left.
fn bench(args: &[&str]) -> String {
    let tmp = tempfile::Builder::new()
        .prefix("metald-bench-test-")
        .tempdir()
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_metald-stress"))
        .arg("--backend-assets")
        .arg(assets_dir().join("assets.env"))
        .arg("bench")
        .args(args)
        .env("TMPDIR", tmp.path())
        .env_remove("FIRECRACKER_BIN")
        .env_remove("CLOUD_HYPERVISOR_BIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start metald-stress bench");
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bench {args:?} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap();
    eprintln!("{out}");
    assert!(status.success(), "bench {args:?}: exit {status}:\n{out}");
    assert_nothing_left(tmp.path());
    out
}

/// No file under `dir` and no process (metald, VMM) mentioning it.
fn assert_nothing_left(dir: &Path) {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(files.is_empty(), "files left: {files:?}");
    let pids = processes_mentioning(&dir.to_string_lossy());
    assert!(pids.is_empty(), "processes left: {pids:?}");
}

/// The one line starting with `prefix`, checked to name a bar and its
/// verdict.
fn result_line<'a>(out: &'a str, prefix: &str) -> &'a str {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{out}"));
    assert!(line.contains("; bar "), "{line}");
    assert!(
        line.contains(": met") || line.contains(": missed"),
        "{line}"
    );
    line
}

#[test]
fn boot_compares_metald_with_raw_qemu_and_names_missing_backends() {
    let out = bench(&["boot", "-runs", "2"]);
    let line = result_line(&out, "bench boot qemu: 2 alternating runs: metald p50 ");
    assert!(
        line.contains(", raw p50 ") && line.contains("× raw ("),
        "{line}"
    );
    assert!(line.contains("bar ≤ 1.10× raw"), "{line}");
    for missing in ["firecracker", "cloudhypervisor"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("bench boot {missing}: missing (pass --"))),
            "{missing} is reported missing:\n{out}"
        );
    }
}

#[test]
fn throughput_compares_rates_through_metald_and_raw() {
    let out = bench(&["throughput", "-vms", "4", "-concurrency", "2"]);
    let line = result_line(
        &out,
        "bench throughput qemu: 4 creates+boots at concurrency 2: metald ",
    );
    assert!(
        line.contains("/s (p50 ") && line.contains(", raw "),
        "{line}"
    );
}

#[test]
fn density_reports_metald_rss_per_live_vmm() {
    let out = bench(&["density", "-vms", "2"]);
    let line = result_line(&out, "bench density qemu: metald RSS ");
    assert!(line.contains(" KiB with 2 live VMMs: "), "{line}");
    assert!(line.contains("bar ≤ 64 KiB per VM"), "{line}");
    assert!(
        line.contains("Firecracker not found"),
        "says it ran on QEMU: {line}"
    );
}

#[test]
fn billing_reports_metald_cpu_for_metered_paused_vms() {
    let out = bench(&["billing", "-vms", "2", "-window", "2s"]);
    let line = result_line(&out, "bench billing qemu: metald CPU over 2.0 s: ");
    // Two fleet sizes: what each VM adds, and what metering costs at all.
    assert!(
        line.contains(" ms with 1 and ")
            && line.contains(" ms with 2 paused VMs metered at 100 ms: "),
        "{line}"
    );
    assert!(
        line.contains(" ms/s per VM and ") && line.contains(" ms/s whatever the count, "),
        "{line}"
    );
    assert!(
        line.contains("of one core for 1,000 VMs; bar ≤ 2.5%"),
        "{line}"
    );
}

#[test]
fn billing_meters_running_guests_when_asked() {
    let out = bench(&["billing", "-vms", "2", "-window", "2s", "-running"]);
    let line = result_line(&out, "bench billing qemu: metald CPU over 2.0 s: ");
    // The state is metald's listing of the fleet after the window.
    assert!(
        line.contains(" ms with 2 running VMs metered at 100 ms: "),
        "{line}"
    );
}

#[test]
fn adopt_times_a_restart_after_sigkill_until_every_vm_answers() {
    let out = bench(&["adopt", "-vms", "2"]);
    let line = result_line(&out, "bench adopt qemu: 2 live VMs adopted and answering ");
    assert!(line.contains("bar ≤ 1 s"), "{line}");
}
