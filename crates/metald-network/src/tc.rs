//! Rate limits through the `tc` binary (netlink-packet-route has no TBF).
//! Run from a thread inside the namespace: the child inherits it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

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

/// Runs `cmd` with `input` on its stdin; stdout is discarded, stderr kept.
pub(crate) fn run_fed(mut cmd: Command, input: &str) -> std::io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    child.wait_with_output()
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
    cmd.args(["-batch", "-"]);
    let out = run_fed(cmd, lines).map_err(|e| format!("running tc: {e}"))?;
    if out.status.success() || force {
        Ok(())
    } else {
        Err(format!("{}; input:\n{lines}", failure("tc", &out)))
    }
}

/// What a failed run of `program` said.
pub(crate) fn failure(program: &str, out: &Output) -> String {
    format!(
        "{program} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )
}
