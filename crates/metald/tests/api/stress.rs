//! metald-stress, the seeds' stress tool, against a real metald with real
//! QEMU guests: its quick test prints the percentile table and leaves no
//! VM, Ctrl-C halfway leaves no VM and no VMM, `--json` and `--report`
//! carry per-RPC percentiles, and the Go-style flags parse like the
//! double-dash ones.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Daemon, assets_dir};

const TOKENS: [&str; 2] = ["dev_customer_stress1", "dev_customer_stress2"];

fn stress_bin() -> &'static str {
    env!("CARGO_BIN_EXE_metald-stress")
}

/// metald-stress against `d` with the test guest and two dev customers,
/// iterating every second.
fn stress(d: &Daemon, intervals: u32, interval: &str, max_vms: u32) -> Command {
    let mut cmd = Command::new(stress_bin());
    cmd.args(["-server", &d.url, "-auth", "2", "-seed", "7"])
        .arg("--backend-assets")
        .arg(assets_dir().join("assets.env"))
        .args([
            "-intervals",
            &intervals.to_string(),
            "-interval-duration",
            interval,
        ])
        .args([
            "-iteration-duration",
            "1s",
            "-max-vms",
            &max_vms.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// Waits (bounded) for `child` to exit; its status and stdout.
fn finish(mut child: Child, timeout: Duration) -> (ExitStatus, String) {
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("metald-stress did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().expect("reader");
    eprintln!("{out}");
    (status, out)
}

/// How many VMs the test customers have.
async fn vm_count(d: &Daemon) -> usize {
    let mut n = 0;
    for t in TOKENS {
        let list = d.ok(t, "ListVms", json!({})).await;
        n += list["vms"].as_array().map_or(0, Vec::len);
    }
    n
}

/// The table row of `rpc`: its call count.
fn calls_in_table(out: &str, rpc: &str) -> u64 {
    let row = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(rpc))
        .unwrap_or_else(|| panic!("no {rpc} row in:\n{out}"));
    row.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seeds_quick_test_prints_percentiles_and_leaves_no_vm() {
    let d = Daemon::start();
    let child = stress(&d, 1, "5s", 3).spawn().expect("start metald-stress");
    let (status, out) = finish(child, Duration::from_secs(90));
    assert!(status.success(), "exit {status}:\n{out}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["RPC", "calls", "errors", "p50", "p90", "p99", "max"]
    );
    for rpc in ["CreateVm", "BootVm", "GetVmInfo", "ListVms", "DeleteVm"] {
        assert!(calls_in_table(&out, rpc) > 0, "{rpc} was called:\n{out}");
    }
    assert!(out.contains("unexpected errors: 0"), "{out}");
    assert!(out.contains(" 0 left"), "{out}");
    assert_eq!(vm_count(&d).await, 0, "every VM it made is deleted");
    assert!(d.vmm_pids().is_empty(), "no VMM left: {:?}", d.vmm_pids());
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_halfway_deletes_every_vm_and_exits_non_zero() {
    let d = Daemon::start();
    let child = stress(&d, 1, "10m", 3)
        .spawn()
        .expect("start metald-stress");
    // Halfway: once metald has VMs of the run.
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm_count(&d).await == 0 {
        assert!(
            Instant::now() < deadline,
            "metald-stress made no VM in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let (status, out) = tokio::task::spawn_blocking(move || finish(child, Duration::from_secs(90)))
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "interrupted runs exit 130:\n{out}"
    );
    assert!(out.contains("(interrupted)"), "{out}");
    assert!(out.contains(" 0 left"), "{out}");
    assert_eq!(vm_count(&d).await, 0, "no VM survives Ctrl-C");
    assert!(
        d.vmm_pids().is_empty(),
        "no VMM survives Ctrl-C: {:?}",
        d.vmm_pids()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn json_and_report_carry_per_rpc_percentiles() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out.json");
    let report = dir.path().join("report");
    let child = stress(&d, 2, "2s", 2)
        .arg("--json")
        .arg(&json_path)
        .arg("--report")
        .arg(&report)
        .spawn()
        .expect("start metald-stress");
    let (status, out) = finish(child, Duration::from_secs(90));
    assert!(status.success(), "exit {status}:\n{out}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    for rpc in ["CreateVm", "BootVm", "ListVms", "DeleteVm"] {
        let r = &doc["rpcs"][rpc];
        assert!(r["calls"].as_u64().unwrap() > 0, "{rpc}: {r}");
        let p = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{rpc}.{k}: {r}"));
        assert!(p("p50_ms") > 0.0, "{rpc}: {r}");
        assert!(
            p("p50_ms") <= p("p90_ms") && p("p90_ms") <= p("p99_ms"),
            "{rpc}: {r}"
        );
        assert!(p("p99_ms") <= p("max_ms"), "{rpc}: {r}");
    }
    assert_eq!(doc["unexpected_errors"], 0);
    assert_eq!(doc["interval_targets"].as_array().unwrap().len(), 2);
    assert_eq!(doc["vms"]["left"], json!([]));
    assert!(doc["timeline"].as_array().is_some_and(|t| !t.is_empty()));
    assert!(
        !doc.to_string().contains("dev_customer_"),
        "tokens are not written out"
    );
    let same: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(same["rpcs"], doc["rpcs"]);
    for svg in ["latency.svg", "histograms.svg"] {
        let text = std::fs::read_to_string(report.join(svg)).unwrap();
        assert!(text.starts_with("<svg"), "{svg}");
        assert!(text.contains("CreateVm"), "{svg} names the RPCs");
    }
    assert_eq!(vm_count(&d).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_api_prints_one_result_line_per_rpc_and_transport() {
    let d = Daemon::start();
    let child = Command::new(stress_bin())
        .args(["-server", &d.url, "-auth", "2", "--backend-assets"])
        .arg(assets_dir().join("assets.env"))
        .args([
            "bench",
            "api",
            "-clients",
            "2",
            "-duration",
            "300ms",
            "-vms",
            "3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start metald-stress bench api");
    let (status, out) = finish(child, Duration::from_secs(60));
    assert!(status.success(), "exit {status}:\n{out}");
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("bench api "))
        .collect();
    for rpc in ["GetVmInfo", "ListVms"] {
        for transport in ["http1 connect", "h2c connect", "h2c grpc"] {
            let line = lines
                .iter()
                .find(|l| l.starts_with(&format!("bench api {rpc} {transport}:")))
                .unwrap_or_else(|| panic!("no {rpc} {transport} line in:\n{out}"));
            assert!(
                line.contains(" req/s, p50 ") && line.contains(", p99 "),
                "{line}"
            );
            assert!(line.contains(", 0 errors; bar "), "{line}");
        }
    }
    assert_eq!(vm_count(&d).await, 0, "the bench deletes the VMs it read");
}

#[test]
fn go_style_single_dash_flags_parse_like_double_dash_ones() {
    let settings = |args: &[&str]| -> Value {
        let out = Command::new(stress_bin())
            .args(args)
            .arg("--dry-run")
            .env_remove("METALD_ASSETS_ENV")
            .output()
            .expect("run metald-stress");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let go = settings(&[
        "-server",
        "127.0.0.1:9",
        "-intervals",
        "1",
        "-interval-duration",
        "20s",
        "-iteration-duration=2s",
        "-max-vms",
        "3",
        "-heavy-load",
        "-auth",
        "4",
        "-kernel",
        "/k",
        "-seed",
        "5",
    ]);
    let gnu = settings(&[
        "--server",
        "127.0.0.1:9",
        "--intervals",
        "1",
        "--interval-duration",
        "20s",
        "--iteration-duration=2s",
        "--max-vms",
        "3",
        "--heavy-load",
        "--auth",
        "4",
        "--kernel",
        "/k",
        "--seed",
        "5",
    ]);
    assert_eq!(go, gnu);
    assert_eq!(go["server"], "http://127.0.0.1:9");
    assert_eq!(go["intervals"], 1);
    assert_eq!(go["interval_duration"], "20s");
    assert_eq!(go["iteration_duration"], "2s");
    assert_eq!(go["max_vms"], 3);
    assert_eq!(go["heavy_load"], true);
    assert_eq!(go["customers"], 4);
    assert_eq!(go["concurrency"], 16, "heavy load raises the concurrency");
    let bad = Command::new(stress_bin())
        .args(["-max-vms", "many"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--max-vms"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_server_or_token_fails_before_any_vm_naming_the_flag() {
    let d = Daemon::start();
    let run = |server: &str, auth: &str| {
        Command::new(stress_bin())
            .args(["-server", server, "-auth", auth, "-intervals", "1"])
            .args([
                "-interval-duration",
                "1m",
                "-max-vms",
                "1",
                "--kernel",
                "/k",
            ])
            .output()
            .expect("run metald-stress")
    };
    let out = run(&d.url, "not-a-dev-token");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("-auth (token 1 of 1)") && err.contains("unauthenticated"),
        "{err}"
    );
    assert!(
        !err.contains("not-a-dev-token"),
        "tokens are never printed: {err}"
    );
    // A port nothing listens on: metald's, once it is stopped.
    let url = d.url.clone();
    drop(d);
    let out = run(&url, "1");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-server: ListVms failed"), "{err}");
}
