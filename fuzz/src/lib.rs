//! What metald's RPC fuzz targets share: one request body taken the way the
//! API port takes it, from bytes to the validated core values its handler
//! works with, and the properties every accepted value must have.
//!
//! An input is one byte naming the RPC (`'0'` CreateVm ... `'8'` ListVms,
//! any other byte wraps around) followed by the request body, binary
//! protobuf or Connect JSON depending on the target.

use buffa::{HasMessageView, Message, MessageView};
use bytes::Bytes;
use connectrpc::CodecFormat;
use connectrpc::dispatcher::codegen::{decode_borrowed_request_view, request_proto_bytes};
use metald_api::convert;
use metald_core::{VmId, VmSpec};
use metald_proto::vmprovisioner::v1 as pb;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The RPCs of `vmprovisioner.v1.VmService`, in input-byte order.
pub const RPCS: [&str; 9] = [
    "CreateVm",
    "DeleteVm",
    "BootVm",
    "ShutdownVm",
    "PauseVm",
    "ResumeVm",
    "RebootVm",
    "GetVmInfo",
    "ListVms",
];

/// Runs one fuzz input through the request path of the RPC it names.
pub fn rpc(data: &[u8], format: CodecFormat) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which.wrapping_sub(b'0') % RPCS.len() as u8 {
        0 => with::<pb::CreateVmRequest>(body, format, |r| {
            if let Ok(Some(id)) = convert::optional_vm_id(&r.vm_id) {
                accepted_id(&id, &r.vm_id);
            }
            if let Ok(spec) = convert::spec_from_pb(r.config.as_option()) {
                accepted_spec(&spec);
            }
        }),
        1 => with::<pb::DeleteVmRequest>(body, format, |r| id(&r.vm_id)),
        2 => with::<pb::BootVmRequest>(body, format, |r| id(&r.vm_id)),
        3 => with::<pb::ShutdownVmRequest>(body, format, |r| {
            id(&r.vm_id);
            match convert::shutdown_timeout(r.timeout_seconds) {
                Ok(None) => assert_eq!(r.timeout_seconds, 0),
                Ok(Some(t)) => {
                    assert!(r.timeout_seconds >= 1);
                    assert!(r.timeout_seconds <= convert::MAX_SHUTDOWN_TIMEOUT_SECS);
                    assert_eq!(t.as_secs(), r.timeout_seconds as u64);
                }
                Err(_) => {}
            }
        }),
        4 => with::<pb::PauseVmRequest>(body, format, |r| id(&r.vm_id)),
        5 => with::<pb::ResumeVmRequest>(body, format, |r| id(&r.vm_id)),
        6 => with::<pb::RebootVmRequest>(body, format, |r| id(&r.vm_id)),
        7 => with::<pb::GetVmInfoRequest>(body, format, |r| id(&r.vm_id)),
        _ => with::<pb::ListVmsRequest>(body, format, |r| {
            if let Ok(states) = convert::states_from_pb(&r.state_filter) {
                assert_eq!(states.len(), r.state_filter.len());
                for (s, wire) in states.iter().zip(&r.state_filter) {
                    assert_eq!(Some(convert::state_to_pb(*s)), wire.as_known());
                }
            }
            if let Ok(cursor) = convert::cursor_from_token(&r.page_token) {
                assert_eq!(cursor.is_none(), r.page_token.is_empty());
                let again = convert::cursor_from_token(&convert::page_token(cursor));
                assert_eq!(again.ok(), Some(cursor), "page token of {cursor:?}");
            }
        }),
    }
}

/// Decodes `body` as `Req` exactly as the generated dispatch code does
/// (JSON is first decoded and re-encoded as protobuf; the handler gets a
/// view decoded under the server's limits, which it copies out), checks
/// the message survives re-encoding, then hands it to `check`.
fn with<Req>(body: &[u8], format: CodecFormat, check: impl FnOnce(&Req))
where
    Req: HasMessageView + Serialize + DeserializeOwned + std::fmt::Debug + 'static,
{
    let limits = metald_api::server::limits();
    if body.len() > limits.max_request_body_size() {
        return;
    }
    let Ok(proto) = request_proto_bytes::<Req>(Bytes::copy_from_slice(body), format) else {
        return;
    };
    let Ok(view) = decode_borrowed_request_view::<Req::View<'_>>(&proto, &limits.decode_options())
    else {
        return;
    };
    // What `ServiceRequest::to_owned_message` does with the handler's view
    // (that wrapper only borrows it, which a generic caller can't express).
    let req = view
        .to_owned_from_source(Some(&proto))
        .expect("wire-decoded view always converts");
    reencodes(&req);
    check(&req);
}

/// A decoded request reads back the same from its own protobuf encoding,
/// and its JSON form is stable.
fn reencodes<Req>(req: &Req)
where
    Req: Message + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let back = Req::decode_from_slice(&req.encode_to_vec()).expect("re-encoded request decodes");
    assert_eq!(&back, req, "protobuf round trip");
    let json = serde_json::to_value(req).expect("request encodes as JSON");
    let back: Req = serde_json::from_value(json.clone()).expect("request's own JSON decodes");
    assert_eq!(
        serde_json::to_value(&back).expect("request encodes as JSON"),
        json,
        "JSON round trip"
    );
}

/// A required `vm_id`.
fn id(raw: &str) {
    if let Ok(id) = convert::vm_id(raw) {
        accepted_id(&id, raw);
    }
}

/// An id metald accepted is the text the client sent, and parses again.
fn accepted_id(id: &VmId, raw: &str) {
    assert_eq!(id.as_str(), raw);
    assert!(raw.len() <= metald_core::vm::MAX_VM_ID_LEN);
    let again = VmId::parse(id.as_str(), "vm_id").expect("an accepted id parses again");
    assert_eq!(&again, id);
}

/// A spec metald accepted, as GetVmInfo reports it, is accepted again and
/// means the same. GetVmInfo names the default disk interface, and shows
/// addresses only once an interface is attached (never, here).
fn accepted_spec(spec: &VmSpec) {
    assert!(spec.disks().len() <= metald_core::vm::MAX_DISKS);
    assert!(
        spec.disks().iter().skip(1).all(|d| !d.is_root),
        "the root device goes first"
    );
    let reported = convert::spec_to_pb(spec);
    let again = convert::spec_from_pb(Some(&reported))
        .unwrap_or_else(|e| panic!("GetVmInfo's config of an accepted spec is refused: {e}"));
    let mut disks = spec.disks().to_vec();
    for d in &mut disks {
        if d.interface_type.is_empty() {
            d.interface_type = "virtio-blk".into();
        }
    }
    let mut nics = spec.nics().to_vec();
    for n in &mut nics {
        n.ipv4 = None;
        n.ipv6 = None;
    }
    assert_eq!(again.disks(), &disks[..]);
    assert_eq!(again.nics(), &nics[..]);
    assert_eq!(again.vcpus(), spec.vcpus());
    assert_eq!(again.topology(), spec.topology());
    assert_eq!(again.memory_bytes(), spec.memory_bytes());
    assert_eq!(again.kernel(), spec.kernel());
    assert_eq!(again.initrd(), spec.initrd());
    assert_eq!(again.kernel_args(), spec.kernel_args());
    assert_eq!(again.boot_options(), spec.boot_options());
    assert_eq!(again.console_enabled(), spec.console_enabled());
    assert_eq!(again.metadata(), spec.metadata());
}
