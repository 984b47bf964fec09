//! Where a VM's Firecracker reads and writes: its API socket and FIFOs,
//! in the VM directory or in its jail, as the host sees them and as
//! Firecracker (chrooted) sees them.

use std::path::{Path, PathBuf};

use metald_core::vm::VmId;

use super::FirecrackerBackend;
use super::prepare::{LOG_FIFO, METRICS_FIFO};
use crate::launch;

/// Where a VM's Firecracker reads and writes, as the host sees them and as
/// Firecracker sees them (the same without the jailer).
pub(super) struct Layout {
    pub socket: PathBuf,
    /// Firecracker's `--log-path`, a FIFO.
    pub log_fifo: PathBuf,
    /// The metrics FIFO.
    pub fifo: PathBuf,
    /// The directory holding the FIFOs and the socket: the jail root, or
    /// the VM directory.
    pub dir: PathBuf,
    /// Prefix turning a host path in the chroot into Firecracker's view.
    pub chroot: Option<PathBuf>,
}

impl Layout {
    /// Refuses a socket path Firecracker cannot bind. Jailed, it binds the
    /// path as seen in its chroot (`/run/firecracker.socket`), and metald
    /// connects through `/proc/self/fd`, so the jail's host path may be
    /// longer than a socket path can be.
    pub(super) fn check_socket(&self) -> Result<(), String> {
        launch::check_socket_path(Path::new(&self.inside(&self.socket)))
    }

    pub(super) fn inside(&self, host: &Path) -> String {
        match &self.chroot {
            Some(root) => Path::new("/")
                .join(host.strip_prefix(root).unwrap_or(host))
                .to_string_lossy()
                .into_owned(),
            None => host.to_string_lossy().into_owned(),
        }
    }
}

impl FirecrackerBackend {
    pub(super) fn layout(&self, id: &VmId) -> Layout {
        match self.jail(id) {
            Some(jail) => Layout {
                socket: jail.socket(),
                log_fifo: jail.root.join(LOG_FIFO),
                fifo: jail.root.join(METRICS_FIFO),
                dir: jail.root.clone(),
                chroot: Some(jail.root),
            },
            None => {
                let dir = self.vm_dir(id);
                Layout {
                    socket: dir.join("firecracker.sock"),
                    log_fifo: dir.join(LOG_FIFO),
                    fifo: dir.join(METRICS_FIFO),
                    dir,
                    chroot: None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_maps_jail_paths_to_firecrackers_view() {
        let l = Layout {
            socket: "/j/root/run/firecracker.socket".into(),
            log_fifo: "/j/root/log.fifo".into(),
            fifo: "/j/root/metrics.fifo".into(),
            dir: "/j/root".into(),
            chroot: Some("/j/root".into()),
        };
        assert_eq!(l.inside(&l.fifo), "/metrics.fifo");
        assert_eq!(l.inside(&l.log_fifo), "/log.fifo");
        assert_eq!(l.inside(&l.socket), "/run/firecracker.socket");
    }

    #[test]
    fn a_jailed_socket_is_checked_as_firecracker_binds_it() {
        let root = PathBuf::from(format!("/{}/jail/root", "d".repeat(120)));
        let jailed = Layout {
            socket: root.join("run/firecracker.socket"),
            log_fifo: root.join("log.fifo"),
            fifo: root.join("metrics.fifo"),
            dir: root.clone(),
            chroot: Some(root.clone()),
        };
        assert!(jailed.socket.as_os_str().len() > launch::MAX_SOCKET_PATH);
        assert_eq!(jailed.check_socket(), Ok(()));
        // Without the jailer, Firecracker binds the host path itself.
        let plain = Layout {
            chroot: None,
            ..jailed
        };
        assert!(plain.check_socket().is_err());
    }
}
