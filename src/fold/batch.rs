//! Batches: folded pieces merged into one entry per SKU for one apply call, pure.
//!
//! While the stream is backlogged, thousands of transactions touch the same SKUs. Sending
//! each transaction's delta separately made Redis repeat the same per-SKU work (read the
//! hash, write it back) once per transaction. A batch instead keeps one [`Entry`] per SKU:
//! counters, window buckets and distinct users are summed across transactions; stock rows
//! are sent once with their final state, plus a compact trace of every change in commit
//! order, because low-stock alerts are evaluated after each transaction. Memory follows
//! the distinct SKUs and stock changes of one batch, capped by the caller.
//!
//! An entry is fenced by the range of pieces it merged, `first..=last`: the apply step
//! skips it when the SKU already holds `last`, applies it when the SKU holds less than
//! `first`, and refuses the whole call if the SKU holds something in between (that would
//! mean part of the entry was applied before). Merging is therefore only allowed for
//! pieces that cannot have been applied yet: whole single-piece transactions committed
//! after the *horizon*, the highest LSN Redis may already hold (its `applied_lsn` when the
//! stream connected). Replays below the horizon and pieces of large transactions keep an
//! entry each, fenced exactly as before.

use super::vecmap::{VecMap, insert_sorted};
use super::{Field, Piece, RowOp, SkuDelta};
use crate::lsn::Lsn;
use hashbrown::hash_table::{Entry as Slot, HashTable};
use std::collections::HashMap;
use std::hash::BuildHasher;

/// (commit LSN, piece number): the fence unit.
pub type Fence = (Lsn, u32);

/// What one transaction did to one stock row, for alert evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceOp {
    /// The row exists with these values (`Keep`: what the row held before).
    Set {
        on_hand: Field<i64>,
        reserved: Field<i64>,
        threshold: Field<Option<i64>>,
    },
    /// The row is gone.
    Del,
    /// No row: an evaluation only (the final piece of a large transaction).
    None,
}

/// One record of an entry's trace: the stock changes in commit order, so the apply step
/// can evaluate low-stock alerts after each transaction (they depend on every
/// intermediate level, not only the final one).
///
/// A batch holds one per stock change (hundreds of thousands while catching up), so the
/// operation is packed as the apply script reads it ([`trace_flags`] and three values):
/// 48 bytes instead of 72 with a [`TraceOp`] inside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRec {
    pub lsn: Lsn,
    /// Commit time, unix milliseconds.
    pub commit_ms: i64,
    /// on_hand, reserved and threshold; 0 where the flags say there is no value.
    pub values: [i64; 3],
    /// Index into the entry's `rows` (unused for `TraceOp::None`).
    pub row: u32,
    /// [`trace_flags`] of the operation (`EVAL` is `eval`).
    pub flags: u8,
    /// Evaluate alerts after this record (the last record of a transaction).
    pub eval: bool,
}

/// A trace record's flags, the bits `apply.lua` reads. Without `THR_SET` or `THR_CLEAR`
/// the threshold is kept.
pub mod trace_flags {
    pub const DEL: u8 = 1;
    pub const ON_KEEP: u8 = 2;
    pub const RES_KEEP: u8 = 4;
    pub const THR_SET: u8 = 8;
    pub const THR_CLEAR: u8 = 16;
    pub const EVAL: u8 = 32;
    pub const NO_ROW: u8 = 64;
}

impl TraceRec {
    /// A record of `op` on row `row` by the transaction committed at `lsn`.
    pub fn new(row: u32, op: TraceOp, eval: bool, lsn: Lsn, commit_ms: i64) -> TraceRec {
        use trace_flags::*;
        let mut rec = TraceRec {
            lsn,
            commit_ms,
            values: [0; 3],
            row,
            flags: 0,
            eval,
        };
        match op {
            TraceOp::Del => rec.flags = DEL,
            TraceOp::None => rec.flags = NO_ROW,
            TraceOp::Set {
                on_hand,
                reserved,
                threshold,
            } => {
                match on_hand {
                    Field::Keep => rec.flags |= ON_KEEP,
                    Field::Val(v) => rec.values[0] = v,
                }
                match reserved {
                    Field::Keep => rec.flags |= RES_KEEP,
                    Field::Val(v) => rec.values[1] = v,
                }
                rec.set_threshold(&threshold);
            }
        }
        rec
    }

    /// Make the record write `t` as the SKU's threshold (after its row change, before an
    /// evaluation), whatever its operation: a piece's threshold rides on its last record.
    pub fn set_threshold(&mut self, t: &Field<Option<i64>>) {
        use trace_flags::*;
        self.flags &= !(THR_SET | THR_CLEAR);
        self.values[2] = 0;
        match t {
            Field::Keep => {}
            Field::Val(None) => self.flags |= THR_CLEAR,
            Field::Val(Some(v)) => {
                self.flags |= THR_SET;
                self.values[2] = *v;
            }
        }
    }

    /// The threshold the record writes (`Keep`: none), whatever its operation.
    pub fn threshold(&self) -> Field<Option<i64>> {
        use trace_flags::*;
        if self.flags & THR_SET != 0 {
            Field::Val(Some(self.values[2]))
        } else if self.flags & THR_CLEAR != 0 {
            Field::Val(None)
        } else {
            Field::Keep
        }
    }

    /// What the transaction did to the row.
    pub fn op(&self) -> TraceOp {
        use trace_flags::*;
        if self.flags & DEL != 0 {
            return TraceOp::Del;
        }
        if self.flags & NO_ROW != 0 {
            return TraceOp::None;
        }
        let val = |keep: u8, v: i64| {
            if self.flags & keep != 0 {
                Field::Keep
            } else {
                Field::Val(v)
            }
        };
        TraceOp::Set {
            on_hand: val(ON_KEEP, self.values[0]),
            reserved: val(RES_KEEP, self.values[1]),
            threshold: self.threshold(),
        }
    }
}

/// Everything one apply call does to one SKU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub sku: String,
    /// The first and last piece merged into this entry.
    pub first: Fence,
    pub last: Fence,
    /// Commit time of the last piece, unix milliseconds.
    pub commit_ms: i64,
    /// Stock tables whose rows this entry clears first (a TRUNCATE piece). Boxed, like
    /// `row_index`: rarely set, and a batch holds an entry per SKU.
    pub truncate: Box<[String]>,
    /// Stock rows touched, with their final state (location and quantities; thresholds
    /// travel in the trace), in first-touch order.
    pub rows: Vec<(String, RowOp)>,
    /// Stock changes and alert evaluations, in commit order.
    pub trace: Vec<TraceRec>,
    /// Summed lifetime counter increments.
    pub counters: VecMap<super::Name, i64>,
    /// (counter, minute) -> summed bucket increment.
    pub buckets: VecMap<(super::Name, i64), i64>,
    /// (counter, minute) -> HMAC'd user ids seen, sorted, no duplicates.
    pub users: VecMap<(super::Name, i64), Vec<super::UserId>>,
    /// Row field -> index in `rows`, once there are many.
    // boxed for the entry's size (8 bytes instead of 48), not the map's
    #[allow(clippy::box_collection)]
    row_index: Option<Box<HashMap<String, u32>>>,
    /// It holds activity of a `known_skus_only` table (counter names starting with `?`).
    guarded: bool,
}

/// Rows per entry searched linearly before an index is built.
const LINEAR_ROWS: usize = 8;

impl Entry {
    fn new(sku: String, fence: Fence, commit_ms: i64) -> Entry {
        Entry {
            sku,
            first: fence,
            last: fence,
            commit_ms,
            truncate: Box::default(),
            rows: Vec::new(),
            trace: Vec::new(),
            counters: VecMap::default(),
            buckets: VecMap::default(),
            users: VecMap::default(),
            row_index: None,
            guarded: false,
        }
    }

    fn row_slot(&mut self, field: &str) -> Option<usize> {
        match &self.row_index {
            Some(ix) => ix.get(field).map(|&i| i as usize),
            None => self.rows.iter().position(|(f, _)| f == field),
        }
    }

    /// Merge a row's new state into its final state: `Keep` inherits what the entry set
    /// before (after a delete, what a fresh row holds).
    fn merge_row(&mut self, field: String, op: &RowOp) -> u32 {
        let final_op = match op {
            RowOp::Del => RowOp::Del,
            RowOp::Set {
                location,
                on_hand,
                reserved,
                ..
            } => RowOp::Set {
                location: location.clone(),
                on_hand: on_hand.clone(),
                reserved: reserved.clone(),
                threshold: Field::Keep,
            },
        };
        match self.row_slot(&field) {
            Some(i) => {
                // (the stored ops' thresholds are all `Keep`: they travel in the trace)
                let prev = std::mem::replace(&mut self.rows[i].1, RowOp::Del);
                self.rows[i].1 = final_op.after(prev);
                i as u32
            }
            None => {
                let i = self.rows.len();
                if let Some(ix) = &mut self.row_index {
                    ix.insert(field.clone(), i as u32);
                } else if i >= LINEAR_ROWS {
                    let mut ix: HashMap<String, u32> = self
                        .rows
                        .iter()
                        .enumerate()
                        .map(|(i, (f, _))| (f.clone(), i as u32))
                        .collect();
                    ix.insert(field.clone(), i as u32);
                    self.row_index = Some(Box::new(ix));
                }
                if self.rows.is_empty() {
                    // Most entries touch one row: the default growth (four) would
                    // triple an entry's memory in a batch of a million SKUs.
                    self.rows.reserve_exact(1);
                }
                self.rows.push((field, final_op));
                i as u32
            }
        }
    }

    fn absorb(&mut self, fence: Fence, commit_ms: i64, d: SkuDelta, eval: bool) -> usize {
        self.last = fence;
        self.commit_ms = commit_ms;
        let before = self.trace.len();
        let n = d.rows.len();
        if self.trace.is_empty() && (n > 0 || eval) {
            // Sized exactly for the first piece (see `merge_row`); merging grows it.
            self.trace.reserve_exact(n.max(1));
        }
        for (k, (field, op)) in d.rows.into_iter().enumerate() {
            let row = self.merge_row(field, &op);
            // The rows' own thresholds are the piece's changes in key order, without a
            // row's the piece then deleted: the piece's threshold (`d.threshold`, in
            // change order) rides on its last record instead.
            let op = match op {
                RowOp::Del => TraceOp::Del,
                RowOp::Set {
                    on_hand, reserved, ..
                } => TraceOp::Set {
                    on_hand,
                    reserved,
                    threshold: Field::Keep,
                },
            };
            self.trace.push(TraceRec::new(
                row,
                op,
                eval && k + 1 == n,
                fence.0,
                commit_ms,
            ));
        }
        if n == 0 && (eval || d.threshold != Field::Keep) {
            self.trace
                .push(TraceRec::new(0, TraceOp::None, eval, fence.0, commit_ms));
        }
        if self.trace.len() > before
            && let Some(last) = self.trace.last_mut()
        {
            last.set_threshold(&d.threshold);
        }
        self.guarded |= d.counters.keys().any(|c| super::model::is_guarded(c))
            || d.buckets.keys().any(|(c, _)| super::model::is_guarded(c));
        let sum = |v: &mut i64, n: i64| *v = v.saturating_add(n);
        self.counters.absorb(d.counters, sum);
        self.buckets.absorb(d.buckets, sum);
        self.users.absorb(d.users, |set, ids| {
            for id in ids {
                insert_sorted(set, id);
            }
        });
        self.trace.len() - before
    }
}

/// Pieces merged into per-SKU entries, in apply order.
#[derive(Debug, Default)]
pub struct Batch {
    entries: Vec<Entry>,
    /// The entries later pieces may merge into: indices into `entries`, hashed by the
    /// entry's own SKU, so opening an entry does not copy its SKU.
    open: HashTable<usize>,
    hasher: foldhash::fast::RandomState,
    horizon: Lsn,
    steps: usize,
}

impl Batch {
    /// An empty batch; pieces at or below `horizon` are never merged.
    pub fn new(horizon: Lsn) -> Batch {
        Batch {
            horizon,
            ..Batch::default()
        }
    }

    /// Raise the horizon (a new stream session read Redis' `applied_lsn`). Entries
    /// built so far are closed: nothing merges across a session boundary.
    pub fn raise_horizon(&mut self, lsn: Lsn) {
        self.horizon = self.horizon.max(lsn);
        self.open.clear();
    }

    /// Whether a piece may be merged with others: a whole transaction beyond the horizon.
    pub fn mergeable(&self, p: &Piece) -> bool {
        p.piece == 0 && p.last && p.truncate.is_empty() && p.commit_lsn > self.horizon
    }

    /// Add a piece (pieces arrive in commit order).
    pub fn push(&mut self, p: Piece) {
        let merge = self.mergeable(&p);
        let fence = (p.commit_lsn, p.piece);
        // Both are sorted (`skus` is a map; `eval` comes from a set): one merge walk
        // pairs them without building another set for every transaction.
        let mut eval = if p.last { p.eval } else { Vec::new() };
        if !eval.is_sorted() {
            eval.sort_unstable();
        }
        eval.dedup();
        let mut rest = Vec::new();
        let mut ev = eval.drain(..).peekable();
        for (sku, d) in p.skus {
            while let Some(e) = ev.next_if(|e| *e < sku) {
                rest.push(e);
            }
            let is_eval = ev.next_if(|e| *e == sku).is_some();
            self.add(sku, fence, p.commit_ms, d, is_eval, merge);
        }
        rest.extend(ev);
        for sku in rest {
            self.add(sku, fence, p.commit_ms, SkuDelta::default(), true, merge);
        }
    }

    /// Evaluation-only entries: low-stock alerts of each of `skus` at its current level,
    /// fenced by a transaction's final piece `fence`. After a transaction that truncated
    /// a stock table, every SKU is evaluated once, at the end of the transaction (SKUs its
    /// final piece already evaluated skip them by the fence).
    pub fn evaluate(fence: Fence, commit_ms: i64, skus: &[String]) -> Vec<Entry> {
        skus.iter()
            .map(|s| {
                let mut e = Entry::new(s.clone(), fence, commit_ms);
                e.trace
                    .push(TraceRec::new(0, TraceOp::None, true, fence.0, commit_ms));
                e
            })
            .collect()
    }

    /// Entries clearing `tables` from each of `skus` (a TRUNCATE piece; apply it alone).
    pub fn truncate(p: &Piece, skus: &[String]) -> Vec<Entry> {
        skus.iter()
            .map(|s| {
                let mut e = Entry::new(s.clone(), (p.commit_lsn, p.piece), p.commit_ms);
                e.truncate = p.truncate.clone().into_boxed_slice();
                e
            })
            .collect()
    }

    fn add(&mut self, sku: String, fence: Fence, ms: i64, d: SkuDelta, eval: bool, merge: bool) {
        let before = self.entries.len();
        let hash = self.hasher.hash_one(sku.as_str());
        let entries = &self.entries;
        let open = merge
            .then(|| self.open.find(hash, |&i| entries[i].sku == sku).copied())
            .flatten()
            // Guarded activity counts only if the SKU has stock after its own
            // transaction, and the apply step looks after the entry's rows: a later stock
            // change must not join it (it starts an entry of its own).
            .filter(|&i| d.rows.is_empty() || !self.entries[i].guarded);
        let i = match open {
            Some(i) => i,
            None => {
                let entries = &self.entries;
                let hasher = |&i: &usize| self.hasher.hash_one(entries[i].sku.as_str());
                match self.open.entry(hash, |&i| entries[i].sku == sku, hasher) {
                    Slot::Occupied(mut o) if merge => *o.get_mut() = before,
                    Slot::Occupied(o) => {
                        o.remove();
                    }
                    Slot::Vacant(v) if merge => {
                        v.insert(before);
                    }
                    Slot::Vacant(_) => {}
                }
                self.entries.push(Entry::new(sku, fence, ms));
                before
            }
        };
        self.steps += self.entries[i].absorb(fence, ms, d, eval);
    }

    /// The entries, in apply order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Number of entries (about the distinct SKUs).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Number of trace records (stock row changes and evaluations).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Take the entries, leaving an empty batch with the same horizon.
    pub fn take(&mut self) -> Vec<Entry> {
        self.open.clear();
        self.steps = 0;
        let mut out = std::mem::take(&mut self.entries);
        for e in &mut out {
            e.row_index = None;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn piece(lsn: u64, n: u32, last: bool, skus: &[(&str, i64, Option<i64>)]) -> Piece {
        let mut m = BTreeMap::new();
        let mut eval = Vec::new();
        for (sku, views, stock) in skus {
            let mut d = SkuDelta::default();
            if *views != 0 {
                d.counters.insert("views".into(), *views);
                d.buckets.insert(("views".into(), 7), *views);
            }
            if let Some(on) = stock {
                d.rows.insert(
                    format!("r:inv:{sku}"),
                    RowOp::Set {
                        location: Field::Val("W".into()),
                        on_hand: Field::Val(*on),
                        reserved: Field::Val(0),
                        threshold: Field::Keep,
                    },
                );
                eval.push(sku.to_string());
            }
            m.insert(sku.to_string(), d);
        }
        Piece {
            commit_lsn: Lsn(lsn),
            piece: n,
            commit_ms: lsn as i64,
            truncate: vec![],
            skus: m,
            last,
            eval: if last { eval } else { vec![] },
            ri: Default::default(),
            ri_local: Default::default(),
        }
    }

    #[test]
    fn whole_transactions_beyond_the_horizon_merge_per_sku() {
        let mut b = Batch::new(Lsn(10));
        b.push(piece(20, 0, true, &[("A", 1, None), ("B", 2, Some(5))]));
        b.push(piece(30, 0, true, &[("A", 3, Some(4))]));
        b.push(piece(40, 0, true, &[("B", 1, Some(3))]));
        assert_eq!(b.len(), 2);
        assert_eq!(b.steps(), 3);
        let a = &b.entries()[0];
        assert_eq!((a.first, a.last), ((Lsn(20), 0), (Lsn(30), 0)));
        assert_eq!(a.counters["views"], 4);
        assert_eq!(*a.buckets.get(&("views".into(), 7)).unwrap(), 4);
        assert_eq!(a.trace.len(), 1);
        assert!(a.trace[0].eval);
        let bb = &b.entries()[1];
        assert_eq!(bb.counters["views"], 3);
        assert_eq!(
            bb.trace.iter().map(|s| s.lsn).collect::<Vec<_>>(),
            vec![Lsn(20), Lsn(40)]
        );
        assert_eq!(bb.rows.len(), 1, "one final state per row");
        assert!(matches!(
            &bb.rows[0].1,
            RowOp::Set {
                on_hand: Field::Val(3),
                ..
            }
        ));
    }

    #[test]
    fn replays_below_the_horizon_and_large_transactions_keep_an_entry_per_piece() {
        let mut b = Batch::new(Lsn(25));
        b.push(piece(20, 0, true, &[("A", 1, None)]));
        b.push(piece(25, 0, true, &[("A", 1, None)]));
        // A transaction cut into pieces: never merged, not even with itself.
        b.push(piece(30, 0, false, &[("A", 1, None)]));
        b.push(piece(30, 1, true, &[("A", 1, Some(1))]));
        // Then whole transactions merge again, but not into the pieces above.
        b.push(piece(40, 0, true, &[("A", 1, None)]));
        b.push(piece(50, 0, true, &[("A", 1, None)]));
        let fences: Vec<(Fence, Fence)> = b.entries().iter().map(|e| (e.first, e.last)).collect();
        assert_eq!(
            fences,
            vec![
                ((Lsn(20), 0), (Lsn(20), 0)),
                ((Lsn(25), 0), (Lsn(25), 0)),
                ((Lsn(30), 0), (Lsn(30), 0)),
                ((Lsn(30), 1), (Lsn(30), 1)),
                ((Lsn(40), 0), (Lsn(50), 0)),
            ]
        );
        b.raise_horizon(Lsn(60));
        b.push(piece(70, 0, true, &[("A", 1, None)]));
        b.push(piece(80, 0, true, &[("A", 1, None)]));
        assert_eq!(b.len(), 6, "merged after the raised horizon");
        assert_eq!(b.take().len(), 6);
        assert!(b.is_empty() && b.steps() == 0);
    }

    #[test]
    fn an_evaluation_without_rows_in_the_last_piece_is_a_step() {
        let mut b = Batch::new(Lsn(0));
        let mut p = piece(30, 1, true, &[]);
        p.eval = vec!["A".into()];
        b.push(p);
        let e = &b.entries()[0];
        assert_eq!(e.trace.len(), 1);
        assert!(e.trace[0].eval && e.trace[0].op() == TraceOp::None && e.rows.is_empty());
    }

    #[test]
    fn final_rows_keep_what_the_entry_set_before_and_many_rows_are_indexed() {
        let set = |on: Field<i64>, loc: Field<String>| RowOp::Set {
            location: loc,
            on_hand: on,
            reserved: Field::Keep,
            threshold: Field::Val(Some(3)),
        };
        let mut e = Entry::new("A".into(), (Lsn(1), 0), 1);
        e.merge_row("r:t:x".into(), &set(Field::Val(5), Field::Val("W".into())));
        e.merge_row("r:t:x".into(), &set(Field::Keep, Field::Keep));
        assert_eq!(
            e.rows[0].1,
            RowOp::Set {
                location: Field::Val("W".into()),
                on_hand: Field::Val(5),
                reserved: Field::Keep,
                threshold: Field::Keep,
            },
            "Keep inherits; thresholds travel in the trace only"
        );
        e.merge_row("r:t:x".into(), &RowOp::Del);
        e.merge_row("r:t:x".into(), &set(Field::Keep, Field::Keep));
        assert_eq!(
            e.rows[0].1,
            RowOp::Set {
                location: Field::Val(String::new()),
                on_hand: Field::Val(0),
                reserved: Field::Val(0),
                threshold: Field::Keep,
            },
            "after a delete, Keep means a fresh row"
        );
        for i in 0..100 {
            assert_eq!(e.merge_row(format!("r:t:{i}"), &RowOp::Del), i + 1);
        }
        assert!(e.row_index.is_some());
        assert_eq!(e.merge_row("r:t:50".into(), &RowOp::Del), 51);
        assert_eq!(e.merge_row("r:t:x".into(), &RowOp::Del), 0);
        assert_eq!(e.rows.len(), 101);
    }

    #[test]
    fn a_trace_record_gives_back_the_operation_it_was_made_of() {
        let vals = [
            Field::Keep,
            Field::Val(0),
            Field::Val(-7),
            Field::Val(i64::MAX),
        ];
        let thrs = [
            Field::Keep,
            Field::Val(None),
            Field::Val(Some(0)),
            Field::Val(Some(12)),
        ];
        let mut ops = vec![TraceOp::Del, TraceOp::None];
        for on_hand in &vals {
            for reserved in &vals {
                for threshold in &thrs {
                    ops.push(TraceOp::Set {
                        on_hand: on_hand.clone(),
                        reserved: reserved.clone(),
                        threshold: threshold.clone(),
                    });
                }
            }
        }
        for (i, op) in ops.into_iter().enumerate() {
            let rec = TraceRec::new(i as u32, op.clone(), i % 2 == 0, Lsn(9), 5);
            assert_eq!(rec.op(), op);
            assert_eq!(
                (rec.row, rec.eval, rec.lsn, rec.commit_ms),
                (i as u32, i % 2 == 0, Lsn(9), 5)
            );
        }
        assert_eq!(std::mem::size_of::<TraceRec>(), 48);
    }
}
