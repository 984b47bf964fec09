//! What a Firecracker boot makes before the process starts: the FIFOs for
//! Firecracker's log and metrics, and with the jailer a fresh jail holding
//! the guest's files ([`super::jailfiles`]), the VM's uid, and the jailer's
//! command line. Everything is in place before the jailer hands the jail
//! to the VM's uid, so metald never creates files where a VMM could
//! already have planted links.

use std::path::{Path, PathBuf};

use metald_core::ports::BootError;
use metald_core::vm::{VmId, VmSpec};
use tracing::warn;

use super::jailer::{self, JailerConfig};
use super::jailfiles::JailDir;
use super::{FirecrackerBackend, JailRecord, LOG_LEVEL, Layout, metrics};
use crate::logcap;
use crate::{launch, process};

/// The guest's files as Firecracker sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GuestFiles {
    pub kernel: String,
    pub initrd: Option<String>,
    /// In the order of [`VmSpec::disks`] (the root device first).
    pub drives: Vec<String>,
}

/// A command ready to spawn, and what it needs to stay true until then.
pub(super) struct Prepared<'a> {
    pub cmd: tokio::process::Command,
    /// The uid and gid the jailed VMM runs as.
    pub owner: Option<(u32, u32)>,
    pub files: GuestFiles,
    /// Held until the process is recorded, so no concurrent boot picks the
    /// same uid.
    pub uid_guard: Option<tokio::sync::MutexGuard<'a, ()>>,
}

/// A started, recorded VMM process.
pub(super) struct Spawned {
    pub rec: launch::SpawnRecord,
    pub owner: Option<(u32, u32)>,
    pub files: GuestFiles,
}

/// File names in the jail (Firecracker's view: `/<name>`).
const KERNEL: &str = "vmlinux";
const INITRD: &str = "initrd";
pub(super) const LOG_FIFO: &str = "log.fifo";
pub(super) const METRICS_FIFO: &str = "metrics.fifo";

fn drive_name(i: usize) -> String {
    format!("drive{i}")
}

/// The request's field naming a drive, for refusals.
fn drive_field(id: &str) -> String {
    format!("config.storage[id={id}]")
}

fn fifo(path: &Path, owner: Option<(u32, u32)>) -> Result<(), BootError> {
    metrics::make_fifo(path, owner).map_err(|e| {
        BootError::Failed(launch::host_failure(
            "create the VMM's FIFOs",
            format_args!("{}: {e}", path.display()),
        ))
    })
}

impl FirecrackerBackend {
    /// The process command (firecracker itself, or the jailer around it)
    /// and everything it opens.
    pub(super) async fn prepare(
        &self,
        id: &VmId,
        spec: &VmSpec,
        layout: &Layout,
    ) -> Result<Prepared<'_>, BootError> {
        let netns = spec
            .nics
            .iter()
            .find_map(|n| n.attachment.as_ref())
            .map(|a| a.netns.clone());
        let (Some(jc), Some(jail)) = (&self.config.jailer, self.jail(id)) else {
            // Not jailed: the VM directory is metald's alone.
            let mut cmd = tokio::process::Command::new(&self.config.binary);
            cmd.arg("--api-sock")
                .arg(&layout.socket)
                .arg("--id")
                .arg(jailer::jail_id(id))
                .arg("--log-path")
                .arg(&layout.log_fifo)
                .args(["--level", LOG_LEVEL]);
            if let Some(ns) = &netns {
                launch::join_netns_on_exec(&mut cmd, ns).map_err(|e| {
                    BootError::Failed(launch::host_failure("join the VM's network namespace", e))
                })?;
            }
            fifo(&layout.log_fifo, None)?;
            fifo(&layout.fifo, None)?;
            let host = |p: &Path| p.to_string_lossy().into_owned();
            let files = GuestFiles {
                kernel: host(&spec.kernel),
                initrd: spec.initrd.as_deref().map(host),
                drives: spec.disks.iter().map(|d| host(&d.path)).collect(),
            };
            return Ok(Prepared {
                cmd,
                owner: None,
                files,
                uid_guard: None,
            });
        };
        if !jail.owned_by(id) {
            warn!(vm_id = %id, jail = %jail.dir.display(), "jail id taken by another VM");
            return Err(BootError::Failed(format!(
                "the VM's jail id {} is already used by another VM",
                jail.id
            )));
        }
        // The cgroups stay: the jailer reuses and rewrites them.
        jail.remove(id).map_err(BootError::Failed)?;
        std::fs::create_dir_all(&jail.root)
            .and_then(|()| std::fs::write(jail.dir.join(jailer::OWNER_FILE), id.as_str()))
            .map_err(|e| {
                BootError::Failed(launch::host_failure(
                    "create the VM's jail",
                    format_args!("{}: {e}", jail.dir.display()),
                ))
            })?;
        let files = self.place_files(spec, &jail.root).await?;
        let root = JailDir::open(&jail.root)?;
        root.make_dir("run")?;
        root.make_fifo(LOG_FIFO)?;
        root.make_fifo(METRICS_FIFO)?;

        let guard = self.uid_lock.lock().await;
        let uid = self.free_uid(jc, id).map_err(BootError::Failed)?;
        let owner = (uid, uid);
        let writable = spec
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.read_only)
            .map(|(i, _)| drive_name(i));
        for name in ["run".to_owned(), LOG_FIFO.into(), METRICS_FIFO.into()]
            .into_iter()
            .chain(writable)
        {
            root.hand_over(&name, owner)?;
        }
        let rec = JailRecord {
            jail_id: jail.id.clone(),
            uid,
        };
        serde_json::to_vec(&rec)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(self.vm_dir(id).join("jail.json"), b))
            .map_err(|e| BootError::Failed(launch::host_failure("record the VM's jail", e)))?;
        Ok(Prepared {
            cmd: self.jailer_command(jc, &jail.id, uid, spec, netns.as_deref(), layout),
            owner: Some(owner),
            files,
            uid_guard: Some(guard),
        })
    }

    /// Puts kernel, initrd and drives into the jail (off the async
    /// runtime: a copy may be large).
    async fn place_files(&self, spec: &VmSpec, root: &Path) -> Result<GuestFiles, BootError> {
        let root = root.to_path_buf();
        let kernel = spec.kernel.clone();
        let initrd = spec.initrd.clone();
        let disks: Vec<(PathBuf, bool, String)> = spec
            .disks
            .iter()
            .map(|d| (d.path.clone(), d.read_only, drive_field(&d.id)))
            .collect();
        tokio::task::spawn_blocking(move || {
            let jail = JailDir::open(&root)?;
            jail.place_read_only(&kernel, KERNEL, "config.boot.kernel_path")?;
            if let Some(p) = &initrd {
                jail.place_read_only(p, INITRD, "config.boot.initrd_path")?;
            }
            let mut drives = Vec::new();
            for (i, (path, read_only, field)) in disks.iter().enumerate() {
                let name = drive_name(i);
                if *read_only {
                    jail.place_read_only(path, &name, field)?;
                } else {
                    jail.place_writable(path, &name, field)?;
                }
                drives.push(format!("/{name}"));
            }
            Ok(GuestFiles {
                kernel: format!("/{KERNEL}"),
                initrd: initrd.map(|_| format!("/{INITRD}")),
                drives,
            })
        })
        .await
        .map_err(|e| BootError::Failed(launch::host_failure("place the VM's files", e)))?
    }

    fn jailer_command(
        &self,
        jc: &JailerConfig,
        jail_id: &str,
        uid: u32,
        spec: &VmSpec,
        netns: Option<&str>,
        layout: &Layout,
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&jc.binary);
        cmd.arg("--id")
            .arg(jail_id)
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
        if let Some(ns) = netns {
            cmd.arg("--netns").arg(Path::new("/run/netns").join(ns));
        }
        cmd.arg("--")
            .arg("--api-sock")
            .arg("/run/firecracker.socket")
            .arg("--log-path")
            .arg(layout.inside(&layout.log_fifo))
            .args(["--level", LOG_LEVEL]);
        cmd
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
}

impl FirecrackerBackend {
    /// Starts the prepared command with its console and stderr appended to
    /// the VM directory, after the FIFO readers (so nothing Firecracker
    /// writes waits for them), and records it.
    pub(super) fn spawn(
        &self,
        id: &VmId,
        dir: &Path,
        layout: &Layout,
        p: Prepared<'_>,
    ) -> Result<Spawned, BootError> {
        let Prepared {
            mut cmd,
            owner,
            files,
            uid_guard,
        } = p;
        self.start_pipes(id, layout);
        let rec = (|| {
            let console = logcap::create_append(&dir.join("console.log"))?;
            let stderr = logcap::create_append(&dir.join("stderr.log"))?;
            cmd.current_dir(dir)
                .stdin(std::process::Stdio::null())
                .stdout(console)
                .stderr(stderr);
            launch::spawn_recorded(&self.children, cmd, dir)
        })()
        .map_err(|e| BootError::Failed(launch::host_failure("start firecracker", e)))?;
        // Recorded: its uid now counts as held.
        drop(uid_guard);
        Ok(Spawned { rec, owner, files })
    }
}
