//! pgoutput encoder: the inverse of [`Decoder::decode`](super::Decoder::decode), writing bytes
//! the way PostgreSQL's `proto.c` does. Used to build synthetic streams for tests, fuzzing
//! and benchmarks.

use super::{Datum, Message, OldKind, Relation, Tuple, Xid};
use bytes::{BufMut, BytesMut};

/// Encode `msg` as the server would, appending to `out`.
///
/// `in_stream` means "inside a streamed block with proto_version >= 2": R/Y/I/U/D/T/M then get
/// the Int32 xid prefix (their `xid` field, or 0 when it is `None`); outside it the `xid` field
/// is ignored. `parallel_streaming` adds abort LSN + timestamp to Stream Abort (from its
/// `abort` field, or zeros when it is `None`); without it `abort` is ignored. This mirrors the
/// server, where the session context, not the message, decides these fields.
///
/// # Panics
///
/// If the message cannot be represented on the wire: a string containing a NUL byte, more
/// than 65535 columns, or a value / relation list longer than `i32::MAX`.
pub fn encode(msg: &Message, in_stream: bool, parallel_streaming: bool, out: &mut BytesMut) {
    let xid = |out: &mut BytesMut, xid: Option<Xid>| {
        if in_stream {
            out.put_u32(xid.unwrap_or(0));
        }
    };
    match msg {
        Message::Begin {
            final_lsn,
            commit_ts,
            xid,
        } => {
            out.put_u8(b'B');
            out.put_u64(*final_lsn);
            out.put_i64(*commit_ts);
            out.put_u32(*xid);
        }
        Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_ts,
        } => {
            out.put_u8(b'C');
            out.put_u8(*flags);
            out.put_u64(*commit_lsn);
            out.put_u64(*end_lsn);
            out.put_i64(*commit_ts);
        }
        Message::Origin { commit_lsn, name } => {
            out.put_u8(b'O');
            out.put_u64(*commit_lsn);
            put_cstr(out, name);
        }
        Message::Relation(rel) => {
            out.put_u8(b'R');
            xid(out, rel.xid);
            put_relation(out, rel);
        }
        Message::Type {
            xid: x,
            oid,
            namespace,
            name,
        } => {
            out.put_u8(b'Y');
            xid(out, *x);
            out.put_u32(*oid);
            put_cstr(out, namespace);
            put_cstr(out, name);
        }
        Message::Insert { xid: x, rel, new } => {
            out.put_u8(b'I');
            xid(out, *x);
            out.put_u32(*rel);
            out.put_u8(b'N');
            put_tuple(out, new);
        }
        Message::Update {
            xid: x,
            rel,
            old,
            new,
        } => {
            out.put_u8(b'U');
            xid(out, *x);
            out.put_u32(*rel);
            if let Some((kind, tuple)) = old {
                out.put_u8(old_marker(*kind));
                put_tuple(out, tuple);
            }
            out.put_u8(b'N');
            put_tuple(out, new);
        }
        Message::Delete {
            xid: x,
            rel,
            old: (kind, tuple),
        } => {
            out.put_u8(b'D');
            xid(out, *x);
            out.put_u32(*rel);
            out.put_u8(old_marker(*kind));
            put_tuple(out, tuple);
        }
        Message::Truncate {
            xid: x,
            options,
            rels,
        } => {
            out.put_u8(b'T');
            xid(out, *x);
            out.put_i32(i32::try_from(rels.len()).expect("Truncate: too many relations"));
            out.put_u8(*options);
            for oid in rels {
                out.put_u32(*oid);
            }
        }
        Message::LogicalMessage {
            xid: x,
            transactional,
            lsn,
            prefix,
            content,
        } => {
            out.put_u8(b'M');
            xid(out, *x);
            out.put_u8(u8::from(*transactional));
            out.put_u64(*lsn);
            put_cstr(out, prefix);
            put_len_bytes(out, content);
        }
        Message::StreamStart { xid, first_segment } => {
            out.put_u8(b'S');
            out.put_u32(*xid);
            out.put_u8(u8::from(*first_segment));
        }
        Message::StreamStop => out.put_u8(b'E'),
        Message::StreamCommit {
            xid,
            flags,
            commit_lsn,
            end_lsn,
            commit_ts,
        } => {
            out.put_u8(b'c');
            out.put_u32(*xid);
            out.put_u8(*flags);
            out.put_u64(*commit_lsn);
            out.put_u64(*end_lsn);
            out.put_i64(*commit_ts);
        }
        Message::StreamAbort { xid, subxid, abort } => {
            out.put_u8(b'A');
            out.put_u32(*xid);
            out.put_u32(*subxid);
            if parallel_streaming {
                let (lsn, ts) = abort.unwrap_or((0, 0));
                out.put_u64(lsn);
                out.put_i64(ts);
            }
        }
        Message::BeginPrepare {
            prepare_lsn,
            end_lsn,
            prepare_ts,
            xid,
            gid,
        } => {
            out.put_u8(b'b');
            out.put_u64(*prepare_lsn);
            out.put_u64(*end_lsn);
            out.put_i64(*prepare_ts);
            out.put_u32(*xid);
            put_cstr(out, gid);
        }
        Message::Prepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_ts,
            xid,
            gid,
        } => {
            put_prepare_like(
                out,
                b'P',
                *flags,
                *prepare_lsn,
                *end_lsn,
                *prepare_ts,
                *xid,
                gid,
            );
        }
        Message::CommitPrepared {
            flags,
            commit_lsn,
            end_lsn,
            commit_ts,
            xid,
            gid,
        } => {
            put_prepare_like(
                out,
                b'K',
                *flags,
                *commit_lsn,
                *end_lsn,
                *commit_ts,
                *xid,
                gid,
            );
        }
        Message::RollbackPrepared {
            flags,
            prepare_end_lsn,
            rollback_end_lsn,
            prepare_ts,
            rollback_ts,
            xid,
            gid,
        } => {
            out.put_u8(b'r');
            out.put_u8(*flags);
            out.put_u64(*prepare_end_lsn);
            out.put_u64(*rollback_end_lsn);
            out.put_i64(*prepare_ts);
            out.put_i64(*rollback_ts);
            out.put_u32(*xid);
            put_cstr(out, gid);
        }
        Message::StreamPrepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_ts,
            xid,
            gid,
        } => {
            put_prepare_like(
                out,
                b'p',
                *flags,
                *prepare_lsn,
                *end_lsn,
                *prepare_ts,
                *xid,
                gid,
            );
        }
    }
}

/// Prepare, Commit Prepared and Stream Prepare share one layout.
#[allow(clippy::too_many_arguments)]
fn put_prepare_like(
    out: &mut BytesMut,
    tag: u8,
    flags: u8,
    lsn: u64,
    end_lsn: u64,
    ts: i64,
    xid: Xid,
    gid: &[u8],
) {
    out.put_u8(tag);
    out.put_u8(flags);
    out.put_u64(lsn);
    out.put_u64(end_lsn);
    out.put_i64(ts);
    out.put_u32(xid);
    put_cstr(out, gid);
}

fn old_marker(kind: OldKind) -> u8 {
    match kind {
        OldKind::Key => b'K',
        OldKind::Full => b'O',
    }
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    assert!(!s.contains(&0), "pgoutput strings cannot contain NUL");
    out.put_slice(s);
    out.put_u8(0);
}

fn put_len_bytes(out: &mut BytesMut, v: &[u8]) {
    out.put_i32(i32::try_from(v.len()).expect("value longer than i32::MAX"));
    out.put_slice(v);
}

fn put_ncols(out: &mut BytesMut, n: usize) {
    out.put_u16(u16::try_from(n).expect("more than 65535 columns"));
}

fn put_relation(out: &mut BytesMut, rel: &Relation) {
    out.put_u32(rel.oid);
    put_cstr(out, &rel.namespace);
    put_cstr(out, &rel.name);
    out.put_u8(rel.replica_identity);
    put_ncols(out, rel.columns.len());
    for col in &rel.columns {
        out.put_u8(col.flags);
        put_cstr(out, &col.name);
        out.put_u32(col.type_oid);
        out.put_i32(col.type_modifier);
    }
}

fn put_tuple(out: &mut BytesMut, tuple: &Tuple) {
    put_ncols(out, tuple.len());
    for d in tuple {
        match d {
            Datum::Null => out.put_u8(b'n'),
            Datum::UnchangedToast => out.put_u8(b'u'),
            Datum::Text(v) => {
                out.put_u8(b't');
                put_len_bytes(out, v);
            }
            Datum::Binary(v) => {
                out.put_u8(b'b');
                put_len_bytes(out, v);
            }
        }
    }
}
