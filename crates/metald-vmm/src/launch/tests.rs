//! Unit tests of the launch steps every backend shares.

use std::time::Duration;

use metald_core::ports::{VmmError, VmmExit, VmmRuntime};
use metald_core::vm::VmId;

use super::*;
use crate::process::{self, Children};

#[tokio::test]
async fn a_vmm_exiting_during_the_wait_ends_it_with_its_status() {
    let children = Children::default();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", "exit 3"]);
    let rec = spawn_recorded(&children, cmd, dir.path()).unwrap();
    assert_eq!(recorded_spawn(dir.path()), Some(rec));
    let rt = VmmRuntime {
        backend: "test".into(),
        pid: rec.pid,
        start_time: rec.start_time,
        socket: dir.path().join("none.sock"),
    };
    let r: Result<(), _> = until_ready(&children, &rt, Duration::from_secs(30), || async {
        Err("no socket".to_string())
    })
    .await;
    let e = r.unwrap_err();
    assert_eq!(
        e,
        NotReady::Exited(VmmExit {
            code: Some(3),
            signal: None
        })
    );
    // An exit status is the VMM refusing; its log says why, to
    // metald's log only.
    std::fs::write(dir.path().join("vmm.log"), "bad kernel /k/vmlinux\n").unwrap();
    let log = dir.path().join("vmm.log");
    match not_ready(e, "vmm", &rt.socket, Duration::from_secs(1), &[&log]) {
        VmmError::Refused(m) => {
            assert!(
                m.starts_with("vmm exited with status 3 while starting"),
                "{m}"
            );
            assert!(!m.contains("bad kernel") && !m.contains('/'), "{m}");
        }
        other => panic!("{other:?}"),
    }
    let timed_out = NotReady::TimedOut(format!("cannot connect to {}", rt.socket.display()));
    match not_ready(
        timed_out,
        "vmm",
        &rt.socket,
        Duration::from_secs(1),
        &[&log],
    ) {
        VmmError::Timeout(m) => assert_eq!(m, "vmm did not answer within 1s"),
        other => panic!("{other:?}"),
    }
    let killed = NotReady::Exited(VmmExit {
        code: None,
        signal: Some(9),
    });
    assert!(matches!(
        not_ready(killed, "vmm", &rt.socket, Duration::from_secs(1), &[]),
        VmmError::Gone(_)
    ));
}

#[tokio::test]
async fn a_process_that_is_gone_or_another_backends_is_gone_not_io() {
    let children = Children::default();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", "exit 0"]);
    let rec = spawn_recorded(&children, cmd, dir.path()).unwrap();
    children.wait_exit(rec.pid, rec.start_time).await;
    let rt = VmmRuntime {
        backend: "qemu".into(),
        pid: rec.pid,
        start_time: rec.start_time,
        socket: dir.path().join("qmp.sock"),
    };
    let e = is_our_process(&rt, "qmp.sock").unwrap_err();
    assert!(e.is_gone(), "{e:?}");
    // The pid of a live process that started at another time: not ours.
    let reused = VmmRuntime {
        pid: std::process::id() as i32,
        start_time: 1,
        ..rt.clone()
    };
    assert!(is_our_process(&reused, "qmp.sock").unwrap_err().is_gone());
    let e = check_backend(&rt, "firecracker").unwrap_err();
    assert!(e.is_gone(), "{e:?}");
    assert_eq!(check_backend(&rt, "qemu"), Ok(()));
    // Killing what is gone already is no error at all.
    assert_eq!(children.kill(rec.pid, rec.start_time).await, Ok(()));
}

#[tokio::test]
async fn kill_and_remove_kills_the_recorded_process_and_removes_the_dir() {
    let children = Children::default();
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("vm-1");
    fresh_dir(&dir).unwrap();
    let mut cmd = tokio::process::Command::new("sleep");
    cmd.arg("600");
    let rec = spawn_recorded(&children, cmd, &dir).unwrap();
    assert_eq!(
        vm_dirs(base.path()),
        vec![VmId::parse("vm-1", "t").unwrap()]
    );
    // The store never learned the runtime: the record alone suffices.
    kill_and_remove(&children, &dir, None).await.unwrap();
    assert!(!process::is_alive(rec.pid, rec.start_time));
    assert!(!dir.exists());
    kill_and_remove(&children, &dir, None).await.unwrap();
}

#[test]
fn log_tail_keeps_the_last_lines_and_reads_only_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("log");
    assert_eq!(log_tail(&p, 2), "no output");
    std::fs::write(&p, "a\n\nb\nc\n").unwrap();
    assert_eq!(log_tail(&p, 2), "b; c");
    // A line longer than the window is cut to the window.
    let mut big = "x".repeat(100_000);
    big.push_str("\nlast\n");
    std::fs::write(&p, big).unwrap();
    let t = log_tail(&p, 2);
    assert!(t.ends_with("; last") && t.len() < 4200, "{}", t.len());
}

#[test]
fn redact_hides_paths_but_keeps_the_reason() {
    assert_eq!(
        redact("Could not open '/var/lib/metald/vms/a/k': No such file or directory"),
        "Could not open '<path>': No such file or directory"
    );
    assert_eq!(
        redact("BackingFile(Os { code: 2 }, \"/srv/d.img\") at /x/y; HTTP 400"),
        "BackingFile(Os { code: 2 }, \"<path>\") at <path>; HTTP 400"
    );
    assert_eq!(redact("ratio 1/2 and a/b stay"), "ratio 1/2 and a/b stay");
    assert!(redact(&"y".repeat(1000)).chars().count() <= 301);
}
