//! The API port: every `vmprovisioner.v1.VmService` RPC over Connect (JSON
//! and binary), gRPC and gRPC-Web, plus `grpc.health.v1.Health`, gRPC
//! reflection and a plain `GET /health`, all on one listener (HTTP/1.1 and
//! HTTP/2; h2c, or TLS with ALPN). Every request first passes the
//! [`crate::door`]; connections are handled by [`crate::listen`].
//!
//! Handlers only decode, call the core service, and encode.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use connectrpc::{
    CompressionPolicy, ConnectError, ConnectRpcService, DeadlinePolicy, RequestContext, Response,
    Router, ServiceRequest, ServiceResult,
};
use metald_core::VmService;
use metald_core::error::Error;
use metald_proto::vmprovisioner::v1 as pb;
use metald_proto::vmprovisioner::v1::VmServiceExt;
use tokio::net::TcpListener;

use crate::audit::Audit;
use crate::auth::{Authenticator, caller};
use crate::convert;
use crate::door::{self, Door};
use crate::health::{Health, Level};
use crate::listen::{self, ConnectionLimits};
use crate::ratelimit::RateLimiter;
use crate::rpcmetrics::{self, RpcObserver};
use crate::status::to_connect;
use crate::tls::Tls;

/// Largest request body accepted; VM configs are small.
const MAX_REQUEST_BYTES: usize = 1 << 20;

/// What the API port needs: the core service, the authenticator, and the
/// transport's policy.
pub struct ApiServer {
    pub service: VmService,
    pub auth: Arc<Authenticator>,
    /// TLS (and mTLS) on the port; `None` serves plaintext (h2c).
    pub tls: Option<Arc<Tls>>,
    /// Per-customer request rate; `None` is unlimited.
    pub rate: Option<RateLimiter>,
    /// Longest a request may take; a client's shorter deadline is honoured.
    pub request_timeout_max: Duration,
    /// Timeouts and limits of each connection.
    pub connections: ConnectionLimits,
    /// Told about every finished RPC (metrics); `None`: nobody.
    pub rpc_observer: Option<Arc<dyn RpcObserver>>,
    /// What `GET /health` and `grpc.health.v1` report.
    pub health: Health,
}

struct VmApi {
    svc: VmService,
}

fn state(vm: &metald_core::ports::VmRecord) -> buffa::EnumValue<pb::VmState> {
    convert::state_to_pb(vm.state).into()
}

fn fail<T>(e: Error) -> Result<T, ConnectError> {
    Err(to_connect(e))
}

// Handlers return the concrete message type; the trait allows any encodable.
#[allow(refining_impl_trait)]
impl pb::VmService for VmApi {
    async fn create_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::CreateVmRequest>,
    ) -> ServiceResult<pb::CreateVmResponse> {
        let req = req.to_owned_message();
        let audit = Audit::start(&ctx, "CreateVm", &req.vm_id)?;
        let result = async {
            let id = convert::optional_vm_id(&req.vm_id)?;
            let spec = convert::spec_from_pb(req.config.as_option())?;
            let vm = self
                .svc
                .create(&audit.who, id, &req.customer_id, spec)
                .await?;
            Ok(pb::CreateVmResponse {
                vm_id: vm.name.to_string(),
                state: state(&vm),
                ..Default::default()
            })
        }
        .await;
        audit.finish(result, |r| r.vm_id.clone())
    }

    async fn delete_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::DeleteVmRequest>,
    ) -> ServiceResult<pb::DeleteVmResponse> {
        let req = req.to_owned_message();
        let audit = Audit::start(&ctx, "DeleteVm", &req.vm_id)?;
        let result = async {
            let id = convert::vm_id(&req.vm_id)?;
            self.svc.delete(&audit.who, &id, req.force).await?;
            Ok(pb::DeleteVmResponse {
                success: true,
                ..Default::default()
            })
        }
        .await;
        audit.finish(result, |_| String::new())
    }

    async fn boot_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::BootVmRequest>,
    ) -> ServiceResult<pb::BootVmResponse> {
        let req = req.to_owned_message();
        let audit = Audit::start(&ctx, "BootVm", &req.vm_id)?;
        let result = async {
            let id = convert::vm_id(&req.vm_id)?;
            let vm = self.svc.boot(&audit.who, &id).await?;
            Ok(pb::BootVmResponse {
                success: true,
                state: state(&vm),
                ..Default::default()
            })
        }
        .await;
        audit.finish(result, |_| String::new())
    }

    async fn shutdown_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::ShutdownVmRequest>,
    ) -> ServiceResult<pb::ShutdownVmResponse> {
        let req = req.to_owned_message();
        let audit = Audit::start(&ctx, "ShutdownVm", &req.vm_id)?;
        let result = async {
            let id = convert::vm_id(&req.vm_id)?;
            let timeout = convert::shutdown_timeout(req.timeout_seconds)?;
            let vm = self
                .svc
                .shutdown(&audit.who, &id, req.force, timeout)
                .await?;
            Ok(pb::ShutdownVmResponse {
                success: true,
                state: state(&vm),
                ..Default::default()
            })
        }
        .await;
        audit.finish(result, |_| String::new())
    }

    async fn pause_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::PauseVmRequest>,
    ) -> ServiceResult<pb::PauseVmResponse> {
        let req = req.to_owned_message();
        let audit = Audit::start(&ctx, "PauseVm", &req.vm_id)?;
        let result = async {
            let id = convert::vm_id(&req.vm_id)?;
            let vm = self.svc.pause(&audit.who, &id).await?;
            Ok(pb::PauseVmResponse {
                success: true,
                state: state(&vm),
                ..Default::default()
            })
        }
        .await;
        audit.finish(result, |_| String::new())
    }

    async fn resume_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::ResumeVmRequest>,
    ) -> ServiceResult<pb::ResumeVmResponse> {
        let req = req.to_owned_message();
        let audit = Audit::start(&ctx, "ResumeVm", &req.vm_id)?;
        let result = async {
            let id = convert::vm_id(&req.vm_id)?;
            let vm = self.svc.resume(&audit.who, &id).await?;
            Ok(pb::ResumeVmResponse {
                success: true,
                state: state(&vm),
                ..Default::default()
            })
        }
        .await;
        audit.finish(result, |_| String::new())
    }

    async fn reboot_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::RebootVmRequest>,
    ) -> ServiceResult<pb::RebootVmResponse> {
        let req = req.to_owned_message();
        let audit = Audit::start(&ctx, "RebootVm", &req.vm_id)?;
        let result = async {
            let id = convert::vm_id(&req.vm_id)?;
            let vm = self.svc.reboot(&audit.who, &id).await?;
            Ok(pb::RebootVmResponse {
                success: true,
                state: state(&vm),
                ..Default::default()
            })
        }
        .await;
        audit.finish(result, |_| String::new())
    }

    async fn get_vm_info(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::GetVmInfoRequest>,
    ) -> ServiceResult<pb::GetVmInfoResponse> {
        let who = caller(&ctx)?;
        let id = convert::vm_id(&req.to_owned_message().vm_id).or_else(fail)?;
        let d = self.svc.get(&who, &id).await.or_else(fail)?;
        Response::ok(pb::GetVmInfoResponse {
            vm_id: d.record.name.to_string(),
            config: buffa::MessageField::some(convert::spec_to_pb(&d.record.spec)),
            state: state(&d.record),
            backend_info: d.backend_info.into_iter().collect(),
            metrics: d
                .usage
                .map(|u| buffa::MessageField::some(convert::metrics(&u)))
                .unwrap_or_default(),
            network_info: convert::network_info(&d.record.spec)
                .map(buffa::MessageField::some)
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn list_vms(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::ListVmsRequest>,
    ) -> ServiceResult<pb::ListVmsResponse> {
        let who = caller(&ctx)?;
        let req = req.to_owned_message();
        let states = convert::states_from_pb(&req.state_filter).or_else(fail)?;
        let cursor = convert::cursor_from_token(&req.page_token).or_else(fail)?;
        let page = self
            .svc
            .list(&who, &states, req.page_size, cursor)
            .await
            .or_else(fail)?;
        Response::ok(pb::ListVmsResponse {
            vms: page.vms.iter().map(convert::vm_info).collect(),
            next_page_token: convert::page_token(page.next_cursor),
            total_count: page.total.min(i32::MAX as i64) as i32,
            ..Default::default()
        })
    }
}

/// Responses smaller than this go out uncompressed even to a client that
/// accepts gzip. metald's callers are control planes on the host's
/// network, and every CPU-millisecond metald spends is one its tenants' VMs
/// do not get: gzip on a ListVms page of 50 VMs (about 2 KiB of protobuf)
/// was 11% of metald's CPU per page (`docs/benchmarks.md`), most of it
/// setting up the compressor, to save a kilobyte. Larger answers (a page of
/// hundreds of VMs, or of a hundred in JSON) are still compressed.
pub const COMPRESS_MIN_BYTES: usize = 16 << 10;

/// The request limits the API port applies (body size, decode budgets).
pub fn limits() -> connectrpc::Limits {
    connectrpc::Limits::default().with_max_request_body_size(MAX_REQUEST_BYTES)
}

/// Serves the API on `listener` until `shutdown` resolves, then stops
/// accepting and finishes in-flight requests.
pub async fn serve(
    listener: TcpListener,
    api: ApiServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Arc::new(VmApi { svc: api.service }).register(Router::new());
    let (router, health) = connectrpc_health::install_static(router, [pb::VM_SERVICE_SERVICE_NAME]);
    let reflector = reflector()?;
    let router = connectrpc_reflection::install(router, reflector);
    let max = api.request_timeout_max;
    let connect = ConnectRpcService::new(router)
        .with_limits(limits())
        .with_compression_policy(CompressionPolicy::default().with_min_size(COMPRESS_MIN_BYTES))
        .with_deadline_policy(
            DeadlinePolicy::new()
                .with_max(max)
                .with_default_timeout(max),
        );
    let door = Arc::new(Door {
        auth: api.auth,
        rate: api.rate,
        request_timeout_max: max,
        max_body_bytes: MAX_REQUEST_BYTES,
    });
    let doc = api.health.clone();
    let app = axum::Router::new()
        // No details on this port: they may name host paths.
        .route("/health", get(move || async move { doc.response(false) }))
        .fallback_service(connect)
        .layer(axum::middleware::from_fn_with_state(door, door::check))
        .layer(axum::middleware::from_fn(crate::trace::rpc));
    let app = match api.rpc_observer {
        Some(obs) => app.layer(axum::middleware::from_fn_with_state(
            obs,
            rpcmetrics::observe,
        )),
        None => app,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut level = api.health.watch();
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let status = match *level.borrow_and_update() {
                Level::Failing => connectrpc_health::Status::NotServing,
                Level::Ok | Level::Degraded => connectrpc_health::Status::Serving,
            };
            for name in ["", pb::VM_SERVICE_SERVICE_NAME] {
                let _ = health.set_status(name, status);
            }
            tokio::select! {
                _ = &mut shutdown => break,
                changed = level.changed() => if changed.is_err() {
                    (&mut shutdown).await;
                    break;
                },
            }
        }
        health.shutdown();
        let _ = stop_tx.send(true);
    });
    listen::serve_connections(listener, app, api.tls, api.connections, stop_rx).await
}

/// gRPC reflection over what this port serves: the VM service, health and
/// reflection itself (billing.v1 is in the descriptors, as metald calls
/// it, but is not listed: it is not served here).
fn reflector() -> std::io::Result<connectrpc_reflection::Reflector> {
    let err = |e| std::io::Error::other(format!("reflection descriptors: {e}"));
    let mut r = connectrpc_reflection::Reflector::from_descriptor_set_bytes(
        metald_proto::FILE_DESCRIPTOR_SET,
    )
    .map_err(err)?;
    r.add_descriptor_set_bytes(metald_proto::HEALTH_DESCRIPTOR_SET)
        .map_err(err)?;
    Ok(r.with_services([
        pb::VM_SERVICE_SERVICE_NAME,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]))
}
