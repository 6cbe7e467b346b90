//! Bytes per message of a typical SKU (4 locations, 3 counters with windows and distinct
//! users, a delta): JSON, JSON through WebSocket permessage-deflate (RFC 7692: raw
//! DEFLATE, sync flush, the trailing 00 00 FF FF dropped), and CBOR. Deterministic: sizes,
//! not timings. `cargo bench --bench payload_sizes`; docs/performance.md keeps the table.

use std::collections::HashMap;
use std::io::Write;

use flate2::{Compress, Compression, FlushCompress};
use skusync::config::PayloadFormat;
use skusync::sinks::mqtt::payload::{self, Kind};

#[path = "fixture/sku_hash.rs"]
mod fixture;
use fixture::{NOW, fields, spec};

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
