//! The alert history (`<prefix>:alerts`, a Redis stream the apply script appends every
//! alert to): its ids and entries, read by the client API (`/v1/alerts`) and by webhooks.
//! No I/O.

use std::collections::HashMap;

use crate::sinks::layout;
use crate::sinks::mqtt::payload::PendingAlert;

/// A stream id `<ms>-<n>` (an alert's `seq`).
pub type StreamId = (u64, u64);

/// Parses `<ms>-<n>`.
pub fn parse_id(s: &str) -> Option<StreamId> {
    let (a, b) = s.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Formats a stream id.
pub fn format_id(id: StreamId) -> String {
    format!("{}-{}", id.0, id.1)
}

/// The greatest id the stream dropped (trimmed by count or age), from an `XINFO STREAM`
/// reply; `(0, 0)` when none. Entries after a reader's position and up to this were lost
/// to it.
pub fn max_deleted_id(xinfo: &HashMap<String, redis::Value>) -> StreamId {
    xinfo
        .get("max-deleted-entry-id")
        .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
        .and_then(|v| parse_id(&v))
        .unwrap_or((0, 0))
}

/// An entry of the history as (SKU, alert); `None` when malformed.
pub fn alert_of_entry(
    prefix: &str,
    id: &str,
    f: &HashMap<String, String>,
    scale: u32,
) -> Option<(String, PendingAlert)> {
    let sku = layout::sku_of_key(prefix, f.get("key")?)?;
    let lsn_raw = f.get("lsn")?.clone();
    let q = |n: &str| {
        f.get(n)
            .and_then(|v| crate::units::parse(v, scale))
            .unwrap_or(0)
    };
    Some((
        sku,
        PendingAlert {
            kind: f.get("type")?.clone(),
            available: q("available"),
            threshold: q("threshold"),
            lsn: lsn_raw.parse().ok()?,
            lsn_raw,
            ts: f.get("ts").and_then(|v| v.parse().ok()),
            seq: Some(id.to_string()),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_format() {
        assert_eq!(parse_id("1764061200123-0"), Some((1_764_061_200_123, 0)));
        assert_eq!(format_id((5, 7)), "5-7");
        assert_eq!(parse_id("17640"), None);
        assert_eq!(parse_id("a-1"), None);
    }

    #[test]
    fn entries_become_alerts() {
        let f: HashMap<String, String> = [
            ("key", "p:{S/1}"),
            ("type", "low_stock"),
            ("available", "2.5"),
            ("threshold", "3"),
            ("lsn", "7"),
            ("ts", "1000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (sku, a) = alert_of_entry("p", "9-1", &f, 3).unwrap();
        assert_eq!(sku, "S/1");
        assert_eq!((a.available, a.threshold, a.lsn), (2500, 3000, 7));
        assert_eq!(a.seq.as_deref(), Some("9-1"));
        let mut bad = f.clone();
        bad.remove("lsn");
        assert!(alert_of_entry("p", "9-1", &bad, 3).is_none());
    }
}
