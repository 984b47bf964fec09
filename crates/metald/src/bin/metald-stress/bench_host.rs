//! `metald-stress bench density`, `bench billing` and `bench adopt`: what
//! metald costs per live VMM, measured on a metald of the bench's own
//! holding a fleet of booted and paused VMs (paused: live, but the guests
//! use no CPU). Firecracker when its binary is found; else QEMU at the
//! largest count that fits this host's memory, which the result line says.
//!
//! - density: metald's `VmRSS` with 0 and with N VMs; KiB per VM.
//! - billing: metald's CPU time (its process CPU clock) over a window with
//!   no VM, with a quarter of N and with N VMs metered every 100 ms: what
//!   each VM adds and what metering costs whatever the count, as a share
//!   of one core for 1,000 VMs (measured directly when N is 1,000 or more).
//!   With `--running` the guests are left running instead of paused.
//! - adopt: SIGKILL metald with N live VMs, start it again, time until it
//!   lists all N and GetVmInfo answers for each with the VM live.

use std::time::{Duration, Instant};

use clap::Args;
use metald_proto::vmprovisioner::v1 as pb;

use crate::bench_daemon::{self, Backend, Daemon, HostFlags};
use crate::guest::Guest;

#[derive(Debug, Clone, Args)]
pub struct FleetBench {
    /// Live VMs (fewer on QEMU when they would not fit, and the result
    /// line says so).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub vms: u32,
    /// VMs created and booted at once while the fleet is built.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub width: u32,
    /// billing: how long CPU time is measured, idle and with the fleet.
    #[arg(long, default_value = "10s", value_parser = crate::flags::positive_duration)]
    pub window: Duration,
    /// billing: leave the guests running (idle once booted) instead of
    /// pausing them, so a VMM's CPU clock moves between samples and every
    /// sample is a full read (the clock, `statm`, `io`), as for a live
    /// customer VM.
    #[arg(long)]
    pub running: bool,
    #[command(flatten)]
    pub host: HostFlags,
}

#[derive(Debug, Clone, Copy)]
pub enum Which {
    Density,
    Billing,
    Adopt,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Density => "density",
            Which::Billing => "billing",
            Which::Adopt => "adopt",
        }
    }
}

/// What a QEMU guest may cost the host beyond its memory (QEMU itself,
/// TCG's buffers), for the count that fits.
const QEMU_OVERHEAD_KIB: u64 = 96 << 10;

/// The fleet's size and, when it is smaller than asked, why.
fn fleet_size(b: &FleetBench, backend: Backend, g: &Guest) -> (u32, String) {
    if backend != Backend::Qemu {
        return (b.vms, String::new());
    }
    let per_vm = (g.memory_mib << 10) + QEMU_OVERHEAD_KIB;
    let fits = (bench_daemon::mem_available_kib() * 8 / 10 / per_vm).max(1) as u32;
    if fits >= b.vms {
        (b.vms, " (QEMU: Firecracker not found)".to_owned())
    } else {
        (
            fits,
            format!(
                " (QEMU, Firecracker not found: {fits} of the {} asked fit in 80% of this host's available memory)",
                b.vms
            ),
        )
    }
}

/// Runs one of the three; false on any error.
pub async fn run(which: Which, b: &FleetBench, guest: &Guest, token: &str) -> bool {
    let backend = b.host.fleet_backend();
    let (n, note) = fleet_size(b, backend, guest);
    let mut env = Vec::new();
    if let Which::Billing = which {
        // Metered at 100 ms; nothing listens at the endpoint, so samples
        // stay in the spool (delivery backs off).
        env.push(("UNKEY_METALD_BILLING_ENABLED", "true".to_owned()));
        env.push(("UNKEY_METALD_BILLING_SAMPLE_INTERVAL", "100ms".to_owned()));
        env.push((
            "UNKEY_METALD_BILLING_ENDPOINT",
            "http://127.0.0.1:9".to_owned(),
        ));
    }
    let mut d = match Daemon::start(&b.host, backend, guest, token, &env) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("metald-stress: bench {}: {e}", which.name());
            return false;
        }
    };
    let r = measure(which, &mut d, b, guest, token, n).await;
    let left = d.finish().await;
    match r {
        Ok(line) => println!("bench {} {}: {line}{note}", which.name(), backend.name()),
        Err(e) => {
            eprintln!("metald-stress: bench {}: {e}", which.name());
            return false;
        }
    }
    if left > 0 {
        eprintln!(
            "metald-stress: bench {}: {left} VMs or VMMs were left",
            which.name()
        );
        return false;
    }
    true
}

async fn measure(
    which: Which,
    d: &mut Daemon,
    b: &FleetBench,
    guest: &Guest,
    token: &str,
    n: u32,
) -> Result<String, String> {
    let cfg = guest.config();
    let pid = d.pid();
    let gone = || format!("metald (pid {pid}) is gone");
    match which {
        Which::Density => {
            let idle = bench_daemon::rss_kib(pid).ok_or_else(gone)?;
            bench_daemon::fleet(&d.api, &cfg, "density", n, b.width as usize, true).await?;
            let full = bench_daemon::rss_kib(d.pid()).ok_or_else(gone)?;
            let per_vm = full.saturating_sub(idle) as f64 / f64::from(n);
            Ok(format!(
                "metald RSS {idle} KiB with 0 VMs, {full} KiB with {n} live VMMs: {per_vm:.1} KiB per VM; bar ≤ 64 KiB per VM: {}",
                met(per_vm <= 64.0)
            ))
        }
        Which::Billing => billing(d, b, &cfg, n).await,
        Which::Adopt => {
            let names =
                bench_daemon::fleet(&d.api, &cfg, "adopt", n, b.width as usize, true).await?;
            d.kill();
            let began = Instant::now();
            let listening = d.restart(token)?;
            all_answer(&d.api, &names).await?;
            let took = began.elapsed();
            Ok(format!(
                "{n} live VMs adopted and answering {:.0} ms after start (listening after {:.0} ms); bar ≤ 1 s: {}",
                took.as_secs_f64() * 1000.0,
                listening.as_secs_f64() * 1000.0,
                met(took <= Duration::from_secs(1))
            ))
        }
    }
}

/// metald's CPU for metering `n` VMs (see the module's doc).
async fn billing(d: &Daemon, b: &FleetBench, cfg: &pb::VmConfig, n: u32) -> Result<String, String> {
    let pid = d.pid();
    let gone = || format!("metald (pid {pid}) is gone");
    let w = b.window.as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let asked = if b.running { "running" } else { "paused" };
    let idle = cpu_over(pid, b.window).await.ok_or_else(gone)?;
    // Below 1,000 VMs, a first fleet of a quarter: two sizes split
    // the cost into what metering costs whatever the count (the
    // 100 ms tick, the spool's commit a second) and what each VM
    // adds, so the 1,000-VM figure counts the first once.
    let n1 = (2..1000).contains(&n).then_some((n / 4).max(1));
    let first = match n1 {
        Some(n1) => {
            bench_daemon::fleet(&d.api, cfg, "billing-a", n1, b.width as usize, !b.running).await?;
            Some((n1, cpu_over(pid, b.window).await.ok_or_else(gone)?))
        }
        None => None,
    };
    let rest = n - n1.unwrap_or(0);
    bench_daemon::fleet(&d.api, cfg, "billing", rest, b.width as usize, !b.running).await?;
    let full = cpu_over(pid, b.window).await.ok_or_else(gone)?;
    // What the fleet was while measured, as metald lists it.
    let states = bench_daemon::list_states(&d.api).await?;
    let count = |s| states.iter().filter(|(_, st)| *st == Some(s)).count();
    let kind = match (
        count(pb::VmState::VM_STATE_RUNNING),
        count(pb::VmState::VM_STATE_PAUSED),
    ) {
        (r, 0) if r == n as usize => "running",
        (0, p) if p == n as usize => "paused",
        (r, p) => {
            return Err(format!(
                "the fleet is {r} running and {p} paused VMs, not {n} {asked}"
            ));
        }
    };
    let scaled = full.saturating_sub(idle).as_secs_f64() / w / f64::from(n) * 1000.0 * 100.0;
    let Some((n1, c1)) = first else {
        return Ok(format!(
            "metald CPU over {w:.1} s: {:.1} ms idle, {:.1} ms with {n} {kind} VMs metered at 100 ms: \
             {:.3} ms/s per VM, {scaled:.2}% of one core for 1,000 VMs; bar ≤ 2.5%: {}",
            ms(idle),
            ms(full),
            scaled / 100.0,
            met(scaled <= 2.5)
        ));
    };
    // CPU-seconds per second: per VM, and whatever the count.
    let per_vm = (full.as_secs_f64() - c1.as_secs_f64()) / w / f64::from(n - n1);
    let fixed = (c1.as_secs_f64() - idle.as_secs_f64()) / w - per_vm * f64::from(n1);
    let at_1000 = (fixed + per_vm * 1000.0) * 100.0;
    Ok(format!(
        "metald CPU over {w:.1} s: {:.1} ms idle, {:.1} ms with {n1} and {:.1} ms with {n} {kind} VMs \
         metered at 100 ms: {:.4} ms/s per VM and {:.2} ms/s whatever the count, {at_1000:.2}% of \
         one core for 1,000 VMs; bar ≤ 2.5%: {} ({n} VMs' cost scaled to 1,000 as if all of it were \
         per VM: {scaled:.2}%)",
        ms(idle),
        ms(c1),
        ms(full),
        per_vm * 1000.0,
        fixed * 1000.0,
        // The larger fleet cost no more than the smaller one: the
        // window was too short for the difference to show.
        if per_vm <= 0.0 {
            "not judged (no per-VM cost showed: a longer -window or more -vms)"
        } else {
            met(at_1000 <= 2.5)
        }
    ))
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "missed" }
}

/// `pid`'s CPU time over the next `window`.
async fn cpu_over(pid: i32, window: Duration) -> Option<Duration> {
    let before = bench_daemon::cpu_time(pid)?;
    tokio::time::sleep(window).await;
    Some(bench_daemon::cpu_time(pid)?.saturating_sub(before))
}

/// Polls (bounded) until ListVms shows every one of `names` and GetVmInfo
/// answers for each with the VM running or paused.
async fn all_answer(c: &bench_daemon::Client, names: &[String]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut pending: Vec<&String> = names.iter().collect();
    loop {
        let listed = bench_daemon::list(c).await?;
        let all_listed = names.iter().all(|n| listed.contains(n));
        if all_listed {
            let mut still = Vec::new();
            for name in pending {
                let req = pb::GetVmInfoRequest {
                    vm_id: name.clone(),
                    ..Default::default()
                };
                // Not yet answering: asked again; answering with the VM
                // not live: it was not adopted.
                let Ok(r) = c.get_vm_info(req).await else {
                    still.push(name);
                    continue;
                };
                match r.into_owned().state.as_known() {
                    Some(pb::VmState::VM_STATE_RUNNING | pb::VmState::VM_STATE_PAUSED) => {}
                    other => return Err(format!("{name} is {other:?} after the restart")),
                }
            }
            pending = still;
            if pending.is_empty() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{} VMs not adopted within 300 s", pending.len()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
