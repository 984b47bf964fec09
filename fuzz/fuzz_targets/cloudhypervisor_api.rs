//! What metald reads from Cloud Hypervisor's API socket: the answers of
//! `vm.info`, `vm.counters` and `vmm.ping`, and error bodies. The first
//! byte picks which; the rest is the HTTP body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use metald_vmm::cloudhypervisor::api::{self, Counters, Ping, VmInfo};
use metald_vmm::cloudhypervisor::sum_counters;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(info) = api::decode::<VmInfo>("vm.info", body) {
                // The state is the answer's `state` (serde also reads the
                // fields of a struct from an array, in order). Fields metald
                // skips are not checked, not even for UTF-8, so only a body
                // that is JSON throughout is compared.
                if let Ok(v) = serde_json::from_slice::<Value>(body) {
                    let state = if v.is_array() { &v[0] } else { &v["state"] };
                    assert_eq!(state.as_str(), Some(info.state.as_str()));
                }
            }
        }
        1 => {
            if let Ok(all) = api::decode::<Counters>("vm.counters", body) {
                let c = sum_counters(&all);
                // Each total is the sum over devices, capped at u64::MAX.
                let exact = |k: &str| {
                    let s: u128 = all
                        .values()
                        .filter_map(|d| d.get(k))
                        .map(|v| *v as u128)
                        .sum();
                    u64::try_from(s).unwrap_or(u64::MAX)
                };
                assert_eq!(c.disk_read_bytes, exact("read_bytes"));
                assert_eq!(c.disk_write_bytes, exact("write_bytes"));
                assert_eq!(c.net_rx_bytes, exact("rx_bytes"));
                assert_eq!(c.net_tx_bytes, exact("tx_bytes"));
            }
        }
        2 => {
            let _ = api::decode::<Ping>("vmm.ping", body);
        }
        _ => {
            let reason = api::reason(body);
            if let Ok(chain) = serde_json::from_slice::<Vec<String>>(body)
                && !chain.is_empty()
            {
                assert_eq!(reason, chain.join(": "));
            }
        }
    }
});
