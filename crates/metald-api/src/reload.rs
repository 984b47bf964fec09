//! Files metald re-reads when they change (TLS certificate and key, client
//! CA, JWKS), so secrets rotate without a restart or a dropped connection.
//!
//! Change is noticed by polling each file's metadata (modification time,
//! size, inode) through any symlink, once a second: this sees in-place
//! writes, renames over the file and symlink swaps (as Kubernetes does for
//! mounted secrets) alike, and needs no inotify watch that a rename would
//! orphan. A reload that fails (a half-written pair, a bad PEM) keeps what
//! is in use, is logged once, and is retried on the next change.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

/// How often watched files are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
    dev: u64,
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<Stamp>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| Stamp {
                modified: m.modified().ok(),
                len: m.len(),
                ino: m.ino(),
                dev: m.dev(),
            })
        })
        .collect()
}

/// Calls `reload` whenever one of `paths` changes, until the task is
/// aborted. `what` names the files in the log.
pub fn watch<F>(what: &'static str, paths: Vec<PathBuf>, reload: F) -> JoinHandle<()>
where
    F: Fn() -> Result<String, String> + Send + 'static,
{
    tokio::spawn(async move {
        let mut seen = stamps(&paths);
        let mut last_error: Option<String> = None;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = stamps(&paths);
            if now == seen {
                continue;
            }
            match reload() {
                Ok(summary) => {
                    tracing::info!(files = what, %summary, "reloaded");
                    seen = now;
                    last_error = None;
                }
                Err(e) => {
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!(files = what, error = %e, "reload failed; keeping what is in use");
                    }
                    last_error = Some(e);
                    // Not marked seen: tried again every poll until a
                    // reload succeeds (a pair written in two steps).
                }
            }
        }
    })
}
