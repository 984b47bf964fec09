//! The audit log: one line per state-changing RPC (CreateVm, DeleteVm,
//! BootVm, ShutdownVm, PauseVm, ResumeVm, RebootVm) on its own tracing
//! target, [`TARGET`], apart from debug logging, so it can be routed or
//! kept on its own (`UNKEY_METALD_LOG=info,metald::audit=info`).
//!
//! Fields: `customer` (who), `peer` (the mTLS client identity, when there
//! is one), `rpc` (what), `vm_id` (which VM, as the customer names it),
//! `outcome` (`ok` or the Connect code) and `error_id` (for `internal` and
//! `unavailable`, the id metald's log has the details under).

use connectrpc::{ConnectError, RequestContext, Response, ServiceResult};
use metald_core::{CustomerId, Error};

use crate::auth::caller;
use crate::status::to_connect_with_id;
use crate::tls::PeerIdentity;

/// The tracing target of audit lines.
pub const TARGET: &str = "metald::audit";

/// The state-changing RPCs, by their method names.
pub(crate) const STATE_CHANGING: [&str; 7] = [
    "CreateVm",
    "DeleteVm",
    "BootVm",
    "ShutdownVm",
    "PauseVm",
    "ResumeVm",
    "RebootVm",
];

/// Records a state-changing RPC the door refused before its body was read
/// (so no VM is known); other paths are not audited. `customer` is empty
/// when the refusal was for the credentials.
pub fn refused(path: &str, customer: &str, peer: Option<&PeerIdentity>, e: &ConnectError) {
    let Some(rpc) = path
        .strip_prefix("/vmprovisioner.v1.VmService/")
        .filter(|m| STATE_CHANGING.contains(m))
    else {
        return;
    };
    let peer = peer.map(|p| p.id.as_str()).unwrap_or("");
    tracing::info!(target: TARGET, customer, peer, rpc, vm_id = "", outcome = e.code.as_str(), error_id = "", "audit");
}

/// One state-changing RPC being served.
pub struct Audit {
    pub who: CustomerId,
    peer: Option<String>,
    rpc: &'static str,
    vm_id: String,
}

impl Audit {
    /// Starts the record of `rpc` on the VM the request names.
    pub fn start(
        ctx: &RequestContext,
        rpc: &'static str,
        vm_id: &str,
    ) -> Result<Audit, ConnectError> {
        Ok(Audit {
            who: caller(ctx)?,
            peer: ctx.extensions().get::<PeerIdentity>().map(|p| p.id.clone()),
            rpc,
            vm_id: vm_id.chars().take(128).collect(),
        })
    }

    /// Writes the line and turns the outcome into the RPC's answer;
    /// `named` gives the VM's id from the response when the request had
    /// none (CreateVm).
    pub fn finish<R>(
        self,
        result: Result<R, Error>,
        named: impl FnOnce(&R) -> String,
    ) -> ServiceResult<R> {
        let peer = self.peer.as_deref().unwrap_or("");
        match result {
            Ok(r) => {
                let vm_id = if self.vm_id.is_empty() {
                    named(&r)
                } else {
                    self.vm_id
                };
                tracing::info!(target: TARGET, customer = %self.who, peer, rpc = self.rpc, vm_id, outcome = "ok", error_id = "", "audit");
                Response::ok(r)
            }
            Err(e) => {
                let (e, id) = to_connect_with_id(e);
                let error_id = id.unwrap_or_default();
                tracing::info!(target: TARGET, customer = %self.who, peer, rpc = self.rpc, vm_id = self.vm_id, outcome = e.code.as_str(), error_id, "audit");
                Err(e)
            }
        }
    }
}
