//! The service's side of billing: [`Billing`](crate::Billing) as the
//! service's [`Observer`] (every stored change of a VM goes to the meter
//! task's [`Inbox`](crate::inbox::Inbox), never waiting) and as its
//! [`UsageSource`] (the latest sample, for GetVmInfo).

use metald_core::ports::{Observer, UsageSource, VmRecord, VmUsage};
use metald_core::{VmId, VmState};

use crate::{Billing, Stats};

/// A VM's VMM as billing sees it.
#[derive(Debug, Clone)]
pub(crate) struct VmEvent {
    /// metald's host-wide key of the VM; billing's own records use it.
    pub(crate) id: String,
    /// The customer's name for the VM: what the billing service is told.
    pub(crate) name: String,
    pub(crate) customer: String,
    /// pid and start time when a VMM runs.
    pub(crate) process: Option<(i32, u64)>,
    /// Host side of the VM's veth, whose counters are the VM's traffic.
    pub(crate) veth: Option<String>,
}

pub(crate) enum Msg {
    Changed(VmEvent),
    Removed(String),
}

impl UsageSource for Billing {
    fn usage(&self, id: &VmId) -> Option<VmUsage> {
        self.latest(id)
    }
}

impl Observer for Billing {
    fn vm_changed(&self, vm: &VmRecord) {
        let process = match (&vm.runtime, vm.state) {
            (Some(rt), VmState::Running | VmState::Paused) => Some((rt.pid, rt.start_time)),
            _ => None,
        };
        self.put(
            vm.id.to_string(),
            Msg::Changed(VmEvent {
                id: vm.id.to_string(),
                name: vm.name.to_string(),
                customer: vm.customer.to_string(),
                process,
                veth: vm
                    .spec
                    .nics()
                    .iter()
                    .find_map(|n| n.attachment.as_ref())
                    .map(|a| a.host_veth.clone()),
            }),
        );
    }

    fn vm_removed(&self, id: &VmId) {
        self.put(id.to_string(), Msg::Removed(id.to_string()));
    }
}

impl Billing {
    fn put(&self, vm: String, msg: Msg) {
        if self.inbox.put(vm, msg) {
            Stats::bump(&self.stats.inbox_coalesced);
        }
    }
}
