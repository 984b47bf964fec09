//! metald under systemd: the unit in deploy/systemd verifies, and metald
//! tells systemd when it serves (READY=1) and when it begins to stop
//! (STOPPING=1) over `NOTIFY_SOCKET`, as `Type=notify` needs.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{base_command, bin};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn the_unit_file_verifies_and_keeps_vms_running_across_restarts() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/metald.service")).unwrap();
    for line in ["Type=notify", "KillMode=process", "NotifyAccess=main"] {
        assert!(unit.lines().any(|l| l == line), "{line} missing");
    }
    // Verify a copy that starts this build's binary (verify checks that
    // the ExecStart binary exists).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("metald.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/local/bin/metald",
            &format!("ExecStart={}", bin()),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("metald.service:"),
        "systemd-analyze verify: {stderr}"
    );
}

fn next_message(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn metald_notifies_ready_once_it_serves_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let data = dir.path().join("data");
    let mut child = base_command(&data)
        .args(["--auth-mode", "dev"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = next_message(&sock);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // READY=1 comes after the API listens: the address line is out.
    let mut out = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut out)
        .unwrap();
    let url = out
        .trim()
        .strip_prefix("metald listening on ")
        .unwrap()
        .to_owned();
    let health = Command::new("curl")
        .args(["-fsS", &format!("{url}/health")])
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "the API serves once READY=1 is sent"
    );

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let stopping = next_message(&sock);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(child.wait().unwrap().success());
}
