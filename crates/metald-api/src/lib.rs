//! metald's API layer: transport, authentication and decoding only.
//!
//! A request passes [`door`] (who is calling, at what rate, by when:
//! before its body is read), [`convert`] (wire message to
//! core types, where input validation happens via `metald_core::vm`), the
//! core service (every rule), and [`status`] (core error to Connect code).
//! Nothing here decides whether an operation is allowed.

pub mod audit;
pub mod auth;
pub mod convert;
pub mod door;
pub mod health;
pub mod jwks;
pub mod listen;
pub mod ratelimit;
pub mod reload;
pub mod rpcmetrics;
pub mod server;
pub mod status;
pub mod tls;
pub mod trace;

pub use auth::{AuthConfig, Authenticator, JwtKey, JwtRules};
pub use health::Health;
pub use listen::ConnectionLimits;
pub use ratelimit::RateLimiter;
pub use rpcmetrics::{RpcObserver, RpcOutcome};
pub use server::{ApiServer, serve};
pub use tls::{ClientIdentity, Tls, TlsFiles};
