//! Crash and stall points for tests: `SKUSYNC_FAILPOINT=<name>:<n>` aborts the process the
//! `n`th time `name` is reached (counted per process), like a SIGKILL at that point;
//! `<name>:<n>:<ms>` pauses there for `ms` milliseconds instead (at the points reached
//! through [`pause`], which are async), so a test can act on the servers in between.
//! Unset in production, where a check costs one read of a `OnceLock`.

use std::sync::atomic::{AtomicU64, Ordering};

/// The point named, its hit, and the pause in ms (`None`: abort).
type Spec = (String, u64, Option<u64>);

fn spec() -> &'static Option<Spec> {
    static SPEC: std::sync::OnceLock<Option<Spec>> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let v = std::env::var("SKUSYNC_FAILPOINT").ok()?;
        let mut parts = v.split(':');
        let name = parts.next()?.to_string();
        let n = parts.next()?.parse().ok()?;
        let ms = match parts.next() {
            Some(ms) => Some(ms.parse().ok()?),
            None => None,
        };
        Some((name, n, ms))
    })
}

/// What to do at `name` now, if this is the named hit.
fn reached(name: &str) -> Option<Option<u64>> {
    static HITS: AtomicU64 = AtomicU64::new(0);
    match spec() {
        Some((n, k, ms)) if n == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *k => Some(*ms),
        _ => None,
    }
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
