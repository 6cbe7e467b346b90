//! Crash and stall points for tests: `SKUSYNC_FAILPOINT=<name>:<n>` aborts the process the
//! `n`th time `name` is reached (counted per process), like a SIGKILL at that point;
//! `<name>:<n>:<ms>` pauses there for `ms` milliseconds instead (at the points reached
//! through [`pause`], which are async), so a test can act on the servers in between.
//! Several, comma-separated, act each at its own point. Unset in production, where a
//! check costs one read of a `OnceLock`.

use std::sync::atomic::{AtomicU64, Ordering};

/// A point named, its hit, the pause in ms (`None`: abort), and the hits counted.
struct Spec {
    name: String,
    n: u64,
    pause_ms: Option<u64>,
    hits: AtomicU64,
}

fn specs() -> &'static [Spec] {
    static SPECS: std::sync::OnceLock<Vec<Spec>> = std::sync::OnceLock::new();
    SPECS.get_or_init(|| {
        let Ok(v) = std::env::var("SKUSYNC_FAILPOINT") else {
            return Vec::new();
        };
        let parse = |one: &str| -> Option<Spec> {
            let mut parts = one.trim().split(':');
            let name = parts.next()?.to_string();
            let n = parts.next()?.parse().ok()?;
            let pause_ms = match parts.next() {
                Some(ms) => Some(ms.parse().ok()?),
                None => None,
            };
            parts.next().is_none().then_some(Spec {
                name,
                n,
                pause_ms,
                hits: AtomicU64::new(0),
            })
        };
        v.split(',')
            .filter_map(|one| {
                let spec = parse(one);
                if spec.is_none() {
                    // a test whose failpoint never fires must not pass unnoticed
                    tracing::error!(
                        spec = one,
                        "SKUSYNC_FAILPOINT: not <name>:<n>[:<ms>]; ignored"
                    );
                }
                spec
            })
            .collect()
    })
}

/// What to do at `name` now, if this is a named hit: `Some(None)` abort, `Some(Some(ms))`
/// pause.
fn reached(name: &str) -> Option<Option<u64>> {
    // every spec of the point counts the hit (two may name one point at different hits)
    let mut due = None;
    for s in specs().iter().filter(|s| s.name == name) {
        if s.hits.fetch_add(1, Ordering::SeqCst) + 1 == s.n && due.is_none() {
            due = Some(s.pause_ms);
        }
    }
    due
}

fn abort(name: &str) -> ! {
    tracing::error!(failpoint = name, "failpoint reached: aborting");
    std::process::abort();
}

/// Abort here if `SKUSYNC_FAILPOINT` names this point and this is its `n`th hit.
pub fn hit(name: &str) {
    if let Some(None) = reached(name) {
        abort(name);
    }
}

/// As [`hit`], or pause here when the spec gives a pause.
pub async fn pause(name: &str) {
    match reached(name) {
        Some(None) => abort(name),
        Some(Some(ms)) => {
            tracing::warn!(failpoint = name, ms, "failpoint reached: pausing");
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        None => {}
    }
}
