//! Billing against a real ConnectRPC `billing.v1.BillingService` receiver
//! on loopback: 100 ms samples, notifications, heartbeats, an outage of
//! the receiver, a SIGKILLed metald, and CPU accounting.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use connectrpc::{
    ConnectError, ErrorCode, RequestContext, Response, ServiceRequest, ServiceResult,
};
use metald_proto::billing::v1 as pb;
use metald_proto::billing::v1::BillingServiceExt;
use rustix::process::Signal;
use serde_json::json;

use crate::harness::{Assets, Daemon, processes_mentioning, wait_for_console};

const T: &str = "dev_customer_billing";

/// One sample as received.
#[derive(Debug, Clone, Copy)]
struct Got {
    seq: i64,
    ts: i64,
    cpu: i64,
    mem: i64,
}

/// Everything the receiver was told, after de-duplicating batches by id.
#[derive(Default, Debug, Clone)]
pub(crate) struct Recorded {
    started: Vec<(String, String)>,
    stopped: Vec<(String, i64)>,
    pub(crate) gaps: Vec<(String, i64, i64)>,
    heartbeats: Vec<Vec<String>>,
    batch_ids: HashSet<String>,
    duplicate_batches: usize,
    samples: HashMap<String, Vec<Got>>,
    /// Sequence numbers by host-wide VM key (from the batch id), which
    /// tells apart VMs of one name deleted and created again.
    pub(crate) by_key: HashMap<String, Vec<i64>>,
    pub(crate) gaps_reported: usize,
}

#[derive(Clone, Default)]
pub(crate) struct Receiver {
    rec: Arc<Mutex<Recorded>>,
    /// While set, every RPC fails as if the service were down.
    down: Arc<AtomicBool>,
    /// VMs whose batches the receiver refuses for good.
    refused: Arc<Mutex<HashSet<String>>>,
}

impl Receiver {
    fn check(&self) -> Result<(), ConnectError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(ConnectError::new(
                ErrorCode::Unavailable,
                "billing receiver is down",
            ));
        }
        Ok(())
    }
    pub(crate) fn rec(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.rec.lock().unwrap()
    }
}

#[allow(refining_impl_trait)]
impl pb::BillingService for Receiver {
    async fn send_metrics_batch(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::SendMetricsBatchRequest>,
    ) -> ServiceResult<pb::SendMetricsBatchResponse> {
        self.check()?;
        let req = req.to_owned_message();
        if self.refused.lock().unwrap().contains(&req.vm_id) {
            return Err(ConnectError::new(
                ErrorCode::FailedPrecondition,
                format!("no billing account for {}", req.vm_id),
            ));
        }
        let mut rec = self.rec();
        if !rec.batch_ids.insert(req.batch_id.clone()) {
            rec.duplicate_batches += 1;
        } else {
            let key = req
                .batch_id
                .split('/')
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            let seqs = rec.by_key.entry(key).or_default();
            seqs.extend(req.metrics.iter().map(|m| m.sequence));
            let list = rec.samples.entry(req.vm_id.clone()).or_default();
            for m in &req.metrics {
                let ts = m.timestamp.seconds * 1_000_000_000 + m.timestamp.nanos as i64;
                list.push(Got {
                    seq: m.sequence,
                    ts,
                    cpu: m.cpu_time_nanos,
                    mem: m.memory_usage_bytes,
                });
            }
        }
        Response::ok(pb::SendMetricsBatchResponse {
            success: true,
            ..Default::default()
        })
    }

    async fn send_heartbeat(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::SendHeartbeatRequest>,
    ) -> ServiceResult<pb::SendHeartbeatResponse> {
        self.check()?;
        self.rec()
            .heartbeats
            .push(req.to_owned_message().active_vms);
        Response::ok(pb::SendHeartbeatResponse {
            success: true,
            ..Default::default()
        })
    }

    async fn notify_vm_started(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::NotifyVmStartedRequest>,
    ) -> ServiceResult<pb::NotifyVmStartedResponse> {
        self.check()?;
        let req = req.to_owned_message();
        self.rec().started.push((req.vm_id, req.customer_id));
        Response::ok(pb::NotifyVmStartedResponse {
            success: true,
            ..Default::default()
        })
    }

    async fn notify_vm_stopped(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::NotifyVmStoppedRequest>,
    ) -> ServiceResult<pb::NotifyVmStoppedResponse> {
        self.check()?;
        let req = req.to_owned_message();
        self.rec().stopped.push((req.vm_id, req.stop_time));
        Response::ok(pb::NotifyVmStoppedResponse {
            success: true,
            ..Default::default()
        })
    }

    async fn notify_possible_gap(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::NotifyPossibleGapRequest>,
    ) -> ServiceResult<pb::NotifyPossibleGapResponse> {
        self.check()?;
        let req = req.to_owned_message();
        let mut rec = self.rec();
        rec.gaps_reported += 1;
        rec.gaps.push((req.vm_id, req.last_sent, req.resume_time));
        Response::ok(pb::NotifyPossibleGapResponse {
            success: true,
            ..Default::default()
        })
    }
}

/// Serves `recv` on 127.0.0.1:`port` (0 = any); returns the port and the
/// server task (abort it to take the receiver off the network).
pub(crate) async fn serve(recv: &Receiver, port: u16) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Arc::new(recv.clone()).register(connectrpc::Router::new());
    let app = axum::Router::new().fallback_service(connectrpc::ConnectRpcService::new(router));
    (
        port,
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }),
    )
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

pub(crate) fn metald_with_billing(port: u16) -> Daemon {
    metald_with_billing_and(port, &[])
}

/// metald sending to the receiver on `port`, with more flags.
fn metald_with_billing_and(port: u16, extra: &[&str]) -> Daemon {
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut args = vec![
        "--auth-mode",
        "dev",
        "--billing-enabled",
        "true",
        "--billing-endpoint",
        &endpoint,
        "--billing-batch-interval",
        "1s",
        "--billing-heartbeat-interval",
        "1s",
    ];
    args.extend_from_slice(extra);
    Daemon::start_with(&args)
}

async fn boot(d: &Daemon, assets: &Assets, ids: &[&str], extra_args: &str) {
    for id in ids {
        let mut config = assets.config();
        let args = format!(
            "{} {extra_args}",
            config["boot"]["kernel_args"].as_str().unwrap()
        );
        config["boot"]["kernel_args"] = json!(args.trim());
        d.ok(T, "CreateVm", json!({"vm_id": id, "config": config}))
            .await;
        d.ok(T, "BootVm", json!({"vm_id": id})).await;
    }
}

/// Waits (bounded) until `cond` holds for what the receiver recorded.
async fn until(recv: &Receiver, what: &str, limit: Duration, cond: impl Fn(&Recorded) -> bool) {
    let start = Instant::now();
    while !cond(&recv.rec()) {
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; receiver has {:?}",
            summary(&recv.rec())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn summary(r: &Recorded) -> String {
    let counts: HashMap<&String, usize> = r.samples.iter().map(|(k, v)| (k, v.len())).collect();
    format!(
        "started {:?}, stopped {:?}, gaps {:?}, heartbeats {}, samples {counts:?}",
        r.started,
        r.stopped,
        r.gaps,
        r.heartbeats.len()
    )
}

/// Every sequence from 0 arrives exactly once, in order.
fn assert_stream_complete(vm: &str, got: &[Got]) {
    let seqs: Vec<i64> = got.iter().map(|g| g.seq).collect();
    let expected: Vec<i64> = (0..got.len() as i64).collect();
    assert_eq!(
        seqs, expected,
        "{vm}: sequences must be 0,1,2,... with no gap, duplicate or reordering"
    );
    assert!(
        got.windows(2).all(|w| w[1].cpu >= w[0].cpu),
        "{vm}: CPU time never decreases"
    );
    assert!(
        got.iter().all(|g| g.mem > 0),
        "{vm}: memory in use is reported"
    );
}

async fn stop_all(d: &Daemon, recv: &Receiver, ids: &[&str]) {
    for id in ids {
        d.ok(T, "ShutdownVm", json!({"vm_id": id, "force": true}))
            .await;
    }
    until(
        recv,
        "NotifyVmStopped for every VM",
        Duration::from_secs(30),
        |r| ids.iter().all(|id| r.stopped.iter().any(|(v, _)| v == id)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_vms_stream_100ms_samples_notifications_and_heartbeats() {
    let assets = Assets::load();
    let recv = Receiver::default();
    let (port, _server) = serve(&recv, 0).await;
    let d = metald_with_billing(port);
    let ids = ["bill-a", "bill-b", "bill-c"];
    boot(&d, &assets, &ids, "").await;
    let ten_s = 10_000_000_000;
    until(
        &recv,
        "10 s of samples for each VM",
        Duration::from_secs(90),
        |r| {
            ids.iter().all(|id| {
                r.samples
                    .get(*id)
                    .is_some_and(|s| s.last().unwrap().ts - s[0].ts >= ten_s)
            })
        },
    )
    .await;
    stop_all(&d, &recv, &ids).await;

    let rec = recv.rec().clone();
    for id in ids {
        assert!(
            rec.started
                .contains(&(id.to_string(), "billing".to_string())),
            "NotifyVmStarted for {id}"
        );
        let got = &rec.samples[id];
        assert_stream_complete(id, got);
        let intervals: Vec<i64> = got
            .windows(2)
            .map(|w| (w[1].ts - w[0].ts) / 1_000_000)
            .collect();
        let within = intervals.iter().filter(|g| (80..=120).contains(*g)).count();
        let (min, max) = (
            intervals.iter().min().unwrap(),
            intervals.iter().max().unwrap(),
        );
        eprintln!(
            "{id}: {} samples, {within}/{} intervals within 100±20 ms, min {min} ms, max {max} ms",
            got.len(),
            intervals.len()
        );
        // How evenly a loaded host samples is measured above, not asserted;
        // what must hold is that time without samples is never silent.
        assert!(
            got.windows(2).all(|w| w[1].ts > w[0].ts),
            "{id}: timestamps increase with the sequence"
        );
        for w in got.windows(2) {
            if w[1].ts - w[0].ts > 300_000_000 {
                assert!(
                    rec.gaps
                        .iter()
                        .any(|(v, from, to)| v == id && *from <= w[0].ts && *to >= w[1].ts),
                    "{id}: {} ms without samples after seq {} is reported as a gap ({:?})",
                    (w[1].ts - w[0].ts) / 1_000_000,
                    w[0].seq,
                    rec.gaps
                );
            }
        }
        let stop = rec.stopped.iter().find(|(v, _)| v == id).unwrap().1;
        assert!(
            stop >= got.last().unwrap().ts,
            "{id}: stopped after its last sample"
        );
    }
    assert!(
        rec.heartbeats
            .iter()
            .any(|h| ids.iter().all(|id| h.contains(&id.to_string()))),
        "a heartbeat lists the three running VMs"
    );
    assert_eq!(rec.duplicate_batches, 0);
    for id in ids {
        d.ok(T, "DeleteVm", json!({"vm_id": id})).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn samples_taken_during_a_receiver_outage_all_arrive_once_in_order() {
    let assets = Assets::load();
    let recv = Receiver::default();
    let (port, server) = serve(&recv, 0).await;
    let d = metald_with_billing(port);
    let ids = ["out-a", "out-b"];
    boot(&d, &assets, &ids, "").await;
    until(
        &recv,
        "a first batch per VM",
        Duration::from_secs(60),
        |r| {
            ids.iter()
                .all(|id| r.samples.get(*id).is_some_and(|s| !s.is_empty()))
        },
    )
    .await;

    recv.down.store(true, Ordering::SeqCst);
    server.abort();
    let down_at = now_ns();
    // The outage itself: the receiver stays away for 30 s.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let up_at = now_ns();
    let (_, _server) = serve(&recv, port).await;
    recv.down.store(false, Ordering::SeqCst);
    until(
        &recv,
        "samples from after the outage",
        Duration::from_secs(60),
        |r| {
            ids.iter().all(|id| {
                r.samples
                    .get(*id)
                    .is_some_and(|s| s.last().unwrap().ts > up_at)
            })
        },
    )
    .await;
    stop_all(&d, &recv, &ids).await;

    let rec = recv.rec().clone();
    for id in ids {
        let got = &rec.samples[id];
        assert_stream_complete(id, got);
        let during = got
            .iter()
            .filter(|g| g.ts > down_at && g.ts < up_at)
            .count();
        eprintln!(
            "{id}: {} samples, {during} taken during the 30 s outage",
            got.len()
        );
        assert!(
            during >= 250,
            "{id}: the outage's ~300 samples arrived ({during})"
        );
    }
    eprintln!(
        "re-sent batches dropped by the receiver: {}",
        rec.duplicate_batches
    );
    for id in ids {
        d.ok(T, "DeleteVm", json!({"vm_id": id})).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_metald_loses_no_spooled_sample_and_reports_the_gap() {
    let assets = Assets::load();
    let recv = Receiver::default();
    let (port, _server) = serve(&recv, 0).await;
    let mut d = metald_with_billing(port);
    let ids = ["crash-a", "crash-b"];
    boot(&d, &assets, &ids, "").await;
    until(&recv, "two batches per VM", Duration::from_secs(60), |r| {
        ids.iter()
            .all(|id| r.samples.get(*id).is_some_and(|s| s.len() >= 15))
    })
    .await;
    d.stop(Signal::KILL);
    let killed_at = now_ns();
    // metald stays down for a second: ten samples per VM are not taken.
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.restart();
    let restarted_at = now_ns();
    until(
        &recv,
        "a gap notice and fresh samples per VM",
        Duration::from_secs(60),
        |r| {
            ids.iter().all(|id| {
                r.gaps.iter().any(|(v, _, _)| v == id)
                    && r.samples
                        .get(*id)
                        .is_some_and(|s| s.last().unwrap().ts > restarted_at)
            })
        },
    )
    .await;
    stop_all(&d, &recv, &ids).await;

    let rec = recv.rec().clone();
    for id in ids {
        assert_stream_complete(id, &rec.samples[id]);
        let (_, last_sent, resume) = *rec.gaps.iter().find(|(v, _, _)| v == id).unwrap();
        assert!(
            last_sent <= killed_at && resume >= killed_at,
            "{id}: the gap covers the time metald was down"
        );
        let starts = rec.started.iter().filter(|(v, _)| v == id).count();
        assert_eq!(starts, 1, "{id}: an adopted VM is not started again");
    }
    for id in ids {
        d.ok(T, "DeleteVm", json!({"vm_id": id})).await;
    }
}

/// utime + stime of a process, in nanoseconds (the kernel's accounting).
fn proc_cpu_ns(pid: i32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: i64 = fields[11].parse::<i64>().unwrap() + fields[12].parse::<i64>().unwrap();
    ticks * 10_000_000 // USER_HZ is 100 on Linux
}

#[tokio::test(flavor = "multi_thread")]
async fn cpu_time_matches_the_kernels_accounting_and_a_paused_vm_accrues_none() {
    let assets = Assets::load();
    let recv = Receiver::default();
    let (port, _server) = serve(&recv, 0).await;
    let d = metald_with_billing(port);
    let id = "burner";
    boot(&d, &assets, &[id], "metald.burn=2").await;
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": id})).await;
    let console = info["backendInfo"]["console_log"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_console(&console, "METALD-BURN-DONE", 1, Duration::from_secs(120)).await;
    d.ok(T, "PauseVm", json!({"vm_id": id})).await;
    let pid = processes_mentioning(&format!("-name metald-{id}-"))[0];
    let paused_at = now_ns();
    let kernel_cpu = proc_cpu_ns(pid);
    until(
        &recv,
        "3 s of samples while paused",
        Duration::from_secs(60),
        |r| {
            r.samples
                .get(id)
                .is_some_and(|s| s.last().unwrap().ts > paused_at + 3_000_000_000)
        },
    )
    .await;
    let rec = recv.rec().clone();
    let got = &rec.samples[id];
    let paused: Vec<&Got> = got.iter().filter(|g| g.ts > paused_at).collect();
    let (first, last) = (paused[0], paused[paused.len() - 1]);
    let accrued = last.cpu - first.cpu;
    let wall = last.ts - first.ts;
    eprintln!(
        "paused: {} ns CPU over {} ns; metald says {} ns, the kernel says {kernel_cpu} ns",
        accrued, wall, first.cpu
    );
    assert!(
        accrued * 50 < wall,
        "a paused VM accrues (almost) no CPU: {accrued} ns in {wall} ns"
    );
    let diff = (first.cpu - kernel_cpu).abs() as f64 / kernel_cpu as f64;
    assert!(
        diff < 0.10,
        "metald's CPU time is within 10% of the kernel's ({:.1}%)",
        diff * 100.0
    );
    d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_the_billing_service_refuses_is_reported_as_gaps_and_holds_up_no_other() {
    let assets = Assets::load();
    let recv = Receiver::default();
    // Spooled VMs are sent in key order (name first): the refused VM
    // comes before the other.
    recv.refused.lock().unwrap().insert("aa-refused".into());
    let (port, _server) = serve(&recv, 0).await;
    let d = metald_with_billing(port);
    let ids = ["aa-refused", "zz-billed"];
    boot(&d, &assets, &ids, "").await;
    until(
        &recv,
        "2 s of samples of the billed VM and gaps for the refused one",
        Duration::from_secs(90),
        |r| {
            r.samples
                .get("zz-billed")
                .is_some_and(|s| s.last().unwrap().ts - s[0].ts >= 2_000_000_000)
                && r.gaps.iter().filter(|(v, _, _)| v == "aa-refused").count() >= 2
        },
    )
    .await;
    stop_all(&d, &recv, &ids).await;

    let rec = recv.rec().clone();
    assert_stream_complete("zz-billed", &rec.samples["zz-billed"]);
    assert!(
        !rec.samples.contains_key("aa-refused"),
        "the refused VM's batches were never taken"
    );
    let started: Vec<&str> = rec.started.iter().map(|(v, _)| v.as_str()).collect();
    assert!(
        ids.iter().all(|id| started.contains(id)),
        "both started: {started:?}"
    );
    for id in ids {
        d.ok(T, "DeleteVm", json!({"vm_id": id})).await;
    }
}

/// Rows of `billing.db` still waiting for the billing service.
pub(crate) async fn spooled_notices(d: &Daemon) -> i64 {
    use sqlx::Connection;
    let url = format!(
        "sqlite://{}?mode=ro",
        d.data_dir.join("billing.db").display()
    );
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE parked = 0")
        .fetch_one(&mut db)
        .await
        .unwrap()
}

/// Samples in the spool not yet acknowledged.
pub(crate) async fn spooled_samples(d: &Daemon) -> i64 {
    use sqlx::Connection;
    let url = format!(
        "sqlite://{}?mode=ro",
        d.data_dir.join("billing.db").display()
    );
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query_scalar("SELECT COALESCE(SUM(samples), 0) FROM sample_runs")
        .fetch_one(&mut db)
        .await
        .unwrap()
}

/// The only gaps are stalls of the sampler (a loaded host), each between
/// two samples that arrived: none covers a stop or what follows it.
fn assert_no_gap_but_stalls(rec: &Recorded) {
    for (vm, from, to) in &rec.gaps {
        let got = &rec.samples[vm];
        assert!(
            got.windows(2).any(|w| w[0].ts == *from && w[1].ts == *to),
            "{vm}: gap {from}..{to} is not a stall between two samples: {}",
            summary(rec)
        );
    }
    eprintln!("sampler stalls reported as gaps: {}", rec.gaps.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_shutdown_on_exit_delivers_every_stop_and_no_gap() {
    let assets = Assets::load();
    let recv = Receiver::default();
    let (port, _server) = serve(&recv, 0).await;
    let mut d = metald_with_billing_and(port, &["--shutdown-vms-on-exit", "true"]);
    let ids = ["term-a", "term-b"];
    boot(&d, &assets, &ids, "").await;
    until(
        &recv,
        "a first batch per VM",
        Duration::from_secs(60),
        |r| {
            ids.iter()
                .all(|id| r.samples.get(*id).is_some_and(|s| !s.is_empty()))
        },
    )
    .await;
    let status = d.stop(Signal::TERM);
    assert!(status.success(), "metald stops cleanly: {status:?}");

    // Sent before metald exited: the last samples, then the stop.
    let rec = recv.rec().clone();
    for id in ids {
        assert_stream_complete(id, &rec.samples[id]);
        let stop = rec.stopped.iter().find(|(v, _)| v == id);
        let stop = stop.unwrap_or_else(|| panic!("{id}: no stop notice: {}", summary(&rec)));
        assert!(
            stop.1 >= rec.samples[id].last().unwrap().ts,
            "{id}: the stop follows its last sample"
        );
    }
    assert_no_gap_but_stalls(&rec);

    // The next metald finds nothing missing either.
    let beats = rec.heartbeats.len();
    d.restart();
    until(
        &recv,
        "a heartbeat of the next metald",
        Duration::from_secs(30),
        |r| r.heartbeats.len() > beats,
    )
    .await;
    let start = Instant::now();
    while spooled_notices(&d).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "notices still spooled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = rec.gaps.len();
    let rec = recv.rec().clone();
    assert_eq!(rec.gaps.len(), before, "no gap after the restart either");
    for id in ids {
        assert_eq!(rec.stopped.iter().filter(|(v, _)| v == id).count(), 1);
        d.ok(T, "DeleteVm", json!({"vm_id": id})).await;
    }
}

/// GetVmInfo's uptime of a VM, in seconds (metering's view).
async fn uptime(d: &Daemon, id: &str) -> i64 {
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": id})).await;
    let v = &info["metrics"]["uptimeSeconds"];
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_leaving_vms_running_keeps_every_sample_taken_and_reports_one_gap() {
    let assets = Assets::load();
    let recv = Receiver::default();
    let (port, _server) = serve(&recv, 0).await;
    // Samples reach the spool only on a sync, an hour apart here: whatever
    // was taken before the stop must be written by the stop itself.
    let mut d = metald_with_billing_and(port, &["--billing-sync-interval", "1h"]);
    let id = "kept";
    boot(&d, &assets, &[id], "").await;
    let start = Instant::now();
    while uptime(&d, id).await < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no 2 s of metering"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped_at = now_ns();
    let status = d.stop(Signal::TERM);
    assert!(status.success(), "metald stops cleanly: {status:?}");
    // metald stays down for a second (a shorter absence than three sample
    // intervals is no gap): ten samples are not taken.
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.restart();
    let restarted_at = now_ns();
    until(&recv, "the gap notice", Duration::from_secs(30), |r| {
        r.gaps.iter().any(|(v, _, _)| v == id)
    })
    .await;
    // A stop writes what the sampler holds: the samples since the restart.
    stop_all(&d, &recv, &[id]).await;
    // Sample batches and notices are delivered apart: the stop notice can
    // arrive before the last batch.
    until(
        &recv,
        "delivery resumed after the restart",
        Duration::from_secs(30),
        |r| {
            r.samples
                .get(id)
                .is_some_and(|s| s.last().is_some_and(|g| g.ts > restarted_at))
        },
    )
    .await;
    let rec = recv.rec().clone();
    let got = &rec.samples[id];
    assert_stream_complete(id, got);
    let before = got.iter().filter(|g| g.ts < stopped_at).count();
    assert!(
        before >= 15,
        "{id}: the ~20 samples taken before SIGTERM arrived ({before})"
    );
    let gaps: Vec<&(String, i64, i64)> = rec.gaps.iter().filter(|(v, _, _)| v == id).collect();
    assert_eq!(
        gaps.len(),
        1,
        "one gap for the time metald was down: {gaps:?}"
    );
    let (_, from, to) = gaps[0];
    let last_before = got.iter().rev().find(|g| g.ts <= *to).unwrap().ts;
    assert_eq!(
        *from, last_before,
        "the gap starts at the last sample before the stop"
    );
    assert!(
        *to > stopped_at && *to <= restarted_at,
        "and ends at the restart"
    );
    assert_eq!(rec.started.iter().filter(|(v, _)| v == id).count(), 1);
    d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
        .await;
}

/// A VM booted again after a shutdown continues its sequence, also when
/// metald restarted while it was shut down: the numbers are per VM, not
/// per VMM process or per metald, so the receiver never sees one twice.
/// Its CPU time goes on from where the last boot left it: a fresh VMM's
/// own counter starts at zero, the VM's does not.
#[tokio::test(flavor = "multi_thread")]
async fn a_vm_booted_again_continues_its_sequence() {
    let assets = Assets::load();
    let recv = Receiver::default();
    let (port, _server) = serve(&recv, 0).await;
    let mut d = metald_with_billing(port);
    let id = "again";
    boot(&d, &assets, &[id], "").await;
    let mut before = 0;
    for round in 1..=3 {
        // Samples of this boot itself, not the rest of the last one's.
        until(
            &recv,
            "samples of this boot",
            Duration::from_secs(60),
            |r| r.samples.get(id).is_some_and(|s| s.len() >= before + 5),
        )
        .await;
        d.ok(T, "ShutdownVm", json!({"vm_id": id, "force": true}))
            .await;
        until(&recv, "the stop", Duration::from_secs(30), |r| {
            r.stopped.iter().filter(|(v, _)| v == id).count() == round
        })
        .await;
        // Every sample of a boot is delivered before its stop.
        before = recv.rec().samples[id].len();
        if round == 2 {
            assert!(d.stop(Signal::TERM).success());
            d.restart();
        }
        if round < 3 {
            d.ok(T, "BootVm", json!({"vm_id": id})).await;
        }
    }
    let rec = recv.rec().clone();
    assert_stream_complete(id, &rec.samples[id]);
    d.ok(T, "DeleteVm", json!({"vm_id": id})).await;
}
