//! Streaming transaction assembly: one pgoutput [`Message`] in, at most one [`Event`] out.
//!
//! Nothing is buffered: the assembler keeps only the relation cache and the open
//! transaction's header, so memory does not grow with transaction size.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use super::relcache::{RelationCache, RelationDesc, RelationError};
use super::value::{Value, ValueError, parse_value};
use crate::lsn::Lsn;
use crate::pgoutput::{Datum, Message, OldKind, Tuple};

/// A transaction started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnBegin {
    /// Transaction id.
    pub xid: u32,
    /// LSN of the commit record (`Begin.final_lsn`).
    pub commit_lsn: Lsn,
    /// Commit time, PostgreSQL microseconds since 2000-01-01 UTC.
    pub commit_ts: i64,
}

/// A transaction was received completely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnCommit {
    /// Transaction id (from the Begin).
    pub xid: u32,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to report as flushed once durable.
    pub end_lsn: Lsn,
    /// Commit time, PostgreSQL microseconds since 2000-01-01 UTC.
    pub commit_ts: i64,
    /// Number of Insert/Update/Delete/Truncate events in the transaction.
    pub changes: u64,
}

/// Kind of row change.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// INSERT
    Insert,
    /// UPDATE
    Update,
    /// DELETE
    Delete,
}

impl Op {
    /// Lowercase SQL verb, for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// One row change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// INSERT, UPDATE or DELETE.
    pub op: Op,
    /// The relation's description at the time of the change.
    pub rel: Arc<RelationDesc>,
    /// Old row: on UPDATE when the server sent one (key changed or REPLICA IDENTITY FULL),
    /// always on DELETE.
    pub old: Option<(OldKind, Tuple)>,
    /// New row: INSERT and UPDATE.
    pub new: Option<Tuple>,
    /// 0-based index of this change (Insert/Update/Delete/Truncate) within its transaction.
    pub seq: u64,
    /// Commit LSN of the enclosing transaction.
    pub commit_lsn: Lsn,
}

fn value_at<'a>(
    rel: &RelationDesc,
    tuple: &'a [Datum],
    col: usize,
) -> Result<Value<'a>, ValueError> {
    match (tuple.get(col), rel.columns.get(col)) {
        (Some(d), Some(c)) => parse_value(d, c.type_oid),
        _ => Err(ValueError::NoSuchColumn {
            index: col,
            count: tuple.len().min(rel.columns.len()),
        }),
    }
}

/// Builds `{column: value}` for a tuple, collecting unchanged-TOAST columns separately.
/// `char(n)` values without their pad spaces, as PostgreSQL compares them and casts
/// them to text: a SKU `'A1'` in a `char(12)` column is the SKU `A1`, the same as in a
/// `varchar` column elsewhere. The snapshot trims the same way.
pub fn trim_padded(rel: &RelationDesc, t: &mut Tuple) {
    for (c, d) in rel.columns.iter().zip(t.iter_mut()) {
        if c.type_oid == super::value::oid::BPCHAR
            && let Datum::Text(b) = d
        {
            let n = b.iter().rposition(|&x| x != b' ').map_or(0, |i| i + 1);
            if n < b.len() {
                b.truncate(n);
            }
        }
    }
}

fn tuple_json(
    rel: &RelationDesc,
    tuple: &[Datum],
) -> Result<(serde_json::Value, Vec<serde_json::Value>), ValueError> {
    let mut obj = serde_json::Map::with_capacity(tuple.len());
    let mut unchanged = Vec::new();
    for (i, col) in rel.columns.iter().enumerate() {
        match value_at(rel, tuple, i)? {
            Value::UnchangedToast => unchanged.push(serde_json::Value::String(col.name.clone())),
            v => {
                obj.insert(col.name.clone(), v.to_json());
            }
        }
    }
    Ok((serde_json::Value::Object(obj), unchanged))
}

impl Change {
    /// Column `col` of the new tuple, typed by the relation's column type.
    pub fn new_value(&self, col: usize) -> Result<Value<'_>, ValueError> {
        let new = self.new.as_ref().ok_or(ValueError::NoNewTuple)?;
        value_at(&self.rel, new, col)
    }

    /// Column `col` of the old tuple; `Ok(None)` when the change carries no old tuple.
    /// With an [`OldKind::Key`] tuple, non-key columns are `Null`.
    pub fn old_value(&self, col: usize) -> Result<Option<Value<'_>>, ValueError> {
        match &self.old {
            None => Ok(None),
            Some((_, old)) => value_at(&self.rel, old, col).map(Some),
        }
    }

    /// JSON for `skusync tail`:
    ///
    /// ```json
    /// {"op":"update","relation":"public.inventory","seq":0,"commit_lsn":"0/16B3748",
    ///  "new":{"sku":"A1","qty":3},"old":{"sku":"A1","qty":null},"old_kind":"key",
    ///  "unchanged_toast":{"new":["notes"],"old":[]}}
    /// ```
    ///
    /// `new`/`old` are `null` when absent; `old_kind` is `"key"`, `"full"` or `null`.
    /// Unchanged TOASTed columns are left out of `new`/`old` and named in `unchanged_toast`
    /// instead (present only when non-empty), so they cannot be confused with a real value.
    pub fn to_json(&self) -> Result<serde_json::Value, ValueError> {
        use serde_json::{Value as J, json};
        let (new, new_u) = match &self.new {
            Some(t) => tuple_json(&self.rel, t)?,
            None => (J::Null, Vec::new()),
        };
        let (old, old_u, kind) = match &self.old {
            Some((k, t)) => {
                let (o, u) = tuple_json(&self.rel, t)?;
                let kind = match k {
                    OldKind::Key => "key",
                    OldKind::Full => "full",
                };
                (o, u, J::from(kind))
            }
            None => (J::Null, Vec::new(), J::Null),
        };
        let mut out = json!({
            "op": self.op.as_str(),
            "relation": self.rel.qualified_name(),
            "seq": self.seq,
            "commit_lsn": self.commit_lsn.to_string(),
            "new": new,
            "old": old,
            "old_kind": kind,
        });
        if !(new_u.is_empty() && old_u.is_empty()) {
            out["unchanged_toast"] = json!({"new": new_u, "old": old_u});
        }
        Ok(out)
    }
}

/// TRUNCATE of one or more relations (one statement).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    /// Truncated relations.
    pub rels: Vec<Arc<RelationDesc>>,
    /// `TRUNCATE ... CASCADE`
    pub cascade: bool,
    /// `TRUNCATE ... RESTART IDENTITY`
    pub restart_identity: bool,
    /// Index within the transaction, shared numbering with [`Change::seq`].
    pub seq: u64,
    /// Commit LSN of the enclosing transaction.
    pub commit_lsn: Lsn,
}

/// What one pgoutput message means to later stages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A transaction started.
    Begin(TxnBegin),
    /// A row change inside the open transaction.
    Change(Change),
    /// A TRUNCATE inside the open transaction.
    Truncate(Truncate),
    /// A relation's (new) schema; already stored in the cache.
    Relation(Arc<RelationDesc>),
    /// The open transaction committed.
    Commit(TxnCommit),
    /// `pg_logical_emit_message` output.
    Message {
        /// Part of a transaction (else emitted immediately, outside any transaction).
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// Prefix chosen by the emitter (lossily decoded if not UTF-8: it is only a label).
        prefix: String,
        /// Payload.
        content: Bytes,
    },
}

/// What went wrong in [`Assembler::push`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AssembleErrorKind {
    /// A Begin arrived while another transaction was open.
    #[error("Begin of xid {xid} while xid {open_xid} is still open")]
    BeginInsideTransaction {
        /// The open transaction.
        open_xid: u32,
        /// The new Begin's xid.
        xid: u32,
    },
    /// A Commit arrived with no open transaction.
    #[error("Commit without a Begin")]
    CommitWithoutBegin,
    /// Commit's commit_lsn differs from the Begin's final_lsn.
    #[error("Commit LSN {commit_lsn} does not match the Begin's final LSN {begin_final_lsn}")]
    CommitLsnMismatch {
        /// From the Begin.
        begin_final_lsn: Lsn,
        /// From the Commit.
        commit_lsn: Lsn,
    },
    /// A change or transactional message outside a transaction.
    #[error("{what} outside a transaction")]
    OutsideTransaction {
        /// "insert", "update", "delete", "truncate" or "transactional message".
        what: &'static str,
    },
    /// A change for a relation the server never described in this session.
    #[error(
        "change for relation oid {oid}, which the server has not described with a Relation message"
    )]
    UnknownRelation {
        /// The relation OID.
        oid: u32,
    },
    /// A tuple's column count differs from the cached relation.
    #[error("{which} tuple has {got} columns but the relation has {expected}")]
    ColumnCountMismatch {
        /// "new" or "old".
        which: &'static str,
        /// Columns in the tuple.
        got: usize,
        /// Columns in the relation.
        expected: usize,
    },
    /// A Relation message could not be used.
    #[error("bad Relation message: {0}")]
    Relation(#[from] RelationError),
    /// Streaming (`streaming` option) messages.
    #[error("server sent a streamed transaction ({0} message), which skusync did not request")]
    Streamed(&'static str),
    /// Two-phase (`two_phase` option) messages.
    #[error("server sent a two-phase transaction ({0} message), which skusync did not request")]
    TwoPhase(&'static str),
}

/// A protocol violation, located by LSN and (when known) relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssembleError {
    /// XLogData `wal_start` of the offending message.
    pub lsn: Lsn,
    /// Qualified relation name, or `oid N` when the relation is unknown.
    pub relation: Option<String>,
    /// What went wrong.
    pub kind: AssembleErrorKind,
}

impl fmt::Display for AssembleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at LSN {}", self.lsn)?;
        if let Some(r) = &self.relation {
            write!(f, ", relation {r}")?;
        }
        write!(f, ": {}", self.kind)
    }
}

impl std::error::Error for AssembleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.kind)
    }
}

/// Header of the open transaction: all the per-transaction state there is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OpenTxn {
    xid: u32,
    final_lsn: Lsn,
    changes: u64,
}

/// Turns a pgoutput message stream into [`Event`]s, checking transaction framing.
///
/// After an error the stream position is suspect; callers reconnect and [`reset`](Self::reset).
#[derive(Debug, Default)]
pub struct Assembler {
    relations: RelationCache,
    open: Option<OpenTxn>,
    /// Domain OID -> base type OID (read by the caller from the catalog).
    domains: Arc<std::collections::HashMap<u32, u32>>,
}

impl Assembler {
    /// An assembler with an empty relation cache and no open transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Read columns typed with a domain as its base type (see
    /// [`RelationDesc::resolve_domains`]).
    pub fn set_domains(&mut self, domains: Arc<std::collections::HashMap<u32, u32>>) {
        self.domains = domains;
    }

    /// Clears the relation cache and any open transaction (on reconnect).
    pub fn reset(&mut self) {
        self.relations.clear();
        self.open = None;
    }

    /// Whether a Begin has been seen without its Commit.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// The relations described so far in this session.
    pub fn relations(&self) -> &RelationCache {
        &self.relations
    }

    /// Feeds one message. `lsn` is the XLogData `wal_start`, used only in errors.
    /// On error the assembler's state is unchanged.
    pub fn push(&mut self, msg: Message, lsn: Lsn) -> Result<Option<Event>, AssembleError> {
        let err = |relation: Option<String>, kind| AssembleError {
            lsn,
            relation,
            kind,
        };
        match msg {
            Message::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => {
                if let Some(open) = self.open {
                    return Err(err(
                        None,
                        AssembleErrorKind::BeginInsideTransaction {
                            open_xid: open.xid,
                            xid,
                        },
                    ));
                }
                let commit_lsn = Lsn(final_lsn);
                self.open = Some(OpenTxn {
                    xid,
                    final_lsn: commit_lsn,
                    changes: 0,
                });
                Ok(Some(Event::Begin(TxnBegin {
                    xid,
                    commit_lsn,
                    commit_ts,
                })))
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                commit_ts,
                ..
            } => {
                let open = self
                    .open
                    .ok_or_else(|| err(None, AssembleErrorKind::CommitWithoutBegin))?;
                if open.final_lsn != Lsn(commit_lsn) {
                    return Err(err(
                        None,
                        AssembleErrorKind::CommitLsnMismatch {
                            begin_final_lsn: open.final_lsn,
                            commit_lsn: Lsn(commit_lsn),
                        },
                    ));
                }
                self.open = None;
                Ok(Some(Event::Commit(TxnCommit {
                    xid: open.xid,
                    commit_lsn: open.final_lsn,
                    end_lsn: Lsn(end_lsn),
                    commit_ts,
                    changes: open.changes,
                })))
            }
            Message::Origin { .. } | Message::Type { .. } => Ok(None),
            Message::Relation(r) => {
                let mut desc = RelationDesc::from_message(&r)
                    .map_err(|e| err(Some(format!("oid {}", r.oid)), e.into()))?;
                desc.resolve_domains(&self.domains);
                let desc = Arc::new(desc);
                self.relations.insert(Arc::clone(&desc));
                Ok(Some(Event::Relation(desc)))
            }
            Message::Insert { rel, mut new, .. } => {
                let (rel, seq, commit_lsn) = self.change_target(rel, "insert", lsn)?;
                check_len(&rel, &new, "new", lsn)?;
                trim_padded(&rel, &mut new);
                self.bump();
                Ok(Some(Event::Change(Change {
                    op: Op::Insert,
                    rel,
                    old: None,
                    new: Some(new),
                    seq,
                    commit_lsn,
                })))
            }
            Message::Update {
                rel,
                mut old,
                mut new,
                ..
            } => {
                let (rel, seq, commit_lsn) = self.change_target(rel, "update", lsn)?;
                if let Some((_, o)) = &mut old {
                    check_len(&rel, o, "old", lsn)?;
                    trim_padded(&rel, o);
                }
                check_len(&rel, &new, "new", lsn)?;
                trim_padded(&rel, &mut new);
                self.bump();
                Ok(Some(Event::Change(Change {
                    op: Op::Update,
                    rel,
                    old,
                    new: Some(new),
                    seq,
                    commit_lsn,
                })))
            }
            Message::Delete { rel, mut old, .. } => {
                let (rel, seq, commit_lsn) = self.change_target(rel, "delete", lsn)?;
                check_len(&rel, &old.1, "old", lsn)?;
                trim_padded(&rel, &mut old.1);
                self.bump();
                Ok(Some(Event::Change(Change {
                    op: Op::Delete,
                    rel,
                    old: Some(old),
                    new: None,
                    seq,
                    commit_lsn,
                })))
            }
            Message::Truncate { options, rels, .. } => {
                let open = self.open.ok_or_else(|| {
                    let first = rels.first().map(|&o| self.rel_label(o));
                    err(
                        first,
                        AssembleErrorKind::OutsideTransaction { what: "truncate" },
                    )
                })?;
                let rels = rels
                    .iter()
                    .map(|&oid| {
                        self.relations.get(oid).cloned().ok_or_else(|| {
                            err(
                                Some(format!("oid {oid}")),
                                AssembleErrorKind::UnknownRelation { oid },
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                self.bump();
                Ok(Some(Event::Truncate(Truncate {
                    rels,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                    seq: open.changes,
                    commit_lsn: open.final_lsn,
                })))
            }
            Message::LogicalMessage {
                transactional,
                lsn: msg_lsn,
                prefix,
                content,
                ..
            } => {
                if transactional && self.open.is_none() {
                    return Err(err(
                        None,
                        AssembleErrorKind::OutsideTransaction {
                            what: "transactional message",
                        },
                    ));
                }
                Ok(Some(Event::Message {
                    transactional,
                    lsn: Lsn(msg_lsn),
                    prefix: String::from_utf8_lossy(&prefix).into_owned(),
                    content,
                }))
            }
            Message::StreamStart { .. } => {
                Err(err(None, AssembleErrorKind::Streamed("StreamStart")))
            }
            Message::StreamStop => Err(err(None, AssembleErrorKind::Streamed("StreamStop"))),
            Message::StreamCommit { .. } => {
                Err(err(None, AssembleErrorKind::Streamed("StreamCommit")))
            }
            Message::StreamAbort { .. } => {
                Err(err(None, AssembleErrorKind::Streamed("StreamAbort")))
            }
            Message::BeginPrepare { .. } => {
                Err(err(None, AssembleErrorKind::TwoPhase("BeginPrepare")))
            }
            Message::Prepare { .. } => Err(err(None, AssembleErrorKind::TwoPhase("Prepare"))),
            Message::CommitPrepared { .. } => {
                Err(err(None, AssembleErrorKind::TwoPhase("CommitPrepared")))
            }
            Message::RollbackPrepared { .. } => {
                Err(err(None, AssembleErrorKind::TwoPhase("RollbackPrepared")))
            }
            Message::StreamPrepare { .. } => {
                Err(err(None, AssembleErrorKind::TwoPhase("StreamPrepare")))
            }
        }
    }

    /// Qualified name if cached, else `oid N`.
    fn rel_label(&self, oid: u32) -> String {
        match self.relations.get(oid) {
            Some(r) => r.qualified_name(),
            None => format!("oid {oid}"),
        }
    }

    /// Checks a row change may happen now and returns (relation, seq, commit_lsn).
    fn change_target(
        &self,
        oid: u32,
        what: &'static str,
        lsn: Lsn,
    ) -> Result<(Arc<RelationDesc>, u64, Lsn), AssembleError> {
        let Some(open) = self.open else {
            return Err(AssembleError {
                lsn,
                relation: Some(self.rel_label(oid)),
                kind: AssembleErrorKind::OutsideTransaction { what },
            });
        };
        // (the error built only when needed: this runs for every change)
        let rel = self
            .relations
            .get(oid)
            .cloned()
            .ok_or_else(|| AssembleError {
                lsn,
                relation: Some(format!("oid {oid}")),
                kind: AssembleErrorKind::UnknownRelation { oid },
            })?;
        Ok((rel, open.changes, open.final_lsn))
    }

    /// Counts one change in the open transaction (callers checked it is open).
    fn bump(&mut self) {
        if let Some(open) = &mut self.open {
            open.changes += 1;
        }
    }
}

fn check_len(
    rel: &RelationDesc,
    tuple: &Tuple,
    which: &'static str,
    lsn: Lsn,
) -> Result<(), AssembleError> {
    if tuple.len() == rel.columns.len() {
        Ok(())
    } else {
        Err(AssembleError {
            lsn,
            relation: Some(rel.qualified_name()),
            kind: AssembleErrorKind::ColumnCountMismatch {
                which,
                got: tuple.len(),
                expected: rel.columns.len(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, Relation};
    use proptest::prelude::*;

    const INV: u32 = 16384;

    fn rel(oid: u32, name: &str, ncols: usize) -> Message {
        let cols = [("sku", 25u32), ("qty", 23), ("price", 1700), ("notes", 25)];
        Message::Relation(Relation {
            xid: None,
            oid,
            namespace: Bytes::from_static(b"public"),
            name: Bytes::copy_from_slice(name.as_bytes()),
            replica_identity: b'd',
            columns: cols[..ncols]
                .iter()
                .enumerate()
                .map(|(i, (n, t))| Column {
                    flags: u8::from(i == 0),
                    name: Bytes::from_static(n.as_bytes()),
                    type_oid: *t,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn txt(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn row(sku: &str, qty: i64) -> Tuple {
        vec![txt(sku), txt(&qty.to_string())]
    }

    fn begin(final_lsn: u64, xid: u32) -> Message {
        Message::Begin {
            final_lsn,
            commit_ts: 1,
            xid,
        }
    }

    fn commit(commit_lsn: u64, end_lsn: u64) -> Message {
        Message::Commit {
            flags: 0,
            commit_lsn,
            end_lsn,
            commit_ts: 2,
        }
    }

    fn insert(oid: u32, new: Tuple) -> Message {
        Message::Insert {
            xid: None,
            rel: oid,
            new,
        }
    }

    #[test]
    fn char_n_values_lose_their_pad_spaces_and_other_types_keep_theirs() {
        let desc = |oids: &[u32]| RelationDesc {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: crate::txn::ReplicaIdentity::Default,
            columns: oids
                .iter()
                .map(|&t| crate::txn::ColumnDesc {
                    name: "c".into(),
                    type_oid: t,
                    type_modifier: -1,
                    is_key: false,
                })
                .collect(),
        };
        let r = desc(&[1042, 1042, 25, 1042, 1042]);
        let mut t = vec![
            txt("A1   "),
            txt("   "),
            txt("B2  "),
            Datum::Null,
            Datum::UnchangedToast,
        ];
        trim_padded(&r, &mut t);
        assert_eq!(
            t,
            vec![
                txt("A1"),
                txt(""),
                txt("B2  "),
                Datum::Null,
                Datum::UnchangedToast
            ]
        );
    }

    fn ready() -> Assembler {
        let mut a = Assembler::new();
        a.push(rel(INV, "inventory", 2), Lsn(1)).unwrap();
        a
    }

    fn push_ok(a: &mut Assembler, m: Message) -> Option<Event> {
        a.push(m, Lsn(0x1_0000_0010)).unwrap()
    }

    fn push_err(a: &mut Assembler, m: Message) -> AssembleError {
        a.push(m, Lsn(0x1_0000_0010)).unwrap_err()
    }

    #[test]
    fn relation_is_cached_and_replaced() {
        let mut a = Assembler::new();
        match push_ok(&mut a, rel(INV, "inventory", 2)) {
            Some(Event::Relation(r)) => assert_eq!(r.qualified_name(), "public.inventory"),
            e => panic!("{e:?}"),
        }
        push_ok(&mut a, rel(INV, "inventory", 3));
        assert_eq!(a.relations().len(), 1);
        assert_eq!(a.relations().get(INV).unwrap().columns.len(), 3);
    }

    #[test]
    fn bad_relation_message_names_oid() {
        let mut a = Assembler::new();
        let Message::Relation(mut r) = rel(7, "x", 1) else {
            unreachable!()
        };
        r.replica_identity = b'?';
        let e = push_err(&mut a, Message::Relation(r));
        assert_eq!(e.relation.as_deref(), Some("oid 7"));
        assert!(matches!(e.kind, AssembleErrorKind::Relation(_)));
    }

    #[test]
    fn type_and_origin_are_ignored() {
        let mut a = Assembler::new();
        let t = Message::Type {
            xid: None,
            oid: 99999,
            namespace: Bytes::new(),
            name: Bytes::from_static(b"mood"),
        };
        assert_eq!(push_ok(&mut a, t), None);
        push_ok(&mut a, begin(100, 5));
        let o = Message::Origin {
            commit_lsn: 100,
            name: Bytes::from_static(b"other"),
        };
        assert_eq!(push_ok(&mut a, o), None);
        assert!(a.in_transaction());
    }

    #[test]
    fn full_transaction() {
        let mut a = ready();
        assert_eq!(
            push_ok(&mut a, begin(0x200, 9)),
            Some(Event::Begin(TxnBegin {
                xid: 9,
                commit_lsn: Lsn(0x200),
                commit_ts: 1
            }))
        );
        assert!(a.in_transaction());
        let Some(Event::Change(c)) = push_ok(&mut a, insert(INV, row("A1", 5))) else {
            panic!()
        };
        assert_eq!((c.op, c.seq, c.commit_lsn), (Op::Insert, 0, Lsn(0x200)));
        assert_eq!(c.new_value(1).unwrap(), Value::Int(5));
        assert_eq!(c.new_value(0).unwrap(), Value::Text("A1"));
        assert_eq!(c.old_value(0).unwrap(), None);
        assert!(matches!(
            c.new_value(2),
            Err(ValueError::NoSuchColumn { index: 2, count: 2 })
        ));
        let upd = Message::Update {
            xid: None,
            rel: INV,
            old: Some((OldKind::Key, vec![txt("A1"), Datum::Null])),
            new: row("A2", 6),
        };
        let Some(Event::Change(c)) = push_ok(&mut a, upd) else {
            panic!()
        };
        assert_eq!((c.op, c.seq), (Op::Update, 1));
        assert_eq!(c.old_value(0).unwrap(), Some(Value::Text("A1")));
        assert_eq!(c.old_value(1).unwrap(), Some(Value::Null));
        let del = Message::Delete {
            xid: None,
            rel: INV,
            old: (OldKind::Full, row("A2", 6)),
        };
        let Some(Event::Change(c)) = push_ok(&mut a, del) else {
            panic!()
        };
        assert_eq!((c.op, c.seq), (Op::Delete, 2));
        assert_eq!(c.new_value(0), Err(ValueError::NoNewTuple));
        let tr = Message::Truncate {
            xid: None,
            options: 3,
            rels: vec![INV],
        };
        let Some(Event::Truncate(t)) = push_ok(&mut a, tr) else {
            panic!()
        };
        assert_eq!((t.seq, t.cascade, t.restart_identity), (3, true, true));
        assert_eq!(t.rels[0].oid, INV);
        assert_eq!(
            push_ok(&mut a, commit(0x200, 0x230)),
            Some(Event::Commit(TxnCommit {
                xid: 9,
                commit_lsn: Lsn(0x200),
                end_lsn: Lsn(0x230),
                commit_ts: 2,
                changes: 4
            }))
        );
        assert!(!a.in_transaction());
        // seq restarts in the next transaction.
        push_ok(&mut a, begin(0x300, 10));
        let Some(Event::Change(c)) = push_ok(&mut a, insert(INV, row("B", 1))) else {
            panic!()
        };
        assert_eq!(c.seq, 0);
    }

    #[test]
    fn update_without_old_and_truncate_flags() {
        let mut a = ready();
        push_ok(&mut a, begin(10, 1));
        let upd = Message::Update {
            xid: None,
            rel: INV,
            old: None,
            new: row("A", 1),
        };
        let Some(Event::Change(c)) = push_ok(&mut a, upd) else {
            panic!()
        };
        assert_eq!(c.old, None);
        let tr = Message::Truncate {
            xid: None,
            options: 0,
            rels: vec![],
        };
        let Some(Event::Truncate(t)) = push_ok(&mut a, tr) else {
            panic!()
        };
        assert!(!t.cascade && !t.restart_identity && t.rels.is_empty());
    }

    #[test]
    fn begin_inside_transaction_is_an_error() {
        let mut a = ready();
        push_ok(&mut a, begin(10, 1));
        let e = push_err(&mut a, begin(20, 2));
        assert_eq!(
            e.kind,
            AssembleErrorKind::BeginInsideTransaction {
                open_xid: 1,
                xid: 2
            }
        );
        // State unchanged: the original transaction can still commit.
        assert!(matches!(
            push_ok(&mut a, commit(10, 11)),
            Some(Event::Commit(_))
        ));
    }

    #[test]
    fn commit_rules() {
        let mut a = ready();
        let e = push_err(&mut a, commit(10, 11));
        assert_eq!(e.kind, AssembleErrorKind::CommitWithoutBegin);
        push_ok(&mut a, begin(10, 1));
        let e = push_err(&mut a, commit(12, 13));
        assert_eq!(
            e.kind,
            AssembleErrorKind::CommitLsnMismatch {
                begin_final_lsn: Lsn(10),
                commit_lsn: Lsn(12)
            }
        );
        assert!(e.to_string().contains("0/C"), "{e}");
    }

    #[test]
    fn changes_outside_transaction_are_errors() {
        let mut a = ready();
        let msgs = [
            insert(INV, row("A", 1)),
            Message::Update {
                xid: None,
                rel: INV,
                old: None,
                new: row("A", 1),
            },
            Message::Delete {
                xid: None,
                rel: INV,
                old: (OldKind::Key, row("A", 1)),
            },
            Message::Truncate {
                xid: None,
                options: 0,
                rels: vec![INV],
            },
        ];
        for m in msgs {
            let e = push_err(&mut a, m);
            assert!(
                matches!(e.kind, AssembleErrorKind::OutsideTransaction { .. }),
                "{e}"
            );
            assert_eq!(e.relation.as_deref(), Some("public.inventory"));
        }
        let e = push_err(&mut a, insert(77, row("A", 1)));
        assert_eq!(e.relation.as_deref(), Some("oid 77"));
    }

    #[test]
    fn unknown_relation_is_an_error_naming_the_oid() {
        let mut a = ready();
        push_ok(&mut a, begin(10, 1));
        let msgs = [
            insert(77, row("A", 1)),
            Message::Update {
                xid: None,
                rel: 77,
                old: None,
                new: row("A", 1),
            },
            Message::Delete {
                xid: None,
                rel: 77,
                old: (OldKind::Key, row("A", 1)),
            },
            Message::Truncate {
                xid: None,
                options: 0,
                rels: vec![INV, 77],
            },
        ];
        for m in msgs {
            let e = push_err(&mut a, m);
            assert_eq!(e.kind, AssembleErrorKind::UnknownRelation { oid: 77 });
            let s = e.to_string();
            assert!(s.contains("oid 77") && s.contains("1/10"), "{s}");
        }
        // Errors did not consume seq numbers.
        let Some(Event::Change(c)) = push_ok(&mut a, insert(INV, row("A", 1))) else {
            panic!()
        };
        assert_eq!(c.seq, 0);
    }

    #[test]
    fn column_count_mismatch_names_relation() {
        let mut a = ready();
        push_ok(&mut a, begin(10, 1));
        let short = vec![txt("A")];
        let msgs = [
            insert(INV, short.clone()),
            Message::Update {
                xid: None,
                rel: INV,
                old: Some((OldKind::Full, short.clone())),
                new: row("A", 1),
            },
            Message::Update {
                xid: None,
                rel: INV,
                old: None,
                new: short.clone(),
            },
            Message::Delete {
                xid: None,
                rel: INV,
                old: (OldKind::Key, short),
            },
        ];
        for m in msgs {
            let e = push_err(&mut a, m);
            assert!(matches!(
                e.kind,
                AssembleErrorKind::ColumnCountMismatch {
                    got: 1,
                    expected: 2,
                    ..
                }
            ));
            let s = e.to_string();
            assert!(s.contains("public.inventory") && s.contains("1/10"), "{s}");
        }
    }

    #[test]
    fn logical_messages() {
        let mut a = ready();
        let m = |transactional| Message::LogicalMessage {
            xid: None,
            transactional,
            lsn: 0x55,
            prefix: Bytes::from_static(b"skusync"),
            content: Bytes::from_static(b"hi"),
        };
        assert_eq!(
            push_ok(&mut a, m(false)),
            Some(Event::Message {
                transactional: false,
                lsn: Lsn(0x55),
                prefix: "skusync".into(),
                content: Bytes::from_static(b"hi")
            })
        );
        let e = push_err(&mut a, m(true));
        assert!(matches!(
            e.kind,
            AssembleErrorKind::OutsideTransaction { .. }
        ));
        push_ok(&mut a, begin(10, 1));
        assert!(matches!(
            push_ok(&mut a, m(true)),
            Some(Event::Message {
                transactional: true,
                ..
            })
        ));
        // Messages are not changes.
        let Some(Event::Commit(c)) = push_ok(&mut a, commit(10, 11)) else {
            panic!()
        };
        assert_eq!(c.changes, 0);
    }

    #[test]
    fn streaming_and_two_phase_are_refused() {
        let g = || Bytes::from_static(b"gid");
        let msgs = [
            Message::StreamStart {
                xid: 1,
                first_segment: true,
            },
            Message::StreamStop,
            Message::StreamCommit {
                xid: 1,
                flags: 0,
                commit_lsn: 1,
                end_lsn: 2,
                commit_ts: 0,
            },
            Message::StreamAbort {
                xid: 1,
                subxid: 1,
                abort: None,
            },
            Message::BeginPrepare {
                prepare_lsn: 1,
                end_lsn: 2,
                prepare_ts: 0,
                xid: 1,
                gid: g(),
            },
            Message::Prepare {
                flags: 0,
                prepare_lsn: 1,
                end_lsn: 2,
                prepare_ts: 0,
                xid: 1,
                gid: g(),
            },
            Message::CommitPrepared {
                flags: 0,
                commit_lsn: 1,
                end_lsn: 2,
                commit_ts: 0,
                xid: 1,
                gid: g(),
            },
            Message::RollbackPrepared {
                flags: 0,
                prepare_end_lsn: 1,
                rollback_end_lsn: 2,
                prepare_ts: 0,
                rollback_ts: 0,
                xid: 1,
                gid: g(),
            },
            Message::StreamPrepare {
                flags: 0,
                prepare_lsn: 1,
                end_lsn: 2,
                prepare_ts: 0,
                xid: 1,
                gid: g(),
            },
        ];
        for m in msgs {
            let s = push_err(&mut ready(), m).to_string();
            assert!(
                s.contains("which skusync did not request")
                    && (s.contains("streamed") || s.contains("two-phase")),
                "{s}"
            );
        }
    }

    #[test]
    fn reset_clears_cache_and_open_transaction() {
        let mut a = ready();
        push_ok(&mut a, begin(10, 1));
        a.reset();
        assert!(!a.in_transaction());
        assert_eq!(a.relations().len(), 0);
        push_ok(&mut a, begin(20, 2));
        let e = push_err(&mut a, insert(INV, row("A", 1)));
        assert_eq!(e.kind, AssembleErrorKind::UnknownRelation { oid: INV });
    }

    #[test]
    fn change_json() {
        let mut a = Assembler::new();
        push_ok(&mut a, rel(INV, "inventory", 4));
        push_ok(&mut a, begin(0x16B3748, 1));
        let upd = Message::Update {
            xid: None,
            rel: INV,
            old: Some((
                OldKind::Key,
                vec![txt("A1"), Datum::Null, Datum::Null, Datum::Null],
            )),
            new: vec![txt("A2"), txt("3"), txt("1.50"), Datum::UnchangedToast],
        };
        let Some(Event::Change(c)) = push_ok(&mut a, upd) else {
            panic!()
        };
        assert_eq!(
            c.to_json().unwrap(),
            serde_json::json!({
                "op": "update", "relation": "public.inventory", "seq": 0,
                "commit_lsn": "0/16B3748",
                "new": {"sku": "A2", "qty": 3, "price": "1.50"},
                "old": {"sku": "A1", "qty": null, "price": null, "notes": null},
                "old_kind": "key",
                "unchanged_toast": {"new": ["notes"], "old": []},
            })
        );
        let ins = insert(INV, vec![txt("A"), txt("x"), Datum::Null, Datum::Null]);
        let Some(Event::Change(c)) = push_ok(&mut a, ins) else {
            panic!()
        };
        let e = c.to_json().unwrap_err().to_string();
        assert!(e.contains("int4") && !e.contains("\"x\""), "{e}");
    }

    #[test]
    fn huge_transaction_streams_with_bounded_state() {
        let mut a = ready();
        push_ok(&mut a, begin(0x9000_0000, 42));
        let before = std::mem::size_of_val(&a);
        for i in 0..100_000u64 {
            match push_ok(&mut a, insert(INV, row("S", i as i64))) {
                // Drop each event right away, as a streaming consumer would.
                Some(Event::Change(c)) => assert_eq!(c.seq, i),
                e => panic!("{e:?}"),
            }
            // The only per-transaction state is the header in `open`.
            assert_eq!(a.open.map(|o| o.changes), Some(i + 1));
        }
        assert_eq!(a.relations().len(), 1);
        assert_eq!(std::mem::size_of_val(&a), before);
        let Some(Event::Commit(c)) = push_ok(&mut a, commit(0x9000_0000, 0x9000_0100)) else {
            panic!()
        };
        assert_eq!(c.changes, 100_000);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Relation(u32),
        Insert(u32),
        Update(u32, bool),
        Delete(u32),
        Truncate(Vec<u32>),
        Message,
    }

    fn step() -> impl Strategy<Value = Step> {
        let oid = 1u32..4;
        prop_oneof![
            oid.clone().prop_map(Step::Relation),
            oid.clone().prop_map(Step::Insert),
            (oid.clone(), any::<bool>()).prop_map(|(o, k)| Step::Update(o, k)),
            oid.clone().prop_map(Step::Delete),
            proptest::collection::vec(oid, 0..3).prop_map(Step::Truncate),
            Just(Step::Message),
        ]
    }

    fn any_tuple() -> impl Strategy<Value = Tuple> {
        proptest::collection::vec(
            prop_oneof![
                Just(Datum::Null),
                Just(Datum::UnchangedToast),
                proptest::collection::vec(any::<u8>(), 0..6)
                    .prop_map(|b| Datum::Text(Bytes::from(b))),
                Just(txt("12")),
                Just(Datum::Binary(Bytes::from_static(b"\x00"))),
            ],
            0..4,
        )
    }

    fn any_message() -> impl Strategy<Value = Message> {
        let oid = 1u32..4;
        let lsn = 0u64..4;
        prop_oneof![
            (oid.clone(), 0usize..5).prop_map(|(o, n)| rel(o, "t", n.min(4))),
            (lsn.clone(), any::<u32>()).prop_map(|(l, x)| begin(l, x % 3)),
            (lsn.clone(), lsn.clone()).prop_map(|(c, e)| commit(c, e)),
            (oid.clone(), any_tuple()).prop_map(|(o, t)| insert(o, t)),
            (oid.clone(), proptest::option::of(any_tuple()), any_tuple()).prop_map(
                |(o, old, new)| {
                    Message::Update {
                        xid: None,
                        rel: o,
                        old: old.map(|t| (OldKind::Key, t)),
                        new,
                    }
                }
            ),
            (oid.clone(), any_tuple()).prop_map(|(o, t)| Message::Delete {
                xid: None,
                rel: o,
                old: (OldKind::Full, t)
            }),
            (proptest::collection::vec(oid, 0..3), any::<u8>()).prop_map(|(rels, options)| {
                Message::Truncate {
                    xid: None,
                    options,
                    rels,
                }
            }),
            any::<bool>().prop_map(|t| Message::LogicalMessage {
                xid: None,
                transactional: t,
                lsn: 1,
                prefix: Bytes::from_static(b"\xff"),
                content: Bytes::new()
            }),
            Just(Message::StreamStop),
        ]
    }

    proptest! {
        #[test]
        fn random_valid_streams(txns in proptest::collection::vec(proptest::collection::vec(step(), 0..30), 0..15)) {
            let mut a = Assembler::new();
            // Describe every relation up front; Relation steps re-send them mid-stream.
            for oid in 1..4 {
                prop_assert!(matches!(a.push(rel(oid, "t", 2), Lsn(0)).unwrap(), Some(Event::Relation(_))));
            }
            let mut lsn = 0x1000u64;
            for (xid, steps) in txns.iter().enumerate() {
                let xid = xid as u32;
                let final_lsn = lsn + 0x100;
                let Some(Event::Begin(b)) = a.push(begin(final_lsn, xid), Lsn(lsn)).unwrap() else {
                    panic!("no Begin")
                };
                prop_assert_eq!((b.xid, b.commit_lsn), (xid, Lsn(final_lsn)));
                let mut expect_seq = 0u64;
                for s in steps {
                    let m = match s {
                        Step::Relation(o) => rel(*o, "t", 2),
                        Step::Insert(o) => insert(*o, row("a", 1)),
                        Step::Update(o, k) => Message::Update {
                            xid: None,
                            rel: *o,
                            old: k.then(|| (OldKind::Key, vec![txt("a"), Datum::Null])),
                            new: row("b", 2),
                        },
                        Step::Delete(o) => Message::Delete { xid: None, rel: *o, old: (OldKind::Full, row("a", 1)) },
                        Step::Truncate(o) => Message::Truncate { xid: None, options: 1, rels: o.clone() },
                        Step::Message => Message::LogicalMessage {
                            xid: None, transactional: true, lsn, prefix: Bytes::new(), content: Bytes::new(),
                        },
                    };
                    match a.push(m, Lsn(lsn)).unwrap() {
                        Some(Event::Change(c)) => {
                            prop_assert_eq!(c.seq, expect_seq);
                            prop_assert_eq!(c.commit_lsn, Lsn(final_lsn));
                            expect_seq += 1;
                        }
                        Some(Event::Truncate(t)) => {
                            prop_assert_eq!(t.seq, expect_seq);
                            prop_assert_eq!(t.commit_lsn, Lsn(final_lsn));
                            expect_seq += 1;
                        }
                        Some(Event::Relation(_)) | Some(Event::Message { .. }) => {}
                        e => panic!("unexpected {e:?}"),
                    }
                    prop_assert!(a.in_transaction());
                }
                let Some(Event::Commit(c)) = a.push(commit(final_lsn, final_lsn + 8), Lsn(final_lsn)).unwrap() else {
                    panic!("no Commit")
                };
                prop_assert_eq!(c.xid, xid);
                prop_assert_eq!(c.commit_lsn, Lsn(final_lsn));
                prop_assert_eq!(c.end_lsn, Lsn(final_lsn + 8));
                prop_assert_eq!(c.changes, expect_seq);
                prop_assert!(!a.in_transaction());
                lsn = final_lsn + 0x10;
            }
            prop_assert_eq!(a.relations().len(), 3);
        }

        /// Arbitrary (mostly invalid) message sequences: errors, never panics, and an error
        /// leaves the transaction state as it was.
        #[test]
        fn arbitrary_streams_never_panic(msgs in proptest::collection::vec(any_message(), 0..60)) {
            let mut a = Assembler::new();
            for (i, m) in msgs.into_iter().enumerate() {
                let before = a.open;
                match a.push(m, Lsn(i as u64)) {
                    Ok(Some(Event::Change(c))) => {
                        let _ = c.to_json();
                        let _ = c.new_value(0);
                        let _ = c.old_value(5);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        prop_assert_eq!(a.open, before);
                        let _ = e.to_string();
                    }
                }
            }
        }
    }
}
