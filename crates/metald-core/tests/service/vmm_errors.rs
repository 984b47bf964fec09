//! How the service answers a pause, resume or reboot the VMM failed, by the kind
//! of failure the backend reported ([`VmmError`]), in the service suite: a
//! VMM that is gone is recorded as exited, one that refused is the
//! caller's precondition, anything else is metald's.

use metald_core::ports::{Store, VmmError};

use super::*;

/// A service with one VM, `a`, booted; and the pid of its VMM.
async fn booted() -> (World, i32) {
    let w = world().await;
    w.svc
        .create(&me(), Some(id("a")), "", w.spec.clone())
        .await
        .unwrap();
    let booted = w.svc.boot(&me(), &id("a")).await.unwrap();
    let pid = booted.runtime.unwrap().pid;
    (w, pid)
}

async fn stored(w: &World) -> metald_core::ports::VmRecord {
    w.store
        .find(&me(), &id("a"))
        .await
        .unwrap()
        .expect("the row")
}

#[tokio::test]
async fn a_pause_on_a_vmm_gone_from_its_socket_records_the_exit() {
    let (w, pid) = booted().await;
    // The process still runs, but nothing answers on its control socket.
    let gone = VmmError::Gone("QMP stop: cannot connect to the VMM's QMP socket".into());
    w.vmm.st().call_fails.insert(pid, gone);
    let e = w.svc.pause(&me(), &id("a")).await.unwrap_err();
    // The state machine answers (the API's failed_precondition), naming the
    // state the exit left, not a bare backend error (internal).
    match &e {
        Error::IllegalTransition { op, state, .. } => {
            assert_eq!((*op, *state), ("pause", VmState::Failed), "{e}");
        }
        other => panic!("expected an illegal transition, got {other:?}"),
    }
    let vm = stored(&w).await;
    assert_eq!(vm.state, VmState::Failed);
    assert_eq!(vm.runtime, None, "no VMM is recorded any more");
    assert!(vm.plan.is_none());
    let why = vm.last_error.unwrap_or_default();
    assert!(why.contains("stopped answering"), "{why}");
    assert!(
        !w.vmm.st().alive.contains(&pid),
        "the unreachable VMM was stopped"
    );
}

#[tokio::test]
async fn a_resume_the_vmm_refused_is_the_callers_precondition() {
    let (w, pid) = booted().await;
    w.svc.pause(&me(), &id("a")).await.unwrap();
    let refused = VmmError::Refused("QMP cont: guest is in state /var/lib/x".into());
    w.vmm.st().call_fails.insert(pid, refused);
    let e = w.svc.resume(&me(), &id("a")).await.unwrap_err();
    match &e {
        Error::FailedPrecondition(m) => {
            assert!(m.contains("the VMM refused to resume the guest"), "{m}");
            assert!(m.contains("error id"), "{m}");
            assert!(!m.contains("/var/lib"), "no host path: {m}");
        }
        other => panic!("expected a failed precondition, got {other:?}"),
    }
    let vm = stored(&w).await;
    assert_eq!(vm.state, VmState::Paused, "the VM is as it was");
    assert_eq!(vm.runtime.map(|r| r.pid), Some(pid));
}

#[tokio::test]
async fn a_pause_the_vmm_did_not_answer_in_time_is_metalds_error() {
    let (w, pid) = booted().await;
    let slow = VmmError::Timeout("QMP stop: no answer within 10s".into());
    w.vmm.st().call_fails.insert(pid, slow);
    let e = w.svc.pause(&me(), &id("a")).await.unwrap_err();
    assert!(matches!(e, Error::Backend(_)), "{e:?}");
    let vm = stored(&w).await;
    assert_eq!(
        vm.state,
        VmState::Running,
        "a slow VMM is not declared dead"
    );
    assert!(w.vmm.st().alive.contains(&pid));
}

#[tokio::test]
async fn a_reboot_whose_vmm_vanished_mid_reset_runs_the_guest_in_a_new_vmm() {
    let (w, pid) = booted().await;
    let gone = VmmError::Gone("QMP system_reset: cannot connect to the VMM's QMP socket".into());
    w.vmm.st().call_fails.insert(pid, gone);
    let vm = w
        .svc
        .reboot(&me(), &id("a"))
        .await
        .expect("the reboot goes on");
    let new_pid = vm.runtime.as_ref().expect("a VMM runs").pid;
    assert_ne!(new_pid, pid, "a new VMM");
    assert_eq!(vm.state, VmState::Running);
    let row = stored(&w).await;
    assert_eq!(
        (row.state, row.runtime.map(|r| r.pid)),
        (VmState::Running, Some(new_pid))
    );
    assert!(row.plan.is_none(), "the reboot plan ended");
    assert!(!w.vmm.st().alive.contains(&pid), "the old VMM is gone");
    assert!(w.vmm.st().alive.contains(&new_pid));
}

#[tokio::test]
async fn a_reboot_the_vmm_refused_is_the_callers_precondition_and_keeps_the_vm() {
    let (w, pid) = booted().await;
    w.vmm
        .st()
        .call_fails
        .insert(pid, VmmError::Refused("QMP system_reset: not now".into()));
    let e = w.svc.reboot(&me(), &id("a")).await.unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    assert!(w.vmm.st().alive.contains(&pid), "the VMM was left running");
}
