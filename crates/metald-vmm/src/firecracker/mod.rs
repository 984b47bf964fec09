//! The Firecracker backend: one `firecracker` process per VM, configured
//! over its API socket with typed requests ([`api`]), optionally run
//! through the `jailer` ([`jailer`]).
//!
//! A VM's files live in `<state_dir>/<vm_id>/`: `vmm.json` (spawn record),
//! `console.log` (the guest's serial console: Firecracker's stdout),
//! `stderr.log`, and, without the jailer, `firecracker.sock`,
//! `firecracker.log` and `metrics.fifo`. With the jailer those three live
//! in the chroot, `<chroot_base>/firecracker/<jail id>/root/`, with links
//! to the kernel, initrd and drives; `jail.json` in the VM directory
//! records the jail id and uid.
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
pub mod jailer;
pub mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use metald_core::ports::{
    BootError, DeviceCounters, GuestStatus, HostResources, PortError, StopMode, Vmm, VmmExit,
    VmmRuntime,
};
use metald_core::vm::{VmId, VmSpec};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::cgroup;
use crate::launch;
use crate::process::{self, Children};
use crate::ratelimit::RateLimiter;
use api::{ActionType, ApiError, Client};
use jailer::{Jail, JailerConfig};

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
    /// One metrics reader per VM with a live VMM.
    readers: Mutex<HashMap<VmId, metrics::Reader>>,
    /// Serialises uid choice between concurrent boots.
    uid_lock: tokio::sync::Mutex<()>,
}

/// Where a VM's Firecracker reads and writes, as the host sees them and as
/// Firecracker sees them (the same without the jailer).
struct Layout {
    socket: PathBuf,
    log: PathBuf,
    fifo: PathBuf,
    /// Prefix turning a host path in the chroot into Firecracker's view.
    chroot: Option<PathBuf>,
}

impl Layout {
    fn inside(&self, host: &Path) -> String {
        match &self.chroot {
            Some(root) => Path::new("/")
                .join(host.strip_prefix(root).unwrap_or(host))
                .to_string_lossy()
                .into_owned(),
            None => host.to_string_lossy().into_owned(),
        }
    }
}

fn refused(e: ApiError) -> BootError {
    match e {
        ApiError::Refused { .. } => BootError::Refused(e.to_string()),
        ApiError::Call(m) => BootError::Failed(m),
    }
}

/// The VM a non-jailed Firecracker's command line serves: its API socket
/// is `<state_dir>/<id>/firecracker.sock`.
fn vm_of_cmdline(args: &[String], state_dir: &Path) -> Option<VmId> {
    launch::vm_of_socket_arg(args, "--api-sock", state_dir, "firecracker.sock")
}

impl FirecrackerBackend {
    /// Checks the binaries answer `--version` and prepares the directories.
    pub fn new(config: FirecrackerConfig) -> Result<Self, String> {
        let version = launch::version_of(&config.binary, "UNKEY_METALD_FIRECRACKER_BINARY")?;
        if let Some(j) = &config.jailer {
            launch::version_of(&j.binary, "UNKEY_METALD_JAILER_BINARY")?;
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
            config,
            version,
            exec_name,
            children: Children::default(),
            readers: Mutex::new(HashMap::new()),
            uid_lock: tokio::sync::Mutex::new(()),
        })
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

    fn layout(&self, id: &VmId) -> Layout {
        match self.jail(id) {
            Some(jail) => Layout {
                socket: jail.socket(),
                log: jail.root.join("firecracker.log"),
                fifo: jail.root.join("metrics.fifo"),
                chroot: Some(jail.root),
            },
            None => {
                let dir = self.vm_dir(id);
                Layout {
                    socket: dir.join("firecracker.sock"),
                    log: dir.join("firecracker.log"),
                    fifo: dir.join("metrics.fifo"),
                    chroot: None,
                }
            }
        }
    }

    /// The lowest uid of the range no other jailed VM on this host holds.
    fn free_uid(&self, config: &JailerConfig, me: &VmId) -> Result<u32, String> {
        // Held only while the VM's recorded VMM runs: a stopped VM frees
        // its uid.
        let taken: Vec<u32> = launch::vm_dirs(&self.config.state_dir)
            .into_iter()
            .filter(|id| id != me)
            .filter(|id| {
                launch::recorded_spawn(&self.vm_dir(id))
                    .is_some_and(|r| process::is_alive(r.pid, r.start_time))
            })
            .filter_map(|id| self.jail_record(&id).map(|r| r.uid))
            .collect();
        let end = config.uid_start.saturating_add(config.uid_count);
        (config.uid_start..end)
            .find(|u| !taken.contains(u))
            .ok_or_else(|| {
                format!(
                    "every uid of the jailer range {}..{end} is held by a running VM",
                    config.uid_start
                )
            })
    }

    /// The process command: firecracker itself, or the jailer around it.
    /// Also prepares the jail and the files Firecracker opens.
    async fn command(
        &self,
        id: &VmId,
        spec: &VmSpec,
        layout: &Layout,
    ) -> Result<(tokio::process::Command, Option<(u32, u32)>), String> {
        let netns = spec
            .nics
            .iter()
            .find_map(|n| n.attachment.as_ref())
            .map(|a| a.netns.clone());
        let (Some(jc), Some(jail)) = (&self.config.jailer, self.jail(id)) else {
            let mut cmd = tokio::process::Command::new(&self.config.binary);
            cmd.arg("--api-sock")
                .arg(&layout.socket)
                .arg("--id")
                .arg(jailer::jail_id(id))
                .arg("--log-path")
                .arg(&layout.log)
                .args(["--level", LOG_LEVEL]);
            if let Some(ns) = &netns {
                launch::join_netns_on_exec(&mut cmd, ns).map_err(|e| e.to_string())?;
            }
            std::fs::File::create(&layout.log)
                .map_err(|e| format!("creating {}: {e}", layout.log.display()))?;
            return Ok((cmd, None));
        };
        let _uids = self.uid_lock.lock().await;
        if !jail.owned_by(id) {
            return Err(format!(
                "jail id {} is already used by another VM ({})",
                jail.id,
                jail.dir.display()
            ));
        }
        // The cgroups stay: the jailer reuses and rewrites them.
        jail.remove(id)?;
        let uid = self.free_uid(jc, id)?;
        std::fs::create_dir_all(jail.root.join("run"))
            .map_err(|e| format!("creating {}: {e}", jail.root.display()))?;
        std::fs::write(jail.dir.join(jailer::OWNER_FILE), id.as_str())
            .map_err(|e| format!("marking {}: {e}", jail.dir.display()))?;
        let rec = JailRecord {
            jail_id: jail.id.clone(),
            uid,
        };
        std::fs::write(
            self.vm_dir(id).join("jail.json"),
            serde_json::to_vec(&rec).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("writing jail.json: {e}"))?;
        let owner = (uid, uid);
        for p in [&jail.root, &jail.root.join("run")] {
            std::os::unix::fs::chown(p, Some(uid), Some(uid))
                .map_err(|e| format!("handing {} to uid {uid}: {e}", p.display()))?;
        }
        std::fs::File::create(&layout.log)
            .and_then(|_| std::os::unix::fs::chown(&layout.log, Some(uid), Some(uid)))
            .map_err(|e| format!("creating {}: {e}", layout.log.display()))?;
        let mut cmd = tokio::process::Command::new(&jc.binary);
        cmd.arg("--id")
            .arg(&jail.id)
            .arg("--exec-file")
            .arg(&self.config.binary)
            .arg("--uid")
            .arg(uid.to_string())
            .arg("--gid")
            .arg(uid.to_string())
            .arg("--chroot-base-dir")
            .arg(&jc.chroot_base)
            .arg("--cgroup-version")
            .arg(jc.cgroup_version.to_string())
            .arg("--parent-cgroup")
            .arg(&jc.parent_cgroup)
            .args(jailer::cgroup_args(jc.cgroup_version, spec));
        if let Some(ns) = &netns {
            cmd.arg("--netns").arg(Path::new("/run/netns").join(ns));
        }
        cmd.arg("--")
            .arg("--api-sock")
            .arg("/run/firecracker.socket")
            .arg("--log-path")
            .arg(layout.inside(&layout.log))
            .args(["--level", LOG_LEVEL]);
        Ok((cmd, Some(owner)))
    }

    /// Configures a Firecracker that answers on its socket and starts the
    /// guest.
    async fn configure_and_start(
        &self,
        spec: &VmSpec,
        layout: &Layout,
        owner: Option<(u32, u32)>,
    ) -> Result<(), BootError> {
        let fc = Client::new(&layout.socket);
        // Files the guest uses: inside the chroot with the jailer (linked,
        // or copied off the async runtime).
        let place = async |src: &Path, name: &str, writable: bool| -> Result<String, BootError> {
            match (&layout.chroot, owner) {
                (Some(root), Some(owner)) => {
                    let (root, src, name) = (root.clone(), src.to_path_buf(), name.to_owned());
                    tokio::task::spawn_blocking(move || {
                        jailer::place(&root, &src, &name, writable, owner)
                    })
                    .await
                    .map_err(|e| BootError::Failed(e.to_string()))?
                    .map(|p| p.inside)
                }
                _ => Ok(src.to_string_lossy().into_owned()),
            }
        };
        fc.put(
            "/machine-config",
            &api::MachineConfig {
                vcpu_count: spec.vcpus,
                mem_size_mib: spec.memory_bytes >> 20,
                smt: false,
            },
        )
        .await
        .map_err(refused)?;
        let kernel = place(&spec.kernel, "vmlinux", false).await?;
        let initrd = match &spec.initrd {
            Some(p) => Some(place(p, "initrd", false).await?),
            None => None,
        };
        fc.put(
            "/boot-source",
            &api::BootSource {
                kernel_image_path: kernel,
                initrd_path: initrd,
                boot_args: Some(launch::kernel_cmdline(spec, DEFAULT_KERNEL_ARGS)),
            },
        )
        .await
        .map_err(refused)?;
        // The root device first, as Firecracker expects.
        let mut disks: Vec<_> = spec.disks.iter().collect();
        disks.sort_by_key(|d| !d.is_root);
        for (i, d) in disks.iter().enumerate() {
            let path = place(&d.path, &format!("drive{i}"), !d.read_only).await?;
            let drive = api::Drive {
                drive_id: d.id.clone(),
                path_on_host: path,
                is_root_device: d.is_root,
                is_read_only: d.read_only,
                rate_limiter: RateLimiter::from_options(&d.options).map_err(BootError::Refused)?,
            };
            fc.put(&format!("/drives/{}", d.id), &drive)
                .await
                .map_err(refused)?;
        }
        for (i, n) in spec.nics.iter().enumerate() {
            let Some(att) = &n.attachment else { continue };
            let iface = api::NetworkInterface {
                iface_id: format!("eth{i}"),
                host_dev_name: att.tap.clone(),
                guest_mac: Some(att.mac.clone()),
                rx_rate_limiter: api::RateLimiter::bytes_per_sec(n.rx_bytes_per_sec),
                tx_rate_limiter: api::RateLimiter::bytes_per_sec(n.tx_bytes_per_sec),
            };
            fc.put(&format!("/network-interfaces/eth{i}"), &iface)
                .await
                .map_err(refused)?;
        }
        fc.put(
            "/metrics",
            &api::Metrics {
                metrics_path: layout.inside(&layout.fifo),
            },
        )
        .await
        .map_err(refused)?;
        fc.action(ActionType::InstanceStart)
            .await
            .map_err(refused)?;
        let info = fc.info().await.map_err(refused)?;
        if info.state != "Running" {
            return Err(BootError::Failed(format!(
                "firecracker reports {:?} after InstanceStart, expected Running",
                info.state
            )));
        }
        Ok(())
    }

    fn start_reader(&self, id: &VmId, fifo: &Path) {
        match metrics::start(fifo) {
            Ok(r) => {
                self.readers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), r);
            }
            Err(e) => warn!(vm_id = %id, error = %e, "cannot read Firecracker's metrics"),
        }
    }

    fn stop_reader(&self, id: &VmId) {
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Removes everything of `id`'s VMM: process, directory, jail, cgroups.
    async fn remove_all(&self, id: &VmId, rt: Option<&VmmRuntime>) -> Result<(), String> {
        self.stop_reader(id);
        let jail_id = self.jail_record(id).map(|r| r.jail_id);
        launch::kill_and_remove(&self.children, &self.vm_dir(id), rt).await?;
        if let (Some(jc), Some(jail)) = (&self.config.jailer, self.jail(id)) {
            jail.remove(id)?;
            cgroup::remove(&jc.cgroups(), jail_id.as_deref().unwrap_or(&jail.id)).await?;
        }
        Ok(())
    }
}

/// Whether `pid`'s root directory is `jail_root`. A jailed process lives
/// in its own mount namespace, where `/proc/<pid>/root` reads as `/`, so
/// the two are compared as files (device and inode).
fn in_jail(pid: i32, jail_root: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(format!("/proc/{pid}/root")),
        std::fs::metadata(jail_root),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[async_trait]
impl Vmm for FirecrackerBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn boot(&self, id: &VmId, spec: &VmSpec) -> Result<VmmRuntime, BootError> {
        let dir = self.vm_dir(id);
        let layout = self.layout(id);
        launch::check_socket_path(&layout.socket).map_err(BootError::Refused)?;
        launch::fresh_dir(&dir)?;
        let prepared = self.command(id, spec, &layout).await;
        let spawned = prepared.and_then(|(mut cmd, owner)| {
            let files = || -> std::io::Result<_> {
                let console = std::fs::File::create(dir.join("console.log"))?;
                let stderr = std::fs::File::create(dir.join("stderr.log"))?;
                cmd.current_dir(&dir)
                    .stdin(std::process::Stdio::null())
                    .stdout(console)
                    .stderr(stderr);
                launch::spawn_recorded(&self.children, cmd, &dir)
            };
            files()
                .map(|rec| (rec, owner))
                .map_err(|e| format!("starting firecracker: {e}"))
        });
        let (rec, owner) = match spawned {
            Ok(s) => s,
            Err(e) => {
                if let Err(c) = self.remove_all(id, None).await {
                    warn!(vm_id = %id, error = %c, "cleanup after a failed start failed");
                }
                return Err(e.into());
            }
        };
        let rt = VmmRuntime {
            backend: NAME.into(),
            pid: rec.pid,
            start_time: rec.start_time,
            socket: layout.socket.clone(),
        };
        let ready = launch::until_ready(&self.children, &rt, self.config.boot_timeout, || {
            let socket = rt.socket.clone();
            async move { Client::new(&socket).info().await.map_err(|e| e.to_string()) }
        })
        .await;
        let stderr = dir.join("stderr.log");
        let logs = [stderr.as_path(), layout.log.as_path()];
        let ready = ready.map_err(|e| {
            launch::not_ready(
                e,
                "firecracker",
                &rt.socket,
                self.config.boot_timeout,
                &logs,
            )
        });
        let started = match ready {
            // The reader is there before Firecracker's first line.
            Ok(_) => match metrics::make_fifo(&layout.fifo, owner) {
                Ok(()) => {
                    self.start_reader(id, &layout.fifo);
                    self.configure_and_start(spec, &layout, owner).await
                }
                Err(e) => Err(BootError::Failed(format!(
                    "creating {}: {e}",
                    layout.fifo.display()
                ))),
            },
            Err(e) => Err(e),
        };
        match started {
            Ok(()) => Ok(rt),
            Err(e) => {
                let e = launch::explain(&self.children, &rt, e, "firecracker", &logs).await;
                warn!(vm_id = %id, error = %e, "firecracker failed to start the guest");
                if let Err(c) = self.remove_all(id, Some(&rt)).await {
                    warn!(vm_id = %id, error = %c, "cleanup after a failed start failed");
                }
                Err(e)
            }
        }
    }

    async fn pause(&self, rt: &VmmRuntime) -> Result<(), PortError> {
        Client::new(&rt.socket)
            .set_state(api::VmStateChange::Paused)
            .await
            .map_err(|e| e.to_string())
    }

    async fn resume(&self, rt: &VmmRuntime) -> Result<(), PortError> {
        Client::new(&rt.socket)
            .set_state(api::VmStateChange::Resumed)
            .await
            .map_err(|e| e.to_string())
    }

    async fn reboot(
        &self,
        id: &VmId,
        spec: &VmSpec,
        rt: &VmmRuntime,
    ) -> Result<VmmRuntime, BootError> {
        // Firecracker cannot reset a guest: a new process from the same
        // configuration takes the old one's place.
        self.shutdown(rt, StopMode::Force).await?;
        self.children.forget(rt.pid, rt.start_time);
        self.boot(id, spec).await
    }

    async fn shutdown(&self, rt: &VmmRuntime, mode: StopMode) -> Result<(), PortError> {
        launch::stop(&self.children, rt, mode, "Ctrl-Alt-Del", || async {
            Client::new(&rt.socket)
                .action(ActionType::SendCtrlAltDel)
                .await
                .map_err(|e| e.to_string())
        })
        .await
    }

    async fn destroy(&self, id: &VmId, rt: Option<&VmmRuntime>) -> Result<(), PortError> {
        self.remove_all(id, rt).await
    }

    async fn adopt(&self, id: &VmId, rt: &VmmRuntime) -> Result<GuestStatus, PortError> {
        launch::check_backend(rt, NAME)?;
        match self.jail(id) {
            // A jailed Firecracker sees its socket as /run/firecracker.socket;
            // its root directory (the jail, after pivot_root) tells which
            // jail it is in.
            Some(jail) => {
                if !process::is_alive(rt.pid, rt.start_time) {
                    return Err(format!(
                        "process {} is gone or is another process now",
                        rt.pid
                    ));
                }
                if !in_jail(rt.pid, &jail.root) {
                    return Err(format!(
                        "process {} does not run in the jail {}",
                        rt.pid,
                        jail.root.display()
                    ));
                }
            }
            None => launch::is_our_process(rt, &rt.socket.to_string_lossy())?,
        }
        let info = Client::new(&rt.socket)
            .info()
            .await
            .map_err(|e| e.to_string())?;
        let status = match info.state.as_str() {
            "Running" => GuestStatus::Running,
            "Paused" => GuestStatus::Paused,
            other => return Err(format!("guest is in Firecracker state {other:?}")),
        };
        // Resume reading metrics where the previous metald stopped.
        self.start_reader(id, &self.layout(id).fifo);
        Ok(status)
    }

    fn wait_exit(&self, rt: &VmmRuntime) -> BoxFuture<'static, VmmExit> {
        self.children.wait_exit(rt.pid, rt.start_time)
    }

    fn is_alive(&self, rt: &VmmRuntime) -> bool {
        process::is_alive(rt.pid, rt.start_time)
    }

    async fn release(&self, id: &VmId, rt: &VmmRuntime) {
        self.stop_reader(id);
        let _ = std::fs::remove_file(&rt.socket);
        self.children.forget(rt.pid, rt.start_time);
        if let (Some(jc), Some(rec)) = (&self.config.jailer, self.jail_record(id)) {
            // The exited VMM's cgroups are empty now.
            let _ = cgroup::remove(&jc.cgroups(), &rec.jail_id).await;
        }
    }

    async fn scan(&self) -> HostResources {
        let mut dirs = launch::vm_dirs(&self.config.state_dir);
        let state_dir = self.config.state_dir.clone();
        let processes = match &self.config.jailer {
            None => launch::find_processes(|args| vm_of_cmdline(args, &state_dir)),
            Some(jc) => {
                // Jailed: known by the jail its root directory is in.
                let base = jc.chroot_base.join(&self.exec_name);
                let by_jail: HashMap<String, VmId> = dirs
                    .iter()
                    .filter_map(|id| self.jail_record(id).map(|r| (r.jail_id, id.clone())))
                    .collect();
                // The jail's owner marker names the VM (written before the
                // spawn); jail.json in the VM directory is the fallback.
                let to_vm = |jid: &str| {
                    std::fs::read_to_string(base.join(jid).join(jailer::OWNER_FILE))
                        .ok()
                        .and_then(|owner| VmId::parse(owner.trim(), "jail owner").ok())
                        .or_else(|| by_jail.get(jid).cloned())
                        .or_else(|| VmId::parse(jid, "jail").ok())
                };
                if let Ok(entries) = std::fs::read_dir(&base) {
                    for e in entries.flatten() {
                        if let Some(id) = to_vm(&e.file_name().to_string_lossy()) {
                            dirs.push(id);
                        }
                    }
                }
                // Cgroups the jailer made, named by jail id.
                dirs.extend(cgroup::names(&jc.cgroups()).iter().filter_map(|n| to_vm(n)));
                let mut found = Vec::new();
                for (pid, start_time, args) in launch::live_processes() {
                    // `--id <jail id>`, and rooted in that jail.
                    let Some(jid) = args
                        .iter()
                        .position(|a| a == "--id")
                        .and_then(|i| args.get(i + 1))
                    else {
                        continue;
                    };
                    if !args.iter().any(|a| a == "--api-sock")
                        || !in_jail(pid, &base.join(jid).join("root"))
                    {
                        continue;
                    }
                    if let Some(id) = to_vm(jid) {
                        found.push((id, pid, start_time));
                    }
                }
                found
            }
        };
        dirs.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        dirs.dedup();
        HostResources { processes, dirs }
    }

    async fn kill_orphan(&self, pid: i32, start_time: u64) -> Result<(), PortError> {
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
            && let Ok(i) = Client::new(&rt.socket).info().await
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
            .map(|r| r.totals.clone())?;
        // Ask for a fresh line and give the reader a moment to sum it.
        let next = totals.next_line();
        if Client::new(&rt.socket)
            .action(ActionType::FlushMetrics)
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_millis(200), next).await;
        }
        Some(totals.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_its_own_firecrackers() {
        let args = |sock: &str| -> Vec<String> {
            ["firecracker", "--api-sock", sock, "--id", "vm-1"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        let state = Path::new("/var/lib/metald/vms");
        assert_eq!(
            vm_of_cmdline(&args("/var/lib/metald/vms/vm-1/firecracker.sock"), state),
            Some(VmId::parse("vm-1", "t").unwrap())
        );
        assert_eq!(
            vm_of_cmdline(&args("/other/vms/vm-1/firecracker.sock"), state),
            None
        );
        assert_eq!(
            vm_of_cmdline(&args("/var/lib/metald/vms/vm-1/x/firecracker.sock"), state),
            None
        );
    }

    #[test]
    fn layout_maps_jail_paths_to_firecrackers_view() {
        let l = Layout {
            socket: "/j/root/run/firecracker.socket".into(),
            log: "/j/root/firecracker.log".into(),
            fifo: "/j/root/metrics.fifo".into(),
            chroot: Some("/j/root".into()),
        };
        assert_eq!(l.inside(&l.fifo), "/metrics.fifo");
        assert_eq!(l.inside(&l.socket), "/run/firecracker.socket");
    }
}
