//! A pure in-memory model of the Redis apply step, with the same semantics as the Lua
//! script (`sinks/redis/apply.lua`). Property tests fold transactions in different splits
//! and apply them here; an integration test applies random pieces to both this model and
//! a real Redis and compares the hashes.

use super::batch::{Batch, Entry, TraceOp};
use super::{Field, Piece, RowOp};
use crate::lsn::Lsn;
use std::collections::{BTreeMap, BTreeSet};

/// Settings the apply step needs besides the pieces.
#[derive(Clone, Debug)]
pub struct ApplyParams {
    /// Minutes of window buckets kept (0: none).
    pub keep_minutes: i64,
    /// Default low-stock threshold.
    pub low_stock: i64,
    /// Every counter name (to decide whether a SKU is gone).
    pub counters: Vec<String>,
    /// Bootstrap/resync: set alert state without raising alerts.
    pub quiet: bool,
}

/// An alert raised by a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub sku: String,
    pub kind: &'static str,
    pub available: i64,
    pub threshold: i64,
    pub lsn: u64,
    pub ts: i64,
}

/// One SKU hash: field -> value, plus the distinct-user sets (HyperLogLogs in Redis).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SkuHash {
    pub fields: BTreeMap<String, String>,
    pub users: BTreeMap<String, BTreeSet<String>>,
}

/// The model store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Store {
    pub skus: BTreeMap<String, SkuHash>,
}

/// Hysteresis above the threshold before a low SKU re-arms.
pub fn hysteresis(threshold: i64) -> i64 {
    (threshold / 5).max(1)
}

fn get_i(h: &BTreeMap<String, String>, f: &str) -> i64 {
    h.get(f).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn incr(h: &mut BTreeMap<String, String>, f: &str, by: i64) -> i64 {
    let v = get_i(h, f) + by;
    h.insert(f.to_string(), v.to_string());
    v
}

/// A stock row contribution: (location, on_hand, reserved).
fn parse_row(v: &str) -> (String, i64, i64) {
    let j: serde_json::Value = serde_json::from_str(v).unwrap_or_default();
    (
        j[0].as_str().unwrap_or("").to_string(),
        j[1].as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
        j[2].as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
    )
}

fn remove_row(h: &mut BTreeMap<String, String>, field: &str) -> Option<(String, i64, i64)> {
    let old = h.remove(field)?;
    let (loc, on, res) = parse_row(&old);
    incr(h, "on_hand", -on);
    incr(h, "reserved", -res);
    incr(h, "rows", -1);
    if !loc.is_empty() {
        incr(h, &format!("loc:{loc}:on_hand"), -on);
        incr(h, &format!("loc:{loc}:reserved"), -res);
        if incr(h, &format!("loc:{loc}:rows"), -1) <= 0 {
            for s in ["on_hand", "reserved", "rows"] {
                h.remove(&format!("loc:{loc}:{s}"));
            }
        }
    }
    Some((loc, on, res))
}

fn add_row(h: &mut BTreeMap<String, String>, field: &str, loc: &str, on: i64, res: i64) {
    h.insert(
        field.to_string(),
        serde_json::json!([loc, on.to_string(), res.to_string()]).to_string(),
    );
    incr(h, "on_hand", on);
    incr(h, "reserved", res);
    incr(h, "rows", 1);
    if !loc.is_empty() {
        incr(h, &format!("loc:{loc}:on_hand"), on);
        incr(h, &format!("loc:{loc}:reserved"), res);
        incr(h, &format!("loc:{loc}:rows"), 1);
    }
}

/// An entry's range straddles what a SKU already holds: part of it was applied before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub sku: String,
}

/// Whether (al, ap) < (bl, bp).
fn before(a: (u64, u32), b: (u64, u32)) -> bool {
    a < b
}

fn fence_of(h: &BTreeMap<String, String>) -> Option<(u64, u32)> {
    let l = h.get("lsn").and_then(|v| v.parse::<u64>().ok())?;
    Some((l, get_i(h, "piece").max(0) as u32))
}

impl Store {
    /// Apply one piece alone (no merging); returns the alerts raised. A truncate piece
    /// clears its tables from every SKU.
    pub fn apply(&mut self, p: &Piece, params: &ApplyParams) -> Vec<Alert> {
        let mut entries = Vec::new();
        if !p.truncate.is_empty() {
            let skus: Vec<String> = self.skus.keys().cloned().collect();
            entries.extend(Batch::truncate(p, &skus));
        }
        let mut b = Batch::new(Lsn(u64::MAX));
        b.push(p.clone());
        entries.extend(b.take());
        self.apply_entries(&entries, params)
            .expect("single pieces never straddle a fence")
    }

    /// Apply one call's entries, in order; returns the alerts raised, or refuses the
    /// whole call (changing nothing) when an entry straddles a SKU's fence.
    pub fn apply_entries(
        &mut self,
        entries: &[Entry],
        params: &ApplyParams,
    ) -> Result<Vec<Alert>, Split> {
        for e in entries {
            let (first, last) = ((e.first.0.0, e.first.1), (e.last.0.0, e.last.1));
            if let Some(f) = self.skus.get(&e.sku).and_then(|h| fence_of(&h.fields))
                && first != last
                && !before(f, first)
                && before(f, last)
            {
                return Err(Split { sku: e.sku.clone() });
            }
        }
        let mut alerts = Vec::new();
        for e in entries {
            self.apply_entry(e, params, &mut alerts);
        }
        Ok(alerts)
    }

    fn apply_entry(&mut self, e: &Entry, params: &ApplyParams, alerts: &mut Vec<Alert>) {
        let last = (e.last.0.0, e.last.1);
        let h = self.skus.entry(e.sku.clone()).or_default();
        if fence_of(&h.fields).is_some_and(|f| !before(f, last)) {
            return;
        }
        let f = &mut h.fields;
        let mut changed = e.truncate.is_empty();
        for table in &e.truncate {
            let prefix = crate::sinks::layout::row_field_prefix(table);
            let rows: Vec<String> = f
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            for r in rows {
                remove_row(f, &r);
                changed = true;
            }
        }
        // No alert at a TRUNCATE: the transaction may refill the table; its final piece
        // evaluates every SKU (evaluation-only entries, see `Batch::evaluate`).
        if !e.trace.is_empty() {
            // Alerts after each transaction, from the levels its changes imply.
            let mut avail = get_i(f, "on_hand") - get_i(f, "reserved");
            let mut has_stock = f.contains_key("rows");
            let mut cur: Vec<Option<(i64, i64)>> = e
                .rows
                .iter()
                .map(|(field, _)| {
                    f.get(field).map(|v| {
                        let (_, o, r) = parse_row(v);
                        (o, r)
                    })
                })
                .collect();
            let mut thr = f.get("threshold").cloned();
            for rec in &e.trace {
                let i = rec.row as usize;
                match rec.op() {
                    TraceOp::None => {}
                    TraceOp::Del => {
                        has_stock = true;
                        if let Some((o, r)) = cur[i].take() {
                            avail -= o - r;
                        }
                    }
                    TraceOp::Set {
                        on_hand, reserved, ..
                    } => {
                        has_stock = true;
                        let (oo, or) = cur[i].unwrap_or((0, 0));
                        let (on, res) = (on_hand.or(oo), reserved.or(or));
                        avail += (on - res) - (oo - or);
                        cur[i] = Some((on, res));
                    }
                }
                // any record may write the threshold (a piece's rides on its last)
                match rec.threshold() {
                    Field::Val(Some(t)) => thr = Some(t.to_string()),
                    Field::Val(None) => thr = None,
                    Field::Keep => {}
                }
                if rec.eval {
                    let t = thr
                        .as_deref()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(params.low_stock);
                    evaluate(
                        &e.sku,
                        f,
                        has_stock,
                        avail,
                        t,
                        rec.lsn.0,
                        rec.commit_ms,
                        params,
                        alerts,
                    );
                }
            }
            match thr {
                Some(t) => f.insert("threshold".into(), t),
                None => f.remove("threshold"),
            };
        }
        if !e.rows.is_empty() {
            // Any row op makes the SKU a stock SKU (0 until rows add up).
            for s in ["rows", "on_hand", "reserved"] {
                f.entry(s.to_string()).or_insert_with(|| "0".into());
            }
        }
        for (field, op) in &e.rows {
            let old = remove_row(f, field);
            if let RowOp::Set {
                location,
                on_hand,
                reserved,
                ..
            } = op
            {
                let (ol, oo, or) = old.unwrap_or_default();
                let (loc, on, res) = (location.or(ol), on_hand.or(oo), reserved.or(or));
                add_row(f, field, &loc, on, res);
            }
        }
        let stocked = get_i(f, "rows") > 0;
        let guarded = e.counters.keys().filter(|c| is_guarded(c)).count()
            + e.buckets.keys().filter(|(c, _)| is_guarded(c)).count()
            + e.users.keys().filter(|(c, _)| is_guarded(c)).count();
        let only_guarded = e.truncate.is_empty()
            && e.rows.is_empty()
            && e.trace.is_empty()
            && guarded > 0
            && guarded == e.counters.len() + e.buckets.len() + e.users.len();
        if only_guarded && !stocked && fence_of(f).is_none() {
            // Nothing counts, and an unknown SKU gets no hash.
            changed = false;
        }
        for (c, v) in &e.counters {
            if let Some(c) = counted(c, stocked) {
                incr(f, c, *v);
            }
        }
        // Grouped by the name as sent: a guarded group is a group of its own.
        let mut by_counter: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
        for ((c, m), v) in &e.buckets {
            by_counter.entry(c).or_default().push((*m, *v));
        }
        let mut cutoffs: BTreeMap<String, i64> = BTreeMap::new();
        for (raw, bs) in by_counter {
            if params.keep_minutes <= 0 {
                continue;
            }
            let Some(c) = counted(raw, stocked) else {
                continue;
            };
            let wmax_f = format!("wmax:{c}");
            let old_max = f.get(&wmax_f).and_then(|v| v.parse::<i64>().ok());
            let new_max = bs.iter().map(|(m, _)| *m).chain(old_max).max().unwrap_or(0);
            let cutoff = new_max - params.keep_minutes + 1;
            f.insert(wmax_f, new_max.to_string());
            let pre = format!("w:{c}:");
            let stale: Vec<String> = f
                .keys()
                .filter(|k| {
                    k.strip_prefix(&pre)
                        .and_then(|m| m.parse::<i64>().ok())
                        .is_some_and(|m| m < cutoff)
                })
                .cloned()
                .collect();
            for k in stale {
                f.remove(&k);
            }
            // Per-minute distinct users live only inside the window, like the buckets.
            let upre = format!("{c}:");
            h.users.retain(|k, _| {
                k.strip_prefix(&upre)
                    .and_then(|m| m.parse::<i64>().ok())
                    .is_none_or(|m| m >= cutoff)
            });
            for (m, v) in bs {
                if m >= cutoff {
                    incr(f, &format!("w:{c}:{m}"), v);
                }
            }
            cutoffs.insert(c.to_string(), cutoff);
        }
        for ((c, m), us) in &e.users {
            let Some(c) = counted(c, stocked) else {
                continue;
            };
            h.users
                .entry(c.to_string())
                .or_default()
                .extend(us.iter().map(|u| u.to_string()));
            if cutoffs.get(c).is_some_and(|cut| *m >= *cut) {
                h.users
                    .entry(format!("{c}:{m}"))
                    .or_default()
                    .extend(us.iter().map(|u| u.to_string()));
            }
        }
        if changed {
            finish(&mut h.fields, last, e.commit_ms, params);
        }
    }
}

/// A counter name of an `[[activity]]` table with `known_skus_only`: `?` + the counter.
pub fn is_guarded(c: &str) -> bool {
    c.starts_with('?')
}

/// The counter a name counts under: itself, or for a guarded name the counter when the
/// SKU has stock rows, else `None` (not counted).
pub fn counted(c: &str, stocked: bool) -> Option<&str> {
    match c.strip_prefix('?') {
        None => Some(c),
        Some(bare) => stocked.then_some(bare),
    }
}

/// Fence, totals and `gone` after a SKU's entry was applied.
fn finish(f: &mut BTreeMap<String, String>, at: (u64, u32), commit_ms: i64, params: &ApplyParams) {
    f.insert("lsn".into(), at.0.to_string());
    f.insert("piece".into(), at.1.to_string());
    f.insert("ts".into(), commit_ms.to_string());
    let has_stock = f.contains_key("rows");
    if has_stock {
        let avail = get_i(f, "on_hand") - get_i(f, "reserved");
        f.insert("available".into(), avail.to_string());
    }
    let rows = get_i(f, "rows");
    let any_counter = params.counters.iter().any(|c| get_i(f, c) != 0);
    if rows <= 0 && !any_counter {
        f.insert("gone".into(), "1".into());
    } else {
        f.remove("gone");
    }
}

/// Low-stock alert detection, once per transaction and SKU, at the given level. A SKU's
/// first classification is silent (it crossed nothing).
#[allow(clippy::too_many_arguments)]
fn evaluate(
    sku: &str,
    f: &mut BTreeMap<String, String>,
    has_stock: bool,
    avail: i64,
    thr: i64,
    lsn: u64,
    commit_ms: i64,
    params: &ApplyParams,
    alerts: &mut Vec<Alert>,
) {
    if !has_stock {
        return;
    }
    let prev = f.get("alert_state").cloned();
    let mut state = if avail <= 0 {
        "out"
    } else if avail <= thr {
        "low"
    } else {
        "ok"
    };
    if prev.as_deref() == Some("low") && state == "ok" && avail <= thr + hysteresis(thr) {
        state = "low";
    }
    let kind = match (prev.as_deref().unwrap_or("new"), state) {
        ("new", _) => None,
        (p, "out") if p != "out" => Some("out_of_stock"),
        ("out", s) if s != "out" => Some("back_in_stock"),
        ("ok", "low") => Some("low_stock"),
        _ => None,
    };
    f.insert("alert_state".into(), state.into());
    if let (Some(kind), false) = (kind, params.quiet) {
        let a = Alert {
            sku: sku.to_string(),
            kind,
            available: avail,
            threshold: thr,
            lsn,
            ts: commit_ms,
        };
        let mut list: Vec<serde_json::Value> = f
            .get("alerts")
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default();
        list.push(serde_json::json!({"type": kind, "available": avail, "threshold": thr, "lsn": lsn.to_string(), "ts": commit_ms}));
        if list.len() > 50 {
            list.remove(0);
        }
        f.insert("alerts".into(), serde_json::Value::Array(list).to_string());
        alerts.push(a);
    }
}
