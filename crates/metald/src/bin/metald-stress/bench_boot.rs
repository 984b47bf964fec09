//! `metald-stress bench boot` and `bench throughput`: CreateVm+BootVm
//! through a metald of the bench's own against the raw VMM path
//! (`bench_raw.rs`) on the same host, guest and settings.
//!
//! `boot` alternates the two (metald first on even runs, raw first on odd
//! ones) per backend and compares medians; `throughput` drives many
//! creates+boots at a fixed concurrency through each, one after the
//! other, and compares rates. Every VM is deleted (metald) or killed and
//! removed (raw) right after it is up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::bench_daemon::{self, Backend, Daemon, HostFlags};
use crate::bench_raw;
use crate::guest::Guest;

#[derive(Debug, Clone, Args)]
pub struct BootBench {
    /// Runs of each path per backend.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub runs: u32,
    /// Only these backends (default: QEMU, Firecracker, Cloud Hypervisor).
    #[arg(long, value_delimiter = ',', value_parser = ["qemu", "firecracker", "cloudhypervisor"])]
    pub backends: Vec<String>,
    #[command(flatten)]
    pub host: HostFlags,
}

#[derive(Debug, Clone, Args)]
pub struct ThroughputBench {
    /// Creates+boots through each path.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub vms: u32,
    /// How many are in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    #[command(flatten)]
    pub host: HostFlags,
}

/// The `q` quantile of `samples` (nearest rank), in ms.
pub fn quantile_ms(samples: &[Duration], q: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort();
    let Some(last) = s.len().checked_sub(1) else {
        return f64::NAN;
    };
    let i = ((q * s.len() as f64).ceil() as usize)
        .saturating_sub(1)
        .min(last);
    s[i].as_secs_f64() * 1000.0
}

/// The bar for metald over raw.
fn boot_bar(b: Backend) -> f64 {
    match b {
        Backend::CloudHypervisor => 1.20,
        Backend::Qemu | Backend::Firecracker => 1.10,
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

fn wanted(b: &BootBench) -> Vec<Backend> {
    let all = [
        Backend::Qemu,
        Backend::Firecracker,
        Backend::CloudHypervisor,
    ];
    all.into_iter()
        .filter(|x| b.backends.is_empty() || b.backends.iter().any(|n| n == x.name()))
        .collect()
}

/// Runs `bench boot`; false on any error.
pub async fn boot(b: &BootBench, guest: &Guest, token: &str, stop: &watch::Receiver<bool>) -> bool {
    let mut ok = true;
    for backend in wanted(b) {
        if *stop.borrow() {
            return false;
        }
        if let Err(why) = b.host.binary(backend) {
            println!("bench boot {}: {why}", backend.name());
            continue;
        }
        if let Err(e) = boot_one(b, backend, guest, token, stop).await {
            eprintln!("metald-stress: bench boot {}: {e}", backend.name());
            ok = false;
        }
    }
    ok
}

async fn boot_one(
    b: &BootBench,
    backend: Backend,
    guest: &Guest,
    token: &str,
    stop: &watch::Receiver<bool>,
) -> Result<(), String> {
    let d = Daemon::start(&b.host, backend, guest, token, &[])?;
    let raw_dir = bench_daemon::Scratch::new("raw")?;
    let cfg = guest.config();
    let (mut through, mut raw) = (Vec::new(), Vec::new());
    let mut result = Ok(());
    for i in 0..b.runs {
        if *stop.borrow() {
            result = Err("interrupted".to_owned());
            break;
        }
        for metald_turn in [i % 2 == 0, i % 2 != 0] {
            let r = if metald_turn {
                timed_metald(&d, &cfg, &format!("boot-{i}"))
                    .await
                    .map(|t| through.push(t))
            } else {
                timed_raw(&b.host, backend, guest, &raw_dir.0.join(i.to_string()), i)
                    .await
                    .map(|t| raw.push(t))
            };
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
        if result.is_err() {
            break;
        }
    }
    let left = d.finish().await;
    drop(raw_dir);
    result?;
    let (m50, r50) = (quantile_ms(&through, 0.5), quantile_ms(&raw, 0.5));
    let ratio = m50 / r50;
    let bar = boot_bar(backend);
    println!(
        "bench boot {}: {} alternating runs: metald p50 {m50:.1} ms p90 {:.1} ms, raw p50 {r50:.1} ms p90 {:.1} ms; \
         {ratio:.2}× raw ({:+.1} ms); bar ≤ {bar:.2}× raw: {}",
        backend.name(),
        b.runs,
        quantile_ms(&through, 0.9),
        quantile_ms(&raw, 0.9),
        m50 - r50,
        met(ratio <= bar),
    );
    if left > 0 {
        return Err(format!("{left} VMs or VMMs were left"));
    }
    Ok(())
}

/// CreateVm+BootVm through metald, timed; then DeleteVm (not timed).
async fn timed_metald(
    d: &Daemon,
    cfg: &metald_proto::vmprovisioner::v1::VmConfig,
    name: &str,
) -> Result<Duration, String> {
    let began = Instant::now();
    let r = bench_daemon::create_and_boot(&d.api, cfg, name).await;
    let took = began.elapsed();
    let deleted = bench_daemon::delete_one(&d.api, name).await;
    r.and(deleted).map(|()| took)
}

/// The raw path, timed; then kill and remove (not timed).
async fn timed_raw(
    host: &HostFlags,
    backend: Backend,
    guest: &Guest,
    dir: &Path,
    i: u32,
) -> Result<Duration, String> {
    let began = Instant::now();
    let vm = bench_raw::boot(
        host,
        backend,
        guest,
        dir.to_path_buf(),
        &format!("bench-raw-{i}"),
    )
    .await?;
    let took = began.elapsed();
    vm.remove().await;
    Ok(took)
}

/// Runs `n` jobs `width` at a time; each job's time and the wall time.
async fn drive<F, Fut>(n: u32, width: u32, job: F) -> Result<(Vec<Duration>, Duration), String>
where
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Duration, String>> + Send,
{
    let job = Arc::new(job);
    let next = Arc::new(AtomicU32::new(0));
    let began = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..width.min(n) {
        let (job, next) = (job.clone(), next.clone());
        tasks.spawn(async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(times);
                }
                times.push(job(i).await?);
            }
        });
    }
    let mut all = Vec::new();
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        match r.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(t) => all.extend(t),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok((all, began.elapsed())),
    }
}

/// Runs `bench throughput`; false on any error.
pub async fn throughput(b: &ThroughputBench, guest: &Guest, token: &str) -> bool {
    let backend = b.host.fleet_backend();
    let d = match Daemon::start(&b.host, backend, guest, token, &[]) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("metald-stress: bench throughput: {e}");
            return false;
        }
    };
    let raw_dir = match bench_daemon::Scratch::new("raw") {
        Ok(p) => p,
        Err(e) => {
            eprintln!("metald-stress: bench throughput: {e}");
            return false;
        }
    };
    let through = {
        let (d, cfg) = (d.clone(), guest.config());
        drive(b.vms, b.concurrency, move |i| {
            let (d, cfg) = (d.clone(), cfg.clone());
            async move { timed_metald(&d, &cfg, &format!("tp-{i}")).await }
        })
        .await
    };
    let raw = {
        let (host, guest, dir) = (b.host.clone(), guest.clone(), raw_dir.0.clone());
        drive(b.vms, b.concurrency, move |i| {
            let (host, guest, dir): (HostFlags, Guest, PathBuf) =
                (host.clone(), guest.clone(), dir.join(i.to_string()));
            async move { timed_raw(&host, backend, &guest, &dir, i).await }
        })
        .await
    };
    let left = match Arc::try_unwrap(d) {
        Ok(d) => d.finish().await,
        Err(_) => 1,
    };
    drop(raw_dir);
    let ((mt, mwall), (rt, rwall)) = match (through, raw) {
        (Ok(m), Ok(r)) => (m, r),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("metald-stress: bench throughput: {e}");
            return false;
        }
    };
    let rate = |n: usize, wall: Duration| n as f64 / wall.as_secs_f64();
    let (m, r) = (rate(mt.len(), mwall), rate(rt.len(), rwall));
    let bar = boot_bar(backend);
    println!(
        "bench throughput {}: {} creates+boots at concurrency {}: metald {m:.1}/s (p50 {:.1} ms, p99 {:.1} ms), \
         raw {r:.1}/s (p50 {:.1} ms, p99 {:.1} ms); {:.2}× raw's time per VM; bar ≤ {bar:.2}× raw (as for one boot): {}",
        backend.name(),
        b.vms,
        b.concurrency,
        quantile_ms(&mt, 0.5),
        quantile_ms(&mt, 0.99),
        quantile_ms(&rt, 0.5),
        quantile_ms(&rt, 0.99),
        r / m,
        met(r / m <= bar),
    );
    if left > 0 {
        eprintln!("metald-stress: bench throughput: {left} VMs or VMMs were left");
        return false;
    }
    true
}
