//! Isolation between VMs and egress, with real QEMU guests on a host bridge
//! whose nftables tables metald writes (`bridge` and `inet`
//! `metald_<bridge>`): customers cannot reach each other's VMs (ping and
//! TCP, IPv4 and IPv6, both directions) while a customer's own VMs can;
//! `vm` isolation (and its deprecated alias) keeps every VM apart; egress
//! reaches an "outside" namespace masqueraded as the host, and without it
//! nothing leaves the bridge; host services are closed to guests unless
//! opened; delete, a failed create and the reconciler after a SIGKILL
//! leave no member in the tables' sets.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use serde_json::{Value, json};

use crate::harness::{Assets, Daemon, vm_key, wait_for_console};
use crate::network::{Lan, with_nic};

const A: &str = "dev_customer_iso_a";
const B: &str = "dev_customer_iso_b";

/// `nft -j list table <family> metald_<bridge>`, parsed.
fn table(lan: &Lan, family: &str) -> Vec<Value> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", family])
        .arg(metald_network::host_table_name(&lan.bridge))
        .output()
        .expect("nft");
    assert!(
        out.status.success(),
        "no {family} table for {}: {}",
        lan.bridge,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
    v["nftables"].as_array().cloned().unwrap_or_default()
}

/// The elements of set `name` of the bridge table, as text.
fn set(lan: &Lan, name: &str) -> BTreeSet<String> {
    table(lan, "bridge")
        .iter()
        .filter_map(|o| o.get("set"))
        .filter(|s| s["name"] == name)
        .flat_map(|s| s["elem"].as_array().cloned().unwrap_or_default())
        .map(|e| match e {
            Value::String(s) => s,
            other => other.to_string(),
        })
        .collect()
}

/// Packets counted by the rule commented `comment` in the family's table.
fn drops(lan: &Lan, family: &str, comment: &str) -> u64 {
    let rules = table(lan, family);
    let rule = rules
        .iter()
        .filter_map(|o| o.get("rule"))
        .find(|r| r["comment"] == comment)
        .unwrap_or_else(|| panic!("no rule {comment:?} in {family} table:\n{rules:?}"));
    rule["expr"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|e| e["counter"]["packets"].as_u64())
        .unwrap_or_else(|| panic!("no counter in {rule}"))
}

/// Host address `last` of the Lan's IPv4 and IPv6 subnets.
fn addrs(lan: &Lan, last: u8) -> (String, String) {
    let v4 = lan.v4.rsplit_once(".0/").unwrap().0;
    let v6 = lan.v6.trim_end_matches("/64");
    (format!("{v4}.{last}"), format!("{v6}{last}"))
}

/// Creates and boots VM `name` of `token` with static addresses (`.last`
/// and `::last`; IPv4 only when `v6` is false) and waits for its READY line;
/// returns the console text and the VM's key.
async fn boot(
    d: &Daemon,
    lan: &Lan,
    (token, name): (&str, &str),
    (last, v6): (u8, bool),
    args: &str,
) -> (String, String) {
    let (a4, a6) = addrs(lan, last);
    let mut nic = json!({"ipv4_config": {"address": a4}});
    if v6 {
        nic["ipv6_config"] = json!({"address": a6});
    } else {
        nic["mode"] = json!("NETWORK_MODE_IPV4_ONLY");
    }
    let config = with_nic(&Assets::load(), args, nic);
    d.ok(token, "CreateVm", json!({"vm_id": name, "config": config}))
        .await;
    d.ok(token, "BootVm", json!({"vm_id": name})).await;
    let info = d.ok(token, "GetVmInfo", json!({"vm_id": name})).await;
    let console = info["backendInfo"]["console_log"].as_str().unwrap();
    let text = wait_for_console(console, "METALD-GUEST-READY", 1, Duration::from_secs(300)).await;
    (text, vm_key(d, token, name).await)
}

fn expect(text: &str, who: &str, lines: &[String]) {
    for l in lines {
        assert!(
            text.contains(l),
            "{who}: expected {l:?} in its console:\n{text}"
        );
    }
}

fn veth(key: &str) -> String {
    metald_network::Host::names(key, 0).host_veth
}

#[tokio::test(flavor = "multi_thread")]
async fn customers_reach_their_own_vms_only_by_ping_and_tcp_on_both_families() {
    let lan = Lan::new(11);
    // The host forwards (as with egress): it still must not route between
    // customers.
    let _forwarding = Forwarding::on().await;
    let d = lan.daemon(&[]);
    let (a1, a2, b) = (addrs(&lan, 11), addrs(&lan, 12), addrs(&lan, 13));
    let serve = "metald.serve=7000";
    let (_, k1) = boot(&d, &lan, (A, "a1"), (11, true), serve).await;
    // A's second VM reaches the first: ping and TCP, IPv4 and IPv6.
    let args = format!(
        "{serve} metald.ping={0} metald.ping={1} metald.tcp={0}/7000 metald.tcp={1}/7000",
        a1.0, a1.1
    );
    let (text, k2) = boot(&d, &lan, (A, "a2"), (12, true), &args).await;
    let ok = |t: &(String, String)| {
        vec![
            format!("METALD-PING {} ok", t.0),
            format!("METALD-PING {} ok", t.1),
        ]
    };
    let mut want = ok(&a1);
    want.extend([
        format!("METALD-TCP {}/7000 ok", a1.0),
        format!("METALD-TCP {}/7000 ok", a1.1),
    ]);
    expect(&text, "a2", &want);

    // B's VM reaches neither of A's.
    let mut args = serve.to_string();
    let mut want = Vec::new();
    for t in [&a1, &a2] {
        for addr in [&t.0, &t.1] {
            args += &format!(" metald.ping={addr} metald.tcp={addr}/7000");
            want.push(format!("METALD-PING {addr} fail"));
            want.push(format!("METALD-TCP {addr}/7000 fail"));
        }
    }
    let (text, kb) = boot(&d, &lan, (B, "b"), (13, true), &args).await;
    expect(&text, "b", &want);

    // And A's VMs cannot reach B's, while still reaching their own: over
    // IPv6 on the link, over IPv4 through the gateway (layer 3).
    let mut args = format!(
        "metald.ping={} metald.tcp={}/7000 metald.via_gw={}",
        a1.0, a1.0, b.0
    );
    let mut want = vec![
        format!("METALD-PING {} ok", a1.0),
        format!("METALD-TCP {}/7000 ok", a1.0),
    ];
    for addr in [&b.0, &b.1] {
        args += &format!(" metald.ping={addr} metald.tcp={addr}/7000");
        want.push(format!("METALD-PING {addr} fail"));
        want.push(format!("METALD-TCP {addr}/7000 fail"));
    }
    let (text, k3) = boot(&d, &lan, (A, "a3"), (14, true), &args).await;
    expect(&text, "a3", &want);

    let (n, routed) = (
        drops(&lan, "bridge", "customer"),
        drops(&lan, "bridge", "routed-ipv4"),
    );
    eprintln!("drops: customer {n}, routed-ipv4 {routed}");
    assert!(n > 0, "frames between customers were dropped by the rule");
    assert!(
        routed > 0,
        "packets the host routed between VMs were dropped"
    );
    let ports: BTreeSet<String> = [&k1, &k2, &kb, &k3].iter().map(|k| veth(k)).collect();
    assert_eq!(set(&lan, "ports"), ports, "every VM port is a member");
    assert_eq!(set(&lan, "same").len(), 2, "one group per customer");

    for (token, name) in [(A, "a1"), (A, "a2"), (B, "b"), (A, "a3")] {
        d.ok(token, "DeleteVm", json!({"vm_id": name, "force": true}))
            .await;
    }
    assert!(
        set(&lan, "ports").is_empty(),
        "delete leaves no port member"
    );
    assert!(set(&lan, "same").is_empty(), "delete leaves no group");
}

/// Polls `f` for up to 60 s.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn sql(d: &Daemon, statement: &str) {
    let db = d.data_dir.join("metald.db");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()",
        ])
        .arg(&db)
        .arg(statement)
        .output()
        .expect("python3 sqlite3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_isolation_keeps_every_vm_apart_and_members_never_outlive_their_vm() {
    let lan = Lan::new(12);
    let mut d = lan.daemon(&["--network-isolation", "vm"]);
    let (v1, _) = addrs(&lan, 11);
    let (_, k1) = boot(&d, &lan, (A, "v1"), (11, false), "metald.serve=7000").await;
    let gw = lan.v4.replace(".0/24", ".1");
    let args = format!("metald.ping={gw} metald.ping={v1} metald.tcp={v1}/7000");
    let (text, k2) = boot(&d, &lan, (A, "v2"), (12, false), &args).await;
    let want = [
        format!("METALD-PING {gw} ok"),
        format!("METALD-PING {v1} fail"),
        format!("METALD-TCP {v1}/7000 fail"),
    ];
    expect(&text, "v2", &want);
    let n = drops(&lan, "bridge", "vm");
    eprintln!("drops: vm {n}");
    assert!(n > 0, "frames between the VMs were dropped by the rule");
    let both: BTreeSet<String> = [veth(&k1), veth(&k2)].into();
    assert_eq!(set(&lan, "ports"), both);

    // A create that fails after its host veth joined the bridge (tc refuses
    // a cap this large) leaves no member.
    let (f1, _) = addrs(&lan, 20);
    let nic = json!({
        "mode": "NETWORK_MODE_IPV4_ONLY",
        "ipv4_config": {"address": f1},
        "rx_rate_limit": {"bandwidth": i64::MAX.to_string()},
    });
    let config = with_nic(&Assets::load(), "", nic);
    let err = d
        .call(A, "CreateVm", json!({"vm_id": "failed", "config": config}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "internal", "{err:?}");
    assert_eq!(set(&lan, "ports"), both, "the failed create left no member");

    // metald is SIGKILLed and v2's row vanishes: the restarted metald's
    // reconciler removes v2's devices and membership, and keeps v1's.
    d.stop(Signal::KILL);
    sql(&d, &format!("DELETE FROM vms WHERE vm_id = '{k2}'"));
    d.restart();
    eventually("the orphan's port is removed from the set", || {
        set(&lan, "ports") == BTreeSet::from([veth(&k1)])
    })
    .await;
    d.ok(A, "DeleteVm", json!({"vm_id": "v1", "force": true}))
        .await;
    assert!(set(&lan, "ports").is_empty(), "delete leaves no member");
    drop(d);

    // The deprecated switch still isolates, and says it is deprecated.
    let d = lan.daemon(&["--network-isolate-vms", "true"]);
    let log = d
        .log_when(|l| l.contains("UNKEY_METALD_NETWORK_ISOLATE_VMS is deprecated"))
        .await;
    assert!(
        log.contains("UNKEY_METALD_NETWORK_ISOLATION=vm"),
        "deprecation warning logged:\n{log}"
    );
    drops(&lan, "bridge", "vm");
}

/// The host's forwarding sysctls, put back when dropped. They are
/// host-wide: tests that depend on them hold this lock while they run.
struct Forwarding {
    saved: Vec<(&'static str, String)>,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

static FORWARDING_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const FORWARDING: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

impl Forwarding {
    /// Saves the sysctls as they are.
    async fn saved() -> Forwarding {
        let lock = FORWARDING_LOCK.lock().await;
        Forwarding {
            saved: FORWARDING
                .iter()
                .map(|p| (*p, std::fs::read_to_string(p).unwrap()))
                .collect(),
            _lock: lock,
        }
    }

    /// Saves them, then turns forwarding on.
    async fn on() -> Forwarding {
        let f = Forwarding::saved().await;
        for p in FORWARDING {
            std::fs::write(p, "1").unwrap();
        }
        f
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        for (p, v) in &self.saved {
            let _ = std::fs::write(p, v);
        }
    }
}

/// An "outside" network: a namespace joined to the host by a veth pair,
/// 198.18.<n>.1 on the host and .2 inside. Removed, and the forwarding
/// sysctls put back, when dropped.
struct Outside {
    ns: String,
    veth: String,
    _sysctls: Forwarding,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Outside {
    async fn new(n: u8) -> Outside {
        let sysctls = Forwarding::saved().await;
        let tag = format!("{:05x}", std::process::id() & 0xfffff);
        let o = Outside {
            ns: format!("mtdo-{tag}"),
            veth: format!("mto{tag}"),
            _sysctls: sysctls,
        };
        let (host, inside) = (format!("198.18.{n}.1/24"), format!("198.18.{n}.2/24"));
        run(&["ip", "netns", "add", &o.ns]);
        run(&[
            "ip", "link", "add", &o.veth, "type", "veth", "peer", "name", "eth0", "netns", &o.ns,
        ]);
        run(&["ip", "addr", "add", &host, "dev", &o.veth]);
        run(&["ip", "link", "set", &o.veth, "up"]);
        let ns = ["ip", "netns", "exec", &o.ns];
        run(&[&ns[..], &["ip", "addr", "add", &inside, "dev", "eth0"]].concat());
        run(&[&ns[..], &["ip", "link", "set", "eth0", "up"]].concat());
        run(&[&ns[..], &["ip", "link", "set", "lo", "up"]].concat());
        o
    }

    /// A TCP server at `addr` inside the namespace that greets each client
    /// and reports the client's address.
    fn serve(&self, addr: SocketAddr) -> std::sync::mpsc::Receiver<IpAddr> {
        let listener = metald_network::in_netns(&self.ns, move || TcpListener::bind(addr))
            .unwrap()
            .unwrap();
        greet(listener)
    }
}

/// Greets each client of `listener` with `METALD-HELLO` and reports its
/// address.
fn greet(listener: TcpListener) -> std::sync::mpsc::Receiver<IpAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let peer = conn.peer_addr().map(|p| p.ip());
            let _ = conn.write_all(b"METALD-HELLO\n");
            if let Ok(p) = peer
                && tx.send(p).is_err()
            {
                return;
            }
        }
    });
    rx
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_and_host_services_are_reached_only_when_opened() {
    let n = 13;
    let lan = Lan::new(n);
    let outside = Outside::new(n).await;
    let server: SocketAddr = format!("198.18.{n}.2:7100").parse().unwrap();
    let seen = outside.serve(server);

    // Egress off, on a host that forwards anyway (other software set the
    // sysctl): metald's table drops it. The host is protected (default):
    // a service on the gateway address is closed to the guest.
    std::fs::write(FORWARDING[0], "1").unwrap();
    let d = lan.daemon(&["--network-egress", "false"]);
    let gw = lan.v4.replace(".0/24", ".1");
    let host_seen = greet(TcpListener::bind(format!("{gw}:7200")).unwrap());
    let args = format!("metald.tcp=198.18.{n}.2/7100 metald.tcp={gw}/7200 metald.ping={gw}");
    let (text, _) = boot(&d, &lan, (A, "inside"), (11, false), &args).await;
    let want = [
        format!("METALD-TCP 198.18.{n}.2/7100 fail"),
        format!("METALD-TCP {gw}/7200 fail"),
        format!("METALD-PING {gw} ok"),
    ];
    expect(&text, "inside", &want);
    let (egress, host) = (drops(&lan, "inet", "egress"), drops(&lan, "inet", "host"));
    eprintln!("drops: egress {egress}, host {host}");
    assert!(
        egress > 0,
        "the guest's SYNs were dropped by the egress rule"
    );
    assert!(host > 0, "the guest's SYNs to the host were dropped");
    assert!(
        seen.try_recv().is_err(),
        "no connection reached the outside"
    );
    assert!(
        host_seen.try_recv().is_err(),
        "none reached the host service"
    );
    d.ok(A, "DeleteVm", json!({"vm_id": "inside", "force": true}))
        .await;
    drop(d);

    let d = lan.daemon(&[
        "--network-egress",
        "true",
        "--network-protect-host",
        "false",
    ]);
    let (text, _) = boot(&d, &lan, (A, "inside"), (11, false), &args).await;
    let want = [
        format!("METALD-TCP 198.18.{n}.2/7100 ok"),
        format!("METALD-TCP {gw}/7200 ok"),
    ];
    expect(&text, "inside", &want);
    let peer = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        peer.to_string(),
        format!("198.18.{n}.1"),
        "the outside sees the host's address (masquerade)"
    );
    host_seen.recv_timeout(Duration::from_secs(10)).unwrap();
    d.ok(A, "DeleteVm", json!({"vm_id": "inside", "force": true}))
        .await;
}
