//! One connection type for a standalone Redis and a Redis Cluster, so every reader and
//! writer (pipeline, publisher, API, ops) takes the same handle.
//!
//! On a cluster, redis-rs routes a command (and a script call) by its key's slot and
//! follows MOVED, ASK, TRYAGAIN and CLUSTERDOWN itself; what it does not do is split a
//! pipeline whose commands name several slots. [`RedisCon`] does: a pipeline becomes one
//! sub-pipeline per slot, sent concurrently, each in its commands' order, and the replies
//! come back in the pipeline's order. A script call must still name keys of one slot
//! only: callers group their keys with [`slot_of`] (see `sinks::layout`).

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
}

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
        })))
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
        if let Value::Array(ranges) = slots {
            for r in ranges {
                let Value::Array(parts) = r else { continue };
                // [start, end, [host, port, id, ...], replicas...]
                if let Some(Value::Array(node)) = parts.get(2)
                    && let (Some(h), Some(Value::Int(p))) = (node.first(), node.get(1))
                {
                    let host = match h {
                        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                        Value::SimpleString(s) => s.clone(),
                        _ => continue,
                    };
                    // a node that never met another does not know its address: it is the
                    // one that answered, a seed
                    let host = if host.is_empty() {
                        seed_host.to_string()
                    } else {
                        host
                    };
                    let a = (host, *p as u16);
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
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
    /// order): `node` and `cursor` start at 0; the reply holds where to go on (`None`
    /// when done) and the page's keys.
    pub async fn scan_page(
        &mut self,
        node: usize,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> redis::RedisResult<(Option<(usize, u64)>, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        if !self.is_cluster() {
            let (next, keys): (u64, Vec<String>) = cmd.query_async(self).await?;
            return Ok(((next != 0).then_some((0, next)), keys));
        }
        let mut nodes = self.primaries().await?;
        nodes.sort();
        let Some(addr) = nodes.get(node) else {
            return Ok((None, Vec::new()));
        };
        let (next, keys): (u64, Vec<String>) = self.on_node(Some(addr), cmd).await?;
        let on = match next {
            0 if node + 1 < nodes.len() => Some((node + 1, 0)),
            0 => None,
            n => Some((node, n)),
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
                        split_pipeline(cl.current(), pipeline).await
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

/// A pipeline over a cluster: one sub-pipeline per slot (keeping each slot's commands in
/// order), sent concurrently; keyless commands go one by one. Replies in input order.
async fn split_pipeline(
    c: ClusterConnection,
    pipeline: &Pipeline,
) -> redis::RedisResult<Vec<Value>> {
    let mut groups: Vec<(Option<u16>, Pipeline, Vec<usize>)> = Vec::new();
    let mut by_route: std::collections::HashMap<u16, usize> = Default::default();
    for (i, cmd) in pipeline.cmd_iter().enumerate() {
        let route = key_of(cmd).map(slot_of);
        let g = match route.and_then(|r| by_route.get(&r).copied()) {
            Some(g) => g,
            None => {
                groups.push((route, Pipeline::new(), Vec::new()));
                if let Some(r) = route {
                    by_route.insert(r, groups.len() - 1);
                }
                groups.len() - 1
            }
        };
        groups[g].1.add_command(cmd.clone());
        groups[g].2.push(i);
    }
    let n = pipeline.cmd_iter().count();
    let replies = futures::future::join_all(groups.iter().map(|(_, p, _)| {
        let mut c = c.clone();
        async move { c.req_packed_commands(p, 0, p.len()).await }
    }))
    .await;
    let mut out = vec![Value::Nil; n];
    let mut again = Vec::new();
    for ((_, _, idx), r) in groups.iter().zip(replies) {
        match r {
            Ok(values) => {
                for (i, v) in idx.iter().zip(values) {
                    if redirected(&v) {
                        again.push(*i);
                    }
                    out[*i] = v;
                }
            }
            // the whole sub-pipeline was refused for its slot
            Err(e) if redirect_kind(e.kind()) => again.extend(idx.iter().copied()),
            Err(e) => return Err(e),
        }
    }
    // During a live reshard redis-rs returns MOVED and ASK inside a pipeline instead of
    // following them: such a command did not run, so it is sent again on its own, which
    // follows the redirection. One at a time, in the pipeline's order (a key's commands
    // keep theirs).
    if !again.is_empty() {
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
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .take(4)
        .map(|a| match a {
            redis::Arg::Simple(b) => b,
            _ => &b""[..],
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"FCALL" | b"EVAL_RO" | b"EVALSHA_RO" => {
            let n: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            if n == 0 { None } else { args.get(3).copied() }
        }
        b"PING" | b"INFO" | b"TIME" | b"SCAN" | b"SCRIPT" | b"CLUSTER" | b"CONFIG" => None,
        _ => args.get(1).copied(),
    }
}

/// A reply that redirects the command to another node (it did not run).
fn redirected(v: &Value) -> bool {
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
