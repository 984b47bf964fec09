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

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::assets::{AssetPolicy, Resolved};
use crate::error::{Error, Result};
use crate::locks::{VmLock, VmLocks};
use crate::net;
use crate::ports::{
    BootError, GuestStatus, Network, Observer, Pending, StopMode, Store, StoreError, UsageSource,
    VmPage, VmRecord, VmUsage, Vmm, VmmExit, VmmRuntime,
};
use crate::redact::{error_id, scrub};
use crate::state::{self, Op, Outcome, VmState};
use crate::vm::{CustomerId, VmId, VmSpec};

/// Page size when a ListVms request gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page ListVms returns; larger requests are reduced to it.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// How long a read waits for a VM's lock before answering from the row as
/// it stands (an operation may hold the lock for a whole graceful shutdown).
const READ_LOCK_WAIT: Duration = Duration::from_secs(1);

/// Tunables of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// How long a graceful shutdown waits for the guest before killing it,
    /// when the request gives no `timeout_seconds`.
    pub default_shutdown_timeout: Duration,
    /// Which host files a customer's VM may use. The default allows none.
    pub assets: AssetPolicy,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            default_shutdown_timeout: Duration::from_secs(30),
            assets: AssetPolicy::default(),
        }
    }
}

/// A VM as GetVmInfo shows it.
#[derive(Debug, Clone)]
pub struct VmDetails {
    pub record: VmRecord,
    pub backend_info: BTreeMap<String, String>,
    /// The latest measured usage, while a VMM runs and is metered.
    pub usage: Option<VmUsage>,
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
    locks: Arc<VmLocks>,
    /// Held from a create's check of its disks against the customer's other
    /// VMs until its row is stored, so two creates can never both attach
    /// one file where either writes it.
    disk_claims: tokio::sync::Mutex<()>,
    /// What the previous reconcile pass found unclaimed (its age guard).
    suspects: Mutex<HashSet<String>>,
    /// Host networking, when enabled.
    network: Option<Arc<dyn Network>>,
    /// Latest measured usage per VM, for GetVmInfo.
    usage: Option<Arc<dyn UsageSource>>,
    /// Told about every stored change (billing).
    observers: Vec<Arc<dyn Observer>>,
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

/// A configuration the VMM refused is the request's problem
/// (`failed_precondition`, with the VMM's reason, cleaned of metald's own
/// paths); anything else is metald's (`internal`). Either way the whole
/// story goes to the log under an error id, and the returned error also
/// serves as the VM's `last_error`.
fn boot_err(id: &VmId, e: BootError, resolved: &Resolved, client: &VmSpec) -> Error {
    let eid = error_id();
    warn!(vm_id = %id, error_id = %eid, error = %e, "the VMM did not start the guest");
    match e {
        BootError::Refused(reason) => Error::FailedPrecondition(format!(
            "the VMM refused the configuration: {} (error id {eid})",
            scrub(&reason, resolved, client)
        )),
        BootError::Failed(_) => {
            Error::Backend(format!("the VMM could not be started (error id {eid})"))
        }
    }
}

impl VmService {
    /// Builds the service over a store and a backend.
    pub fn new(store: Arc<dyn Store>, vmm: Arc<dyn Vmm>, config: ServiceConfig) -> Self {
        VmService {
            inner: Arc::new(Inner {
                store,
                vmm,
                config,
                locks: Arc::default(),
                disk_claims: tokio::sync::Mutex::new(()),
                suspects: Mutex::new(HashSet::new()),
                network: None,
                usage: None,
                observers: Vec::new(),
            }),
        }
    }

    /// Builds the service with observers told about every stored change.
    pub fn with_observers(
        store: Arc<dyn Store>,
        vmm: Arc<dyn Vmm>,
        config: ServiceConfig,
        observers: Vec<Arc<dyn Observer>>,
    ) -> Self {
        let svc = Self::new(store, vmm, config);
        let mut inner = Arc::into_inner(svc.inner).expect("just built, not shared");
        inner.observers = observers;
        VmService {
            inner: Arc::new(inner),
        }
    }

    /// Gives the service host networking (before it is cloned or used).
    pub fn with_network(self, network: Arc<dyn Network>) -> Self {
        let mut inner =
            Arc::into_inner(self.inner).expect("with_network before the service is shared");
        inner.network = Some(network);
        VmService {
            inner: Arc::new(inner),
        }
    }

    /// Gives the service a source of measured usage for GetVmInfo.
    pub fn with_usage(self, usage: Arc<dyn UsageSource>) -> Self {
        let mut inner =
            Arc::into_inner(self.inner).expect("with_usage before the service is shared");
        inner.usage = Some(usage);
        VmService {
            inner: Arc::new(inner),
        }
    }

    fn changed(&self, vm: &VmRecord) {
        for o in &self.inner.observers {
            o.vm_changed(vm);
        }
    }

    fn removed(&self, id: &VmId) {
        for o in &self.inner.observers {
            o.vm_removed(id);
        }
    }

    /// The backend's name, for logs and health output.
    pub fn backend_name(&self) -> &'static str {
        self.inner.vmm.name()
    }

    /// Waits for the lock of the VM keyed `id` (see [`crate::locks`]).
    fn lock(&self, id: &VmId) -> impl Future<Output = VmLock> + Send + 'static {
        self.inner.locks.lock(id)
    }

    /// The lock of the VM keyed `id` if no operation holds it.
    fn try_lock(&self, id: &VmId) -> Option<VmLock> {
        self.inner.locks.try_lock(id)
    }

    /// For the service's tests: claims the lock of the VM keyed `key` at
    /// once, as an operation does, and resolves when it holds it.
    #[doc(hidden)]
    pub fn lock_vm(&self, key: &VmId) -> impl Future<Output = VmLock> + Send + 'static {
        self.lock(key)
    }

    /// For the service's tests: how many VM locks are kept.
    #[doc(hidden)]
    pub fn lock_entries(&self) -> usize {
        self.inner.locks.len()
    }

    /// The caller's VM called `name`, or not-found (also when another
    /// customer has a VM of that name: the answers are identical).
    async fn owned(&self, caller: &CustomerId, name: &VmId) -> Result<VmRecord> {
        match self
            .inner
            .store
            .find(caller, name)
            .await
            .map_err(store_err)?
        {
            Some(vm) => Ok(vm),
            None => Err(Error::NotFound(name.to_string())),
        }
    }

    /// Finds the caller's VM `name`, takes its lock, and loads it again
    /// under the lock (brought up to date with its VMM process), so the row
    /// is the one the lock guards: a VM deleted and re-created under the
    /// same name meanwhile has a new key and answers as the new VM or not
    /// at all.
    async fn lock_owned(&self, caller: &CustomerId, name: &VmId) -> Result<(VmLock, VmRecord)> {
        let key = self.owned(caller, name).await?.id;
        let guard = self.lock(&key).await;
        let mut vm = match self.inner.store.get(&key).await.map_err(store_err)? {
            Some(vm) if &vm.customer == caller && &vm.name == name => vm,
            _ => return Err(Error::NotFound(name.to_string())),
        };
        self.refresh(&mut vm).await?;
        Ok((guard, vm))
    }

    fn check(vm: &VmRecord, op: Op) -> Result<Outcome> {
        state::next(vm.state, op).ok_or(Error::IllegalTransition {
            vm_id: vm.name.to_string(),
            op: op.verb(),
            state: vm.state,
        })
    }

    /// Checks every path of a VM against the asset roots for its customer
    /// and returns the spec the VMM must be given; run right before every
    /// spawn, so a file swapped for a link after CreateVm is still refused.
    async fn resolve(&self, customer: &CustomerId, spec: &VmSpec) -> Result<Resolved> {
        let policy = self.inner.config.assets.clone();
        let (customer, spec) = (customer.clone(), spec.clone());
        tokio::task::spawn_blocking(move || policy.resolve(&customer, &spec))
            .await
            .map_err(|e| Error::Backend(format!("asset check did not finish: {e}")))?
    }

    /// The one-writer rule: a file attached writable to one VM is attached
    /// to no other, and a file another VM uses is not attached writable.
    /// Writable disks come only from the customer's own roots, so only the
    /// customer's own VMs can collide, and the answer tells nothing of
    /// anyone else. The caller holds `disk_claims`.
    async fn check_disk_claims(&self, customer: &CustomerId, new: &Resolved) -> Result<()> {
        for (i, a) in new.disks.iter().enumerate() {
            if let Some(b) = new.disks[..i]
                .iter()
                .find(|b| b.identity == a.identity && (a.writable || b.writable))
            {
                return Err(Error::FailedPrecondition(format!(
                    "{}: the same file as {} and one of them is writable; a writable disk belongs to one device of one VM",
                    a.field, b.field
                )));
            }
        }
        let mut others: Vec<VmSpec> = Vec::new();
        let mut cursor = None;
        loop {
            let page = self
                .inner
                .store
                .list(customer, &[], cursor, MAX_PAGE_SIZE)
                .await
                .map_err(store_err)?;
            others.extend(page.vms.into_iter().map(|vm| vm.spec));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let mine = new.disks.clone();
        let clash = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::MetadataExt;
            for spec in others {
                for d in spec.disks {
                    let Ok(meta) = std::fs::metadata(&d.path) else {
                        continue;
                    };
                    let identity = (meta.dev(), meta.ino());
                    if let Some(a) = mine
                        .iter()
                        .find(|a| a.identity == identity && (a.writable || !d.read_only))
                    {
                        return Some(a.field.clone());
                    }
                }
            }
            None
        })
        .await
        .map_err(|e| Error::Backend(format!("disk check did not finish: {e}")))?;
        match clash {
            Some(field) => Err(Error::FailedPrecondition(format!(
                "{field}: the file is attached to another of this customer's VMs and one of them writes it; a writable disk belongs to one VM"
            ))),
            None => Ok(()),
        }
    }

    /// The last write of an operation: the outcome, with nothing pending.
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
        vm.pending = None;
        vm.modified_at = now();
        self.inner.store.update(vm).await.map_err(store_err)?;
        self.changed(vm);
        Ok(())
    }

    /// The first write of a multi-step operation, before any side effect.
    async fn mark_pending(&self, vm: &mut VmRecord, op: Pending) -> Result<()> {
        vm.pending = Some(op);
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
        if !spec.nics.is_empty() && self.inner.network.is_none() {
            return Err(Error::Unimplemented(
                "config.network: networking is disabled on this host (UNKEY_METALD_NETWORK_ENABLED=false)".into(),
            ));
        }
        let resolved = self.resolve(caller, &spec).await?;
        let name = requested_id.unwrap_or_else(VmId::generate);
        let id = VmId::host_key(&name);
        let t = now();
        let has_network = !spec.nics.is_empty();
        let mut vm = VmRecord {
            id: id.clone(),
            name: name.clone(),
            customer: caller.clone(),
            spec,
            state: VmState::Created,
            runtime: None,
            last_error: None,
            pending: has_network.then_some(Pending::Create),
            created_at: t,
            modified_at: t,
        };
        // The lock keeps the reconciler off the VM while it is wired.
        let _guard = self.lock(&id).await;
        {
            let _claims = self.inner.disk_claims.lock().await;
            self.check_disk_claims(caller, &resolved).await?;
            match self.inner.store.insert(&vm).await {
                Ok(()) => {}
                Err(StoreError::AlreadyExists) => {
                    return Err(Error::AlreadyExists(name.to_string()));
                }
                Err(e) => return Err(store_err(e)),
            }
        }
        if has_network {
            if let Err(e) = self.wire(&mut vm).await {
                warn!(vm_id = %id, error = %e, "create failed; rolling back");
                if let Err(undo) = self.unwire(&id, vm.spec.nics.len()).await {
                    warn!(vm_id = %id, error = %undo, "rollback of the network failed; the reconciler retries");
                    return Err(e);
                }
                self.inner.store.remove(&id).await.map_err(store_err)?;
                return Err(e);
            }
            let state = vm.state;
            self.save(&mut vm, state, None, None).await?;
        }
        info!(vm_id = %id, name = %name, customer = %caller, "vm created");
        Ok(vm)
    }

    /// Leases addresses and attaches every interface of a VM being
    /// created, recording the result in its spec.
    async fn wire(&self, vm: &mut VmRecord) -> Result<()> {
        let Some(net) = &self.inner.network else {
            return Ok(());
        };
        let subnets = net.subnets();
        for i in 0..vm.spec.nics.len() {
            let nic = vm.spec.nics[i].clone();
            let ipv4 = if nic.want_v4 {
                let (n, p, _) = subnets.v4;
                let addr = self
                    .lease_one(
                        &vm.id,
                        nic.ipv4.map(IpAddr::V4),
                        net::v4_candidates(n, p).map(IpAddr::V4),
                        &format!("config.network[{i}].ipv4_config.address"),
                        (IpAddr::V4(n), p),
                    )
                    .await?;
                match addr {
                    IpAddr::V4(a) => Some((a, p)),
                    IpAddr::V6(_) => None,
                }
            } else {
                None
            };
            let ipv6 = if nic.want_v6 {
                let (n, p, _) = subnets.v6;
                let addr = self
                    .lease_one(
                        &vm.id,
                        nic.ipv6.map(IpAddr::V6),
                        net::v6_candidates(n, p).map(IpAddr::V6),
                        &format!("config.network[{i}].ipv6_config.address"),
                        (IpAddr::V6(n), p),
                    )
                    .await?;
                match addr {
                    IpAddr::V6(a) => Some((a, p)),
                    IpAddr::V4(_) => None,
                }
            } else {
                None
            };
            let mac = nic.mac.clone().unwrap_or_else(|| net.mac_for(&vm.id, i));
            let mut att = net
                .attach(&vm.id, i, &nic, &mac)
                .await
                .map_err(Error::Backend)?;
            att.ipv4 = ipv4;
            att.gateway4 = ipv4.map(|_| subnets.v4.2);
            att.ipv6 = ipv6;
            att.gateway6 = ipv6.map(|_| subnets.v6.2);
            vm.spec.nics[i].attachment = Some(att);
        }
        Ok(())
    }

    /// Leases the requested address (checked against the subnet and other
    /// VMs) or the first free candidate.
    async fn lease_one(
        &self,
        vm: &VmId,
        requested: Option<IpAddr>,
        candidates: impl Iterator<Item = IpAddr>,
        field: &str,
        subnet: (IpAddr, u8),
    ) -> Result<IpAddr> {
        let store = &self.inner.store;
        if let Some(addr) = requested {
            if !net::contains(subnet.0, subnet.1, addr)
                || net::candidates_exclude(subnet.0, subnet.1, addr)
            {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{addr} is not a usable address of {}/{}",
                        subnet.0, subnet.1
                    ),
                ));
            }
            return match store.lease(addr, vm).await.map_err(store_err)? {
                true => Ok(addr),
                false => Err(Error::AlreadyExists(format!(
                    "{field}: {addr} is in use by another VM"
                ))),
            };
        }
        let taken: HashSet<IpAddr> = store
            .leases()
            .await
            .map_err(store_err)?
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        for addr in candidates.filter(|a| !taken.contains(a)) {
            // A concurrent create may take it first: then try the next.
            if store.lease(addr, vm).await.map_err(store_err)? {
                return Ok(addr);
            }
        }
        warn!(vm_id = %vm, subnet = %format!("{}/{}", subnet.0, subnet.1), "address pool exhausted");
        Err(Error::Unavailable(format!(
            "{field}: no free address left on this host"
        )))
    }

    /// Detaches every interface and releases every address of a VM.
    async fn unwire(&self, id: &VmId, nics: usize) -> Result<()> {
        if let Some(net) = &self.inner.network {
            for i in 0..nics.max(1) {
                net.detach(id, i).await.map_err(Error::Backend)?;
            }
        }
        self.inner.store.release(id).await.map_err(store_err)
    }

    /// Starts a VMM for the VM and lets the guest run. The row is marked
    /// `pending boot` first, so a crash mid-way is rolled back on restart.
    pub async fn boot(&self, caller: &CustomerId, name: &VmId) -> Result<VmRecord> {
        let (_guard, mut vm) = self.lock_owned(caller, name).await?;
        let id = &vm.id.clone();
        Self::check(&vm, Op::Boot)?;
        let resolved = self.resolve(caller, &vm.spec).await?;
        self.mark_pending(&mut vm, Pending::Boot).await?;
        let vmm = &self.inner.vmm;
        // No process may exist in Created/Shutdown/Failed; clear anything a
        // crash could have left before starting a fresh one.
        let started = match vmm.destroy(id, vm.runtime.as_ref()).await {
            Ok(()) => vmm.boot(id, &resolved.spec).await,
            Err(e) => Err(BootError::Failed(e)),
        };
        match started {
            Ok(rt) => {
                self.save(&mut vm, VmState::Running, Some(rt.clone()), None)
                    .await?;
                self.watch(id.clone(), rt);
                info!(vm_id = %id, "vm booted");
                Ok(vm)
            }
            Err(e) => {
                let e = boot_err(id, e, &resolved, &vm.spec);
                let state = vm.state;
                self.save(&mut vm, state, None, Some(format!("boot failed: {e}")))
                    .await?;
                Err(e)
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

    /// Pause, resume and reboot: one VMM call on a live process. Nothing is
    /// marked pending: after a crash, adoption reads the guest's state from
    /// the VMM itself.
    async fn simple(&self, caller: &CustomerId, name: &VmId, op: Op) -> Result<VmRecord> {
        let (_guard, mut vm) = self.lock_owned(caller, name).await?;
        let id = &vm.id.clone();
        let Outcome::To(to) = Self::check(&vm, op)? else {
            unreachable!("pause, resume and reboot never delete");
        };
        let rt = vm
            .runtime
            .clone()
            .ok_or_else(|| Error::Backend("no VMM process recorded".into()))?;
        let vmm = &self.inner.vmm;
        let new_rt = match op {
            Op::Pause => vmm
                .pause(&rt)
                .await
                .map(|()| rt.clone())
                .map_err(Error::Backend),
            Op::Resume => vmm
                .resume(&rt)
                .await
                .map(|()| rt.clone())
                .map_err(Error::Backend),
            Op::Reboot => {
                // Some backends respawn the VMM to reboot: the files are
                // checked again like at every spawn.
                let resolved = self.resolve(caller, &vm.spec).await?;
                vmm.reboot(id, &resolved.spec, &rt)
                    .await
                    .map_err(|e| boot_err(id, e, &resolved, &vm.spec))
            }
            _ => unreachable!("only pause, resume and reboot come here"),
        };
        let new_rt = match new_rt {
            Ok(rt) => rt,
            Err(e) => {
                // The VMM may have died under the request: report that
                // rather than a bare backend error.
                self.refresh(&mut vm).await?;
                if !vm.state.has_process() {
                    return Err(Self::check(&vm, op).err().unwrap_or(e));
                }
                return Err(e);
            }
        };
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
        let (_guard, mut vm) = self.lock_owned(caller, id).await?;
        Self::check(&vm, Op::Shutdown)?;
        let mode = if force {
            StopMode::Force
        } else {
            StopMode::Graceful(timeout.unwrap_or(self.inner.config.default_shutdown_timeout))
        };
        self.stop_locked(&mut vm, mode).await?;
        info!(vm_id = %vm.id, ?mode, "vm shut down");
        Ok(vm)
    }

    /// Stops a VM's VMM and records `Shutdown`; the caller holds its lock.
    async fn stop_locked(&self, vm: &mut VmRecord, mode: StopMode) -> Result<()> {
        self.mark_pending(vm, Pending::Shutdown).await?;
        if let Some(rt) = vm.runtime.clone()
            && let Err(e) = self.inner.vmm.shutdown(&rt, mode).await
        {
            let eid = error_id();
            warn!(vm_id = %vm.id, error_id = %eid, error = %e, "shutdown failed");
            let state = vm.state;
            let runtime = vm.runtime.clone();
            let why = format!("shutdown failed (error id {eid})");
            self.save(vm, state, runtime, Some(why)).await?;
            return Err(Error::Backend(e));
        }
        // The VMM is gone: free what the backend kept for it (metrics
        // reader, cgroups, exit bookkeeping), as after an exit on its own.
        if let Some(rt) = &vm.runtime {
            self.inner.vmm.release(&vm.id, rt).await;
        }
        self.save(vm, VmState::Shutdown, None, None).await
    }

    /// Removes the VM: stops its VMM (gracefully unless `force`), removes
    /// every file, then the row. The row is marked `pending delete` first,
    /// so a crash mid-way is finished on restart; a failure answers an
    /// error and leaves the VM as it was, for a retry.
    pub async fn delete(&self, caller: &CustomerId, name: &VmId, force: bool) -> Result<()> {
        let (guard, mut vm) = self.lock_owned(caller, name).await?;
        let id = &vm.id.clone();
        Self::check(&vm, Op::Delete)?;
        self.mark_pending(&mut vm, Pending::Delete).await?;
        if let (Some(rt), false) = (&vm.runtime, force) {
            let mode = StopMode::Graceful(self.inner.config.default_shutdown_timeout);
            if let Err(e) = self.inner.vmm.shutdown(rt, mode).await {
                warn!(vm_id = %id, error = %e, "graceful stop before delete failed; killing");
            }
        }
        let destroyed = match self.inner.vmm.destroy(id, vm.runtime.as_ref()).await {
            Ok(()) => self.unwire(id, vm.spec.nics.len()).await,
            Err(e) => Err(Error::Backend(e)),
        };
        if let Err(e) = destroyed {
            let eid = error_id();
            warn!(vm_id = %id, error_id = %eid, error = %e, "delete failed");
            let (state, runtime) = (vm.state, vm.runtime.clone());
            let why = format!("delete failed (error id {eid})");
            self.save(&mut vm, state, runtime, Some(why)).await?;
            return Err(e);
        }
        self.inner.store.remove(id).await.map_err(store_err)?;
        self.removed(id);
        // The lock's entry goes with its last user (a waiter keeps it).
        drop(guard);
        info!(vm_id = %id, "vm deleted");
        Ok(())
    }

    /// One VM with what the backend says about it. A VMM found dead is
    /// recorded before answering, so the state is never stale.
    pub async fn get(&self, caller: &CustomerId, name: &VmId) -> Result<VmDetails> {
        let mut record = self.owned(caller, name).await?;
        self.refresh_if_idle(&mut record).await;
        let id = &record.id.clone();
        let mut backend_info = self.inner.vmm.describe(id, record.runtime.as_ref()).await;
        // The host-wide key the VM's files, processes and metald's logs are
        // named by, for correlating a customer's report with the host.
        backend_info.insert("vm_key".into(), id.to_string());
        if let Some(err) = &record.last_error {
            backend_info.insert("last_error".into(), err.clone());
        }
        if let Some(p) = record.pending {
            backend_info.insert("pending_operation".into(), p.as_str().into());
        }
        let mut usage = match (&self.inner.usage, record.state.has_process()) {
            (Some(u), true) => u.usage(id),
            _ => None,
        };
        // The VMM's own device counters are exact where it keeps them.
        if let Some(rt) = record
            .runtime
            .as_ref()
            .filter(|_| record.state.has_process())
            && let Some(c) = self.inner.vmm.counters(id, rt).await
        {
            let u = usage.get_or_insert_with(VmUsage::default);
            u.disk_read_bytes = c.disk_read_bytes as i64;
            u.disk_write_bytes = c.disk_write_bytes as i64;
            u.net_rx_bytes = c.net_rx_bytes as i64;
            u.net_tx_bytes = c.net_tx_bytes as i64;
            backend_info.insert("device_counters".into(), "vmm".into());
        }
        Ok(VmDetails {
            record,
            backend_info,
            usage,
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
        let mut page = self
            .inner
            .store
            .list(caller, states, cursor, limit)
            .await
            .map_err(store_err)?;
        for vm in &mut page.vms {
            self.refresh_if_idle(vm).await;
        }
        Ok(page)
    }

    /// Records the exit of a VM's VMM if the process is gone (the caller
    /// holds the VM's lock). The exit watcher normally does this at once;
    /// this closes the gap between the exit and the watcher's write.
    async fn refresh(&self, vm: &mut VmRecord) -> Result<()> {
        if !vm.state.has_process() {
            return Ok(());
        }
        let unknown = VmmExit {
            code: None,
            signal: None,
        };
        let exit = match &vm.runtime {
            Some(rt) if self.inner.vmm.is_alive(rt) => return Ok(()),
            // Dead: the status is known at once for metald's own children.
            Some(rt) => tokio::time::timeout(Duration::from_secs(1), self.inner.vmm.wait_exit(rt))
                .await
                .unwrap_or(unknown),
            None => unknown,
        };
        self.record_exit(vm, exit).await
    }

    /// [`Self::refresh`] for readers. When the VM's lock is held (the exit
    /// watcher recording this very exit, or an operation that will write
    /// its own outcome), waits a bounded time for it and rereads the row,
    /// so a reader never reports a dead VMM as running just because it
    /// arrived while the exit was being written.
    async fn refresh_if_idle(&self, vm: &mut VmRecord) {
        let stale = vm.state.has_process()
            && !vm
                .runtime
                .as_ref()
                .is_some_and(|rt| self.inner.vmm.is_alive(rt));
        if !stale {
            return;
        }
        let Ok(_guard) = tokio::time::timeout(READ_LOCK_WAIT, self.lock(&vm.id)).await else {
            return;
        };
        match self.inner.store.get(&vm.id).await {
            Ok(Some(mut fresh)) => {
                if let Err(e) = self.refresh(&mut fresh).await {
                    warn!(vm_id = %vm.id, error = %e, "cannot record VMM exit");
                }
                *vm = fresh;
            }
            Ok(None) => {}
            Err(e) => warn!(vm_id = %vm.id, error = %e, "cannot reload vm"),
        }
    }

    /// Moves a VM whose VMM exited on its own to `Failed` (or `Shutdown`
    /// after a clean guest power-off), with the reason, and releases what
    /// the VMM left behind.
    async fn record_exit(&self, vm: &mut VmRecord, exit: VmmExit) -> Result<()> {
        let op = if exit.is_clean() {
            Op::PoweredOff
        } else {
            Op::Crashed
        };
        let Some(Outcome::To(to)) = state::next(vm.state, op) else {
            return Ok(());
        };
        let reason = format!("VMM {}", exit.describe());
        warn!(vm_id = %vm.id, %reason, state = %to, "VMM exited without being asked");
        if let Some(rt) = &vm.runtime {
            self.inner.vmm.release(&vm.id, rt).await;
        }
        self.save(vm, to, None, Some(reason)).await
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
        let _guard = self.lock(id).await;
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
        if let Err(e) = self.record_exit(&mut vm, exit).await {
            warn!(vm_id = %id, error = %e, "cannot record VMM exit");
        }
    }

    /// Brings every VM back under control after a (re)start: finishes or
    /// rolls back operations a crash interrupted, re-attaches to every VMM
    /// the store says is alive, and marks the rest failed after cleaning
    /// up after them. A reused pid is never adopted or killed: identity is
    /// pid + start time + the VMM's own command line and socket.
    pub async fn recover(&self) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        for mut vm in self.inner.store.all().await.map_err(store_err)? {
            let _guard = self.lock(&vm.id).await;
            // One VM that cannot be settled (a VMM that survives SIGKILL for
            // a while, an unreadable directory, a failing rollback) must not
            // keep metald from serving the others.
            if let Err(e) = self.recover_one(&mut vm, &mut report).await {
                self.unsettled(&vm.id, &e).await;
                report.unsettled += 1;
            }
        }
        info!(?report, "recovered VMs");
        Ok(report)
    }

    /// Marks a VM that recovery could not settle `failed` with the reason,
    /// keeping its pending operation and recorded process, so the periodic
    /// reconciler retries the operation and sweeps the process.
    async fn unsettled(&self, id: &VmId, e: &Error) {
        let eid = error_id();
        warn!(vm_id = %id, error_id = %eid, error = %e, "cannot settle a VM after a restart; the reconciler retries");
        let Ok(Some(mut vm)) = self.inner.store.get(id).await else {
            return;
        };
        vm.state = VmState::Failed;
        vm.last_error = Some(format!(
            "could not be settled after a metald restart (error id {eid}); retried in the background"
        ));
        vm.modified_at = now();
        match self.inner.store.update(&vm).await {
            Ok(()) => self.changed(&vm),
            Err(e) => warn!(vm_id = %id, error = %e, "cannot mark an unsettled VM"),
        }
    }

    /// Finishes, rolls back or adopts one VM (the caller holds its lock).
    async fn recover_one(&self, vm: &mut VmRecord, report: &mut RecoveryReport) -> Result<()> {
        let vmm = &self.inner.vmm;
        let id = vm.id.clone();
        match vm.pending {
            Some(Pending::Create) => {
                self.unwire(&id, vm.spec.nics.len()).await?;
                self.inner.store.remove(&id).await.map_err(store_err)?;
                info!(vm_id = %id, "rolled back a create interrupted by a restart");
                report.rolled_back += 1;
                return Ok(());
            }
            Some(Pending::Delete) => {
                vmm.destroy(&id, vm.runtime.as_ref())
                    .await
                    .map_err(Error::Backend)?;
                self.unwire(&id, vm.spec.nics.len()).await?;
                self.inner.store.remove(&id).await.map_err(store_err)?;
                self.removed(&id);
                info!(vm_id = %id, "finished a delete interrupted by a restart");
                report.finished += 1;
                return Ok(());
            }
            Some(Pending::Boot) => {
                vmm.destroy(&id, vm.runtime.as_ref())
                    .await
                    .map_err(Error::Backend)?;
                let state = vm.state;
                let why = "boot interrupted by a metald restart; rolled back".to_owned();
                self.save(vm, state, None, Some(why)).await?;
                info!(vm_id = %id, "rolled back a boot interrupted by a restart");
                report.rolled_back += 1;
                return Ok(());
            }
            Some(Pending::Shutdown) => {
                if let Some(rt) = vm.runtime.clone() {
                    vmm.shutdown(&rt, StopMode::Force)
                        .await
                        .map_err(Error::Backend)?;
                }
                self.save(vm, VmState::Shutdown, None, None).await?;
                info!(vm_id = %id, "finished a shutdown interrupted by a restart");
                report.finished += 1;
                return Ok(());
            }
            None => {}
        }
        if !vm.state.has_process() {
            return Ok(());
        }
        let adopted = match &vm.runtime {
            Some(rt) => vmm.adopt(&vm.id, rt).await.map(|s| (s, rt.clone())),
            None => Err("no VMM process was recorded".into()),
        };
        match adopted {
            Ok((status, rt)) => {
                let state = match status {
                    GuestStatus::Running => VmState::Running,
                    GuestStatus::Paused => VmState::Paused,
                };
                self.save(vm, state, Some(rt.clone()), None).await?;
                self.watch(id.clone(), rt);
                report.adopted += 1;
            }
            Err(e) => {
                let eid = error_id();
                warn!(vm_id = %id, error_id = %eid, error = %e, "VMM lost while metald was down; not adopting");
                let reason = format!("VMM lost while metald was down (error id {eid})");
                // Kills only processes whose identity still matches,
                // so an unrelated process on a reused pid survives.
                vmm.destroy(&id, vm.runtime.as_ref())
                    .await
                    .map_err(Error::Backend)?;
                self.save(vm, VmState::Failed, None, Some(reason)).await?;
                report.failed += 1;
            }
        }
        Ok(())
    }

    /// Tells the observers about every VM as stored, once recovery is done,
    /// so they can settle what they remembered from before a restart.
    pub async fn announce_all(&self) -> Result<()> {
        for vm in self.inner.store.all().await.map_err(store_err)? {
            self.changed(&vm);
        }
        Ok(())
    }

    /// One reconciliation pass: records VMMs found dead, kills VMM
    /// processes no row claims, and removes VM directories no row claims.
    ///
    /// Age guard: with `immediate` false (periodic passes while serving), an
    /// unclaimed process or directory is removed only when the previous
    /// pass already found it unclaimed, and only while no operation holds
    /// its VM; so a boot or delete in progress is never raced. The start-up
    /// pass runs before the API serves and acts at once.
    pub async fn reconcile(&self, immediate: bool) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let vmm = &self.inner.vmm;
        for mut vm in self.inner.store.all().await.map_err(store_err)? {
            if vm.state.has_process() && !vm.runtime.as_ref().is_some_and(|rt| vmm.is_alive(rt)) {
                let before = vm.state;
                self.refresh_if_idle(&mut vm).await;
                if vm.state != before {
                    report.dead += 1;
                }
            }
            // A create that failed and could not undo its wiring leaves its
            // row marked; with no operation holding the VM, nothing else
            // will finish it, so roll it back (the create holds the lock
            // from before its insert to its last write, so it is never
            // raced).
            // An operation a restart interrupted and recovery could not
            // settle: try again while nothing holds the VM.
            if matches!(
                vm.pending,
                Some(Pending::Delete | Pending::Boot | Pending::Shutdown)
            ) {
                let Some(_guard) = self.try_lock(&vm.id) else {
                    continue;
                };
                if let Some(mut v) = self.inner.store.get(&vm.id).await.map_err(store_err)?
                    && v.pending.is_some()
                {
                    let mut r = RecoveryReport::default();
                    match self.recover_one(&mut v, &mut r).await {
                        Ok(()) => report.settled += 1,
                        Err(e) => {
                            warn!(vm_id = %v.id, error = %e, "cannot settle an interrupted operation yet")
                        }
                    }
                }
                continue;
            }
            if vm.pending != Some(Pending::Create) {
                continue;
            }
            let Some(_guard) = self.try_lock(&vm.id) else {
                continue;
            };
            match self.inner.store.get(&vm.id).await.map_err(store_err)? {
                Some(v) if v.pending == Some(Pending::Create) => {
                    // Still failing: the next pass tries again; the rest of
                    // this pass goes on.
                    if let Err(e) = self.unwire(&v.id, v.spec.nics.len()).await {
                        warn!(vm_id = %v.id, error = %e, "cannot roll back an abandoned create yet");
                        continue;
                    }
                    self.inner.store.remove(&v.id).await.map_err(store_err)?;
                    info!(vm_id = %v.id, "rolled back a create that could not undo itself");
                    report.abandoned_creates += 1;
                }
                _ => {}
            }
        }
        let host = vmm.scan().await;
        let mut suspects = HashSet::new();
        let previous = std::mem::take(
            &mut *self
                .inner
                .suspects
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (id, pid, start_time) in host.processes {
            let key = format!("process {pid}/{start_time} of {id}");
            let Some(_guard) = self.try_lock(&id) else {
                continue;
            };
            let claimed = match self.inner.store.get(&id).await.map_err(store_err)? {
                Some(vm) => {
                    vm.state.has_process()
                        && vm
                            .runtime
                            .as_ref()
                            .is_some_and(|rt| rt.pid == pid && rt.start_time == start_time)
                }
                None => false,
            };
            if claimed {
                continue;
            }
            if !immediate && !previous.contains(&key) {
                suspects.insert(key);
                continue;
            }
            warn!(vm_id = %id, pid, "killing a VMM process no VM row claims");
            // One that can't be killed yet is retried next pass.
            if let Err(e) = vmm.kill_orphan(pid, start_time).await {
                warn!(vm_id = %id, pid, error = %e, "cannot kill an unclaimed VMM process yet");
                continue;
            }
            report.orphan_processes += 1;
        }
        for id in host.dirs {
            let key = format!("directory of {id}");
            let Some(_guard) = self
                .unclaimed(&id, key, immediate, &previous, &mut suspects)
                .await?
            else {
                continue;
            };
            warn!(vm_id = %id, "removing files no VM row claims");
            // One that can't be removed is retried next pass; the others
            // are still cleaned now.
            if let Err(e) = vmm.destroy(&id, None).await {
                warn!(vm_id = %id, error = %e, "cannot remove unclaimed files yet");
                continue;
            }
            report.orphan_dirs += 1;
        }
        if let Some(net) = &self.inner.network {
            let mut ids: HashSet<VmId> = net
                .scan()
                .await
                .map_err(Error::Backend)?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            let leases = self.inner.store.leases().await.map_err(store_err)?;
            ids.extend(leases.into_iter().map(|(_, id)| id));
            for id in ids {
                let key = format!("network of {id}");
                let Some(_guard) = self
                    .unclaimed(&id, key, immediate, &previous, &mut suspects)
                    .await?
                else {
                    continue;
                };
                warn!(vm_id = %id, "removing network devices and addresses no VM row claims");
                if let Err(e) = self.unwire(&id, 1).await {
                    warn!(vm_id = %id, error = %e, "cannot remove unclaimed network devices yet");
                    continue;
                }
                report.orphan_networks += 1;
            }
        }
        *self
            .inner
            .suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = suspects;
        if report != ReconcileReport::default() {
            info!(?report, "reconciled");
        }
        Ok(report)
    }

    /// For the reconciler: takes `id`'s lock when no operation holds it, no
    /// row claims the VM and the age guard allows acting on `key` (found
    /// unclaimed by the previous pass, or `immediate`).
    async fn unclaimed(
        &self,
        id: &VmId,
        key: String,
        immediate: bool,
        previous: &HashSet<String>,
        suspects: &mut HashSet<String>,
    ) -> Result<Option<VmLock>> {
        let Some(guard) = self.try_lock(id) else {
            return Ok(None);
        };
        if self.inner.store.get(id).await.map_err(store_err)?.is_some() {
            return Ok(None);
        }
        if !immediate && !previous.contains(&key) {
            suspects.insert(key);
            return Ok(None);
        }
        Ok(Some(guard))
    }

    /// Shuts every running or paused VM down (gracefully, killing after the
    /// default timeout), for `UNKEY_METALD_SHUTDOWN_VMS_ON_EXIT`.
    pub async fn shutdown_all(&self) -> Result<usize> {
        let mut n = 0;
        let mode = StopMode::Graceful(self.inner.config.default_shutdown_timeout);
        for vm in self.inner.store.all().await.map_err(store_err)? {
            if !vm.state.has_process() {
                continue;
            }
            let _guard = self.lock(&vm.id).await;
            let Some(mut vm) = self.inner.store.get(&vm.id).await.map_err(store_err)? else {
                continue;
            };
            if vm.state.has_process() {
                self.stop_locked(&mut vm, mode).await?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// What [`VmService::reconcile`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    /// VMs whose VMM was found dead and recorded as such.
    pub dead: usize,
    /// Unclaimed VMM processes killed.
    pub orphan_processes: usize,
    /// Unclaimed VM directories removed.
    pub orphan_dirs: usize,
    /// Unclaimed network devices / address leases removed (per VM).
    pub orphan_networks: usize,
    /// Creates whose own rollback failed, rolled back now.
    pub abandoned_creates: usize,
    /// Interrupted operations start-up recovery could not settle, settled
    /// now.
    pub settled: usize,
}

/// What [`VmService::recover`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    /// VMMs re-attached.
    pub adopted: usize,
    /// VMs whose VMM was gone or not theirs: marked failed.
    pub failed: usize,
    /// Interrupted deletes and shutdowns finished.
    pub finished: usize,
    /// Interrupted boots rolled back.
    pub rolled_back: usize,
    /// VMs that could not be settled: marked failed, retried by the
    /// periodic reconciler.
    pub unsettled: usize,
}
