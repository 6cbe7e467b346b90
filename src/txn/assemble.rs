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
#[derive(Clone, Debug, PartialEq)]
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
#[derive(Clone, Debug, PartialEq)]
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
#[derive(Clone, Debug, PartialEq)]
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
}

impl Assembler {
    /// An assembler with an empty relation cache and no open transaction.
    pub fn new() -> Self {
        Self::default()
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
                let desc = RelationDesc::from_message(&r)
                    .map_err(|e| err(Some(format!("oid {}", r.oid)), e.into()))?;
                let desc = Arc::new(desc);
                self.relations.insert(Arc::clone(&desc));
                Ok(Some(Event::Relation(desc)))
            }
            Message::Insert { rel, new, .. } => {
                let (rel, seq, commit_lsn) = self.change_target(rel, "insert", lsn)?;
                check_len(&rel, &new, "new", lsn)?;
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
            Message::Update { rel, old, new, .. } => {
                let (rel, seq, commit_lsn) = self.change_target(rel, "update", lsn)?;
                if let Some((_, o)) = &old {
                    check_len(&rel, o, "old", lsn)?;
                }
                check_len(&rel, &new, "new", lsn)?;
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
            Message::Delete { rel, old, .. } => {
                let (rel, seq, commit_lsn) = self.change_target(rel, "delete", lsn)?;
                check_len(&rel, &old.1, "old", lsn)?;
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
        let rel = self.relations.get(oid).cloned().ok_or(AssembleError {
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
