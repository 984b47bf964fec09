//! The heart of metald: what a VM is ([`vm`]), which lifecycle moves are legal
//! ([`state`]), the use cases that enforce ownership and transitions
//! ([`service`]), and the traits the adapters implement ([`ports`]).
//!
//! This crate imports no adapter and no protobuf type: the API layer converts
//! wire messages into these types, and the binary hands adapters to the
//! service as trait objects.

pub mod assets;
pub mod error;
mod locks;
mod mac;
pub mod net;
pub mod plan;
pub mod ports;
pub mod quota;
pub mod redact;
pub mod service;
pub mod state;
pub mod tally;
pub mod vm;

pub use error::Error;
pub use mac::Mac;
pub use service::VmService;
pub use state::{Op, VmState};
pub use vm::{CustomerId, DiskSpec, VmId, VmSpec};
