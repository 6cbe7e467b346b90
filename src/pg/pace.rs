//! How much to read from the replication socket per paced read while catching up. Pure:
//! it sees only how much each read asked for and got.
//!
//! The walsender makes one `send` per pgoutput message. When the client takes every byte
//! as soon as it arrives, each send leaves as a segment of its own, and transmitting them
//! is most of the walsender's CPU (about 1M segments for the 400k-transaction benchmark
//! backlog). When the client leaves some of the stream queued in its socket, the
//! receive window stays nearly closed, the walsender's sends pile up in its own socket
//! buffer, and each window opening carries them as a few large segments (about 3k
//! segments for the same backlog, 2.5x less walsender CPU).
//!
//! So the reader should be slightly slower than the sender, never far slower. The pacer
//! keeps it there: a read that found less than it asked for drained the socket (we are
//! faster than the sender), so the next one asks for a quarter less; a run of
//! [`GROW_AFTER`] reads that got all they asked for means the socket keeps more queued
//! than we take (we are slower), so the ask grows by a quarter.
//!
//! Growth sets the stream's pace: a paced read comes about once a millisecond, so the
//! ask is the bytes per millisecond the walsender may send. A run of 32 full reads per
//! step (this module's first setting) doubled the ask in about 100 reads: each
//! catch-up's first few hundred milliseconds, and every recovery from a read that a busy
//! core delayed, ran below the walsender's pace with the two cores partly idle. Runs of
//! 4 double it in about 12; on the benchmark backlog that drained 1.70-1.79x
//! `pg_recvlogical` against 1.27-1.42x, with as few segments (1.6-3.4k against
//! 1.6-2.0k) and the same walsender CPU (bench/history.md, twelfth session). Shorter
//! runs drain the socket more often: at 2, 4.4-6.1k segments.

/// First ask after catching up starts.
pub const START: usize = 32 * 1024;
/// Smallest ask.
pub const MIN: usize = 16 * 1024;
/// Largest ask.
pub const MAX: usize = 1024 * 1024;
/// Consecutive full reads before the ask grows.
pub const GROW_AFTER: u32 = 4;

/// The per-read ask, adapted to the sender's pace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPacer {
    ask: usize,
    full_reads: u32,
}

impl Default for ReadPacer {
    fn default() -> Self {
        ReadPacer {
            ask: START,
            full_reads: 0,
        }
    }
}

impl ReadPacer {
    /// Bytes to ask for in the next read.
    pub fn ask(&self) -> usize {
        self.ask
    }

    /// Record a read that asked for `asked` bytes and got `got`.
    pub fn observe(&mut self, asked: usize, got: usize) {
        if got >= asked {
            self.full_reads += 1;
            if self.full_reads >= GROW_AFTER {
                self.ask = (self.ask + self.ask / 4).min(MAX);
                self.full_reads = 0;
            }
        } else {
            self.ask = (self.ask - self.ask / 4).max(MIN);
            self.full_reads = 0;
        }
    }
}

/// Commits within one window at which a live stream counts as busy (2,000 per second).
pub const BUSY_COMMITS: u32 = 100;
/// The busy detector's window.
pub const BUSY_WINDOW_MS: u64 = 50;

/// Whether a live stream is busy enough to be read at intervals too: at thousands of
/// commits per second, a wake-up per message costs both sides more than the
/// millisecond an interval read adds. Fed with monotonic milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Busy {
    window_start: u64,
    count: u32,
    prev: u32,
}

impl Busy {
    /// A commit arrived at `now_ms`.
    pub fn commit(&mut self, now_ms: u64) {
        if now_ms >= self.window_start + BUSY_WINDOW_MS {
            // the window just ended counts; an older one does not
            self.prev = if now_ms < self.window_start + 2 * BUSY_WINDOW_MS {
                self.count
            } else {
                0
            };
            self.count = 0;
            self.window_start = now_ms;
        }
        self.count += 1;
    }

    /// The current or the previous window reached [`BUSY_COMMITS`].
    pub fn is_busy(&self) -> bool {
        self.count >= BUSY_COMMITS || self.prev >= BUSY_COMMITS
    }

    /// An interval read found nothing: not busy until a window fills again.
    pub fn quiet(&mut self) {
        self.count = 0;
        self.prev = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_drained_socket_shrinks_the_ask_down_to_the_floor() {
        let mut p = ReadPacer::default();
        p.observe(p.ask(), 100);
        assert_eq!(p.ask(), START - START / 4);
        for _ in 0..10 {
            p.observe(p.ask(), 0);
        }
        assert_eq!(p.ask(), MIN);
    }

    #[test]
    fn only_a_long_run_of_full_reads_grows_the_ask() {
        let mut p = ReadPacer::default();
        for _ in 0..GROW_AFTER - 1 {
            p.observe(p.ask(), p.ask());
        }
        assert_eq!(p.ask(), START, "no growth before the run is complete");
        p.observe(p.ask(), p.ask());
        assert_eq!(p.ask(), START + START / 4);
        // A partial read breaks the run: growing again takes a whole new run.
        for _ in 0..GROW_AFTER - 1 {
            p.observe(p.ask(), p.ask());
        }
        p.observe(p.ask(), 1);
        let after = p.ask();
        for _ in 0..GROW_AFTER - 1 {
            p.observe(p.ask(), p.ask());
        }
        assert_eq!(p.ask(), after);
    }

    #[test]
    fn a_socket_that_always_has_more_grows_the_ask_to_the_cap() {
        let mut p = ReadPacer::default();
        for _ in 0..100_000 {
            p.observe(p.ask(), p.ask());
        }
        assert_eq!(p.ask(), MAX);
    }

    /// Socket buffer of the sender model: the replication socket's receive buffer
    /// (`PACED_RCVBUF` in `pg::conn`, 256 KiB), which the kernel doubles.
    const SOCKET: usize = 512 * 1024;

    /// One round of the sender model: the sender adds up to `rate` bytes to the socket's
    /// `queued` (never past `SOCKET`), then one paced read takes what it asks for.
    /// Returns the bytes read.
    fn sender_round(p: &mut ReadPacer, queued: &mut usize, rate: usize) -> usize {
        *queued += rate.min(SOCKET - *queued);
        let got = (*queued).min(p.ask());
        p.observe(p.ask(), got);
        *queued -= got;
        got
    }

    /// A sender with a backlog that can put `rate` bytes per round into a socket holding
    /// at most `SOCKET`: the reader settles near the sender's pace (taking most of what
    /// it could send), and reads that drain the socket stay a minority (each one lets the
    /// window open wide; at a fifth of the reads the benchmark's segments did not rise).
    #[test]
    fn the_ask_follows_a_steady_sender() {
        for rate in [20_000usize, 50_000, 200_000] {
            let mut p = ReadPacer::default();
            let (mut queued, mut taken, mut drained) = (0usize, 0usize, 0usize);
            let rounds = 20_000;
            for _ in 0..rounds {
                let asked = p.ask();
                let got = sender_round(&mut p, &mut queued, rate);
                drained += usize::from(got < asked);
                taken += got;
            }
            let per_round = taken / rounds;
            assert!(
                per_round * 100 >= rate * 95,
                "rate {rate}: took {per_round} per round"
            );
            assert!(
                drained * 5 < rounds,
                "rate {rate}: {drained} reads drained the socket"
            );
        }
    }

    /// A catch-up starts with an empty socket and a sender far faster than the first ask:
    /// the ask must reach the sender's pace within a few dozen reads (milliseconds), not
    /// hundreds, or the stream runs below it while the cores idle.
    #[test]
    fn the_ask_catches_up_with_a_fast_sender_within_dozens_of_reads() {
        let rate = 4 * START;
        let mut p = ReadPacer::default();
        let mut queued = 0usize;
        let mut reads = 0;
        while p.ask() < rate {
            sender_round(&mut p, &mut queued, rate);
            reads += 1;
            assert!(reads <= 40, "ask {} after {reads} reads", p.ask());
        }
    }

    #[test]
    fn busy_means_a_window_of_many_commits_and_ends_when_they_stop() {
        let mut b = Busy::default();
        // 1,000 commits per second: never busy
        for i in 0..2_000u64 {
            b.commit(i);
        }
        assert!(!b.is_busy());
        // 5,000 per second: busy within one window
        let mut b = Busy::default();
        for i in 0..(BUSY_COMMITS as u64) {
            b.commit(1_000 + i / 5);
        }
        assert!(b.is_busy());
        // still busy in the next window's first commits, not after a pause
        b.commit(1_000 + BUSY_WINDOW_MS);
        assert!(b.is_busy());
        b.commit(10_000);
        assert!(!b.is_busy());
        for i in 0..(BUSY_COMMITS as u64) {
            b.commit(20_000 + i / 5);
        }
        b.quiet();
        assert!(!b.is_busy());
    }

    proptest! {
        #[test]
        fn the_ask_stays_within_its_bounds(reads in proptest::collection::vec((any::<bool>(), 0usize..2_000_000), 0..500)) {
            let mut p = ReadPacer::default();
            for (full, got) in reads {
                let asked = p.ask();
                p.observe(asked, if full { asked } else { got.min(asked.saturating_sub(1)) });
                prop_assert!((MIN..=MAX).contains(&p.ask()));
            }
        }
    }
}
