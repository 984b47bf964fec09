//! Delivery from a real spool file to a real ConnectRPC
//! `billing.v1.BillingService` on loopback that refuses chosen VMs: a VM
//! the billing service refuses for good is parked and reported as a gap,
//! a VM that fails for a while is retried, and neither holds up the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connectrpc::{
    ConnectError, ErrorCode, RequestContext, Response, ServiceRequest, ServiceResult,
};
use metald_billing::spool::{MeterRow, SampleRow, Spool};
use metald_billing::usage::Usage;
use metald_billing::{Billing, BillingConfig, Stats};
use metald_proto::billing::v1 as pb;
use metald_proto::billing::v1::BillingServiceExt;

/// What the receiver took, per VM name, in arrival order.
#[derive(Default, Debug, Clone)]
struct Took {
    /// "started", "stopped", "gap a-b", "seq n" per VM.
    log: HashMap<String, Vec<String>>,
}

/// (VM name, method) → (code, times left).
type Refusals = HashMap<(String, &'static str), (ErrorCode, u32)>;

#[derive(Clone, Default)]
struct Receiver {
    took: Arc<Mutex<Took>>,
    /// Per VM name and method: the code to refuse with, and how many more
    /// times (u32::MAX: always).
    refuse: Arc<Mutex<Refusals>>,
}

impl Receiver {
    fn refuse(&self, vm: &str, method: &'static str, code: ErrorCode, times: u32) {
        self.refuse
            .lock()
            .unwrap()
            .insert((vm.to_owned(), method), (code, times));
    }

    /// Refuses if told to; else records `what` for `vm`.
    fn take(&self, vm: &str, method: &'static str, what: Vec<String>) -> Result<(), ConnectError> {
        if let Some((code, left)) = self
            .refuse
            .lock()
            .unwrap()
            .get_mut(&(vm.to_owned(), method))
            && *left > 0
        {
            *left = left.saturating_sub(if *left == u32::MAX { 0 } else { 1 });
            return Err(ConnectError::new(
                *code,
                format!("{method} of {vm} refused"),
            ));
        }
        self.took
            .lock()
            .unwrap()
            .log
            .entry(vm.to_owned())
            .or_default()
            .extend(what);
        Ok(())
    }

    fn log(&self, vm: &str) -> Vec<String> {
        self.took
            .lock()
            .unwrap()
            .log
            .get(vm)
            .cloned()
            .unwrap_or_default()
    }
}

#[allow(refining_impl_trait)]
impl pb::BillingService for Receiver {
    async fn send_metrics_batch(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::SendMetricsBatchRequest>,
    ) -> ServiceResult<pb::SendMetricsBatchResponse> {
        let req = req.to_owned_message();
        let seqs = req
            .metrics
            .iter()
            .map(|m| format!("seq {}", m.sequence))
            .collect();
        self.take(&req.vm_id, "batch", seqs)?;
        Response::ok(pb::SendMetricsBatchResponse {
            success: true,
            ..Default::default()
        })
    }

    async fn send_heartbeat(
        &self,
        _ctx: RequestContext,
        _req: ServiceRequest<'_, pb::SendHeartbeatRequest>,
    ) -> ServiceResult<pb::SendHeartbeatResponse> {
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
        let req = req.to_owned_message();
        self.take(&req.vm_id, "started", vec!["started".into()])?;
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
        let req = req.to_owned_message();
        self.take(&req.vm_id, "stopped", vec!["stopped".into()])?;
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
        let req = req.to_owned_message();
        let gap = format!("gap {}-{}", req.last_sent, req.resume_time);
        self.take(&req.vm_id, "gap", vec![gap])?;
        Response::ok(pb::NotifyPossibleGapResponse {
            success: true,
            ..Default::default()
        })
    }
}

async fn serve(recv: &Receiver) -> u16 {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Arc::new(recv.clone()).register(connectrpc::Router::new());
    let app = axum::Router::new().fallback_service(connectrpc::ConnectRpcService::new(router));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

const SAMPLES: i64 = 40;
const T0: i64 = 1_700_000_000_000_000_000;
const STEP: i64 = 100_000_000;

/// A VM's whole stream, as a metald that stopped left it in the spool:
/// started, `SAMPLES` samples, stopped.
async fn spool_vm(spool: &Spool, name: &str) {
    let key = format!("{name}-1");
    let samples: Vec<SampleRow> = (0..SAMPLES)
        .map(|i| SampleRow::new(key.as_str(), i, T0 + i * STEP, Usage::default()))
        .collect();
    let meter = MeterRow {
        vm_id: key.clone(),
        vm_name: name.into(),
        customer_id: "acme".into(),
        pid: 1,
        start_time: 1,
        running: 0,
        last_seq: SAMPLES - 1,
        last_ts: T0 + (SAMPLES - 1) * STEP,
        ..Default::default()
    };
    spool
        .push_event("started", &key, name, "acme", T0, 0)
        .await
        .unwrap();
    spool.append(&samples, &[meter]).await.unwrap();
    let stop = T0 + SAMPLES * STEP;
    spool
        .push_event("stopped", &key, name, "acme", stop, 0)
        .await
        .unwrap();
}

fn config(port: u16) -> BillingConfig {
    BillingConfig {
        enabled: true,
        endpoint: format!("http://127.0.0.1:{port}"),
        sample_interval: Duration::from_millis(100),
        batch_interval: Duration::from_millis(200),
        heartbeat_interval: Duration::from_secs(1),
        sync_interval: Duration::from_secs(1),
        max_spooled_samples: 1_000_000,
        instance_id: "test".into(),
    }
}

fn whole_stream() -> Vec<String> {
    let mut v = vec!["started".to_owned()];
    v.extend((0..SAMPLES).map(|i| format!("seq {i}")));
    v.push("stopped".into());
    v
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_vm_is_parked_and_reported_while_the_others_flow() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("billing.db");
    let spool = Spool::open(&db).await.unwrap();
    // b's batches and c's start are refused for good; d fails its first
    // two batches with an error that may pass. a is refused nothing.
    for name in ["b", "c", "a", "d"] {
        spool_vm(&spool, name).await;
    }
    spool.close().await;
    let recv = Receiver::default();
    recv.refuse("b", "batch", ErrorCode::FailedPrecondition, u32::MAX);
    recv.refuse("c", "started", ErrorCode::InvalidArgument, u32::MAX);
    recv.refuse("d", "batch", ErrorCode::Internal, 2);
    let port = serve(&recv).await;
    let (billing, tasks) = Billing::start(config(port), dir.path()).await.unwrap();

    let span = format!("gap {T0}-{}", T0 + (SAMPLES - 1) * STEP);
    until("every VM's stream delivered", || {
        recv.log("a") == whole_stream()
            && recv.log("d") == whole_stream()
            && recv.log("b").contains(&span)
            && recv.log("c").iter().any(|e| e.starts_with("gap"))
            && recv.log("c").contains(&"stopped".to_owned())
    })
    .await;
    assert_eq!(
        recv.log("b"),
        vec!["started".to_owned(), "stopped".into(), span],
        "b's refused batch is reported as a gap over its samples' time"
    );
    let c = recv.log("c");
    assert_eq!(
        c[..SAMPLES as usize + 1],
        whole_stream()[1..],
        "c's samples and stop still arrive"
    );
    assert_eq!(
        c[SAMPLES as usize + 1],
        format!("gap {T0}-{T0}"),
        "c's refused start is reported as a gap"
    );

    let stats = billing.stats();
    assert_eq!(Stats::get(&stats.parked_batches), 1);
    assert_eq!(Stats::get(&stats.parked_samples), SAMPLES as u64);
    assert_eq!(Stats::get(&stats.parked_notices), 1);
    assert!(Stats::get(&stats.delivery_retries) >= 2, "d was retried");
    let report = tasks.shutdown(Duration::from_secs(10)).await;
    assert!(report.spooled && report.delivered, "{report:?}");
    drop(billing);

    let spool = Spool::open(&db).await.unwrap();
    assert_eq!(
        spool.parked().await.unwrap(),
        (SAMPLES, 1),
        "parked rows stay on disk"
    );
    assert!(
        spool.events().await.unwrap().is_empty(),
        "nothing else waits"
    );
    assert!(spool.vms_with_samples().await.unwrap().is_empty());
}
