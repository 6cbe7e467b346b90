//! Connections of our own for the publisher's reads (its marks, hashes and distinct-user
//! counts), thin apply's reads (its HMGETs) and writes (thin.lua's call, on a single
//! Redis) and, on a Redis Cluster, the apply calls per slot: commands packed by redis-rs
//! or by [`resp`](super::resp) go out as bytes, and the replies come back delimited by
//! `resp` instead of parsed by redis-rs (see that module for why). The one module that
//! adapts `resp` to sockets.
//!
//! For a standalone Redis and for a Redis Cluster, over TCP, a Unix socket or TLS
//! (verified against `redis.ca_file` or the system's roots). On a cluster a round is
//! split per primary by the slot map of the publisher's redis-rs connection; a command
//! a node redirects (MOVED, ASK, TRYAGAIN, CLUSTERDOWN: it did not run) or whose node
//! cannot be reached goes again through that connection, which follows redirections.
//! `rediss://...#insecure` is left to redis-rs ([`HashReader::new`] says `None`).
//!
//! Connections are pooled per node (one per read in flight, a few kept idle), opened on
//! demand with the URL's user, password and database, and dropped after any error: the
//! round fails like a redis-rs round that failed, and is read again after a pause.

use super::RedisCon;
use super::resp::{self, FlatHash, RespError};
use redis::Pipeline;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Idle connections kept per node for the next round.
const POOL: usize = 4;

/// Connecting (TCP, TLS, AUTH, SELECT) must finish within this, as redis-rs' must.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A round's replies must all arrive within this (redis-rs' response timeout here).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// An idle connection older than this is dropped rather than used (a server's or a
/// NAT's idle timeout may have closed it without a word).
const IDLE_MAX: Duration = Duration::from_secs(30);

/// Reads at least this much room per socket read.
const READ_CHUNK: usize = 64 * 1024;

/// A node's address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Addr {
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

/// The publisher's reader of a standalone Redis or a Redis Cluster.
pub struct HashReader {
    /// The standalone server (`None` on a cluster: the nodes come from the slot map).
    single: Option<Addr>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// AUTH and SELECT, packed, with the number of replies they take.
    hello: Option<(Vec<u8>, usize)>,
    /// Per node, idle connections and since when, the most recent last.
    idle: Mutex<HashMap<Addr, Vec<(Conn, std::time::Instant)>>>,
    /// Replies read on these connections (not resent through redis-rs).
    served: std::sync::atomic::AtomicU64,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
}

/// One round's replies, in the order of its commands.
pub struct Replies {
    bufs: Vec<Vec<u8>>,
    items: Vec<Item>,
}

enum Item {
    /// A reply as bytes: `bufs[.0][.1]`.
    Raw(usize, Range<usize>),
    /// A reply redis-rs parsed (a command sent again through its connection).
    Parsed(redis::Value),
    /// Sent again and failed.
    Failed(redis::RedisError),
}

impl Replies {
    /// The number of replies.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Reply `i` as bytes (one whole RESP reply), when it came through this reader.
    pub fn raw(&self, i: usize) -> Option<&[u8]> {
        match &self.items[i] {
            Item::Raw(b, r) => Some(&self.bufs[*b][r.clone()]),
            _ => None,
        }
    }

    /// Reply `i` as redis-rs returns it in a pipeline that ignores errors (an error reply
    /// is `Value::ServerError`), for the replies whose handling is shared with redis-rs'
    /// connections.
    pub fn value(&self, i: usize) -> redis::RedisResult<redis::Value> {
        match &self.items[i] {
            Item::Raw(..) => redis::parse_redis_value(self.raw(i).unwrap_or_default()),
            Item::Parsed(v) => Ok(v.clone()),
            Item::Failed(e) => Err(e.clone()),
        }
    }

    /// Reply `i`, an HGETALL's, as a flat hash.
    pub fn hash(&self, i: usize) -> redis::RedisResult<FlatHash> {
        match &self.items[i] {
            Item::Raw(..) => FlatHash::parse(self.raw(i).unwrap_or_default()).map_err(resp_error),
            Item::Parsed(v) => FlatHash::from_value(v.clone()).map_err(Into::into),
            Item::Failed(e) => Err(e.clone()),
        }
    }

    /// Reply `i`, an HMGET's, into `out` (borrowed, not copied), or `false` for anything
    /// but an array of UTF-8 strings and nils (an error reply too): thin apply's reads.
    pub fn strings<'a>(&'a self, i: usize, out: &mut Vec<Option<&'a str>>) -> bool {
        match &self.items[i] {
            Item::Raw(..) => resp::strings_of(self.raw(i).unwrap_or_default(), out).is_ok(),
            Item::Parsed(v) => super::hmget_reply(v, out),
            Item::Failed(_) => {
                out.clear();
                false
            }
        }
    }

    /// Reply `i`, an integer.
    pub fn int(&self, i: usize) -> redis::RedisResult<i64> {
        match &self.items[i] {
            Item::Raw(..) => resp::int_of(self.raw(i).unwrap_or_default()).map_err(resp_error),
            Item::Parsed(v) => redis::from_redis_value_ref(v).map_err(Into::into),
            Item::Failed(e) => Err(e.clone()),
        }
    }
}

/// A reply this reader could not use, as the error redis-rs' parse would have given.
fn resp_error(e: RespError) -> redis::RedisError {
    let kind = match e {
        RespError::Server(_) => redis::ErrorKind::UnexpectedReturnType,
        _ => redis::ErrorKind::Parse,
    };
    redis::RedisError::from((kind, "Redis reply", e.to_string()))
}

impl HashReader {
    /// A reader for the configured Redis (`info`: the first URL's settings; `cluster`:
    /// `redis.cluster`; `ca_file`: `redis.ca_file`), or `None` where redis-rs'
    /// connection must be used (TLS without verification, a root store that cannot be
    /// loaded, an address redis-rs alone knows how to reach).
    pub fn new(
        info: &redis::ConnectionInfo,
        cluster: bool,
        ca_file: Option<&std::path::Path>,
    ) -> Option<HashReader> {
        let (addr, tls) = match info.addr() {
            redis::ConnectionAddr::Tcp(h, p) => (Addr::Tcp(h.clone(), *p), None),
            redis::ConnectionAddr::Unix(p) => (Addr::Unix(p.clone()), None),
            redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                ..
            } => {
                let source = match ca_file {
                    Some(p) => crate::pg::connstr::RootCert::File(p.to_path_buf()),
                    None => crate::pg::connstr::RootCert::System,
                };
                let roots = crate::pg::tls::root_store(&source, "redis.ca_file").ok()?;
                let cfg = rustls::ClientConfig::builder_with_provider(crate::pg::tls::provider())
                    .with_safe_default_protocol_versions()
                    .ok()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                (Addr::Tcp(host.clone(), *port), Some(Arc::new(cfg)))
            }
            _ => return None,
        };
        let s = info.redis_settings();
        let mut hello = redis::pipe();
        if let Some(pw) = s.password() {
            let auth = hello.cmd("AUTH");
            if let Some(user) = s.username() {
                auth.arg(user);
            }
            auth.arg(pw);
        }
        // a cluster has database 0 only
        if s.db() != 0 && !cluster {
            hello.cmd("SELECT").arg(s.db());
        }
        Some(HashReader {
            single: (!cluster).then_some(addr),
            tls,
            hello: (!hello.is_empty()).then(|| (hello.get_packed_pipeline(), hello.len())),
            idle: Mutex::new(HashMap::new()),
            served: Default::default(),
        })
    }

    /// Whether this reader serves a single Redis (not a cluster).
    pub fn is_single(&self) -> bool {
        self.single.is_some()
    }

    /// How many replies came back on this reader's own connections (MOVED and ASK
    /// replies among them; what it then got through redis-rs is not counted): tests
    /// show with it which path served their rounds.
    pub fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Run `pipe`'s commands and return their replies (an error reply is a reply). `con`
    /// is the publisher's redis-rs connection: on a cluster its slot map places the
    /// commands, and it takes those a node redirected. A connection or protocol error
    /// fails the round.
    pub async fn round(&self, con: &RedisCon, pipe: &Pipeline) -> redis::RedisResult<Replies> {
        let Some(addr) = &self.single else {
            return self.cluster_round(con, pipe).await;
        };
        self.single_round(addr, &pipe.get_packed_pipeline(), pipe.len())
            .await
    }

    /// [`HashReader::round`] of `n` commands the caller packed itself
    /// ([`resp::pack_command`]), without a redis-rs pipeline: on a single Redis only
    /// ([`HashReader::is_single`]; a cluster places commands by slot, and refuses this).
    pub async fn round_packed(&self, packed: &[u8], n: usize) -> redis::RedisResult<Replies> {
        let Some(addr) = &self.single else {
            return Err(io_error(
                "packed commands are for a single Redis, not a cluster",
            ));
        };
        self.single_round(addr, packed, n).await
    }

    async fn single_round(
        &self,
        addr: &Addr,
        packed: &[u8],
        n: usize,
    ) -> redis::RedisResult<Replies> {
        let (buf, ends) = self.node_round(addr, packed, n).await?;
        let mut start = 0;
        let items = ends
            .into_iter()
            .map(|end| Item::Raw(0, std::mem::replace(&mut start, end)..end))
            .collect();
        Ok(Replies {
            bufs: vec![buf],
            items,
        })
    }

    async fn cluster_round(&self, con: &RedisCon, pipe: &Pipeline) -> redis::RedisResult<Replies> {
        let cmds: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
        // per node, its commands' indices (in the pipeline's order)
        let mut groups: Vec<(Addr, Vec<usize>)> = Vec::new();
        let mut again: Vec<usize> = Vec::new();
        match con.primaries_of(pipe).await {
            Some((map, placed)) => {
                // by node index first: one address per node, not one per command
                let mut by_node: Vec<Vec<usize>> = vec![Vec::new(); map.nodes.len()];
                for (i, n) in placed.into_iter().enumerate() {
                    match n {
                        Some(n) => by_node[n].push(i),
                        None => again.push(i),
                    }
                }
                for (n, idx) in by_node.into_iter().enumerate() {
                    if !idx.is_empty() {
                        let (h, p) = map.nodes[n].clone();
                        groups.push((Addr::Tcp(h, p), idx));
                    }
                }
            }
            None => again.extend(0..cmds.len()),
        }
        let sent = futures::future::join_all(groups.iter().map(|(addr, idx)| {
            let mut packed = Vec::new();
            for &i in idx {
                cmds[i].write_packed_command(&mut packed);
            }
            async move { self.node_round(addr, &packed, idx.len()).await }
        }))
        .await;
        let mut items: Vec<Option<Item>> = (0..cmds.len()).map(|_| None).collect();
        let mut bufs = Vec::new();
        for ((_, idx), r) in groups.iter().zip(sent) {
            let (buf, ends) = match r {
                Ok(x) => x,
                Err(e) => {
                    // the node went away (a failover): the slot map is stale
                    node_failed(&e);
                    again.extend(idx.iter().copied());
                    continue;
                }
            };
            let b = bufs.len();
            let mut start = 0;
            for (&i, end) in idx.iter().zip(ends) {
                let range = std::mem::replace(&mut start, end)..end;
                // an error reply is read the way the split pipeline reads its own
                let moved = buf[range.start] == b'-'
                    && redis::parse_redis_value(&buf[range.clone()])
                        .is_ok_and(|v| super::con::redirected(&v));
                if moved {
                    again.push(i);
                } else {
                    items[i] = Some(Item::Raw(b, range));
                }
            }
            bufs.push(buf);
        }
        if !again.is_empty() {
            // one at a time in the pipeline's order, through redis-rs' routing
            con.forget_slot_map();
            again.sort_unstable();
            let mut c = con.clone();
            for i in again {
                items[i] = Some(
                    match redis::aio::ConnectionLike::req_packed_command(&mut c, cmds[i]).await {
                        Ok(v) => Item::Parsed(v),
                        Err(e) if e.kind() == redis::ErrorKind::Io || e.is_timeout() => {
                            return Err(e);
                        }
                        Err(e) => Item::Failed(e),
                    },
                );
            }
        }
        Ok(Replies {
            bufs,
            items: items
                .into_iter()
                .map(|i| i.unwrap_or_else(|| Item::Parsed(redis::Value::Nil)))
                .collect(),
        })
    }

    /// One node's part of a round: its replies' bytes and where each ends. A pooled
    /// connection the server closed while it sat idle (a restart, Redis' `timeout`, a
    /// NAT that forgot it) fails with an I/O error: its pool goes with it, and the round
    /// runs once more on a fresh connection (reads, marks that only move forward, and
    /// the cluster's fenced apply calls are safe to run twice: a call that had run is
    /// skipped by its fence, and what it reported, its alerts for the history, is lost).
    async fn node_round(
        &self,
        addr: &Addr,
        packed: &[u8],
        replies: usize,
    ) -> redis::RedisResult<(Vec<u8>, Vec<usize>)> {
        let pooled = self.take_idle(addr);
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.open(addr).await?,
        };
        let out = match timed_round(&mut conn, packed, replies).await {
            Ok(out) => out,
            Err(e) if reused && e.kind() == redis::ErrorKind::Io && !e.is_timeout() => {
                self.forget(addr);
                conn = self.open(addr).await?;
                timed_round(&mut conn, packed, replies)
                    .await
                    .inspect_err(|_| self.forget(addr))?
            }
            Err(e) => {
                self.forget(addr);
                return Err(e);
            }
        };
        self.give_back(addr, conn);
        self.served
            .fetch_add(out.1.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    async fn open(&self, addr: &Addr) -> redis::RedisResult<Conn> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect(addr))
            .await
            .map_err(|_| io_error("connecting to Redis timed out"))?
    }

    /// The most recently used idle connection to `addr`, unless it idled too long (then
    /// every idle one to it is older still, and all are dropped).
    fn take_idle(&self, addr: &Addr) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let pool = idle.get_mut(addr)?;
        match pool.pop() {
            Some((c, since)) if since.elapsed() < IDLE_MAX => Some(c),
            _ => {
                idle.remove(addr);
                None
            }
        }
    }

    /// Keep `conn` for the next round; drop every pool that idled too long (a cluster's
    /// nodes come and go with failovers).
    fn give_back(&self, addr: &Addr, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, pool| {
            pool.last()
                .is_some_and(|(_, since)| since.elapsed() < IDLE_MAX)
        });
        let pool = idle.entry(addr.clone()).or_default();
        if pool.len() < POOL {
            pool.push((conn, std::time::Instant::now()));
        }
    }

    /// Drop the idle connections to `addr` (one failed: the others likely did too).
    fn forget(&self, addr: &Addr) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(addr);
    }

    async fn connect(&self, addr: &Addr) -> redis::RedisResult<Conn> {
        let io: Box<dyn Io> = match (addr, &self.tls) {
            (Addr::Tcp(h, p), None) => {
                let s = tokio::net::TcpStream::connect((h.as_str(), *p)).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            (Addr::Tcp(h, p), Some(cfg)) => {
                let name = rustls::pki_types::ServerName::try_from(h.clone()).map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "Redis TLS server name",
                        e.to_string(),
                    ))
                })?;
                let s = tokio::net::TcpStream::connect((h.as_str(), *p)).await?;
                s.set_nodelay(true)?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone());
                Box::new(tls.connect(name, s).await?)
            }
            (Addr::Unix(p), _) => Box::new(tokio::net::UnixStream::connect(p).await?),
        };
        let mut conn = Conn {
            io,
            buf: Vec::new(),
        };
        if let Some((packed, n)) = &self.hello {
            let (buf, ends) = conn.round(packed, *n).await?;
            let mut start = 0;
            for end in ends {
                if let Some(e) = resp::error_of(&buf[std::mem::replace(&mut start, end)..end]) {
                    let kind = if e.starts_with("WRONGPASS") || e.starts_with("NOAUTH") {
                        redis::ErrorKind::AuthenticationFailed
                    } else {
                        redis::ErrorKind::Io
                    };
                    return Err(redis::RedisError::from((kind, "Redis refused", e)));
                }
            }
        }
        Ok(conn)
    }
}

/// `conn.round`, failing after [`RESPONSE_TIMEOUT`].
async fn timed_round(
    conn: &mut Conn,
    packed: &[u8],
    replies: usize,
) -> redis::RedisResult<(Vec<u8>, Vec<usize>)> {
    tokio::time::timeout(RESPONSE_TIMEOUT, conn.round(packed, replies))
        .await
        .map_err(|_| io_error("Redis did not answer within 30 s"))?
}

impl Conn {
    /// Send `packed` and read `replies` replies: their bytes and where each ends.
    async fn round(
        &mut self,
        packed: &[u8],
        replies: usize,
    ) -> redis::RedisResult<(Vec<u8>, Vec<usize>)> {
        self.io.write_all(packed).await?;
        self.io.flush().await?;
        let mut ends = Vec::with_capacity(replies);
        let mut pos = 0;
        while ends.len() < replies {
            if let Some(n) = resp::reply_len(&self.buf[pos..]).map_err(protocol)? {
                pos += n;
                ends.push(pos);
                continue;
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK {
                self.buf.reserve(READ_CHUNK);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(io_error("Redis closed the connection"));
            }
        }
        if pos != self.buf.len() {
            // bytes nobody asked for: the stream is out of step
            return Err(protocol(RespError::Malformed {
                at: pos,
                what: "more replies than commands",
            }));
        }
        Ok((std::mem::take(&mut self.buf), ends))
    }
}

/// A node (or a whole round) this reader could not serve: its commands went through
/// redis-rs instead (slower, not wrong). Said at most every 10 s, so that a node that
/// keeps failing (its TLS name, its password) does not go unnoticed nor flood the log.
pub(crate) fn node_failed(e: &redis::RedisError) {
    static LAST_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    if crate::telemetry::due(&LAST_MS, 10_000) {
        tracing::warn!(error = %e, "Redis could not be reached on skusync's own connections; the commands went through redis-rs");
    }
}

fn io_error(what: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::other(what.to_string()))
}

fn protocol(e: RespError) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Parse, "Redis reply", e.to_string()))
}

/// The publisher's reader for the configured Redis (see [`HashReader::new`]); `None`
/// also when the settings do not parse (the pipeline reports those).
pub fn for_config(
    urls: &[String],
    cluster: bool,
    ca_file: Option<&std::path::Path>,
) -> Option<Arc<HashReader>> {
    let infos = super::connection_infos(urls).ok()?;
    HashReader::new(infos.first()?, cluster, ca_file).map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_as_redis_rs_reads_them_in_a_pipeline_that_ignores_errors() {
        let r = Replies {
            bufs: vec![b":1\r\n-ERR boom\r\n*2\r\n$1\r\na\r\n$1\r\n1\r\n".to_vec()],
            items: vec![
                Item::Raw(0, 0..4),
                Item::Raw(0, 4..15),
                Item::Raw(0, 15..33),
                Item::Parsed(redis::Value::Int(7)),
            ],
        };
        assert_eq!(r.len(), 4);
        assert_eq!(r.raw(1), Some(&b"-ERR boom\r\n"[..]));
        assert!(matches!(r.value(0), Ok(redis::Value::Int(1))));
        assert!(matches!(r.value(1), Ok(redis::Value::ServerError(_))));
        assert_eq!(r.int(0).unwrap(), 1);
        assert!(r.int(1).is_err());
        assert_eq!(r.hash(2).unwrap().get("a"), Some("1"));
        assert!(r.hash(1).is_err());
        assert_eq!(r.int(3).unwrap(), 7);
        assert_eq!(r.raw(3), None);
    }
}
