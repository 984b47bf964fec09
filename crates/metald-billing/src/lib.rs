//! metald's usage metering for billing.
//!
//! Data path, one way: the service tells [`Billing`] (an
//! [`Observer`](metald_core::ports::Observer)) when a VM's VMM starts or
//! stops → the meter task samples every running or paused VM every
//! `sample_interval` ([`usage`]) → samples and notifications go to the
//! durable [`spool`] (fsynced at most every `sync_interval`) → the sender
//! delivers them to `billing.v1.BillingService` and deletes them only once
//! acknowledged. See `docs/billing.md`.
//!
//! # Tasks and the queues between them
//!
//! ```text
//!  VmService ──vm_changed/vm_removed──▶ Inbox ──take──▶ meter task (sampler.rs)
//!  (observer.rs)       one entry per VM, newest wins      │  samples every sample_interval,
//!                      never blocks the service           │  buffers up to sync_interval
//!                                                         │
//!                           mpsc, WRITER_QUEUE writes ────┘  full: the meter task waits
//!                                                         │  (sampling pauses; the pause
//!                                                         ▼   is reported as a gap)
//!                                        spool writer (writer.rs) ──▶ billing.db (spool.rs)
//!                                                         one transaction per write    │
//!                                                                                      │ read
//!  billing.v1.BillingService ◀── notices, batches ── sender (delivery.rs) ◀────────────┘
//!                            ◀── heartbeats ──────── heartbeat task (delivery.rs)
//!                                                    reads the meter task's `active` list
//! ```
//!
//! The sender and the writer share no queue: the spool on disk is the
//! hand-over (bounded by `max_spooled_samples`; beyond it new samples are
//! dropped and reported as gaps). The meter task publishes the latest
//! usage per VM (GetVmInfo) and the list of metered VMs (heartbeats) under
//! a mutex holding one entry per VM.
//!
//! Nothing queued in memory is ever dropped: a full queue makes its
//! producer wait (the service never does: the inbox replaces instead), and
//! what the sampler could not sample meanwhile is reported as a gap. Each
//! wait, retry, drop and parked row is counted in [`Stats`].
//!
//! Stopping ([`BillingTasks::shutdown`]) follows the arrows: the inbox is
//! closed, the meter task takes what is left in it and hands its last
//! samples and notices over, the writer commits them and ends, then the
//! sender makes one last round.

mod delivery;
mod inbox;
mod observer;
mod sampler;
pub mod spool;
mod stats;
pub mod usage;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use connectrpc::client::{ClientConfig, HttpClient};
use metald_core::VmId;
use metald_core::ports::VmUsage;
use metald_proto::billing::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::delivery::{Sender, heartbeats};
use crate::inbox::Inbox;
use crate::observer::Msg;
use crate::sampler::MeterTask;
use crate::spool::{MeterRow, Spool};
pub use crate::stats::Stats;
use crate::writer::writer;

/// Billing settings (`UNKEY_METALD_BILLING_*`).
#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// Send to the billing service; when false, VMs are still sampled (for
    /// GetVmInfo) but nothing is spooled or sent.
    pub enabled: bool,
    /// Base URL of `billing.v1.BillingService`.
    pub endpoint: String,
    pub sample_interval: Duration,
    pub batch_interval: Duration,
    pub heartbeat_interval: Duration,
    /// Spooled samples are fsynced at least this often.
    pub sync_interval: Duration,
    /// Most samples the spool holds; beyond it new samples are dropped
    /// loudly and reported to the billing service as gaps.
    pub max_spooled_samples: i64,
    /// Names this metald in heartbeats and batch ids.
    pub instance_id: String,
}

/// Largest batch sent at once.
pub(crate) const MAX_BATCH: i64 = 3000;

/// Writes queued for the spool writer. When full (the disk is slow or
/// failing), the meter task waits: sampling pauses instead of samples
/// piling up in memory, and the pause is reported as a gap.
pub(crate) const WRITER_QUEUE: usize = 64;
/// Longest wait for one billing RPC.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The billing handle: an observer for the service, and the latest usage
/// per VM for GetVmInfo.
pub struct Billing {
    pub(crate) inbox: Arc<Inbox<Msg>>,
    latest: Arc<Mutex<HashMap<String, VmUsage>>>,
    pub(crate) stats: Arc<Stats>,
}

/// The background tasks. Stop them with [`BillingTasks::shutdown`], which
/// writes what the meter task holds before they end.
pub struct BillingTasks {
    inbox: Arc<Inbox<Msg>>,
    meter: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
    sender: Option<SenderTask>,
    heartbeats: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

/// The sender and its task.
type SenderTask = (Arc<Sender>, JoinHandle<()>);

/// How a [`BillingTasks::shutdown`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every sample and notice the meter task held reached the spool
    /// (committed, fsynced).
    pub spooled: bool,
    /// Nothing was left in the spool for the billing service.
    pub delivered: bool,
}

impl Billing {
    /// Opens the spool (when enabled) under `data_dir` and starts metering,
    /// delivery and heartbeats.
    pub async fn start(
        config: BillingConfig,
        data_dir: &Path,
    ) -> Result<(Arc<Billing>, BillingTasks), String> {
        let spool = if config.enabled {
            Some(Spool::open(&data_dir.join("billing.db")).await?)
        } else {
            None
        };
        let known: HashMap<String, MeterRow> = match &spool {
            Some(s) => s
                .meters()
                .await?
                .into_iter()
                .map(|m| (m.vm_id.clone(), m))
                .collect(),
            None => HashMap::new(),
        };
        let stats = Arc::new(Stats::default());
        if let Some(s) = &spool {
            stats
                .spooled_samples
                .store(s.len().await?, Ordering::Relaxed);
        }
        let inbox = Arc::new(Inbox::new());
        let latest = Arc::new(Mutex::new(HashMap::new()));
        let active = Arc::new(Mutex::new(Vec::new()));
        let (writer_tx, writer) = match &spool {
            Some(spool) => {
                let (wtx, wrx) = mpsc::channel(WRITER_QUEUE);
                let task = tokio::spawn(writer(spool.clone(), config.clone(), stats.clone(), wrx));
                (Some(wtx), Some(task))
            }
            None => (None, None),
        };
        let meter = MeterTask::new(config.clone(), writer_tx, known, &latest, &active, &stats);
        let meter = tokio::spawn(meter.run(inbox.clone()));
        let (sender, heartbeats) = match spool {
            Some(spool) => {
                let (sender, beats) = start_delivery(&config, spool, active, &stats)?;
                (Some(sender), Some(beats))
            }
            None => {
                info!("billing disabled: VMs are sampled for GetVmInfo, nothing is sent");
                (None, None)
            }
        };
        let billing = Billing {
            inbox: inbox.clone(),
            latest,
            stats: stats.clone(),
        };
        let tasks = BillingTasks {
            inbox,
            meter,
            writer,
            sender,
            heartbeats,
            stats,
        };
        Ok((Arc::new(billing), tasks))
    }

    /// The latest usage sampled for a VM.
    pub fn latest(&self, id: &VmId) -> Option<VmUsage> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id.as_str())
            .copied()
    }

    /// What billing counted so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// Starts the sender and the heartbeats.
fn start_delivery(
    config: &BillingConfig,
    spool: Spool,
    active: sampler::Active,
    stats: &Arc<Stats>,
) -> Result<(SenderTask, JoinHandle<()>), String> {
    let uri: http::Uri = config.endpoint.parse().map_err(|e| {
        format!(
            "UNKEY_METALD_BILLING_ENDPOINT: {:?} is not a URL: {e}",
            config.endpoint
        )
    })?;
    let client = pb::BillingServiceClient::new(HttpClient::plaintext(), ClientConfig::new(uri));
    let sender = Arc::new(Sender::new(
        config.clone(),
        spool,
        client.clone(),
        stats.clone(),
    ));
    let task = tokio::spawn(sender.clone().run());
    let beats = tokio::spawn(heartbeats(config.clone(), client, active));
    info!(endpoint = %config.endpoint, sample = ?config.sample_interval, batch = ?config.batch_interval, "billing enabled");
    Ok(((sender, task), beats))
}

impl BillingTasks {
    /// What billing counted so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stops billing in order, all within `within`: the meter task takes
    /// the changes still in its inbox (a VM stopped just before, e.g. by
    /// shutdown-on-exit, gets its last samples and its stop notice) and
    /// hands everything it holds to the writer; the writer commits it
    /// (fsync); then one last delivery of what the spool holds is tried.
    /// Whatever the deadline cuts off stays as a later start finds it: an
    /// unwritten stretch is reported then as a gap, undelivered rows are
    /// sent then.
    pub async fn shutdown(self, within: Duration) -> ShutdownReport {
        let deadline = tokio::time::Instant::now() + within;
        if let Some((_, task)) = &self.sender {
            task.abort();
        }
        if let Some(task) = &self.heartbeats {
            task.abort();
        }
        self.inbox.close();
        let mut spooled = finish("meter task", self.meter, deadline).await;
        if let Some(writer) = self.writer {
            spooled &= finish("spool writer", writer, deadline).await;
        }
        let delivered = match self.sender {
            Some((sender, task)) => {
                let _ = task.await;
                let left = tokio::time::timeout_at(deadline, sender.last_round()).await;
                matches!(left, Ok(Ok(true)))
            }
            None => true,
        };
        info!(spooled, delivered, "billing stopped");
        ShutdownReport { spooled, delivered }
    }
}

/// Waits for `task` to end by `deadline`, aborting it after; true if it
/// ended on its own.
async fn finish(what: &str, mut task: JoinHandle<()>, deadline: tokio::time::Instant) -> bool {
    match tokio::time::timeout_at(deadline, &mut task).await {
        Ok(_) => true,
        Err(_) => {
            task.abort();
            warn!(
                task = what,
                "billing could not finish writing before the deadline; what is unwritten is \
                 reported as a gap by the next start"
            );
            false
        }
    }
}

impl Drop for Billing {
    fn drop(&mut self) {
        self.inbox.close();
    }
}
