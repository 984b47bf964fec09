//! The results: an aligned table on stdout and the same numbers as JSON
//! (`--json FILE`, and `report.json` under `--report DIR`).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::stats::{self, Snapshot, rpcs};

/// The outcome of a run besides the latencies.
pub struct Outcome {
    pub settings: Value,
    pub targets: Vec<u32>,
    pub created: u64,
    pub deleted: u64,
    pub left: Vec<String>,
    pub interrupted: bool,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn fmt_ms(us: u64) -> String {
    let v = ms(us);
    if v < 10.0 {
        format!("{v:.2}ms")
    } else if v < 1000.0 {
        format!("{v:.1}ms")
    } else {
        format!("{:.2}s", v / 1000.0)
    }
}

/// RPCs with at least one call, in table order.
fn called(snap: &Snapshot) -> Vec<(&'static str, &Histogram<u64>)> {
    rpcs()
        .filter_map(|r| snap.latency.get(r).map(|h| (r, h)))
        .collect()
}

fn errors_of(snap: &Snapshot, rpc: &str) -> u64 {
    snap.errors
        .iter()
        .filter(|((r, _), _)| *r == rpc)
        .map(|(_, e)| e.count)
        .sum()
}

/// The final table: per-RPC percentiles, errors by code, VMs made and left.
pub fn table(snap: &Snapshot, out: &Outcome) -> String {
    let mut s = String::new();
    let head = ["calls", "errors", "p50", "p90", "p99", "max"];
    let _ = writeln!(
        s,
        "{:<12}{:>8}{:>8}{:>11}{:>11}{:>11}{:>11}",
        "RPC", head[0], head[1], head[2], head[3], head[4], head[5]
    );
    for (rpc, h) in called(snap) {
        let _ = writeln!(
            s,
            "{:<12}{:>8}{:>8}{:>11}{:>11}{:>11}{:>11}",
            rpc,
            h.len(),
            errors_of(snap, rpc),
            fmt_ms(h.value_at_quantile(0.50)),
            fmt_ms(h.value_at_quantile(0.90)),
            fmt_ms(h.value_at_quantile(0.99)),
            fmt_ms(h.max()),
        );
    }
    if snap.errors.is_empty() {
        let _ = writeln!(s, "errors by code: none");
    } else {
        let _ = writeln!(s, "errors by code:");
        for ((rpc, code), e) in &snap.errors {
            let kind = if stats::is_expected(code) {
                "expected"
            } else {
                "UNEXPECTED"
            };
            let _ = writeln!(
                s,
                "  {code:<20}{rpc:<12}{:>6}  {kind:<10}  {}",
                e.count, e.first_message
            );
        }
    }
    let _ = writeln!(
        s,
        "unexpected errors: {}",
        stats::count_unexpected(&snap.errors)
    );
    let _ = writeln!(
        s,
        "VMs: {} created, {} deleted, {} left{}",
        out.created,
        out.deleted,
        out.left.len(),
        if out.left.is_empty() {
            String::new()
        } else {
            format!(" ({})", out.left.join(", "))
        }
    );
    let _ = writeln!(
        s,
        "elapsed: {:.1}s{}",
        snap.elapsed.as_secs_f64(),
        if out.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );
    s
}

/// The results as JSON.
pub fn json(snap: &Snapshot, out: &Outcome) -> Value {
    let rpcs: serde_json::Map<String, Value> = called(snap)
        .into_iter()
        .map(|(rpc, h)| {
            let v = json!({
                "calls": h.len(),
                "errors": errors_of(snap, rpc),
                "mean_ms": h.mean() / 1000.0,
                "p50_ms": ms(h.value_at_quantile(0.50)),
                "p90_ms": ms(h.value_at_quantile(0.90)),
                "p99_ms": ms(h.value_at_quantile(0.99)),
                "max_ms": ms(h.max()),
            });
            (rpc.to_owned(), v)
        })
        .collect();
    let errors: Vec<Value> = snap
        .errors
        .iter()
        .map(|((rpc, code), e)| {
            json!({
                "rpc": rpc,
                "code": code,
                "count": e.count,
                "expected": stats::is_expected(code),
                "message": e.first_message,
            })
        })
        .collect();
    let timeline: Vec<Value> = snap
        .timeline
        .iter()
        .map(|((rpc, second), t)| {
            json!({
                "rpc": rpc,
                "second": second,
                "calls": t.calls,
                "mean_ms": ms(t.total_us) / t.calls.max(1) as f64,
                "max_ms": ms(t.max_us),
            })
        })
        .collect();
    json!({
        "settings": out.settings,
        "elapsed_seconds": snap.elapsed.as_secs_f64(),
        "interrupted": out.interrupted,
        "interval_targets": out.targets,
        "rpcs": rpcs,
        "errors": errors,
        "unexpected_errors": stats::count_unexpected(&snap.errors),
        "vms": {"created": out.created, "deleted": out.deleted, "left": out.left},
        "timeline": timeline,
    })
}
