//! HTTP/1.1 over a VMM's Unix control socket, as Firecracker and Cloud
//! Hypervisor serve their APIs. hyper does the protocol; this module only
//! connects, sets `Host`, bounds each call in time and turns answers into
//! text errors that name the call.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Longest a VMM may take to answer one API call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A VMM's answer.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

/// Why a call failed before the VMM answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Nothing listens on the socket (yet, or any more).
    #[error("cannot connect to {socket}: {reason}")]
    Connect { socket: String, reason: String },
    /// Connected, but the exchange failed or timed out.
    #[error("{method} {path} on {socket}: {reason}")]
    Exchange {
        method: String,
        path: String,
        socket: String,
        reason: String,
    },
}

/// Sends one request with an optional JSON body on a fresh connection.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Response, CallError> {
    let exchange_err = |reason: String| CallError::Exchange {
        method: method.to_string(),
        path: path.to_owned(),
        socket: socket.display().to_string(),
        reason,
    };
    let work = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| CallError::Connect {
                socket: socket.display().to_string(),
                reason: e.to_string(),
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
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| exchange_err(e.to_string()))?
            .to_bytes();
        driver.abort();
        Ok(Response { status, body })
    };
    tokio::time::timeout(CALL_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(exchange_err(format!("no answer within {CALL_TIMEOUT:?}"))))
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
            &sock,
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
    async fn a_missing_socket_is_a_connect_error_naming_it() {
        let e = call(Path::new("/nonexistent/x.sock"), Method::GET, "/", None)
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Connect { .. }));
        assert!(e.to_string().contains("/nonexistent/x.sock"));
    }
}
