//! Bad input gets a clear error naming the field, and loses nothing: no
//! row, no process, no file.

use serde_json::{Value, json};

use crate::harness::{Assets, Daemon, processes_mentioning, state_of};

/// Nothing of the customer's remains: no rows, no per-VM dirs, no VMMs.
async fn assert_nothing_left(d: &Daemon, token: &str) {
    let list = d.ok(token, "ListVms", json!({})).await;
    assert_eq!(
        list["totalCount"].as_i64().unwrap_or(0),
        0,
        "rows remain: {list}"
    );
    let vms_dir = d.data_dir.join("vms");
    let leftovers: Vec<_> = std::fs::read_dir(&vms_dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "files remain: {leftovers:?}");
    assert!(
        d.vmm_pids().is_empty(),
        "processes remain: {:?}",
        d.vmm_pids()
    );
}

fn with(mut base: Value, pointer: &str, value: Value) -> Value {
    *base
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("no {pointer}")) = value;
    base
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_create_requests_name_the_field_and_leave_nothing() {
    let assets = Assets::load();
    let d = Daemon::start();
    let t = "dev_customer_val";
    let dir = d.data_dir.to_str().unwrap().to_owned();
    let req = json!({"config": assets.config()});
    let cases: Vec<(&str, Value, &str)> = vec![
        ("no config", json!({}), "config"),
        (
            "no cpu",
            json!({"config": {"memory": {"size_bytes": 134217728}, "boot": {"kernel_path": assets.kernel}}}),
            "config.cpu",
        ),
        (
            "0 vcpus",
            with(req.clone(), "/config/cpu/vcpu_count", json!(0)),
            "config.cpu.vcpu_count",
        ),
        (
            "33 vcpus",
            with(req.clone(), "/config/cpu/vcpu_count", json!(33)),
            "config.cpu.vcpu_count",
        ),
        (
            "tiny memory",
            with(req.clone(), "/config/memory/size_bytes", json!(63 << 20)),
            "config.memory.size_bytes",
        ),
        (
            "odd memory",
            with(
                req.clone(),
                "/config/memory/size_bytes",
                json!((128 << 20) + 1),
            ),
            "config.memory.size_bytes",
        ),
        (
            "missing kernel",
            with(
                req.clone(),
                "/config/boot/kernel_path",
                json!("/nonexistent/vmlinux"),
            ),
            "config.boot.kernel_path",
        ),
        (
            "kernel is a dir",
            with(req.clone(), "/config/boot/kernel_path", json!(dir)),
            "config.boot.kernel_path",
        ),
        (
            "relative kernel",
            with(req.clone(), "/config/boot/kernel_path", json!("vmlinux")),
            "config.boot.kernel_path",
        ),
        (
            "missing initrd",
            with(
                req.clone(),
                "/config/boot/initrd_path",
                json!("/nonexistent/initrd"),
            ),
            "config.boot.initrd_path",
        ),
        (
            "missing disk",
            with(
                req.clone(),
                "/config/storage/0/path",
                json!("/nonexistent/disk"),
            ),
            "config.storage[0].path",
        ),
        (
            "duplicate disk ids",
            with(
                req.clone(),
                "/config/storage",
                json!([{"id": "d", "path": assets.disk}, {"id": "d", "path": assets.disk}]),
            ),
            "config.storage[1].id",
        ),
        (
            "bad vm_id charset",
            {
                let mut r = req.clone();
                r["vm_id"] = json!("bad id!");
                r
            },
            "vm_id",
        ),
        (
            "vm_id too long",
            {
                let mut r = req.clone();
                r["vm_id"] = json!("x".repeat(65));
                r
            },
            "vm_id",
        ),
    ];
    // Files the caller may not use (here: missing, or not a regular file)
    // are refused as permission_denied; malformed input as invalid_argument.
    let denied = [
        "missing kernel",
        "kernel is a dir",
        "missing initrd",
        "missing disk",
    ];
    for (name, body, field) in cases {
        let e = d.call(t, "CreateVm", body).await.unwrap_err();
        let code = if denied.contains(&name) {
            "permission_denied"
        } else {
            "invalid_argument"
        };
        assert_eq!(e.0, code, "{name}: {e:?}");
        assert!(
            e.1.contains(field),
            "{name}: message {:?} should name {field}",
            e.1
        );
    }
    assert_nothing_left(&d, t).await;

    // A client-chosen id that exists answers already_exists, and the first
    // VM is unchanged.
    let mut named = req.clone();
    named["vm_id"] = json!("taken");
    d.ok(t, "CreateVm", named.clone()).await;
    let e = d.call(t, "CreateVm", named).await.unwrap_err();
    assert_eq!(e.0, "already_exists");
    assert_eq!(d.ok(t, "ListVms", json!({})).await["totalCount"], 1);
    d.ok(t, "DeleteVm", json!({"vm_id": "taken"})).await;

    // Other RPCs validate too.
    for (method, body, field) in [
        ("BootVm", json!({"vm_id": ""}), "vm_id"),
        ("GetVmInfo", json!({"vm_id": "a/b"}), "vm_id"),
        (
            "ShutdownVm",
            json!({"vm_id": "x", "timeout_seconds": -1}),
            "timeout_seconds",
        ),
        ("ListVms", json!({"page_size": -1}), "page_size"),
        ("ListVms", json!({"page_token": "garbage"}), "page_token"),
        ("ListVms", json!({"state_filter": [99]}), "state_filter[0]"),
    ] {
        let e = d.call(t, method, body).await.unwrap_err();
        assert_eq!(e.0, "invalid_argument", "{method}: {e:?}");
        assert!(
            e.1.contains(field),
            "{method}: {:?} should name {field}",
            e.1
        );
    }
    assert_nothing_left(&d, t).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_boot_the_vmm_refuses_leaves_no_process_or_file() {
    let assets = Assets::load();
    let d = Daemon::start();
    let t = "dev_customer_badboot";
    // A regular file that is not a kernel passes validation; QEMU refuses it.
    std::fs::create_dir_all(d.data_dir.join("assets")).unwrap();
    let bogus = d.data_dir.join("assets/not-a-kernel");
    std::fs::write(&bogus, b"this is not a kernel").unwrap();
    let mut body = json!({"vm_id": "bogus", "config": assets.config()});
    body["config"]["boot"]["kernel_path"] = json!(bogus.to_str().unwrap());
    d.ok(t, "CreateVm", body).await;
    let e = d
        .call(t, "BootVm", json!({"vm_id": "bogus"}))
        .await
        .unwrap_err();
    // The VMM's own reason, as a precondition the request did not meet.
    assert_eq!(e.0, "failed_precondition", "{e:?}");
    assert!(e.1.contains("qemu"), "{e:?}");
    let info = d.ok(t, "GetVmInfo", json!({"vm_id": "bogus"})).await;
    assert_eq!(
        state_of(&info),
        "VM_STATE_CREATED",
        "a failed boot keeps the previous state"
    );
    assert!(processes_mentioning("metald-bogus").is_empty());
    assert!(
        crate::harness::vm_dirs(&d, "bogus").is_empty(),
        "per-VM files remain after a failed boot"
    );
    d.ok(t, "DeleteVm", json!({"vm_id": "bogus"})).await;
    assert_nothing_left(&d, t).await;
}

/// Calls every operation that the state machine forbids in the VM's
/// current state and checks each is refused, naming the state, with the
/// state unchanged.
async fn refuse_all(d: &Daemon, t: &str, id: &str, state: &str, forbidden: &[&str]) {
    for method in forbidden {
        let e = d.call(t, method, json!({"vm_id": id})).await.unwrap_err();
        assert_eq!(e.0, "failed_precondition", "{method} in {state}: {e:?}");
        assert!(
            e.1.contains(state),
            "{method}: {:?} should name state {state}",
            e.1
        );
        let now = d.ok(t, "GetVmInfo", json!({"vm_id": id})).await;
        assert_eq!(
            now["state"].as_str().unwrap().to_lowercase(),
            format!("vm_state_{state}"),
            "{method}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_illegal_transition_is_failed_precondition() {
    let assets = Assets::load();
    let d = Daemon::start();
    let t = "dev_customer_fsm";
    let id = d
        .ok(t, "CreateVm", json!({"config": assets.config()}))
        .await["vmId"]
        .as_str()
        .unwrap()
        .to_owned();
    refuse_all(
        &d,
        t,
        &id,
        "created",
        &["PauseVm", "ResumeVm", "RebootVm", "ShutdownVm"],
    )
    .await;
    d.ok(t, "BootVm", json!({"vm_id": id})).await;
    refuse_all(&d, t, &id, "running", &["BootVm", "ResumeVm"]).await;
    d.ok(t, "PauseVm", json!({"vm_id": id})).await;
    refuse_all(&d, t, &id, "paused", &["BootVm", "PauseVm", "RebootVm"]).await;
    d.ok(t, "ShutdownVm", json!({"vm_id": id, "force": true}))
        .await;
    refuse_all(
        &d,
        t,
        &id,
        "shutdown",
        &["PauseVm", "ResumeVm", "RebootVm", "ShutdownVm"],
    )
    .await;
    d.ok(t, "BootVm", json!({"vm_id": id})).await;
    let pid = processes_mentioning(&format!("metald-{id}"))[0];
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while state_of(&d.ok(t, "GetVmInfo", json!({"vm_id": id})).await) != "VM_STATE_FAILED" {
        assert!(std::time::Instant::now() < deadline, "crash not noticed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    refuse_all(
        &d,
        t,
        &id,
        "failed",
        &["PauseVm", "ResumeVm", "RebootVm", "ShutdownVm"],
    )
    .await;
    d.ok(t, "DeleteVm", json!({"vm_id": id})).await;
    assert_nothing_left(&d, t).await;
}
