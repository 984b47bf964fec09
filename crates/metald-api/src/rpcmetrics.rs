//! Every RPC's outcome for an exporter: method, protocol, Connect code and
//! how long it took until the last byte of its answer, measured outside
//! the [`crate::door`] so its refusals count too. Labels are bounded: an
//! unknown path is `other`, and the code is read from the answer as the
//! client reads it (HTTP status, `grpc-status` header or trailer, the
//! gRPC-Web trailer frame, the Connect error body).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use connectrpc::protocol::Protocol;
use http_body::{Frame, SizeHint};
use metald_core::CustomerId;

/// Where finished RPCs are reported (metald's Prometheus registry).
pub trait RpcObserver: Send + Sync + 'static {
    /// One RPC ended. `customer` is the authenticated caller, when the
    /// door let it in.
    fn rpc_finished(&self, rpc: &RpcOutcome<'_>);
}

/// What [`RpcObserver::rpc_finished`] is told.
#[derive(Debug)]
pub struct RpcOutcome<'a> {
    /// `CreateVm`, ..., `grpc.health.v1.Health/Check`, or `other`.
    pub method: &'static str,
    /// `connect`, `grpc`, `grpc_web`.
    pub protocol: &'static str,
    /// The Connect code (`ok`, `not_found`, ...; `unknown` when the answer
    /// carried none).
    pub code: &'static str,
    pub customer: Option<&'a CustomerId>,
    pub elapsed: Duration,
}

/// Where the door leaves the caller it authenticated, for the observer.
#[derive(Debug, Clone, Default)]
pub struct CallerSlot(pub Arc<OnceLock<CustomerId>>);

const VM_SERVICE: &str = "/vmprovisioner.v1.VmService/";
/// The VM service's reads; its state-changing RPCs are audit's list.
const VM_READS: [&str; 2] = ["GetVmInfo", "ListVms"];
const OTHER_METHODS: [&str; 4] = [
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The bounded method label of a request path.
pub fn method_of(path: &str) -> &'static str {
    if let Some(m) = path.strip_prefix(VM_SERVICE) {
        return crate::audit::STATE_CHANGING
            .iter()
            .chain(VM_READS.iter())
            .find(|k| **k == m)
            .copied()
            .unwrap_or("other");
    }
    let p = path.trim_start_matches('/');
    OTHER_METHODS
        .into_iter()
        .find(|k| *k == p)
        .unwrap_or("other")
}

/// Every Connect code by its gRPC number.
const CODES: [&str; 17] = [
    "ok",
    "canceled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

fn code_of_grpc(v: &[u8]) -> &'static str {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .and_then(|n| CODES.get(n).copied())
        .unwrap_or("unknown")
}

fn code_of_name(name: &str) -> &'static str {
    CODES.into_iter().find(|c| *c == name).unwrap_or("unknown")
}

/// The axum middleware: wraps the answer's body, reports when it ends.
pub async fn observe(
    State(obs): State<Arc<dyn RpcObserver>>,
    mut req: Request,
    next: Next,
) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let started = Instant::now();
    let method = method_of(req.uri().path());
    let proto = Protocol::detect(req.headers());
    let protocol = match proto.map(|p| p.protocol) {
        Some(Protocol::Grpc) => "grpc",
        Some(Protocol::GrpcWeb) => "grpc_web",
        _ => "connect",
    };
    let framed = proto.is_some_and(|p| p.protocol != Protocol::Connect || p.is_streaming);
    let slot = CallerSlot::default();
    req.extensions_mut().insert(slot.clone());
    let res = next.run(req).await;
    let mut scan = Scan::new(protocol, framed);
    if let Some(v) = res.headers().get("grpc-status") {
        scan.code = Some(code_of_grpc(v.as_bytes()));
    } else if !framed {
        scan.code = res.status().is_success().then_some("ok");
        scan.unary_error = !res.status().is_success();
    }
    let report = Report {
        obs,
        method,
        protocol,
        slot,
        started,
        scan,
    };
    let (parts, body) = res.into_parts();
    Response::from_parts(
        parts,
        Body::new(Observed {
            inner: body,
            report: Some(report),
        }),
    )
}

/// Reads the Connect code from an answer's body as it streams by.
struct Scan {
    code: Option<&'static str>,
    /// Envelope framing: gRPC-Web trailers (flag 0x80) or the Connect
    /// end-of-stream message (flag 0x02) carry the code.
    framed: bool,
    protocol: &'static str,
    /// A Connect unary error: its JSON body names the code.
    unary_error: bool,
    /// The frame header being read, the frame's length left, and the
    /// payload kept of a trailer/end frame.
    head: Vec<u8>,
    left: usize,
    keep: Option<Vec<u8>>,
    body: Vec<u8>,
}

/// Most bytes of an error body or trailer frame kept for reading its code.
const KEEP: usize = 4096;

impl Scan {
    fn new(protocol: &'static str, framed: bool) -> Self {
        Scan {
            code: None,
            framed,
            protocol,
            unary_error: false,
            head: Vec::new(),
            left: 0,
            keep: None,
            body: Vec::new(),
        }
    }

    fn data(&mut self, mut b: &[u8]) {
        if self.code.is_some() {
            return;
        }
        if self.unary_error {
            let room = KEEP.saturating_sub(self.body.len());
            self.body.extend_from_slice(&b[..b.len().min(room)]);
            return;
        }
        if !self.framed || self.protocol == "grpc" {
            return;
        }
        while !b.is_empty() {
            if self.left == 0 && self.head.len() < 5 {
                let n = (5 - self.head.len()).min(b.len());
                self.head.extend_from_slice(&b[..n]);
                b = &b[n..];
                if self.head.len() == 5 {
                    let len = u32::from_be_bytes([
                        self.head[1],
                        self.head[2],
                        self.head[3],
                        self.head[4],
                    ]);
                    self.left = len as usize;
                    self.keep = (self.head[0] & 0x82 != 0).then(Vec::new);
                    if self.left == 0 {
                        self.end_frame();
                    }
                }
                continue;
            }
            let n = self.left.min(b.len());
            if let Some(k) = &mut self.keep {
                let room = KEEP.saturating_sub(k.len());
                k.extend_from_slice(&b[..n.min(room)]);
            }
            self.left -= n;
            b = &b[n..];
            if self.left == 0 {
                self.end_frame();
            }
        }
    }

    fn end_frame(&mut self) {
        self.head.clear();
        let Some(k) = self.keep.take() else {
            return;
        };
        let text = String::from_utf8_lossy(&k);
        if self.protocol == "grpc_web" {
            let code = text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("grpc-status")
                    .then(|| code_of_grpc(v.as_bytes()))
            });
            self.code = Some(code.unwrap_or("unknown"));
        } else {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            self.code = Some(match v["error"]["code"].as_str() {
                Some(c) => code_of_name(c),
                None => "ok",
            });
        }
    }

    fn trailers(&mut self, t: &http::HeaderMap) {
        if let Some(v) = t.get("grpc-status") {
            self.code = Some(code_of_grpc(v.as_bytes()));
        }
    }

    fn finish(&self) -> &'static str {
        if let Some(c) = self.code {
            return c;
        }
        if self.unary_error {
            let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
            return v["code"].as_str().map(code_of_name).unwrap_or("unknown");
        }
        "unknown"
    }
}

struct Report {
    obs: Arc<dyn RpcObserver>,
    method: &'static str,
    protocol: &'static str,
    slot: CallerSlot,
    started: Instant,
    scan: Scan,
}

impl Drop for Report {
    fn drop(&mut self) {
        self.obs.rpc_finished(&RpcOutcome {
            method: self.method,
            protocol: self.protocol,
            code: self.scan.finish(),
            customer: self.slot.0.get(),
            elapsed: self.started.elapsed(),
        });
    }
}

/// An answer's body that reports the RPC when it ends or is dropped.
struct Observed {
    inner: Body,
    report: Option<Report>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(r) = &mut self.report {
                    if let Some(d) = f.data_ref() {
                        r.scan.data(d);
                    } else if let Some(t) = f.trailers_ref() {
                        r.scan.trailers(t);
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.report = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_a_fixed_set() {
        assert_eq!(method_of("/vmprovisioner.v1.VmService/BootVm"), "BootVm");
        assert_eq!(method_of("/vmprovisioner.v1.VmService/Evil\u{1}"), "other");
        assert_eq!(method_of("/x/y"), "other");
        assert_eq!(
            method_of("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
    }

    #[test]
    fn grpc_web_trailers_and_connect_end_frames_give_the_code() {
        let mut s = Scan::new("grpc_web", true);
        let t = b"grpc-status: 5\r\ngrpc-message: x\r\n";
        let mut frame = vec![0x80];
        frame.extend_from_slice(&(t.len() as u32).to_be_bytes());
        frame.extend_from_slice(t);
        let mut msg = vec![0, 0, 0, 0, 2, 8, 1];
        msg.extend_from_slice(&frame);
        // Split anywhere: frames span chunks.
        s.data(&msg[..3]);
        s.data(&msg[3..9]);
        s.data(&msg[9..]);
        assert_eq!(s.finish(), "not_found");

        let mut s = Scan::new("connect", true);
        let end = br#"{"error":{"code":"unavailable","message":"m"}}"#;
        let mut frame = vec![0x02];
        frame.extend_from_slice(&(end.len() as u32).to_be_bytes());
        frame.extend_from_slice(end);
        s.data(&frame);
        assert_eq!(s.finish(), "unavailable");
    }

    #[test]
    fn a_connect_unary_error_body_gives_the_code() {
        let mut s = Scan::new("connect", false);
        s.unary_error = true;
        s.data(br#"{"code":"failed_precondition","message":"cannot boot"}"#);
        assert_eq!(s.finish(), "failed_precondition");
        assert_eq!(code_of_grpc(b"99"), "unknown");
    }
}
