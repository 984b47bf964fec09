//! Firecracker's own log, through a FIFO. Firecracker opens `--log-path`
//! without `O_APPEND`, so a log file it writes could not be shortened
//! under it (it would keep writing at its old offset). It writes to a FIFO
//! instead, which metald drains with a bounded buffer into
//! `firecracker.log` in the VM directory: a file metald opened with
//! `O_APPEND`, kept under the cap like the console ([`crate::logcap`]).
//!
//! Firecracker opens the FIFO read-write and non-blocking, so while no
//! metald reads (a restart) its writes fill the pipe (64 KiB) and then fail
//! and are dropped by Firecracker: the log is never unbounded, and lines
//! written while the pipe was full are lost. The next metald re-opens the
//! FIFO on adoption and reads what the pipe holds.

use std::io::Write;
use std::path::Path;

use tokio::task::JoinHandle;
use tracing::debug;

/// Read buffer, held only while the FIFO has something to copy.
const BUF: usize = 64 << 10;

/// A task copying the FIFO into the log file; stops when dropped.
#[derive(Debug)]
pub struct Copier {
    task: JoinHandle<()>,
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts copying the FIFO `rel` below `dir` (reached without following
/// symlinks: the jailed VMM can write `dir`) to the end of `out`, which
/// is created if missing and never truncated (a restart keeps the log).
pub fn start(dir: &Path, rel: &Path, out: &Path) -> std::io::Result<Copier> {
    let rx = tokio::net::unix::pipe::Receiver::from_file(crate::beneath::fifo_beneath(dir, rel)?)?;
    let mut out = crate::logcap::open_append(out)?;
    let task = tokio::spawn(async move {
        loop {
            if let Err(e) = rx.readable().await {
                debug!(error = %e, "waiting on Firecracker's log FIFO failed");
                return;
            }
            // Only while there is something to copy: an idle VM (most of
            // them, most of the time) holds no buffer.
            let mut buf = vec![0u8; BUF];
            loop {
                match rx.try_read(&mut buf) {
                    // Opened read-write: never end-of-file while metald holds it.
                    Ok(0) => return,
                    // A local append of at most 64 KiB: page cache, no waiting.
                    Ok(n) => {
                        if let Err(e) = out.write_all(&buf[..n]) {
                            debug!(error = %e, "cannot append to firecracker.log");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!(error = %e, "reading Firecracker's log FIFO failed");
                        return;
                    }
                }
            }
        }
    });
    Ok(Copier { task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn copies_the_fifo_to_the_end_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("log.fifo");
        super::super::metrics::make_fifo(&fifo, None).unwrap();
        let out = dir.path().join("firecracker.log");
        std::fs::write(&out, b"from before a restart\n").unwrap();
        let copier = start(dir.path(), Path::new("log.fifo"), &out).unwrap();
        let mut w = tokio::net::unix::pipe::OpenOptions::new()
            .open_sender(&fifo)
            .unwrap();
        let big = vec![b'z'; 3 * BUF];
        w.write_all(b"first\n").await.unwrap();
        w.write_all(&big).await.unwrap();
        w.write_all(b"\nlast\n").await.unwrap();
        let want = 22 + 6 + big.len() as u64 + 6;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&out).unwrap().len() < want {
            assert!(std::time::Instant::now() < deadline, "not copied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let text = std::fs::read(&out).unwrap();
        assert!(text.starts_with(b"from before a restart\nfirst\nzzz"));
        assert!(text.ends_with(b"zzz\nlast\n"));
        drop(copier);
    }

    #[test]
    fn a_symlink_in_place_of_the_fifo_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("real.fifo");
        super::super::metrics::make_fifo(&fifo, None).unwrap();
        std::os::unix::fs::symlink(&fifo, dir.path().join("log.fifo")).unwrap();
        let out = dir.path().join("firecracker.log");
        assert!(start(dir.path(), Path::new("log.fifo"), &out).is_err());
    }
}
