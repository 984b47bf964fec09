//! metald with the tools people already use: `buf curl` (installed by
//! scripts/setup.sh, pinned) finds the services through gRPC reflection and
//! calls them over Connect, gRPC and gRPC-Web, health included.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::harness::{Assets, Daemon};

const T: &str = "dev_customer_buf";

fn buf() -> PathBuf {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../.metald/tools/node_modules/.bin/buf"
    ));
    assert!(
        path.exists(),
        "{}: missing; run scripts/setup.sh (the README's test command does)",
        path.display()
    );
    path
}

/// `buf curl` with `args`; its stdout, which must be a success.
fn buf_curl(args: &[&str]) -> String {
    let out = Command::new(buf())
        .arg("curl")
        .arg("--http2-prior-knowledge")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "buf curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn buf_curl_lists_services_by_reflection_and_calls_them_over_every_protocol() {
    let assets = Assets::load();
    let d = Daemon::start();
    let services = buf_curl(&["--list-services", &d.url]);
    let listed: Vec<&str> = services.lines().collect();
    for s in [
        "vmprovisioner.v1.VmService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(listed.contains(&s), "{s} listed: {listed:?}");
    }
    assert!(
        !listed.contains(&"billing.v1.BillingService"),
        "only what the port serves is listed: {listed:?}"
    );
    d.ok(
        T,
        "CreateVm",
        json!({"vm_id": "curled", "config": assets.config()}),
    )
    .await;
    let auth = format!("authorization: Bearer {T}");
    for protocol in ["connect", "grpc", "grpcweb"] {
        let out = buf_curl(&[
            "--protocol",
            protocol,
            "-H",
            &auth,
            "-d",
            "{}",
            &format!("{}/vmprovisioner.v1.VmService/ListVms", d.url),
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["vms"][0]["vmId"], "curled", "{protocol}: {v}");
        assert_eq!(v["totalCount"], 1, "{protocol}: {v}");
        let health = buf_curl(&[
            "--protocol",
            protocol,
            "-d",
            "{}",
            &format!("{}/grpc.health.v1.Health/Check", d.url),
        ]);
        let v: Value = serde_json::from_str(&health).unwrap();
        assert_eq!(v["status"], "SERVING", "{protocol}: {v}");
    }
    d.ok(T, "DeleteVm", json!({"vm_id": "curled"})).await;
}
