//! Telemetry settings: the Prometheus listener (`UNKEY_METALD_OTEL_PROMETHEUS_*`)
//! and whether metrics carry the customer (`UNKEY_METALD_OTEL_HIGH_CARDINALITY`).

use std::net::IpAddr;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics (OpenMetrics text at `/metrics`) on their
    /// own listener; independent of UNKEY_METALD_OTEL_ENABLED.
    #[arg(
        long,
        env = "UNKEY_METALD_OTEL_PROMETHEUS_ENABLED",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub prometheus_enabled: bool,

    /// Port of the metrics listener (0 picks a free port; metald logs
    /// `metrics serving addr=...`).
    #[arg(
        long,
        env = "UNKEY_METALD_OTEL_PROMETHEUS_PORT",
        default_value_t = 9464
    )]
    pub prometheus_port: u16,

    /// Address of the metrics listener.
    #[arg(
        long,
        env = "UNKEY_METALD_OTEL_PROMETHEUS_ADDRESS",
        default_value = "127.0.0.1"
    )]
    pub prometheus_address: IpAddr,

    /// Add a `customer_id` label to the RPC and lifecycle metrics (one
    /// series per customer: only for hosts with few customers).
    #[arg(
        long,
        env = "UNKEY_METALD_OTEL_HIGH_CARDINALITY",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub high_cardinality: bool,
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn metrics_default_to_loopback_9464_without_customers() {
        let c = Config::try_parse_from(["metald"]).unwrap().telemetry;
        assert!(c.prometheus_enabled);
        assert_eq!(c.prometheus_port, 9464);
        assert_eq!(c.prometheus_address.to_string(), "127.0.0.1");
        assert!(!c.high_cardinality);
        let c = Config::try_parse_from([
            "metald",
            "--prometheus-enabled",
            "false",
            "--prometheus-port",
            "0",
            "--high-cardinality",
            "true",
        ])
        .unwrap()
        .telemetry;
        assert!(!c.prometheus_enabled && c.high_cardinality);
        assert_eq!(c.prometheus_port, 0);
    }

    #[test]
    fn a_bad_value_names_the_variable() {
        let e = Config::try_parse_from(["metald", "--prometheus-port", "99999"]).unwrap_err();
        assert!(
            e.to_string().contains("UNKEY_METALD_OTEL_PROMETHEUS_PORT"),
            "{e}"
        );
    }
}
