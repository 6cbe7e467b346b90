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

/// Transactions received and not yet folded into the flush LSN, in (end_lsn, seq) order,
/// packed 8 bytes each into sorted chunks. A catch-up keeps hundreds of thousands pending
/// while one batch is applied and the next merges: a 16-byte record each was 8 MB of its
/// peak heap. Chunks also keep a replay after a reconnect cheap: its transactions sort
/// between the first copies (same end LSN, later sequence number), and each is inserted
/// into one bounded chunk instead of shifting every pending transaction.
#[derive(Clone, Debug)]
struct Queue {
    chunks: VecDeque<Chunk>,
    /// Transactions held and not yet folded (the chunks' lengths less their `done`).
    len: usize,
    /// Most transactions per chunk: bounds an insert's shift, and a folded front chunk
    /// is freed as a whole.
    chunk_len: usize,
}

/// Sorted transactions, each packed as its end LSN less `base_lsn` (high 32 bits), a
/// durable bit and its sequence number less `base_seq` (low 31 bits).
#[derive(Clone, Debug)]
struct Chunk {
    base_lsn: Lsn,
    base_seq: u64,
    entries: Vec<u64>,
    /// The first `done` entries are folded into flush already (kept until the chunk is
    /// freed as a whole).
    done: usize,
}

/// Transactions per chunk (64 KiB).
const CHUNK_LEN: usize = 8 * 1024;
const DURABLE_BIT: u64 = 1 << 31;
const SEQ_MASK: u64 = DURABLE_BIT - 1;

impl Chunk {
    fn new(end_lsn: Lsn, seq: u64) -> Self {
        Chunk {
            base_lsn: end_lsn,
            base_seq: seq,
            entries: vec![0],
            done: 0,
        }
    }

    fn key(&self, i: usize) -> (Lsn, u64) {
        self.key_of(self.entries[i])
    }

    fn last_key(&self) -> (Lsn, u64) {
        self.key(self.entries.len() - 1)
    }

    fn durable(&self, i: usize) -> bool {
        self.entries[i] & DURABLE_BIT != 0
    }

    /// The entry for this key, if it fits the chunk's bases.
    fn pack(&self, end_lsn: Lsn, seq: u64) -> Option<u64> {
        let l = end_lsn.0.checked_sub(self.base_lsn.0)?;
        let q = seq.checked_sub(self.base_seq)?;
        (l <= u64::from(u32::MAX) && q <= SEQ_MASK).then_some(l << 32 | q)
    }

    /// Index of the first entry from `done` on that does not sort below `key` (folded
    /// entries end at or below the flush LSN, below any key still inserted or marked).
    fn position(&self, key: (Lsn, u64)) -> usize {
        self.done + self.entries[self.done..].partition_point(|&e| self.key_of(e) < key)
    }

    fn key_of(&self, e: u64) -> (Lsn, u64) {
        (
            Lsn(self.base_lsn.0 + (e >> 32)),
            self.base_seq + (e & SEQ_MASK),
        )
    }

    /// Entries `at..` (`at` above `done`) as a chunk of their own, with the same bases.
    fn split_at(&mut self, at: usize) -> Chunk {
        debug_assert!(at > self.done && at < self.entries.len());
        Chunk {
            base_lsn: self.base_lsn,
            base_seq: self.base_seq,
            entries: self.entries.split_off(at),
            done: 0,
        }
    }
}

impl Queue {
    fn new(chunk_len: usize) -> Self {
        Queue {
            chunks: VecDeque::new(),
            len: 0,
            chunk_len: chunk_len.max(2),
        }
    }

    /// Adds a transaction above the flush LSN (its key is new).
    fn push(&mut self, seq: u64, end_lsn: Lsn) {
        let key = (end_lsn, seq);
        self.len += 1;
        // In one session end LSNs rise: the back chunk takes it at its end (checked
        // first: this runs for every transaction).
        if let Some(b) = self.chunks.back_mut()
            && b.last_key() < key
            && b.entries.len() < self.chunk_len
            && let Some(e) = b.pack(end_lsn, seq)
        {
            b.entries.push(e);
            return;
        }
        // The first chunk whose last transaction sorts after this one.
        let c = self.chunks.partition_point(|ch| ch.last_key() < key);
        let inside = c < self.chunks.len() && self.chunks[c].key(self.chunks[c].done) < key;
        if !inside {
            // Between two chunks (or after the last): at the end of the one before, or
            // a chunk of its own.
            if c > 0
                && self.chunks[c - 1].entries.len() < self.chunk_len
                && let Some(e) = self.chunks[c - 1].pack(end_lsn, seq)
            {
                self.chunks[c - 1].entries.push(e);
            } else {
                self.chunks.insert(c, Chunk::new(end_lsn, seq));
            }
            return;
        }
        let Some(e) = self.chunks[c].pack(end_lsn, seq) else {
            // Past the chunk's sequence base (a key inside a chunk always fits its LSN
            // base): only after 2^31 transactions while the chunk's oldest is pending.
            // Split it where the key sorts, and start a chunk: correct, if less packed.
            let at = self.chunks[c].position(key);
            let upper = self.chunks[c].split_at(at);
            self.chunks.insert(c + 1, upper);
            self.chunks.insert(c + 1, Chunk::new(end_lsn, seq));
            return;
        };
        // A full chunk splits in half first; both halves keep its bases, so `e` fits
        // either.
        let c = if self.chunks[c].entries.len() >= self.chunk_len {
            let ch = &mut self.chunks[c];
            let upper = ch.split_at(ch.done + (ch.entries.len() - ch.done) / 2);
            let to_upper = upper.key(0) < key;
            self.chunks.insert(c + 1, upper);
            if to_upper { c + 1 } else { c }
        } else {
            c
        };
        let ch = &mut self.chunks[c];
        let i = ch.position(key);
        ch.entries.insert(i, e);
    }

    /// Marks the transaction with this key durable, if it is held.
    fn mark(&mut self, end_lsn: Lsn, seq: u64) {
        let key = (end_lsn, seq);
        let c = self.chunks.partition_point(|ch| ch.last_key() < key);
        let Some(ch) = self.chunks.get_mut(c) else {
            return;
        };
        // the entry itself if held: the first from `done` on not sorting below it
        let i = ch.position(key);
        if i < ch.entries.len() && ch.key(i) == key {
            ch.entries[i] |= DURABLE_BIT;
        }
    }

    /// Marks every held transaction whose sequence number is in `first..=last` durable.
    fn mark_seqs(&mut self, first: u64, last: u64) {
        let want = last - first + 1;
        let mut found = 0u64;
        // A batch's transactions are nearly always the oldest pending ones: the front.
        for ch in self.chunks.iter_mut() {
            let (lo, hi) = (
                first.saturating_sub(ch.base_seq),
                last.checked_sub(ch.base_seq),
            );
            let Some(hi) = hi else { continue };
            for e in &mut ch.entries[ch.done..] {
                let q = *e & SEQ_MASK;
                if q >= lo && q <= hi {
                    *e |= DURABLE_BIT;
                    found += 1;
                    if found == want {
                        return;
                    }
                }
            }
        }
    }

    /// Folds the durable prefix away; returns the highest end LSN folded, if any.
    fn pop_durable(&mut self) -> Option<Lsn> {
        let mut top = None;
        while let Some(ch) = self.chunks.front_mut() {
            let n = ch.entries.len();
            let before = ch.done;
            while ch.done < n && ch.durable(ch.done) {
                ch.done += 1;
            }
            if ch.done > before {
                self.len -= ch.done - before;
                top = Some(ch.key(ch.done - 1).0);
            }
            if ch.done < n {
                break;
            }
            self.chunks.pop_front();
        }
        top
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
    pending: Queue,
    /// How long before the walsender sent the latest commit it had been committed
    /// (server clock on both sides, so clock skew cannot fake a backlog), in ms.
    stream_lag_ms: i64,
    /// Downstream stopped for good: no pending ticket will ever come back.
    released: bool,
}

impl Progress {
    /// Starts at `start`, the slot's confirmed flush LSN.
    pub fn new(start: Lsn) -> Self {
        Self::with_chunk_len(start, CHUNK_LEN)
    }

    fn with_chunk_len(start: Lsn, chunk_len: usize) -> Self {
        Progress {
            flush: start,
            received: start,
            open: false,
            next_seq: 0,
            pending: Queue::new(chunk_len),
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
        self.pending.push(seq, end_lsn);
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
        self.pending.mark(ticket.end_lsn, ticket.seq);
        self.advance();
    }

    /// Sinks finished every transaction whose ticket's sequence number is in
    /// `first..=last`: the same as [`Progress::durable`] for each of those tickets, so a
    /// sink need not keep a ticket per transaction. Unknown numbers are ignored.
    pub fn durable_seqs(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        self.pending.mark_seqs(first, last);
        self.advance();
    }

    /// Fold the durable prefix into the flush LSN.
    fn advance(&mut self) {
        if let Some(l) = self.pending.pop_durable() {
            self.flush = self.flush.max(l);
        }
    }

    /// Server keepalive. Its `wal_end` advances flush only when idle (no open transaction and
    /// nothing pending): then every change up to `wal_end` is either durable or irrelevant
    /// to us. A keepalive while busy is dropped; the next one will come.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        self.received = self.received.max(wal_end);
        if !self.open && self.pending.len == 0 {
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
        self.pending.len
    }

    /// Downstream stopped and dropped the tickets it still held (a pipeline restart
    /// discards its unapplied batch): nothing pending will become durable, so a shutdown
    /// must not wait for it. The flush LSN stays where it is.
    pub fn release(&mut self) {
        self.released = true;
    }

    /// Whether a shutdown should keep waiting for pending transactions.
    pub fn awaiting_downstream(&self) -> bool {
        !self.released && self.pending.len > 0
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

    #[test]
    fn a_replay_beyond_its_chunks_sequence_base_starts_a_chunk_in_order() {
        let mut p = Progress::with_chunk_len(Lsn(0), 8);
        let t: Vec<_> = [10, 20, 30].iter().map(|&l| p.commit(Lsn(l))).collect();
        // 2^31 transactions later (never this many pending in practice; each one
        // folded), the copy of the second comes again: its sequence number does not fit
        // the first chunk's 31 bits
        p.next_seq += 1 << 31;
        p.abort_open();
        let r = p.commit(Lsn(20));
        assert_eq!(p.pending.chunks.len(), 3, "split around a chunk of its own");
        let keys: Vec<_> = p
            .pending
            .chunks
            .iter()
            .flat_map(|c| (c.done..c.entries.len()).map(move |i| c.key(i)))
            .collect();
        assert_eq!(
            keys,
            vec![
                (Lsn(10), t[0].seq()),
                (Lsn(20), t[1].seq()),
                (Lsn(20), r.seq()),
                (Lsn(30), t[2].seq()),
            ]
        );
        p.durable(t[0]);
        p.durable(t[1]);
        p.durable(t[2]);
        assert_eq!(
            (p.flush_lsn(), p.pending()),
            (Lsn(20), 2),
            "the replay holds 30 back"
        );
        p.durable(r);
        assert_eq!((p.flush_lsn(), p.pending()), (Lsn(30), 0));
    }

    /// The pending transactions as a plain sorted list: what [`Queue`] packs.
    struct Model {
        flush: Lsn,
        open: bool,
        next_seq: u64,
        pending: Vec<(Lsn, u64, bool)>,
    }

    impl Model {
        fn commit(&mut self, l: Lsn) -> Ticket {
            self.open = false;
            let seq = self.next_seq;
            self.next_seq += 1;
            if l > self.flush {
                let at = self.pending.partition_point(|p| (p.0, p.1) < (l, seq));
                self.pending.insert(at, (l, seq, false));
            }
            Ticket { seq, end_lsn: l }
        }

        fn advance(&mut self) {
            while let Some(&(l, _, true)) = self.pending.first() {
                self.flush = self.flush.max(l);
                self.pending.remove(0);
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Begin,
        /// A commit `step` past the highest so far; a step past 2^32 leaves every
        /// chunk's LSN base behind.
        Commit(u64),
        /// A commit anywhere between the flush LSN and the highest so far (a replay of
        /// a transaction whose first copy is folded or pending, or none).
        CommitBetween(u64),
        /// A reconnect's replay: the stream breaks and the transaction committed
        /// `back` before the last comes again.
        Replay(usize),
        /// About 2^31 sequence numbers handed out and folded elsewhere: the next ones
        /// fall at the edge of (or past) their chunk's sequence base.
        SkipSeqs(u64),
        Durable(usize),
        DurableRange(usize, usize),
        Keepalive(u64),
        Release,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        proptest::collection::vec(
            prop_oneof![
                1 => Just(Step::Begin),
                4 => (1u64..50).prop_map(Step::Commit),
                1 => (0u64..3).prop_map(|k| Step::Commit((1 << 32) - 1 + k)),
                1 => (1u64 << 32..1u64 << 34).prop_map(Step::Commit),
                2 => any::<u64>().prop_map(Step::CommitBetween),
                3 => any::<usize>().prop_map(Step::Replay),
                1 => (0u64..4).prop_map(|k| Step::SkipSeqs((1 << 31) - 2 + k)),
                3 => any::<usize>().prop_map(Step::Durable),
                3 => (any::<usize>(), 1usize..12).prop_map(|(i, n)| Step::DurableRange(i, n)),
                1 => (0u64..100).prop_map(Step::Keepalive),
                1 => Just(Step::Release),
            ],
            0..200,
        )
    }

    proptest! {
        /// Chunks of 2 to 5 transactions, replays sorted between first copies, commits
        /// anywhere above the flush LSN, LSN steps at and past a chunk's 32-bit base,
        /// sequence numbers at and past its 31-bit base: the flush and received LSNs,
        /// the pending count and every pending key with its durable flag are the plain
        /// sorted list's after every step.
        #[test]
        fn packed_chunks_hold_what_a_sorted_list_holds(
            start in 0u64..1000,
            chunk_len in 2usize..6,
            steps in steps(),
        ) {
            let mut p = Progress::with_chunk_len(Lsn(start), chunk_len);
            let mut m = Model { flush: Lsn(start), open: false, next_seq: 0, pending: Vec::new() };
            let mut tickets: Vec<Ticket> = Vec::new();
            let mut commits: Vec<Lsn> = Vec::new();
            let mut top = start;
            let mut released = false;
            let mut received = Lsn(start);
            for step in steps {
                match step {
                    Step::Begin => {
                        p.begin();
                        m.open = true;
                    }
                    Step::Commit(d) => {
                        top += d;
                        p.begin();
                        let t = p.commit(Lsn(top));
                        prop_assert_eq!(t, m.commit(Lsn(top)));
                        tickets.push(t);
                        commits.push(Lsn(top));
                    }
                    Step::CommitBetween(x) => {
                        let l = Lsn(m.flush.0 + 1 + x % (top.saturating_sub(m.flush.0)).max(1));
                        top = top.max(l.0);
                        p.begin();
                        let t = p.commit(l);
                        prop_assert_eq!(t, m.commit(l));
                        tickets.push(t);
                    }
                    Step::SkipSeqs(n) => {
                        p.next_seq += n;
                        m.next_seq += n;
                    }
                    Step::Release => {
                        p.release();
                        released = true;
                    }
                    Step::Replay(back) => {
                        if !commits.is_empty() {
                            let l = commits[commits.len() - 1 - back % commits.len()];
                            p.abort_open();
                            p.begin();
                            let t = p.commit(l);
                            prop_assert_eq!(t, m.commit(l));
                            tickets.push(t);
                        }
                    }
                    Step::Durable(i) => {
                        if !tickets.is_empty() {
                            let t = tickets[i % tickets.len()];
                            p.durable(t);
                            if let Some(e) = m.pending.iter_mut().find(|e| (e.0, e.1) == (t.end_lsn, t.seq)) {
                                e.2 = true;
                            }
                            m.advance();
                        }
                    }
                    Step::DurableRange(i, n) => {
                        if !tickets.is_empty() {
                            let first = tickets[i % tickets.len()].seq();
                            let last = first + n as u64 - 1;
                            p.durable_seqs(first, last);
                            for e in &mut m.pending {
                                if (first..=last).contains(&e.1) {
                                    e.2 = true;
                                }
                            }
                            m.advance();
                        }
                    }
                    Step::Keepalive(ahead) => {
                        let w = Lsn(top + ahead);
                        received = received.max(w);
                        p.keepalive(w);
                        if !m.open && m.pending.is_empty() {
                            m.flush = m.flush.max(w);
                        }
                    }
                }
                prop_assert_eq!(p.flush_lsn(), m.flush);
                prop_assert_eq!(p.pending(), m.pending.len());
                prop_assert_eq!(p.awaiting_downstream(), !released && !m.pending.is_empty());
                received = received.max(Lsn(top));
                prop_assert_eq!(p.received_lsn(), received);
                let held: usize = p.pending.chunks.iter().map(|c| c.entries.len() - c.done).sum();
                prop_assert_eq!(held, m.pending.len());
                for c in &p.pending.chunks {
                    prop_assert!(c.entries.len() <= chunk_len.max(1) && c.done < c.entries.len());
                }
                let keys: Vec<(Lsn, u64, bool)> = p.pending.chunks.iter()
                    .flat_map(|c| (c.done..c.entries.len()).map(move |i| {
                        let (l, q) = c.key(i);
                        (l, q, c.durable(i))
                    }))
                    .collect();
                let want = m.pending.clone();
                prop_assert_eq!(keys, want);
            }
        }
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
