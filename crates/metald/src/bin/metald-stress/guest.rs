//! The guest every stress VM boots: from an `assets.env` (as
//! `scripts/guest-assets.sh` writes it) and/or explicit file flags.

use std::path::Path;

use metald_proto::vmprovisioner::v1 as pb;
use serde::Serialize;

use crate::flags::Flags;

/// Where `scripts/guest-assets.sh` leaves the test guest in a checkout.
const CHECKOUT_ASSETS: &str = ".metald/assets/assets.env";

const DEFAULT_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Debug, Clone, Serialize)]
pub struct Guest {
    pub kernel: String,
    pub initrd: Option<String>,
    pub disk: Option<String>,
    pub kernel_args: String,
    pub memory_mib: u64,
}

impl Guest {
    /// The guest named by the flags; explicit file flags win over the
    /// assets file.
    pub fn from_flags(f: &Flags) -> Result<Guest, String> {
        let checkout = Path::new(CHECKOUT_ASSETS);
        let env = match &f.backend_assets {
            Some(p) => read_env(p)?,
            None if checkout.is_file() => read_env(checkout)?,
            None => Vec::new(),
        };
        let find = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let kernel = f
            .kernel
            .clone()
            .or_else(|| find("METALD_GUEST_KERNEL"))
            .ok_or("no guest kernel: pass --backend-assets FILE or --kernel PATH")?;
        Ok(Guest {
            kernel,
            initrd: f.initrd.clone().or_else(|| find("METALD_GUEST_INITRD")),
            disk: f.disk.clone().or_else(|| find("METALD_GUEST_DISK")),
            kernel_args: f
                .kernel_args
                .clone()
                .or_else(|| find("METALD_GUEST_KERNEL_ARGS"))
                .unwrap_or_else(|| DEFAULT_KERNEL_ARGS.to_owned()),
            memory_mib: f.memory_mib,
        })
    }

    /// The CreateVm config: 1 vCPU, the guest's files, its disk read-only
    /// (so any number of VMs can share it).
    pub fn config(&self) -> pb::VmConfig {
        let mut cfg = pb::VmConfig {
            cpu: buffa::MessageField::some(pb::CpuConfig {
                vcpu_count: 1,
                ..Default::default()
            }),
            memory: buffa::MessageField::some(pb::MemoryConfig {
                size_bytes: (self.memory_mib << 20) as i64,
                ..Default::default()
            }),
            boot: buffa::MessageField::some(pb::BootConfig {
                kernel_path: self.kernel.clone(),
                initrd_path: self.initrd.clone().unwrap_or_default(),
                kernel_args: self.kernel_args.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Some(disk) = &self.disk {
            cfg.storage.push(pb::StorageDevice {
                id: "root".into(),
                path: disk.clone(),
                read_only: true,
                is_root_device: true,
                ..Default::default()
            });
        }
        cfg
    }
}

/// `KEY=value` lines (values optionally in double quotes; `#` comments).
fn read_env(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--backend-assets {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect())
}
