//! Finding this backend's Firecrackers on the host: by the socket on the
//! command line (plain), or by the jail a process's root directory is
//! (jailed); and the jails and cgroups a VM left, for the reconciler.

use std::collections::HashMap;
use std::path::Path;

use metald_core::ports::{HostResources, VmmError, VmmRuntime};
use metald_core::vm::VmId;

use super::{FirecrackerBackend, jailer};
use crate::{cgroup, launch, process};

/// The VM a non-jailed Firecracker's command line serves: its API socket
/// is `<state_dir>/<id>/firecracker.sock`.
fn vm_of_cmdline(args: &[String], state_dir: &Path) -> Option<VmId> {
    launch::vm_of_socket_arg(args, "--api-sock", state_dir, "firecracker.sock")
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

impl FirecrackerBackend {
    /// This backend's VMM processes, VM directories, jails and cgroups on
    /// the host, whether or not a VM row claims them.
    pub(super) fn find_on_host(&self) -> HostResources {
        // (An unjailed VM's cgroups are named by its key, as its directory.)
        let mut dirs = launch::vm_dirs_and_cgroups(&self.config.state_dir, self.plain_cgroups());
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

    /// Whether `rt`'s process is still `id`'s Firecracker: the identity
    /// check of adoption.
    pub(super) fn is_our_process(&self, id: &VmId, rt: &VmmRuntime) -> Result<(), VmmError> {
        match self.jail(id) {
            // A jailed Firecracker sees its socket as /run/firecracker.socket;
            // its root directory (the jail, after pivot_root) tells which
            // jail it is in.
            Some(jail) => {
                if !process::is_alive(rt.pid, rt.start_time) {
                    return Err(VmmError::Gone(format!(
                        "process {} is gone or is another process now",
                        rt.pid
                    )));
                }
                if !in_jail(rt.pid, &jail.root) {
                    return Err(VmmError::Gone(format!(
                        "process {} does not run in the VM's jail",
                        rt.pid
                    )));
                }
            }
            None => launch::is_our_process(rt, &rt.socket.to_string_lossy())?,
        }
        Ok(())
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
}
