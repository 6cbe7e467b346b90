//! The Redis layout shared by the apply script, the snapshot loader and the MQTT
//! publisher. See the README section "Redis layout".
//!
//! One hash per SKU, key `<prefix>:sku:<SKU>`, all integers as decimal strings:
//!
//! | field | meaning |
//! |---|---|
//! | `on_hand`, `reserved`, `available` | totals over all stock rows (available = on_hand - reserved) |
//! | `loc:<LOC>:on_hand`, `loc:<LOC>:reserved` | per location |
//! | `<counter>` | lifetime total of an activity counter (e.g. `views`) |
//! | `w:<counter>:<minute>` | window bucket: events in that minute (unix seconds / 60) |
//! | `r:<table>:<key>` | one stock row's contribution, JSON `[location, on_hand, reserved]` |
//! | `lsn`, `piece` | fence: commit LSN (u64) and piece number of the last applied change |
//! | `ts` | commit time of that transaction, unix milliseconds |
//! | `threshold` | per-SKU low-stock threshold, when a column maps it |
//! | `alert_state` | `ok`, `low` or `out` |
//! | `alerts` | JSON array of alerts not yet acknowledged by the broker |
//! | `pub_lsn` | LSN of the last state the broker acknowledged (outbox mark) |
//! | `pub_state` | JSON object of the numeric values in that acknowledged message |
//! | `gone` | `1` when no stock rows and no counters remain (retained message cleared) |
//!
//! Distinct users (HyperLogLog of HMAC'd ids) live beside the hash in keys with a hash
//! tag naming the hash, so Redis Cluster puts them in the same slot:
//! `{<prefix>:sku:<SKU>}:u:<counter>` (lifetime) and `{<prefix>:sku:<SKU>}:u:<counter>:<minute>`.
//!
//! The meta hash `<prefix>:meta` holds `applied_lsn`, `system_id`, `timeline`,
//! `fingerprint`, `bootstrap` (`loading`, `done` once a snapshot finished loading, or
//! `stale` when it must be rebuilt), `mqtt_epoch`, `last_publish_ms`, `tables` (the
//! mapped stock tables' identities, JSON) and `row_fields` (the stock row field format).

/// Fields of a SKU hash with a fixed name, written by the apply script, the snapshot
/// reset and the MQTT publisher (keep in step with `apply.lua`). Every other field is a
/// counter's lifetime total (`<counter>`) or has a prefix ending in `:` (`loc:`, `r:`,
/// `w:`, `wmax:`), which counter names cannot contain: so a counter must not take one
/// of these names.
pub const FIXED_FIELDS: &[&str] = &[
    "on_hand",
    "reserved",
    "available",
    "rows",
    "lsn",
    "piece",
    "ts",
    "threshold",
    "alert_state",
    "alerts",
    "pub_lsn",
    "pub_state",
    "gone",
];

/// Key of a SKU's hash.
pub fn sku_key(prefix: &str, sku: &str) -> String {
    format!("{prefix}:sku:{sku}")
}

/// Prefix of all SKU hash keys (for SCAN with a `*` appended).
pub fn sku_key_prefix(prefix: &str) -> String {
    format!("{prefix}:sku:")
}

/// The SKU of a hash key, if it is one.
pub fn sku_of_key<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(prefix)?.strip_prefix(":sku:")
}

/// Key of the meta hash.
pub fn meta_key(prefix: &str) -> String {
    format!("{prefix}:meta")
}

/// Lifetime distinct-user HyperLogLog of a counter.
pub fn users_key(prefix: &str, sku: &str, counter: &str) -> String {
    format!("{{{}}}:u:{counter}", sku_key(prefix, sku))
}

/// Per-minute distinct-user HyperLogLog of a counter.
pub fn users_minute_key(prefix: &str, sku: &str, counter: &str, minute: i64) -> String {
    format!("{{{}}}:u:{counter}:{minute}", sku_key(prefix, sku))
}

/// Window bucket field of a counter.
pub fn bucket_field(counter: &str, minute: i64) -> String {
    format!("w:{counter}:{minute}")
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
        let Some(rest) = field.strip_prefix("w:") else {
            return false;
        };
        if let Some((counter, minute)) = rest.rsplit_once(':')
            && let (Ok(m), Ok(n)) = (minute.parse::<i64>(), value.parse::<i64>())
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

/// A window's name in payloads: `views_5m`, `purchases_1h`.
pub fn window_name(counter: &str, window_secs: u64) -> String {
    if window_secs.is_multiple_of(3600) {
        format!("{counter}_{}h", window_secs / 3600)
    } else {
        format!("{counter}_{}m", window_secs / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_fields() {
        assert_eq!(sku_key("p", "a/b"), "p:sku:a/b");
        assert_eq!(sku_of_key("p", "p:sku:a:b"), Some("a:b"));
        assert_eq!(sku_of_key("p", "q:sku:a"), None);
        assert_eq!(users_key("p", "x", "views"), "{p:sku:x}:u:views");
        assert_eq!(bucket_field("views", 7), "w:views:7");
        assert_eq!(minute_of_ms(-1), -1);
        assert_eq!(window_name("views", 300), "views_5m");
        assert_eq!(window_name("purchases", 3600), "purchases_1h");
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
