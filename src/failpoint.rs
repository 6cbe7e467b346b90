//! Crash points for tests: `SKUSYNC_FAILPOINT=<name>:<n>` aborts the process the `n`th
//! time `name` is reached (counted per process), like a SIGKILL at that point. Unset in
//! production, where a check costs one read of a `OnceLock`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Abort here if `SKUSYNC_FAILPOINT` names this point and this is its `n`th hit.
pub fn hit(name: &str) {
    static SPEC: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("SKUSYNC_FAILPOINT").ok()?;
        let (n, k) = v.rsplit_once(':')?;
        Some((n.to_string(), k.parse().ok()?))
    });
    if let Some((n, k)) = spec
        && n == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *k
    {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}
