//! CPU of one state message (`payload::state_message`) of a typical SKU, the publisher's
//! largest share while catching up. `cargo bench --bench state`.

use std::collections::HashMap;

use criterion::{Criterion, criterion_group, criterion_main};
use skusync::sinks::mqtt::payload::{self, Kind};

#[path = "fixture/sku_hash.rs"]
mod fixture;
use fixture::{NOW, fields, spec};

fn bench(c: &mut Criterion) {
    let users = HashMap::from([
        ("views_users_5m".to_string(), 9),
        ("views_users_1h".to_string(), 57),
    ]);
    let spec = spec();
    let hashes: Vec<_> = (0..64).map(fields).collect();
    let mut i = 0;
    c.bench_function("state_message, 4 locations, 3 counters, delta", |b| {
        b.iter(|| {
            i = (i + 1) % hashes.len();
            payload::state_message(&spec, "SKU-00042", &hashes[i], &users, NOW, Kind::Change)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
