//! pgoutput: PostgreSQL's logical decoding output plugin protocol, versions 1-4.
//!
//! Sans-IO: [`Decoder::decode`] takes the payload of one XLogData message and returns
//! one [`Message`]; [`encode`] writes a message back into a caller's buffer (used by
//! property tests, the fuzz targets and benchmarks). Nothing here touches a socket.

mod decode;
mod encode;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use decode::{DecodeError, Decoder};
pub use encode::encode;

use bytes::Bytes;

/// Transaction id as sent by the server.
pub type Xid = u32;
/// Relation (table) OID.
pub type Oid = u32;

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `B`: a (non-streamed) transaction starts. `final_lsn` equals the Commit's `commit_lsn`.
    Begin {
        final_lsn: u64,
        commit_ts: i64,
        xid: Xid,
    },
    /// `C`: the transaction commits; progress is `end_lsn`.
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    },
    /// `O`: changes replicated from another origin.
    Origin { commit_lsn: u64, name: Bytes },
    /// `R`: a relation's schema; sent before its first change in a session and after DDL.
    Relation(Relation),
    /// `Y`: a non-built-in type.
    Type {
        xid: Option<Xid>,
        oid: Oid,
        namespace: Bytes,
        name: Bytes,
    },
    /// `I`
    Insert {
        xid: Option<Xid>,
        rel: Oid,
        new: Tuple,
    },
    /// `U`: `old` is present with REPLICA IDENTITY FULL (`O`) or when the key changed (`K`).
    Update {
        xid: Option<Xid>,
        rel: Oid,
        old: Option<(OldKind, Tuple)>,
        new: Tuple,
    },
    /// `D`
    Delete {
        xid: Option<Xid>,
        rel: Oid,
        old: (OldKind, Tuple),
    },
    /// `T`: `options` bit 1 = CASCADE, bit 2 = RESTART IDENTITY.
    Truncate {
        xid: Option<Xid>,
        options: u8,
        rels: Vec<Oid>,
    },
    /// `M`: `pg_logical_emit_message` (only with `messages 'true'`).
    LogicalMessage {
        xid: Option<Xid>,
        transactional: bool,
        lsn: u64,
        prefix: Bytes,
        content: Bytes,
    },
    /// `S` (v2+)
    StreamStart { xid: Xid, first_segment: bool },
    /// `E` (v2+)
    StreamStop,
    /// `c` (v2+)
    StreamCommit {
        xid: Xid,
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    },
    /// `A` (v2+): `abort` (LSN, timestamp) is present only with `streaming 'parallel'` (v4).
    StreamAbort {
        xid: Xid,
        subxid: Xid,
        abort: Option<(u64, i64)>,
    },
    /// `b` (v3+)
    BeginPrepare {
        prepare_lsn: u64,
        end_lsn: u64,
        prepare_ts: i64,
        xid: Xid,
        gid: Bytes,
    },
    /// `P` (v3+)
    Prepare {
        flags: u8,
        prepare_lsn: u64,
        end_lsn: u64,
        prepare_ts: i64,
        xid: Xid,
        gid: Bytes,
    },
    /// `K` (v3+)
    CommitPrepared {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
        xid: Xid,
        gid: Bytes,
    },
    /// `r` (v3+)
    RollbackPrepared {
        flags: u8,
        prepare_end_lsn: u64,
        rollback_end_lsn: u64,
        prepare_ts: i64,
        rollback_ts: i64,
        xid: Xid,
        gid: Bytes,
    },
    /// `p` (v3+)
    StreamPrepare {
        flags: u8,
        prepare_lsn: u64,
        end_lsn: u64,
        prepare_ts: i64,
        xid: Xid,
        gid: Bytes,
    },
}

/// Which old tuple an UPDATE/DELETE carries.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: replica identity key columns only (others are `Null`).
    Key,
    /// `O`: the full old row (REPLICA IDENTITY FULL).
    Full,
}

/// `R` message body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub xid: Option<Xid>,
    pub oid: Oid,
    /// Schema name; empty means `pg_catalog`.
    pub namespace: Bytes,
    pub name: Bytes,
    /// `relreplident`: b'd' default, b'n' nothing, b'f' full, b'i' index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Bit 1: part of the replica identity key.
    pub flags: u8,
    pub name: Bytes,
    pub type_oid: Oid,
    pub type_modifier: i32,
}

/// TupleData: one [`Datum`] per column.
pub type Tuple = Vec<Datum>;

/// One column value inside TupleData.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datum {
    /// `n`
    Null,
    /// `u`: an unchanged TOASTed value; the server did not send it.
    UnchangedToast,
    /// `t`: text output-function form.
    Text(Bytes),
    /// `b`: binary send-function form.
    Binary(Bytes),
}
