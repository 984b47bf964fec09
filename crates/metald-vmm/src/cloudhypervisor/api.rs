//! Cloud Hypervisor's REST API (`/api/v1/...`) as typed requests: the
//! `vm.create` body and the answers of `vm.info`, `vm.counters` and
//! `vmm.ping`. Field names follow Cloud Hypervisor's OpenAPI definition;
//! only what metald uses is here.

use std::collections::BTreeMap;
use std::path::Path;

use hyper::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use metald_core::ports::VmmError;

use crate::http;

/// `vm.create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub cpus: Cpus,
    pub memory: Memory,
    pub payload: Payload,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<Net>,
    pub serial: Console,
    pub console: Console,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpus {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// Bytes.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

pub use crate::ratelimit::{RateLimiter, TokenBucket};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub id: String,
    pub path: String,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Net {
    pub id: String,
    pub tap: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiter>,
}

/// Where a serial port or console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Console {
    /// `Off`, `File`, `Null`, ...
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// `vm.info`.
#[derive(Debug, Clone, Deserialize)]
pub struct VmInfo {
    /// `Created`, `Running`, `Shutdown`, `Paused` or `BreakPoint`.
    pub state: String,
    pub config: serde_json::Value,
}

/// `vmm.ping`.
#[derive(Debug, Clone, Deserialize)]
pub struct Ping {
    pub version: String,
    #[serde(default)]
    pub build_version: String,
    #[serde(default)]
    pub pid: i64,
}

/// `vm.counters`: per device, per counter.
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// Cloud Hypervisor's error body: the chain of error messages.
pub fn reason(body: &[u8]) -> String {
    match serde_json::from_slice::<Vec<String>>(body) {
        Ok(chain) if !chain.is_empty() => chain.join(": "),
        _ => String::from_utf8_lossy(body).trim().to_owned(),
    }
}

/// The answer `body` of a successful `GET /api/v1/<call>`.
pub fn decode<T: DeserializeOwned>(call: &str, body: &[u8]) -> Result<T, VmmError> {
    serde_json::from_slice(body)
        .map_err(|e| VmmError::Io(format!("{call}: unreadable answer: {e}")))
}

/// A Cloud Hypervisor API socket.
#[derive(Debug, Clone)]
pub struct Client<'a> {
    socket: &'a Path,
}

impl<'a> Client<'a> {
    pub fn new(socket: &'a Path) -> Self {
        Client { socket }
    }

    async fn send(
        &self,
        method: Method,
        call: &str,
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, VmmError> {
        let path = format!("/api/v1/{call}");
        let socket = http::Endpoint::Path(self.socket.to_path_buf());
        let resp = http::call(&socket, method, &path, body)
            .await
            .map_err(VmmError::from)?;
        if resp.status.is_success() {
            Ok(resp.body)
        } else {
            // An error status is Cloud Hypervisor refusing the call (it
            // answers 500 with its reason for a configuration it cannot
            // boot, too).
            Err(VmmError::Refused(format!(
                "cloud-hypervisor refused {call}: HTTP {}: {}",
                resp.status.as_u16(),
                crate::launch::redact(&reason(&resp.body))
            )))
        }
    }

    /// `PUT /api/v1/<call>` with an optional JSON body.
    pub async fn put(&self, call: &str, body: Option<&impl Serialize>) -> Result<(), VmmError> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| VmmError::Io(e.to_string()))?;
        self.send(Method::PUT, call, bytes).await.map(drop)
    }

    /// `PUT /api/v1/<call>` without a body (`vm.boot`, `vm.pause`, ...).
    pub async fn action(&self, call: &str) -> Result<(), VmmError> {
        self.put(call, None::<&()>).await
    }

    /// `GET /api/v1/<call>`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, call: &str) -> Result<T, VmmError> {
        let body = self.send(Method::GET, call, None).await?;
        decode(call, &body)
    }

    pub async fn info(&self) -> Result<VmInfo, VmmError> {
        self.get("vm.info").await
    }

    pub async fn ping(&self) -> Result<Ping, VmmError> {
        self.get("vmm.ping").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_create_serialises_as_cloud_hypervisor_expects() {
        let c = VmConfig {
            cpus: Cpus {
                boot_vcpus: 2,
                max_vcpus: 2,
            },
            memory: Memory { size: 128 << 20 },
            payload: Payload {
                kernel: "/k".into(),
                initramfs: None,
                cmdline: Some("console=ttyS0".into()),
            },
            disks: vec![Disk {
                id: "root".into(),
                path: "/r".into(),
                readonly: true,
                rate_limiter_config: None,
            }],
            net: Vec::new(),
            serial: Console {
                mode: "File".into(),
                file: Some("/c.log".into()),
            },
            console: Console {
                mode: "Off".into(),
                file: None,
            },
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({
                "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                "memory": {"size": 134217728},
                "payload": {"kernel": "/k", "cmdline": "console=ttyS0"},
                "disks": [{"id": "root", "path": "/r", "readonly": true}],
                "serial": {"mode": "File", "file": "/c.log"},
                "console": {"mode": "Off"}
            })
        );
    }

    #[test]
    fn error_bodies_read_as_the_chain_of_reasons() {
        assert_eq!(
            reason(br#"["Error booting VM","Invalid kernel"]"#),
            "Error booting VM: Invalid kernel"
        );
        assert_eq!(reason(b"plain text\n"), "plain text");
    }
}
