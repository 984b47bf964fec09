//! The README's promise: exactly two set-up commands, and the first one
//! (`scripts/demo.sh`) serves the API and boots a real guest.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::harness::{connect_json, processes_mentioning};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn readme_starts_with_exactly_the_two_commands() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh code block");
    let commands: Vec<&str> = block
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(commands, ["bash scripts/demo.sh", "bash scripts/test.sh"]);
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(
        ci.contains("scripts/test.sh"),
        ".ci/run runs the README's test command"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_command_serves_the_api_and_boots_a_guest() {
    let tmp = tempfile::Builder::new()
        .prefix("metald-demo-")
        .tempdir()
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new("bash")
        .arg("scripts/demo.sh")
        .current_dir(repo())
        .env("METALD_DEMO_DETACH", "1")
        .env("METALD_BIN", crate::harness::bin())
        .env("METALD_DEMO_DIR", tmp.path())
        .env("UNKEY_METALD_PORT", port.to_string())
        // Each demo metald on its own metrics port: the tests run at once.
        .env("UNKEY_METALD_OTEL_PROMETHEUS_PORT", "0")
        .output()
        .expect("run scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let url = format!("http://127.0.0.1:{port}");
    let pid: i32 = std::fs::read_to_string(tmp.path().join("metald.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0);
    // Whatever happened, stop what the demo started before judging it.
    let info = connect_json(
        &url,
        "dev_customer_demo",
        "GetVmInfo",
        json!({"vm_id": "demo"}),
    )
    .await;
    let deleted = connect_json(
        &url,
        "dev_customer_demo",
        "DeleteVm",
        json!({"vm_id": "demo", "force": true}),
    )
    .await;
    if pid > 0 {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("METALD-GUEST-READY kernel="),
        "demo prints the console marker: {stdout}"
    );
    assert!(
        stdout.contains("\"state\": \"VM_STATE_RUNNING\""),
        "demo prints GetVmInfo: {stdout}"
    );
    let info = info.expect("metald still serves after the demo command returns");
    assert_eq!(info["state"], "VM_STATE_RUNNING");
    deleted.expect("demo VM deleted");
    assert!(
        processes_mentioning("-name metald-demo ").is_empty(),
        "demo VMM stopped"
    );
}

/// What a terminal does on Ctrl-C: SIGINT to the whole foreground process
/// group. The demo must delete its VM and stop metald, leaving no process
/// or file of the VM.
#[test]
fn ctrl_c_in_the_demo_deletes_its_vm_and_stops_metald() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Duration;

    let tmp = tempfile::Builder::new()
        .prefix("metald-demo-int-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_str().unwrap().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The script leads its own process group, as a shell's foreground job
    // does; metald and every curl it runs start in that group.
    let mut child = Command::new("bash")
        .arg("scripts/demo.sh")
        .current_dir(repo())
        .env_remove("METALD_DEMO_DETACH")
        .env("METALD_BIN", crate::harness::bin())
        .env("METALD_DEMO_DIR", &dir)
        .env("UNKEY_METALD_PORT", port.to_string())
        // Each demo metald on its own metrics port: the tests run at once.
        .env("UNKEY_METALD_OTEL_PROMETHEUS_PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run scripts/demo.sh");
    let pgid = rustix::process::Pid::from_child(&child);

    // Every stdout line goes to the channel; the VM's key comes from the
    // GetVmInfo the script prints after the console marker.
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut marker = false;
    let mut key = None;
    while key.is_none() {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(300)) else {
            break;
        };
        marker |= line.contains("METALD-GUEST-READY");
        if marker && let Some(v) = line.split("\"vm_key\": \"").nth(1) {
            key = v.split('"').next().map(str::to_owned);
        }
        seen.push(line);
    }

    // Ctrl-C, then wait for the script to end.
    rustix::process::kill_process_group(pgid, rustix::process::Signal::INT)
        .expect("SIGINT to the demo's process group");
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let finished = done_rx.recv_timeout(Duration::from_secs(120)).is_ok();
    seen.extend(rx.try_iter());
    let metald: i32 = std::fs::read_to_string(tmp.path().join("metald.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0);
    let metald_exited = metald > 0 && crate::harness::is_zombie(metald);
    let leaked = processes_mentioning(&dir);

    // Whatever happened, stop what the demo left before judging it.
    for pid in leaked
        .iter()
        .copied()
        .chain((!metald_exited).then_some(metald))
    {
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
    let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);

    let out = seen.join("\n");
    assert!(marker, "the demo printed the console marker: {out}");
    let key = key.unwrap_or_else(|| panic!("the demo printed the VM's key: {out}"));
    assert!(finished, "the demo exits on Ctrl-C: {out}");
    assert!(
        leaked.is_empty(),
        "no process mentions the demo's data dir after Ctrl-C: {leaked:?}\n{out}"
    );
    assert!(metald_exited, "metald (pid {metald}) stopped: {out}");
    let vm_dir = tmp.path().join("vms").join(&key);
    assert!(!vm_dir.exists(), "{} removed: {out}", vm_dir.display());
}
