//! The fold: one transaction's changes -> per-SKU deltas, pure and sans-IO.
//!
//! Stock rows carry absolute values, so the fold does not compute stock deltas itself:
//! it records, per SKU, the final state of each stock row the transaction touched
//! (keyed by table and replica-identity key), and the apply step derives deltas from
//! the contribution Redis holds for that row. Activity rows are counted.
//!
//! A transaction is cut into *pieces* at deterministic points (every
//! `max_changes_per_piece` changes from its Begin, and around a TRUNCATE), so memory is
//! bounded by the distinct SKUs and rows of one piece, and a replay after a crash cuts
//! the same pieces: the apply step fences on (commit LSN, piece number).

pub mod batch;
mod cache;
mod lookup;
pub mod mapping;
pub mod model;
pub mod vecmap;

pub use lookup::Need;
pub use mapping::{Mapping, Rule, SchemaError};

use crate::lsn::Lsn;
use crate::pgoutput::{Datum, OldKind, Tuple};
use crate::sinks::layout;
use crate::txn::{
    Change, Op, RelationDesc, Truncate, TxnBegin, TxnCommit, pg_timestamp_to_unix_micros,
};
use hmac::{Hmac, KeyInit, Mac};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use vecmap::VecMap;

/// Why a change was not folded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    /// A schema problem that stops the stream.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// Index or lookup state the change needs is not known yet: nothing was folded. Read
    /// what [`Fold::needs`] asks for (for it and the changes after it, in one round trip)
    /// and fold it again.
    #[error("internal: the index state this change needs was not read")]
    Unread,
}

/// A field value in a row update: unchanged-TOAST values keep what Redis holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Field<T> {
    #[default]
    Keep,
    Val(T),
}

impl<T: Clone> Field<T> {
    /// The new value, or for `Keep` what the row held before (`old`).
    pub fn or(&self, old: T) -> T {
        match self {
            Field::Val(v) => v.clone(),
            Field::Keep => old,
        }
    }
}

/// The final state of one stock row within a piece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowOp {
    /// The row exists with these values (location `""` when not mapped).
    Set {
        location: Field<String>,
        on_hand: Field<i64>,
        reserved: Field<i64>,
        threshold: Field<Option<i64>>,
    },
    /// The row is gone (deleted, or moved to another SKU or key).
    Del,
}

impl RowOp {
    /// This op merged over `prev`, what the same row had earlier (in the same piece, or in
    /// an earlier piece of the same entry): `Keep` inherits `prev`'s value, or after a
    /// delete what a fresh row holds (nothing of the deleted row is left to keep, as when
    /// the delete was applied on its own). The threshold belongs to the SKU, not the
    /// row: after a delete a kept one stays kept.
    pub(crate) fn after(self, prev: RowOp) -> RowOp {
        let RowOp::Set {
            location,
            on_hand,
            reserved,
            threshold,
        } = self
        else {
            return RowOp::Del;
        };
        // after a delete: what a fresh row holds, and the SKU's threshold as it was
        let (l0, o0, r0, t0) = match prev {
            RowOp::Set {
                location,
                on_hand,
                reserved,
                threshold,
            } => (location, on_hand, reserved, threshold),
            RowOp::Del => (
                Field::Val(String::new()),
                Field::Val(0),
                Field::Val(0),
                Field::Keep,
            ),
        };
        RowOp::Set {
            location: keep_or(location, l0),
            on_hand: keep_or(on_hand, o0),
            reserved: keep_or(reserved, r0),
            threshold: keep_or(threshold, t0),
        }
    }
}

/// Everything one piece does to one SKU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SkuDelta {
    /// Row field name (`r:<table>:<key>`) -> final state in this piece.
    pub rows: BTreeMap<String, RowOp>,
    /// Lifetime counter increments.
    pub counters: VecMap<Name, i64>,
    /// (counter, minute) -> increment of that window bucket.
    pub buckets: VecMap<(Name, i64), i64>,
    /// (counter, minute) -> HMAC'd user ids seen (sorted, no duplicates).
    pub users: VecMap<(Name, i64), Vec<UserId>>,
    /// The SKU's threshold as the piece leaves it: the one its last stock change that
    /// wrote one wrote (in change order; `Keep`: none did). `rows` hold each row's final
    /// state in key order and drop a row's write when the piece then deletes the row, so
    /// the threshold travels here, the same whichever way a transaction is cut.
    pub threshold: Field<Option<i64>>,
}

/// A counter's name as entries hold it: shared with the mapping, so counting a row
/// copies a pointer rather than allocating the name (three times with windows and
/// users) and freeing it again when the batch merges the piece.
pub type Name = Arc<str>;

/// A user as counted: the first 128 bits of the HMAC-SHA256 of its id (plenty for
/// HyperLogLog), written to Redis as 32 hex digits. Kept as bytes, not hex text: a batch
/// holds one per distinct (SKU, minute, user), and the text took four times the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId(pub [u8; 16]);

impl UserId {
    /// The 32 lowercase hex digits Redis' HyperLogLogs count.
    pub fn hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::encode_to_slice(self.0, &mut out).expect("32 digits for 16 bytes");
        out
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.hex();
        f.write_str(std::str::from_utf8(&h).expect("hex is ASCII"))
    }
}

impl SkuDelta {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.counters.is_empty()
            && self.buckets.is_empty()
            && self.users.is_empty()
    }

    /// Record a change of a stock row: merged over what the piece did to the row before
    /// ([`RowOp::after`]); a threshold it writes becomes the piece's.
    pub(crate) fn put_row(&mut self, field: String, op: RowOp) {
        if let RowOp::Set {
            threshold: t @ Field::Val(_),
            ..
        } = &op
        {
            self.threshold = t.clone();
        }
        let merged = match self.rows.remove(&field) {
            Some(prev) => op.after(prev),
            None => op,
        };
        self.rows.insert(field, merged);
    }
}

/// A unit of work for the apply step, fenced by (commit LSN, piece).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub commit_lsn: Lsn,
    pub piece: u32,
    /// Commit time, unix milliseconds.
    pub commit_ms: i64,
    /// Tables truncated at the start of this piece (stock tables only).
    pub truncate: Vec<String>,
    pub skus: BTreeMap<String, SkuDelta>,
    /// The transaction's final piece: low-stock alerts are evaluated here, once per
    /// transaction, for every SKU in `eval`.
    pub last: bool,
    /// SKUs whose stock the transaction changed (final piece only).
    pub eval: Vec<String>,
    /// Row index updates of indexed stock tables (row field -> the SKU now holding the
    /// row, `None`: no SKU), final per row. Written after the piece's SKU entries.
    pub ri: BTreeMap<String, Option<String>>,
    /// Fields of `ri` whose change in this piece only moved quantities of a row that
    /// stays where it counts: Redis' index need not be written for them (its holder's SKU
    /// hash has the values, which a read of the record takes from there).
    pub ri_local: BTreeSet<String>,
}

impl Piece {
    /// Whether applying it would change nothing.
    pub fn is_empty(&self) -> bool {
        self.truncate.is_empty()
            && self.skus.is_empty()
            && self.eval.is_empty()
            && self.ri.is_empty()
    }
}

/// A value that could not be used; skipped, never fatal. Names table, column and LSN but
/// never the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub table: String,
    pub column: String,
    pub lsn: Lsn,
    pub reason: String,
}

/// The skip reason of a SKU longer than `max_sku_bytes`.
pub const SKU_TOO_LONG: &str = "SKU longer than max_sku_bytes";

/// Most entries of the fold's cache of applied index state (about 150 bytes each).
pub const CACHE_ENTRIES: usize = 40_000;

/// How far an activity row's event time may be after its commit (clock skew between
/// the application and the database); later times count at the commit time.
pub const MAX_EVENT_LEAD_MS: i64 = 5 * 60_000;

/// How Redis knows a mapped stock table's rows: the table's OID and its replica-identity
/// key columns (row fields are named by their values). Redis built under one identity
/// cannot follow changes under another: a table swapped in by rename, dropped and created
/// again, or re-keyed (a column added to a REPLICA IDENTITY FULL table, a key column
/// retyped, a new primary key) would leave the old rows' contributions behind, counted
/// twice beside the new ones. Activity tables have no identity: they are counted on
/// insert and followed by name (rotating them by rename is routine).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableIdentity {
    pub oid: u32,
    /// REPLICA IDENTITY FULL (rows named by a hash of all their values).
    pub full: bool,
    /// Key columns in tuple order: name, type OID and type modifier (a type decides the
    /// text form of a value, and so the row's field name).
    pub key: Vec<(String, u32, i32)>,
}

/// Mapped stock tables by configured name (`schema.table`), as Redis was built from them.
pub type TableIdentities = BTreeMap<String, TableIdentity>;

/// Why a relation announcement could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelationProblem {
    /// The mapping does not fit the relation (definite: the operator must act).
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// A mapped table is no longer the one Redis was built from: rebuild Redis from a
    /// fresh snapshot.
    #[error("{0}")]
    Changed(String),
}

/// Counts for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoldStats {
    pub rows: u64,
    pub unmapped_changes: u64,
    pub unknown_kinds: u64,
    pub ignored_activity_changes: u64,
    pub skipped_values: u64,
    /// Rows that failed their table's `where` filter.
    pub filtered_rows: u64,
    /// Stock rows placed nowhere because a lookup did not resolve (a missing or
    /// filtered-out referenced row, a NULL reference), and activity rows not counted for
    /// that reason.
    pub unresolved_rows: u64,
    /// Changes of referenced rows that changed what they resolve to.
    pub lookup_changes: u64,
}

/// The fold state machine.
pub struct Fold {
    mapping: Arc<Mapping>,
    rules: HashMap<u32, Arc<Rule>>,
    max_changes: u64,
    cur: Option<Piece>,
    /// Changes folded into the current piece.
    in_piece: u64,
    /// SKUs whose stock this transaction changed, for alert evaluation at commit.
    touched: std::collections::BTreeSet<String>,
    pub stats: FoldStats,
    skipped: Vec<Skipped>,
    /// Identities of the mapped stock tables (expected from Redis' meta, or learned from
    /// the first announcement); kept across [`Fold::reset`].
    tables: TableIdentities,
    /// Partition OID -> the mapped (partitioned) table it belongs to, from the catalog.
    partitions: HashMap<u32, String>,
    /// Rows of indexed stock tables (surrogate keys): row field -> the SKU holding it
    /// (`None`: none), as Redis' row index will say once what was folded is applied, with
    /// the generation that wrote it. Read from Redis by the caller ([`Fold::unresolved`],
    /// [`Fold::know_holder`]), kept while batches that change them are in flight, then
    /// forgotten ([`Fold::forget`]): memory follows the rows of the pending batches.
    holders: HashMap<String, Holder, foldhash::fast::RandomState>,
    /// Index state that batches already applied wrote or that was read (row holders and
    /// records, lookup values), kept after it left `holders` so hot rows and variants are
    /// not read again every batch: Redis holds the same, as this fold is its only writer
    /// (a rebuild or a lost Redis starts a new fold). Bounded by [`CACHE_ENTRIES`].
    cache: cache::StateCache,
    /// A reused buffer for state field names (lookups run several times per row).
    scratch: std::cell::RefCell<String>,
    /// Stock tables that are also referenced tables: their lookup rule (`None`: not one).
    also: HashMap<u32, Option<Arc<mapping::LookupRule>>>,
    /// Referenced rows whose dependents were read from Redis (into `holders`), with the
    /// generation of that read: forgotten with it.
    deps_known: HashMap<(usize, String), u64>,
    generation: u64,
}

/// What the fold knows of an indexed row's holder.
#[derive(Debug)]
struct Holder {
    sku: Option<String>,
    /// The batch generation that will write it to Redis ([`Fold::seal`]); `u64::MAX`
    /// while the piece that wrote it is still being folded (never forgotten then).
    generation: u64,
    /// The piece that wrote it (`None`: read from Redis).
    writer: Option<(Lsn, u32)>,
    /// While unstamped: what it replaced (holder and generation), restored when the
    /// transaction being folded is dropped.
    prev: Option<(Option<String>, u64)>,
}

impl Fold {
    /// A fold that cuts pieces every `max_changes` changes.
    pub fn new(mapping: Arc<Mapping>, max_changes: u64) -> Fold {
        Fold {
            mapping,
            rules: HashMap::new(),
            max_changes: max_changes.max(1),
            cur: None,
            in_piece: 0,
            touched: Default::default(),
            stats: FoldStats::default(),
            skipped: Vec::new(),
            tables: TableIdentities::new(),
            partitions: HashMap::new(),
            holders: HashMap::default(),
            deps_known: HashMap::new(),
            cache: cache::StateCache::new(CACHE_ENTRIES),
            scratch: Default::default(),
            also: HashMap::new(),
            generation: 1,
        }
    }

    /// The lookup rule of a stock table that is also a referenced table.
    fn also_of(&mut self, rel: &RelationDesc) -> Option<Arc<mapping::LookupRule>> {
        if let Some(r) = self.also.get(&rel.oid) {
            return r.clone();
        }
        let r = self
            .mapping
            .lookup_rule(rel, &rel.qualified_name())
            .ok()
            .flatten()
            .map(Arc::new);
        self.also.insert(rel.oid, r.clone());
        r
    }

    /// What the fold knows of an index field: in flight, or applied and cached (`None`:
    /// unknown, read it from Redis).
    fn held(&self, field: &str) -> Option<Option<&str>> {
        match self.holders.get(field) {
            Some(h) => Some(h.sku.as_deref()),
            None => self.cache.get(field).map(Option::as_deref),
        }
    }

    /// Whether the fold knows no index state yet (a new fold, nothing folded or read).
    pub fn is_cold(&self) -> bool {
        self.holders.is_empty() && self.cache.len() == 0
    }

    /// Index state read ahead from Redis while nothing is applied: cached as applied
    /// (ignored when the fold already holds the field).
    pub fn warm(&mut self, field: String, value: Option<String>) {
        if !self.holders.contains_key(&field) {
            self.cache.insert(field, value);
        }
    }

    /// The rule of a change's relation (resolved and kept on first use); `None` when it
    /// cannot be resolved (the change itself reports why).
    fn rule_of(&mut self, c: &Change) -> Option<Arc<Rule>> {
        Some(match self.rules.get(&c.rel.oid) {
            Some(r) => r.clone(),
            None => {
                let r = Arc::new(self.resolve(&c.rel).ok()?);
                self.rules.insert(c.rel.oid, r.clone());
                r
            }
        })
    }

    /// What Redis' row index holds for a row (read after [`Fold::needs`]); ignored
    /// when the fold already knows newer (a change folded but not yet applied).
    pub fn know_holder(&mut self, field: String, sku: Option<String>) {
        let generation = self.generation;
        self.holders.entry(field).or_insert(Holder {
            sku,
            generation,
            writer: None,
            prev: None,
        });
    }

    /// A piece leaves the fold for the next batch: the holders it wrote (and no later
    /// piece rewrote) are written to Redis with that batch, so they can be forgotten
    /// once it is applied.
    fn hand_over(&mut self, p: &Piece) {
        let id = (p.commit_lsn, p.piece);
        for f in p.ri.keys() {
            if let Some(h) = self.holders.get_mut(f)
                && h.writer == Some(id)
            {
                h.generation = self.generation;
                h.prev = None;
            }
        }
    }

    /// Close the current generation of holder knowledge (a batch is launched); returns
    /// it, for [`Fold::forget`] once that batch's row index writes are done.
    pub fn seal(&mut self) -> u64 {
        let g = self.generation;
        self.generation += 1;
        g
    }

    /// Forget holders written in generations up to `upto`: Redis' row index has them.
    pub fn forget(&mut self, upto: u64) {
        // A dependents list read while an earlier batch was in flight lacks that batch's
        // writes, which the overlay supplied until now: read it again when needed.
        let mut stale: Vec<(usize, String)> = Vec::new();
        let cache = &mut self.cache;
        self.holders.retain(|f, h| {
            let keep = h.generation > upto;
            if !keep {
                if let Some((hop, r)) = layout::dep_field_parts(f) {
                    stale.push((hop, r.to_string()));
                } else {
                    cache.insert(f.clone(), h.sku.take());
                }
            }
            keep
        });
        self.deps_known.retain(|_, g| *g > upto);
        for k in stale {
            self.deps_known.remove(&k);
        }
    }

    fn set_holder(&mut self, field: String, sku: Option<String>) {
        self.put_holder(field, sku, false);
    }

    /// Record index state; `local`: only quantities of a row that stays where it counts
    /// changed (see [`Piece::ri_local`]).
    fn put_holder(&mut self, field: String, sku: Option<String>, local: bool) {
        let writer = self.cur.as_mut().map(|cur| {
            // local only while every change of the field in this piece is
            let was_written = cur.ri.contains_key(&field) && !cur.ri_local.contains(&field);
            if local && !was_written {
                cur.ri_local.insert(field.clone());
            } else {
                cur.ri_local.remove(&field);
            }
            cur.ri.insert(field.clone(), sku.clone());
            (cur.commit_lsn, cur.piece)
        });
        let prev = match self.holders.get(&field) {
            Some(h) if h.generation == u64::MAX => h.prev.clone(),
            Some(h) => Some((h.sku.clone(), h.generation)),
            None => None,
        };
        self.holders.insert(
            field,
            Holder {
                sku,
                generation: u64::MAX,
                writer,
                prev,
            },
        );
    }

    /// The partitions of the mapped tables (OID -> mapped parent), read from the catalog.
    /// Changes the stream names by a partition are folded as the parent's.
    pub fn set_partitions<'a>(&mut self, parents: impl IntoIterator<Item = (u32, &'a str)>) {
        self.partitions = parents
            .into_iter()
            .map(|(oid, p)| (oid, p.to_string()))
            .collect();
        // Rules resolved before may have taken a new partition for unmapped.
        self.rules.clear();
        self.also.clear();
    }

    /// One more partition, found after the trees were read (attached since).
    pub fn add_partition(&mut self, oid: u32, parent: &str) {
        self.partitions.insert(oid, parent.to_string());
        self.rules.remove(&oid);
        self.also.remove(&oid);
    }

    /// Whether the relation is mapped by name or is a known partition of a mapped table;
    /// otherwise the catalog may know it as a partition attached since the trees were read.
    pub fn knows(&self, rel: &RelationDesc) -> bool {
        self.partitions.contains_key(&rel.oid) || {
            let name = rel.qualified_name();
            self.mapping.tables().any(|t| t == name)
        }
    }

    /// The mapped parent of a partition, if the relation is one.
    pub fn parent_of(&self, oid: u32) -> Option<&str> {
        self.partitions.get(&oid).map(String::as_str)
    }

    /// Resolve a relation: by its own name, or as the mapped table it is a partition of.
    fn resolve(&self, rel: &RelationDesc) -> Result<Rule, SchemaError> {
        let name = rel.qualified_name();
        let parent = match self.partitions.get(&rel.oid) {
            Some(parent) if !self.mapping.tables().any(|t| t == name) => parent,
            _ => return self.mapping.resolve(rel),
        };
        let mut rule = self.mapping.resolve_as(rel, parent.clone())?;
        if let Rule::Inventory(r) = &mut rule {
            // A partition is guarded by the catalog's partition fingerprint, not by OID;
            // but its rows must be named as the parent's are (the same key columns, in the
            // parent's order: a partition's columns may be in another), or a row would be
            // stored under one name by the snapshot and looked for under another here.
            if let Some(t) = self.tables.get(parent) {
                let key: Vec<&str> = r
                    .key
                    .iter()
                    .filter_map(|&i| rel.columns.get(i))
                    .map(|c| c.name.as_str())
                    .collect();
                let mut mine = key.clone();
                mine.sort_unstable();
                let mut want: Vec<&str> = t.key.iter().map(|k| k.0.as_str()).collect();
                let ordered: Option<Vec<usize>> =
                    want.iter().map(|n| rel.column_index(n)).collect();
                want.sort_unstable();
                match ordered {
                    Some(ordered) if t.full == r.full && mine == want => r.key = ordered,
                    _ => {
                        return Err(SchemaError(format!(
                            "partition {name} of stock table {parent} has another replica identity than \
                             {parent} ({} against {}), so its rows cannot be matched with the snapshot's; give \
                             it the same: ALTER TABLE {} REPLICA IDENTITY {};",
                            if r.full {
                                "FULL".to_string()
                            } else {
                                format!("key {key:?}")
                            },
                            if t.full {
                                "FULL".to_string()
                            } else {
                                format!("key {want:?}")
                            },
                            crate::pg::ident::quote_table(&name),
                            if t.full {
                                "FULL"
                            } else {
                                "DEFAULT  -- or USING INDEX on the same columns"
                            }
                        )));
                    }
                }
            }
        }
        Ok(rule)
    }

    /// The identities Redis was built from (its meta hash); tables not listed are learned
    /// from their first announcement. Only stock tables are kept.
    pub fn expect_tables(&mut self, tables: TableIdentities) {
        let stock: BTreeSet<&str> = self
            .mapping
            .inventory
            .iter()
            .map(|m| m.table.as_str())
            .collect();
        self.tables = tables
            .into_iter()
            .filter(|(name, _)| stock.contains(name.as_str()))
            .collect();
    }

    /// The identities of the mapped stock tables announced so far (or expected).
    pub fn tables(&self) -> &TableIdentities {
        &self.tables
    }

    /// A relation was (re)announced: resolve it now so schema problems stop the stream
    /// before any change of it is applied, and a stock table that is no longer the one
    /// Redis was built from is noticed before any of its changes is folded.
    pub fn relation(&mut self, rel: &RelationDesc) -> Result<(), RelationProblem> {
        let rule = self.resolve(rel)?;
        let name = rel.qualified_name();
        if self.partitions.contains_key(&rel.oid) {
            self.rules.insert(rel.oid, Arc::new(rule));
            return Ok(());
        }
        match &rule {
            Rule::Unmapped => {
                if let Some((was, _)) = self.tables.iter().find(|(_, t)| t.oid == rel.oid) {
                    return Err(RelationProblem::Changed(format!(
                        "mapped table {was} (oid {}) is now named {name}: it was renamed or moved to another schema",
                        rel.oid
                    )));
                }
            }
            Rule::Inventory(r) => {
                let id = TableIdentity {
                    oid: rel.oid,
                    full: r.full,
                    key: r
                        .key
                        .iter()
                        .filter_map(|&i| rel.columns.get(i))
                        .map(|c| (c.name.clone(), c.type_oid, c.type_modifier))
                        .collect(),
                };
                match self.tables.get(&name) {
                    None => {
                        self.tables.insert(name, id);
                    }
                    Some(t) if t.oid != id.oid => {
                        return Err(RelationProblem::Changed(format!(
                            "mapped table {name} is another table now (oid {} became {}): it was dropped and \
                             created again, or another table took its name",
                            t.oid, id.oid
                        )));
                    }
                    Some(t) if t.full != id.full || t.key != id.key => {
                        let cols = |t: &TableIdentity| {
                            let names: Vec<&str> = t.key.iter().map(|k| k.0.as_str()).collect();
                            format!("{}{names:?}", if t.full { "FULL " } else { "" })
                        };
                        return Err(RelationProblem::Changed(format!(
                            "the replica identity of mapped table {name} changed (key columns {} became {}, or \
                             their types), so rows stored under the old one cannot be matched",
                            cols(t),
                            cols(&id)
                        )));
                    }
                    Some(_) => {}
                }
            }
            Rule::Activity(_) | Rule::Lookup(_) => {}
        }
        if matches!(rule, Rule::Inventory(_)) {
            let also = self
                .mapping
                .lookup_rule(rel, &rel.qualified_name())?
                .map(Arc::new);
            self.also.insert(rel.oid, also);
        }
        self.rules.insert(rel.oid, Arc::new(rule));
        Ok(())
    }

    /// Forget resolved relations (new replication session).
    pub fn reset(&mut self) {
        self.rules.clear();
        self.also.clear();
        // The transaction being folded is dropped (it is sent again): so is what it wrote.
        self.holders.retain(|_, h| {
            if h.generation != u64::MAX {
                return true;
            }
            match h.prev.take() {
                Some((sku, generation)) => {
                    *h = Holder {
                        sku,
                        generation,
                        writer: None,
                        prev: None,
                    };
                    true
                }
                None => false,
            }
        });
        self.cur = None;
        self.in_piece = 0;
        self.touched.clear();
    }

    /// The commit LSN of the transaction being folded, if any (for error messages).
    pub fn current_commit(&self) -> Option<Lsn> {
        self.cur.as_ref().map(|p| p.commit_lsn)
    }

    /// Values skipped since the last call (for logging and metrics).
    pub fn take_skipped(&mut self) -> Vec<Skipped> {
        std::mem::take(&mut self.skipped)
    }

    /// Start a transaction.
    pub fn begin(&mut self, b: &TxnBegin) {
        let commit_ms = pg_timestamp_to_unix_micros(b.commit_ts).div_euclid(1000);
        self.cur = Some(Piece {
            commit_lsn: b.commit_lsn,
            piece: 0,
            commit_ms,
            truncate: Vec::new(),
            skus: BTreeMap::new(),
            last: false,
            eval: Vec::new(),
            ri: BTreeMap::new(),
            ri_local: BTreeSet::new(),
        });
        self.in_piece = 0;
        self.touched.clear();
    }

    /// Cut the current piece if it is full; returns it.
    fn cut(&mut self) -> Option<Piece> {
        let cur = self.cur.as_mut()?;
        let next = Piece {
            commit_lsn: cur.commit_lsn,
            piece: cur.piece + 1,
            commit_ms: cur.commit_ms,
            truncate: Vec::new(),
            skus: BTreeMap::new(),
            last: false,
            eval: Vec::new(),
            ri: BTreeMap::new(),
            ri_local: BTreeSet::new(),
        };
        self.in_piece = 0;
        let done = std::mem::replace(cur, next);
        self.hand_over(&done);
        Some(done)
    }

    /// Fold one change; returns a finished piece when the cap was reached.
    ///
    /// A change that needs index or lookup state the fold does not know is not folded
    /// ([`FoldError::Unread`]): the caller reads it and folds the change again. Checking
    /// here, not in a pass before, works out the hot path (a stock row of a looked-up
    /// table) once.
    pub fn change(&mut self, c: &Change) -> Result<Option<Piece>, FoldError> {
        // Shared, not cloned: this runs for every row.
        let rule = match self.rules.get(&c.rel.oid) {
            Some(r) => r.clone(),
            None => {
                let r = Arc::new(self.resolve(&c.rel)?);
                self.rules.insert(c.rel.oid, r.clone());
                r
            }
        };
        // Everything read before anything is folded: an unread change leaves no trace.
        let also = match &*rule {
            Rule::Inventory(_) => self.also_of(&c.rel),
            _ => None,
        };
        let plan = match &*rule {
            Rule::Inventory(r) if r.records => Some(self.plan_stock_records(r, c)?),
            _ => None,
        };
        if (also.is_some() || Self::may_need(&rule)) && !self.needs(c).is_empty() {
            return Err(FoldError::Unread);
        }
        let out = if self.in_piece >= self.max_changes {
            self.cut()
        } else {
            None
        };
        self.in_piece += 1;
        self.stats.rows += 1;
        match &*rule {
            Rule::Unmapped => self.stats.unmapped_changes += 1,
            Rule::Inventory(r) if r.records => {
                self.fold_stock_records(r, plan.expect("planned above"))
            }
            Rule::Inventory(r) => self.fold_stock(r, c),
            Rule::Activity(r) => self.fold_activity(r, c),
            Rule::Lookup(l) => self.fold_lookup(l, c),
        }
        if let Some(l) = also {
            self.fold_lookup(&l, c);
        }
        Ok(out)
    }

    /// Whether changes under `rule` (other than a looked-up stock table's, which are
    /// planned) can need index or lookup state.
    fn may_need(rule: &Rule) -> bool {
        match rule {
            Rule::Inventory(r) => r.indexed && !r.records,
            Rule::Activity(r) => matches!(r.sku, mapping::Attr::Lookup { .. }),
            Rule::Lookup(_) => true,
            Rule::Unmapped => false,
        }
    }

    /// A TRUNCATE: stock tables lose all contributions; activity tables are ignored.
    /// The truncate gets a piece of its own (fenced separately from the changes before
    /// and after it), so it returns up to two finished pieces.
    ///
    /// A truncate of a stock table's partition cannot be applied by the row names Redis
    /// holds (they name the parent): it asks for a rebuild ([`RelationProblem::Changed`]).
    pub fn truncate(&mut self, t: &Truncate) -> Result<Vec<Piece>, RelationProblem> {
        let mut tables = Vec::new();
        for rel in &t.rels {
            let rule = self.resolve(rel)?;
            if let Rule::Lookup(l) = &rule {
                // Every dependent would move at once: rebuilt instead.
                return Err(RelationProblem::Changed(format!(
                    "table {} read by lookups was truncated",
                    l.table
                )));
            }
            if let Rule::Inventory(r) = rule {
                if self.partitions.contains_key(&rel.oid) {
                    return Err(RelationProblem::Changed(format!(
                        "partition {} of stock table {} was truncated",
                        rel.qualified_name(),
                        r.table
                    )));
                }
                tables.push(r.table);
            }
        }
        let mut out = Vec::new();
        if tables.is_empty() || self.cur.is_none() {
            return Ok(out);
        }
        // The row index of a truncated table is cleared with it (see the daemon).
        let generation = self.generation;
        for t in &tables {
            let pre = layout::row_field_prefix(t);
            self.cache.retain(|f| !f.starts_with(&pre));
            for (f, h) in self.holders.iter_mut() {
                if f.starts_with(&pre) {
                    // as the cleared index says, and it is cleared before anything after
                    *h = Holder {
                        sku: None,
                        generation,
                        writer: None,
                        prev: None,
                    };
                }
            }
        }
        if self.cur.as_ref().is_some_and(|p| !p.is_empty()) {
            out.extend(self.cut());
        }
        if let Some(cur) = self.cur.as_mut() {
            cur.truncate = tables;
        }
        out.extend(self.cut());
        Ok(out)
    }

    /// End the transaction: the last piece (possibly empty, which still carries the
    /// commit for progress).
    pub fn commit(&mut self, _c: &TxnCommit) -> Option<Piece> {
        self.in_piece = 0;
        let mut p = self.cur.take()?;
        p.last = true;
        p.eval = std::mem::take(&mut self.touched).into_iter().collect();
        self.hand_over(&p);
        Some(p)
    }

    /// A SKU whose stock this transaction changed, for alert evaluation at commit.
    /// Bounded: a bulk load touching more SKUs than this gets alerts for the rest at
    /// their next change.
    fn touch(&mut self, sku: &str) {
        const MAX_TOUCHED: usize = 20_000;
        if self.touched.len() < MAX_TOUCHED && !self.touched.contains(sku) {
            self.touched.insert(sku.to_string());
        }
    }

    fn skip(&mut self, table: &str, column: &str, lsn: Lsn, reason: String) {
        self.stats.skipped_values += 1;
        self.skipped.push(Skipped {
            table: table.to_string(),
            column: column.to_string(),
            lsn,
            reason,
        });
    }

    fn fold_stock(&mut self, r: &mapping::InventoryRule, c: &Change) {
        let lsn = c.commit_lsn;
        let mapping = self.mapping.clone();
        let m = &mapping.inventory[r.index];
        // The row as it was (for deletes and key changes) and as it is.
        let old_tuple = c.old.as_ref().map(|(_, t)| t);
        let old_full = matches!(c.old, Some((OldKind::Full, _)));
        let new_tuple = c.new.as_ref();
        // An indexed row (surrogate key) is named by its key alone; its SKU before the
        // change is the one the row index holds.
        let indexed_before: Option<String> = if r.indexed {
            match old_tuple.or(new_tuple).map(|t| row_key_field(r, t)) {
                Some(Ok(f)) => Some(f),
                Some(Err(col)) => {
                    self.skip(&r.table, &col, lsn, "the row's key was not sent".into());
                    return;
                }
                None => return,
            }
        } else {
            None
        };
        let old_id = match (c.op, old_tuple) {
            _ if r.indexed => {
                let f = indexed_before.clone().expect("indexed");
                let holder = if c.op == Op::Insert {
                    None
                } else {
                    match self.held(&f) {
                        Some(h) => h.map(str::to_string),
                        None => {
                            // The caller reads every holder first (`unresolved`).
                            self.skip(
                                &r.table,
                                &m.sku.label(),
                                lsn,
                                "internal: the row index was not read for this row".into(),
                            );
                            return;
                        }
                    }
                };
                holder.map(|s| (s, f))
            }
            (Op::Insert, _) => None,
            (_, Some(t)) => match row_identity(r, t, &c.rel) {
                Ok(id) => Some(id),
                Err(col) => {
                    self.skip(
                        &r.table,
                        &col,
                        lsn,
                        "the old row's key or SKU was not sent".into(),
                    );
                    return;
                }
            },
            (Op::Delete, None) => {
                self.skip(
                    &r.table,
                    &m.sku.label(),
                    lsn,
                    "delete without an old row".into(),
                );
                return;
            }
            (_, None) => None,
        };
        // With a full old row, unchanged TOAST values of the new row are known.
        let filled: Option<Tuple> = match (new_tuple, old_tuple) {
            (Some(n), Some(o)) if old_full && n.contains(&Datum::UnchangedToast) => Some(
                n.iter()
                    .zip(o.iter())
                    .map(|(nd, od)| {
                        if *nd == Datum::UnchangedToast {
                            od.clone()
                        } else {
                            nd.clone()
                        }
                    })
                    .collect(),
            ),
            _ => None,
        };
        let new_tuple = filled.as_ref().or(new_tuple);
        let new_state = match new_tuple {
            None => None,
            Some(t) => {
                let id = match row_identity(r, t, &c.rel) {
                    Ok(id) => id,
                    Err(col) => {
                        self.skip(
                            &r.table,
                            &col,
                            lsn,
                            "the row's key or SKU was not sent (NULL or unchanged TOAST)".into(),
                        );
                        return;
                    }
                };
                let old_fill = if old_full { old_tuple } else { None };
                let sc = Scale {
                    digits: r.scale,
                    scale: self.mapping.scale,
                };
                let on_hand = match sum(t, old_fill, &r.on_hand, &c.rel, sc) {
                    Ok(v) => v,
                    Err(e) => {
                        self.skip(&r.table, &m.on_hand.label(), lsn, e);
                        return;
                    }
                };
                let reserved = match &r.reserved {
                    None => Field::Val(0),
                    Some(cols) => match sum(t, old_fill, cols, &c.rel, sc) {
                        Ok(v) => v,
                        Err(e) => {
                            let label = m.reserved.as_ref().map(|c| c.label()).unwrap_or_default();
                            self.skip(&r.table, &label, lsn, e);
                            return;
                        }
                    },
                };
                let threshold = match r.low_stock {
                    // a table without thresholds leaves the one another table's rows set
                    None => Field::Keep,
                    Some(i) => match quantity(t, old_fill, i, &c.rel, sc) {
                        Ok(Field::Val(v)) => Field::Val(Some(v)),
                        Ok(Field::Keep) => Field::Keep,
                        // A NULL threshold means "use the default".
                        Err(_) if matches!(t.get(i), Some(Datum::Null)) => Field::Val(None),
                        Err(e) => {
                            self.skip(&r.table, m.low_stock.as_deref().unwrap_or(""), lsn, e);
                            return;
                        }
                    },
                };
                let location = match r.location {
                    None => Field::Val(String::new()),
                    Some(mapping::Attr::Lookup { .. }) => unreachable!("records path"),
                    Some(mapping::Attr::Column(i)) => match text(t.get(i)) {
                        TextOf::Text(s) => Field::Val(s.to_string()),
                        TextOf::Null => Field::Val(String::new()),
                        TextOf::Unchanged => Field::Keep,
                        TextOf::Bad => {
                            self.skip(
                                &r.table,
                                &m.location.as_ref().map(|l| l.label()).unwrap_or_default(),
                                lsn,
                                "location is not UTF-8 text".into(),
                            );
                            return;
                        }
                    },
                };
                Some((
                    id,
                    RowOp::Set {
                        location,
                        on_hand,
                        reserved,
                        threshold,
                    },
                ))
            }
        };
        // A row that fails the table's filter counts nowhere: whatever it held under its
        // own name goes (a row that stops matching removes its contribution).
        let (new_state, filtered_out) = match (&r.filter, new_tuple, new_state) {
            (Some(f), Some(t), Some(ns)) => match f.passes(t) {
                Some(true) => (Some(ns), None),
                Some(false) => {
                    self.stats.filtered_rows += 1;
                    // an inserted row held nothing to remove (a snapshot of a stock
                    // table that is also looked up reads the rows its `where` fails)
                    (None, (c.op != Op::Insert).then_some(ns.0))
                }
                None => {
                    self.skip(
                        &r.table,
                        "where",
                        lsn,
                        "a filter column was not sent (unchanged TOAST)".into(),
                    );
                    return;
                }
            },
            (_, _, ns) => (ns, None),
        };
        // A SKU longer than the cap counts nowhere: a row updated to one leaves its old
        // SKU, and one updated from one (never counted) only arrives.
        let max_sku = self.mapping.max_sku_bytes;
        let old_id = old_id.filter(|(s, _)| s.len() <= max_sku);
        let new_state = match new_state {
            Some(((s, _), _)) if s.len() > max_sku => {
                self.skip(&r.table, &m.sku.label(), lsn, SKU_TOO_LONG.into());
                None
            }
            n => n,
        };
        for sku in old_id
            .iter()
            .map(|(s, _)| s)
            .chain(new_state.iter().map(|((s, _), _)| s))
        {
            self.touch(sku);
        }
        let filtered_out = filtered_out.filter(|(s, _)| s.len() <= max_sku);
        if let Some(before) = indexed_before {
            // The row index follows: the row's key before and after (a key update moves it).
            let after = new_state.as_ref().map(|((s, f), _)| (f.clone(), s.clone()));
            match after {
                Some((f, s)) => {
                    if f != before {
                        self.set_holder(before, None);
                    }
                    self.set_holder(f, Some(s));
                }
                None => {
                    if let Some((_, f)) = &filtered_out
                        && *f != before
                    {
                        self.set_holder(f.clone(), None);
                    }
                    self.set_holder(before, None);
                }
            }
        }
        if let Some((sku, _)) = &filtered_out {
            self.touch(sku);
        }
        let cur = self.cur.as_mut().expect("change inside a transaction");
        if let Some((sku, field)) = filtered_out {
            cur.skus.entry(sku).or_default().put_row(field, RowOp::Del);
        }
        if let Some((old_sku, old_field)) = &old_id {
            let moved = new_state
                .as_ref()
                .is_none_or(|((s, f), _)| s != old_sku || f != old_field);
            if moved {
                cur.skus
                    .entry(old_sku.clone())
                    .or_default()
                    .put_row(old_field.clone(), RowOp::Del);
            }
        }
        if let Some(((sku, field), op)) = new_state {
            cur.skus.entry(sku).or_default().put_row(field, op);
        }
    }

    fn fold_activity(&mut self, r: &mapping::ActivityRule, c: &Change) {
        let lsn = c.commit_lsn;
        if c.op != Op::Insert {
            // Activity counters count inserted rows; retention deletes never lower them.
            self.stats.ignored_activity_changes += 1;
            return;
        }
        let Some(t) = c.new.as_ref() else { return };
        let mapping = self.mapping.clone();
        let spec = &mapping.activity[r.index];
        let m = &spec.map;
        if let Some(f) = &r.filter {
            match f.passes(t) {
                Some(true) => {}
                Some(false) => {
                    self.stats.filtered_rows += 1;
                    return;
                }
                None => {
                    self.skip(
                        &r.table,
                        "where",
                        lsn,
                        "a filter column was not sent".into(),
                    );
                    return;
                }
            }
        }
        let sku = match self.activity_sku(&r.sku, t) {
            Ok(Some(s)) => s,
            Ok(None) if matches!(r.sku, mapping::Attr::Lookup { .. }) => {
                // the reference is NULL, missing or filtered out: counted nowhere
                self.stats.unresolved_rows += 1;
                return;
            }
            Ok(None) => {
                self.skip(
                    &r.table,
                    &m.sku.label(),
                    lsn,
                    "SKU is NULL or not text".into(),
                );
                return;
            }
            Err(why) => {
                self.skip(&r.table, &m.sku.label(), lsn, why.into());
                return;
            }
        };
        if sku.len() > self.mapping.max_sku_bytes {
            self.skip(&r.table, &m.sku.label(), lsn, SKU_TOO_LONG.into());
            return;
        }
        let kind = match &r.kind {
            mapping::Kind::Constant(k) => k.as_str(),
            mapping::Kind::Column(i) => match text(t.get(*i)) {
                TextOf::Text(s) => s,
                _ => {
                    self.stats.unknown_kinds += 1;
                    return;
                }
            },
        };
        let Some(counter) = spec.names.get(kind) else {
            self.stats.unknown_kinds += 1;
            return;
        };
        let sc = Scale {
            digits: r.scale,
            scale: mapping.scale,
        };
        let qty = match &r.quantity {
            None => 10i64.pow(mapping.scale),
            Some(cols) => match sum(t, None, cols, &c.rel, sc) {
                Ok(Field::Val(v)) => v,
                // An inserted row has no unchanged TOAST values.
                Ok(Field::Keep) => 0,
                Err(e) => {
                    let label = m.quantity.as_ref().map(|c| c.label()).unwrap_or_default();
                    self.skip(&r.table, &label, lsn, e);
                    return;
                }
            },
        };
        let cur_ms = self.cur.as_ref().map(|p| p.commit_ms).unwrap_or(0);
        let at_ms = match r.time {
            None => cur_ms,
            Some(i) => match text(t.get(i)) {
                TextOf::Text(s) => match parse_pg_timestamp_ms(s) {
                    Some(ms) if ms <= cur_ms.saturating_add(MAX_EVENT_LEAD_MS) => ms,
                    // A typo'd year or a client clock far ahead would move the SKU's
                    // window forward and leave every present event outside it.
                    Some(_) => {
                        self.skip(
                            &r.table,
                            m.time.as_deref().unwrap_or(""),
                            lsn,
                            "event time is more than 5 minutes after the commit; using the commit time"
                                .into(),
                        );
                        cur_ms
                    }
                    None => {
                        self.skip(
                            &r.table,
                            m.time.as_deref().unwrap_or(""),
                            lsn,
                            "event time is not a finite timestamp; using the commit time".into(),
                        );
                        cur_ms
                    }
                },
                _ => cur_ms,
            },
        };
        let user = match (r.user, &spec.user_key) {
            (Some(i), Some(key)) => match text(t.get(i)) {
                TextOf::Text(s) => Some(key.expose().hash(s)),
                _ => None,
            },
            _ => None,
        };
        let (has_windows, counter) = (counter.buckets, &counter.name);
        let minute = crate::sinks::layout::minute_of_ms(at_ms);
        let cur = self.cur.as_mut().expect("change inside a transaction");
        let d = cur.skus.entry(sku).or_default();
        // Saturating: each quantity is within ±2^53, but a piece sums many.
        let c = d.counters.entry_or_default(counter.clone());
        *c = c.saturating_add(qty);
        if has_windows {
            let b = d.buckets.entry_or_default((counter.clone(), minute));
            *b = b.saturating_add(qty);
        }
        if let Some(u) = user {
            vecmap::insert_sorted(d.users.entry_or_default((counter.clone(), minute)), u);
        }
    }
}

fn keep_or<T>(new: Field<T>, old: Field<T>) -> Field<T> {
    match new {
        Field::Keep => old,
        v => v,
    }
}

enum TextOf<'a> {
    Text(&'a str),
    Null,
    Unchanged,
    Bad,
}

fn text(d: Option<&Datum>) -> TextOf<'_> {
    match d {
        Some(Datum::Text(b)) => std::str::from_utf8(b)
            .map(TextOf::Text)
            .unwrap_or(TextOf::Bad),
        Some(Datum::Null) | None => TextOf::Null,
        Some(Datum::UnchangedToast) => TextOf::Unchanged,
        Some(Datum::Binary(_)) => TextOf::Bad,
    }
}

/// A whole-number column; `Keep` for an unchanged TOAST value (filled from a full old row
/// when there is one).
fn quantity(
    t: &Tuple,
    old_full: Option<&Tuple>,
    i: usize,
    rel: &RelationDesc,
    sc: Scale,
) -> Result<Field<i64>, String> {
    let type_oid = rel.columns.get(i).map(|c| c.type_oid).unwrap_or(0);
    let d = match t.get(i) {
        Some(Datum::UnchangedToast) => match old_full.and_then(|o| o.get(i)) {
            Some(d) if *d != Datum::UnchangedToast => d,
            _ => return Ok(Field::Keep),
        },
        Some(d) => d,
        None => return Err("column missing from the row".into()),
    };
    let v = crate::txn::parse_value(d, type_oid).map_err(|e| e.to_string())?;
    let n = v.as_scaled(sc.digits, sc.scale).map_err(|e| {
        if sc.digits == 0 {
            format!("not a whole number ({e})")
        } else {
            format!("not a usable decimal ({e})")
        }
    })?;
    // The apply script computes in Lua numbers (doubles): beyond 2^53 sums would silently
    // lose precision (and the model would overflow), so such values are skipped.
    if n.unsigned_abs() > MAX_QUANTITY {
        return Err("outside ±2^53".into());
    }
    Ok(Field::Val(n))
}

/// The sum of quantity columns; `Keep` when none was sent (unchanged TOAST), an error
/// when only some were (the sum is unknown) or the sum leaves ±2^53.
fn sum(
    t: &Tuple,
    old_full: Option<&Tuple>,
    cols: &[usize],
    rel: &RelationDesc,
    sc: Scale,
) -> Result<Field<i64>, String> {
    if let [one] = cols {
        return quantity(t, old_full, *one, rel, sc);
    }
    let (mut total, mut kept) = (0i64, 0usize);
    for &i in cols {
        match quantity(t, old_full, i, rel, sc)? {
            Field::Val(v) => total += v,
            Field::Keep => kept += 1,
        }
    }
    if kept == cols.len() {
        return Ok(Field::Keep);
    }
    if kept > 0 {
        return Err("some of the summed columns were not sent (unchanged TOAST)".into());
    }
    if total.unsigned_abs() > MAX_QUANTITY {
        return Err("the sum is outside ±2^53".into());
    }
    Ok(Field::Val(total))
}

/// How a table's quantities are read: at most `digits` fractional digits, folded in
/// units of 10^-`scale` (the mapping's largest scale).
#[derive(Clone, Copy, Debug)]
struct Scale {
    digits: u32,
    scale: u32,
}

/// Largest quantity magnitude the apply step computes exactly (Lua doubles), in units.
pub const MAX_QUANTITY: u64 = 1 << 53;

/// (SKU, row field) of a stock row from a tuple; `Err(column)` when a needed value is
/// missing (NULL SKU, unchanged TOAST key).
fn row_identity(
    r: &mapping::InventoryRule,
    t: &Tuple,
    rel: &RelationDesc,
) -> Result<(String, String), String> {
    let col_name = |i: usize| {
        rel.columns
            .get(i)
            .map(|c| c.name.clone())
            .unwrap_or_default()
    };
    let mapping::Attr::Column(sku_col) = r.sku else {
        return Err("SKU lookup".into());
    };
    let sku = match text(t.get(sku_col)) {
        TextOf::Text(s) => s.to_string(),
        _ => return Err(col_name(sku_col)),
    };
    if r.full {
        // Every column is the key: hash the values, so none of them (free text, personal
        // data) is copied into Redis and field names stay short. Length-prefixed, so no
        // two rows share a preimage; NULL's marker is no length.
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for &i in &r.key {
            match t.get(i) {
                Some(Datum::Text(b)) => {
                    h.update((b.len() as u64).to_be_bytes());
                    h.update(b);
                }
                Some(Datum::Null) => h.update(u64::MAX.to_be_bytes()),
                _ => return Err(col_name(i)),
            }
        }
        let field = layout::row_field_hashed(&r.table, &hex::encode(&h.finalize()[..16]));
        return Ok((sku, field));
    }
    let mut key: Vec<Option<std::borrow::Cow<'_, str>>> = Vec::with_capacity(r.key.len());
    for &i in &r.key {
        match t.get(i) {
            Some(Datum::Text(b)) => key.push(Some(String::from_utf8_lossy(b))),
            Some(Datum::Null) => key.push(None),
            _ => return Err(col_name(i)),
        }
    }
    let field = layout::row_field(&r.table, key.iter().map(|v| v.as_deref()));
    Ok((sku, field))
}

/// The row field of an indexed row from any tuple carrying its key; `Err(column)` when a
/// key value is missing.
fn row_key_field(r: &mapping::InventoryRule, t: &Tuple) -> Result<String, String> {
    // written straight into the field (as `layout::row_field`): this runs for every row
    let more = r
        .key
        .iter()
        .map(|&i| match t.get(i) {
            Some(Datum::Text(b)) => layout::item_len(Some(b.len())),
            _ => layout::item_len(None),
        })
        .sum();
    let mut f = layout::row_field_with(&r.table, more);
    for &i in &r.key {
        match t.get(i) {
            Some(Datum::Text(b)) => layout::push_item(&mut f, Some(&String::from_utf8_lossy(b))),
            Some(Datum::Null) => layout::push_item(&mut f, None),
            _ => return Err(format!("key column {i}")),
        }
    }
    Ok(f)
}

/// HMAC-SHA256 of a user id, truncated to 128 bits (see [`UserId`]).
pub fn hmac_user(key: &[u8], user: &str) -> UserId {
    UserHasher::new(key).hash(user)
}

/// [`hmac_user`] with one key: the key's inner and outer blocks are hashed once, here,
/// and each user id then costs two SHA-256 blocks instead of four.
#[derive(Clone)]
pub struct UserHasher(Hmac<sha2::Sha256>);

impl UserHasher {
    /// A hasher keyed with `key` (any length).
    pub fn new(key: &[u8]) -> UserHasher {
        UserHasher(
            <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key)
                .expect("HMAC takes keys of any length"),
        )
    }

    /// The user id as counted.
    pub fn hash(&self, user: &str) -> UserId {
        let mut mac = self.0.clone();
        mac.update(user.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&mac.finalize().into_bytes()[..16]);
        UserId(id)
    }
}

/// Parse PostgreSQL's ISO timestamp output (`2026-11-25 08:00:00.123+00`, with or
/// without zone; the replication session runs with TimeZone=UTC) into unix ms.
pub fn parse_pg_timestamp_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, rest) = s.split_once(' ')?;
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let mo: i64 = d.next()?.parse().ok()?;
    let da: i64 = d.next()?.parse().ok()?;
    let tz_at = rest.find(['+', '-']).unwrap_or(rest.len());
    let (time, tz) = rest.split_at(tz_at);
    let mut tp = time.splitn(3, ':');
    let h: i64 = tp.next()?.parse().ok()?;
    let mi: i64 = tp.next()?.parse().ok()?;
    let sec_s = tp.next()?;
    let (sec, frac) = sec_s.split_once('.').unwrap_or((sec_s, ""));
    let sec: i64 = sec.parse().ok()?;
    let ms: i64 = if frac.is_empty() {
        0
    } else {
        format!("{:0<3}", frac.get(..frac.len().min(3))?)
            .parse()
            .ok()?
    };
    let offset_s = if tz.is_empty() {
        0
    } else {
        let sign = if tz.starts_with('-') { -1 } else { 1 };
        let mut p = tz[1..].split(':');
        let oh: i64 = p.next()?.parse().ok()?;
        if oh.unsigned_abs() > 99 {
            return None;
        }
        let om: i64 = p.next().map(|x| x.parse().ok()).unwrap_or(Some(0))?;
        let os: i64 = p.next().map(|x| x.parse().ok()).unwrap_or(Some(0))?;
        if om.unsigned_abs() > 99 || os.unsigned_abs() > 99 {
            return None;
        }
        sign * (oh * 3600 + om * 60 + os)
    };
    if !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
        || !(-300_000..=300_000).contains(&y)
        || !(0..=24).contains(&h)
        || !(0..=59).contains(&mi)
        || !(0..=60).contains(&sec)
    {
        return None;
    }
    // Days from civil (proleptic Gregorian).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    // Checked: a garbage year must not overflow (it is skipped like any bad value).
    days.checked_mul(86_400)?
        .checked_add(h * 3600 + mi * 60 + sec - offset_s)?
        .checked_mul(1000)?
        .checked_add(ms)
}

#[cfg(test)]
mod tests;
