//! One error type for every use case. The API layer maps each variant to a
//! Connect code; messages are written for the caller, naming the field or
//! the state that made the request fail.

use crate::state::VmState;

/// Why a request to metald failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A request field is malformed or out of range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The VM does not exist, or belongs to another customer (the two are
    /// indistinguishable on purpose).
    #[error("vm {0:?} not found")]
    NotFound(String),
    /// A client-chosen VM id is already taken (among the caller's VMs).
    #[error("vm {0:?} already exists")]
    AlreadyExists(String),
    /// A field names something the caller may not use (a file outside its
    /// asset roots, or one that does not exist: the two answer alike).
    #[error("{field}: {reason}")]
    PermissionDenied { field: String, reason: String },
    /// The VM's current state does not allow the operation.
    #[error("cannot {op} vm {vm_id:?} in state {state}")]
    IllegalTransition {
        vm_id: String,
        op: &'static str,
        state: VmState,
    },
    /// Another precondition is not met (e.g. a capability the backend lacks).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request names a feature metald does not implement yet.
    #[error("{0}")]
    Unimplemented(String),
    /// The caller presented no or bad credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The VMM refused or failed an operation.
    #[error("backend: {0}")]
    Backend(String),
    /// The state store failed.
    #[error("store: {0}")]
    Store(String),
    /// A quota or the host's capacity does not allow the request; the
    /// message names the quota, its limit and the current use.
    #[error("{message}")]
    ResourceExhausted {
        /// Which limit refused: a quota's name (`max_vms`, ...,
        /// `create_rate`) or `host_capacity`.
        quota: &'static str,
        message: String,
    },
    /// metald is shutting down or a dependency is unreachable.
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl Error {
    /// Shorthand for [`Error::PermissionDenied`].
    pub fn denied(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::PermissionDenied {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias for core operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
