//! `create`: a CreateVmRequest from a JSON file and/or flags. Only the
//! syntax of the flags is checked here; metald judges the VM itself and
//! names the wire field at fault.

use std::io::Read;

use metald_proto::vmprovisioner::v1 as pb;

use crate::args::{CreateArgs, parse_size};
use crate::error::CliError;

/// Memory of a VM created from flags alone.
const DEFAULT_MEMORY: u64 = 128 << 20;

/// The request `args` describe: the file's (if any), overridden by flags.
pub fn request(args: &CreateArgs) -> Result<pb::CreateVmRequest, CliError> {
    let mut req = match &args.file {
        Some(path) => from_json(&read_file(path)?)?,
        None => {
            let mut r = pb::CreateVmRequest::default();
            let c = r.config.get_or_insert_default();
            c.cpu.get_or_insert_default().vcpu_count = 1;
            c.memory.get_or_insert_default().size_bytes = DEFAULT_MEMORY as i64;
            r
        }
    };
    if let Some(name) = &args.name {
        req.vm_id = name.clone();
    }
    let c = req.config.get_or_insert_default();
    if let Some(n) = args.vcpus {
        c.cpu.get_or_insert_default().vcpu_count = n;
    }
    if let Some(m) = args.memory {
        let bytes = i64::try_from(m).map_err(|_| CliError::usage("--memory is too large"))?;
        c.memory.get_or_insert_default().size_bytes = bytes;
    }
    let boot = c.boot.get_or_insert_default();
    for (flag, field) in [
        (&args.kernel, &mut boot.kernel_path),
        (&args.initrd, &mut boot.initrd_path),
        (&args.kernel_args, &mut boot.kernel_args),
    ] {
        if let Some(v) = flag {
            *field = v.clone();
        }
    }
    if !args.disks.is_empty() {
        c.storage = args
            .disks
            .iter()
            .map(|d| disk(d))
            .collect::<Result<_, _>>()?;
    }
    if !args.nets.is_empty() {
        c.network = args.nets.iter().map(|n| nic(n)).collect::<Result<_, _>>()?;
    }
    for kv in &args.metadata {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| CliError::usage(format!("--metadata {kv:?}: expected KEY=VALUE")))?;
        c.metadata.insert(k.to_owned(), v.to_owned());
    }
    Ok(req)
}

fn read_file(path: &std::path::Path) -> Result<String, CliError> {
    let mut text = String::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    read.map_err(|e| CliError::usage(format!("-f: {e}")))?;
    Ok(text)
}

/// A CreateVmRequest in its proto3 JSON form (snake_case or camelCase).
pub fn from_json(text: &str) -> Result<pb::CreateVmRequest, CliError> {
    serde_json::from_str(text)
        .map_err(|e| CliError::usage(format!("-f: not a CreateVmRequest: {e}")))
}

/// `PATH[,ro][,root][,id=ID]`.
pub fn disk(spec: &str) -> Result<pb::StorageDevice, CliError> {
    let mut parts = spec.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(CliError::usage(format!("--disk {spec:?}: no path")));
    }
    let mut d = pb::StorageDevice {
        path: path.to_owned(),
        ..Default::default()
    };
    for p in parts {
        match p.split_once('=') {
            None if p == "ro" => d.read_only = true,
            None if p == "rw" => d.read_only = false,
            None if p == "root" => d.is_root_device = true,
            Some(("id", id)) => d.id = id.to_owned(),
            _ => {
                return Err(CliError::usage(format!(
                    "--disk {spec:?}: unknown option {p:?} (ro, rw, root, id=ID)"
                )));
            }
        }
    }
    Ok(d)
}

/// `default`, or comma-separated `key=value` interface settings.
pub fn nic(spec: &str) -> Result<pb::NetworkInterface, CliError> {
    let mut n = pb::NetworkInterface::default();
    if spec == "default" || spec.is_empty() {
        return Ok(n);
    }
    let bad = |why: String| CliError::usage(format!("--net {spec:?}: {why}"));
    for p in spec.split(',') {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| bad(format!("expected key=value, got {p:?}")))?;
        match k {
            "id" => n.id = v.to_owned(),
            "mac" => n.mac_address = v.to_owned(),
            "mode" => {
                n.mode = mode(v)
                    .ok_or_else(|| bad(format!("unknown mode {v:?}")))?
                    .into()
            }
            "ipv4" => n.ipv4_config.get_or_insert_default().address = v.to_owned(),
            "ipv6" => n.ipv6_config.get_or_insert_default().address = v.to_owned(),
            "rx" | "tx" => {
                let rate = parse_size(v).map_err(bad)?;
                let rate = i64::try_from(rate).map_err(|_| bad(format!("{k} is too large")))?;
                let limit = if k == "rx" {
                    &mut n.rx_rate_limit
                } else {
                    &mut n.tx_rate_limit
                };
                limit.get_or_insert_default().bandwidth = rate;
            }
            _ => {
                return Err(bad(format!(
                    "unknown key {k:?} (id, mac, mode, ipv4, ipv6, rx, tx)"
                )));
            }
        }
    }
    Ok(n)
}

fn mode(v: &str) -> Option<pb::NetworkMode> {
    Some(match v {
        "dual" | "dual-stack" => pb::NetworkMode::NETWORK_MODE_DUAL_STACK,
        "ipv4" => pb::NetworkMode::NETWORK_MODE_IPV4_ONLY,
        "ipv6" => pb::NetworkMode::NETWORK_MODE_IPV6_ONLY,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_take_flags_in_any_order() {
        let d = disk("/a/root.img,root,ro,id=rootfs").unwrap();
        assert_eq!(d.path, "/a/root.img");
        assert!(d.read_only && d.is_root_device);
        assert_eq!(d.id, "rootfs");
        assert!(!disk("/b.img").unwrap().read_only);
        assert!(disk(",ro").is_err());
        assert!(
            disk("/a,readonly")
                .unwrap_err()
                .message
                .contains("readonly")
        );
    }

    #[test]
    fn nics_parse_each_key() {
        let n = nic("id=eth1,mac=02:00:00:00:00:01,mode=ipv4,ipv4=10.1.0.5,rx=1MiB").unwrap();
        assert_eq!(n.id, "eth1");
        assert_eq!(n.mac_address, "02:00:00:00:00:01");
        assert_eq!(
            n.mode.as_known(),
            Some(pb::NetworkMode::NETWORK_MODE_IPV4_ONLY)
        );
        assert_eq!(n.ipv4_config.as_option().unwrap().address, "10.1.0.5");
        assert_eq!(n.rx_rate_limit.as_option().unwrap().bandwidth, 1 << 20);
        assert_eq!(nic("default").unwrap(), pb::NetworkInterface::default());
        assert!(nic("mode=ipx").is_err());
        assert!(nic("speed=1").unwrap_err().message.contains("speed"));
    }

    #[test]
    fn json_takes_both_spellings() {
        let r = from_json(r#"{"vm_id":"a","config":{"cpu":{"vcpuCount":2}}}"#).unwrap();
        assert_eq!(r.vm_id, "a");
        assert_eq!(
            r.config
                .as_option()
                .unwrap()
                .cpu
                .as_option()
                .unwrap()
                .vcpu_count,
            2
        );
        assert!(from_json("{").is_err());
    }
}
