//! The fold's bounded cache of applied index state (row holders and records, lookup
//! values): what Redis holds, kept so that hot rows and variants are not read again every
//! batch. Redis stays the truth; an entry dropped here costs one read.
//!
//! Eviction is an approximate LRU: each hit stamps the entry with the current insert
//! count, and a full cache keeps the more recently used half. That costs O(entries) once
//! per `cap / 2` inserts (amortised O(1)); stamps are unique, so exactly the older half goes, and a working set that fits is never dropped
//! wholesale (a plain clear-when-full re-reads every hot entry after each clear).

use std::cell::Cell;
use std::collections::HashMap;

/// A bounded map from index field to the value Redis holds (`None`: nothing).
#[derive(Debug)]
pub(super) struct StateCache {
    map: HashMap<String, (Option<String>, Cell<u64>), foldhash::fast::RandomState>,
    cap: usize,
    /// Uses so far (inserts and hits): the clock of the use stamps, so stamps are unique.
    clock: Cell<u64>,
}

impl StateCache {
    /// A cache of at most `cap` entries (at least 2).
    pub(super) fn new(cap: usize) -> StateCache {
        StateCache {
            map: HashMap::default(),
            cap: cap.max(2),
            clock: Cell::new(0),
        }
    }

    /// The cached value of `field` (`None`: not cached), marking it used.
    pub(super) fn get(&self, field: &str) -> Option<&Option<String>> {
        let (v, used) = self.map.get(field)?;
        used.set(self.tick());
        Some(v)
    }

    /// Cache `field`; when full, first drop the less recently used half.
    pub(super) fn insert(&mut self, field: String, value: Option<String>) {
        let now = self.tick();
        if self.map.len() >= self.cap && !self.map.contains_key(&field) {
            let mut stamps: Vec<u64> = self.map.values().map(|(_, u)| u.get()).collect();
            let mid = stamps.len() / 2;
            let (_, cut, _) = stamps.select_nth_unstable(mid);
            let cut = *cut;
            self.map.retain(|_, (_, u)| u.get() >= cut);
        }
        self.map.insert(field, (value, Cell::new(now)));
    }

    fn tick(&self) -> u64 {
        let t = self.clock.get() + 1;
        self.clock.set(t);
        t
    }

    /// Drop the entries whose field does not satisfy `keep`.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.map.retain(|f, _| keep(f));
    }

    /// Entries cached.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Drop everything (tests: force reads from Redis).
    #[cfg(test)]
    pub(super) fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::StateCache;

    #[test]
    fn a_full_cache_keeps_the_recently_used_half() {
        let mut c = StateCache::new(10);
        for i in 0..10 {
            c.insert(format!("f{i}"), Some(i.to_string()));
        }
        // the first five are used again: they must survive the eviction
        for i in 0..5 {
            assert!(c.get(&format!("f{i}")).is_some());
        }
        c.insert("new".into(), None);
        assert!(c.len() <= 10);
        for i in 0..5 {
            assert_eq!(c.get(&format!("f{i}")), Some(&Some(i.to_string())), "f{i}");
        }
        assert_eq!(c.get("new"), Some(&None));
        assert!((5..10).all(|i| c.get(&format!("f{i}")).is_none()));
    }

    #[test]
    fn the_cache_never_exceeds_its_cap() {
        let mut c = StateCache::new(100);
        for i in 0..10_000u32 {
            c.insert(format!("k{}", i % 377), None);
            if i % 3 == 0 {
                c.get(&format!("k{}", (i * 7) % 377));
            }
            assert!(c.len() <= 100);
        }
    }

    #[test]
    fn reinserting_a_cached_field_replaces_its_value() {
        let mut c = StateCache::new(2);
        c.insert("a".into(), Some("1".into()));
        c.insert("b".into(), None);
        c.insert("a".into(), Some("2".into()));
        assert_eq!(c.get("a"), Some(&Some("2".into())));
        assert_eq!(c.len(), 2);
    }
}
