//! The Firecracker backend: one `firecracker` process per VM, configured
//! over its API socket with typed requests ([`api`]), optionally run
//! through the `jailer` ([`jailer`]).
//!
//! By job: `prepare.rs` (the command and FIFOs, the spawn), [`jailer`]
//! (the jail, its files, the uid and the jailer's command line),
//! `layout.rs` (where the socket and FIFOs are), `configure.rs` (the API
//! calls that configure and start the guest), `find.rs` (finding this
//! backend's processes, jails and cgroups on the host), [`metrics`] and
//! [`logfifo`] (what metald reads from the FIFOs).
//!
//! A VM's files live in `<state_dir>/<vm_id>/`: `vmm.json` (spawn record),
//! `console.log` (the guest's serial console: Firecracker's stdout),
//! `stderr.log`, `firecracker.log` (Firecracker's own log, copied there
//! from `log.fifo` by metald: [`logfifo`]), and, without the jailer,
//! `firecracker.sock`, `log.fifo` and `metrics.fifo`. With the jailer
//! those three live in the chroot, `<chroot_base>/firecracker/<jail
//! id>/root/`, with the kernel, initrd and drives ([`jailfiles`]);
//! `jail.json` in the VM directory records the jail id and uid. The three
//! logs are kept under the cap ([`crate::logcap`]).
//!
//! | metald      | Firecracker                                              |
//! |-------------|----------------------------------------------------------|
//! | boot        | spawn, wait for the socket, configure, `InstanceStart`   |
//! | pause       | `PATCH /vm {"state":"Paused"}`                           |
//! | resume      | `PATCH /vm {"state":"Resumed"}`                          |
//! | reboot      | no reboot in Firecracker: kill, then boot a new process  |
//! | shutdown    | `SendCtrlAltDel`, SIGKILL after the timeout              |
//! | force stop  | SIGKILL                                                  |
//! | delete      | SIGKILL, remove the VM directory, jail and cgroups       |

pub mod api;
mod configure;
mod find;
pub mod jailer;
pub mod jailfiles;
mod layout;
pub mod logfifo;
pub mod metrics;
mod prepare;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use metald_core::ports::{
    BootPhase, DeviceCounters, GuestStatus, HostResources, StopMode, Vmm, VmmError, VmmExit,
    VmmRuntime,
};
use metald_core::vm::{VmId, VmSpec};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::cgroup;
use crate::http::Endpoint;
use crate::launch;
use crate::logcap::LogCap;
use crate::process::{self, Children};
use api::{ActionType, Client};
use jailer::{Jail, JailerConfig};
use layout::Layout;

/// The backend's name in `UNKEY_METALD_BACKEND` and `backend_info`.
pub const NAME: &str = "firecracker";

/// Kernel arguments used when a VM gives none.
pub const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Firecracker's own log level. Its log goes to a file from the first
/// line (`--log-path`), so the console log holds only the guest's output.
const LOG_LEVEL: &str = "Warning";

/// Settings of the Firecracker backend.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary.
    pub binary: PathBuf,
    /// Parent of the per-VM directories.
    pub state_dir: PathBuf,
    /// How long Firecracker may take to answer on its socket.
    pub boot_timeout: Duration,
    /// Run every VM through the jailer.
    pub jailer: Option<JailerConfig>,
    /// Per-VM cgroups of an unjailed VMM, named by the VM's key; `None`
    /// leaves unjailed VMMs in metald's own cgroup. Not used with the
    /// jailer, which makes a jailed VMM's own ([`JailerConfig::cgroups`]).
    pub cgroups: Option<cgroup::CgroupConfig>,
    /// Cap of each console and Firecracker log, in bytes.
    pub log_max: u64,
}

/// What `jail.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct JailRecord {
    jail_id: String,
    uid: u32,
}

/// The Firecracker backend.
pub struct FirecrackerBackend {
    config: FirecrackerConfig,
    version: String,
    /// File name of the binary: the jailer names the chroot after it.
    exec_name: String,
    children: Children,
    /// The metrics reader and log copier of each VM with a live VMM.
    readers: Mutex<HashMap<VmId, Pipes>>,
    /// Serialises uid choice between concurrent boots.
    uid_lock: tokio::sync::Mutex<()>,
    logs: LogCap,
}

/// What metald reads from a live Firecracker's FIFOs.
struct Pipes {
    metrics: Option<metrics::Reader>,
    _log: Option<logfifo::Copier>,
}

impl FirecrackerBackend {
    /// Checks the binaries answer `--version` and prepares the directories.
    pub fn new(config: FirecrackerConfig) -> Result<Self, String> {
        let version = launch::version_of(&config.binary, "UNKEY_METALD_FIRECRACKER_BINARY")?;
        if let Some(j) = &config.jailer {
            launch::version_of(&j.binary, "UNKEY_METALD_JAILER_BINARY")?;
            jailer::check_static(&config.binary)
                .map_err(|e| format!("UNKEY_METALD_FIRECRACKER_BINARY: {e}"))?;
            if j.uid_count == 0 {
                return Err("UNKEY_METALD_JAILER_UID_COUNT: must be at least 1".into());
            }
            if !matches!(j.cgroup_version, 1 | 2) {
                return Err(format!(
                    "UNKEY_METALD_JAILER_CGROUP_VERSION: must be 1 or 2, got {}",
                    j.cgroup_version
                ));
            }
            std::fs::create_dir_all(&j.chroot_base)
                .map_err(|e| format!("creating {}: {e}", j.chroot_base.display()))?;
        }
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| format!("creating {}: {e}", config.state_dir.display()))?;
        let exec_name = std::fs::canonicalize(&config.binary)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| NAME.into());
        Ok(FirecrackerBackend {
            logs: LogCap::new(config.log_max),
            config,
            version,
            exec_name,
            children: Children::default(),
            readers: Mutex::new(HashMap::new()),
            uid_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The logs of a VM's Firecracker, kept under the cap.
    fn log_files(&self, id: &VmId) -> Vec<PathBuf> {
        let dir = self.vm_dir(id);
        ["console.log", "stderr.log", "firecracker.log"]
            .iter()
            .map(|f| dir.join(f))
            .collect()
    }

    /// How to reach the API socket `socket` (a runtime's). A jailed VMM
    /// owns its jail, so its socket is reached without following links and
    /// only if it belongs to the VM's uid.
    fn endpoint(&self, socket: &Path) -> Endpoint {
        if self.config.jailer.is_none() {
            return Endpoint::Path(socket.to_path_buf());
        }
        // <jail dir>/root/run/firecracker.socket
        let root = socket
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/nonexistent"));
        let uid = root
            .parent()
            .and_then(|jail_dir| std::fs::read_to_string(jail_dir.join(jailer::OWNER_FILE)).ok())
            .and_then(|owner| VmId::parse(owner.trim(), "jail owner").ok())
            .and_then(|vm| self.jail_record(&vm))
            .map(|r| r.uid);
        Endpoint::Beneath {
            dir: root.to_path_buf(),
            rel: PathBuf::from("run/firecracker.socket"),
            uid,
        }
    }

    fn client(&self, socket: &Path) -> Client {
        Client::at(self.endpoint(socket))
    }

    fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.config.state_dir.join(id.as_str())
    }

    fn jail(&self, id: &VmId) -> Option<Jail> {
        self.config
            .jailer
            .as_ref()
            .map(|j| Jail::new(j, &self.exec_name, id))
    }

    fn jail_record(&self, id: &VmId) -> Option<JailRecord> {
        std::fs::read(self.vm_dir(id).join("jail.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Starts reading the VM's metrics and log FIFOs (reached without
    /// following links: the jailed VMM owns their directory), and keeps
    /// its logs under the cap.
    fn start_pipes(&self, id: &VmId, layout: &Layout) {
        let rel = |p: &Path| p.strip_prefix(&layout.dir).unwrap_or(p).to_path_buf();
        let metrics = metrics::start(&layout.dir, &rel(&layout.fifo))
            .inspect_err(|e| warn!(vm_id = %id, error = %e, "cannot read Firecracker's metrics"))
            .ok();
        let log = logfifo::start(
            &layout.dir,
            &rel(&layout.log_fifo),
            &self.vm_dir(id).join("firecracker.log"),
        )
        .inspect_err(|e| warn!(vm_id = %id, error = %e, "cannot read Firecracker's log"))
        .ok();
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Pipes { metrics, _log: log });
        self.logs.watch(id, self.log_files(id));
    }

    fn stop_pipes(&self, id: &VmId) {
        self.logs.unwatch(id);
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The cgroups metald makes itself: an unjailed VMM's.
    fn plain_cgroups(&self) -> Option<&cgroup::CgroupConfig> {
        self.config
            .cgroups
            .as_ref()
            .filter(|_| self.config.jailer.is_none())
    }

    /// Removes everything of `id`'s VMM: process, directory, jail, cgroups.
    async fn remove_all(&self, id: &VmId, rt: Option<&VmmRuntime>) -> Result<(), VmmError> {
        self.stop_pipes(id);
        let jail_id = self.jail_record(id).map(|r| r.jail_id);
        launch::kill_and_remove(&self.children, &self.vm_dir(id), rt).await?;
        if let (Some(jc), Some(jail)) = (&self.config.jailer, self.jail(id)) {
            let jail_id = jail_id.unwrap_or_else(|| jail.id.clone());
            let owner = id.clone();
            tokio::task::spawn_blocking(move || jail.remove(&owner))
                .await
                .map_err(|e| VmmError::Io(launch::host_failure("remove the VM's jail", e)))??;
            cgroup::remove(&jc.cgroups(), &jail_id)
                .await
                .map_err(|e| VmmError::Io(launch::host_failure("remove the VM's cgroups", e)))?;
        } else {
            launch::remove_cgroups(self.plain_cgroups(), id).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Vmm for FirecrackerBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn boot(&self, id: &VmId, spec: &VmSpec) -> Result<VmmRuntime, VmmError> {
        let spawning = std::time::Instant::now();
        let dir = self.vm_dir(id);
        let layout = self.layout(id);
        layout.check_socket().map_err(VmmError::Refused)?;
        launch::fresh_dir(&dir)?;
        let spawned = match self.prepare(id, spec, &layout).await {
            Ok(p) => self.spawn(id, &dir, &layout, p),
            Err(e) => Err(e),
        };
        let prepare::Spawned { rec, owner, files } = match spawned {
            Ok(s) => s,
            Err(e) => {
                if let Err(c) = self.remove_all(id, None).await {
                    warn!(vm_id = %id, error = %c, "cleanup after a failed start failed");
                }
                return Err(e);
            }
        };
        let rt = VmmRuntime {
            backend: NAME.into(),
            pid: rec.pid,
            start_time: rec.start_time,
            socket: layout.socket.clone(),
        };
        let fc = Client::at(match owner {
            Some((uid, _)) => Endpoint::Beneath {
                dir: layout.dir.clone(),
                rel: PathBuf::from("run/firecracker.socket"),
                uid: Some(uid),
            },
            None => Endpoint::Path(layout.socket.clone()),
        });
        let waiting = launch::phase_done(BootPhase::Spawn, spawning);
        let ready = launch::until_ready(&self.children, &rt, self.config.boot_timeout, || {
            let fc = fc.clone();
            async move { fc.info().await.map_err(|e| e.to_string()) }
        })
        .await;
        let configuring = launch::phase_done(BootPhase::SocketReady, waiting);
        let stderr = dir.join("stderr.log");
        let log = dir.join("firecracker.log");
        let logs = [stderr.as_path(), log.as_path()];
        let started = match ready {
            // The API calls end with InstanceStart: `configure` includes it.
            Ok(_) => match self.configure_and_start(spec, &layout, files, &fc).await {
                Ok(()) => Ok(()),
                Err(e) => Err(launch::explain(&self.children, &rt, e, "firecracker", &logs).await),
            },
            // Already says how the VMM ended.
            Err(e) => Err(launch::not_ready(
                e,
                "firecracker",
                &rt.socket,
                self.config.boot_timeout,
                &logs,
            )),
        };
        match started {
            Ok(()) => {
                launch::phase_done(BootPhase::Configure, configuring);
                Ok(rt)
            }
            Err(e) => {
                warn!(vm_id = %id, error = %e, "firecracker failed to start the guest");
                if let Err(c) = self.remove_all(id, Some(&rt)).await {
                    warn!(vm_id = %id, error = %c, "cleanup after a failed start failed");
                }
                Err(e)
            }
        }
    }

    async fn pause(&self, rt: &VmmRuntime) -> Result<(), VmmError> {
        self.client(&rt.socket)
            .set_state(api::VmStateChange::Paused)
            .await
    }

    async fn resume(&self, rt: &VmmRuntime) -> Result<(), VmmError> {
        self.client(&rt.socket)
            .set_state(api::VmStateChange::Resumed)
            .await
    }

    async fn reboot(
        &self,
        id: &VmId,
        spec: &VmSpec,
        rt: &VmmRuntime,
    ) -> Result<VmmRuntime, VmmError> {
        // Firecracker cannot reset a guest: a new process from the same
        // configuration takes the old one's place.
        self.shutdown(rt, StopMode::Force).await?;
        self.children.forget(rt.pid, rt.start_time);
        self.boot(id, spec).await
    }

    async fn shutdown(&self, rt: &VmmRuntime, mode: StopMode) -> Result<(), VmmError> {
        launch::stop(&self.children, rt, mode, "Ctrl-Alt-Del", || async {
            self.client(&rt.socket)
                .action(ActionType::SendCtrlAltDel)
                .await
        })
        .await
    }

    async fn destroy(&self, id: &VmId, rt: Option<&VmmRuntime>) -> Result<(), VmmError> {
        self.remove_all(id, rt).await
    }

    async fn adopt(&self, id: &VmId, rt: &VmmRuntime) -> Result<GuestStatus, VmmError> {
        launch::check_backend(rt, NAME)?;
        self.is_our_process(id, rt)?;
        let info = self.client(&rt.socket).info().await?;
        let status = match info.state.as_str() {
            "Running" => GuestStatus::Running,
            "Paused" => GuestStatus::Paused,
            other => {
                return Err(VmmError::Io(format!(
                    "guest is in Firecracker state {other:?}"
                )));
            }
        };
        // Resume reading metrics and the log where the previous metald
        // stopped; cut back what the guest wrote meanwhile.
        self.start_pipes(id, &self.layout(id));
        Ok(status)
    }

    async fn status(&self, rt: &VmmRuntime) -> Result<GuestStatus, VmmError> {
        launch::check_backend(rt, NAME)?;
        let info = self.client(&rt.socket).info().await?;
        match info.state.as_str() {
            "Running" => Ok(GuestStatus::Running),
            "Paused" => Ok(GuestStatus::Paused),
            other => Err(VmmError::Io(format!(
                "guest is in Firecracker state {other:?}"
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
        self.stop_pipes(id);
        let _ = std::fs::remove_file(&rt.socket);
        self.children.forget(rt.pid, rt.start_time);
        // The exited VMM's cgroups are empty now.
        if let (Some(jc), Some(rec)) = (&self.config.jailer, self.jail_record(id)) {
            let _ = cgroup::remove(&jc.cgroups(), &rec.jail_id).await;
        } else if let Some(cg) = self.plain_cgroups() {
            let _ = cgroup::remove(cg, id.as_str()).await;
        }
    }

    async fn scan(&self) -> HostResources {
        launch::off_runtime(|| self.find_on_host())
    }

    async fn kill_orphan(&self, pid: i32, start_time: u64) -> Result<(), VmmError> {
        self.children.kill_and_forget(pid, start_time).await
    }

    async fn describe(&self, id: &VmId, rt: Option<&VmmRuntime>) -> BTreeMap<String, String> {
        let mut info = launch::describe_base(NAME, &self.version, &self.vm_dir(id), rt);
        info.insert("jailed".into(), self.config.jailer.is_some().to_string());
        if let Some(rec) = self.jail_record(id) {
            info.insert("jail_id".into(), rec.jail_id);
            info.insert("uid".into(), rec.uid.to_string());
        }
        if let Some(rt) = rt.filter(|rt| process::is_alive(rt.pid, rt.start_time))
            && let Ok(i) = self.client(&rt.socket).info().await
        {
            info.insert("vmm_state".into(), i.state);
            info.insert("vmm_version".into(), i.vmm_version);
        }
        info
    }

    async fn counters(&self, id: &VmId, rt: &VmmRuntime) -> Option<DeviceCounters> {
        let totals = self
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(|p| p.metrics.as_ref())
            .map(|r| r.totals.clone())?;
        // Ask for a fresh line and give the reader a moment to sum it.
        let next = totals.next_line();
        if self
            .client(&rt.socket)
            .action(ActionType::FlushMetrics)
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_millis(200), next).await;
        }
        Some(totals.get())
    }
}
