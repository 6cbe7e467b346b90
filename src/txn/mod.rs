//! Transaction assembly: pgoutput messages -> typed, transaction-framed [`Event`]s.
//!
//! * [`relcache`]: relation descriptions from `R` messages, per walsender session.
//! * [`value`]: typed column values from the text format.
//! * [`assemble`]: the streaming [`Assembler`].

pub mod assemble;
pub mod relcache;
pub mod value;

pub use assemble::{
    AssembleError, AssembleErrorKind, Assembler, Change, Event, Op, Truncate, TxnBegin, TxnCommit,
    trim_padded,
};
pub use relcache::{ColumnDesc, RelationCache, RelationDesc, RelationError, ReplicaIdentity};
pub use value::{
    NotWholeNumber, Value, ValueError, parse_value, pg_timestamp_to_rfc3339_millis,
    pg_timestamp_to_unix_micros,
};
