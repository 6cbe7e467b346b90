//! The Redis layout shared by the apply script, the snapshot loader and the MQTT
//! publisher. See docs/redis-layout.md.
//!
//! Layout 3 (meta `layout`). Every key a SKU owns carries that SKU as its hash tag, so
//! Redis Cluster keeps them in one slot and one apply call per slot stays atomic:
//!
//! - `<prefix>:{<TAG>}`: the SKU's hash; `<TAG>` is the SKU with `%`, `{` and `}`
//!   percent-encoded (`%25`, `%7B`, `%7D`) and the empty SKU written `%` (see [`sku_tag`]);
//! - `<prefix>:{<TAG>}:u:<counter>` and `<prefix>:{<TAG>}:u:<counter>:<minute>`: distinct
//!   users (HyperLogLogs of HMAC'd ids), lifetime and per minute;
//! - `<prefix>:meta`: the meta hash.
//!
//! The SKU hash, all integers as decimal strings:
//!
//! | field | meaning |
//! |---|---|
//! | `on_hand`, `reserved`, `available` | totals over all stock rows (available = on_hand - reserved) |
//! | `loc:<LOC>:on_hand`, `loc:<LOC>:reserved` | per location |
//! | `<counter>` | lifetime total of an activity counter (e.g. `views`) |
//! | `w:<counter>:<minute>` | window bucket: events in that minute (unix seconds / 60) |
//! | `r:<n>:<table>:<key>` | one stock row's contribution, JSON `[location, on_hand, reserved]`; see [`row_field`] |
//! | `lsn`, `piece` | fence: commit LSN (u64) and piece number of the last applied change |
//! | `ts` | commit time of that transaction, unix milliseconds |
//! | `threshold` | per-SKU low-stock threshold, when a column maps it |
//! | `alert_state` | `ok`, `low` or `out` |
//! | `alerts` | JSON array of alerts not yet acknowledged by the broker |
//! | `pub_lsn`, `pub_piece` | LSN and piece of the last state the broker acknowledged (outbox mark) |
//! | `pub_state` | JSON object of the numeric values in that acknowledged message |
//! | `pub_seq` | MQTT epoch sequence when that state was sent (see the MQTT sink's "Broker restarts") |
//! | `gone` | `1` when no stock rows and no counters remain (retained message cleared) |
//!
//! The meta hash holds `applied_lsn`, `system_id`, `timeline`, `fingerprint`, `bootstrap`
//! (`loading`, `done` once a snapshot finished loading, or `stale` when it must be
//! rebuilt), `layout` (this layout's version, [`LAYOUT_VERSION`]), `writer` (the
//! writer's fencing token, see `sinks::redis::WriterFence`), `mqtt_epoch`,
//! `mqtt_epoch_seq`, `last_publish_ms` and `tables` (the mapped stock tables' identities, JSON).
//!
//! Stock tables whose key does not contain the SKU (surrogate keys) have a row index
//! `<prefix>:ri:{<n>:<table>:<bucket>}` ([`row_index_key`]: a row's field -> the SKU whose
//! hash holds its contribution), bucketed so that each hash stays small and each bucket is
//! one cluster slot; meta `ri_truncated:<table>` fences the clearing of a truncated
//! table's index. For a table whose SKU or location is looked up, the value is the row's
//! [`RowRecord`]. Lookups keep per hop `<prefix>:ref:{<hop>:<bucket>}` (a referenced
//! row's key -> what it resolves to) and `<prefix>:dep:{<hop>:<bucket>}` (its
//! dependents); see [`state_slot`]. A row's contribution stays a `r:` field of its SKU's
//! hash whatever its identity. These keys exist only for mappings that need them;
//! adopting such a mapping changes the mapping fingerprint (one rebuild), not the layout.
//!
//! Layouts before 3 (no meta `layout`) kept SKU hashes at `<prefix>:sku:<SKU>` and users
//! at `{<prefix>:sku:<SKU>}:u:...`, and joined key values with a byte that text may
//! contain; such a Redis is rebuilt once (see [`legacy_sku_of_key`]).

use std::borrow::Cow;

/// The key layout this build reads and writes (meta `layout`). A Redis holding another
/// (or none, before layout 3) is rebuilt from a snapshot once.
pub const LAYOUT_VERSION: &str = "3";

/// A SKU as a hash tag: `%`, `{` and `}` percent-encoded, so the tag ends at the key's
/// own `}` and every SKU has a distinct one; the empty SKU is `%` (an empty tag would make
/// Redis Cluster hash the whole key, splitting the SKU's keys over slots).
pub fn sku_tag(sku: &str) -> Cow<'_, str> {
    if sku.is_empty() {
        return Cow::Borrowed("%");
    }
    if !sku.contains(['%', '{', '}']) {
        return Cow::Borrowed(sku);
    }
    let mut out = String::with_capacity(sku.len() + 8);
    for c in sku.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The SKU of a tag made by [`sku_tag`]; `None` for anything it cannot have made.
pub fn sku_of_tag(tag: &str) -> Option<Cow<'_, str>> {
    if tag == "%" {
        return Some(Cow::Borrowed(""));
    }
    if tag.is_empty() || tag.contains(['{', '}']) {
        return None;
    }
    if !tag.contains('%') {
        return Some(Cow::Borrowed(tag));
    }
    let mut out = String::with_capacity(tag.len());
    let mut rest = tag;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let esc = rest.get(i..i + 3)?;
        out.push(match esc {
            "%25" => '%',
            "%7B" => '{',
            "%7D" => '}',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(Cow::Owned(out))
}

/// Key of a SKU's hash: `<prefix>:{<TAG>}`.
pub fn sku_key(prefix: &str, sku: &str) -> String {
    // sized once (format! grows it): this runs several times per entry
    let tag = sku_tag(sku);
    let mut k = String::with_capacity(prefix.len() + tag.len() + 3);
    k.push_str(prefix);
    k.push_str(":{");
    k.push_str(&tag);
    k.push('}');
    k
}

/// SCAN MATCH pattern of every SKU hash key (the prefix glob-escaped). It can match a
/// distinct-user key whose counter name ends in `}`: filter with [`sku_of_key`].
pub fn sku_key_pattern(prefix: &str) -> String {
    format!("{}:{{*}}", glob_escape(prefix))
}

/// SCAN MATCH pattern of every distinct-user key.
pub fn users_key_pattern(prefix: &str) -> String {
    format!("{}:{{*}}:u:*", glob_escape(prefix))
}

/// The SKU of a hash key, if it is one.
pub fn sku_of_key(prefix: &str, key: &str) -> Option<String> {
    let tag = key
        .strip_prefix(prefix)?
        .strip_prefix(":{")?
        .strip_suffix('}')?;
    sku_of_tag(tag).map(Cow::into_owned)
}

/// The SKU of a hash key of layouts before 3 (`<prefix>:sku:<SKU>`), for the one upgrade.
pub fn legacy_sku_of_key<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(prefix)?.strip_prefix(":sku:")
}

/// SCAN MATCH patterns of the keys of layouts before 3: SKU hashes, distinct users.
pub fn legacy_key_patterns(prefix: &str) -> [String; 2] {
    let p = glob_escape(prefix);
    [format!("{p}:sku:*"), format!("{{{p}:sku:*")]
}

/// Key of the meta hash.
pub fn meta_key(prefix: &str) -> String {
    format!("{prefix}:meta")
}

/// Slots of a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The cluster slot of a key: CRC16 (XMODEM) of its hash tag (the text between its first
/// `{` and the next `}`, when not empty), else of the whole key; as Redis computes it.
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS as u16
}

/// A Redis Cluster slot's copy of the meta hash's fence (`writer`, `applied_lsn`):
/// `<prefix>:meta:{<t>}` with `t` the shortest decimal number that hashes to `slot`, so an
/// apply call names keys of one slot only. Only a cluster has them.
pub fn slot_meta_key(prefix: &str, slot: u16) -> String {
    format!("{prefix}:meta:{{{}}}", slot_tag(slot))
}

/// SCAN MATCH pattern of every slot's meta copy.
pub fn slot_meta_pattern(prefix: &str) -> String {
    format!("{}:meta:{{*}}", glob_escape(prefix))
}

/// The shortest decimal number (as text) whose CRC16 puts a hash tag in `slot`.
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let n = SLOTS;
        let mut tags = vec![String::new(); n];
        let mut left = n;
        let mut i: u64 = 0;
        // every slot is reached well below 10^6 (checked by a test)
        while left > 0 {
            let t = i.to_string();
            let s = slot_of(t.as_bytes()) as usize;
            if tags[s].is_empty() {
                tags[s] = t;
                left -= 1;
            }
            i += 1;
        }
        tags
    });
    &tags[slot as usize % tags.len()]
}

/// Key of the change index: a sorted set of SKU hash keys scored by the commit LSN of
/// their last change (the clients' catch-up, `/v1/changes`). Written by the apply script.
pub fn changes_key(prefix: &str) -> String {
    format!("{prefix}:changes")
}

/// Key of the alert history: a stream of every alert raised, bounded by count and age
/// (`/v1/alerts`, webhooks). Written by the apply script.
pub fn alerts_key(prefix: &str) -> String {
    format!("{prefix}:alerts")
}

/// Key of a webhook's delivery state (its cursor into the alert history).
pub fn webhook_key(prefix: &str, name: &str) -> String {
    format!("{prefix}:webhook:{name}")
}

/// Lifetime distinct-user HyperLogLog of a counter (same slot as the SKU's hash).
pub fn users_key(prefix: &str, sku: &str, counter: &str) -> String {
    sku_key(prefix, sku) + &users_suffix(counter)
}

/// Per-minute distinct-user HyperLogLog of a counter (same slot as the SKU's hash).
pub fn users_minute_key(prefix: &str, sku: &str, counter: &str, minute: i64) -> String {
    sku_key(prefix, sku) + &users_minute_suffix(counter, minute)
}

/// What [`users_key`] appends to the SKU hash's key (thin apply sends suffixes).
pub fn users_suffix(counter: &str) -> String {
    concat(&[":u:", counter])
}

/// What [`users_minute_key`] appends to the SKU hash's key.
pub fn users_minute_suffix(counter: &str, minute: i64) -> String {
    concat(&[":u:", counter, ":", itoa::Buffer::new().format(minute)])
}

/// `parts` joined, sized once: field and key names are made several times per entry,
/// and `format!` both grows its string and goes through the formatting machinery.
pub fn concat(parts: &[&str]) -> String {
    let mut s = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        s.push_str(p);
    }
    s
}

/// The start of every row field of a stock table: `r:<n>:<table>:`, with `n` the table
/// name's length in bytes, so no table's prefix is the start of another's (`inv` and
/// `inv:x`), and a TRUNCATE clears exactly its own rows.
pub fn row_field_prefix(table: &str) -> String {
    row_field_with(table, 0)
}

/// [`row_field_prefix`] with room for `more` bytes of key (sized once: every row has one).
pub(crate) fn row_field_with(table: &str, more: usize) -> String {
    let mut f = String::with_capacity(table.len() + 8 + more);
    f.push_str("r:");
    push_len(&mut f, table.len());
    f.push(':');
    f.push_str(table);
    f.push(':');
    f
}

/// Append a length in decimal (no allocation: this runs for every row).
fn push_len(out: &mut String, n: usize) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// A stock row's field: [`row_field_prefix`] then its key, encoded so that no two keys
/// share a field. `key` is one item per replica-identity column (`None` for NULL); each
/// is written `<len>:<bytes>` (len in bytes) and NULL as `~`, so the column boundaries are
/// known whatever bytes the values hold.
pub fn row_field<'a, K>(table: &str, key: K) -> String
where
    K: IntoIterator<Item = Option<&'a str>>,
    K::IntoIter: Clone,
{
    let key = key.into_iter();
    let mut f = row_field_with(table, key.clone().map(|v| item_len(v.map(str::len))).sum());
    for v in key {
        push_item(&mut f, v);
    }
    f
}

/// A REPLICA IDENTITY FULL row's field: the prefix and `#` with a hash of its values.
pub fn row_field_hashed(table: &str, hex_digest: &str) -> String {
    let mut f = row_field_prefix(table);
    f.push('#');
    f.push_str(hex_digest);
    f
}

/// Buckets of a table's row index: rows spread over this many hashes, so that no hash
/// grows with the table and each bucket is one cluster slot.
pub const ROW_INDEX_BUCKETS: u32 = 256;

/// Key of one bucket of a stock table's row index: `<prefix>:ri:{<n>:<table>:<bucket>}`
/// (`n` the table name's length; the table escaped like a SKU tag). Its fields are row
/// fields ([`row_field`]), its values the SKU whose hash holds the row's contribution.
pub fn row_index_key(prefix: &str, table: &str, bucket: u32) -> String {
    format!(
        "{prefix}:ri:{{{}:{}:{bucket}}}",
        table.len(),
        sku_tag(table)
    )
}

/// FNV-1a of a text: stable across builds and platforms.
pub fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The bucket of a row field.
pub fn row_index_bucket(field: &str) -> u32 {
    fnv1a(field) % ROW_INDEX_BUCKETS
}

/// The table of a row field made by [`row_field`] (`r:<n>:<table>:...`).
pub fn table_of_row_field(field: &str) -> Option<&str> {
    let rest = field.strip_prefix("r:")?;
    let (n, rest) = rest.split_once(':')?;
    let n: usize = n.parse().ok()?;
    rest.get(..n)
}

/// SCAN MATCH pattern of every row-index key.
pub fn row_index_pattern(prefix: &str) -> String {
    format!("{}:ri:{{*}}", glob_escape(prefix))
}

/// Bytes [`push_item`] writes for an item of `len` bytes (`None`: no item).
pub(crate) fn item_len(len: Option<usize>) -> usize {
    match len {
        Some(n) => itoa::Buffer::new().format(n).len() + 1 + n,
        None => 1,
    }
}

/// Append `<len>:<bytes>` (or `~` for none): items whose boundaries are known whatever
/// bytes they hold.
pub(crate) fn push_item(out: &mut String, v: Option<&str>) {
    match v {
        Some(s) => {
            push_len(out, s.len());
            out.push(':');
            out.push_str(s);
        }
        None => out.push('~'),
    }
}

/// Read one item written by [`push_item`]; returns it and the rest.
fn take_item(s: &str) -> Option<(Option<&str>, &str)> {
    if let Some(rest) = s.strip_prefix('~') {
        return Some((None, rest));
    }
    let (n, rest) = s.split_once(':')?;
    let n: usize = n.parse().ok()?;
    let v = rest.get(..n)?;
    Some((Some(v), &rest[n..]))
}

/// The fold's name for a lookup value: `k:<hop>:<reference>` (see [`state_slot`]).
pub fn lookup_field(hop: usize, reference: &str) -> String {
    let mut f = String::with_capacity(reference.len() + 6);
    push_lookup_field(&mut f, hop, reference);
    f
}

/// [`lookup_field`] appended to a buffer.
pub fn push_lookup_field(out: &mut String, hop: usize, reference: &str) {
    out.push_str("k:");
    push_len(out, hop);
    out.push(':');
    out.push_str(reference);
}

/// The fold's name for one dependent of a referenced row: `d:<hop>:<len>:<reference><member>`,
/// where a member is a stock row's field (first hop) or a key of the previous hop.
pub fn dep_field(hop: usize, reference: &str, member: &str) -> String {
    let mut f = dep_prefix(hop, reference);
    f.push_str(member);
    f
}

/// The start of every [`dep_field`] of one referenced row.
pub fn dep_prefix(hop: usize, reference: &str) -> String {
    let mut f = format!("d:{hop}:");
    push_item(&mut f, Some(reference));
    f
}

/// The hop and reference of a [`dep_field`].
pub fn dep_field_parts(field: &str) -> Option<(usize, &str)> {
    let rest = field.strip_prefix("d:")?;
    let (hop, item) = rest.split_once(':')?;
    let (reference, _) = take_item(item)?;
    Some((hop.parse().ok()?, reference?))
}

/// Where a piece of index state lives in Redis: (key, field). Row fields (`r:`) live in
/// their table's row index; lookup values (`k:`) in `<prefix>:ref:{<hop>:<bucket>}`,
/// field the reference's text, value what it resolves to (the last hop's value, or the
/// reference into the next hop), absent when the row is missing or filtered out;
/// dependents (`d:`) in `<prefix>:dep:{<hop>:<bucket of the reference>}`, field
/// `<len>:<reference><member>`, value `1`, so all dependents of one referenced row are
/// in one hash (HSCAN with its prefix).
pub fn state_slot(prefix: &str, field: &str) -> Option<(String, String)> {
    if field.starts_with("r:") {
        let table = table_of_row_field(field)?;
        return Some((
            row_index_key(prefix, table, row_index_bucket(field)),
            field.to_string(),
        ));
    }
    if let Some(rest) = field.strip_prefix("k:") {
        let (hop, reference) = rest.split_once(':')?;
        let hop = hop.parse().ok()?;
        return Some((
            ref_key(prefix, hop, row_index_bucket(reference)),
            reference.to_string(),
        ));
    }
    let rest = field.strip_prefix("d:")?;
    let (hop, item) = rest.split_once(':')?;
    let (reference, _) = take_item(item)?;
    Some((
        dep_key(prefix, hop.parse().ok()?, reference?),
        item.to_string(),
    ))
}

/// The hash holding one bucket of a hop's lookup values (field: the reference).
pub fn ref_key(prefix: &str, hop: usize, bucket: u32) -> String {
    format!("{prefix}:ref:{{{hop}:{bucket}}}")
}

/// Buckets of one hop's dependents: reading a referenced row's dependents scans its
/// bucket, so buckets stay small (2M stock rows over 1M variants: about 120 per bucket).
pub const DEP_BUCKETS: u32 = 16_384;

/// The hash holding the dependents of a referenced row of `hop`.
pub fn dep_key(prefix: &str, hop: usize, reference: &str) -> String {
    format!("{prefix}:dep:{{{hop}:{}}}", fnv1a(reference) % DEP_BUCKETS)
}

/// SCAN MATCH patterns of every lookup-state key (values and dependents).
pub fn lookup_patterns(prefix: &str) -> [String; 2] {
    let p = glob_escape(prefix);
    [format!("{p}:ref:{{*}}"), format!("{p}:dep:{{*}}")]
}

/// What the row index holds for a row of a stock table whose SKU or location is looked
/// up: where it counts now (`holder`: the SKU whose hash holds its contribution, `None`
/// when its lookups do not resolve), its inputs (the SKU and location column texts, or
/// the references they are looked up by) and its quantities in units. A change of a
/// referenced row moves the row by this record alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowRecord {
    pub holder: Option<String>,
    /// The SKU column's text or the SKU lookup's reference (`None`: NULL).
    pub sku_in: Option<String>,
    /// The location column's text or the location lookup's reference.
    pub loc_in: Option<String>,
    pub on_hand: i64,
    pub reserved: i64,
    pub threshold: Option<i64>,
}

impl RowRecord {
    /// `R1` then the items length-prefixed.
    pub fn encode(&self) -> String {
        let mut s = String::from("R1");
        push_item(&mut s, self.holder.as_deref());
        push_item(&mut s, self.sku_in.as_deref());
        push_item(&mut s, self.loc_in.as_deref());
        push_item(&mut s, Some(&self.on_hand.to_string()));
        push_item(&mut s, Some(&self.reserved.to_string()));
        push_item(&mut s, self.threshold.map(|t| t.to_string()).as_deref());
        s
    }

    /// The record with the quantities of its contribution in the holder's SKU hash
    /// (`r:` field, JSON `[location, on_hand, reserved]`, decimals of `scale`): a record
    /// is written only when where the row counts changes, so while it counts somewhere
    /// its quantities live there (see `fold::Piece::ri_local`).
    pub fn with_contribution(mut self, contribution: &str, scale: u32) -> Option<RowRecord> {
        let v: serde_json::Value = serde_json::from_str(contribution).ok()?;
        let q = |i: usize| {
            let x = v.get(i)?;
            let s = x
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| x.to_string());
            crate::units::parse(&s, scale)
        };
        self.on_hand = q(1)?;
        self.reserved = q(2)?;
        Some(self)
    }

    /// `None` when it is not a record this build wrote.
    pub fn decode(s: &str) -> Option<RowRecord> {
        let rest = s.strip_prefix("R1")?;
        let (holder, rest) = take_item(rest)?;
        let (sku_in, rest) = take_item(rest)?;
        let (loc_in, rest) = take_item(rest)?;
        let (on, rest) = take_item(rest)?;
        let (res, rest) = take_item(rest)?;
        let (thr, rest) = take_item(rest)?;
        if !rest.is_empty() {
            return None;
        }
        Some(RowRecord {
            holder: holder.map(str::to_string),
            sku_in: sku_in.map(str::to_string),
            loc_in: loc_in.map(str::to_string),
            on_hand: on?.parse().ok()?,
            reserved: res?.parse().ok()?,
            threshold: match thr {
                Some(t) => Some(t.parse().ok()?),
                None => None,
            },
        })
    }
}

/// Escape glob metacharacters for SCAN MATCH.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Window bucket field of a counter.
pub fn bucket_field(counter: &str, minute: i64) -> String {
    concat(&["w:", counter, ":", itoa::Buffer::new().format(minute)])
}

/// A counter's window high-water mark: the newest minute its buckets reached.
pub fn wmax_field(counter: &str) -> String {
    concat(&["wmax:", counter])
}

/// The minute (unix seconds / 60) of a unix-millisecond time.
pub fn minute_of_ms(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(60_000)
}

/// A hash's window buckets (`w:<counter>:<minute>` = count), parsed once so that every
/// window of every counter is summed without rescanning the hash's fields.
#[derive(Debug, Default)]
pub struct Buckets<'a>(Vec<(&'a str, i64, i64)>);

impl<'a> Buckets<'a> {
    /// Takes the field if it is a window bucket (returns whether it was one, even when
    /// its minute or count does not parse and it is skipped).
    pub fn add(&mut self, field: &'a str, value: &str) -> bool {
        self.add_scaled(field, value, 0)
    }

    /// [`Buckets::add`] for counts in units of 10^-`scale` (decimal quantities).
    pub fn add_scaled(&mut self, field: &'a str, value: &str, scale: u32) -> bool {
        let Some(rest) = field.strip_prefix("w:") else {
            return false;
        };
        if let Some((counter, minute)) = rest.rsplit_once(':')
            && let (Ok(m), Some(n)) = (minute.parse::<i64>(), crate::units::parse(value, scale))
        {
            self.0.push((counter, m, n));
        }
        true
    }

    /// Sum of a counter's buckets over the `window_minutes` minutes ending at
    /// `now_minute` (inclusive).
    pub fn sum(&self, counter: &str, window_minutes: i64, now_minute: i64) -> i64 {
        let lo = now_minute - window_minutes + 1;
        self.0
            .iter()
            .filter(|(c, m, _)| *c == counter && (lo..=now_minute).contains(m))
            .map(|(_, _, n)| n)
            .sum()
    }
}

/// Sum of a counter's buckets over the `window_minutes` minutes ending at `now_minute`
/// (inclusive), from the hash's fields.
pub fn window_sum<'a>(
    fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    counter: &str,
    window_minutes: i64,
    now_minute: i64,
) -> i64 {
    let mut b = Buckets::default();
    for (f, v) in fields {
        b.add(f, v);
    }
    b.sum(counter, window_minutes, now_minute)
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_follow_the_hash_tag_as_redis_does() {
        // values from `CLUSTER KEYSLOT` on Redis 7.0
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}")); // empty tag: whole key
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        // the CRC16-XMODEM check value, below 16384 already
        assert_eq!(slot_of(b"123456789"), 0x31C3);
    }

    #[test]
    fn every_slot_has_a_meta_copy_in_that_slot() {
        for s in 0..SLOTS as u16 {
            let k = slot_meta_key("skusync", s);
            assert_eq!(slot_of(k.as_bytes()), s, "{k}");
        }
    }

    use super::*;

    #[test]
    fn keys_and_fields() {
        assert_eq!(sku_key("p", "a/b"), "p:{a/b}");
        assert_eq!(sku_of_key("p", "p:{a:b}").as_deref(), Some("a:b"));
        assert_eq!(sku_of_key("p", "q:{a}"), None);
        assert_eq!(sku_of_key("p", "p:{x}:u:views"), None);
        assert_eq!(sku_of_key("p", "p:{x}:u:v}"), None);
        assert_eq!(sku_of_key("p", "p:{}"), None);
        assert_eq!(users_key("p", "x", "views"), "p:{x}:u:views");
        assert_eq!(users_minute_key("p", "x", "views", 9), "p:{x}:u:views:9");
        assert_eq!(legacy_sku_of_key("p", "p:sku:a"), Some("a"));
        assert_eq!(bucket_field("views", 7), "w:views:7");
        assert_eq!(minute_of_ms(-1), -1);
        assert_eq!(crate::names::window_name("views", 300), "views_5m");
        assert_eq!(crate::names::window_name("purchases", 3600), "purchases_1h");
    }

    /// Redis Cluster's hash tag rule: the bytes between the first `{` and the first `}`
    /// after it, if any; else the whole key.
    fn cluster_tag(key: &str) -> &str {
        if let Some(i) = key.find('{')
            && let Some(j) = key[i + 1..].find('}')
            && j > 0
        {
            return &key[i + 1..i + 1 + j];
        }
        key
    }

    #[test]
    fn a_skus_keys_share_one_hash_tag_whatever_its_bytes() {
        for sku in [
            "", "a", "{", "}", "{}", "}{", "a{b}c", "%", "%7D", "%%7B", "x/y+#", "ü{€}",
        ] {
            let tag = cluster_tag(&sku_key("skusync", sku)).to_string();
            assert!(!tag.is_empty(), "{sku:?}");
            assert_eq!(
                cluster_tag(&users_key("skusync", sku, "views")),
                tag,
                "{sku:?}"
            );
            assert_eq!(
                cluster_tag(&users_minute_key("skusync", sku, "v", -5)),
                tag,
                "{sku:?}"
            );
            assert_eq!(
                sku_of_key("skusync", &sku_key("skusync", sku)).as_deref(),
                Some(sku)
            );
        }
        assert_ne!(sku_key("p", ""), sku_key("p", "%"));
        assert_ne!(sku_key("p", "%7D"), sku_key("p", "}"));
    }

    #[test]
    fn row_records_round_trip_whatever_bytes_they_hold() {
        for r in [
            RowRecord {
                holder: Some("A:1~".into()),
                sku_in: Some("7".into()),
                loc_in: None,
                on_hand: -5,
                reserved: 0,
                threshold: Some(3),
            },
            RowRecord {
                holder: None,
                sku_in: Some(String::new()),
                loc_in: Some("~2:x".into()),
                on_hand: 1 << 52,
                reserved: 9,
                threshold: None,
            },
        ] {
            assert_eq!(RowRecord::decode(&r.encode()), Some(r.clone()));
            assert_eq!(RowRecord::decode(&(r.encode() + "x")), None);
        }
        assert_eq!(RowRecord::decode("SKU-1"), None);
    }

    #[test]
    fn lookup_state_lives_in_one_hash_per_referenced_row_bucket() {
        let (k, f) = state_slot("p", &lookup_field(2, "a:b")).unwrap();
        assert_eq!(f, "a:b");
        assert!(k.starts_with("p:ref:{2:"));
        // every dependent of one reference is in the same hash, under its prefix
        let d1 = dep_field(0, "42", "r:5:t.inv:1:7");
        let d2 = dep_field(0, "42", "r:5:t.inv:1:8");
        let (k1, f1) = state_slot("p", &d1).unwrap();
        let (k2, f2) = state_slot("p", &d2).unwrap();
        assert_eq!(k1, k2);
        assert_eq!(k1, dep_key("p", 0, "42"));
        assert!(f1.starts_with("2:42") && f2.starts_with("2:42"));
        // a reference that is a prefix of another is not confused with it
        assert!(!dep_field(0, "421", "x").starts_with(&dep_prefix(0, "42")));
    }

    #[test]
    fn row_fields_are_unambiguous() {
        // The collision of the joined format: ('W\x1fX', '1') vs ('W', 'X\x1f1').
        let a = row_field("t", [Some("W\u{1f}X"), Some("1")]);
        let b = row_field("t", [Some("W"), Some("X\u{1f}1")]);
        assert_ne!(a, b);
        assert_ne!(
            row_field("t", [Some("ab"), Some("")]),
            row_field("t", [Some("a"), Some("b")])
        );
        assert_ne!(row_field("t", [None]), row_field("t", [Some("~")]));
        assert_ne!(
            row_field("t", [None, Some("")]),
            row_field("t", [Some(""), None])
        );
        // No table's rows start with another table's prefix.
        assert!(!row_field("inv:x", [Some("1")]).starts_with(&row_field_prefix("inv")));
        assert_eq!(
            row_field("public.inv", [Some("S1"), None]),
            "r:10:public.inv:2:S1~"
        );
    }

    #[test]
    fn window_sum_counts_only_the_window() {
        let f = [
            ("w:v:10", "1"),
            ("w:v:8", "2"),
            ("w:v:6", "4"),
            ("w:x:10", "8"),
            ("v", "99"),
        ];
        assert_eq!(window_sum(f.iter().copied(), "v", 3, 10), 3);
        assert_eq!(window_sum(f.iter().copied(), "v", 5, 10), 7);
    }
}
