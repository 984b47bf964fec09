//! Anti-spoofing: what a guest may send, as an nftables `bridge` table in
//! the interface's namespace, applied with the `nft` binary.
//!
//! The table hooks the namespace bridge's prerouting and judges only frames
//! that enter through the TAP (from the guest): the VM's MAC as source;
//! ARP with its MAC and its address (or 0.0.0.0 for probes); IPv4 from its
//! address, or a DHCP client's 0.0.0.0:68 → :67; IPv6 from its address, the
//! EUI-64 link-local address of its MAC, or `::` (DAD); neighbour
//! advertisements only for those addresses; never a router advertisement or
//! a DHCP/DHCPv6 server's reply. Everything else is dropped. Every drop rule
//! has a counter and a comment naming it (`nft list table bridge
//! metald_guard` in the namespace shows them).
//!
//! tc flower would have done the same on the TAP's ingress, but
//! `cls_flower` and `act_gact` (the `drop` action) are optional kernel
//! parts that hosts lack, while the bridge family of nftables is common.
//! The tx rate limit's ingress redirect to `ifb0` is unaffected: a frame
//! comes back from the ifb into the TAP's receive path and reaches the
//! bridge, and these rules, after shaping.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Name of the table (one per namespace, so one per VM interface).
pub(crate) const TABLE: &str = "metald_guard";

/// The link-local address the kernel gives a NIC with this MAC (EUI-64:
/// `ff:fe` in the middle, the universal/local bit flipped).
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    let m = mac;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The IPv4 rules; without a leased address only DHCP clients pass.
fn v4_rules(ipv4: Option<Ipv4Addr>) -> String {
    let own = ipv4.map_or_else(String::new, |a| format!("{a}, "));
    let mut r = format!(
        "    ether type arp arp saddr ip != {{ {own}0.0.0.0 }} counter drop comment \"arp-ip\"\n\
         \x20   ether type arp accept\n\
         \x20   ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept\n"
    );
    match ipv4 {
        Some(a) => r.push_str(&format!(
            "    ether type ip ip saddr != {a} counter drop comment \"ipv4-source\"\n"
        )),
        None => r.push_str("    ether type ip counter drop comment \"ipv4-source\"\n"),
    }
    r.push_str(
        "    ether type ip udp sport 67 counter drop comment \"dhcp-server\"\n\
         \x20   ether type ip accept\n",
    );
    r
}

/// The IPv6 rules: own address, link-local of the MAC, `::` for DAD.
fn v6_rules(mac: [u8; 6], ipv6: Option<Ipv6Addr>) -> String {
    let ll = link_local(mac);
    let mine: Vec<Ipv6Addr> = ipv6.into_iter().chain([ll]).collect();
    let sources = mine
        .iter()
        .map(|a| a.to_string())
        .chain(["::".to_string()])
        .collect::<Vec<_>>()
        .join(", ");
    // The target of a neighbour advertisement: bytes 8..24 of the ICMPv6
    // header (nft 1.0 has no name for it).
    let targets = mine
        .iter()
        .map(|a| format!("0x{:032x}", u128::from(*a)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "    ether type ip6 icmpv6 type nd-router-advert counter drop comment \"router-advert\"\n\
         \x20   ether type ip6 udp sport 547 counter drop comment \"dhcpv6-server\"\n\
         \x20   ether type ip6 ip6 saddr != {{ {sources} }} counter drop comment \"ipv6-source\"\n\
         \x20   ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 != {{ {targets} }} \
         counter drop comment \"neighbour-advert\"\n\
         \x20   ether type ip6 accept\n"
    )
}

/// The `nft -f` input that (re)places the table: creating it first makes
/// the delete succeed when it is missing, and the whole input is one
/// transaction, so the rules are never half there.
pub(crate) fn ruleset(
    tap: &str,
    mac: [u8; 6],
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
) -> String {
    let text = mac_text(mac);
    format!(
        "table bridge {TABLE}\n\
         delete table bridge {TABLE}\n\
         table bridge {TABLE} {{\n\
         \x20 chain from_guest {{\n\
         \x20   type filter hook prerouting priority -200; policy accept;\n\
         \x20   iifname != \"{tap}\" accept\n\
         \x20   ether saddr != {text} counter drop comment \"mac\"\n\
         \x20   ether type arp arp saddr ether != {text} counter drop comment \"arp-mac\"\n\
         {}{}\
         \x20   counter drop comment \"other\"\n\
         \x20 }}\n\
         }}\n",
        v4_rules(ipv4),
        v6_rules(mac, ipv6),
    )
}

/// Runs `nft -f -` with `input` in the calling thread's namespace.
pub(crate) fn apply(input: &str) -> Result<(), String> {
    crate::host_rules::apply(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

    #[test]
    fn the_link_local_address_is_the_eui64_of_the_mac() {
        assert_eq!(
            link_local(MAC),
            "fe80::11:22ff:fe33:4455".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            link_local([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn a_dual_stack_ruleset_allows_only_the_vms_own_sources() {
        let r = ruleset(
            "tap0",
            MAC,
            Some("10.1.2.3".parse().unwrap()),
            Some("fd00::5".parse().unwrap()),
        );
        let lines: Vec<&str> = r.lines().map(str::trim).collect();
        assert_eq!(lines[0], "table bridge metald_guard");
        assert_eq!(lines[1], "delete table bridge metald_guard");
        for want in [
            "iifname != \"tap0\" accept",
            "ether saddr != 02:11:22:33:44:55 counter drop comment \"mac\"",
            "ether type arp arp saddr ether != 02:11:22:33:44:55 counter drop comment \"arp-mac\"",
            "ether type arp arp saddr ip != { 10.1.2.3, 0.0.0.0 } counter drop comment \"arp-ip\"",
            "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
            "ether type ip ip saddr != 10.1.2.3 counter drop comment \"ipv4-source\"",
            "ether type ip udp sport 67 counter drop comment \"dhcp-server\"",
            "ether type ip6 icmpv6 type nd-router-advert counter drop comment \"router-advert\"",
            "ether type ip6 udp sport 547 counter drop comment \"dhcpv6-server\"",
            "ether type ip6 ip6 saddr != { fd00::5, fe80::11:22ff:fe33:4455, :: } counter drop comment \"ipv6-source\"",
            "ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 != { \
             0xfd000000000000000000000000000005, 0xfe80000000000000001122fffe334455 } \
             counter drop comment \"neighbour-advert\"",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{r}");
        }
        // The catch-all drop is the chain's last rule.
        assert_eq!(
            lines[lines.len() - 3],
            "counter drop comment \"other\"",
            "{r}"
        );
    }

    #[test]
    fn the_dhcp_client_exception_comes_before_the_ipv4_source_check() {
        let r = ruleset("tap0", MAC, Some("10.1.2.3".parse().unwrap()), None);
        let dhcp = r.find("ip saddr 0.0.0.0 udp sport 68").unwrap();
        let src = r.find("comment \"ipv4-source\"").unwrap();
        let server = r.find("comment \"dhcp-server\"").unwrap();
        assert!(dhcp < src && src < server, "{r}");
    }

    #[test]
    fn without_leases_only_dhcp_link_local_and_dad_sources_pass() {
        let r = ruleset("tap0", MAC, None, None);
        assert!(
            r.contains("ether type ip counter drop comment \"ipv4-source\""),
            "{r}"
        );
        assert!(r.contains("arp saddr ip != { 0.0.0.0 }"), "{r}");
        assert!(
            r.contains("ip6 saddr != { fe80::11:22ff:fe33:4455, :: }"),
            "{r}"
        );
        assert!(
            r.contains("@th,64,128 != { 0xfe80000000000000001122fffe334455 }"),
            "{r}"
        );
    }
}
