//! LSN progress tracking: which WAL position may be reported to the server as flushed.
//!
//! Transactions are received in commit order but sinks may finish them out of order. The
//! flush LSN is the low-watermark: every transaction ending at or before it is durable.
//! Reporting more would let the server discard WAL that a crash would still need.
//! Pure state machine; the caller owns the clock and the socket.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Handle for one received transaction, passed back to [`Progress::durable`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// Unique per [`Progress`], so a replayed transaction with the same end LSN is distinct.
    seq: u64,
    end_lsn: Lsn,
}

impl Ticket {
    /// The transaction's `end_lsn`.
    pub fn end_lsn(&self) -> Lsn {
        self.end_lsn
    }

    /// Its sequence number: tickets are numbered in the order [`Progress::commit`] gave
    /// them out, so a batch of consecutive transactions is a range of them (see
    /// [`Progress::durable_seqs`]).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// A received transaction awaiting its sinks: 16 bytes, since a catch-up keeps one per
/// transaction of the batches in flight (100k and more).
#[derive(Clone, Copy, Debug)]
struct Pending {
    /// The ticket's sequence number, with [`DURABLE`] set once the sinks finished it.
    seq_flags: u64,
    end_lsn: Lsn,
}

/// The flag bit of [`Pending::seq_flags`] (sequence numbers stay far below 2^63).
const DURABLE: u64 = 1 << 63;

impl Pending {
    fn seq(&self) -> u64 {
        self.seq_flags & !DURABLE
    }

    fn durable(&self) -> bool {
        self.seq_flags & DURABLE != 0
    }

    fn mark_durable(&mut self) {
        self.seq_flags |= DURABLE;
    }
}

/// Commit-to-send delay (server clock) above which the slot counts as catching up: the
/// apply step then merges larger batches and the source batches its socket reads.
pub const BACKLOG_LAG_MS: i64 = 500;

/// Tracks received and durable transactions to compute the `write`/`flush` LSNs of
/// standby status updates.
#[derive(Clone, Debug)]
pub struct Progress {
    flush: Lsn,
    received: Lsn,
    open: bool,
    next_seq: u64,
    /// Received, not yet folded into `flush`; sorted by (end_lsn, seq). Only the durable
    /// prefix is ever removed, so this holds exactly the transactions awaiting sinks.
    pending: VecDeque<Pending>,
    /// How long before the walsender sent the latest commit it had been committed
    /// (server clock on both sides, so clock skew cannot fake a backlog), in ms.
    stream_lag_ms: i64,
    /// Downstream stopped for good: no pending ticket will ever come back.
    released: bool,
}

impl Progress {
    /// Starts at `start`, the slot's confirmed flush LSN.
    pub fn new(start: Lsn) -> Self {
        Progress {
            flush: start,
            received: start,
            open: false,
            next_seq: 0,
            pending: VecDeque::new(),
            stream_lag_ms: 0,
            released: false,
        }
    }

    /// A transaction was opened on the stream; keepalives are ignored until it commits.
    pub fn begin(&mut self) {
        self.open = true;
    }

    /// A transaction was received completely; it is pending until marked durable.
    pub fn commit(&mut self, end_lsn: Lsn) -> Ticket {
        self.open = false;
        self.received = self.received.max(end_lsn);
        let seq = self.next_seq;
        self.next_seq += 1;
        let ticket = Ticket { seq, end_lsn };
        // Already covered by flush (a replay after reconnect): durable by definition.
        if end_lsn <= self.flush {
            return ticket;
        }
        let p = Pending {
            seq_flags: seq,
            end_lsn,
        };
        // In one session end LSNs rise, so this is a push_back (checked first: this runs
        // for every transaction); a replay after reconnect may land earlier and is
        // inserted in order so flush can never skip past it.
        if self.pending.back().is_none_or(|b| b.end_lsn <= end_lsn) {
            self.pending.push_back(p);
        } else {
            let at = self
                .pending
                .partition_point(|p| (p.end_lsn, p.seq()) <= (end_lsn, seq));
            self.pending.insert(at, p);
        }
        ticket
    }

    /// The walsender sent a commit `lag_ms` after it was committed.
    pub fn set_stream_lag(&mut self, lag_ms: i64) {
        self.stream_lag_ms = lag_ms;
    }

    /// See [`Progress::set_stream_lag`]: large while the slot is catching up.
    pub fn stream_lag_ms(&self) -> i64 {
        self.stream_lag_ms
    }

    /// The stream broke mid-transaction: forget the open transaction. Pending (complete)
    /// transactions stay pending; the sinks still own them.
    pub fn abort_open(&mut self) {
        self.open = false;
    }

    /// Sinks finished the transaction. Unknown or repeated tickets are ignored.
    pub fn durable(&mut self, ticket: Ticket) {
        let key = (ticket.end_lsn, ticket.seq);
        // Tickets mostly come back in order: the front is the common case.
        let i = match self.pending.front() {
            Some(f) if (f.end_lsn, f.seq()) == key => Ok(0),
            _ => self
                .pending
                .binary_search_by(|p| (p.end_lsn, p.seq()).cmp(&key)),
        };
        if let Ok(i) = i {
            self.pending[i].mark_durable();
        }
        self.advance();
    }

    /// Sinks finished every transaction whose ticket's sequence number is in
    /// `first..=last`: the same as [`Progress::durable`] for each of those tickets, so a
    /// sink need not keep a ticket per transaction. Unknown numbers are ignored.
    pub fn durable_seqs(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        let want = last - first + 1;
        let mut found = 0u64;
        // A batch's transactions are nearly always the oldest pending ones: the front.
        for p in self.pending.iter_mut() {
            if (first..=last).contains(&p.seq()) {
                p.mark_durable();
                found += 1;
                if found == want {
                    break;
                }
            }
        }
        self.advance();
    }

    /// Fold the durable prefix into the flush LSN.
    fn advance(&mut self) {
        while let Some(p) = self.pending.front() {
            if !p.durable() {
                break;
            }
            self.flush = self.flush.max(p.end_lsn);
            self.pending.pop_front();
        }
    }

    /// Server keepalive. Its `wal_end` advances flush only when idle (no open transaction and
    /// nothing pending): then every change up to `wal_end` is either durable or irrelevant
    /// to us. A keepalive while busy is dropped; the next one will come.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        self.received = self.received.max(wal_end);
        if !self.open && self.pending.is_empty() {
            self.flush = self.flush.max(wal_end);
        }
    }

    /// Largest L such that every transaction ending at or before L is durable. Monotonic.
    pub fn flush_lsn(&self) -> Lsn {
        self.flush
    }

    /// Highest `end_lsn` or keepalive `wal_end` seen (the status update's `write` field).
    pub fn received_lsn(&self) -> Lsn {
        self.received
    }

    /// Transactions received but not yet folded into the flush LSN.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Downstream stopped and dropped the tickets it still held (a pipeline restart
    /// discards its unapplied batch): nothing pending will become durable, so a shutdown
    /// must not wait for it. The flush LSN stays where it is.
    pub fn release(&mut self) {
        self.released = true;
    }

    /// Whether a shutdown should keep waiting for pending transactions.
    pub fn awaiting_downstream(&self) -> bool {
        !self.released && !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn release_ends_the_wait_without_moving_flush() {
        let mut p = Progress::new(Lsn(100));
        p.begin();
        let _dropped = p.commit(Lsn(200));
        assert!(p.awaiting_downstream());
        p.release();
        assert!(!p.awaiting_downstream());
        assert_eq!(p.flush_lsn(), Lsn(100));
    }

    #[test]
    fn in_order_durability() {
        let mut p = Progress::new(Lsn(100));
        assert_eq!((p.flush_lsn(), p.received_lsn()), (Lsn(100), Lsn(100)));
        p.begin();
        let a = p.commit(Lsn(200));
        p.begin();
        let b = p.commit(Lsn(300));
        assert_eq!((p.pending(), p.received_lsn()), (2, Lsn(300)));
        p.durable(a);
        assert_eq!((p.flush_lsn(), p.pending()), (Lsn(200), 1));
        p.durable(b);
        assert_eq!((p.flush_lsn(), p.pending()), (Lsn(300), 0));
        assert_eq!(a.end_lsn(), Lsn(200));
    }

    #[test]
    fn out_of_order_durability_waits_for_the_prefix() {
        let mut p = Progress::new(Lsn(0));
        let t: Vec<_> = (1..=3).map(|i| p.commit(Lsn(i * 10))).collect();
        p.durable(t[2]);
        p.durable(t[1]);
        assert_eq!((p.flush_lsn(), p.pending()), (Lsn(0), 3));
        p.durable(t[0]);
        assert_eq!((p.flush_lsn(), p.pending()), (Lsn(30), 0));
    }

    #[test]
    fn keepalive_only_when_idle() {
        let mut p = Progress::new(Lsn(10));
        p.keepalive(Lsn(50));
        assert_eq!(p.flush_lsn(), Lsn(50));
        p.begin();
        p.keepalive(Lsn(60));
        assert_eq!((p.flush_lsn(), p.received_lsn()), (Lsn(50), Lsn(60)));
        let t = p.commit(Lsn(70));
        p.keepalive(Lsn(80));
        assert_eq!(
            p.flush_lsn(),
            Lsn(50),
            "pending transaction blocks keepalive"
        );
        p.durable(t);
        assert_eq!(
            p.flush_lsn(),
            Lsn(70),
            "the busy keepalive is not remembered"
        );
        p.keepalive(Lsn(90));
        assert_eq!(p.flush_lsn(), Lsn(90));
        p.keepalive(Lsn(5));
        assert_eq!((p.flush_lsn(), p.received_lsn()), (Lsn(90), Lsn(90)));
    }

    #[test]
    fn abort_open_forgets_the_open_transaction() {
        let mut p = Progress::new(Lsn(0));
        p.begin();
        p.keepalive(Lsn(40));
        assert_eq!(p.flush_lsn(), Lsn(0));
        p.abort_open();
        p.keepalive(Lsn(40));
        assert_eq!(p.flush_lsn(), Lsn(40));
    }

    #[test]
    fn duplicates_and_old_lsns_are_harmless() {
        let mut p = Progress::new(Lsn(100));
        let old = p.commit(Lsn(50));
        assert_eq!(p.pending(), 0);
        p.durable(old);
        p.durable(old);
        assert_eq!(p.flush_lsn(), Lsn(100));
        let a = p.commit(Lsn(200));
        p.durable(a);
        p.durable(a);
        assert_eq!(p.flush_lsn(), Lsn(200));
        // A bogus ticket is ignored.
        p.durable(Ticket {
            seq: 999,
            end_lsn: Lsn(1000),
        });
        assert_eq!(p.flush_lsn(), Lsn(200));
    }

    #[test]
    fn replay_after_reconnect_keeps_the_watermark_honest() {
        let mut p = Progress::new(Lsn(0));
        let a = p.commit(Lsn(100));
        let b = p.commit(Lsn(200));
        p.abort_open();
        // The server replays from its confirmed LSN: both transactions arrive again.
        let a2 = p.commit(Lsn(100));
        let b2 = p.commit(Lsn(200));
        p.durable(b);
        p.durable(b2);
        assert_eq!(p.flush_lsn(), Lsn(0));
        p.durable(a2);
        assert_eq!(
            p.flush_lsn(),
            Lsn(0),
            "the first copy of 100 is still in flight"
        );
        p.durable(a);
        assert_eq!((p.flush_lsn(), p.pending()), (Lsn(200), 0));
    }

    #[test]
    fn a_range_of_sequence_numbers_is_exactly_its_tickets_also_around_a_replay() {
        let mut p = Progress::new(Lsn(0));
        let a = p.commit(Lsn(100));
        let b = p.commit(Lsn(200));
        p.abort_open();
        // replayed after a reconnect: sorted in between the first copies
        let a2 = p.commit(Lsn(100));
        let b2 = p.commit(Lsn(200));
        assert_eq!((a2.seq(), b2.seq()), (a.seq() + 2, a.seq() + 3));
        p.durable_seqs(a2.seq(), b2.seq());
        assert_eq!(
            p.flush_lsn(),
            Lsn(0),
            "the first copies are still in flight"
        );
        assert_eq!(p.pending(), 4);
        p.durable_seqs(a.seq(), a.seq());
        assert_eq!((p.flush_lsn(), p.pending()), (Lsn(100), 2));
        // numbers no transaction holds, and an empty range, change nothing
        p.durable_seqs(50, 60);
        p.durable_seqs(b.seq() + 1, b.seq());
        assert_eq!((p.flush_lsn(), p.pending()), (Lsn(100), 2));
        p.durable_seqs(b.seq(), b.seq());
        assert_eq!((p.flush_lsn(), p.pending()), (Lsn(200), 0));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Commit(u64),
        Durable(usize),
        /// Tickets `i..i + n` (in the order given out) at once, by sequence numbers.
        DurableRange(usize, usize),
        Keepalive(u64),
        Begin,
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            prop_oneof![
                3 => (1u64..100).prop_map(Op::Commit),
                3 => any::<usize>().prop_map(Op::Durable),
                2 => (any::<usize>(), 1usize..6).prop_map(|(i, n)| Op::DurableRange(i, n)),
                1 => (0u64..150).prop_map(Op::Keepalive),
                1 => Just(Op::Begin),
            ],
            0..80,
        )
    }

    proptest! {
        #[test]
        fn watermark_invariants(start in 0u64..1000, ops in ops()) {
            let mut p = Progress::new(Lsn(start));
            let mut last = start; // last committed end_lsn
            // Server WAL position: commits end beyond every earlier keepalive's wal_end,
            // and end LSNs rise strictly, as in one session.
            let mut frontier = start;
            let mut tickets: Vec<(Ticket, bool)> = Vec::new();
            let mut open = false;
            let mut idle_ka_max = start;
            let mut prev_flush = p.flush_lsn();
            for op in ops {
                match op {
                    Op::Begin => {
                        open = true;
                        p.begin();
                    }
                    Op::Commit(step) => {
                        if !open {
                            p.begin();
                        }
                        open = false;
                        last = frontier + step;
                        frontier = last;
                        tickets.push((p.commit(Lsn(last)), false));
                    }
                    Op::Durable(i) => {
                        if !tickets.is_empty() {
                            let i = i % tickets.len();
                            tickets[i].1 = true;
                            p.durable(tickets[i].0);
                        }
                    }
                    Op::DurableRange(i, n) => {
                        if !tickets.is_empty() {
                            let i = i % tickets.len();
                            let j = (i + n).min(tickets.len());
                            for t in &mut tickets[i..j] {
                                t.1 = true;
                            }
                            p.durable_seqs(tickets[i].0.seq(), tickets[j - 1].0.seq());
                        }
                    }
                    Op::Keepalive(ahead) => {
                        let wal_end = last + ahead;
                        frontier = frontier.max(wal_end);
                        if !open && tickets.iter().all(|t| t.1) {
                            idle_ka_max = idle_ka_max.max(wal_end);
                        }
                        p.keepalive(Lsn(wal_end));
                    }
                }
                let f = p.flush_lsn();
                // (a) monotonic
                prop_assert!(f >= prev_flush);
                prev_flush = f;
                // (b) never at or past a non-durable transaction's end
                for (t, d) in &tickets {
                    if !d {
                        prop_assert!(f < t.end_lsn(), "flush {f} passes pending {}", t.end_lsn());
                    }
                }
                // Memory: only the transactions from the first non-durable one on are kept.
                let durable_prefix = tickets.iter().take_while(|t| t.1).count();
                prop_assert_eq!(p.pending(), tickets.len() - durable_prefix);
            }
            // (c) once everything is durable: the last end_lsn or a later idle keepalive.
            for (t, d) in &mut tickets {
                if !*d {
                    *d = true;
                    p.durable(*t);
                }
            }
            prop_assert_eq!(p.pending(), 0);
            prop_assert_eq!(p.flush_lsn(), Lsn(last.max(idle_ka_max)));
        }
    }
}
