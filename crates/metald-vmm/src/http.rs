//! HTTP/1.1 over a VMM's Unix control socket, as Firecracker and Cloud
//! Hypervisor serve their APIs. hyper does the protocol; this module only
//! connects, sets `Host`, bounds each call in time and the answer in size
//! ([`MAX_BODY`]), and turns answers into text errors that name the call.
//! Error texts never hold the socket's host path or the OS's words about
//! it: those go to metald's log.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use metald_core::ports::VmmError;
use tracing::{debug, warn};

pub use crate::beneath::Endpoint;

/// Longest a VMM may take to answer one API call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer body metald reads from a VMM: 1 MiB. Firecracker's and
/// Cloud Hypervisor's answers are a few KiB; a longer one is an error.
pub const MAX_BODY: usize = 1 << 20;

/// A VMM's answer.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Why a call failed before the VMM answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Nothing listens on the socket (yet, or any more), or the socket is
    /// not one metald may use.
    #[error("cannot connect to the VMM's API socket")]
    Connect,
    /// Connected, but the exchange failed, timed out or the answer was too
    /// large.
    #[error("{method} {path}: {reason}")]
    Exchange {
        method: String,
        path: String,
        reason: String,
    },
    /// No answer within [`CALL_TIMEOUT`].
    #[error("{method} {path}: no answer within {CALL_TIMEOUT:?}")]
    Timeout { method: String, path: String },
}

impl From<CallError> for VmmError {
    /// Nothing listening is a VMM that is gone; silence is a timeout; a
    /// broken exchange is I/O.
    fn from(e: CallError) -> Self {
        let text = e.to_string();
        match e {
            CallError::Connect => VmmError::Gone(text),
            CallError::Timeout { .. } => VmmError::Timeout(text),
            CallError::Exchange { .. } => VmmError::Io(text),
        }
    }
}

/// Sends one request with an optional JSON body on a fresh connection.
pub async fn call(
    socket: &Endpoint,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Response, CallError> {
    let exchange_err = |reason: String| CallError::Exchange {
        method: method.to_string(),
        path: path.to_owned(),
        reason,
    };
    let work = async {
        let stream = socket.connect().await.map_err(|e| {
            use std::io::ErrorKind::{ConnectionRefused, NotFound};
            if matches!(e.kind(), NotFound | ConnectionRefused) {
                // Not listening (yet, or any more): the start-up wait sees
                // this many times.
                debug!(socket = %socket.display(), error = %e, "cannot connect to a VMM's API");
            } else {
                // A link, a foreign owner, not a socket: what a compromised
                // VMM might have planted.
                warn!(socket = %socket.display(), error = %e, "refusing a VMM's API socket");
            }
            CallError::Connect
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| exchange_err(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))
            .map_err(|e| exchange_err(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| exchange_err(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    exchange_err(format!("answer longer than {MAX_BODY} bytes"))
                } else {
                    exchange_err(e.to_string())
                }
            })?
            .to_bytes();
        driver.abort();
        Ok(Response { status, body })
    };
    tokio::time::timeout(CALL_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            Err(CallError::Timeout {
                method: method.to_string(),
                path: path.to_owned(),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn sends_host_and_body_and_reads_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            // Read until the whole 7-byte body has arrived.
            while !String::from_utf8_lossy(&got).contains("{\"a\":1}") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "client closed early");
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 24\r\n\r\n{\"fault_message\":\"nope\"}")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let r = call(
            &Endpoint::Path(sock.clone()),
            Method::PUT,
            "/drives/root",
            Some(b"{\"a\":1}".to_vec()),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(&r.body[..], b"{\"fault_message\":\"nope\"}");
        let req = server.await.unwrap().to_lowercase();
        assert!(req.starts_with("put /drives/root http/1.1"), "{req}");
        assert!(req.contains("host: localhost"), "{req}");
        assert!(req.contains("content-type: application/json"), "{req}");
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_connect_error_without_its_path() {
        let e = call(
            &Endpoint::Path("/nonexistent/x.sock".into()),
            Method::GET,
            "/",
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(e, CallError::Connect);
        assert!(!e.to_string().contains('/'), "{e}");
        assert!(VmmError::from(e).is_gone());
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_a_gone_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        drop(tokio::net::UnixListener::bind(&sock).unwrap());
        let e = call(&Endpoint::Path(sock), Method::GET, "/", None)
            .await
            .unwrap_err();
        assert_eq!(e, CallError::Connect);
        assert!(VmmError::from(e).is_gone());
    }

    #[test]
    fn silence_is_a_timeout_and_a_broken_exchange_is_io() {
        let (method, path) = ("GET".to_string(), "/vm".to_string());
        let late = CallError::Timeout {
            method: method.clone(),
            path: path.clone(),
        };
        assert_eq!(
            VmmError::from(late),
            VmmError::Timeout(format!("GET /vm: no answer within {CALL_TIMEOUT:?}"))
        );
        let broken = CallError::Exchange {
            method,
            path,
            reason: "connection reset".into(),
        };
        assert_eq!(
            VmmError::from(broken),
            VmmError::Io("GET /vm: connection reset".into())
        );
    }

    /// Serves one connection: reads the request head, then answers with
    /// `body_len` bytes of body in 64 KiB pieces, chunked or with a
    /// Content-Length of `declared` (until the client hangs up).
    async fn serve_big(
        listener: tokio::net::UnixListener,
        chunked: bool,
        declared: usize,
        body_len: usize,
    ) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = s.read(&mut buf).await.unwrap();
        let head = if chunked {
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
        } else {
            format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n")
        };
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let piece = vec![b'x'; 64 << 10];
        let mut left = body_len;
        while left > 0 {
            let n = left.min(piece.len());
            let mut out = Vec::new();
            if chunked {
                out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            }
            out.extend_from_slice(&piece[..n]);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            if s.write_all(&out).await.is_err() {
                return;
            }
            left -= n;
        }
        if chunked {
            let _ = s.write_all(b"0\r\n\r\n").await;
        }
    }

    #[tokio::test]
    async fn an_answer_over_the_limit_is_an_error_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        // With a Content-Length far over the limit, and chunked with more
        // than the limit: neither is read beyond the limit.
        for chunked in [false, true] {
            let _ = std::fs::remove_file(&sock);
            let listener = tokio::net::UnixListener::bind(&sock).unwrap();
            let server = tokio::spawn(serve_big(listener, chunked, 1 << 40, 4 * MAX_BODY));
            let e = call(&Endpoint::Path(sock.clone()), Method::GET, "/", None)
                .await
                .unwrap_err();
            match &e {
                CallError::Exchange { reason, .. } => {
                    assert!(reason.contains("longer than"), "{e}")
                }
                other => panic!("{other:?}"),
            }
            server.abort();
        }
        // An answer of exactly the limit is fine.
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve_big(listener, false, MAX_BODY, MAX_BODY));
        let r = call(&Endpoint::Path(sock.clone()), Method::GET, "/", None)
            .await
            .unwrap();
        assert_eq!(r.body.len(), MAX_BODY);
        server.await.unwrap();
    }
}
