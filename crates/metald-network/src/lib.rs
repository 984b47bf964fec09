//! metald's host networking: how a microVM's NIC reaches the host.
//!
//! # Layout
//!
//! ```text
//!  host netns                          netns mtd-<12 hex>, one per VM interface
//!  ─────────────────────────────       ─────────────────────────────────────────
//!  metald0  bridge, gateway addrs
//!    └─ mv<10 hex> ◄═══ veth pair ═══► veth0 ─┐
//!                                              br0 ── tap0 ◄── QEMU
//!                                      lo (up); ifb0 (only with a tx cap)
//! ```
//!
//! * [`Host::setup`] makes the host bridge (default `metald0`), gives it the
//!   first host address of the IPv4 and IPv6 subnets as the VMs' gateway, and
//!   brings it up. It (re)writes the host's nftables tables for the bridge
//!   (`host_rules.rs`: isolation between VM ports by device group, no
//!   routing between VMs, egress with IPv4 masquerade or none, what guests
//!   reach on the host), filled from the bridge's live ports; with
//!   [`NetworkConfig::egress`] it also turns on forwarding.
//! * Per VM interface, [`Host::create_interface`] makes
//!   - a named network namespace `mtd-<12 hex>` (the same thing as
//!     `ip netns add`: `/proc/thread-self/ns/net` of a thread that unshared
//!     `CLONE_NEWNET` bind-mounted on `/run/netns/<name>`, with `/run/netns`
//!     made a shared mount point first, exactly as iproute2 does — so `ip netns`
//!     sees and can delete our namespaces);
//!   - a veth pair: `mv<10 hex>` in the host namespace, enslaved to the host
//!     bridge with [`InterfaceSpec::group`] as its device group, and `veth0`
//!     inside the namespace. It is created in one netlink
//!     request with the peer placed straight into the namespace, so a pair is
//!     never left half-moved;
//!   - inside the namespace a bridge `br0` with `veth0` and the persistent TAP
//!     `tap0` as ports, all up, and `lo` up. The TAP is made with the
//!     `TUNSETIFF` (`IFF_TAP | IFF_NO_PI`) and `TUNSETPERSIST` ioctls on
//!     `/dev/net/tun`, because the kernel refuses TAP creation over netlink.
//!
//!   - in the namespace an nftables `bridge` table `metald_guard` that drops
//!     whatever the guest sends from another MAC or address (see `guard.rs`:
//!     the rules, and why nftables rather than tc flower). It is (re)placed
//!     atomically on every `create_interface`, so a resumed create re-applies
//!     it, and it goes with the namespace.
//!
//!   QEMU is then started inside the namespace (its spawner does
//!   `setns(open(netns_path(..)), CLONE_NEWNET)` in `pre_exec`) and attaches
//!   with `-netdev tap,ifname=tap0,script=no,downscript=no`. Every VM therefore
//!   sees the same device names, and a VM's kernel-side state is confined to
//!   its namespace: deleting the namespace (after QEMU is gone) removes
//!   `br0`, `tap0`, `ifb0` and the veth pair.
//! * The hex in the names is a stable hash of `"<vm_id>/<index>"` (FNV-1a 64
//!   with a murmur3 finalizer): the namespace takes the top 48 bits, the host
//!   veth the low 40 bits. The names are therefore deterministic and a restarted
//!   metald finds its devices again ([`Host::scan`]). A hash collision is
//!   detected through the ownership mark: the host veth's and the namespace
//!   bridge's `ifalias` are `metald:<vm_id>:<index>`; finding a device with the
//!   computed name and a different mark is an error, never a takeover.
//! * Rate limits are applied with the `tc` binary (netlink-packet-route has no
//!   TBF), run inside the namespace: traffic towards the guest (rx) is shaped
//!   by a `tbf` root qdisc on `tap0`; traffic from the guest (tx) is redirected
//!   from `tap0`'s ingress (`u32` match-all + `mirred`) to an `ifb0` device
//!   whose root `tbf` shapes it. (An ingress `police` action would be simpler,
//!   but `act_police`/`cls_matchall` are not in every kernel — not in the one
//!   this was developed on — while ifb+mirred+u32 are.) Burst is
//!   `max(rate/10, 16 KiB)`, latency 50 ms.
//!
//! # Threads and namespaces
//!
//! Namespace membership belongs to a thread, not a process. Every operation
//! that needs to be inside a namespace runs on a fresh, dedicated OS thread
//! with its own current-thread tokio runtime; that thread first joins the
//! host namespace captured at [`Host::setup`], opens its host netlink socket,
//! then joins (or creates) the VM namespace and opens a second netlink socket
//! there. Such a thread is never a tokio worker or a `spawn_blocking` thread
//! (those are reused; one left inside a VM's namespace would poison later
//! work). Child processes (`tc`) are spawned from that thread and so inherit
//! its namespace.
//!
//! Concurrent operations on *different* interfaces are independent; operations
//! on the *same* names are serialised inside one [`Host`] (and its clones).
//! The lock travels with the work onto its thread, so dropping a caller's
//! future half-way does not let the next operation on those names overlap
//! with the one still finishing.
//!
//! # Addresses
//!
//! This crate allocates nothing: address bookkeeping (IPAM) lives in metald's
//! store, not here. [`DhcpServer`] (dnsmasq, see `dnsmasq.rs`) tells the
//! guests what IPAM leased them: DHCPv4 from a hosts file of static leases,
//! and router advertisements for SLAAC.

#![warn(missing_docs)]

mod dhcp_hosts;
mod dnsmasq;
mod guard;
mod host_rules;
mod names;
mod netns;
mod nl;
mod plumbing;
mod strays;
mod tap;
mod tc;

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

pub use dhcp_hosts::HostEntry;
pub use dnsmasq::{DhcpConfig, DhcpServer, stop_leftover as stop_leftover_dhcp};
pub use guard::link_local;
pub use host_rules::{remove_tables as remove_host_tables, table_name as host_table_name};
pub use names::mac_for;
pub use netns::{in_netns, netns_path};

/// Host-side network settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Name of the host bridge every VM interface is attached to (default `metald0`).
    pub bridge: String,
    /// IPv4 subnet of the VMs (default `10.100.0.0/16`); the bridge gets its
    /// first host address (`.1`) as the gateway.
    pub ipv4_subnet: ipnet::Ipv4Net,
    /// IPv6 subnet of the VMs (default `fd6d:6574:616c:6400::/64`); the bridge
    /// gets `::1` of it as the gateway.
    pub ipv6_subnet: ipnet::Ipv6Net,
    /// Which VMs on the bridge reach each other (see [`Isolation`]); enforced
    /// by the host's nftables tables for this bridge (`host_rules.rs`).
    pub isolation: Isolation,
    /// When true, [`Host::setup`] sets `net.ipv4.ip_forward=1` and
    /// `net.ipv6.conf.all.forwarding=1`, and the host's `inet` table for the
    /// bridge forwards VM traffic to other interfaces (IPv4 masqueraded,
    /// IPv6 routed; answers back in, nothing new). When false that table
    /// drops all forwarding between the bridge and other interfaces,
    /// whatever the sysctls say. Default false.
    ///
    /// Note that with `all.forwarding=1` the kernel stops accepting router
    /// advertisements on interfaces with `accept_ra=1`; a host that gets its
    /// own IPv6 address by SLAAC needs `accept_ra=2` on its uplink. Other
    /// tables' `forward` hooks (e.g. Docker's DROP policy) still apply.
    pub egress: bool,
    /// When true, guests reach only ICMP echo and neighbour discovery,
    /// DHCP, DHCPv6 and DNS on the host, plus answers to the host's own
    /// connections: every other packet from the bridge to the host is
    /// dropped. Default false.
    pub protect_host: bool,
}

/// Which VMs on one bridge reach each other (at layer 2, and through the
/// host at layer 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// VMs whose host veths carry the same device group
    /// ([`InterfaceSpec::group`]) reach each other; others do not.
    #[default]
    Customer,
    /// No VM reaches another.
    Vm,
    /// No filtering between VMs.
    None,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "metald0".to_string(),
            ipv4_subnet: "10.100.0.0/16".parse().expect("valid default subnet"),
            ipv6_subnet: "fd6d:6574:616c:6400::/64"
                .parse()
                .expect("valid default subnet"),
            isolation: Isolation::Customer,
            egress: false,
            protect_host: false,
        }
    }
}

/// Device names for one VM interface, see [`Host::names`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetNames {
    /// Named network namespace, `mtd-<12 hex>` (`/run/netns/<netns>`).
    pub netns: String,
    /// Host end of the veth pair, `mv<10 hex>`, a port of the host bridge.
    pub host_veth: String,
    /// Namespace end of the veth pair (`veth0`).
    pub guest_veth: String,
    /// The TAP QEMU attaches to, inside the namespace (`tap0`).
    pub tap: String,
    /// The bridge inside the namespace joining `guest_veth` and `tap` (`br0`).
    pub ns_bridge: String,
}

/// What [`Host::create_interface`] should build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSpec {
    /// The VM: up to 64 characters of `[A-Za-z0-9_-]`.
    pub vm_id: String,
    /// Which of the VM's interfaces (0 for the first).
    pub index: usize,
    /// Must equal `Host::names(&vm_id, index)`.
    pub names: NetNames,
    /// The guest NIC's MAC (given to QEMU). Not assigned to any host device;
    /// checked to be a non-zero unicast address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address: the only IPv4 source its frames may carry
    /// (besides a DHCP client's 0.0.0.0). `None`: no IPv4 but DHCP.
    pub ipv4: Option<Ipv4Addr>,
    /// The guest's IPv6 address; its MAC's link-local address and `::`
    /// (DAD) are always allowed as well.
    pub ipv6: Option<Ipv6Addr>,
    /// Device group of the host veth: with [`Isolation::Customer`], VMs
    /// whose groups are equal reach each other. 0 reaches no other VM.
    pub group: u32,
    /// Cap on traffic towards the guest, bytes per second; 0 = unlimited.
    pub rx_rate_bytes_per_sec: u64,
    /// Cap on traffic from the guest, bytes per second; 0 = unlimited.
    pub tx_rate_bytes_per_sec: u64,
}

/// One interface found by [`Host::scan`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owned {
    /// The VM it belongs to (from the ownership mark).
    pub vm_id: String,
    /// The VM's interface index (from the ownership mark).
    pub index: usize,
    /// Its device names (`Host::names(&vm_id, index)`).
    pub names: NetNames,
}

/// The host's VM networking: the bridge plus per-interface plumbing.
///
/// Cheap to clone; clones share the per-name locks.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: NetworkConfig,
    pub(crate) gateway_v4: Ipv4Addr,
    pub(crate) gateway_v6: Ipv6Addr,
    /// The network namespace `setup` was called in; worker threads join it first.
    pub(crate) host_ns: OwnedFd,
    /// Serialises operations on the same netns name.
    pub(crate) locks: NameLocks,
    /// Serialises updates of the host's nftables tables for the bridge.
    pub(crate) rules: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Creates the bridge if missing (idempotent), sets its gateway addresses,
    /// brings it up, and with [`NetworkConfig::egress`] enables forwarding and
    /// masquerading. Must be called from a thread in the host network
    /// namespace (any ordinary thread of metald).
    pub async fn setup(config: NetworkConfig) -> Result<Host, String> {
        plumbing::setup(config).await
    }

    /// The IPv4 gateway (the bridge's address): first host of the subnet.
    pub fn gateway_v4(&self) -> Ipv4Addr {
        self.inner.gateway_v4
    }

    /// The IPv6 gateway (the bridge's address): `::1` of the subnet.
    pub fn gateway_v6(&self) -> Ipv6Addr {
        self.inner.gateway_v6
    }

    /// The configuration this host was set up with.
    pub fn config(&self) -> &NetworkConfig {
        &self.inner.config
    }

    /// Deterministic device names for interface `index` of VM `vm_id`
    /// (vm_id: up to 64 chars of `[A-Za-z0-9_-]`). All names fit in
    /// `IFNAMSIZ` (≤ 15 characters).
    pub fn names(vm_id: &str, index: usize) -> NetNames {
        names::names(vm_id, index)
    }

    /// Creates (idempotently: existing pieces with the right owner are reused)
    /// the namespace, veth pair, namespace bridge and TAP for one interface,
    /// installs its anti-spoofing rules (before any VMM can use the TAP) and
    /// applies its rate limits, then refills the bridge table's member sets
    /// from the live ports. Fails without touching anything when a device
    /// with one of the computed names belongs to someone else.
    pub async fn create_interface(&self, spec: &InterfaceSpec) -> Result<(), String> {
        // The port is a member before it joins the bridge: never a moment
        // unfiltered. The refill after drops it again if creation failed.
        let coming = host_rules::Member {
            veth: spec.names.host_veth.clone(),
            group: spec.group,
        };
        if names::is_veth_name(&coming.veth) {
            host_rules::sync(&self.inner, Some(coming)).await?;
        }
        let made = plumbing::create_interface(self.inner.clone(), spec).await;
        let synced = host_rules::sync(&self.inner, None).await;
        made.and(synced)
    }

    /// Removes everything `create_interface` made for these names; missing
    /// pieces are not an error; the bridge table's member sets are then
    /// refilled from the live ports. Stop the VM's QEMU first: a process still in
    /// the namespace keeps its `tap0` alive (the namespace itself loses its
    /// name at once and vanishes when the process exits).
    pub async fn destroy_interface(&self, names: &NetNames) -> Result<(), String> {
        plumbing::destroy_interface(self.inner.clone(), names).await?;
        // The devices are gone: a stale member names no device, and the
        // next change or start-up drops it.
        if let Err(e) = host_rules::sync(&self.inner, None).await {
            tracing::warn!(netns = %names.netns, error = %e, "refilling the bridge table's sets after a removal failed");
        }
        Ok(())
    }

    /// Name of the host's nftables tables for this bridge (one `bridge` and
    /// one `inet` table of that name).
    pub fn table_name(&self) -> String {
        host_rules::table_name(&self.inner.config.bridge)
    }

    /// Every namespace / host veth that metald made (found by naming scheme +
    /// ownership mark), for an orphan sweep: host veths `mv*` whose alias is a
    /// valid `metald:<vm_id>:<index>` mark matching their name, plus namespaces
    /// `mtd-*` whose `br0` carries such a mark (covers a namespace whose veth
    /// is gone). A namespace that crashed before its `br0` was made has no
    /// mark and is not reported.
    pub async fn scan(&self) -> Result<Vec<Owned>, String> {
        plumbing::scan(self.inner.clone()).await
    }

    /// Namespaces of metald's naming scheme that carry no mark (a crash
    /// between creating a namespace and marking its bridge), except the
    /// namespaces of `expected` (VM id, interface index) pairs, which may be
    /// being made right now.
    pub async fn unmarked_namespaces(
        &self,
        expected: &[(String, usize)],
    ) -> Result<Vec<String>, String> {
        let expected = expected
            .iter()
            .map(|(vm, i)| names::names(vm, *i).netns)
            .collect();
        strays::list(self.inner.clone(), expected).await
    }

    /// Deletes an unmarked namespace found by
    /// [`Host::unmarked_namespaces`], if it is still unmarked.
    pub async fn remove_unmarked_namespace(&self, name: &str) -> Result<(), String> {
        strays::remove(self.inner.clone(), name).await
    }
}

/// Per-name async locks; entries are dropped when nobody holds or waits.
#[derive(Default)]
pub(crate) struct NameLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

/// Holds the lock for one name. Owns its `Inner`, so it can be moved onto the
/// worker thread: the lock is then held until the work is really done, even
/// if the caller's future is dropped half-way.
pub(crate) struct NameGuard {
    inner: Arc<Inner>,
    name: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Inner {
    pub(crate) async fn lock_name(self: &Arc<Self>, name: &str) -> NameGuard {
        let m = {
            let mut map = self.locks.0.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(name.to_string()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        NameGuard {
            inner: self.clone(),
            name: name.to_string(),
            guard: Some(guard),
        }
    }
}

impl Drop for NameGuard {
    fn drop(&mut self) {
        let mut map = self.inner.locks.0.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.guard.take());
        // Clones are only taken under the map lock, so a count of 1 (the map's
        // own) means nobody else holds or waits for this lock.
        if map
            .get(&self.name)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.name);
        }
    }
}
