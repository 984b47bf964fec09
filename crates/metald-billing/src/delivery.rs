//! The sender: delivers what the spool holds to
//! `billing.v1.BillingService` (per VM: its notices in order, the samples
//! up to a stop before the stop, then its batches) and deletes each row
//! once acknowledged; and the heartbeats.
//!
//! One VM cannot hold up another. A refusal the billing service means for
//! good (`invalid_argument`, `not_found`, `failed_precondition`) parks the
//! item: it stays on disk, is counted, and is reported as a gap; the VM's
//! later items and every other VM go on. Any other failure of one VM's
//! item backs that VM off (exponential from 250 ms, capped at the batch
//! interval, jittered) while the others are sent; a billing service that
//! cannot be reached at all ends the round and backs everything off alike.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connectrpc::ErrorCode;
use connectrpc::client::HttpClient;
use metald_proto::billing::v1 as pb;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use crate::sampler::Active;
use crate::spool::{EventRow, SampleRow, Spool};
use crate::{BillingConfig, MAX_BATCH, RPC_TIMEOUT, Stats};

type Client = pb::BillingServiceClient<HttpClient>;

/// First wait after a failed delivery.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Why an item was not delivered.
#[derive(Debug)]
enum Failed {
    /// Refused for good: park the item.
    Refused(String),
    /// May pass: try this VM again after a backoff.
    Transient(String),
    /// The billing service cannot be reached, or the spool failed: the
    /// round ends and everything backs off.
    Down(String),
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failed::Refused(e) => write!(f, "refused: {e}"),
            Failed::Transient(e) | Failed::Down(e) => f.write_str(e),
        }
    }
}

/// Spool errors end the round.
impl From<String> for Failed {
    fn from(e: String) -> Self {
        Failed::Down(e)
    }
}

async fn call<F, T>(what: &str, f: F) -> Result<T, Failed>
where
    F: std::future::Future<Output = Result<T, connectrpc::ConnectError>>,
{
    match tokio::time::timeout(RPC_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let text = format!("{what}: {:?}: {}", e.code, e.message.unwrap_or_default());
            Err(match e.code {
                ErrorCode::InvalidArgument
                | ErrorCode::NotFound
                | ErrorCode::FailedPrecondition => Failed::Refused(text),
                ErrorCode::Unavailable | ErrorCode::DeadlineExceeded => Failed::Down(text),
                _ => Failed::Transient(text),
            })
        }
        Err(_) => Err(Failed::Down(format!(
            "{what}: no answer within {RPC_TIMEOUT:?}"
        ))),
    }
}

/// The `attempt`-th wait (from 1): doubling from [`FIRST_BACKOFF`] up to
/// `cap`, then a random point in its upper half, so that many metalds (or
/// VMs) that failed together do not retry together.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let full = FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(cap);
    let half = full / 2;
    let jitter = RandomState::new().hash_one(attempt) % (half.as_millis() as u64 + 1);
    half + Duration::from_millis(jitter)
}

pub(crate) struct Sender {
    config: BillingConfig,
    spool: Spool,
    client: Client,
    stats: Arc<Stats>,
    /// Batches sent and not acknowledged, per VM: a retry resends exactly
    /// the same range under the same batch id.
    inflight: Mutex<HashMap<String, (i64, i64)>>,
    /// VMs whose last delivery failed: failures in a row, and when to try
    /// again.
    waiting: Mutex<HashMap<String, (u32, Instant)>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sender {
    pub(crate) fn new(
        config: BillingConfig,
        spool: Spool,
        client: Client,
        stats: Arc<Stats>,
    ) -> Self {
        Sender {
            config,
            spool,
            client,
            stats,
            inflight: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    fn cap(&self) -> Duration {
        self.config.batch_interval.max(Duration::from_secs(1))
    }

    pub(crate) async fn run(self: Arc<Self>) {
        let mut down = 0;
        loop {
            let pause = match self.round(false).await {
                Ok(()) => {
                    down = 0;
                    self.next_pause()
                }
                Err(e) => {
                    down += 1;
                    let pause = backoff(down, self.cap());
                    Stats::bump(&self.stats.delivery_retries);
                    warn!(error = %e, retry_in = ?pause, "billing delivery failed; samples stay spooled");
                    pause
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Until the next round: the batch interval, or sooner when a VM that
    /// backed off may be tried again (never less than the first backoff).
    fn next_pause(&self) -> Duration {
        let now = Instant::now();
        locked(&self.waiting)
            .values()
            .map(|(_, at)| at.saturating_duration_since(now))
            .fold(self.config.batch_interval, Duration::min)
            .max(FIRST_BACKOFF.min(self.config.batch_interval))
    }

    /// One try at everything spooled, backoffs ignored (metald is
    /// stopping); true when nothing is left to send.
    pub(crate) async fn last_round(&self) -> Result<bool, String> {
        self.round(true).await?;
        Ok(
            self.spool.events().await?.is_empty()
                && self.spool.vms_with_samples().await?.is_empty(),
        )
    }

    /// Sends everything spooled, VM by VM; `all` ignores backoffs.
    async fn round(&self, all: bool) -> Result<(), String> {
        let oldest = self.spool.oldest_unsent().await?.unwrap_or(0);
        self.stats.oldest_unsent_ns.store(oldest, Ordering::Relaxed);
        let mut order: Vec<String> = Vec::new();
        let mut events: HashMap<String, Vec<EventRow>> = HashMap::new();
        for ev in self.spool.events().await? {
            events
                .entry(ev.vm_id.clone())
                .or_insert_with(|| {
                    order.push(ev.vm_id.clone());
                    Vec::new()
                })
                .push(ev);
        }
        let mut owners = HashMap::new();
        for (vm, name, customer) in self.spool.vms_with_samples().await? {
            if !events.contains_key(&vm) {
                order.push(vm.clone());
            }
            owners.insert(vm, (name, customer));
        }
        // A VM with nothing left to send has nothing to back off.
        locked(&self.waiting).retain(|vm, _| order.contains(vm));
        let now = Instant::now();
        for vm in order {
            if !all
                && locked(&self.waiting)
                    .get(&vm)
                    .is_some_and(|(_, at)| *at > now)
            {
                continue;
            }
            let evs = events.remove(&vm).unwrap_or_default();
            match self.deliver(&vm, evs, owners.get(&vm)).await {
                Ok(()) => {
                    locked(&self.waiting).remove(&vm);
                }
                Err(Failed::Down(e)) => return Err(e),
                Err(Failed::Transient(e) | Failed::Refused(e)) => self.back_off(&vm, &e),
            }
        }
        // Everything of a deleted VM is delivered: its meter row goes.
        let pruned = self.spool.prune().await?;
        if pruned > 0 {
            debug!(pruned, "billing meters of deleted VMs pruned");
        }
        Ok(())
    }

    fn back_off(&self, vm: &str, e: &str) {
        Stats::bump(&self.stats.delivery_retries);
        let mut waiting = locked(&self.waiting);
        let failures = waiting.get(vm).map_or(1, |(n, _)| n + 1);
        let pause = backoff(failures, self.cap());
        warn!(vm_id = vm, error = e, retry_in = ?pause, "billing delivery of a VM failed; the others go on");
        waiting.insert(vm.to_owned(), (failures, Instant::now() + pause));
    }

    /// One VM: its notices in order (the samples up to a stop before the
    /// stop), then its samples.
    async fn deliver(
        &self,
        vm: &str,
        events: Vec<EventRow>,
        owner: Option<&(String, String)>,
    ) -> Result<(), Failed> {
        for ev in events {
            if ev.kind == "stopped" {
                self.send_samples(vm, wire_name(vm, &ev.vm_name), &ev.customer_id, ev.t1)
                    .await?;
            }
            match self.send_event(&ev).await {
                Ok(()) => self.spool.delete_event(ev.id).await?,
                Err(Failed::Refused(why)) => self.park_event(&ev, &why).await?,
                Err(e) => return Err(e),
            }
        }
        if let Some((name, customer)) = owner {
            self.send_samples(vm, wire_name(vm, name), customer, i64::MAX)
                .await?;
        }
        Ok(())
    }

    /// The billing service refused a notice for good: keep it on disk, send
    /// it no more, and report its time as a gap (unless it is a gap).
    async fn park_event(&self, ev: &EventRow, why: &str) -> Result<(), String> {
        error!(vm_id = %ev.vm_id, kind = %ev.kind, error = why, "billing service refused a notice; parked in the spool");
        self.spool.park_event(ev.id).await?;
        Stats::bump(&self.stats.parked_notices);
        if ev.kind != "gap" {
            self.report_gap(
                ev.vm_id.as_str(),
                (&ev.vm_name, &ev.customer_id),
                ev.t1,
                ev.t2.max(ev.t1),
            )
            .await?;
        }
        Ok(())
    }

    async fn report_gap(
        &self,
        vm: &str,
        (name, customer): (&str, &str),
        t1: i64,
        t2: i64,
    ) -> Result<(), String> {
        self.spool
            .push_event("gap", vm, name, customer, t1, t2)
            .await?;
        Stats::bump(&self.stats.gaps_spooled);
        Ok(())
    }

    async fn send_event(&self, ev: &EventRow) -> Result<(), Failed> {
        let vm_id = wire_name(&ev.vm_id, &ev.vm_name).to_owned();
        let customer_id = ev.customer_id.clone();
        let ok = match ev.kind.as_str() {
            "started" => {
                let req = pb::NotifyVmStartedRequest {
                    vm_id,
                    customer_id,
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
                    vm_id,
                    customer_id,
                    stop_time: ev.t1,
                    ..Default::default()
                };
                call("NotifyVmStopped", self.client.notify_vm_stopped(req))
                    .await?
                    .into_owned()
                    .success
            }
            "gap" => {
                let req = pb::NotifyPossibleGapRequest {
                    vm_id,
                    customer_id,
                    last_sent: ev.t1,
                    resume_time: ev.t2,
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
            Err(Failed::Transient(format!(
                "billing service did not take {} for {}",
                ev.kind, ev.vm_id
            )))
        }
    }

    /// Sends a VM's samples (spooled under its key `vm`) as `name`, taken
    /// no later than `until`.
    async fn send_samples(
        &self,
        vm: &str,
        name: &str,
        customer: &str,
        until: i64,
    ) -> Result<(), Failed> {
        loop {
            let pending = locked(&self.inflight).get(vm).copied();
            let rows = match pending {
                Some((first, last)) => self.spool.samples_between(vm, first, last).await?,
                None => self.spool.samples(vm, until, MAX_BATCH).await?,
            };
            let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                locked(&self.inflight).remove(vm);
                return Ok(());
            };
            let (first, last, span) = (first.seq, last.seq, (first.ts, last.ts));
            locked(&self.inflight).insert(vm.to_owned(), (first, last));
            let n = rows.len() as i64;
            let sent = self.send_batch(vm, name, customer, rows).await;
            Stats::bump(match sent {
                Ok(()) => &self.stats.batches_sent,
                Err(_) => &self.stats.batches_failed,
            });
            match sent {
                Ok(()) => {
                    self.spool.ack(vm, first, last).await?;
                    self.stats.spooled_samples.fetch_sub(n, Ordering::Relaxed);
                    debug!(vm_id = vm, first, last, "billing batch acknowledged");
                }
                Err(Failed::Refused(why)) => {
                    self.park_batch(vm, (name, customer), (first, last), span, &why)
                        .await?
                }
                Err(e) => return Err(e),
            }
            locked(&self.inflight).remove(vm);
            if n < MAX_BATCH && pending.is_none() {
                return Ok(());
            }
        }
    }

    async fn send_batch(
        &self,
        vm: &str,
        name: &str,
        customer: &str,
        rows: Vec<SampleRow>,
    ) -> Result<(), Failed> {
        let (first, last) = (rows[0].seq, rows[rows.len() - 1].seq);
        let req = pb::SendMetricsBatchRequest {
            vm_id: name.to_owned(),
            customer_id: customer.to_owned(),
            metrics: rows.into_iter().map(to_pb).collect(),
            // The key, not the name: unique on this host, so a batch id is
            // never reused by a later VM of the same name.
            batch_id: format!("{}/{vm}/{first}-{last}", self.config.instance_id),
            first_sequence: first,
            last_sequence: last,
            instance_id: self.config.instance_id.clone(),
            ..Default::default()
        };
        let resp = call("SendMetricsBatch", self.client.send_metrics_batch(req))
            .await?
            .into_owned();
        if resp.success {
            Ok(())
        } else {
            Err(Failed::Transient(format!(
                "billing service did not take a batch of {vm}: {}",
                resp.message
            )))
        }
    }

    /// The billing service refused a batch for good: keep its samples on
    /// disk, send them no more, and report their time as a gap.
    async fn park_batch(
        &self,
        vm: &str,
        owner: (&str, &str),
        (first, last): (i64, i64),
        (from, to): (i64, i64),
        why: &str,
    ) -> Result<(), String> {
        error!(
            vm_id = vm,
            first,
            last,
            error = why,
            "billing service refused a batch; parked in the spool"
        );
        let n = self.spool.park_samples(vm, first, last).await?;
        Stats::bump(&self.stats.parked_batches);
        self.stats.parked_samples.fetch_add(n, Ordering::Relaxed);
        self.report_gap(vm, owner, from, to).await
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

pub(crate) async fn heartbeats(config: BillingConfig, client: Client, active: Active) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_jitters_in_the_upper_half() {
        let cap = Duration::from_secs(4);
        for attempt in 1..40 {
            let full = (FIRST_BACKOFF * 2u32.pow((attempt - 1).min(10))).min(cap);
            let waits: Vec<Duration> = (0..50).map(|_| backoff(attempt, cap)).collect();
            assert!(
                waits.iter().all(|w| *w >= full / 2 && *w <= full),
                "attempt {attempt}: {waits:?} outside {:?}..={full:?}",
                full / 2
            );
            if full >= Duration::from_secs(1) {
                assert!(
                    waits.iter().any(|w| *w != waits[0]),
                    "attempt {attempt}: waits are jittered"
                );
            }
        }
    }
}
