//! Guests that configure themselves: metald's DHCP server (dnsmasq on the
//! host bridge) hands a guest running only busybox `udhcpc` its leased
//! IPv4 address, its router advertisements let the guest kernel's SLAAC
//! form the leased IPv6 address, and nothing is on the kernel command
//! line. The hosts file's lines go with every way a VM goes, and a
//! restarted metald adopts the running server, so leases stay renewable.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustix::process::Signal;
use serde_json::{Value, json};

use crate::harness::{Assets, Daemon, is_dnsmasq, vm_key, wait_for_console};
use crate::network::{Lan, leases, netns_list, ping, with_nic};

const T: &str = "dev_customer_dhcp";

fn hosts_file(d: &Daemon) -> PathBuf {
    d.data_dir.join("dhcp").join("hosts")
}

fn hosts(d: &Daemon) -> String {
    std::fs::read_to_string(hosts_file(d)).unwrap_or_default()
}

/// The line of VM `key`'s first interface, if any.
fn line_of(d: &Daemon, key: &str) -> Option<String> {
    let owner = format!(" # {key}/0");
    hosts(d)
        .lines()
        .find(|l| l.ends_with(&owner))
        .map(str::to_owned)
}

/// The pid of the running dnsmasq its pid file names, if it runs.
fn dnsmasq_pid(d: &Daemon) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(d.data_dir.join("dhcp").join("dnsmasq.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_dnsmasq(pid).then_some(pid)
}

/// A dual-stack VM whose guest configures itself (`metald.dhcp=1`).
async fn create(d: &Daemon, assets: &Assets, name: &str) -> Value {
    let config = with_nic(assets, "metald.dhcp=1", json!({}));
    d.ok(T, "CreateVm", json!({"vm_id": name, "config": config}))
        .await;
    d.ok(T, "GetVmInfo", json!({"vm_id": name})).await
}

fn addresses(info: &Value) -> (String, String, String) {
    let net = &info["networkInfo"];
    let ips: Vec<&str> = net["ipAddress"].as_str().unwrap().split(',').collect();
    assert_eq!(ips.len(), 2, "an IPv4 and an IPv6 address: {net}");
    let mac = net["macAddress"].as_str().unwrap().to_owned();
    (ips[0].to_owned(), ips[1].to_owned(), mac)
}

async fn boot(d: &Daemon, name: &str) -> String {
    d.ok(T, "BootVm", json!({"vm_id": name})).await;
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": name})).await;
    let console = info["backendInfo"]["console_log"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_console(&console, "METALD-GUEST-READY", 1, Duration::from_secs(180)).await;
    console
}

fn sqlite(db: &Path, script: &str, args: &[&str]) {
    let ok = Command::new("python3")
        .args(["-c", script])
        .arg(db)
        .args(args)
        .status()
        .expect("python3 sqlite3");
    assert!(ok.success(), "{script}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_with_only_udhcpc_and_slaac_gets_its_leased_addresses_and_answers_ping_on_both() {
    let assets = Assets::load();
    let lan = Lan::new(14);
    let d = lan.daemon(&[
        "--network-kernel-args",
        "false",
        "--network-dns",
        "192.0.2.53,198.51.100.53,fd00::53",
    ]);
    let info = create(&d, &assets, "selfconf").await;
    let (v4, v6, mac) = addresses(&info);
    let key = vm_key(&d, T, "selfconf").await;
    // IPAM leased the address SLAAC forms from the MAC in the /64 (eui64
    // keeps only the first 64 bits of the address it is given).
    let leased: std::net::Ipv6Addr = v6.parse().unwrap();
    let want = metald_core::net::eui64(leased, 64, metald_core::Mac::parse(&mac).unwrap());
    assert_eq!(
        Some(v6.parse().unwrap()),
        want,
        "the IPv6 lease is the EUI-64 of {mac}"
    );
    assert_eq!(
        line_of(&d, &key),
        Some(format!("{mac},{v4} # {key}/0")),
        "the hosts file serves the lease before boot:\n{}",
        hosts(&d)
    );

    let console = boot(&d, "selfconf").await;
    let text = std::fs::read_to_string(&console).unwrap();
    let cmdline = text
        .lines()
        .find(|l| l.contains("Kernel command line:"))
        .expect("the guest kernel prints its command line");
    assert!(
        !cmdline.contains(" ip=")
            && !cmdline.contains("metald.ip6")
            && !cmdline.contains("metald.gw6"),
        "no addresses on the kernel command line: {cmdline}"
    );
    assert!(
        text.contains(&format!("METALD-DHCP bound ipv4={v4}/24 router=")),
        "udhcpc got the leased IPv4 address:\n{text}"
    );
    let gateway = format!("{}.1", v4.rsplit_once('.').unwrap().0);
    let options = format!("router={gateway} mtu=1500 lease=3600 dns=192.0.2.53,198.51.100.53");
    assert!(
        text.lines().any(|l| l.trim_end().ends_with(&options)),
        "router, MTU, lease time and the IPv4 DNS servers of UNKEY_METALD_NETWORK_DNS:\n{text}"
    );
    assert!(
        text.contains(&format!("METALD-NET ipv6={v6}/64")),
        "SLAAC formed the leased IPv6 address:\n{text}"
    );
    assert!(ping(&v4), "the guest answers ping on {v4}");
    assert!(ping(&v6), "the guest answers ping on {v6}");

    d.ok(T, "DeleteVm", json!({"vm_id": "selfconf", "force": true}))
        .await;
    assert_eq!(
        line_of(&d, &key),
        None,
        "delete removes the line:\n{}",
        hosts(&d)
    );
    assert_eq!(leases(&d), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_lines_go_with_failed_creates_and_crashes_and_a_restart_keeps_leases_renewable() {
    let assets = Assets::load();
    let lan = Lan::new(15);
    let mut d = lan.daemon(&[
        "--network-kernel-args",
        "false",
        "--network-dhcp-lease-time",
        "120",
    ]);
    let info = create(&d, &assets, "renewer").await;
    let (v4, _, _) = addresses(&info);
    let renewer = vm_key(&d, T, "renewer").await;
    let console = boot(&d, "renewer").await;
    assert!(
        std::fs::read_to_string(&console)
            .unwrap()
            .contains(&format!("METALD-DHCP bound ipv4={v4}/"))
    );

    // A create whose hosts line cannot be written fails and leaves no line,
    // no lease and no namespace.
    let blocker = hosts_file(&d).with_extension("tmp");
    std::fs::create_dir(&blocker).unwrap();
    let namespaces = netns_list().len();
    let err = d
        .call(
            T,
            "CreateVm",
            json!({"vm_id": "blocked", "config": with_nic(&assets, "metald.dhcp=1", json!({}))}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.0, "internal", "{err:?}");
    std::fs::remove_dir(&blocker).unwrap();
    assert_eq!(
        hosts(&d).lines().count(),
        1,
        "only the renewer's line:\n{}",
        hosts(&d)
    );
    assert_eq!(leases(&d), 2, "only the renewer's addresses");
    assert!(
        netns_list().len() <= namespaces,
        "the failed create's namespace is gone"
    );

    // metald is killed; the row of a VM it made is gone when it comes back
    // (as after a crash between a delete's row and its clean-up).
    create(&d, &assets, "ghost").await;
    let ghost = vm_key(&d, T, "ghost").await;
    assert!(line_of(&d, &ghost).is_some());
    let server = dnsmasq_pid(&d).expect("dnsmasq serves");
    d.stop(Signal::KILL);
    assert!(is_dnsmasq(server), "dnsmasq outlives metald");
    sqlite(
        &d.data_dir.join("metald.db"),
        "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nc.execute('delete from vms where name=?',(sys.argv[2],))\nc.commit()",
        &["ghost"],
    );
    d.restart();
    assert_eq!(
        line_of(&d, &ghost),
        None,
        "no line for a VM no row claims:\n{}",
        hosts(&d)
    );
    assert!(!netns_list().contains(&metald_network::Host::names(&ghost, 0).netns));
    assert_eq!(leases(&d), 2, "the ghost's addresses are released");
    assert!(
        line_of(&d, &renewer).is_some(),
        "the running VM keeps its line"
    );
    assert_eq!(
        dnsmasq_pid(&d),
        Some(server),
        "the restarted metald adopted dnsmasq"
    );
    // The guest renews (at half the 120 s lease) from the adopted server.
    let renewals = std::fs::read_to_string(&console)
        .unwrap()
        .matches("METALD-DHCP renew")
        .count();
    let text = wait_for_console(
        &console,
        "METALD-DHCP renew",
        renewals + 1,
        Duration::from_secs(150),
    )
    .await;
    assert!(
        text.contains(&format!("METALD-DHCP renew ipv4={v4}/")),
        "renewed the same address"
    );

    // A clean stop with no VM left stops the server too.
    d.ok(T, "DeleteVm", json!({"vm_id": "renewer", "force": true}))
        .await;
    assert_eq!(hosts(&d), "", "no line left");
    d.stop(Signal::TERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while is_dnsmasq(server) {
        assert!(
            std::time::Instant::now() < deadline,
            "dnsmasq still runs after metald stopped with no VM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
