//! End-to-end tests of the real `metald` binary: real SQLite, real QEMU
//! guests under TCG, real clients over Connect JSON, gRPC and gRPC-Web.
//! Guest assets come from `scripts/guest-assets.sh` (the README's test
//! command prepares them).

mod billing;
mod blocking;
mod bounds;
mod chaos;
mod front_door;
mod harness;
mod host_safety;
mod lifecycle;
mod listing;
mod network;
mod prometheus;
mod quotas;
mod readme;
mod restart;
mod supervision;
mod tenancy;
mod validation;
