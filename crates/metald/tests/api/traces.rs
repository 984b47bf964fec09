//! Traces as an OpenTelemetry collector receives them: a real OTLP/HTTP
//! receiver on loopback (protobuf, as the exporter sends by default) gets
//! the spans of CreateVm and BootVm with their step children, in the
//! caller's trace, with the customer on each span; sampling at 0 exports
//! nothing a caller did not sample; and JSON log lines inside a request
//! carry its trace id.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use serde_json::{Value, json};

use crate::harness::{Assets, Daemon};

const T: &str = "dev_customer_tracing";

/// One span as received.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    trace: String,
    id: String,
    parent: String,
    attrs: Vec<(String, String)>,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Got>>>);

impl Collector {
    fn spans(&self) -> Vec<Got> {
        self.0.lock().unwrap().clone()
    }

    fn take(&self, body: &[u8]) {
        let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
        let mut all = self.0.lock().unwrap();
        for s in req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            let attrs = s
                .attributes
                .iter()
                .map(|kv| {
                    let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Any::StringValue(s)) => s.clone(),
                        Some(other) => format!("{other:?}"),
                        None => String::new(),
                    };
                    (kv.key.clone(), v)
                })
                .collect();
            all.push(Got {
                name: s.name.clone(),
                trace: hex(&s.trace_id),
                id: hex(&s.span_id),
                parent: hex(&s.parent_span_id),
                attrs,
            });
        }
    }

    /// An OTLP/HTTP receiver on a free loopback port; its base URL.
    async fn serve(&self) -> String {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let me = me.clone();
                async move {
                    me.take(&body);
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// Waits (bounded: the exporter sends in batches) until `want` holds.
    async fn until(&self, what: &str, want: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let spans = self.spans();
            if want(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "{what}: got {spans:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// A Connect JSON call carrying a W3C `traceparent`.
async fn call_traced(d: &Daemon, method: &str, body: Value, traceparent: &str) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{}/vmprovisioner.v1.VmService/{method}", d.url))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {T}"))
        .header("traceparent", traceparent)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{method}: {}", resp.status());
    resp.json().await.unwrap()
}

fn metald_tracing_to(endpoint: &str, rate: &str) -> Daemon {
    Daemon::start_with(&[
        "--auth-mode",
        "dev",
        "--otel-enabled",
        "true",
        "--otel-endpoint",
        endpoint,
        "--otel-sampling-rate",
        rate,
        "--log-format",
        "json",
    ])
}

/// Whether `span` descends from the span with id `ancestor`.
fn descends(spans: &[Got], span: &Got, ancestor: &str) -> bool {
    let mut at = span.parent.clone();
    for _ in 0..32 {
        if at == ancestor {
            return true;
        }
        match spans.iter().find(|s| s.id == at) {
            Some(p) => at = p.parent.clone(),
            None => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn create_and_boot_spans_continue_the_callers_trace_with_their_steps() {
    let assets = Assets::load();
    let collector = Collector::default();
    let endpoint = collector.serve().await;
    let d = metald_tracing_to(&endpoint, "1");
    let (trace, caller_span) = (random_hex(16), random_hex(8));
    let parent = format!("00-{trace}-{caller_span}-01");
    call_traced(
        &d,
        "CreateVm",
        json!({"vm_id": "traced", "config": assets.config()}),
        &parent,
    )
    .await;
    call_traced(&d, "BootVm", json!({"vm_id": "traced"}), &parent).await;

    let spans = collector
        .until("BootVm's spawn step", |s| {
            s.iter().any(|g| g.trace == trace && g.name == "boot.spawn")
        })
        .await;
    let ours: Vec<&Got> = spans.iter().filter(|s| s.trace == trace).collect();
    for rpc in ["CreateVm", "BootVm"] {
        let name = format!("vmprovisioner.v1.VmService/{rpc}");
        let span = ours
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {ours:#?}"));
        assert_eq!(
            span.parent, caller_span,
            "{rpc} continues the caller's span"
        );
        assert_eq!(span.attr("metald.customer_id"), Some("tracing"), "{span:?}");
    }
    let boot = ours
        .iter()
        .find(|s| s.name == "vmprovisioner.v1.VmService/BootVm")
        .unwrap();
    for step in ["boot.spawn", "store.write.running"] {
        let child = ours
            .iter()
            .find(|s| s.name == step)
            .unwrap_or_else(|| panic!("no {step} span in {ours:#?}"));
        assert!(descends(&spans, child, &boot.id), "{step} under BootVm");
        assert_eq!(
            child.attr("metald.customer_id"),
            Some("tracing"),
            "{child:?}"
        );
    }
    let create = ours
        .iter()
        .find(|s| s.name == "vmprovisioner.v1.VmService/CreateVm")
        .unwrap();
    let insert = ours
        .iter()
        .find(|s| s.name == "store.insert")
        .unwrap_or_else(|| panic!("no store.insert span in {ours:#?}"));
    assert!(
        descends(&spans, insert, &create.id),
        "the insert under CreateVm"
    );

    // Every JSON log line written inside the traced BootVm carries its id.
    let log = d.log();
    let audit = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["target"] == "metald::audit" && v["fields"]["rpc"] == "BootVm")
        .unwrap_or_else(|| panic!("no JSON audit line for BootVm in:\n{log}"));
    assert_eq!(audit["span"]["trace_id"], trace.as_str(), "{audit}");
    let exported = ours
        .iter()
        .find(|s| s.name == "vmprovisioner.v1.VmService/BootVm")
        .unwrap();
    assert_eq!(audit["span"]["span_id"], exported.id.as_str(), "{audit}");
    d.ok(T, "DeleteVm", json!({"vm_id": "traced", "force": true}))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn at_sampling_rate_zero_only_traces_the_caller_sampled_are_exported() {
    let collector = Collector::default();
    let endpoint = collector.serve().await;
    let d = metald_tracing_to(&endpoint, "0");
    // Unsampled: no traceparent, and one with the sampled flag off.
    d.ok(T, "ListVms", json!({})).await;
    let unsampled = random_hex(16);
    call_traced(
        &d,
        "ListVms",
        json!({}),
        &format!("00-{unsampled}-{}-00", random_hex(8)),
    )
    .await;
    // Then one the caller sampled: it is exported, and once it arrives
    // anything exported before it would have too (one exporter, in order).
    let sampled = random_hex(16);
    call_traced(
        &d,
        "ListVms",
        json!({}),
        &format!("00-{sampled}-{}-01", random_hex(8)),
    )
    .await;
    let spans = collector
        .until("the sampled ListVms", |s| {
            s.iter().any(|g| g.trace == sampled)
        })
        .await;
    let others: Vec<&Got> = spans.iter().filter(|s| s.trace != sampled).collect();
    assert!(others.is_empty(), "unsampled spans exported: {others:#?}");
}
