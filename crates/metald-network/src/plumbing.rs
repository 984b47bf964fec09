//! The operations behind [`Host`]'s methods.

use std::collections::HashSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use nix::sched::{CloneFlags, setns};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkIfb, LinkMessageBuilder, LinkUnspec, LinkVeth,
};

use crate::names::{self, GUEST_VETH, IFB, NS_BRIDGE, TAP};
use crate::nl::{self, Link};
use crate::{
    Host, Inner, InterfaceSpec, NetNames, NetworkConfig, Owned, guard, host_rules, netns, tap, tc,
};

fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(format!("invalid interface name {name:?}"));
    }
    Ok(())
}

pub(crate) async fn setup(config: NetworkConfig) -> Result<Host, String> {
    validate_ifname(&config.bridge)?;
    host_rules::check_bridge_name(&config.bridge)?;
    if config.ipv4_subnet.prefix_len() > 30 {
        return Err(format!(
            "ipv4_subnet {} is too small for a gateway and VMs",
            config.ipv4_subnet
        ));
    }
    if config.ipv6_subnet.prefix_len() > 126 {
        return Err(format!(
            "ipv6_subnet {} is too small for a gateway and VMs",
            config.ipv6_subnet
        ));
    }
    let gateway_v4 = Ipv4Addr::from(u32::from(config.ipv4_subnet.network()) + 1);
    let gateway_v6 = Ipv6Addr::from(u128::from(config.ipv6_subnet.network()) + 1);
    let host_ns = netns::current_netns()?;

    let h = nl::connect()?;
    let bridge = ensure_bridge(&h, &config.bridge).await?;
    add_address(
        &h,
        &bridge,
        gateway_v4.into(),
        config.ipv4_subnet.prefix_len(),
    )
    .await?;
    add_address(
        &h,
        &bridge,
        gateway_v6.into(),
        config.ipv6_subnet.prefix_len(),
    )
    .await?;
    nl::up(&h, &config.bridge).await?;

    if config.egress {
        tokio::task::spawn_blocking(enable_forwarding)
            .await
            .map_err(|e| format!("enabling egress: {e}"))??;
    }
    let layout = host_rules::Layout {
        config: &config,
        gateway_v4,
        gateway_v6,
    };
    host_rules::rebuild(&layout, &h).await?;

    Ok(Host {
        inner: Arc::new(Inner {
            config,
            gateway_v4,
            gateway_v6,
            host_ns,
            locks: Default::default(),
            rules: Default::default(),
        }),
    })
}

async fn ensure_bridge(h: &Handle, name: &str) -> Result<Link, String> {
    if let Some(link) = nl::get(h, name).await? {
        return if link.kind == Some(InfoKind::Bridge) {
            Ok(link)
        } else {
            Err(format!("{name} exists and is not a bridge"))
        };
    }
    match h.link().add(LinkBridge::new(name).build()).execute().await {
        Ok(()) => {}
        // Made concurrently by someone else: fine if it is a bridge.
        Err(e) if nl::errno(&e) == Some(libc::EEXIST) => {}
        Err(e) => return Err(format!("creating bridge {name}: {e}")),
    }
    match nl::get(h, name).await? {
        Some(link) if link.kind == Some(InfoKind::Bridge) => Ok(link),
        Some(_) => Err(format!("{name} exists and is not a bridge")),
        None => Err(format!("bridge {name} vanished right after creation")),
    }
}

async fn add_address(h: &Handle, link: &Link, addr: IpAddr, prefix: u8) -> Result<(), String> {
    let mut req = h.address().add(link.index, addr, prefix);
    if addr.is_ipv6() {
        // The gateway must be usable at once, not tentative for DAD.
        let msg = req.message_mut();
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(e) if nl::errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(format!("adding {addr}/{prefix} to {}: {e}", link.name)),
    }
}

/// Egress needs the host to forward; what is forwarded is decided by the
/// bridge's `inet` table.
fn enable_forwarding() -> Result<(), String> {
    for (path, what) in [
        ("/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        (
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "net.ipv6.conf.all.forwarding",
        ),
    ] {
        std::fs::write(path, "1").map_err(|e| format!("setting {what}=1: {e}"))?;
    }
    Ok(())
}

/// Checks the ownership mark of an existing device.
fn check_owner(link: &Link, mark: &str, what: &str) -> Result<(), String> {
    match link.alias.as_deref() {
        None => Ok(()),
        Some(a) if a == mark => Ok(()),
        Some(a) => Err(format!(
            "{what} {} already exists and belongs to {a:?}, not {mark:?} \
             (a name collision, or not metald's device)",
            link.name
        )),
    }
}

fn check_spec(spec: &InterfaceSpec) -> Result<(), String> {
    names::validate_vm_id(&spec.vm_id)?;
    let expected = names::names(&spec.vm_id, spec.index);
    if spec.names != expected {
        return Err(format!(
            "names {:?} are not Host::names({:?}, {}) = {expected:?}",
            spec.names, spec.vm_id, spec.index
        ));
    }
    if spec.mac[0] & 1 != 0 || spec.mac == [0; 6] {
        return Err(format!("mac {:02x?} is not a unicast address", spec.mac));
    }
    Ok(())
}

pub(crate) fn join_host(inner: &Inner) -> Result<(), String> {
    setns(&inner.host_ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("joining the host network namespace: {e}"))
}

pub(crate) async fn create_interface(
    inner: Arc<Inner>,
    spec: &InterfaceSpec,
) -> Result<(), String> {
    check_spec(spec)?;
    let guard = inner.lock_name(&spec.names.netns).await;
    let spec = spec.clone();
    let what = format!("creating interface {} of {}", spec.index, spec.vm_id);
    let inner2 = inner.clone();
    netns::on_thread(&what, move || async move {
        // Runs on the worker thread, which may end up in the VM's namespace.
        let _guard = guard;
        let inner = inner2;
        join_host(&inner)?;
        let host = nl::connect()?;
        let mut created = false;
        let result = create_on_thread(&inner, &spec, &host, &mut created).await;
        if let Err(e) = &result
            && created
        {
            // Leave nothing half-made behind that this call made.
            tracing::warn!(netns = %spec.names.netns, error = %e, "interface creation failed; removing it");
            if let Ok(Some(l)) = nl::get(&host, &spec.names.host_veth).await {
                let _ = nl::del(&host, &l).await;
            }
            let _ = netns::delete(&spec.names.netns);
        }
        result
    })
    .await
    .map_err(|e| format!("{what}: {e}"))
}

/// Makes (or completes) one interface, as a sequence of idempotent
/// phases; the calling thread ends up inside the VM's namespace.
async fn create_on_thread(
    inner: &Inner,
    spec: &InterfaceSpec,
    host: &Handle,
    created: &mut bool,
) -> Result<(), String> {
    let n = &spec.names;
    let mark = names::mark(&spec.vm_id, spec.index);

    // Host side first: a foreign device fails us before we make anything.
    let bridge = nl::get(host, &inner.config.bridge).await?.ok_or_else(|| {
        format!(
            "host bridge {} is missing (was Host::setup run?)",
            inner.config.bridge
        )
    })?;
    let host_veth = nl::get(host, &n.host_veth).await?;
    if let Some(l) = &host_veth {
        check_owner(l, &mark, "host veth")?;
        if l.kind != Some(InfoKind::Veth) {
            return Err(format!("{} exists and is not a veth", l.name));
        }
    }

    // From here on this thread is inside the VM's namespace.
    *created = netns::enter_or_create(&n.netns)?;
    let ns = nl::connect()?;
    let br0 = ns_bridge(&ns, &n.netns, &mark).await?;
    veth_pair(host, &ns, n, host_veth.as_ref()).await?;
    nl::change(
        host,
        &n.host_veth,
        LinkUnspec::new_with_name(&n.host_veth)
            .alias(&mark)
            .link_group(spec.group)
            .controller(bridge.index)
            .up()
            .build(),
    )
    .await?;
    let host_veth = nl::get(host, &n.host_veth)
        .await?
        .ok_or_else(|| format!("{} vanished right after creation", n.host_veth))?;
    // Isolation is the bridge's nftables table; clear the port flag an
    // older metald may have set.
    h_set_isolated(host, &host_veth, false).await?;
    let tap_existed = tap_and_ports(&ns, spec, &br0).await?;
    guard::apply(&guard::ruleset(TAP, spec.mac, spec.ipv4, spec.ipv6))?;
    if tap_existed {
        tc::batch(&tc::clear_lines(TAP), true)?;
    }
    tc::batch(
        &tc::apply_lines(TAP, spec.rx_rate_bytes_per_sec, spec.tx_rate_bytes_per_sec),
        false,
    )
}

/// The namespace bridge, carrying the namespace's ownership mark.
async fn ns_bridge(ns: &Handle, netns: &str, mark: &str) -> Result<Link, String> {
    let br0 = match nl::get(ns, NS_BRIDGE).await? {
        Some(l) => {
            check_owner(&l, mark, &format!("bridge in namespace {netns}"))?;
            if l.kind != Some(InfoKind::Bridge) {
                return Err(format!("{NS_BRIDGE} in {netns} is not a bridge"));
            }
            l
        }
        None => {
            nl::add(ns, NS_BRIDGE, LinkBridge::new(NS_BRIDGE).build()).await?;
            nl::get(ns, NS_BRIDGE)
                .await?
                .ok_or_else(|| format!("{NS_BRIDGE} vanished right after creation"))?
        }
    };
    if br0.alias.is_none() {
        nl::change(
            ns,
            NS_BRIDGE,
            LinkUnspec::new_with_index(br0.index).alias(mark).build(),
        )
        .await?;
    }
    Ok(br0)
}

/// The veth pair: reused only when both ends are there.
async fn veth_pair(
    host: &Handle,
    ns: &Handle,
    n: &NetNames,
    host_veth: Option<&Link>,
) -> Result<(), String> {
    let veth0 = nl::get(ns, GUEST_VETH).await?;
    if host_veth.is_some() && veth0.is_some() {
        return Ok(());
    }
    if let Some(l) = &veth0 {
        nl::del(ns, l).await?;
    }
    if let Some(l) = host_veth {
        nl::del(host, l).await?;
    }
    // One request: host end here, peer created straight in the namespace.
    let ns_file = File::open(netns::netns_path(&n.netns))
        .map_err(|e| format!("opening namespace {}: {e}", n.netns))?;
    let peer = LinkUnspec::new_with_name(GUEST_VETH)
        .setns_by_fd(ns_file.as_raw_fd())
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(n.host_veth.clone())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    nl::add(
        host,
        &format!("veth pair {}/{GUEST_VETH}", n.host_veth),
        msg,
    )
    .await
}

/// The TAP (made by this thread and therefore in the namespace), the ifb
/// of a tx cap, and every port up on the namespace bridge. Whether the TAP
/// existed already (its tc state is then cleared first).
async fn tap_and_ports(ns: &Handle, spec: &InterfaceSpec, br0: &Link) -> Result<bool, String> {
    let netns = &spec.names.netns;
    let tap_existed = match nl::get(ns, TAP).await? {
        Some(l) if l.kind == Some(InfoKind::Tun) => true,
        Some(_) => return Err(format!("{TAP} in {netns} is not a TAP")),
        None => {
            tap::create_persistent(TAP)?;
            false
        }
    };
    // ifb0 exists exactly when there is a tx cap.
    let ifb = nl::get(ns, IFB).await?;
    match (&ifb, spec.tx_rate_bytes_per_sec > 0) {
        (None, true) => nl::add(ns, IFB, LinkIfb::new(IFB).up().build()).await?,
        (Some(_), true) => nl::up(ns, IFB).await?,
        (Some(l), false) => nl::del(ns, l).await?,
        (None, false) => {}
    }
    for port in [GUEST_VETH, TAP] {
        nl::change(
            ns,
            port,
            LinkUnspec::new_with_name(port)
                .controller(br0.index)
                .up()
                .build(),
        )
        .await?;
    }
    nl::up(ns, NS_BRIDGE).await?;
    nl::up(ns, "lo").await?;
    // The namespace's own devices need no IPv6 (the guest's v6 is bridged
    // through at layer 2); this keeps them from doing DAD/MLD/RS chatter.
    // Best effort: /proc/sys/net follows this thread's namespace.
    for dev in [NS_BRIDGE, GUEST_VETH, TAP, IFB] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
    }
    Ok(tap_existed)
}

async fn h_set_isolated(host: &Handle, link: &Link, isolated: bool) -> Result<(), String> {
    host.link()
        .set_port(LinkBridgePort::new(link.index).isolated(isolated).build())
        .execute()
        .await
        .map_err(|e| {
            format!(
                "setting isolated={isolated} on bridge port {}: {e}",
                link.name
            )
        })
}

pub(crate) async fn destroy_interface(inner: Arc<Inner>, n: &NetNames) -> Result<(), String> {
    if !names::is_netns_name(&n.netns) || !names::is_veth_name(&n.host_veth) {
        return Err(format!("{n:?} are not metald interface names"));
    }
    let guard = inner.lock_name(&n.netns).await;
    let n = n.clone();
    let what = format!("destroying {}", n.netns);
    let inner2 = inner.clone();
    netns::on_thread(&what, move || async move {
        let _guard = guard;
        join_host(&inner2)?;
        let host = nl::connect()?;
        if let Some(l) = nl::get(&host, &n.host_veth).await? {
            if let Some(a) = &l.alias
                && !a.starts_with(names::MARK_PREFIX)
            {
                return Err(format!(
                    "{} belongs to {a:?}, not to metald; left alone",
                    l.name
                ));
            }
            nl::del(&host, &l).await?;
        }
        netns::delete(&n.netns)
    })
    .await
    .map_err(|e| format!("{what}: {e}"))
}

pub(crate) async fn scan(inner: Arc<Inner>) -> Result<Vec<Owned>, String> {
    netns::on_thread("scanning for metald interfaces", move || async move {
        join_host(&inner)?;
        let host = nl::connect()?;
        let mut found = Vec::new();
        let mut seen = HashSet::new();
        for link in nl::dump(&host).await? {
            if !names::is_veth_name(&link.name) {
                continue;
            }
            let Some((vm_id, index)) = link.alias.as_deref().and_then(names::parse_mark) else {
                continue;
            };
            let n = names::names(&vm_id, index);
            if n.host_veth == link.name {
                seen.insert(n.netns.clone());
                found.push(Owned {
                    vm_id,
                    index,
                    names: n,
                });
            }
        }
        // Namespaces whose veth is gone: their br0 carries the mark.
        for ns_name in netns::list()? {
            if !names::is_netns_name(&ns_name)
                || seen.contains(&ns_name)
                || !netns::is_mounted(&netns::netns_path(&ns_name))
            {
                continue;
            }
            if let Err(e) = netns::enter(&ns_name) {
                tracing::warn!(netns = %ns_name, error = %e, "scan: cannot enter namespace");
                continue;
            }
            let ns = nl::connect()?;
            let Some(br0) = nl::get(&ns, NS_BRIDGE).await? else {
                continue;
            };
            let Some((vm_id, index)) = br0.alias.as_deref().and_then(names::parse_mark) else {
                continue;
            };
            let n = names::names(&vm_id, index);
            if n.netns == ns_name {
                found.push(Owned {
                    vm_id,
                    index,
                    names: n,
                });
            }
        }
        found.sort_by(|a, b| (&a.vm_id, a.index).cmp(&(&b.vm_id, b.index)));
        Ok(found)
    })
    .await
}
