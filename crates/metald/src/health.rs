//! The health checks behind `GET /health` and `grpc.health.v1`: run every
//! few seconds on their own task (so a flood of health requests costs no
//! disk writes), each bounded in time (a hung disk is reported, not waited
//! for), and published to [`metald_api::Health`].
//!
//! | check | needed to serve | what it does |
//! |---|---|---|
//! | `store` | yes | writes and fsyncs one row of metald.db |
//! | `data_dir` | yes | creates, fsyncs and removes a file in the data directory; free space |
//! | `backend` | yes | runs each VMM binary with `--version` (again only once the file changed) |
//! | `kvm` | where the backend needs it | opens `/dev/kvm` read-write |
//! | `tun` | where VM networking is on | opens `/dev/net/tun` read-write |
//! | `billing` | no | delivery lag (oldest unacknowledged sample), retries since the last check |
//! | `reconcile` | no | when the periodic reconciler last finished a pass |

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metald_api::health::{Check, Health, Report};
use tokio::task::JoinHandle;
use tracing::warn;

/// How often the checks run.
pub const INTERVAL: Duration = Duration::from_secs(3);
/// Longest one check may take before it counts as failing.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Free space in the data directory below which metald is degraded, and
/// below which it is failing (SQLite and VM directories need room).
const LOW_SPACE: u64 = 1 << 30;
const NO_SPACE: u64 = 64 << 20;

/// What the backend needs from the host, as the health checks see it.
#[derive(Debug, Clone)]
pub struct BackendFacts {
    pub name: &'static str,
    /// The VMM binary, and the jailer when one is used.
    pub binaries: Vec<PathBuf>,
    /// Whether VMs need `/dev/kvm` (every backend but QEMU with TCG).
    pub needs_kvm: bool,
}

/// When the reconciler last finished a pass, and how the last one ended.
#[derive(Debug, Default)]
pub struct ReconcileClock {
    /// Unix seconds of the last pass that succeeded (0: none yet).
    last_ok: AtomicI64,
    last_error: Mutex<Option<String>>,
}

impl ReconcileClock {
    pub fn passed(&self) {
        self.last_ok.store(unix_now(), Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn failed(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }
}

/// Everything the checks look at.
pub struct Probes {
    pub store: metald_store::SqliteStore,
    pub data_dir: PathBuf,
    pub backend: BackendFacts,
    pub network: bool,
    pub billing: Arc<metald_billing::Billing>,
    /// Age of the oldest unacknowledged sample beyond which billing is
    /// behind (samples normally wait up to one batch interval).
    pub billing_lag_limit: Duration,
    pub reconcile: Arc<ReconcileClock>,
    pub reconcile_interval: Duration,
    /// Binaries whose `--version` answered, as they were then.
    pub versions: Versions,
}

/// The VMM binaries that answered `--version`, by file identity (device,
/// inode, size, modification time). A binary is run again only when it
/// changed (an upgrade, a replacement) or is not yet known: QEMU loads
/// dozens of libraries to print its version, which every 3 s would cost
/// about 1% of a core for nothing. A binary that is gone or no longer
/// executable fails at once, without being run.
#[derive(Debug, Default)]
pub struct Versions {
    known: Mutex<std::collections::HashMap<PathBuf, (u64, u64, u64, i64)>>,
}

impl Versions {
    async fn check(&self, bin: &Path) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let meta = tokio::fs::metadata(bin)
            .await
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        if !meta.is_file() || meta.mode() & 0o111 == 0 {
            return Err(format!("{}: not an executable file", bin.display()));
        }
        let id = (meta.dev(), meta.ino(), meta.size(), meta.mtime());
        let known = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(bin)
            == Some(&id);
        if known {
            return Ok(());
        }
        let run = tokio::process::Command::new(bin)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        match tokio::time::timeout(CHECK_TIMEOUT, run).await {
            Ok(Ok(s)) if s.success() => {
                self.known
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(bin.to_owned(), id);
                Ok(())
            }
            Ok(Ok(s)) => Err(format!("{} --version: {s}", bin.display())),
            Ok(Err(e)) => Err(format!("{}: {e}", bin.display())),
            Err(_) => Err(format!("{} --version did not answer", bin.display())),
        }
    }
}

/// Runs the checks once now (so the first answer is a real one) and then
/// every [`INTERVAL`], publishing each report to `health`.
pub async fn start(health: Health, probes: Probes) -> JoinHandle<()> {
    let probes = Arc::new(probes);
    let mut last = Marks::default();
    health.publish(probes.run(&mut last).await);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let report = probes.run(&mut last).await;
            for (name, c) in &report.checks {
                if c.level != metald_api::health::Level::Ok {
                    warn!(check = %name, status = c.level.as_str(), detail = %c.detail, "health check not ok");
                }
            }
            health.publish(report);
        }
    })
}

/// Counters as the previous run saw them, to report change.
#[derive(Default)]
struct Marks {
    delivery_retries: u64,
}

impl Probes {
    async fn run(&self, last: &mut Marks) -> Report {
        let (store, data_dir, backend) =
            tokio::join!(self.store(), self.data_dir(), self.backend());
        let mut report = Report::default();
        let mut put = |name: &str, c: Check| {
            report.checks.insert(name.to_owned(), c);
        };
        put("store", store);
        put("data_dir", data_dir);
        put("backend", backend);
        put("kvm", self.kvm());
        put("tun", self.tun());
        put("billing", self.billing(last));
        put("reconcile", self.reconcile());
        report
    }

    async fn store(&self) -> Check {
        match tokio::time::timeout(CHECK_TIMEOUT, self.store.probe_write()).await {
            Ok(Ok(())) => Check::ok("metald.db takes writes"),
            Ok(Err(e)) => Check::failing(format!("metald.db: {e}")),
            Err(_) => Check::failing(format!(
                "metald.db: a write took longer than {CHECK_TIMEOUT:?}"
            )),
        }
    }

    async fn data_dir(&self) -> Check {
        let dir = self.data_dir.clone();
        let probe = tokio::task::spawn_blocking(move || data_dir_probe(&dir));
        match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => Check::failing(format!("probe task: {e}")),
            Err(_) => Check::failing(format!(
                "{}: a write took longer than {CHECK_TIMEOUT:?}",
                self.data_dir.display()
            )),
        }
    }

    async fn backend(&self) -> Check {
        let mut found = Vec::new();
        for bin in &self.backend.binaries {
            if let Err(why) = self.versions.check(bin).await {
                return Check::failing(why);
            }
            found.push(bin.display().to_string());
        }
        Check::ok(format!("{}: {}", self.backend.name, found.join(", ")))
    }

    fn kvm(&self) -> Check {
        if !self.backend.needs_kvm {
            return Check::ok("not needed (QEMU with TCG)");
        }
        device_check("/dev/kvm")
    }

    fn tun(&self) -> Check {
        if !self.network {
            return Check::ok("not needed (VM networking off)");
        }
        device_check("/dev/net/tun")
    }

    fn billing(&self, last: &mut Marks) -> Check {
        let stats = self.billing.stats();
        let spooled = stats.spooled_samples.load(Ordering::Relaxed);
        let retries = metald_billing::Stats::get(&stats.delivery_retries);
        let new_retries = retries.saturating_sub(last.delivery_retries);
        last.delivery_retries = retries;
        let oldest = stats.oldest_unsent_ns.load(Ordering::Relaxed);
        let lag = if oldest > 0 {
            Duration::from_nanos(unix_now_ns().saturating_sub(oldest).max(0) as u64)
        } else {
            Duration::ZERO
        };
        let detail = format!(
            "{spooled} samples spooled, the oldest unacknowledged {}s old, \
             {new_retries} delivery retries since the last check",
            lag.as_secs()
        );
        // Billing being behind never stops VMs from being served: the
        // spool keeps every sample until it is delivered.
        if new_retries > 0 || lag > self.billing_lag_limit {
            Check::degraded(detail).optional()
        } else {
            Check::ok(detail).optional()
        }
    }

    fn reconcile(&self) -> Check {
        let last = self.reconcile.last_ok.load(Ordering::Relaxed);
        let error = self
            .reconcile
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let age = unix_now().saturating_sub(last);
        let late = self.reconcile_interval.as_secs() as i64 * 3 + 30;
        match error {
            Some(e) => Check::degraded(format!("the last pass failed: {e}")).optional(),
            None if last == 0 => Check::degraded("no pass finished yet").optional(),
            None if age > late => {
                Check::degraded(format!("the last pass finished {age}s ago")).optional()
            }
            None => Check::ok(format!("the last pass finished {age}s ago")).optional(),
        }
    }
}

/// Creates, fsyncs and removes a file in `dir` (a read-only or full disk
/// fails here), then looks at the free space.
fn data_dir_probe(dir: &Path) -> Check {
    use std::io::Write;
    let path = dir.join(".health-probe");
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(b"metald health probe\n")?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    if let Err(e) = written {
        return Check::failing(format!("{}: cannot write: {e}", dir.display()));
    }
    match rustix::fs::statvfs(dir) {
        Ok(st) => {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let detail = format!(
                "{}: {} free",
                dir.display(),
                bytesize::ByteSize::b(free).display().iec()
            );
            if free < NO_SPACE {
                Check::failing(detail)
            } else if free < LOW_SPACE {
                Check::degraded(detail)
            } else {
                Check::ok(detail)
            }
        }
        Err(e) => Check::failing(format!("{}: statvfs: {e}", dir.display())),
    }
}

fn device_check(path: &str) -> Check {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Check::ok(format!("{path} opens read-write")),
        Err(e) => Check::failing(format!("{path}: {e}")),
    }
}

fn unix_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in VMM binary that records each run in `runs` and exits
    /// with `code`.
    fn vmm(dir: &Path, runs: &Path, code: i32) -> PathBuf {
        let bin = dir.join("vmm");
        // Written beside and renamed over, as an upgrade replaces a binary
        // (writing a file that is being executed fails with ETXTBSY).
        let tmp = dir.join("vmm.new");
        std::fs::write(
            &tmp,
            format!("#!/bin/sh\necho run >> '{}'\nexit {code}\n", runs.display()),
        )
        .unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &bin).unwrap();
        bin
    }

    fn count(runs: &Path) -> usize {
        std::fs::read_to_string(runs).map_or(0, |s| s.lines().count())
    }

    #[tokio::test]
    async fn a_binary_is_run_again_only_once_it_changed_and_a_missing_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let versions = Versions::default();
        let bin = vmm(dir.path(), &runs, 0);
        versions.check(&bin).await.unwrap();
        versions.check(&bin).await.unwrap();
        assert_eq!(count(&runs), 1, "an unchanged binary is not run again");

        let bin = vmm(dir.path(), &runs, 3);
        let err = versions.check(&bin).await.unwrap_err();
        assert!(err.contains("--version"), "{err}");
        assert_eq!(count(&runs), 2, "a replaced binary is run again");

        std::fs::remove_file(&bin).unwrap();
        assert!(
            versions.check(&bin).await.is_err(),
            "a missing binary fails"
        );
        assert_eq!(count(&runs), 2);
    }
}
