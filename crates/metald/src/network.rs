//! Adapts `metald_network::Host` (bridge, namespaces, veth, TAP) and its
//! DHCP server to the service's `Network` port.

use std::collections::BTreeSet;

use async_trait::async_trait;
use metald_core::net::{NicAttachment, NicSpec};
use metald_core::ports::{Network, NetworkError, Store, Subnets};
use metald_core::{CustomerId, Mac, VmId};
use metald_network::{DhcpServer, Host, HostEntry, InterfaceSpec};

/// Host networking for metald's VMs.
pub struct HostNetwork {
    host: Host,
    /// Serves each interface's IPv4 lease (and the RAs); `None` when off.
    dhcp: Option<DhcpServer>,
    /// Whether attachments put the addresses on the kernel command line.
    kernel_args: bool,
}

impl HostNetwork {
    pub fn new(host: Host, dhcp: Option<DhcpServer>, kernel_args: bool) -> Self {
        HostNetwork {
            host,
            dhcp,
            kernel_args,
        }
    }

    /// Rebuilds the DHCP hosts file from the VM rows (before recovery, so
    /// a row's line is there whatever the file held when metald stopped).
    pub async fn restore(&self, store: &dyn Store) -> Result<(), String> {
        let Some(dhcp) = &self.dhcp else {
            return Ok(());
        };
        let rows = store.all().await.map_err(|e| format!("reading VMs: {e}"))?;
        let entries = rows.iter().flat_map(|vm| {
            vm.spec.nics().iter().enumerate().filter_map(|(i, nic)| {
                let att = nic.attachment.as_ref()?;
                let (ipv4, _) = att.ipv4?;
                let entry = HostEntry {
                    mac: att.mac.octets(),
                    ipv4,
                };
                Some(((vm.id.to_string(), i), entry))
            })
        });
        dhcp.replace_all(entries.collect::<Vec<_>>()).await
    }

    /// On a clean stop: the DHCP server stops when no VM interface needs
    /// it; otherwise it keeps serving and the next metald adopts it.
    pub async fn stop(&self) {
        if let Some(dhcp) = &self.dhcp {
            match dhcp.stop_if_unused().await {
                Ok(true) => tracing::info!("DHCP server stopped: no VM interface left"),
                Ok(false) => {
                    tracing::info!("DHCP server keeps serving the VMs; the next metald adopts it")
                }
                Err(e) => tracing::warn!(error = %e, "stopping the DHCP server failed"),
            }
        }
    }
}

/// The DHCP / router advertisement server on the bridge
/// (`UNKEY_METALD_NETWORK_DHCP`), adopted or started; its files live in
/// `<data_dir>/dhcp`.
pub async fn dhcp_server(config: &crate::config::Config) -> anyhow::Result<Option<DhcpServer>> {
    let d = &config.dhcp;
    let dir = config.data_dir.join("dhcp");
    if !d.network_dhcp {
        tracing::info!(
            "no DHCP server (UNKEY_METALD_NETWORK_DHCP=false): guests need the kernel command line"
        );
        match tokio::task::spawn_blocking(move || metald_network::stop_leftover_dhcp(&dir)).await {
            Ok(Ok(Some(pid))) => tracing::info!(
                pid,
                "stopped the DHCP server an earlier metald left running"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot stop the DHCP server an earlier metald left running")
            }
            Err(e) => tracing::warn!(error = %e, "stopping a leftover DHCP server"),
        }
        return Ok(None);
    }
    let bridge = &config.network.bridge;
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{bridge}/mtu"))
        .ok()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(1500);
    let server = DhcpServer::start(metald_network::DhcpConfig {
        bridge: bridge.clone(),
        dir,
        ipv4_subnet: config.network.ipv4_subnet,
        ipv6_subnet: config.network.ipv6_subnet,
        dns: d.network_dns.0.clone(),
        mtu,
        lease_secs: d.network_dhcp_lease_time,
    })
    .await
    .map_err(|e| anyhow::anyhow!("UNKEY_METALD_NETWORK_DHCP: {e}"))?;
    if !server.config().router_advertisements() {
        tracing::warn!(v6 = %config.network.ipv6_subnet, "the IPv6 subnet is not a /64: no router advertisements, guests need the kernel command line for IPv6");
    }
    Ok(Some(server))
}

/// The device group a customer's host veths carry: with isolation by
/// customer, VMs reach each other exactly when their groups are equal.
/// FNV-1a 32 of the customer id (already validated: printable ASCII); 0,
/// the kernel's default group, is nobody's and becomes 1. Two customers
/// share a group with probability about n²/2³³ for n customers on a host.
pub fn customer_group(customer: &CustomerId) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in customer.as_str().bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// Whether host device `dev` is a port of `bridge`.
fn on_bridge(dev: &str, bridge: &str) -> bool {
    std::fs::read_link(format!("/sys/class/net/{dev}/master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n == bridge))
        .unwrap_or(false)
}

#[async_trait]
impl Network for HostNetwork {
    fn subnets(&self) -> Subnets {
        let c = self.host.config();
        Subnets {
            v4: (
                c.ipv4_subnet.network(),
                c.ipv4_subnet.prefix_len(),
                self.host.gateway_v4(),
            ),
            v6: (
                c.ipv6_subnet.network(),
                c.ipv6_subnet.prefix_len(),
                self.host.gateway_v6(),
            ),
        }
    }

    fn mac_for(&self, vm: &VmId, index: usize) -> Mac {
        Mac::local(metald_network::mac_for(vm.as_str(), index))
    }

    async fn attach(
        &self,
        vm: &VmId,
        customer: &CustomerId,
        index: usize,
        nic: &NicSpec,
        mac: Mac,
    ) -> Result<NicAttachment, NetworkError> {
        let names = Host::names(vm.as_str(), index);
        let spec = InterfaceSpec {
            vm_id: vm.to_string(),
            index,
            names: names.clone(),
            mac: mac.octets(),
            group: customer_group(customer),
            ipv4: nic.ipv4,
            ipv6: nic.ipv6,
            rx_rate_bytes_per_sec: nic.rx_bytes_per_sec,
            tx_rate_bytes_per_sec: nic.tx_bytes_per_sec,
        };
        self.host
            .create_interface(&spec)
            .await
            .map_err(NetworkError::Io)?;
        // Before the VMM starts, so the guest's first DISCOVER is answered.
        if let (Some(dhcp), Some(ipv4)) = (&self.dhcp, nic.ipv4) {
            let entry = HostEntry {
                mac: mac.octets(),
                ipv4,
            };
            dhcp.set(vm.as_str(), index, entry)
                .await
                .map_err(NetworkError::Io)?;
        }
        Ok(NicAttachment {
            mac,
            ipv4: None,
            gateway4: None,
            ipv6: None,
            gateway6: None,
            netns: names.netns,
            tap: names.tap,
            host_veth: names.host_veth,
            cmdline: self.kernel_args,
        })
    }

    async fn detach(&self, vm: &VmId, index: usize) -> Result<(), NetworkError> {
        if let Some(dhcp) = &self.dhcp {
            dhcp.remove(vm.as_str(), index)
                .await
                .map_err(NetworkError::Io)?;
        }
        self.host
            .destroy_interface(&Host::names(vm.as_str(), index))
            .await
            .map_err(NetworkError::Io)
    }

    /// Only interfaces on this metald's bridge count: another metald on the
    /// host (with its own bridge) owns the rest. An interface whose host
    /// veth is gone cannot be placed and is left alone. Lines of this
    /// metald's DHCP hosts file count too, devices or not.
    async fn scan(&self) -> Result<Vec<(VmId, usize)>, NetworkError> {
        let bridge = &self.host.config().bridge;
        let mut found: BTreeSet<(String, usize)> = self
            .host
            .scan()
            .await
            .map_err(NetworkError::Io)?
            .into_iter()
            .filter(|o| on_bridge(&o.names.host_veth, bridge))
            .map(|o| (o.vm_id, o.index))
            .collect();
        if let Some(dhcp) = &self.dhcp {
            found.extend(dhcp.owners().await);
        }
        Ok(found
            .into_iter()
            .filter_map(|(vm, i)| VmId::parse(&vm, "vm_id").ok().map(|id| (id, i)))
            .collect())
    }

    async fn strays(&self, known: &[(VmId, usize)]) -> Result<Vec<String>, NetworkError> {
        let known: Vec<(String, usize)> = known.iter().map(|(v, i)| (v.to_string(), *i)).collect();
        self.host
            .unmarked_namespaces(&known)
            .await
            .map_err(NetworkError::Io)
    }

    async fn remove_stray(&self, name: &str) -> Result<(), NetworkError> {
        self.host
            .remove_unmarked_namespace(name)
            .await
            .map_err(NetworkError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: &str) -> u32 {
        customer_group(&CustomerId::parse(id).unwrap())
    }

    #[test]
    fn a_customers_group_is_stable_non_zero_and_differs_between_customers() {
        assert_eq!(group("acme"), group("acme"));
        assert_ne!(group("acme"), group("acme2"));
        assert_ne!(group("a"), group("b"));
        // FNV-1a 32 reference value.
        assert_eq!(group("a"), 0xe40c_292c);
        for id in ["x", "customer_1", "~!@#$%^&*()"] {
            assert_ne!(group(id), 0);
        }
    }
}
