//! Prometheus metrics: the registry ([`registry`]), the service's telemetry
//! port and the API's RPC observer over it ([`service`]), billing's
//! counters read at scrape time ([`billing`]) and the `/metrics` listener
//! ([`server`]). Documented in docs/metrics.md.

mod billing;
mod registry;
mod server;
mod service;

pub use billing::BillingCollector;
pub use registry::Metrics;
pub use server::{Scrape, serve};
