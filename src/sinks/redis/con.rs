//! One connection type for a standalone Redis and a Redis Cluster, so every reader and
//! writer (pipeline, publisher, API, ops) takes the same handle.
//!
//! On a cluster, redis-rs routes a command (and a script call) by its key's slot and
//! follows MOVED, ASK, TRYAGAIN and CLUSTERDOWN itself; what it does not do is split a
//! pipeline whose commands name several slots. [`RedisCon`] does: a pipeline becomes one
//! sub-pipeline per primary (from a cached slot map), sent concurrently, each in its
//! commands' order, and the replies come back in the pipeline's order. A script call must
//! still name keys of one slot only: callers group their keys with [`slot_of`] (see
//! `sinks::layout`).

use crate::sinks::layout::slot_of;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A connection to a standalone Redis (reconnecting in the background) or to a Redis
/// Cluster (following the slot map). Cheap to clone; clones share the connection.
#[derive(Clone)]
pub enum RedisCon {
    Single(ConnectionManager),
    Cluster(std::sync::Arc<Cluster>),
}

/// A cluster connection that is replaced when it stops answering: redis-rs' cluster
/// connection can stay stuck after a node died (every call then times out), so a timeout
/// makes a fresh one, in the background, which every clone uses from then on.
pub struct Cluster {
    con: std::sync::RwLock<ClusterConnection>,
    client: redis::cluster::ClusterClient,
    /// The first seed node's host, for nodes that do not know their own.
    seed_host: std::sync::Arc<str>,
    renewing: std::sync::atomic::AtomicBool,
    /// Slot -> primary, from `CLUSTER SLOTS`; dropped on any redirection or node error.
    slot_map: std::sync::RwLock<Option<SlotMap>>,
}

/// Each slot's primary, as an index into the primaries' addresses (one allocation per
/// node, not per command that asks).
pub(crate) struct SlotTable {
    /// The primaries' addresses.
    pub(crate) nodes: Vec<(String, u16)>,
    /// Per slot, its primary's index in `nodes` (`u16::MAX`: unassigned).
    of_slot: Vec<u16>,
}

impl SlotTable {
    /// The index in `nodes` of the primary serving `slot`.
    pub(crate) fn node(&self, slot: u16) -> Option<usize> {
        match self.of_slot.get(slot as usize) {
            Some(&n) if n != u16::MAX => Some(n as usize),
            _ => None,
        }
    }
}

type SlotMap = std::sync::Arc<SlotTable>;

impl Cluster {
    /// Connect to the cluster through `client`.
    pub async fn connect(
        client: redis::cluster::ClusterClient,
        seed_host: std::sync::Arc<str>,
    ) -> redis::RedisResult<RedisCon> {
        let con = client.get_async_connection().await?;
        Ok(RedisCon::Cluster(std::sync::Arc::new(Cluster {
            con: std::sync::RwLock::new(con),
            client,
            seed_host,
            renewing: Default::default(),
            slot_map: Default::default(),
        })))
    }

    /// The slot map, read from the cluster when there is none.
    async fn slot_map(&self) -> redis::RedisResult<SlotMap> {
        if let Some(m) = &*self.slot_map.read().unwrap_or_else(|p| p.into_inner()) {
            return Ok(m.clone());
        }
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut self.current())
            .await?;
        let mut map = SlotTable {
            nodes: Vec::new(),
            of_slot: vec![u16::MAX; crate::sinks::layout::SLOTS],
        };
        for (start, end, node) in slot_ranges(&slots, &self.seed_host) {
            let n = match map.nodes.iter().position(|x| *x == node) {
                Some(n) => n,
                None => {
                    map.nodes.push(node);
                    map.nodes.len() - 1
                }
            };
            for slot in start..=end.min(crate::sinks::layout::SLOTS as u16 - 1) {
                map.of_slot[slot as usize] = n as u16;
            }
        }
        let map = std::sync::Arc::new(map);
        *self.slot_map.write().unwrap_or_else(|p| p.into_inner()) = Some(map.clone());
        Ok(map)
    }

    fn forget_slot_map(&self) {
        *self.slot_map.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn current(&self) -> ClusterConnection {
        self.con.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// After a timed-out call, replace the connection (once at a time).
    fn renew_after(self: &std::sync::Arc<Self>, e: &redis::RedisError) {
        use std::sync::atomic::Ordering;
        if !e.is_timeout() || self.renewing.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let fresh = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                me.client.get_async_connection(),
            )
            .await;
            if let Ok(Ok(c)) = fresh {
                *me.con.write().unwrap_or_else(|p| p.into_inner()) = c;
                tracing::warn!(
                    "a Redis Cluster call timed out: the cluster connection was replaced"
                );
            }
            me.renewing.store(false, Ordering::SeqCst);
        });
    }
}

/// Where a paged SCAN ([`RedisCon::scan_page`]) goes on.
#[derive(Debug, Clone, Default)]
pub struct ScanAt {
    /// A cluster's primaries, fixed at the first page.
    nodes: Option<Vec<(String, u16)>>,
    node: usize,
    cursor: u64,
}

impl RedisCon {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisCon::Cluster(..))
    }

    /// The primaries' addresses (one per shard, from `CLUSTER SLOTS`); empty for a
    /// standalone connection.
    pub async fn primaries(&mut self) -> redis::RedisResult<Vec<(String, u16)>> {
        let RedisCon::Cluster(cl) = self else {
            return Ok(Vec::new());
        };
        let seed_host = cl.seed_host.clone();
        let slots: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(self).await?;
        let mut out: Vec<(String, u16)> = Vec::new();
        for (_, _, node) in slot_ranges(&slots, &seed_host) {
            if !out.contains(&node) {
                out.push(node);
            }
        }
        Ok(out)
    }

    /// Every key matching a SCAN `pattern` (of `kind` when given, e.g. `hash`), on the
    /// server or on every primary of the cluster. A key that a live reshard moves while
    /// the scan runs can be missed or seen twice: callers that must see every key scan
    /// again until a pass finds nothing to do.
    pub async fn scan(
        &mut self,
        pattern: &str,
        kind: Option<&str>,
    ) -> redis::RedisResult<Vec<String>> {
        let nodes: Vec<Option<(String, u16)>> = match self {
            RedisCon::Single(_) => vec![None],
            RedisCon::Cluster(..) => self.primaries().await?.into_iter().map(Some).collect(),
        };
        let mut out = Vec::new();
        for node in nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000);
                if let Some(k) = kind {
                    cmd.arg("TYPE").arg(k);
                }
                let (next, keys): (u64, Vec<String>) = self.on_node(node.as_ref(), cmd).await?;
                out.extend(keys);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// One page of a SCAN over the server or every primary of a cluster (in address
    /// order): start with `ScanAt::default()`; the reply holds where to go on (`None`
    /// when done) and the page's keys. A cluster's primaries are read at the first page
    /// and kept: read again per page, a failover or a node added mid-scan would shift the
    /// node a cursor belongs to. A node gone since fails the page (the caller retries).
    pub async fn scan_page(
        &mut self,
        mut at: ScanAt,
        pattern: &str,
        count: usize,
        kind: Option<&str>,
    ) -> redis::RedisResult<(Option<ScanAt>, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(at.cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        if let Some(k) = kind {
            cmd.arg("TYPE").arg(k);
        }
        if !self.is_cluster() {
            let (next, keys): (u64, Vec<String>) = cmd.query_async(self).await?;
            at.cursor = next;
            return Ok(((next != 0).then_some(at), keys));
        }
        if at.nodes.is_none() {
            let mut nodes = self.primaries().await?;
            nodes.sort();
            at.nodes = Some(nodes);
        }
        let nodes = at.nodes.as_deref().unwrap_or_default();
        let Some(addr) = nodes.get(at.node).cloned() else {
            return Ok((None, Vec::new()));
        };
        let (next, keys): (u64, Vec<String>) = self.on_node(Some(&addr), cmd).await?;
        let last = at.node + 1 >= nodes.len();
        let on = match next {
            0 if last => None,
            0 => Some(ScanAt {
                node: at.node + 1,
                cursor: 0,
                ..at
            }),
            n => Some(ScanAt { cursor: n, ..at }),
        };
        Ok((on, keys))
    }

    /// Send `cmd` to one node (`None`: the standalone server).
    pub async fn on_node<T: redis::FromRedisValue>(
        &mut self,
        node: Option<&(String, u16)>,
        cmd: Cmd,
    ) -> redis::RedisResult<T> {
        match (self, node) {
            (RedisCon::Cluster(cl), Some((host, port))) => {
                let r = cl
                    .current()
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await;
                if let Err(e) = &r {
                    cl.renew_after(e);
                }
                redis::from_redis_value(r?).map_err(Into::into)
            }
            (con, _) => cmd.query_async(con).await,
        }
    }
}

/// For the publisher's reader (`reader.rs`), which sends a cluster pipeline's commands to
/// their primaries itself.
impl RedisCon {
    /// The cached slot map and, per command of `pipeline`, the index of the primary
    /// serving its key's slot in it (`None`: a keyless command, or a slot the map does
    /// not place); `None` for a standalone connection, or when the map cannot be read.
    pub(crate) async fn primaries_of(
        &self,
        pipeline: &Pipeline,
    ) -> Option<(SlotMap, Vec<Option<usize>>)> {
        let RedisCon::Cluster(cl) = self else {
            return None;
        };
        let map = cl.slot_map().await.ok()?;
        let placed = pipeline
            .cmd_iter()
            .map(|cmd| map.node(slot_of(key_of(cmd)?)))
            .collect();
        Some((map, placed))
    }

    /// Every slot grouped by the primary serving it, from the cached slot map: `None` for
    /// a standalone connection, or when the map cannot be read or leaves a slot
    /// unassigned (callers then go slot by slot, through redis-rs' routing).
    pub(crate) async fn slots_by_primary(&self) -> Option<Vec<((String, u16), Vec<u16>)>> {
        let RedisCon::Cluster(cl) = self else {
            return None;
        };
        let map = cl.slot_map().await.ok()?;
        let mut out: Vec<((String, u16), Vec<u16>)> =
            map.nodes.iter().map(|n| (n.clone(), Vec::new())).collect();
        for slot in 0..crate::sinks::layout::SLOTS as u16 {
            out[map.node(slot)?].1.push(slot);
        }
        Some(out)
    }

    /// Drop the cached slot map (a node redirected a command, or went away).
    pub(crate) fn forget_slot_map(&self) {
        if let RedisCon::Cluster(cl) = self {
            cl.forget_slot_map();
        }
    }
}

impl ConnectionLike for RedisCon {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisCon::Single(c) => c.req_packed_command(cmd),
            RedisCon::Cluster(cl) => {
                let cl = cl.clone();
                Box::pin(async move {
                    let r = cl.current().req_packed_command(cmd).await;
                    if let Err(e) = &r {
                        cl.renew_after(e);
                    }
                    r
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisCon::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisCon::Cluster(cl) => {
                let cl = cl.clone();
                Box::pin(async move {
                    let r = if pipeline.is_transaction() {
                        // a transaction must name one slot anyway; redis-rs routes it by that
                        cl.current()
                            .req_packed_commands(pipeline, offset, count)
                            .await
                    } else {
                        split_pipeline(&cl, pipeline).await
                    };
                    if let Err(e) = &r {
                        cl.renew_after(e);
                    }
                    r
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisCon::Single(c) => c.get_db(),
            RedisCon::Cluster(cl) => cl.current().get_db(),
        }
    }
}

/// The ranges of a `CLUSTER SLOTS` reply: (first slot, last slot, primary). A node that
/// never met another does not know its address: it is the one that answered, a seed.
fn slot_ranges(slots: &Value, seed_host: &str) -> Vec<(u16, u16, (String, u16))> {
    let mut out = Vec::new();
    let Value::Array(ranges) = slots else {
        return out;
    };
    for r in ranges {
        let Value::Array(parts) = r else { continue };
        // [start, end, [host, port, id, ...], replicas...]
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let (Some(h), Some(Value::Int(port))) = (node.first(), node.get(1)) else {
            continue;
        };
        let host = match h {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => continue,
        };
        let host = if host.is_empty() {
            seed_host.to_string()
        } else {
            host
        };
        out.push((*start as u16, *end as u16, (host, *port as u16)));
    }
    out
}

/// Where a command of a split pipeline goes.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Dest {
    /// The primary serving its slot, as the slot map says (its index there).
    Node(usize),
    /// Its slot, routed by redis-rs (the slot map does not know it).
    Slot(u16),
    /// A keyless command (its index): on its own.
    Alone(usize),
}

/// A pipeline over a cluster: one sub-pipeline per primary (each keeping its commands'
/// order, so a key's commands keep theirs), sent concurrently. Replies in input order.
async fn split_pipeline(cl: &Cluster, pipeline: &Pipeline) -> redis::RedisResult<Vec<Value>> {
    let map = cl.slot_map().await.ok();
    let mut groups: Vec<(Dest, Pipeline, Vec<usize>)> = Vec::new();
    let mut by_dest: std::collections::HashMap<Dest, usize> = Default::default();
    for (i, cmd) in pipeline.cmd_iter().enumerate() {
        let dest = match key_of(cmd).map(slot_of) {
            None => Dest::Alone(i),
            Some(slot) => match map.as_ref().and_then(|m| m.node(slot)) {
                Some(n) => Dest::Node(n),
                None => Dest::Slot(slot),
            },
        };
        let g = match by_dest.get(&dest) {
            Some(g) => *g,
            None => {
                groups.push((dest.clone(), Pipeline::new(), Vec::new()));
                by_dest.insert(dest, groups.len() - 1);
                groups.len() - 1
            }
        };
        groups[g].1.add_command(cmd.clone());
        groups[g].2.push(i);
    }
    let n = pipeline.cmd_iter().count();
    let c = cl.current();
    let nodes = map.as_ref().map(|m| &m.nodes);
    let replies = futures::future::join_all(groups.iter().map(|(dest, p, _)| {
        let mut c = c.clone();
        async move {
            match dest {
                Dest::Node(n) => {
                    let (host, port) = nodes.map(|m| m[*n].clone()).unwrap_or_default();
                    let route = SingleNodeRoutingInfo::ByAddress { host, port };
                    c.route_pipeline(p.clone(), 0, p.len(), route).await
                }
                _ => c.req_packed_commands(p, 0, p.len()).await,
            }
        }
    }))
    .await;
    let mut out = vec![Value::Nil; n];
    let mut again = Vec::new();
    for ((dest, _, idx), r) in groups.iter().zip(replies) {
        match r {
            Ok(values) => {
                for (i, v) in idx.iter().zip(values) {
                    if redirected(&v) {
                        again.push(*i);
                    }
                    out[*i] = v;
                }
            }
            // refused for its slot, or its node is gone (a failover): the slot map is
            // stale; each command goes again through redis-rs' routing
            Err(e) if redirect_kind(e.kind()) || matches!(dest, Dest::Node(..)) => {
                again.extend(idx.iter().copied())
            }
            Err(e) => return Err(e),
        }
    }
    // During a live reshard (or with a stale map) a node answers MOVED or ASK inside a
    // pipeline, which redis-rs does not follow there: such a command did not run, so it
    // is sent again on its own, which follows the redirection. One at a time, in the
    // pipeline's order (a key's commands keep theirs).
    if !again.is_empty() {
        cl.forget_slot_map();
        again.sort_unstable();
        let cmds: Vec<&Cmd> = pipeline.cmd_iter().collect();
        let mut c = c;
        for i in again {
            out[i] = c.req_packed_command(cmds[i]).await?;
        }
    }
    Ok(out)
}

/// The key a command is routed by: its first key (after `numkeys` for scripts); `None`
/// for the keyless commands skusync pipelines (none today) and scripts without keys.
fn key_of(cmd: &Cmd) -> Option<&[u8]> {
    // (no allocation: this runs for every command of every cluster pipeline)
    let mut args = cmd.args_iter().map(|a| match a {
        redis::Arg::Simple(b) => b,
        _ => &b""[..],
    });
    let name = args.next()?;
    let is = |n: &[&str]| n.iter().any(|x| name.eq_ignore_ascii_case(x.as_bytes()));
    if is(&["EVAL", "EVALSHA", "FCALL", "EVAL_RO", "EVALSHA_RO"]) {
        let n: usize = std::str::from_utf8(args.nth(1)?).ok()?.parse().ok()?;
        if n == 0 { None } else { args.next() }
    } else if is(&[
        "PING", "INFO", "TIME", "SCAN", "SCRIPT", "CLUSTER", "CONFIG",
    ]) {
        None
    } else {
        args.next()
    }
}

/// A reply that redirects the command to another node (it did not run).
pub(crate) fn redirected(v: &Value) -> bool {
    use redis::ServerErrorKind as K;
    matches!(v, Value::ServerError(e)
        if matches!(e.kind(), Some(K::Moved | K::Ask | K::TryAgain | K::ClusterDown)))
}

/// An error that redirects (see [`redirected`]).
fn redirect_kind(k: redis::ErrorKind) -> bool {
    use redis::ServerErrorKind as K;
    matches!(
        k,
        redis::ErrorKind::Server(K::Moved | K::Ask | K::TryAgain | K::ClusterDown)
    )
}
