//! VM networking settings (`UNKEY_METALD_NETWORK_*`): the host bridge, the
//! subnets, isolation between VMs, egress and what guests reach on the host.

use clap::{Args, ValueEnum};

/// Which VMs on the bridge reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Isolation {
    /// A customer's VMs reach each other; other customers' VMs are
    /// unreachable (layer 2 and layer 3).
    Customer,
    /// No VM reaches another.
    Vm,
    /// No filtering between VMs.
    None,
}

#[derive(Debug, Clone, Args)]
pub struct NetworkArgs {
    /// Give VMs network interfaces (a namespace, veth and TAP per
    /// interface on a host bridge). When false, CreateVm with an interface
    /// answers unimplemented.
    #[arg(
        id = "network_enabled",
        long = "network-enabled",
        env = "UNKEY_METALD_NETWORK_ENABLED",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub enabled: bool,

    /// Host bridge VMs attach to (created if missing).
    #[arg(
        id = "network_bridge",
        long = "network-bridge",
        env = "UNKEY_METALD_NETWORK_BRIDGE",
        default_value = "metald0"
    )]
    pub bridge: String,

    /// IPv4 subnet VMs get addresses from; the first host address is the
    /// gateway on the bridge.
    #[arg(
        id = "network_ipv4_subnet",
        long = "network-ipv4-subnet",
        env = "UNKEY_METALD_NETWORK_IPV4_SUBNET",
        default_value = "10.100.0.0/16"
    )]
    pub ipv4_subnet: ipnet::Ipv4Net,

    /// IPv6 subnet VMs get addresses from; `::1` is the gateway.
    #[arg(
        id = "network_ipv6_subnet",
        long = "network-ipv6-subnet",
        env = "UNKEY_METALD_NETWORK_IPV6_SUBNET",
        default_value = "fd6d:6574:616c:6400::/64"
    )]
    pub ipv6_subnet: ipnet::Ipv6Net,

    /// Which VMs reach each other: `customer` (a customer's own VMs),
    /// `vm` (none) or `none` (all). VMs always reach the gateway.
    #[arg(
        id = "network_isolation",
        long = "network-isolation",
        env = "UNKEY_METALD_NETWORK_ISOLATION",
        value_enum
    )]
    pub isolation: Option<Isolation>,

    /// Deprecated: `true` means UNKEY_METALD_NETWORK_ISOLATION=vm.
    #[arg(
        id = "network_isolate_vms",
        long = "network-isolate-vms",
        env = "UNKEY_METALD_NETWORK_ISOLATE_VMS",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub isolate_vms: Option<bool>,

    /// Route VM traffic to the outside (IP forwarding, IPv4 masquerade,
    /// IPv6 routed). When false, forwarding between the bridge and any
    /// other interface is dropped.
    #[arg(
        id = "network_egress",
        long = "network-egress",
        env = "UNKEY_METALD_NETWORK_EGRESS",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub egress: bool,

    /// Guests reach only ICMP echo, neighbour discovery, DHCP, DHCPv6 and
    /// DNS on the host (the gateway), plus answers to the host's own
    /// connections; metald's API and every other host service are closed
    /// to them.
    #[arg(
        id = "network_protect_host",
        long = "network-protect-host",
        env = "UNKEY_METALD_NETWORK_PROTECT_HOST",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub protect_host: bool,
}

impl NetworkArgs {
    /// The isolation in force, and a deprecation warning to log when the
    /// old variable chose it. An explicit UNKEY_METALD_NETWORK_ISOLATION
    /// wins over the old variable.
    pub fn isolation(&self) -> (Isolation, Option<String>) {
        match (self.isolation, self.isolate_vms) {
            (Some(i), None) => (i, None),
            (Some(i), Some(_)) => (
                i,
                Some(
                    "UNKEY_METALD_NETWORK_ISOLATE_VMS is deprecated and ignored: \
                     UNKEY_METALD_NETWORK_ISOLATION is set"
                        .into(),
                ),
            ),
            (None, Some(true)) => (
                Isolation::Vm,
                Some(
                    "UNKEY_METALD_NETWORK_ISOLATE_VMS is deprecated: use \
                     UNKEY_METALD_NETWORK_ISOLATION=vm"
                        .into(),
                ),
            ),
            (None, Some(false)) => (
                Isolation::Customer,
                Some(
                    "UNKEY_METALD_NETWORK_ISOLATE_VMS is deprecated: use \
                     UNKEY_METALD_NETWORK_ISOLATION (default customer)"
                        .into(),
                ),
            ),
            (None, None) => (Isolation::Customer, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        network: NetworkArgs,
    }

    fn parse(args: &[&str]) -> NetworkArgs {
        let mut all = vec!["metald"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().network
    }

    #[test]
    fn isolation_is_by_customer_unless_chosen() {
        let n = parse(&[]);
        assert_eq!(n.isolation(), (Isolation::Customer, None));
        assert!(n.protect_host && !n.egress && n.enabled);
        for (v, want) in [
            ("customer", Isolation::Customer),
            ("vm", Isolation::Vm),
            ("none", Isolation::None),
        ] {
            assert_eq!(parse(&["--network-isolation", v]).isolation(), (want, None));
        }
        assert!(
            Cli::try_parse_from(["metald", "--network-isolation", "tenant"]).is_err(),
            "unknown modes are refused"
        );
    }

    #[test]
    fn the_old_isolate_vms_switch_is_an_alias_for_vm_with_a_warning() {
        let (mode, warning) = parse(&["--network-isolate-vms", "true"]).isolation();
        assert_eq!(mode, Isolation::Vm);
        assert!(warning.unwrap().contains("deprecated"));
        let (mode, warning) = parse(&["--network-isolate-vms", "false"]).isolation();
        assert_eq!(mode, Isolation::Customer);
        assert!(warning.is_some());
        let (mode, warning) = parse(&[
            "--network-isolate-vms",
            "true",
            "--network-isolation",
            "none",
        ])
        .isolation();
        assert_eq!(mode, Isolation::None, "the new setting wins");
        assert!(warning.unwrap().contains("ignored"));
    }
}
