//! The outbox marks: acknowledged states recorded in their SKU hashes (`pub_lsn`,
//! `pub_piece`, `pub_state`, `pub_seq`), batched into the next Redis round trip.

use super::*;

/// Records acknowledged states: per SKU hash, `pub_lsn`, `pub_piece` and `pub_state`,
/// only moving forward by (LSN, piece) and never into a hash that no longer exists (it
/// would come back as a ghost). The piece matters: every piece of a transaction applied
/// in several writes the same `lsn`, and the state after its last piece must still count
/// as unpublished once an earlier piece's state was acknowledged.
///
/// An optional last argument, the epoch sequence, goes to `pub_seq` with the mark, and
/// raises `pub_seq` when the same state was acknowledged again (a republish): the state
/// the broker holds is then the later copy, which an older broker file may lack.
pub const MARK_PUBLISHED: &str = r"
-- KEYS[1]: the first SKU hash (it routes the call); ARGV: n, the n SKU hashes, then per
-- hash an LSN (u64 decimal), a piece (integer) and a pub_state, then optionally the
-- epoch sequence. One call marks a whole flush (a script call per SKU cost Redis more
-- than the marking itself); on a Redis Cluster, every hash of the slots one node serves.
local n = tonumber(ARGV[1])
local seq = ARGV[4 * n + 2]
local seqn = tonumber(seq or '')
-- Every hash is read before any is written: a cluster node that no longer serves one
-- of them refuses the call before it marks anything. Per key: {pub_lsn, pub_piece,
-- pub_seq}, or false where the hash does not exist (never recreate a deleted hash).
local cur = {}
for i = 1, n do
  local key = ARGV[1 + i]
  if cur[key] == nil then
    local c = redis.call('HMGET', key, 'pub_lsn', 'pub_piece', 'pub_seq', 'lsn')
    -- a marked or applied hash exists; EXISTS only for a first mark of a hash without
    -- `lsn`
    if c[1] or c[4] or redis.call('EXISTS', key) == 1 then
      cur[key] = {c[1], tonumber(c[2] or '0') or 0, tonumber(c[3] or '') or -1}
    else
      cur[key] = false
    end
  end
end
local out = {}
for i = 1, n do
  local key = ARGV[1 + i]
  local b = n + 3 * i - 1
  local l, p, st = ARGV[b], ARGV[b + 1], ARGV[b + 2]
  out[i] = 0
  local c = cur[key]
  if c then
    local cl, cp = c[1], c[2]
    local pn = tonumber(p) or 0
    -- u64 decimals without leading zeros: compare by length, then lexically
    local ahead = cl and (#cl > #l or (#cl == #l and cl > l))
    local same = cl == l
    if not (ahead or (same and cp >= pn)) then
      if seqn then
        redis.call('HSET', key, 'pub_lsn', l, 'pub_piece', tostring(pn), 'pub_state', st, 'pub_seq', seq)
        c[3] = seqn
      else
        redis.call('HSET', key, 'pub_lsn', l, 'pub_piece', tostring(pn), 'pub_state', st)
      end
      c[1], c[2] = l, pn
      out[i] = 1
    elseif same and cp == pn and seqn and c[3] < seqn then
      redis.call('HSET', key, 'pub_seq', seq)
      c[3] = seqn
    end
  end
end
return out
";

/// The call of [`MARK_PUBLISHED`] for `marks`: per SKU hash key, the acknowledged LSN,
/// piece and `pub_state`; `seq`, the epoch sequence, goes to `pub_seq`. `marks` must not
/// be empty.
pub fn mark_published_cmd<'a>(
    marks: impl IntoIterator<Item = (&'a str, u64, i64, &'a str)> + Clone,
    seq: Option<u64>,
) -> redis::Cmd {
    let n = marks.clone().into_iter().count();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(MARK_PUBLISHED).arg(1);
    let mut keys = marks.clone().into_iter().map(|m| m.0);
    cmd.arg(keys.next().unwrap_or_default()).arg(n);
    for (key, ..) in marks.clone() {
        cmd.arg(key);
    }
    for (_, lsn, piece, state) in marks {
        cmd.arg(lsn).arg(piece).arg(state);
    }
    if let Some(seq) = seq {
        cmd.arg(seq);
    }
    cmd
}

/// Marks taken into a pipeline, waiting for its replies.
pub(super) struct QueuedMarks {
    pub(super) marks: Vec<Msg>,
    /// The states' script calls, one per epoch sequence and group (ascending), are the
    /// first replies; see [`Task::mark_groups`].
    pub(super) state_seqs: Vec<(u64, u16)>,
    /// Each state mark's (epoch sequence, group), in the order of `marks`.
    state_groups: Vec<(u64, u16)>,
    /// The groups are cluster nodes (not slots).
    by_node: bool,
    /// Replies the marks' commands take, at the front of the pipeline's.
    pub(super) replies: usize,
}

/// How long the marks go one call per slot after a call for a node's slots failed (a
/// reshard or a failover is usually over by then).
const NODE_MARKS_PAUSE: Duration = Duration::from_secs(10);

impl Task {
    /// Record acknowledged messages in Redis (pub_lsn/pub_state, removed alerts), all
    /// queued marks in one pipelined round trip. Read rounds carry the marks themselves
    /// (see [`work`](Self::work)); this sends them on their own.
    pub(super) async fn flush_marks(&mut self) {
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
        let keys: Vec<String> = states
            .iter()
            .map(|s| layout::sku_key(&self.cfg.redis_prefix, s.0))
            .collect();
        let (groups, by_node) = self.mark_groups(&keys);
        let groups: Vec<(u64, u16)> = states.iter().zip(groups).map(|(s, g)| (s.4, g)).collect();
        let mut state_seqs = groups.clone();
        state_seqs.sort_unstable();
        state_seqs.dedup();
        // One call per epoch sequence (nearly always one; two around an epoch change), and
        // on a cluster per node (or slot).
        for &g in &state_seqs {
            let group = states
                .iter()
                .zip(&keys)
                .zip(&groups)
                .filter(|(_, sg)| **sg == g)
                .map(|((s, key), _)| (key.as_str(), *s.1, *s.2, s.3.as_str()));
            pipe.add_command(mark_published_cmd(group, Some(g.0)));
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
            state_groups: groups,
            by_node,
            replies,
        }
    }

    /// The group of each SKU hash's mark (`keys`), and whether the groups are nodes: one
    /// script call marks a group. On a standalone Redis one group (0); on a Redis Cluster
    /// the node serving the key's slot, by the slot map the publisher's reads were last
    /// routed by (each call then marks every hash of that node, as a script may touch keys
    /// of several slots of its node), or, without a map and for a while after such a call
    /// failed, the key's slot.
    fn mark_groups(&self, keys: &[String]) -> (Vec<u16>, bool) {
        if !self.redis.is_cluster() {
            return (vec![0; keys.len()], false);
        }
        let slots = keys.iter().map(|k| layout::slot_of(k.as_bytes()));
        let paused = self
            .node_marks_pause
            .is_some_and(|t| t.elapsed() < NODE_MARKS_PAUSE);
        let Some(map) = self.redis.cached_slot_nodes().filter(|_| !paused) else {
            return (slots.collect(), false);
        };
        let mut nodes: Vec<&(String, u16)> = Vec::new();
        let mut groups = Vec::with_capacity(keys.len());
        for slot in slots {
            let Some(node) = map.get(slot as usize).and_then(|n| n.as_ref()) else {
                // a slot the map does not place: the calls go per slot
                return (
                    keys.iter().map(|k| layout::slot_of(k.as_bytes())).collect(),
                    false,
                );
            };
            let g = match nodes.iter().position(|n| *n == node) {
                Some(g) => g,
                None => {
                    nodes.push(node);
                    nodes.len() - 1
                }
            };
            groups.push(g as u16);
        }
        (groups, true)
    }

    /// Handles the replies to [`queue_marks`](Self::queue_marks)' commands (`None`: the
    /// round trip failed): a mark Redis did not record is published again.
    pub(super) fn settle_marks(&mut self, q: QueuedMarks, replies: Option<Vec<redis::Value>>) {
        let failed =
            |v: Option<&redis::Value>| matches!(v, Some(redis::Value::ServerError(_)) | None);
        // Whether each mark failed: the states' calls first (each all or nothing), then
        // one reply per alert removal.
        let mut flags: Vec<bool> = vec![true; q.marks.len()];
        if let Some(vals) = &replies {
            let mut it = vals.iter();
            let states_failed: HashMap<(u64, u16), bool> = q
                .state_seqs
                .iter()
                .map(|&g| (g, failed(it.next())))
                .collect();
            if q.by_node && states_failed.values().any(|f| *f) {
                // a node that no longer serves a slot (a reshard, a failover), or Redis
                // refusing such calls: per slot for a while, by a fresh map
                self.node_marks_pause = Some(Instant::now());
                self.redis.forget_slot_map();
            }
            let mut groups = q.state_groups.iter();
            for (m, f) in q.marks.iter().zip(flags.iter_mut()) {
                *f = match m {
                    Msg::State { .. } => groups
                        .next()
                        .and_then(|g| states_failed.get(g))
                        .copied()
                        .unwrap_or(true),
                    Msg::Alert { .. } => failed(it.next()),
                    Msg::Status | Msg::Clear { .. } | Msg::Epoch { .. } => false,
                };
            }
        }
        for (m, failed) in q.marks.into_iter().zip(flags) {
            // Still unpublished in Redis: publish again once Redis answers.
            if let Msg::State { sku, .. } | Msg::Alert { sku, .. } = &m
                && failed
            {
                self.sched.request(sku, Want::Change);
            }
        }
    }
}
