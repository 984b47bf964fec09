//! metald restarts (SIGTERM or SIGKILL) lose nothing: every row stays, VMs
//! keep running, and each VM's state is reported truthfully afterwards.

use rustix::process::Signal;
use serde_json::json;

use crate::harness::{Assets, Daemon, processes_mentioning, state_of};

fn vmm_pid(id: &str) -> i32 {
    let pids = processes_mentioning(&format!("metald-{id}"));
    assert_eq!(pids.len(), 1, "one VMM for {id}: {pids:?}");
    pids[0]
}

async fn states(d: &Daemon, t: &str) -> Vec<(String, String)> {
    let list = d.ok(t, "ListVms", json!({"page_size": 1000})).await;
    list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["vmId"].as_str().unwrap().to_owned(), state_of(v)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_keep_every_vm_and_report_state_truthfully() {
    let assets = Assets::load();
    let mut d = Daemon::start();
    let t = "dev_customer_restart";
    for id in ["idle", "runner", "sleeper", "stopped", "victim"] {
        d.ok(
            t,
            "CreateVm",
            json!({"vm_id": id, "config": assets.config()}),
        )
        .await;
    }
    for id in ["runner", "sleeper", "stopped", "victim"] {
        d.ok(t, "BootVm", json!({"vm_id": id})).await;
    }
    d.ok(t, "PauseVm", json!({"vm_id": "sleeper"})).await;
    d.ok(t, "ShutdownVm", json!({"vm_id": "stopped", "force": true}))
        .await;
    let runner_pid = vmm_pid("runner");
    let sleeper_pid = vmm_pid("sleeper");
    let before = states(&d, t).await;

    // SIGTERM: metald stops, VMs keep running.
    let status = d.stop(Signal::TERM);
    assert!(
        status.success(),
        "metald exits cleanly on SIGTERM: {status:?}"
    );
    assert_eq!(vmm_pid("runner"), runner_pid, "VMs survive metald");
    d.restart();
    assert_eq!(
        states(&d, t).await,
        before,
        "same rows, same states after SIGTERM restart"
    );
    assert_eq!(vmm_pid("runner"), runner_pid);

    // SIGKILL, and a VMM dies while metald is down.
    d.stop(Signal::KILL);
    let victim = vmm_pid("victim");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(victim).unwrap(),
        Signal::KILL,
    )
    .unwrap();
    d.restart();
    let after: std::collections::HashMap<_, _> = states(&d, t).await.into_iter().collect();
    assert_eq!(after.len(), 5, "no row lost");
    assert_eq!(after["idle"], "VM_STATE_CREATED");
    assert_eq!(after["runner"], "VM_STATE_RUNNING");
    assert_eq!(after["sleeper"], "VM_STATE_PAUSED");
    assert_eq!(after["stopped"], "VM_STATE_SHUTDOWN");
    assert_eq!(
        after["victim"], "VM_STATE_FAILED",
        "a VMM that died while metald was down is not reported running"
    );
    assert_eq!(
        vmm_pid("runner"),
        runner_pid,
        "the same process was adopted"
    );
    assert_eq!(vmm_pid("sleeper"), sleeper_pid);

    // The adopted VMs are fully controllable by the new metald.
    assert_eq!(
        state_of(&d.ok(t, "PauseVm", json!({"vm_id": "runner"})).await),
        "VM_STATE_PAUSED"
    );
    assert_eq!(
        state_of(&d.ok(t, "ResumeVm", json!({"vm_id": "runner"})).await),
        "VM_STATE_RUNNING"
    );
    assert_eq!(
        state_of(&d.ok(t, "ResumeVm", json!({"vm_id": "sleeper"})).await),
        "VM_STATE_RUNNING"
    );
    for id in ["idle", "runner", "sleeper", "stopped", "victim"] {
        d.ok(t, "DeleteVm", json!({"vm_id": id, "force": true}))
            .await;
    }
    assert!(d.vmm_pids().is_empty(), "no VMM left after deleting all");
}
