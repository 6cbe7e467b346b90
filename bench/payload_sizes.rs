//! Bytes per message of a typical SKU (4 locations, 3 counters with windows and distinct
//! users, a delta): JSON, JSON through WebSocket permessage-deflate (RFC 7692: raw
//! DEFLATE, sync flush, the trailing 00 00 FF FF dropped), and CBOR. Deterministic: sizes,
//! not timings. `cargo bench --bench payload_sizes`; docs/performance.md keeps the table.

use std::collections::HashMap;
use std::io::Write;

use flate2::{Compress, Compression, FlushCompress};
use skusync::config::PayloadFormat;
use skusync::sinks::layout;
use skusync::sinks::mqtt::CounterSpec;
use skusync::sinks::mqtt::payload::{self, Kind, Spec};

const NOW: i64 = 1_796_300_000_000;

fn spec() -> Spec {
    let c = |name: &str| CounterSpec {
        name: name.into(),
        windows_secs: vec![300, 3600],
        distinct_users: name == "views",
    };
    Spec {
        counters: vec![c("views"), c("carts"), c("purchases")],
        sell_counter: Some("purchases".into()),
        scale: 0,
        low_stock: 5,
    }
}

/// SKU `n`'s hash after a sale: 4 warehouses, counters, window buckets, an acknowledged
/// previous state (so the message has a delta).
fn fields(n: u64) -> HashMap<String, String> {
    let m = layout::minute_of_ms(NOW);
    let mut f = HashMap::new();
    let mut on = 0;
    // the previous state: the same but 2 more on hand at WH-BER (one sale of 2)
    let mut prev = serde_json::Map::new();
    for (i, w) in ["WH-BER", "WH-PAR", "WH-MAD", "WH-WAW"].iter().enumerate() {
        let q = 40 + (n + i as u64 * 7) % 60;
        on += q;
        f.insert(format!("loc:{w}:on_hand"), q.to_string());
        f.insert(format!("loc:{w}:reserved"), (i as u64 % 3).to_string());
        f.insert(format!("loc:{w}:rows"), "1".into());
        prev.insert(
            format!("loc:{w}:on_hand"),
            (q + if i == 0 { 2 } else { 0 }).into(),
        );
        prev.insert(format!("loc:{w}:reserved"), (i as u64 % 3).into());
    }
    f.insert("on_hand".into(), on.to_string());
    f.insert("reserved".into(), "3".into());
    f.insert("available".into(), (on - 3).to_string());
    f.insert("rows".into(), "4".into());
    f.insert("alert_state".into(), "ok".into());
    for (c, total, recent) in [
        ("views", 12_345 + n, 31),
        ("carts", 803, 4),
        ("purchases", 310, 14),
    ] {
        f.insert(c.into(), total.to_string());
        f.insert(layout::bucket_field(c, m), recent.to_string());
        f.insert(layout::bucket_field(c, m - 20), (recent / 2).to_string());
    }
    f.insert("lsn".into(), (0x1A3_F2C8 + n * 200).to_string());
    f.insert("ts".into(), NOW.to_string());
    f.insert("pub_lsn".into(), (0x1A3_F2C8 + n * 200 - 80).to_string());
    for (k, v) in [
        ("on_hand", on + 2),
        ("available", on - 1),
        ("reserved", 3),
        ("views", 12_340 + n),
        ("carts", 803),
        ("purchases", 308),
    ] {
        prev.insert(k.into(), v.into());
    }
    f.insert(
        "pub_state".into(),
        serde_json::Value::Object(prev).to_string(),
    );
    f
}

/// permessage-deflate sizes of `msgs` with one compressor (context takeover) or a fresh
/// one per message (`no_context_takeover`).
fn deflated(msgs: &[Vec<u8>], takeover: bool) -> Vec<usize> {
    let mut c = Compress::new(Compression::default(), false);
    msgs.iter()
        .map(|m| {
            if !takeover {
                c = Compress::new(Compression::default(), false);
            }
            let mut out = Vec::with_capacity(m.len() + 64);
            let before = c.total_out();
            c.compress_vec(m, &mut out, FlushCompress::Sync)
                .expect("deflate");
            let n = (c.total_out() - before) as usize;
            n.saturating_sub(4) // RFC 7692 7.2.1: the sync flush's 00 00 FF FF is not sent
        })
        .collect()
}

fn main() {
    let users = HashMap::from([
        ("views_users_5m".to_string(), 9),
        ("views_users_1h".to_string(), 57),
    ]);
    let spec = spec();
    let json: Vec<Vec<u8>> = (0..1000)
        .map(|n| {
            let f = fields(n);
            payload::state_message(&spec, &format!("SKU-{n:05}"), &f, &users, NOW, Kind::Change)
                .payload
                .into_bytes()
        })
        .collect();
    let cbor: Vec<usize> = json
        .iter()
        .map(|j| payload::encode(PayloadFormat::Cbor, std::str::from_utf8(j).unwrap()).len())
        .collect();
    let avg = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len() as f64;
    let jl: Vec<usize> = json.iter().map(Vec::len).collect();
    let fresh = deflated(&json, false);
    let takeover = deflated(&json, true);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "one state message of a SKU with 4 locations and 3 counters (average of 1000 SKUs):"
    );
    let _ = writeln!(out, "example: {}", String::from_utf8_lossy(&json[42]));
    let _ = writeln!(out, "{:<58} {:>8} {:>8}", "encoding", "bytes", "vs JSON");
    let base = avg(&jl);
    for (name, v) in [
        ("JSON", avg(&jl)),
        ("JSON, permessage-deflate, no context takeover", avg(&fresh)),
        (
            "JSON, permessage-deflate, context takeover (1000 in a row)",
            avg(&takeover),
        ),
        ("CBOR", avg(&cbor)),
    ] {
        let _ = writeln!(out, "{name:<58} {v:>8.1} {:>7.2}x", v / base);
    }
}
