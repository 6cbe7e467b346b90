//! skusync: stream a PostgreSQL inventory database's WAL into Redis counters and MQTT topics.
//!
//! The module layout follows the data flow:
//!
//! ```text
//! pg (wire, conn, stream) -> pgoutput (decode) -> txn (assemble) -> [fold -> redis -> mqtt] -> progress (LSN ack)
//! ```

pub mod api;
pub mod config;
pub mod daemon;
pub mod failpoint;
pub mod filter;
pub mod fold;
pub mod http;
pub mod lsn;
pub mod names;
pub mod notify;
pub mod ops;
pub mod pg;
pub mod pgoutput;
pub mod progress;
pub mod secret;
pub mod sinks;
pub mod snapshot;
pub mod source;
pub mod tail;
pub mod telemetry;
pub mod txn;
pub mod units;
