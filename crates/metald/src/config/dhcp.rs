//! How guests learn their addresses: metald's DHCPv4 / router advertisement
//! server on the host bridge (`UNKEY_METALD_NETWORK_DHCP*`, DNS servers from
//! `UNKEY_METALD_NETWORK_DNS`), and whether the addresses also go on the
//! kernel command line (`UNKEY_METALD_NETWORK_KERNEL_ARGS`).

use std::net::IpAddr;

use clap::Args;

/// A comma-separated list of DNS server addresses; empty is none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsServers(pub Vec<IpAddr>);

fn dns_servers(raw: &str) -> Result<DnsServers, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("{s:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(DnsServers)
}

#[derive(Debug, Clone, Args)]
pub struct DhcpArgs {
    /// Answer DHCPv4 and send IPv6 router advertisements on the host
    /// bridge (dnsmasq, Debian package dnsmasq-base), so guests configure
    /// their leased addresses with a DHCP client and SLAAC.
    #[arg(
        long,
        env = "UNKEY_METALD_NETWORK_DHCP",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub network_dhcp: bool,

    /// DNS servers told to guests (DHCPv4 option 6 for the IPv4 ones, the
    /// router advertisement's RDNSS for the IPv6 ones), comma-separated.
    /// Empty (the default): no DNS servers are sent.
    #[arg(long, env = "UNKEY_METALD_NETWORK_DNS", default_value = "", value_parser = dns_servers)]
    pub network_dns: DnsServers,

    /// DHCPv4 lease time in seconds (at least 120); guests renew at half.
    #[arg(
        long,
        env = "UNKEY_METALD_NETWORK_DHCP_LEASE_TIME",
        default_value_t = 3600,
        value_parser = clap::value_parser!(u32).range(120..)
    )]
    pub network_dhcp_lease_time: u32,

    /// Also put each VM's addresses on its kernel command line (`ip=`,
    /// `metald.ip6=`, `metald.gw6=`), for guests without a DHCP client.
    /// Applies to VMs created from then on.
    #[arg(
        long,
        env = "UNKEY_METALD_NETWORK_KERNEL_ARGS",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub network_kernel_args: bool,
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn dhcp_is_on_with_no_dns_and_the_kernel_args_kept_by_default() {
        let c = Config::try_parse_from(["metald"]).unwrap().dhcp;
        assert!(c.network_dhcp && c.network_kernel_args);
        assert!(c.network_dns.0.is_empty());
        assert_eq!(c.network_dhcp_lease_time, 3600);
    }

    #[test]
    fn dns_servers_are_a_comma_separated_list_of_both_families() {
        let c = Config::try_parse_from([
            "metald",
            "--network-dns",
            "10.0.0.53, fd00::53",
            "--network-kernel-args",
            "false",
        ])
        .unwrap()
        .dhcp;
        let want: Vec<std::net::IpAddr> =
            vec!["10.0.0.53".parse().unwrap(), "fd00::53".parse().unwrap()];
        assert_eq!(c.network_dns.0, want);
        assert!(!c.network_kernel_args);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for args in [
            ["metald", "--network-dns", "10.0.0.300"],
            ["metald", "--network-dhcp-lease-time", "60"],
        ] {
            let e = Config::try_parse_from(args).unwrap_err().to_string();
            let var = if args[1].ends_with("dns") {
                "UNKEY_METALD_NETWORK_DNS"
            } else {
                "UNKEY_METALD_NETWORK_DHCP_LEASE_TIME"
            };
            assert!(e.contains(var), "{e}");
        }
    }
}
