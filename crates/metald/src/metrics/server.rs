//! The metrics listener: `GET /metrics` answers OpenMetrics text on its
//! own address (`UNKEY_METALD_OTEL_PROMETHEUS_ADDRESS:PORT`), and `GET
//! /health` the health report with each check's detail. The VM and
//! lease gauges are read from the store at each scrape, so they are exact.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metald_core::VmState;
use metald_core::ports::Store;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use super::registry::{Metrics, render};

/// The content type of OpenMetrics text.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a scrape reads.
pub struct Scrape {
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
    pub store: Arc<dyn Store>,
    /// The backend label of the VM gauge.
    pub backend: &'static str,
    /// `GET /health` here answers with each check's detail (this port is
    /// the operator's, on loopback by default; the API port's omits them).
    pub health: metald_api::Health,
}

impl Scrape {
    /// Sets the gauges read from the store: VMs by state, leased addresses.
    async fn census(&self) {
        let m = &self.metrics;
        match self.store.all().await {
            Ok(vms) => {
                for state in VmState::ALL {
                    let n = vms.iter().filter(|v| v.state == state).count();
                    let labels = vec![
                        ("state", state.as_str().to_owned()),
                        ("backend", self.backend.to_owned()),
                    ];
                    m.vms.get_or_create(&labels).set(n as i64);
                }
            }
            Err(e) => {
                warn!(error = %e, "metrics: cannot count VMs");
                m.store_errors.inc();
            }
        }
        match self.store.leases().await {
            Ok(l) => {
                m.ip_leases.set(l.len() as i64);
            }
            Err(e) => {
                warn!(error = %e, "metrics: cannot count leases");
                m.store_errors.inc();
            }
        }
    }
}

async fn scrape(State(s): State<Arc<Scrape>>) -> Response {
    s.census().await;
    let body = render(&s.registry);
    ([(http_content_type(), OPENMETRICS)], body).into_response()
}

fn http_content_type() -> axum::http::HeaderName {
    axum::http::header::CONTENT_TYPE
}

/// Binds the metrics listener and serves it in the background; logs the
/// bound address (`metrics serving addr=...`).
pub async fn serve(addr: SocketAddr, state: Scrape) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding UNKEY_METALD_OTEL_PROMETHEUS_ADDRESS:UNKEY_METALD_OTEL_PROMETHEUS_PORT = {addr}"
        )
    })?;
    let local = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route(
            "/health",
            get(|State(s): State<Arc<Scrape>>| async move { s.health.response(true) }),
        )
        .with_state(Arc::new(state));
    info!(addr = %local, "metrics serving");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics listener ended");
        }
    }))
}
