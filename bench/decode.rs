//! Decoding throughput of realistic inventory transactions (text-mode pgoutput).

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use skusync::pgoutput::{Column, Datum, Decoder, Message, Relation, encode};
use std::hint::black_box;

const REL: u32 = 16_390;

fn text(s: String) -> Datum {
    Datum::Text(Bytes::from(s))
}

/// A 6-column `inventory` row: id, sku, location, on_hand, reserved, updated_at.
fn row(i: u32) -> Vec<Datum> {
    vec![
        text(format!("{}", 100_000 + i)),
        text(format!("SKU-{:06}", i % 10_000)),
        text(format!("WH-{}", i % 7)),
        text(format!("{}", (i * 37) % 1000)),
        text(format!("{}", i % 10)),
        text(format!(
            "2026-11-25 09:{:02}:{:02}.{:06}+00",
            (i / 60) % 60,
            i % 60,
            i * 7 % 1_000_000
        )),
    ]
}

fn relation() -> Message {
    let col = |flags, name: &'static str, type_oid| Column {
        flags,
        name: Bytes::from_static(name.as_bytes()),
        type_oid,
        type_modifier: -1,
    };
    Message::Relation(Relation {
        xid: None,
        oid: REL,
        namespace: Bytes::from_static(b"public"),
        name: Bytes::from_static(b"inventory"),
        replica_identity: b'd',
        columns: vec![
            col(1, "id", 20),
            col(0, "sku", 25),
            col(0, "location", 25),
            col(0, "on_hand", 23),
            col(0, "reserved", 23),
            col(0, "updated_at", 1184),
        ],
    })
}

/// One pgoutput message per `Bytes`, as the replication stream delivers them.
fn stream(msgs: &[Message]) -> (Vec<Bytes>, u64) {
    let mut total = 0;
    let out = msgs
        .iter()
        .map(|m| {
            let mut buf = BytesMut::new();
            encode(m, false, false, &mut buf);
            total += buf.len() as u64;
            buf.freeze()
        })
        .collect();
    (out, total)
}

fn txn(body: impl Iterator<Item = Message>) -> Vec<Message> {
    let mut msgs = vec![
        Message::Begin {
            final_lsn: 0x1_6B37_4D48,
            commit_ts: 817_000_000_000_000,
            xid: 7_421,
        },
        relation(),
    ];
    msgs.extend(body);
    msgs.push(Message::Commit {
        flags: 0,
        commit_lsn: 0x1_6B37_4D48,
        end_lsn: 0x1_6B37_4D78,
        commit_ts: 817_000_000_000_000,
    });
    msgs
}

fn bench(c: &mut Criterion) {
    let updates = txn((0..1000).map(|i| Message::Update {
        xid: None,
        rel: REL,
        old: None,
        new: row(i),
    }));
    let mixed = txn((0..1000).map(|i| match i % 4 {
        0 => Message::Insert {
            xid: None,
            rel: REL,
            new: row(i),
        },
        _ => Message::Update {
            xid: None,
            rel: REL,
            old: None,
            new: row(i),
        },
    }));
    let mut group = c.benchmark_group("pgoutput_decode");
    for (name, msgs) in [("1000_updates", updates), ("mixed_insert_update", mixed)] {
        let (wire, bytes) = stream(&msgs);
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut d = Decoder::new(1, false);
                for m in &wire {
                    black_box(d.decode(black_box(m)).expect("valid stream"));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
