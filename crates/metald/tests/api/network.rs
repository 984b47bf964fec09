//! VM networking with real namespaces, veth pairs, TAP devices and a host
//! bridge: a dual-stack guest answers ping, VMs reach (or, isolated, do
//! not reach) each other, parallel creates get distinct addresses and
//! names, and nothing is left after delete or a failed create.
//!
//! Each test uses its own bridge and subnets, so tests run in parallel.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Assets, Daemon, vm_key, wait_for_console};

const T: &str = "dev_customer_net";

/// A bridge and subnets of this test's own, removed when dropped.
pub(crate) struct Lan {
    pub(crate) bridge: String,
    pub(crate) v4: String,
    pub(crate) v6: String,
}

impl Lan {
    pub(crate) fn new(n: u8) -> Lan {
        let tag = format!("{:04x}", std::process::id() as u16 ^ (n as u16) << 12);
        Lan {
            bridge: format!("mtdt{tag}"),
            v4: format!("10.{}.{}.0/24", 200 + n, (std::process::id() % 250) as u8),
            v6: format!("fd00:6d74:{n:x}:{tag}::/64"),
        }
    }

    pub(crate) fn daemon(&self, extra: &[&str]) -> Daemon {
        let mut args = vec![
            "--auth-mode",
            "dev",
            "--network-enabled",
            "true",
            "--network-bridge",
            &self.bridge,
            "--network-ipv4-subnet",
            &self.v4,
            "--network-ipv6-subnet",
            &self.v6,
        ];
        args.extend_from_slice(extra);
        Daemon::start_with(&args)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        // The bridge's nftables tables outlive metald (its VMs may); the
        // test's bridge is gone, so are they.
        let _ = metald_network::remove_host_tables(&self.bridge);
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn netns_list() -> HashSet<String> {
    sh("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn links() -> HashSet<String> {
    sh("ip", &["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .collect()
}

/// None of these VMs' (by key) namespaces or veths exist, and the bridge has no
/// port left (other tests run in parallel on other bridges, so only this
/// test's names are checked).
fn assert_no_devices(lan: &Lan, vm_ids: &[String]) {
    let (ns, links) = (netns_list(), links());
    for id in vm_ids {
        let names = metald_network::Host::names(id, 0);
        assert!(
            !ns.contains(&names.netns),
            "namespace {} of {id} left",
            names.netns
        );
        assert!(
            !links.contains(&names.host_veth),
            "veth {} of {id} left",
            names.host_veth
        );
    }
    let ports: Vec<_> = std::fs::read_dir(format!("/sys/class/net/{}/brif", lan.bridge))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        ports.is_empty(),
        "bridge {} still has ports {ports:?}",
        lan.bridge
    );
}

pub(crate) fn leases(d: &Daemon) -> i64 {
    let db = d.data_dir.join("metald.db");
    let out = Command::new("python3")
        .args(["-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from ip_leases').fetchone()[0])"])
        .arg(&db)
        .output()
        .expect("python3 sqlite3");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("lease count")
}

pub(crate) fn with_nic(assets: &Assets, extra_args: &str, nic: Value) -> Value {
    let mut config = assets.config();
    let args = format!(
        "{} {extra_args}",
        config["boot"]["kernel_args"].as_str().unwrap()
    );
    config["boot"]["kernel_args"] = json!(args.trim());
    config["network"] = json!([nic]);
    config
}

pub(crate) fn ping(addr: &str) -> bool {
    let v6 = addr.contains(':');
    (0..20).any(|_| {
        Command::new("ping")
            .args(if v6 {
                vec!["-6", "-c1", "-W1", addr]
            } else {
                vec!["-c1", "-W1", addr]
            })
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dual_stack_guest_answers_ping_on_both_addresses_and_delete_leaves_nothing() {
    let assets = Assets::load();
    let lan = Lan::new(1);
    let d = lan.daemon(&[]);
    let created = d
        .ok(
            T,
            "CreateVm",
            json!({"vm_id": "pingable", "config": with_nic(&assets, "", json!({}))}),
        )
        .await;
    assert_eq!(created["state"], "VM_STATE_CREATED");
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": "pingable"})).await;
    let net = &info["networkInfo"];
    let ips: Vec<String> = net["ipAddress"]
        .as_str()
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(ips.len(), 2, "an IPv4 and an IPv6 address: {net}");
    assert!(
        ips[0].starts_with(lan.v4.rsplit_once(".0/").unwrap().0),
        "{ips:?} from {}",
        lan.v4
    );
    assert!(ips[1].contains(':'), "{ips:?}");
    assert!(
        net["macAddress"].as_str().unwrap().starts_with("02:"),
        "{net}"
    );
    let netns = net["networkNamespace"].as_str().unwrap().to_owned();
    assert!(
        netns_list().contains(&netns),
        "namespace {netns} exists after create"
    );

    d.ok(T, "BootVm", json!({"vm_id": "pingable"})).await;
    let console =
        d.ok(T, "GetVmInfo", json!({"vm_id": "pingable"})).await["backendInfo"]["console_log"]
            .as_str()
            .unwrap()
            .to_owned();
    let text = wait_for_console(&console, "METALD-GUEST-READY", 1, Duration::from_secs(120)).await;
    assert!(
        text.contains(&format!("METALD-NET ipv4={}", ips[0])),
        "guest configured IPv4"
    );
    if !ping(&ips[0]) {
        let diag = [
            sh("ip", &["route", "get", &ips[0]]),
            sh("ip", &["neigh", "show", &ips[0]]),
            sh("ip", &["-br", "addr", "show", &lan.bridge]),
            sh("bridge", &["link", "show"]),
            std::fs::read_to_string(&console).unwrap_or_default(),
        ];
        panic!(
            "guest does not answer ping on {}:\n{}",
            ips[0],
            diag.join("\n")
        );
    }
    assert!(ping(&ips[1]), "guest answers ping on {}", ips[1]);

    let key = crate::harness::vm_key(&d, T, "pingable").await;
    d.ok(T, "DeleteVm", json!({"vm_id": "pingable", "force": true}))
        .await;
    assert_no_devices(&lan, &[key]);
    assert!(!netns_list().contains(&netns));
    assert_eq!(leases(&d), 0, "addresses released");
}

#[tokio::test(flavor = "multi_thread")]
async fn vms_reach_each_other_unless_isolated() {
    let assets = Assets::load();
    for (n, isolate) in [(2u8, false), (3u8, true)] {
        let lan = Lan::new(n);
        let d = lan.daemon(&[
            "--network-isolate-vms",
            if isolate { "true" } else { "false" },
        ]);
        d.ok(T, "CreateVm", json!({"vm_id": "target", "config": with_nic(&assets, "", json!({"mode": "NETWORK_MODE_IPV4_ONLY"}))}))
            .await;
        let target =
            d.ok(T, "GetVmInfo", json!({"vm_id": "target"})).await["networkInfo"]["ipAddress"]
                .as_str()
                .unwrap()
                .to_owned();
        d.ok(T, "BootVm", json!({"vm_id": "target"})).await;
        let probe = with_nic(
            &assets,
            &format!("metald.ping={target}"),
            json!({"mode": "NETWORK_MODE_IPV4_ONLY"}),
        );
        d.ok(T, "CreateVm", json!({"vm_id": "prober", "config": probe}))
            .await;
        d.ok(T, "BootVm", json!({"vm_id": "prober"})).await;
        let console =
            d.ok(T, "GetVmInfo", json!({"vm_id": "prober"})).await["backendInfo"]["console_log"]
                .as_str()
                .unwrap()
                .to_owned();
        let text =
            wait_for_console(&console, "METALD-GUEST-READY", 1, Duration::from_secs(120)).await;
        let expected = format!(
            "METALD-PING {target} {}",
            if isolate { "fail" } else { "ok" }
        );
        assert!(
            text.contains(&expected),
            "isolate={isolate}: expected {expected:?} in the prober's console"
        );
        for id in ["target", "prober"] {
            d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_parallel_creates_get_distinct_addresses_and_names_and_leave_nothing() {
    let assets = Assets::load();
    let lan = Lan::new(4);
    let d = lan.daemon(&[]);
    let config = with_nic(&assets, "", json!({}));
    let url = d.url.clone();
    let creates = (0..100).map(|i| {
        let (url, config) = (url.clone(), config.clone());
        tokio::spawn(async move {
            crate::harness::connect_json(
                &url,
                T,
                "CreateVm",
                json!({"vm_id": format!("many-{i:03}"), "config": config}),
            )
            .await
        })
    });
    for c in futures_join(creates).await {
        c.expect("create succeeds");
    }
    let mut ips = HashSet::new();
    let mut namespaces = HashSet::new();
    let mut macs = HashSet::new();
    let mut keys = Vec::new();
    for i in 0..100 {
        let info = d
            .ok(T, "GetVmInfo", json!({"vm_id": format!("many-{i:03}")}))
            .await;
        keys.push(info["backendInfo"]["vm_key"].as_str().unwrap().to_owned());
        let net = &info["networkInfo"];
        for ip in net["ipAddress"].as_str().unwrap().split(',') {
            assert!(ips.insert(ip.to_owned()), "address {ip} handed out twice");
        }
        assert!(
            namespaces.insert(net["networkNamespace"].as_str().unwrap().to_owned()),
            "namespace reused"
        );
        assert!(
            macs.insert(net["macAddress"].as_str().unwrap().to_owned()),
            "MAC reused"
        );
    }
    assert_eq!((ips.len(), namespaces.len()), (200, 100));
    assert_eq!(leases(&d), 200);
    for i in 0..100 {
        d.ok(T, "DeleteVm", json!({"vm_id": format!("many-{i:03}")}))
            .await;
    }
    assert_no_devices(&lan, &keys);
    assert_eq!(leases(&d), 0, "every address released");
}

async fn futures_join<T>(tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks.collect::<Vec<_>>() {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_that_fails_after_the_namespace_was_made_leaves_nothing() {
    let assets = Assets::load();
    let lan = Lan::new(5);
    let d = lan.daemon(&[]);
    // The host bridge vanishes under metald (an operator removed it): the
    // create fails after its addresses were leased and must roll
    // everything back.
    let status = Command::new("ip")
        .args(["link", "del", &lan.bridge])
        .status()
        .unwrap();
    assert!(status.success());
    let err = d
        .call(
            T,
            "CreateVm",
            json!({"vm_id": "blocked", "config": with_nic(&assets, "", json!({}))}),
        )
        .await
        .unwrap_err();
    eprintln!("create failed as expected: {err:?}");
    assert_eq!(err.0, "internal", "{err:?}");
    assert!(
        !err.1.contains(&lan.bridge) && err.1.contains("error id"),
        "no host detail in the answer: {err:?}"
    );
    let ports_left = std::fs::read_dir(format!("/sys/class/net/{}/brif", lan.bridge)).is_ok();
    assert!(!ports_left, "the bridge is gone and stays gone");
    assert_eq!(leases(&d), 0, "addresses released");
    let gone = d
        .call(T, "GetVmInfo", json!({"vm_id": "blocked"}))
        .await
        .unwrap_err();
    assert_eq!(gone.0, "not_found", "no row left");
    // A static address outside the subnet is refused before anything is made.
    let bad = with_nic(
        &assets,
        "",
        json!({"ipv4_config": {"address": "192.0.2.7"}}),
    );
    let err = d
        .call(T, "CreateVm", json!({"vm_id": "outside", "config": bad}))
        .await
        .unwrap_err();
    assert_eq!(err.0, "invalid_argument");
    assert!(
        err.1.contains("config.network[0].ipv4_config.address"),
        "{err:?}"
    );
    assert_eq!(leases(&d), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_megabyte_per_second_limit_holds_for_traffic_to_the_guest() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let assets = Assets::load();
    let lan = Lan::new(6);
    let d = lan.daemon(&[]);
    let limit = 1_000_000u64;
    let nic = json!({"mode": "NETWORK_MODE_IPV4_ONLY", "rx_rate_limit": {"bandwidth": limit}});
    d.ok(
        T,
        "CreateVm",
        json!({"vm_id": "shaped", "config": with_nic(&assets, "metald.sink=5001", nic)}),
    )
    .await;
    let info = d.ok(T, "GetVmInfo", json!({"vm_id": "shaped"})).await;
    let ip = info["networkInfo"]["ipAddress"]
        .as_str()
        .unwrap()
        .to_owned();
    d.ok(T, "BootVm", json!({"vm_id": "shaped"})).await;
    let console =
        d.ok(T, "GetVmInfo", json!({"vm_id": "shaped"})).await["backendInfo"]["console_log"]
            .as_str()
            .unwrap()
            .to_owned();
    wait_for_console(&console, "METALD-GUEST-READY", 1, Duration::from_secs(120)).await;
    let mut conn = None;
    for _ in 0..100 {
        if let Ok(c) = tokio::net::TcpStream::connect((ip.as_str(), 5001)).await {
            conn = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = conn.expect("the guest's sink accepts connections");
    // 8 MB towards the guest; done when the guest has read it all and
    // closed its side (its nc exits on our EOF).
    let payload = vec![0x5au8; 8_000_000];
    // The first megabyte fills the socket buffers on both sides; timing
    // starts once it is written, so buffering does not count as throughput.
    let head = 1_000_000;
    conn.write_all(&payload[..head]).await.unwrap();
    let start = std::time::Instant::now();
    conn.write_all(&payload[head..]).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest).await;
    let secs = start.elapsed().as_secs_f64();
    let rate = (payload.len() - head) as f64 / secs;
    eprintln!(
        "the last 7 of 8 MB reached the guest in {secs:.2} s: {:.0} bytes/s against a limit of {limit}",
        rate
    );
    assert!(
        (0.8..=1.2).contains(&(rate / limit as f64)),
        "throughput {rate:.0} B/s is not within 20% of the {limit} B/s limit"
    );
    // The guest's traffic is metered (GetVmInfo metrics, billing samples).
    let start = std::time::Instant::now();
    loop {
        let info = d.ok(T, "GetVmInfo", json!({"vm_id": "shaped"})).await;
        let rx: i64 = info["metrics"]["networkStats"]["bytesReceived"]
            .as_str()
            .unwrap_or("0")
            .parse()
            .unwrap();
        if rx >= payload.len() as i64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "received bytes not metered: {}",
            info["metrics"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.ok(T, "DeleteVm", json!({"vm_id": "shaped", "force": true}))
        .await;
}

/// A namespace of metald's naming scheme whose bridge was never marked (a
/// crash between making the namespace and marking it) is found by the
/// reconciler and removed on its second sighting; one named for a VM a row
/// still claims is never touched.
#[tokio::test(flavor = "multi_thread")]
async fn an_unmarked_namespace_a_crash_left_is_swept_and_a_claimed_one_is_kept() {
    let assets = Assets::load();
    let lan = Lan::new(8);
    let stray = format!(
        "mtd-{:012x}",
        (u64::from(std::process::id()) << 20) ^ 0x5eed_0bad_cafe
    );
    let ok = Command::new("ip")
        .args(["netns", "add", &stray])
        .status()
        .unwrap();
    assert!(ok.success());
    let d = lan.daemon(&["--reconcile-interval", "1s"]);
    d.call(
        T,
        "CreateVm",
        json!({"vm_id": "kept", "config": with_nic(&assets, "", json!({}))}),
    )
    .await
    .unwrap();
    let key = vm_key(&d, T, "kept").await;
    let kept_ns = metald_network::Host::names(&key, 0).netns;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while netns_list().contains(&stray) {
        assert!(
            std::time::Instant::now() < deadline,
            "the unmarked namespace {stray} is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        netns_list().contains(&kept_ns),
        "a claimed VM's namespace stays"
    );
    d.call(T, "DeleteVm", json!({"vm_id": "kept"}))
        .await
        .unwrap();
    assert_no_devices(&lan, &[key]);
}
