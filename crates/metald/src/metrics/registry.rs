//! metald's Prometheus metrics: every family, its labels and buckets, and
//! the registry they are encoded from (OpenMetrics text). The names and
//! their meaning are documented in docs/metrics.md.

use metald_core::CustomerId;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::billing::BillingCollector;

/// Label values by name; the set of names per family is fixed.
pub type Labels = Vec<(&'static str, String)>;

type Counters = Family<Labels, Counter>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;
type Gauges = Family<Labels, Gauge>;

fn rpc_buckets() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn lifecycle_buckets() -> Histogram {
    // 5 ms .. ~5 min
    Histogram::new(exponential_buckets(0.005, 2.0, 17))
}

/// Every metric metald keeps itself (billing's are read from its stats at
/// scrape time, see [`BillingCollector`]).
#[derive(Debug)]
pub struct Metrics {
    /// Adds `customer_id` to the RPC, lifecycle and quota series.
    pub high_cardinality: bool,
    pub rpc_requests: Counters,
    pub rpc_duration: Histograms,
    pub operations: Counters,
    pub operation_duration: Histograms,
    pub boot_phase_duration: Histograms,
    pub vms: Gauges,
    pub vmm_exits: Counters,
    pub recovery_runs: Counter,
    pub recovered_vms: Counters,
    pub reconcile_runs: Counters,
    pub reconcile_last_run: Gauge,
    pub reconcile_found: Counters,
    pub network_operations: Counters,
    pub ip_leases: Gauge,
    pub quota_refusals: Counters,
    pub store_errors: Counter,
}

impl Metrics {
    pub fn new(high_cardinality: bool) -> Self {
        let rpc: fn() -> Histogram = rpc_buckets;
        let lifecycle: fn() -> Histogram = lifecycle_buckets;
        Metrics {
            high_cardinality,
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(rpc),
            operations: Family::default(),
            operation_duration: Family::new_with_constructor(lifecycle),
            boot_phase_duration: Family::new_with_constructor(lifecycle),
            vms: Family::default(),
            vmm_exits: Family::default(),
            recovery_runs: Counter::default(),
            recovered_vms: Family::default(),
            reconcile_runs: Family::default(),
            reconcile_last_run: Gauge::default(),
            reconcile_found: Family::default(),
            network_operations: Family::default(),
            ip_leases: Gauge::default(),
            quota_refusals: Family::default(),
            store_errors: Counter::default(),
        }
    }

    /// `labels`, plus `customer_id` when high cardinality is on.
    pub fn with_customer(&self, mut labels: Labels, customer: Option<&CustomerId>) -> Labels {
        if self.high_cardinality {
            let c = customer.map(|c| c.as_str().to_owned()).unwrap_or_default();
            labels.push(("customer_id", c));
        }
        labels
    }

    /// The registry over these metrics and billing's.
    pub fn registry(&self, billing: Option<BillingCollector>) -> Registry {
        let mut r = Registry::with_prefix("metald");
        r.register(
            "rpc_requests",
            "RPCs answered, by method, protocol and Connect code",
            self.rpc_requests.clone(),
        );
        r.register_with_unit(
            "rpc_duration",
            "Time from an RPC's arrival to the last byte of its answer",
            Unit::Seconds,
            self.rpc_duration.clone(),
        );
        r.register(
            "lifecycle_operations",
            "Lifecycle operations, by operation, backend and outcome",
            self.operations.clone(),
        );
        r.register_with_unit(
            "lifecycle_operation_duration",
            "Duration of successful lifecycle operations, by operation and backend",
            Unit::Seconds,
            self.operation_duration.clone(),
        );
        r.register_with_unit(
            "boot_phase_duration",
            "Duration of each phase of starting a VMM, by phase and backend",
            Unit::Seconds,
            self.boot_phase_duration.clone(),
        );
        self.register_host(&mut r);
        if let Some(b) = billing {
            r.register_collector(Box::new(b));
        }
        r
    }

    /// What the host holds and what the background passes did.
    fn register_host(&self, r: &mut Registry) {
        r.register(
            "vms",
            "VMs on this host, by state and backend (read from the store at scrape time)",
            self.vms.clone(),
        );
        r.register(
            "vmm_exits",
            "VMM processes that ended, by backend and kind (expected, unexpected)",
            self.vmm_exits.clone(),
        );
        r.register(
            "recovery_runs",
            "Start-up recoveries (resumption of plans, adoption of VMMs)",
            self.recovery_runs.clone(),
        );
        r.register(
            "recovery_vms",
            "VMs settled by start-up recovery, by result",
            self.recovered_vms.clone(),
        );
        r.register(
            "reconcile_runs",
            "Reconcile passes, by outcome",
            self.reconcile_runs.clone(),
        );
        r.register(
            "reconcile_last_run_timestamp_seconds",
            "When the last reconcile pass ended (Unix seconds)",
            self.reconcile_last_run.clone(),
        );
        r.register(
            "reconcile_found",
            "What reconcile passes found and settled, by kind (orphan processes, directories and networks removed, dead VMMs, drift, plans)",
            self.reconcile_found.clone(),
        );
        r.register(
            "network_operations",
            "Network interfaces attached and detached, by action",
            self.network_operations.clone(),
        );
        r.register(
            "ip_leases",
            "Addresses leased to VMs (read from the store at scrape time)",
            self.ip_leases.clone(),
        );
        r.register(
            "quota_refusals",
            "Requests refused by a quota or the host's capacity, by quota",
            self.quota_refusals.clone(),
        );
        r.register(
            "store_errors",
            "Store reads and writes that failed",
            self.store_errors.clone(),
        );
    }
}

/// The registry encoded as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}
