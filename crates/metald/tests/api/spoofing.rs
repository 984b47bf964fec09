//! Anti-spoofing with real QEMU guests: a guest that sends from an address
//! or a MAC metald did not give it is not heard, and the drops show in the
//! counters of its namespace's nftables rules. Delete leaves no rule (the
//! namespace, which holds them, is gone).

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Daemon, wait_for_console};
use crate::network::{Lan, netns_list, ping, with_nic};

const T: &str = "dev_customer_spoof";

/// Packets counted by the drop rule commented `rule` in the namespace's
/// anti-spoofing table.
fn drops(netns: &str, rule: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "list", "table", "bridge"])
        .arg("metald_guard")
        .output()
        .expect("nft");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("comment \"{rule}\"")))
        .unwrap_or_else(|| panic!("no rule {rule:?} in namespace {netns}:\n{text}"));
    let after = line.split("packets ").nth(1).unwrap_or("");
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {line:?}"))
}

/// One ping per try, one second each: true if any answered.
fn answers(addr: &str, tries: usize) -> bool {
    (0..tries).any(|_| {
        Command::new("ping")
            .args(["-c1", "-W1", addr])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Boots VM `name` with `kernel_args` (IPv4 only) and waits for its READY
/// line; returns (address, namespace, console text).
async fn boot(d: &Daemon, name: &str, kernel_args: &str) -> (String, String, String) {
    let assets = crate::harness::Assets::load();
    let nic = json!({"mode": "NETWORK_MODE_IPV4_ONLY"});
    let config = with_nic(&assets, kernel_args, nic);
    d.ok(T, "CreateVm", json!({"vm_id": name, "config": config}))
        .await;
    d.ok(T, "BootVm", json!({"vm_id": name})).await;
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": name})).await;
    let ip = info["networkInfo"]["ipAddress"]
        .as_str()
        .unwrap()
        .to_owned();
    let netns = info["networkInfo"]["networkNamespace"]
        .as_str()
        .unwrap()
        .to_owned();
    let console = info["backendInfo"]["console_log"].as_str().unwrap();
    let text = wait_for_console(console, "METALD-GUEST-READY", 1, Duration::from_secs(120)).await;
    (ip, netns, text)
}

async fn delete_leaves_no_rules(d: &Daemon, name: &str, netns: &str) {
    d.ok(T, "DeleteVm", json!({"vm_id": name, "force": true}))
        .await;
    assert!(
        !netns_list().contains(netns),
        "namespace {netns} (and its rules) gone after delete"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_adds_another_address_cannot_use_it() {
    let lan = Lan::new(9);
    let d = lan.daemon(&[]);
    // Not leased to anyone: IPAM hands out the low addresses first.
    let spoofed = format!("{}.200", lan.v4.rsplit_once(".0/").unwrap().0);
    let (ip, netns, text) = boot(&d, "spoofer", &format!("metald.spoof_ip={spoofed}")).await;
    assert!(
        text.contains(&format!("METALD-SPOOF-PING from={spoofed} fail")),
        "the guest's ping from {spoofed} must not be answered:\n{text}"
    );
    assert!(ping(&ip), "the leased address {ip} answers");
    assert!(
        !answers(&spoofed, 3),
        "the spoofed address {spoofed} must not answer"
    );
    let (v4, arp) = (drops(&netns, "ipv4-source"), drops(&netns, "arp-ip"));
    eprintln!("drops: ipv4-source {v4}, arp-ip {arp}");
    assert!(v4 > 0, "IPv4 from {spoofed} was dropped by the source rule");
    assert!(arp > 0, "ARP for {spoofed} was dropped by the ARP rule");
    assert_eq!(drops(&netns, "mac"), 0, "the guest's own MAC passes");
    delete_leaves_no_rules(&d, "spoofer", &netns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_that_changes_its_mac_is_not_heard() {
    let lan = Lan::new(10);
    let d = lan.daemon(&[]);
    let mac = "02:00:5e:10:00:01";
    let (ip, netns, text) = boot(&d, "masked", &format!("metald.spoof_mac={mac}")).await;
    assert!(
        text.contains(&format!("METALD-NET mac={mac}")),
        "the guest took the other MAC:\n{text}"
    );
    assert!(
        !answers(&ip, 5),
        "a guest sending from {mac} must not be heard on {ip}"
    );
    let n = drops(&netns, "mac");
    eprintln!("drops: mac {n}");
    assert!(n > 0, "frames from {mac} were dropped by the MAC rule");
    delete_leaves_no_rules(&d, "masked", &netns).await;
}
