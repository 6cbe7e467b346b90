//! CPU of the fold and the batch (transaction -> per-SKU entries) on the catch-up
//! benchmark's backlog with the demo's full mapping: single-row transactions, half
//! activity inserts (a user HMAC, 5m and 1h windows, three counters), half stock updates
//! with a location, over 10k SKUs, 4,000 transactions a batch.
//!
//! `cargo bench --bench fold` times it; `SKUSYNC_FOLD_ONCE=1 valgrind --tool=callgrind
//! target/release/deps/fold-*` counts its instructions (repeatable on a noisy machine).

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use skusync::config::Config;
use skusync::fold::batch::Batch;
use skusync::fold::mapping::Mapping;
use skusync::fold::{Fold, Piece};
use skusync::lsn::Lsn;
use skusync::pgoutput::Datum;
use skusync::txn::{
    Change, ColumnDesc, Op, RelationDesc, ReplicaIdentity, TxnBegin, TxnCommit, value::oid,
};
use std::hint::black_box;
use std::sync::Arc;

const CONFIG: &str = r#"
[postgres]
url = "postgresql://u@h/d"
[[inventory]]
table = "public.inventory"
sku = "sku"
location = "location"
on_hand = "on_hand"
reserved = "reserved"
[[activity]]
table = "public.activity_log"
sku = "sku"
kind = "kind"
quantity = "qty"
windows = ["5m", "1h"]
user = "user_id"
user_key = "bench-user-key-0123456789abcdef0123456789abcdef"
[activity.counters]
view = "views"
add_to_cart = "carts"
purchase = "purchases"
"#;

const TXNS: u64 = 20_000;
const BATCH: u64 = 4_000;

fn col(name: &str, t: u32, key: bool) -> ColumnDesc {
    ColumnDesc {
        name: name.into(),
        type_oid: t,
        type_modifier: -1,
        is_key: key,
    }
}

fn rel(oid: u32, name: &str, columns: Vec<ColumnDesc>) -> Arc<RelationDesc> {
    Arc::new(RelationDesc {
        oid,
        schema: "public".into(),
        name: name.into(),
        replica_identity: ReplicaIdentity::Default,
        columns,
    })
}

fn t(s: &str) -> Datum {
    Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// The backlog's changes, one per transaction (a fixed pseudo-random sequence).
fn changes() -> (Arc<RelationDesc>, Arc<RelationDesc>, Vec<Change>) {
    let inv = rel(
        1,
        "inventory",
        vec![
            col("sku", oid::TEXT, true),
            col("location", oid::TEXT, true),
            col("on_hand", oid::INT4, false),
            col("reserved", oid::INT4, false),
        ],
    );
    let act = rel(
        2,
        "activity_log",
        vec![
            col("id", oid::INT8, true),
            col("sku", oid::TEXT, false),
            col("kind", oid::TEXT, false),
            col("qty", oid::INT4, false),
            col("user_id", oid::TEXT, false),
            col("at", oid::TIMESTAMPTZ, false),
        ],
    );
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let kinds = ["view", "view", "view", "add_to_cart", "purchase"];
    let out = (0..TXNS)
        .map(|i| {
            let sku = format!("SKU-{}", 1 + next(10_000));
            let (r, op, new) = if i % 2 == 0 {
                let row = vec![
                    t(&i.to_string()),
                    t(&sku),
                    t(kinds[next(5) as usize]),
                    t("1"),
                    t(&format!("user-{}", 1 + next(50_000))),
                    t("2026-12-05 08:00:00+00"),
                ];
                (&act, Op::Insert, row)
            } else {
                let row = vec![t(&sku), t("WH-1"), t(&(1_000_000 - i).to_string()), t("0")];
                (&inv, Op::Update, row)
            };
            Change {
                op,
                rel: r.clone(),
                old: None,
                new: Some(new),
                seq: 0,
                commit_lsn: Lsn(1_000 + i * 100),
            }
        })
        .collect();
    (inv, act, out)
}

/// Fold every transaction and merge the pieces into batches of `BATCH` transactions;
/// returns the entries taken (so nothing is optimised away).
fn run(mapping: &Arc<Mapping>, rels: &[&Arc<RelationDesc>], changes: &[Change]) -> usize {
    let mut fold = Fold::new(mapping.clone(), 1_000);
    for r in rels {
        fold.relation(r).expect("mapped table");
    }
    let mut batch = Batch::new(Lsn(0));
    let mut entries = 0;
    let push = |batch: &mut Batch, p: Option<Piece>| {
        if let Some(p) = p {
            batch.push(p);
        }
    };
    for (i, c) in changes.iter().enumerate() {
        // 2026-12-05 08:00 UTC, a millisecond per transaction (PostgreSQL microseconds)
        let ts = 818_150_400_000_000 + i as i64 * 1_000;
        fold.begin(&TxnBegin {
            xid: i as u32,
            commit_lsn: c.commit_lsn,
            commit_ts: ts,
        });
        let p = fold.change(c).expect("folds");
        push(&mut batch, p);
        let p = fold.commit(&TxnCommit {
            xid: i as u32,
            commit_lsn: c.commit_lsn,
            end_lsn: Lsn(c.commit_lsn.0 + 1),
            commit_ts: ts,
            changes: 1,
        });
        push(&mut batch, p);
        if (i as u64 + 1).is_multiple_of(BATCH) {
            let generation = fold.seal();
            entries += black_box(batch.take()).len();
            fold.forget(generation);
        }
    }
    entries + batch.take().len()
}

fn main() {
    let mapping =
        Arc::new(Mapping::from_config(&Config::parse(CONFIG).expect("config")).expect("mapping"));
    let (inv, act, changes) = changes();
    let rels = [&inv, &act];
    if std::env::var_os("SKUSYNC_FOLD_ONCE").is_some() {
        println!("entries: {}", run(&mapping, &rels, &changes));
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("fold");
    g.throughput(Throughput::Elements(TXNS));
    g.bench_function("full mapping, 20k single-row transactions", |b| {
        b.iter(|| run(&mapping, &rels, &changes))
    });
    g.finish();
    c.final_summary();
}
