//! The API port's connections: accept, `TCP_NODELAY`, the TLS handshake
//! (when configured), HTTP/1.1 or HTTP/2 (h2c, or chosen by ALPN), and the
//! limits that keep idle, slow or greedy clients from pinning metald:
//! handshake and header timeouts, header size limits, an HTTP/2
//! concurrent-stream limit, keep-alive pings, and an idle timeout.
//!
//! On shutdown every connection is asked to finish gracefully (HTTP/2
//! GOAWAY, HTTP/1.1 no keep-alive); the future ends once all have.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::tls::{PeerIdentity, Tls};

/// Bounds every connection is held to.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Longest a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// Longest a client may take to send a request's headers (HTTP/1.1),
    /// and to start its first request on a new connection (both versions).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Most HTTP/2 streams a client may have open at once.
    pub max_concurrent_streams: u32,
    /// Largest request header block (HTTP/2 header list; HTTP/1.1 read
    /// buffer is four times this).
    pub max_header_bytes: u32,
    /// HTTP/2 keep-alive ping period; a peer that does not answer within
    /// 20 s is dropped.
    pub keepalive_interval: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 100,
            max_header_bytes: 16 << 10,
            keepalive_interval: Duration::from_secs(60),
        }
    }
}

/// Accepts and serves connections until `stop` turns true, then drains.
pub async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    tls: Option<Arc<Tls>>,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let builder = Arc::new(http_builder(&limits));
    let (alive, mut all_done) = mpsc::channel::<()>(1);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) if transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
            _ = stopped(&mut stop) => break,
        };
        // HTTP/2's small frames otherwise wait ~40 ms on delayed ACKs.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let conn = Conn {
            app: app.clone(),
            builder: builder.clone(),
            limits: limits.clone(),
            stop: stop.clone(),
            _alive: alive.clone(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => conn.serve(tcp, None).await,
                Some(tls) => conn.serve_tls(&tls, tcp).await,
            }
            tracing::trace!(%peer, "connection closed");
        });
    }
    drop(alive);
    let _ = all_done.recv().await;
    Ok(())
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is not Send: drop it here.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

fn http_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size((limits.max_header_bytes as usize * 4).max(8192))
        .max_headers(100);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes)
        .max_pending_accept_reset_streams(20)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

struct Conn {
    app: axum::Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

impl Conn {
    async fn serve_tls(self, tls: &Tls, tcp: TcpStream) {
        let handshake = tls.acceptor().accept(tcp);
        let stream = match tokio::time::timeout(self.limits.tls_handshake_timeout, handshake).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return;
            }
        };
        let peer = tls.peer_identity(stream.get_ref().1.peer_certificates());
        self.serve(stream, peer).await
    }

    async fn serve<IO>(self, io: IO, peer: Option<PeerIdentity>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let service = {
            let activity = activity.clone();
            let app = self.app.clone();
            hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                let guard = activity.start();
                if let Some(p) = &peer {
                    req.extensions_mut().insert(p.clone());
                }
                let app = app.clone();
                async move {
                    let resp = app.oneshot(req.map(Body::new)).await?;
                    // The request counts as in flight until its response
                    // body is done with.
                    Ok::<_, std::convert::Infallible>(resp.map(move |b| {
                        Body::new(Tracked {
                            inner: b,
                            _guard: guard,
                        })
                    }))
                }
            })
        };
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut stop = self.stop.clone();
        let mut draining = false;
        // Once closed for idleness, a peer that does not take part in the
        // close (HTTP/2 waits for a ping answer) is dropped after this.
        let mut give_up: Option<Instant> = None;
        loop {
            let deadline = give_up.unwrap_or_else(|| activity.deadline(&self.limits));
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                _ = stopped(&mut stop), if !draining => {
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
                _ = tokio::time::sleep_until(deadline), if give_up.is_some() || !draining => {
                    if give_up.is_some() {
                        tracing::debug!("closing peer did not finish; dropping it");
                        break;
                    }
                    if activity.deadline(&self.limits) <= Instant::now() {
                        conn.as_mut().graceful_shutdown();
                        draining = true;
                        give_up = Some(Instant::now() + self.limits.header_read_timeout);
                    }
                }
            }
        }
    }
}

/// A response body that keeps its request counted as in flight until
/// it is done with.
struct Tracked {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Requests in flight on one connection and when the last one ended.
struct Activity {
    opened: Instant,
    started: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when a request last ended.
    last_end_ms: AtomicU64,
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_end_ms.store(ms, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    fn start(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection should be closed if nothing happens before:
    /// no first request within the header timeout, or idle too long.
    fn deadline(&self, limits: &ConnectionLimits) -> Instant {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Instant::now() + limits.idle_timeout;
        }
        if self.started.load(Ordering::Relaxed) == 0 {
            return self.opened + limits.header_read_timeout;
        }
        let last = Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed));
        self.opened + last + limits.idle_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Served = tokio::task::JoinHandle<std::io::Result<()>>;

    async fn server(
        limits: ConnectionLimits,
    ) -> (std::net::SocketAddr, watch::Sender<bool>, Served) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, rx) = watch::channel(false);
        let served = tokio::spawn(serve_connections(listener, app, None, limits, rx));
        (addr, stop, served)
    }

    fn short() -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            ..ConnectionLimits::default()
        }
    }

    #[tokio::test]
    async fn an_http2_client_that_never_asks_is_let_go() {
        let (addr, _stop, _) = server(short()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The HTTP/2 preface and an empty SETTINGS frame, then silence.
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let start = std::time::Instant::now();
        let mut buf = [0u8; 1024];
        let closed = async { while s.read(&mut buf).await.unwrap_or(0) > 0 {} };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("closed");
        assert!(start.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn an_idle_http2_connection_is_closed_and_a_stop_drains() {
        let (addr, stop, served) = server(short()).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::get(format!("http://{addr}/"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        assert_eq!(send.send_request(req).await.unwrap().status(), 200);
        let start = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the server closed the idle connection")
            .unwrap()
            .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(500));
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("serving ends once asked to stop")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn http2_settings_carry_the_stream_and_header_limits() {
        let limits = ConnectionLimits {
            max_concurrent_streams: 7,
            max_header_bytes: 12345,
            ..ConnectionLimits::default()
        };
        let (addr, _stop, _) = server(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(head[3], 0x4, "the server's first frame is SETTINGS");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        let settings: std::collections::HashMap<u16, u32> = payload
            .chunks(6)
            .map(|c| {
                let id = u16::from_be_bytes([c[0], c[1]]);
                (id, u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
            })
            .collect();
        assert_eq!(settings.get(&0x3), Some(&7), "MAX_CONCURRENT_STREAMS");
        assert_eq!(settings.get(&0x6), Some(&12345), "MAX_HEADER_LIST_SIZE");
    }

    #[tokio::test]
    async fn oversized_http1_headers_are_refused() {
        let (addr, _stop, _) = server(ConnectionLimits::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let big = "a".repeat(100 << 10);
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
        // metald may stop reading (and close) before all of it is written.
        let _ = s.write_all(req.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }
}
