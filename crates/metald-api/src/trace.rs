//! One span per request, continuing the caller's trace: an incoming W3C
//! `traceparent` (and `baggage`) becomes the span's parent, the caller's
//! customer is set on it as `metald.customer_id` once the door knows it,
//! and a failed call marks it as an error. Every log line written inside
//! the request carries the span's `trace_id` (and, when spans are
//! exported, its `span_id`).
//!
//! Whether spans are exported (and sampled) is the binary's choice: it
//! installs the OpenTelemetry layer and the propagators; without them the
//! span is local to the logs, with a trace id of its own.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::trace::{TraceContextExt, TraceId};
use opentelemetry_http::HeaderExtractor;
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Wraps a request in its span.
pub async fn rpc(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", path));
    // Bounded names only: a path that is not an RPC is named as a route.
    let name = if service.is_empty() || service.len() > 128 || method.len() > 64 {
        "http".to_owned()
    } else {
        format!("{service}/{method}")
    };
    let span = tracing::info_span!(
        "rpc",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "connect_rpc",
        rpc.service = %service.get(..128).unwrap_or(service),
        rpc.method = %method.get(..64).unwrap_or(method),
        metald.customer_id = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(req.headers()))
    });
    let incoming = parent.span().span_context().trace_id();
    let _ = span.set_parent(parent);
    let exported = span.context().span().span_context().trace_id();
    let trace_id = [exported, incoming]
        .into_iter()
        .find(|t| *t != TraceId::INVALID)
        .map(|t| t.to_string())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    span.record("trace_id", trace_id.as_str());
    let span_id = span.context().span().span_context().span_id();
    if span_id != opentelemetry::trace::SpanId::INVALID {
        span.record("span_id", span_id.to_string().as_str());
    }
    let resp = next.run(req).instrument(span.clone()).await;
    if failed(&resp) {
        span.record("otel.status_code", "ERROR");
    }
    resp
}

/// Sets the caller's customer on the request's span (the door calls this
/// once the caller is known).
pub fn customer(id: &str) {
    tracing::Span::current().record("metald.customer_id", id);
}

/// Whether the response reports a failed call: a Connect error status, or
/// a gRPC `grpc-status` other than 0 in the headers (a trailers-only
/// answer, as every gRPC error metald sends is).
fn failed(resp: &Response) -> bool {
    if resp.status().is_client_error() || resp.status().is_server_error() {
        return true;
    }
    resp.headers()
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() != b"0")
}
