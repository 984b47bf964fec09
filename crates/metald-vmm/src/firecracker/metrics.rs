//! Firecracker's metrics FIFO, read continuously. Firecracker writes one
//! JSON object per flush (every 60 s, and on `FlushMetrics`); its counters
//! are deltas since the previous flush, so metald sums them into totals.
//!
//! metald opens the FIFO read-write: a FIFO with no writer would read as
//! end-of-file, and one with no reader would make Firecracker's writes
//! fail. A metald restart re-opens it on adoption; what Firecracker wrote
//! meanwhile waits in the pipe (up to its 64 KiB). Lines are read with a
//! limit ([`MAX_LINE`]); a longer one is skipped, never kept.

use std::path::Path;
use std::sync::{Arc, Mutex};

use metald_core::ports::DeviceCounters;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::bounded::{self, Line};

/// Longest metrics line metald reads: 256 KiB (Firecracker's are a few
/// KiB).
pub const MAX_LINE: usize = 256 << 10;

/// The parts of one metrics line metald uses.
#[derive(Debug, Default, Deserialize)]
struct Metrics {
    #[serde(default)]
    block: Block,
    #[serde(default)]
    net: Net,
}

#[derive(Debug, Default, Deserialize)]
struct Block {
    #[serde(default)]
    read_bytes: u64,
    #[serde(default)]
    write_bytes: u64,
}

#[derive(Debug, Default, Deserialize)]
struct Net {
    #[serde(default)]
    rx_bytes_count: u64,
    #[serde(default)]
    tx_bytes_count: u64,
}

/// Totals of one VM, and a signal for each line read.
#[derive(Debug, Default)]
pub struct Totals {
    counters: Mutex<DeviceCounters>,
    lines: Mutex<u64>,
    changed: Notify,
}

impl Totals {
    /// The sums so far.
    pub fn get(&self) -> DeviceCounters {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many lines were read so far.
    pub fn lines(&self) -> u64 {
        *self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves after the next line is read, counting from this call (not
    /// from the first poll), so a line read in between is not missed.
    pub fn next_line(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Adds one metrics line; unreadable lines are skipped.
    pub fn add(&self, text: &[u8]) {
        let Ok(line) = serde_json::from_slice::<Metrics>(text) else {
            debug!(len = text.len(), "skipping an unreadable metrics line");
            return;
        };
        {
            let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            // Whatever holds the FIFO can write any number: a total stops at
            // u64::MAX rather than wrapping to a small one.
            c.disk_read_bytes = c.disk_read_bytes.saturating_add(line.block.read_bytes);
            c.disk_write_bytes = c.disk_write_bytes.saturating_add(line.block.write_bytes);
            c.net_rx_bytes = c.net_rx_bytes.saturating_add(line.net.rx_bytes_count);
            c.net_tx_bytes = c.net_tx_bytes.saturating_add(line.net.tx_bytes_count);
        }
        *self.lines.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.changed.notify_waiters();
    }
}

/// A reader task and the totals it keeps.
#[derive(Debug)]
pub struct Reader {
    pub totals: Arc<Totals>,
    task: JoinHandle<()>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Creates the FIFO at `path` (mode 0600, owned by `owner` when given).
pub fn make_fifo(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        path,
        rustix::fs::Mode::from_raw_mode(0o600),
    )?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The FIFO reader's buffer.
const READ_BUF: usize = 1024;

/// Starts reading the FIFO `rel` below `dir` (reached without following
/// symlinks: the jailed VMM can write `dir`).
pub fn start(dir: &Path, rel: &Path) -> std::io::Result<Reader> {
    let rx = tokio::net::unix::pipe::Receiver::from_file(crate::beneath::fifo_beneath(dir, rel)?)?;
    let totals = Arc::new(Totals::default());
    let t = totals.clone();
    let task = tokio::spawn(async move {
        // Small: a line comes about once a minute, and every live VM
        // holds this buffer.
        let mut r = tokio::io::BufReader::with_capacity(READ_BUF, rx);
        let mut line = Vec::new();
        loop {
            match bounded::read_line(&mut r, &mut line, MAX_LINE).await {
                Ok(Line::Complete) => {
                    t.add(&line);
                    // Not kept between lines, for the same reason.
                    line = Vec::new();
                }
                Ok(Line::TooLong) => {
                    warn!("skipping a Firecracker metrics line longer than {MAX_LINE} bytes");
                    if bounded::skip_line(&mut r).await.is_err() {
                        return;
                    }
                }
                Ok(Line::Eof) | Err(_) => return,
            }
        }
    });
    Ok(Reader { totals, task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn totals_stop_at_the_maximum_instead_of_wrapping() {
        // Totals wrapped here (and panicked in debug builds); the
        // firecracker_metrics fuzz target checks they never decrease.
        let totals = Totals::default();
        totals.add(br#"{"block":{"read_bytes":18446744073709551615},"net":{"tx_bytes_count":5}}"#);
        totals.add(br#"{"block":{"read_bytes":1},"net":{"tx_bytes_count":18446744073709551615}}"#);
        assert_eq!(totals.lines(), 2);
        assert_eq!(
            totals.get(),
            DeviceCounters {
                disk_read_bytes: u64::MAX,
                disk_write_bytes: 0,
                net_rx_bytes: 0,
                net_tx_bytes: u64::MAX,
            }
        );
    }

    #[tokio::test]
    async fn sums_the_deltas_of_every_line_written_to_the_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.fifo");
        make_fifo(&path, None).unwrap();
        let reader = start(dir.path(), Path::new("metrics.fifo")).unwrap();
        let mut w = tokio::net::unix::pipe::OpenOptions::new()
            .open_sender(&path)
            .unwrap();
        let first = reader.totals.next_line();
        w.write_all(
            b"{\"utc_timestamp_ms\":1,\"block\":{\"read_bytes\":100,\"write_bytes\":7},\"net\":{\"rx_bytes_count\":5,\"tx_bytes_count\":6}}\n",
        )
        .await
        .unwrap();
        first.await;
        let second = reader.totals.next_line();
        w.write_all(b"not json\n{\"block\":{\"read_bytes\":1},\"net\":{\"tx_bytes_count\":4}}\n")
            .await
            .unwrap();
        second.await;
        assert_eq!(reader.totals.lines(), 2, "the unreadable line is skipped");
        // A line over the limit is skipped without being kept, and the
        // next one is read.
        let third = reader.totals.next_line();
        let mut long = vec![b' '; MAX_LINE * 3];
        long.push(b'\n');
        w.write_all(&long).await.unwrap();
        w.write_all(b"{\"block\":{\"write_bytes\":3}}\n")
            .await
            .unwrap();
        third.await;
        assert_eq!(reader.totals.lines(), 3);
        assert_eq!(
            reader.totals.get(),
            DeviceCounters {
                disk_read_bytes: 101,
                disk_write_bytes: 10,
                net_rx_bytes: 5,
                net_tx_bytes: 10,
            }
        );
    }
}
