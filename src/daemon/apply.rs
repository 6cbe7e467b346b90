//! Redis apply: a batch of folded pieces becomes script calls (each SKU entry fenced),
//! then its row index writes, in a task of its own; its tickets become durable when it
//! returned, which is what lets the slot confirm past it.

use super::*;

/// Most entries per script call (a batch may take several calls).
pub(super) const CALL_ENTRIES: usize = 500;
/// How often a running writer looks at the meta hash for lost writes, another writer or a
/// requested rebuild (apply calls check the first two on every write as well).
pub(super) const META_CHECK: Duration = Duration::from_secs(2);
/// How often the mapped tables' partitions are compared with those Redis was built with.
pub(super) const PARTITION_CHECK: Duration = Duration::from_secs(5);
/// How often a streaming cycle reads the publications again (see
/// `Daemon::publications_moved`).
pub(super) const PUBLICATION_CHECK: Duration = Duration::from_secs(10);
/// How long a relation of a streamed transaction waits for the transaction to become
/// visible to the catalog before the cycle restarts (see `await_xact_ended`).
pub(super) const XACT_VISIBLE_WAIT: Duration = Duration::from_secs(10);
/// Most stock steps per apply call, per allowed entry (`max_batch_skus`).
pub(super) const STEPS_PER_ENTRY: usize = 5;
/// While catching up, how long the source may stay quiet before what is pending is
/// applied anyway.
pub(super) const LINGER: Duration = Duration::from_millis(20);
/// Most transactions per apply call, per allowed entry (their tickets wait in memory).
pub(super) const TXNS_PER_ENTRY: usize = 10;
/// While a batch is applied, the next may merge this many times the step and transaction
/// caps before the stream is paused.
pub(super) const HOLD_FACTOR: usize = 4;

/// Start one apply call for everything pending; transient Redis errors are retried
/// inside (the fence makes retrying the same call safe). MQTT learns a call's SKUs as
/// soon as that call returned: publishing what Redis holds needs no confirmed LSN, and
/// the broker's work then overlaps the batch's later calls instead of following them.
pub(super) fn launch(
    applier: &Applier,
    pending: &mut Pending,
    mqtt: Option<MqttHandle>,
    generation: u64,
) -> tokio::task::JoinHandle<Flight> {
    let entries = pending.batch.take();
    let mut ri = std::mem::take(&mut pending.ri);
    let write = std::mem::take(&mut pending.ri_write);
    ri.retain(|k, _| write.contains(k));
    // A batch that changes lookup state (lookup values, dependents, row records) cannot
    // be replayed exactly once part of it is written: moves read what other SKU hashes
    // and the index hold, and its writes span several calls. It is marked in the meta
    // hash while in flight; a start that finds the mark rebuilds Redis.
    let guard = ri.iter().any(|(f, v)| {
        f.starts_with("k:")
            || f.starts_with("d:")
            || v.as_deref().is_some_and(|v| v.starts_with("R1"))
    });
    let last_commit = entries.iter().map(|e| e.last.0).max().unwrap_or(Lsn(0));
    let end = pending.end.take();
    let tickets = std::mem::take(&mut pending.tickets);
    let commit_ms = std::mem::take(&mut pending.commit_ms);
    // the stream's calls, one flight at a time: chained (see `rsink::CallChain`)
    let mut applier = applier.clone().chained();
    tokio::spawn(async move {
        // Script calls of at most CALL_ENTRIES entries, in order: each SKU's entry is
        // applied whole (its fence makes that exact), the encoded command stays small and
        // Redis is never blocked long for its other clients. The batch's end LSN is
        // recorded only by the last call.
        let chunks: Vec<&[crate::fold::batch::Entry]> = if entries.is_empty() {
            vec![&[]] // a keepalive-only batch still records its end LSN
        } else {
            entries.chunks(CALL_ENTRIES).collect()
        };
        let n = chunks.len();
        // A call's reads go out ahead of the previous call's write, so that skusync plans
        // it while Redis runs that write; not where a SKU has entries in two calls (the
        // read would miss the write before it, and the entry would go to the script).
        let read_ahead = n > 1 && applier.reads_ahead() && distinct_skus(&entries);
        // (a second applier only then: a live batch is one call, cloned per transaction)
        let mut reader = read_ahead.then(|| applier.clone());
        let result = async {
            let mut total = rsink::Applied::default();
            if guard {
                index_retrying(&mut applier, IndexWrite::Mark(true)).await?;
            }
            let mut ahead = None;
            for (i, &chunk) in chunks.iter().enumerate() {
                // With row index updates, the end LSN is recorded by their last write.
                let chunk_end = if i + 1 == n && ri.is_empty() {
                    end
                } else {
                    None
                };
                let plan = ahead.take();
                if plan.is_some() {
                    telemetry::read_ahead_used();
                }
                let applied = match (chunks.get(i + 1), reader.as_mut()) {
                    (Some(&next), Some(reader)) => {
                        // `join` polls the read first, so its HMGETs usually leave before
                        // the write (on another connection: an order hoped for, not relied on)
                        let (next_plan, applied) = futures::future::join(
                            reader.plan_ahead(next),
                            apply_retrying(&mut applier, chunk, chunk_end, plan),
                        )
                        .await;
                        ahead = next_plan;
                        applied
                    }
                    _ => apply_retrying(&mut applier, chunk, chunk_end, plan).await,
                };
                total += applied?;
                if i + 1 < n {
                    crate::failpoint::pause("between-calls").await;
                }
                if let Some(m) = &mqtt {
                    let skus: BTreeSet<&str> = chunk.iter().map(|e| e.sku.as_str()).collect();
                    m.changed(skus.into_iter().map(str::to_string));
                }
            }
            // After every SKU entry of the batch: a replay of the batch reads the row
            // index as it was before it, and so folds the same entries (fenced).
            if !ri.is_empty() {
                crate::failpoint::hit("before-row-index");
                index_retrying(&mut applier, IndexWrite::Rows(&ri, end)).await?;
                if guard {
                    index_retrying(&mut applier, IndexWrite::Mark(false)).await?;
                }
            }
            if !entries.is_empty() {
                // applied, not yet confirmed: the restart replays this batch
                crate::failpoint::hit("after-apply");
            }
            Ok(total)
        }
        .await;
        Flight {
            generation,
            tickets,
            end,
            last_commit,
            commit_ms,
            result,
        }
    })
}

/// Whether no SKU has two entries in `entries` (a TRUNCATE's can).
fn distinct_skus(entries: &[crate::fold::batch::Entry]) -> bool {
    let mut seen: std::collections::HashSet<&str, foldhash::fast::RandomState> =
        std::collections::HashSet::with_capacity_and_hasher(entries.len(), Default::default());
    entries.iter().all(|e| seen.insert(e.sku.as_str()))
}

/// One apply call; transient Redis errors are retried with backoff (the fence makes
/// sending the same call again safe). `plan`, the call's thin reads made ahead
/// ([`Applier::plan_ahead`]), serves the first try only: a retry reads again.
pub(super) async fn apply_retrying(
    applier: &mut Applier,
    entries: &[crate::fold::batch::Entry],
    end: Option<Lsn>,
    mut plan: Option<rsink::ThinPlan<'_>>,
) -> Result<rsink::Applied, RedisSinkError> {
    let mut backoff = Backoff::default();
    loop {
        match applier.apply_planned(entries, end, plan.take()).await {
            Err(e) if e.is_transient() => backoff.wait("apply", &e).await,
            r => return r,
        }
    }
}

/// The wait after a transient Redis error before sending a write again (every write
/// skusync retries is fenced, so sending it again is safe): 100 ms, doubling up to 5 s.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    async fn wait(&mut self, what: &str, e: &RedisSinkError) {
        telemetry::redis_failed();
        tracing::warn!(error = %e, retry_in_ms = self.0.as_millis() as u64, "Redis {what} failed; retrying");
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}

/// A batch's writes besides its SKU entries.
enum IndexWrite<'a> {
    /// Set or clear the meta hash's mark of a batch changing lookup state.
    Mark(bool),
    /// The row index and lookup state, with the batch's end LSN.
    Rows(&'a RowIndexUpdates, Option<Lsn>),
}

type RowIndexUpdates =
    std::collections::HashMap<String, Option<String>, foldhash::fast::RandomState>;

/// One of them until it succeeds or fails definitely (see [`Backoff`]).
async fn index_retrying(applier: &mut Applier, w: IndexWrite<'_>) -> Result<(), RedisSinkError> {
    let mut backoff = Backoff::default();
    loop {
        let (r, what) = match &w {
            IndexWrite::Mark(on) => (applier.mark_index_pending(*on).await, "lookup index mark"),
            IndexWrite::Rows(ri, end) => (
                applier.write_row_index(ri.iter(), *end).await,
                "row index write",
            ),
        };
        match r {
            Err(e) if e.is_transient() => backoff.wait(what, &e).await,
            r => return r,
        }
    }
}

/// The batch being filled, with the tickets its transactions complete.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) batch: Batch,
    /// Row index updates of the batch's pieces, final per row.
    pub(super) ri: RowIndexUpdates,
    /// Fields of `ri` some piece changed beyond quantities (`Piece::ri_local`): only
    /// these are written.
    pub(super) ri_write: std::collections::HashSet<String, foldhash::fast::RandomState>,
    pub(super) tickets: Tickets,
    pub(super) end: Option<Lsn>,
    /// Commit times (unix ms) of the transactions, for the latency histogram.
    pub(super) commit_ms: CommitTimes,
}

/// A batch's tickets as runs of consecutive sequence numbers: a batch over 10k SKUs may
/// complete 100k transactions or more, and a ticket each was 16 bytes per transaction
/// held (`Progress` still keeps a record per transaction until it is durable).
#[derive(Default, Debug)]
pub(super) struct Tickets {
    runs: Vec<(u64, u64)>,
    len: usize,
}

impl Tickets {
    pub(super) fn push(&mut self, t: Ticket) {
        let s = t.seq();
        match self.runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(s) => *last = s,
            _ => self.runs.push((s, s)),
        }
        self.len += 1;
    }

    /// Transactions held.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Report every transaction held durable.
    pub(super) fn durable(self, progress: &ProgressHandle) {
        for (first, last) in self.runs {
            progress.durable_seqs(first, last);
        }
    }
}

/// Commit times (unix ms) of a batch's transactions, as runs of equal times (a backlog
/// has dozens of commits per millisecond).
#[derive(Default, Debug)]
pub(super) struct CommitTimes(Vec<(i64, u32)>);

impl CommitTimes {
    pub(super) fn push(&mut self, ms: i64) {
        match self.0.last_mut() {
            Some((t, n)) if *t == ms && *n < u32::MAX => *n += 1,
            _ => self.0.push((ms, 1)),
        }
    }

    /// (commit time, transactions) pairs.
    pub(super) fn runs(&self) -> &[(i64, u32)] {
        &self.0
    }
}

impl Pending {
    /// Add a folded piece: its SKU entries to the batch, its row index updates here.
    pub(super) fn push(&mut self, mut p: crate::fold::Piece) {
        // Not `append`: it rebuilds the whole map (O(n + m)), quadratic over a batch of
        // small transactions.
        let local = std::mem::take(&mut p.ri_local);
        for (k, v) in std::mem::take(&mut p.ri) {
            if !local.contains(&k) {
                self.ri_write.insert(k.clone());
                self.ri.insert(k, v);
            } else if let Some(w) = self.ri.get_mut(&k) {
                // written anyway for an earlier piece: with the latest quantities
                *w = v;
            }
            // else: only quantities moved; nothing to write (the hot path)
        }
        self.batch.push(p);
    }

    /// Nothing to apply. Row index updates count: a large transaction whose pieces only
    /// change lookup state (variants imported before their stock, stock rows whose
    /// variant does not exist yet) has no SKU entry and no ticket until its commit.
    pub(super) fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.tickets.is_empty() && self.ri.is_empty()
    }

    /// At the launch caps (`k` = 1) or a multiple of the step, transaction and row index
    /// caps (the entry cap bounds memory per SKU and never stretches). Row index updates
    /// are capped like entries: without it, they (and the fold's holders, forgotten
    /// only once a batch is sealed) grew with such a transaction until its commit.
    pub(super) fn over(
        &self,
        max_entries: usize,
        max_steps: usize,
        max_txns: usize,
        k: usize,
    ) -> bool {
        self.batch.len() >= max_entries
            || self.batch.steps() >= max_steps.saturating_mul(k)
            || self.tickets.len() >= max_txns.saturating_mul(k)
            || self.ri.len() >= max_entries.saturating_mul(k)
    }
}

/// A finished apply call.
pub(super) struct Flight {
    /// The fold's holder generation this batch sealed (see `Fold::seal`).
    pub(super) generation: u64,
    pub(super) tickets: Tickets,
    pub(super) end: Option<Lsn>,
    pub(super) last_commit: Lsn,
    pub(super) commit_ms: CommitTimes,
    pub(super) result: Result<rsink::Applied, RedisSinkError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_index_updates_alone_are_work_and_are_capped() {
        let mut p = Pending::default();
        assert!(p.is_empty());
        for i in 0..10 {
            p.ri.insert(format!("r:3:inv:{i}"), Some("R1...".into()));
        }
        assert!(!p.is_empty(), "a lookup-only piece is launched, not held");
        assert!(!p.over(11, 100, 100, 1));
        assert!(p.over(10, 100, 100, 1), "capped like entries");
        assert!(!p.over(3, 100, 100, 4), "the hold factor stretches it");
        assert!(p.over(3, 100, 100, 3));
    }
}
