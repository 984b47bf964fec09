//! The traits adapters implement. The service sees only these; the binary
//! picks implementations (SQLite store, QEMU backend, ...) and hands them
//! over as trait objects. Backends know nothing of customers or billing.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::net::{NicAttachment, NicSpec};
use crate::state::VmState;
use crate::vm::{CustomerId, VmId, VmSpec};

/// How a store or backend failure is described to the service.
pub type PortError = String;

/// Where a VMM process can be found again after metald restarts. Written to
/// the store before the service reports success, so no process metald
/// started is ever unknown to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmRuntime {
    /// Which backend started it (`qemu`, `firecracker`, ...).
    pub backend: String,
    /// The VMM's process id.
    pub pid: i32,
    /// The process start time in clock ticks since boot (field 22 of
    /// `/proc/<pid>/stat`): with the pid, an identity a reused pid can't fake.
    pub start_time: u64,
    /// The VMM's control socket (QMP, Firecracker API, ...).
    pub socket: PathBuf,
}

/// One VM as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub id: VmId,
    pub customer: CustomerId,
    pub spec: VmSpec,
    pub state: VmState,
    /// Present exactly while a VMM process is believed to exist.
    pub runtime: Option<VmmRuntime>,
    /// Why the VM last failed or stopped, for GetVmInfo.
    pub last_error: Option<String>,
    /// A multi-step operation that has begun and not yet finished. Written
    /// before its first side effect, cleared by its last write; a metald
    /// that finds one on start-up finishes or rolls back the operation.
    pub pending: Option<Pending>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub modified_at: i64,
}

/// Lifecycle work in progress, as recorded in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pending {
    /// The VM is being created (addresses leased, network attached).
    /// Interrupted: rolled back (network detached, leases and row removed).
    Create,
    /// A VMM is being started. Interrupted: rolled back (any process
    /// killed, files removed, state left as it was).
    Boot,
    /// The VMM is being stopped. Interrupted: finished (killed, state
    /// `shutdown`).
    Shutdown,
    /// The VM is being removed. Interrupted: finished (killed, files and
    /// row removed).
    Delete,
}

impl Pending {
    /// Stable name used in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Pending::Create => "create",
            Pending::Boot => "boot",
            Pending::Shutdown => "shutdown",
            Pending::Delete => "delete",
        }
    }

    /// Inverse of [`Pending::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Pending::Create,
            Pending::Boot,
            Pending::Shutdown,
            Pending::Delete,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// A page of a customer's VMs.
#[derive(Debug, Clone, PartialEq)]
pub struct VmPage {
    pub vms: Vec<VmRecord>,
    /// Opaque position after the last VM, when more remain.
    pub next_cursor: Option<i64>,
    /// How many VMs match the filter in all pages.
    pub total: i64,
}

/// Errors a store distinguishes because the service reacts to them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("already exists")]
    AlreadyExists,
    #[error("{0}")]
    Other(PortError),
}

/// Durable VM records. Implementations: SQLite now, PostgreSQL later, so
/// keep queries portable.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a new VM; [`StoreError::AlreadyExists`] when the id is taken.
    async fn insert(&self, vm: &VmRecord) -> Result<(), StoreError>;
    /// One VM by id, whoever owns it.
    async fn get(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError>;
    /// Replaces spec, state, runtime, last error, pending operation and
    /// modified time.
    async fn update(&self, vm: &VmRecord) -> Result<(), StoreError>;
    /// Removes the VM's row. Removing a missing row is not an error.
    async fn remove(&self, id: &VmId) -> Result<(), StoreError>;
    /// A customer's VMs in creation order, starting after `cursor`,
    /// restricted to `states` unless it is empty.
    async fn list(
        &self,
        customer: &CustomerId,
        states: &[VmState],
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<VmPage, StoreError>;
    /// Every VM of every customer, for start-up adoption and reconciliation.
    async fn all(&self) -> Result<Vec<VmRecord>, StoreError>;

    /// IPAM: records `addr` as leased to `vm`. `Ok(false)` when another VM
    /// holds it; never hands an address out twice, also under concurrent
    /// callers.
    async fn lease(&self, addr: IpAddr, vm: &VmId) -> Result<bool, StoreError>;
    /// Every lease, for allocation and the orphan sweep.
    async fn leases(&self) -> Result<Vec<(IpAddr, VmId)>, StoreError>;
    /// Releases every address of `vm`.
    async fn release(&self, vm: &VmId) -> Result<(), StoreError>;
}

/// Where VM addresses come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnets {
    /// IPv4 network, prefix length and the gateway the guest routes through.
    pub v4: (Ipv4Addr, u8, Ipv4Addr),
    pub v6: (Ipv6Addr, u8, Ipv6Addr),
}

/// Host networking for VMs: a namespace, veth and TAP per interface.
#[async_trait]
pub trait Network: Send + Sync + 'static {
    /// The subnets IPAM allocates from.
    fn subnets(&self) -> Subnets;
    /// A stable locally administered MAC for interface `index` of `vm`.
    fn mac_for(&self, vm: &VmId, index: usize) -> String;
    /// Creates (idempotently) the devices of one interface with the given
    /// MAC and rate limits; returns the names it used.
    async fn attach(
        &self,
        vm: &VmId,
        index: usize,
        nic: &NicSpec,
        mac: &str,
    ) -> Result<NicAttachment, PortError>;
    /// Removes every device of interface `index` of `vm`; missing devices
    /// are not an error.
    async fn detach(&self, vm: &VmId, index: usize) -> Result<(), PortError>;
    /// Interfaces metald created on this host, by naming scheme and
    /// ownership mark, for the orphan sweep.
    async fn scan(&self) -> Result<Vec<(VmId, usize)>, PortError>;
}

/// What a VMM reports about a guest it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStatus {
    Running,
    Paused,
}

/// How a VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmExit {
    /// Exit code when the process exited and metald could reap it.
    pub code: Option<i32>,
    /// Terminating signal, when known.
    pub signal: Option<i32>,
}

impl VmmExit {
    /// Whether the VMM ended cleanly (the guest powered off).
    pub fn is_clean(&self) -> bool {
        self.code == Some(0)
    }

    /// Human description for `backend_info` and logs.
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "exited (status unknown: not metald's child)".into(),
        }
    }
}

/// A VMM process, or a VM directory, found on the host by a backend's
/// naming scheme, whether or not a VM row claims it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostResources {
    /// Live VMM processes: the VM they serve, pid and start time.
    pub processes: Vec<(VmId, i32, u64)>,
    /// VM ids that have a directory of files.
    pub dirs: Vec<VmId>,
}

/// Why a VMM could not start (or restart) a guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootError {
    /// The VMM rejected the configuration, in its own words (a kernel that
    /// is a directory, more memory than the host allows): retrying the same
    /// request cannot succeed.
    #[error("{0}")]
    Refused(String),
    /// Anything else: the VMM could not be started, crashed or did not
    /// answer in time.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for BootError {
    fn from(e: String) -> Self {
        BootError::Failed(e)
    }
}

/// Device counters a VMM keeps itself (Firecracker's metrics, Cloud
/// Hypervisor's `vm.counters`): cumulative bytes since the VMM started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// How to stop a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Ask the guest to power off (ACPI power button / Ctrl-Alt-Del) and
    /// kill the VMM if it has not exited after the timeout.
    Graceful(Duration),
    /// Kill the VMM at once.
    Force,
}

/// A hypervisor driver: one VMM process per VM.
#[async_trait]
pub trait Vmm: Send + Sync + 'static {
    /// Backend name, as in `UNKEY_METALD_BACKEND`.
    fn name(&self) -> &'static str;

    /// Starts a VMM process for `id` and lets the guest run. Returns once
    /// the VMM reports the guest running. On error nothing is left behind.
    async fn boot(&self, id: &VmId, spec: &VmSpec) -> Result<VmmRuntime, BootError>;

    /// Stops the guest's vCPUs.
    async fn pause(&self, rt: &VmmRuntime) -> Result<(), PortError>;

    /// Lets a paused guest's vCPUs run again.
    async fn resume(&self, rt: &VmmRuntime) -> Result<(), PortError>;

    /// Resets the guest. Backends that must restart the process return the
    /// new runtime.
    async fn reboot(
        &self,
        id: &VmId,
        spec: &VmSpec,
        rt: &VmmRuntime,
    ) -> Result<VmmRuntime, BootError>;

    /// Stops the guest; when this returns the VMM process is gone.
    async fn shutdown(&self, rt: &VmmRuntime, mode: StopMode) -> Result<(), PortError>;

    /// Kills the VM's process if it is still the recorded one, and removes
    /// every file the backend made for `id`. Idempotent; `rt` may be absent
    /// when a crash lost it.
    async fn destroy(&self, id: &VmId, rt: Option<&VmmRuntime>) -> Result<(), PortError>;

    /// Re-attaches to a VMM after metald restarted: checks the pid and its
    /// start time, then asks the VMM for the guest's state. An error means
    /// the process is not (or no longer) this VM's VMM.
    async fn adopt(&self, id: &VmId, rt: &VmmRuntime) -> Result<GuestStatus, PortError>;

    /// Resolves when the VMM process exits.
    fn wait_exit(&self, rt: &VmmRuntime) -> BoxFuture<'static, VmmExit>;

    /// Whether the recorded process still runs (same pid, same start time,
    /// not a zombie). Cheap: reads `/proc`.
    fn is_alive(&self, rt: &VmmRuntime) -> bool;

    /// Removes what a VMM leaves behind after it exited on its own (its
    /// control socket). Keeps the console log for the post-mortem.
    async fn release(&self, id: &VmId, rt: &VmmRuntime);

    /// Every VMM process and VM directory this backend owns on the host,
    /// found by its naming scheme, for the reconciler.
    async fn scan(&self) -> HostResources;

    /// Kills a VMM process the reconciler found unclaimed, if it is still
    /// the process that started at `start_time`.
    async fn kill_orphan(&self, pid: i32, start_time: u64) -> Result<(), PortError>;

    /// Backend facts for GetVmInfo (`backend_info`): VMM name and version,
    /// pid, socket, console log.
    async fn describe(&self, id: &VmId, rt: Option<&VmmRuntime>) -> BTreeMap<String, String>;

    /// The VMM's own device counters, where it keeps them; `None` for a
    /// backend that has none (metald then measures from the host side).
    async fn counters(&self, _id: &VmId, _rt: &VmmRuntime) -> Option<DeviceCounters> {
        None
    }
}

/// Told about every stored change of a VM, after the store accepted it.
/// Billing uses it to start and stop metering; it must return quickly and
/// never fail the operation (queue work, don't do it inline).
pub trait Observer: Send + Sync + 'static {
    /// The VM's row now reads `vm`.
    fn vm_changed(&self, vm: &VmRecord);
    /// The VM's row is gone.
    fn vm_removed(&self, id: &VmId);
}

/// The latest usage measured for a VM (GetVmInfo's `metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VmUsage {
    /// Share of one CPU used over the last sample interval, in percent
    /// (may exceed 100 with several vCPUs).
    pub cpu_percent: f64,
    pub memory_bytes: i64,
    pub disk_read_bytes: i64,
    pub disk_write_bytes: i64,
    pub net_rx_bytes: i64,
    pub net_tx_bytes: i64,
    /// Seconds since metering of this VMM began.
    pub uptime_seconds: i64,
}

/// Where the service reads a VM's latest usage from (billing's sampler).
pub trait UsageSource: Send + Sync + 'static {
    fn usage(&self, id: &VmId) -> Option<VmUsage>;
}
