//! The PostgreSQL side: connection settings, TLS, the replication wire protocol and
//! the one module (`conn`) that adapts the sans-IO pieces to tokio.
//!
//! ```text
//! connstr (URL, password, sslmode) -> tls -> conn (startup, auth, simple query, CopyBoth)
//!                                            wire (frames, XLogData, keepalive, status update)
//! ```

pub mod conn;
pub mod connstr;
pub mod error;
pub mod ident;
pub mod meta;
pub mod pace;
pub mod partitions;
pub mod publication;
pub mod tls;
pub mod wire;

pub use conn::{ReplConnection, ReplicationOptions, SlotInfo, SystemInfo};
pub use connstr::{PgConnectConfig, SslMode};
pub use error::PgError;
