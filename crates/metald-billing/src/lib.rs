//! metald's usage metering for billing.
//!
//! Data path, one way: the service tells [`Billing`] (an
//! [`Observer`](metald_core::ports::Observer)) when a VM's VMM starts or
//! stops → the meter task samples every running or paused VM every
//! `sample_interval` ([`usage`]) → samples and notifications go to the
//! durable [`spool`] (fsynced at most every `sync_interval`) → the sender
//! delivers them to `billing.v1.BillingService` and deletes them only once
//! acknowledged. See `docs/billing.md`.

mod inbox;
pub mod spool;
pub mod usage;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use connectrpc::client::{ClientConfig, HttpClient};
use metald_core::ports::{Observer, UsageSource, VmRecord, VmUsage};
use metald_core::{VmId, VmState};
use metald_proto::billing::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::inbox::Inbox;
use crate::spool::{EventRow, MeterRow, SampleRow, Spool};

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
const MAX_BATCH: i64 = 3000;

/// Writes queued for the spool writer. When full (the disk is slow or
/// failing), the meter task waits: sampling pauses instead of samples
/// piling up in memory, and the pause is reported as a gap.
const WRITER_QUEUE: usize = 64;
/// Longest wait for one billing RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A VM's VMM as billing sees it.
#[derive(Debug, Clone)]
struct VmEvent {
    /// metald's host-wide key of the VM; billing's own records use it.
    id: String,
    /// The customer's name for the VM: what the billing service is told.
    name: String,
    customer: String,
    /// pid and start time when a VMM runs.
    process: Option<(i32, u64)>,
    /// Host side of the VM's veth, whose counters are the VM's traffic.
    veth: Option<String>,
}

enum Msg {
    Changed(VmEvent),
    Removed(String),
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

impl UsageSource for Billing {
    fn usage(&self, id: &VmId) -> Option<VmUsage> {
        self.latest(id)
    }
}

impl Observer for Billing {
    fn vm_changed(&self, vm: &VmRecord) {
        let process = match (&vm.runtime, vm.state) {
            (Some(rt), VmState::Running | VmState::Paused) => Some((rt.pid, rt.start_time)),
            _ => None,
        };
        self.inbox.put(
            vm.id.to_string(),
            Msg::Changed(VmEvent {
                id: vm.id.to_string(),
                name: vm.name.to_string(),
                customer: vm.customer.to_string(),
                process,
                veth: vm
                    .spec
                    .nics
                    .iter()
                    .find_map(|n| n.attachment.as_ref())
                    .map(|a| a.host_veth.clone()),
            }),
        );
    }

    fn vm_removed(&self, id: &VmId) {
        self.inbox.put(id.to_string(), Msg::Removed(id.to_string()));
    }
}

struct Meter {
    name: String,
    customer: String,
    cpu: usage::CpuTracker,
    /// CPU time and time of the previous sample, for the CPU percentage.
    last_cpu: Option<(i64, i64)>,
    /// When metering of this VMM began (Unix ns).
    since: i64,
    /// Host-side veth of the VM's interface, if it has one.
    veth: Option<String>,
    pid: i32,
    start_time: u64,
    next_seq: i64,
    last_ts: i64,
}

struct MeterTask {
    config: BillingConfig,
    /// The spool writer, when billing is enabled. Disk writes happen there,
    /// in order, so sampling never waits for an fsync.
    writer: Option<mpsc::Sender<Write>>,
    /// Meters the previous run left, not yet claimed by a VM event.
    known: HashMap<String, MeterRow>,
    meters: HashMap<String, Meter>,
    buffer: Vec<SampleRow>,
    dirty: HashMap<String, MeterRow>,
    latest: Arc<Mutex<HashMap<String, VmUsage>>>,
    active: Active,
}

/// Work for the spool writer, applied in order.
enum Write {
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
async fn writer(
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

impl MeterTask {
    async fn run(mut self, inbox: Arc<Inbox<Msg>>) {
        let mut sample = tokio::time::interval(self.config.sample_interval);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sync = tokio::time::interval(self.config.sync_interval);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msgs = inbox.take() => match msgs {
                    Some(msgs) => {
                        for msg in msgs {
                            match msg {
                                Msg::Changed(ev) => self.changed(ev).await,
                                Msg::Removed(id) => self.removed(id).await,
                            }
                        }
                    }
                    None => break,
                },
                _ = sample.tick() => self.sample().await,
                _ = sync.tick() => self.flush().await,
            }
        }
        self.flush().await;
    }

    /// The VM's row is gone: stop metering it, and let the spool prune its
    /// meter once everything of it is delivered.
    async fn removed(&mut self, id: String) {
        let ev = VmEvent {
            id: id.clone(),
            name: String::new(),
            customer: String::new(),
            process: None,
            veth: None,
        };
        self.changed(ev).await;
        self.known.remove(&id);
        self.flush().await;
        if let Some(w) = &self.writer {
            let _ = w.send(Write::Removed { vm: id }).await;
        }
    }

    async fn event(
        &self,
        kind: &'static str,
        vm: &str,
        (name, customer): (&str, &str),
        t1: i64,
        t2: i64,
    ) {
        if let Some(w) = &self.writer {
            // A full queue (the spool's disk is slow) makes the meter task
            // wait here: sampling pauses, and the pause is reported as a gap.
            let _ = w
                .send(Write::Event {
                    kind,
                    vm: vm.to_owned(),
                    name: name.to_owned(),
                    customer: customer.to_owned(),
                    t1,
                    t2,
                })
                .await;
        }
    }

    fn row(id: &str, m: &Meter, running: bool) -> MeterRow {
        MeterRow {
            vm_id: id.to_owned(),
            vm_name: m.name.clone(),
            customer_id: m.customer.clone(),
            pid: m.pid as i64,
            start_time: m.start_time as i64,
            running: running as i64,
            last_seq: m.next_seq - 1,
            last_ts: m.last_ts,
        }
    }

    async fn changed(&mut self, ev: VmEvent) {
        let now = now_ns();
        match ev.process {
            Some((pid, start_time)) => {
                if let Some(m) = self.meters.get_mut(&ev.id) {
                    // Same VM, possibly a new VMM process (a backend that
                    // reboots by restarting): the stream continues.
                    m.pid = pid;
                    m.start_time = start_time;
                    m.veth = ev.veth;
                    let row = Self::row(&ev.id, m, true);
                    self.dirty.insert(ev.id, row);
                    return;
                }
                let (next_seq, last_ts) = match self.known.remove(&ev.id) {
                    Some(row) if row.running == 1 => {
                        // Metered before metald restarted: continue, and
                        // report the time nothing was sampled.
                        let gap = self.config.sample_interval.as_nanos() as i64 * 3;
                        if now - row.last_ts > gap {
                            warn!(vm_id = %ev.id, "billing samples missing while metald was down; reporting a gap");
                            self.event("gap", &ev.id, (&ev.name, &ev.customer), row.last_ts, now)
                                .await;
                        }
                        (row.last_seq + 1, row.last_ts)
                    }
                    other => {
                        self.event("started", &ev.id, (&ev.name, &ev.customer), now, 0)
                            .await;
                        (other.map(|r| r.last_seq + 1).unwrap_or(0), now)
                    }
                };
                let m = Meter {
                    name: ev.name,
                    customer: ev.customer,
                    cpu: usage::CpuTracker::default(),
                    last_cpu: None,
                    since: now,
                    veth: ev.veth,
                    pid,
                    start_time,
                    next_seq,
                    last_ts,
                };
                self.dirty
                    .insert(ev.id.clone(), Self::row(&ev.id, &m, true));
                self.meters.insert(ev.id, m);
                self.publish_active();
            }
            None => {
                if let Some(m) = self.meters.remove(&ev.id) {
                    // Samples before the stop go out before the stop.
                    self.dirty
                        .insert(ev.id.clone(), Self::row(&ev.id, &m, false));
                    self.flush().await;
                    self.event("stopped", &ev.id, (&m.name, &m.customer), now, 0)
                        .await;
                    self.latest
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&ev.id);
                    self.publish_active();
                } else if let Some(row) = self.known.remove(&ev.id)
                    && row.running == 1
                {
                    // Running when metald went down, stopped now: when it
                    // stopped in between is unknown.
                    let owner = (row.vm_name.as_str(), row.customer_id.as_str());
                    self.event("gap", &ev.id, owner, row.last_ts, now).await;
                    self.event("stopped", &ev.id, owner, now, 0).await;
                    self.dirty.insert(ev.id, MeterRow { running: 0, ..row });
                }
            }
        }
    }

    fn publish_active(&self) {
        let mut vms: Vec<(String, String)> = self
            .meters
            .values()
            .map(|m| (m.name.clone(), m.customer.clone()))
            .collect();
        vms.sort();
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = vms;
    }

    async fn sample(&mut self) {
        if self.meters.is_empty() {
            return;
        }
        let targets: Vec<(String, i32, usage::CpuTracker, Option<String>)> = self
            .meters
            .iter()
            .map(|(id, m)| (id.clone(), m.pid, m.cpu.clone(), m.veth.clone()))
            .collect();
        let Ok(read) = tokio::task::spawn_blocking(move || {
            targets
                .into_iter()
                .filter_map(|(id, pid, mut cpu, veth)| {
                    let mut u = usage::read(pid, &mut cpu).ok()?;
                    if let Some(veth) = veth {
                        (u.net_rx, u.net_tx) = usage::veth_traffic(&veth);
                    }
                    Some((id, u, cpu, now_ns()))
                })
                .collect::<Vec<_>>()
        })
        .await
        else {
            return;
        };
        let stall = self.config.sample_interval.as_nanos() as i64 * 3;
        let mut gaps = Vec::new();
        let mut fresh = Vec::new();
        for (id, u, cpu, ts) in read {
            let Some(m) = self.meters.get_mut(&id) else {
                continue;
            };
            m.cpu = cpu;
            if m.next_seq > 0 && ts - m.last_ts > stall {
                // The sampler stalled (host overload): say so.
                gaps.push((
                    id.clone(),
                    m.name.clone(),
                    m.customer.clone(),
                    m.last_ts,
                    ts,
                ));
            }
            let cpu_percent = match m.last_cpu {
                Some((c, t)) if ts > t => (u.cpu_ns - c) as f64 * 100.0 / (ts - t) as f64,
                _ => 0.0,
            };
            m.last_cpu = Some((u.cpu_ns, ts));
            fresh.push((
                id.clone(),
                VmUsage {
                    cpu_percent,
                    memory_bytes: u.memory_bytes,
                    disk_read_bytes: u.disk_read,
                    disk_write_bytes: u.disk_write,
                    net_rx_bytes: u.net_rx,
                    net_tx_bytes: u.net_tx,
                    uptime_seconds: (ts - m.since) / 1_000_000_000,
                },
            ));
            if self.writer.is_some() {
                self.buffer.push(SampleRow::new(&id, m.next_seq, ts, u));
            }
            m.next_seq += 1;
            m.last_ts = ts;
            let row = Self::row(&id, m, true);
            self.dirty.insert(id, row);
        }
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(fresh);
        for (id, name, customer, from, to) in gaps {
            warn!(vm_id = %id, stalled_ms = (to - from) / 1_000_000, "billing sampler stalled; reporting a gap");
            self.event("gap", &id, (&name, &customer), from, to).await;
        }
    }

    async fn flush(&mut self) {
        let Some(w) = &self.writer else {
            self.dirty.clear();
            return;
        };
        if self.buffer.is_empty() && self.dirty.is_empty() {
            return;
        }
        let samples = std::mem::take(&mut self.buffer);
        let meters: Vec<MeterRow> = self.dirty.drain().map(|(_, m)| m).collect();
        let _ = w.send(Write::Append { samples, meters }).await;
    }
}

type Client = pb::BillingServiceClient<HttpClient>;

struct Sender {
    config: BillingConfig,
    spool: Spool,
    client: Client,
    spooled: Arc<AtomicI64>,
    /// Batches sent and not acknowledged, per VM: a retry resends exactly
    /// the same range under the same batch id.
    inflight: Mutex<HashMap<String, (i64, i64)>>,
}

async fn call<F, T>(what: &str, f: F) -> Result<T, String>
where
    F: std::future::Future<Output = Result<T, connectrpc::ConnectError>>,
{
    match tokio::time::timeout(RPC_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!(
            "{what}: {:?}: {}",
            e.code,
            e.message.unwrap_or_default()
        )),
        Err(_) => Err(format!("{what}: no answer within {RPC_TIMEOUT:?}")),
    }
}

impl Sender {
    async fn run(self) {
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.round().await {
                Ok(()) => {
                    backoff = Duration::from_millis(250);
                    tokio::time::sleep(self.config.batch_interval).await;
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "billing delivery failed; samples stay spooled");
                    tokio::time::sleep(backoff).await;
                    backoff =
                        (backoff * 2).min(self.config.batch_interval.max(Duration::from_secs(1)));
                }
            }
        }
    }

    /// Sends everything spooled: notifications in order (the samples of a
    /// VM up to its stop before the stop), then every VM's samples.
    async fn round(&self) -> Result<(), String> {
        loop {
            let events = self.spool.events().await?;
            if events.is_empty() {
                break;
            }
            for ev in events {
                if ev.kind == "stopped" {
                    self.send_samples(
                        &ev.vm_id,
                        wire_name(&ev.vm_id, &ev.vm_name),
                        &ev.customer_id,
                        ev.t1,
                    )
                    .await?;
                }
                self.send_event(&ev).await?;
                self.spool.delete_event(ev.id).await?;
            }
        }
        for (vm, name, customer) in self.spool.vms_with_samples().await? {
            self.send_samples(&vm, wire_name(&vm, &name), &customer, i64::MAX)
                .await?;
        }
        // Everything of a deleted VM is delivered: its meter row goes.
        let pruned = self.spool.prune().await?;
        if pruned > 0 {
            debug!(pruned, "billing meters of deleted VMs pruned");
        }
        Ok(())
    }

    async fn send_event(&self, ev: &EventRow) -> Result<(), String> {
        let ok = match ev.kind.as_str() {
            "started" => {
                let req = pb::NotifyVmStartedRequest {
                    vm_id: wire_name(&ev.vm_id, &ev.vm_name).to_owned(),
                    customer_id: ev.customer_id.clone(),
                    start_time: ev.t1,
                    ..Default::default()
                };
                call("NotifyVmStarted", self.client.notify_vm_started(req))
                    .await?
                    .into_owned()
                    .success
            }
            "stopped" => {
                let req = pb::NotifyVmStoppedRequest {
                    vm_id: wire_name(&ev.vm_id, &ev.vm_name).to_owned(),
                    stop_time: ev.t1,
                    customer_id: ev.customer_id.clone(),
                    ..Default::default()
                };
                call("NotifyVmStopped", self.client.notify_vm_stopped(req))
                    .await?
                    .into_owned()
                    .success
            }
            "gap" => {
                let req = pb::NotifyPossibleGapRequest {
                    vm_id: wire_name(&ev.vm_id, &ev.vm_name).to_owned(),
                    last_sent: ev.t1,
                    resume_time: ev.t2,
                    customer_id: ev.customer_id.clone(),
                    ..Default::default()
                };
                call("NotifyPossibleGap", self.client.notify_possible_gap(req))
                    .await?
                    .into_owned()
                    .success
            }
            other => {
                warn!(
                    kind = other,
                    "unknown notification in the billing spool; dropping it"
                );
                true
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "billing service refused {} for {}",
                ev.kind, ev.vm_id
            ))
        }
    }

    /// Sends a VM's samples (spooled under its key `vm`) as `name`.
    async fn send_samples(
        &self,
        vm: &str,
        name: &str,
        customer: &str,
        until: i64,
    ) -> Result<(), String> {
        loop {
            let pending = self
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(vm)
                .copied();
            let rows = match pending {
                Some((first, last)) => self.spool.samples_between(vm, first, last).await?,
                None => self.spool.samples(vm, until, MAX_BATCH).await?,
            };
            let (Some(first), Some(last)) =
                (rows.first().map(|r| r.seq), rows.last().map(|r| r.seq))
            else {
                self.inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(vm);
                return Ok(());
            };
            self.inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(vm.to_owned(), (first, last));
            let n = rows.len() as i64;
            let req = pb::SendMetricsBatchRequest {
                vm_id: name.to_owned(),
                customer_id: customer.to_owned(),
                metrics: rows.into_iter().map(to_pb).collect(),
                // The key, not the name: unique on this host, so a batch id
                // is never reused by a later VM of the same name.
                batch_id: format!("{}/{vm}/{first}-{last}", self.config.instance_id),
                first_sequence: first,
                last_sequence: last,
                instance_id: self.config.instance_id.clone(),
                ..Default::default()
            };
            let resp = call("SendMetricsBatch", self.client.send_metrics_batch(req))
                .await?
                .into_owned();
            if !resp.success {
                return Err(format!(
                    "billing service refused a batch of {vm}: {}",
                    resp.message
                ));
            }
            self.spool.ack(vm, first, last).await?;
            self.inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(vm);
            self.spooled.fetch_sub(n, Ordering::Relaxed);
            debug!(vm_id = vm, first, last, "billing batch acknowledged");
            if n < MAX_BATCH && pending.is_none() {
                return Ok(());
            }
        }
    }
}

/// The VM id the billing service is told: the customer's name for it
/// (rows spooled before names were per customer have none: their key was
/// the name).
fn wire_name<'a>(key: &'a str, name: &'a str) -> &'a str {
    if name.is_empty() { key } else { name }
}

fn to_pb(r: SampleRow) -> pb::VMMetrics {
    pb::VMMetrics {
        timestamp: buffa::MessageField::some(buffa_types::google::protobuf::Timestamp {
            seconds: r.ts.div_euclid(1_000_000_000),
            nanos: r.ts.rem_euclid(1_000_000_000) as i32,
            ..Default::default()
        }),
        cpu_time_nanos: r.cpu_ns,
        memory_usage_bytes: r.memory_bytes,
        disk_read_bytes: r.disk_read,
        disk_write_bytes: r.disk_write,
        network_rx_bytes: r.net_rx,
        network_tx_bytes: r.net_tx,
        sequence: r.seq,
        ..Default::default()
    }
}

/// Each metered VM as (name, customer).
type Active = Arc<Mutex<Vec<(String, String)>>>;

async fn heartbeats(config: BillingConfig, client: Client, active: Active) {
    let mut tick = tokio::time::interval(config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let vms = active.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let req = pb::SendHeartbeatRequest {
            instance_id: config.instance_id.clone(),
            active_vms: vms.iter().map(|(name, _)| name.clone()).collect(),
            active: vms
                .into_iter()
                .map(|(vm_id, customer_id)| pb::ActiveVm {
                    vm_id,
                    customer_id,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        if let Err(e) = call("SendHeartbeat", client.send_heartbeat(req)).await {
            debug!(error = %e, "billing heartbeat failed");
        }
    }
}
