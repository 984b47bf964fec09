//! End-to-end tests of the real `metald` binary: real SQLite, real QEMU
//! guests under TCG, real clients over Connect JSON, gRPC and gRPC-Web.
//! Guest assets come from `scripts/guest-assets.sh` (the README's test
//! command prepares them).

mod bench;
mod billing;
mod blocking;
mod bounds;
mod buf_curl;
mod chaos;
mod dhcp;
mod front_door;
mod harness;
mod health;
mod host_safety;
mod isolation;
mod lifecycle;
mod listing;
mod metaldctl;
mod network;
mod prometheus;
mod quotas;
mod readme;
mod restart;
mod spoofing;
mod stress;
mod supervision;
mod systemd;
mod tenancy;
mod traces;
mod validation;
