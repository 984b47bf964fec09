//! Real-device tests: they need root and create bridges, namespaces, veths
//! and TAPs. Every test uses its own bridge, subnet and VM ids and deletes
//! what it made.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, TryStreamExt};
use metald_network::{Host, InterfaceSpec, Isolation, NetNames, NetworkConfig, in_netns, mac_for};

fn random_u32() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    RandomState::new().hash_one((std::process::id(), n, Instant::now())) as u32
}

fn is_root() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    // /proc/self/status "Uid:\t<real>\t..." — avoids a libc dev-dependency.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

/// A test's own bridge, subnet and VM-id prefix; deletes the bridge on drop.
struct Env {
    config: NetworkConfig,
    prefix: String,
}

impl Env {
    fn new() -> Env {
        let r = random_u32();
        let bridge = format!("mtdt{:04x}", r & 0xffff);
        let (a, b) = ((r >> 16) as u8, (r >> 24) as u8);
        Env {
            config: NetworkConfig {
                bridge,
                ipv4_subnet: format!("10.{}.{}.0/24", 200 + a % 50, b).parse().unwrap(),
                ipv6_subnet: format!("fd6d:6574:616c:{:x}::/64", r & 0xffff)
                    .parse()
                    .unwrap(),
                isolation: Isolation::None,
                egress: false,
                protect_host: false,
            },
            prefix: format!("t{:08x}", random_u32()),
        }
    }

    fn vm(&self, n: usize) -> String {
        format!("{}-vm{n}", self.prefix)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.config.bridge])
            .output();
        let _ = metald_network::remove_host_tables(&self.config.bridge);
    }
}

fn spec(vm_id: &str, index: usize) -> InterfaceSpec {
    InterfaceSpec {
        vm_id: vm_id.to_string(),
        index,
        names: Host::names(vm_id, index),
        mac: mac_for(vm_id, index),
        group: 1,
        ipv4: Some(Ipv4Addr::new(10, 0, 0, 2)),
        ipv6: None,
        rx_rate_bytes_per_sec: 0,
        tx_rate_bytes_per_sec: 0,
    }
}

fn sh(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn netns_list() -> Vec<String> {
    sh(&["ip", "netns", "list"])
        .1
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn master_of(name: &str) -> Option<String> {
    std::fs::read_link(format!("/sys/class/net/{name}/master"))
        .ok()
        .and_then(|p| p.file_name()?.to_str().map(str::to_string))
}

#[tokio::test]
async fn setup_is_idempotent_and_sets_gateways() {
    require_root!();
    let env = Env::new();
    let host = Host::setup(env.config.clone()).await.unwrap();
    let again = Host::setup(env.config.clone()).await.unwrap();
    assert_eq!(host.gateway_v4(), again.gateway_v4());
    assert_eq!(host.config(), &env.config);

    let net4 = env.config.ipv4_subnet.network().octets();
    assert_eq!(
        host.gateway_v4(),
        Ipv4Addr::new(net4[0], net4[1], net4[2], net4[3] + 1)
    );
    assert_eq!(
        u128::from(host.gateway_v6()),
        u128::from(env.config.ipv6_subnet.network()) + 1
    );

    let (ok, addrs) = sh(&["ip", "-o", "addr", "show", "dev", &env.config.bridge]);
    assert!(ok, "{addrs}");
    assert!(
        addrs.contains(&format!("inet {}/24", host.gateway_v4())),
        "{addrs}"
    );
    assert!(
        addrs.contains(&format!("inet6 {}/64", host.gateway_v6())),
        "{addrs}"
    );
    // The v6 gateway is usable at once (no DAD), even with no port up yet.
    let gw6_line = addrs
        .lines()
        .find(|l| l.contains(&format!("inet6 {}/64", host.gateway_v6())))
        .unwrap();
    assert!(!gw6_line.contains("tentative"), "{gw6_line}");
    // Exactly one of each despite two setups.
    assert_eq!(addrs.matches(&host.gateway_v4().to_string()).count(), 1);
    let (_, link) = sh(&["ip", "-d", "link", "show", "dev", &env.config.bridge]);
    assert!(link.contains("bridge") && link.contains(",UP"), "{link}");
}

#[tokio::test]
async fn create_destroy_idempotent() {
    require_root!();
    let env = Env::new();
    let host = Host::setup(env.config.clone()).await.unwrap();
    let mut s = spec(&env.vm(0), 0);
    s.rx_rate_bytes_per_sec = 1_000_000;
    s.tx_rate_bytes_per_sec = 500_000;
    let n = s.names.clone();

    let t = Instant::now();
    host.create_interface(&s).await.unwrap();
    let first = t.elapsed();
    let t = Instant::now();
    host.create_interface(&s).await.unwrap();
    let second = t.elapsed();
    eprintln!("create (with rate limits): first {first:?}, again {second:?}");

    assert!(netns_list().contains(&n.netns), "{:?}", netns_list());
    assert_eq!(
        master_of(&n.host_veth).as_deref(),
        Some(&*env.config.bridge)
    );
    let alias = std::fs::read_to_string(format!("/sys/class/net/{}/ifalias", n.host_veth)).unwrap();
    assert_eq!(alias.trim(), format!("metald:{}:0", env.vm(0)));

    let (ok, out) = sh(&[
        "ip", "netns", "exec", &n.netns, "ip", "-d", "link", "show", "tap0",
    ]);
    assert!(
        ok && out.contains("tap") && out.contains("master br0"),
        "{out}"
    );
    let (ok, out) = sh(&[
        "ip", "netns", "exec", &n.netns, "ip", "-d", "link", "show", "veth0",
    ]);
    assert!(
        ok && out.contains("master br0") && out.contains(",UP"),
        "{out}"
    );
    let (ok, out) = sh(&["ip", "netns", "exec", &n.netns, "ip", "link", "show", "lo"]);
    assert!(ok && out.contains(",UP"), "{out}");
    let (_, qdiscs) = sh(&["ip", "netns", "exec", &n.netns, "tc", "qdisc", "show"]);
    assert!(
        qdiscs.contains("qdisc tbf")
            && qdiscs.contains("dev tap0 root")
            && qdiscs.contains("rate 8Mbit"),
        "{qdiscs}"
    );
    assert!(
        qdiscs.contains("dev ifb0 root") && qdiscs.contains("rate 4Mbit"),
        "{qdiscs}"
    );
    assert!(qdiscs.contains("qdisc ingress ffff: dev tap0"), "{qdiscs}");
    let (_, filters) = sh(&[
        "ip", "netns", "exec", &n.netns, "tc", "filter", "show", "dev", "tap0", "ingress",
    ]);
    assert!(
        filters.contains("redirect to device ifb0") || filters.contains("Redirect to device ifb0"),
        "{filters}"
    );

    // The anti-spoofing table is there once, with the VM's MAC, after both creates.
    let (ok, table) = sh(&[
        "ip",
        "netns",
        "exec",
        &n.netns,
        "nft",
        "list",
        "table",
        "bridge",
        "metald_guard",
    ]);
    let mac = s.mac.map(|b| format!("{b:02x}")).join(":");
    assert!(
        ok && table.matches(&format!("ether saddr != {mac}")).count() == 1
            && table.contains("ip saddr != 10.0.0.2"),
        "{table}"
    );

    // Lifting the caps on a re-create removes them.
    s.rx_rate_bytes_per_sec = 0;
    s.tx_rate_bytes_per_sec = 0;
    host.create_interface(&s).await.unwrap();
    let (_, qdiscs) = sh(&["ip", "netns", "exec", &n.netns, "tc", "qdisc", "show"]);
    assert!(
        !qdiscs.contains("tbf") && !qdiscs.contains("ingress") && !qdiscs.contains("ifb0"),
        "{qdiscs}"
    );

    let t = Instant::now();
    host.destroy_interface(&n).await.unwrap();
    eprintln!("destroy: {:?}", t.elapsed());
    assert!(!netns_list().contains(&n.netns));
    assert!(!link_exists(&n.host_veth));
    assert!(!std::path::Path::new("/run/netns").join(&n.netns).exists());
    host.destroy_interface(&n).await.unwrap();
}

#[tokio::test]
async fn rebuilds_missing_pieces() {
    require_root!();
    let env = Env::new();
    let host = Host::setup(env.config.clone()).await.unwrap();
    let s = spec(&env.vm(0), 3);
    let n = s.names.clone();
    host.create_interface(&s).await.unwrap();
    // Someone deleted the host veth (and with it veth0) and the tap.
    sh(&["ip", "link", "del", &n.host_veth]);
    sh(&["ip", "netns", "exec", &n.netns, "ip", "link", "del", "tap0"]);
    host.create_interface(&s).await.unwrap();
    assert_eq!(
        master_of(&n.host_veth).as_deref(),
        Some(&*env.config.bridge)
    );
    let (ok, out) = sh(&[
        "ip", "netns", "exec", &n.netns, "ip", "link", "show", "master", "br0",
    ]);
    assert!(ok && out.contains("veth0") && out.contains("tap0"), "{out}");
    host.destroy_interface(&n).await.unwrap();
}

#[tokio::test]
async fn foreign_device_with_our_name_is_refused() {
    require_root!();
    let env = Env::new();
    let host = Host::setup(env.config.clone()).await.unwrap();
    let s = spec(&env.vm(0), 0);
    let n = s.names.clone();
    let (ok, out) = sh(&[
        "ip",
        "link",
        "add",
        &n.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{}p", &n.host_veth[..12]),
    ]);
    assert!(ok, "{out}");
    sh(&["ip", "link", "set", &n.host_veth, "alias", "someone-else"]);
    let err = host.create_interface(&s).await.unwrap_err();
    assert!(err.contains("someone-else"), "{err}");
    assert!(
        !netns_list().contains(&n.netns),
        "nothing may be made on a collision"
    );
    let err = host.destroy_interface(&n).await.unwrap_err();
    assert!(err.contains("not to metald"), "{err}");
    assert!(link_exists(&n.host_veth));
    sh(&["ip", "link", "del", &n.host_veth]);
    // A mismatching names field is refused too.
    let mut bad = spec(&env.vm(1), 0);
    bad.names = Host::names(&env.vm(1), 1);
    assert!(host.create_interface(&bad).await.is_err());
    let mut bad = spec(&env.vm(1), 0);
    bad.vm_id = "no spaces".into();
    assert!(host.create_interface(&bad).await.is_err());
}

#[test]
fn names_are_short_deterministic_distinct() {
    let mut seen = HashSet::new();
    for vm in 0..250 {
        for index in 0..4 {
            let vm_id = format!("vm-{vm:04}_{}", "x".repeat(vm % 50));
            let n = Host::names(&vm_id, index);
            assert_eq!(n, Host::names(&vm_id, index));
            // Every device name fits IFNAMSIZ (15 + NUL). The namespace
            // name is a file under /run/netns, not a device, and is the
            // specified `mtd-<12 hex>` (16 characters).
            for name in [&n.host_veth, &n.guest_veth, &n.tap, &n.ns_bridge] {
                assert!(name.len() <= 15, "{name}");
            }
            assert!(n.netns.starts_with("mtd-") && n.netns.len() == 16);
            assert!(n.host_veth.starts_with("mv") && n.host_veth.len() == 12);
            assert!(seen.insert(n.netns.clone()), "netns collision {}", n.netns);
            assert!(
                seen.insert(n.host_veth.clone()),
                "veth collision {}",
                n.host_veth
            );
            let mac = mac_for(&vm_id, index);
            assert_eq!(mac[0], 0x02);
            assert!(seen.insert(format!("{mac:02x?}")));
        }
    }
    assert_eq!(seen.len(), 3000);
    let long = "a".repeat(64);
    assert!(Host::names(&long, usize::MAX).host_veth.len() <= 15);
}

#[tokio::test]
async fn scan_finds_what_was_created() {
    require_root!();
    let env = Env::new();
    let host = Host::setup(env.config.clone()).await.unwrap();
    let specs: Vec<_> = (0..3).map(|i| spec(&env.vm(i), i % 2)).collect();
    for s in &specs {
        host.create_interface(s).await.unwrap();
    }
    let mine = |all: Vec<metald_network::Owned>| -> Vec<metald_network::Owned> {
        all.into_iter()
            .filter(|o| o.vm_id.starts_with(&env.prefix))
            .collect()
    };
    let t = Instant::now();
    let found = mine(host.scan().await.unwrap());
    eprintln!("scan: {:?}", t.elapsed());
    assert_eq!(found.len(), 3, "{found:?}");
    for s in &specs {
        assert!(
            found
                .iter()
                .any(|o| o.vm_id == s.vm_id && o.index == s.index && o.names == s.names)
        );
    }

    // A namespace whose veth is gone is still found (through br0's mark).
    sh(&["ip", "link", "del", &specs[0].names.host_veth]);
    let found = mine(host.scan().await.unwrap());
    assert_eq!(found.len(), 3, "{found:?}");

    for s in &specs {
        host.destroy_interface(&s.names).await.unwrap();
    }
    assert!(mine(host.scan().await.unwrap()).is_empty());
}

#[tokio::test]
async fn fifty_concurrent_interfaces() {
    require_root!();
    let env = Env::new();
    let host = Host::setup(env.config.clone()).await.unwrap();
    let specs: Vec<_> = (0..50).map(|i| spec(&env.vm(i), 0)).collect();

    let t = Instant::now();
    specs
        .iter()
        .map(|s| host.create_interface(s))
        .collect::<FuturesUnordered<_>>()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    eprintln!("50 concurrent creates: {:?}", t.elapsed());

    let ports = sh(&["ip", "-o", "link", "show", "master", &env.config.bridge]).1;
    assert_eq!(ports.lines().count(), 50, "{ports}");
    let listed = netns_list();
    assert!(specs.iter().all(|s| listed.contains(&s.names.netns)));

    let t = Instant::now();
    specs
        .iter()
        .map(|s| host.destroy_interface(&s.names))
        .collect::<FuturesUnordered<_>>()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    eprintln!("50 concurrent destroys: {:?}", t.elapsed());
    let listed = netns_list();
    assert!(specs.iter().all(|s| !listed.contains(&s.names.netns)));
    assert!(specs.iter().all(|s| !link_exists(&s.names.host_veth)));
}

#[tokio::test]
async fn sequential_timing() {
    require_root!();
    let env = Env::new();
    let host = Host::setup(env.config.clone()).await.unwrap();
    let specs: Vec<_> = (0..20).map(|i| spec(&env.vm(i), 0)).collect();
    let t = Instant::now();
    for s in &specs {
        host.create_interface(s).await.unwrap();
    }
    let create = t.elapsed() / 20;
    let t = Instant::now();
    for s in &specs {
        host.destroy_interface(&s.names).await.unwrap();
    }
    let destroy = t.elapsed() / 20;
    eprintln!(
        "sequential, no rate limits: create {create:?}/interface, destroy {destroy:?}/interface"
    );
}

#[tokio::test]
async fn in_netns_sees_only_its_devices() {
    require_root!();
    let env = Env::new();
    let host = Host::setup(env.config.clone()).await.unwrap();
    let s = spec(&env.vm(0), 0);
    host.create_interface(&s).await.unwrap();

    let mut devs = in_netns(&s.names.netns, || {
        std::fs::read_dir("/sys/class/net")
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<Vec<_>>()
    })
    .unwrap();
    devs.sort();
    assert_eq!(devs, ["br0", "lo", "tap0", "veth0"]);
    // The calling thread (and the host's /sys) are untouched.
    assert!(link_exists(&env.config.bridge));
    assert!(!link_exists("veth0") || master_of("veth0").as_deref() != Some("br0"));
    assert!(in_netns("mtd-doesnotexist", || ()).is_err());
    assert_eq!(
        metald_network::netns_path(&s.names.netns),
        std::path::Path::new("/run/netns").join(&s.names.netns)
    );

    host.destroy_interface(&s.names).await.unwrap();
}

/// Puts `addr/24` on the namespace's br0 (standing in for a guest).
fn give_address(n: &NetNames, addr: Ipv4Addr) {
    let (ok, out) = sh(&[
        "ip",
        "netns",
        "exec",
        &n.netns,
        "ip",
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "br0",
    ]);
    assert!(ok, "{out}");
}

fn can_connect(from: &NetNames, to: SocketAddr) -> bool {
    in_netns(&from.netns, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(1500)).is_ok()
    })
    .unwrap()
}

#[tokio::test]
async fn traffic_flows_and_isolation_holds() {
    require_root!();
    for isolate in [false, true] {
        let mut env = Env::new();
        env.config.isolation = if isolate {
            Isolation::Vm
        } else {
            Isolation::None
        };
        let host = Host::setup(env.config.clone()).await.unwrap();
        let net = env.config.ipv4_subnet.network().octets();
        let ip = |last: u8| Ipv4Addr::new(net[0], net[1], net[2], last);
        let a = spec(&env.vm(0), 0);
        let b = spec(&env.vm(1), 0);
        host.create_interface(&a).await.unwrap();
        host.create_interface(&b).await.unwrap();
        give_address(&a.names, ip(10));
        give_address(&b.names, ip(11));

        // VM -> gateway always works.
        let gw = TcpListener::bind((host.gateway_v4(), 0)).unwrap();
        let gw_addr = gw.local_addr().unwrap();
        assert!(
            can_connect(&a.names, gw_addr),
            "isolate={isolate}: a -> gateway"
        );

        // VM -> VM only without isolation.
        let b_addr = SocketAddr::from((ip(11), 7000));
        let listener =
            in_netns(&b.names.netns, move || TcpListener::bind(b_addr).unwrap()).unwrap();
        let reached = can_connect(&a.names, b_addr);
        drop(listener);
        assert_eq!(reached, !isolate, "isolate={isolate}: a -> b");

        host.destroy_interface(&a.names).await.unwrap();
        host.destroy_interface(&b.names).await.unwrap();
    }
}

#[test]
fn host_is_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<Host>();
}

#[tokio::test]
async fn same_names_concurrently_are_serialised() {
    require_root!();
    let env = Env::new();
    let host = Host::setup(env.config.clone()).await.unwrap();
    let s = spec(&env.vm(0), 0);
    let other = host.clone();
    let (a, b, c) = tokio::join!(
        host.create_interface(&s),
        host.create_interface(&s),
        other.create_interface(&s)
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    let ports = sh(&["ip", "-o", "link", "show", "master", &env.config.bridge]).1;
    assert_eq!(ports.lines().count(), 1, "{ports}");
    let (a, b) = tokio::join!(
        host.destroy_interface(&s.names),
        host.destroy_interface(&s.names)
    );
    a.unwrap();
    b.unwrap();
    assert!(!netns_list().contains(&s.names.netns));
}

/// Changes host-wide sysctls, and puts them back.
#[tokio::test]
async fn egress_turns_on_forwarding() {
    require_root!();
    let paths = [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ];
    let before: Vec<String> = paths
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let mut env = Env::new();
    env.config.egress = true;
    let result = Host::setup(env.config.clone()).await;
    let after: Vec<String> = paths
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for (p, v) in paths.iter().zip(&before) {
        std::fs::write(p, v).unwrap();
    }
    result.unwrap();
    assert_eq!(after, ["1\n", "1\n"]);
}
