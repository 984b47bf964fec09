//! The sender: delivers what the spool holds to
//! `billing.v1.BillingService` (notices, then batches of samples per VM)
//! and deletes it once acknowledged; and the heartbeats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connectrpc::client::HttpClient;
use metald_proto::billing::v1 as pb;
use tracing::{debug, warn};

use crate::sampler::Active;
use crate::spool::{EventRow, SampleRow, Spool};
use crate::{BillingConfig, MAX_BATCH, RPC_TIMEOUT};

type Client = pb::BillingServiceClient<HttpClient>;

pub(crate) struct Sender {
    pub(crate) config: BillingConfig,
    pub(crate) spool: Spool,
    pub(crate) client: Client,
    pub(crate) spooled: Arc<AtomicI64>,
    /// Batches sent and not acknowledged, per VM: a retry resends exactly
    /// the same range under the same batch id.
    pub(crate) inflight: Mutex<HashMap<String, (i64, i64)>>,
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
    pub(crate) async fn run(self) {
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
