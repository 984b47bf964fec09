//! The use cases behind every RPC: ownership, the lifecycle transition
//! check, and the order of store writes and backend calls.
//!
//! Rules that hold for every operation:
//! - A caller only ever sees its own VMs; another customer's VM answers
//!   exactly like a missing one ([`Error::NotFound`]).
//! - Operations on one VM are serialised by a per-VM lock; different VMs
//!   proceed in parallel, so a slow VMM never holds up other VMs.
//! - The store is written before a side effect can outlive a crash and
//!   after each step, so a restarted metald finds every VMM it started.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::ports::{
    GuestStatus, StopMode, Store, StoreError, VmPage, VmRecord, Vmm, VmmExit, VmmRuntime,
};
use crate::state::{self, Op, Outcome, VmState};
use crate::vm::{CustomerId, VmId, VmSpec};

/// Page size when a ListVms request gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page ListVms returns; larger requests are reduced to it.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Tunables of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// How long a graceful shutdown waits for the guest before killing it,
    /// when the request gives no `timeout_seconds`.
    pub default_shutdown_timeout: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            default_shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// A VM as GetVmInfo shows it.
#[derive(Debug, Clone)]
pub struct VmDetails {
    pub record: VmRecord,
    pub backend_info: BTreeMap<String, String>,
}

/// The VM lifecycle service. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct VmService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    vmm: Arc<dyn Vmm>,
    config: ServiceConfig,
    locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn store_err(e: StoreError) -> Error {
    Error::Store(e.to_string())
}

impl VmService {
    /// Builds the service over a store and a backend.
    pub fn new(store: Arc<dyn Store>, vmm: Arc<dyn Vmm>, config: ServiceConfig) -> Self {
        VmService {
            inner: Arc::new(Inner {
                store,
                vmm,
                config,
                locks: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The backend's name, for logs and health output.
    pub fn backend_name(&self) -> &'static str {
        self.inner.vmm.name()
    }

    fn lock_for(&self, id: &VmId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.clone()).or_default().clone()
    }

    fn forget_lock(&self, id: &VmId) {
        let mut locks = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.remove(id);
    }

    /// Loads a VM the caller owns, or answers not-found.
    async fn owned(&self, caller: &CustomerId, id: &VmId) -> Result<VmRecord> {
        match self.inner.store.get(id).await.map_err(store_err)? {
            Some(vm) if &vm.customer == caller => Ok(vm),
            _ => Err(Error::NotFound(id.to_string())),
        }
    }

    fn check(vm: &VmRecord, op: Op) -> Result<Outcome> {
        state::next(vm.state, op).ok_or(Error::IllegalTransition {
            vm_id: vm.id.to_string(),
            op: op.verb(),
            state: vm.state,
        })
    }

    async fn save(
        &self,
        vm: &mut VmRecord,
        state: VmState,
        runtime: Option<VmmRuntime>,
        error: Option<String>,
    ) -> Result<()> {
        vm.state = state;
        vm.runtime = runtime;
        vm.last_error = error;
        vm.modified_at = now();
        self.inner.store.update(vm).await.map_err(store_err)
    }

    /// Records a new VM in state `Created`. No process is started until
    /// Boot, so a created VM costs nothing but its row.
    pub async fn create(
        &self,
        caller: &CustomerId,
        requested_id: Option<VmId>,
        request_customer: &str,
        spec: VmSpec,
    ) -> Result<VmRecord> {
        if !request_customer.is_empty() && request_customer != caller.as_str() {
            return Err(Error::invalid(
                "customer_id",
                "must be empty or match the authenticated customer",
            ));
        }
        let id = requested_id.unwrap_or_else(VmId::generate);
        let t = now();
        let vm = VmRecord {
            id: id.clone(),
            customer: caller.clone(),
            spec,
            state: VmState::Created,
            runtime: None,
            last_error: None,
            created_at: t,
            modified_at: t,
        };
        match self.inner.store.insert(&vm).await {
            Ok(()) => {
                info!(vm_id = %id, customer = %caller, "vm created");
                Ok(vm)
            }
            Err(StoreError::AlreadyExists) => Err(Error::AlreadyExists(id.to_string())),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Starts a VMM for the VM and lets the guest run.
    pub async fn boot(&self, caller: &CustomerId, id: &VmId) -> Result<VmRecord> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let mut vm = self.owned(caller, id).await?;
        Self::check(&vm, Op::Boot)?;
        // No process may exist in Created/Shutdown/Failed; clear anything a
        // crash mid-boot could have left before starting a fresh one.
        self.inner
            .vmm
            .destroy(id, vm.runtime.as_ref())
            .await
            .map_err(Error::Backend)?;
        match self.inner.vmm.boot(id, &vm.spec).await {
            Ok(rt) => {
                self.save(&mut vm, VmState::Running, Some(rt.clone()), None)
                    .await?;
                self.watch(id.clone(), rt);
                info!(vm_id = %id, "vm booted");
                Ok(vm)
            }
            Err(e) => {
                warn!(vm_id = %id, error = %e, "boot failed");
                Err(Error::Backend(e))
            }
        }
    }

    /// Stops the guest's vCPUs.
    pub async fn pause(&self, caller: &CustomerId, id: &VmId) -> Result<VmRecord> {
        self.simple(caller, id, Op::Pause).await
    }

    /// Lets a paused guest run again.
    pub async fn resume(&self, caller: &CustomerId, id: &VmId) -> Result<VmRecord> {
        self.simple(caller, id, Op::Resume).await
    }

    /// Resets the guest.
    pub async fn reboot(&self, caller: &CustomerId, id: &VmId) -> Result<VmRecord> {
        self.simple(caller, id, Op::Reboot).await
    }

    /// Pause, resume and reboot: one VMM call on a live process.
    async fn simple(&self, caller: &CustomerId, id: &VmId, op: Op) -> Result<VmRecord> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let mut vm = self.owned(caller, id).await?;
        let Outcome::To(to) = Self::check(&vm, op)? else {
            unreachable!("pause, resume and reboot never delete");
        };
        let rt = vm
            .runtime
            .clone()
            .ok_or_else(|| Error::Backend("no VMM process recorded".into()))?;
        let vmm = &self.inner.vmm;
        let new_rt = match op {
            Op::Pause => vmm.pause(&rt).await.map(|()| rt.clone()),
            Op::Resume => vmm.resume(&rt).await.map(|()| rt.clone()),
            Op::Reboot => vmm.reboot(id, &vm.spec, &rt).await,
            _ => unreachable!("only pause, resume and reboot come here"),
        }
        .map_err(Error::Backend)?;
        self.save(&mut vm, to, Some(new_rt.clone()), None).await?;
        if new_rt != rt {
            self.watch(id.clone(), new_rt);
        }
        Ok(vm)
    }

    /// Stops the guest; afterwards no VMM process exists.
    pub async fn shutdown(
        &self,
        caller: &CustomerId,
        id: &VmId,
        force: bool,
        timeout: Option<Duration>,
    ) -> Result<VmRecord> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let mut vm = self.owned(caller, id).await?;
        Self::check(&vm, Op::Shutdown)?;
        let mode = if force {
            StopMode::Force
        } else {
            StopMode::Graceful(timeout.unwrap_or(self.inner.config.default_shutdown_timeout))
        };
        if let Some(rt) = &vm.runtime {
            self.inner
                .vmm
                .shutdown(rt, mode)
                .await
                .map_err(Error::Backend)?;
        }
        self.save(&mut vm, VmState::Shutdown, None, None).await?;
        info!(vm_id = %id, ?mode, "vm shut down");
        Ok(vm)
    }

    /// Removes the VM: stops its VMM (gracefully unless `force`), removes
    /// every file, then the row. A failure keeps the row so a retry (or the
    /// reconciler) can finish the job.
    pub async fn delete(&self, caller: &CustomerId, id: &VmId, force: bool) -> Result<()> {
        let lock = self.lock_for(id);
        let guard = lock.lock().await;
        let vm = self.owned(caller, id).await?;
        Self::check(&vm, Op::Delete)?;
        if let (Some(rt), false) = (&vm.runtime, force) {
            let mode = StopMode::Graceful(self.inner.config.default_shutdown_timeout);
            if let Err(e) = self.inner.vmm.shutdown(rt, mode).await {
                warn!(vm_id = %id, error = %e, "graceful stop before delete failed; killing");
            }
        }
        self.inner
            .vmm
            .destroy(id, vm.runtime.as_ref())
            .await
            .map_err(Error::Backend)?;
        self.inner.store.remove(id).await.map_err(store_err)?;
        drop(guard);
        self.forget_lock(id);
        info!(vm_id = %id, "vm deleted");
        Ok(())
    }

    /// One VM with what the backend says about it.
    pub async fn get(&self, caller: &CustomerId, id: &VmId) -> Result<VmDetails> {
        let record = self.owned(caller, id).await?;
        let mut backend_info = self.inner.vmm.describe(id, record.runtime.as_ref()).await;
        if let Some(err) = &record.last_error {
            backend_info.insert("last_error".into(), err.clone());
        }
        Ok(VmDetails {
            record,
            backend_info,
        })
    }

    /// A page of the caller's VMs. `page_size` 0 means the default; sizes
    /// above [`MAX_PAGE_SIZE`] are reduced to it.
    pub async fn list(
        &self,
        caller: &CustomerId,
        states: &[VmState],
        page_size: i32,
        cursor: Option<i64>,
    ) -> Result<VmPage> {
        if page_size < 0 {
            return Err(Error::invalid(
                "page_size",
                format!("must not be negative, got {page_size}"),
            ));
        }
        let limit = match page_size as u32 {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        self.inner
            .store
            .list(caller, states, cursor, limit)
            .await
            .map_err(store_err)
    }

    /// Watches a VMM process and records an exit metald did not ask for.
    fn watch(&self, id: VmId, rt: VmmRuntime) {
        let svc = self.clone();
        let exited = self.inner.vmm.wait_exit(&rt);
        tokio::spawn(async move {
            let exit = exited.await;
            svc.on_exit(&id, &rt, exit).await;
        });
    }

    async fn on_exit(&self, id: &VmId, rt: &VmmRuntime, exit: VmmExit) {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let mut vm = match self.inner.store.get(id).await {
            Ok(Some(vm)) => vm,
            Ok(None) => return,
            Err(e) => {
                warn!(vm_id = %id, error = %e, "cannot load vm after its VMM exited");
                return;
            }
        };
        // An exit metald caused (shutdown, delete, reboot by restart) has
        // already replaced or cleared the runtime.
        if vm.runtime.as_ref() != Some(rt) || !vm.state.has_process() {
            return;
        }
        let op = if exit.is_clean() {
            Op::PoweredOff
        } else {
            Op::Crashed
        };
        let Some(Outcome::To(to)) = state::next(vm.state, op) else {
            return;
        };
        let reason = format!("VMM {}", exit.describe());
        warn!(vm_id = %id, %reason, state = %to, "VMM exited without being asked");
        if let Err(e) = self.save(&mut vm, to, None, Some(reason)).await {
            warn!(vm_id = %id, error = %e, "cannot record VMM exit");
        }
    }

    /// Re-attaches to every VMM the store says is alive, after a restart.
    /// VMs whose process is gone or is no longer theirs are marked failed;
    /// a reused pid is never adopted.
    pub async fn recover(&self) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        for vm in self.inner.store.all().await.map_err(store_err)? {
            if !vm.state.has_process() {
                continue;
            }
            let lock = self.lock_for(&vm.id);
            let _guard = lock.lock().await;
            let mut vm = vm;
            let adopted = match &vm.runtime {
                Some(rt) => self.inner.vmm.adopt(rt).await.map(|s| (s, rt.clone())),
                None => Err("no VMM process was recorded".into()),
            };
            match adopted {
                Ok((status, rt)) => {
                    let state = match status {
                        GuestStatus::Running => VmState::Running,
                        GuestStatus::Paused => VmState::Paused,
                    };
                    self.save(&mut vm, state, Some(rt.clone()), None).await?;
                    self.watch(vm.id.clone(), rt);
                    report.adopted += 1;
                }
                Err(e) => {
                    let reason = format!("VMM lost while metald was down: {e}");
                    warn!(vm_id = %vm.id, %reason, "not adopting");
                    self.save(&mut vm, VmState::Failed, None, Some(reason))
                        .await?;
                    report.failed += 1;
                }
            }
        }
        info!(
            adopted = report.adopted,
            failed = report.failed,
            "recovered VMs"
        );
        Ok(report)
    }
}

/// What [`VmService::recover`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    pub adopted: usize,
    pub failed: usize,
}
