//! Quota and host-capacity settings (`UNKEY_METALD_QUOTA_*`,
//! `UNKEY_METALD_QUOTAS_FILE`, `UNKEY_METALD_HOST_*`), and the reload of the
//! quotas file on SIGHUP and whenever it changes, without a restart.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Args;
use metald_core::VmService;
use metald_core::quota::{HostCapacity, Limits, QuotaBook, parse_size};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// How often the quotas file is checked for a change.
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Args)]
pub struct QuotaArgs {
    /// Most VMs one customer may have (unset: unlimited).
    #[arg(long, env = "UNKEY_METALD_QUOTA_MAX_VMS")]
    pub quota_max_vms: Option<u64>,
    /// Most VMs one customer may have running at once.
    #[arg(long, env = "UNKEY_METALD_QUOTA_MAX_RUNNING_VMS")]
    pub quota_max_running_vms: Option<u64>,
    /// Most network interfaces over all of one customer's VMs.
    #[arg(long, env = "UNKEY_METALD_QUOTA_MAX_INTERFACES")]
    pub quota_max_interfaces: Option<u64>,
    /// Most vCPUs over all of one customer's VMs.
    #[arg(long, env = "UNKEY_METALD_QUOTA_MAX_VCPUS")]
    pub quota_max_vcpus: Option<u64>,
    /// Most memory over all of one customer's VMs (`64GiB`).
    #[arg(long, env = "UNKEY_METALD_QUOTA_MAX_MEMORY", value_parser = parse_size)]
    pub quota_max_memory: Option<u64>,
    /// Creates per minute per customer (a token bucket, burst = rate).
    #[arg(long, env = "UNKEY_METALD_QUOTA_CREATE_RATE")]
    pub quota_create_rate: Option<u64>,
    /// A JSON file `{"default": {...}, "customers": {"<id>": {...}}}` with
    /// the limits above (keys `max_vms`, `max_vcpus`, `max_memory`,
    /// `max_running_vms`, `max_interfaces`, `create_rate`) over the
    /// environment's; reloaded on SIGHUP and when it changes.
    #[arg(long, env = "UNKEY_METALD_QUOTAS_FILE")]
    pub quotas_file: Option<PathBuf>,
    /// Running vCPUs allowed per host CPU.
    #[arg(long, env = "UNKEY_METALD_HOST_CPU_OVERCOMMIT", default_value = "16")]
    pub host_cpu_overcommit: f64,
    /// Memory kept free for the host: running VMs get the rest (`512MiB`).
    #[arg(long, env = "UNKEY_METALD_HOST_MEMORY_RESERVE", default_value = "512MiB", value_parser = parse_size)]
    pub host_memory_reserve: u64,
}

impl QuotaArgs {
    fn defaults(&self) -> Limits {
        Limits {
            max_vms: self.quota_max_vms,
            max_vcpus: self.quota_max_vcpus,
            max_memory: self.quota_max_memory,
            max_running_vms: self.quota_max_running_vms,
            max_interfaces: self.quota_max_interfaces,
            create_rate: self.quota_create_rate,
        }
    }

    /// The limits now: the environment's, with the file's over them.
    pub fn book(&self) -> anyhow::Result<QuotaBook> {
        let Some(path) = &self.quotas_file else {
            return Ok(QuotaBook {
                default: self.defaults(),
                ..QuotaBook::default()
            });
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("UNKEY_METALD_QUOTAS_FILE {}: {e}", path.display()))?;
        QuotaBook::from_json(&text, self.defaults())
            .map_err(|e| anyhow::anyhow!("UNKEY_METALD_QUOTAS_FILE {}: {e}", path.display()))
    }

    /// What this host can run: its CPUs × the overcommit, its memory less
    /// the reserve.
    pub fn host(&self) -> anyhow::Result<HostCapacity> {
        if self.host_cpu_overcommit.is_nan() || self.host_cpu_overcommit <= 0.0 {
            anyhow::bail!("UNKEY_METALD_HOST_CPU_OVERCOMMIT must be above 0");
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total = mem_total()
            .ok_or_else(|| anyhow::anyhow!("cannot read MemTotal from /proc/meminfo"))?;
        Ok(HostCapacity {
            vcpus: (cpus * self.host_cpu_overcommit).floor() as u64,
            memory_bytes: total.saturating_sub(self.host_memory_reserve),
        })
    }

    /// Reloads the quotas file into `service` on SIGHUP and whenever its
    /// modification time changes; a file that does not parse is logged and
    /// the limits in force are kept.
    pub fn watch(self, service: VmService) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let mut hup = signal(SignalKind::hangup())?;
        Ok(tokio::spawn(async move {
            let mut seen = self.quotas_file.as_deref().and_then(modified);
            let mut tick = tokio::time::interval(POLL);
            loop {
                let forced = tokio::select! {
                    _ = hup.recv() => true,
                    _ = tick.tick() => false,
                };
                let now = self.quotas_file.as_deref().and_then(modified);
                if !forced && now == seen {
                    continue;
                }
                seen = now;
                match self.book() {
                    Ok(book) => {
                        info!(customers = book.customers.len(), "quotas reloaded");
                        service.set_quotas(book);
                    }
                    Err(e) => {
                        warn!(error = %e, "quotas file not reloaded; the limits in force stay")
                    }
                }
            }
        }))
    }
}

fn modified(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The host's memory, from `/proc/meminfo`.
fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
