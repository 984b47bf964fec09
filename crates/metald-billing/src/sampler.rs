//! The meter task: samples every running or paused VM every
//! `sample_interval`, keeps each VM's sequence position, and hands
//! samples and notices to the spool writer in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use metald_core::ports::VmUsage;
use tokio::sync::mpsc;
use tracing::warn;

use crate::inbox::Inbox;
use crate::observer::{Msg, VmEvent};
use crate::spool::{MeterRow, SampleRow};
use crate::writer::Write;
use crate::{BillingConfig, Stats, now_ns, usage};

pub(crate) struct Meter {
    name: String,
    customer: String,
    /// The VMM's open `/proc` files; lent to the blocking pool while a
    /// sample is read.
    reader: Option<usage::Reader>,
    /// What the VM's counters reached before this VMM process.
    carried: usage::Carried,
    /// The VM's counters at its last sample (`carried` plus the process's
    /// own).
    total: usage::Usage,
    /// CPU time and time of the previous sample, for the CPU percentage.
    last_cpu: Option<(i64, i64)>,
    /// When metering of this VMM began (Unix ns).
    since: i64,
    /// Host-side veth of the VM's interface, if it has one.
    veth: Option<Arc<str>>,
    pid: i32,
    start_time: u64,
    next_seq: i64,
    last_ts: i64,
    /// Sampled since its meter row was last handed to the writer: the
    /// row is built at the next flush, not at every sample.
    sampled: bool,
}

pub(crate) struct MeterTask {
    config: BillingConfig,
    /// The spool writer, when billing is enabled. Disk writes happen there,
    /// in order, so sampling never waits for an fsync.
    writer: Option<mpsc::Sender<Write>>,
    /// Meters the previous run left, not yet claimed by a VM event.
    known: HashMap<String, MeterRow>,
    /// Keyed by the VM's key, which each sample shares (a sample copies
    /// no string).
    meters: HashMap<Arc<str>, Meter>,
    buffer: Vec<SampleRow>,
    dirty: HashMap<String, MeterRow>,
    latest: Arc<Mutex<HashMap<String, VmUsage>>>,
    active: Active,
    stats: Arc<Stats>,
}

/// Hands `w` to the writer. A full queue (the spool's disk is slow or
/// failing) makes the meter task wait here, counted: sampling pauses
/// instead of samples piling up in memory, and the pause is reported as a
/// gap once sampling resumes.
pub(crate) async fn hand(writer: &mpsc::Sender<Write>, stats: &Stats, w: Write) {
    match writer.try_send(w) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(w)) => {
            Stats::bump(&stats.sampler_waits);
            let _ = writer.send(w).await;
        }
        // The writer is gone (shutting down): nothing can be written.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

impl MeterTask {
    pub(crate) fn new(
        config: BillingConfig,
        writer: Option<mpsc::Sender<Write>>,
        known: HashMap<String, MeterRow>,
        latest: &Arc<Mutex<HashMap<String, VmUsage>>>,
        active: &Active,
        stats: &Arc<Stats>,
    ) -> Self {
        MeterTask {
            config,
            writer,
            known,
            meters: HashMap::new(),
            buffer: Vec::new(),
            dirty: HashMap::new(),
            latest: latest.clone(),
            active: active.clone(),
            stats: stats.clone(),
        }
    }

    pub(crate) async fn run(mut self, inbox: Arc<Inbox<Msg>>) {
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
            hand(w, &self.stats, Write::Removed { vm: id }).await;
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
            let ev = Write::Event {
                kind,
                vm: vm.to_owned(),
                name: name.to_owned(),
                customer: customer.to_owned(),
                t1,
                t2,
            };
            hand(w, &self.stats, ev).await;
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
            // A stopped VM's next process starts from its totals.
            carried_cpu_ns: if running {
                m.carried.cpu_ns
            } else {
                m.total.cpu_ns
            },
            carried_disk_read: if running {
                m.carried.disk_read
            } else {
                m.total.disk_read
            },
            carried_disk_write: if running {
                m.carried.disk_write
            } else {
                m.total.disk_write
            },
            total_cpu_ns: m.total.cpu_ns,
            total_disk_read: m.total.disk_read,
            total_disk_write: m.total.disk_write,
        }
    }

    /// Where a VM's counters start for VMM process `process`, given the
    /// meter row a previous run or boot left: the same process (adopted
    /// after a restart) keeps what it carried; a new one carries on from
    /// the last totals.
    fn counters(known: Option<&MeterRow>, process: (i32, u64)) -> (usage::Carried, usage::Usage) {
        let Some(row) = known else {
            return Default::default();
        };
        let total = usage::Usage {
            cpu_ns: row.total_cpu_ns,
            disk_read: row.total_disk_read,
            disk_write: row.total_disk_write,
            ..Default::default()
        };
        let same =
            row.running == 1 && (row.pid, row.start_time) == (process.0 as i64, process.1 as i64);
        let carried = if same {
            usage::Carried {
                cpu_ns: row.carried_cpu_ns,
                disk_read: row.carried_disk_read,
                disk_write: row.carried_disk_write,
            }
        } else {
            usage::Carried::from_total(total)
        };
        (carried, total)
    }

    async fn changed(&mut self, ev: VmEvent) {
        match ev.process {
            Some(process) => self.running(ev, process).await,
            None => self.not_running(ev).await,
        }
    }

    /// The VM's VMM runs as `(pid, start_time)`.
    async fn running(&mut self, ev: VmEvent, (pid, start_time): (i32, u64)) {
        let now = now_ns();
        if let Some(m) = self.meters.get_mut(ev.id.as_str()) {
            // Same VM, possibly a new VMM process (a backend that
            // reboots by restarting): the stream continues, and so
            // do its counters.
            if (pid, start_time) != (m.pid, m.start_time) {
                m.carried = usage::Carried::from_total(m.total);
                m.reader = Some(usage::Reader::new(pid));
            }
            m.pid = pid;
            m.start_time = start_time;
            m.veth = ev.veth.as_deref().map(Arc::from);
            let row = Self::row(&ev.id, m, true);
            self.dirty.insert(ev.id, row);
            return;
        }
        let known = self.known.remove(&ev.id);
        let (carried, total) = Self::counters(known.as_ref(), (pid, start_time));
        let (next_seq, last_ts) = match known {
            Some(row) if row.running == 1 => {
                // Metered before metald restarted: continue, and
                // report the time nothing was sampled, once (the
                // first sample must not report it again as a stall).
                let gap = self.config.sample_interval.as_nanos() as i64 * 3;
                if now - row.last_ts > gap {
                    warn!(vm_id = %ev.id, "billing samples missing while metald was down; reporting a gap");
                    self.event("gap", &ev.id, (&ev.name, &ev.customer), row.last_ts, now)
                        .await;
                    (row.last_seq + 1, now)
                } else {
                    (row.last_seq + 1, row.last_ts)
                }
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
            reader: Some(usage::Reader::new(pid)),
            carried,
            total,
            last_cpu: None,
            since: now,
            veth: ev.veth.as_deref().map(Arc::from),
            pid,
            start_time,
            next_seq,
            last_ts,
            sampled: false,
        };
        self.dirty
            .insert(ev.id.clone(), Self::row(&ev.id, &m, true));
        self.meters.insert(Arc::from(ev.id), m);
        self.publish_active();
    }

    /// The VM's VMM no longer runs (or the VM is gone).
    async fn not_running(&mut self, ev: VmEvent) {
        let now = now_ns();
        if let Some(m) = self.meters.remove(ev.id.as_str()) {
            // Samples before the stop go out before the stop; the
            // row is kept, so a later boot continues the sequence.
            let row = Self::row(&ev.id, &m, false);
            self.known.insert(ev.id.clone(), row.clone());
            self.dirty.insert(ev.id.clone(), row);
            self.flush().await;
            self.event("stopped", &ev.id, (&m.name, &m.customer), now, 0)
                .await;
            self.latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&ev.id);
            self.publish_active();
        } else if let Some(row) = self.known.get(&ev.id).cloned()
            && row.running == 1
        {
            // (A row of a VM already stopped stays known, so its next
            // boot continues the sequence.)
            // Running when metald went down, stopped now: when it
            // stopped in between is unknown.
            let owner = (row.vm_name.as_str(), row.customer_id.as_str());
            self.event("gap", &ev.id, owner, row.last_ts, now).await;
            self.event("stopped", &ev.id, owner, now, 0).await;
            let row = MeterRow {
                running: 0,
                carried_cpu_ns: row.total_cpu_ns,
                carried_disk_read: row.total_disk_read,
                carried_disk_write: row.total_disk_write,
                ..row
            };
            self.known.insert(ev.id.clone(), row.clone());
            self.dirty.insert(ev.id, row);
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

    /// Reads every metered VMM on the blocking pool, lending it each
    /// meter's reader. `None` if the blocking task failed.
    async fn read_all(&mut self) -> Option<Vec<Read>> {
        let targets: Vec<Target> = self
            .meters
            .iter_mut()
            .map(|(key, m)| {
                let reader = m.reader.take().unwrap_or_else(|| usage::Reader::new(m.pid));
                (key.clone(), reader, m.veth.clone(), m.carried)
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            targets
                .into_iter()
                .map(|(id, mut reader, veth, carried)| {
                    let u = reader.read().ok().map(|own| {
                        let mut u = carried.onto(own);
                        if let Some(veth) = veth {
                            (u.net_rx, u.net_tx) = usage::veth_traffic(&veth);
                        }
                        (u, now_ns())
                    });
                    (id, reader, u)
                })
                .collect::<Vec<_>>()
        })
        .await
        .ok()
    }

    async fn sample(&mut self) {
        if self.meters.is_empty() {
            return;
        }
        let Some(read) = self.read_all().await else {
            return;
        };
        let stall = self.config.sample_interval.as_nanos() as i64 * 3;
        let mut gaps = Vec::new();
        // (A block, so the lock is let go before any await below.)
        {
            let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
            for (id, reader, u) in read {
                let Some(m) = self.meters.get_mut(&*id) else {
                    continue;
                };
                // A reader of an older process (the VMM was replaced while
                // this sample was read) is dropped; the meter has a fresh one.
                if m.reader.is_none() && reader.pid() == m.pid {
                    m.reader = Some(reader);
                }
                let Some((u, ts)) = u else {
                    continue;
                };
                m.total = u;
                if m.next_seq > 0 && ts - m.last_ts > stall {
                    // The sampler stalled (host overload): say so.
                    gaps.push((
                        id.to_string(),
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
                let now = VmUsage {
                    cpu_percent,
                    memory_bytes: u.memory_bytes,
                    disk_read_bytes: u.disk_read,
                    disk_write_bytes: u.disk_write,
                    net_rx_bytes: u.net_rx,
                    net_tx_bytes: u.net_tx,
                    uptime_seconds: (ts - m.since) / 1_000_000_000,
                };
                // In place: no key allocated per VM and sample.
                match latest.get_mut(&*id) {
                    Some(v) => *v = now,
                    None => {
                        latest.insert(id.to_string(), now);
                    }
                }
                if self.writer.is_some() {
                    self.buffer
                        .push(SampleRow::new(id.clone(), m.next_seq, ts, u));
                }
                Stats::bump(&self.stats.samples_taken);
                m.next_seq += 1;
                m.last_ts = ts;
                m.sampled = true;
            }
        }
        for (id, name, customer, from, to) in gaps {
            Stats::bump(&self.stats.sampler_stalls);
            warn!(vm_id = %id, stalled_ms = (to - from) / 1_000_000, "billing sampler stalled; reporting a gap");
            self.event("gap", &id, (&name, &customer), from, to).await;
        }
    }

    async fn flush(&mut self) {
        let Some(w) = &self.writer else {
            self.dirty.clear();
            return;
        };
        for (id, m) in self.meters.iter_mut().filter(|(_, m)| m.sampled) {
            m.sampled = false;
            self.dirty.insert(id.to_string(), Self::row(id, m, true));
        }
        if self.buffer.is_empty() && self.dirty.is_empty() {
            return;
        }
        let samples = std::mem::take(&mut self.buffer);
        let meters: Vec<MeterRow> = self.dirty.drain().map(|(_, m)| m).collect();
        hand(w, &self.stats, Write::Append { samples, meters }).await;
    }
}

/// What one sample reads: VM key, the VMM's reader, its veth and what its
/// counters carry.
type Target = (Arc<str>, usage::Reader, Option<Arc<str>>, usage::Carried);

/// What one sample read: VM key, the reader lent back, and the VM's usage
/// with its time, unless the process could not be read.
type Read = (Arc<str>, usage::Reader, Option<(usage::Usage, i64)>);

/// Each metered VM as (name, customer).
pub(crate) type Active = Arc<Mutex<Vec<(String, String)>>>;

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};
    use std::time::Duration;

    use super::*;

    fn config() -> BillingConfig {
        BillingConfig {
            enabled: true,
            endpoint: String::new(),
            sample_interval: Duration::from_millis(100),
            batch_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(30),
            sync_interval: Duration::from_secs(1),
            max_spooled_samples: 1000,
            instance_id: "test".into(),
        }
    }

    fn ev(id: &str, pid: Option<i32>) -> VmEvent {
        VmEvent {
            id: id.into(),
            name: format!("name-{id}"),
            customer: "acme".into(),
            process: pid.map(|p| (p, p as u64)),
            veth: None,
        }
    }

    fn sleeper() -> Child {
        Command::new("sleep").arg("60").spawn().unwrap()
    }

    #[tokio::test]
    async fn each_meter_reads_its_own_vmm_as_vms_stop_and_vmms_are_replaced() {
        let mut kids: Vec<Child> = (0..4).map(|_| sleeper()).collect();
        let pids: Vec<i32> = kids.iter().map(|k| k.id() as i32).collect();
        let (tx, mut rx) = mpsc::channel(64);
        let latest = Arc::new(Mutex::new(HashMap::new()));
        let (active, stats) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Stats::default()));
        let mut task = MeterTask::new(config(), Some(tx), HashMap::new(), &latest, &active, &stats);
        for (id, pid) in ["a", "b", "c"].into_iter().zip(&pids) {
            task.changed(ev(id, Some(*pid))).await;
        }
        task.sample().await;
        // One VM stops.
        task.changed(ev("a", None)).await;
        // b's VMM is replaced by another process.
        task.changed(ev("b", Some(pids[3]))).await;
        task.sample().await;

        for (key, m) in &task.meters {
            let reader = m.reader.as_ref().expect("the reader came back");
            assert_eq!(reader.pid(), m.pid, "meter {key} reads another process");
        }
        assert_eq!(task.meters["b"].pid, pids[3]);
        task.flush().await;
        drop(task);
        let mut seqs: Vec<(String, i64)> = Vec::new();
        while let Some(w) = rx.recv().await {
            if let Write::Append { samples, .. } = w {
                seqs.extend(samples.iter().map(|s| (s.vm_id.to_string(), s.seq)));
            }
        }
        seqs.sort();
        let want: Vec<(String, i64)> = [("a", 0), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
            .into_iter()
            .map(|(v, s)| (v.to_owned(), s))
            .collect();
        assert_eq!(seqs, want);
        let latest = latest.lock().unwrap();
        let mut shown: Vec<&String> = latest.keys().collect();
        shown.sort();
        assert_eq!(shown, ["b", "c"], "a stopped VM still shows usage");
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}
