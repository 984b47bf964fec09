//! Printing API messages: their proto3 JSON as JSON or YAML, and the
//! human summary of `info`.

use metald_proto::vmprovisioner::v1 as pb;
use serde::Serialize;

use crate::error::{CliError, one_line};
use crate::table::{Table, size, state_name};

/// A message in its proto3 JSON form (camelCase, int64 as strings).
pub fn json<T: Serialize>(msg: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(msg)
        .map(|s| s + "\n")
        .map_err(|e| CliError::new("internal", format!("encoding JSON: {e}")))
}

/// The same value as YAML.
pub fn yaml<T: Serialize>(msg: &T) -> Result<String, CliError> {
    let value = serde_json::to_value(msg)
        .map_err(|e| CliError::new("internal", format!("encoding JSON: {e}")))?;
    serde_yaml_ng::to_string(&value)
        .map_err(|e| CliError::new("internal", format!("encoding YAML: {e}")))
}

/// `key=value, …` sorted by key (maps arrive in no order).
pub fn pairs<'a>(map: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut v: Vec<(&String, &String)> = map.into_iter().collect();
    v.sort();
    v.iter()
        .map(|(k, val)| format!("{k}={val}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What an operator wants to see first about one VM, one fact a line.
pub fn summary(info: &pb::GetVmInfoResponse) -> String {
    let mut t = Table::new(&["ID:", &one_line(&info.vm_id)]);
    let mut line = |k: &str, v: String| {
        if !v.is_empty() {
            t.row(vec![format!("{k}:"), v]);
        }
    };
    line("State", state_name(&info.state));
    if let Some(c) = info.config.as_option() {
        if let Some(cpu) = c.cpu.as_option() {
            line("vCPUs", cpu.vcpu_count.to_string());
        }
        if let Some(m) = c.memory.as_option() {
            line("Memory", size(m.size_bytes));
        }
        if let Some(b) = c.boot.as_option() {
            line("Kernel", b.kernel_path.clone());
            line("Initrd", b.initrd_path.clone());
            line("Kernel args", b.kernel_args.clone());
        }
        for d in &c.storage {
            let mut flags = vec![if d.read_only { "ro" } else { "rw" }];
            if d.is_root_device {
                flags.push("root");
            }
            line("Disk", format!("{} {} ({})", d.id, d.path, flags.join(",")));
        }
        line("Metadata", pairs(&c.metadata));
    }
    if let Some(n) = info.network_info.as_option() {
        line("IPs", n.ip_address.clone());
        line("MAC", n.mac_address.clone());
        line("TAP", n.tap_device.clone());
        line("Namespace", n.network_namespace.clone());
        line("Gateway", n.gateway.clone());
    }
    if let Some(m) = info.metrics.as_option() {
        if m.uptime_seconds > 0 {
            let up = std::time::Duration::from_secs(m.uptime_seconds as u64);
            line("Uptime", humantime::format_duration(up).to_string());
        }
        line("CPU use", format!("{:.1}%", m.cpu_usage_percent));
        line("Memory use", size(m.memory_usage_bytes));
    }
    if let Some(console) = info.backend_info.get("console_log") {
        line("Console", console.clone());
    }
    let backend: Vec<(&String, &String)> = info
        .backend_info
        .iter()
        .filter(|(k, _)| k.as_str() != "console_log")
        .collect();
    line("Backend", pairs(backend));
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_carry_the_same_fields() {
        let r = pb::CreateVmResponse {
            vm_id: "web".into(),
            state: pb::VmState::VM_STATE_CREATED.into(),
            ..Default::default()
        };
        let j: serde_json::Value = serde_json::from_str(&json(&r).unwrap()).unwrap();
        assert_eq!(j["vmId"], "web");
        let y: serde_json::Value = serde_yaml_ng::from_str(&yaml(&r).unwrap()).unwrap();
        assert_eq!(y, j);
    }

    #[test]
    fn summary_names_state_and_sizes() {
        let mut info = pb::GetVmInfoResponse {
            vm_id: "web".into(),
            state: pb::VmState::VM_STATE_RUNNING.into(),
            ..Default::default()
        };
        let c = info.config.get_or_insert_default();
        c.memory.get_or_insert_default().size_bytes = 256 << 20;
        let s = summary(&info);
        assert!(s.starts_with("ID:       web\n"), "{s}");
        assert!(s.contains("State:    running\n"), "{s}");
        assert!(s.contains("Memory:   256MiB\n"), "{s}");
    }
}
