//! The Cloud Hypervisor backend: one `cloud-hypervisor` process per VM,
//! configured over its REST API socket with typed requests ([`api`]).
//!
//! A VM's files live in `<state_dir>/<vm_id>/`: `ch.sock` (the API),
//! `console.log` (the guest's serial port: Cloud Hypervisor's stdout, with
//! `serial` in `Tty` mode), `vmm.log` (its stderr) and `vmm.json` (spawn
//! record). metald opens both logs `O_APPEND` before spawning (Cloud
//! Hypervisor's own `File` mode truncates and writes at its own offset,
//! which could not be trimmed) and keeps them under the cap
//! ([`crate::logcap`]). There is no jailer, so
//! metald puts each VMM into its own cgroups ([`crate::cgroup`]) between
//! fork and exec, and runs it as a configured user where the host allows.
//!
//! Some of Cloud Hypervisor's calls act asynchronously, so after each
//! state-changing call metald polls `vm.info` (bounded, with backoff) until
//! the VM is in the state the call promises.
//!
//! | metald      | Cloud Hypervisor                                     |
//! |-------------|------------------------------------------------------|
//! | boot        | spawn, `vmm.ping`, `vm.create`, `vm.boot`            |
//! | pause       | `vm.pause`, until `vm.info` says `Paused`            |
//! | resume      | `vm.resume`, until `vm.info` says `Running`          |
//! | reboot      | `vm.reboot`, until `vm.info` says `Running`          |
//! | shutdown    | `vm.power-button`, SIGKILL after the timeout         |
//! | force stop  | SIGKILL                                              |
//! | delete      | SIGKILL, remove the VM directory and cgroups         |

pub mod api;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use metald_core::ports::{
    BootPhase, DeviceCounters, GuestStatus, HostResources, StopMode, Vmm, VmmError, VmmExit,
    VmmRuntime,
};
use metald_core::vm::{VmId, VmSpec};
use tracing::warn;

use crate::cgroup::{self, CgroupConfig};
use crate::launch;
use crate::logcap::{self, LogCap};
use crate::process::{self, Children};
use crate::ratelimit::RateLimiter;
use api::Client;

/// The backend's name in `UNKEY_METALD_BACKEND` and `backend_info`.
pub const NAME: &str = "cloudhypervisor";

/// Kernel arguments used when a VM gives none.
pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1";

/// How long a state change may take to show in `vm.info`.
const SETTLE: Duration = Duration::from_secs(10);

/// Settings of the Cloud Hypervisor backend.
#[derive(Debug, Clone)]
pub struct CloudHypervisorConfig {
    /// The `cloud-hypervisor` binary.
    pub binary: PathBuf,
    /// Parent of the per-VM directories.
    pub state_dir: PathBuf,
    /// How long Cloud Hypervisor may take to answer on its socket.
    pub boot_timeout: Duration,
    /// Per-VM cgroups; `None` leaves VMMs in metald's own cgroup.
    pub cgroups: Option<CgroupConfig>,
    /// Run VMMs as this uid and gid instead of metald's.
    pub user: Option<(u32, u32)>,
    /// Cap of each console and VMM log, in bytes.
    pub log_max: u64,
}

/// The Cloud Hypervisor backend.
pub struct CloudHypervisorBackend {
    config: CloudHypervisorConfig,
    version: String,
    children: Children,
    logs: LogCap,
}

/// The VM a Cloud Hypervisor's command line serves: its API socket is
/// `<state_dir>/<id>/ch.sock`.
fn vm_of_cmdline(args: &[String], state_dir: &Path) -> Option<VmId> {
    launch::vm_of_socket_arg(args, "--api-socket", state_dir, "ch.sock")
}

/// The `vm.create` body for a VM. The serial port goes to Cloud
/// Hypervisor's stdout (`Tty` mode), which metald opened on `console.log`.
fn vm_config(spec: &VmSpec) -> Result<api::VmConfig, String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut disks = Vec::new();
    for d in spec.disks() {
        disks.push(api::Disk {
            id: d.id.clone(),
            path: path(&d.path),
            readonly: d.read_only,
            rate_limiter_config: RateLimiter::from_options(&d.options)?,
        });
    }
    // Cloud Hypervisor has one rate limiter per interface for both
    // directions; metald's tc limits on the host side hold each direction.
    let net = spec
        .nics()
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            n.attachment.as_ref().map(|att| api::Net {
                id: format!("net{i}"),
                tap: att.tap.clone(),
                mac: Some(att.mac.to_string()),
                rate_limiter_config: None,
            })
        })
        .collect();
    Ok(api::VmConfig {
        cpus: api::Cpus {
            boot_vcpus: spec.vcpus(),
            max_vcpus: spec.vcpus(),
        },
        memory: api::Memory {
            size: spec.memory_bytes(),
        },
        payload: api::Payload {
            kernel: path(spec.kernel()),
            initramfs: spec.initrd().map(path),
            cmdline: Some(launch::kernel_cmdline(spec, DEFAULT_KERNEL_ARGS)),
        },
        disks,
        net,
        serial: api::Console {
            mode: "Tty".into(),
            file: None,
        },
        console: api::Console {
            mode: "Off".into(),
            file: None,
        },
    })
}

/// Polls `vm.info` (5 ms doubling to 100 ms, at most [`SETTLE`]) until the
/// VM is in `want`.
async fn settle(socket: &Path, want: &str) -> Result<(), VmmError> {
    let mut last = String::from("no answer");
    let mut delay = Duration::from_millis(5);
    let wait = async {
        loop {
            match Client::new(socket).info().await {
                Ok(i) if i.state == want => return,
                Ok(i) => last = format!("state {:?}", i.state),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    };
    tokio::time::timeout(SETTLE, wait).await.map_err(|_| {
        VmmError::Timeout(format!(
            "cloud-hypervisor did not reach {want:?} within {SETTLE:?}: {last}"
        ))
    })
}

impl CloudHypervisorBackend {
    /// Checks the binary answers `--version` and prepares the state dir.
    pub fn new(config: CloudHypervisorConfig) -> Result<Self, String> {
        let version = launch::version_of(&config.binary, "UNKEY_METALD_CLOUD_HYPERVISOR_BINARY")?;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| format!("creating {}: {e}", config.state_dir.display()))?;
        Ok(CloudHypervisorBackend {
            logs: LogCap::new(config.log_max),
            config,
            version,
            children: Children::default(),
        })
    }

    fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.config.state_dir.join(id.as_str())
    }

    /// The logs a VM's Cloud Hypervisor writes, kept under the cap.
    fn log_files(&self, id: &VmId) -> Vec<PathBuf> {
        let dir = self.vm_dir(id);
        vec![dir.join("console.log"), dir.join("vmm.log")]
    }

    /// Spawns the VMM (in its namespace and cgroups, as its user).
    fn spawn(
        &self,
        id: &VmId,
        spec: &VmSpec,
        dir: &Path,
        socket: &Path,
    ) -> Result<VmmRuntime, String> {
        let mut cmd = tokio::process::Command::new(&self.config.binary);
        cmd.arg("--api-socket")
            .arg(format!("path={}", socket.display()));
        if let Some(att) = spec.nics().iter().find_map(|n| n.attachment.as_ref()) {
            launch::join_netns_on_exec(&mut cmd, &att.netns)
                .map_err(|e| launch::host_failure("join the VM's network namespace", e))?;
        }
        cgroup::enter_on_exec(
            self.config.cgroups.as_ref(),
            &mut cmd,
            id.as_str(),
            spec.vcpus(),
            spec.memory_bytes(),
        )
        .map_err(|e| launch::host_failure("set up the VM's cgroups", e))?;
        // Made (append-only) before the directory goes to the VMM's user.
        let logs = logcap::create_append(&dir.join("console.log"))
            .and_then(|c| Ok((c, logcap::create_append(&dir.join("vmm.log"))?)));
        let (console, log) = logs.map_err(|e| launch::host_failure("create the VM's logs", e))?;
        if let Some((uid, gid)) = self.config.user {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|e| {
                launch::host_failure(
                    "hand the VM's directory to its user",
                    format_args!("{} to uid {uid}: {e}", dir.display()),
                )
            })?;
            // Last: the namespace and cgroup steps need root.
            launch::become_user_on_exec(&mut cmd, uid, gid);
        }
        cmd.current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(console)
            .stderr(log);
        let rec = launch::spawn_recorded(&self.children, cmd, dir).map_err(|e| {
            launch::host_failure(
                "start cloud-hypervisor",
                format_args!("{}: {e}", self.config.binary.display()),
            )
        })?;
        self.logs.watch(id, self.log_files(id));
        Ok(VmmRuntime {
            backend: NAME.into(),
            pid: rec.pid,
            start_time: rec.start_time,
            socket: socket.to_path_buf(),
        })
    }

    /// Waits for the API socket; an error says how the VMM ended.
    async fn wait_ready(&self, dir: &Path, rt: &VmmRuntime) -> Result<(), VmmError> {
        launch::until_ready(&self.children, rt, self.config.boot_timeout, || {
            let socket = rt.socket.clone();
            async move { Client::new(&socket).ping().await.map_err(|e| e.to_string()) }
        })
        .await
        .map(drop)
        .map_err(|e| {
            launch::not_ready(
                e,
                "cloud-hypervisor",
                &rt.socket,
                self.config.boot_timeout,
                &[&dir.join("vmm.log")],
            )
        })
    }

    async fn create_and_boot(&self, spec: &VmSpec, rt: &VmmRuntime) -> Result<(), VmmError> {
        let config = vm_config(spec).map_err(VmmError::Refused)?;
        let ch = Client::new(&rt.socket);
        ch.put("vm.create", Some(&config)).await?;
        ch.action("vm.boot").await?;
        settle(&rt.socket, "Running").await
    }

    /// A state-changing call, then `vm.info` until the VM is in `want`.
    async fn change(&self, rt: &VmmRuntime, call: &str, want: &str) -> Result<(), VmmError> {
        Client::new(&rt.socket).action(call).await?;
        settle(&rt.socket, want).await
    }

    async fn remove_all(&self, id: &VmId, rt: Option<&VmmRuntime>) -> Result<(), VmmError> {
        self.logs.unwatch(id);
        launch::kill_and_remove(&self.children, &self.vm_dir(id), rt).await?;
        launch::remove_cgroups(self.config.cgroups.as_ref(), id).await
    }
}

#[async_trait]
impl Vmm for CloudHypervisorBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn boot(&self, id: &VmId, spec: &VmSpec) -> Result<VmmRuntime, VmmError> {
        let spawning = std::time::Instant::now();
        let dir = self.vm_dir(id);
        let socket = dir.join("ch.sock");
        launch::check_socket_path(&socket).map_err(VmmError::Refused)?;
        launch::fresh_dir(&dir)?;
        let rt = match self.spawn(id, spec, &dir, &socket) {
            Ok(rt) => rt,
            Err(e) => {
                if let Err(c) = self.remove_all(id, None).await {
                    warn!(vm_id = %id, error = %c, "cleanup after a failed start failed");
                }
                return Err(VmmError::Io(e));
            }
        };
        let waiting = launch::phase_done(BootPhase::Spawn, spawning);
        let ready = self.wait_ready(&dir, &rt).await;
        let configuring = launch::phase_done(BootPhase::SocketReady, waiting);
        let started = match ready {
            // vm.create then vm.boot: `configure` includes the start.
            Ok(()) => match self.create_and_boot(spec, &rt).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    let log = dir.join("vmm.log");
                    Err(launch::explain(&self.children, &rt, e, "cloud-hypervisor", &[&log]).await)
                }
            },
            Err(e) => Err(e),
        };
        match started {
            Ok(()) => {
                launch::phase_done(BootPhase::Configure, configuring);
                Ok(rt)
            }
            Err(e) => {
                warn!(vm_id = %id, error = %e, "cloud-hypervisor failed to start the guest");
                if let Err(c) = self.remove_all(id, Some(&rt)).await {
                    warn!(vm_id = %id, error = %c, "cleanup after a failed start failed");
                }
                Err(e)
            }
        }
    }

    async fn pause(&self, rt: &VmmRuntime) -> Result<(), VmmError> {
        self.change(rt, "vm.pause", "Paused").await
    }

    async fn resume(&self, rt: &VmmRuntime) -> Result<(), VmmError> {
        self.change(rt, "vm.resume", "Running").await
    }

    async fn reboot(
        &self,
        _id: &VmId,
        _spec: &VmSpec,
        rt: &VmmRuntime,
    ) -> Result<VmmRuntime, VmmError> {
        self.change(rt, "vm.reboot", "Running").await?;
        Ok(rt.clone())
    }

    async fn shutdown(&self, rt: &VmmRuntime, mode: StopMode) -> Result<(), VmmError> {
        // A guest that powers off makes Cloud Hypervisor exit.
        launch::stop(&self.children, rt, mode, "ACPI power button", || async {
            Client::new(&rt.socket).action("vm.power-button").await
        })
        .await
    }

    async fn destroy(&self, id: &VmId, rt: Option<&VmmRuntime>) -> Result<(), VmmError> {
        self.remove_all(id, rt).await
    }

    async fn adopt(&self, id: &VmId, rt: &VmmRuntime) -> Result<GuestStatus, VmmError> {
        launch::check_backend(rt, NAME)?;
        launch::is_our_process(rt, &rt.socket.to_string_lossy())?;
        let info = Client::new(&rt.socket).info().await?;
        let status = match info.state.as_str() {
            "Running" => GuestStatus::Running,
            "Paused" => GuestStatus::Paused,
            other => {
                return Err(VmmError::Io(format!(
                    "guest is in Cloud Hypervisor state {other:?}"
                )));
            }
        };
        // What the guest wrote while no metald ran is cut back at once.
        self.logs.watch(id, self.log_files(id));
        Ok(status)
    }

    async fn status(&self, rt: &VmmRuntime) -> Result<GuestStatus, VmmError> {
        launch::check_backend(rt, NAME)?;
        let info = Client::new(&rt.socket).info().await?;
        match info.state.as_str() {
            "Running" => Ok(GuestStatus::Running),
            "Paused" => Ok(GuestStatus::Paused),
            "Shutdown" => Ok(GuestStatus::Halted),
            other => Err(VmmError::Io(format!(
                "guest is in Cloud Hypervisor state {other:?}"
            ))),
        }
    }

    async fn powered_off(&self, id: &VmId) -> bool {
        crate::guest_end::vm_powered_off(self.vm_dir(id)).await
    }

    fn wait_exit(&self, rt: &VmmRuntime) -> BoxFuture<'static, VmmExit> {
        self.children.wait_exit(rt.pid, rt.start_time)
    }

    fn is_alive(&self, rt: &VmmRuntime) -> bool {
        process::is_alive(rt.pid, rt.start_time)
    }

    async fn release(&self, id: &VmId, rt: &VmmRuntime) {
        self.logs.unwatch(id);
        let _ = std::fs::remove_file(&rt.socket);
        self.children.forget(rt.pid, rt.start_time);
        if let Some(cg) = &self.config.cgroups {
            let _ = cgroup::remove(cg, id.as_str()).await;
        }
    }

    async fn scan(&self) -> HostResources {
        let state_dir = self.config.state_dir.clone();
        launch::off_runtime(|| {
            let dirs =
                launch::vm_dirs_and_cgroups(&self.config.state_dir, self.config.cgroups.as_ref());
            HostResources {
                processes: launch::find_processes(|args| vm_of_cmdline(args, &state_dir)),
                dirs,
            }
        })
    }

    async fn kill_orphan(&self, pid: i32, start_time: u64) -> Result<(), VmmError> {
        self.children.kill_and_forget(pid, start_time).await
    }

    async fn describe(&self, id: &VmId, rt: Option<&VmmRuntime>) -> BTreeMap<String, String> {
        let mut info = launch::describe_base(NAME, &self.version, &self.vm_dir(id), rt);
        if let Some(rt) = rt.filter(|rt| process::is_alive(rt.pid, rt.start_time)) {
            let ch = Client::new(&rt.socket);
            if let Ok(i) = ch.info().await {
                info.insert("vmm_state".into(), i.state);
            }
            if let Ok(p) = ch.ping().await {
                info.insert("vmm_version".into(), p.version);
                if !p.build_version.is_empty() {
                    info.insert("vmm_build".into(), p.build_version);
                }
            }
        }
        info
    }

    async fn counters(&self, _id: &VmId, rt: &VmmRuntime) -> Option<DeviceCounters> {
        let all: api::Counters = Client::new(&rt.socket).get("vm.counters").await.ok()?;
        Some(sum_counters(&all))
    }
}

/// Totals over every device of `vm.counters`.
pub fn sum_counters(all: &api::Counters) -> DeviceCounters {
    let mut c = DeviceCounters::default();
    // A total stops at u64::MAX rather than wrapping (or panicking).
    let sum = |k: &str| {
        all.values()
            .filter_map(|d| d.get(k))
            .fold(0u64, |t, v| t.saturating_add(*v))
    };
    c.disk_read_bytes = sum("read_bytes");
    c.disk_write_bytes = sum("write_bytes");
    c.net_rx_bytes = sum("rx_bytes");
    c.net_tx_bytes = sum("tx_bytes");
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use metald_core::vm::VmSpecRow;

    #[test]
    fn recognises_only_its_own_cloud_hypervisors() {
        let args = |sock: &str| -> Vec<String> {
            ["cloud-hypervisor", "--api-socket", sock]
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        let state = Path::new("/var/lib/metald/vms");
        assert_eq!(
            vm_of_cmdline(&args("path=/var/lib/metald/vms/vm-1/ch.sock"), state),
            Some(VmId::parse("vm-1", "t").unwrap())
        );
        assert_eq!(
            vm_of_cmdline(&args("path=/elsewhere/vm-1/ch.sock"), state),
            None
        );
    }

    #[test]
    fn the_serial_port_goes_to_the_stdout_metald_opened() {
        let spec = VmSpec::try_from(VmSpecRow {
            vcpus: 1,
            topology: None,
            memory_bytes: 128 << 20,
            kernel: "/k/vmlinux".into(),
            initrd: None,
            kernel_args: String::new(),
            boot_options: Default::default(),
            disks: Vec::new(),
            nics: Vec::new(),
            console_enabled: true,
            metadata: Default::default(),
        })
        .unwrap();
        let c = vm_config(&spec).unwrap();
        // Tty: Cloud Hypervisor writes to its (O_APPEND) stdout, so the log
        // can be trimmed under it; File mode would write at its own offset.
        assert_eq!((c.serial.mode.as_str(), c.serial.file), ("Tty", None));
        assert_eq!(c.console.mode, "Off");
    }

    #[test]
    fn counter_totals_stop_at_the_maximum_instead_of_wrapping() {
        let text = r#"{"_disk0":{"read_bytes":18446744073709551615,"write_bytes":1},
            "_disk1":{"read_bytes":2,"write_bytes":2}}"#;
        let all: api::Counters = serde_json::from_str(text).unwrap();
        let c = sum_counters(&all);
        assert_eq!((c.disk_read_bytes, c.disk_write_bytes), (u64::MAX, 3));
    }

    #[test]
    fn counters_are_summed_over_devices() {
        let text = r#"{"root":{"read_bytes":10,"write_bytes":2,"read_ops":1},
            "data":{"read_bytes":5,"write_bytes":0},
            "net0":{"rx_bytes":7,"tx_bytes":9,"rx_frames":1}}"#;
        let all: api::Counters = serde_json::from_str(text).unwrap();
        assert_eq!(
            sum_counters(&all),
            DeviceCounters {
                disk_read_bytes: 15,
                disk_write_bytes: 2,
                net_rx_bytes: 7,
                net_tx_bytes: 9,
            }
        );
    }
}
