//! Jailer mode: each Firecracker runs through Firecracker's `jailer`, as
//! its own uid/gid, chrooted in `<chroot_base>/<exec name>/<jail id>/root`,
//! inside the VM's network namespace and in per-VM cgroups.
//!
//! The jailer makes the chroot, its device nodes and the cgroups, and
//! hands the chroot to the VM's uid; metald puts the guest's files in
//! first ([`super::jailfiles`]: never changing a file it did not create)
//! and removes the whole jail and the cgroups when the VM is deleted. A
//! marker file in the jail names the VM, so a jail is never removed for
//! another.

use std::path::PathBuf;

use metald_core::vm::{VmId, VmSpec};

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
    pub fn remove(&self, vm: &VmId) -> Result<(), String> {
        if !self.owned_by(vm) {
            tracing::warn!(vm_id = %vm, jail = %self.dir.display(), "jail belongs to another VM");
            return Err(format!(
                "the jail {} belongs to another VM; not removing it",
                self.id
            ));
        }
        crate::launch::remove_dir(&self.dir)
    }
}

/// The jailer's `--cgroup` arguments: the VM's limits (see
/// [`crate::cgroup::limits`]).
pub fn cgroup_args(version: u8, spec: &VmSpec) -> Vec<String> {
    crate::cgroup::limits(version, spec.vcpus, spec.memory_bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

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
