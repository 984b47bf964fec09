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
