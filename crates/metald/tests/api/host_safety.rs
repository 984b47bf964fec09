//! A customer reaches only its own VMs and files: asset roots, names per
//! customer, and answers that tell nothing about the host.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::{Value, json};

use crate::harness::{Assets, Daemon, processes_mentioning, vm_dirs};

const A: &str = "dev_customer_alpha";
const B: &str = "dev_customer_beta";

/// Nothing of the customer's remains: no row, no per-VM dir, no VMM.
async fn assert_nothing(d: &Daemon, token: &str) {
    let list = d.ok(token, "ListVms", json!({})).await;
    assert_eq!(list["totalCount"].as_i64().unwrap_or(0), 0, "{list}");
    let dirs: Vec<_> = std::fs::read_dir(d.data_dir.join("vms"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(dirs.is_empty(), "files remain: {dirs:?}");
    assert!(d.vmm_pids().is_empty(), "VMMs remain: {:?}", d.vmm_pids());
}

fn set(mut v: Value, pointer: &str, value: &str) -> Value {
    *v.pointer_mut(pointer).unwrap() = json!(value);
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_outside_the_asset_roots_are_refused_alike_and_nothing_is_made() {
    let assets = Assets::load();
    let d = Daemon::start();
    let root = d.data_dir.join("assets");
    let mine = root.join("customers/alpha");
    std::fs::create_dir_all(&mine).unwrap();
    let outside = d.data_dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("link-out")).unwrap();
    // A host block device node, listed nowhere.
    let dev = root.join("blockdev");
    let made = std::process::Command::new("mknod")
        .arg(&dev)
        .args(["b", "7", "251"])
        .status()
        .unwrap();
    assert!(made.success());
    let s = |p: &Path| p.display().to_string();
    let forbidden = [
        "/etc/shadow".to_owned(),
        s(&outside.join("secret")),
        format!("{}/../outside/secret", root.display()),
        s(&root.join("link-out")),
        s(&dev),
    ];
    let missing = s(&root.join("no-such-file"));
    let base = json!({"config": assets.config()});
    for field in [
        "/config/boot/kernel_path",
        "/config/boot/initrd_path",
        "/config/storage/0/path",
    ] {
        let wire = match field {
            "/config/boot/kernel_path" => "config.boot.kernel_path",
            "/config/boot/initrd_path" => "config.boot.initrd_path",
            _ => "config.storage[0].path",
        };
        let answer = |p: String| {
            let body = set(base.clone(), field, &p);
            let d = &d;
            async move { d.call(A, "CreateVm", body).await.unwrap_err() }
        };
        let want = answer(missing.clone()).await;
        assert_eq!(want.0, "permission_denied", "{field}: {want:?}");
        assert!(want.1.contains(wire), "{field}: {want:?}");
        for p in &forbidden {
            let got = answer(p.clone()).await;
            assert_eq!(
                got, want,
                "{field} = {p}: a forbidden file answers like a missing one"
            );
            assert!(!got.1.contains(p.as_str()), "no host path echoed: {got:?}");
        }
    }
    // A writable disk from a shared root is refused the same way; from the
    // customer's own root it is accepted.
    let shared_disk = set(base.clone(), "/config/storage/0/path", &assets.disk);
    let mut writable = shared_disk.clone();
    writable["config"]["storage"][0]["read_only"] = json!(false);
    let e = d.call(A, "CreateVm", writable).await.unwrap_err();
    assert_eq!(e.0, "permission_denied", "{e:?}");
    assert_nothing(&d, A).await;

    // A file swapped for a link after CreateVm is refused at BootVm, and
    // the VM stays as it was.
    let kernel = mine.join("vmlinux");
    std::fs::copy(&assets.kernel, &kernel).unwrap();
    let body = set(base.clone(), "/config/boot/kernel_path", &s(&kernel));
    let mut body = body;
    body["vm_id"] = json!("swapped");
    d.ok(A, "CreateVm", body).await;
    std::fs::remove_file(&kernel).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), &kernel).unwrap();
    let e = d
        .call(A, "BootVm", json!({"vm_id": "swapped"}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "permission_denied", "{e:?}");
    assert!(e.1.contains("config.boot.kernel_path"), "{e:?}");
    let info = d.ok(A, "GetVmInfo", json!({"vm_id": "swapped"})).await;
    assert_eq!(info["state"], "VM_STATE_CREATED");
    assert!(vm_dirs(&d, "swapped").is_empty(), "nothing was started");
    assert!(d.vmm_pids().is_empty());
    d.ok(A, "DeleteVm", json!({"vm_id": "swapped"})).await;
    assert_nothing(&d, A).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writable_disk_belongs_to_one_vm_and_another_customer_cannot_see_it() {
    let assets = Assets::load();
    let d = Daemon::start();
    let mine = d.data_dir.join("assets/customers/alpha");
    std::fs::create_dir_all(&mine).unwrap();
    let disk = mine.join("data.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let with_disk = |id: &str, read_only: bool| {
        let mut c = assets.config();
        c["storage"].as_array_mut().unwrap().push(
            json!({"id": "data", "path": disk.display().to_string(), "read_only": read_only}),
        );
        json!({"vm_id": id, "config": c})
    };
    d.ok(A, "CreateVm", with_disk("holder", false)).await;
    for (id, ro) in [("two", false), ("three", true)] {
        let e = d.call(A, "CreateVm", with_disk(id, ro)).await.unwrap_err();
        assert_eq!(e.0, "failed_precondition", "{id}: {e:?}");
        assert!(e.1.contains("config.storage[1].path"), "{e:?}");
        assert!(!e.1.contains("holder"), "names no VM: {e:?}");
    }
    // Another customer is told nothing: the file is not theirs to use.
    let e = d
        .call(B, "CreateVm", with_disk("x", true))
        .await
        .unwrap_err();
    assert_eq!(e.0, "permission_denied", "{e:?}");
    // Once the writer is gone the file is free again.
    d.ok(A, "DeleteVm", json!({"vm_id": "holder"})).await;
    d.ok(A, "CreateVm", with_disk("two", false)).await;
    d.ok(A, "DeleteVm", json!({"vm_id": "two"})).await;
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "mode untouched");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_customers_each_have_their_own_web_1() {
    let assets = Assets::load();
    let d = Daemon::start();
    let body = json!({"vm_id": "web-1", "config": assets.config()});
    let (a, b) = tokio::join!(
        d.call(A, "CreateVm", body.clone()),
        d.call(B, "CreateVm", body.clone())
    );
    assert_eq!(a.unwrap()["vmId"], "web-1");
    assert_eq!(b.unwrap()["vmId"], "web-1");
    // The same name twice for one customer is still refused.
    let e = d.call(A, "CreateVm", body.clone()).await.unwrap_err();
    assert_eq!(e.0, "already_exists");
    for t in [A, B] {
        let list = d.ok(t, "ListVms", json!({})).await;
        assert_eq!(list["totalCount"], 1, "{t}: {list}");
        let cust = t.trim_start_matches("dev_customer_");
        assert_eq!(list["vms"][0]["customerId"], cust);
    }
    // Two VMs, two keys: nothing on the host is shared.
    let ka = crate::harness::vm_key(&d, A, "web-1").await;
    let kb = crate::harness::vm_key(&d, B, "web-1").await;
    assert_ne!(ka, kb);
    // Booting A's leaves B's alone.
    d.ok(A, "BootVm", json!({"vm_id": "web-1"})).await;
    let bi = d.ok(B, "GetVmInfo", json!({"vm_id": "web-1"})).await;
    assert_eq!(bi["state"], "VM_STATE_CREATED");
    // B's own VM that A does not have: every RPC of A answers not_found,
    // exactly as for a name nobody has.
    d.ok(
        B,
        "CreateVm",
        json!({"vm_id": "only-b", "config": assets.config()}),
    )
    .await;
    for method in [
        "BootVm",
        "ShutdownVm",
        "PauseVm",
        "ResumeVm",
        "RebootVm",
        "GetVmInfo",
        "DeleteVm",
    ] {
        let theirs = d
            .call(A, method, json!({"vm_id": "only-b"}))
            .await
            .unwrap_err();
        let nobodys = d
            .call(A, method, json!({"vm_id": "only-nobody"}))
            .await
            .unwrap_err();
        assert_eq!(theirs.0, "not_found", "{method}: {theirs:?}");
        assert_eq!(
            theirs.1.replace("only-b", "X"),
            nobodys.1.replace("only-nobody", "X"),
            "{method}: the answers are the same"
        );
    }
    d.ok(A, "DeleteVm", json!({"vm_id": "web-1", "force": true}))
        .await;
    let still = d.ok(B, "GetVmInfo", json!({"vm_id": "web-1"})).await;
    assert_eq!(still["vmId"], "web-1");
    for id in ["web-1", "only-b"] {
        d.ok(B, "DeleteVm", json!({"vm_id": id})).await;
    }
    assert_nothing(&d, A).await;
    assert_nothing(&d, B).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_config_names_the_vmms_reason_but_no_host_path() {
    let assets = Assets::load();
    let d = Daemon::start();
    let root = d.data_dir.join("assets");
    std::fs::create_dir_all(&root).unwrap();
    let bogus = root.join("not-a-kernel");
    std::fs::write(&bogus, b"this is not a kernel").unwrap();
    let mut body = json!({"vm_id": "bogus", "config": assets.config()});
    body["config"]["boot"]["kernel_path"] = json!(bogus.display().to_string());
    d.ok(A, "CreateVm", body).await;
    let e = d
        .call(A, "BootVm", json!({"vm_id": "bogus"}))
        .await
        .unwrap_err();
    assert_eq!(e.0, "failed_precondition", "{e:?}");
    assert!(e.1.contains("refused"), "{e:?}");
    let data = d.data_dir.display().to_string();
    // The client's own path may be named; metald's files never.
    let without_own = e.1.replace(&bogus.display().to_string(), "");
    assert!(!without_own.contains(&data), "{e:?}");
    assert!(
        !e.1.contains("qmp.sock") && !e.1.contains("console.log"),
        "{e:?}"
    );
    assert!(!e.1.contains('\n'), "one line: {e:?}");
    let id =
        e.1.rsplit("error id ")
            .next()
            .unwrap()
            .trim_end_matches(')');
    assert_eq!(id.len(), 12, "{e:?}");
    let detailed = |l: &str| l.contains(id) && l.contains("qemu");
    assert!(
        d.log_when(detailed).await.lines().any(detailed),
        "the log has the details under error id {id}"
    );
    // GetVmInfo's last_error tells no more than the answer did.
    let info = d.ok(A, "GetVmInfo", json!({"vm_id": "bogus"})).await;
    let last = info["backendInfo"]["last_error"].as_str().unwrap_or("");
    assert!(
        !last
            .replace(&bogus.display().to_string(), "")
            .contains(&data),
        "{last}"
    );
    d.ok(A, "DeleteVm", json!({"vm_id": "bogus"})).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn network_kernel_args_cannot_be_passed_by_a_client() {
    let assets = Assets::load();
    let d = Daemon::start();
    for args in [
        "ip=10.0.0.9::10.0.0.1:255.0.0.0::eth0:off",
        "metald.ip6=fd00::9/64",
        "metald.gw6=fd00::1",
    ] {
        let mut c = assets.config();
        c["boot"]["kernel_args"] = json!(format!("{} {args}", assets.kernel_args));
        let e = d
            .call(A, "CreateVm", json!({"config": c}))
            .await
            .unwrap_err();
        assert_eq!(e.0, "invalid_argument", "{args}: {e:?}");
        assert!(e.1.contains("config.boot.kernel_args"), "{e:?}");
    }
    assert_nothing(&d, A).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_vm_info_shows_a_customer_no_host_detail_unless_the_operator_asks() {
    let assets = Assets::load();
    // The default, which the suite's other daemons override to read the
    // VMs' files.
    let d = Daemon::start_with(&["--auth-mode", "dev", "--vm-info-host-details", "false"]);
    let body = json!({"vm_id": "quiet", "config": assets.config()});
    d.ok(A, "CreateVm", body).await;
    d.ok(A, "BootVm", json!({"vm_id": "quiet"})).await;
    let info = d.ok(A, "GetVmInfo", json!({"vm_id": "quiet"})).await;
    let shown = info["backendInfo"].as_object().unwrap();
    for (k, v) in shown {
        let v = v.as_str().unwrap_or_default();
        assert!(!v.starts_with('/'), "{k} shows a host path: {v}");
    }
    let text = info.to_string();
    let data = d.data_dir.to_string_lossy();
    assert!(!text.contains(&*data), "the data dir leaks: {text}");
    // Nor the VMM's host pid; what a customer and the operator need to
    // talk about the VM stays.
    assert!(!shown.contains_key("pid"), "the host pid leaks: {info}");
    for k in ["vm_key", "vmm", "process_alive"] {
        assert!(shown.contains_key(k), "{k} missing: {info}");
    }
    // The operator finds the VMM by the key, as the docs say.
    let key = shown["vm_key"].as_str().unwrap();
    assert_eq!(processes_mentioning(key).len(), 1, "one VMM names {key}");
    // An operator who asks gets the paths and the pid.
    let open = Daemon::start_with(&["--auth-mode", "dev", "--vm-info-host-details", "true"]);
    let body = json!({"vm_id": "open", "config": assets.config()});
    open.ok(A, "CreateVm", body).await;
    open.ok(A, "BootVm", json!({"vm_id": "open"})).await;
    let info = open.ok(A, "GetVmInfo", json!({"vm_id": "open"})).await;
    let console = info["backendInfo"]["console_log"]
        .as_str()
        .unwrap_or_default();
    assert!(
        console.starts_with(&*open.data_dir.to_string_lossy()),
        "{info}"
    );
    assert!(info["backendInfo"]["pid"].as_str().is_some(), "{info}");
}
