//! CPU of the flush-LSN tracker (`progress::Progress`) over a catch-up's pending
//! transactions: the steady stream (commit, then a batch made durable by its range of
//! sequence numbers), and a reconnect's replay, whose copies sort between the first
//! ones while those are still pending. `cargo bench --bench progress`.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use skusync::lsn::Lsn;
use skusync::progress::Progress;

/// Transactions pending at once: what a catch-up holds while one batch is applied and
/// the next merges (see docs/performance.md, "Memory").
const PENDING: u64 = 200_000;
/// A batch's transactions, made durable at once.
const BATCH: u64 = 10_000;
/// Transactions pending at a reconnect (fewer: a sorted array takes a second per
/// iteration already).
const REPLAYED: u64 = 50_000;

fn stream(n: u64) -> Progress {
    let mut p = Progress::new(Lsn(0));
    for i in 1..=n {
        p.begin();
        p.commit(Lsn(i * 100));
    }
    p
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("progress");
    g.sample_size(10);
    g.bench_function("200k commits, made durable in batches of 10k", |b| {
        b.iter_batched(
            || (),
            |()| {
                let mut p = stream(PENDING);
                let mut first = 0;
                while first < PENDING {
                    p.durable_seqs(first, first + BATCH - 1);
                    first += BATCH;
                }
                assert_eq!(p.pending(), 0);
                p
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function(
        "a replay of 50k pending transactions after a reconnect",
        |b| {
            b.iter_batched(
                || stream(REPLAYED),
                |mut p| {
                    p.abort_open();
                    for i in 1..=REPLAYED {
                        p.begin();
                        p.commit(Lsn(i * 100));
                    }
                    assert_eq!(p.pending() as u64, 2 * REPLAYED);
                    p
                },
                BatchSize::PerIteration,
            )
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
