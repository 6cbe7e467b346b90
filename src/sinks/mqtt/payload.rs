//! Message payloads built from a SKU hash's fields, without I/O.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use serde_json::Value;

use super::CounterSpec;
use crate::lsn::Lsn;
use crate::names::{push_users_name, push_window_name, users_name};
use crate::sinks::layout;
pub use crate::sinks::redis::resp::FlatHash;
use crate::units;

/// Payload format version (docs/mobile.md).
pub const FORMAT_VERSION: u64 = 2;

/// A payload as sent: JSON as is, or the same members as CBOR (RFC 8949). An empty
/// payload (a cleared SKU) stays empty.
pub fn encode(format: crate::config::PayloadFormat, json: &str) -> bytes::Bytes {
    use crate::config::PayloadFormat;
    if json.is_empty() || format == PayloadFormat::Json {
        return bytes::Bytes::copy_from_slice(json.as_bytes());
    }
    let mut out = Vec::with_capacity(json.len());
    match serde_json::from_str::<Value>(json) {
        // writing into a Vec cannot fail; a payload we built always parses
        Ok(v) if ciborium::into_writer(&v, &mut out).is_ok() => bytes::Bytes::from(out),
        _ => bytes::Bytes::copy_from_slice(json.as_bytes()),
    }
}

/// A payload read back (tools, tests): JSON, or CBOR when it does not start like a JSON
/// object (a CBOR map starts with a byte 0xA0-0xBF).
pub fn decode(payload: &[u8]) -> Option<Value> {
    if payload.first() == Some(&b'{') {
        return serde_json::from_slice(payload).ok();
    }
    ciborium::from_reader(payload).ok()
}

/// MQTT 5 properties of a message: content type, payload format indicator (1: UTF-8
/// JSON), the ordering user property (`rev` on states, `seq` on alerts; omitted when
/// empty) and an optional expiry in seconds.
pub fn properties(
    format: crate::config::PayloadFormat,
    (name, value): (&str, &str),
    expiry_s: Option<u32>,
) -> rumqttc::v5::mqttbytes::v5::PublishProperties {
    use crate::config::PayloadFormat;
    let (ctype, indicator) = match format {
        PayloadFormat::Json => ("application/json", 1),
        PayloadFormat::Cbor => ("application/cbor", 0),
    };
    rumqttc::v5::mqttbytes::v5::PublishProperties {
        payload_format_indicator: Some(indicator),
        content_type: Some(ctype.into()),
        message_expiry_interval: expiry_s,
        user_properties: if value.is_empty() {
            Vec::new()
        } else {
            vec![(name.to_string(), value.to_string())]
        },
        ..Default::default()
    }
}

/// MQTT 5 properties of the plain-text messages (`status`, `epoch`).
pub fn text_properties() -> rumqttc::v5::mqttbytes::v5::PublishProperties {
    rumqttc::v5::mqttbytes::v5::PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".into()),
        ..Default::default()
    }
}

/// The stored version of a state: 16 hex digits of the commit LSN and 8 of the piece
/// (`delta_from`, and the first 24 digits of a `rev`).
pub fn base(lsn: u64, piece: i64) -> String {
    let mut s = String::with_capacity(35);
    push_hex(&mut s, lsn, 16);
    push_hex(&mut s, piece.clamp(0, i64::from(u32::MAX)) as u64, 8);
    s
}

/// Appends the low `digits` hex digits of `v`, zero-padded (what `{:0N}x` writes for a
/// value that fits; every caller clamps to fit).
fn push_hex(out: &mut String, v: u64, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((v >> (4 * i)) & 0xf) as usize]));
    }
}

/// The ordering token of a message read at `read_ms` (docs/mobile.md): [`base`] and 11 hex
/// digits of the unix milliseconds, so string order is message order per SKU.
pub fn rev(lsn: u64, piece: i64, read_ms: i64) -> String {
    let mut s = base(lsn, piece);
    push_hex(&mut s, read_ms.clamp(0, 0xfff_ffff_ffff) as u64, 11);
    s
}

/// The ordering token of a SKU hash read at `now_ms`.
pub fn rev_of(fields: &impl Fields, now_ms: i64) -> String {
    rev(
        u64_field(fields, "lsn").unwrap_or(0),
        piece_num(fields.field("piece")),
        now_ms,
    )
}

/// What a gone SKU is over HTTP: `{"v":2,"sku":..,"gone":true,"rev":..}`.
pub fn gone_object(sku: &str, rev: &str) -> String {
    let mut obj: BTreeMap<&str, Member> = BTreeMap::new();
    obj.insert("v", Member::Int(FORMAT_VERSION as i64));
    obj.insert("sku", Member::Str(sku.into()));
    obj.insert("gone", Member::Raw(b"true".to_vec()));
    obj.insert("rev", Member::Str(rev.into()));
    let mut out = Vec::with_capacity(96);
    write_object(&mut out, obj.iter().map(|(k, v)| (*k, v)));
    String::from_utf8(out).unwrap_or_default()
}

/// Whether a `pub_state`/values key is stored in Redis (stock totals, locations, lifetime
/// counters): only those go into `delta`; windows and derived values are absolute only.
fn is_stored(spec: &Spec, k: &str) -> bool {
    matches!(k, "on_hand" | "reserved" | "available")
        || k.starts_with("loc:")
        || spec.counters.iter().any(|c| c.name == k)
}

/// `threshold` and `alert_state` of a SKU with stock (`None` without stock rows).
fn alert_members(spec: &Spec, fields: &impl Fields) -> Option<(i64, String)> {
    let stocked =
        fields.field("alert_state").is_some() || fields.field("rows").is_some_and(|r| r != "0");
    if !stocked {
        return None;
    }
    let thr = fields
        .field("threshold")
        .and_then(|v| units::parse(v, spec.scale))
        .unwrap_or_else(|| spec.low_stock.saturating_mul(10i64.pow(spec.scale)));
    let st = fields
        .field("alert_state")
        .filter(|s| matches!(*s, "ok" | "low" | "out"))
        .unwrap_or("ok")
        .to_string();
    Some((thr, st))
}

/// What the payload is for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The hash changed: carries `delta`.
    Change,
    /// Only time passed: carries `as_of` (this unix-ms time) and no `delta`.
    Aging { as_of_ms: i64 },
    /// The current state read for a client over HTTP: neither `delta` nor `as_of`.
    Current,
}

/// The payload-relevant part of the configuration.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    /// Every activity counter.
    pub counters: Vec<CounterSpec>,
    /// The counter whose last hour gives `sell_rate_per_h`.
    pub sell_counter: Option<String>,
    /// Decimal places of quantities (`units`); 0: whole numbers.
    pub scale: u32,
    /// The default low-stock threshold, in whole units (`[alerts] low_stock`).
    pub low_stock: i64,
}

/// The state message of a SKU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateMessage {
    /// The retained payload; empty clears the retained message (deleted SKU).
    pub payload: String,
    /// Hash field `lsn` (0 when absent).
    pub lsn: u64,
    /// JSON object of the numeric values published, stored as `pub_state` after the ack.
    pub state: String,
    /// Fingerprint of the window values when any is non-zero (they will age).
    pub windows: Option<u64>,
    /// The ordering token (docs/mobile.md).
    pub rev: String,
}

/// A quantity field in units (see `units`); 0 when absent or malformed.
fn qty(fields: &impl Fields, name: &str, scale: u32) -> i64 {
    fields
        .field(name)
        .and_then(|v| units::parse(v, scale))
        .unwrap_or(0)
}

fn u64_field(fields: &impl Fields, name: &str) -> Option<u64> {
    fields.field(name).and_then(|v| v.parse().ok())
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds; `None` when out of range.
pub fn rfc3339_ms(unix_ms: i64) -> Option<String> {
    let micros = unix_ms
        .checked_mul(1000)?
        .checked_sub(946_684_800_000_000)?;
    // i64::MIN/MAX mean +-infinity there; not a commit time
    if micros == i64::MIN || micros == i64::MAX {
        return None;
    }
    Some(crate::txn::pg_timestamp_to_rfc3339_millis(micros))
}

/// A hash field holding a LSN as u64 decimal, as `X/Y`.
fn lsn_text(v: u64) -> String {
    Lsn(v).to_string()
}

/// Whether the hash has something the broker has not acknowledged: its `lsn` differs from
/// `pub_lsn`/`pub_piece`, or alerts are pending. A transaction applied in several pieces
/// writes the same `lsn` with each piece, so the piece is part of the state's identity.
pub fn unpublished(
    lsn: Option<&str>,
    piece: Option<&str>,
    pub_lsn: Option<&str>,
    pub_piece: Option<&str>,
    alerts: Option<&str>,
) -> bool {
    // a hash without `lsn` is published once as LSN 0
    lsn.unwrap_or("0") != pub_lsn.unwrap_or("")
        || piece_num(piece) != piece_num(pub_piece)
        || alerts.is_some_and(|a| !matches!(a.trim(), "" | "[]"))
}

/// A piece number as stored (`-1` after a reset); absent (marks written before pieces
/// were recorded) or malformed counts as 0.
pub fn piece_num(v: Option<&str>) -> i64 {
    v.and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A SKU hash's fields, as the payload is built from them: the publisher's flat hash
/// ([`FlatHash`], parsed straight from the reply) or a map (the HTTP API, tests).
pub trait Fields {
    /// The value of field `name`.
    fn field(&self, name: &str) -> Option<&str>;
    /// Every (name, value), in no particular order.
    fn pairs(&self) -> impl Iterator<Item = (&str, &str)>;
    /// The number of fields.
    fn len(&self) -> usize;
    /// Whether there is none (HGETALL of a missing key).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Fields for FlatHash {
    fn field(&self, name: &str) -> Option<&str> {
        self.get(name)
    }
    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.iter()
    }
    fn len(&self) -> usize {
        FlatHash::len(self)
    }
}

impl Fields for HashMap<String, String> {
    fn field(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
    fn len(&self) -> usize {
        HashMap::len(self)
    }
}

/// Whether the SKU's retained message is to be cleared: the apply script marked it
/// `gone` (no stock rows, no counters), or a rebuild reset it (`piece` -1) and its
/// snapshot held nothing of it, so it has no stock and no counters either.
pub fn is_gone(fields: &impl Fields) -> bool {
    fields.field("gone") == Some("1") || fields.field("piece") == Some("-1")
}

/// Builds the state message of `sku` from its hash `fields` at `now_ms` (unix ms).
/// `users` holds the distinct-user counts by payload name (`views_users_5m`), computed by
/// the caller from the per-minute HyperLogLogs.
pub fn state_message(
    spec: &Spec,
    sku: &str,
    fields: &impl Fields,
    users: &HashMap<String, i64>,
    now_ms: i64,
    kind: Kind,
) -> StateMessage {
    let lsn = u64_field(fields, "lsn").unwrap_or(0);
    let rev = rev_of(fields, now_ms);
    if is_gone(fields) {
        return StateMessage {
            payload: String::new(),
            lsn,
            state: "{}".into(),
            windows: None,
            rev,
        };
    }
    // Numeric values, in units of 10^-scale (counts of users and seconds too, so that
    // every value is written alike): these make up `pub_state` and the delta. Collected
    // in one vector and sorted once (`sorted`): a few dozen small keys, for which a
    // `BTreeMap`'s nodes, key copies and comparisons were most of this function's cost.
    let scale = spec.scale;
    let unit = 10i64.pow(scale);
    // Every window's name, written into one buffer (a `format!` per counter and window
    // was about a tenth of this function's instructions with the demo's mapping).
    let mut names = String::new();
    let mut values: Vec<(&str, i64)> = Vec::with_capacity(fields.len() + 16);
    let on_hand = qty(fields, "on_hand", scale);
    let reserved = qty(fields, "reserved", scale);
    let available = fields
        .field("available")
        .and_then(|v| units::parse(v, scale))
        .unwrap_or(on_hand.saturating_sub(reserved));
    values.push(("on_hand", on_hand));
    values.push(("reserved", reserved));
    values.push(("available", available));

    // (location, 0 on hand / 1 reserved, value)
    let mut locations: Vec<(&str, u8, i64)> = Vec::new();
    // Window buckets, collected in the same pass over the hash (summing each window by
    // rescanning every field cost more than the rest).
    let mut buckets = layout::Buckets::default();
    for (f, v) in fields.pairs() {
        if buckets.add_scaled(f, v, scale) {
            continue;
        }
        let Some(rest) = f.strip_prefix("loc:") else {
            continue;
        };
        let Some((loc, what)) = rest.rsplit_once(':') else {
            continue;
        };
        let i = match what {
            "on_hand" => 0,
            "reserved" => 1,
            _ => continue,
        };
        let n = units::parse(v, scale).unwrap_or(0);
        locations.push((loc, i, n));
        values.push((f, n));
    }
    // a hash's field names are unique, so each (location, value) comes once
    locations.sort_unstable();

    let now_minute = layout::minute_of_ms(now_ms);
    let window_sum = |counter: &str, minutes: i64| buckets.sum(counter, minutes, now_minute);
    let mut windows_at: Vec<(std::ops::Range<usize>, i64)> = Vec::new();
    for c in &spec.counters {
        values.push((&c.name, qty(fields, &c.name, scale)));
        for &w in &c.windows_secs {
            let minutes = i64::try_from(w / 60).unwrap_or(1).max(1);
            let at = names.len();
            push_window_name(&mut names, &c.name, w);
            windows_at.push((at..names.len(), window_sum(&c.name, minutes)));
            if c.distinct_users {
                let at = names.len();
                push_users_name(&mut names, &c.name, w);
                let n = users.get(&names[at..]).copied().unwrap_or(0);
                windows_at.push((at..names.len(), n.saturating_mul(unit)));
            }
        }
    }
    let mut window_values: Vec<(&str, i64)> = Vec::with_capacity(windows_at.len() + 2);
    window_values.extend(windows_at.into_iter().map(|(r, v)| (&names[r], v)));
    if let Some(sc) = &spec.sell_counter {
        let rate = window_sum(sc, 60);
        window_values.push(("sell_rate_per_h", rate));
        if rate > 0 && available > 0 {
            // Whole seconds (in units, like every value).
            let eta = i64::try_from(i128::from(available) * 3600 / i128::from(rate))
                .unwrap_or(i64::MAX / unit)
                .saturating_mul(unit);
            window_values.push(("stockout_eta_s", eta));
        }
    }
    let windows = window_values.iter().any(|(_, v)| *v != 0).then(|| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        window_values.hash(&mut h);
        h.finish()
    });
    values.extend(window_values.iter().copied());
    let values = sorted(values);

    // Members in the order serde_json's map would have taken them (a later insert
    // replaces an earlier one of the same name), written straight into the payload:
    // building a `serde_json::Value` tree cost about half of each publish.
    let mut obj: Vec<(&str, Member)> = Vec::with_capacity(values.len() + 12);
    obj.push(("v", Member::Int(FORMAT_VERSION as i64)));
    obj.push(("sku", Member::Str(sku.into())));
    for (k, v) in &values {
        if !k.starts_with("loc:") {
            obj.push((k, Member::Units(*v, scale)));
        }
    }
    if !locations.is_empty() {
        let mut o = Vec::with_capacity(40 * locations.len());
        o.push(b'{');
        let mut i = 0;
        while i < locations.len() {
            let loc = locations[i].0;
            // both keys always, so apps need no defaults
            let mut q = [0i64; 2];
            while i < locations.len() && locations[i].0 == loc {
                q[usize::from(locations[i].1)] = locations[i].2;
                i += 1;
            }
            if o.len() > 1 {
                o.push(b',');
            }
            write_str(&mut o, loc);
            o.extend_from_slice(b":{\"on_hand\":");
            write_units(&mut o, q[0], scale);
            o.extend_from_slice(b",\"reserved\":");
            write_units(&mut o, q[1], scale);
            o.push(b'}');
        }
        o.push(b'}');
        obj.push(("locations", Member::Raw(o)));
    }
    if let Some((thr, st)) = alert_members(spec, fields) {
        obj.push(("threshold", Member::Units(thr, scale)));
        obj.push(("alert_state", Member::Str(st.into())));
    }
    match kind {
        Kind::Change => {
            // Only against a state the broker acknowledged: its stored version is the base.
            if let Some(p) = u64_field(fields, "pub_lsn") {
                let prev = fields
                    .field("pub_state")
                    .map(parse_state)
                    .unwrap_or_default();
                obj.push((
                    "delta",
                    Member::Raw(delta(&values, &prev, |k| is_stored(spec, k), scale)),
                ));
                let pp = piece_num(fields.field("pub_piece"));
                obj.push(("delta_from", Member::Str(base(p, pp).into())));
            }
        }
        Kind::Aging { as_of_ms } => {
            if let Some(t) = rfc3339_ms(as_of_ms) {
                obj.push(("as_of", Member::Str(t.into())));
            }
        }
        Kind::Current => {}
    }
    if fields.field("lsn").is_some() {
        obj.push(("lsn", Member::Str(lsn_text(lsn).into())));
    }
    obj.push(("rev", Member::Str(rev.as_str().into())));
    if let Some(t) = fields
        .field("ts")
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(rfc3339_ms)
    {
        obj.push(("ts", Member::Str(t.into())));
    }
    let mut out = Vec::with_capacity(256);
    write_object(&mut out, sorted(obj).iter().map(|(k, v)| (*k, v)));
    let state = values_json(values.iter().map(|(k, v)| (*k, *v)));
    StateMessage {
        // only valid UTF-8 was written (str input, JSON punctuation, digits)
        payload: String::from_utf8(out).unwrap_or_default(),
        lsn,
        state,
        windows,
        rev,
    }
}

/// `pairs` sorted by key, a later pair replacing an earlier one of the same key: what
/// inserting them into a `BTreeMap` in order leaves, in one vector.
fn sorted<K: Ord, V>(mut pairs: Vec<(K, V)>) -> Vec<(K, V)> {
    // stable: pairs of one key stay in insertion order
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    // in place; `dedup_by` keeps the first of a run, so each later value moves into it
    pairs.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(&mut later.1, &mut kept.1);
        }
        same
    });
    pairs
}

/// A stored `pub_state` (a JSON object of integers) as sorted pairs, as serde_json reads
/// it into a `BTreeMap<String, i64>`; empty when it does not parse. The compact form
/// `values_json` writes, keys without escapes, is read here without serde_json; anything
/// else goes through serde_json.
fn parse_state(s: &str) -> Vec<(Cow<'_, str>, i64)> {
    if let Some(pairs) = parse_state_compact(s) {
        return sorted(pairs);
    }
    serde_json::from_str::<BTreeMap<String, i64>>(s)
        .map(|m| m.into_iter().map(|(k, v)| (Cow::Owned(k), v)).collect())
        .unwrap_or_default()
}

/// `{"k":-1,"l":2}` exactly (no whitespace, no escapes, integers without leading zeros
/// that fit an i64, no `-0`), else `None`.
fn parse_state_compact(s: &str) -> Option<Vec<(Cow<'_, str>, i64)>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 12);
    let mut i = 1;
    if b.first() != Some(&b'{') {
        return None;
    }
    if b.get(1) == Some(&b'}') {
        return (b.len() == 2).then_some(out);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let start = i + 1;
        let len = b[start..].iter().position(|&c| c == b'"')?;
        let key = &s[start..start + len];
        if key.bytes().any(|c| c < 0x20 || c == b'\\') {
            return None;
        }
        i = start + len + 1;
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        let num_start = i;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        let digits = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        // serde_json reads `-0` as a float, which is no i64
        if i == digits || (b[digits] == b'0' && (i > digits + 1 || digits > num_start)) {
            return None;
        }
        let n: i64 = s[num_start..i].parse().ok()?;
        out.push((Cow::Borrowed(key), n));
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') if i + 1 == b.len() => return Some(out),
            _ => return None,
        }
    }
}

/// `values` as a compact JSON object of integers, as serde_json writes a map (`pub_state`).
fn values_json<'k>(values: impl ExactSizeIterator<Item = (&'k str, i64)>) -> String {
    let mut out = Vec::with_capacity(16 * values.len() + 2);
    out.push(b'{');
    for (i, (k, v)) in values.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(&mut out, k);
        out.push(b':');
        write_int(&mut out, v);
    }
    out.push(b'}');
    // only valid UTF-8 was written (str input, JSON punctuation, digits)
    String::from_utf8(out).unwrap_or_else(|_| "{}".into())
}

/// A member value of a payload object.
enum Member<'a> {
    Int(i64),
    /// A quantity in units of 10^-scale, written as a decimal number.
    Units(i64, u32),
    Str(Cow<'a, str>),
    /// Already-written JSON.
    Raw(Vec<u8>),
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it (only `"`, `\\`
/// and control characters; most names and values have none, and are copied as they are).
fn write_str(out: &mut Vec<u8>, s: &str) {
    // without an early exit, so the check runs over many bytes at a time
    let plain = s
        .bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    use serde::Serializer;
    // writing into a Vec cannot fail
    let _ = serde_json::Serializer::new(&mut *out).serialize_str(s);
}

fn write_int(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn write_units(out: &mut Vec<u8>, n: i64, scale: u32) {
    if scale == 0 {
        return write_int(out, n);
    }
    out.extend_from_slice(units::format(n, scale).as_bytes());
}

/// Appends a JSON object of `members` (in key order: compact, like serde_json).
fn write_object<'m, 'a: 'm>(
    out: &mut Vec<u8>,
    members: impl IntoIterator<Item = (&'m str, &'m Member<'a>)>,
) {
    out.push(b'{');
    for (i, (k, v)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        match v {
            Member::Int(n) => write_int(out, *n),
            Member::Units(n, scale) => write_units(out, *n, *scale),
            Member::Str(s) => write_str(out, s),
            Member::Raw(r) => out.extend_from_slice(r),
        }
    }
    out.push(b'}');
}

/// The distinct-user counts of one state, as queued by [`users_queries`].
#[derive(Debug, Default)]
pub struct UsersQueries {
    /// Payload name of each (counter, window) with distinct users, and whether a
    /// `PFCOUNT` was queued for it (`false`: no events in the window, the count is 0).
    names: Vec<(String, bool)>,
}

impl UsersQueries {
    /// Replies this state's queries take from the pipeline.
    pub fn replies(&self) -> usize {
        self.names.iter().filter(|(_, q)| *q).count()
    }

    /// The counts by payload name, taking [`replies`](Self::replies) counts in order.
    pub fn counts(self, replies: &mut impl Iterator<Item = i64>) -> HashMap<String, i64> {
        self.names
            .into_iter()
            .map(|(n, q)| {
                let c = if q { replies.next().unwrap_or(0) } else { 0 };
                (n, c)
            })
            .collect()
    }
}

/// Adds to `pipe` one `PFCOUNT` per (counter, window) with distinct users of `sku` at
/// `now_ms`: the union of the per-minute HyperLogLogs of the minutes in the window that
/// have events. A minute's HyperLogLog is read only beside its window bucket
/// `w:<counter>:<minute>` in `fields` (the SKU's hash): the apply scripts write the two
/// together and prune the bucket with the minute (on a Redis Cluster the HyperLogLog is
/// left to its EXPIREAT, unread). So a window without buckets queues nothing (its count
/// is 0), and a window with one busy minute reads that key's cached count instead of
/// merging 60 keys (a multi-key `PFCOUNT` builds and counts a 16 KiB register array). A
/// gone SKU (see [`is_gone`]) publishes no counts and queues nothing.
pub fn users_queries(
    spec: &Spec,
    prefix: &str,
    sku: &str,
    fields: &impl Fields,
    now_ms: i64,
    pipe: &mut redis::Pipeline,
) -> UsersQueries {
    let minute = layout::minute_of_ms(now_ms);
    let mut out = UsersQueries::default();
    if is_gone(fields) {
        return out;
    }
    let mut key = Vec::new();
    let mut num = itoa::Buffer::new();
    let mut minutes: Vec<i64> = Vec::new();
    for c in &spec.counters {
        if !c.distinct_users || c.windows_secs.is_empty() {
            continue;
        }
        minutes.clear();
        minutes.extend(fields.pairs().filter_map(|(f, _)| {
            f.strip_prefix("w:")?
                .strip_prefix(c.name.as_str())?
                .strip_prefix(':')?
                .parse::<i64>()
                .ok()
        }));
        minutes.sort_unstable();
        for &w in &c.windows_secs {
            let span = i64::try_from(w / 60).unwrap_or(1).max(1);
            let from = minute - span + 1;
            let mut inside = minutes
                .iter()
                .filter(|&&m| m >= from && m <= minute)
                .peekable();
            let queued = inside.peek().is_some();
            if queued {
                let cmd = pipe.cmd("PFCOUNT");
                if key.is_empty() {
                    key.extend_from_slice(layout::sku_key(prefix, sku).as_bytes());
                    key.extend_from_slice(b":u:");
                }
                let base = key.len();
                key.extend_from_slice(c.name.as_bytes());
                key.push(b':');
                let stem = key.len();
                for &m in inside {
                    key.truncate(stem);
                    key.extend_from_slice(num.format(m).as_bytes());
                    cmd.arg(&key[..]);
                }
                key.truncate(base);
            }
            out.names.push((users_name(&c.name, w), queued));
        }
    }
    out
}

/// Current minus previous over the keys `keep` accepts, non-zero entries only; location
/// values nested under `locations` like in the payload. Returns the JSON object.
fn delta(
    cur: &[(&str, i64)],
    prev: &[(Cow<'_, str>, i64)],
    keep: impl Fn(&str) -> bool,
    scale: u32,
) -> Vec<u8> {
    let mut out: Vec<(&str, Member)> = Vec::new();
    // (location, value name, difference)
    let mut locs: Vec<(&str, &str, i64)> = Vec::new();
    // Both are sorted: walk them together (every key once, absent meaning 0).
    let mut a = cur.iter().map(|(k, v)| (*k, *v)).peekable();
    let mut b = prev.iter().map(|(k, v)| (k.as_ref(), *v)).peekable();
    loop {
        let (k, d) = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(&(ka, va)), Some(&(kb, vb))) if ka == kb => {
                a.next();
                b.next();
                (ka, va.saturating_sub(vb))
            }
            (Some(&(ka, va)), Some(&(kb, _))) if ka < kb => {
                a.next();
                (ka, va)
            }
            (Some(&(ka, va)), None) => {
                a.next();
                (ka, va)
            }
            (_, Some(&(kb, vb))) => {
                b.next();
                (kb, 0i64.saturating_sub(vb))
            }
        };
        if d == 0 || !keep(k) {
            continue;
        }
        match k.strip_prefix("loc:").and_then(|r| r.rsplit_once(':')) {
            Some((loc, what)) => locs.push((loc, what, d)),
            // keys come once each, in order
            None => out.push((k, Member::Units(d, scale))),
        }
    }
    if !locs.is_empty() {
        // each (location, name) comes once: its key did
        locs.sort_unstable_by(|x, y| (x.0, x.1).cmp(&(y.0, y.1)));
        let mut o = Vec::with_capacity(40 * locs.len());
        o.push(b'{');
        for (i, (loc, what, d)) in locs.iter().enumerate() {
            let first = i == 0 || locs[i - 1].0 != *loc;
            if first {
                if i > 0 {
                    o.extend_from_slice(b"},");
                }
                write_str(&mut o, loc);
                o.extend_from_slice(b":{");
            } else {
                o.push(b',');
            }
            write_str(&mut o, what);
            o.push(b':');
            write_units(&mut o, *d, scale);
        }
        o.extend_from_slice(b"}}");
        out.push(("locations", Member::Raw(o)));
    }
    let mut w = Vec::with_capacity(128);
    write_object(&mut w, sorted(out).iter().map(|(k, v)| (*k, v)));
    w
}

/// One pending alert from the hash field `alerts`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingAlert {
    /// `low_stock`, `out_of_stock` or `back_in_stock`.
    pub kind: String,
    /// `available` when raised.
    pub available: i64,
    /// The threshold in force.
    pub threshold: i64,
    /// The alert's `lsn` exactly as stored (decimal u64), for matching on removal.
    pub lsn_raw: String,
    /// Parsed `lsn`.
    pub lsn: u64,
    /// Commit time, unix ms.
    pub ts: Option<i64>,
    /// Position in the alert history (a stream id), when recorded there.
    pub seq: Option<String>,
}

/// Parses the `alerts` field, quantities in units of 10^-`scale` (the apply script
/// stores them as numbers with scale 0, as decimal strings otherwise); also returns how
/// many entries were malformed (skipped).
pub fn parse_alerts(field: Option<&str>, scale: u32) -> (Vec<PendingAlert>, usize) {
    let Some(text) = field.filter(|t| !t.trim().is_empty()) else {
        return (Vec::new(), 0);
    };
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text) else {
        return (Vec::new(), 1);
    };
    let mut out = Vec::new();
    let mut bad = 0;
    for it in items {
        let parsed = (|| {
            let kind = it.get("type")?.as_str()?.to_string();
            let lsn_raw = match it.get("lsn")? {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.as_u64()?.to_string(),
                _ => return None,
            };
            let lsn = lsn_raw.parse().ok()?;
            Some(PendingAlert {
                kind,
                available: alert_units(it.get("available"), scale),
                threshold: alert_units(it.get("threshold"), scale),
                lsn_raw,
                lsn,
                ts: it.get("ts").and_then(Value::as_i64),
                seq: it.get("seq").and_then(Value::as_str).map(str::to_string),
            })
        })();
        match parsed {
            Some(a) => out.push(a),
            None => bad += 1,
        }
    }
    (out, bad)
}

fn alert_units(v: Option<&Value>, scale: u32) -> i64 {
    match v {
        Some(Value::String(s)) => units::parse(s, scale).unwrap_or(0),
        Some(v) => v.as_i64().unwrap_or(0).saturating_mul(10i64.pow(scale)),
        None => 0,
    }
}

/// The stable alert id `"<lsn X/Y>:<type>:<sku>"`.
pub fn alert_id(sku: &str, a: &PendingAlert) -> String {
    format!("{}:{}:{sku}", lsn_text(a.lsn), a.kind)
}

/// The alert message payload (quantities in units of 10^-`scale`).
pub fn alert_payload(sku: &str, a: &PendingAlert, scale: u32) -> String {
    let mut obj: BTreeMap<&str, Member> = BTreeMap::new();
    obj.insert("v", Member::Int(FORMAT_VERSION as i64));
    obj.insert("id", Member::Str(alert_id(sku, a).into()));
    obj.insert("type", Member::Str(a.kind.as_str().into()));
    obj.insert("sku", Member::Str(sku.into()));
    obj.insert("available", Member::Units(a.available, scale));
    obj.insert("threshold", Member::Units(a.threshold, scale));
    obj.insert("lsn", Member::Str(lsn_text(a.lsn).into()));
    if let Some(q) = &a.seq {
        obj.insert("seq", Member::Str(q.as_str().into()));
    }
    if let Some(t) = a.ts.and_then(rfc3339_ms) {
        obj.insert("ts", Member::Str(t.into()));
    }
    let mut out = Vec::with_capacity(160);
    write_object(&mut out, obj.iter().map(|(k, v)| (*k, v)));
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::window_name;
    use serde_json::json;

    const NOW: i64 = 1_764_061_200_123; // 2025-11-25T09:00:00.123Z

    /// The serde_json::Value-based builder this module used before, kept as the oracle
    /// for the direct writer: same inputs, byte-identical payloads.
    mod reference {
        use super::super::*;
        use crate::names::window_name;
        use serde_json::{Map, json};

        fn int(fields: &HashMap<String, String>, name: &str) -> i64 {
            fields.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
        }

        pub fn state_message(
            spec: &Spec,
            sku: &str,
            fields: &HashMap<String, String>,
            users: &HashMap<String, i64>,
            now_ms: i64,
            kind: Kind,
        ) -> StateMessage {
            let lsn = u64_field(fields, "lsn").unwrap_or(0);
            let rev = rev_of(fields, now_ms);
            if is_gone(fields) {
                return StateMessage {
                    payload: String::new(),
                    lsn,
                    state: "{}".into(),
                    windows: None,
                    rev,
                };
            }
            // Numeric values: these make up `pub_state` and the delta.
            let mut values: BTreeMap<String, i64> = BTreeMap::new();
            let on_hand = int(fields, "on_hand");
            let reserved = int(fields, "reserved");
            let available = fields
                .get("available")
                .and_then(|v| v.parse().ok())
                .unwrap_or(on_hand.saturating_sub(reserved));
            values.insert("on_hand".into(), on_hand);
            values.insert("reserved".into(), reserved);
            values.insert("available".into(), available);

            let mut locations: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
            for (f, v) in fields {
                let Some(rest) = f.strip_prefix("loc:") else {
                    continue;
                };
                let Some((loc, what)) = rest.rsplit_once(':') else {
                    continue;
                };
                if !matches!(what, "on_hand" | "reserved") {
                    continue;
                }
                let n: i64 = v.parse().unwrap_or(0);
                let entry = locations.entry(loc).or_default();
                entry.insert(what.to_string(), json!(n));
                values.insert(f.clone(), n);
            }
            for m in locations.values_mut() {
                // both keys always, so apps need no defaults
                m.entry("on_hand").or_insert(json!(0));
                m.entry("reserved").or_insert(json!(0));
            }

            let now_minute = layout::minute_of_ms(now_ms);
            let pairs = || fields.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            let mut window_values: Vec<(String, i64)> = Vec::new();
            for c in &spec.counters {
                values.insert(c.name.clone(), int(fields, &c.name));
                for &w in &c.windows_secs {
                    let minutes = i64::try_from(w / 60).unwrap_or(1).max(1);
                    let name = window_name(&c.name, w);
                    let sum = layout::window_sum(pairs(), &c.name, minutes, now_minute);
                    window_values.push((name, sum));
                    if c.distinct_users {
                        let uname = users_name(&c.name, w);
                        let n = users.get(&uname).copied().unwrap_or(0);
                        window_values.push((uname, n));
                    }
                }
            }
            if let Some(sc) = &spec.sell_counter {
                let rate = layout::window_sum(pairs(), sc, 60, now_minute);
                window_values.push(("sell_rate_per_h".into(), rate));
                if rate > 0 && available > 0 {
                    let eta = i64::try_from(i128::from(available) * 3600 / i128::from(rate))
                        .unwrap_or(i64::MAX);
                    window_values.push(("stockout_eta_s".into(), eta));
                }
            }
            let windows = window_values.iter().any(|(_, v)| *v != 0).then(|| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                window_values.hash(&mut h);
                h.finish()
            });
            for (k, v) in &window_values {
                values.insert(k.clone(), *v);
            }

            let mut obj = Map::new();
            obj.insert("v".into(), json!(FORMAT_VERSION));
            obj.insert("sku".into(), json!(sku));
            for (k, v) in &values {
                if !k.starts_with("loc:") {
                    obj.insert(k.clone(), json!(v));
                }
            }
            if !locations.is_empty() {
                let l: Map<String, Value> = locations
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Value::Object(v)))
                    .collect();
                obj.insert("locations".into(), Value::Object(l));
            }
            if let Some((thr, st)) = alert_members(spec, fields) {
                obj.insert("threshold".into(), json!(thr));
                obj.insert("alert_state".into(), json!(st));
            }
            match kind {
                Kind::Change => {
                    if let Some(p) = u64_field(fields, "pub_lsn") {
                        let prev: BTreeMap<String, i64> = fields
                            .get("pub_state")
                            .and_then(|s| serde_json::from_str::<BTreeMap<String, i64>>(s).ok())
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|(k, _)| is_stored(spec, k))
                            .collect();
                        let cur: BTreeMap<String, i64> = values
                            .iter()
                            .filter(|(k, _)| is_stored(spec, k))
                            .map(|(k, v)| (k.clone(), *v))
                            .collect();
                        obj.insert("delta".into(), delta(&cur, &prev));
                        let pp = piece_num(fields.get("pub_piece").map(String::as_str));
                        obj.insert("delta_from".into(), json!(base(p, pp)));
                    }
                }
                Kind::Aging { as_of_ms } => {
                    if let Some(t) = rfc3339_ms(as_of_ms) {
                        obj.insert("as_of".into(), json!(t));
                    }
                }
                Kind::Current => {}
            }
            if fields.contains_key("lsn") {
                obj.insert("lsn".into(), json!(lsn_text(lsn)));
            }
            obj.insert("rev".into(), json!(rev));
            if let Some(t) = fields
                .get("ts")
                .and_then(|v| v.parse::<i64>().ok())
                .and_then(rfc3339_ms)
            {
                obj.insert("ts".into(), json!(t));
            }
            let state = serde_json::to_string(&values).unwrap_or_else(|_| "{}".into());
            StateMessage {
                payload: Value::Object(obj).to_string(),
                lsn,
                state,
                windows,
                rev,
            }
        }

        /// Current minus previous, non-zero entries only; location values nested under
        /// `locations` like in the payload.
        fn delta(cur: &BTreeMap<String, i64>, prev: &BTreeMap<String, i64>) -> Value {
            let mut out = Map::new();
            let mut locs: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
            let keys: std::collections::BTreeSet<&String> = cur.keys().chain(prev.keys()).collect();
            for k in keys {
                let d = cur
                    .get(k)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(prev.get(k).copied().unwrap_or(0));
                if d == 0 {
                    continue;
                }
                match k.strip_prefix("loc:").and_then(|r| r.rsplit_once(':')) {
                    Some((loc, what)) => {
                        locs.entry(loc.to_string())
                            .or_default()
                            .insert(what.to_string(), json!(d));
                    }
                    None => {
                        out.insert(k.clone(), json!(d));
                    }
                }
            }
            if !locs.is_empty() {
                let l: Map<String, Value> = locs
                    .into_iter()
                    .map(|(k, v)| (k, Value::Object(v)))
                    .collect();
                out.insert("locations".into(), Value::Object(l));
            }
            Value::Object(out)
        }
    }

    fn arb_fields() -> impl proptest::strategy::Strategy<Value = HashMap<String, String>> {
        use proptest::prelude::*;
        let name = prop::sample::select(vec![
            "on_hand",
            "reserved",
            "available",
            "views",
            "purchases",
            "lsn",
            "piece",
            "pub_lsn",
            "pub_piece",
            "ts",
            "gone",
            "sku",
            "v",
            "locations",
            "delta",
        ]);
        let loc = prop::sample::select(vec!["WH-1", "WH:2", "a\"b", "é/€", "", "x\\y"]);
        let what = prop::sample::select(vec!["on_hand", "reserved", "rows"]);
        let num = prop_oneof![
            (-1000i64..1000).prop_map(|n| n.to_string()),
            Just("x".to_string())
        ];
        let plain = prop::collection::vec((name, num.clone()), 0..10);
        let locs = prop::collection::vec((loc, what, num.clone()), 0..6);
        let buckets = prop::collection::vec(
            (
                prop::sample::select(vec!["views", "purchases"]),
                -70i64..2,
                num,
            ),
            0..8,
        );
        let prev = prop::collection::btree_map(
            prop::sample::select(vec![
                "on_hand",
                "available",
                "loc:WH-1:on_hand",
                "loc:WH:2:reserved",
                "loc:WH:2:rows",
                "loc::on_hand",
                "views_5m",
                "old",
            ]),
            -50i64..50,
            0..5,
        );
        (
            plain,
            locs,
            buckets,
            proptest::option::of(prev),
            any::<bool>(),
        )
            .prop_map(|(plain, locs, buckets, prev, ts)| {
                let mut f: HashMap<String, String> = HashMap::new();
                let m = layout::minute_of_ms(NOW);
                for (k, v) in plain {
                    f.insert(k.to_string(), v);
                }
                for (l, w, v) in locs {
                    f.insert(format!("loc:{l}:{w}"), v);
                }
                for (c, dm, v) in buckets {
                    f.insert(layout::bucket_field(c, m + dm), v);
                }
                if let Some(p) = prev {
                    f.insert("pub_state".into(), serde_json::to_string(&p).unwrap());
                }
                if ts {
                    f.insert("ts".into(), NOW.to_string());
                }
                f.remove("gone");
                f
            })
    }

    proptest::proptest! {
        #[test]
        fn direct_writer_matches_the_value_builder(
            f in arb_fields(),
            aging in proptest::prelude::any::<bool>(),
            sku in proptest::prelude::prop::sample::select(vec!["A/1", "b\"#+", "ü", ""]),
        ) {
            let kind = if aging { Kind::Aging { as_of_ms: NOW } } else { Kind::Change };
            let users = HashMap::from([("views_users_5m".to_string(), 2)]);
            let new = state_message(&spec(), sku, &f, &users, NOW, kind);
            let old = reference::state_message(&spec(), sku, &f, &users, NOW, kind);
            proptest::prop_assert_eq!(new, old);
        }

        #[test]
        fn strings_and_values_are_written_as_serde_json_writes_them(
            s in "(?s).{0,24}",
            values in proptest::collection::btree_map("(?s).{0,12}", proptest::prelude::any::<i64>(), 0..6),
        ) {
            let mut out = Vec::new();
            write_str(&mut out, &s);
            proptest::prop_assert_eq!(out, serde_json::to_vec(&s).unwrap());
            proptest::prop_assert_eq!(
                values_json(values.iter().map(|(k, v)| (k.as_str(), *v))),
                serde_json::to_string(&values).unwrap()
            );
        }

        #[test]
        fn stored_states_are_read_as_serde_json_reads_them(
            values in proptest::collection::btree_map("(?s).{0,12}", proptest::prelude::any::<i64>(), 0..6),
            cut in 0usize..64,
            junk in "[-0-9a-z\"{}:,. \\\\]{0,6}",
        ) {
            let serde = |s: &str| -> Vec<(String, i64)> {
                serde_json::from_str::<BTreeMap<String, i64>>(s)
                    .map(|m| m.into_iter().collect())
                    .unwrap_or_default()
            };
            let ours = |s: &str| -> Vec<(String, i64)> {
                parse_state(s).into_iter().map(|(k, v)| (k.into_owned(), v)).collect()
            };
            let written = values_json(values.iter().map(|(k, v)| (k.as_str(), *v)));
            proptest::prop_assert_eq!(ours(&written), serde(&written));
            // and whatever else a hash might hold: cut short, spliced, spaced, reordered
            let mut chars: Vec<char> = written.chars().collect();
            let at = cut.min(chars.len());
            chars.splice(at..at, junk.chars());
            let spliced: String = chars.iter().collect();
            proptest::prop_assert_eq!(ours(&spliced), serde(&spliced));
            let short: String = written.chars().take(cut).collect();
            proptest::prop_assert_eq!(ours(&short), serde(&short));
        }
    }

    #[test]
    fn flat_hashes_hold_what_redis_rs_converts_a_hash_reply_into() {
        use redis::Value;
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let replies = [
            Value::Array(vec![
                bulk("a"),
                bulk("1"),
                bulk("b"),
                bulk("2"),
                bulk("a"),
                bulk("3"),
            ]),
            Value::Array(vec![]),
            Value::Nil,
            Value::Map(vec![(bulk("k"), bulk("v"))]),
            Value::Array(vec![bulk("odd")]),
            Value::Array(vec![bulk("a"), Value::BulkString(vec![0xff])]),
            Value::Array(vec![bulk("a"), Value::Int(7)]),
        ];
        for v in replies {
            let ours = FlatHash::from_value(v.clone()).map_err(|e| e.to_string());
            let theirs = redis::from_redis_value::<HashMap<String, String>>(v.clone())
                .map_err(|e| e.to_string());
            assert_eq!(ours.is_ok(), theirs.is_ok(), "{v:?}");
            if let (Ok(a), Ok(b)) = (ours, theirs) {
                assert_eq!(a, FlatHash::from(&b), "{v:?}");
            }
        }
    }

    #[test]
    fn sorted_pairs_keep_the_last_of_a_key_as_a_btree_map_does() {
        let pairs = vec![("b", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5), ("b", 6)];
        let map: BTreeMap<&str, i32> = pairs.iter().copied().collect();
        assert_eq!(sorted(pairs), map.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn stored_states_with_odd_numbers_and_keys_are_read_as_serde_json_reads_them() {
        for s in [
            "{}",
            "{ }",
            "{\"a\":01}",
            "{\"a\":-0}",
            "{\"a\":1.0}",
            "{\"a\":1e3}",
            "{\"a\":9223372036854775807}",
            "{\"a\":9223372036854775808}",
            "{\"a\":-9223372036854775808}",
            "{\"b\":1,\"a\":2}",
            "{\"a\":1,\"a\":2}",
            "{\"a\\u0041\":1}",
            "{\"a\":1,}",
            "{\"a\":1} ",
            "{\"a\":-}",
            "{\"\":5}",
            "{\"ü\":3}",
            "[]",
            "",
        ] {
            let ours: Vec<(String, i64)> = parse_state(s)
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v))
                .collect();
            let serde: Vec<(String, i64)> = serde_json::from_str::<BTreeMap<String, i64>>(s)
                .map(|m| m.into_iter().collect())
                .unwrap_or_default();
            assert_eq!(ours, serde, "{s}");
        }
    }

    #[test]
    fn revs_are_fixed_width_hex_as_format_writes_them() {
        for (lsn, piece, ms) in [
            (0u64, 0i64, 0i64),
            (0x16_B374_D848, 3, NOW),
            (u64::MAX, i64::MAX, i64::MAX),
            (1, -5, -1),
        ] {
            let want = format!(
                "{lsn:016x}{:08x}{:011x}",
                piece.clamp(0, i64::from(u32::MAX)),
                ms.clamp(0, 0xfff_ffff_ffff)
            );
            assert_eq!(rev(lsn, piece, ms), want);
            assert_eq!(base(lsn, piece), want[..24]);
        }
    }

    #[test]
    fn names_that_need_escapes_are_escaped_like_serde_json() {
        for s in [
            "a\"b",
            "back\\slash",
            "tab\tnl\n",
            "\u{1}\u{1f}",
            "del\u{7f}",
            "/ü🏬",
            "",
        ] {
            let mut out = Vec::new();
            write_str(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    fn spec() -> Spec {
        Spec {
            counters: vec![
                CounterSpec {
                    name: "views".into(),
                    windows_secs: vec![300, 3600],
                    distinct_users: true,
                },
                CounterSpec {
                    name: "purchases".into(),
                    windows_secs: vec![3600],
                    distinct_users: false,
                },
            ],
            sell_counter: Some("purchases".into()),
            scale: 0,
            low_stock: 5,
        }
    }

    #[test]
    fn users_queries_count_the_minute_keys_beside_the_windows_buckets() {
        let m = layout::minute_of_ms(NOW);
        // views: buckets 2 and 20 minutes ago (and one an hour and more ago); purchases
        // has no users
        let f = fields(&[
            (&layout::bucket_field("views", m - 2), "1".into()),
            (&layout::bucket_field("views", m - 20), "0".into()),
            (&layout::bucket_field("views", m - 60), "4".into()),
            (&layout::bucket_field("purchases", m), "3".into()),
        ]);
        let mut pipe = redis::pipe();
        let q = users_queries(&spec(), "p", "a{b}", &f, NOW, &mut pipe);
        assert_eq!(q.replies(), 2);
        let keys = |ms: &[i64]| {
            let mut c = redis::cmd("PFCOUNT");
            for &x in ms {
                c.arg(layout::users_minute_key("p", "a{b}", "views", x));
            }
            c.get_packed_command()
        };
        let mut sent = pipe.get_packed_pipeline();
        let (a, b) = (keys(&[m - 2]), keys(&[m - 20, m - 2]));
        assert!(sent.starts_with(&a), "the 5m window reads one key");
        assert_eq!(sent.split_off(a.len()), b, "the 1h window reads two keys");
        let counts = q.counts(&mut [7, 9].into_iter());
        assert_eq!(counts["views_users_5m"], 7);
        assert_eq!(counts["views_users_1h"], 9);

        // no buckets in any window: nothing is asked, every count is 0
        let mut pipe = redis::pipe();
        let old = fields(&[(&layout::bucket_field("views", m - 61), "1".into())]);
        let q = users_queries(&spec(), "p", "x", &old, NOW, &mut pipe);
        assert_eq!(q.replies(), 0);
        assert!(pipe.get_packed_pipeline().is_empty());
        let counts = q.counts(&mut std::iter::empty());
        assert_eq!(counts["views_users_5m"], 0);
        assert_eq!(counts["views_users_1h"], 0);

        // a gone SKU publishes no counts, whatever buckets it kept
        let mut pipe = redis::pipe();
        let mut gone = f.clone();
        gone.insert("gone".into(), "1".into());
        let q = users_queries(&spec(), "p", "x", &gone, NOW, &mut pipe);
        assert_eq!(q.replies(), 0);
        assert!(pipe.get_packed_pipeline().is_empty());
    }

    fn fields(pairs: &[(&str, String)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn first_message_full_payload() {
        let m = layout::minute_of_ms(NOW);
        let f = fields(&[
            ("on_hand", "8".into()),
            ("reserved", "2".into()),
            ("available", "6".into()),
            ("loc:WH-1:on_hand", "6".into()),
            ("loc:WH-1:reserved", "2".into()),
            ("loc:WH:2:on_hand", "2".into()),
            ("views", "100".into()),
            ("purchases", "9".into()),
            (&layout::bucket_field("views", m), "3".into()),
            (&layout::bucket_field("views", m - 10), "4".into()),
            (&layout::bucket_field("purchases", m - 30), "3".into()),
            (&layout::bucket_field("purchases", m - 60), "50".into()),
            ("lsn", "4294967297".into()),
            ("ts", NOW.to_string()),
        ]);
        let users = HashMap::from([
            ("views_users_5m".to_string(), 2),
            ("views_users_1h".to_string(), 5),
        ]);
        let msg = state_message(&spec(), "A/1", &f, &users, NOW, Kind::Change);
        let v = parse(&msg.payload);
        assert_eq!(
            v,
            json!({
                "v": 2, "sku": "A/1", "on_hand": 8, "reserved": 2, "available": 6,
                "locations": {"WH-1": {"on_hand": 6, "reserved": 2}, "WH:2": {"on_hand": 2, "reserved": 0}},
                "views": 100, "purchases": 9,
                "views_5m": 3, "views_1h": 7, "views_users_5m": 2, "views_users_1h": 5,
                "purchases_1h": 3, "sell_rate_per_h": 3, "stockout_eta_s": 7200,
                "rev": "00000001000000010000000019aba3dbefb",
                "lsn": "1/1", "ts": "2025-11-25T09:00:00.123Z"
            }),
            "no acknowledged state yet: no delta, no delta_from"
        );
        assert_eq!(msg.rev.len(), 35);
        // with an acknowledged base: the delta has stored values only
        let mut g = f.clone();
        g.insert("pub_lsn".into(), "4294967296".into());
        g.insert("pub_piece".into(), "2".into());
        g.insert(
            "pub_state".into(),
            r#"{"on_hand":9,"views":90,"views_5m":1,"sell_rate_per_h":1,"stockout_eta_s":9,"loc:WH-1:on_hand":7}"#.into(),
        );
        let v = parse(&state_message(&spec(), "A/1", &g, &users, NOW, Kind::Change).payload);
        assert_eq!(
            v["delta"],
            json!({"on_hand": -1, "reserved": 2, "available": 6, "views": 10, "purchases": 9,
                   "locations": {"WH-1": {"on_hand": -1, "reserved": 2}, "WH:2": {"on_hand": 2}}})
        );
        assert_eq!(v["delta_from"], json!("000000010000000000000002"));
        assert!(!msg.payload.contains(' '), "compact");
        assert!(msg.windows.is_some());
        assert_eq!(msg.lsn, 4_294_967_297);
        let st: BTreeMap<String, i64> = serde_json::from_str(&msg.state).unwrap();
        assert_eq!(st["loc:WH-1:on_hand"], 6);
        assert_eq!(st["views_5m"], 3);
    }

    #[test]
    fn every_member_not_named_after_a_counter_is_listed_in_state_members() {
        let m = layout::minute_of_ms(NOW);
        let f = fields(&[
            ("on_hand", "8".into()),
            ("reserved", "2".into()),
            ("loc:WH-1:on_hand", "6".into()),
            ("views", "100".into()),
            ("purchases", "9".into()),
            (&layout::bucket_field("views", m), "3".into()),
            (&layout::bucket_field("purchases", m), "3".into()),
            ("lsn", "7".into()),
            ("pub_lsn", "5".into()),
            ("pub_state", "{\"on_hand\":1}".into()),
            ("ts", NOW.to_string()),
        ]);
        let users = HashMap::from([("views_users_5m".to_string(), 2)]);
        let spec = spec();
        let from_counters: Vec<String> = spec
            .counters
            .iter()
            .flat_map(|c| {
                let mut n = vec![c.name.clone()];
                for &w in &c.windows_secs {
                    n.push(window_name(&c.name, w));
                    n.push(users_name(&c.name, w));
                }
                n
            })
            .collect();
        for kind in [Kind::Change, Kind::Aging { as_of_ms: NOW }] {
            let v = parse(&state_message(&spec, "A", &f, &users, NOW, kind).payload);
            let mut members: Vec<&String> = v.as_object().unwrap().keys().collect();
            if let Some(d) = v.get("delta") {
                members.extend(d.as_object().unwrap().keys());
            }
            for k in members {
                assert!(
                    from_counters.contains(k) || crate::names::STATE_MEMBERS.contains(&k.as_str()),
                    "{k} is neither a counter's nor in STATE_MEMBERS"
                );
            }
        }
    }

    #[test]
    fn delta_against_pub_state_and_prev_lsn() {
        let f = fields(&[
            ("on_hand", "5".into()),
            ("available", "5".into()),
            ("lsn", "20".into()),
            ("pub_lsn", "10".into()),
            (
                "pub_state",
                r#"{"on_hand":8,"available":8,"reserved":0,"gone_counter":1}"#.into(),
            ),
        ]);
        let msg = state_message(
            &Spec::default(),
            "x",
            &f,
            &HashMap::new(),
            NOW,
            Kind::Change,
        );
        let v = parse(&msg.payload);
        assert_eq!(
            v["delta"],
            json!({"on_hand": -3, "available": -3}),
            "a value no longer mapped (gone_counter) is not a stored value"
        );
        assert_eq!(v["delta_from"], json!("000000000000000a00000000"));
        assert_eq!(v["lsn"], json!("0/14"));
        assert!(v.get("prev_lsn").is_none(), "format 2 dropped prev_lsn");
        // no features configured: no nulls, no windows, no sell rate, no ts
        for k in [
            "locations",
            "sell_rate_per_h",
            "stockout_eta_s",
            "ts",
            "as_of",
        ] {
            assert!(v.get(k).is_none(), "{k}");
        }
        assert!(!msg.payload.contains("null"));
        assert_eq!(msg.windows, None);
    }

    #[test]
    fn aging_has_as_of_and_no_delta() {
        let f = fields(&[("lsn", "1".into())]);
        let msg = state_message(
            &spec(),
            "x",
            &f,
            &HashMap::new(),
            NOW,
            Kind::Aging { as_of_ms: NOW },
        );
        let v = parse(&msg.payload);
        assert!(v.get("delta").is_none());
        assert_eq!(v["as_of"], json!("2025-11-25T09:00:00.123Z"));
        assert_eq!(v["sell_rate_per_h"], json!(0));
        assert!(v.get("stockout_eta_s").is_none(), "rate 0");
        assert_eq!(msg.windows, None, "all windows zero");
    }

    #[test]
    fn eta_omitted_when_nothing_available() {
        let m = layout::minute_of_ms(NOW);
        let f = fields(&[
            ("available", "0".into()),
            (&layout::bucket_field("purchases", m), "2".into()),
        ]);
        let v = parse(&state_message(&spec(), "x", &f, &HashMap::new(), NOW, Kind::Change).payload);
        assert_eq!(v["sell_rate_per_h"], json!(2));
        assert!(v.get("stockout_eta_s").is_none());
    }

    #[test]
    fn gone_clears() {
        let f = fields(&[
            ("gone", "1".into()),
            ("lsn", "7".into()),
            ("on_hand", "0".into()),
        ]);
        let msg = state_message(&spec(), "x", &f, &HashMap::new(), NOW, Kind::Change);
        assert_eq!(msg.payload, "");
        assert_eq!(msg.lsn, 7);
        assert_eq!(msg.state, "{}");
    }

    #[test]
    fn unpublished_rule() {
        let u = |l, p, pl, pp, a| unpublished(l, p, pl, pp, a);
        assert!(!u(Some("5"), None, Some("5"), None, None));
        assert!(!u(Some("5"), Some("0"), Some("5"), None, Some("[]")));
        assert!(u(Some("5"), None, Some("4"), None, None));
        assert!(u(Some("5"), None, None, None, None));
        assert!(u(None, None, None, None, None));
        assert!(!u(None, None, Some("0"), None, None));
        assert!(u(
            Some("5"),
            None,
            Some("5"),
            None,
            Some(r#"[{"type":"low_stock"}]"#)
        ));
        // a later piece of the same transaction is a new state
        assert!(u(Some("5"), Some("3"), Some("5"), Some("0"), None));
        assert!(u(Some("5"), Some("3"), Some("5"), None, None));
        assert!(!u(Some("5"), Some("3"), Some("5"), Some("3"), None));
        assert!(u(Some("5"), Some("-1"), Some("5"), Some("0"), None));
    }

    #[test]
    fn later_pieces_order_by_rev_and_delta_from_names_the_piece() {
        let f = fields(&[
            ("lsn", "7".into()),
            ("piece", "2".into()),
            ("pub_lsn", "7".into()),
            ("pub_piece", "1".into()),
            ("on_hand", "3".into()),
        ]);
        let later = state_message(&spec(), "x", &f, &HashMap::new(), NOW, Kind::Change);
        let v = parse(&later.payload);
        assert_eq!(v["delta_from"], json!("000000000000000700000001"));
        assert!(v.get("piece").is_none() && v.get("prev_piece").is_none());
        let f0 = fields(&[
            ("lsn", "7".into()),
            ("piece", "0".into()),
            ("on_hand", "3".into()),
        ]);
        // read later, but an earlier piece: still older
        let earlier = state_message(&spec(), "x", &f0, &HashMap::new(), NOW + 1000, Kind::Change);
        assert!(earlier.rev < later.rev);
        // an aging republish of the same state read later is newer
        let aged = state_message(
            &spec(),
            "x",
            &f,
            &HashMap::new(),
            NOW + 1,
            Kind::Aging { as_of_ms: NOW + 1 },
        );
        assert!(aged.rev > later.rev && aged.rev[..24] == later.rev[..24]);
        // a later transaction is newer whatever the clocks say
        let f2 = fields(&[("lsn", "8".into()), ("on_hand", "3".into())]);
        assert!(state_message(&spec(), "x", &f2, &HashMap::new(), 0, Kind::Change).rev > aged.rev);
    }

    #[test]
    fn alerts_parse_and_payload() {
        let (a, bad) = parse_alerts(
            Some(
                r#"[{"type":"low_stock","available":3,"threshold":5,"lsn":"123456789","ts":1764061200123},{"type":"x"},{"type":"out_of_stock","available":0,"threshold":5,"lsn":4294967296,"ts":1}]"#,
            ),
            0,
        );
        assert_eq!(bad, 1);
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].lsn_raw, "4294967296");
        let v = parse(&alert_payload("S/1", &a[0], 0));
        assert_eq!(
            v,
            json!({"v":2,"id":"0/75BCD15:low_stock:S/1","type":"low_stock","sku":"S/1",
                   "available":3,"threshold":5,"lsn":"0/75BCD15","ts":"2025-11-25T09:00:00.123Z"})
        );
        assert_eq!(parse_alerts(None, 0).0.len(), 0);
        assert_eq!(parse_alerts(Some("not json"), 0).1, 1);
        // decimals: the apply script stores them as strings
        let (a, _) = parse_alerts(
            Some(r#"[{"type":"low_stock","available":"2.5","threshold":"3","lsn":"1"}]"#),
            3,
        );
        assert_eq!((a[0].available, a[0].threshold), (2500, 3000));
        let body = alert_payload("S", &a[0], 3);
        assert!(
            body.contains(r#""available":2.5,"#) && body.contains(r#""threshold":3,"#),
            "{body}"
        );
    }

    #[test]
    fn decimal_quantities_are_written_as_decimal_numbers() {
        let spec = Spec { scale: 3, ..spec() };
        let f = fields(&[
            ("on_hand", "12.5".into()),
            ("reserved", "0.125".into()),
            ("available", "12.375".into()),
            ("loc:A:on_hand", "12.5".into()),
            ("loc:A:reserved", "0.125".into()),
            ("purchases", "1.5".into()),
            ("w:purchases:29401020", "1.5".into()),
            ("pub_state", r#"{"on_hand":10000}"#.into()),
            ("pub_lsn", "6".into()),
            ("lsn", "7".into()),
        ]);
        let m = state_message(&spec, "S", &f, &HashMap::new(), NOW, Kind::Change);
        let v = parse(&m.payload);
        assert_eq!(v["on_hand"], json!(12.5));
        assert_eq!(v["reserved"], json!(0.125));
        assert_eq!(v["available"], json!(12.375));
        assert_eq!(v["locations"]["A"]["on_hand"], json!(12.5));
        assert_eq!(v["purchases"], json!(1.5));
        assert_eq!(v["delta"]["on_hand"], json!(2.5));
        assert!(m.payload.contains(r#""on_hand":12.5"#), "{}", m.payload);
    }

    #[test]
    fn cbor_has_the_same_members_and_decodes_back() {
        use crate::config::PayloadFormat;
        let f = fields(&[
            ("on_hand", "8".into()),
            ("loc:W/1:on_hand", "8".into()),
            ("rows", "1".into()),
            ("alert_state", "ok".into()),
            ("lsn", "7".into()),
        ]);
        let scaled = Spec { scale: 3, ..spec() };
        let mut f2 = f.clone();
        f2.insert("on_hand".into(), "8.25".into());
        for (spec, f) in [(spec(), f), (scaled, f2)] {
            let m = state_message(&spec, "ü/1", &f, &HashMap::new(), NOW, Kind::Change);
            let cbor = encode(PayloadFormat::Cbor, &m.payload);
            assert!((0xa0..=0xbf).contains(&cbor[0]), "a CBOR map");
            assert!(
                cbor.len() < m.payload.len(),
                "{} vs {}",
                cbor.len(),
                m.payload.len()
            );
            assert_eq!(decode(&cbor), Some(parse(&m.payload)));
            assert_eq!(
                encode(PayloadFormat::Json, &m.payload),
                m.payload.as_bytes()
            );
        }
        assert!(
            encode(PayloadFormat::Cbor, "").is_empty(),
            "a clear stays empty"
        );
        let p = properties(PayloadFormat::Cbor, ("rev", "abc"), Some(60));
        assert_eq!(p.content_type.as_deref(), Some("application/cbor"));
        assert_eq!(p.payload_format_indicator, Some(0));
        assert_eq!(
            p.user_properties,
            vec![("rev".to_string(), "abc".to_string())]
        );
        assert_eq!(p.message_expiry_interval, Some(60));
        let p = properties(PayloadFormat::Json, ("seq", ""), None);
        assert_eq!(p.payload_format_indicator, Some(1));
        assert!(p.user_properties.is_empty());
    }

    #[test]
    fn threshold_and_alert_state_tell_a_late_joiner() {
        let f = fields(&[
            ("on_hand", "3".into()),
            ("rows", "1".into()),
            ("alert_state", "low".into()),
        ]);
        let v = parse(&state_message(&spec(), "x", &f, &HashMap::new(), NOW, Kind::Change).payload);
        assert_eq!(
            (v["threshold"].clone(), v["alert_state"].clone()),
            (json!(5), json!("low"))
        );
        let f = fields(&[
            ("on_hand", "3".into()),
            ("rows", "1".into()),
            ("threshold", "2".into()),
        ]);
        let v =
            parse(&state_message(&spec(), "x", &f, &HashMap::new(), NOW, Kind::Current).payload);
        assert_eq!(
            (v["threshold"].clone(), v["alert_state"].clone()),
            (json!(2), json!("ok"))
        );
        assert!(v.get("delta").is_none() && v.get("as_of").is_none());
        // no stock rows: no alert members
        let f = fields(&[("views", "3".into())]);
        let v = parse(&state_message(&spec(), "x", &f, &HashMap::new(), NOW, Kind::Change).payload);
        assert!(v.get("threshold").is_none() && v.get("alert_state").is_none());
        assert_eq!(
            gone_object("a\"b", "00ff"),
            r#"{"gone":true,"rev":"00ff","sku":"a\"b","v":2}"#
        );
    }

    #[test]
    fn odd_ts_is_omitted_not_panicking() {
        assert_eq!(rfc3339_ms(i64::MAX), None);
        assert_eq!(rfc3339_ms(0).as_deref(), Some("1970-01-01T00:00:00.000Z"));
        let f = fields(&[("ts", i64::MIN.to_string()), ("on_hand", "x".into())]);
        let v = parse(&state_message(&spec(), "x", &f, &HashMap::new(), NOW, Kind::Change).payload);
        assert!(v.get("ts").is_none());
        assert_eq!(users_name("views", 3600), "views_users_1h");
    }
}
