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
    "alert_history",
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
    let mut s = String::with_capacity(counter.len() + 8);
    push_window_name(&mut s, counter, window_secs);
    s
}

/// Payload name of a counter's distinct users over a window: `views_users_5m`.
pub fn users_name(counter: &str, window_secs: u64) -> String {
    let mut s = String::with_capacity(counter.len() + 14);
    push_users_name(&mut s, counter, window_secs);
    s
}

/// Appends [`window_name`] to `out` (state messages write every window's name into one
/// buffer).
pub fn push_window_name(out: &mut String, counter: &str, window_secs: u64) {
    out.push_str(counter);
    out.push('_');
    push_window_suffix(out, window_secs);
}

/// Appends [`users_name`] to `out`.
pub fn push_users_name(out: &mut String, counter: &str, window_secs: u64) {
    out.push_str(counter);
    out.push_str("_users_");
    push_window_suffix(out, window_secs);
}

/// `5m`, `1h`: whole hours in hours, anything else in minutes.
fn push_window_suffix(out: &mut String, window_secs: u64) {
    let (n, unit) = if window_secs.is_multiple_of(3600) {
        (window_secs / 3600, 'h')
    } else {
        (window_secs / 60, 'm')
    };
    out.push_str(itoa::Buffer::new().format(n));
    out.push(unit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_users_names_in_minutes_or_whole_hours() {
        for (secs, w, u) in [
            (300, "views_5m", "views_users_5m"),
            (3600, "views_1h", "views_users_1h"),
            (5400, "views_90m", "views_users_90m"),
            (86400, "views_24h", "views_users_24h"),
        ] {
            assert_eq!(window_name("views", secs), w);
            assert_eq!(users_name("views", secs), u);
        }
        // appended after what the buffer holds
        let mut s = String::from("x");
        push_window_name(&mut s, "é_c", 600);
        push_users_name(&mut s, "é_c", 7200);
        assert_eq!(s, "xé_c_10mé_c_users_2h");
    }
}
