//! The service layer against the real SQLite store and a fake VMM (the only
//! place metald uses a fake backend): interrupted operations, the
//! reconciler's age guard and locks, truthful reads, per-VM serialisation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use metald_core::assets::AssetPolicy;
use metald_core::net::{NicAttachment, NicInput, NicSpec};
use metald_core::plan::{Plan, PlanRecord};
use metald_core::ports::{
    GuestStatus, HostResources, Network, NetworkError, Store, Subnets, VmRecord, VmmExit,
};
use metald_core::service::{Ports, ServiceConfig};
use metald_core::vm::VmSpecInput;
use metald_core::{CustomerId, Error, Mac, VmId, VmService, VmSpec, VmState};
use metald_store::SqliteStore;

#[path = "service/fake.rs"]
mod fake;
use fake::FakeVmm;

#[path = "service/vmm_errors.rs"]
mod vmm_errors;

struct World {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    vmm: Arc<FakeVmm>,
    svc: VmService,
    spec: VmSpec,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"k").unwrap();
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("metald.db"))
            .await
            .unwrap(),
    );
    let vmm = Arc::new(FakeVmm::default());
    let svc = VmService::new(Ports::new(store.clone(), vmm.clone()), config(dir.path()));
    let spec = VmSpec::new(VmSpecInput {
        vcpu_count: 1,
        memory_bytes: 128 << 20,
        kernel_path: kernel.to_string_lossy().into_owned(),
        ..Default::default()
    })
    .unwrap();
    World {
        _dir: dir,
        store,
        vmm,
        svc,
        spec,
    }
}

/// The service's configuration with `root` as the one (shared) asset root.
fn config(root: &std::path::Path) -> ServiceConfig {
    ServiceConfig {
        assets: AssetPolicy::new(&[root.display().to_string()], &[]).unwrap(),
        ..ServiceConfig::default()
    }
}

fn id(s: &str) -> VmId {
    VmId::parse(s, "vm_id").unwrap()
}

fn me() -> CustomerId {
    CustomerId::parse("acme").unwrap()
}

fn row(w: &World, name: &str, state: VmState, pid: Option<i32>, plan: Option<Plan>) -> VmRecord {
    VmRecord {
        id: id(name),
        name: id(name),
        customer: me(),
        spec: w.spec.clone(),
        state,
        runtime: pid.map(FakeVmm::rt),
        last_error: None,
        plan: plan.map(PlanRecord::start),
        created_at: 0,
        modified_at: 0,
    }
}

#[tokio::test]
async fn start_up_finishes_interrupted_plans_and_adopts_the_rest() {
    let w = world().await;
    let (alive_a, alive_b, alive_c) = (w.vmm.spawn(), w.vmm.spawn(), w.vmm.spawn());
    for r in [
        row(
            &w,
            "deleting",
            VmState::Running,
            Some(alive_a),
            Some(Plan::Delete),
        ),
        row(&w, "booting", VmState::Created, None, Some(Plan::Boot)),
        row(
            &w,
            "stopping",
            VmState::Running,
            Some(alive_b),
            Some(Plan::Shutdown),
        ),
        row(&w, "lost", VmState::Running, Some(4242), None),
        row(&w, "kept", VmState::Paused, Some(alive_c), None),
    ] {
        w.store.insert(&r).await.unwrap();
    }
    let report = w.svc.recover().await.unwrap();
    assert_eq!(
        (report.adopted, report.failed, report.finished),
        (1, 1, 3),
        "{report:?}"
    );
    assert!(
        w.store.get(&id("deleting")).await.unwrap().is_none(),
        "interrupted delete finished"
    );
    let booting = w.store.get(&id("booting")).await.unwrap().unwrap();
    assert_eq!(
        (booting.state, booting.plan),
        (VmState::Running, None),
        "interrupted boot finished"
    );
    let pid = booting.runtime.unwrap().pid;
    assert!(w.vmm.st().alive.contains(&pid));
    assert_eq!(
        w.store.get(&id("stopping")).await.unwrap().unwrap().state,
        VmState::Shutdown
    );
    let lost = w.store.get(&id("lost")).await.unwrap().unwrap();
    assert_eq!((lost.state, lost.runtime), (VmState::Failed, None));
    let kept = w.store.get(&id("kept")).await.unwrap().unwrap();
    assert_eq!(kept.state, VmState::Running, "state taken from the VMM");
    let destroyed = w.vmm.st().destroyed.clone();
    for name in ["deleting", "booting", "lost"] {
        assert!(
            destroyed.contains(&name.to_string()),
            "{name} cleaned: {destroyed:?}"
        );
    }
    assert!(!destroyed.contains(&"kept".to_string()));
}

#[tokio::test]
async fn periodic_reconcile_acts_only_on_a_second_sighting_and_never_on_claimed_processes() {
    let w = world().await;
    let claimed = w.vmm.spawn();
    w.store
        .insert(&row(&w, "real", VmState::Running, Some(claimed), None))
        .await
        .unwrap();
    w.vmm.st().scan = HostResources {
        processes: vec![
            (id("ghost"), 777, 1),
            (id("real"), claimed, 1),
            (id("real"), 778, 1),
        ],
        dirs: vec![id("ghost"), id("real")],
    };
    let first = w.svc.reconcile(false).await.unwrap();
    assert_eq!(
        (first.orphan_processes, first.orphan_dirs),
        (0, 0),
        "first sighting only noted"
    );
    assert!(w.vmm.st().killed.is_empty());
    let second = w.svc.reconcile(false).await.unwrap();
    assert_eq!(
        (second.orphan_processes, second.orphan_dirs),
        (2, 1),
        "{second:?}"
    );
    let killed = w.vmm.st().killed.clone();
    assert_eq!(
        killed,
        vec![777, 778],
        "the unclaimed ones, never the recorded VMM"
    );
    assert_eq!(
        w.vmm.st().destroyed,
        vec!["ghost".to_string()],
        "only the directory no row claims"
    );
}

#[tokio::test]
async fn reads_are_truthful_even_before_the_exit_watcher_writes() {
    let w = world().await;
    w.svc
        .create(&me(), Some(id("a")), "", w.spec.clone())
        .await
        .unwrap();
    let pid = w
        .svc
        .boot(&me(), &id("a"))
        .await
        .unwrap()
        .runtime
        .unwrap()
        .pid;
    // The process dies and nothing tells the watcher.
    w.vmm.die(pid, None);
    let d = w.svc.get(&me(), &id("a")).await.unwrap();
    assert_eq!(d.record.state, VmState::Failed);
    assert!(
        d.backend_info["last_error"].contains("VMM"),
        "{:?}",
        d.backend_info
    );
    // With an exit status, the reason is recorded.
    let pid = w
        .svc
        .boot(&me(), &id("a"))
        .await
        .unwrap()
        .runtime
        .unwrap()
        .pid;
    w.vmm.die(
        pid,
        Some(VmmExit {
            code: None,
            signal: Some(9),
        }),
    );
    let d = w.svc.get(&me(), &id("a")).await.unwrap();
    assert_eq!(d.record.state, VmState::Failed);
    assert!(
        d.backend_info["last_error"].contains("signal 9"),
        "{:?}",
        d.backend_info
    );
    // Pause of a dead VM is refused by the state machine, not the backend.
    let pid = w
        .svc
        .boot(&me(), &id("a"))
        .await
        .unwrap()
        .runtime
        .unwrap()
        .pid;
    w.vmm.die(pid, None);
    assert!(matches!(
        w.svc.pause(&me(), &id("a")).await,
        Err(Error::IllegalTransition { .. })
    ));
}

#[tokio::test]
async fn a_refused_boot_keeps_the_vm_and_clears_the_pending_mark() {
    let w = world().await;
    w.svc
        .create(&me(), Some(id("refused")), "", w.spec.clone())
        .await
        .unwrap();
    let err = w.svc.boot(&me(), &id("refused")).await.unwrap_err();
    assert!(err.to_string().contains("refused the config"), "{err}");
    let r = w.store.find(&me(), &id("refused")).await.unwrap().unwrap();
    assert_eq!((r.state, r.plan, r.runtime), (VmState::Created, None, None));
    assert!(r.last_error.unwrap().contains("boot failed"));
    let other = CustomerId::parse("globex").unwrap();
    assert!(
        matches!(
            w.svc.get(&other, &id("refused")).await,
            Err(Error::NotFound(_))
        ),
        "another tenant sees nothing"
    );
}

#[tokio::test]
async fn one_vm_waits_for_its_own_operations_while_others_proceed() {
    let w = world().await;
    w.svc
        .create(&me(), Some(id("slow")), "", w.spec.clone())
        .await
        .unwrap();
    w.svc
        .create(&me(), Some(id("fast")), "", w.spec.clone())
        .await
        .unwrap();
    let svc = w.svc.clone();
    let slow_boot = tokio::spawn(async move { svc.boot(&me(), &id("slow")).await });
    tokio::task::yield_now().await;
    // Another VM is not held up by the slow one.
    let fast = tokio::time::timeout(Duration::from_secs(5), w.svc.boot(&me(), &id("fast"))).await;
    assert_eq!(fast.expect("not blocked").unwrap().state, VmState::Running);
    // The slow VM's next operation waits for its boot.
    let svc = w.svc.clone();
    let mut pause = tokio::spawn(async move { svc.pause(&me(), &id("slow")).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut pause)
            .await
            .is_err(),
        "pause waits for the boot"
    );
    // The reconciler leaves a VM alone while an operation holds it.
    let slow_key = w.store.find(&me(), &id("slow")).await.unwrap().unwrap().id;
    w.vmm.st().scan = HostResources {
        processes: vec![(slow_key, 999, 1)],
        dirs: vec![],
    };
    let r = w.svc.reconcile(true).await.unwrap();
    assert_eq!(r.orphan_processes, 0, "a boot in progress is never raced");
    w.vmm.gate.notify_one();
    assert_eq!(slow_boot.await.unwrap().unwrap().state, VmState::Running);
    assert_eq!(pause.await.unwrap().unwrap().state, VmState::Paused);
}

#[tokio::test]
async fn a_lock_outlives_a_delete_while_anyone_waits_on_it() {
    let w = world().await;
    w.vmm.st().quiet = true;
    let spec = w.spec.clone();
    let key = w.svc.create(&me(), Some(id("stuck")), "", spec).await;
    let key = key.unwrap().id;
    w.svc.boot(&me(), &id("stuck")).await.unwrap();
    // The delete holds the VM's lock (it is inside the VMM) ...
    let svc = w.svc.clone();
    let delete = tokio::spawn(async move { svc.delete(&me(), &id("stuck"), true).await });
    w.vmm.entered.notified().await;
    // ... while another operation waits on it.
    let waiting = w.svc.lock_vm(&key);
    w.vmm.gate.notify_one();
    delete.await.unwrap().unwrap();
    let held = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter gets the lock once the delete is done");
    // The reconciler would remove the deleted VM's files, but only while
    // no one holds its lock: the waiter's lock is the one it must take.
    w.vmm.st().scan = HostResources {
        processes: vec![],
        dirs: vec![key.clone()],
    };
    let r = w.svc.reconcile(true).await.unwrap();
    assert_eq!(
        r.orphan_dirs, 0,
        "nothing acts on the VM alongside the waiter"
    );
    drop(held);
    let r = w.svc.reconcile(true).await.unwrap();
    assert_eq!(r.orphan_dirs, 1, "after the waiter, the reconciler acts");
    assert_eq!(w.svc.lock_entries(), 0, "no lock outlives its users");
}

#[tokio::test]
async fn locks_are_kept_only_while_used() {
    let w = world().await;
    w.vmm.st().quiet = true;
    let mut keys = Vec::new();
    for i in 0..20 {
        let name = id(&format!("vm{i}"));
        let vm = w
            .svc
            .create(&me(), Some(name.clone()), "", w.spec.clone())
            .await;
        keys.push(vm.unwrap().id);
        w.svc.boot(&me(), &name).await.unwrap();
        w.svc.get(&me(), &name).await.unwrap();
        w.svc.delete(&me(), &name, true).await.unwrap();
    }
    // Leftovers of every deleted VM are seen once (the age guard keeps
    // the reconciler from acting yet): seeing a key keeps no lock either.
    w.vmm.st().scan = HostResources {
        processes: keys.iter().map(|k| (k.clone(), 999, 1)).collect(),
        dirs: keys.clone(),
    };
    let r = w.svc.reconcile(false).await.unwrap();
    assert_eq!((r.orphan_processes, r.orphan_dirs), (0, 0));
    // The exit watcher of a deleted VM's VMM takes that VM's lock once,
    // after the delete returned, and lets it go when it finds no row: the
    // map must be empty once those tasks ran (bounded: a kept lock fails).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while w.svc.lock_entries() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert_eq!(
        w.svc.lock_entries(),
        0,
        "the lock map holds no VM no one uses"
    );
}

/// A network whose attach always fails and whose detach fails `fail` times
/// first: a create that cannot undo its own wiring.
struct FlakyNet {
    fail: Mutex<u32>,
    detached: Mutex<Vec<String>>,
}

#[async_trait]
impl Network for FlakyNet {
    fn subnets(&self) -> Subnets {
        Subnets {
            v4: ("10.9.0.0".parse().unwrap(), 24, "10.9.0.1".parse().unwrap()),
            v6: ("fd09::".parse().unwrap(), 64, "fd09::1".parse().unwrap()),
        }
    }
    fn mac_for(&self, _vm: &VmId, _index: usize) -> Mac {
        Mac::local([2, 0, 0, 0, 0, 1])
    }
    async fn attach(
        &self,
        _vm: &VmId,
        _customer: &CustomerId,
        _index: usize,
        _nic: &NicSpec,
        _mac: Mac,
    ) -> Result<NicAttachment, NetworkError> {
        Err(NetworkError::Io("bridge is gone".into()))
    }
    async fn detach(&self, vm: &VmId, _index: usize) -> Result<(), NetworkError> {
        let mut fail = self.fail.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            return Err(NetworkError::Io("netlink busy".into()));
        }
        self.detached.lock().unwrap().push(vm.to_string());
        Ok(())
    }
    async fn scan(&self) -> Result<Vec<(VmId, usize)>, NetworkError> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn a_create_that_could_not_undo_itself_is_undone_by_the_periodic_reconciler() {
    let w = world().await;
    let net = Arc::new(FlakyNet {
        fail: Mutex::new(2),
        detached: Mutex::new(Vec::new()),
    });
    let svc = VmService::new(
        Ports {
            network: Some(net.clone()),
            ..Ports::new(w.store.clone(), w.vmm.clone())
        },
        config(w.spec.kernel().parent().unwrap()),
    );
    let spec = VmSpec::new(VmSpecInput {
        vcpu_count: 1,
        memory_bytes: 128 << 20,
        kernel_path: w.spec.kernel().to_string_lossy().into_owned(),
        network: vec![NicInput {
            id: "eth0".into(),
            mode: 2,
            ..Default::default()
        }],
        ..Default::default()
    })
    .unwrap();
    let e = svc
        .create(&me(), Some(id("wired")), "", spec)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Backend(_)), "{e:?}");
    // The undo's detach failed: the row and its lease stay, marked.
    let row = w.store.find(&me(), &id("wired")).await.unwrap().unwrap();
    assert_eq!(row.plan.map(|p| p.plan), Some(Plan::Cleanup));
    assert!(!w.store.leases().await.unwrap().is_empty());

    // Detach still fails on the first pass: the row waits for the next.
    let report = svc.reconcile(false).await.unwrap();
    assert_eq!(report.abandoned_creates, 0);
    assert!(w.store.find(&me(), &id("wired")).await.unwrap().is_some());
    let report = svc.reconcile(false).await.unwrap();
    assert_eq!(report.abandoned_creates, 1);
    assert!(w.store.find(&me(), &id("wired")).await.unwrap().is_none());
    assert!(w.store.leases().await.unwrap().is_empty(), "lease released");
    let detached = net.detached.lock().unwrap().clone();
    assert!(
        matches!(&detached[..], [one] if one.starts_with("wired-")),
        "{detached:?}"
    );
}

#[tokio::test]
async fn a_vm_that_cannot_be_settled_does_not_stop_start_up_and_is_retried() {
    let w = world().await;
    let (alive_a, alive_b) = (w.vmm.spawn(), w.vmm.spawn());
    for r in [
        row(
            &w,
            "wedged-delete",
            VmState::Running,
            Some(alive_a),
            Some(Plan::Delete),
        ),
        // Its VMM is gone, and cleaning up after it fails.
        row(&w, "wedged-lost", VmState::Running, Some(4242), None),
        row(&w, "fine", VmState::Running, Some(alive_b), None),
    ] {
        w.store.insert(&r).await.unwrap();
    }
    w.vmm.st().fail_destroy = vec!["wedged-".into()];
    let report = w.svc.recover().await.expect("start-up goes on");
    assert_eq!((report.adopted, report.unsettled), (1, 2), "{report:?}");
    for name in ["wedged-delete", "wedged-lost"] {
        let r = w.store.get(&id(name)).await.unwrap().unwrap();
        assert_eq!(r.state, VmState::Failed, "{name}");
        assert!(
            r.last_error.unwrap_or_default().contains("retried"),
            "{name}: the reason says what happens next"
        );
    }
    assert_eq!(
        w.store
            .get(&id("wedged-delete"))
            .await
            .unwrap()
            .unwrap()
            .plan
            .map(|p| p.plan),
        Some(Plan::Delete),
        "the delete is still owed"
    );
    assert_eq!(
        w.store.get(&id("fine")).await.unwrap().unwrap().state,
        VmState::Running
    );
    // Still failing: the pass goes on and the VM waits for the next.
    let r = w.svc.reconcile(false).await.unwrap();
    assert_eq!(r.settled, 0);
    // Once the host lets go, the periodic reconciler finishes the delete.
    w.vmm.st().fail_destroy.clear();
    let r = w.svc.reconcile(false).await.unwrap();
    assert_eq!(r.settled, 1, "{r:?}");
    assert!(w.store.get(&id("wedged-delete")).await.unwrap().is_none());
}

#[tokio::test]
async fn a_guest_paused_resumed_or_halted_outside_metald_is_reported_and_corrected() {
    let w = world().await;
    let mut pids = Vec::new();
    for name in ["a", "b"] {
        w.svc
            .create(&me(), Some(id(name)), "", w.spec.clone())
            .await
            .unwrap();
        let vm = w.svc.boot(&me(), &id(name)).await.unwrap();
        pids.push(vm.runtime.unwrap().pid);
    }
    let state = |name: &'static str| {
        let svc = w.svc.clone();
        async move { svc.get(&me(), &id(name)).await.unwrap().record.state }
    };
    // A VMM that does not answer leaves the row as it is.
    assert_eq!(state("a").await, VmState::Running);
    w.vmm.st().status.insert(pids[0], GuestStatus::Paused);
    assert_eq!(state("a").await, VmState::Paused, "paused outside metald");
    w.vmm.st().status.insert(pids[0], GuestStatus::Running);
    assert_eq!(state("a").await, VmState::Running, "resumed outside metald");
    w.vmm.st().status.insert(pids[0], GuestStatus::Halted);
    let d = w.svc.get(&me(), &id("a")).await.unwrap();
    assert_eq!((d.record.state, d.record.runtime), (VmState::Failed, None));
    assert!(
        !w.vmm.st().alive.contains(&pids[0]),
        "the halted guest's VMM is stopped"
    );
    // The reconciler corrects a row no one reads.
    w.vmm.st().status.insert(pids[1], GuestStatus::Paused);
    let r = w.svc.reconcile(false).await.unwrap();
    assert_eq!(r.drifted, 1, "{r:?}");
    let b = w.store.find(&me(), &id("b")).await.unwrap().unwrap();
    assert_eq!(b.state, VmState::Paused);
    let r = w.svc.reconcile(false).await.unwrap();
    assert_eq!(r.drifted, 0, "nothing left to correct");
}
