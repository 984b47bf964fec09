//! Every plan, killed before each of its steps in turn (an injected crash
//! point: the service stops there and writes nothing more), then a fresh
//! service over the same database file starts up: the plan is finished
//! (or, for a create that failed, undone) with nothing leaked (no VMM
//! process, lease or interface no row accounts for) and the row truthful.
//!
//! Each "metald" runs on a runtime of its own, dropped at the crash, so
//! none of its tasks (exit watchers) outlives it, as in a real kill.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use metald_core::assets::AssetPolicy;
use metald_core::net::{NicAttachment, NicInput, NicSpec};
use metald_core::plan::Plan;
use metald_core::ports::{Network, NetworkError, Store, Subnets, VmRecord};
use metald_core::service::{Ports, ServiceConfig};
use metald_core::vm::VmSpecInput;
use metald_core::{CustomerId, Mac, VmId, VmService, VmSpec, VmState};
use metald_store::SqliteStore;

#[path = "service/fake.rs"]
mod fake;
use fake::FakeVmm;

/// Host networking that keeps its devices in a set; attach fails while
/// `refuse` is set.
#[derive(Default)]
struct SetNet {
    attached: Mutex<HashSet<(String, usize)>>,
    refuse: Mutex<bool>,
}

#[async_trait]
impl Network for SetNet {
    fn subnets(&self) -> Subnets {
        Subnets {
            v4: ("10.9.0.0".parse().unwrap(), 24, "10.9.0.1".parse().unwrap()),
            v6: ("fd09::".parse().unwrap(), 64, "fd09::1".parse().unwrap()),
        }
    }
    fn mac_for(&self, _vm: &VmId, index: usize) -> Mac {
        Mac::local([2, 0, 0, 0, 0, index as u8])
    }
    async fn attach(
        &self,
        vm: &VmId,
        _customer: &CustomerId,
        index: usize,
        _nic: &NicSpec,
        mac: Mac,
    ) -> Result<NicAttachment, NetworkError> {
        if *self.refuse.lock().unwrap() {
            return Err(NetworkError::Io("bridge is gone".into()));
        }
        self.attached
            .lock()
            .unwrap()
            .insert((vm.to_string(), index));
        Ok(NicAttachment {
            mac,
            ipv4: None,
            gateway4: None,
            ipv6: None,
            gateway6: None,
            netns: format!("ns-{vm}"),
            tap: "tap0".into(),
            host_veth: format!("veth-{vm}"),
            cmdline: true,
        })
    }
    async fn detach(&self, vm: &VmId, index: usize) -> Result<(), NetworkError> {
        self.attached
            .lock()
            .unwrap()
            .remove(&(vm.to_string(), index));
        Ok(())
    }
    async fn scan(&self) -> Result<Vec<(VmId, usize)>, NetworkError> {
        let a = self.attached.lock().unwrap();
        Ok(a.iter()
            .map(|(v, i)| (VmId::parse(v, "vm").unwrap(), *i))
            .collect())
    }
}

/// What outlives a metald: the database file, the VMM processes, the
/// network devices.
struct Host {
    dir: tempfile::TempDir,
    vmm: Arc<FakeVmm>,
    net: Arc<SetNet>,
}

fn me() -> CustomerId {
    CustomerId::parse("acme").unwrap()
}

fn name() -> VmId {
    VmId::parse("web-1", "vm_id").unwrap()
}

fn spec(root: &Path) -> VmSpec {
    VmSpec::new(VmSpecInput {
        vcpu_count: 1,
        memory_bytes: 128 << 20,
        kernel_path: root.join("vmlinux").to_string_lossy().into_owned(),
        network: vec![NicInput {
            id: "eth0".into(),
            mode: 2,
            ..Default::default()
        }],
        ..Default::default()
    })
    .unwrap()
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"k").unwrap();
        Host {
            dir,
            vmm: Arc::default(),
            net: Arc::default(),
        }
    }

    /// A metald starting on this host: the store opened anew.
    async fn metald(&self) -> (Arc<SqliteStore>, VmService) {
        let store = Arc::new(
            SqliteStore::open(&self.dir.path().join("metald.db"))
                .await
                .unwrap(),
        );
        let config = ServiceConfig {
            assets: AssetPolicy::new(&[self.dir.path().display().to_string()], &[]).unwrap(),
            ..ServiceConfig::default()
        };
        let svc = VmService::new(
            Ports {
                network: Some(self.net.clone()),
                ..Ports::new(store.clone(), self.vmm.clone())
            },
            config,
        );
        (store, svc)
    }

    /// Runs `f` in a metald of its own, then kills that metald.
    fn run<F, Fut>(&self, f: F)
    where
        F: FnOnce(VmService) -> Fut,
        Fut: Future<Output = ()>,
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (_store, svc) = self.metald().await;
            f(svc).await;
        });
        drop(rt);
    }
}

/// Brings the VM to where `plan` starts, then runs it with a crash before
/// step `step`.
async fn crash_in(svc: VmService, host: &Host, plan: Plan, step: usize) {
    let caller = me();
    let create = || svc.create(&caller, Some(name()), "", spec(host.dir.path()));
    if plan != Plan::Create && plan != Plan::Cleanup {
        create().await.unwrap();
    }
    if matches!(plan, Plan::Reboot | Plan::Shutdown | Plan::Delete) {
        svc.boot(&me(), &name()).await.unwrap();
    }
    if plan == Plan::Cleanup {
        *host.net.refuse.lock().unwrap() = true;
    }
    svc.crash_before(plan, step);
    let crashed = match plan {
        Plan::Create | Plan::Cleanup => create().await.map(drop),
        Plan::Boot => svc.boot(&me(), &name()).await.map(drop),
        Plan::Reboot => svc.reboot(&me(), &name()).await.map(drop),
        Plan::Shutdown => svc.shutdown(&me(), &name(), false, None).await.map(drop),
        Plan::Delete => svc.delete(&me(), &name(), false).await,
    };
    let e = crashed.expect_err(&format!("{plan}@{step}: the crash point was reached"));
    assert!(e.to_string().contains("crash point"), "{plan}@{step}: {e}");
    *host.net.refuse.lock().unwrap() = false;
}

/// What the host holds for `vm`, if its row exists.
fn assert_truthful(host: &Host, plan: Plan, step: usize, vm: Option<VmRecord>, leases: usize) {
    let at = format!("{plan} killed before step {step}");
    let alive: HashSet<i32> = host.vmm.st().alive.clone();
    let attached = host.net.attached.lock().unwrap().len();
    let Some(vm) = vm else {
        assert_eq!(plan.ends_in(), None, "{at}: the row is gone");
        assert!(alive.is_empty(), "{at}: leaked VMMs {alive:?}");
        assert_eq!((attached, leases), (0, 0), "{at}: leaked network");
        return;
    };
    assert_eq!(Some(vm.state), plan.ends_in(), "{at}");
    assert_eq!(vm.plan, None, "{at}: the plan is finished");
    let want: HashSet<i32> = vm.runtime.iter().map(|r| r.pid).collect();
    assert_eq!(alive, want, "{at}: exactly the recorded VMM runs");
    assert_eq!(vm.state.has_process(), vm.runtime.is_some(), "{at}");
    assert!(
        vm.spec.nics().iter().all(|n| n.attachment.is_some()),
        "{at}: the interface is recorded"
    );
    assert_eq!((attached, leases), (1, 1), "{at}: one interface, one lease");
}

#[test]
fn every_plan_killed_before_every_step_is_finished_on_the_next_start() {
    for plan in Plan::ALL {
        // A plan that removes the row ends with that removal: there is no
        // write after its last step to be killed before.
        let last = plan.steps().len() - usize::from(plan.removes_row());
        for step in 0..=last {
            let host = Host::new();
            // Exits are told only to the metald that is killed: the next
            // one must find them itself, as after a real crash.
            host.vmm.st().quiet = true;
            host.run(|svc| crash_in(svc, &host, plan, step));
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let (store, svc) = host.metald().await;
                let report = svc.recover().await.unwrap();
                assert_eq!(report.unsettled, 0, "{plan}@{step}: {report:?}");
                let vm = store.find(&me(), &name()).await.unwrap();
                let leases = store.leases().await.unwrap().len();
                assert_truthful(&host, plan, step, vm, leases);
                // Nothing is left for the reconciler either.
                let r = svc.reconcile(true).await.unwrap();
                assert_eq!(r, Default::default(), "{plan}@{step}");
            });
        }
    }
}

#[test]
fn a_create_whose_wiring_fails_is_undone_at_once() {
    let host = Host::new();
    *host.net.refuse.lock().unwrap() = true;
    let root = host.dir.path().to_owned();
    host.run(|svc| async move {
        let e = svc
            .create(&me(), Some(name()), "", spec(&root))
            .await
            .unwrap_err();
        assert!(matches!(e, metald_core::Error::Backend(_)), "{e:?}");
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (store, _svc) = host.metald().await;
        assert!(store.find(&me(), &name()).await.unwrap().is_none());
        assert!(store.leases().await.unwrap().is_empty());
    });
    assert!(host.net.attached.lock().unwrap().is_empty());
}

#[test]
fn a_boot_resumed_after_a_restart_checks_the_files_again() {
    let host = Host::new();
    host.run(|svc| crash_in(svc, &host, Plan::Boot, 0));
    // The kernel goes away while metald is down.
    std::fs::remove_file(host.dir.path().join("vmlinux")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (store, svc) = host.metald().await;
        svc.recover().await.unwrap();
        let vm = store.find(&me(), &name()).await.unwrap().unwrap();
        assert_eq!(
            (vm.state, vm.plan, vm.runtime),
            (VmState::Created, None, None)
        );
        assert!(vm.last_error.unwrap().contains("boot failed"));
    });
    assert!(host.vmm.st().alive.is_empty(), "no VMM was started");
}

/// BootVm's last write (the VM running, its VMM's runtime) is not fsynced:
/// a power cut may lose it, and it ends the VMM too. The next metald then
/// finds the row as the boot plan left it (its progress writes are not
/// fsynced either, so at any step), with no VMM, and must still end
/// truthful: the VM booted again, exactly one VMM, its interface and lease.
/// (Host interfaces lost with the power are made again at start-up by the
/// network's own restore, not by the plan; this fake keeps them.)
#[test]
fn a_boot_whose_last_write_a_power_cut_lost_is_finished_with_a_new_vmm() {
    let plan = Plan::Boot;
    for step in 0..=plan.steps().len() {
        let host = Host::new();
        host.vmm.st().quiet = true;
        host.run(|svc| crash_in(svc, &host, plan, step));
        // The power cut: every VMM is gone.
        host.vmm.st().alive.clear();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (store, svc) = host.metald().await;
            let report = svc.recover().await.unwrap();
            assert_eq!(report.unsettled, 0, "{plan}@{step}: {report:?}");
            let vm = store.find(&me(), &name()).await.unwrap();
            let leases = store.leases().await.unwrap().len();
            assert_truthful(&host, plan, step, vm, leases);
            let r = svc.reconcile(true).await.unwrap();
            assert_eq!(r, Default::default(), "{plan}@{step}");
        });
    }
}
