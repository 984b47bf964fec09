//! Counters of what billing did and where it had to wait, as plain
//! atomics: cheap to bump on every path, and readable by an exporter
//! (Prometheus or a log line) through [`Billing::stats`](crate::Billing::stats).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Totals since metald started (`spooled_samples` is a level, not a total).
#[derive(Debug, Default)]
pub struct Stats {
    /// Changes that replaced an older change of the same VM the meter task
    /// had not taken yet (the inbox holds one entry per VM).
    pub inbox_coalesced: AtomicU64,
    /// Times the meter task found the writer's queue full and waited
    /// (sampling paused meanwhile).
    pub sampler_waits: AtomicU64,
    /// Times sampling stalled for more than three intervals (each reported
    /// as a gap).
    pub sampler_stalls: AtomicU64,
    /// Spool writes that failed and were tried again.
    pub writer_retries: AtomicU64,
    /// Samples in the spool (delivered ones are deleted; parked ones stay).
    pub spooled_samples: AtomicI64,
    /// Usage samples taken by the meter task.
    pub samples_taken: AtomicU64,
    /// Batches of samples the billing service acknowledged.
    pub batches_sent: AtomicU64,
    /// Batches of samples the billing service failed, refused or did not
    /// answer (each one tried again or parked).
    pub batches_failed: AtomicU64,
    /// When the oldest sample not yet acknowledged was taken (Unix ns; 0:
    /// none), as of the last delivery round.
    pub oldest_unsent_ns: AtomicI64,
    /// Samples dropped because the spool was full (each range reported as a
    /// gap).
    pub samples_dropped_spool_full: AtomicU64,
    /// Gap notices written to the spool, whatever the cause.
    pub gaps_spooled: AtomicU64,
    /// Deliveries the billing service failed or refused for a reason that
    /// may pass (tried again after a backoff).
    pub delivery_retries: AtomicU64,
    /// Batches the billing service refused for good, kept on disk and
    /// reported as gaps.
    pub parked_batches: AtomicU64,
    /// Samples in those batches.
    pub parked_samples: AtomicU64,
    /// Notices the billing service refused for good, kept on disk (other
    /// than gaps, each also reported as a gap).
    pub parked_notices: AtomicU64,
}

impl Stats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One counter's value (for logs and tests).
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
