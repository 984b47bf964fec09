//! What every call took and how it ended: an HDR histogram per RPC, errors
//! by RPC and Connect code, and per-second latency for the chart.
//!
//! Expected errors are the refusals a correct metald gives a load like this
//! one: `resource_exhausted` (a customer's quota, the host's capacity, the
//! create rate or the request rate). Any other error is unexpected and makes
//! metald-stress exit non-zero.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use connectrpc::ErrorCode;
use hdrhistogram::Histogram;
use metald_proto::vmprovisioner::v1 as pb;

/// The codes that do not count against a run.
pub const EXPECTED: &[ErrorCode] = &[ErrorCode::ResourceExhausted];

/// The RPCs of `vmprovisioner.v1.VmService`, in the order tables list them.
const SPECS: [connectrpc::Spec; 9] = [
    pb::VM_SERVICE_CREATE_VM_SPEC,
    pb::VM_SERVICE_BOOT_VM_SPEC,
    pb::VM_SERVICE_SHUTDOWN_VM_SPEC,
    pb::VM_SERVICE_PAUSE_VM_SPEC,
    pb::VM_SERVICE_RESUME_VM_SPEC,
    pb::VM_SERVICE_REBOOT_VM_SPEC,
    pb::VM_SERVICE_GET_VM_INFO_SPEC,
    pb::VM_SERVICE_LIST_VMS_SPEC,
    pb::VM_SERVICE_DELETE_VM_SPEC,
];

/// The RPCs' method names (`CreateVm`, …), from the generated code.
pub fn rpcs() -> impl Iterator<Item = &'static str> {
    SPECS
        .iter()
        .map(|s| s.procedure.rsplit('/').next().unwrap_or(s.procedure))
}

/// The longest latency told apart (an hour, in µs); longer ones count as it.
const MAX_US: u64 = 3_600_000_000;

/// Count and latency of one RPC's calls in one second of the run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Second {
    pub calls: u64,
    pub total_us: u64,
    pub max_us: u64,
}

/// An error seen: how often, and the first message (for the report).
#[derive(Debug, Clone)]
pub struct ErrorSeen {
    pub count: u64,
    pub first_message: String,
}

#[derive(Default)]
struct Inner {
    latency: BTreeMap<&'static str, Histogram<u64>>,
    errors: BTreeMap<(&'static str, &'static str), ErrorSeen>,
    timeline: BTreeMap<(&'static str, u64), Second>,
}

pub struct Stats {
    start: Instant,
    inner: Mutex<Inner>,
}

/// A finished copy of the numbers, for the report.
pub struct Snapshot {
    pub elapsed: Duration,
    pub latency: BTreeMap<&'static str, Histogram<u64>>,
    pub errors: BTreeMap<(&'static str, &'static str), ErrorSeen>,
    pub timeline: BTreeMap<(&'static str, u64), Second>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            start: Instant::now(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Records one call that started at `began` (failed calls too: their
    /// latency is part of what a client sees).
    pub fn record(
        &self,
        rpc: &'static str,
        began: Instant,
        error: Option<&connectrpc::ConnectError>,
    ) {
        debug_assert!(rpcs().any(|r| r == rpc), "{rpc} is a VmService RPC");
        let took = began.elapsed();
        let us = took.as_micros().clamp(1, u128::from(u64::MAX)) as u64;
        let second = began.duration_since(self.start).as_secs();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .latency
            .entry(rpc)
            .or_insert_with(|| {
                Histogram::new_with_bounds(1, MAX_US, 3).expect("the bounds are valid")
            })
            .saturating_record(us);
        let s = inner.timeline.entry((rpc, second)).or_default();
        s.calls += 1;
        s.total_us += us;
        s.max_us = s.max_us.max(us);
        if let Some(e) = error {
            let seen = inner
                .errors
                .entry((rpc, e.code.as_str()))
                .or_insert_with(|| ErrorSeen {
                    count: 0,
                    first_message: e
                        .message
                        .clone()
                        .unwrap_or_default()
                        .chars()
                        .take(200)
                        .collect(),
                });
            seen.count += 1;
        }
    }

    /// Calls and errors so far.
    pub fn totals(&self) -> (u64, u64) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let calls = inner.latency.values().map(|h| h.len()).sum();
        let errors = inner.errors.values().map(|e| e.count).sum();
        (calls, errors)
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Snapshot {
            elapsed: self.start.elapsed(),
            latency: inner.latency.clone(),
            errors: inner.errors.clone(),
            timeline: inner.timeline.clone(),
        }
    }
}

/// Whether `code` (as Connect spells it) is an expected refusal.
pub fn is_expected(code: &str) -> bool {
    EXPECTED.iter().any(|c| c.as_str() == code)
}

pub fn count_unexpected(errors: &BTreeMap<(&'static str, &'static str), ErrorSeen>) -> u64 {
    errors
        .iter()
        .filter(|((_, code), _)| !is_expected(code))
        .map(|(_, e)| e.count)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_grouped_by_code_and_only_unexpected_ones_count() {
        let s = Stats::new();
        let t = Instant::now();
        s.record("CreateVm", t, None);
        let quota = connectrpc::ConnectError::new(ErrorCode::ResourceExhausted, "quota vms");
        s.record("CreateVm", t, Some(&quota));
        s.record("CreateVm", t, Some(&quota));
        let bad = connectrpc::ConnectError::new(ErrorCode::Internal, "boom");
        s.record("BootVm", t, Some(&bad));
        let snap = s.snapshot();
        assert_eq!(snap.errors[&("CreateVm", "resource_exhausted")].count, 2);
        assert_eq!(snap.errors[&("BootVm", "internal")].first_message, "boom");
        assert_eq!(count_unexpected(&snap.errors), 1);
        assert_eq!(s.totals(), (4, 3));
        assert_eq!(snap.latency["CreateVm"].len(), 3);
    }
}
