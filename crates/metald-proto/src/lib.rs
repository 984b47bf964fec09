//! metald's wire contract: generated messages, service traits and clients for
//! `vmprovisioner.v1` (the API metald serves) and `billing.v1` (the API
//! metald calls). Nothing but generated code lives here.

#![allow(clippy::all, missing_docs)]

connectrpc::include_generated!();

/// The full `FileDescriptorSet` of metald's protos, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/metald_descriptor.bin"));

/// The schema of `grpc.health.v1`, for gRPC reflection only.
pub const HEALTH_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/health_descriptor.bin"));
