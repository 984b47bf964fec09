//! Jailer mode: each Firecracker runs through Firecracker's `jailer`, as
//! its own uid/gid, chrooted in `<chroot_base>/<exec name>/<jail id>/root`,
//! inside the VM's network namespace and in per-VM cgroups.
//!
//! The jailer makes the chroot, its device nodes and the cgroups, and
//! hands the chroot to the VM's uid; metald makes the jail and puts the
//! guest's files, the FIFOs and `run/` in first (`prepare_jail`, with
//! [`super::jailfiles`]: never changing a file it did not create), picks
//! the VM's uid and builds the jailer's command line. metald removes the
//! whole jail and the cgroups when the VM is deleted. A
//! marker file in the jail names the VM, so a jail is never removed for
//! another.

use std::path::{Path, PathBuf};

use metald_core::ports::VmmError;
use metald_core::vm::{VmId, VmSpec};
use tracing::warn;

use super::jailfiles::JailDir;
use super::prepare::{
    GuestFiles, INITRD, KERNEL, LOG_FIFO, METRICS_FIFO, Prepared, drive_field, drive_name,
};
use super::{FirecrackerBackend, JailRecord, LOG_LEVEL, Layout};
use crate::{launch, process};

/// Settings of jailer mode.
#[derive(Debug, Clone)]
pub struct JailerConfig {
    /// The `jailer` binary.
    pub binary: PathBuf,
    /// `--chroot-base-dir`.
    pub chroot_base: PathBuf,
    /// First uid (and gid) handed to VMs.
    pub uid_start: u32,
    /// How many uids the range holds; one per running VM.
    pub uid_count: u32,
    /// `--cgroup-version`: 1 or 2.
    pub cgroup_version: u8,
    /// `--parent-cgroup`.
    pub parent_cgroup: String,
}

/// Refuses a `firecracker` binary that is not statically linked: the
/// jailer runs it in a chroot that holds no libraries, where a dynamically
/// linked one fails at exec, after its jail was made, with only the
/// loader's complaint in the VM's log.
pub fn check_static(binary: &Path) -> Result<(), String> {
    use goblin::container::Ctx;
    use goblin::elf::Elf;
    use goblin::elf::program_header::{PT_INTERP, ProgramHeader};
    let bytes = std::fs::read(binary).map_err(|e| format!("reading {}: {e}", binary.display()))?;
    let not_elf =
        |e: goblin::error::Error| format!("{} is not an ELF binary: {e}", binary.display());
    // The header and program headers only: a loader is named by the
    // PT_INTERP entry; the sections and symbols are not needed.
    let h = Elf::parse_header(&bytes).map_err(not_elf)?;
    let ctx = Ctx::new(
        h.container().map_err(not_elf)?,
        h.endianness().map_err(not_elf)?,
    );
    let programs = ProgramHeader::parse(&bytes, h.e_phoff as usize, h.e_phnum as usize, ctx)
        .map_err(not_elf)?;
    let Some(interp) = programs.iter().find(|p| p.p_type == PT_INTERP) else {
        return Ok(());
    };
    let loader = bytes
        .get(interp.file_range())
        .map(|b| String::from_utf8_lossy(b).trim_end_matches('\0').to_owned())
        .unwrap_or_default();
    Err(format!(
        "{} is dynamically linked (loader {loader}), and the jailer runs it in a chroot \
         without libraries: use a static build (Firecracker's release binaries are; from \
         source, RUSTFLAGS=\"-C target-feature=+crt-static\")",
        binary.display()
    ))
}

/// Marker in the jail directory naming the VM it belongs to.
pub const OWNER_FILE: &str = "metald-vm-id";

/// The jailer's `--id` for a VM: the VM id itself when it fits the
/// jailer's alphabet (letters, digits, '-'), else the id with '_' made
/// '-' and a hash of the original appended (the owner marker catches the
/// unlikely collision).
pub fn jail_id(id: &VmId) -> String {
    let raw = id.as_str();
    if !raw.contains('_') {
        return raw.to_owned();
    }
    // FNV-1a, 64 bits: stable across builds, no dependency.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in raw.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let head: String = raw.chars().take(64 - 17).collect();
    format!("{}-{h:016x}", head.replace('_', "-"))
}

/// Where one VM's jail lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// `<chroot_base>/<exec name>/<jail id>`.
    pub dir: PathBuf,
    /// `<dir>/root`, the chroot.
    pub root: PathBuf,
    pub id: String,
}

impl Jail {
    pub fn new(config: &JailerConfig, exec_name: &str, vm: &VmId) -> Self {
        let id = jail_id(vm);
        let dir = config.chroot_base.join(exec_name).join(&id);
        Jail {
            root: dir.join("root"),
            dir,
            id,
        }
    }

    /// The API socket as seen from the host.
    pub fn socket(&self) -> PathBuf {
        self.root.join("run/firecracker.socket")
    }

    /// Whether the jail directory belongs to `vm` (or to nobody yet).
    pub fn owned_by(&self, vm: &VmId) -> bool {
        match std::fs::read_to_string(self.dir.join(OWNER_FILE)) {
            Ok(owner) => owner.trim() == vm.as_str(),
            Err(_) => true,
        }
    }

    /// Removes the jail if it is `vm`'s. Refuses another VM's jail.
    pub fn remove(&self, vm: &VmId) -> Result<(), VmmError> {
        if !self.owned_by(vm) {
            tracing::warn!(vm_id = %vm, jail = %self.dir.display(), "jail belongs to another VM");
            return Err(VmmError::Io(format!(
                "the jail {} belongs to another VM; not removing it",
                self.id
            )));
        }
        crate::launch::remove_dir(&self.dir)
    }
}

/// The jailer's `--cgroup` arguments: the VM's limits (see
/// [`crate::cgroup::limits`]).
pub fn cgroup_args(version: u8, spec: &VmSpec) -> Vec<String> {
    crate::cgroup::limits(version, spec.vcpus(), spec.memory_bytes())
        .into_iter()
        .flat_map(|(file, value)| ["--cgroup".to_owned(), format!("{file}={value}")])
        .collect()
}

impl JailerConfig {
    /// Where the jailer makes the VMs' cgroups.
    pub fn cgroups(&self) -> crate::cgroup::CgroupConfig {
        crate::cgroup::CgroupConfig {
            version: self.cgroup_version,
            parent: self.parent_cgroup.clone(),
        }
    }
}

impl FirecrackerBackend {
    /// Makes a fresh jail for `id` holding the guest's files and FIFOs,
    /// picks the VM's uid and hands it what the VMM writes, and returns the
    /// jailer's command. Everything is in place before the jailer hands the
    /// jail to that uid.
    pub(super) async fn prepare_jail(
        &self,
        jc: &JailerConfig,
        jail: &Jail,
        id: &VmId,
        spec: &VmSpec,
        netns: Option<&str>,
        layout: &Layout,
    ) -> Result<Prepared<'_>, VmmError> {
        if !jail.owned_by(id) {
            warn!(vm_id = %id, jail = %jail.dir.display(), "jail id taken by another VM");
            return Err(VmmError::Io(format!(
                "the VM's jail id {} is already used by another VM",
                jail.id
            )));
        }
        // The cgroups stay: the jailer reuses and rewrites them.
        jail.remove(id)?;
        std::fs::create_dir_all(&jail.root)
            .and_then(|()| std::fs::write(jail.dir.join(OWNER_FILE), id.as_str()))
            .map_err(|e| {
                VmmError::Io(launch::host_failure(
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
        let uid = self.free_uid(jc, id).map_err(VmmError::Io)?;
        let owner = (uid, uid);
        let writable = spec
            .disks()
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
            .map_err(|e| VmmError::Io(launch::host_failure("record the VM's jail", e)))?;
        Ok(Prepared {
            cmd: self.jailer_command(jc, &jail.id, uid, spec, netns, layout),
            owner: Some(owner),
            files,
            uid_guard: Some(guard),
        })
    }

    /// Puts kernel, initrd and drives into the jail (off the async
    /// runtime: a copy may be large).
    async fn place_files(&self, spec: &VmSpec, root: &Path) -> Result<GuestFiles, VmmError> {
        let root = root.to_path_buf();
        let kernel = spec.kernel().to_path_buf();
        let initrd = spec.initrd().map(Path::to_path_buf);
        let disks: Vec<(PathBuf, bool, String)> = spec
            .disks()
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
        .map_err(|e| VmmError::Io(launch::host_failure("place the VM's files", e)))?
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
            .args(cgroup_args(jc.cgroup_version, spec));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_statically_linked_binary_is_run_in_a_jail() {
        // Installed by scripts/setup.sh (busybox-static).
        assert_eq!(check_static(Path::new("/bin/busybox")), Ok(()));
        // This test binary is dynamically linked.
        let me = std::env::current_exe().unwrap();
        let e = check_static(&me).unwrap_err();
        assert!(e.contains("is dynamically linked (loader /lib"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("firecracker");
        std::fs::write(&script, "#!/bin/sh\nexec true\n").unwrap();
        let e = check_static(&script).unwrap_err();
        assert!(e.contains("is not an ELF binary"), "{e}");
        let e = check_static(&dir.path().join("missing")).unwrap_err();
        assert!(e.starts_with("reading "), "{e}");
    }

    #[test]
    fn jail_ids_fit_the_jailers_alphabet_and_stay_apart() {
        let plain = VmId::parse("vm-1", "t").unwrap();
        assert_eq!(jail_id(&plain), "vm-1");
        let a = jail_id(&VmId::parse("a_b", "t").unwrap());
        let b = jail_id(&VmId::parse("a-b", "t").unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("a-b-"));
        let long = VmId::parse(&format!("x_{}", "y".repeat(62)), "t").unwrap();
        let j = jail_id(&long);
        assert!(j.len() <= 64, "{j}");
        assert!(j.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }

    #[test]
    fn a_jail_of_another_vm_is_never_removed() {
        let base = tempfile::tempdir().unwrap();
        let config = JailerConfig {
            binary: "/bin/jailer".into(),
            chroot_base: base.path().into(),
            uid_start: 100000,
            uid_count: 10,
            cgroup_version: 1,
            parent_cgroup: "metald".into(),
        };
        let mine = VmId::parse("vm-1", "t").unwrap();
        let jail = Jail::new(&config, "firecracker", &mine);
        std::fs::create_dir_all(&jail.root).unwrap();
        std::fs::write(jail.dir.join(OWNER_FILE), "other-vm").unwrap();
        assert!(jail.remove(&mine).is_err());
        assert!(jail.root.exists());
        std::fs::write(jail.dir.join(OWNER_FILE), "vm-1").unwrap();
        jail.remove(&mine).unwrap();
        assert!(!jail.dir.exists());
        jail.remove(&mine).unwrap();
    }
}
