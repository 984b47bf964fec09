//! Every VmService request in Connect JSON (`application/json`): decoding,
//! then the handler's validation. The first byte picks the RPC; see
//! `metald_fuzz::rpc`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    metald_fuzz::rpc(data, connectrpc::CodecFormat::Json);
});
