//! The API door: what every request passes before its body is read.
//!
//! 1. Authentication: the bearer token (or, over mTLS without a token, the
//!    client certificate's identity) names the customer; a request without
//!    valid credentials is answered `unauthenticated` from its headers
//!    alone, whatever body it announces.
//! 2. A body announced larger than the API accepts is refused.
//! 3. The customer's request rate (token bucket): over it, the answer is
//!    `resource_exhausted` with a retry hint (`Retry-After`, and the wait
//!    in the message).
//! 4. A deadline for the whole exchange, body included: the server's
//!    maximum (a client's shorter `grpc-timeout` / `connect-timeout-ms` is
//!    enforced by the RPC layer too).
//!
//! Answers are encoded as the request's protocol expects: Connect (HTTP
//! status + JSON), gRPC (trailers-only) and gRPC-Web (trailer frame).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use connectrpc::ConnectError;
use connectrpc::protocol::{Protocol, RequestProtocol};
use http::{HeaderValue, StatusCode, header};
use metald_core::CustomerId;

use crate::audit;
use crate::auth::{Authenticator, Caller};
use crate::ratelimit::RateLimiter;
use crate::rpcmetrics::CallerSlot;
use crate::status::to_connect;
use crate::tls::PeerIdentity;

/// What the door enforces.
pub struct Door {
    pub auth: Arc<Authenticator>,
    pub rate: Option<RateLimiter>,
    /// Longest any request may take, body included.
    pub request_timeout_max: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
}

/// Paths served without a token: health checks and reflection.
pub fn is_public(path: &str) -> bool {
    path == "/health"
        || path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

impl Door {
    /// The customer a request speaks for: its bearer token's, else (over
    /// mTLS) the one its client certificate names.
    pub fn customer(
        &self,
        authorization: Option<&str>,
        peer: Option<&PeerIdentity>,
    ) -> Result<CustomerId, ConnectError> {
        if authorization.is_none()
            && let Some(c) = peer.and_then(PeerIdentity::customer)
        {
            return CustomerId::parse(c).map_err(to_connect);
        }
        self.auth.authenticate(authorization).map_err(to_connect)
    }
}

/// The door as axum middleware.
pub async fn check(State(door): State<Arc<Door>>, mut req: Request, next: Next) -> Response {
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let proto = Protocol::detect(req.headers());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    let peer = req.extensions().get::<PeerIdentity>();
    let customer = match door.customer(authorization, peer) {
        Ok(c) => c,
        Err(e) => {
            audit::refused(req.uri().path(), "", peer, &e);
            return reject(proto, e);
        }
    };
    crate::trace::customer(customer.as_str());
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // gRPC framing adds 5 bytes per message.
    if announced.is_some_and(|n| n > door.max_body_bytes as u64 + 5) {
        let e = ConnectError::resource_exhausted(format!(
            "request body of {} bytes exceeds the limit of {} bytes",
            announced.unwrap_or_default(),
            door.max_body_bytes
        ));
        let peer = req.extensions().get::<PeerIdentity>();
        audit::refused(req.uri().path(), customer.as_str(), peer, &e);
        return reject(proto, e);
    }
    if let Some(rate) = &door.rate
        && let Err(wait) = rate.take(customer.as_str())
    {
        let r = too_many(proto, rate.rate(), wait);
        let e = ConnectError::resource_exhausted("request rate limit");
        let peer = req.extensions().get::<PeerIdentity>();
        audit::refused(req.uri().path(), customer.as_str(), peer, &e);
        return r;
    }
    if let Some(slot) = req.extensions().get::<CallerSlot>() {
        let _ = slot.0.set(customer.clone());
    }
    req.extensions_mut().insert(Caller(customer));
    match tokio::time::timeout(door.request_timeout_max, next.run(req)).await {
        Ok(r) => r,
        Err(_) => reject(
            proto,
            ConnectError::deadline_exceeded(format!(
                "request took longer than the server's maximum of {:?}",
                door.request_timeout_max
            )),
        ),
    }
}

fn too_many(proto: Option<RequestProtocol>, rate: f64, wait: Duration) -> Response {
    let ms = wait.as_millis().max(1);
    let e = ConnectError::resource_exhausted(format!(
        "request rate limit of {rate} per second exceeded; retry in {ms} ms"
    ));
    let mut r = reject(proto, e);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    r
}

/// The error `e` encoded for the request's protocol (Connect unary when
/// the content type is unknown).
pub fn reject(proto: Option<RequestProtocol>, e: ConnectError) -> Response {
    let message = e.message.clone().unwrap_or_default();
    let Some(p) = proto else {
        return connect_unary(&e);
    };
    match p.protocol {
        Protocol::Grpc => grpc_response(&p, &e, &message, Body::empty()),
        Protocol::GrpcWeb => {
            let trailers = format!(
                "grpc-status: {}\r\ngrpc-message: {}\r\n",
                e.code.grpc_code(),
                grpc_percent_encode(&message)
            );
            grpc_response(
                &p,
                &e,
                &message,
                Body::from(frame(0x80, trailers.as_bytes())),
            )
        }
        Protocol::Connect if p.is_streaming => {
            let end = serde_json::json!({"error": {"code": e.code.as_str(), "message": message}});
            let body = Body::from(frame(0x02, end.to_string().as_bytes()));
            let mut r = Response::new(body);
            set_content_type(&mut r, &p);
            r
        }
        _ => connect_unary(&e),
    }
}

fn connect_unary(e: &ConnectError) -> Response {
    let mut r = Response::new(Body::from(e.to_json()));
    *r.status_mut() = e.http_status();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn grpc_response(p: &RequestProtocol, e: &ConnectError, message: &str, body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::OK;
    set_content_type(&mut r, p);
    let h = r.headers_mut();
    h.insert("grpc-status", HeaderValue::from(e.code.grpc_code()));
    if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    r
}

fn set_content_type(r: &mut Response, p: &RequestProtocol) {
    let ct = p.protocol.response_content_type(p.codec_format, true);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
}

/// One length-prefixed frame (gRPC-Web trailers, Connect end of stream).
fn frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// `grpc-message` encoding: printable ASCII except `%` as is, the rest as
/// `%XX` of its UTF-8 bytes.
fn grpc_percent_encode(m: &str) -> String {
    let mut out = String::with_capacity(m.len());
    for b in m.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn proto(ct: &str) -> Option<RequestProtocol> {
        Protocol::detect_from_content_type(ct)
    }

    async fn body(r: Response) -> Vec<u8> {
        r.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn each_protocol_gets_its_own_error_shape() {
        let e = || ConnectError::unauthenticated("missing Authorization header");
        let r = reject(proto("application/json"), e());
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let v: serde_json::Value = serde_json::from_slice(&body(r).await).unwrap();
        assert_eq!(v["code"], "unauthenticated");

        let r = reject(proto("application/grpc"), e());
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "16");
        assert_eq!(r.headers()["grpc-message"], "missing Authorization header");
        assert!(body(r).await.is_empty(), "trailers-only");

        let r = reject(proto("application/grpc-web+proto"), e());
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/grpc-web+proto"
        );
        let b = body(r).await;
        assert_eq!(b[0], 0x80);
        assert!(String::from_utf8_lossy(&b[5..]).contains("grpc-status: 16"));

        let r = reject(proto("application/connect+json"), e());
        let b = body(r).await;
        assert_eq!(b[0], 0x02);
        let v: serde_json::Value = serde_json::from_slice(&b[5..]).unwrap();
        assert_eq!(v["error"]["code"], "unauthenticated");
    }

    #[tokio::test]
    async fn rate_answers_carry_a_retry_hint() {
        let r = too_many(proto("application/json"), 2.0, Duration::from_millis(1500));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let v: serde_json::Value = serde_json::from_slice(&body(r).await).unwrap();
        assert_eq!(v["code"], "resource_exhausted");
        assert!(v["message"].as_str().unwrap().contains("retry in 1500 ms"));
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_percent_encode("a b%ü\n"), "a b%25%C3%BC%0A");
    }
}
