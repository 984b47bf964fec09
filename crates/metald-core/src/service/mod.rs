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

mod admission;
mod executor;
mod measure;
mod ops;
mod quotas;
mod reconcile;
mod recover;
mod steps;
mod supervision;
mod wiring;

pub use reconcile::ReconcileReport;
pub use recover::RecoveryReport;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{Instrument, info, warn};

use crate::assets::{AssetPolicy, Resolved};
use crate::error::{Error, Result};
use crate::locks::{VmLock, VmLocks};
use crate::net;
use crate::ports::{
    GuestStatus, Network, NetworkError, NoTelemetry, Observer, StopMode, Store, StoreError,
    Telemetry, UsageSource, VmPage, VmRecord, VmUsage, Vmm, VmmError, VmmExit, VmmRuntime,
};
use crate::quota::{self, CreateRate, HostCapacity, QuotaBook};
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
    /// Every customer's limits (replaced later by [`VmService::set_quotas`]).
    pub quotas: QuotaBook,
    /// What the host can run at once; `None`: not checked.
    pub host: Option<HostCapacity>,
    /// Whether GetVmInfo's `backend_info` keeps the host's own details:
    /// the values that are host paths (the VMM's control socket, its
    /// console log) and the keys in [`crate::ports::HOST_DETAIL_KEYS`]
    /// (host pid, uid, jail name). Off by default: a customer learns
    /// nothing of the host; an operator finds the VM's files and process
    /// by its key (its data directory, the VMM's command line).
    pub host_details_in_info: bool,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            default_shutdown_timeout: Duration::from_secs(30),
            assets: AssetPolicy::default(),
            quotas: QuotaBook::default(),
            host: None,
            host_details_in_info: false,
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
    /// The store, with the sums admission reads kept beside it.
    store: Arc<crate::tally::Tally>,
    vmm: Arc<dyn Vmm>,
    config: ServiceConfig,
    locks: Arc<VmLocks>,
    /// The admission lock: held from a create's check of its disks and
    /// quotas against the customer's other VMs until its row is stored, and
    /// while a boot is counted against the running quotas, so two requests
    /// can never both take one file or the last unit of a quota.
    disk_claims: tokio::sync::Mutex<()>,
    /// Current limits of every customer.
    quotas: std::sync::RwLock<Arc<QuotaBook>>,
    /// Per-customer create-rate buckets.
    create_rate: CreateRate,
    /// VMs admitted to boot and not yet recorded running.
    booting: Mutex<HashSet<VmId>>,
    /// What the previous reconcile pass found unclaimed (its age guard).
    suspects: Mutex<HashSet<String>>,
    /// Host networking, when enabled.
    network: Option<Arc<dyn Network>>,
    /// Latest measured usage per VM, for GetVmInfo.
    usage: Option<Arc<dyn UsageSource>>,
    /// Told about every stored change (billing).
    observers: Vec<Arc<dyn Observer>>,
    /// Told how operations, exits and background passes went (metrics).
    telemetry: Arc<dyn Telemetry>,
    /// Where a test stops a plan as if metald were killed.
    crash: executor::CrashPoint,
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

/// Any network failure is metald's fault, not the request's.
fn net_err(e: NetworkError) -> Error {
    Error::Backend(e.to_string())
}

/// A configuration the VMM refused is the request's problem
/// (`failed_precondition`, with the VMM's reason, cleaned of metald's own
/// paths); anything else is metald's (`internal`). Either way the whole
/// story goes to the log under an error id, and the returned error also
/// serves as the VM's `last_error`.
fn boot_err(id: &VmId, e: VmmError, resolved: &Resolved, client: &VmSpec) -> Error {
    let eid = error_id();
    warn!(vm_id = %id, error_id = %eid, error = %e, kind = e.kind(), "the VMM did not start the guest");
    match e {
        VmmError::Refused(reason) => Error::FailedPrecondition(format!(
            "the VMM refused the configuration: {} (error id {eid})",
            scrub(&reason, resolved, client)
        )),
        VmmError::Gone(_) | VmmError::Timeout(_) | VmmError::Io(_) => {
            Error::Backend(format!("the VMM could not be started (error id {eid})"))
        }
    }
}

/// A VMM failure as the service's error, for a step that has no better
/// answer (the message may carry a VMM's own words: it goes to metald's
/// log and, through a plan's failure policy, under an error id only).
fn vmm_err(e: VmmError) -> Error {
    Error::Backend(e.to_string())
}

/// What the service is built from: the adapters behind every port.
pub struct Ports {
    pub store: Arc<dyn Store>,
    pub vmm: Arc<dyn Vmm>,
    /// Host networking; `None` when disabled (VMs with interfaces are then
    /// refused).
    pub network: Option<Arc<dyn Network>>,
    /// Latest measured usage per VM, for GetVmInfo.
    pub usage: Option<Arc<dyn UsageSource>>,
    /// Told about every stored change (billing).
    pub observers: Vec<Arc<dyn Observer>>,
    /// Told how operations, exits and background passes went (metrics).
    pub telemetry: Arc<dyn Telemetry>,
}

impl Ports {
    /// A store and a backend, and nothing else.
    pub fn new(store: Arc<dyn Store>, vmm: Arc<dyn Vmm>) -> Self {
        Ports {
            store,
            vmm,
            network: None,
            usage: None,
            observers: Vec::new(),
            telemetry: Arc::new(NoTelemetry),
        }
    }
}

impl VmService {
    /// Builds the service over its ports.
    pub fn new(ports: Ports, config: ServiceConfig) -> Self {
        let Ports {
            store,
            vmm,
            network,
            usage,
            observers,
            telemetry,
        } = ports;
        let quotas = std::sync::RwLock::new(Arc::new(config.quotas.clone()));
        VmService {
            inner: Arc::new(Inner {
                quotas,
                create_rate: CreateRate::default(),
                booting: Mutex::new(HashSet::new()),
                store: Arc::new(crate::tally::Tally::new(store)),
                vmm,
                config,
                locks: Arc::default(),
                disk_claims: tokio::sync::Mutex::new(()),
                suspects: Mutex::new(HashSet::new()),
                network,
                usage,
                observers,
                telemetry,
                crash: Default::default(),
            }),
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

    /// The store as the service keeps it: its reads are answered from the
    /// service's copies of the rows (no SQLite trip), and a write through
    /// it keeps those copies true. For read-mostly callers such as the
    /// metrics scrape.
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
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
        vm.plan = None;
        vm.modified_at = now();
        // An outcome with a VMM (running, paused) is written without an
        // fsync: only a power cut can lose it, and a power cut ends the VMM
        // too; the durable row before it (the plan begun, or the VM running)
        // is what recovery then finds. Every other outcome waits for the
        // disk. This keeps the fsync out of BootVm's answer.
        let name = format!("store.write.{}", state.as_str());
        self.write(vm, name, !state.has_process()).await?;
        self.changed(vm);
        Ok(())
    }

    /// Writes the VM's row in a span named `name`: durably, or committed
    /// but not fsynced ([`Store::update_unsynced`]).
    async fn write(&self, vm: &VmRecord, name: String, durable: bool) -> Result<()> {
        let span = tracing::info_span!(
            "store.write",
            otel.name = %name,
            metald.customer_id = %vm.customer,
        );
        let store = &self.inner.store;
        let written = if durable {
            store.update(vm).instrument(span).await
        } else {
            store.update_unsynced(vm).instrument(span).await
        };
        written.map_err(store_err)
    }
}
