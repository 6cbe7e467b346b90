//! Thin apply: entries worked out here, written by a fenced compare-and-set.
//!
//! The apply script (`apply.lua`) reads each SKU hash, folds the entry into it and
//! writes it back; its cost is the Lua interpreter, 20-85 µs of Redis CPU per entry on
//! the benchmark machines, and Redis is single-threaded. For the commonest entries,
//! stock rows, counters, window buckets and distinct users (no TRUNCATE), the same
//! arithmetic runs here instead, on the fields one pipelined HMGET per SKU read
//! ([`reads`]), and `thin.lua` only checks that the hash still holds the fence (`lsn`,
//! `piece`) that read saw before it writes the result (HDEL, HSET, the distinct-user
//! HyperLogLogs' PFADD, DEL and EXPIREAT, the change index): a few µs per entry.
//!
//! Exactness: each hash's write carries its new fence in the same HSET, so a replay
//! skips it as before. Whatever this module cannot decide exactly as the script would
//! ([`plan`] returns `None`) goes to the script: an alert to raise (its history entry
//! and `alerts` list are the script's), a stored value that is not canonical, a field
//! the read did not fetch, a counter or window the mapping does not name, a minute
//! beyond 10^12, a fence at or past the entry (replays and refused merges), guarded
//! activity alone for a SKU without a hash.
//! A hash that changed between the read and the write (its fence differs) is left alone
//! by `thin.lua` and applied by the script. The semantics are `apply.lua`'s, line for
//! line (the property test in `tests/it/apply_script.rs` compares both byte for byte).
//!
//! Sans-IO: the caller reads and writes (`Applier::apply`).

use super::ApplySettings;
use crate::fold::batch::{Entry, trace_flags};
use crate::fold::model::{counted, is_guarded};
use crate::fold::{Field, RowOp, UserId};
use crate::sinks::layout::{bucket_field, users_minute_suffix, users_suffix, wmax_field};
use crate::units;
use std::borrow::Cow;

/// The fields every thin read asks for, in this order (then the counters, then the
/// entry's rows and locations).
const BASE: [&str; 8] = [
    "lsn",
    "piece",
    "rows",
    "on_hand",
    "reserved",
    "gone",
    "threshold",
    "alert_state",
];

/// A SKU hash's fields written per entry at most (Lua's `unpack` has a stack limit).
const MAX_FIELDS: usize = 1000;

/// The fields to read for `e` if it may be applied thin, else `None`.
pub fn reads<'a>(e: &'a Entry, s: &'a ApplySettings) -> Option<Vec<Cow<'a, str>>> {
    if !e.truncate.is_empty() || (e.rows.len() + e.buckets.len()) * 4 > MAX_FIELDS {
        return None;
    }
    // A counter the mapping does not name is read by the script one by one (and its
    // window's high-water mark is not read at all).
    let configured = |c: &crate::fold::Name| {
        let c = c.strip_prefix('?').unwrap_or(c);
        s.counters.iter().any(|x| x == c)
    };
    if !e.counters.keys().all(configured)
        || !e.buckets.keys().all(|(c, _)| configured(c))
        || !e.users.keys().all(|(c, _)| configured(c))
    {
        return None;
    }
    let mut f: Vec<Cow<'a, str>> =
        Vec::with_capacity(BASE.len() + s.counters.len() + 2 * e.buckets.len() + 4 * e.rows.len());
    f.extend(BASE.iter().map(|s| Cow::Borrowed(*s)));
    f.extend(s.counters.iter().map(|c| Cow::Borrowed(c.as_str())));
    // the high-water mark of each window the entry adds to, and its buckets
    for ((c, m), _) in &e.buckets {
        let c = c.strip_prefix('?').unwrap_or(c);
        for name in [wmax_field(c), bucket_field(c, *m)] {
            if !f.contains(&Cow::Borrowed(name.as_str())) {
                f.push(Cow::Owned(name));
            }
        }
    }
    for (field, _) in &e.rows {
        f.push(Cow::Borrowed(field.as_str()));
    }
    for (_, op) in &e.rows {
        if let RowOp::Set {
            location: Field::Val(loc),
            ..
        } = op
            && !loc.is_empty()
        {
            for what in ["on_hand", "reserved", "rows"] {
                let name = loc_field(loc, what);
                if !f.iter().any(|x| *x == name) {
                    f.push(Cow::Owned(name));
                }
            }
        }
    }
    Some(f)
}

/// What `thin.lua` writes for one entry (field names borrowed from the entry where they
/// can be: this runs for most entries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThinWrite<'a> {
    /// The fence the read saw (`None`: no hash, or no such field), as the hash holds it
    /// ([`plan`] takes only the canonical decimals skusync writes, so these print back
    /// to the same strings).
    pub expect_lsn: Option<u64>,
    pub expect_piece: Option<u32>,
    /// The entry's fence, the change index's score.
    pub lsn: u64,
    /// Fields to set.
    pub set: Sets<'a>,
    /// Fields to delete.
    pub del: Vec<Cow<'a, str>>,
    /// The entry's distinct-user keys, written before the hash (see thin.lua), in this order.
    pub keys: Vec<KeyOp<'a>>,
}

/// A write to one of the SKU's distinct-user HyperLogLogs, named by its suffix to the
/// SKU hash's key (`:u:<counter>` or `:u:<counter>:<minute>`, the same slot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOp<'a> {
    /// DEL: a minute that left the window.
    Del(String),
    /// PFADD of these users (never empty).
    Add(String, &'a [UserId]),
    /// EXPIREAT, in unix seconds: a minute's users outlive its window by a minute.
    ExpireAt(String, i64),
}

/// The fields a write sets, in order: each name borrowed (from the entry, or a fixed
/// one) or made for this write, and each value, the made names and the values in one
/// buffer. One allocation per entry instead of one per field: in the 1M-row
/// transaction's profile, freeing the per-field strings was 5% of skusync's CPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sets<'a> {
    buf: String,
    /// (name, value's end in `buf`); a value starts where the one before it ended, or
    /// after its made name.
    items: Vec<(Name<'a>, usize)>,
}

/// A field name of [`Sets`]: borrowed, or the range of `buf` it was written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Name<'a> {
    Ref(&'a str),
    Buf(usize, usize),
}

impl<'a> Sets<'a> {
    fn with_capacity(fields: usize, bytes: usize) -> Self {
        Sets {
            buf: String::with_capacity(bytes),
            items: Vec::with_capacity(fields),
        }
    }

    /// Sets `name` to what `value` appends.
    fn put(&mut self, name: &'a str, value: impl FnOnce(&mut String)) {
        value(&mut self.buf);
        self.items.push((Name::Ref(name), self.buf.len()));
    }

    /// Sets the field `name` appends to what `value` appends.
    fn put_made(&mut self, name: impl FnOnce(&mut String), value: impl FnOnce(&mut String)) {
        let start = self.buf.len();
        name(&mut self.buf);
        let end = self.buf.len();
        value(&mut self.buf);
        self.items.push((Name::Buf(start, end), self.buf.len()));
    }

    /// The number of fields.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The bytes of every name and value (to size the call they go into).
    pub fn bytes(&self) -> usize {
        let borrowed: usize = (self.items.iter())
            .map(|(n, _)| match n {
                Name::Ref(r) => r.len(),
                Name::Buf(..) => 0,
            })
            .sum();
        self.buf.len() + borrowed
    }

    /// Every (name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut at = 0;
        self.items.iter().map(move |&(n, end)| {
            let name = match n {
                Name::Ref(r) => r,
                Name::Buf(a, b) => {
                    at = b;
                    &self.buf[a..b]
                }
            };
            let value = &self.buf[at..end];
            at = end;
            (name, value)
        })
    }
}

fn loc_field(loc: &str, what: &str) -> String {
    let mut f = String::with_capacity(loc.len() + what.len() + 5);
    loc_name(&mut f, loc, what);
    f
}

/// Appends [`loc_field`]'s name to `out`.
fn loc_name(out: &mut String, loc: &str, what: &str) {
    out.push_str("loc:");
    out.push_str(loc);
    out.push(':');
    out.push_str(what);
}

/// Minutes the script names and computes with as it would integers: Lua 5.1 writes a
/// number into a key or field name with `%.14g`, which is the integer itself only below
/// 10^14 (real minutes are about 3 * 10^7; `(minute + keep + 1) * 60` must fit too).
fn minute(m: i64) -> Option<i64> {
    (m.unsigned_abs() < 1_000_000_000_000).then_some(m)
}

/// The state of the hash as the script's `load` sees it, and the changes so far.
struct Hash<'a, 'r, V> {
    fields: &'r [Cow<'r, str>],
    values: &'r [Option<V>],
    rows: i64,
    on: i64,
    res: i64,
    has_stock: bool,
    threshold: Option<String>,
    had_threshold: bool,
    thr_dirty: bool,
    alert_state: Option<String>,
    state_dirty: bool,
    /// Rows changed, in order: (field, new contribution or `None` when removed).
    rowt: Vec<(&'a str, Option<Row>)>,
    /// Locations changed, in order, with (on, res, rows) deltas.
    locs: Vec<(String, [i64; 3])>,
}

/// A stock row's contribution: (location, on_hand, reserved) in units.
type Row = (String, i64, i64);

impl<'a, V: AsRef<str>> Hash<'a, '_, V> {
    /// A field the read fetched: `Some(None)` when the hash has none, `None` when it was
    /// not read (the entry goes to the script).
    fn read(&self, f: &str) -> Option<Option<&str>> {
        let i = self.fields.iter().position(|x| x == f)?;
        Some(self.values.get(i)?.as_ref().map(|v| v.as_ref()))
    }

    /// [`Hash::read`] of a location's field, its name made in `scratch`.
    fn read_loc(&self, scratch: &mut String, loc: &str, what: &str) -> Option<Option<&str>> {
        scratch.clear();
        loc_name(scratch, loc, what);
        self.read(scratch)
    }

    /// The row's current contribution (`Some(None)`: no row).
    fn row_get(&self, f: &str, scale: u32) -> Option<Option<Row>> {
        if let Some((_, t)) = self.rowt.iter().find(|(k, _)| *k == f) {
            return Some(t.clone());
        }
        match self.read(f)? {
            None => Some(None),
            Some(raw) => {
                let (l, o, r): (String, String, String) = serde_json::from_str(raw).ok()?;
                Some(Some((l, qty(&o, scale)?, qty(&r, scale)?)))
            }
        }
    }

    fn row_put(&mut self, f: &'a str, t: Option<Row>) {
        match self.rowt.iter_mut().find(|(k, _)| *k == f) {
            Some(slot) => slot.1 = t,
            None => self.rowt.push((f, t)),
        }
    }

    fn loc_add(&mut self, loc: &str, d: [i64; 3]) -> Option<()> {
        if loc.is_empty() {
            return Some(());
        }
        let i = match self.locs.iter().position(|(l, _)| l == loc) {
            Some(i) => i,
            None => {
                self.locs.push((loc.to_string(), [0; 3]));
                self.locs.len() - 1
            }
        };
        for (a, b) in self.locs[i].1.iter_mut().zip(d) {
            *a = exact(*a + b)?;
        }
        Some(())
    }

    fn remove_row(&mut self, f: &'a str, scale: u32) -> Option<Option<Row>> {
        let old = self.row_get(f, scale)?;
        if let Some((loc, on, res)) = &old {
            self.on = exact(self.on - on)?;
            self.res = exact(self.res - res)?;
            self.rows = exact(self.rows - 1)?;
            self.loc_add(loc, [-on, -res, -1])?;
            self.row_put(f, None);
        }
        Some(old)
    }
}

/// Appends `s` as the script's JSON library (lua-cjson) writes a string's contents: `"`,
/// `\` and `/` escaped with a backslash, control characters as `\b \t \n \f \r` or
/// `\u00XX` (DEL too), every other byte (UTF-8 included) as it is.
fn cjson_escape(out: &mut String, s: &str) {
    if !s
        .bytes()
        .any(|b| b < 0x20 || b == 0x7f || matches!(b, b'"' | b'\\' | b'/'))
    {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
}

/// `v` if Lua's doubles hold it exactly (every value and every intermediate result of
/// the script's arithmetic must be: beyond 2^53 the script rounds, so such an entry is
/// left to it).
fn exact(v: i64) -> Option<i64> {
    (v.unsigned_abs() < 1 << 53).then_some(v)
}

/// A stored quantity (a decimal in units of 10^-scale), or `None` where the script might
/// read it otherwise (the entry goes to the script).
fn qty(s: &str, scale: u32) -> Option<i64> {
    exact(units::parse(s, scale)?)
}

/// A stored integer written by the script itself (`rows`, `piece`).
fn int(s: &str) -> Option<i64> {
    exact(canonical(s)?)
}

/// `s` as a `T` where it is the decimal `T` prints as (what skusync and the script
/// write), so that it prints back to the very string read.
fn canonical<T: std::str::FromStr + itoa::Integer + Copy>(s: &str) -> Option<T> {
    let v: T = s.parse().ok()?;
    (itoa::Buffer::new().format(v) == s).then_some(v)
}

/// Work out the writes of an entry [`reads`] accepted from what it fetched (`values` in
/// the order of `fields`), exactly as `apply.lua` would; `None` sends it to the script.
pub fn plan<'a, V: AsRef<str>>(
    e: &'a Entry,
    fields: &[Cow<'_, str>],
    values: &[Option<V>],
    s: &ApplySettings,
    quiet: bool,
) -> Option<ThinWrite<'a>> {
    let scale = s.scale;
    let unit = 10i64.checked_pow(scale)?;
    let low = exact(s.low_stock.checked_mul(unit)?)?;
    let get = |i: usize| values.get(i).and_then(|v| v.as_ref().map(|v| v.as_ref()));
    // The fence: only an entry wholly after what the hash holds (replays and straddles
    // are the script's).
    let expect_lsn: Option<u64> = match get(0) {
        Some(l) => Some(canonical(l)?),
        None => None,
    };
    let expect_piece: Option<u32> = match get(1) {
        Some(p) => Some(canonical(p)?),
        None => None,
    };
    if let Some(lsn) = expect_lsn
        && (lsn, expect_piece.unwrap_or(0)) >= (e.first.0.0, e.first.1)
    {
        return None;
    }
    let mut counters = s
        .counters
        .iter()
        .enumerate()
        .map(|(i, _)| get(BASE.len() + i).map_or(Some(0), |v| qty(v, scale)))
        .collect::<Option<Vec<i64>>>()?;
    let threshold = get(6).map(str::to_string);
    let mut h = Hash {
        fields,
        values,
        rows: get(2).map_or(Some(0), int)?,
        on: get(3).map_or(Some(0), |v| qty(v, scale))?,
        res: get(4).map_or(Some(0), |v| qty(v, scale))?,
        has_stock: get(2).is_some(),
        had_threshold: threshold.is_some(),
        threshold,
        thr_dirty: false,
        alert_state: get(7).map(str::to_string),
        state_dirty: false,
        rowt: Vec::new(),
        locs: Vec::new(),
    };
    let was_gone = get(5) == Some("1");

    // The trace: the level after each change, alerts where a transaction ends
    // (`run_trace`).
    if !e.trace.is_empty() {
        let mut avail = exact(h.on - h.res)?;
        let mut has = h.has_stock;
        // each row's level so far: None = not yet looked up, Some(None) = no row
        let mut cur: Vec<Option<Option<(i64, i64)>>> = vec![None; e.rows.len()];
        for rec in &e.trace {
            let flags = rec.flags;
            if flags & trace_flags::NO_ROW == 0 {
                has = true;
                let idx = rec.row as usize;
                let now = match cur.get(idx)? {
                    Some(c) => *c,
                    None => h
                        .row_get(&e.rows.get(idx)?.0, scale)?
                        .map(|(_, o, r)| (o, r)),
                };
                if flags & trace_flags::DEL != 0 {
                    if let Some((oo, orr)) = now {
                        avail = exact(avail - exact(oo - orr)?)?;
                    }
                    cur[idx] = Some(None);
                } else {
                    let (oo, orr) = now.unwrap_or((0, 0));
                    let [on, res, _] = rec.values.map(exact);
                    let (mut on, mut res) = (on?, res?);
                    if flags & trace_flags::ON_KEEP != 0 {
                        on = oo;
                    }
                    if flags & trace_flags::RES_KEEP != 0 {
                        res = orr;
                    }
                    // as the script evaluates `avail + (on - res) - (oo - orr)`
                    avail = exact(exact(avail + exact(on - res)?)? - exact(oo - orr)?)?;
                    cur[idx] = Some(Some((on, res)));
                }
            }
            // any record may write the threshold (a piece's rides on its last)
            if flags & trace_flags::THR_SET != 0 {
                h.threshold = Some(units::format(exact(rec.values[2])?, scale));
                h.thr_dirty = true;
            } else if flags & trace_flags::THR_CLEAR != 0 {
                h.threshold = None;
                h.thr_dirty = true;
            }
            if rec.eval && has {
                // `evaluate`: an alert to raise is the script's (history, `alerts`).
                let thr = match &h.threshold {
                    Some(t) => qty(t, scale)?,
                    None => low,
                };
                let prev = h.alert_state.as_deref();
                let mut state = if avail <= 0 {
                    "out"
                } else if avail <= thr {
                    "low"
                } else {
                    "ok"
                };
                let hyst = unit.max(thr.div_euclid(5));
                if prev == Some("low") && state == "ok" && avail <= exact(thr + hyst)? {
                    state = "low";
                }
                let alert = match prev {
                    None => false,
                    Some(p) => {
                        (state == "out" && p != "out")
                            || (p == "out" && state != "out")
                            || (p == "ok" && state == "low")
                    }
                };
                if alert && !quiet {
                    return None;
                }
                if prev != Some(state) {
                    h.alert_state = Some(state.to_string());
                    h.state_dirty = true;
                }
            }
        }
    }

    // The final rows (`apply_rows`).
    if !e.rows.is_empty() {
        h.has_stock = true;
    }
    for (f, op) in &e.rows {
        let old = h.remove_row(f, scale)?;
        if let RowOp::Set {
            location,
            on_hand,
            reserved,
            ..
        } = op
        {
            let (ol, oo, orr) = old.unwrap_or_default();
            let (loc, on, res) = (location.or(ol), on_hand.or(oo), reserved.or(orr));
            let (on, res) = (exact(on)?, exact(res)?);
            h.on = exact(h.on + on)?;
            h.res = exact(h.res + res)?;
            h.rows = exact(h.rows + 1)?;
            h.loc_add(&loc, [on, res, 1])?;
            h.row_put(f, Some((loc, on, res)));
        }
    }

    // The counters (guarded ones count only for a SKU with stock rows).
    let stocked = h.rows > 0;
    let guarded = e.counters.keys().filter(|c| is_guarded(c)).count();
    let only_guarded =
        e.rows.is_empty() && e.trace.is_empty() && guarded > 0 && guarded == e.counters.len();
    if only_guarded && !stocked && expect_lsn.is_none() {
        // Nothing counts, and an unknown SKU gets no hash: nothing to write.
        return None;
    }
    // the counters written, by index in `s.counters`, named as the entry names them
    let mut dirty: Vec<Option<&'a str>> = vec![None; counters.len()];
    for (c, n) in &e.counters {
        let Some(name) = counted(c, stocked) else {
            continue;
        };
        let i = s.counters.iter().position(|x| x == name)?;
        counters[i] = exact(counters[i] + exact(*n)?)?;
        dirty[i] = Some(name);
    }

    // Window buckets and distinct users (`apply_windows`).
    let win = windows(e, &h, s, stocked)?;

    let available = exact(h.on - h.res)?;

    // The write-back (`write`), the values written straight into the write's buffer.
    let dec = |x: i64| move |b: &mut String| units::write(b, x, scale);
    let num = |x: i64| move |b: &mut String| b.push_str(itoa::Buffer::new().format(x));
    let rows_bytes: usize = (h.rowt.iter())
        .map(|(_, t)| t.as_ref().map_or(0, |(l, ..)| l.len() + 48))
        .sum();
    let mut set = Sets::with_capacity(
        12 + h.rowt.len() + 3 * h.locs.len() + dirty.len(),
        96 + rows_bytes + 64 * h.locs.len() + 16 * dirty.len(),
    );
    set.put("lsn", |b| {
        b.push_str(itoa::Buffer::new().format(e.last.0.0))
    });
    set.put("piece", |b| {
        b.push_str(itoa::Buffer::new().format(e.last.1))
    });
    set.put("ts", num(e.commit_ms));
    let mut del: Vec<Cow<'a, str>> = Vec::new();
    for (f, t) in &h.rowt {
        match t {
            Some((l, on, res)) => set.put(f, |v| {
                v.push_str("[\"");
                cjson_escape(v, l);
                v.push_str("\",\"");
                units::write(v, *on, scale);
                v.push_str("\",\"");
                units::write(v, *res, scale);
                v.push_str("\"]");
            }),
            None => del.push((*f).into()),
        }
    }
    // what the hash holds of each location changed (its names made in one scratch string)
    let mut name = String::with_capacity(64);
    let mut loc_reads = Vec::with_capacity(h.locs.len());
    for (loc, _) in &h.locs {
        loc_reads.push([
            h.read_loc(&mut name, loc, "rows")?,
            h.read_loc(&mut name, loc, "on_hand")?,
            h.read_loc(&mut name, loc, "reserved")?,
        ]);
    }
    for ((loc, d), [held_rows, held_on, held_res]) in h.locs.iter().zip(&loc_reads) {
        let rows = exact(held_rows.map_or(Some(0), int)? + d[2])?;
        if rows <= 0 {
            del.extend(["on_hand", "reserved", "rows"].map(|w| Cow::Owned(loc_field(loc, w))));
        } else {
            if d[0] != 0 || d[2] != 0 {
                let held = held_on.map_or(Some(0), |v| qty(v, scale))?;
                let v = exact(held + d[0])?;
                set.put_made(|b| loc_name(b, loc, "on_hand"), dec(v));
            }
            if d[1] != 0 || d[2] != 0 {
                let held = held_res.map_or(Some(0), |v| qty(v, scale))?;
                let v = exact(held + d[1])?;
                set.put_made(|b| loc_name(b, loc, "reserved"), dec(v));
            }
            if d[2] != 0 {
                set.put_made(|b| loc_name(b, loc, "rows"), num(rows));
            }
        }
    }
    if h.has_stock {
        set.put("rows", num(h.rows));
        set.put("on_hand", dec(h.on));
        set.put("reserved", dec(h.res));
        set.put("available", dec(available));
    }
    for (name, v) in dirty.iter().zip(&counters) {
        if let Some(name) = name {
            set.put(name, dec(*v));
        }
    }
    if h.thr_dirty {
        match &h.threshold {
            Some(t) => set.put("threshold", |b| b.push_str(t)),
            None if h.had_threshold => del.push("threshold".into()),
            None => {}
        }
    }
    for (f, v) in win.buckets {
        if let Some(v) = v {
            set.put_made(|b| b.push_str(&f), dec(v));
        }
    }
    for (c, m) in win.wmax {
        set.put_made(|b| b.push_str(&wmax_field(c)), num(m));
    }
    del.extend(win.del.into_iter().map(Cow::Owned));
    if h.state_dirty {
        let state = h.alert_state.as_deref()?;
        set.put("alert_state", |b| b.push_str(state));
    }
    if h.rows <= 0 && counters.iter().all(|c| *c == 0) {
        set.put("gone", |b| b.push('1'));
    } else if was_gone {
        del.push("gone".into());
    }
    if set.len() + del.len() > MAX_FIELDS {
        return None;
    }
    Some(ThinWrite {
        expect_lsn,
        expect_piece,
        lsn: e.last.0.0,
        set,
        del,
        keys: win.keys,
    })
}

/// What an entry's buckets and users write: bucket fields with their new values (`None`:
/// added, then deleted by a later group of the same counter), high-water marks changed,
/// bucket fields deleted, and the distinct-user keys.
#[derive(Default)]
struct Windows<'a> {
    buckets: Vec<(String, Option<i64>)>,
    wmax: Vec<(&'a str, i64)>,
    del: Vec<String>,
    keys: Vec<KeyOp<'a>>,
}

/// The script's `apply_windows` for `e` on the hash as read (`stocked`: it has stock
/// rows after the entry's rows), or `None` where it is the script's to do.
fn windows<'a, V: AsRef<str>>(
    e: &'a Entry,
    h: &Hash<'_, '_, V>,
    s: &ApplySettings,
    stocked: bool,
) -> Option<Windows<'a>> {
    let mut w = Windows::default();
    if e.buckets.is_empty() && e.users.is_empty() {
        return Some(w);
    }
    let keep = s.keep_minutes;
    let scale = s.scale;
    // (counter, cutoff): the oldest minute the window keeps, per counter with buckets
    let mut cutoffs: Vec<(&'a str, i64)> = Vec::new();
    let buckets = e.buckets.as_slice();
    let mut i = 0;
    while keep > 0 && i < buckets.len() {
        let raw: &str = &buckets[i].0.0;
        let j = i + buckets[i..].iter().take_while(|b| &*b.0.0 == raw).count();
        let group = &buckets[i..j];
        i = j;
        let Some(c) = counted(raw, stocked) else {
            continue;
        };
        let mut newmax = group.iter().map(|b| b.0.1).max()?;
        minute(newmax)?;
        let wmax = match w.wmax.iter().find(|(x, _)| *x == c) {
            Some((_, m)) => Some(*m),
            None => match h.read(&wmax_field(c))? {
                Some(v) => Some(minute(int(v)?)?),
                None => None,
            },
        };
        if let Some(m) = wmax {
            newmax = newmax.max(m);
        }
        let cutoff = minute(newmax - keep + 1)?;
        if let Some(wmax) = wmax {
            // Buckets only exist in [old cutoff, old max]: at most `keep` deletions.
            for x in minute(wmax - keep + 1)?..=(cutoff - 1).min(wmax) {
                let f = bucket_field(c, x);
                if let Some(b) = w.buckets.iter_mut().find(|(k, _)| *k == f) {
                    b.1 = None;
                }
                w.del.push(f);
                w.keys.push(KeyOp::Del(users_minute_suffix(c, x)));
            }
        }
        if Some(newmax) != wmax {
            match w.wmax.iter_mut().find(|(x, _)| *x == c) {
                Some(slot) => slot.1 = newmax,
                None => w.wmax.push((c, newmax)),
            }
        }
        for ((_, m), n) in group {
            if *m < cutoff {
                continue;
            }
            let f = bucket_field(c, *m);
            let slot = match w.buckets.iter().position(|(k, _)| *k == f) {
                Some(p) => p,
                None => {
                    // what the hash holds (a deleted field was never re-added: it is
                    // older than every later cutoff)
                    let held = h.read(&f)?.map_or(Some(0), |v| qty(v, scale))?;
                    w.buckets.push((f, Some(held)));
                    w.buckets.len() - 1
                }
            };
            let v = w.buckets[slot].1?;
            w.buckets[slot].1 = Some(exact(v + exact(*n)?)?);
        }
        match cutoffs.iter_mut().find(|(x, _)| *x == c) {
            Some(slot) => slot.1 = cutoff,
            None => cutoffs.push((c, cutoff)),
        }
    }
    for ((raw, m), ids) in &e.users {
        let Some(c) = counted(raw, stocked) else {
            continue;
        };
        if ids.is_empty() {
            // the script is sent no group for it
            continue;
        }
        w.keys.push(KeyOp::Add(users_suffix(c), ids));
        if let Some((_, cutoff)) = cutoffs.iter().find(|(x, _)| *x == c)
            && *m >= *cutoff
        {
            let m = minute(*m)?;
            let k = users_minute_suffix(c, m);
            w.keys.push(KeyOp::Add(k.clone(), ids));
            w.keys.push(KeyOp::ExpireAt(k, (m + keep + 1) * 60));
        }
    }
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fold::batch::Batch;
    use crate::fold::{Piece, SkuDelta};
    use crate::lsn::Lsn;

    fn settings() -> ApplySettings {
        ApplySettings {
            prefix: "t".into(),
            keep_minutes: 5,
            low_stock: 5,
            scale: 0,
            counters: vec!["views".into()],
            alert_history: 10,
            alert_history_age_ms: 0,
            fence: Default::default(),
        }
    }

    /// The entry a one-piece transaction at LSN 100 makes of `d` for SKU `A` (`evaluated`:
    /// its last piece, which evaluates `A`'s alerts).
    fn one_entry(d: SkuDelta, commit_ms: i64, evaluated: bool) -> Entry {
        let mut b = Batch::new(Lsn(0));
        b.push(Piece {
            commit_lsn: Lsn(100),
            piece: 0,
            commit_ms,
            truncate: vec![],
            skus: [("A".to_string(), d)].into(),
            last: evaluated,
            eval: if evaluated { vec!["A".into()] } else { vec![] },
            ri: Default::default(),
            ri_local: Default::default(),
        });
        b.take().remove(0)
    }

    /// One entry for SKU `A`: row `r` set to (loc, on, res) at LSN 100, evaluated.
    fn entry(loc: &str, on: i64, res: i64, views: i64) -> Entry {
        let mut d = SkuDelta::default();
        d.rows.insert(
            "r".into(),
            RowOp::Set {
                location: Field::Val(loc.into()),
                on_hand: Field::Val(on),
                reserved: Field::Val(res),
                threshold: Field::Keep,
            },
        );
        if views > 0 {
            d.counters.insert("views".into(), views);
        }
        one_entry(d, 1_700_000_000_000, true)
    }

    fn fields(w: &ThinWrite) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = w
            .set
            .iter()
            .map(|(f, v)| (f.to_string(), v.to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn entries_with_unnamed_counters_are_not_read_thin() {
        let s = settings();
        let mut e = entry("W1", 5, 1, 1);
        assert!(reads(&e, &s).is_some(), "a named counter");
        *e.counters.entry_or_default("?views".into()) += 1;
        assert!(reads(&e, &s).is_some(), "a guarded named counter");
        *e.counters.entry_or_default("carts".into()) += 1;
        assert!(reads(&e, &s).is_none(), "a counter not in the mapping");
        let mut e = entry("W1", 5, 1, 1);
        *e.buckets.entry_or_default(("?views".into(), 7)) += 1;
        let f = reads(&e, &s).unwrap();
        assert!(
            f.iter().any(|x| x == "wmax:views") && f.iter().any(|x| x == "w:views:7"),
            "window buckets"
        );
        *e.buckets.entry_or_default(("carts".into(), 7)) += 1;
        assert!(reads(&e, &s).is_none(), "a window not in the mapping");
        let mut e = entry("W1", 5, 1, 1);
        e.users
            .entry_or_default(("carts".into(), 7))
            .push(UserId([1; 16]));
        assert!(
            reads(&e, &s).is_none(),
            "users of a counter not in the mapping"
        );
        let e = entry("W1", 5, 1, 0);
        let f = reads(&e, &s).unwrap();
        let names: Vec<&str> = f.iter().map(|x| x.as_ref()).collect();
        assert_eq!(
            names,
            [
                "lsn",
                "piece",
                "rows",
                "on_hand",
                "reserved",
                "gone",
                "threshold",
                "alert_state",
                "views",
                "r",
                "loc:W1:on_hand",
                "loc:W1:reserved",
                "loc:W1:rows"
            ]
        );
    }

    #[test]
    fn a_new_sku_gets_the_fields_the_script_writes() {
        let (s, e) = (settings(), entry("W/1", 9, 2, 0));
        let f = reads(&e, &s).unwrap();
        let w = plan(&e, &f, &vec![None::<&str>; f.len()], &s, false).unwrap();
        assert_eq!((w.expect_lsn, w.lsn), (None, 100));
        assert!(w.del.is_empty());
        let want: Vec<(String, String)> = [
            ("alert_state", "ok"),
            ("available", "7"),
            ("loc:W/1:on_hand", "9"),
            ("loc:W/1:reserved", "2"),
            ("loc:W/1:rows", "1"),
            ("lsn", "100"),
            ("on_hand", "9"),
            ("piece", "0"),
            ("r", r#"["W\/1","9","2"]"#),
            ("reserved", "2"),
            ("rows", "1"),
            ("ts", "1700000000000"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(fields(&w), want);
    }

    /// Views at minutes 11 and 12 (keep 5) on a hash whose window ends at minute 10:
    /// the window moves to 8..12, minutes 6 and 7 leave it (bucket fields and users'
    /// keys), minute 10's bucket adds up, a user at minute 12 counts for its minute.
    #[test]
    fn window_buckets_move_the_window_and_users_go_to_their_keys() {
        let s = settings();
        let mut d = SkuDelta::default();
        d.counters.insert("views".into(), 3);
        d.buckets.insert(("views".into(), 10), 1);
        d.buckets.insert(("views".into(), 12), 2);
        d.users.insert(("views".into(), 12), vec![UserId([7; 16])]);
        d.users.insert(("views".into(), 5), vec![UserId([8; 16])]);
        let e = one_entry(d, 1_700_000_000_000, false);
        let f = reads(&e, &s).unwrap();
        let v: Vec<Option<String>> = f
            .iter()
            .map(|x| match x.as_ref() {
                "lsn" => Some("50".into()),
                "views" => Some("4".into()),
                "wmax:views" => Some("10".into()),
                "w:views:10" => Some("2".into()),
                _ => None,
            })
            .collect();
        let w = plan(&e, &f, &v, &s, false).unwrap();
        let set = fields(&w);
        let get = |k: &str| set.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("views"), Some("7"));
        assert_eq!(get("w:views:10"), Some("3"));
        assert_eq!(get("w:views:12"), Some("2"));
        assert_eq!(get("wmax:views"), Some("12"));
        assert_eq!(w.del, ["w:views:6", "w:views:7"]);
        let (a, b) = (UserId([7; 16]), UserId([8; 16]));
        assert_eq!(
            w.keys,
            [
                KeyOp::Del(":u:views:6".into()),
                KeyOp::Del(":u:views:7".into()),
                // minute 5 is before the window: its user counts for the lifetime only
                KeyOp::Add(":u:views".into(), std::slice::from_ref(&b)),
                KeyOp::Add(":u:views".into(), std::slice::from_ref(&a)),
                KeyOp::Add(":u:views:12".into(), std::slice::from_ref(&a)),
                KeyOp::ExpireAt(":u:views:12".into(), 18 * 60),
            ]
        );
        // a high-water mark the script would read otherwise is left to it
        let odd: Vec<Option<String>> = f
            .iter()
            .zip(&v)
            .map(|(x, v)| (x == "wmax:views").then(|| "1e1".into()).or(v.clone()))
            .collect();
        assert!(plan(&e, &f, &odd, &s, false).is_none());
    }

    /// What the hash holds for `A` with row `r` at W1 (7 on hand), fence 50/0, `ok`.
    fn held(f: &[Cow<str>], lsn: &str, views: &str) -> Vec<Option<String>> {
        f.iter()
            .map(|x| {
                let v = match x.as_ref() {
                    "lsn" => lsn,
                    "piece" => "0",
                    "rows" => "1",
                    "on_hand" | "loc:W1:on_hand" => "7",
                    "reserved" | "loc:W1:reserved" => "0",
                    "loc:W1:rows" => "1",
                    "alert_state" => "ok",
                    "views" => views,
                    "r" => r#"["W1","7","0"]"#,
                    _ => return None,
                };
                Some(v.to_string())
            })
            .collect()
    }

    #[test]
    fn an_update_moves_totals_and_locations() {
        let (s, e) = (settings(), entry("W1", 6, 0, 0));
        let f = reads(&e, &s).unwrap();
        let w = plan(&e, &f, &held(&f, "50", "0"), &s, false).unwrap();
        assert_eq!((w.expect_lsn, w.expect_piece), (Some(50), Some(0)));
        let got = fields(&w);
        for (k, v) in [
            ("on_hand", "6"),
            ("loc:W1:on_hand", "6"),
            ("available", "6"),
        ] {
            assert!(got.contains(&(k.into(), v.into())), "{k}={v} in {got:?}");
        }
        // unchanged reserved and row count of the location are not rewritten
        assert!(
            !got.iter()
                .any(|(k, _)| k == "loc:W1:rows" || k == "loc:W1:reserved")
        );
        assert!(!got.iter().any(|(k, _)| k == "alert_state"), "still ok");
    }

    #[test]
    fn a_raised_alert_or_a_fence_at_the_entry_goes_to_the_script() {
        let s = settings();
        // 7 -> 3 on hand: ok -> low raises an alert
        let e = entry("W1", 3, 0, 0);
        let f = reads(&e, &s).unwrap();
        assert!(plan(&e, &f, &held(&f, "50", "0"), &s, false).is_none());
        // quiet (a snapshot load): the state moves, nothing is raised
        let w = plan(&e, &f, &held(&f, "50", "0"), &s, true).unwrap();
        assert!(fields(&w).contains(&("alert_state".into(), "low".into())));
        // the hash holds the entry already (a replay), or more
        for lsn in ["100", "150"] {
            assert!(plan(&e, &f, &held(&f, lsn, "0"), &s, false).is_none());
        }
        // not canonical: the script's to judge
        assert!(plan(&e, &f, &held(&f, "050", "0"), &s, false).is_none());
        assert!(plan(&e, &f, &held(&f, "50", "1e2"), &s, false).is_none());
        // a piece that would not print back as read (the call compares strings), with or
        // without an LSN beside it
        for (lsn, piece) in [(Some("50"), "00"), (Some("50"), "-1"), (None, "x")] {
            let odd: Vec<Option<String>> = (f.iter().zip(held(&f, "50", "0")))
                .map(|(x, v)| match x.as_ref() {
                    "piece" => Some(piece.to_string()),
                    "lsn" => lsn.map(str::to_string),
                    _ => v,
                })
                .collect();
            assert!(plan(&e, &f, &odd, &s, false).is_none(), "{lsn:?} {piece}");
        }
    }

    #[test]
    fn sets_keep_borrowed_and_made_names_in_order_in_one_buffer() {
        let mut s = Sets::with_capacity(0, 0);
        s.put("a", |b| b.push('1'));
        s.put_made(|b| loc_name(b, "W/1", "rows"), |b| b.push_str("22"));
        s.put("b", |_| {});
        s.put_made(|b| b.push('c'), |_| {});
        let got: Vec<(&str, &str)> = s.iter().collect();
        assert_eq!(
            got,
            [("a", "1"), ("loc:W/1:rows", "22"), ("b", ""), ("c", "")]
        );
        // "1" "loc:W/1:rows" "22" "c" in the buffer, "a" and "b" borrowed
        assert_eq!((s.len(), s.bytes()), (4, 1 + 12 + 2 + 1 + 2));
    }

    #[test]
    fn a_row_emptied_to_nothing_marks_the_sku_gone_unless_a_counter_counts() {
        let s = settings();
        let mut d = SkuDelta::default();
        d.rows.insert("r".into(), RowOp::Del);
        let e = one_entry(d, 1, false);
        let mut f = reads(&e, &s).unwrap();
        // a deleted row's location is not read with it: the script's
        assert!(plan(&e, &f, &held(&f, "50", "0"), &s, false).is_none());
        for w in ["on_hand", "reserved", "rows"] {
            f.push(Cow::Owned(format!("loc:W1:{w}")));
        }
        let w = plan(&e, &f, &held(&f, "50", "0"), &s, false).unwrap();
        assert!(fields(&w).contains(&("gone".into(), "1".into())));
        let mut del: Vec<&str> = w.del.iter().map(|x| x.as_ref()).collect();
        del.sort();
        assert_eq!(
            del,
            ["loc:W1:on_hand", "loc:W1:reserved", "loc:W1:rows", "r"]
        );
        let w = plan(&e, &f, &held(&f, "50", "3"), &s, false).unwrap();
        assert!(!fields(&w).iter().any(|(k, _)| k == "gone"));
    }

    /// Lua's doubles round past 2^53: a location (or any running sum) that would pass it
    /// is the script's, even when the totals stay in range.
    #[test]
    fn sums_beyond_2_53_are_left_to_the_script() {
        let s = settings();
        let e = entry("W1", 2, 0, 0);
        let f = reads(&e, &s).unwrap();
        let big = ((1i64 << 53) - 1).to_string();
        let mut v = held(&f, "50", "0");
        let at = |name: &str| f.iter().position(|x| x == name).unwrap();
        v[at("loc:W1:on_hand")] = Some(big.clone());
        assert!(plan(&e, &f, &v, &s, false).is_none());
        v[at("loc:W1:on_hand")] = Some("7".into());
        v[at("rows")] = Some(big);
        assert!(plan(&e, &f, &v, &s, false).is_none());
        v[at("rows")] = Some("9223372036854775807".into());
        assert!(plan(&e, &f, &v, &s, false).is_none(), "no overflow either");
    }

    /// An entry of activity alone for `A` at LSN 100: `counters` as (name, increment).
    fn activity(counters: &[(&str, i64)]) -> Entry {
        let mut d = SkuDelta::default();
        for (c, n) in counters {
            d.counters.insert((*c).into(), *n);
        }
        one_entry(d, 5, false)
    }

    #[test]
    fn counters_add_to_what_the_hash_holds_and_leave_stock_as_it_was() {
        let s = settings();
        let e = activity(&[("views", 2), ("?views", 3)]);
        let f = reads(&e, &s).unwrap();
        // stocked: the guarded views count too; the totals are rewritten as the script does
        let got = fields(&plan(&e, &f, &held(&f, "50", "4"), &s, false).unwrap());
        for (k, v) in [
            ("views", "9"),
            ("on_hand", "7"),
            ("available", "7"),
            ("rows", "1"),
        ] {
            assert!(got.contains(&(k.into(), v.into())), "{k}={v} in {got:?}");
        }
        // a new SKU: views only (no stock fields, not gone)
        let got = fields(&plan(&e, &f, &vec![None::<&str>; f.len()], &s, false).unwrap());
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["lsn", "piece", "ts", "views"]);
        assert!(got.contains(&("views".into(), "2".into())), "{got:?}");
    }

    #[test]
    fn guarded_activity_alone_counts_only_with_stock() {
        let s = settings();
        let e = activity(&[("?views", 3)]);
        let f = reads(&e, &s).unwrap();
        // unknown SKU: the script writes nothing for it
        assert!(plan(&e, &f, &vec![None::<&str>; f.len()], &s, false).is_none());
        // a hash without stock rows: the fence moves, nothing counts
        let mut v: Vec<Option<String>> = vec![None; f.len()];
        v[0] = Some("50".into());
        v[1] = Some("0".into());
        let w = plan(&e, &f, &v, &s, false).unwrap();
        let got = fields(&w);
        assert!(!got.iter().any(|(k, _)| k == "views"), "{got:?}");
        assert!(got.contains(&("gone".into(), "1".into())), "{got:?}");
    }

    #[test]
    fn locations_are_escaped_as_cjson_escapes_them() {
        let mut out = String::new();
        cjson_escape(&mut out, "a/b\"c\\d\ne\u{1}\u{7f}é");
        assert_eq!(out, r#"a\/b\"c\\d\ne\u0001\u007fé"#);
        out.clear();
        cjson_escape(&mut out, "plain W1");
        assert_eq!(out, "plain W1");
    }
}
