//! Supervision: VMs survive a SIGKILLed metald and are re-adopted with the
//! same processes; a VMM killed from outside is reported at once; a pid
//! reused by an unrelated process is never adopted or killed.

use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};
use serde_json::json;

use crate::harness::{Assets, Daemon, processes_mentioning, state_of, wait_for_console};

const T: &str = "dev_customer_super";

fn vmm_pid(id: &str) -> Option<i32> {
    let pids = processes_mentioning(&format!("-name metald-{id}-"));
    assert!(pids.len() <= 1, "at most one VMM for {id}: {pids:?}");
    pids.first().copied()
}

/// Waits (bounded) until `pid` is gone or a zombie: the kernel's view.
fn wait_dead(pid: i32) {
    let start = Instant::now();
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(s)
                if s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z')) =>
            {
                return;
            }
            Ok(_) => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "process {pid} did not die"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn five_vms_survive_a_sigkilled_metald_with_the_same_processes() {
    let assets = Assets::load();
    let mut d = Daemon::start();
    let ids: Vec<String> = (0..5).map(|i| format!("survivor-{i}")).collect();
    for id in &ids {
        d.ok(
            T,
            "CreateVm",
            json!({"vm_id": id, "config": assets.config()}),
        )
        .await;
        d.ok(T, "BootVm", json!({"vm_id": id})).await;
    }
    let pids: Vec<i32> = ids
        .iter()
        .map(|id| vmm_pid(id).expect("VMM runs"))
        .collect();

    d.stop(Signal::KILL);
    assert_eq!(
        ids.iter()
            .map(|id| vmm_pid(id).unwrap())
            .collect::<Vec<_>>(),
        pids,
        "VMs outlive metald"
    );
    d.restart();

    let list = d.ok(T, "ListVms", json!({"page_size": 100})).await;
    assert!(
        list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| state_of(v) == "VM_STATE_RUNNING"),
        "{list}"
    );
    for (id, pid) in ids.iter().zip(&pids) {
        let info = d.ok(T, "GetVmInfo", json!({"vm_id": id})).await;
        assert_eq!(state_of(&info), "VM_STATE_RUNNING");
        assert_eq!(
            info["backendInfo"]["pid"],
            pid.to_string(),
            "{id} adopted, not restarted"
        );
        assert_eq!(vmm_pid(id), Some(*pid));
        assert_eq!(
            state_of(&d.ok(T, "PauseVm", json!({"vm_id": id})).await),
            "VM_STATE_PAUSED"
        );
        assert_eq!(
            state_of(&d.ok(T, "ResumeVm", json!({"vm_id": id})).await),
            "VM_STATE_RUNNING"
        );
        d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
            .await;
    }
    assert!(d.vmm_pids().is_empty(), "no VMM left: {:?}", d.vmm_pids());
    let left: Vec<_> = std::fs::read_dir(d.data_dir.join("vms"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "no VM files left: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vmm_killed_from_outside_is_reported_by_the_next_read() {
    let assets = Assets::load();
    let d = Daemon::start();
    let id = "victim-now";
    d.ok(
        T,
        "CreateVm",
        json!({"vm_id": id, "config": assets.config()}),
    )
    .await;
    d.ok(T, "BootVm", json!({"vm_id": id})).await;
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": id})).await;
    let socket = info["backendInfo"]["socket"].as_str().unwrap().to_owned();
    let pid = vmm_pid(id).unwrap();

    let killed = Instant::now();
    kill_process(Pid::from_raw(pid).unwrap(), Signal::KILL).unwrap();
    wait_dead(pid);
    // No polling of metald: the first read after the process is gone must
    // already tell the truth.
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": id})).await;
    eprintln!(
        "metald reported the dead VMM {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(state_of(&info), "VM_STATE_FAILED");
    let reason = info["backendInfo"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("signal 9"), "exit reason recorded: {info}");
    assert!(
        info["backendInfo"].get("pid").is_none(),
        "no process claimed: {info}"
    );
    assert!(
        !std::path::Path::new(&socket).exists(),
        "the dead VMM's socket is released"
    );
    assert_eq!(vmm_pid(id), None);

    assert_eq!(
        state_of(&d.ok(T, "BootVm", json!({"vm_id": id})).await),
        "VM_STATE_RUNNING"
    );
    d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_pid_is_neither_adopted_nor_killed() {
    let assets = Assets::load();
    let mut d = Daemon::start();
    let id = "reused";
    d.ok(
        T,
        "CreateVm",
        json!({"vm_id": id, "config": assets.config()}),
    )
    .await;
    d.ok(T, "BootVm", json!({"vm_id": id})).await;
    let real = vmm_pid(id).unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let stranger = sleeper.id() as i32;

    d.stop(Signal::KILL);
    // The row now names the stranger's pid, as if the VMM had died and the
    // kernel had handed its pid to another process.
    let db = d.data_dir.join("metald.db");
    let edit = std::process::Command::new("python3")
        .args([
            "-c",
            "import json,sqlite3,sys\n\
             c=sqlite3.connect(sys.argv[1])\n\
             r=json.loads(c.execute(\"select runtime_json from vms where name=?\",(sys.argv[2],)).fetchone()[0])\n\
             r['pid']=int(sys.argv[3])\n\
             c.execute(\"update vms set runtime_json=? where name=?\",(json.dumps(r),sys.argv[2]))\n\
             c.commit()",
        ])
        .arg(&db)
        .arg(id)
        .arg(stranger.to_string())
        .status()
        .unwrap();
    assert!(edit.success());
    d.restart();

    let info = d.ok(T, "GetVmInfo", json!({"vm_id": id})).await;
    assert_eq!(state_of(&info), "VM_STATE_FAILED", "{info}");
    assert!(
        info["backendInfo"]["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{info}"
    );
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the unrelated process was not killed"
    );
    wait_dead(real);
    assert_eq!(
        vmm_pid(id),
        None,
        "the real, now unclaimed VMM was cleaned up"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    d.ok(T, "DeleteVm", json!({"vm_id": id})).await;
}

/// A guest that powers itself off while its VMM is adopted (not metald's
/// child, so its exit status is unknown) is reported `shutdown`, as for
/// metald's own children, not `failed`; a VMM killed from outside after
/// adoption is still `failed`.
#[tokio::test(flavor = "multi_thread")]
async fn an_adopted_guest_that_powers_off_is_reported_shut_down() {
    let assets = Assets::load();
    let mut d = Daemon::start();
    for id in ["off", "killed"] {
        d.ok(
            T,
            "CreateVm",
            json!({"vm_id": id, "config": assets.config()}),
        )
        .await;
        d.ok(T, "BootVm", json!({"vm_id": id})).await;
    }
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": "off"})).await;
    let console = info["backendInfo"]["console_log"]
        .as_str()
        .expect("console_log")
        .to_owned();
    let socket = info["backendInfo"]["socket"]
        .as_str()
        .expect("socket")
        .to_owned();
    wait_for_console(&console, "METALD-GUEST-READY", 1, Duration::from_secs(120)).await;
    d.stop(Signal::KILL);
    d.restart();
    let pid = vmm_pid("off").expect("adopted");
    // The ACPI power button, pressed behind metald's back.
    metald_vmm::qemu::qmp::run(std::path::Path::new(&socket), "system_powerdown", None)
        .await
        .expect("QMP answers");
    wait_dead(pid);
    let killed = vmm_pid("killed").expect("adopted");
    kill_process(Pid::from_raw(killed).unwrap(), Signal::KILL).unwrap();
    wait_dead(killed);
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": "off"})).await;
    assert_eq!(state_of(&info), "VM_STATE_SHUTDOWN", "{info}");
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": "killed"})).await;
    assert_eq!(state_of(&info), "VM_STATE_FAILED", "{info}");
    for id in ["off", "killed"] {
        d.ok(T, "DeleteVm", json!({"vm_id": id})).await;
    }
}

/// The row's state in metald's database, read behind metald's back.
fn stored_state(d: &Daemon, id: &str) -> String {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select state from vms where name=?', (sys.argv[2],)).fetchone()[0])",
        ])
        .arg(d.data_dir.join("metald.db"))
        .arg(id)
        .output()
        .expect("python3 sqlite3");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A guest paused or resumed outside metald (through QEMU's own monitor) is
/// reported as it is by the next read, and the reconciler corrects the row
/// when no one reads.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_paused_or_resumed_outside_metald_is_reported_as_it_is() {
    let assets = Assets::load();
    let d = Daemon::start_with(&["--auth-mode", "dev", "--reconcile-interval", "1s"]);
    d.ok(
        T,
        "CreateVm",
        json!({"vm_id": "drift", "config": assets.config()}),
    )
    .await;
    let info = d.ok(T, "BootVm", json!({"vm_id": "drift"})).await;
    assert_eq!(state_of(&info), "VM_STATE_RUNNING");
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": "drift"})).await;
    let socket = std::path::PathBuf::from(info["backendInfo"]["socket"].as_str().unwrap());
    let qmp = |cmd: &'static str| {
        let socket = socket.clone();
        async move {
            metald_vmm::qemu::qmp::run(&socket, cmd, None)
                .await
                .expect("QMP answers")
        }
    };
    qmp("stop").await;
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": "drift"})).await;
    assert_eq!(state_of(&info), "VM_STATE_PAUSED", "the next read tells");
    qmp("cont").await;
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": "drift"})).await;
    assert_eq!(state_of(&info), "VM_STATE_RUNNING");
    // No read now: the reconciler finds the change on its own.
    qmp("stop").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_state(&d, "drift") != "paused" {
        assert!(
            Instant::now() < deadline,
            "the reconciler did not record the pause"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let info = d.ok(T, "ResumeVm", json!({"vm_id": "drift"})).await;
    assert_eq!(
        state_of(&info),
        "VM_STATE_RUNNING",
        "metald drives it again"
    );
    d.ok(T, "DeleteVm", json!({"vm_id": "drift", "force": true}))
        .await;
}
