//! Adapts `metald_network::Host` (bridge, namespaces, veth, TAP) to the
//! service's `Network` port.

use async_trait::async_trait;
use metald_core::net::{NicAttachment, NicSpec};
use metald_core::ports::{Network, PortError, Subnets};
use metald_core::{CustomerId, Mac, VmId};
use metald_network::{Host, InterfaceSpec};

/// Host networking for metald's VMs.
pub struct HostNetwork {
    host: Host,
}

impl HostNetwork {
    pub fn new(host: Host) -> Self {
        HostNetwork { host }
    }
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
    ) -> Result<NicAttachment, PortError> {
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
        self.host.create_interface(&spec).await?;
        Ok(NicAttachment {
            mac,
            ipv4: None,
            gateway4: None,
            ipv6: None,
            gateway6: None,
            netns: names.netns,
            tap: names.tap,
            host_veth: names.host_veth,
        })
    }

    async fn detach(&self, vm: &VmId, index: usize) -> Result<(), PortError> {
        self.host
            .destroy_interface(&Host::names(vm.as_str(), index))
            .await
    }

    /// Only interfaces on this metald's bridge count: another metald on the
    /// host (with its own bridge) owns the rest. An interface whose host
    /// veth is gone cannot be placed and is left alone.
    async fn scan(&self) -> Result<Vec<(VmId, usize)>, PortError> {
        let bridge = &self.host.config().bridge;
        Ok(self
            .host
            .scan()
            .await?
            .into_iter()
            .filter(|o| on_bridge(&o.names.host_veth, bridge))
            .filter_map(|o| VmId::parse(&o.vm_id, "vm_id").ok().map(|id| (id, o.index)))
            .collect())
    }

    async fn strays(&self, known: &[(VmId, usize)]) -> Result<Vec<String>, PortError> {
        let known: Vec<(String, usize)> = known.iter().map(|(v, i)| (v.to_string(), *i)).collect();
        self.host.unmarked_namespaces(&known).await
    }

    async fn remove_stray(&self, name: &str) -> Result<(), PortError> {
        self.host.remove_unmarked_namespace(name).await
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
