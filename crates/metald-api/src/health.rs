//! What metald says about its own health: a set of named checks, each
//! `ok`, `degraded` or `failing`, kept up to date by the binary (which
//! knows the store, the data directory, the backend and billing) and read
//! here by `GET /health` and `grpc.health.v1`.
//!
//! The API port answers without the checks' details: a detail may name
//! host paths or OS errors, which a tenant must never see. The metrics
//! port, bound to loopback by default, answers with them.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::watch;

/// How one check, or metald as a whole, is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    /// Serving, but something needs an operator (billing behind, little
    /// disk left, a reconcile pass late).
    Degraded,
    /// Not able to do its job.
    Failing,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Degraded => "degraded",
            Level::Failing => "failing",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub level: Level,
    /// What was found (may name host paths: shown on the metrics port only).
    pub detail: String,
    /// Whether serving needs this check to pass: a needed check that fails
    /// makes metald `failing` (HTTP 503, gRPC NOT_SERVING); any other only
    /// `degraded`.
    pub needed: bool,
}

impl Check {
    pub fn ok(detail: impl Into<String>) -> Self {
        Check {
            level: Level::Ok,
            detail: detail.into(),
            needed: true,
        }
    }

    pub fn degraded(detail: impl Into<String>) -> Self {
        Check {
            level: Level::Degraded,
            ..Check::ok(detail)
        }
    }

    pub fn failing(detail: impl Into<String>) -> Self {
        Check {
            level: Level::Failing,
            ..Check::ok(detail)
        }
    }

    /// The same result, for a check serving does not depend on.
    pub fn optional(self) -> Self {
        Check {
            needed: false,
            ..self
        }
    }
}

/// The checks by name, and the overall level they add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub checks: BTreeMap<String, Check>,
}

impl Report {
    /// `failing` when a needed check fails, `degraded` when any check is
    /// not ok, else `ok`. Before the first report (no checks yet) metald
    /// is not known to be healthy: `failing`.
    pub fn level(&self) -> Level {
        if self.checks.is_empty() {
            return Level::Failing;
        }
        self.checks
            .values()
            .map(|c| match (c.level, c.needed) {
                (Level::Failing, false) => Level::Degraded,
                (level, _) => level,
            })
            .max()
            .unwrap_or(Level::Ok)
    }
}

/// The current report, shared by its writer (the binary's checker) and the
/// endpoints.
#[derive(Clone)]
pub struct Health {
    report: Arc<RwLock<Report>>,
    changed: watch::Sender<Level>,
    started: Instant,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Health {
            report: Arc::default(),
            changed: watch::channel(Level::Failing).0,
            started: Instant::now(),
        }
    }

    /// Replaces the report; endpoints and watchers see it at once.
    pub fn publish(&self, report: Report) {
        let level = report.level();
        *self.report.write().unwrap_or_else(|p| p.into_inner()) = report;
        self.changed.send_if_modified(|l| {
            let changed = *l != level;
            *l = level;
            changed
        });
    }

    pub fn level(&self) -> Level {
        self.report
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .level()
    }

    /// Follows the overall level (for `grpc.health.v1`).
    pub fn watch(&self) -> watch::Receiver<Level> {
        self.changed.subscribe()
    }

    /// The `/health` document; `detailed` adds each check's detail.
    pub fn document(&self, detailed: bool) -> Value {
        let report = self.report.read().unwrap_or_else(|p| p.into_inner());
        let checks: serde_json::Map<String, Value> = report
            .checks
            .iter()
            .map(|(name, c)| {
                let mut v = json!({ "status": c.level.as_str() });
                if detailed {
                    v["detail"] = Value::String(c.detail.clone());
                }
                (name.clone(), v)
            })
            .collect();
        json!({
            "status": report.level().as_str(),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "checks": checks,
        })
    }

    /// `GET /health`: the document, HTTP 503 while failing.
    pub fn response(&self, detailed: bool) -> axum::response::Response {
        let body = self.document(detailed);
        let status = if self.level() == Level::Failing {
            http::StatusCode::SERVICE_UNAVAILABLE
        } else {
            http::StatusCode::OK
        };
        axum::response::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CACHE_CONTROL, "no-store")
            .body(axum::body::Body::from(body.to_string()))
            .expect("static response")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(checks: &[(&str, Check)]) -> Report {
        Report {
            checks: checks
                .iter()
                .map(|(n, c)| (n.to_string(), c.clone()))
                .collect(),
        }
    }

    #[test]
    fn the_worst_check_decides_and_an_unneeded_failure_only_degrades() {
        assert_eq!(Report::default().level(), Level::Failing);
        let ok = report(&[("store", Check::ok("")), ("kvm", Check::ok(""))]);
        assert_eq!(ok.level(), Level::Ok);
        let lag = report(&[("store", Check::ok("")), ("billing", Check::degraded(""))]);
        assert_eq!(lag.level(), Level::Degraded);
        let billing_down = report(&[
            ("store", Check::ok("")),
            ("billing", Check::failing("").optional()),
        ]);
        assert_eq!(billing_down.level(), Level::Degraded);
        let store_down = report(&[("store", Check::failing("")), ("kvm", Check::ok(""))]);
        assert_eq!(store_down.level(), Level::Failing);
    }

    #[test]
    fn details_appear_only_when_asked_for() {
        let h = Health::new();
        h.publish(report(&[(
            "data_dir",
            Check::failing("/var/lib/metald: read-only file system"),
        )]));
        let plain = h.document(false).to_string();
        assert!(!plain.contains("/var/lib"), "{plain}");
        assert_eq!(h.document(false)["checks"]["data_dir"]["status"], "failing");
        assert_eq!(h.document(false)["status"], "failing");
        let full = h.document(true);
        assert_eq!(
            full["checks"]["data_dir"]["detail"],
            "/var/lib/metald: read-only file system"
        );
    }

    #[test]
    fn watchers_see_the_level_change() {
        let h = Health::new();
        let mut w = h.watch();
        h.publish(report(&[("store", Check::ok(""))]));
        assert!(w.has_changed().unwrap());
        assert_eq!(*w.borrow_and_update(), Level::Ok);
        h.publish(report(&[("store", Check::ok("again"))]));
        assert!(!w.has_changed().unwrap(), "no change, no wake-up");
    }
}
