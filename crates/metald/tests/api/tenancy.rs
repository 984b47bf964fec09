//! One customer never sees or touches another's VMs; bad credentials are
//! refused before anything happens.

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::harness::{Assets, Daemon, connect_json};

const METHODS_ON_A_VM: [&str; 8] = [
    "GetVmInfo",
    "BootVm",
    "PauseVm",
    "ResumeVm",
    "RebootVm",
    "ShutdownVm",
    "DeleteVm",
    "GetVmInfo",
];

#[tokio::test(flavor = "multi_thread")]
async fn customers_see_only_their_own_vms() {
    let assets = Assets::load();
    let d = Daemon::start();
    let (a, b) = ("dev_customer_a", "dev_customer_b");
    let vm_a = d
        .ok(
            a,
            "CreateVm",
            json!({"vm_id": "shared-name-a", "config": assets.config()}),
        )
        .await;
    let vm_b = d
        .ok(b, "CreateVm", json!({"config": assets.config()}))
        .await;
    let (id_a, id_b) = (
        vm_a["vmId"].as_str().unwrap(),
        vm_b["vmId"].as_str().unwrap(),
    );

    let list_a = d.ok(a, "ListVms", json!({})).await;
    let list_b = d.ok(b, "ListVms", json!({})).await;
    let ids = |v: &Value| {
        v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["vmId"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&list_a), vec![id_a.to_owned()]);
    assert_eq!(ids(&list_b), vec![id_b.to_owned()]);
    assert_eq!(list_a["totalCount"], 1);
    assert_eq!(list_a["vms"][0]["customerId"], "a");

    for method in METHODS_ON_A_VM {
        let cross = d.call(b, method, json!({"vm_id": id_a})).await.unwrap_err();
        let missing = d
            .call(b, method, json!({"vm_id": "no-such-vm"}))
            .await
            .unwrap_err();
        assert_eq!(cross.0, "not_found", "{method} on another tenant's VM");
        assert_eq!(missing.0, "not_found", "{method} on a missing VM");
        // Indistinguishable apart from the id itself.
        assert_eq!(
            cross.1.replace(id_a, "X"),
            missing.1.replace("no-such-vm", "X"),
            "{method}"
        );
    }
    // A's VM is untouched by B's attempts.
    let info = d.ok(a, "GetVmInfo", json!({"vm_id": id_a})).await;
    assert_eq!(info["state"], "VM_STATE_CREATED");

    // customer_id in CreateVm may only repeat the caller's own.
    let e = d
        .call(
            a,
            "CreateVm",
            json!({"customer_id": "b", "config": assets.config()}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.0, "invalid_argument");
    assert!(e.1.contains("customer_id"), "{}", e.1);
    d.ok(
        a,
        "CreateVm",
        json!({"customer_id": "a", "config": assets.config()}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_malformed_tokens_are_unauthenticated() {
    let d = Daemon::start();
    for token in ["", "not-a-dev-token", "dev_customer_"] {
        let e = connect_json(&d.url, token, "ListVms", json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.0, "unauthenticated", "token {token:?}");
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn hs256(claims: Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_mode_accepts_only_valid_tokens() {
    let assets = Assets::load();
    let secret = b"metald-test-secret-0123456789";
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), secret).unwrap();
    let d = Daemon::start_with(&[
        "--auth-mode",
        "jwt",
        "--jwt-secret-file",
        key_file.path().to_str().unwrap(),
    ]);

    let good = hs256(json!({"sub": "acme", "exp": now() + 300}), secret);
    let created = d
        .ok(&good, "CreateVm", json!({"config": assets.config()}))
        .await;
    let listed = d.ok(&good, "ListVms", json!({})).await;
    assert_eq!(listed["vms"][0]["vmId"], created["vmId"]);
    assert_eq!(listed["vms"][0]["customerId"], "acme");

    let wrong_key = hs256(
        json!({"sub": "acme", "exp": now() + 300}),
        b"another-secret-entirely",
    );
    let expired = hs256(json!({"sub": "acme", "exp": now() - 600}), secret);
    let alg_none = {
        use base64::Engine;
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(json!({"sub": "acme", "exp": now() + 300}))
        )
    };
    for (name, token) in [
        ("wrong key", wrong_key),
        ("expired", expired),
        ("alg none", alg_none),
        ("dev token in jwt mode", "dev_customer_acme".to_owned()),
    ] {
        let e = d.call(&token, "ListVms", json!({})).await.unwrap_err();
        assert_eq!(e.0, "unauthenticated", "{name}: {e:?}");
    }
}
