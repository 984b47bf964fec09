//! metald's API as metald-stress uses it: the generated Connect client (binary
//! protobuf over HTTP/1.1), one per customer token, every call timed.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use connectrpc::client::{ClientConfig, HttpClient};
use connectrpc::{ConnectError, ErrorCode, Protocol};
use metald_proto::vmprovisioner::v1 as pb;

use crate::plan::{Seen, Step};
use crate::stats::Stats;

type Client = pb::VmServiceClient<HttpClient>;

/// A timed call of an RPC whose request is only the VM's name; its state.
macro_rules! by_id {
    ($api:ident, $client:ident, $rpc:literal, $method:ident, $req:ident, $id:expr) => {{
        let req = pb::$req {
            vm_id: $id,
            ..Default::default()
        };
        let r = $api.timed($rpc, $client.$method(req)).await?;
        r.into_owned().state
    }};
}

pub struct Api {
    clients: Vec<Client>,
    config: pb::VmConfig,
    heavy: bool,
    pub stats: Arc<Stats>,
}

impl Api {
    pub fn new(
        server: &str,
        tokens: &[String],
        config: pb::VmConfig,
        timeout: Duration,
        heavy: bool,
        stats: Arc<Stats>,
    ) -> Result<Api, String> {
        let uri: http::Uri = server
            .parse()
            .map_err(|e| format!("-server {server:?}: {e}"))?;
        let http = HttpClient::plaintext();
        let clients = tokens
            .iter()
            .map(|t| {
                let cfg = ClientConfig::new(uri.clone())
                    .with_protocol(Protocol::Connect)
                    .with_default_timeout(timeout)
                    .with_default_header("authorization", format!("Bearer {t}"));
                Client::new(http.clone(), cfg)
            })
            .collect();
        Ok(Api {
            clients,
            config,
            heavy,
            stats,
        })
    }

    pub fn customers(&self) -> usize {
        self.clients.len()
    }

    async fn timed<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<T, ConnectError>>,
    ) -> Result<T, ConnectError> {
        let began = Instant::now();
        let r = call.await;
        self.stats.record(rpc, began, r.as_ref().err());
        r
    }

    /// Runs one step on customer `c`'s VM `vm`; the VM's state afterwards
    /// (`None` once deleted).
    pub async fn step(&self, c: usize, vm: &str, step: Step) -> Result<Option<Seen>, ConnectError> {
        let cl = &self.clients[c];
        let id = vm.to_owned();
        let state = match step {
            Step::Create => {
                let req = pb::CreateVmRequest {
                    vm_id: id,
                    config: buffa::MessageField::some(self.config.clone()),
                    ..Default::default()
                };
                let r = self.timed("CreateVm", cl.create_vm(req)).await?;
                r.into_owned().state
            }
            Step::Boot => by_id!(self, cl, "BootVm", boot_vm, BootVmRequest, id),
            Step::Pause => by_id!(self, cl, "PauseVm", pause_vm, PauseVmRequest, id),
            Step::Resume => by_id!(self, cl, "ResumeVm", resume_vm, ResumeVmRequest, id),
            Step::Reboot => by_id!(self, cl, "RebootVm", reboot_vm, RebootVmRequest, id),
            Step::Shutdown => {
                // Under heavy load half the shutdowns ask the guest first.
                let graceful = self.heavy && rand::random_bool(0.5);
                let req = pb::ShutdownVmRequest {
                    vm_id: id,
                    force: !graceful,
                    timeout_seconds: if graceful { 5 } else { 0 },
                    ..Default::default()
                };
                let r = self.timed("ShutdownVm", cl.shutdown_vm(req)).await?;
                r.into_owned().state
            }
            Step::Delete => {
                self.delete(c, vm, false).await?;
                return Ok(None);
            }
            Step::Info => return self.info(c, vm).await,
        };
        Ok(Some(seen(state.as_known())))
    }

    /// GetVmInfo: the VM's state, `None` when metald has no such VM.
    pub async fn info(&self, c: usize, vm: &str) -> Result<Option<Seen>, ConnectError> {
        let req = pb::GetVmInfoRequest {
            vm_id: vm.to_owned(),
            ..Default::default()
        };
        let began = Instant::now();
        let r = self.clients[c].get_vm_info(req).await;
        match r {
            Err(e) if e.code == ErrorCode::NotFound => {
                // Not an error: the caller asked whether it exists.
                self.stats.record("GetVmInfo", began, None);
                Ok(None)
            }
            Err(e) => {
                self.stats.record("GetVmInfo", began, Some(&e));
                Err(e)
            }
            Ok(r) => {
                self.stats.record("GetVmInfo", began, None);
                Ok(Some(seen(r.into_owned().state.as_known())))
            }
        }
    }

    /// Force-deletes a VM; with `maybe`, a VM that was never made is no error.
    pub async fn delete(&self, c: usize, vm: &str, maybe: bool) -> Result<(), ConnectError> {
        let req = pb::DeleteVmRequest {
            vm_id: vm.to_owned(),
            force: true,
            ..Default::default()
        };
        let began = Instant::now();
        match self.clients[c].delete_vm(req).await {
            Err(e) if maybe && e.code == ErrorCode::NotFound => {
                self.stats.record("DeleteVm", began, None);
                Ok(())
            }
            Err(e) => {
                self.stats.record("DeleteVm", began, Some(&e));
                Err(e)
            }
            Ok(_) => {
                self.stats.record("DeleteVm", began, None);
                Ok(())
            }
        }
    }

    /// Every VM name of customer `c`, paging through ListVms.
    pub async fn list(&self, c: usize) -> Result<Vec<String>, ConnectError> {
        let mut names = Vec::new();
        let mut token = String::new();
        // A small page under heavy load, so paging is exercised too.
        let page_size = if self.heavy { 10 } else { 100 };
        loop {
            let req = pb::ListVmsRequest {
                page_size,
                page_token: token,
                ..Default::default()
            };
            let page = self
                .timed("ListVms", self.clients[c].list_vms(req))
                .await?
                .into_owned();
            names.extend(page.vms.into_iter().map(|v| v.vm_id));
            if page.next_page_token.is_empty() {
                return Ok(names);
            }
            token = page.next_page_token;
        }
    }
}

fn seen(state: Option<pb::VmState>) -> Seen {
    match state {
        Some(pb::VmState::VM_STATE_CREATED) => Seen::Created,
        Some(pb::VmState::VM_STATE_RUNNING) => Seen::Running,
        Some(pb::VmState::VM_STATE_PAUSED) => Seen::Paused,
        _ => Seen::Stopped,
    }
}
