//! What the host benches share: the VMM binaries found on this host, a
//! metald of their own (the binary next to metald-stress, on a fresh data
//! directory, with a host-capacity override) that removes every VM,
//! process and file it made when finished, and `/proc` readings of it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use connectrpc::Protocol;
use connectrpc::client::{ClientConfig, HttpClient};
use metald_proto::vmprovisioner::v1 as pb;
use tokio::task::JoinSet;

use crate::guest::Guest;

pub type Client = pb::VmServiceClient<HttpClient>;

/// Where the VMMs and metald are.
#[derive(Debug, Clone, Args)]
pub struct HostFlags {
    /// `firecracker` (else the backend is reported missing).
    #[arg(long, env = "FIRECRACKER_BIN")]
    pub firecracker_bin: Option<PathBuf>,
    /// `cloud-hypervisor` (else the backend is reported missing).
    #[arg(long, env = "CLOUD_HYPERVISOR_BIN")]
    pub cloud_hypervisor_bin: Option<PathBuf>,
    /// `qemu-system-x86_64`.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu_bin: PathBuf,
    /// How QEMU runs guest code, for metald and the raw path alike.
    #[arg(long, default_value = "tcg", value_parser = ["tcg", "kvm"])]
    pub qemu_accel: String,
    /// The metald binary (default: the one next to metald-stress).
    #[arg(long)]
    pub metald_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Qemu,
    Firecracker,
    CloudHypervisor,
}

impl Backend {
    /// metald's name of the backend (`UNKEY_METALD_BACKEND`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Firecracker => "firecracker",
            Backend::CloudHypervisor => "cloudhypervisor",
        }
    }
}

impl HostFlags {
    /// The VMM binary of `b`, or why it is missing.
    pub fn binary(&self, b: Backend) -> Result<PathBuf, String> {
        let found = |p: &Option<PathBuf>, flag: &str, env: &str| {
            p.clone()
                .filter(|p| p.is_file())
                .ok_or_else(|| format!("missing (pass --{flag} or set {env})"))
        };
        match b {
            Backend::Qemu => Ok(self.qemu_bin.clone()),
            Backend::Firecracker => {
                found(&self.firecracker_bin, "firecracker-bin", "FIRECRACKER_BIN")
            }
            Backend::CloudHypervisor => found(
                &self.cloud_hypervisor_bin,
                "cloud-hypervisor-bin",
                "CLOUD_HYPERVISOR_BIN",
            ),
        }
    }

    /// Firecracker when it is found (its processes are cheap), else QEMU.
    pub fn fleet_backend(&self) -> Backend {
        if self.binary(Backend::Firecracker).is_ok() {
            Backend::Firecracker
        } else {
            Backend::Qemu
        }
    }

    fn metald(&self) -> Result<PathBuf, String> {
        if let Some(p) = &self.metald_bin {
            return Ok(p.clone());
        }
        let me = std::env::current_exe().map_err(|e| format!("cannot find metald-stress: {e}"))?;
        let bin = me.with_file_name("metald");
        if bin.is_file() {
            Ok(bin)
        } else {
            Err("no metald next to metald-stress: build it (cargo build --bins) or pass --metald-bin".into())
        }
    }
}

/// A metald of the bench's own.
pub struct Daemon {
    child: Option<Child>,
    cmd_env: Vec<(String, String)>,
    bin: PathBuf,
    pub dir: PathBuf,
    pub api: Client,
    pub url: String,
}

/// A fresh directory under the system's temporary directory.
pub fn temp_dir(what: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "metald-bench-{what}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("creating a temporary directory: {e}"))?;
    Ok(dir)
}

/// A directory of [`temp_dir`]'s, removed with everything in it when
/// dropped (also when a bench is interrupted).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Result<Scratch, String> {
        temp_dir(what).map(Scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The directories holding the guest's files: metald's asset roots.
fn asset_dirs(g: &Guest) -> String {
    let mut dirs: Vec<String> = [Some(&g.kernel), g.initrd.as_ref(), g.disk.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|f| Path::new(f).parent().map(|p| p.display().to_string()))
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs.join(":")
}

impl Daemon {
    /// Starts metald on `backend` in dev-auth mode; `env` adds settings.
    pub fn start(
        host: &HostFlags,
        backend: Backend,
        guest: &Guest,
        token: &str,
        env: &[(&str, String)],
    ) -> Result<Daemon, String> {
        let bin = host.metald()?;
        let vmm = host.binary(backend)?;
        let dir = temp_dir(backend.name())?;
        let mut cmd_env: Vec<(String, String)> = vec![
            ("UNKEY_METALD_BACKEND", backend.name().to_owned()),
            ("UNKEY_METALD_AUTH_MODE", "dev".into()),
            ("UNKEY_METALD_ADDRESS", "127.0.0.1".into()),
            ("UNKEY_METALD_PORT", "0".into()),
            ("UNKEY_METALD_DATA_DIR", dir.display().to_string()),
            ("UNKEY_METALD_ASSET_DIRS", asset_dirs(guest)),
            ("UNKEY_METALD_LOG", "warn".into()),
            ("UNKEY_METALD_LOG_FORMAT", "text".into()),
            ("UNKEY_METALD_BILLING_ENABLED", "false".into()),
            ("UNKEY_METALD_NETWORK_ENABLED", "false".into()),
            ("UNKEY_METALD_OTEL_ENABLED", "false".into()),
            // Its own metrics port: benches (and a metald already on the
            // host) never fight over 9464.
            ("UNKEY_METALD_OTEL_PROMETHEUS_PORT", "0".into()),
            ("UNKEY_METALD_JAILER_ENABLED", "false".into()),
            // Many VMs fit: vCPUs overcommitted, little memory held back.
            ("UNKEY_METALD_HOST_CPU_OVERCOMMIT", "4096".into()),
            ("UNKEY_METALD_HOST_MEMORY_RESERVE", "64MiB".into()),
            ("UNKEY_METALD_QEMU_ACCEL", host.qemu_accel.clone()),
            (
                "UNKEY_METALD_QEMU_BINARY",
                host.qemu_bin.display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        match backend {
            Backend::Firecracker => cmd_env.push((
                "UNKEY_METALD_FIRECRACKER_BINARY".into(),
                vmm.display().to_string(),
            )),
            Backend::CloudHypervisor => cmd_env.push((
                "UNKEY_METALD_CLOUD_HYPERVISOR_BINARY".into(),
                vmm.display().to_string(),
            )),
            Backend::Qemu => {}
        }
        cmd_env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        // The operator's `UNKEY_METALD_*` settings that the bench does not
        // make itself (say `UNKEY_METALD_CGROUPS_ENABLED`) pass through; its
        // own (data directory, port, backend...) are never overridden.
        let outer: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("UNKEY_METALD_"))
            .filter(|(k, _)| !cmd_env.iter().any(|(own, _)| own == k))
            .collect();
        cmd_env.extend(outer);
        let mut d = Daemon {
            child: None,
            cmd_env,
            bin,
            dir,
            api: client("http://127.0.0.1:1", token)?,
            url: String::new(),
        };
        d.spawn(token)?;
        Ok(d)
    }

    /// Starts the process and waits for its readiness line.
    fn spawn(&mut self, token: &str) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .map_err(|e| format!("metald's log: {e}"))?;
        let mut child = Command::new(&self.bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.cmd_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("metald listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        self.child = Some(child);
        let log = self.dir.with_extension("log");
        let url = rx
            .recv_timeout(Duration::from_secs(120))
            .map_err(|e| match e {
                std::sync::mpsc::RecvTimeoutError::Disconnected => {
                    format!("metald exited before serving; its log: {}", log.display())
                }
                std::sync::mpsc::RecvTimeoutError::Timeout => {
                    format!(
                        "metald did not start within 120 s; its log: {}",
                        log.display()
                    )
                }
            })?;
        self.api = client(&url, token)?;
        self.url = url;
        Ok(())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// SIGKILL, as a crash would: the VMMs live on.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts metald again on the same data directory; how long until it
    /// announced it listens.
    pub fn restart(&mut self, token: &str) -> Result<Duration, String> {
        let began = Instant::now();
        self.spawn(token)?;
        Ok(began.elapsed())
    }

    /// Force-deletes every VM of the bench's customer, then stops metald
    /// and removes what is left; how many VMs could not be deleted.
    pub async fn finish(mut self) -> usize {
        let names = list(&self.api).await.unwrap_or_else(|e| {
            eprintln!("metald-stress: listing the VMs to delete: {e}");
            Vec::new()
        });
        let failed = delete(&self.api, &names, 8).await;
        self.kill();
        failed + list_left(&self.dir)
    }
}

/// VMMs still mentioning `dir` (none should be after a delete).
fn list_left(dir: &Path) -> usize {
    processes_mentioning(&dir.display().to_string()).len()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        // VMMs outlive metald by design; a bench leaves none behind.
        for pid in processes_mentioning(&self.dir.display().to_string()) {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}

pub fn client(url: &str, token: &str) -> Result<Client, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("metald's address {url:?}: {e}"))?;
    let cfg = ClientConfig::new(uri)
        .with_protocol(Protocol::Connect)
        .with_default_timeout(Duration::from_secs(300))
        .with_default_header("authorization", format!("Bearer {token}"));
    Ok(Client::new(HttpClient::plaintext(), cfg))
}

/// Every VM name of the caller, paging through ListVms.
pub async fn list(c: &Client) -> Result<Vec<String>, String> {
    Ok(list_states(c).await?.into_iter().map(|(n, _)| n).collect())
}

/// Every VM metald lists, with its state.
pub async fn list_states(c: &Client) -> Result<Vec<(String, Option<pb::VmState>)>, String> {
    let mut vms = Vec::new();
    let mut token = String::new();
    loop {
        let req = pb::ListVmsRequest {
            page_size: 500,
            page_token: token,
            ..Default::default()
        };
        let page = c
            .list_vms(req)
            .await
            .map_err(|e| format!("ListVms: {e}"))?
            .into_owned();
        vms.extend(page.vms.into_iter().map(|v| (v.vm_id, v.state.as_known())));
        if page.next_page_token.is_empty() {
            return Ok(vms);
        }
        token = page.next_page_token;
    }
}

/// CreateVm then BootVm.
pub async fn create_and_boot(c: &Client, cfg: &pb::VmConfig, name: &str) -> Result<(), String> {
    let req = pb::CreateVmRequest {
        vm_id: name.to_owned(),
        config: buffa::MessageField::some(cfg.clone()),
        ..Default::default()
    };
    c.create_vm(req)
        .await
        .map_err(|e| format!("CreateVm {name}: {e}"))?;
    let req = pb::BootVmRequest {
        vm_id: name.to_owned(),
        ..Default::default()
    };
    c.boot_vm(req)
        .await
        .map_err(|e| format!("BootVm {name}: {e}"))?;
    Ok(())
}

pub async fn delete_one(c: &Client, name: &str) -> Result<(), String> {
    let req = pb::DeleteVmRequest {
        vm_id: name.to_owned(),
        force: true,
        ..Default::default()
    };
    c.delete_vm(req)
        .await
        .map(drop)
        .map_err(|e| format!("DeleteVm {name}: {e}"))
}

/// Force-deletes `names`, `width` at a time; how many failed.
pub async fn delete(c: &Client, names: &[String], width: usize) -> usize {
    let mut failed = 0;
    for chunk in names.chunks(width.max(1)) {
        let mut tasks = JoinSet::new();
        for name in chunk {
            let (c, name) = (c.clone(), name.clone());
            tasks.spawn(async move { delete_one(&c, &name).await });
        }
        while let Some(r) = tasks.join_next().await {
            if let Ok(Err(e)) = &r
                && failed == 0
            {
                eprintln!("metald-stress: {e}");
            }
            failed += usize::from(!matches!(r, Ok(Ok(()))));
        }
    }
    failed
}

/// `n` VMs named `<prefix>-<i>`, each created, booted and, with `pause`,
/// paused (a paused VMM is live but costs no CPU), `width` at a time;
/// their names.
pub async fn fleet(
    c: &Client,
    cfg: &pb::VmConfig,
    prefix: &str,
    n: u32,
    width: usize,
    pause: bool,
) -> Result<Vec<String>, String> {
    let names: Vec<String> = (1..=n).map(|i| format!("{prefix}-{i}")).collect();
    for chunk in names.chunks(width.max(1)) {
        let mut tasks = JoinSet::new();
        for name in chunk {
            let (c, cfg, name) = (c.clone(), cfg.clone(), name.clone());
            tasks.spawn(async move {
                create_and_boot(&c, &cfg, &name).await?;
                if !pause {
                    return Ok(());
                }
                let req = pb::PauseVmRequest {
                    vm_id: name.clone(),
                    ..Default::default()
                };
                c.pause_vm(req)
                    .await
                    .map(drop)
                    .map_err(|e| format!("PauseVm {name}: {e}"))
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| format!("a fleet task failed: {e}"))??;
        }
    }
    Ok(names)
}

/// Pids whose command line contains `needle` (not zombies).
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                String::from_utf8_lossy(&raw)
                    .replace('\0', " ")
                    .contains(needle)
            }) && stat_fields(*pid).is_some_and(|f| f.first().is_some_and(|s| s != "Z"))
        })
        .collect()
}

/// The fields of `/proc/<pid>/stat` after the command name (state first).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU time `pid` used so far (user + system, all its threads), to the
/// nanosecond: its process CPU clock, where `/proc/<pid>/stat` counts in
/// 10 ms ticks.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let clock = nix::time::ClockId::pid_cpu_clock_id(nix::unistd::Pid::from_raw(pid)).ok()?;
    let t = clock.now().ok()?;
    Some(Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
}

/// `MemAvailable` in KiB.
pub fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
