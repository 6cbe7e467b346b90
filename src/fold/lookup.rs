//! Lookups: a mapped row's SKU or location taken from a referenced row (a variant's
//! `sku`, a warehouse's `slug`), followed exactly through changes of either side.
//!
//! State (all in Redis, read before folding and overlaid in memory while batches that
//! change it are in flight, like the row index; see `sinks::layout::state_slot`):
//! - per hop, each referenced row's value (`k:`): the text it resolves to, or the
//!   reference into the next hop; absent when the row is missing or fails the hop's
//!   `where`;
//! - per hop, each referenced row's dependents (`d:`): the stock rows (first hop) or
//!   previous-hop rows that reference it;
//! - per stock row, a [`RowRecord`] in the row index: where it counts now, its references
//!   and its quantities, so a referenced row's change moves its dependents by their
//!   records alone (the old SKU loses, the new one gains, in that transaction's apply).
//!
//! Pure: when [`Fold::change`] says a change needs state it has not read
//! ([`super::FoldError::Unread`], nothing folded), the caller asks [`Fold::needs`] what
//! (for that change and the rest of its chunk), reads it from Redis, hands it over with
//! [`Fold::know`] and [`Fold::know_deps`], and folds the change again. A warm fold (the
//! state cached) never asks.

use super::mapping::{Attr, HopRule, InventoryRule, LookupRule, RefCol};
use super::{Field, Fold, FoldError, RowOp, SKU_TOO_LONG, TextOf, sum, text};
use crate::lsn::Lsn;
use crate::pgoutput::{Datum, Tuple};
use crate::sinks::layout::{self, RowRecord};
use crate::txn::{Change, Op};

/// State a change needs before it can be folded.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Need {
    /// One value of the index state (a row record, a row's holder or a lookup value):
    /// read it at [`layout::state_slot`] and hand it to [`Fold::know`].
    Field(String),
    /// Every dependent of a referenced row: scan [`layout::dep_key`] for fields starting
    /// with the reference and hand the members to [`Fold::know_deps`].
    Deps { hop: usize, reference: String },
}

/// How a stock table's rows are placed: the SKU through a lookup (its first hop) or a
/// column, the location not at all, through a column, or through a lookup.
#[derive(Clone, Copy, Debug)]
pub(super) struct Via {
    sku: Option<usize>,
    loc: Option<Option<usize>>,
}

impl Via {
    pub(super) fn of(r: &InventoryRule) -> Via {
        let hop = |a: &Attr| match a {
            Attr::Lookup { hop, .. } => Some(*hop),
            Attr::Column(_) => None,
        };
        Via {
            sku: hop(&r.sku),
            loc: r.location.as_ref().map(hop),
        }
    }
}

/// A stock row change of a looked-up table, worked out before it is folded
/// ([`Fold::plan_stock_records`]).
#[derive(Debug)]
// Lives on the stack for one change; boxing the large variant would allocate per row.
#[allow(clippy::large_enum_variant)]
pub(super) enum StockPlan {
    /// No row to fold.
    Nothing,
    /// A value that cannot be used: skipped and counted.
    Skip {
        table: String,
        column: String,
        lsn: Lsn,
        reason: String,
    },
    Fold {
        lsn: Lsn,
        /// The row's field under its key before the change (or its only key).
        old_field: String,
        /// Its record before (`None`: a new row or one not counted).
        old: Option<RowRecord>,
        /// Its field after (`None`: deleted).
        new_field: Option<String>,
        /// Its record after (`None`: gone or filtered out).
        new: Option<RowRecord>,
        /// Where it counts now: (SKU, location).
        placed: Option<(String, String)>,
        filtered: bool,
        /// The SKU column's text is longer than the SKU limit.
        too_long: bool,
    },
}

/// A value read from a mapped row for a SKU, location or reference.
enum Input {
    Val(Option<String>),
    /// Unchanged TOAST: what the row held.
    Keep,
    Bad(&'static str),
}

fn input(t: &Tuple, a: &Attr) -> Input {
    let (i, path) = match a {
        Attr::Column(i)
        | Attr::Lookup {
            on: RefCol::Column(i),
            ..
        } => (*i, None),
        Attr::Lookup {
            on: RefCol::Json(i, path),
            ..
        } => (*i, Some(path)),
    };
    let s = match text(t.get(i)) {
        TextOf::Text(s) => s,
        TextOf::Null => return Input::Val(None),
        TextOf::Unchanged => return Input::Keep,
        TextOf::Bad => return Input::Bad("not UTF-8 text"),
    };
    let Some(path) = path else {
        return Input::Val(Some(s.to_string()));
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(s) else {
        return Input::Bad("the JSON column does not hold JSON");
    };
    let mut cur = &v;
    for p in path {
        match cur.get(p.as_str()) {
            Some(n) => cur = n,
            // skipped and counted per table, column and reason (a JSON null is a NULL)
            None => return Input::Bad("the JSON member is missing"),
        }
    }
    match cur {
        serde_json::Value::String(s) => Input::Val(Some(s.clone())),
        serde_json::Value::Number(n) => Input::Val(Some(n.to_string())),
        serde_json::Value::Null => Input::Val(None),
        _ => Input::Bad("the JSON member is not a string or a number"),
    }
}

/// A referenced row's key or value from a tuple.
fn cell(t: &Tuple, i: usize) -> Input {
    input(t, &Attr::Column(i))
}

impl Fold {
    /// What Redis holds for a state field (read after [`Fold::needs`]); ignored when the
    /// fold already knows newer (a change folded but not yet applied).
    pub fn know(&mut self, field: String, value: Option<String>) {
        self.know_holder(field, value);
    }

    /// The dependents Redis holds for a referenced row (the members after the
    /// reference's prefix in its dependents hash).
    pub fn know_deps(&mut self, hop: usize, reference: &str, members: Vec<String>) {
        let key = (hop, reference.to_string());
        if self.deps_known.contains_key(&key) {
            return;
        }
        for m in members {
            self.know_holder(layout::dep_field(hop, reference, &m), Some("1".into()));
        }
        self.deps_known.insert(key, self.generation);
    }

    /// What must be read from Redis before `c` can be folded (empty: nothing).
    pub fn needs(&mut self, c: &Change) -> Vec<Need> {
        let Some(rule) = self.rule_of(c) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        match &*rule {
            super::Rule::Inventory(r) if r.records => self.stock_needs(r, c, &mut out),
            super::Rule::Inventory(r) if r.indexed && c.op != Op::Insert => {
                if let Some(f) = c
                    .old
                    .as_ref()
                    .map(|(_, t)| t)
                    .or(c.new.as_ref())
                    .and_then(|t| super::row_key_field(r, t).ok())
                    && self.held(&f).is_none()
                {
                    out.push(Need::Field(f));
                }
            }
            super::Rule::Activity(r) => {
                if let (Attr::Lookup { hop, .. }, Some(t)) = (&r.sku, c.new.as_ref())
                    && c.op == Op::Insert
                    && let Input::Val(Some(reference)) = input(t, &r.sku)
                    && let Err(n) = self.follow(*hop, Some(&reference), &[])
                {
                    out.push(n);
                }
            }
            super::Rule::Lookup(l) => self.lookup_needs(l, c, &mut out),
            _ => {}
        }
        if matches!(&*rule, super::Rule::Inventory(_))
            && let Some(l) = self.also_of(&c.rel)
        {
            self.lookup_needs(&l, c, &mut out);
        }
        out.sort();
        out.dedup();
        out
    }

    fn stock_needs(&self, r: &InventoryRule, c: &Change, out: &mut Vec<Need>) {
        let old_t = c.old.as_ref().map(|(_, t)| t);
        let mut field = None;
        if c.op != Op::Insert
            && let Some(Ok(f)) = old_t.or(c.new.as_ref()).map(|t| super::row_key_field(r, t))
        {
            if self.held(&f).is_none() {
                out.push(Need::Field(f));
                return; // its references may be needed: known next round
            }
            field = Some(f);
        }
        let Some(t) = c.new.as_ref() else { return };
        let via = Via::of(r);
        for (attr, hop, is_sku) in [
            (Some(&r.sku), via.sku, true),
            (r.location.as_ref(), via.loc.flatten(), false),
        ] {
            let (Some(attr), Some(hop)) = (attr, hop) else {
                continue;
            };
            let reference = match input(t, attr) {
                Input::Val(v) => v,
                // unchanged (TOAST): the record's (rare; decoded only then)
                Input::Keep => field
                    .as_deref()
                    .and_then(|f| self.record(f).ok().flatten())
                    .and_then(|o| if is_sku { o.sku_in } else { o.loc_in }),
                Input::Bad(_) => None,
            };
            if let Err(n) = self.follow(hop, reference.as_deref(), &[]) {
                out.push(n);
            }
        }
    }

    fn lookup_needs(&self, l: &LookupRule, c: &Change, out: &mut Vec<Need>) {
        // Every hop's change of this row, so that placements are read for the row's new
        // values of all of them (they are applied one hop after another).
        let mut overrides = Vec::new();
        let mut plans = Vec::new();
        for hr in &l.hops {
            match self.hop_changes(hr, c) {
                Ok(ch) => {
                    for (k, v) in &ch {
                        overrides.push((hr.hop, k.clone(), v.clone()));
                    }
                    plans.push((hr, ch));
                }
                Err(n) => out.push(n),
            }
        }
        for (hr, ch) in plans {
            for (k, v) in ch {
                let old = match self.lookup_value(hr.hop, &k) {
                    Ok(v) => v,
                    Err(n) => {
                        out.push(n);
                        continue;
                    }
                };
                if old == v {
                    continue;
                }
                let rows = match self.rows_of(hr.hop, &k) {
                    Ok(rows) => rows,
                    Err(ns) => {
                        out.extend(ns);
                        continue;
                    }
                };
                for row in rows {
                    let rec = match self.record(&row) {
                        Ok(Some(rec)) => rec,
                        Ok(None) => continue,
                        Err(n) => {
                            out.push(n);
                            continue;
                        }
                    };
                    let Some(via) = self.via_of_row(&row) else {
                        continue;
                    };
                    for ov in [&[][..], &overrides[..]] {
                        if let Err(n) = self.place(via, &rec, ov) {
                            out.push(n);
                        }
                    }
                }
            }
        }
    }

    /// The (key, new value) pairs a change of a referenced table makes for one hop: one,
    /// or two when the key itself changed (the old key resolves to nothing).
    fn hop_changes(&self, hr: &HopRule, c: &Change) -> Result<Vec<(String, Option<String>)>, Need> {
        let key_of = |t: &Tuple| match cell(t, hr.key) {
            Input::Val(Some(k)) => Some(k),
            _ => None,
        };
        let old_key = c.old.as_ref().and_then(|(_, t)| key_of(t));
        let new_key = c.new.as_ref().and_then(key_of);
        let mut out = Vec::new();
        if let (Some(o), Some(n)) = (&old_key, &new_key)
            && o != n
        {
            out.push((o.clone(), None));
        }
        match (c.op, new_key, old_key) {
            (Op::Delete, _, Some(o)) => out.push((o, None)),
            (Op::Insert | Op::Update, Some(k), _) => {
                let t = c.new.as_ref().expect("a new row");
                let passes = match hr.filter.as_ref().map(|f| f.passes(t)) {
                    None | Some(Some(true)) => true,
                    Some(Some(false)) => false,
                    // A filter column sent as unchanged TOAST is unchanged: the row keeps
                    // what it was (whether it resolved), rather than every row that
                    // looks it up dropping out.
                    Some(None) => self.lookup_value(hr.hop, &k)?.is_some(),
                };
                let v = if !passes {
                    None
                } else {
                    match cell(t, hr.value) {
                        Input::Val(v) => v,
                        // unchanged TOAST: the value it had
                        Input::Keep => self.lookup_value(hr.hop, &k)?,
                        Input::Bad(_) => None,
                    }
                };
                out.push((k, v));
            }
            _ => {}
        }
        Ok(out)
    }

    /// A lookup value as Redis will hold it once what was folded is applied.
    fn lookup_value(&self, hop: usize, reference: &str) -> Result<Option<String>, Need> {
        Ok(self.lookup_ref(hop, reference)?.map(str::to_string))
    }

    /// Follow a reference from `hop` to the last hop's value (`None`: it does not
    /// resolve). `over`: values to use instead of the state's, (hop, key, value).
    fn follow<'a>(
        &'a self,
        mut hop: usize,
        reference: Option<&'a str>,
        over: &'a [(usize, String, Option<String>)],
    ) -> Result<Option<&'a str>, Need> {
        let mut reference = reference;
        for _ in 0..=self.mapping.hops.len() {
            let Some(r) = reference else { return Ok(None) };
            let v = match over.iter().find(|(h, k, _)| *h == hop && k == r) {
                Some((_, _, v)) => v.as_deref(),
                None => self.lookup_ref(hop, r)?,
            };
            match self.mapping.hops[hop].next {
                None => return Ok(v),
                Some(n) => {
                    hop = n;
                    reference = v;
                }
            }
        }
        Ok(None)
    }

    /// [`Fold::lookup_value`], borrowed (no allocation on the hot path).
    fn lookup_ref(&self, hop: usize, reference: &str) -> Result<Option<&str>, Need> {
        // formatted into a reused buffer: this runs several times for every row
        let mut f = self.scratch.borrow_mut();
        f.clear();
        layout::push_lookup_field(&mut f, hop, reference);
        match self.held(&f) {
            Some(v) => Ok(v),
            None => Err(Need::Field(f.clone())),
        }
    }

    /// A stock row's record as Redis will hold it (`None`: no such row counted).
    fn record(&self, field: &str) -> Result<Option<RowRecord>, Need> {
        match self.held(field) {
            Some(v) => Ok(v.and_then(RowRecord::decode)),
            None => Err(Need::Field(field.to_string())),
        }
    }

    /// The dependents of a referenced row.
    fn deps(&self, hop: usize, reference: &str) -> Result<Vec<String>, Need> {
        if !self.deps_known.contains_key(&(hop, reference.to_string())) {
            return Err(Need::Deps {
                hop,
                reference: reference.to_string(),
            });
        }
        let pre = layout::dep_prefix(hop, reference);
        let mut out: Vec<String> = self
            .holders
            .iter()
            .filter(|(f, h)| h.sku.is_some() && f.starts_with(&pre))
            .map(|(f, _)| f[pre.len()..].to_string())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The stock rows whose placement goes through a referenced row of `hop`.
    fn rows_of(&self, hop: usize, reference: &str) -> Result<Vec<String>, Vec<Need>> {
        let spec = &self.mapping.hops[hop];
        if !spec.stock {
            return Ok(Vec::new());
        }
        let members = self.deps(hop, reference).map_err(|n| vec![n])?;
        let Some(prev) = spec.prev else {
            return Ok(members);
        };
        let (mut rows, mut needs) = (Vec::new(), Vec::new());
        for m in members {
            match self.rows_of(prev, &m) {
                Ok(r) => rows.extend(r),
                Err(n) => needs.extend(n),
            }
        }
        if needs.is_empty() {
            Ok(rows)
        } else {
            Err(needs)
        }
    }

    /// Whether the stock table of a row field maps `low_stock` (unknown: as it did).
    fn maps_threshold(&self, field: &str) -> bool {
        layout::table_of_row_field(field)
            .and_then(|t| self.mapping.inventory.iter().find(|m| m.table == t))
            .is_none_or(|m| m.low_stock.is_some())
    }

    /// How a row field's table places its rows (from the mapping).
    fn via_of_row(&self, field: &str) -> Option<Via> {
        let table = layout::table_of_row_field(field)?;
        let m = self.mapping.inventory.iter().find(|m| m.table == table)?;
        let first = |key: &str| self.mapping.first_hop(table, key);
        Some(Via {
            sku: m.sku.lookup().and(first("sku")),
            loc: m
                .location
                .as_ref()
                .map(|l| l.lookup().and(first("location"))),
        })
    }

    /// Where a row counts: (SKU, location), `None` when its lookups do not resolve (or
    /// its SKU is NULL or too long).
    fn place(
        &self,
        via: Via,
        rec: &RowRecord,
        over: &[(usize, String, Option<String>)],
    ) -> Result<Option<(String, String)>, Need> {
        let sku = match via.sku {
            None => rec.sku_in.clone(),
            Some(hop) => self
                .follow(hop, rec.sku_in.as_deref(), over)?
                .map(str::to_string),
        };
        let loc = match via.loc {
            None => Some(String::new()),
            Some(None) => Some(rec.loc_in.clone().unwrap_or_default()),
            Some(Some(hop)) => self
                .follow(hop, rec.loc_in.as_deref(), over)?
                .map(str::to_string),
        };
        Ok(match (sku, loc) {
            (Some(s), Some(l)) if s.len() <= self.mapping.max_sku_bytes => Some((s, l)),
            _ => None,
        })
    }

    /// Put a row where its record says it counts now: out of its old holder, into the new
    /// one with all its values. Returns the record with its new holder.
    fn place_row(
        &mut self,
        field: &str,
        old_holder: Option<&str>,
        mut rec: RowRecord,
        placed: Option<(String, String)>,
    ) -> RowRecord {
        let new_holder = placed.as_ref().map(|(s, _)| s.clone());
        for s in old_holder.into_iter().chain(new_holder.as_deref()) {
            self.touch(s);
        }
        if placed.is_none() {
            self.stats.unresolved_rows += 1;
        }
        let cur = self.cur.as_mut().expect("change inside a transaction");
        if let Some(old) = old_holder
            && new_holder.as_deref() != Some(old)
        {
            cur.skus
                .entry(old.to_string())
                .or_default()
                .put_row(field.to_string(), RowOp::Del);
        }
        if let Some((sku, loc)) = placed {
            // a table without thresholds leaves the one another table's rows set
            let threshold = if self.maps_threshold(field) {
                Field::Val(rec.threshold)
            } else {
                Field::Keep
            };
            let cur = self.cur.as_mut().expect("change inside a transaction");
            cur.skus.entry(sku).or_default().put_row(
                field.to_string(),
                RowOp::Set {
                    location: Field::Val(loc),
                    on_hand: Field::Val(rec.on_hand),
                    reserved: Field::Val(rec.reserved),
                    threshold,
                },
            );
        }
        rec.holder = new_holder;
        rec
    }

    fn set_dep(&mut self, hop: Option<usize>, reference: Option<&str>, member: &str, on: bool) {
        if let (Some(hop), Some(r)) = (hop, reference) {
            self.set_holder(
                layout::dep_field(hop, r, member),
                on.then(|| "1".to_string()),
            );
        }
    }

    /// Work out a change of a stock table whose SKU or location is looked up, reading
    /// only: [`FoldError::Unread`] when the row's record or a lookup it resolves through
    /// is not known (nothing is folded then).
    pub(super) fn plan_stock_records(
        &self,
        r: &InventoryRule,
        c: &Change,
    ) -> Result<StockPlan, FoldError> {
        let lsn = c.commit_lsn;
        let skip = |column: String, reason: &str| {
            Ok(StockPlan::Skip {
                table: r.table.clone(),
                column,
                lsn,
                reason: reason.to_string(),
            })
        };
        const NO_KEY: &str = "the row's key was not sent";
        let old_t = c.old.as_ref().map(|(_, t)| t);
        let old_field = match old_t.or(c.new.as_ref()).map(|t| super::row_key_field(r, t)) {
            Some(Ok(f)) => f,
            Some(Err(col)) => return skip(col, NO_KEY),
            None => return Ok(StockPlan::Nothing),
        };
        let old = if c.op == Op::Insert {
            None
        } else {
            self.record(&old_field).map_err(|_| FoldError::Unread)?
        };
        // Computed once when the key comes from the new row alone (the hot path).
        let new_field = match (old_t, c.new.as_ref()) {
            (_, None) => None,
            (None, Some(_)) => Some(old_field.clone()),
            (Some(_), Some(t)) => match super::row_key_field(r, t) {
                Ok(f) => Some(f),
                Err(col) => return skip(col, NO_KEY),
            },
        };
        let m = &self.mapping.inventory[r.index];
        // The row as it is now, or `None` when it is gone or fails the table's filter.
        let mut new = None;
        let mut filtered = false;
        if let (Some(t), Some(_)) = (c.new.as_ref(), &new_field) {
            let passes = match &r.filter {
                None => true,
                Some(f) => match f.passes(t) {
                    Some(p) => p,
                    None => {
                        return skip(
                            "where".into(),
                            "a filter column was not sent (unchanged TOAST)",
                        );
                    }
                },
            };
            if !passes {
                filtered = true;
            } else {
                let take = |a: Option<&Attr>, was: Option<&Option<String>>| match a {
                    None => Ok(None),
                    Some(a) => match input(t, a) {
                        Input::Val(v) => Ok(v),
                        Input::Keep => was.cloned().ok_or("an unchanged value of a new row"),
                        Input::Bad(why) => Err(why),
                    },
                };
                let sku_in = take(Some(&r.sku), old.as_ref().map(|o| &o.sku_in));
                let loc_in = take(r.location.as_ref(), old.as_ref().map(|o| &o.loc_in));
                let (sku_in, loc_in) = match (sku_in, loc_in) {
                    (Ok(s), Ok(l)) => (s, l),
                    (Err(why), _) | (_, Err(why)) => return skip(m.sku.label(), why),
                };
                let sc = super::Scale {
                    digits: r.scale,
                    scale: self.mapping.scale,
                };
                let kept = |f: Field<i64>, was: Option<i64>| match f {
                    Field::Val(v) => Some(v),
                    Field::Keep => was,
                };
                let on_hand = match sum(t, None, &r.on_hand, &c.rel, sc) {
                    Ok(v) => kept(v, old.as_ref().map(|o| o.on_hand)),
                    Err(e) => return skip(m.on_hand.label(), &e),
                };
                let reserved = match &r.reserved {
                    None => Some(0),
                    Some(cols) => match sum(t, None, cols, &c.rel, sc) {
                        Ok(v) => kept(v, old.as_ref().map(|o| o.reserved)),
                        Err(e) => {
                            let label = m.reserved.as_ref().map(|c| c.label()).unwrap_or_default();
                            return skip(label, &e);
                        }
                    },
                };
                let threshold = match r.low_stock {
                    None => Some(None),
                    Some(i) => match super::quantity(t, None, i, &c.rel, sc) {
                        Ok(Field::Val(v)) => Some(Some(v)),
                        Ok(Field::Keep) => old.as_ref().map(|o| o.threshold),
                        Err(_) if matches!(t.get(i), Some(Datum::Null)) => Some(None),
                        Err(e) => return skip(m.low_stock.clone().unwrap_or_default(), &e),
                    },
                };
                let (Some(on_hand), Some(reserved), Some(threshold)) =
                    (on_hand, reserved, threshold)
                else {
                    return skip(
                        m.on_hand.label(),
                        "an unchanged (TOAST) value of a row the index does not hold",
                    );
                };
                new = Some(RowRecord {
                    holder: None,
                    sku_in,
                    loc_in,
                    on_hand,
                    reserved,
                    threshold,
                });
            }
        }
        let via = Via::of(r);
        let (placed, too_long) = match &new {
            None => (None, false),
            Some(rec) => {
                let p = self.place(via, rec, &[]).map_err(|_| FoldError::Unread)?;
                let too_long = p.is_none()
                    && via.sku.is_none()
                    && rec
                        .sku_in
                        .as_ref()
                        .is_some_and(|s| s.len() > self.mapping.max_sku_bytes);
                (p, too_long)
            }
        };
        Ok(StockPlan::Fold {
            lsn,
            old_field,
            old,
            new_field,
            new,
            placed,
            filtered,
            too_long,
        })
    }

    /// Fold a planned change of a stock table whose SKU or location is looked up.
    pub(super) fn fold_stock_records(&mut self, r: &InventoryRule, plan: StockPlan) {
        let (old_field, old, new_field, new, placed) = match plan {
            StockPlan::Nothing => return,
            StockPlan::Skip {
                table,
                column,
                lsn,
                reason,
            } => {
                self.skip(&table, &column, lsn, reason);
                return;
            }
            StockPlan::Fold {
                lsn,
                old_field,
                old,
                new_field,
                new,
                placed,
                filtered,
                too_long,
            } => {
                if filtered {
                    self.stats.filtered_rows += 1;
                }
                if too_long {
                    let label = self.mapping.inventory[r.index].sku.label();
                    self.skip(&r.table, &label, lsn, SKU_TOO_LONG.into());
                }
                (old_field, old, new_field, new, placed)
            }
        };
        let via = Via::of(r);
        // Out of the old place (under the old key), then into the new.
        let old_holder = old.as_ref().and_then(|o| o.holder.clone());
        let field_changed = new_field.as_deref().is_some_and(|f| f != old_field);
        // Dependents change only with a reference (the hot path, a quantity update,
        // writes none).
        let same_refs = |o: &RowRecord, n: &RowRecord| {
            (via.sku.is_none() || o.sku_in == n.sku_in)
                && (via.loc.flatten().is_none() || o.loc_in == n.loc_in)
        };
        let deps_unchanged =
            !field_changed && matches!((&old, &new), (Some(o), Some(n)) if same_refs(o, n));
        if let Some(o) = &old
            && !deps_unchanged
        {
            self.set_dep(via.sku, o.sku_in.as_deref(), &old_field, false);
            self.set_dep(via.loc.flatten(), o.loc_in.as_deref(), &old_field, false);
        }
        if field_changed || new.is_none() {
            if let Some(h) = &old_holder {
                let cur = self.cur.as_mut().expect("change inside a transaction");
                cur.skus
                    .entry(h.clone())
                    .or_default()
                    .put_row(old_field.clone(), RowOp::Del);
                self.touch(h);
            }
            self.set_holder(old_field.clone(), None);
        }
        if let (Some(rec), Some(field)) = (new, new_field) {
            let prior = if field_changed {
                None
            } else {
                old_holder.as_deref()
            };
            let rec = self.place_row(&field, prior, rec, placed);
            if !deps_unchanged {
                self.set_dep(via.sku, rec.sku_in.as_deref(), &field, true);
                self.set_dep(via.loc.flatten(), rec.loc_in.as_deref(), &field, true);
            }
            // Only quantities of a row that stays where it counts: Redis' record need not
            // change (the holder's hash has them); the hot path writes no index. A plain
            // SKU or location column is an input too: the record must keep its new text
            // (a later change of a lookup moves the row by the record alone).
            let local = deps_unchanged
                && rec.holder.is_some()
                && old.as_ref().is_some_and(|o| {
                    o.holder == rec.holder
                        && o.threshold == rec.threshold
                        && o.sku_in == rec.sku_in
                        && o.loc_in == rec.loc_in
                });
            self.put_holder(field, Some(rec.encode()), local);
        }
    }

    /// A change of a referenced table: each hop's value of the row, and every stock row
    /// that depends on it moves to where it resolves now.
    pub(super) fn fold_lookup(&mut self, l: &LookupRule, c: &Change) {
        let lsn = c.commit_lsn;
        for hr in &l.hops {
            let changes = match self.hop_changes(hr, c) {
                Ok(ch) => ch,
                Err(_) => {
                    self.skip(
                        &l.table,
                        "key",
                        lsn,
                        "internal: the lookup state was not read for this row".into(),
                    );
                    continue;
                }
            };
            for (k, v) in changes {
                let old = match self.lookup_value(hr.hop, &k) {
                    Ok(v) => v,
                    Err(_) => {
                        self.skip(
                            &l.table,
                            "key",
                            lsn,
                            "internal: the lookup state was not read for this row".into(),
                        );
                        continue;
                    }
                };
                if old == v {
                    continue;
                }
                let rows = match self.rows_of(hr.hop, &k) {
                    Ok(rows) => rows,
                    Err(_) => {
                        self.skip(
                            &l.table,
                            "key",
                            lsn,
                            "internal: the dependents were not read for this row".into(),
                        );
                        continue;
                    }
                };
                self.stats.lookup_changes += 1;
                self.set_holder(layout::lookup_field(hr.hop, &k), v.clone());
                if let Some(next) = self.mapping.hops[hr.hop].next {
                    self.set_dep(Some(next), old.as_deref(), &k, false);
                    self.set_dep(Some(next), v.as_deref(), &k, true);
                }
                for row in rows {
                    let (Ok(Some(rec)), Some(via)) = (self.record(&row), self.via_of_row(&row))
                    else {
                        continue;
                    };
                    let placed = match self.place(via, &rec, &[]) {
                        Ok(p) => p,
                        Err(_) => {
                            self.skip(
                                &l.table,
                                "key",
                                lsn,
                                "internal: the lookup state was not read for a dependent row"
                                    .into(),
                            );
                            continue;
                        }
                    };
                    let holder = rec.holder.clone();
                    let rec = self.place_row(&row, holder.as_deref(), rec, placed);
                    self.set_holder(row, Some(rec.encode()));
                }
            }
        }
    }

    /// An activity row's SKU through a lookup: `Ok(None)` when it does not resolve.
    pub(super) fn activity_sku(&self, a: &Attr, t: &Tuple) -> Result<Option<String>, &'static str> {
        let Attr::Lookup { hop, .. } = a else {
            return match input(t, a) {
                Input::Val(v) => Ok(v),
                _ => Err("SKU is NULL or not text"),
            };
        };
        match input(t, a) {
            Input::Val(r) => self
                .follow(*hop, r.as_deref(), &[])
                .map(|v| v.map(str::to_string))
                .map_err(|_| "internal: the lookup state was not read for this row"),
            Input::Keep => Ok(None),
            Input::Bad(why) => Err(why),
        }
    }
}
