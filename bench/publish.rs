//! CPU of the publisher's work per state that involves no I/O, part by part: the
//! HGETALL reply parsed by skusync's reader (and, for comparison, by redis-rs into its
//! values and a map), the state message built and encoded. Then thin apply's reads: a
//! batch's HMGET replies read by skusync's reader and by redis-rs.
//! `cargo bench --bench publish`.

use std::collections::HashMap;

use criterion::{Criterion, criterion_group, criterion_main};
use skusync::config::PayloadFormat;
use skusync::sinks::mqtt::payload::{self, Kind};
use skusync::sinks::redis::resp;

#[path = "fixture/sku_hash.rs"]
mod fixture;
use fixture::{NOW, fields, spec};

/// The RESP2 reply of an HGETALL of `f` (what Redis 7 sends to a RESP2 client).
fn reply(f: &HashMap<String, String>) -> Vec<u8> {
    let mut out = format!("*{}\r\n", f.len() * 2).into_bytes();
    for (k, v) in f {
        for s in [k, v] {
            out.extend_from_slice(format!("${}\r\n{s}\r\n", s.len()).as_bytes());
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let users = HashMap::from([
        ("views_users_5m".to_string(), 9),
        ("views_users_1h".to_string(), 57),
    ]);
    let spec = spec();
    let replies: Vec<Vec<u8>> = (0..64).map(|n| reply(&fields(n))).collect();
    let mut g = c.benchmark_group("publish");
    let mut i = 0;
    g.bench_function("parse the HGETALL reply", |b| {
        b.iter(|| {
            i = (i + 1) % replies.len();
            redis::parse_redis_value(&replies[i]).expect("a reply")
        })
    });
    g.bench_function("parse into a flat hash (skusync's reader)", |b| {
        b.iter(|| {
            i = (i + 1) % replies.len();
            let n = resp::reply_len(&replies[i])
                .expect("a reply")
                .expect("whole");
            resp::FlatHash::parse(&replies[i][..n]).expect("a hash")
        })
    });
    let values: Vec<redis::Value> = replies
        .iter()
        .map(|r| redis::parse_redis_value(r).expect("a reply"))
        .collect();
    g.bench_function("parse and turn into the field map (redis-rs)", |b| {
        b.iter(|| {
            i = (i + 1) % replies.len();
            let v = redis::parse_redis_value(&replies[i]).expect("a reply");
            redis::from_redis_value::<HashMap<String, String>>(v).expect("a map")
        })
    });
    let maps: Vec<HashMap<String, String>> = values
        .into_iter()
        .map(|v| redis::from_redis_value(v).expect("a map"))
        .collect();
    g.bench_function("state message and its JSON payload (from a map)", |b| {
        b.iter(|| {
            i = (i + 1) % maps.len();
            let m = payload::state_message(&spec, "SKU-00042", &maps[i], &users, NOW, Kind::Change);
            payload::encode(PayloadFormat::Json, &m.payload)
        })
    });
    let flats: Vec<resp::FlatHash> = maps.iter().map(resp::FlatHash::from).collect();
    g.bench_function(
        "state message and its JSON payload (from a flat hash)",
        |b| {
            b.iter(|| {
                i = (i + 1) % flats.len();
                let m = payload::state_message(
                    &spec,
                    "SKU-00042",
                    &flats[i],
                    &users,
                    NOW,
                    Kind::Change,
                );
                payload::encode(PayloadFormat::Json, &m.payload)
            })
        },
    );
    g.finish();
    thin_reads(c);
}

/// One apply call's thin reads: 500 HMGET replies of 25 fields each (the full mapping's
/// base fields, three counters, a window's high-water mark and bucket, a row and its
/// location's fields; a few absent), delimited and read into borrowed values by
/// skusync's reader, or parsed by redis-rs and borrowed the same way (`hmget_reply`).
fn thin_reads(c: &mut Criterion) {
    let mut batch = Vec::new();
    for n in 0..500 {
        let f = fields(n);
        let mut vals: Vec<Option<&String>> = f.values().take(22).map(Some).collect();
        vals.extend([None, None, None]);
        batch.extend_from_slice(format!("*{}\r\n", vals.len()).as_bytes());
        for v in vals {
            match v {
                Some(s) => batch.extend_from_slice(format!("${}\r\n{s}\r\n", s.len()).as_bytes()),
                None => batch.extend_from_slice(b"$-1\r\n"),
            }
        }
    }
    let mut g = c.benchmark_group("thin reads (500 HMGETs)");
    g.bench_function("delimit and borrow (skusync's reader)", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            let (mut at, mut n) = (0, 0);
            while at < batch.len() {
                let len = resp::reply_len(&batch[at..])
                    .expect("a reply")
                    .expect("whole");
                resp::strings_of(&batch[at..at + len], &mut out).expect("strings");
                n += out.len();
                at += len;
            }
            n
        })
    });
    g.bench_function("parse (redis-rs) and borrow", |b| {
        b.iter(|| {
            // as the apply did: every reply parsed into values, then each borrowed
            let mut values = Vec::with_capacity(500);
            let mut at = 0;
            while at < batch.len() {
                let len = resp::reply_len(&batch[at..])
                    .expect("a reply")
                    .expect("whole");
                values.push(redis::parse_redis_value(&batch[at..at + len]).expect("a reply"));
                at += len;
            }
            let mut out: Vec<Option<&str>> = Vec::new();
            let mut n = 0;
            for v in &values {
                let redis::Value::Array(items) = v else {
                    panic!("an array")
                };
                out.clear();
                for x in items {
                    out.push(match x {
                        redis::Value::BulkString(b) => Some(std::str::from_utf8(b).expect("text")),
                        _ => None,
                    });
                }
                n += out.len();
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
