//! The VMM backend named by `UNKEY_METALD_BACKEND`, built from its settings.

use std::sync::Arc;

use anyhow::{Context, bail};
use metald_core::ports::Vmm;
use tracing::{info, warn};

use crate::config::{Backend, Config, QemuAccel};
use crate::health::BackendFacts;

/// The configured backend, and what it needs from the host.
pub fn backend(config: &Config) -> anyhow::Result<(Arc<dyn Vmm>, BackendFacts)> {
    match config.backend {
        Backend::Qemu => qemu(config),
        Backend::Firecracker => firecracker(config),
        Backend::Cloudhypervisor => cloud_hypervisor(config),
    }
}

fn qemu(config: &Config) -> anyhow::Result<(Arc<dyn Vmm>, BackendFacts)> {
    use metald_vmm::qemu::{Accel, QemuBackend, QemuConfig};
    let binary = match &config.qemu_binary {
        Some(b) => b.clone(),
        None => metald_vmm::find_on_path("qemu-system-x86_64").context(
            "UNKEY_METALD_QEMU_BINARY: qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)",
        )?,
    };
    let accel = match config.qemu_accel {
        QemuAccel::Auto => metald_vmm::qemu::default_accel(),
        QemuAccel::Kvm => Accel::Kvm,
        QemuAccel::Tcg => Accel::Tcg,
    };
    let cgroups = vm_cgroups(config)?;
    info!(binary = %binary.display(), ?accel, cgroups = cgroups.is_some(), "using the QEMU backend");
    let facts = BackendFacts {
        name: "qemu",
        binaries: vec![binary.clone()],
        needs_kvm: accel == Accel::Kvm,
    };
    let qemu = QemuBackend::new(QemuConfig {
        binary,
        accel,
        state_dir: config.data_dir.join("vms"),
        boot_timeout: config.boot_timeout,
        log_max: config.console_log_max,
        cgroups,
    })
    .map_err(anyhow::Error::msg)?;
    Ok((Arc::new(qemu), facts))
}

fn firecracker(config: &Config) -> anyhow::Result<(Arc<dyn Vmm>, BackendFacts)> {
    use metald_vmm::firecracker::jailer::JailerConfig;
    use metald_vmm::firecracker::{FirecrackerBackend, FirecrackerConfig};
    // The jailer rule first: it holds whether or not the binaries
    // are installed yet.
    let root = rustix::process::geteuid().is_root();
    if root && config.jailer_enabled.is_none() {
        bail!(
            "UNKEY_METALD_JAILER_ENABLED: refusing to run Firecracker as root without the jailer; \
             set it to true (recommended) or to false to accept running VMMs as root"
        );
    }
    let binary = binary_or_path(
        &config.firecracker_binary,
        "firecracker",
        "UNKEY_METALD_FIRECRACKER_BINARY",
    )?;
    let jailer = match config.jailer_enabled {
        Some(true) => Some(JailerConfig {
            binary: binary_or_path(
                &config.jailer_binary,
                "jailer",
                "UNKEY_METALD_JAILER_BINARY",
            )?,
            chroot_base: config
                .jailer_chroot_dir
                .clone()
                .unwrap_or_else(|| config.data_dir.join("jailer")),
            uid_start: config.jailer_uid_start,
            uid_count: config.jailer_uid_count,
            cgroup_version: config
                .jailer_cgroup_version
                .unwrap_or_else(metald_vmm::cgroup::host_version),
            parent_cgroup: config.jailer_parent_cgroup.clone(),
        }),
        Some(false) if root => {
            warn!(
                "Firecracker runs as root without the jailer (UNKEY_METALD_JAILER_ENABLED=false)"
            );
            None
        }
        _ => None,
    };
    // metald makes an unjailed VMM's cgroups; the jailer a jailed one's
    // (the backend uses these only without the jailer).
    let cgroups = vm_cgroups(config)?;
    info!(binary = %binary.display(), jailed = jailer.is_some(), cgroups = jailer.is_some() || cgroups.is_some(), "using the Firecracker backend");
    let facts = BackendFacts {
        name: "firecracker",
        binaries: std::iter::once(binary.clone())
            .chain(jailer.as_ref().map(|j| j.binary.clone()))
            .collect(),
        needs_kvm: true,
    };
    let fc = FirecrackerBackend::new(FirecrackerConfig {
        binary,
        state_dir: config.data_dir.join("vms"),
        boot_timeout: config.boot_timeout,
        jailer,
        cgroups,
        log_max: config.console_log_max,
    })
    .map_err(anyhow::Error::msg)?;
    Ok((Arc::new(fc), facts))
}

fn cloud_hypervisor(config: &Config) -> anyhow::Result<(Arc<dyn Vmm>, BackendFacts)> {
    use metald_vmm::cloudhypervisor::{CloudHypervisorBackend, CloudHypervisorConfig};
    let binary = binary_or_path(
        &config.cloud_hypervisor_binary,
        "cloud-hypervisor",
        "UNKEY_METALD_CLOUD_HYPERVISOR_BINARY",
    )?;
    let cgroups = vm_cgroups(config)?;
    info!(binary = %binary.display(), cgroups = cgroups.is_some(), "using the Cloud Hypervisor backend");
    let facts = BackendFacts {
        name: "cloudhypervisor",
        binaries: vec![binary.clone()],
        needs_kvm: true,
    };
    let ch = CloudHypervisorBackend::new(CloudHypervisorConfig {
        binary,
        state_dir: config.data_dir.join("vms"),
        boot_timeout: config.boot_timeout,
        cgroups,
        user: config.cloud_hypervisor_user,
        log_max: config.console_log_max,
    })
    .map_err(anyhow::Error::msg)?;
    Ok((Arc::new(ch), facts))
}

/// The per-VM cgroups metald makes for a VMM (QEMU, Cloud Hypervisor, an
/// unjailed Firecracker), unless they are turned off.
fn vm_cgroups(config: &Config) -> anyhow::Result<Option<metald_vmm::cgroup::CgroupConfig>> {
    if !config.cgroups_enabled {
        return Ok(None);
    }
    if !rustix::process::geteuid().is_root() {
        // Only root can make cgroups under the hierarchies' roots.
        warn!(
            "metald does not run as root: VMMs get no cgroups of their own, so no CPU or memory \
             limits (set UNKEY_METALD_CGROUPS_ENABLED=false to say so explicitly)"
        );
        return Ok(None);
    }
    let version = config
        .cgroup_version
        .unwrap_or_else(metald_vmm::cgroup::host_version);
    if !matches!(version, 1 | 2) {
        bail!("UNKEY_METALD_CGROUP_VERSION: must be 1 or 2, got {version}");
    }
    Ok(Some(metald_vmm::cgroup::CgroupConfig {
        version,
        parent: config.cgroup_parent.clone(),
    }))
}

/// A binary from its setting, else found on PATH.
fn binary_or_path(
    setting: &Option<std::path::PathBuf>,
    name: &str,
    var: &str,
) -> anyhow::Result<std::path::PathBuf> {
    match setting {
        Some(b) => Ok(b.clone()),
        None => metald_vmm::find_on_path(name)
            .with_context(|| format!("{var}: {name} is not on PATH; set {var} to its path")),
    }
}
