//! The spool writer task: applies the meter task's writes to the spool in
//! the order they were made, so sampling never waits for an fsync.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::error;

use crate::spool::{MeterRow, SampleRow, Spool};
use crate::{BillingConfig, Stats};

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

/// Applies spool writes in the order the meter task made them. A write
/// that fails is tried again (backoff up to 5 s) until it lands: the
/// samples and notices are the bill. Memory does not grow meanwhile: the
/// queue in front of the writer is bounded, so the meter task waits and the
/// time it could not sample is reported as a gap. The writer ends once the
/// meter task is gone and the queue is empty.
pub(crate) async fn writer(
    spool: Spool,
    config: BillingConfig,
    stats: Arc<Stats>,
    mut rx: mpsc::Receiver<Write>,
) {
    while let Some(w) = rx.recv().await {
        apply(&spool, &config, &stats, w).await;
    }
}

async fn apply(spool: &Spool, config: &BillingConfig, stats: &Stats, w: Write) {
    match w {
        Write::Event {
            kind,
            vm,
            name,
            customer,
            t1,
            t2,
        } => {
            let what = format!("spooling a billing {kind} notice of {vm}");
            retry(stats, &what, || {
                spool.push_event(kind, &vm, &name, &customer, t1, t2)
            })
            .await;
            if kind == "gap" {
                Stats::bump(&stats.gaps_spooled);
            }
        }
        Write::Removed { vm } => {
            let what = format!("marking {vm} removed in the billing spool");
            retry(stats, &what, || spool.mark_removed(&vm)).await;
        }
        Write::Append {
            mut samples,
            meters,
        } => {
            let held = stats.spooled_samples.load(Ordering::Relaxed);
            if held + samples.len() as i64 > config.max_spooled_samples {
                drop_for_space(spool, config, stats, held, &samples, &meters).await;
                samples.clear();
            }
            retry(stats, "writing samples to the billing spool", || {
                spool.append(&samples, &meters)
            })
            .await;
            stats
                .spooled_samples
                .fetch_add(samples.len() as i64, Ordering::Relaxed);
        }
    }
}

/// The spool is full: the samples are dropped, never silently: say so,
/// and tell billing the ranges.
async fn drop_for_space(
    spool: &Spool,
    config: &BillingConfig,
    stats: &Stats,
    held: i64,
    samples: &[SampleRow],
    meters: &[MeterRow],
) {
    let mut ranges: HashMap<std::sync::Arc<str>, (i64, i64)> = HashMap::new();
    for s in samples {
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
    stats
        .samples_dropped_spool_full
        .fetch_add(samples.len() as u64, Ordering::Relaxed);
    for (vm, (from, to)) in ranges {
        let (name, customer) = meters
            .iter()
            .find(|m| *m.vm_id == *vm)
            .map(|m| (m.vm_name.clone(), m.customer_id.clone()))
            .unwrap_or_default();
        let what = format!("spooling a billing gap of {vm}");
        retry(stats, &what, || {
            spool.push_event("gap", &vm, &name, &customer, from, to)
        })
        .await;
        Stats::bump(&stats.gaps_spooled);
    }
}

/// Runs `op` until it succeeds, backing off from 100 ms to 5 s.
async fn retry<F, Fut>(stats: &Stats, what: &str, mut op: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut delay = Duration::from_millis(100);
    while let Err(e) = op().await {
        Stats::bump(&stats.writer_retries);
        error!(error = %e, retry_in = ?delay, "{what} failed; trying again");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::hand;
    use crate::usage::Usage;
    use sqlx::Connection;

    fn config() -> BillingConfig {
        BillingConfig {
            enabled: true,
            endpoint: "http://127.0.0.1:1".into(),
            sample_interval: Duration::from_millis(100),
            batch_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(1),
            sync_interval: Duration::from_secs(1),
            max_spooled_samples: 1_000_000,
            instance_id: "test".into(),
        }
    }

    async fn until(what: &str, cond: impl AsyncFn() -> bool) {
        let start = std::time::Instant::now();
        while !cond().await {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what}: not within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Another connection holding the write lock: every write of the
    /// writer fails (after the spool's busy timeout) until it lets go.
    async fn lock(db: &std::path::Path) -> sqlx::SqliteConnection {
        let url = format!("sqlite://{}", db.display());
        let mut lock = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut lock)
            .await
            .unwrap();
        lock
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn while_the_spool_cannot_be_written_the_queue_holds_the_sampler_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("billing.db");
        let spool = Spool::open(&db).await.unwrap();
        let mut lock = lock(&db).await;

        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(crate::WRITER_QUEUE);
        let writer = tokio::spawn(writer(spool.clone(), config(), stats.clone(), rx));
        let stop = Write::Event {
            kind: "stopped",
            vm: "a-1".into(),
            name: "a".into(),
            customer: "acme".into(),
            t1: 5,
            t2: 0,
        };
        hand(&tx, &stats, stop).await;
        // The meter task goes on handing samples over, more than the queue
        // holds: it has to wait.
        let total = crate::WRITER_QUEUE as i64 + 8;
        let meter = {
            let (tx, stats) = (tx.clone(), stats.clone());
            tokio::spawn(async move {
                for seq in 0..total {
                    let samples = vec![SampleRow::new("a-1", seq, 10 + seq, Usage::default())];
                    hand(
                        &tx,
                        &stats,
                        Write::Append {
                            samples,
                            meters: vec![],
                        },
                    )
                    .await;
                }
            })
        };
        until(
            "a failed write retried and the meter task waiting",
            async || {
                Stats::get(&stats.writer_retries) >= 1 && Stats::get(&stats.sampler_waits) >= 1
            },
        )
        .await;
        assert!(
            !meter.is_finished(),
            "the meter task waits on the full queue"
        );
        assert!(tx.capacity() == 0, "the queue is full, not growing");

        sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
        meter.await.unwrap();
        drop(tx);
        writer.await.unwrap();
        let events = spool.events().await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            vec!["stopped"],
            "the notice written while the spool was locked is kept"
        );
        let seqs: Vec<i64> = spool
            .samples("a-1", i64::MAX, 1000)
            .await
            .unwrap()
            .iter()
            .map(|s| s.seq)
            .collect();
        assert_eq!(
            seqs,
            (0..total).collect::<Vec<_>>(),
            "every sample handed over is spooled"
        );
        assert_eq!(stats.spooled_samples.load(Ordering::Relaxed), total);
    }
}
