//! metald's durable VM records: implementations of
//! [`metald_core::ports::Store`].
//!
//! [`SqliteStore`] keeps every VM in one SQLite file beside metald's other
//! data, so a restarted metald finds (and re-adopts) every VMM it started.
//! The schema lives in `migrations/` and is compiled in; its SQL is kept
//! portable so a PostgreSQL store can share it later.

mod counts;
mod sqlite;

pub use sqlite::SqliteStore;
