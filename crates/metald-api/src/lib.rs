//! metald's API layer: transport, authentication and decoding only.
//!
//! A request passes [`auth`] (who is calling), [`convert`] (wire message to
//! core types, where input validation happens via `metald_core::vm`), the
//! core service (every rule), and [`status`] (core error to Connect code).
//! Nothing here decides whether an operation is allowed.

pub mod auth;
pub mod convert;
pub mod server;
pub mod status;

pub use auth::{AuthConfig, Authenticator, JwtKey};
pub use server::{ApiServer, serve};
