//! What metald tells about itself as it runs:
//!
//! - logs: one line per event on stderr, as JSON objects (the current
//!   span's fields included, so every line inside a request carries its
//!   `trace_id`) or as text for a terminal;
//! - traces: with `UNKEY_METALD_OTEL_ENABLED`, every span (one per RPC, one
//!   per lifecycle step and store write) goes to an OpenTelemetry
//!   collector over OTLP/HTTP, sampled parent-based at
//!   `UNKEY_METALD_OTEL_SAMPLING_RATE`: a caller's sampled `traceparent` is
//!   always followed, a new trace is sampled at the rate.
//!
//! W3C trace context and baggage are read from every request whether or
//! not spans are exported, so log lines carry the caller's trace id.

use std::io::IsTerminal;

use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, LogFormat};

/// The OpenTelemetry settings.
#[derive(Debug, Clone, clap::Args)]
pub struct OtelArgs {
    /// Export traces over OTLP/HTTP.
    #[arg(long = "otel-enabled", env = "UNKEY_METALD_OTEL_ENABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub enabled: bool,

    /// Share of new traces exported (0 to 1); a caller's sampled trace is
    /// always continued.
    #[arg(long = "otel-sampling-rate", env = "UNKEY_METALD_OTEL_SAMPLING_RATE", default_value_t = 1.0, value_parser = rate)]
    pub sampling_rate: f64,

    /// The collector's OTLP/HTTP base address (`/v1/traces` is added).
    #[arg(
        long = "otel-endpoint",
        env = "UNKEY_METALD_OTEL_ENDPOINT",
        default_value = "http://localhost:4318"
    )]
    pub endpoint: String,
}

fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a number from 0 to 1")),
    }
}

/// The traces URL for a base address given with or without a scheme
/// (`localhost:4318` as the wire contract writes it).
fn traces_url(endpoint: &str) -> String {
    let base = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Flushes exported spans when metald stops.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends what is still buffered (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}

/// Installs the global subscriber and propagators. A setting that does not
/// work stops start-up, naming the variable.
pub fn init(config: &Config) -> Telemetry {
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
        eprintln!("error: invalid value for UNKEY_METALD_LOG (--log): {e}");
        std::process::exit(2);
    });
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    let provider = config.otel.enabled.then(|| {
        provider(&config.otel).unwrap_or_else(|e| {
            eprintln!("error: UNKEY_METALD_OTEL_ENDPOINT: {e}");
            std::process::exit(2);
        })
    });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("metald")));
    let json_lines = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            // Every span the line is in: a line inside a lifecycle step
            // still carries its request's trace id.
            .with_span_list(true)
            .with_writer(std::io::stderr)
    });
    let text_lines = (!json).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(json_lines)
        .with(text_lines)
        .init();
    Telemetry { provider }
}

fn provider(otel: &OtelArgs) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(&otel.endpoint))
        .build()
        .map_err(|e| e.to_string())?;
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(otel.sampling_rate)));
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("metald")
                .build(),
        )
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_with_or_without_scheme_or_path_reach_the_traces_url() {
        assert_eq!(
            traces_url("localhost:4318"),
            "http://localhost:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example:4318/"),
            "https://otel.example:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:9/v1/traces"),
            "http://127.0.0.1:9/v1/traces"
        );
    }

    #[test]
    fn the_sampling_rate_is_a_share() {
        assert_eq!(rate("0"), Ok(0.0));
        assert_eq!(rate("0.25"), Ok(0.25));
        assert!(rate("1.5").is_err() && rate("-1").is_err() && rate("x").is_err());
    }
}
