//! A small sorted map kept in one vector: what a batch entry holds per SKU (a few
//! counters, buckets and user sets). A `BTreeMap` allocates a node of eleven slots for
//! even one element (about 400 bytes here); a batch holds tens of thousands of entries,
//! each with three such maps, so that node was most of a catch-up's memory.

use std::borrow::Borrow;

/// A map sorted by key, in a vector sized to what it holds. Lookups are binary searches;
/// inserts shift (fine for the handful of keys an entry has).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap(Vec::new())
    }
}

impl<K: Ord, V> VecMap<K, V> {
    /// The value of `k`, inserted with `V::default()` when absent.
    pub fn entry_or_default(&mut self, k: K) -> &mut V
    where
        V: Default,
    {
        let i = match self.0.binary_search_by(|(x, _)| x.cmp(&k)) {
            Ok(i) => i,
            Err(i) => {
                let n = self.0.len();
                if n == self.0.capacity() {
                    // Exactly while small (most hold one to three keys; doubling would
                    // leave most of each vector empty), by half beyond (an entry merging
                    // hours of window buckets would otherwise reallocate on every key).
                    self.0.reserve_exact(if n < 8 { 1 } else { n / 2 });
                }
                self.0.insert(i, (k, V::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    /// Set `k` to `v`; the value it replaced.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        match self.0.binary_search_by(|(x, _)| x.cmp(&k)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                self.0.insert(i, (k, v));
                None
            }
        }
    }

    /// The value of `k`.
    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.0
            .binary_search_by(|(x, _)| x.borrow().cmp(k))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    /// Values in key order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    /// (key, value) pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Merge `other` in: each of its values is combined into this map's value of its key
    /// (`V::default()` when absent) by `merge`. An empty map takes `other` whole, vector
    /// and all (most batch entries hold one piece).
    pub fn absorb(&mut self, other: VecMap<K, V>, mut merge: impl FnMut(&mut V, V))
    where
        V: Default,
    {
        if self.is_empty() {
            *self = other;
            return;
        }
        for (k, v) in other {
            merge(self.entry_or_default(k), v);
        }
    }

    /// The pairs in key order, as a slice (to walk runs of keys).
    pub fn as_slice(&self) -> &[(K, V)] {
        &self.0
    }
}

impl<'a, K: Ord, V> IntoIterator for &'a VecMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<K, V> IntoIterator for VecMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for VecMap<K, V> {
    /// Later pairs replace earlier ones of the same key, as in a `BTreeMap`.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(it: I) -> Self {
        let mut m = VecMap::default();
        for (k, v) in it {
            m.insert(k, v);
        }
        m
    }
}

impl<K: Ord + Borrow<str>, V> std::ops::Index<&str> for VecMap<K, V> {
    type Output = V;
    fn index(&self, k: &str) -> &V {
        self.0
            .binary_search_by(|(x, _)| x.borrow().cmp(k))
            .map(|i| &self.0[i].1)
            .expect("no such key")
    }
}

/// Add `id` to a sorted set kept in a vector (no duplicates).
pub fn insert_sorted<T: Ord>(set: &mut Vec<T>, id: T) {
    if let Err(i) = set.binary_search(&id) {
        set.insert(i, id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_vec_map_sums_as_a_btree_map_does(ops in proptest::collection::vec((0u8..20, -5i64..5), 0..200)) {
            let mut v: VecMap<String, i64> = VecMap::default();
            let mut b = std::collections::BTreeMap::<String, i64>::new();
            for (k, n) in ops {
                *v.entry_or_default(k.to_string()) += n;
                *b.entry(k.to_string()).or_default() += n;
            }
            let got: Vec<(&String, &i64)> = v.iter().collect();
            let want: Vec<(&String, &i64)> = b.iter().collect();
            prop_assert_eq!(got, want);
            for (k, n) in &b {
                prop_assert_eq!(v.get(k.as_str()), Some(n));
            }
        }

        #[test]
        fn absorbing_a_map_sums_as_merging_btree_maps_does(
            a in proptest::collection::vec((0u8..10, -5i64..5), 0..20),
            b in proptest::collection::vec((0u8..10, -5i64..5), 0..20),
        ) {
            let build = |ops: &[(u8, i64)]| {
                let mut v: VecMap<u8, i64> = VecMap::default();
                for &(k, n) in ops {
                    *v.entry_or_default(k) += n;
                }
                v
            };
            let mut want = std::collections::BTreeMap::<u8, i64>::new();
            for &(k, n) in a.iter().chain(&b) {
                *want.entry(k).or_default() += n;
            }
            let mut v = build(&a);
            v.absorb(build(&b), |x, n| *x += n);
            let got: Vec<(u8, i64)> = v.iter().map(|(k, n)| (*k, *n)).collect();
            prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>());
        }

        #[test]
        fn a_sorted_vec_set_is_a_btree_set(ids in proptest::collection::vec(0u16..50, 0..200)) {
            let mut v = Vec::new();
            for &i in &ids {
                insert_sorted(&mut v, i);
            }
            let b: std::collections::BTreeSet<u16> = ids.into_iter().collect();
            prop_assert_eq!(v, b.into_iter().collect::<Vec<_>>());
        }
    }
}
