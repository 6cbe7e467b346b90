//! The outbox marks: acknowledged states recorded in their SKU hashes (`pub_lsn`,
//! `pub_piece`, `pub_state`, `pub_seq`), batched into the next Redis round trip.

use super::*;

/// Records acknowledged states: per SKU hash, `pub_lsn`, `pub_piece` and `pub_state`,
/// only moving forward by (LSN, piece), never past the hash's own `lsn` (a state read
/// before a rebuild onto lower LSNs), and never into a hash that no longer exists (it
/// would come back as a ghost). The piece matters: every piece of a transaction applied
/// in several writes the same `lsn`, and the state after its last piece must still count
/// as unpublished once an earlier piece's state was acknowledged.
///
/// An optional last argument, the epoch sequence, goes to `pub_seq` with the mark, and
/// raises `pub_seq` when the same state was acknowledged again (a republish): the state
/// the broker holds is then the later copy, which an older broker file may lack.
pub const MARK_PUBLISHED: &str = r"
-- KEYS: SKU hashes; ARGV: per key an LSN (u64 decimal), a piece (integer) and a
-- pub_state, then optionally the epoch sequence. One call marks a whole flush (a script
-- call per SKU cost Redis more than the marking itself).
local out = {}
local seq = ARGV[3 * #KEYS + 1]
local seqn = tonumber(seq or '')
for i, key in ipairs(KEYS) do
  local l, p, st = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  out[i] = 0
  local cur = redis.call('HMGET', key, 'pub_lsn', 'pub_piece', 'pub_seq', 'lsn')
  local cl, cp = cur[1], tonumber(cur[2] or '0') or 0
  local pn = tonumber(p) or 0
  -- a marked or applied hash exists; EXISTS only for a first mark of a hash without
  -- `lsn` (never recreate a deleted hash)
  if cl or cur[4] or redis.call('EXISTS', key) == 1 then
    -- u64 decimals without leading zeros: compare by length, then lexically
    local ahead = cl and (#cl > #l or (#cl == #l and cl > l))
    local same = cl == l
    -- a state past the hash's own LSN was read before a rebuild onto lower LSNs (a
    -- failover to a standby that was behind): its late acknowledgement is not a mark
    local hl = cur[4]
    local stale = hl and (#l > #hl or (#l == #hl and l > hl))
    if not (ahead or stale or (same and cp >= pn)) then
      if seqn then
        redis.call('HSET', key, 'pub_lsn', l, 'pub_piece', tostring(pn), 'pub_state', st, 'pub_seq', seq)
      else
        redis.call('HSET', key, 'pub_lsn', l, 'pub_piece', tostring(pn), 'pub_state', st)
      end
      out[i] = 1
    elseif same and cp == pn and seqn and (tonumber(cur[3] or '') or -1) < seqn then
      redis.call('HSET', key, 'pub_seq', seq)
    end
  end
end
return out
";

/// Marks taken into a pipeline, waiting for its replies.
pub(super) struct QueuedMarks {
    pub(super) marks: Vec<Msg>,
    /// The states' script calls, one per epoch sequence and group (ascending), are the
    /// first replies; see [`Task::mark_group`].
    pub(super) state_seqs: Vec<(u64, u16)>,
    /// Replies the marks' commands take, at the front of the pipeline's.
    pub(super) replies: usize,
}

impl Task {
    /// Record acknowledged messages in Redis (pub_lsn/pub_state, removed alerts), all
    /// queued marks in one pipelined round trip. Read rounds carry the marks themselves
    /// (see [`work`](Self::work)); this sends them on their own.
    pub(super) async fn flush_marks(&mut self) {
        // twice at most: marks a node answered NOSCRIPT to go again with the script
        for _ in 0..2 {
            if self.marks.is_empty() {
                return;
            }
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let marks = self.queue_marks(&mut pipe);
            let r: Result<Vec<redis::Value>, _> = pipe.query_async(&mut self.redis).await;
            match r {
                Ok(vals) => self.settle_marks(marks, Some(vals)),
                Err(e) => {
                    warn!(error = %e, "recording published SKUs in Redis failed; they will be published again");
                    self.settle_marks(marks, None);
                }
            }
        }
    }

    /// Takes the waiting marks into `pipe` (which must ignore errors): one script call for
    /// the states, one per removed alert, and at most once a second the meta hash's
    /// `last_publish_ms` (`skusync status` shows it; never creating the meta hash, whose
    /// absence means "resync").
    pub(super) fn queue_marks(&mut self, pipe: &mut redis::Pipeline) -> QueuedMarks {
        let marks = std::mem::take(&mut self.marks);
        self.marks_since = None;
        let mut replies = 0;
        let states: Vec<(&String, &u64, &i64, &String, u64)> = marks
            .iter()
            .filter_map(|m| match m {
                Msg::State {
                    sku,
                    lsn,
                    piece,
                    state,
                    seq,
                    ..
                } => Some((sku, lsn, piece, state, *seq)),
                _ => None,
            })
            .collect();
        let groups: Vec<(u64, u16)> = states.iter().map(|s| (s.4, self.mark_group(s.0))).collect();
        let mut state_seqs = groups.clone();
        state_seqs.sort_unstable();
        state_seqs.dedup();
        // One call per epoch sequence (nearly always one; two around an epoch change), and
        // on a cluster per slot.
        for &g in &state_seqs {
            let group: Vec<_> = states
                .iter()
                .zip(&groups)
                .filter(|(_, sg)| **sg == g)
                .map(|(s, _)| s)
                .collect();
            let seq = g.0;
            let cmd = if self.mark_by_sha {
                pipe.cmd("EVALSHA").arg(&self.mark_sha)
            } else {
                pipe.cmd("EVAL").arg(MARK_PUBLISHED)
            };
            let cmd = cmd.arg(group.len());
            for (sku, _, _, _, _) in &group {
                cmd.arg(layout::sku_key(&self.cfg.redis_prefix, sku));
            }
            for (_, lsn, piece, state, _) in &group {
                cmd.arg(lsn.to_string()).arg(piece.to_string()).arg(*state);
            }
            cmd.arg(seq);
            replies += 1;
        }
        let has_states = !states.is_empty();
        for m in &marks {
            if let Msg::Alert { sku, lsn_raw, kind } = m {
                pipe.cmd("EVAL")
                    .arg(REMOVE_ALERT)
                    .arg(1)
                    .arg(layout::sku_key(&self.cfg.redis_prefix, sku))
                    .arg(lsn_raw)
                    .arg(kind);
                replies += 1;
            }
        }
        let stamp = has_states
            && self
                .last_publish_stamp
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if stamp {
            pipe.cmd("EVAL")
                .arg("if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'last_publish_ms', ARGV[1]) end return 0")
                .arg(1)
                .arg(layout::meta_key(&self.cfg.redis_prefix))
                .arg(crate::telemetry::unix_ms());
            self.last_publish_stamp = Some(Instant::now());
            replies += 1;
        }
        QueuedMarks {
            marks,
            state_seqs,
            replies,
        }
    }

    /// The group of a SKU's mark: one script call names keys of one cluster slot, so on a
    /// cluster it is the slot of the SKU's hash; 0 on a standalone Redis (one call).
    pub(super) fn mark_group(&self, sku: &str) -> u16 {
        if self.redis.is_cluster() {
            layout::slot_of(layout::sku_key(&self.cfg.redis_prefix, sku).as_bytes())
        } else {
            0
        }
    }

    /// Handles the replies to [`queue_marks`](Self::queue_marks)' commands (`None`: the
    /// round trip failed): a mark Redis did not record is published again.
    pub(super) fn settle_marks(&mut self, q: QueuedMarks, replies: Option<Vec<redis::Value>>) {
        let failed =
            |v: Option<&redis::Value>| matches!(v, Some(redis::Value::ServerError(_)) | None);
        // Whether each mark failed: the states' calls first (each all or nothing), then
        // one reply per alert removal.
        // A node that lacks the script (NOSCRIPT) recorded nothing: its marks go again in
        // the next round, with the script itself.
        let noscript = |v: Option<&redis::Value>| matches!(v, Some(redis::Value::ServerError(e)) if e.code() == "NOSCRIPT");
        let mut flags: Vec<bool> = vec![true; q.marks.len()];
        let mut again: Vec<bool> = vec![false; q.marks.len()];
        if let Some(vals) = &replies {
            let mut it = vals.iter();
            let states: HashMap<(u64, u16), (bool, bool)> = q
                .state_seqs
                .iter()
                .map(|&g| {
                    let v = it.next();
                    (g, (failed(v), noscript(v)))
                })
                .collect();
            if states.values().any(|s| s.1) {
                self.mark_by_sha = false;
            } else if !states.is_empty() {
                self.mark_by_sha = true;
            }
            for ((m, f), a) in q.marks.iter().zip(flags.iter_mut()).zip(again.iter_mut()) {
                (*f, *a) = match m {
                    Msg::State { seq, sku, .. } => states
                        .get(&(*seq, self.mark_group(sku)))
                        .copied()
                        .unwrap_or((true, false)),
                    Msg::Alert { .. } => (failed(it.next()), false),
                    Msg::Status | Msg::Clear { .. } | Msg::Epoch { .. } => (false, false),
                };
            }
        }
        for ((m, failed), again) in q.marks.into_iter().zip(flags).zip(again) {
            if again {
                self.marks.push(m);
                self.marks_since.get_or_insert_with(Instant::now);
                continue;
            }
            // Still unpublished in Redis: publish again once Redis answers.
            if let Msg::State { sku, .. } | Msg::Alert { sku, .. } = &m
                && failed
            {
                self.sched.request(sku, Want::Change);
            }
        }
    }
}
