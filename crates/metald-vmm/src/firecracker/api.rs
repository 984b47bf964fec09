//! Firecracker's API as typed requests: the bodies metald sends to
//! `/machine-config`, `/boot-source`, `/drives/{id}`,
//! `/network-interfaces/{id}`, `/metrics`, `/actions` and
//! `/vm`, and the answers of `GET /` and `GET /vm/config`. Field names
//! follow Firecracker's swagger definition; only what metald uses is here.

use std::path::Path;

use hyper::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use metald_core::ports::VmmError;

use crate::http;

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: off, so vCPUs map to whole cores.
    pub smt: bool,
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub initrd_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub boot_args: Option<String>,
}

pub use crate::ratelimit::{RateLimiter, TokenBucket};

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub guest_mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metrics {
    pub metrics_path: String,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

#[derive(Debug, Serialize)]
struct Action {
    action_type: ActionType,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmStateChange {
    Paused,
    Resumed,
}

#[derive(Debug, Serialize)]
struct VmPatch {
    state: VmStateChange,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    pub vmm_version: String,
    #[serde(default)]
    pub app_name: String,
}

/// `GET /vm/config`: what Firecracker holds, to compare with metald's view.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmConfig {
    pub boot_source: BootSource,
    pub machine_config: MachineConfigView,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(default)]
    pub network_interfaces: Vec<NetworkInterface>,
}

/// `machine-config` as `GET /vm/config` shows it (more fields than metald
/// sets; these are the ones it checks).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MachineConfigView {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
}

/// Firecracker's error body.
#[derive(Debug, Deserialize)]
struct Fault {
    fault_message: String,
}

/// A Firecracker API socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: http::Endpoint,
}

impl Client {
    /// A socket in a directory only metald writes.
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: http::Endpoint::Path(socket.to_path_buf()),
        }
    }

    /// A socket reached as `socket` says (see [`http::Endpoint`]).
    pub fn at(socket: http::Endpoint) -> Self {
        Client { socket }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, VmmError> {
        let resp = http::call(&self.socket, method.clone(), path, body)
            .await
            .map_err(VmmError::from)?;
        if resp.status.is_success() {
            return Ok(resp.body);
        }
        let fault = serde_json::from_slice::<Fault>(&resp.body)
            .map(|f| crate::launch::redact(&f.fault_message))
            .unwrap_or_else(|_| {
                format!(
                    "HTTP {}: {}",
                    resp.status,
                    crate::launch::redact(String::from_utf8_lossy(&resp.body).trim())
                )
            });
        // An error status is Firecracker refusing the request, `fault`
        // its reason.
        Err(VmmError::Refused(format!(
            "firecracker refused {method} {path}: {fault}"
        )))
    }

    async fn with_body(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<(), VmmError> {
        let bytes = serde_json::to_vec(body).map_err(|e| VmmError::Io(e.to_string()))?;
        self.send(method, path, Some(bytes)).await.map(drop)
    }

    /// `PUT path` with a JSON body.
    pub async fn put(&self, path: &str, body: &impl Serialize) -> Result<(), VmmError> {
        self.with_body(Method::PUT, path, body).await
    }

    /// `GET path`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, VmmError> {
        let body = self.send(Method::GET, path, None).await?;
        serde_json::from_slice(&body)
            .map_err(|e| VmmError::Io(format!("GET {path}: unreadable answer: {e}")))
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), VmmError> {
        self.put("/actions", &Action { action_type }).await
    }

    /// `PATCH /vm`.
    pub async fn set_state(&self, state: VmStateChange) -> Result<(), VmmError> {
        self.with_body(Method::PATCH, "/vm", &VmPatch { state })
            .await
    }

    /// `GET /`.
    pub async fn info(&self) -> Result<InstanceInfo, VmmError> {
        self.get("/").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_serialise_as_firecracker_expects() {
        let d = Drive {
            drive_id: "rootfs".into(),
            path_on_host: "/r.ext4".into(),
            is_root_device: true,
            is_read_only: true,
            rate_limiter: RateLimiter::bytes_per_sec(1_000_000),
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({
                "drive_id": "rootfs", "path_on_host": "/r.ext4",
                "is_root_device": true, "is_read_only": true,
                "rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 1000}}
            })
        );
        assert_eq!(RateLimiter::bytes_per_sec(0), None);
        assert_eq!(
            serde_json::to_value(Action {
                action_type: ActionType::SendCtrlAltDel
            })
            .unwrap(),
            serde_json::json!({"action_type": "SendCtrlAltDel"})
        );
        assert_eq!(
            serde_json::to_value(VmPatch {
                state: VmStateChange::Paused
            })
            .unwrap(),
            serde_json::json!({"state": "Paused"})
        );
    }

    #[tokio::test]
    async fn an_error_answer_is_a_refusal_and_no_socket_a_gone_vmm() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("firecracker.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            let body = br#"{"fault_message":"The requested operation is not supported"}"#;
            let head = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(body).await.unwrap();
        });
        let e = Client::new(&sock)
            .set_state(VmStateChange::Paused)
            .await
            .unwrap_err();
        assert_eq!(
            e,
            VmmError::Refused(
                "firecracker refused PATCH /vm: The requested operation is not supported".into()
            )
        );
        server.await.unwrap();
        let e = Client::new(&dir.path().join("none.sock"))
            .info()
            .await
            .unwrap_err();
        assert!(e.is_gone(), "{e:?}");
    }

    #[test]
    fn reads_vm_config_as_firecracker_writes_it() {
        let text = r#"{"balloon":null,"drives":[{"drive_id":"rootfs","partuuid":null,
            "is_root_device":true,"cache_type":"Unsafe","is_read_only":false,
            "path_on_host":"/r","rate_limiter":null,"io_engine":"Sync","socket":null}],
            "boot-source":{"kernel_image_path":"/k","initrd_path":null,"boot_args":"console=ttyS0"},
            "cpu-config":null,"logger":null,
            "machine-config":{"vcpu_count":2,"mem_size_mib":128,"smt":false,
            "track_dirty_pages":false,"huge_pages":"None"},
            "metrics":null,"mmds-config":null,"network-interfaces":[],"vsock":null,"entropy":null}"#;
        let c: VmConfig = serde_json::from_str(text).unwrap();
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.machine_config.mem_size_mib, 128);
        assert_eq!(c.boot_source.kernel_image_path, "/k");
        assert_eq!(c.drives[0].drive_id, "rootfs");
        assert!(c.network_interfaces.is_empty());
    }
}
