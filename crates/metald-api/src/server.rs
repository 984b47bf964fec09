//! The API port: every `vmprovisioner.v1.VmService` RPC over Connect (JSON
//! and binary), gRPC and gRPC-Web, plus `grpc.health.v1.Health`, gRPC
//! reflection and a plain `GET /health`, all on one listener (HTTP/1.1 and
//! h2c).
//!
//! Handlers only decode, call the core service, and encode.

use std::future::Future;
use std::sync::Arc;

use axum::routing::get;
use connectrpc::{
    ConnectError, ConnectRpcService, RequestContext, Response, Router, ServiceRequest,
    ServiceResult,
};
use metald_core::VmService;
use metald_core::error::Error;
use metald_proto::vmprovisioner::v1 as pb;
use metald_proto::vmprovisioner::v1::VmServiceExt;
use tokio::net::TcpListener;

use crate::auth::{AuthInterceptor, Authenticator, caller};
use crate::convert;
use crate::status::to_connect;

/// Largest request body accepted; VM configs are small.
const MAX_REQUEST_BYTES: usize = 1 << 20;

/// What the API port needs: the core service and the authenticator.
pub struct ApiServer {
    pub service: VmService,
    pub auth: Arc<Authenticator>,
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
        let who = caller(&ctx)?;
        let req = req.to_owned_message();
        let id = convert::optional_vm_id(&req.vm_id).or_else(fail)?;
        let spec = convert::spec_from_pb(req.config.as_option()).or_else(fail)?;
        let vm = self
            .svc
            .create(&who, id, &req.customer_id, spec)
            .await
            .or_else(fail)?;
        Response::ok(pb::CreateVmResponse {
            vm_id: vm.name.to_string(),
            state: state(&vm),
            ..Default::default()
        })
    }

    async fn delete_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::DeleteVmRequest>,
    ) -> ServiceResult<pb::DeleteVmResponse> {
        let who = caller(&ctx)?;
        let req = req.to_owned_message();
        let id = convert::vm_id(&req.vm_id).or_else(fail)?;
        self.svc.delete(&who, &id, req.force).await.or_else(fail)?;
        Response::ok(pb::DeleteVmResponse {
            success: true,
            ..Default::default()
        })
    }

    async fn boot_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::BootVmRequest>,
    ) -> ServiceResult<pb::BootVmResponse> {
        let who = caller(&ctx)?;
        let id = convert::vm_id(&req.to_owned_message().vm_id).or_else(fail)?;
        let vm = self.svc.boot(&who, &id).await.or_else(fail)?;
        Response::ok(pb::BootVmResponse {
            success: true,
            state: state(&vm),
            ..Default::default()
        })
    }

    async fn shutdown_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::ShutdownVmRequest>,
    ) -> ServiceResult<pb::ShutdownVmResponse> {
        let who = caller(&ctx)?;
        let req = req.to_owned_message();
        let id = convert::vm_id(&req.vm_id).or_else(fail)?;
        let timeout = convert::shutdown_timeout(req.timeout_seconds).or_else(fail)?;
        let vm = self
            .svc
            .shutdown(&who, &id, req.force, timeout)
            .await
            .or_else(fail)?;
        Response::ok(pb::ShutdownVmResponse {
            success: true,
            state: state(&vm),
            ..Default::default()
        })
    }

    async fn pause_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::PauseVmRequest>,
    ) -> ServiceResult<pb::PauseVmResponse> {
        let who = caller(&ctx)?;
        let id = convert::vm_id(&req.to_owned_message().vm_id).or_else(fail)?;
        let vm = self.svc.pause(&who, &id).await.or_else(fail)?;
        Response::ok(pb::PauseVmResponse {
            success: true,
            state: state(&vm),
            ..Default::default()
        })
    }

    async fn resume_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::ResumeVmRequest>,
    ) -> ServiceResult<pb::ResumeVmResponse> {
        let who = caller(&ctx)?;
        let id = convert::vm_id(&req.to_owned_message().vm_id).or_else(fail)?;
        let vm = self.svc.resume(&who, &id).await.or_else(fail)?;
        Response::ok(pb::ResumeVmResponse {
            success: true,
            state: state(&vm),
            ..Default::default()
        })
    }

    async fn reboot_vm(
        &self,
        ctx: RequestContext,
        req: ServiceRequest<'_, pb::RebootVmRequest>,
    ) -> ServiceResult<pb::RebootVmResponse> {
        let who = caller(&ctx)?;
        let id = convert::vm_id(&req.to_owned_message().vm_id).or_else(fail)?;
        let vm = self.svc.reboot(&who, &id).await.or_else(fail)?;
        Response::ok(pb::RebootVmResponse {
            success: true,
            state: state(&vm),
            ..Default::default()
        })
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
    let backend = api.service.backend_name();
    let router = Arc::new(VmApi { svc: api.service }).register(Router::new());
    let (router, health) = connectrpc_health::install_static(router, [pb::VM_SERVICE_SERVICE_NAME]);
    let reflector = connectrpc_reflection::Reflector::from_descriptor_set_bytes(
        metald_proto::FILE_DESCRIPTOR_SET,
    )
    .map_err(|e| std::io::Error::other(format!("reflection descriptors: {e}")))?;
    let router = connectrpc_reflection::install(router, reflector);
    let connect = ConnectRpcService::new(router)
        .with_limits(limits())
        .with_interceptor(AuthInterceptor(api.auth));
    let app = axum::Router::new()
        .route("/health", get(move || async move { health_body(backend) }))
        .fallback_service(connect);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            health.shutdown();
        })
        .await
}

fn health_body(backend: &str) -> axum::response::Response {
    let body = serde_json::json!({ "status": "ok", "backend": backend, "version": env!("CARGO_PKG_VERSION") });
    axum::response::Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .expect("static response")
}
