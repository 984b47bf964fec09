//! The QEMU backend: one `qemu-system-x86_64 -M microvm` process per VM,
//! controlled over QMP on a per-VM Unix socket.
//!
//! Files of a VM live in `<state_dir>/<vm_id>/`: `qmp.sock`, `console.log`
//! (the serial console), `qemu.log` (QEMU's own stdout and stderr) and
//! `vmm.json` (pid and start time, written right after spawning so a crash
//! between spawn and the store update still leaves the process findable).
//! Both logs are appended to and kept under the cap ([`crate::logcap`]).
//!
//! | metald      | QEMU                                                  |
//! |-------------|-------------------------------------------------------|
//! | boot        | spawn with `-S`, attach QMP, `cont`                   |
//! | pause       | `stop`                                                |
//! | resume      | `cont`                                                |
//! | reboot      | `system_reset`                                        |
//! | shutdown    | `system_powerdown` (ACPI), SIGKILL after the timeout  |
//! | force stop  | SIGKILL                                               |
//! | delete      | SIGKILL, remove the VM directory and cgroups          |
//!
//! Each QEMU runs in cgroups of its own ([`crate::cgroup`]), named by the
//! VM's id, that cap its CPU time at the guest's vCPUs and its memory at
//! the guest's plus QEMU's own; it joins them between fork and exec.

pub mod args;
pub mod qmp;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use metald_core::ports::{
    BootPhase, GuestStatus, HostResources, StopMode, Vmm, VmmError, VmmExit, VmmRuntime,
};
use metald_core::vm::{VmId, VmSpec};
use tracing::warn;

use crate::cgroup::{self, CgroupConfig};
use crate::launch;
use crate::logcap::{self, LogCap};
use crate::process::{self, Children};

/// The backend's name in `UNKEY_METALD_BACKEND` and `backend_info`.
pub const NAME: &str = "qemu";

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// Software emulation: slow, but works everywhere.
    Tcg,
}

/// `Kvm` when `/dev/kvm` can be opened for reading and writing, else `Tcg`.
pub fn default_accel() -> Accel {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Accel::Kvm,
        Err(_) => Accel::Tcg,
    }
}

/// Settings of the QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
    pub accel: Accel,
    /// Parent of the per-VM directories.
    pub state_dir: PathBuf,
    /// How long QEMU may take to open its QMP socket.
    pub boot_timeout: Duration,
    /// Cap of each console and QEMU log, in bytes.
    pub log_max: u64,
    /// Per-VM cgroups; `None` leaves QEMUs in metald's own cgroup.
    pub cgroups: Option<CgroupConfig>,
}

/// The QEMU backend.
pub struct QemuBackend {
    config: QemuConfig,
    version: String,
    children: Children,
    logs: LogCap,
}

/// The VM a QEMU command line serves, if it is one metald started with
/// its files under `state_dir`.
fn vm_of_cmdline(args: &[String], state_dir: &str) -> Option<VmId> {
    let name = args
        .iter()
        .position(|a| a == "-name")
        .and_then(|i| args.get(i + 1))?;
    let id = VmId::parse(name.strip_prefix("metald-")?, "name").ok()?;
    let sock = Path::new(state_dir).join(id.as_str()).join("qmp.sock");
    // As written on the command line: commas doubled (see args.rs).
    let qmp = format!("unix:{}", sock.display()).replace(',', ",,");
    args.iter().any(|a| a.starts_with(&qmp)).then_some(id)
}

impl QemuBackend {
    /// Checks the binary answers `--version` and prepares the state dir.
    pub fn new(config: QemuConfig) -> Result<Self, String> {
        let version = launch::version_of(&config.binary, "UNKEY_METALD_QEMU_BINARY")?;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| format!("creating {}: {e}", config.state_dir.display()))?;
        Ok(QemuBackend {
            logs: LogCap::new(config.log_max),
            config,
            version,
            children: Children::default(),
        })
    }

    fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.config.state_dir.join(id.as_str())
    }

    /// The files a VM's QEMU writes to, kept under the cap.
    fn log_files(&self, id: &VmId) -> Vec<PathBuf> {
        let dir = self.vm_dir(id);
        vec![dir.join("console.log"), dir.join("qemu.log")]
    }

    /// Waits for the QMP socket (bounded retry with backoff, while watching
    /// for QEMU exiting instead), then lets the guest run.
    async fn start_guest(&self, dir: &Path, rt: &VmmRuntime) -> Result<(), VmmError> {
        let waiting = std::time::Instant::now();
        let mut qmp = launch::until_ready(&self.children, rt, self.config.boot_timeout, || {
            let socket = rt.socket.clone();
            async move { qmp::Qmp::connect(&socket).await.map_err(|e| e.to_string()) }
        })
        .await
        .map_err(|e| {
            launch::not_ready(
                e,
                "qemu",
                &rt.socket,
                self.config.boot_timeout,
                &[&dir.join("qemu.log")],
            )
        })?;
        let starting = launch::phase_done(BootPhase::SocketReady, waiting);
        let run = async {
            qmp.execute("cont", None).await?;
            let st = qmp.execute("query-status", None).await?;
            match st.get("status").and_then(|s| s.as_str()) {
                Some("running") => Ok(()),
                other => Err(VmmError::Io(format!(
                    "guest is {other:?} after cont, expected running"
                ))),
            }
        };
        tokio::time::timeout(qmp::COMMAND_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| {
                Err(VmmError::Timeout(
                    "qemu did not answer cont within 10 s".into(),
                ))
            })?;
        launch::phase_done(BootPhase::Start, starting);
        Ok(())
    }
}

#[async_trait]
impl Vmm for QemuBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn boot(&self, id: &VmId, spec: &VmSpec) -> Result<VmmRuntime, VmmError> {
        let spawning = std::time::Instant::now();
        let dir = self.vm_dir(id);
        let socket = dir.join("qmp.sock");
        let console_log = dir.join("console.log");
        launch::check_socket_path(&socket).map_err(VmmError::Io)?;
        launch::fresh_dir(&dir)?;
        let spawned = (|| {
            let log = logcap::create_append(&dir.join("qemu.log"))?;
            let mut cmd = tokio::process::Command::new(&self.config.binary);
            cmd.args(args::command_line(
                id.as_str(),
                spec,
                self.config.accel,
                &args::VmFiles {
                    console_log: &console_log,
                    qmp_socket: &socket,
                },
            ))
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
            if let Some(att) = spec.nics().iter().find_map(|n| n.attachment.as_ref()) {
                launch::join_netns_on_exec(&mut cmd, &att.netns)?;
            }
            cgroup::enter_on_exec(
                self.config.cgroups.as_ref(),
                &mut cmd,
                id.as_str(),
                spec.vcpus(),
                spec.memory_bytes(),
            )
            .map_err(std::io::Error::other)?;
            let rec = launch::spawn_recorded(&self.children, cmd, &dir)?;
            Ok::<_, std::io::Error>((rec.pid, rec.start_time))
        })();
        let (pid, start_time) = match spawned {
            Ok(p) => p,
            Err(e) => {
                warn!(vm_id = %id, binary = %self.config.binary.display(), error = %e, "cannot start qemu");
                let _ = self.destroy(id, None).await;
                return Err(VmmError::Io("cannot start qemu".into()));
            }
        };
        launch::phase_done(BootPhase::Spawn, spawning);
        // From the first byte QEMU writes.
        self.logs.watch(id, self.log_files(id));
        let rt = VmmRuntime {
            backend: NAME.into(),
            pid,
            start_time,
            socket,
        };
        match self.start_guest(&dir, &rt).await {
            Ok(()) => Ok(rt),
            Err(e) => {
                if let Err(cleanup) = self.destroy(id, Some(&rt)).await {
                    warn!(vm_id = %id, error = %cleanup, "cleanup after a failed boot failed");
                }
                Err(e)
            }
        }
    }

    async fn pause(&self, rt: &VmmRuntime) -> Result<(), VmmError> {
        qmp::run(&rt.socket, "stop", None).await.map(drop)
    }

    async fn resume(&self, rt: &VmmRuntime) -> Result<(), VmmError> {
        qmp::run(&rt.socket, "cont", None).await.map(drop)
    }

    async fn reboot(
        &self,
        _id: &VmId,
        _spec: &VmSpec,
        rt: &VmmRuntime,
    ) -> Result<VmmRuntime, VmmError> {
        qmp::run(&rt.socket, "system_reset", None).await?;
        Ok(rt.clone())
    }

    async fn shutdown(&self, rt: &VmmRuntime, mode: StopMode) -> Result<(), VmmError> {
        launch::stop(&self.children, rt, mode, "ACPI power button", || async {
            qmp::run(&rt.socket, "system_powerdown", None)
                .await
                .map(drop)
        })
        .await
    }

    async fn destroy(&self, id: &VmId, rt: Option<&VmmRuntime>) -> Result<(), VmmError> {
        self.logs.unwatch(id);
        launch::kill_and_remove(&self.children, &self.vm_dir(id), rt).await?;
        launch::remove_cgroups(self.config.cgroups.as_ref(), id).await
    }

    async fn adopt(&self, id: &VmId, rt: &VmmRuntime) -> Result<GuestStatus, VmmError> {
        launch::check_backend(rt, NAME)?;
        launch::is_our_process(rt, &rt.socket.to_string_lossy())?;
        let status = match qmp::status(&rt.socket).await?.as_str() {
            "running" => GuestStatus::Running,
            "paused" => GuestStatus::Paused,
            other => return Err(VmmError::Io(format!("guest is in QEMU state {other:?}"))),
        };
        // What the guest wrote while no metald ran is cut back at once.
        self.logs.watch(id, self.log_files(id));
        Ok(status)
    }

    fn wait_exit(&self, rt: &VmmRuntime) -> BoxFuture<'static, VmmExit> {
        self.children.wait_exit(rt.pid, rt.start_time)
    }

    fn is_alive(&self, rt: &VmmRuntime) -> bool {
        process::is_alive(rt.pid, rt.start_time)
    }

    async fn status(&self, rt: &VmmRuntime) -> Result<GuestStatus, VmmError> {
        launch::check_backend(rt, NAME)?;
        match qmp::status(&rt.socket).await?.as_str() {
            "running" => Ok(GuestStatus::Running),
            "paused" | "suspended" => Ok(GuestStatus::Paused),
            "shutdown" | "guest-panicked" | "internal-error" => Ok(GuestStatus::Halted),
            other => Err(VmmError::Io(format!("guest is in QEMU state {other:?}"))),
        }
    }

    async fn powered_off(&self, id: &VmId) -> bool {
        crate::guest_end::vm_powered_off(self.vm_dir(id)).await
    }

    async fn release(&self, id: &VmId, rt: &VmmRuntime) {
        self.logs.unwatch(id);
        // QEMU removes its socket only on a clean exit.
        let _ = std::fs::remove_file(&rt.socket);
        self.children.forget(rt.pid, rt.start_time);
        if let Some(cg) = &self.config.cgroups {
            // The exited QEMU's cgroups are empty now.
            let _ = cgroup::remove(cg, id.as_str()).await;
        }
    }

    async fn scan(&self) -> HostResources {
        // A QEMU of this metald names the VM (`-name metald-<id>`) and has
        // its QMP socket under this state directory.
        let state_dir = self.config.state_dir.to_string_lossy().into_owned();
        launch::off_runtime(|| HostResources {
            processes: launch::find_processes(|args| vm_of_cmdline(args, &state_dir)),
            dirs: launch::vm_dirs_and_cgroups(&self.config.state_dir, self.config.cgroups.as_ref()),
        })
    }

    async fn kill_orphan(&self, pid: i32, start_time: u64) -> Result<(), VmmError> {
        self.children.kill_and_forget(pid, start_time).await
    }

    async fn describe(&self, id: &VmId, rt: Option<&VmmRuntime>) -> BTreeMap<String, String> {
        let mut info = launch::describe_base(NAME, &self.version, &self.vm_dir(id), rt);
        info.insert(
            "accel".into(),
            match self.config.accel {
                Accel::Kvm => "kvm".into(),
                Accel::Tcg => "tcg".into(),
            },
        );
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_its_own_qemus() {
        let args = |name: &str, sock: &str| -> Vec<String> {
            ["qemu-system-x86_64", "-name", name, "-qmp", sock]
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        let ours = args(
            "metald-vm-1",
            "unix:/var/lib/metald/vms/vm-1/qmp.sock,server=on,wait=off",
        );
        assert_eq!(
            vm_of_cmdline(&ours, "/var/lib/metald/vms"),
            Some(VmId::parse("vm-1", "t").unwrap())
        );
        assert_eq!(
            vm_of_cmdline(&ours, "/other/vms"),
            None,
            "another metald's data dir"
        );
        let mismatched = args(
            "metald-vm-2",
            "unix:/var/lib/metald/vms/vm-1/qmp.sock,server=on",
        );
        assert_eq!(vm_of_cmdline(&mismatched, "/var/lib/metald/vms"), None);
        let foreign = args("web", "unix:/var/lib/metald/vms/web/qmp.sock");
        assert_eq!(vm_of_cmdline(&foreign, "/var/lib/metald/vms"), None);
    }
}
