//! The host's nftables tables for one metald bridge, applied with `nft -f`
//! in the host namespace. Both are named `metald_<bridge>` (see
//! [`table_name`]):
//!
//! * `bridge metald_<bridge>` (isolation `customer` or `vm`; absent with
//!   `none`):
//!   - set `ports`: the bridge's VM ports (host veths `mv<10 hex>`);
//!   - set `same` (`customer` only): `G . G` for every device group `G` a
//!     port carries — a customer's veths share a group;
//!   - chain `forward` (hook forward, so it sees every egress port of a
//!     flooded frame, ARP and neighbour discovery included): a frame from
//!     one VM port to another passes only if the two groups are in `same`;
//!     the drop rule's counter is commented `customer` (or `vm`, where every
//!     such frame is dropped);
//!   - chain `from_host` (hook output): the host never hands a VM a packet
//!     whose source lies in the VMs' subnet but is not the gateway, so it
//!     does not route between VMs (`routed-ipv4`, `routed-ipv6`).
//! * `inet metald_<bridge>`:
//!   - chain `forward`: from the bridge to any other interface, accepted
//!     with egress (plus answers back in) and dropped without (`egress`,
//!     `ingress`), whatever `ip_forward` says;
//!   - chain `postrouting` (egress only): IPv4 masquerade of the subnet out
//!     of every interface but the bridge;
//!   - chain `input` (with `protect_host`): from the bridge the host accepts
//!     only answers, ICMP echo, neighbour discovery, DHCP, DHCPv6 and DNS
//!     (`host`).
//!
//! Membership is keyed by the veths themselves: a VM's group is the host
//! veth's device group, set when the veth is made; a port is put in the
//! sets just before it joins the bridge (an unlisted port is not judged),
//! and the two sets are recomputed from the bridge's live ports after
//! every interface change (one transaction: flush and refill). A veth that vanished without metald
//! (a crash) therefore leaves at most a name and a group in the sets until
//! the next change, naming no device; [`rebuild`] at start-up writes the
//! whole tables from the live ports, so VMs that outlived metald keep their
//! isolation.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::Arc;

use rtnetlink::Handle;

use crate::{Inner, Isolation, NetworkConfig, names, netns, nl};

/// Name of both tables of a bridge: `metald_` and the bridge name with
/// every character but ASCII letters and digits written `_<hex>`, so two
/// bridges never share a table.
pub fn table_name(bridge: &str) -> String {
    let mut t = String::from("metald_");
    for b in bridge.bytes() {
        if b.is_ascii_alphanumeric() {
            t.push(b as char);
        } else {
            let _ = write!(t, "_{b:02x}");
        }
    }
    t
}

/// Deletes both of `bridge`'s tables (a bridge being retired); missing
/// tables are not an error. Runs `nft` in the calling thread's namespace.
pub fn remove_tables(bridge: &str) -> Result<(), String> {
    check_bridge_name(bridge)?;
    let t = table_name(bridge);
    apply(&format!(
        "table bridge {t}\ndelete table bridge {t}\ntable inet {t}\ndelete table inet {t}\n"
    ))
}

/// Bridge names go into `nft` input as quoted strings: only these
/// characters are allowed.
pub(crate) fn check_bridge_name(name: &str) -> Result<(), String> {
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        Ok(())
    } else {
        Err(format!(
            "bridge name {name:?}: only ASCII letters, digits, '-', '_' and '.'"
        ))
    }
}

/// A VM port of the bridge.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Member {
    /// The host veth (`mv<10 hex>`).
    pub(crate) veth: String,
    /// Its device group.
    pub(crate) group: u32,
}

/// What the rules are made from.
pub(crate) struct Layout<'a> {
    pub(crate) config: &'a NetworkConfig,
    pub(crate) gateway_v4: Ipv4Addr,
    pub(crate) gateway_v6: Ipv6Addr,
}

fn bridge_table(l: &Layout, t: &str) -> String {
    let c = l.config;
    let (same_set, judge) = match c.isolation {
        Isolation::None => return String::new(),
        Isolation::Customer => (
            "  set same { type devgroup . devgroup; }\n",
            "    meta iifgroup . meta oifgroup @same accept\n\
             \x20   counter drop comment \"customer\"\n",
        ),
        Isolation::Vm => ("", "    counter drop comment \"vm\"\n"),
    };
    let (v4, v6) = (c.ipv4_subnet.trunc(), c.ipv6_subnet.trunc());
    let (g4, g6) = (l.gateway_v4, l.gateway_v6);
    format!(
        "table bridge {t} {{\n\
         \x20 set ports {{ type ifname; }}\n\
         {same_set}\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority 0; policy accept;\n\
         \x20   iifname != @ports accept\n\
         \x20   oifname != @ports accept\n\
         {judge}\
         \x20 }}\n\
         \x20 chain from_host {{\n\
         \x20   type filter hook output priority 0; policy accept;\n\
         \x20   oifname != @ports accept\n\
         \x20   ether type ip ip saddr {v4} ip saddr != {g4} counter drop comment \"routed-ipv4\"\n\
         \x20   ether type ip6 ip6 saddr {v6} ip6 saddr != {g6} counter drop comment \"routed-ipv6\"\n\
         \x20 }}\n\
         }}\n"
    )
}

fn inet_table(l: &Layout, t: &str) -> String {
    let c = l.config;
    let br = &c.bridge;
    let mut s = format!(
        "table inet {t} {{\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority 0; policy accept;\n"
    );
    if c.egress {
        let _ = write!(
            s,
            "    iifname \"{br}\" oifname != \"{br}\" accept\n\
             \x20   oifname \"{br}\" iifname != \"{br}\" ct state established,related accept\n"
        );
    } else {
        let _ = writeln!(
            s,
            "    iifname \"{br}\" oifname != \"{br}\" counter drop comment \"egress\""
        );
    }
    let _ = write!(
        s,
        "    oifname \"{br}\" iifname != \"{br}\" counter drop comment \"ingress\"\n\
         \x20 }}\n"
    );
    if c.egress {
        let _ = write!(
            s,
            "  chain postrouting {{\n\
             \x20   type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   ip saddr {} oifname != \"{br}\" masquerade\n\
             \x20 }}\n",
            c.ipv4_subnet.trunc()
        );
    }
    if c.protect_host {
        let _ = write!(
            s,
            "  chain input {{\n\
             \x20   type filter hook input priority 0; policy accept;\n\
             \x20   iifname != \"{br}\" accept\n\
             \x20   ct state established,related accept\n\
             \x20   icmp type echo-request accept\n\
             \x20   icmpv6 type {{ echo-request, nd-router-solicit, nd-neighbor-solicit, \
             nd-neighbor-advert, mld-listener-report, mld2-listener-report }} accept\n\
             \x20   udp dport {{ 53, 67, 547 }} accept\n\
             \x20   tcp dport 53 accept\n\
             \x20   counter drop comment \"host\"\n\
             \x20 }}\n"
        );
    }
    s.push_str("}\n");
    s
}

/// The `nft -f` lines that refill the sets of the bridge table with
/// `members` (nothing with isolation `none`). Group 0 is nobody's: it is
/// never put in `same`.
pub(crate) fn members_update(isolation: Isolation, t: &str, members: &[Member]) -> String {
    if isolation == Isolation::None {
        return String::new();
    }
    let mut s = format!("flush set bridge {t} ports\n");
    let ports: BTreeSet<&str> = members.iter().map(|m| m.veth.as_str()).collect();
    if !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
        let _ = writeln!(s, "add element bridge {t} ports {{ {} }}", list.join(", "));
    }
    if isolation == Isolation::Customer {
        let _ = writeln!(s, "flush set bridge {t} same");
        let groups: BTreeSet<u32> = members
            .iter()
            .map(|m| m.group)
            .filter(|g| *g != 0)
            .collect();
        if !groups.is_empty() {
            let list: Vec<String> = groups.iter().map(|g| format!("{g} . {g}")).collect();
            let _ = writeln!(s, "add element bridge {t} same {{ {} }}", list.join(", "));
        }
    }
    s
}

/// The whole `nft -f` input for the bridge's tables: each is replaced (the
/// `table` line first makes the delete succeed when it is missing), in one
/// transaction, so the rules are never half there.
pub(crate) fn ruleset(l: &Layout, members: &[Member]) -> String {
    let t = table_name(&l.config.bridge);
    let mut s = String::new();
    for family in ["bridge", "inet"] {
        let _ = write!(s, "table {family} {t}\ndelete table {family} {t}\n");
    }
    s.push_str(&bridge_table(l, &t));
    s.push_str(&members_update(l.config.isolation, &t, members));
    s.push_str(&inet_table(l, &t));
    s
}

/// The VM ports of `bridge` (by metald's veth naming) and their groups;
/// none when the bridge is gone.
async fn members(h: &Handle, bridge: &str) -> Result<Vec<Member>, String> {
    let Some(br) = nl::get(h, bridge).await? else {
        return Ok(Vec::new());
    };
    // A dump can be cut short by links changing under it (other
    // interfaces being made): try again.
    let mut links = nl::dump(h).await;
    for _ in 0..3 {
        if links.is_ok() {
            break;
        }
        links = nl::dump(h).await;
    }
    let mut found: Vec<Member> = links?
        .into_iter()
        .filter(|l| l.controller == Some(br.index) && names::is_veth_name(&l.name))
        .map(|l| Member {
            veth: l.name,
            group: l.group,
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Writes both tables from the bridge's live ports. Called by
/// [`crate::Host::setup`] on a thread of the host namespace.
pub(crate) async fn rebuild(l: &Layout<'_>, h: &Handle) -> Result<(), String> {
    let input = ruleset(l, &members(h, &l.config.bridge).await?);
    tokio::task::spawn_blocking(move || apply(&input))
        .await
        .map_err(|e| format!("writing the bridge's nftables tables: {e}"))?
}

/// Refills the sets from the bridge's live ports (plus `coming`, a port
/// about to be made, so it is judged from its first frame) after an
/// interface was made or removed, or before one is made; rebuilds the
/// tables if they are gone.
pub(crate) async fn sync(inner: &Arc<Inner>, coming: Option<Member>) -> Result<(), String> {
    if inner.config.isolation == Isolation::None {
        return Ok(());
    }
    let _guard = inner.rules.lock().await;
    let inner = inner.clone();
    netns::on_thread("updating the bridge's nftables sets", move || async move {
        crate::plumbing::join_host(&inner)?;
        let h = nl::connect()?;
        let mut found = members(&h, &inner.config.bridge).await?;
        found.extend(coming);
        let t = table_name(&inner.config.bridge);
        if apply(&members_update(inner.config.isolation, &t, &found)).is_ok() {
            return Ok(());
        }
        tracing::warn!(table = %t, "the bridge's nftables table is gone or damaged; rebuilding it");
        let l = Layout {
            config: &inner.config,
            gateway_v4: inner.gateway_v4,
            gateway_v6: inner.gateway_v6,
        };
        apply(&ruleset(&l, &found))
    })
    .await
}

/// Runs `nft -f -` with `input` from the calling thread (and so in its
/// network namespace).
pub(crate) fn apply(input: &str) -> Result<(), String> {
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]);
    let out = crate::tc::run_fed(cmd, input).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            "nft (nftables) is not installed: VM interfaces need its anti-spoofing \
             and isolation rules"
                .to_string()
        }
        _ => format!("running nft: {e}"),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(crate::tc::failure("nft", &out))
    }
}

#[cfg(test)]
mod tests;
