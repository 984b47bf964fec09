//! What a Firecracker boot makes before the process starts: the command
//! and the FIFOs for Firecracker's log and metrics (with the jailer, the
//! jail is made by [`super::jailer`]), and the spawn itself.

use std::path::Path;

use metald_core::ports::VmmError;
use metald_core::vm::{VmId, VmSpec};

use super::jailer;
use super::{FirecrackerBackend, LOG_LEVEL, Layout, metrics};
use crate::{cgroup, launch, logcap};

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
pub(super) const KERNEL: &str = "vmlinux";
pub(super) const INITRD: &str = "initrd";
pub(super) const LOG_FIFO: &str = "log.fifo";
pub(super) const METRICS_FIFO: &str = "metrics.fifo";

pub(super) fn drive_name(i: usize) -> String {
    format!("drive{i}")
}

/// The request's field naming a drive, for refusals.
pub(super) fn drive_field(id: &str) -> String {
    format!("config.storage[id={id}]")
}

fn fifo(path: &Path, owner: Option<(u32, u32)>) -> Result<(), VmmError> {
    metrics::make_fifo(path, owner).map_err(|e| {
        VmmError::Io(launch::host_failure(
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
    ) -> Result<Prepared<'_>, VmmError> {
        let netns = spec
            .nics()
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
                    VmmError::Io(launch::host_failure("join the VM's network namespace", e))
                })?;
            }
            cgroup::enter_on_exec(
                self.plain_cgroups(),
                &mut cmd,
                id.as_str(),
                spec.vcpus(),
                spec.memory_bytes(),
            )
            .map_err(|e| VmmError::Io(launch::host_failure("set up the VM's cgroups", e)))?;
            fifo(&layout.log_fifo, None)?;
            fifo(&layout.fifo, None)?;
            let host = |p: &Path| p.to_string_lossy().into_owned();
            let files = GuestFiles {
                kernel: host(spec.kernel()),
                initrd: spec.initrd().map(host),
                drives: spec.disks().iter().map(|d| host(&d.path)).collect(),
            };
            return Ok(Prepared {
                cmd,
                owner: None,
                files,
                uid_guard: None,
            });
        };
        self.prepare_jail(jc, &jail, id, spec, netns.as_deref(), layout)
            .await
    }

    /// Starts the prepared command with its console and stderr appended to
    /// the VM directory, after the FIFO readers (so nothing Firecracker
    /// writes waits for them), and records it.
    pub(super) fn spawn(
        &self,
        id: &VmId,
        dir: &Path,
        layout: &Layout,
        p: Prepared<'_>,
    ) -> Result<Spawned, VmmError> {
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
        .map_err(|e| VmmError::Io(launch::host_failure("start firecracker", e)))?;
        // Recorded: its uid now counts as held.
        drop(uid_guard);
        Ok(Spawned { rec, owner, files })
    }
}
