//! Reading a [`VmSpec`], and the few changes a validated spec may take:
//! the host paths the asset policy resolved, and the network attachment
//! metald made for an interface.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{DiskSpec, VmSpec};
use crate::net::{NicAttachment, NicSpec};

impl VmSpec {
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Sockets, cores per socket and threads per core, when the client gave
    /// them.
    pub fn topology(&self) -> Option<(u32, u32, u32)> {
        self.topology
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    pub fn initrd(&self) -> Option<&Path> {
        self.initrd.as_deref()
    }

    /// The guest's own kernel arguments; empty for the backend's default.
    pub fn kernel_args(&self) -> &str {
        &self.kernel_args
    }

    pub fn boot_options(&self) -> &BTreeMap<String, String> {
        &self.boot_options
    }

    /// Block devices, the root device first.
    pub fn disks(&self) -> &[DiskSpec] {
        &self.disks
    }

    /// Network interfaces; empty for a VM without network.
    pub fn nics(&self) -> &[NicSpec] {
        &self.nics
    }

    pub fn console_enabled(&self) -> bool {
        self.console_enabled
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The same spec with the files at the host paths the asset policy
    /// resolved them to (`disks` in spec order; missing ones keep theirs).
    pub fn at_host_paths(
        &self,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        disks: impl IntoIterator<Item = PathBuf>,
    ) -> VmSpec {
        let mut spec = self.clone();
        let out = spec.fields_mut();
        out.kernel = kernel;
        if initrd.is_some() {
            out.initrd = initrd;
        }
        for (d, path) in out.disks.iter_mut().zip(disks) {
            d.path = path;
        }
        spec
    }

    /// Records (or, with `None`, forgets) what metald attached for
    /// interface `index`. An index past the interfaces changes nothing.
    pub fn set_attachment(&mut self, index: usize, attachment: Option<NicAttachment>) {
        if let Some(nic) = self.fields_mut().nics.get_mut(index) {
            nic.attachment = attachment;
        }
    }
}
