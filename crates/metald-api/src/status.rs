//! Maps core errors to Connect codes. The message is the core's, which
//! names the field or state at fault; `internal` and `unavailable` answers
//! carry only a short message and an error id, and the details (VMM
//! output, host paths, OS errors) go to metald's log under that id.

use connectrpc::{ConnectError, ErrorCode};
use metald_core::Error;

/// The Connect error a client sees for a core error.
pub fn to_connect(err: Error) -> ConnectError {
    to_connect_with_id(err).0
}

/// Like [`to_connect`], also giving the error id the log has the details
/// under (`internal` and `unavailable` answers only).
pub fn to_connect_with_id(err: Error) -> (ConnectError, Option<String>) {
    let code = match &err {
        Error::InvalidArgument { .. } => ErrorCode::InvalidArgument,
        Error::NotFound(_) => ErrorCode::NotFound,
        Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
        Error::PermissionDenied { .. } => ErrorCode::PermissionDenied,
        Error::IllegalTransition { .. } | Error::FailedPrecondition(_) => {
            ErrorCode::FailedPrecondition
        }
        Error::Unimplemented(_) => ErrorCode::Unimplemented,
        Error::Unauthenticated(_) => ErrorCode::Unauthenticated,
        Error::Unavailable(_) => ErrorCode::Unavailable,
        Error::ResourceExhausted { .. } => ErrorCode::ResourceExhausted,
        Error::Backend(_) | Error::Store(_) => ErrorCode::Internal,
    };
    match code {
        ErrorCode::Internal => {
            let id = metald_core::redact::error_id();
            tracing::error!(error_id = %id, error = %err, "internal error");
            let e = ConnectError::new(
                code,
                format!("internal error (error id {id}); the details are in metald's log"),
            );
            (e, Some(id))
        }
        ErrorCode::Unavailable => {
            let id = metald_core::redact::error_id();
            tracing::warn!(error_id = %id, error = %err, "unavailable");
            let e = ConnectError::new(code, format!("{err} (error id {id})"));
            (e, Some(id))
        }
        _ => (ConnectError::new(code, err.to_string()), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metald_core::VmState;

    #[test]
    fn codes_follow_the_error_kind() {
        let cases = [
            (
                Error::invalid("config.cpu.vcpu_count", "bad"),
                ErrorCode::InvalidArgument,
            ),
            (Error::NotFound("x".into()), ErrorCode::NotFound),
            (Error::AlreadyExists("x".into()), ErrorCode::AlreadyExists),
            (
                Error::IllegalTransition {
                    vm_id: "x".into(),
                    op: "pause",
                    state: VmState::Created,
                },
                ErrorCode::FailedPrecondition,
            ),
            (
                Error::Unauthenticated("no".into()),
                ErrorCode::Unauthenticated,
            ),
            (Error::Unimplemented("no".into()), ErrorCode::Unimplemented),
            (Error::Backend("qemu".into()), ErrorCode::Internal),
            (Error::Store("db".into()), ErrorCode::Internal),
            (Error::Unavailable("later".into()), ErrorCode::Unavailable),
            (
                Error::denied("config.boot.kernel_path", "no"),
                ErrorCode::PermissionDenied,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(to_connect(err).code, code);
        }
    }

    #[test]
    fn internal_errors_show_only_an_error_id() {
        let e = to_connect(Error::Backend(
            "qemu: /var/lib/metald/vms/x/qmp.sock: No such file or directory".into(),
        ));
        let m = e.message.unwrap_or_default();
        assert!(m.contains("error id "), "{m}");
        assert!(!m.contains('/') && !m.contains("No such file"), "{m}");
        let e = to_connect(Error::Store("database is locked at /data/metald.db".into()));
        let m = e.message.unwrap_or_default();
        assert!(!m.contains("/data") && m.contains("error id "), "{m}");
    }

    #[test]
    fn messages_name_the_field_and_state() {
        let e = to_connect(Error::invalid("config.memory.size_bytes", "too small"));
        assert!(
            e.message
                .as_deref()
                .unwrap_or_default()
                .contains("config.memory.size_bytes")
        );
        let e = to_connect(Error::IllegalTransition {
            vm_id: "a".into(),
            op: "pause",
            state: VmState::Created,
        });
        assert!(e.message.as_deref().unwrap_or_default().contains("created"));
    }
}
