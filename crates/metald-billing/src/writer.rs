//! The spool writer task: applies the meter task's writes to the spool in
//! the order they were made, so sampling never waits for an fsync.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::error;

use crate::BillingConfig;
use crate::spool::{MeterRow, SampleRow, Spool};

/// Work for the spool writer, applied in order.
pub(crate) enum Write {
    Append {
        samples: Vec<SampleRow>,
        meters: Vec<MeterRow>,
    },
    Event {
        kind: &'static str,
        vm: String,
        name: String,
        customer: String,
        t1: i64,
        t2: i64,
    },
    /// The VM's row is gone: its meter row may go once all is delivered.
    Removed { vm: String },
}

/// Applies spool writes in the order the meter task made them.
pub(crate) async fn writer(
    spool: Spool,
    config: BillingConfig,
    spooled: Arc<AtomicI64>,
    mut rx: mpsc::Receiver<Write>,
) {
    while let Some(w) = rx.recv().await {
        match w {
            Write::Event {
                kind,
                vm,
                name,
                customer,
                t1,
                t2,
            } => {
                if let Err(e) = spool.push_event(kind, &vm, &name, &customer, t1, t2).await {
                    error!(vm_id = %vm, kind, error = %e, "cannot spool a billing notification");
                }
            }
            Write::Removed { vm } => {
                if let Err(e) = spool.mark_removed(&vm).await {
                    error!(vm_id = %vm, error = %e, "cannot mark a removed VM in the billing spool");
                }
            }
            Write::Append {
                mut samples,
                meters,
            } => {
                let held = spooled.load(Ordering::Relaxed);
                if held + samples.len() as i64 > config.max_spooled_samples {
                    // Never silently: say so, and tell billing the ranges.
                    let mut ranges: HashMap<String, (i64, i64)> = HashMap::new();
                    for s in &samples {
                        let r = ranges.entry(s.vm_id.clone()).or_insert((s.ts, s.ts));
                        r.0 = r.0.min(s.ts);
                        r.1 = r.1.max(s.ts);
                    }
                    error!(
                        spooled = held,
                        dropped = samples.len(),
                        cap = config.max_spooled_samples,
                        "billing spool is full (the billing service has not acknowledged for a long time): \
                         dropping samples, reported as gaps"
                    );
                    for (vm, (from, to)) in ranges {
                        let (name, customer) = meters
                            .iter()
                            .find(|m| m.vm_id == vm)
                            .map(|m| (m.vm_name.clone(), m.customer_id.clone()))
                            .unwrap_or_default();
                        if let Err(e) = spool
                            .push_event("gap", &vm, &name, &customer, from, to)
                            .await
                        {
                            error!(vm_id = %vm, error = %e, "cannot spool a billing gap");
                        }
                    }
                    samples.clear();
                }
                // Retried until it lands: the samples are the bill.
                let mut delay = Duration::from_millis(100);
                loop {
                    match spool.append(&samples, &meters).await {
                        Ok(()) => {
                            spooled.fetch_add(samples.len() as i64, Ordering::Relaxed);
                            break;
                        }
                        Err(e) => {
                            error!(error = %e, retry_in = ?delay, "cannot write the billing spool");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
        }
    }
}
