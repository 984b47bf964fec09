//! metald's metrics as an operator sees them: a real Prometheus (the
//! Debian package) scrapes a real metald through a lifecycle of a real QEMU
//! guest, the counts come back through Prometheus's HTTP API, and every
//! expression of the Grafana dashboard (deploy/grafana/metald.json) and the
//! alert rules (deploy/prometheus/alerts.yml) evaluates there. Also a
//! direct scrape: OpenMetrics text, never a VM id, the customer only when
//! asked for.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use connectrpc::Protocol;
use connectrpc::client::{ClientConfig, Http2Connection, HttpClient};
use metald_proto::vmprovisioner::v1 as pb;
use serde_json::{Value, json};

use crate::harness::{Assets, Daemon};

/// How long Prometheus gets to see what a test waits for.
const WAIT: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// `name` on PATH, or a failure saying how to install it.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: run scripts/setup.sh (it installs the Debian package \
                 prometheus; the README's test command runs it)"
            )
        })
}

/// A Prometheus process of the test's own, scraping one metald every
/// second with metald's alert rules loaded.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let bin = tool("prometheus");
        let dir = tempfile::Builder::new()
            .prefix("metald-prometheus-")
            .tempdir()
            .unwrap();
        let rules = repo().join("deploy/prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: metald\n    static_configs:\n      - targets: [{target:?}]\n",
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        // A free port: bound, read and released (Prometheus binds it next).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            url: format!("http://{listen}"),
            _dir: dir,
        }
    }

    /// Waits (bounded) until Prometheus answers `/-/ready` (it refuses
    /// queries while its storage starts).
    async fn ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = reqwest::get(format!("{}/-/ready", self.url)).await;
            if r.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let resp = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .query(query)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        match v["status"].as_str() {
            Some("success") => Ok(v["data"].clone()),
            _ => Err(format!("{path} {query:?}: {v}")),
        }
    }

    /// An instant query's result vector; an error names the expression.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.get("/api/v1/query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Polls `expr` until its result passes `ok` (bounded by [`WAIT`]);
    /// an evaluation error fails at once.
    async fn until(&self, expr: &str, ok: impl Fn(&[f64]) -> bool) -> Vec<f64> {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = match self.query(expr).await {
                Ok(r) => {
                    let vals = values(&r);
                    if ok(&vals) {
                        return vals;
                    }
                    format!("{vals:?}")
                }
                Err(e) => panic!("{expr} does not evaluate: {e}"),
            };
            assert!(
                Instant::now() < deadline,
                "{expr}: after {WAIT:?} still {last}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The value of `expr` (a single-series query) once it equals `want`.
    async fn until_eq(&self, expr: &str, want: f64) {
        self.until(expr, |v| v.len() == 1 && v[0] == want).await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sample values of an instant vector result.
fn values(result: &[Value]) -> Vec<f64> {
    result
        .iter()
        .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
        .collect()
}

/// Every query of the Grafana dashboard, with Grafana's rate interval
/// replaced by a window that holds many 1 s scrapes.
fn dashboard_exprs() -> Vec<String> {
    let path = repo().join("deploy/grafana/metald.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("every target has an expr")
                .replace("$__rate_interval", "1m")
        })
        .collect();
    assert!(exprs.len() >= 10, "the dashboard lost its panels");
    exprs
}

/// `promtool check rules` accepts the alert rules; their count.
fn check_rules() -> usize {
    let rules = repo().join("deploy/prometheus/alerts.yml");
    let out = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "promtool check rules: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = std::fs::read_to_string(&rules)
        .unwrap()
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert!(text.contains(&format!("{n} rules found")), "{text}");
    n
}

/// Create, a quota refusal, two boots and shutdowns, a call for a VM that
/// does not exist, delete; each boot seen by Prometheus before the next,
/// so the rates over the window rise.
async fn lifecycle(d: &Daemon, p: &Prometheus, assets: &Assets) {
    let t = "dev_customer_prom";
    let missing = d.call(t, "BootVm", json!({"vm_id": "missing"})).await;
    assert_eq!(missing.unwrap_err().0, "not_found");
    d.ok(
        t,
        "CreateVm",
        json!({"vm_id": "p1", "config": assets.config()}),
    )
    .await;
    let over = d
        .call(
            t,
            "CreateVm",
            json!({"vm_id": "p2", "config": assets.config()}),
        )
        .await;
    assert_eq!(over.unwrap_err().0, "resource_exhausted");
    let boots = r#"sum(metald_lifecycle_operations_total{operation="boot",outcome="ok"})"#;
    for n in 1..=2 {
        d.ok(t, "BootVm", json!({"vm_id": "p1"})).await;
        p.until_eq(boots, n as f64).await;
        d.ok(t, "ShutdownVm", json!({"vm_id": "p1", "force": true}))
            .await;
    }
    d.ok(t, "DeleteVm", json!({"vm_id": "p1"})).await;
}

/// What the lifecycle leaves counted: each series' sum over its other
/// labels, as Prometheus must return it.
const COUNTS: &str = r#"
    lifecycle_operations_total{operation="create",outcome="ok"} 1
    lifecycle_operations_total{operation="boot",outcome="not_found"} 1
    lifecycle_operations_total{operation="boot",outcome="ok"} 2
    lifecycle_operations_total{operation="shutdown",outcome="ok"} 2
    lifecycle_operations_total{operation="delete",outcome="ok"} 1
    quota_refusals_total{quota="max_vms"} 1
    boot_phase_duration_seconds_count{backend="qemu",phase="spawn"} 2
    boot_phase_duration_seconds_count{backend="qemu",phase="socket_ready"} 2
    boot_phase_duration_seconds_count{backend="qemu",phase="start"} 2
    vmm_exits_total{kind="expected"} 2
    rpc_requests_total{method="CreateVm",protocol="connect",code="ok"} 1
    rpc_requests_total{method="CreateVm",protocol="connect",code="resource_exhausted"} 1
    vms{state="created"} 0
"#;

#[tokio::test]
async fn prometheus_sees_a_lifecycle_and_every_dashboard_and_alert_expression_evaluates() {
    let alerts = check_rules();
    let assets = Assets::load();
    let d = Daemon::start_with(&[
        "--auth-mode",
        "dev",
        "--quota-max-vms",
        "1",
        "--reconcile-interval",
        "1s",
    ]);
    let p = Prometheus::start(&d.metrics_addr());
    p.ready().await;
    p.until_eq(r#"up{job="metald"}"#, 1.0).await;
    lifecycle(&d, &p, &assets).await;

    for line in COUNTS.lines().filter(|l| !l.trim().is_empty()) {
        let (series, want) = line.trim().rsplit_once(' ').unwrap();
        let expr = format!("sum(metald_{series})");
        p.until_eq(&expr, want.parse().unwrap()).await;
    }
    p.until(r#"sum(metald_rpc_requests_total{code="not_found"})"#, |v| {
        v.len() == 1 && v[0] >= 1.0
    })
    .await;
    p.until(r#"sum(metald_reconcile_runs_total{outcome="ok"})"#, |v| {
        v.len() == 1 && v[0] >= 2.0
    })
    .await;

    for expr in dashboard_exprs() {
        p.until(&expr, |v| v.iter().any(|x| x.is_finite())).await;
    }
    check_alert_rules(&p, alerts).await;
}

/// Prometheus loaded every alert rule, evaluates each without error, and
/// each rule's expression also answers an instant query.
async fn check_alert_rules(p: &Prometheus, count: usize) {
    let deadline = Instant::now() + WAIT;
    let rules = loop {
        let data = p.get("/api/v1/rules", &[]).await.expect("rules API");
        let rules: Vec<Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let healthy = rules.iter().all(|r| r["health"] == "ok");
        if rules.len() == count && healthy {
            break rules;
        }
        let bad: Vec<&Value> = rules.iter().filter(|r| r["health"] != "ok").collect();
        assert!(
            Instant::now() < deadline,
            "{} of {count} rules loaded; not healthy: {bad:?}",
            rules.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for r in rules {
        let expr = r["query"].as_str().expect("query");
        if let Err(e) = p.query(expr).await {
            panic!("alert {} does not evaluate: {e}", r["name"]);
        }
    }
}

/// Checks `body` is OpenMetrics text: `# HELP/TYPE/UNIT` lines, samples
/// `name{label="value",...} number` of a declared family, `# EOF` last.
/// Returns the label names seen.
fn check_openmetrics(body: &str) -> Vec<String> {
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no # EOF at the end");
    let mut families: Vec<String> = Vec::new();
    let mut labels = Vec::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(
                ["HELP", "TYPE", "UNIT"].contains(&kind) && !name.is_empty(),
                "bad line {line:?}"
            );
            if kind == "TYPE" {
                families.push(name.to_owned());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "{line:?}: {value:?} is not a number"
        );
        let (name, rest) = series.split_once('{').unwrap_or((series, "}"));
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line:?}: bad metric name"
        );
        assert!(
            families.iter().any(|f| name.starts_with(f.as_str())),
            "{line:?}: sample of an undeclared family"
        );
        let inner = rest.strip_suffix('}').expect("labels end with }");
        for pair in inner.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').expect("label=value");
            assert!(v.starts_with('"'), "{line:?}: unquoted label value");
            labels.push(k.to_owned());
        }
    }
    labels
}

async fn scrape(addr: &str) -> String {
    let resp = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        ct.starts_with("application/openmetrics-text"),
        "content type {ct}"
    );
    resp.text().await.unwrap()
}

#[tokio::test]
async fn metrics_are_openmetrics_without_vm_ids_and_name_the_customer_only_when_asked() {
    let assets = Assets::load();
    for high in ["false", "true"] {
        let d = Daemon::start_with(&["--auth-mode", "dev", "--high-cardinality", high]);
        let t = "dev_customer_scrapes";
        d.ok(
            t,
            "CreateVm",
            json!({"vm_id": "scraped-vm", "config": assets.config()}),
        )
        .await;
        let missing = d.call(t, "GetVmInfo", json!({"vm_id": "no-such-vm"})).await;
        assert_eq!(missing.unwrap_err().0, "not_found");
        let body = scrape(&d.metrics_addr()).await;
        let labels = check_openmetrics(&body);
        assert!(
            !labels.iter().any(|l| l == "vm_id") && !body.contains("scraped-vm"),
            "a VM id in the metrics:\n{body}"
        );
        let create =
            r#"metald_lifecycle_operations_total{operation="create",backend="qemu",outcome="ok""#;
        assert!(body.contains(create), "no create counted:\n{body}");
        let not_found =
            r#"metald_rpc_requests_total{method="GetVmInfo",protocol="connect",code="not_found""#;
        assert!(body.contains(not_found), "no not_found counted:\n{body}");
        if high == "true" {
            assert!(
                body.contains(r#"customer_id="scrapes""#),
                "high cardinality without customer_id:\n{body}"
            );
        } else {
            assert!(
                !labels.iter().any(|l| l == "customer_id"),
                "customer_id without high cardinality:\n{body}"
            );
        }
    }
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let d = Daemon::start_with(&["--auth-mode", "dev", "--prometheus-enabled", "false"]);
    // The log line of the API serving comes after the metrics decision.
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = d.log();
        if log.contains("metald serving") {
            break log;
        }
        assert!(Instant::now() < deadline, "no `metald serving` in {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(log.contains("Prometheus metrics disabled"), "{log}");
    assert!(!log.contains("metrics serving"), "{log}");
}

/// A ListVms that succeeds and a GetVmInfo for a missing VM, with `client`.
async fn ok_and_not_found<T>(client: pb::VmServiceClient<T>)
where
    T: connectrpc::client::ClientTransport,
    <T::ResponseBody as connectrpc::http_body::Body>::Error: std::fmt::Display,
{
    client
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("ListVms");
    let err = client
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "missing".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, connectrpc::ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_protocol_is_counted_with_the_code_its_client_read() {
    let d = Daemon::start();
    let config = |p: Protocol| {
        ClientConfig::new(d.url.parse().unwrap())
            .with_protocol(p)
            .with_default_header("authorization", "Bearer dev_customer_protocols")
    };
    let h2 = Http2Connection::connect_plaintext(d.url.parse().unwrap())
        .await
        .unwrap()
        .shared(4);
    ok_and_not_found(pb::VmServiceClient::new(h2, config(Protocol::Grpc))).await;
    let web = pb::VmServiceClient::new(HttpClient::plaintext(), config(Protocol::GrpcWeb));
    ok_and_not_found(web).await;
    // Refused by the door, before any handler: counted all the same.
    let refused = d.call("", "ListVms", json!({})).await;
    assert_eq!(refused.unwrap_err().0, "unauthenticated");

    let body = scrape(&d.metrics_addr()).await;
    for protocol in ["grpc", "grpc_web"] {
        for (method, code) in [("ListVms", "ok"), ("GetVmInfo", "not_found")] {
            let series = format!(
                "metald_rpc_requests_total{{method=\"{method}\",protocol=\"{protocol}\",code=\"{code}\"}} 1"
            );
            assert!(body.contains(&series), "no {series}:\n{body}");
        }
    }
    let door = r#"metald_rpc_requests_total{method="ListVms",protocol="connect",code="unauthenticated"} 1"#;
    assert!(body.contains(door), "no {door}:\n{body}");
}

/// The value of the unlabelled sample `name` in a scrape.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn billing_counters_are_served_as_billing_counts_them() {
    let assets = Assets::load();
    let recv = crate::billing::Receiver::default();
    let (port, _server) = crate::billing::serve(&recv, 0).await;
    let d = crate::billing::metald_with_billing(port);
    let t = "dev_customer_metered";
    d.ok(
        t,
        "CreateVm",
        json!({"vm_id": "m1", "config": assets.config()}),
    )
    .await;
    d.ok(t, "BootVm", json!({"vm_id": "m1"})).await;
    let addr = d.metrics_addr();
    let deadline = Instant::now() + WAIT;
    loop {
        let body = scrape(&addr).await;
        let taken = sample(&body, "metald_billing_samples_taken_total").unwrap();
        let sent = sample(&body, "metald_billing_batches_sent_total").unwrap();
        let age = sample(&body, "metald_billing_oldest_unacked_sample_age_seconds").unwrap();
        assert!(sample(&body, "metald_billing_spool_samples").is_some());
        let delivered: usize = recv.rec().by_key.values().map(Vec::len).sum();
        if taken >= 10.0 && sent >= 1.0 && delivered > 0 {
            assert!((0.0..30.0).contains(&age), "billing lag {age} s");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "samples taken {taken}, batches sent {sent}, delivered {delivered}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    d.ok(t, "DeleteVm", json!({"vm_id": "m1", "force": true}))
        .await;
}
