//! A minimal QMP client: connect, negotiate capabilities, run one command.
//! QEMU serves one QMP client at a time, so metald connects per operation
//! (operations on one VM are already serialised by the service). Each
//! message is read with a limit ([`MAX_MESSAGE`]).
//!
//! Failures are classified here ([`VmmError`]): an error reply is QEMU
//! refusing the command; no socket, or nothing listening on it, is a QEMU
//! that is gone; silence past [`COMMAND_TIMEOUT`] is a timeout; a broken
//! or unreadable exchange is I/O.

use std::path::Path;
use std::time::Duration;

use metald_core::ports::VmmError;
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tracing::debug;

use crate::bounded::{self, Line};

/// How long one QMP exchange may take before the VMM counts as hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest QMP message (one line) metald reads: 1 MiB. The answers and
/// events it uses are far shorter; a longer one is an error.
pub const MAX_MESSAGE: usize = 1 << 20;

/// An open, negotiated QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> std::io::Result<Qmp> {
        let (r, w) = UnixStream::connect(path).await?.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a QMP greeting: {greeting}"),
            ));
        }
        qmp.execute("qmp_capabilities", None)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> std::io::Result<Value> {
        let mut line = Vec::new();
        match bounded::read_line(&mut self.reader, &mut line, MAX_MESSAGE).await? {
            Line::Complete => {}
            Line::Eof => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QMP connection closed",
                ));
            }
            Line::TooLong => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("QMP message longer than {MAX_MESSAGE} bytes"),
                ));
            }
        }
        parse_message(&line)
    }

    /// Runs a command; returns its `return` value, or QEMU's error text as
    /// [`VmmError::Refused`]. Asynchronous events arriving in between are
    /// skipped.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .await
            .map_err(|e| VmmError::Io(format!("QMP {command}: {e}")))?;
        loop {
            let reply = self
                .read_message()
                .await
                .map_err(|e| VmmError::Io(format!("QMP {command}: {e}")))?;
            if let Some(outcome) = outcome(command, &reply) {
                return outcome;
            }
        }
    }
}

/// One line QEMU sent, as JSON.
pub fn parse_message(line: &[u8]) -> std::io::Result<Value> {
    serde_json::from_slice(line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// What a message means for the command waiting on it: its `return` value,
/// QEMU's error text, or `None` for anything else (an event) to skip.
pub fn outcome(command: &str, reply: &Value) -> Option<Result<Value, VmmError>> {
    if let Some(ret) = reply.get("return") {
        return Some(Ok(ret.clone()));
    }
    let err = reply.get("error")?;
    let desc = err
        .get("desc")
        .and_then(Value::as_str)
        .unwrap_or("unknown error");
    Some(Err(VmmError::Refused(format!(
        "QMP {command}: {}",
        crate::launch::redact(desc)
    ))))
}

/// Connects, runs one command and disconnects, all within
/// [`COMMAND_TIMEOUT`].
pub async fn run(
    socket: &Path,
    command: &str,
    arguments: Option<Value>,
) -> Result<Value, VmmError> {
    let exchange = async {
        let mut qmp = Qmp::connect(socket).await.map_err(|e| {
            debug!(socket = %socket.display(), error = %e, "cannot connect to QMP");
            connect_failed(command, &e)
        })?;
        qmp.execute(command, arguments).await
    };
    tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(VmmError::Timeout(format!(
                "QMP {command}: no answer within {COMMAND_TIMEOUT:?}"
            )))
        })
}

/// A failed connection as the caller reads it (never the socket's path):
/// no socket, or nothing listening on it, is a QEMU that is gone.
fn connect_failed(command: &str, e: &std::io::Error) -> VmmError {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    let msg = format!("QMP {command}: cannot connect to the VMM's QMP socket");
    match e.kind() {
        NotFound | ConnectionRefused => VmmError::Gone(msg),
        _ => VmmError::Io(msg),
    }
}

/// The guest's run state (`running`, `paused`, `shutdown`, ...).
pub async fn status(socket: &Path) -> Result<String, VmmError> {
    let ret = run(socket, "query-status", None).await?;
    run_state(&ret)
}

/// The run state in a `query-status` answer.
pub fn run_state(ret: &Value) -> Result<String, VmmError> {
    ret.get("status")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| VmmError::Io(format!("QMP query-status: unexpected answer {ret}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A scripted QMP peer: greets, then answers each command line with the
    /// next canned reply (events first where given).
    async fn serve(listener: UnixListener, replies: Vec<&'static str>) {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        for reply in replies {
            lines.next_line().await.unwrap().unwrap();
            w.write_all(reply.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn negotiates_skips_events_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve(
            listener,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\", \"running\": false}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
            ],
        ));
        let mut qmp = Qmp::connect(&sock).await.unwrap();
        let ret = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(ret["status"], "paused");
        let err = qmp.execute("cont", None).await.unwrap_err();
        assert_eq!(err, VmmError::Refused("QMP cont: nope".into()));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_socket_is_an_error_without_its_path() {
        let err = run(Path::new("/nonexistent/qmp.sock"), "query-status", None)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            VmmError::Gone("QMP query-status: cannot connect to the VMM's QMP socket".into())
        );
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_a_gone_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        // The socket file stays behind its closed listener: ECONNREFUSED.
        drop(UnixListener::bind(&sock).unwrap());
        let err = run(&sock, "stop", None).await.unwrap_err();
        assert_eq!(
            err,
            VmmError::Gone("QMP stop: cannot connect to the VMM's QMP socket".into())
        );
        // A path that cannot lead to a socket (ENOTDIR): metald's own
        // trouble, not a gone VMM.
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = run(&file.join("qmp.sock"), "stop", None).await.unwrap_err();
        assert!(matches!(err, VmmError::Io(_)), "{err:?}");
    }

    #[tokio::test]
    async fn an_oversize_message_is_an_error_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        // A greeting that never ends: 4 × the limit, no newline, and the
        // peer keeps the connection open.
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let piece = vec![b' '; 64 << 10];
            let _ = stream.write_all(b"{\"QMP\": ").await;
            for _ in 0..(4 * MAX_MESSAGE / piece.len()) {
                if stream.write_all(&piece).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await;
        });
        let err = match Qmp::connect(&sock).await {
            Err(e) => e,
            Ok(_) => panic!("an endless greeting was accepted"),
        };
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("longer than"), "{err}");
        server.abort();
    }
}
