//! `list` and `watch`: every page of ListVms, as a table (with each VM's
//! addresses from GetVmInfo) or as the API's JSON / YAML.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};

use metald_proto::vmprovisioner::v1 as pb;

use crate::args::{ListArgs, Output, StateArg, WatchArgs};
use crate::client::{Api, rpc};
use crate::error::CliError;
use crate::output;
use crate::table::{Table, age, now_unix, size, state_name, timestamp};

/// Page size asked for (metald's largest).
const PAGE_SIZE: i32 = 1000;
/// Pages read before giving up on a server whose tokens never end.
const MAX_PAGES: usize = 10_000;
/// GetVmInfo calls in flight at once for the IPS column.
const INFO_CONCURRENCY: usize = 8;

/// Every VM the filter admits, in metald's order, with its total.
pub async fn all_vms(api: &Api, states: &[StateArg]) -> Result<pb::ListVmsResponse, CliError> {
    let filter: Vec<buffa::EnumValue<pb::VmState>> =
        states.iter().map(|s| vm_state(*s).into()).collect();
    let mut all = pb::ListVmsResponse::default();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let page = rpc!(
            api,
            list_vms,
            pb::ListVmsRequest {
                state_filter: filter.clone(),
                page_size: PAGE_SIZE,
                page_token: token.clone(),
                ..Default::default()
            }
        )?;
        all.vms.extend(page.vms);
        all.total_count = page.total_count;
        if page.next_page_token.is_empty() || page.next_page_token == token {
            return Ok(all);
        }
        token = page.next_page_token;
    }
    Err(CliError::new(
        "internal",
        format!("ListVms did not end after {MAX_PAGES} pages"),
    ))
}

pub fn vm_state(s: StateArg) -> pb::VmState {
    match s {
        StateArg::Created => pb::VmState::VM_STATE_CREATED,
        StateArg::Running => pb::VmState::VM_STATE_RUNNING,
        StateArg::Paused => pb::VmState::VM_STATE_PAUSED,
        StateArg::Shutdown => pb::VmState::VM_STATE_SHUTDOWN,
        StateArg::Failed => pb::VmState::VM_STATE_FAILED,
    }
}

/// `list`'s whole output.
pub async fn render(api: &Api, args: &ListArgs) -> Result<String, CliError> {
    let list = all_vms(api, &args.state).await?;
    match args.output {
        Some(Output::Json) => output::json(&list),
        Some(Output::Yaml) => output::yaml(&list),
        Some(Output::Wide) => Ok(table(&list.vms, &network(api, &list.vms).await, true)),
        None => Ok(table(&list.vms, &network(api, &list.vms).await, false)),
    }
}

/// Each VM's network info, fetched a few at a time; a VM deleted since
/// the listing simply has none.
async fn network(api: &Api, vms: &[pb::VmInfo]) -> HashMap<String, pb::VmNetworkInfo> {
    let mut out = HashMap::new();
    for chunk in vms.chunks(INFO_CONCURRENCY) {
        let calls = chunk.iter().map(|vm| async move {
            let req = pb::GetVmInfoRequest {
                vm_id: vm.vm_id.clone(),
                ..Default::default()
            };
            let info = rpc!(api, get_vm_info, req).ok()?;
            Some((vm.vm_id.clone(), info.network_info.into_option()?))
        });
        for (id, net) in futures::future::join_all(calls).await.into_iter().flatten() {
            out.insert(id, net);
        }
    }
    out
}

fn table(vms: &[pb::VmInfo], nets: &HashMap<String, pb::VmNetworkInfo>, wide: bool) -> String {
    let mut header = vec!["ID", "STATE", "VCPUS", "MEMORY", "IPS", "AGE"];
    if wide {
        header.extend(["MAC", "CUSTOMER", "CREATED", "METADATA"]);
    }
    let mut t = Table::new(&header);
    let now = now_unix();
    for vm in vms {
        let net = nets.get(&vm.vm_id);
        let dash = |s: Option<&String>| s.filter(|s| !s.is_empty()).cloned().unwrap_or("-".into());
        let mut row = vec![
            vm.vm_id.clone(),
            state_name(&vm.state),
            vm.vcpu_count.to_string(),
            size(vm.memory_size_bytes),
            dash(net.map(|n| &n.ip_address)),
            age(now - vm.created_timestamp),
        ];
        if wide {
            row.extend([
                dash(net.map(|n| &n.mac_address)),
                vm.customer_id.clone(),
                timestamp(vm.created_timestamp),
                dash(Some(&output::pairs(&vm.metadata))),
            ]);
        }
        t.row(row);
    }
    t.render()
}

/// `watch`: the list again every interval until Ctrl-C. A failed refresh
/// is reported and retried, so a restarting metald does not end it.
pub async fn watch(api: &Api, args: &WatchArgs) -> Result<(), CliError> {
    let tty = std::io::stdout().is_terminal();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let frame = render(api, &args.list).await;
        let mut out = std::io::stdout().lock();
        if tty {
            // Clear the screen and home the cursor.
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let every = humantime::format_duration(args.interval);
        let _ = writeln!(
            out,
            "Every {every}: metaldctl list    {}",
            timestamp(now_unix())
        );
        match frame {
            Ok(text) => {
                let _ = write!(out, "{text}");
            }
            Err(e) => eprintln!("{e}"),
        }
        let _ = writeln!(out);
        let _ = out.flush();
        drop(out);
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_a_dash_without_addresses() {
        let vm = pb::VmInfo {
            vm_id: "web".into(),
            state: pb::VmState::VM_STATE_RUNNING.into(),
            vcpu_count: 2,
            memory_size_bytes: 256 << 20,
            created_timestamp: now_unix() - 120,
            ..Default::default()
        };
        let out = table(&[vm], &HashMap::new(), false);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "ID    STATE     VCPUS   MEMORY   IPS   AGE");
        assert_eq!(lines[1], "web   running   2       256MiB   -     2m");
    }
}
