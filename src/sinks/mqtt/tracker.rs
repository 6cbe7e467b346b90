//! Which publish a PUBACK belongs to.
//!
//! rumqttc's `publish` returns no packet id. It sends requests in the order they were
//! queued and reports each as `Outgoing::Publish(pkid)`, so the n-th such event belongs
//! to the n-th request queued; the `PubAck(pkid)` then completes it.

use std::collections::{HashMap, VecDeque};

/// FIFO mapping from queued publish requests to packet ids to acknowledgements.
#[derive(Debug)]
pub struct AckTracker<T> {
    queued: VecDeque<T>,
    sent: HashMap<u16, T>,
}

impl<T> Default for AckTracker<T> {
    fn default() -> Self {
        AckTracker {
            queued: VecDeque::new(),
            sent: HashMap::new(),
        }
    }
}

impl<T> AckTracker<T> {
    /// A request was handed to the client (in this order).
    pub fn queued(&mut self, item: T) {
        self.queued.push_back(item);
    }

    /// `Outgoing::Publish(pkid)`: the oldest queued request went out with `pkid`.
    /// Returns false when nothing was queued (a packet we did not track).
    pub fn sent(&mut self, pkid: u16) -> bool {
        if self.sent.contains_key(&pkid) {
            // a re-send of a packet already mapped: keep the first mapping
            return true;
        }
        match self.queued.pop_front() {
            Some(item) => {
                self.sent.insert(pkid, item);
                true
            }
            None => false,
        }
    }

    /// `PubAck(pkid)`: the request it completes, if tracked.
    pub fn acked(&mut self, pkid: u16) -> Option<T> {
        self.sent.remove(&pkid)
    }

    /// The connection dropped (clean session): everything not acknowledged is lost.
    pub fn lose_all(&mut self) -> Vec<T> {
        let mut v: Vec<T> = self.sent.drain().map(|(_, t)| t).collect();
        v.extend(self.queued.drain(..));
        v
    }

    /// Requests queued or sent but not acknowledged.
    pub fn len(&self) -> usize {
        self.queued.len() + self.sent.len()
    }

    /// Nothing outstanding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn maps_in_order_and_acks_out_of_order() {
        let mut t = AckTracker::default();
        t.queued("a");
        t.queued("b");
        t.queued("c");
        assert!(t.sent(1));
        assert!(t.sent(2));
        assert_eq!(t.acked(2), Some("b"));
        assert!(t.sent(3));
        assert!(t.sent(3), "re-send keeps the mapping");
        assert_eq!(t.acked(1), Some("a"));
        assert_eq!(t.acked(1), None, "second ack of the same pkid");
        assert_eq!(t.acked(3), Some("c"));
        assert!(!t.sent(4), "untracked packet");
        assert!(t.is_empty());
    }

    #[test]
    fn pkid_reuse_after_ack() {
        let mut t = AckTracker::default();
        t.queued(1);
        t.queued(2);
        t.sent(1);
        assert_eq!(t.acked(1), Some(1));
        t.sent(1);
        assert_eq!(t.acked(1), Some(2));
    }

    #[test]
    fn lose_all_returns_everything() {
        let mut t = AckTracker::default();
        for i in 0..4 {
            t.queued(i);
        }
        t.sent(7);
        t.sent(8);
        t.acked(7);
        let mut lost = t.lose_all();
        lost.sort();
        assert_eq!(lost, vec![1, 2, 3]);
        assert!(t.is_empty());
    }

    proptest! {
        /// Whatever the ack order, each ack returns the request sent with that pkid.
        #[test]
        fn any_ack_order(n in 1usize..60, seed in any::<u64>()) {
            let mut t = AckTracker::default();
            for i in 0..n { t.queued(i); }
            let mut ids: Vec<u16> = (1..=n as u16).collect();
            for &id in &ids { prop_assert!(t.sent(id)); }
            // deterministic shuffle
            let mut s = seed;
            for i in (1..ids.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ids.swap(i, (s >> 33) as usize % (i + 1));
            }
            for id in ids {
                prop_assert_eq!(t.acked(id), Some(usize::from(id) - 1));
            }
            prop_assert!(t.is_empty());
        }
    }
}
