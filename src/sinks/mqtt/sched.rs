//! Per-SKU publish scheduling, without I/O: the throttle, the one-in-flight rule, the
//! never-older-LSN rule, and the round robin over SKUs whose window values age.
//!
//! Times are milliseconds on a monotonic clock the caller owns.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// The first retry after a refused message (ms).
pub const REFUSED_FIRST_MS: u64 = 1_000;
/// The longest wait between retries of a refused message (ms).
pub const REFUSED_MAX_MS: u64 = 60_000;

/// Why a SKU should be published. Requests merge to the strongest.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Want {
    /// Window values may have aged; publish (with `as_of`, no `delta`) only if they did.
    Aging,
    /// The hash changed; publish unless Redis says it is already published.
    Change,
    /// Publish even when already published (broker lost its retained messages, resync).
    Force,
}

#[derive(Debug, Default)]
struct Entry {
    want: Option<Want>,
    /// Messages (state and alerts) not yet acknowledged, plus one while being prepared.
    in_flight: u32,
    last_sent_at: Option<u64>,
    last_lsn: Option<u64>,
    /// Not due before this (a refused message's back-off).
    not_before: Option<u64>,
    /// Refusals in a row (the back-off doubles with each).
    refusals: u32,
    /// Its timer's key in [`Scheduler::timers`]: (due, sequence).
    timer: Option<(u64, u64)>,
}

/// The per-SKU state machines and their timers.
#[derive(Debug)]
pub struct Scheduler {
    min_interval: u64,
    skus: HashMap<String, Entry, foldhash::fast::RandomState>,
    /// SKUs with a publish wanted, by (due, sequence): SKUs due at the same time go in
    /// the order they were scheduled, and a timer is found and removed by two integers
    /// (keyed by the SKU's name, every insert and removal compared strings and the
    /// removal allocated a copy of the name: a thousand SKUs due at once in a backlog).
    timers: BTreeMap<(u64, u64), String>,
    seq: u64,
    /// SKUs whose last state was refused and not taken since (their back-off timers do
    /// not count as [`pending`](Self::pending) work: a broker refusing thousands for
    /// good must not hold up the rest).
    refused: usize,
}

impl Scheduler {
    /// A scheduler allowing one message per SKU per `min_interval_ms`.
    pub fn new(min_interval_ms: u64) -> Self {
        Scheduler {
            min_interval: min_interval_ms,
            skus: HashMap::default(),
            timers: BTreeMap::new(),
            seq: 0,
            refused: 0,
        }
    }

    /// Asks for a publish of `sku`. The first change publishes at once; changes inside
    /// the interval or while a message is in flight coalesce into one later publish.
    pub fn request(&mut self, sku: &str, want: Want) {
        let e = match self.skus.get_mut(sku) {
            Some(e) => e,
            None => self.skus.entry(sku.to_string()).or_default(),
        };
        e.want = e.want.max(Some(want));
        self.reschedule(sku);
    }

    fn reschedule(&mut self, sku: &str) {
        let Some(e) = self.skus.get_mut(sku) else {
            return;
        };
        let due = if e.want.is_some() && e.in_flight == 0 {
            let throttled = e
                .last_sent_at
                .map_or(0, |t| t.saturating_add(self.min_interval));
            Some(throttled.max(e.not_before.unwrap_or(0)))
        } else {
            None
        };
        if e.timer.map(|(d, _)| d) != due {
            if let Some(old) = e.timer.take() {
                self.timers.remove(&old);
            }
            if let Some(d) = due {
                self.seq += 1;
                e.timer = Some((d, self.seq));
                self.timers.insert((d, self.seq), sku.to_string());
            }
        }
    }

    /// When the next SKU becomes ready (may be in the past).
    pub fn next_due(&self) -> Option<u64> {
        self.timers.first_key_value().map(|((d, _), _)| *d)
    }

    /// Takes a ready SKU and claims it: the caller must follow up with [`sent`](Self::sent)
    /// or [`skipped`](Self::skipped).
    pub fn pop_ready(&mut self, now: u64) -> Option<(String, Want)> {
        let ((due, _), _) = self.timers.first_key_value()?;
        if *due > now {
            return None;
        }
        let (_, sku) = self.timers.pop_first()?;
        let e = self.skus.get_mut(&sku)?;
        e.timer = None;
        e.in_flight += 1;
        let want = e.want.take().unwrap_or(Want::Change);
        Some((sku, want))
    }

    /// Whether a message with `lsn` may be sent now (never older than one already sent).
    pub fn in_order(&self, sku: &str, lsn: u64) -> bool {
        self.skus
            .get(sku)
            .and_then(|e| e.last_lsn)
            .is_none_or(|last| lsn >= last)
    }

    /// The claimed SKU was sent as `messages` messages carrying `lsn`.
    pub fn sent(&mut self, sku: &str, lsn: u64, messages: u32, now: u64) {
        if let Some(e) = self.skus.get_mut(sku) {
            e.in_flight = e.in_flight.saturating_sub(1) + messages;
            if messages > 0 {
                e.last_sent_at = Some(now);
                e.last_lsn = e.last_lsn.max(Some(lsn));
            }
        }
        self.reschedule(sku);
    }

    /// The claimed SKU was not sent (nothing to do, or out of order, or a read failed).
    pub fn skipped(&mut self, sku: &str) {
        if let Some(e) = self.skus.get_mut(sku) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
        self.reschedule(sku);
    }

    /// A message of `sku` was acknowledged (or refused: an alert).
    pub fn acked(&mut self, sku: &str) {
        self.skipped(sku);
    }

    /// A state of `sku` was acknowledged: a refusal's back-off ends.
    pub fn state_acked(&mut self, sku: &str) {
        if let Some(e) = self.skus.get_mut(sku) {
            if e.refusals > 0 {
                self.refused = self.refused.saturating_sub(1);
            }
            e.refusals = 0;
            e.not_before = None;
        }
        self.skipped(sku);
    }

    /// A message of `sku` was refused by the broker (a PUBACK reason code of 0x80 or
    /// more: an ACL, a quota, a full queue). Whatever the broker holds for it may be
    /// older, and Redis does not say so (its publish mark is another broker's, or none):
    /// send it again, unconditionally, after [`REFUSED_FIRST_MS`] doubling up to
    /// [`REFUSED_MAX_MS`] while refusals go on.
    pub fn refused(&mut self, sku: &str, now: u64) {
        if let Some(e) = self.skus.get_mut(sku) {
            e.in_flight = e.in_flight.saturating_sub(1);
            e.want = e.want.max(Some(Want::Force));
            let wait = REFUSED_FIRST_MS
                .saturating_mul(1 << e.refusals.min(16))
                .min(REFUSED_MAX_MS);
            if e.refusals == 0 {
                self.refused += 1;
            }
            e.refusals = e.refusals.saturating_add(1);
            e.not_before = Some(now.saturating_add(wait));
        }
        self.reschedule(sku);
    }

    /// Forget the LSN each SKU was last sent with: after Redis was rebuilt at an LSN
    /// below them (a PostgreSQL failover to a standby that was behind), the rebuilt
    /// states are the newer ones.
    pub fn forget_order(&mut self) {
        for e in self.skus.values_mut() {
            e.last_lsn = None;
        }
    }

    /// A message of `sku` was lost with the connection: publish again.
    pub fn lost(&mut self, sku: &str) {
        if let Some(e) = self.skus.get_mut(sku) {
            e.in_flight = e.in_flight.saturating_sub(1);
            e.want = e.want.max(Some(Want::Change));
        }
        self.reschedule(sku);
    }

    /// SKUs tracked.
    pub fn len(&self) -> usize {
        self.skus.len()
    }

    /// Whether no SKU is tracked.
    pub fn is_empty(&self) -> bool {
        self.skus.is_empty()
    }

    /// Forget SKUs with nothing wanted, nothing in flight and no throttle running.
    pub fn prune(&mut self, now: u64) {
        let min = self.min_interval;
        let mut refused_gone = 0;
        self.skus.retain(|_, e| {
            let keep = e.want.is_some()
                || e.in_flight > 0
                || e.timer.is_some()
                || e.last_sent_at.is_some_and(|t| t.saturating_add(min) > now);
            if !keep && e.refusals > 0 {
                refused_gone += 1;
            }
            keep
        });
        self.refused = self.refused.saturating_sub(refused_gone);
    }

    /// SKUs with a publish wanted, but for refused ones waiting out their back-off (the
    /// scheduler's backlog, which gates taking more).
    pub fn pending(&self) -> usize {
        self.timers.len().saturating_sub(self.refused)
    }
}

#[derive(Debug)]
struct AgingEntry {
    fingerprint: u64,
    checked_minute: i64,
    generation: u64,
}

/// SKUs whose last published message had non-zero window values, visited round robin so
/// their aging values get republished. Bounded by the number of distinct SKUs.
#[derive(Debug, Default)]
pub struct Aging {
    entries: HashMap<String, AgingEntry>,
    ring: VecDeque<(String, u64)>,
    generation: u64,
}

impl Aging {
    /// Records what was just published for `sku` in `minute`: `Some(fingerprint)` of its
    /// window values when any is non-zero, else `None` (forget the SKU).
    pub fn published(&mut self, sku: &str, windows: Option<u64>, minute: i64) {
        match windows {
            None => {
                self.entries.remove(sku);
            }
            Some(fingerprint) => {
                if let Some(e) = self.entries.get_mut(sku) {
                    e.fingerprint = fingerprint;
                    e.checked_minute = minute;
                } else {
                    self.generation += 1;
                    self.entries.insert(
                        sku.to_string(),
                        AgingEntry {
                            fingerprint,
                            checked_minute: minute,
                            generation: self.generation,
                        },
                    );
                    self.ring.push_back((sku.to_string(), self.generation));
                    // Entries of forgotten SKUs leave the ring only as `next` passes
                    // them, and nothing calls it while aging republishes are off.
                    if self.ring.len() > 2 * self.entries.len() + 64 {
                        let entries = &self.entries;
                        self.ring
                            .retain(|(s, g)| entries.get(s).is_some_and(|e| e.generation == *g));
                    }
                }
            }
        }
    }

    /// The window fingerprint last published for `sku`.
    pub fn fingerprint(&self, sku: &str) -> Option<u64> {
        self.entries.get(sku).map(|e| e.fingerprint)
    }

    /// Marks `sku` as checked in `minute` (its values did not change).
    pub fn checked(&mut self, sku: &str, minute: i64) {
        if let Some(e) = self.entries.get_mut(sku) {
            e.checked_minute = minute;
        }
    }

    /// The next SKU to check in `minute`, round robin; `None` when every SKU was checked
    /// in this minute (window buckets are per minute, so values change only then).
    pub fn next(&mut self, minute: i64) -> Option<String> {
        for _ in 0..self.ring.len() {
            let (sku, generation) = self.ring.pop_front()?;
            let Some(e) = self.entries.get(&sku) else {
                continue;
            };
            if e.generation != generation {
                continue;
            }
            let due = e.checked_minute < minute;
            self.ring.push_back((sku.clone(), generation));
            if due {
                if let Some(e) = self.entries.get_mut(&sku) {
                    e.checked_minute = minute;
                }
                return Some(sku);
            }
        }
        None
    }

    /// SKUs tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No SKUs tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_change_at_once_then_coalesced() {
        let mut s = Scheduler::new(100);
        s.request("a", Want::Change);
        assert_eq!(s.pop_ready(0), Some(("a".into(), Want::Change)));
        s.sent("a", 1, 1, 0);
        s.request("a", Want::Change);
        s.request("a", Want::Change);
        assert_eq!(s.pop_ready(1000), None, "in flight");
        s.acked("a");
        assert_eq!(s.next_due(), Some(100));
        assert_eq!(s.pop_ready(99), None);
        s.request("b", Want::Change);
        assert_eq!(
            s.pop_ready(99),
            Some(("b".into(), Want::Change)),
            "b not delayed"
        );
        assert_eq!(s.pop_ready(100), Some(("a".into(), Want::Change)));
    }

    #[test]
    fn skus_due_together_go_in_the_order_they_were_requested() {
        let mut s = Scheduler::new(100);
        for sku in ["c", "a", "b"] {
            s.request(sku, Want::Change);
        }
        // a request that does not move its timer keeps its place
        s.request("c", Want::Force);
        let order: Vec<String> = std::iter::from_fn(|| s.pop_ready(0).map(|(k, _)| k)).collect();
        assert_eq!(order, ["c", "a", "b"]);
        assert_eq!(s.pending(), 0);
        // back in the queue once acknowledged, behind what was requested meanwhile
        s.sent("a", 1, 1, 0);
        s.request("a", Want::Change);
        s.request("d", Want::Change);
        s.acked("a");
        assert_eq!(s.pop_ready(0).map(|(k, _)| k).as_deref(), Some("d"));
        assert_eq!(s.pop_ready(99), None, "a is throttled");
        assert_eq!(s.pop_ready(100).map(|(k, _)| k).as_deref(), Some("a"));
    }

    #[test]
    fn want_merges_to_strongest() {
        let mut s = Scheduler::new(0);
        s.request("a", Want::Aging);
        s.request("a", Want::Force);
        s.request("a", Want::Change);
        assert_eq!(s.pop_ready(0), Some(("a".into(), Want::Force)));
    }

    #[test]
    fn lost_republishes() {
        let mut s = Scheduler::new(0);
        s.request("a", Want::Change);
        s.pop_ready(0);
        s.sent("a", 5, 2, 0);
        s.lost("a");
        assert_eq!(s.pop_ready(0), None, "one message still in flight");
        s.lost("a");
        assert_eq!(s.pop_ready(0), Some(("a".into(), Want::Change)));
        assert!(!s.in_order("a", 4));
        assert!(s.in_order("a", 5));
    }

    #[test]
    fn a_refused_state_is_sent_again_unconditionally_with_a_doubling_back_off() {
        let mut s = Scheduler::new(100);
        s.request("x", Want::Change);
        assert_eq!(s.pop_ready(0), Some(("x".into(), Want::Change)));
        s.sent("x", 7, 1, 0);
        s.refused("x", 10);
        assert_eq!(s.next_due(), Some(10 + REFUSED_FIRST_MS));
        assert_eq!(s.pop_ready(10 + REFUSED_FIRST_MS - 1), None);
        let again = s.pop_ready(10 + REFUSED_FIRST_MS);
        assert_eq!(
            again,
            Some(("x".into(), Want::Force)),
            "whatever Redis marks"
        );
        assert!(s.in_order("x", 7), "the same LSN again");
        s.sent("x", 7, 1, 2_000);
        s.refused("x", 2_000);
        assert_eq!(s.next_due(), Some(2_000 + 2 * REFUSED_FIRST_MS));
        for i in 0..30 {
            let now = 10_000_000 * (i + 1);
            assert!(s.pop_ready(now).is_some());
            s.sent("x", 7, 1, now);
            s.refused("x", now);
            assert!(s.next_due().unwrap() <= now + REFUSED_MAX_MS);
        }
        // A state and its alert: the state refused again, the alert's ack does not end
        // the back-off, which is no pending work either.
        let now = 400_000_000;
        assert!(s.pop_ready(now).is_some());
        s.sent("x", 8, 2, now);
        s.refused("x", now);
        s.acked("x");
        assert_eq!(s.next_due(), Some(now + REFUSED_MAX_MS));
        assert_eq!(s.pending(), 0);
        // taken at last: the next change goes out at the throttle's pace again
        let now = now + REFUSED_MAX_MS;
        assert!(s.pop_ready(now).is_some());
        s.sent("x", 8, 1, now);
        s.state_acked("x");
        s.request("x", Want::Change);
        assert_eq!(s.next_due(), Some(now + 100));
        assert_eq!(s.pending(), 1);
    }

    #[test]
    fn forgetting_the_order_lets_a_rebuilt_lower_lsn_through() {
        let mut s = Scheduler::new(0);
        s.request("x", Want::Change);
        s.pop_ready(0).unwrap();
        s.sent("x", 1_000, 1, 0);
        s.acked("x");
        assert!(!s.in_order("x", 500));
        s.forget_order();
        assert!(s.in_order("x", 500));
    }

    #[test]
    fn the_aging_ring_stays_bounded_while_nothing_visits_it() {
        let mut a = Aging::default();
        for i in 0..10_000 {
            let sku = format!("s{}", i % 3);
            a.published(&sku, Some(1), 0);
            a.published(&sku, None, 0);
        }
        a.published("kept", Some(1), 0);
        assert!(a.ring.len() <= 2 * a.entries.len() + 65, "{}", a.ring.len());
        assert_eq!(a.next(1), Some("kept".into()));
    }

    #[test]
    fn aging_round_robin_once_per_minute() {
        let mut a = Aging::default();
        a.published("x", Some(1), 10);
        a.published("y", Some(2), 10);
        assert_eq!(a.next(10), None);
        assert_eq!(a.next(11).as_deref(), Some("x"));
        assert_eq!(a.next(11).as_deref(), Some("y"));
        assert_eq!(a.next(11), None);
        a.published("x", None, 11);
        a.published("x", Some(3), 11);
        a.published("x", None, 11);
        a.published("x", Some(4), 11);
        assert_eq!(a.next(12).as_deref(), Some("y"));
        assert_eq!(a.next(12).as_deref(), Some("x"));
        assert_eq!(a.next(12), None, "no duplicate ring entries survive");
        assert_eq!(a.len(), 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// The hash changed (its lsn grows) and `changed()` was called.
        Change(u8),
        /// Time passes.
        Tick(u16),
        /// The oldest in-flight message is acknowledged.
        Ack,
        /// The connection drops.
        Lose,
        /// A stale read: the next publish of this SKU reads an older lsn.
        Stale(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3).prop_map(Op::Change),
            3 => (0u16..300).prop_map(Op::Tick),
            3 => Just(Op::Ack),
            1 => Just(Op::Lose),
            1 => (0u8..3).prop_map(Op::Stale),
        ]
    }

    proptest! {
        /// Drives the scheduler like the I/O loop does and checks: never an older lsn
        /// after a newer one, at most one message per interval per SKU, at most one in
        /// flight per SKU, and the latest state is published once things settle.
        #[test]
        fn throttle_and_order(ops in proptest::collection::vec(op(), 1..200)) {
            const IV: u64 = 100;
            let mut s = Scheduler::new(IV);
            let mut now = 0u64;
            let mut lsn = [0u64; 3];
            let mut stale = [false; 3];
            let mut in_flight: VecDeque<(usize, u64)> = VecDeque::new();
            let mut sent: Vec<Vec<(u64, u64)>> = vec![vec![]; 3];
            let mut acked = [0u64; 3];
            let drive = |s: &mut Scheduler, now: u64, lsn: &[u64; 3], stale: &mut [bool; 3],
                         in_flight: &mut VecDeque<(usize, u64)>, sent: &mut Vec<Vec<(u64, u64)>>| {
                while let Some((sku, _)) = s.pop_ready(now) {
                    let i: usize = sku.parse().unwrap();
                    let read = if stale[i] { stale[i] = false; lsn[i].saturating_sub(1) } else { lsn[i] };
                    if s.in_order(&sku, read) {
                        s.sent(&sku, read, 1, now);
                        in_flight.push_back((i, read));
                        sent[i].push((now, read));
                    } else {
                        s.skipped(&sku);
                    }
                    if read != lsn[i] {
                        // a stale read is followed by the change notification that made it stale
                        s.request(&sku, Want::Change);
                    }
                }
            };
            for op in ops {
                match op {
                    Op::Change(i) => { lsn[i as usize] += 1; s.request(&i.to_string(), Want::Change); }
                    Op::Tick(ms) => now += u64::from(ms),
                    Op::Ack => if let Some((i, l)) = in_flight.pop_front() {
                        acked[i] = acked[i].max(l);
                        s.acked(&i.to_string());
                    },
                    Op::Lose => for (i, _) in in_flight.drain(..) { s.lost(&i.to_string()); },
                    Op::Stale(i) => stale[i as usize] = true,
                }
                drive(&mut s, now, &lsn, &mut stale, &mut in_flight, &mut sent);
                for i in 0..3 {
                    prop_assert!(in_flight.iter().filter(|(j, _)| *j == i).count() <= 1);
                }
            }
            // settle: ack everything, let time pass
            for _ in 0..10 {
                while let Some((i, l)) = in_flight.pop_front() {
                    acked[i] = acked[i].max(l);
                    s.acked(&i.to_string());
                }
                now += IV;
                drive(&mut s, now, &lsn, &mut stale, &mut in_flight, &mut sent);
            }
            for i in 0..3 {
                for w in sent[i].windows(2) {
                    prop_assert!(w[1].1 >= w[0].1, "older lsn after newer: {:?}", sent[i]);
                    prop_assert!(w[1].0 >= w[0].0 + IV, "interval violated: {:?}", sent[i]);
                }
                if lsn[i] > 0 {
                    prop_assert_eq!(acked[i], lsn[i], "latest state published");
                }
            }
        }
    }
}
