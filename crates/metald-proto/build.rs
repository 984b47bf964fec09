//! Compiles metald's `.proto` files without `protoc`: protox parses them in
//! pure Rust, and connectrpc-build generates buffa messages, service traits
//! and clients from the resulting descriptor set.

use std::path::PathBuf;

const FILES: &[&str] = &["vmprovisioner/v1/vm.proto", "billing/v1/billing.proto"];
const HEALTH: &str = "grpc/health/v1/health.proto";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let proto_root = manifest.join("../../proto");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));

    for file in FILES {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }
    // Read by connectrpc-build's code generator.
    println!("cargo:rerun-if-env-changed=BUFFA_ELEMENT_MEMORY_LIMIT");

    let descriptor = protox::Compiler::new([&proto_root])
        .expect("proto include path")
        .include_imports(true)
        .include_source_info(true)
        .open_files(FILES)
        .unwrap_or_else(|e| panic!("compiling protos: {e}"))
        .encode_file_descriptor_set();
    // grpc.health.v1 is served by connectrpc-health; its schema is compiled
    // here only for reflection (no code is generated from it).
    println!(
        "cargo:rerun-if-changed={}",
        proto_root.join(HEALTH).display()
    );
    let health = protox::Compiler::new([&proto_root])
        .expect("proto include path")
        .include_imports(true)
        .open_files([HEALTH])
        .unwrap_or_else(|e| panic!("compiling {HEALTH}: {e}"))
        .encode_file_descriptor_set();
    std::fs::write(out_dir.join("health_descriptor.bin"), health).expect("write descriptor set");

    let fds_path = out_dir.join("metald.fds.bin");
    std::fs::write(&fds_path, descriptor).expect("write descriptor set");

    connectrpc_build::Config::new()
        .descriptor_set(&fds_path)
        .files(FILES)
        .emit_descriptor_set("metald_descriptor.bin")
        .include_file("_connectrpc.rs")
        // The descriptor set is written above, by this script: named as an
        // input it is always newer than the last run, so cargo would rerun
        // the script and rebuild every crate above this one on every build.
        // The .proto files printed above are the real inputs.
        .emit_rerun_directives(false)
        .compile()
        .unwrap_or_else(|e| panic!("generating code: {e:#}"));
}
