//! Quotas and host capacity against the real binary: concurrent creates
//! never overshoot a limit, a refusal names the quota, its limit and the
//! use, the quotas file is reloaded without a restart, and a boot beyond
//! the host leaves no process.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Assets, Daemon};

const A: &str = "dev_customer_quota_a";
const B: &str = "dev_customer_quota_b";

fn write_quotas(path: &std::path::Path, json: Value) {
    // Written whole and renamed, so a reload never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn config(assets: &Assets, vcpus: u32, memory: u64) -> Value {
    let mut c = assets.config();
    c["cpu"]["vcpu_count"] = json!(vcpus);
    c["memory"]["size_bytes"] = json!(memory);
    c
}

/// `n` concurrent creates for `token`; the codes, sorted.
async fn creates(
    d: &Daemon,
    token: &'static str,
    prefix: &str,
    n: usize,
    config: Value,
) -> (usize, Vec<String>) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (url, body) = (
                d.url.clone(),
                json!({"vm_id": format!("{prefix}-{i}"), "config": config}),
            );
            tokio::spawn(async move {
                crate::harness::connect_json(&url, token, "CreateVm", body).await
            })
        })
        .collect();
    let (mut ok, mut refusals) = (0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err((code, msg)) => refusals.push(format!("{code}: {msg}")),
        }
    }
    (ok, refusals)
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_creates_against_a_quota_of_ten_make_exactly_ten() {
    let assets = Assets::load();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("quotas.json");
    let a_id = A.trim_start_matches("dev_customer_");
    write_quotas(&file, json!({"customers": {a_id: {"max_vms": 10}}}));
    let d = Daemon::start_with(&[
        "--auth-mode",
        "dev",
        "--quotas-file",
        file.to_str().unwrap(),
    ]);
    let (ok, refusals) = creates(&d, A, "vm", 50, assets.config()).await;
    assert_eq!(ok, 10, "{refusals:?}");
    assert_eq!(refusals.len(), 40);
    for r in &refusals {
        assert!(
            r.starts_with("resource_exhausted:")
                && r.contains("max_vms")
                && r.contains("limit 10, in use 10"),
            "{r}"
        );
    }
    // Another customer is not held to it.
    let (ok, _) = creates(&d, B, "vm", 12, assets.config()).await;
    assert_eq!(ok, 12);
    // Raising the quota in the file, without a restart, lets the next
    // create through.
    write_quotas(&file, json!({"customers": {a_id: {"max_vms": 11}}}));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = d
            .call(
                A,
                "CreateVm",
                json!({"vm_id": "after-raise", "config": assets.config()}),
            )
            .await;
        match r {
            Ok(_) => break,
            Err((code, msg)) => {
                assert_eq!(code, "resource_exhausted", "{msg}");
                assert!(
                    Instant::now() < deadline,
                    "the raised quota was not picked up"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let e = d
        .call(
            A,
            "CreateVm",
            json!({"vm_id": "one-too-many", "config": assets.config()}),
        )
        .await;
    assert_eq!(e.unwrap_err().0, "resource_exhausted");
}

#[tokio::test(flavor = "multi_thread")]
async fn vcpu_memory_and_rate_quotas_hold_under_concurrency() {
    let assets = Assets::load();
    let d = Daemon::start_with(&[
        "--auth-mode",
        "dev",
        "--quota-max-vcpus",
        "4",
        "--quota-max-memory",
        "512MiB",
    ]);
    let (ok, refusals) = creates(&d, A, "cpu", 6, config(&assets, 2, 128 << 20)).await;
    assert_eq!(ok, 2, "4 vCPUs hold two 2-vCPU VMs: {refusals:?}");
    assert!(
        refusals
            .iter()
            .all(|r| r.contains("max_vcpus") && r.contains("limit 4, in use 4")),
        "{refusals:?}"
    );
    let (ok, refusals) = creates(&d, B, "mem", 6, config(&assets, 1, 256 << 20)).await;
    assert_eq!(ok, 2, "512 MiB holds two 256 MiB VMs: {refusals:?}");
    assert!(
        refusals.iter().all(|r| r.contains("max_memory")),
        "{refusals:?}"
    );

    let d = Daemon::start_with(&["--auth-mode", "dev", "--quota-create-rate", "3"]);
    let (ok, refusals) = creates(&d, A, "rate", 5, assets.config()).await;
    assert_eq!(ok, 3, "a burst of the rate: {refusals:?}");
    assert!(
        refusals
            .iter()
            .all(|r| r.contains("create_rate") && r.contains("retry in")),
        "{refusals:?}"
    );
    let (ok, _) = creates(&d, B, "rate", 3, assets.config()).await;
    assert_eq!(ok, 3, "another customer has its own bucket");
}

/// A create refused for another reason (here max_vms) takes nothing from
/// the create rate: only creates that happen count.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_refused_by_another_quota_costs_no_create_rate() {
    let assets = Assets::load();
    let d = Daemon::start_with(&[
        "--auth-mode",
        "dev",
        "--quota-create-rate",
        "2",
        "--quota-max-vms",
        "1",
    ]);
    let create = |name: &str| {
        d.call(
            A,
            "CreateVm",
            json!({"vm_id": name, "config": assets.config()}),
        )
    };
    create("first").await.unwrap();
    for _ in 0..3 {
        let (code, msg) = create("second").await.unwrap_err();
        assert_eq!(code, "resource_exhausted");
        assert!(
            msg.contains("max_vms"),
            "refused by max_vms, not the rate: {msg}"
        );
    }
    d.ok(A, "DeleteVm", json!({"vm_id": "first"})).await;
    create("second")
        .await
        .expect("one create of the rate of 2 is left");
    // The two creates that happened used the whole rate.
    let (_, msg) = create("third").await.unwrap_err();
    assert!(msg.contains("create_rate"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_boot_beyond_the_host_or_the_running_quota_starts_nothing() {
    let assets = Assets::load();
    // A reserve larger than any host: no memory is left for guests.
    let d = Daemon::start_with(&["--auth-mode", "dev", "--host-memory-reserve", "1000TiB"]);
    d.ok(
        A,
        "CreateVm",
        json!({"vm_id": "big", "config": assets.config()}),
    )
    .await;
    let (code, msg) = d
        .call(A, "BootVm", json!({"vm_id": "big"}))
        .await
        .unwrap_err();
    assert_eq!(code, "resource_exhausted", "{msg}");
    assert!(msg.contains("host capacity"), "{msg}");
    assert!(
        d.vmm_pids().is_empty(),
        "no VMM process: {:?}",
        d.vmm_pids()
    );
    let info = d.ok(A, "GetVmInfo", json!({"vm_id": "big"})).await;
    assert_eq!(crate::harness::state_of(&info), "VM_STATE_CREATED");

    let d = Daemon::start_with(&["--auth-mode", "dev", "--quota-max-running-vms", "1"]);
    for id in ["one", "two"] {
        d.ok(
            A,
            "CreateVm",
            json!({"vm_id": id, "config": assets.config()}),
        )
        .await;
    }
    let boots: Vec<_> = ["one", "two"]
        .into_iter()
        .map(|id| {
            let url = d.url.clone();
            tokio::spawn(async move {
                crate::harness::connect_json(&url, A, "BootVm", json!({"vm_id": id})).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for b in boots {
        outcomes.push(b.await.unwrap().map(drop).map_err(|e| e.0));
    }
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&Err("resource_exhausted".into())),
        "{outcomes:?}"
    );
    assert_eq!(d.vmm_pids().len(), 1, "only the admitted VM runs");
    for id in ["one", "two"] {
        d.ok(A, "DeleteVm", json!({"vm_id": id, "force": true}))
            .await;
    }
}
