//! `metald-stress bench api`: read throughput of GetVmInfo and ListVms with
//! N concurrent clients, each on its own connection, over HTTP/1.1
//! (Connect) and h2c (Connect and gRPC). One result line per RPC and
//! transport: req/s, p50, p99, errors, and the bar it is measured against.
//! The VMs read are created (not booted) first and deleted afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use connectrpc::client::{ClientConfig, Http2Connection, HttpClient, SharedHttp2Connection};
use connectrpc::{ConnectError, Protocol};
use hdrhistogram::Histogram;
use metald_proto::vmprovisioner::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Args)]
pub struct ApiBench {
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clients: u32,
    /// How long each RPC and transport is driven.
    #[arg(long, default_value = "5s", value_parser = crate::flags::positive_duration)]
    pub duration: Duration,
    /// VMs created for the reads (ListVms pages over all of them).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub vms: u32,
    /// ListVms page size.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub page_size: i32,
}

#[derive(Clone)]
enum Client {
    Http1(Box<pb::VmServiceClient<HttpClient>>),
    H2(Box<pb::VmServiceClient<SharedHttp2Connection>>),
}

#[derive(Clone, Copy, PartialEq)]
enum Rpc {
    Info,
    List,
}

impl Client {
    async fn call(&self, rpc: Rpc, vm: &str, page_size: i32) -> Result<(), ConnectError> {
        let info = || pb::GetVmInfoRequest {
            vm_id: vm.to_owned(),
            ..Default::default()
        };
        let list = || pb::ListVmsRequest {
            page_size,
            ..Default::default()
        };
        match (self, rpc) {
            (Client::Http1(c), Rpc::Info) => c.get_vm_info(info()).await.map(drop),
            (Client::Http1(c), Rpc::List) => c.list_vms(list()).await.map(drop),
            (Client::H2(c), Rpc::Info) => c.get_vm_info(info()).await.map(drop),
            (Client::H2(c), Rpc::List) => c.list_vms(list()).await.map(drop),
        }
    }
}

/// The transports measured: name, HTTP/2 or not, protocol.
const TRANSPORTS: &[(&str, bool, Protocol)] = &[
    ("http1 connect", false, Protocol::Connect),
    ("h2c connect", true, Protocol::Connect),
    ("h2c grpc", true, Protocol::Grpc),
];

async fn client(
    uri: &http::Uri,
    token: &str,
    h2: bool,
    protocol: Protocol,
) -> Result<Client, ConnectError> {
    let cfg = ClientConfig::new(uri.clone())
        .with_protocol(protocol)
        .with_default_timeout(Duration::from_secs(30))
        .with_default_header("authorization", format!("Bearer {token}"));
    if h2 {
        let conn = Http2Connection::connect_plaintext(uri.clone())
            .await?
            .shared(64);
        Ok(Client::H2(Box::new(pb::VmServiceClient::new(conn, cfg))))
    } else {
        Ok(Client::Http1(Box::new(pb::VmServiceClient::new(
            HttpClient::plaintext(),
            cfg,
        ))))
    }
}

struct Measured {
    calls: u64,
    errors: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

/// Drives `rpc` with `clients` concurrent clients for `b.duration`.
async fn measure(
    uri: &http::Uri,
    token: &str,
    (h2, protocol): (bool, Protocol),
    rpc: Rpc,
    names: Arc<Vec<String>>,
    b: &ApiBench,
) -> Result<Measured, ConnectError> {
    let mut clients = Vec::new();
    for _ in 0..b.clients {
        clients.push(client(uri, token, h2, protocol).await?);
    }
    let start = Instant::now();
    let end = start + b.duration;
    let mut tasks = JoinSet::new();
    for (i, c) in clients.into_iter().enumerate() {
        let names = names.clone();
        let page_size = b.page_size;
        tasks.spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let (mut calls, mut errors) = (0u64, 0u64);
            let mut n = i;
            while Instant::now() < end {
                let began = Instant::now();
                let r = c.call(rpc, &names[n % names.len()], page_size).await;
                h.saturating_record(began.elapsed().as_micros().max(1) as u64);
                calls += 1;
                errors += u64::from(r.is_err());
                n += 1;
            }
            (calls, errors, h)
        });
    }
    let mut m = Measured {
        calls: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
    };
    while let Some(r) = tasks.join_next().await {
        let (calls, errors, h) = r.expect("a bench client panicked");
        m.calls += calls;
        m.errors += errors;
        m.latency.add(h).expect("same bounds");
    }
    m.elapsed = start.elapsed();
    Ok(m)
}

/// Creates `b.vms` VMs of `client`'s customer; the names made.
async fn create(
    c: &pb::VmServiceClient<HttpClient>,
    config: &pb::VmConfig,
    prefix: &str,
    n: u32,
) -> Result<Vec<String>, ConnectError> {
    let mut names = Vec::new();
    for chunk in (1..=n).collect::<Vec<_>>().chunks(16) {
        let mut tasks = JoinSet::new();
        for i in chunk {
            let (c, name) = (c.clone(), format!("{prefix}-{i}"));
            let req = pb::CreateVmRequest {
                vm_id: name.clone(),
                config: buffa::MessageField::some(config.clone()),
                ..Default::default()
            };
            tasks.spawn(async move { c.create_vm(req).await.map(|_| name) });
        }
        while let Some(r) = tasks.join_next().await {
            names.push(r.expect("a create task panicked")?);
        }
    }
    Ok(names)
}

async fn delete(c: &pb::VmServiceClient<HttpClient>, names: &[String]) -> usize {
    let mut failed = 0;
    for chunk in names.chunks(16) {
        let mut tasks = JoinSet::new();
        for name in chunk {
            let (c, vm_id) = (c.clone(), name.clone());
            tasks.spawn(async move {
                c.delete_vm(pb::DeleteVmRequest {
                    vm_id,
                    force: true,
                    ..Default::default()
                })
                .await
            });
        }
        while let Some(r) = tasks.join_next().await {
            failed += usize::from(!matches!(r, Ok(Ok(_))));
        }
    }
    failed
}

/// The bar for one line (measured on release builds, 10 000 rows).
fn bar(rpc: Rpc, h2: bool, rps: f64, p99_ms: f64, http1_rps: Option<f64>) -> String {
    let (text, met) = match (rpc, h2, http1_rps) {
        (Rpc::Info, false, _) => (
            "≥ 15000 req/s, p99 ≤ 2 ms".to_owned(),
            rps >= 15000.0 && p99_ms <= 2.0,
        ),
        (Rpc::Info, true, Some(base)) => (
            format!("≥ 0.8 × http1 ({:.0} req/s), p99 ≤ 2 ms", 0.8 * base),
            rps >= 0.8 * base && p99_ms <= 2.0,
        ),
        (Rpc::List, _, _) | (Rpc::Info, true, None) => ("p99 ≤ 5 ms".to_owned(), p99_ms <= 5.0),
    };
    format!("bar {text}: {}", if met { "met" } else { "missed" })
}

/// Runs the bench; the process exit status.
pub async fn run(
    server: &str,
    token: &str,
    config: pb::VmConfig,
    b: &ApiBench,
    stop: watch::Receiver<bool>,
) -> std::process::ExitCode {
    let uri: http::Uri = match server.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("metald-stress: -server {server:?}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let setup = match client(&uri, token, false, Protocol::Connect).await {
        Ok(Client::Http1(c)) => *c,
        _ => unreachable!("an HTTP/1.1 client needs no connection up front"),
    };
    let prefix = format!("bench-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let names = match create(&setup, &config, &prefix, b.vms).await {
        Ok(n) => Arc::new(n),
        Err(e) => {
            eprintln!("metald-stress: creating the bench VMs: {e}");
            let _ = delete(
                &setup,
                &(1..=b.vms)
                    .map(|i| format!("{prefix}-{i}"))
                    .collect::<Vec<_>>(),
            )
            .await;
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut errors = 0;
    'all: for rpc in [Rpc::Info, Rpc::List] {
        let mut http1_rps = None;
        for (label, h2, protocol) in TRANSPORTS {
            if *stop.borrow() {
                break 'all;
            }
            let m = match measure(&uri, token, (*h2, *protocol), rpc, names.clone(), b).await {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("metald-stress: {label}: {e}");
                    errors += 1;
                    continue;
                }
            };
            let rps = m.calls as f64 / m.elapsed.as_secs_f64();
            let ms = |q: f64| m.latency.value_at_quantile(q) as f64 / 1000.0;
            if !*h2 {
                http1_rps = Some(rps);
            }
            let name = if rpc == Rpc::Info {
                "GetVmInfo"
            } else {
                "ListVms"
            };
            println!(
                "bench api {name} {label}: {} clients, {} VMs, {:.1}s: {rps:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors; {}",
                b.clients,
                names.len(),
                m.elapsed.as_secs_f64(),
                ms(0.5),
                ms(0.99),
                m.errors,
                bar(rpc, *h2, rps, ms(0.99), http1_rps),
            );
            errors += m.errors;
        }
    }
    let left = delete(&setup, &names).await;
    if left > 0 {
        eprintln!("metald-stress: {left} bench VMs could not be deleted");
    }
    if *stop.borrow() {
        std::process::ExitCode::from(130)
    } else if errors > 0 || left > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
