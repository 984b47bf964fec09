//! Chaos: random lifecycle operations on 10 VMs while metald is SIGKILLed
//! and restarted at random points and VMM processes are SIGKILLed from
//! outside, with billing on against a real receiver. Afterwards, every row
//! matches reality, nothing exists that no row claims, and every VM's
//! billed samples arrived with contiguous sequence numbers (none lost, none
//! twice).
//!
//! The size fits the CI budget; the full run (docs/reliability.md) is
//! `METALD_CHAOS_OPS=500 METALD_CHAOS_KILLS=20 METALD_CHAOS_VMM_KILLS=20
//! cargo test -p metald --test api chaos -- --nocapture`.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustix::process::Signal;
use serde_json::{Value, json};

use crate::billing::{Receiver, serve, spooled_notices, spooled_samples};
use crate::harness::{Assets, connect_json, processes_mentioning, state_of};
use crate::network::{Lan, leases, netns_list, with_nic};

const T: &str = "dev_customer_chaos";
const VMS: usize = 10;
/// A size from the environment, else the CI default.
fn size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Even-numbered VMs have a network interface (namespace, veth, TAP,
/// leases), odd ones none.
fn networked(i: usize) -> bool {
    i.is_multiple_of(2)
}

fn op(rng: &mut StdRng, assets: &Assets) -> (&'static str, Value) {
    let i = rng.random_range(0..VMS);
    let id = format!("chaos-{i}");
    match rng.random_range(0..14) {
        0..=2 => {
            let config = if networked(i) {
                with_nic(assets, "", json!({}))
            } else {
                assets.config()
            };
            ("CreateVm", json!({"vm_id": id, "config": config}))
        }
        3..=6 => ("BootVm", json!({"vm_id": id})),
        7 => ("PauseVm", json!({"vm_id": id})),
        8 => ("ResumeVm", json!({"vm_id": id})),
        9 => ("RebootVm", json!({"vm_id": id})),
        10 => ("ShutdownVm", json!({"vm_id": id, "timeout_seconds": 1})),
        11 => ("ShutdownVm", json!({"vm_id": id, "force": true})),
        _ => (
            "DeleteVm",
            json!({"vm_id": id, "force": rng.random_bool(0.5)}),
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn random_operations_and_sigkills_leave_rows_matching_reality() {
    let assets = Assets::load();
    let seed: u64 = std::env::var("METALD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64);
    eprintln!("chaos seed {seed} (METALD_CHAOS_SEED={seed} repeats this run)");
    let mut rng = StdRng::seed_from_u64(seed);
    let lan = Lan::new(7);
    let recv = Receiver::default();
    let (port, _receiver) = serve(&recv, 0).await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut d = lan.daemon(&[
        "--reconcile-interval",
        "500ms",
        "--vm-shutdown-timeout",
        "1s",
        "--billing-enabled",
        "true",
        "--billing-endpoint",
        &endpoint,
        "--billing-batch-interval",
        "1s",
    ]);
    let ops = size("METALD_CHAOS_OPS", 240);
    let metald_kills = size("METALD_CHAOS_KILLS", 12);
    let vmm_kills = size("METALD_CHAOS_VMM_KILLS", 6);
    let (mut done, mut kills, mut vmms_killed) = (0, 0, 0);
    // When metald was down: (stopped, serving again), Unix ns.
    let mut down: Vec<(i64, i64)> = Vec::new();
    let mut codes: HashMap<String, usize> = HashMap::new();
    while done < ops || kills < metald_kills || vmms_killed < vmm_kills {
        // Now and then a VMM dies under metald (a guest OOM, an operator).
        let vmms = d.vmm_pids();
        if vmms_killed < vmm_kills && !vmms.is_empty() && (rng.random_bool(0.2) || done >= ops) {
            let pid = vmms[rng.random_range(0..vmms.len())];
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid).unwrap(),
                Signal::KILL,
            );
            vmms_killed += 1;
        }
        // A batch of concurrent operations; sometimes metald dies under it.
        let batch: Vec<_> = (0..rng.random_range(1..=4))
            .map(|_| op(&mut rng, &assets))
            .collect();
        done += batch.len();
        let kill = kills < metald_kills && (rng.random_bool(0.25) || done >= ops);
        let url = d.url.clone();
        let tasks: Vec<_> = batch
            .into_iter()
            .map(|(method, body)| {
                let url = url.clone();
                tokio::spawn(async move { (method, connect_json(&url, T, method, body).await) })
            })
            .collect();
        if kill {
            // Let the batch get under way, then kill at a random moment.
            tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(0..120))).await;
            down.push((now_ns(), 0));
            d.stop(Signal::KILL);
            kills += 1;
        }
        for t in tasks {
            match t.await {
                Ok((method, Err((code, msg)))) => {
                    assert!(
                        code != "internal" && code != "unknown",
                        "{method}: {code}: {msg}"
                    );
                    assert!(
                        code != "transport" || kill,
                        "{method} failed while metald was up: {msg}"
                    );
                    *codes.entry(code).or_default() += 1;
                }
                Ok((_, Ok(_))) => *codes.entry("ok".into()).or_default() += 1,
                Err(e) => panic!("request task failed: {e}"),
            }
        }
        if kill {
            d.restart();
            down.last_mut().unwrap().1 = now_ns();
        }
    }
    eprintln!(
        "{done} operations, {kills} SIGKILLs of metald, {vmms_killed} of VMMs; outcomes {codes:?}"
    );

    // One more restart: its start-up pass reconciles everything.
    let stopping = now_ns();
    assert!(d.stop(Signal::TERM).success());
    d.restart();
    down.push((stopping, now_ns()));
    let list = d.ok(T, "ListVms", json!({"page_size": 1000})).await;
    let rows: Vec<Value> = list["vms"].as_array().cloned().unwrap_or_default();
    let mut by_state: HashMap<String, usize> = HashMap::new();
    let mut claimed_pids = HashSet::new();
    let mut ids = HashSet::new();
    let mut keys: HashMap<String, String> = HashMap::new();
    for row in &rows {
        let id = row["vmId"].as_str().unwrap().to_owned();
        let state = state_of(row);
        *by_state.entry(state.clone()).or_default() += 1;
        let info = d.ok(T, "GetVmInfo", json!({"vm_id": id})).await;
        let key = info["backendInfo"]["vm_key"].as_str().unwrap().to_owned();
        let procs = processes_mentioning(&format!("-name metald-{key} "));
        let socket = d.data_dir.join("vms").join(&key).join("qmp.sock");
        if state == "VM_STATE_RUNNING" || state == "VM_STATE_PAUSED" {
            assert_eq!(
                procs.len(),
                1,
                "{id} is {state}: exactly one VMM ({procs:?})"
            );
            assert_eq!(
                info["backendInfo"]["pid"],
                procs[0].to_string(),
                "{id}: the recorded process is the real one"
            );
            // Checked now, with the process: the VMM runs inside its
            // VM's own cgroups (a later read could race its exit).
            let own = format!("/{}/{key}", crate::harness::cgroup_parent(&d.data_dir));
            let inside = crate::harness::cgroups_of(procs[0]);
            assert!(
                !inside.is_empty() && inside.iter().all(|p| *p == own),
                "{id}: its VMM {} runs in {inside:?}, not {own}",
                procs[0]
            );
            claimed_pids.insert(procs[0]);
        } else {
            assert!(procs.is_empty(), "{id} is {state} but VMMs run: {procs:?}");
            assert!(!socket.exists(), "{id} is {state} but its socket remains");
        }
        ids.insert(key.clone());
        keys.insert(id, key);
    }
    // cgroups: none that no row claims (each live VMM was found in its
    // own above).
    let cgroups = d.cgroups();
    let orphan_cgroups: Vec<&String> = cgroups.iter().filter(|c| !ids.contains(*c)).collect();
    assert!(
        orphan_cgroups.is_empty(),
        "cgroups no row claims: {orphan_cgroups:?}"
    );
    // Network: a VM with an interface owns one namespace, one bridge port
    // and two leases from create to delete; nothing else may exist.
    let namespaces = netns_list();
    let mut expected_ports = 0;
    for i in 0..VMS {
        let id = format!("chaos-{i}");
        // A deleted VM's namespace is covered by the bridge-port and lease
        // counts below: its key is gone with its row.
        let Some(key) = keys.get(&id) else { continue };
        let netns = metald_network::Host::names(key, 0).netns;
        let should = networked(i);
        assert_eq!(
            namespaces.contains(&netns),
            should,
            "{id}: namespace {netns} exists iff the VM has a network"
        );
        expected_ports += should as usize;
    }
    let ports = std::fs::read_dir(format!("/sys/class/net/{}/brif", lan.bridge))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(ports, expected_ports, "bridge ports = networked VMs");
    assert_eq!(
        leases(&d),
        2 * expected_ports as i64,
        "two leases per networked VM"
    );
    let orphan_procs: Vec<i32> = d
        .vmm_pids()
        .into_iter()
        .filter(|p| !claimed_pids.contains(p))
        .collect();
    let orphan_dirs: Vec<String> = std::fs::read_dir(d.data_dir.join("vms"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !ids.contains(n))
        .collect();
    eprintln!(
        "rows by state {by_state:?}; VMM processes {}; orphan processes {}; orphan dirs {}; \
         namespaces and bridge ports {ports} for {expected_ports} networked VMs (no orphans); \
         cgroups {} for {} live VMMs",
        claimed_pids.len(),
        orphan_procs.len(),
        orphan_dirs.len(),
        cgroups.len(),
        claimed_pids.len()
    );
    assert!(
        orphan_procs.is_empty(),
        "VMM processes no row claims: {orphan_procs:?}"
    );
    assert!(
        orphan_dirs.is_empty(),
        "VM directories no row claims: {orphan_dirs:?}"
    );

    for id in keys.keys() {
        d.ok(T, "DeleteVm", json!({"vm_id": id, "force": true}))
            .await;
    }
    assert!(
        d.vmm_pids().is_empty(),
        "nothing left after deleting every VM"
    );
    assert_eq!(leases(&d), 0, "every address released");
    assert_eq!(d.cgroups(), Vec::<String>::new(), "no cgroup left");
    let ports = std::fs::read_dir(format!("/sys/class/net/{}/brif", lan.bridge))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(ports, 0, "no bridge port left");

    // Billing: once the spool is delivered, every VM (by its host-wide
    // key) has samples 0, 1, 2, ... with none missing and none twice.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while spooled_samples(&d).await > 0 || spooled_notices(&d).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the spool was not delivered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let rec = recv.rec().clone();
    let mut total = 0;
    for (key, seqs) in &rec.by_key {
        let want: Vec<i64> = (0..seqs.len() as i64).collect();
        assert_eq!(
            seqs, &want,
            "{key}: billed sequence numbers are contiguous, each once"
        );
        total += seqs.len();
    }
    eprintln!(
        "billing: {total} samples of {} VMs, contiguous; {} gaps reported ({kills} metald kills)",
        rec.by_key.len(),
        rec.gaps_reported
    );
    assert_gaps_explained(&rec.gaps, &down, &d.log());
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// Every gap reported lies across a time metald was down, or is a stall
/// metald logged (`billing sampler stalled` with the VM and the same
/// length): no gap without a cause.
fn assert_gaps_explained(gaps: &[(String, i64, i64)], down: &[(i64, i64)], log: &str) {
    let stalls: Vec<(String, i64)> = log
        .lines()
        .map(crate::harness::without_colours)
        .filter(|l| l.contains("billing sampler stalled"))
        .filter_map(|l| {
            let field = |k: &str| {
                let rest = &l[l.find(&format!("{k}="))? + k.len() + 1..];
                Some(rest.split_whitespace().next()?.to_owned())
            };
            Some((field("vm_id")?, field("stalled_ms")?.parse().ok()?))
        })
        .collect();
    for (vm, from, to) in gaps {
        let at_a_kill = down.iter().any(|&(stop, up)| *from <= up && *to >= stop);
        // The log names the VM by its host-wide key (`<name>-<16 hex>`),
        // the billing service by its name.
        let same_vm = |key: &str| {
            key.strip_prefix(vm.as_str())
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        let a_stall = stalls
            .iter()
            .any(|(key, ms)| same_vm(key) && *ms == (to - from) / 1_000_000);
        assert!(
            at_a_kill || a_stall,
            "{vm}: a gap {from}..{to} with neither metald down ({down:?}) nor a logged stall"
        );
    }
}
