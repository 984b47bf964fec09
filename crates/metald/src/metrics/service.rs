//! The service's [`Telemetry`] port over metald's metrics, and the API's
//! [`RpcObserver`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metald_api::{RpcObserver, RpcOutcome};
use metald_core::CustomerId;
use metald_core::ports::{BootPhases, Operation, Telemetry};
use metald_core::service::{ReconcileReport, RecoveryReport};

use super::registry::{Labels, Metrics};

fn l(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

impl Telemetry for Metrics {
    fn operation(
        &self,
        op: Operation,
        backend: &str,
        outcome: &'static str,
        customer: &CustomerId,
        took: Duration,
    ) {
        let base = l(&[
            ("operation", op.as_str()),
            ("backend", backend),
            ("outcome", outcome),
        ]);
        self.operations
            .get_or_create(&self.with_customer(base, Some(customer)))
            .inc();
        // Latency of what was done: a refusal's quick answer would hide it.
        if outcome == "ok" {
            self.operation_duration
                .get_or_create(&l(&[("operation", op.as_str()), ("backend", backend)]))
                .observe(took.as_secs_f64());
        }
    }

    fn boot_phases(&self, backend: &str, phases: &BootPhases) {
        for (phase, took) in phases.named() {
            self.boot_phase_duration
                .get_or_create(&l(&[("phase", phase), ("backend", backend)]))
                .observe(took.as_secs_f64());
        }
    }

    fn vmm_exit(&self, backend: &str, expected: bool) {
        let kind = if expected { "expected" } else { "unexpected" };
        self.vmm_exits
            .get_or_create(&l(&[("backend", backend), ("kind", kind)]))
            .inc();
    }

    fn recovered(&self, r: &RecoveryReport) {
        self.recovery_runs.inc();
        for (result, n) in [
            ("adopted", r.adopted),
            ("failed", r.failed),
            ("finished", r.finished),
            ("given_up", r.given_up),
            ("unsettled", r.unsettled),
        ] {
            self.recovered_vms
                .get_or_create(&l(&[("result", result)]))
                .inc_by(n as u64);
        }
    }

    fn reconciled(&self, r: &ReconcileReport, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.reconcile_runs
            .get_or_create(&l(&[("outcome", outcome)]))
            .inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.reconcile_last_run.set(now);
        for (kind, n) in [
            ("orphan_process", r.orphan_processes),
            ("orphan_dir", r.orphan_dirs),
            ("orphan_network", r.orphan_networks),
            ("dead_vmm", r.dead),
            ("drift", r.drifted),
            ("abandoned_create", r.abandoned_creates),
            ("settled_plan", r.settled),
        ] {
            self.reconcile_found
                .get_or_create(&l(&[("kind", kind)]))
                .inc_by(n as u64);
        }
    }

    fn network(&self, attached: bool) {
        let action = if attached { "attach" } else { "detach" };
        self.network_operations
            .get_or_create(&l(&[("action", action)]))
            .inc();
    }

    fn quota_refused(&self, quota: &'static str, customer: &CustomerId) {
        let labels = self.with_customer(l(&[("quota", quota)]), Some(customer));
        self.quota_refusals.get_or_create(&labels).inc();
    }

    fn store_error(&self) {
        self.store_errors.inc();
    }
}

impl RpcObserver for Metrics {
    fn rpc_finished(&self, rpc: &RpcOutcome<'_>) {
        let base = l(&[
            ("method", rpc.method),
            ("protocol", rpc.protocol),
            ("code", rpc.code),
        ]);
        self.rpc_requests
            .get_or_create(&self.with_customer(base, rpc.customer))
            .inc();
        self.rpc_duration
            .get_or_create(&l(&[("method", rpc.method)]))
            .observe(rpc.elapsed.as_secs_f64());
    }
}
