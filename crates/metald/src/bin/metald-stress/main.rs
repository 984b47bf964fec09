//! metald-stress: the seeds' stress tool for metald. Per interval it draws a
//! VM target up to `-max-vms`, keeps about 60% of it running and 25%
//! stopped, deletes half of the stopped VMs each iteration (so VMs keep
//! being created, booted, shut down and deleted), reads VMs back, and at
//! the end prints latency percentiles per RPC and errors by Connect code.
//! Every VM it made is deleted at the end, and on Ctrl-C.
//!
//! `metald-stress bench api` measures read throughput instead (`bench.rs`).
//!
//! Exit status: 0 when every call succeeded or failed with an expected code
//! (see `stats.rs`) and nothing is left; 1 on unexpected errors or VMs
//! left; 2 on bad flags; 130 when interrupted (after cleaning up).

mod bench;
mod chart;
mod cleanup;
mod client;
mod flags;
mod fleet;
mod guest;
mod plan;
mod report;
mod run;
mod stats;

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

use crate::flags::Flags;
use crate::guest::Guest;

fn main() -> ExitCode {
    let flags = match Flags::parse_from_args(std::env::args_os()) {
        Ok(f) => f,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let seed = flags.seed.unwrap_or_else(rand::random);
    let tokens = match flags.tokens() {
        Ok(t) => t,
        Err(e) => return usage(&e),
    };
    let guest = Guest::from_flags(&flags);
    let settings = settings(&flags, seed, tokens.len(), guest.as_ref().ok());
    if flags.dry_run {
        println!("{settings:#}");
        return ExitCode::SUCCESS;
    }
    let guest = match guest {
        Ok(g) => g,
        Err(e) => return usage(&e),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match &flags.command {
        Some(flags::Sub::Bench(flags::Bench::Api(b))) => rt.block_on(async {
            let (stop_tx, stop_rx) = watch::channel(false);
            if let Err(e) = cleanup::on_signals(stop_tx) {
                eprintln!("metald-stress: cannot watch signals: {e}");
                return ExitCode::FAILURE;
            }
            bench::run(&flags.server_url(), &tokens[0], guest.config(), b, stop_rx).await
        }),
        None => rt.block_on(stress(flags, seed, tokens, guest, settings)),
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("metald-stress: {msg}");
    ExitCode::from(2)
}

/// The settings as reported (tokens are not: only how many).
fn settings(f: &Flags, seed: u64, customers: usize, guest: Option<&Guest>) -> Value {
    json!({
        "server": f.server_url(),
        "intervals": f.intervals,
        "interval_duration": humantime::format_duration(f.interval_duration).to_string(),
        "iteration_duration": humantime::format_duration(f.iteration_duration).to_string(),
        "max_vms": f.max_vms,
        "heavy_load": f.heavy_load,
        "customers": customers,
        "concurrency": f.concurrency(),
        "rpc_timeout": humantime::format_duration(f.rpc_timeout).to_string(),
        "seed": seed,
        "guest": guest,
        "json": f.json,
        "report": f.report,
    })
}

async fn stress(
    flags: Flags,
    seed: u64,
    tokens: Vec<String>,
    guest: Guest,
    settings: Value,
) -> ExitCode {
    let stats = Arc::new(stats::Stats::new());
    let api = match client::Api::new(
        &flags.server_url(),
        &tokens,
        guest.config(),
        flags.rpc_timeout,
        flags.heavy_load,
        stats.clone(),
    ) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Err(e) = cleanup::on_signals(stop_tx) {
        eprintln!("metald-stress: cannot watch signals: {e}");
        return ExitCode::FAILURE;
    }
    let prefix = format!("stress-{:06x}", seed & 0xff_ffff);
    eprintln!(
        "metald-stress: {} intervals of {}, up to {} VMs over {} customers, seed {seed}, VMs named {prefix}-N",
        flags.intervals,
        humantime::format_duration(flags.interval_duration),
        flags.max_vms,
        tokens.len()
    );
    let ctx = Arc::new(run::Ctx {
        api,
        fleet: Mutex::new(fleet::Fleet::new(prefix, tokens.len())),
        permits: Semaphore::new(flags.concurrency()),
        stop: stop_rx,
    });
    if let Err(e) = preflight(&ctx.api, &tokens).await {
        eprintln!("metald-stress: {e}");
        return ExitCode::FAILURE;
    }
    let shape = run::Shape {
        intervals: flags.intervals,
        interval: flags.interval_duration,
        iteration: flags.iteration_duration,
        max_vms: flags.max_vms,
        heavy: flags.heavy_load,
        seed,
    };
    let targets = run::run(ctx.clone(), &shape).await;
    let interrupted = ctx.stopped();
    let left = cleanup::delete_all(&ctx).await;
    let (created, deleted) = {
        let f = ctx.fleet.lock().unwrap_or_else(|p| p.into_inner());
        (f.created, f.deleted)
    };
    let outcome = report::Outcome {
        settings,
        targets,
        created,
        deleted,
        left,
        interrupted,
    };
    let snap = stats.snapshot();
    print!("{}", report::table(&snap, &outcome));
    if let Err(e) = write_files(&flags, &snap, &outcome) {
        eprintln!("metald-stress: {e}");
        return ExitCode::FAILURE;
    }
    if interrupted {
        ExitCode::from(130)
    } else if stats::count_unexpected(&snap.errors) > 0 || !outcome.left.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// One ListVms per customer before any VM is made: a wrong `-server` or
/// `-auth` fails here, once, naming the flag.
async fn preflight(api: &client::Api, tokens: &[String]) -> Result<(), String> {
    for c in 0..tokens.len() {
        if let Err(e) = api.list(c).await {
            let flag = match e.code {
                connectrpc::ErrorCode::Unauthenticated
                | connectrpc::ErrorCode::PermissionDenied => {
                    format!("-auth (token {} of {})", c + 1, tokens.len())
                }
                _ => "-server".to_owned(),
            };
            return Err(format!("{flag}: ListVms failed: {e}"));
        }
    }
    Ok(())
}

/// `--json FILE` and `--report DIR`.
fn write_files(flags: &Flags, snap: &stats::Snapshot, out: &report::Outcome) -> Result<(), String> {
    let doc = report::json(snap, out);
    let text = format!("{doc:#}\n");
    if let Some(path) = &flags.json {
        std::fs::write(path, &text).map_err(|e| format!("--json {}: {e}", path.display()))?;
    }
    if let Some(dir) = &flags.report {
        std::fs::create_dir_all(dir).map_err(|e| format!("--report {}: {e}", dir.display()))?;
        std::fs::write(dir.join("report.json"), &text)
            .map_err(|e| format!("--report {}: {e}", dir.display()))?;
        chart::write(dir, snap).map_err(|e| format!("--report {}: {e}", dir.display()))?;
    }
    Ok(())
}
