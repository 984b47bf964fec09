//! Configuring a Firecracker that answers on its socket, then starting its
//! guest: typed `PUT`s in the order Firecracker expects, then
//! `InstanceStart`.

use metald_core::ports::VmmError;
use metald_core::vm::VmSpec;

use super::api::{self, ActionType, Client};
use super::prepare::GuestFiles;
use super::{DEFAULT_KERNEL_ARGS, FirecrackerBackend, Layout};
use crate::launch;
use crate::ratelimit::RateLimiter;

impl FirecrackerBackend {
    /// Configures a Firecracker that answers on its socket and starts the
    /// guest.
    pub(super) async fn configure_and_start(
        &self,
        spec: &VmSpec,
        layout: &Layout,
        files: GuestFiles,
        fc: &Client,
    ) -> Result<(), VmmError> {
        fc.put(
            "/machine-config",
            &api::MachineConfig {
                vcpu_count: spec.vcpus(),
                mem_size_mib: spec.memory_bytes() >> 20,
                smt: false,
            },
        )
        .await?;
        fc.put(
            "/boot-source",
            &api::BootSource {
                kernel_image_path: files.kernel,
                initrd_path: files.initrd,
                boot_args: Some(launch::kernel_cmdline(spec, DEFAULT_KERNEL_ARGS)),
            },
        )
        .await?;
        // The root device first, as Firecracker expects (VmSpec sorts so).
        for (d, path) in spec.disks().iter().zip(files.drives) {
            let drive = api::Drive {
                drive_id: d.id.clone(),
                path_on_host: path,
                is_root_device: d.is_root,
                is_read_only: d.read_only,
                rate_limiter: RateLimiter::from_options(&d.options).map_err(VmmError::Refused)?,
            };
            fc.put(&format!("/drives/{}", d.id), &drive).await?;
        }
        for (i, n) in spec.nics().iter().enumerate() {
            let Some(att) = &n.attachment else { continue };
            let iface = api::NetworkInterface {
                iface_id: format!("eth{i}"),
                host_dev_name: att.tap.clone(),
                guest_mac: Some(att.mac.to_string()),
                rx_rate_limiter: api::RateLimiter::bytes_per_sec(n.rx_bytes_per_sec),
                tx_rate_limiter: api::RateLimiter::bytes_per_sec(n.tx_bytes_per_sec),
            };
            fc.put(&format!("/network-interfaces/eth{i}"), &iface)
                .await?;
        }
        fc.put(
            "/metrics",
            &api::Metrics {
                metrics_path: layout.inside(&layout.fifo),
            },
        )
        .await?;
        fc.action(ActionType::InstanceStart).await?;
        let info = fc.info().await?;
        if info.state != "Running" {
            return Err(VmmError::Io(format!(
                "firecracker reports {:?} after InstanceStart, expected Running",
                info.state
            )));
        }
        Ok(())
    }
}
