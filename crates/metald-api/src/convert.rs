//! Wire messages to core types and back. Validation itself lives in
//! `metald_core::vm`; this module only moves fields, so every entry point
//! shares the same rules.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use metald_core::net::NicInput;
use metald_core::ports::VmRecord;
use metald_core::vm::{DiskInput, VmSpecInput};
use metald_core::{Error, VmId, VmSpec, VmState};
use metald_proto::vmprovisioner::v1 as pb;

/// The wire enum for a core state.
pub fn state_to_pb(s: VmState) -> pb::VmState {
    match s {
        VmState::Created => pb::VmState::VM_STATE_CREATED,
        VmState::Running => pb::VmState::VM_STATE_RUNNING,
        VmState::Paused => pb::VmState::VM_STATE_PAUSED,
        VmState::Shutdown => pb::VmState::VM_STATE_SHUTDOWN,
        VmState::Failed => pb::VmState::VM_STATE_FAILED,
    }
}

/// The core states a ListVms filter names; unknown or unspecified values
/// are rejected naming the field.
pub fn states_from_pb(filter: &[buffa::EnumValue<pb::VmState>]) -> Result<Vec<VmState>, Error> {
    filter
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_known() {
            Some(pb::VmState::VM_STATE_CREATED) => Ok(VmState::Created),
            Some(pb::VmState::VM_STATE_RUNNING) => Ok(VmState::Running),
            Some(pb::VmState::VM_STATE_PAUSED) => Ok(VmState::Paused),
            Some(pb::VmState::VM_STATE_SHUTDOWN) => Ok(VmState::Shutdown),
            Some(pb::VmState::VM_STATE_FAILED) => Ok(VmState::Failed),
            _ => Err(Error::invalid(
                format!("state_filter[{i}]"),
                format!("unknown or unspecified state {}", v.to_i32()),
            )),
        })
        .collect()
}

/// A required `vm_id` request field.
pub fn vm_id(raw: &str) -> Result<VmId, Error> {
    VmId::parse(raw, "vm_id")
}

/// The optional `vm_id` of CreateVm: empty means "generate one".
pub fn optional_vm_id(raw: &str) -> Result<Option<VmId>, Error> {
    if raw.is_empty() {
        Ok(None)
    } else {
        vm_id(raw).map(Some)
    }
}

/// Longest graceful-shutdown timeout a request may ask for.
pub const MAX_SHUTDOWN_TIMEOUT_SECS: i32 = 3600;

/// ShutdownVm's `timeout_seconds`: 0 means the backend's default.
pub fn shutdown_timeout(secs: i32) -> Result<Option<Duration>, Error> {
    match secs {
        0 => Ok(None),
        t if (1..=MAX_SHUTDOWN_TIMEOUT_SECS).contains(&t) => {
            Ok(Some(Duration::from_secs(t as u64)))
        }
        t => Err(Error::invalid(
            "timeout_seconds",
            format!("must be between 0 (default) and {MAX_SHUTDOWN_TIMEOUT_SECS}, got {t}"),
        )),
    }
}

fn map<'a>(
    m: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> std::collections::BTreeMap<String, String> {
    m.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Builds and validates a spec from a CreateVm `config`.
pub fn spec_from_pb(config: Option<&pb::VmConfig>) -> Result<VmSpec, Error> {
    let c = config.ok_or_else(|| Error::invalid("config", "is required"))?;
    if !c.cpu.is_set() {
        return Err(Error::invalid("config.cpu", "is required"));
    }
    if !c.memory.is_set() {
        return Err(Error::invalid("config.memory", "is required"));
    }
    if !c.boot.is_set() {
        return Err(Error::invalid("config.boot", "is required"));
    }
    let topo = &c.cpu.topology;
    let input = VmSpecInput {
        vcpu_count: c.cpu.vcpu_count,
        max_vcpu_count: c.cpu.max_vcpu_count,
        topology: (topo.sockets, topo.cores_per_socket, topo.threads_per_core),
        memory_bytes: c.memory.size_bytes,
        memory_hotplug: c.memory.hotplug_enabled,
        kernel_path: c.boot.kernel_path.clone(),
        initrd_path: c.boot.initrd_path.clone(),
        kernel_args: c.boot.kernel_args.clone(),
        boot_options: map(c.boot.boot_options.iter()),
        disks: c
            .storage
            .iter()
            .map(|d| DiskInput {
                id: d.id.clone(),
                path: d.path.clone(),
                read_only: d.read_only,
                is_root_device: d.is_root_device,
                interface_type: d.interface_type.clone(),
                options: map(d.options.iter()),
            })
            .collect(),
        network: c
            .network
            .iter()
            .map(|n| NicInput {
                id: n.id.clone(),
                mac: n.mac_address.clone(),
                ipv4_address: n.ipv4_config.address.clone(),
                ipv6_address: n.ipv6_config.address.clone(),
                mode: n.mode.to_i32(),
                rx_bandwidth: n.rx_rate_limit.bandwidth,
                tx_bandwidth: n.tx_rate_limit.bandwidth,
            })
            .collect(),
        console_enabled: !c.console.is_set() || c.console.enabled,
        metadata: map(c.metadata.iter()),
    };
    VmSpec::new(input)
}

/// The configuration GetVmInfo returns: what metald runs, as a VmConfig.
pub fn spec_to_pb(s: &VmSpec) -> pb::VmConfig {
    let topology = s.topology().map(|(so, co, th)| pb::CpuTopology {
        sockets: so as i32,
        cores_per_socket: co as i32,
        threads_per_core: th as i32,
        ..Default::default()
    });
    pb::VmConfig {
        cpu: buffa::MessageField::some(pb::CpuConfig {
            vcpu_count: s.vcpus() as i32,
            max_vcpu_count: s.vcpus() as i32,
            topology: topology.map(buffa::MessageField::some).unwrap_or_default(),
            ..Default::default()
        }),
        memory: buffa::MessageField::some(pb::MemoryConfig {
            size_bytes: s.memory_bytes() as i64,
            max_size_bytes: s.memory_bytes() as i64,
            ..Default::default()
        }),
        boot: buffa::MessageField::some(pb::BootConfig {
            kernel_path: s.kernel().display().to_string(),
            initrd_path: s
                .initrd()
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            kernel_args: s.kernel_args().to_owned(),
            boot_options: s.boot_options().clone().into_iter().collect(),
            ..Default::default()
        }),
        storage: s
            .disks()
            .iter()
            .map(|d| pb::StorageDevice {
                id: d.id.clone(),
                path: d.path.display().to_string(),
                read_only: d.read_only,
                is_root_device: d.is_root,
                interface_type: if d.interface_type.is_empty() {
                    "virtio-blk".into()
                } else {
                    d.interface_type.clone()
                },
                options: d.options.clone().into_iter().collect(),
                ..Default::default()
            })
            .collect(),
        network: s.nics().iter().map(nic_to_pb).collect(),
        console: buffa::MessageField::some(pb::ConsoleConfig {
            enabled: s.console_enabled(),
            console_type: "serial".into(),
            ..Default::default()
        }),
        metadata: s.metadata().clone().into_iter().collect(),
        ..Default::default()
    }
}

/// A ListVms entry.
fn nic_to_pb(n: &metald_core::net::NicSpec) -> pb::NetworkInterface {
    let att = n.attachment.as_ref();
    let mode = match (n.want_v4, n.want_v6) {
        (true, false) => pb::NetworkMode::NETWORK_MODE_IPV4_ONLY,
        (false, true) => pb::NetworkMode::NETWORK_MODE_IPV6_ONLY,
        _ => pb::NetworkMode::NETWORK_MODE_DUAL_STACK,
    };
    let rate = |bw: u64| {
        (bw > 0)
            .then(|| pb::RateLimit {
                bandwidth: bw as i64,
                ..Default::default()
            })
            .map(buffa::MessageField::some)
            .unwrap_or_default()
    };
    pb::NetworkInterface {
        id: n.id.clone(),
        mac_address: att
            .map(|a| a.mac)
            .or(n.mac)
            .map(|m| m.to_string())
            .unwrap_or_default(),
        tap_device: att.map(|a| a.tap.clone()).unwrap_or_default(),
        interface_type: "virtio-net".into(),
        ipv4_config: att
            .and_then(|a| a.ipv4.map(|(ip, p)| (ip, p, a.gateway4)))
            .map(|(ip, p, gw)| pb::IPv4Config {
                address: ip.to_string(),
                netmask: std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - p as u32).unwrap_or(0))
                    .to_string(),
                gateway: gw.map(|g| g.to_string()).unwrap_or_default(),
                ..Default::default()
            })
            .map(buffa::MessageField::some)
            .unwrap_or_default(),
        ipv6_config: att
            .and_then(|a| a.ipv6.map(|(ip, p)| (ip, p, a.gateway6)))
            .map(|(ip, p, gw)| pb::IPv6Config {
                address: ip.to_string(),
                prefix_length: p as i32,
                gateway: gw.map(|g| g.to_string()).unwrap_or_default(),
                ..Default::default()
            })
            .map(buffa::MessageField::some)
            .unwrap_or_default(),
        mode: mode.into(),
        rx_rate_limit: rate(n.rx_bytes_per_sec),
        tx_rate_limit: rate(n.tx_bytes_per_sec),
        ..Default::default()
    }
}

/// GetVmInfo's `metrics` from the latest sample.
pub fn metrics(u: &metald_core::ports::VmUsage) -> pb::VmMetrics {
    pb::VmMetrics {
        cpu_usage_percent: u.cpu_percent,
        memory_usage_bytes: u.memory_bytes,
        network_stats: buffa::MessageField::some(pb::NetworkStats {
            bytes_received: u.net_rx_bytes,
            bytes_transmitted: u.net_tx_bytes,
            ..Default::default()
        }),
        storage_stats: buffa::MessageField::some(pb::StorageStats {
            bytes_read: u.disk_read_bytes,
            bytes_written: u.disk_write_bytes,
            ..Default::default()
        }),
        uptime_seconds: u.uptime_seconds,
        ..Default::default()
    }
}

/// GetVmInfo's `network_info`: the first interface as attached.
pub fn network_info(s: &VmSpec) -> Option<pb::VmNetworkInfo> {
    let att = s.nics().first()?.attachment.as_ref()?;
    let ips: Vec<String> = att
        .ipv4
        .map(|(a, _)| a.to_string())
        .into_iter()
        .chain(att.ipv6.map(|(a, _)| a.to_string()))
        .collect();
    let gateways: Vec<String> = att
        .gateway4
        .map(|g| g.to_string())
        .into_iter()
        .chain(att.gateway6.map(|g| g.to_string()))
        .collect();
    Some(pb::VmNetworkInfo {
        // Both families, IPv4 first, comma-separated (the field is singular).
        ip_address: ips.join(","),
        mac_address: att.mac.to_string(),
        tap_device: att.tap.clone(),
        network_namespace: att.netns.clone(),
        gateway: gateways.join(","),
        dns_servers: Vec::new(),
        ..Default::default()
    })
}

pub fn vm_info(vm: &VmRecord) -> pb::VmInfo {
    pb::VmInfo {
        vm_id: vm.name.to_string(),
        state: state_to_pb(vm.state).into(),
        vcpu_count: vm.spec.vcpus() as i32,
        memory_size_bytes: vm.spec.memory_bytes() as i64,
        created_timestamp: vm.created_at,
        modified_timestamp: vm.modified_at,
        metadata: vm.spec.metadata().clone().into_iter().collect(),
        customer_id: vm.customer.to_string(),
        ..Default::default()
    }
}

const TOKEN_PREFIX: &str = "v1:";

/// An opaque page token for a store cursor.
pub fn page_token(cursor: Option<i64>) -> String {
    cursor
        .map(|c| URL_SAFE_NO_PAD.encode(format!("{TOKEN_PREFIX}{c}")))
        .unwrap_or_default()
}

/// The store cursor a page token stands for.
pub fn cursor_from_token(token: &str) -> Result<Option<i64>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::invalid("page_token", "is not a token returned by ListVms");
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let n = text.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
    n.parse::<i64>().map(Some).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        for c in [None, Some(0), Some(42), Some(i64::MAX)] {
            assert_eq!(cursor_from_token(&page_token(c)).unwrap(), c);
        }
        for bad in ["x", "djE6", "!!!", &URL_SAFE_NO_PAD.encode("v2:5")] {
            assert!(
                matches!(cursor_from_token(bad), Err(Error::InvalidArgument { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn shutdown_timeouts_are_zero_or_up_to_an_hour() {
        assert_eq!(shutdown_timeout(0).unwrap(), None);
        assert_eq!(shutdown_timeout(1).unwrap(), Some(Duration::from_secs(1)));
        assert_eq!(
            shutdown_timeout(3600).unwrap(),
            Some(Duration::from_secs(3600))
        );
        for bad in [-1, 3601, i32::MIN, i32::MAX] {
            let e = shutdown_timeout(bad).unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument { ref field, .. } if field == "timeout_seconds"),
                "{bad}"
            );
        }
    }

    #[test]
    fn config_sections_are_required_and_named() {
        let e = spec_from_pb(None).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { ref field, .. } if field == "config"));
        let e = spec_from_pb(Some(&pb::VmConfig::default())).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { ref field, .. } if field == "config.cpu"));
    }

    #[test]
    fn unknown_state_filter_is_rejected() {
        let f = vec![
            buffa::EnumValue::from(pb::VmState::VM_STATE_RUNNING),
            buffa::EnumValue::from(99),
        ];
        let e = states_from_pb(&f).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { ref field, .. } if field == "state_filter[1]")
        );
    }
}
