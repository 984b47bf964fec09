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

mod delivery;
mod inbox;
mod observer;
mod sampler;
pub mod spool;
pub mod usage;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use connectrpc::client::{ClientConfig, HttpClient};
use metald_core::VmId;
use metald_core::ports::VmUsage;
use metald_proto::billing::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;

use crate::delivery::{Sender, heartbeats};
use crate::inbox::Inbox;
use crate::observer::Msg;
use crate::sampler::MeterTask;
use crate::spool::{MeterRow, Spool};
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
const WRITER_QUEUE: usize = 64;
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
    inbox: Arc<Inbox<Msg>>,
    latest: Arc<Mutex<HashMap<String, VmUsage>>>,
}

/// The background tasks; abort them on shutdown.
pub struct BillingTasks {
    pub tasks: Vec<JoinHandle<()>>,
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
        let spooled = Arc::new(AtomicI64::new(match &spool {
            Some(s) => s.len().await?,
            None => 0,
        }));
        let inbox = Arc::new(Inbox::new());
        let latest = Arc::new(Mutex::new(HashMap::new()));
        let active = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let writer_tx = match &spool {
            Some(spool) => {
                let (wtx, wrx) = mpsc::channel(WRITER_QUEUE);
                tasks.push(tokio::spawn(writer(
                    spool.clone(),
                    config.clone(),
                    spooled.clone(),
                    wrx,
                )));
                Some(wtx)
            }
            None => None,
        };
        let meter = MeterTask {
            config: config.clone(),
            writer: writer_tx,
            known,
            meters: HashMap::new(),
            buffer: Vec::new(),
            dirty: HashMap::new(),
            latest: latest.clone(),
            active: active.clone(),
        };
        tasks.push(tokio::spawn(meter.run(inbox.clone())));
        if let Some(spool) = spool {
            let uri: http::Uri = config.endpoint.parse().map_err(|e| {
                format!(
                    "UNKEY_METALD_BILLING_ENDPOINT: {:?} is not a URL: {e}",
                    config.endpoint
                )
            })?;
            let client =
                pb::BillingServiceClient::new(HttpClient::plaintext(), ClientConfig::new(uri));
            let sender = Sender {
                config: config.clone(),
                spool,
                client: client.clone(),
                spooled,
                inflight: Mutex::new(HashMap::new()),
            };
            tasks.push(tokio::spawn(sender.run()));
            tasks.push(tokio::spawn(heartbeats(config.clone(), client, active)));
            info!(endpoint = %config.endpoint, sample = ?config.sample_interval, batch = ?config.batch_interval, "billing enabled");
        } else {
            info!("billing disabled: VMs are sampled for GetVmInfo, nothing is sent");
        }
        Ok((Arc::new(Billing { inbox, latest }), BillingTasks { tasks }))
    }

    /// The latest usage sampled for a VM.
    pub fn latest(&self, id: &VmId) -> Option<VmUsage> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id.as_str())
            .copied()
    }
}

impl Drop for Billing {
    fn drop(&mut self) {
        self.inbox.close();
    }
}
