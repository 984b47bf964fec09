//! The whole lifecycle of a real guest, over every protocol.

use std::time::Duration;

use connectrpc::Protocol;
use connectrpc::client::{ClientConfig, Http2Connection, HttpClient};
use metald_proto::vmprovisioner::v1 as pb;
use serde_json::json;

use crate::harness::{Assets, Daemon, state_of, wait_for_console};

const BOOT: Duration = Duration::from_secs(120);
const MARKER: &str = "METALD-GUEST-READY";

/// Asserts no process and no file of `vm_id` remains.
fn assert_gone(d: &Daemon, vm_id: &str) {
    let procs = crate::harness::processes_mentioning(&format!("metald-{vm_id}"));
    assert!(
        procs.is_empty(),
        "VMM processes of {vm_id} remain: {procs:?}"
    );
    let dirs = crate::harness::vm_dirs(d, vm_id);
    assert!(dirs.is_empty(), "{dirs:?} remain");
}

fn vmm_count(vm_id: &str) -> usize {
    crate::harness::processes_mentioning(&format!("metald-{vm_id}")).len()
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_json_lifecycle_boots_a_real_guest_and_leaves_nothing() {
    let assets = Assets::load();
    let d = Daemon::start();
    let t = "dev_customer_alice";

    let created = d
        .ok(t, "CreateVm", json!({"config": assets.config()}))
        .await;
    let id = created["vmId"].as_str().expect("vm id").to_owned();
    assert_eq!(state_of(&created), "VM_STATE_CREATED");
    assert_eq!(vmm_count(&id), 0, "create must not start a VMM");

    let booted = d.ok(t, "BootVm", json!({"vm_id": id})).await;
    assert_eq!(state_of(&booted), "VM_STATE_RUNNING");
    assert_eq!(vmm_count(&id), 1);
    let info = d.ok(t, "GetVmInfo", json!({"vm_id": id})).await;
    assert_eq!(state_of(&info), "VM_STATE_RUNNING");
    assert_eq!(info["config"]["cpu"]["vcpuCount"], 1);
    assert_eq!(info["backendInfo"]["vmm"], "qemu");
    let console = info["backendInfo"]["console_log"]
        .as_str()
        .expect("console_log")
        .to_owned();
    let text = wait_for_console(&console, MARKER, 1, BOOT).await;
    assert!(text.contains("kernel="), "marker names the kernel: {text}");
    // Billing is off in tests, yet the VM is metered for GetVmInfo.
    let info = d.ok(t, "GetVmInfo", json!({"vm_id": id})).await;
    let metrics = &info["metrics"];
    let memory: i64 = metrics["memoryUsageBytes"]
        .as_str()
        .unwrap_or("0")
        .parse()
        .unwrap();
    assert!(
        memory > 16 << 20,
        "a booted guest's VMM uses memory: {metrics}"
    );

    let paused = d.ok(t, "PauseVm", json!({"vm_id": id})).await;
    assert_eq!(state_of(&paused), "VM_STATE_PAUSED");
    let info = d.ok(t, "GetVmInfo", json!({"vm_id": id})).await;
    assert_eq!(state_of(&info), "VM_STATE_PAUSED");
    let resumed = d.ok(t, "ResumeVm", json!({"vm_id": id})).await;
    assert_eq!(state_of(&resumed), "VM_STATE_RUNNING");

    let rebooted = d.ok(t, "RebootVm", json!({"vm_id": id})).await;
    assert_eq!(state_of(&rebooted), "VM_STATE_RUNNING");
    wait_for_console(&console, MARKER, 2, BOOT).await;

    let down = d
        .ok(t, "ShutdownVm", json!({"vm_id": id, "timeout_seconds": 20}))
        .await;
    assert_eq!(state_of(&down), "VM_STATE_SHUTDOWN");
    assert_eq!(vmm_count(&id), 0, "shutdown leaves no VMM");

    let again = d.ok(t, "BootVm", json!({"vm_id": id})).await;
    assert_eq!(state_of(&again), "VM_STATE_RUNNING");
    wait_for_console(&console, MARKER, 1, BOOT).await;
    let forced = d
        .ok(t, "ShutdownVm", json!({"vm_id": id, "force": true}))
        .await;
    assert_eq!(state_of(&forced), "VM_STATE_SHUTDOWN");
    assert_eq!(vmm_count(&id), 0);

    d.ok(t, "BootVm", json!({"vm_id": id})).await;
    let deleted = d
        .ok(t, "DeleteVm", json!({"vm_id": id, "force": true}))
        .await;
    assert_eq!(deleted["success"], true);
    let gone = d
        .call(t, "GetVmInfo", json!({"vm_id": id}))
        .await
        .unwrap_err();
    assert_eq!(gone.0, "not_found");
    assert_gone(&d, &id);
}

/// Drives the lifecycle with the generated client over one protocol.
async fn lifecycle_with_client<T>(client: pb::VmServiceClient<T>, assets: &Assets, d: &Daemon)
where
    T: connectrpc::client::ClientTransport,
    <T::ResponseBody as connectrpc::http_body::Body>::Error: std::fmt::Display,
{
    let config: pb::VmConfig = serde_json::from_value(assets.config()).unwrap();
    let created = client
        .create_vm(pb::CreateVmRequest {
            config: buffa::MessageField::some(config),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_owned();
    let id = created.vm_id.clone();
    assert_eq!(
        created.state.as_known(),
        Some(pb::VmState::VM_STATE_CREATED)
    );
    let r = client
        .boot_vm(pb::BootVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    let info = client
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    wait_for_console(&info.backend_info["console_log"], MARKER, 1, BOOT).await;
    let r = client
        .pause_vm(pb::PauseVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_PAUSED));
    let r = client
        .resume_vm(pb::ResumeVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    let r = client
        .reboot_vm(pb::RebootVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_RUNNING));
    let r = client
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: id.clone(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(r.state.as_known(), Some(pb::VmState::VM_STATE_SHUTDOWN));
    let list = client
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_owned();
    assert_eq!(list.total_count, 1);
    assert_eq!(list.vms[0].vm_id, id);
    let r = client
        .delete_vm(pb::DeleteVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert!(r.success);
    let err = client
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, connectrpc::ErrorCode::NotFound);
    assert_gone(d, &id);
}

fn client_config(d: &Daemon, protocol: Protocol, token: &str) -> ClientConfig {
    ClientConfig::new(d.url.parse().unwrap())
        .with_protocol(protocol)
        .with_default_header("authorization", format!("Bearer {token}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_lifecycle_with_the_generated_client() {
    let assets = Assets::load();
    let d = Daemon::start();
    let conn = Http2Connection::connect_plaintext(d.url.parse().unwrap())
        .await
        .unwrap()
        .shared(64);
    let client =
        pb::VmServiceClient::new(conn, client_config(&d, Protocol::Grpc, "dev_customer_grpc"));
    lifecycle_with_client(client, &assets, &d).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_web_lifecycle_with_the_generated_client() {
    let assets = Assets::load();
    let d = Daemon::start();
    let client = pb::VmServiceClient::new(
        HttpClient::plaintext(),
        client_config(&d, Protocol::GrpcWeb, "dev_customer_grpcweb"),
    );
    lifecycle_with_client(client, &assets, &d).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_binary_proto_is_served() {
    let assets = Assets::load();
    let d = Daemon::start();
    let client = pb::VmServiceClient::new(
        HttpClient::plaintext(),
        client_config(&d, Protocol::Connect, "dev_customer_bin"),
    );
    let config: pb::VmConfig = serde_json::from_value(assets.config()).unwrap();
    let created = client
        .create_vm(pb::CreateVmRequest {
            config: buffa::MessageField::some(config),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert!(created.vm_id.starts_with("vm-"));
    let err = client
        .boot_vm(pb::BootVmRequest {
            vm_id: "missing".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, connectrpc::ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vmm_killed_from_outside_is_reported_failed_and_can_boot_again() {
    let assets = Assets::load();
    let d = Daemon::start();
    let t = "dev_customer_crash";
    let id = d
        .ok(t, "CreateVm", json!({"config": assets.config()}))
        .await["vmId"]
        .as_str()
        .unwrap()
        .to_owned();
    d.ok(t, "BootVm", json!({"vm_id": id})).await;
    let pids = crate::harness::processes_mentioning(&format!("metald-{id}"));
    assert_eq!(pids.len(), 1);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pids[0]).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    // metald watches the VMM's pidfd; the state must flip promptly.
    let start = std::time::Instant::now();
    let info = loop {
        let info = d.ok(t, "GetVmInfo", json!({"vm_id": id})).await;
        if state_of(&info) == "VM_STATE_FAILED" || start.elapsed() > Duration::from_secs(10) {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(state_of(&info), "VM_STATE_FAILED");
    eprintln!("crash noticed after {:?}", start.elapsed());
    assert!(
        info["backendInfo"]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("signal 9"),
        "{info}"
    );
    let again = d.ok(t, "BootVm", json!({"vm_id": id})).await;
    assert_eq!(state_of(&again), "VM_STATE_RUNNING");
    d.ok(t, "DeleteVm", json!({"vm_id": id, "force": true}))
        .await;
    assert_gone(&d, &id);
}
