//! Billing's own counters ([`metald_billing::Stats`]) exposed at scrape
//! time: nothing is counted twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metald_billing::{Billing, Stats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// Reads billing's stats on every scrape.
pub struct BillingCollector(pub Arc<Billing>);

impl std::fmt::Debug for BillingCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BillingCollector")
    }
}

/// Billing's counters: (name without `_total`, help, the counter).
fn counters(s: &Stats) -> [(&'static str, &'static str, &AtomicU64); 9] {
    [
        (
            "billing_samples_taken",
            "Usage samples the meter took",
            &s.samples_taken,
        ),
        (
            "billing_batches_sent",
            "Sample batches the billing service acknowledged",
            &s.batches_sent,
        ),
        (
            "billing_batches_failed",
            "Sample batches the billing service failed, refused or did not answer",
            &s.batches_failed,
        ),
        (
            "billing_gaps_reported",
            "Gap notices spooled for the billing service (a period without samples)",
            &s.gaps_spooled,
        ),
        (
            "billing_samples_dropped",
            "Samples dropped because the spool was full (each range reported as a gap)",
            &s.samples_dropped_spool_full,
        ),
        (
            "billing_delivery_retries",
            "Deliveries that failed for a reason that may pass and were tried again",
            &s.delivery_retries,
        ),
        (
            "billing_parked_batches",
            "Batches the billing service refused for good, kept on disk",
            &s.parked_batches,
        ),
        (
            "billing_sampler_stalls",
            "Times sampling stalled for more than three intervals",
            &s.sampler_stalls,
        ),
        (
            "billing_spool_write_retries",
            "Spool writes that failed and were tried again",
            &s.writer_retries,
        ),
    ]
}

impl Collector for BillingCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        for (name, help, c) in counters(s) {
            let m = ConstCounter::new(c.load(Ordering::Relaxed));
            m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)?;
        }
        let spooled = ConstGauge::new(s.spooled_samples.load(Ordering::Relaxed));
        spooled.encode(enc.encode_descriptor(
            "billing_spool_samples",
            "Samples in the spool not yet acknowledged by the billing service",
            None,
            spooled.metric_type(),
        )?)?;
        let oldest = s.oldest_unsent_ns.load(Ordering::Relaxed);
        let age = match oldest {
            0 => 0.0,
            t => ((now_ns() - t) as f64 / 1e9).max(0.0),
        };
        let age = ConstGauge::new(age);
        age.encode(enc.encode_descriptor(
            "billing_oldest_unacked_sample_age",
            "Age of the oldest sample the billing service has not acknowledged (0: none)",
            Some(&Unit::Seconds),
            age.metric_type(),
        )?)?;
        Ok(())
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
