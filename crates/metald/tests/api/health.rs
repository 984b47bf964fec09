//! Health as load balancers and orchestrators read it: `GET /health` (JSON,
//! HTTP 503 while failing) and `grpc.health.v1`, both following real
//! checks: a data directory that stops taking writes makes metald
//! NOT_SERVING until it is fixed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::Daemon;

const CHECKS: [&str; 7] = [
    "store",
    "data_dir",
    "backend",
    "kvm",
    "tun",
    "billing",
    "reconcile",
];

async fn health(url: &str) -> (u16, Value) {
    let resp = reqwest::get(format!("{url}/health")).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// `grpc.health.v1.Health/Check` over Connect JSON, as any Connect client
/// (or `buf curl`) asks it.
async fn grpc_health(url: &str, service: &str) -> String {
    let resp = reqwest::Client::new()
        .post(format!("{url}/grpc.health.v1.Health/Check"))
        .header("Content-Type", "application/json")
        .body(json!({ "service": service }).to_string())
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    v["status"].as_str().unwrap_or("").to_owned()
}

/// Polls until `/health` answers `want` (bounded: the checks run every few
/// seconds).
async fn until_health(url: &str, want: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, doc) = health(url).await;
        if status == want {
            return doc;
        }
        assert!(
            Instant::now() < deadline,
            "/health stayed {status} (want {want}): {doc}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A read-only bind mount over a directory, undone on drop: root ignores
/// mode bits, a read-only mount it does not.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn over(dir: &Path) -> ReadOnly {
        let run = |args: &[&str]| {
            let s = Command::new("mount").args(args).arg(dir).arg(dir).status();
            assert!(s.unwrap().success(), "mount {args:?}");
        };
        run(&["--bind"]);
        let guard = ReadOnly(dir.to_owned());
        run(&["-o", "remount,ro,bind"]);
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_names_every_check_and_the_api_port_shows_no_details() {
    let d = Daemon::start();
    let (status, doc) = health(&d.url).await;
    assert_eq!(status, 200, "{doc}");
    assert!(
        matches!(doc["status"].as_str(), Some("ok" | "degraded")),
        "{doc}"
    );
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["uptime_seconds"].is_u64(), "{doc}");
    for name in CHECKS {
        let c = &doc["checks"][name];
        assert!(
            matches!(c["status"].as_str(), Some("ok" | "degraded" | "failing")),
            "check {name}: {doc}"
        );
        assert!(
            c.get("detail").is_none(),
            "no detail on the API port: {doc}"
        );
    }
    // What serving needs is there (QEMU runs under TCG here).
    for name in ["store", "data_dir", "backend", "kvm", "tun"] {
        assert_eq!(doc["checks"][name]["status"], "ok", "{name}: {doc}");
    }
    let text = doc.to_string();
    assert!(
        !text.contains(&*d.data_dir.to_string_lossy()),
        "no host path: {text}"
    );
    assert_eq!(grpc_health(&d.url, "").await, "SERVING");
    assert_eq!(
        grpc_health(&d.url, "vmprovisioner.v1.VmService").await,
        "SERVING"
    );
    // The operator's port (loopback by default) says what each check found.
    let (status, full) = health(&format!("http://{}", d.metrics_addr())).await;
    assert_eq!(status, 200, "{full}");
    for name in CHECKS {
        assert!(
            full["checks"][name]["detail"].is_string(),
            "detail of {name} on the metrics port: {full}"
        );
    }
    assert!(
        full["checks"]["data_dir"]["detail"]
            .as_str()
            .unwrap()
            .contains(&*d.data_dir.to_string_lossy()),
        "{full}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unwritable_data_dir_makes_metald_not_serving_until_it_is_fixed() {
    let d = Daemon::start();
    until_health(&d.url, 200).await;
    assert_eq!(grpc_health(&d.url, "").await, "SERVING");

    let ro = ReadOnly::over(&d.data_dir);
    let doc = until_health(&d.url, 503).await;
    assert_eq!(doc["status"], "failing", "{doc}");
    assert_eq!(doc["checks"]["data_dir"]["status"], "failing", "{doc}");
    assert_eq!(grpc_health(&d.url, "").await, "NOT_SERVING");
    assert_eq!(
        grpc_health(&d.url, "vmprovisioner.v1.VmService").await,
        "NOT_SERVING"
    );

    drop(ro);
    let doc = until_health(&d.url, 200).await;
    assert_eq!(doc["checks"]["data_dir"]["status"], "ok", "{doc}");
    assert_eq!(grpc_health(&d.url, "").await, "SERVING");
}

#[tokio::test(flavor = "multi_thread")]
async fn billing_that_cannot_deliver_degrades_metald_but_it_keeps_serving() {
    let assets = crate::harness::Assets::load();
    let d = Daemon::start_with(&[
        "--auth-mode",
        "dev",
        "--billing-enabled",
        "true",
        // Nothing listens on the discard port: every delivery fails.
        "--billing-endpoint",
        "http://127.0.0.1:9",
        "--billing-batch-interval",
        "200ms",
    ]);
    let t = "dev_customer_health";
    d.ok(
        t,
        "CreateVm",
        json!({"vm_id": "metered", "config": assets.config()}),
    )
    .await;
    d.ok(t, "BootVm", json!({"vm_id": "metered"})).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let doc = loop {
        let (status, doc) = health(&d.url).await;
        assert_eq!(status, 200, "billing never makes metald fail: {doc}");
        if doc["checks"]["billing"]["status"] == "degraded" {
            break doc;
        }
        assert!(Instant::now() < deadline, "billing stayed ok: {doc}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(doc["status"], "degraded", "{doc}");
    assert_eq!(grpc_health(&d.url, "").await, "SERVING");
    d.ok(t, "DeleteVm", json!({"vm_id": "metered", "force": true}))
        .await;
}
