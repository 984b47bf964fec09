//! Rate limits through the `tc` binary (netlink-packet-route has no TBF).
//! Run from a thread inside the namespace: the child inherits it.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::names::IFB;

/// `tbf` parameters for a cap of `bytes_per_sec`.
fn tbf(bytes_per_sec: u64) -> String {
    let bits = bytes_per_sec.saturating_mul(8);
    let burst = (bytes_per_sec / 10).max(16 * 1024);
    format!("tbf rate {bits}bit burst {burst} latency 50ms")
}

/// The `tc -batch` lines that remove what [`apply_lines`] may have added.
pub(crate) fn clear_lines(tap: &str) -> String {
    format!("qdisc del dev {tap} root\nqdisc del dev {tap} ingress\n")
}

/// The `tc -batch` lines for the caps. rx (towards the guest) is `tap`'s
/// egress; tx (from the guest) is `tap`'s ingress, redirected to `ifb0` and
/// shaped there.
pub(crate) fn apply_lines(tap: &str, rx: u64, tx: u64) -> String {
    let mut lines = String::new();
    if rx > 0 {
        lines.push_str(&format!("qdisc replace dev {tap} root {}\n", tbf(rx)));
    }
    if tx > 0 {
        lines.push_str(&format!("qdisc add dev {tap} handle ffff: ingress\n"));
        lines.push_str(&format!(
            "filter add dev {tap} parent ffff: protocol all prio 1 u32 match u32 0 0 \
             action mirred egress redirect dev {IFB}\n"
        ));
        lines.push_str(&format!("qdisc replace dev {IFB} root {}\n", tbf(tx)));
    }
    lines
}

/// Runs `tc [-force] -batch -` with `lines` on stdin.
pub(crate) fn batch(lines: &str, force: bool) -> Result<(), String> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("tc");
    if force {
        cmd.arg("-force");
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running tc: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(lines.as_bytes())
            .map_err(|e| format!("writing to tc: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for tc: {e}"))?;
    if out.status.success() || force {
        Ok(())
    } else {
        Err(format!(
            "tc failed ({}): {}; input:\n{lines}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
