//! A VM's network interfaces: what the client asked for ([`NicSpec`],
//! validated here) and what metald attached ([`NicAttachment`], filled by
//! the service from IPAM and the network adapter).
//!
//! One interface per VM for now: its namespace holds one TAP the VMM uses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::Mac;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Most interfaces a VM may have today.
pub const MAX_NICS: usize = 1;

/// An interface as the client described it, not yet validated.
#[derive(Debug, Clone, Default)]
pub struct NicInput {
    pub id: String,
    pub mac: String,
    pub ipv4_address: String,
    pub ipv6_address: String,
    /// `NetworkMode`: 0 unspecified (dual stack), 1 dual stack, 2 IPv4
    /// only, 3 IPv6 only.
    pub mode: i32,
    /// Bytes per second; 0 is unlimited.
    pub rx_bandwidth: i64,
    pub tx_bandwidth: i64,
}

/// A validated interface request. Only metald-core makes one (from a
/// client's [`NicInput`], judged); other crates read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NicSpec {
    pub id: String,
    /// Client-chosen MAC, else metald derives one.
    pub mac: Option<Mac>,
    /// Client-chosen static addresses, else IPAM picks.
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub want_v4: bool,
    pub want_v6: bool,
    pub rx_bytes_per_sec: u64,
    pub tx_bytes_per_sec: u64,
    /// What metald attached; absent until CreateVm finished.
    #[serde(default)]
    pub attachment: Option<NicAttachment>,
}

/// An interface as metald wired it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAttachment {
    pub mac: Mac,
    pub ipv4: Option<(Ipv4Addr, u8)>,
    pub gateway4: Option<Ipv4Addr>,
    pub ipv6: Option<(Ipv6Addr, u8)>,
    pub gateway6: Option<Ipv6Addr>,
    /// Network namespace the VMM runs in.
    pub netns: String,
    /// TAP device inside the namespace.
    pub tap: String,
    /// Host side of the veth pair, on the host bridge.
    pub host_veth: String,
    /// Whether the addresses also go on the guest's kernel command line
    /// ([`NicAttachment::kernel_args`]), for guests without a DHCP client
    /// and SLAAC. Rows written before the setting existed had them.
    #[serde(default = "yes")]
    pub cmdline: bool,
}

fn yes() -> bool {
    true
}

impl NicAttachment {
    /// Kernel arguments telling the guest its addresses: the kernel's own
    /// `ip=` for IPv4, and `metald.ip6=` / `metald.gw6=` for IPv6 (the
    /// kernel has no IPv6 equivalent; metald's test guest applies them,
    /// other guests can read /proc/cmdline or use SLAAC). Empty when
    /// [`NicAttachment::cmdline`] is off.
    pub fn kernel_args(&self) -> String {
        let mut args = Vec::new();
        if !self.cmdline {
            return String::new();
        }
        if let Some((ip, prefix)) = self.ipv4 {
            let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0));
            let gw = self.gateway4.map(|g| g.to_string()).unwrap_or_default();
            args.push(format!("ip={ip}::{gw}:{mask}::eth0:off"));
        }
        if let Some((ip, prefix)) = self.ipv6 {
            args.push(format!("metald.ip6={ip}/{prefix}"));
            if let Some(gw) = self.gateway6 {
                args.push(format!("metald.gw6={gw}"));
            }
        }
        args.join(" ")
    }
}

/// Judges the interfaces of a CreateVm request.
pub fn check_nics(nics: &[NicInput]) -> Result<Vec<NicSpec>> {
    if nics.len() > MAX_NICS {
        return Err(Error::invalid(
            "config.network",
            format!(
                "at most {MAX_NICS} interface per VM is supported, got {}",
                nics.len()
            ),
        ));
    }
    let mut out: Vec<NicSpec> = Vec::new();
    for (i, n) in nics.iter().enumerate() {
        let nic = check_nic(i, n)?;
        if out.iter().any(|o| o.id == nic.id) {
            return Err(Error::invalid(
                format!("config.network[{i}].id"),
                format!("duplicate interface id {:?}", nic.id),
            ));
        }
        out.push(nic);
    }
    Ok(out)
}

/// Judges interface `i` on its own.
fn check_nic(i: usize, n: &NicInput) -> Result<NicSpec> {
    let f = |name: &str| format!("config.network[{i}].{name}");
    let id = if n.id.is_empty() {
        format!("eth{i}")
    } else {
        n.id.clone()
    };
    if id.len() > 32
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::invalid(
            f("id"),
            "must be 1..=32 characters of letters, digits, '-' and '_'",
        ));
    }
    let mac = if n.mac.is_empty() {
        None
    } else {
        Some(Mac::parse(&n.mac).map_err(|r| Error::invalid(f("mac_address"), r))?)
    };
    let (want_v4, want_v6) = match n.mode {
        0 | 1 => (true, true),
        2 => (true, false),
        3 => (false, true),
        m => {
            return Err(Error::invalid(
                f("mode"),
                format!("unknown network mode {m}"),
            ));
        }
    };
    let ipv4 = address::<Ipv4Addr>(&n.ipv4_address, &f("ipv4_config.address"), "IPv4")?;
    let ipv6 = address::<Ipv6Addr>(&n.ipv6_address, &f("ipv6_config.address"), "IPv6")?;
    if ipv4.is_some() && !want_v4 {
        return Err(Error::invalid(
            f("ipv4_config.address"),
            "given, but the mode is IPv6 only",
        ));
    }
    if ipv6.is_some() && !want_v6 {
        return Err(Error::invalid(
            f("ipv6_config.address"),
            "given, but the mode is IPv4 only",
        ));
    }
    let rate = |v: i64, name: &str| -> Result<u64> {
        u64::try_from(v)
            .map_err(|_| Error::invalid(f(name), format!("must not be negative, got {v}")))
    };
    Ok(NicSpec {
        id,
        mac,
        ipv4,
        ipv6,
        want_v4,
        want_v6,
        rx_bytes_per_sec: rate(n.rx_bandwidth, "rx_rate_limit.bandwidth")?,
        tx_bytes_per_sec: rate(n.tx_bandwidth, "tx_rate_limit.bandwidth")?,
        attachment: None,
    })
}

/// An optional address field: empty is none.
fn address<A: std::str::FromStr>(raw: &str, field: &str, family: &str) -> Result<Option<A>> {
    match raw {
        "" => Ok(None),
        a => a
            .parse::<A>()
            .map(Some)
            .map_err(|_| Error::invalid(field, format!("{a:?} is not an {family} address"))),
    }
}

/// The subnet `net/prefix` (a prefix past the family's length is clamped).
fn subnet(net: IpAddr, prefix: u8) -> IpNet {
    let max = if net.is_ipv4() { 32 } else { 128 };
    IpNet::new(net, prefix.min(max))
        .unwrap_or_else(|_| unreachable!("prefix clamped"))
        .trunc()
}

/// Every host address of `net/prefix` a VM may get: not the network
/// address, not the gateway (the first host), not the broadcast address.
pub fn v4_candidates(net: Ipv4Addr, prefix: u8) -> impl Iterator<Item = Ipv4Addr> {
    let n = subnet(IpAddr::V4(net), prefix);
    let IpNet::V4(v4) = n else {
        unreachable!("an IPv4 subnet")
    };
    v4.hosts()
        .filter(move |a| !candidates_exclude(n.network(), n.prefix_len(), IpAddr::V4(*a)))
}

/// The address SLAAC gives a NIC with this MAC in a /64: the prefix and
/// the modified EUI-64 interface identifier (`ff:fe` in the middle, the
/// universal/local bit flipped), as the guest's kernel forms it. `None`
/// for any other prefix length: SLAAC needs 64 interface bits.
pub fn eui64(net: Ipv6Addr, prefix: u8, mac: Mac) -> Option<Ipv6Addr> {
    if prefix != 64 {
        return None;
    }
    let m = mac.octets();
    let iid = u64::from_be_bytes([m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]);
    let high = u128::from(net) & !u128::from(u64::MAX);
    Some(Ipv6Addr::from(high | u128::from(iid)))
}

/// Host addresses of an IPv6 prefix in order, skipping `::` and the
/// gateway (`::1`); at most 2^24 are offered.
pub fn v6_candidates(net: Ipv6Addr, prefix: u8) -> impl Iterator<Item = Ipv6Addr> {
    let n = subnet(IpAddr::V6(net), prefix);
    let IpNet::V6(v6) = n else {
        unreachable!("an IPv6 subnet")
    };
    v6.hosts()
        .take(1 << 24)
        .filter(move |a| !candidates_exclude(n.network(), n.prefix_len(), IpAddr::V6(*a)))
}

/// Whether `addr` lies in `net/prefix` (same family).
pub fn contains(net: IpAddr, prefix: u8, addr: IpAddr) -> bool {
    subnet(net, prefix).contains(&addr)
}

/// Whether `addr` is one of the subnet addresses no VM may have: the
/// network address, the gateway (first host) or, for IPv4, the broadcast.
pub fn candidates_exclude(net: IpAddr, prefix: u8, addr: IpAddr) -> bool {
    let n = subnet(net, prefix);
    if !n.contains(&addr) {
        return true;
    }
    let gateway = match n.network() {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).wrapping_add(1))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(1))),
    };
    addr == n.network()
        || addr == gateway
        || (n.prefix_len() < 31 && net.is_ipv4() && addr == n.broadcast())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic() -> NicInput {
        NicInput::default()
    }

    #[test]
    fn defaults_to_one_dual_stack_interface() {
        let n = check_nics(&[nic()]).unwrap();
        assert_eq!(n[0].id, "eth0");
        assert!(n[0].want_v4 && n[0].want_v6 && n[0].mac.is_none());
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(NicInput, &str)> = vec![
            (
                NicInput {
                    mac: "zz:00:00:00:00:01".into(),
                    ..nic()
                },
                "config.network[0].mac_address",
            ),
            (
                NicInput {
                    mac: "02:00:00:00:00:+1".into(),
                    ..nic()
                },
                "config.network[0].mac_address",
            ),
            (
                NicInput {
                    mac: "01:00:00:00:00:01".into(),
                    ..nic()
                },
                "config.network[0].mac_address",
            ),
            (
                NicInput {
                    ipv4_address: "10.0.0.300".into(),
                    ..nic()
                },
                "config.network[0].ipv4_config.address",
            ),
            (
                NicInput {
                    ipv6_address: "fd00::zz".into(),
                    ..nic()
                },
                "config.network[0].ipv6_config.address",
            ),
            (
                NicInput {
                    ipv6_address: "fd00::5".into(),
                    mode: 2,
                    ..nic()
                },
                "config.network[0].ipv6_config.address",
            ),
            (NicInput { mode: 9, ..nic() }, "config.network[0].mode"),
            (
                NicInput {
                    rx_bandwidth: -1,
                    ..nic()
                },
                "config.network[0].rx_rate_limit.bandwidth",
            ),
        ];
        for (input, field) in cases {
            let err = check_nics(&[input]).unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
        let err = check_nics(&[nic(), nic()]).unwrap_err().to_string();
        assert!(err.contains("config.network"), "{err}");
    }

    #[test]
    fn candidates_skip_network_gateway_and_broadcast() {
        let v4: Vec<Ipv4Addr> = v4_candidates("10.9.0.0".parse().unwrap(), 29).collect();
        assert_eq!(v4.first(), Some(&"10.9.0.2".parse().unwrap()));
        assert_eq!(v4.last(), Some(&"10.9.0.6".parse().unwrap()));
        assert_eq!(v4.len(), 5);
        let mut v6 = v6_candidates("fd00:1::".parse().unwrap(), 64);
        assert_eq!(v6.next(), Some("fd00:1::2".parse().unwrap()));
        assert_eq!(v6_candidates("fd00:1::".parse().unwrap(), 120).count(), 254);
    }

    #[test]
    fn membership_and_reserved_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (n4, n6) = (ip("10.9.0.0"), ip("fd00:1::"));
        assert!(contains(n4, 24, ip("10.9.0.200")));
        assert!(!contains(n4, 24, ip("10.9.1.2")));
        assert!(!contains(n4, 24, ip("fd00:1::2")), "families never mix");
        assert!(contains(n6, 64, ip("fd00:1::ffff")));
        assert!(!contains(n6, 64, ip("fd00:2::2")));
        for reserved in ["10.9.0.0", "10.9.0.1", "10.9.0.255", "10.9.1.2"] {
            assert!(candidates_exclude(n4, 24, ip(reserved)), "{reserved}");
        }
        assert!(!candidates_exclude(n4, 24, ip("10.9.0.2")));
        for reserved in ["fd00:1::", "fd00:1::1"] {
            assert!(candidates_exclude(n6, 64, ip(reserved)), "{reserved}");
        }
        assert!(!candidates_exclude(
            n6,
            64,
            ip("fd00:1::ffff:ffff:ffff:ffff")
        ));
    }

    #[test]
    fn kernel_args_carry_both_families() {
        let a = NicAttachment {
            mac: Mac::parse("02:00:00:00:00:01").unwrap(),
            ipv4: Some(("10.9.0.2".parse().unwrap(), 16)),
            gateway4: Some("10.9.0.1".parse().unwrap()),
            ipv6: Some(("fd00:1::2".parse().unwrap(), 64)),
            gateway6: Some("fd00:1::1".parse().unwrap()),
            netns: "n".into(),
            tap: "tap0".into(),
            host_veth: "v".into(),
            cmdline: true,
        };
        assert_eq!(
            a.kernel_args(),
            "ip=10.9.0.2::10.9.0.1:255.255.0.0::eth0:off metald.ip6=fd00:1::2/64 metald.gw6=fd00:1::1"
        );
        let off = NicAttachment {
            cmdline: false,
            ..a
        };
        assert_eq!(off.kernel_args(), "", "no addresses on the command line");
    }

    #[test]
    fn attachments_stored_before_the_cmdline_setting_keep_their_kernel_args() {
        let old = r#"{"mac":"02:00:00:00:00:01","ipv4":["10.9.0.2",16],"gateway4":"10.9.0.1",
            "ipv6":null,"gateway6":null,"netns":"n","tap":"tap0","host_veth":"v"}"#;
        let a: NicAttachment = serde_json::from_str(old).unwrap();
        assert!(a.cmdline);
        assert!(
            a.kernel_args().starts_with("ip=10.9.0.2::"),
            "{}",
            a.kernel_args()
        );
    }

    #[test]
    fn the_slaac_address_is_the_eui64_of_the_mac_in_a_64() {
        let mac = Mac::parse("02:11:22:33:44:55").unwrap();
        let net: Ipv6Addr = "fd00:1:2:3::".parse().unwrap();
        assert_eq!(
            eui64(net, 64, mac),
            Some("fd00:1:2:3:11:22ff:fe33:4455".parse().unwrap())
        );
        // Host bits of the given network do not leak into the address.
        assert_eq!(
            eui64("fd00:1:2:3::9".parse().unwrap(), 64, mac),
            eui64(net, 64, mac)
        );
        let universal = Mac::parse("52:54:00:12:34:56").unwrap();
        assert_eq!(
            eui64(net, 64, universal),
            Some("fd00:1:2:3:5054:ff:fe12:3456".parse().unwrap())
        );
        for other in [48, 56, 80, 112, 120] {
            assert_eq!(eui64(net, other, mac), None, "/{other}");
        }
    }
}
