//! Names shared by the configuration, the Redis layout and the payloads: the fields
//! of a SKU hash that are not counters, the members of a state payload, and the names
//! of windowed counters. One small module that each of them uses, so a counter name
//! that would collide with one of these is refused by the config before it reaches
//! Redis or a phone.

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
    "pub_piece",
    "pub_state",
    "pub_seq",
    "gone",
];

/// Top-level members of the state payload (and of its `delta`) that are not named after
/// a counter (`views`, `views_5m`, `views_users_5m`): a counter must not produce one.
pub const STATE_MEMBERS: &[&str] = &[
    "v",
    "sku",
    "on_hand",
    "reserved",
    "available",
    "locations",
    "delta",
    "as_of",
    "lsn",
    "piece",
    "prev_lsn",
    "prev_piece",
    "ts",
    "sell_rate_per_h",
    "stockout_eta_s",
    "rev",
    "delta_from",
    "threshold",
    "alert_state",
    "gone",
];

/// A window's name in payloads: `views_5m`, `purchases_1h`.
pub fn window_name(counter: &str, window_secs: u64) -> String {
    if window_secs.is_multiple_of(3600) {
        format!("{counter}_{}h", window_secs / 3600)
    } else {
        format!("{counter}_{}m", window_secs / 60)
    }
}

/// Payload name of a counter's distinct users over a window: `views_users_5m`.
pub fn users_name(counter: &str, window_secs: u64) -> String {
    let w = window_name(counter, window_secs);
    let suffix = &w[counter.len()..];
    format!("{counter}_users{suffix}")
}
