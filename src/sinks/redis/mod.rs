//! The Redis sink: applies folded pieces with one Lua script call per batch, exactly once
//! (fenced per SKU by commit LSN and piece), and keeps the meta hash. On a Redis Cluster
//! (`[redis] cluster = true`) a batch is one call per slot, fenced by that slot's copy of
//! the meta hash's writer token and `applied_lsn` (see [`Applier::apply`] and
//! docs/redis-layout.md, "Redis Cluster").
//!
//! Durability contract: a batch is durable when the script returned; only then are its
//! transactions reported to the LSN tracker. The script also records the batch's end LSN
//! in the meta hash (`applied_lsn`), and refuses to run when the meta hash is missing
//! (FLUSHALL, eviction, a new Redis), which makes the pipeline resync.
//!
//! At most one writer: every write (apply calls, meta writes, the reset before a load)
//! carries the writer's fencing token ([`WriterFence`]) and is refused unless it equals
//! meta `writer`; a new writer takes the token with [`claim_writer`] only while it holds
//! the PostgreSQL advisory lock of its slot. Redis that lost recent writes (restarted from
//! an older RDB or AOF, a lagging replica promoted) is caught by the same check: its
//! `applied_lsn` is below what this writer saw it hold (the floor), or its token is older.

use crate::fold::batch::{Batch, Entry, trace_flags};
use crate::fold::{Field, Piece, RowOp};
use crate::lsn::Lsn;
use crate::sinks::layout;
use redis::IntoConnectionInfo;
use std::collections::HashMap;
use std::time::Duration;

mod con;
pub mod reader;
pub mod resp;
pub mod thin;
pub use con::{RedisCon, ScanAt};
pub use layout::{SLOTS, slot_of};

/// The apply script (see `apply.lua`).
pub const APPLY_LUA: &str = include_str!("apply.lua");

/// The thin apply script (see [`thin`]).
pub const THIN_LUA: &str = include_str!("thin.lua");

/// Errors of the Redis sink.
#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    /// The meta hash is gone: Redis lost its data; rebuild from a snapshot.
    #[error("Redis lost skusync's data (meta hash missing): a resync is needed")]
    NoMeta,
    /// A merged entry straddles the fence of the SKU hash at this key: part of it was
    /// applied before (the horizon was wrong). Nothing was written; replay with a higher
    /// horizon. The message leaves the key out (SKUs are logged at debug only).
    #[error("Redis holds part of a merged entry (SKUSYNC_SPLIT)")]
    Split(String),
    /// Another writer holds the fencing token (meta `writer` is this value, not ours):
    /// nothing was written; this instance must stop writing.
    #[error(
        "Redis is written by another skusync instance (writer token {0}); this one stops writing"
    )]
    Fenced(String),
    /// Redis holds less than it held before (meta `applied_lsn` is this, below the floor):
    /// it lost writes. Nothing was written; resume from the slot or rebuild.
    #[error("Redis lost recent writes (applied_lsn is {0}, below what it held before)")]
    Rollback(String),
    /// Connection trouble; retry.
    #[error("Redis: {0}")]
    Transient(String),
    /// Misconfiguration or a refused command; the operator must act.
    #[error("Redis: {0}")]
    Definite(String),
}

impl RedisSinkError {
    /// Classify a redis-rs error by its kind and the server's error code. Connection
    /// trouble and the server's "not now" replies are transient; every other reply is
    /// definite: Redis answers the same command the same way again, so retrying it
    /// would loop for ever instead of telling the operator.
    fn from_redis(e: redis::RedisError) -> RedisSinkError {
        use redis::{ErrorKind as K, ServerErrorKind as S};
        let code = e.code().unwrap_or_default();
        let msg = describe(&e);
        // Our own refusals (`redis.error_reply` in apply.lua).
        match code {
            "SKUSYNC_NOMETA" => return RedisSinkError::NoMeta,
            "SKUSYNC_FENCED" => {
                return RedisSinkError::Fenced(e.detail().unwrap_or_default().to_string());
            }
            "SKUSYNC_ROLLBACK" => {
                return RedisSinkError::Rollback(e.detail().unwrap_or_default().to_string());
            }
            "SKUSYNC_SPLIT" => {
                let detail = e.detail().unwrap_or_default();
                let key = detail
                    .strip_suffix(" holds part of a merged entry")
                    .unwrap_or(detail);
                return RedisSinkError::Split(key.to_string());
            }
            _ => {}
        }
        let transient = match e.kind() {
            K::Io
            // garbage on the wire: redis-rs replaces the connection
            | K::Parse
            | K::ClusterConnectionNotFound
            | K::MasterNameNotFoundBySentinel
            | K::NoValidReplicasFoundBySentinel
            | K::Server(
                S::BusyLoading | S::TryAgain | S::MasterDown | S::ClusterDown | S::Moved | S::Ask,
            ) => true,
            // codes redis-rs does not know: another client's script runs (BUSY), or a
            // primary waits for its replicas (NOREPLICAS, `min-replicas-to-write`)
            K::Extension => matches!(code, "BUSY" | "NOREPLICAS"),
            _ => false,
        };
        // Connection slots free up as other clients leave. A script that touched a
        // distinct-user key its node does not hold while the slot migrates (a live
        // reshard) wrote only what can be sent again: the scripts write those keys before
        // any hash (apply.lua: in its pass 2; thin.lua: before each entry's hash), so the
        // call goes again once the slot has moved.
        let transient = transient
            || e.detail()
                .is_some_and(|d| d.starts_with("max number of clients reached"))
            || msg.contains("access a non local key");
        if transient {
            return RedisSinkError::Transient(msg);
        }
        let hint = match (e.kind(), code) {
            (K::Server(S::ReadOnly), _) => {
                "Redis is a read-only replica: point redis.url at the primary"
            }
            (_, "OOM") => {
                "Redis reached maxmemory: raise maxmemory or free memory (keep \
                 maxmemory-policy noeviction: an evicted key costs a resync)"
            }
            (_, "MISCONF") => {
                "Redis refuses writes because it cannot persist: fix its RDB/AOF errors"
            }
            (K::AuthenticationFailed, _) | (_, "NOAUTH" | "WRONGPASS") => {
                "check the Redis user and password (redis.url or SKUSYNC_REDIS_PASSWORD)"
            }
            (K::Server(S::NoPerm), _) => {
                "the Redis user lacks a permission: allow it skusync's commands and keys"
            }
            (_, "WRONGTYPE") => {
                "a key under redis.prefix holds another type than skusync writes there: \
                 delete it, then run `skusync resync`"
            }
            (K::Server(S::CrossSlot), _) => {
                "a call named keys of several cluster slots (a bug: please report it)"
            }
            (K::Server(S::NoScript), _) => {
                "Redis forgot the apply script right after loading it (a proxy spreading \
                 commands over several servers?)"
            }
            (K::InvalidClientConfig | K::Client, _) => "check redis.url and redis.ca_file",
            (K::UnexpectedReturnType, _) => {
                "Redis replied in a shape skusync does not expect: is redis.url a Redis server?"
            }
            _ if e.code().is_some() => {
                "Redis refused the command; sending it again would get the same answer"
            }
            _ => "retrying would not help",
        };
        RedisSinkError::Definite(format!("{msg} ({hint})"))
    }

    /// Whether retrying can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, RedisSinkError::Transient(_))
    }
}

/// A Redis error as the server phrased it (`WRONGTYPE Operation against ...`), or
/// redis-rs' description when it did not come from the server. Redis echoes the
/// arguments of an unknown command, which may be row values: that part is cut.
fn describe(e: &redis::RedisError) -> String {
    let text = match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        (Some(code), None) => code.to_string(),
        _ => e.to_string(),
    };
    match text.find(", with args beginning with") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Parameters of every apply call.
#[derive(Clone, Debug)]
pub struct ApplySettings {
    pub prefix: String,
    pub keep_minutes: i64,
    /// The default low-stock threshold, in whole units.
    pub low_stock: i64,
    /// Decimal places of every quantity (0: whole numbers); quantities travel in units
    /// of 10^-scale (see `fold::qty`).
    pub scale: u32,
    pub counters: Vec<String>,
    /// Most alerts kept in the alert history (`[alerts] history`).
    pub alert_history: u64,
    /// Oldest alert kept in the history, in ms (`[alerts] history_max_age_s`; 0: no limit).
    pub alert_history_age_ms: u64,
    /// The writer's fencing token and floor (unfenced when its token is 0).
    pub fence: WriterFence,
}

/// A writer's claim on Redis: its fencing token (meta `writer`; 0 = unfenced, for tools
/// and tests) and the floor, the highest `applied_lsn` this writer saw Redis hold (0 =
/// unchecked). Shared by the clones of an [`Applier`] and the daemon.
#[derive(Clone, Debug, Default)]
pub struct WriterFence {
    pub token: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub floor: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// On a Redis Cluster, the floor per slot: the highest `applied_lsn` this writer
    /// recorded in the slot's meta copy (a failover that lost a slot's last writes shows
    /// there first).
    pub slots: SlotFloors,
    /// On a standalone Redis, the chain of the stream's calls (see [`CallChain`]).
    pub chain: CallChain,
}

/// The stream's calls to a standalone Redis, numbered: each records its number in meta
/// `chain` (kept at the highest), and refuses to run (`SKUSYNC_ROLLBACK`) when Redis
/// holds less than the last call that returned. Only a batch's last call records its
/// end LSN, which the floor covers; a failover to a replica that missed an earlier call
/// of the batch (or of a transaction's earlier batches, which record no end) is caught
/// by the next call instead of losing that call's writes for good. Numbers restart at 1
/// with each token: the first call of a writer checks nothing.
#[derive(Clone, Debug, Default)]
pub struct CallChain {
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CallChain {
    /// Start over (a new token: what Redis holds is checked by the cycle's start).
    pub fn restart(&self) {
        self.next.store(0, std::sync::atomic::Ordering::SeqCst);
        self.ok.store(0, std::sync::atomic::Ordering::SeqCst);
    }

    /// A call's floor argument, `floor|last|this` (the scripts' `chained_floor`), and its
    /// number for [`CallChain::returned`].
    fn link(&self, floor: u64) -> (String, u64) {
        use std::sync::atomic::Ordering::SeqCst;
        let this = self.next.fetch_add(1, SeqCst) + 1;
        let last = match self.ok.load(SeqCst) {
            0 => String::new(),
            n => n.to_string(),
        };
        (format!("{}|{last}|{this}", token_arg(floor)), this)
    }

    /// Call `n` returned: Redis held it then.
    fn returned(&self, n: u64) {
        if n > 0 {
            self.ok.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Per-slot floors (see [`WriterFence::slots`]); empty until the first write to a slot.
/// The floors raised since they were last recorded in the meta hash (fields
/// `floor:<slot>`, written with `applied_lsn`: [`Applier::raise_applied`]) are dirty; a
/// restart reads them back ([`load_slot_floors`]), so a failover that loses a slot's
/// writes while skusync is down is caught too.
#[derive(Clone, Debug, Default)]
pub struct SlotFloors(std::sync::Arc<std::sync::Mutex<FloorMap>>);

#[derive(Debug, Default)]
struct FloorMap {
    floors: HashMap<u16, u64>,
    dirty: std::collections::BTreeSet<u16>,
    /// The last rebuild's mark, which its reset wrote into every slot's meta copy (and
    /// its `done` into the meta hash): a copy without it is from before that reset.
    rebuild: Option<String>,
}

impl SlotFloors {
    /// The floor of `slot` (0: unchecked).
    pub fn get(&self, slot: u16) -> u64 {
        self.lock().floors.get(&slot).copied().unwrap_or(0)
    }

    /// Raise the floor of `slot` to `lsn` (dirty when it rose).
    pub fn raise(&self, slot: u16, lsn: u64) {
        let mut m = self.lock();
        let f = m.floors.entry(slot).or_insert(0);
        if lsn > *f {
            *f = lsn;
            m.dirty.insert(slot);
        }
    }

    /// Raise floors read back from the meta hash (not dirty: recorded there already).
    pub fn load(&self, floors: impl IntoIterator<Item = (u16, u64)>) {
        let mut m = self.lock();
        for (slot, lsn) in floors {
            let f = m.floors.entry(slot).or_insert(0);
            *f = (*f).max(lsn);
        }
    }

    /// The dirty floors, now clean; [`SlotFloors::redirty`] them when recording failed.
    pub fn take_dirty(&self) -> Vec<(u16, u64)> {
        let mut m = self.lock();
        let dirty = std::mem::take(&mut m.dirty);
        dirty
            .into_iter()
            .map(|s| (s, m.floors.get(&s).copied().unwrap_or(0)))
            .collect()
    }

    /// Mark floors dirty again (their recording failed).
    pub fn redirty(&self, slots: impl IntoIterator<Item = u16>) {
        self.lock().dirty.extend(slots);
    }

    /// Every slot with a floor.
    pub fn all(&self) -> Vec<(u16, u64)> {
        let mut v: Vec<(u16, u64)> = self.lock().floors.iter().map(|(s, f)| (*s, *f)).collect();
        v.sort_unstable();
        v
    }

    /// Forget every floor (a rebuild rewrote the slots' meta copies).
    pub fn clear(&self) {
        let mut m = self.lock();
        m.floors.clear();
        m.dirty.clear();
        m.rebuild = None;
    }

    /// The mark every slot's meta copy must hold (see [`reset_all`]); `None`: unchecked
    /// (Redis rebuilt before marks existed).
    pub fn rebuild_mark(&self) -> Option<String> {
        self.lock().rebuild.clone()
    }

    /// Set the mark the copies must hold.
    pub fn set_rebuild_mark(&self, mark: Option<String>) {
        self.lock().rebuild = mark;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FloorMap> {
        // a panic while holding it cannot leave the map inconsistent
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl WriterFence {
    /// The token, 0 when unfenced.
    pub fn token(&self) -> u64 {
        self.token.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A fence with the same token and no floor (a snapshot load starts below it). The
    /// per-slot floors are shared: the load starts them over (its reset cleared the slots'
    /// meta copies), and what it raises them to is what the stream's calls and the slots'
    /// check then hold those copies to, so a failover that loses the load's writes to a
    /// slot is noticed.
    pub fn without_floor(&self) -> WriterFence {
        WriterFence {
            token: self.token.clone(),
            floor: Default::default(),
            slots: self.slots.clone(),
            chain: Default::default(),
        }
    }
}

/// A token as sent to the scripts ('' when unfenced).
fn token_arg(t: u64) -> String {
    if t == 0 { String::new() } else { t.to_string() }
}

/// A Redis client: a standalone server or a Redis Cluster's seed nodes.
// a few per process, built once: their size does not matter
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum RedisClient {
    Single(redis::Client),
    /// The seed nodes' client, and the first seed's host.
    Cluster(redis::cluster::ClusterClient, std::sync::Arc<str>),
}

/// The configured URLs as redis-rs reads them, `SKUSYNC_REDIS_PASSWORD` filling a
/// missing password.
pub(crate) fn connection_infos(
    urls: &[String],
) -> Result<Vec<redis::ConnectionInfo>, RedisSinkError> {
    let bad = |e: redis::RedisError| RedisSinkError::Definite(format!("redis.url: {e}"));
    let mut infos = Vec::new();
    for url in urls {
        let mut info: redis::ConnectionInfo = url.as_str().into_connection_info().map_err(bad)?;
        if let Ok(pw) = std::env::var("SKUSYNC_REDIS_PASSWORD")
            && info.redis_settings().password().is_none()
        {
            let settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(settings);
        }
        infos.push(info);
    }
    Ok(infos)
}

/// Build a Redis client from the configured URLs (`rediss://` uses rustls; `ca_file`
/// replaces the system roots; `SKUSYNC_REDIS_PASSWORD` fills a missing password). With
/// `cluster`, the URLs are seed nodes of a Redis Cluster.
pub fn client(
    urls: &[String],
    cluster: bool,
    ca_file: Option<&std::path::Path>,
) -> Result<RedisClient, RedisSinkError> {
    let bad = |e: redis::RedisError| RedisSinkError::Definite(format!("redis.url: {e}"));
    let infos = connection_infos(urls)?;
    let tls = urls.first().is_some_and(|u| u.starts_with("rediss://"));
    let root = match (tls, ca_file) {
        (true, Some(ca)) => Some(std::fs::read(ca).map_err(|e| {
            RedisSinkError::Definite(format!("redis.ca_file {}: {e}", ca.display()))
        })?),
        _ => None,
    };
    if cluster {
        let infos_host = infos.first().and_then(|i| match i.addr() {
            redis::ConnectionAddr::Tcp(h, _) | redis::ConnectionAddr::TcpTls { host: h, .. } => {
                Some(h.clone())
            }
            _ => None,
        });
        let mut b = redis::cluster::ClusterClientBuilder::new(infos)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(30))
            // MOVED, ASK, TRYAGAIN and CLUSTERDOWN are retried inside for about 10 s
            // (a failover takes the node timeout and more); then the caller backs off
            .retries(8)
            .min_retry_wait(100)
            .max_retry_wait(2000);
        if let Some(root) = root {
            b = b.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root),
            });
        }
        let host: std::sync::Arc<str> = match infos_host.as_deref() {
            Some(h) => h.into(),
            None => "127.0.0.1".into(),
        };
        return b
            .build()
            .map(|c| RedisClient::Cluster(c, host))
            .map_err(bad);
    }
    let info = infos
        .into_iter()
        .next()
        .ok_or_else(|| RedisSinkError::Definite("redis.url: no URL".into()))?;
    match root {
        Some(root) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root),
            },
        ),
        None => redis::Client::open(info),
    }
    .map(RedisClient::Single)
    .map_err(bad)
}

impl RedisClient {
    /// A connection for readers (the API, webhooks): each reply within 3 s (redis-rs'
    /// default of 0.5 s fails reads queued behind a catch-up's script calls); a request
    /// bounds its round trips together itself.
    pub async fn open(&self) -> redis::RedisResult<RedisCon> {
        match self {
            RedisClient::Single(c) => {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(3)))
                    .set_response_timeout(Some(Duration::from_secs(3)));
                c.get_connection_manager_with_config(cfg)
                    .await
                    .map(RedisCon::Single)
            }
            RedisClient::Cluster(c, seed) => con::Cluster::connect(c.clone(), seed.clone()).await,
        }
    }
}

/// Connect: a connection manager that reconnects in the background (commands that fail
/// while it does return errors; the pipeline retries whole batches, which the fence makes
/// safe), or a cluster connection that follows the slot map.
pub async fn connect(client: &RedisClient) -> Result<RedisCon, RedisSinkError> {
    let con = async {
        match client {
            RedisClient::Single(c) => {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(Duration::from_secs(30)))
                    .set_max_delay(Duration::from_secs(5))
                    .set_number_of_retries(2);
                c.get_connection_manager_with_config(cfg)
                    .await
                    .map(RedisCon::Single)
            }
            RedisClient::Cluster(c, seed) => con::Cluster::connect(c.clone(), seed.clone()).await,
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), con).await {
        Err(_) => Err(RedisSinkError::Transient(
            "no connection within 10 s".into(),
        )),
        Ok(Err(e)) if e.to_string().contains("cluster support disabled") => {
            Err(RedisSinkError::Definite(
                "redis.url names a standalone Redis, not a Redis Cluster node: set \
                 redis.cluster = false, or point redis.url at the cluster's nodes"
                    .into(),
            ))
        }
        Ok(Err(e)) if unserved(&e) => Err(unserved_error("no slot is served")),
        Ok(r) => r.map_err(RedisSinkError::from_redis),
    }
}

/// A cluster error that means no node serves the slot (or any slot): the cluster is
/// incomplete, which an operator fixes; meanwhile skusync waits.
fn unserved(e: &redis::RedisError) -> bool {
    let t = e.to_string();
    e.kind() == redis::ErrorKind::ClusterConnectionNotFound
        || t.contains("didn't get any slots")
        || t.contains("not all slots are covered")
}

fn unserved_error(detail: &str) -> RedisSinkError {
    RedisSinkError::Transient(format!(
        "redis.url: the Redis Cluster does not serve every slot ({detail}); waiting for it \
         (`redis-cli --cluster check` names the uncovered slots)"
    ))
}

/// Check that the server is what `redis.cluster` says, before anything is written: a
/// cluster node behind a standalone setting (or the reverse) is definite (the operator
/// must fix the setting); a cluster that does not serve every slot is transient (the
/// stream waits, nothing is confirmed, and resumes once it does). `check` reports the same.
pub async fn check_topology(con: &mut RedisCon) -> Result<(), RedisSinkError> {
    match con {
        RedisCon::Single(c) => {
            let info: String = redis::cmd("INFO")
                .arg("cluster")
                .query_async(c)
                .await
                .map_err(RedisSinkError::from_redis)?;
            if is_cluster(&info) {
                return Err(RedisSinkError::Definite(
                    "redis.url names a Redis Cluster node (cluster_enabled:1): set \
                     redis.cluster = true (and list a few of its nodes in redis.url); see \
                     docs/redis-layout.md"
                        .into(),
                ));
            }
            Ok(())
        }
        RedisCon::Cluster(..) => {
            let info: String = match con
                .on_node(None, redis::cmd("CLUSTER").arg("INFO").to_owned())
                .await
            {
                Err(e) if unserved(&e) => return Err(unserved_error("no slot is served")),
                r => r.map_err(RedisSinkError::from_redis)?,
            };
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.trim().strip_prefix(k)?.strip_prefix(':'))
                    .unwrap_or("?")
                    .to_string()
            };
            let (state, assigned) = (field("cluster_state"), field("cluster_slots_assigned"));
            if state != "ok" || assigned != "16384" {
                return Err(unserved_error(&format!(
                    "cluster_state:{state}, {assigned} of 16384 slots assigned"
                )));
            }
            Ok(())
        }
    }
}

/// Whether `INFO cluster` says the server runs in cluster mode.
fn is_cluster(info: &str) -> bool {
    info.lines().any(|l| l.trim() == "cluster_enabled:1")
}

/// The apply script bound to a connection.
#[derive(Clone)]
pub struct Applier {
    con: RedisCon,
    // shared: the daemon clones its applier per batch, and the scripts are kilobytes
    script: std::sync::Arc<redis::Script>,
    thin: std::sync::Arc<redis::Script>,
    /// Entries without a TRUNCATE are worked out here where they can be and written by
    /// `thin.lua` (see [`thin`]).
    use_thin: bool,
    settings: ApplySettings,
    /// Tests only: runs between thin apply's read and its write (see
    /// [`Applier::with_thin_race`]).
    race: Option<ThinRace>,
    /// Thin apply's HMGETs go out on these connections and are read without redis-rs'
    /// parser (`None`: on `con`; see [`reader`]).
    reader: Option<std::sync::Arc<reader::HashReader>>,
    /// Unix ms until which `reader` is left out after one of its rounds failed.
    reader_pause: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// How thin apply reads: [`WholeReads`]. Shared by the clones (the daemon clones its
    /// applier per batch), so each batch starts from what the last round found.
    whole: std::sync::Arc<std::sync::atomic::AtomicU8>,
    /// A cluster's change index entries whose write failed after their slots' calls
    /// succeeded, for the next write. Shared by the clones. (A retry's calls skip those
    /// entries, fenced, and report their alerts again from the hashes, so alerts need no
    /// such list: see `ALERTS_LUA`.)
    unindexed: std::sync::Arc<std::sync::Mutex<Unindexed>>,
    /// This applier's standalone calls are the stream's, one at a time: they link into
    /// the fence's [`CallChain`] ([`Applier::chained`]).
    chained: bool,
}

/// See [`Applier::unindexed`].
#[derive(Debug, Default)]
struct Unindexed {
    changes: Vec<(u64, String)>,
    /// Slots whose row index or lookup state a piece wrote before its transaction's end:
    /// they get the end's mark (and floor) with the end's call, as the slots it writes do.
    unmarked: std::collections::BTreeSet<u16>,
}

/// How thin apply reads a SKU hash. A hash that does not exist answers a many-field HMGET
/// with a nil per field, and Redis parses every field name first: about 2.5 times the
/// Redis CPU of an HGETALL's empty reply (`bench/thin_reads.py`). So while most SKUs read
/// are new (an import, a first load) the whole hash is read instead, and the fields asked
/// for are picked from it; an existing hash read whole can cost more than the fields
/// asked for (its window buckets, its locations), so once most exist the reads go back
/// to HMGET. Both answer the same values for the fields asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum WholeReads {
    /// HMGET of the fields the entry needs (the start).
    Fields = 0,
    /// HGETALL: at least [`WHOLE_AT`] of the last round's hashes did not exist.
    Whole = 1,
    /// Always HGETALL (tests: the picking on hashes of every kind).
    Always = 2,
}

/// Share of a read round's SKUs (in quarters) without a hash from which the next rounds
/// read whole hashes ([`WholeReads`]); rounds of fewer than [`WHOLE_MIN_ROUND`] reads
/// change nothing (a live batch of a few SKUs says little about the next).
const WHOLE_AT: usize = 3;
const WHOLE_MIN_ROUND: usize = 32;

/// Most HMGETs in one round of thin apply's reads: a whole call of the daemon's (500
/// entries) in one, so that a call read ahead is answered before the previous call's
/// write runs, not half of it after (a round waits for its replies before the next).
const THIN_READS_PER_ROUND: usize = 512;

/// A call's thin reads and plan, made ahead of its write ([`Applier::plan_ahead`]).
pub struct ThinPlan<'e> {
    /// The call's entries (the plan's indices point into them).
    entries: &'e [Entry],
    planned: Vec<(usize, thin::ThinWrite<'e>)>,
}

/// Thin apply's HMGET replies: read by [`reader`], or parsed by redis-rs.
enum ThinReads {
    Ours(reader::Replies),
    Parsed(Vec<redis::Value>),
}

/// A test's writer racing thin apply: called with the SKU keys thin apply read and is
/// about to write, before it writes them.
pub type ThinRace = std::sync::Arc<
    dyn Fn(Vec<String>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Result of one apply call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// SKU entries applied.
    pub applied: u64,
    /// SKU entries skipped by the fence (replays).
    pub fenced: u64,
    /// Low-stock alerts raised.
    pub alerts: u64,
    /// Of `applied`, the entries written thin (worked out by skusync, see [`thin`]).
    pub thin: u64,
}

impl std::ops::AddAssign for Applied {
    fn add_assign(&mut self, o: Applied) {
        self.applied += o.applied;
        self.fenced += o.fenced;
        self.alerts += o.alerts;
        self.thin += o.thin;
    }
}

impl Applier {
    /// Bind the script (EVALSHA, loaded on first NOSCRIPT) to a connection.
    pub fn new(con: RedisCon, settings: ApplySettings) -> Applier {
        Applier {
            con,
            script: std::sync::Arc::new(redis::Script::new(APPLY_LUA)),
            thin: std::sync::Arc::new(redis::Script::new(THIN_LUA)),
            use_thin: true,
            settings,
            race: None,
            reader: None,
            reader_pause: Default::default(),
            unindexed: Default::default(),
            whole: Default::default(),
            chained: false,
        }
    }

    /// This applier's apply, thin and row index calls on a standalone Redis link into the
    /// fence's [`CallChain`]. For the stream's batches only, which run one at a time and
    /// in order: calls made beside them (keepalive progress, the periodic checks) stay
    /// out of it.
    pub fn chained(mut self) -> Applier {
        self.chained = true;
        self
    }

    /// The floor argument of a standalone call, and its number in the chain (0: none).
    fn single_floor(&self) -> (String, u64) {
        let f = &self.settings.fence;
        let floor = f.floor.load(std::sync::atomic::Ordering::SeqCst);
        if self.chained && f.token() != 0 {
            f.chain.link(floor)
        } else {
            (token_arg(floor), 0)
        }
    }

    /// Send thin apply's reads (and a cluster's per-slot calls) on `reader`'s connections
    /// (see [`reader`]). They read what every call awaited before them wrote, as on
    /// `con`: Redis runs a command only after those it answered before. A round that
    /// fails there goes through `con`, and so do the next 30 s of rounds.
    pub fn with_reader(mut self, reader: Option<std::sync::Arc<reader::HashReader>>) -> Applier {
        self.reader = reader;
        self
    }

    /// For tests: `race` runs between every thin read and its write, so a test can change
    /// the hashes in between (the compare-and-set must then leave them to the script).
    #[doc(hidden)]
    pub fn with_thin_race(mut self, race: ThinRace) -> Applier {
        self.race = Some(race);
        self
    }

    /// For tests: thin apply always reads whole hashes ([`WholeReads::Always`]; it
    /// starts at [`WholeReads::Fields`] and follows what it finds).
    #[doc(hidden)]
    pub fn always_whole_reads(self) -> Applier {
        self.whole.store(
            WholeReads::Always as u8,
            std::sync::atomic::Ordering::Relaxed,
        );
        self
    }

    /// How the next thin read round reads ([`WholeReads`]).
    pub fn whole_reads(&self) -> WholeReads {
        match self.whole.load(std::sync::atomic::Ordering::Relaxed) {
            1 => WholeReads::Whole,
            2 => WholeReads::Always,
            _ => WholeReads::Fields,
        }
    }

    /// After a read round of `n` hashes of which `new` did not exist: how the next reads.
    fn learn_whole(&self, n: usize, new: usize) {
        let next = match self.whole_reads() {
            WholeReads::Fields | WholeReads::Whole if n >= WHOLE_MIN_ROUND => {
                if new * 4 >= n * WHOLE_AT {
                    WholeReads::Whole
                } else {
                    WholeReads::Fields
                }
            }
            w => w,
        };
        self.whole
            .store(next as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every entry through the apply script, none thin (to compare the two).
    pub fn script_only(mut self) -> Applier {
        self.use_thin = false;
        self
    }

    /// The connection, for other commands.
    pub fn connection(&self) -> RedisCon {
        self.con.clone()
    }

    /// The settings.
    pub fn settings(&self) -> &ApplySettings {
        &self.settings
    }

    /// Apply a batch's entries (in order) and record `end` as the applied LSN, in one
    /// script call.
    pub async fn apply(
        &mut self,
        entries: &[Entry],
        end: Option<Lsn>,
        quiet: bool,
    ) -> Result<Applied, RedisSinkError> {
        if self.con.is_cluster() {
            return self.apply_cluster(entries, end, quiet).await;
        }
        if self.use_thin {
            return self.apply_thin(entries, end, quiet).await;
        }
        let all: Vec<&Entry> = entries.iter().collect();
        self.apply_script(&all, end, quiet).await
    }

    /// `entries` (in order) through the apply script, in one call.
    async fn apply_script(
        &mut self,
        entries: &[&Entry],
        end: Option<Lsn>,
        quiet: bool,
    ) -> Result<Applied, RedisSinkError> {
        let (floor, link) = self.single_floor();
        let cmd = encode_call(
            &self.settings,
            &Call::Single,
            entries,
            end,
            &floor,
            quiet,
            self.script.get_hash(),
        );
        match self.invoke(cmd).await {
            Ok(a) => {
                self.settings.fence.chain.returned(link);
                Ok(a)
            }
            Err(e) if e.code() == Some("WRONGTYPE") => Err(self.wrongtype(e, entries).await),
            Err(e) => Err(RedisSinkError::from_redis(e)),
        }
    }

    /// The entries of `entries` that can be applied thin, with their writes (by index in
    /// `entries`): one pipelined HMGET per candidate SKU, then [`thin::plan`]. A read the
    /// server refuses leaves every entry to the script.
    async fn plan_thin<'e>(
        &mut self,
        entries: &'e [Entry],
        quiet: bool,
    ) -> Result<Vec<(usize, thin::ThinWrite<'e>)>, RedisSinkError> {
        // A SKU with more than one entry in the call (a truncate's) stays with the script.
        let mut per_sku: HashMap<&str, u32, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(entries.len(), Default::default());
        for e in entries {
            *per_sku.entry(e.sku.as_str()).or_default() += 1;
        }
        let reads: Vec<(usize, Vec<std::borrow::Cow<str>>)> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| per_sku[e.sku.as_str()] == 1)
            .filter_map(|(i, e)| thin::reads(e, &self.settings).map(|f| (i, f)))
            .collect();
        let mut planned: Vec<(usize, thin::ThinWrite)> = Vec::with_capacity(reads.len());
        // In rounds of a bounded size: a batch of 10k SKUs would otherwise send and read
        // back megabytes at once (memory follows the round, not the batch).
        for reads in reads.chunks(THIN_READS_PER_ROUND) {
            let keys: Vec<String> = (reads.iter())
                .map(|(i, _)| layout::sku_key(&self.settings.prefix, &entries[*i].sku))
                .collect();
            // A pipeline of HMGETs (or HGETALLs) for redis-rs (a cluster's slot map places
            // them; the apply connection takes them when the reader's own fail).
            let whole = matches!(self.whole_reads(), WholeReads::Whole | WholeReads::Always);
            let pipeline = || {
                let mut pipe = redis::pipe();
                for ((_, f), key) in reads.iter().zip(&keys) {
                    if whole {
                        pipe.cmd("HGETALL").arg(key);
                        continue;
                    }
                    // sized once: a command per entry
                    let data = 5 + key.len() + f.iter().map(|x| x.len()).sum::<usize>();
                    let mut c = redis::Cmd::with_capacity(f.len() + 2, data);
                    c.arg("HMGET").arg(key);
                    for x in f {
                        c.arg(x.as_ref());
                    }
                    pipe.add_command(c);
                }
                pipe
            };
            let ours = match self.live_reader() {
                // Redis down, or only these connections failing (their TLS or ACL): the
                // apply connection decides
                Some(r) => {
                    // On a single Redis the commands are packed here, straight into the
                    // bytes sent (no `Cmd` per SKU, one copy less).
                    let replies = if r.is_single() {
                        let bytes: usize = (reads.iter().zip(&keys))
                            .map(|((_, f), k)| {
                                let fields = if whole {
                                    0
                                } else {
                                    f.iter().map(|x| x.len() + 8).sum()
                                };
                                40 + k.len() + fields
                            })
                            .sum();
                        let mut packed = Vec::with_capacity(bytes);
                        for ((_, f), key) in reads.iter().zip(&keys) {
                            if whole {
                                let args = [&b"HGETALL"[..], key.as_bytes()].into_iter();
                                resp::pack_command(&mut packed, 2, args);
                                continue;
                            }
                            let args = [&b"HMGET"[..], key.as_bytes()].into_iter();
                            let args = args.chain(f.iter().map(|x| x.as_bytes()));
                            resp::pack_command(&mut packed, f.len() + 2, args);
                        }
                        r.round_packed(&packed, reads.len()).await
                    } else {
                        r.round(&self.con, &pipeline()).await
                    };
                    replies.map_err(|e| self.reader_failed(&e))
                }
                None => Err(()),
            };
            let read = match ours {
                Ok(r) => Ok(ThinReads::Ours(r)),
                Err(()) => (pipeline().query_async(&mut self.con).await).map(ThinReads::Parsed),
            };
            let read = match read {
                Ok(r) => r,
                Err(e) => {
                    let e = RedisSinkError::from_redis(e);
                    if e.is_transient() {
                        return Err(e);
                    }
                    // Refused (a key of another type, say): the script's call hits the
                    // same refusal and names it (`wrongtype`).
                    ThinReads::Parsed(Vec::new())
                }
            };
            let (mut v, mut flat): (Vec<Option<&str>>, Vec<Option<&str>>) = Default::default();
            let mut new = 0;
            for (k, (i, f)) in reads.iter().enumerate() {
                // a reply that is not text is the script's to judge
                let out = if whole { &mut flat } else { &mut v };
                let text = match &read {
                    ThinReads::Ours(r) => k < r.len() && r.strings(k, out),
                    ThinReads::Parsed(values) => values.get(k).is_some_and(|x| hmget_reply(x, out)),
                };
                // the fields asked for, from the whole hash
                let text = text && (!whole || pick_fields(&flat, f, &mut v));
                // (a value per field asked for, or the script's too)
                if !text || v.len() != f.len() {
                    continue;
                }
                new += usize::from(v.iter().all(Option::is_none));
                if let Some(mut w) = thin::plan(&entries[*i], f, &v, &self.settings, quiet) {
                    if self.con.is_cluster() {
                        // A pruned minute's users key is left to its EXPIREAT, as apply.lua
                        // leaves it there: its name depends on the hash, so a call cannot
                        // declare it (see `user_keys`).
                        w.keys.retain(|op| !matches!(op, thin::KeyOp::Del(_)));
                    }
                    planned.push((*i, w));
                }
            }
            self.learn_whole(reads.len(), new);
        }
        if let Some(race) = &self.race
            && !planned.is_empty()
        {
            let keys = planned
                .iter()
                .map(|(i, _)| layout::sku_key(&self.settings.prefix, &entries[*i].sku))
                .collect();
            race(keys).await;
        }
        Ok(planned)
    }

    /// [`Applier::apply`] with the entries [`thin`] can work out applied thin: one
    /// pipelined HMGET per such SKU, then the script for the other entries (without
    /// `end`), then `thin.lua` for the planned ones (with `end`), then the script again
    /// for any whose hash changed in between (with `end`). Each write is fenced per SKU,
    /// so a crash or an error between the calls replays as after any partial apply.
    async fn apply_thin(
        &mut self,
        entries: &[Entry],
        end: Option<Lsn>,
        quiet: bool,
    ) -> Result<Applied, RedisSinkError> {
        let planned = self.plan_thin(entries, quiet).await?;
        self.write_thin(entries, planned, end, quiet).await
    }

    /// Reads and plans `entries` thin (see [`Applier::apply`]) without writing, for
    /// [`Applier::apply_planned`]: the daemon sends a call's reads ahead of the previous
    /// call's write, so that skusync plans while Redis writes. `None` where the call
    /// would not go thin (a cluster, the script only) or the read failed: the call then
    /// reads for itself. A hash written between this read and the write (a SKU in both
    /// calls) fails thin.lua's compare-and-set and goes to the script, as always.
    pub async fn plan_ahead<'e>(&mut self, entries: &'e [Entry]) -> Option<ThinPlan<'e>> {
        if !self.reads_ahead() {
            return None;
        }
        match self.plan_thin(entries, false).await {
            Ok(planned) => Some(ThinPlan { entries, planned }),
            Err(e) => {
                // the call reads for itself, and reports what it meets
                tracing::debug!(error = %e, "thin reads ahead failed");
                None
            }
        }
    }

    /// Whether [`Applier::plan_ahead`] plans (thin apply on a standalone Redis).
    pub fn reads_ahead(&self) -> bool {
        self.use_thin && !self.con.is_cluster()
    }

    /// [`Applier::apply`] (not quiet) with the reads and plan `plan` made for these
    /// `entries` by [`Applier::plan_ahead`] (`None`, or a plan of other entries: read
    /// now).
    pub async fn apply_planned(
        &mut self,
        entries: &[Entry],
        end: Option<Lsn>,
        plan: Option<ThinPlan<'_>>,
    ) -> Result<Applied, RedisSinkError> {
        match plan {
            Some(p) if std::ptr::eq(p.entries, entries) && self.reads_ahead() => {
                self.write_thin(entries, p.planned, end, false).await
            }
            _ => self.apply(entries, end, false).await,
        }
    }

    /// The writes of [`Applier::apply_thin`]: the script for the entries not in
    /// `planned`, `thin.lua` for those planned, the script for any it missed.
    async fn write_thin<'e>(
        &mut self,
        entries: &'e [Entry],
        planned: Vec<(usize, thin::ThinWrite<'e>)>,
        end: Option<Lsn>,
        quiet: bool,
    ) -> Result<Applied, RedisSinkError> {
        let mut is_thin = vec![false; entries.len()];
        for (i, _) in &planned {
            is_thin[*i] = true;
        }
        let rest: Vec<&Entry> = entries
            .iter()
            .zip(&is_thin)
            .filter(|(_, t)| !**t)
            .map(|(e, _)| e)
            .collect();
        if planned.is_empty() {
            return self.apply_script(&rest, end, quiet).await;
        }
        let mut applied = Applied::default();
        if !rest.is_empty() {
            applied += self.apply_script(&rest, None, quiet).await?;
        }
        let all: Vec<&(usize, thin::ThinWrite)> = planned.iter().collect();
        let (written, missed): (u64, Vec<usize>) = match self.invoke_thin(entries, &all, end).await
        {
            Ok(v) => redis::from_redis_value(v)
                .map_err(|e| RedisSinkError::from_redis(redis::RedisError::from(e)))?,
            Err(e) if e.code() == Some("WRONGTYPE") => {
                let all: Vec<&Entry> = planned.iter().map(|(i, _)| &entries[*i]).collect();
                return Err(self.wrongtype(e, &all).await);
            }
            Err(e) => return Err(RedisSinkError::from_redis(e)),
        };
        applied.applied += written;
        applied.thin += written;
        if !missed.is_empty() {
            let again: Option<Vec<&Entry>> = missed
                .iter()
                .map(|p| planned.get(*p).map(|(i, _)| &entries[*i]))
                .collect();
            let Some(again) = again else {
                return Err(RedisSinkError::Definite(
                    "the thin apply script named an entry it was not sent: is redis.url a \
                     Redis server?"
                        .into(),
                ));
            };
            applied += self.apply_script(&again, end, quiet).await?;
        }
        Ok(applied)
    }

    /// The `thin.lua` call for `planned` on a standalone Redis: packed here and sent on
    /// the reader's connection (in the 1M-row transaction's profile, building the call as
    /// a `Cmd` and having redis-rs pack it again was 17% of skusync's instructions), or,
    /// without a live reader, a forgotten script, or a reader that failed, through the
    /// apply connection. A call sent twice is harmless: the first one's writes moved
    /// their hashes' fences, so the second misses those entries, and the script then
    /// skips them as replays.
    async fn invoke_thin(
        &mut self,
        entries: &[Entry],
        planned: &[&(usize, thin::ThinWrite<'_>)],
        end: Option<Lsn>,
    ) -> Result<redis::Value, redis::RedisError> {
        // one link for both sends: the second runs only where the first did not
        let (floor, link) = self.single_floor();
        let call = Call::Single;
        if let Some(r) = self.live_reader().filter(|r| r.is_single()) {
            let mut packed: resp::Packer = self.thin_call(&call, entries, planned, end, &floor);
            match r.round_packed(packed.finish(), 1).await {
                Ok(replies) => match replies.value(0).and_then(|v| v.extract_error()) {
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {}
                    r => {
                        if r.is_ok() {
                            self.settings.fence.chain.returned(link);
                        }
                        return r;
                    }
                },
                Err(e) => self.reader_failed(&e),
            }
        }
        let cmd = self.thin_call(&call, entries, planned, end, &floor);
        let r = invoke_value(&mut self.con, cmd, THIN_LUA).await;
        if r.is_ok() {
            self.settings.fence.chain.returned(link);
        }
        r
    }

    /// One `thin.lua` call for `planned` (entries by index in `entries`, with their
    /// writes): on a standalone Redis (`Call::Single`) or on one slot of a cluster; as a
    /// redis-rs `Cmd`, or packed as RESP bytes for the reader's connection.
    /// `floor`: the call's floor argument (for a slot, its floor; standalone, see
    /// [`Applier::single_floor`]).
    fn thin_call<A: resp::Args>(
        &self,
        call: &Call,
        entries: &[Entry],
        planned: &[&(usize, thin::ThinWrite)],
        end: Option<Lsn>,
        floor: &str,
    ) -> A {
        let (nargs, bytes) = thin_size(&self.settings.prefix, entries, planned);
        let mut c = A::sized(nargs, bytes);
        self.encode_thin_into(&mut c, call, entries, planned, end, floor);
        c
    }

    fn encode_thin_into<A: resp::Args>(
        &self,
        c: &mut A,
        call: &Call,
        entries: &[Entry],
        planned: &[&(usize, thin::ThinWrite)],
        end: Option<Lsn>,
        floor: &str,
    ) {
        let s = &self.settings;
        let (meta, cluster) = match call {
            Call::Single => (layout::meta_key(&s.prefix), false),
            Call::Slot(slot) => (layout::slot_meta_key(&s.prefix, *slot), true),
        };
        // On a cluster the distinct-user keys are declared too (after the SKU hashes;
        // the script names them itself): see `user_keys`.
        let users: Vec<(usize, &str)> = if cluster {
            let mut v: Vec<(usize, &str)> = planned
                .iter()
                .flat_map(|(i, w)| {
                    // (no Del on a cluster: see `plan_thin`)
                    w.keys.iter().filter_map(move |op| match op {
                        thin::KeyOp::Del(_) => None,
                        thin::KeyOp::Add(k, _) | thin::KeyOp::ExpireAt(k, _) => {
                            Some((*i, k.as_str()))
                        }
                    })
                })
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        } else {
            Vec::new()
        };
        c.bytes(b"EVALSHA");
        c.bytes(self.thin.get_hash().as_bytes());
        c.int(planned.len() + users.len() + if cluster { 1 } else { 2 });
        c.bytes(meta.as_bytes());
        for (i, _) in planned {
            let tag = layout::sku_tag(&entries[*i].sku);
            c.parts(&[s.prefix.as_bytes(), b":{", tag.as_bytes(), b"}"]);
        }
        for (i, suffix) in &users {
            let tag = layout::sku_tag(&entries[*i].sku);
            c.parts(&[
                s.prefix.as_bytes(),
                b":{",
                tag.as_bytes(),
                b"}",
                suffix.as_bytes(),
            ]);
        }
        if !cluster {
            c.bytes(layout::changes_key(&s.prefix).as_bytes());
        }
        match end {
            Some(e) => c.int(e.0),
            None => c.bytes(b""),
        }
        c.bytes(token_arg(s.fence.token()).as_bytes());
        c.bytes(floor.as_bytes());
        c.bytes(if cluster { b"1" } else { b"0" });
        for (k, (_, w)) in planned.iter().enumerate() {
            c.int(k + 2);
            // '' where the read found no fence
            match w.expect_lsn {
                Some(l) => c.int(l),
                None => c.bytes(b""),
            };
            match w.expect_piece {
                Some(p) => c.int(p),
                None => c.bytes(b""),
            };
            c.int(w.lsn);
            c.int(w.set.len());
            for (f, v) in w.set.iter() {
                c.bytes(f.as_bytes());
                c.bytes(v.as_bytes());
            }
            c.int(w.del.len());
            for f in &w.del {
                c.bytes(f.as_bytes());
            }
            encode_key_ops(c, &w.keys);
        }
    }

    /// [`Applier::apply`] on a Redis Cluster: thin apply's calls first
    /// ([`Applier::apply_cluster_thin`]), then one script call per slot for the rest (in
    /// the entries' order within it), the slots concurrently. Each call is fenced by its
    /// slot's meta copy (writer token, slot floor) and records its mark there (`end`, or
    /// the slot's highest LSN, thin entries included); then the change index and the
    /// alert history get what the calls reported, and `end` goes to the meta hash.
    /// A crash between calls leaves each slot applied or not: the replay skips the first
    /// (fenced per SKU, and still reported for the change index) and applies the rest.
    async fn apply_cluster(
        &mut self,
        entries: &[Entry],
        end: Option<Lsn>,
        quiet: bool,
    ) -> Result<Applied, RedisSinkError> {
        let prefix = self.settings.prefix.clone();
        let slots: Vec<u16> = entries
            .iter()
            .map(|e| slot_of(layout::sku_key(&prefix, &e.sku).as_bytes()))
            .collect();
        // what each slot's meta copy records: no LSN of the call (thin or not) is above it
        let mut marks: HashMap<u16, Lsn> = HashMap::new();
        for (e, slot) in entries.iter().zip(&slots) {
            let m = marks.entry(*slot).or_insert(Lsn(0));
            *m = end.unwrap_or((*m).max(e.last.0));
        }
        let mut total = Applied::default();
        // what an earlier call could not index goes with this one's
        let mut changes = {
            let mut u = self.unindexed.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut u.changes)
        };
        let mut alerts = Vec::new();
        let done = if self.use_thin {
            match self
                .apply_cluster_thin(entries, &slots, &marks, quiet, &mut total, &mut changes)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    self.keep_unindexed(changes);
                    return Err(e);
                }
            }
        } else {
            vec![false; entries.len()]
        };
        let mut groups: std::collections::BTreeMap<u16, Vec<&Entry>> = Default::default();
        for ((e, slot), _) in entries.iter().zip(&slots).zip(&done).filter(|(_, d)| !**d) {
            groups.entry(*slot).or_default().push(e);
        }
        let sha = self.script.get_hash().to_string();
        let settings = &self.settings.clone();
        let mut con = self.con.clone();
        // One pipeline of every slot's call: split per primary (each node's calls in one
        // round trip, in slot order), replies in the same order.
        let slot_call = |slot: u16, group: &[&Entry], mark: Lsn| {
            let floor = token_arg(settings.fence.slots.get(slot));
            encode_call(
                settings,
                &Call::Slot(slot),
                group,
                Some(mark),
                &floor,
                quiet,
                &sha,
            )
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut calls = Vec::with_capacity(groups.len());
        for (slot, group) in groups {
            let mark = marks[&slot];
            pipe.add_command(slot_call(slot, &group, mark));
            calls.push((slot, mark, group));
        }
        let replies = if calls.is_empty() {
            Vec::new()
        } else {
            self.slot_calls(&pipe).await?
        };
        let mut failed = None;
        for ((slot, mark, group), r) in calls.into_iter().zip(replies) {
            let r = match r {
                // a primary that never ran the script (new, or promoted): load it, again
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    invoke_value(&mut con, slot_call(slot, &group, mark), APPLY_LUA).await
                }
                r => r,
            };
            match r.and_then(|v| parse_cluster_reply(v, &prefix, &group, &mut changes, &mut alerts))
            {
                Ok(a) => {
                    total += a;
                    settings.fence.slots.raise(slot, mark.0);
                }
                Err(e) if failed.is_some() => {
                    tracing::debug!(error = %describe(&e), "another slot's apply call failed too");
                }
                Err(e) => failed = Some((slot, group, e)),
            }
        }
        // Indexed even when a call failed: what the others applied is in Redis.
        if let Err(e) = self.index_cluster(&changes, &alerts).await {
            self.keep_unindexed(changes);
            return Err(e);
        }
        if let Some((slot, group, e)) = failed {
            if e.code() == Some("WRONGTYPE") {
                return Err(self.wrongtype(e, &group).await);
            }
            return Err(self.slot_failed(slot, RedisSinkError::from_redis(e)).await);
        }
        if let Some(end) = end {
            self.mark_unmarked(end).await?;
            self.raise_applied(end).await?;
        }
        Ok(total)
    }

    /// Thin apply on a Redis Cluster, before the slots' script calls (`slots`: each
    /// entry's slot; `marks`: each slot's mark): [`Applier::plan_thin`], then one
    /// `thin.lua` call per slot with planned entries (pipelined, split per primary),
    /// fenced by the slot's meta copy like the script's calls. A slot whose entries in
    /// this call were all written records its mark there and raises its floor; the others
    /// record it with their script call. Returns which entries were written (their
    /// changes go to `changes`); what a call missed, and every other entry, is the
    /// script's.
    async fn apply_cluster_thin(
        &mut self,
        entries: &[Entry],
        slots: &[u16],
        marks: &HashMap<u16, Lsn>,
        quiet: bool,
        total: &mut Applied,
        changes: &mut Vec<(u64, String)>,
    ) -> Result<Vec<bool>, RedisSinkError> {
        let mut done = vec![false; entries.len()];
        let planned = self.plan_thin(entries, quiet).await?;
        if planned.is_empty() {
            return Ok(done);
        }
        let prefix = self.settings.prefix.clone();
        // per slot: its entries in the call, and the planned ones (positions in `planned`)
        let mut by_slot: std::collections::BTreeMap<u16, (usize, Vec<usize>)> = Default::default();
        for slot in slots {
            by_slot.entry(*slot).or_default().0 += 1;
        }
        for (p, (i, _)) in planned.iter().enumerate() {
            if let Some(v) = by_slot.get_mut(&slots[*i]) {
                v.1.push(p);
            }
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut calls = Vec::new();
        for (slot, (n, ps)) in by_slot {
            if ps.is_empty() {
                continue;
            }
            let mark = marks[&slot];
            let whole = ps.len() == n;
            let items: Vec<&(usize, thin::ThinWrite)> = ps.iter().map(|p| &planned[*p]).collect();
            pipe.add_command(self.thin_call(
                &Call::Slot(slot),
                entries,
                &items,
                whole.then_some(mark),
                &token_arg(self.settings.fence.slots.get(slot)),
            ));
            calls.push((slot, mark, whole, ps));
        }
        let mut con = self.con.clone();
        let replies = self.slot_calls(&pipe).await?;
        let mut failed = None;
        for ((slot, mark, whole, ps), r) in calls.into_iter().zip(replies) {
            let r = match r {
                // a primary that never ran the script (new, or promoted): load it, again
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    let items: Vec<&(usize, thin::ThinWrite)> =
                        ps.iter().map(|p| &planned[*p]).collect();
                    let cmd: redis::Cmd = self.thin_call(
                        &Call::Slot(slot),
                        entries,
                        &items,
                        whole.then_some(mark),
                        &token_arg(self.settings.fence.slots.get(slot)),
                    );
                    invoke_value(&mut con, cmd, THIN_LUA).await
                }
                r => r,
            };
            let r = r.and_then(|v| {
                redis::from_redis_value::<(u64, Vec<usize>)>(v).map_err(redis::RedisError::from)
            });
            match r {
                Ok((_, missed)) if missed.iter().any(|k| *k >= ps.len()) => {
                    return Err(RedisSinkError::Definite(
                        "the thin apply script named an entry it was not sent: is redis.url a \
                         Redis server?"
                            .into(),
                    ));
                }
                Ok((written, missed)) => {
                    for (k, p) in ps.iter().enumerate() {
                        let (i, w) = &planned[*p];
                        if missed.contains(&k) {
                            continue;
                        }
                        done[*i] = true;
                        changes.push((w.lsn, layout::sku_key(&prefix, &entries[*i].sku)));
                    }
                    total.applied += written;
                    total.thin += written;
                    if whole && missed.is_empty() {
                        self.settings.fence.slots.raise(slot, mark.0);
                    }
                }
                Err(e) if failed.is_some() => {
                    tracing::debug!(error = %describe(&e), "another slot's thin apply call failed too");
                }
                Err(e) => failed = Some((slot, ps, e)),
            }
        }
        if let Some((slot, ps, e)) = failed {
            // what the other calls wrote is in Redis: index it (kept for the retry if
            // that fails too: see `unindexed`)
            self.index_cluster(changes, &[]).await?;
            changes.clear();
            if e.code() == Some("WRONGTYPE") {
                let all: Vec<&Entry> = ps.iter().map(|p| &entries[planned[*p].0]).collect();
                return Err(self.wrongtype(e, &all).await);
            }
            return Err(self.slot_failed(slot, RedisSinkError::from_redis(e)).await);
        }
        Ok(done)
    }

    /// A pipeline of per-slot calls on a cluster, each reply or the error it was, in
    /// order: on the reader's connections when there is one (each primary's calls in one
    /// round trip, replies read without redis-rs' cluster connection; a redirected call
    /// goes again through it, see [`reader`]), else split per primary on `con`, and so
    /// when the reader's round failed. A call sent twice (the reader's pooled connection
    /// had been closed, or its round failed after the call ran) is fenced like any replay.
    async fn slot_calls(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<Vec<redis::RedisResult<redis::Value>>, RedisSinkError> {
        if let Some(r) = self.live_reader() {
            match r.round(&self.con, pipe).await {
                Ok(replies) => {
                    return Ok((0..replies.len())
                        .map(|i| replies.value(i).and_then(|v| v.extract_error()))
                        .collect());
                }
                // Redis down, or only these connections failing: the split pipeline
                // decides (the calls that had run are skipped by their fences)
                Err(e) => self.reader_failed(&e),
            }
        }
        let values: Vec<redis::Value> = pipe
            .query_async(&mut self.con.clone())
            .await
            .map_err(RedisSinkError::from_redis)?;
        Ok(values.into_iter().map(|v| v.extract_error()).collect())
    }

    /// The reader, unless one of its rounds failed in the last 30 s: then the apply
    /// connection serves (a reader that cannot connect would otherwise cost its connect
    /// timeout on every call).
    fn live_reader(&self) -> Option<&std::sync::Arc<reader::HashReader>> {
        let paused = self.reader_pause.load(std::sync::atomic::Ordering::Relaxed);
        self.reader
            .as_ref()
            .filter(|_| crate::telemetry::unix_ms() >= paused)
    }

    fn reader_failed(&self, e: &redis::RedisError) {
        reader::node_failed(e);
        self.reader_pause.store(
            crate::telemetry::unix_ms() + 30_000,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// A cluster call's error. A slot whose meta copy is below what this writer recorded
    /// there (a failover lost that slot's last writes, which the replication slot already
    /// confirmed past), or gone (its node lost its data), is not repaired by a replay, and
    /// the meta hash (another slot) does not show it: it is marked stale here, so the
    /// restart rebuilds.
    async fn slot_failed(&mut self, slot: u16, e: RedisSinkError) -> RedisSinkError {
        if !matches!(e, RedisSinkError::Rollback(_) | RedisSinkError::NoMeta) {
            return e;
        }
        tracing::warn!(slot, error = %e, "a Redis Cluster slot lost recent writes (a failover to a replica that was behind, or a node that restarted empty): rebuilding");
        if let Err(w) = write_meta(
            &mut self.con,
            &self.settings.prefix,
            self.settings.fence.token(),
            &[("bootstrap", "stale".into())],
        )
        .await
        {
            tracing::warn!(error = %w, "could not mark Redis stale after a slot's rollback");
        }
        e
    }

    /// Keep a cluster call's index entries for the next call (see `unindexed`).
    fn keep_unindexed(&self, changes: Vec<(u64, String)>) {
        let mut u = self.unindexed.lock().unwrap_or_else(|p| p.into_inner());
        u.changes = changes;
    }

    /// The change index and alert history entries reported by cluster apply calls.
    async fn index_cluster(
        &mut self,
        changes: &[(u64, String)],
        alerts: &[[String; 6]],
    ) -> Result<(), RedisSinkError> {
        let prefix = self.settings.prefix.clone();
        let prefix = &prefix;
        // Each chunk in one call with a mark in the change index's slot's meta copy, as
        // the other writes: a failover that loses only these raises that slot's floor
        // alarm too (the change index would miss SKUs that changed, for every catch-up).
        let changes_key = layout::changes_key(prefix);
        let slot = slot_of(changes_key.as_bytes());
        let script = redis::Script::new(CHANGES_LUA);
        for chunk in changes.chunks(1000) {
            let mark = chunk.iter().map(|(lsn, _)| *lsn).max().unwrap_or(0);
            let mut inv = self.slot_marked(&script, slot, &changes_key, mark);
            for (lsn, key) in chunk {
                inv.arg(*lsn).arg(key);
            }
            self.invoke_slot_marked(inv, slot, mark).await?;
        }
        if alerts.is_empty() {
            return Ok(());
        }
        crate::failpoint::hit("before-cluster-alerts");
        // In commit order, as one call would have added them; once each (the calls of a
        // retry or a replay report again what they raised).
        let lsn_of = |a: &[String; 6]| a[4].parse::<u64>().unwrap_or(0);
        let mut alerts = alerts.to_vec();
        alerts.sort_by(|a, b| (lsn_of(a), &a[0], &a[1]).cmp(&(lsn_of(b), &b[0], &b[1])));
        alerts.dedup_by(|a, b| a[4] == b[4] && a[0] == b[0] && a[1] == b[1]);
        let alerts_key = layout::alerts_key(prefix);
        let slot = slot_of(alerts_key.as_bytes());
        let history = self.settings.alert_history.max(1).to_string();
        let age = self.settings.alert_history_age_ms;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let cutoff = if age > 0 && now > age {
            (now - age).to_string()
        } else {
            String::new()
        };
        let indexed = self
            .settings
            .fence
            .floor
            .load(std::sync::atomic::Ordering::SeqCst)
            .to_string();
        let script = redis::Script::new(ALERTS_LUA);
        for chunk in alerts.chunks(ALERTS_PER_CALL) {
            let mark = chunk.iter().map(lsn_of).max().unwrap_or(0);
            let mut inv = self.slot_marked(&script, slot, &alerts_key, mark);
            inv.arg(&history).arg(&cutoff).arg(&indexed);
            for a in chunk {
                for x in a {
                    inv.arg(x);
                }
            }
            self.invoke_slot_marked(inv, slot, mark).await?;
        }
        crate::failpoint::hit("after-cluster-alerts");
        Ok(())
    }

    /// A call of `script` (one starting with `fenced_by_meta!` that records `mark` as its
    /// slot copy's `applied_lsn`) on `key` of `slot`: KEYS the slot's meta copy and `key`,
    /// ARGV the writer's token, the slot's floor and `mark`; the caller adds the rest.
    fn slot_marked<'s>(
        &self,
        script: &'s redis::Script,
        slot: u16,
        key: &str,
        mark: u64,
    ) -> redis::ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        inv.key(layout::slot_meta_key(&self.settings.prefix, slot))
            .key(key)
            .arg(token_arg(self.settings.fence.token()))
            .arg(token_arg(self.settings.fence.slots.get(slot)))
            .arg(mark);
        inv
    }

    /// Run a [`Applier::slot_marked`] call; its slot's floor rises to `mark`.
    async fn invoke_slot_marked(
        &mut self,
        inv: redis::ScriptInvocation<'_>,
        slot: u16,
        mark: u64,
    ) -> Result<(), RedisSinkError> {
        let r: Result<i64, _> = inv.invoke_async(&mut self.con).await;
        if let Err(e) = r {
            return Err(self.slot_failed(slot, RedisSinkError::from_redis(e)).await);
        }
        self.settings.fence.slots.raise(slot, mark);
        Ok(())
    }

    /// On a Redis Cluster, before a rebuild resets the SKU hashes: add to the alert
    /// history the alerts they hold past the writer's floor, raised by a batch whose
    /// process died before adding them (a replay would add them; a rebuild replays
    /// nothing). The history's record of what it added (see `ALERTS_LUA`) keeps any from
    /// going in twice. Returns how many were reported.
    pub async fn add_unindexed_alerts(&mut self) -> Result<usize, RedisSinkError> {
        if !self.con.is_cluster() {
            return Ok(0);
        }
        let prefix = self.settings.prefix.clone();
        // every alert up to what the meta hash records is in the history (a rebuild at
        // startup runs before the writer's floor is seeded from it)
        let recorded: Option<u64> = redis::cmd("HGET")
            .arg(layout::meta_key(&prefix))
            .arg("applied_lsn")
            .query_async(&mut self.con)
            .await
            .map_err(RedisSinkError::from_redis)?;
        let floor = self
            .settings
            .fence
            .floor
            .load(std::sync::atomic::Ordering::SeqCst)
            .max(recorded.unwrap_or(0));
        // A SCAN page at a time (memory follows the page and the alerts past the floor,
        // which only the last batch can have raised). A hash on two pages is read twice;
        // the history's record keeps its alerts from going in twice.
        let mut alerts: Vec<[String; 6]> = Vec::new();
        let mut unreadable = 0usize;
        let mut at = Some(ScanAt::default());
        while let Some(pos) = at {
            let (next, skus) = sku_page(&mut self.con, &prefix, pos).await?;
            at = next;
            let got = hget_each(&mut self.con, &prefix, &skus, "alert_history").await?;
            for (sku, raw) in skus.iter().zip(got) {
                let Some(raw) = raw else { continue };
                // [[type, available, threshold, lsn, ts], ...] (apply.lua)
                let Ok(list) = serde_json::from_str::<Vec<[String; 5]>>(&raw) else {
                    unreadable += 1;
                    continue;
                };
                let key = layout::sku_key(&prefix, sku);
                for [kind, avail, thr, lsn, ts] in list {
                    if lsn.parse::<u64>().is_ok_and(|l| l > floor) {
                        alerts.push([key.clone(), kind, avail, thr, lsn, ts]);
                    }
                }
            }
        }
        let n = alerts.len();
        if n > 0 {
            // in commit order, all at once
            self.index_cluster(&[], &alerts).await?;
        }
        // The hashes' record goes now, before the reset starts the history's record of
        // what it added over: a rebuild stopped in between must not add them again.
        let mut at = Some(ScanAt::default());
        while let Some(pos) = at {
            let (next, skus) = sku_page(&mut self.con, &prefix, pos).await?;
            at = next;
            if skus.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for sku in &skus {
                pipe.cmd("HDEL")
                    .arg(layout::sku_key(&prefix, sku))
                    .arg("alert_history")
                    .ignore();
            }
            pipe.query_async::<()>(&mut self.con)
                .await
                .map_err(RedisSinkError::from_redis)?;
        }
        if unreadable > 0 {
            tracing::warn!(
                hashes = unreadable,
                "SKU hashes hold an alert_history field that is not skusync's JSON; skipped"
            );
        }
        Ok(n)
    }

    /// After a snapshot load on a cluster: record the slots' floors its calls raised in
    /// the meta hash (`floor:<slot>`, with `applied_lsn` raised to `at`), so a restart
    /// before the stream's first batch still checks the slots against them.
    pub async fn record_load_floors(&mut self, at: Lsn) -> Result<(), RedisSinkError> {
        if !self.con.is_cluster() {
            return Ok(());
        }
        self.raise_applied(at).await
    }

    /// Record `end` as the applied LSN in the meta hash (a cluster's batch ends after all
    /// its slots' calls), fenced by the writer's token and floor.
    async fn raise_applied(&mut self, end: Lsn) -> Result<(), RedisSinkError> {
        let floor = self
            .settings
            .fence
            .floor
            .load(std::sync::atomic::Ordering::SeqCst);
        let meta = layout::meta_key(&self.settings.prefix);
        let token = token_arg(self.settings.fence.token());
        // On a cluster, the slots' floors raised since the last call go with applied_lsn
        // (the last chunk in the same call): whatever the slot confirms past, a restart
        // can check. Chunks, as Lua unpacks at most about 8,000 values at once; an early
        // chunk records true floors, which is safe whatever follows.
        let dirty = if self.con.is_cluster() {
            self.settings.fence.slots.take_dirty()
        } else {
            Vec::new()
        };
        let script = redis::Script::new(ROW_INDEX_LUA);
        let chunks: Vec<&[(u16, u64)]> = if dirty.is_empty() {
            vec![&[]]
        } else {
            dirty.chunks(FLOORS_PER_CALL).collect()
        };
        let n = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut inv = script.prepare_invoke();
            inv.key(&meta).arg(&token).arg(token_arg(floor));
            inv.arg(if i + 1 == n {
                end.0.to_string()
            } else {
                String::new()
            });
            if !chunk.is_empty() {
                inv.key(&meta).arg(chunk.len());
                for (slot, lsn) in chunk {
                    inv.arg(format!("{FLOOR_FIELD}{slot}"))
                        .arg(format!("={lsn}"));
                }
            }
            let r: Result<i64, _> = inv.invoke_async(&mut self.con).await;
            if let Err(e) = r {
                self.settings
                    .fence
                    .slots
                    .redirty(dirty.iter().map(|(s, _)| *s));
                return Err(RedisSinkError::from_redis(e));
            }
        }
        Ok(())
    }

    /// On a Redis Cluster, the first slot whose meta copy is below this writer's floor
    /// for it (a failover lost its last writes), as the rollback to report; `None` when
    /// every slot holds what was recorded (or on a standalone Redis). Read periodically,
    /// so a slot that is not written again is caught too.
    pub async fn check_slots(&mut self) -> Result<Option<RedisSinkError>, RedisSinkError> {
        if !self.con.is_cluster() {
            return Ok(None);
        }
        let floors = self.settings.fence.slots.all();
        for chunk in floors.chunks(2000) {
            let mut pipe = redis::pipe();
            for (slot, _) in chunk {
                pipe.cmd("HMGET")
                    .arg(layout::slot_meta_key(&self.settings.prefix, *slot))
                    .arg("applied_lsn")
                    .arg("writer")
                    .arg(REBUILD_FIELD);
            }
            let got: Vec<(Option<u64>, Option<String>, Option<String>)> = pipe
                .query_async(&mut self.con)
                .await
                .map_err(RedisSinkError::from_redis)?;
            let ours = self.settings.fence.token().to_string();
            let mark = self.settings.fence.slots.rebuild_mark();
            for ((slot, floor), (held, writer, rebuilt)) in chunk.iter().zip(got) {
                if let Some(m) = &mark
                    && held.is_some()
                    && rebuilt.as_deref() != Some(m.as_str())
                {
                    // a copy from before the last rebuild's reset: its node missed it
                    let e = RedisSinkError::Rollback(format!(
                        "{} (a meta copy from before the last rebuild)",
                        held.unwrap_or(0)
                    ));
                    return Ok(Some(self.slot_failed(*slot, e).await));
                }
                if held.is_none() && writer.is_none() {
                    return Ok(Some(self.slot_failed(*slot, RedisSinkError::NoMeta).await));
                }
                if writer.as_deref() != Some(ours.as_str()) {
                    let w = writer.unwrap_or_else(|| "none".into());
                    return Ok(Some(RedisSinkError::Fenced(w)));
                }
                if held.unwrap_or(0) < *floor {
                    let e = RedisSinkError::Rollback(
                        held.map_or_else(|| "none".into(), |h| h.to_string()),
                    );
                    return Ok(Some(self.slot_failed(*slot, e).await));
                }
            }
        }
        Ok(None)
    }

    /// The definite error for a WRONGTYPE reply, naming the keys of the call that hold
    /// another type (Redis' reply names none). Only key names and types: no values.
    async fn wrongtype(&mut self, e: redis::RedisError, entries: &[&Entry]) -> RedisSinkError {
        let prefix = &self.settings.prefix;
        let mut keys = vec![layout::meta_key(prefix)];
        let mut seen = std::collections::HashSet::new();
        keys.extend(
            entries
                .iter()
                .filter(|e| seen.insert(e.sku.as_str()))
                .map(|e| layout::sku_key(prefix, &e.sku)),
        );
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.cmd("TYPE").arg(k);
        }
        let types: Vec<String> = match pipe.query_async(&mut self.con).await {
            Ok(t) => t,
            // the reply alone still stops the daemon
            Err(_) => return RedisSinkError::from_redis(e),
        };
        let wrong: Vec<String> = keys
            .iter()
            .zip(&types)
            .filter(|(_, t)| !matches!(t.as_str(), "hash" | "none"))
            .map(|(k, t)| format!("{:?} ({t})", crate::secret::log_value(k)))
            .collect();
        let which = match wrong.len() {
            0 => format!(
                "A distinct-user key ({}:u:...) of one of this call's SKUs is not a \
                 HyperLogLog.",
                layout::sku_key(prefix, "<SKU>")
            ),
            1..=5 => format!("Not a hash: {}.", wrong.join(", ")),
            n => format!("Not a hash: {} and {} more.", wrong[..5].join(", "), n - 5),
        };
        let reply = describe(&e);
        let stop = if reply.ends_with('.') { "" } else { "." };
        RedisSinkError::Definite(format!(
            "{reply}{stop} {which} skusync owns every key under redis.prefix {prefix:?}: \
             delete those keys, then run `skusync resync`"
        ))
    }

    /// Apply pieces one entry each (no merging: snapshot loads, tests).
    pub async fn apply_pieces(
        &mut self,
        pieces: &[Piece],
        end: Option<Lsn>,
        quiet: bool,
    ) -> Result<Applied, RedisSinkError> {
        let mut b = Batch::new(Lsn(u64::MAX));
        for p in pieces {
            b.push(p.clone());
        }
        self.apply(&b.take(), end, quiet).await
    }

    /// Evaluate low-stock alerts of the given SKUs at the end of a transaction that
    /// truncated a stock table (see [`Batch::evaluate`]).
    pub async fn evaluate(
        &mut self,
        fence: crate::fold::batch::Fence,
        commit_ms: i64,
        skus: &[String],
    ) -> Result<Applied, RedisSinkError> {
        self.apply(&Batch::evaluate(fence, commit_ms, skus), None, false)
            .await
    }

    /// Clear truncated tables from the given SKU keys, fenced by the truncate piece.
    pub async fn truncate(
        &mut self,
        piece: &Piece,
        skus: &[String],
    ) -> Result<Applied, RedisSinkError> {
        self.apply(&Batch::truncate(piece, skus), None, false).await
    }

    /// Mark (or clear) in the meta hash that a batch changing lookup state is being
    /// written (`index_pending`): found at a start, Redis is rebuilt (see
    /// `daemon::apply::launch`).
    pub async fn mark_index_pending(&mut self, on: bool) -> Result<(), RedisSinkError> {
        let v = if on { "1" } else { "" };
        if self.con.is_cluster() {
            return write_meta(
                &mut self.con,
                &self.settings.prefix,
                self.settings.fence.token(),
                &[("index_pending", v.to_string())],
            )
            .await;
        }
        // fenced and chained like the batch's other calls: a Redis that lost the mark
        // refuses the batch's next call
        let (floor, link) = self.single_floor();
        let _: i64 = redis::Script::new(INDEX_MARK_LUA)
            .key(layout::meta_key(&self.settings.prefix))
            .arg(token_arg(self.settings.fence.token()))
            .arg(floor)
            .arg(v)
            .invoke_async(&mut self.con)
            .await
            .map_err(RedisSinkError::from_redis)?;
        self.settings.fence.chain.returned(link);
        Ok(())
    }

    /// Record where indexed rows are held now (row field -> SKU, `None` to remove), after
    /// the SKU entries of the same pieces were applied; `end` goes with the last call.
    pub async fn write_row_index<'a>(
        &mut self,
        updates: impl IntoIterator<Item = (&'a String, &'a Option<String>)>,
        end: Option<Lsn>,
    ) -> Result<(), RedisSinkError> {
        let prefix = self.settings.prefix.clone();
        let token = token_arg(self.settings.fence.token());
        let script = redis::Script::new(ROW_INDEX_LUA);
        let all: Vec<(&String, &Option<String>)> = updates.into_iter().collect();
        let chunks: Vec<&[(&String, &Option<String>)]> = if all.is_empty() {
            vec![&[]]
        } else {
            all.chunks(2000).collect()
        };
        let n = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            // bucket key -> updates
            let mut by_key: std::collections::BTreeMap<String, Vec<(String, &Option<String>)>> =
                Default::default();
            for &(f, v) in chunk {
                let Some((key, field)) = layout::state_slot(&prefix, f) else {
                    continue;
                };
                by_key.entry(key).or_default().push((field, v));
            }
            if self.con.is_cluster() {
                // One call per bucket, fenced by its slot's meta copy. With the batch's end
                // each records it there and raises the slot's floor, so a failover that
                // loses only these writes is caught like one that loses SKU hashes.
                let mark = end.map(|e| e.0.to_string()).unwrap_or_default();
                for (k, ups) in &by_key {
                    let slot = slot_of(k.as_bytes());
                    let mut inv = script.prepare_invoke();
                    inv.key(layout::slot_meta_key(&prefix, slot)).key(k);
                    inv.arg(&token)
                        .arg(token_arg(self.settings.fence.slots.get(slot)))
                        .arg(&mark)
                        .arg(ups.len());
                    for (f, v) in ups {
                        inv.arg(f.as_str());
                        match v {
                            Some(sku) => inv.arg(format!("={sku}")),
                            None => inv.arg(""),
                        };
                    }
                    let r: Result<i64, _> = inv.invoke_async(&mut self.con).await;
                    if let Err(e) = r {
                        return Err(self.slot_failed(slot, RedisSinkError::from_redis(e)).await);
                    }
                    match end {
                        Some(e) => self.settings.fence.slots.raise(slot, e.0),
                        None => self.keep_unmarked(&[slot]),
                    }
                }
                continue;
            }
            let (floor, link) = self.single_floor();
            let mut inv = script.prepare_invoke();
            inv.key(layout::meta_key(&prefix));
            for k in by_key.keys() {
                inv.key(k);
            }
            inv.arg(&token).arg(&floor);
            inv.arg(if i + 1 == n {
                end.map(|e| e.0.to_string()).unwrap_or_default()
            } else {
                String::new()
            });
            for ups in by_key.values() {
                inv.arg(ups.len());
                for (f, v) in ups {
                    inv.arg(f.as_str());
                    match v {
                        Some(sku) => inv.arg(format!("={sku}")),
                        None => inv.arg(""),
                    };
                }
            }
            let _: i64 = inv
                .invoke_async(&mut self.con)
                .await
                .map_err(RedisSinkError::from_redis)?;
            self.settings.fence.chain.returned(link);
        }
        if self.con.is_cluster()
            && let Some(end) = end
        {
            self.mark_unmarked(end).await?;
            self.raise_applied(end).await?;
        }
        Ok(())
    }

    /// On a cluster, record `end` in the meta copies of the slots whose lookup state
    /// earlier pieces of the transaction wrote (see [`Unindexed::unmarked`]) and raise
    /// their floors: one mark-only call each, fenced like the writes.
    async fn mark_unmarked(&mut self, end: Lsn) -> Result<(), RedisSinkError> {
        let slots: Vec<u16> = std::mem::take(
            &mut self
                .unindexed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unmarked,
        )
        .into_iter()
        .filter(|s| self.settings.fence.slots.get(*s) < end.0)
        .collect();
        if slots.is_empty() {
            return Ok(());
        }
        let prefix = self.settings.prefix.clone();
        let token = token_arg(self.settings.fence.token());
        // one pipeline, split per primary (EVAL: a primary may not have the script)
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for &slot in &slots {
            pipe.cmd("EVAL")
                .arg(ROW_INDEX_LUA)
                .arg(1)
                .arg(layout::slot_meta_key(&prefix, slot))
                .arg(&token)
                .arg(token_arg(self.settings.fence.slots.get(slot)))
                .arg(end.0.to_string());
        }
        let replies = match self.slot_calls(&pipe).await {
            Ok(r) => r,
            Err(e) => {
                self.keep_unmarked(&slots);
                return Err(e);
            }
        };
        let mut failed = None;
        for (&slot, r) in slots.iter().zip(replies) {
            match r {
                Ok(_) => self.settings.fence.slots.raise(slot, end.0),
                Err(e) => {
                    // it waits for the next end
                    self.keep_unmarked(&[slot]);
                    failed.get_or_insert((slot, e));
                }
            }
        }
        if let Some((slot, e)) = failed {
            return Err(self.slot_failed(slot, RedisSinkError::from_redis(e)).await);
        }
        Ok(())
    }

    /// Slots to mark with the next end (see [`Unindexed::unmarked`]).
    fn keep_unmarked(&self, slots: &[u16]) {
        self.unindexed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unmarked
            .extend(slots.iter().copied());
    }

    /// Read the index state the fold needs for these changes (row holders and records,
    /// lookup values, dependents) and hand it over, in rounds until it needs nothing
    /// more: one pipelined round trip per round, and a state chain (a referenced row, its
    /// dependents, their records) takes a round per link.
    pub async fn read_needs(
        &mut self,
        fold: &mut crate::fold::Fold,
        changes: &[&crate::txn::Change],
    ) -> Result<(), RedisSinkError> {
        use crate::fold::Need;
        for _ in 0..16 {
            let mut needs: Vec<Need> = changes.iter().flat_map(|c| fold.needs(c)).collect();
            if needs.is_empty() {
                return Ok(());
            }
            needs.sort();
            needs.dedup();
            let prefix = self.settings.prefix.clone();
            let fields: Vec<(String, String, String)> = needs
                .iter()
                .filter_map(|n| match n {
                    Need::Field(f) => {
                        let (k, rf) = layout::state_slot(&prefix, f)?;
                        Some((f.clone(), k, rf))
                    }
                    Need::Deps { .. } => None,
                })
                .collect();
            for chunk in fields.chunks(1000) {
                let mut pipe = redis::pipe();
                for (_, k, rf) in chunk {
                    pipe.cmd("HGET").arg(k).arg(rf);
                }
                let got: Vec<Option<String>> = pipe
                    .query_async(&mut self.con)
                    .await
                    .map_err(RedisSinkError::from_redis)?;
                let got = self
                    .with_contributions(chunk.iter().map(|(f, _, _)| f.as_str()), got)
                    .await?;
                for ((f, _, _), v) in chunk.iter().zip(got) {
                    fold.know(f.clone(), v);
                }
            }
            for n in &needs {
                if let Need::Deps { hop, reference } = n {
                    let members = self.read_deps(*hop, reference).await?;
                    fold.know_deps(*hop, reference, members);
                }
            }
        }
        Err(RedisSinkError::Definite(
            "internal: the fold kept asking for index state after 16 reads".into(),
        ))
    }

    /// Fold `c`, first reading the index state it needs when the fold does not know it
    /// (with what the changes `ahead` of it in the same chunk need, in the same round
    /// trips: a cold fold reads once per chunk, a warm one never). The outer error is
    /// Redis', the inner one the schema's.
    pub async fn fold_change<'a>(
        &mut self,
        fold: &mut crate::fold::Fold,
        c: &'a crate::txn::Change,
        ahead: impl Iterator<Item = &'a crate::txn::Change>,
    ) -> Result<Result<Option<crate::fold::Piece>, crate::fold::SchemaError>, RedisSinkError> {
        use crate::fold::FoldError;
        match fold.change(c) {
            Ok(p) => return Ok(Ok(p)),
            Err(FoldError::Schema(e)) => return Ok(Err(e)),
            Err(FoldError::Unread) => {}
        }
        let chunk: Vec<&crate::txn::Change> = std::iter::once(c).chain(ahead).collect();
        self.read_needs(fold, &chunk).await?;
        match fold.change(c) {
            Ok(p) => Ok(Ok(p)),
            Err(FoldError::Schema(e)) => Ok(Err(e)),
            Err(FoldError::Unread) => Err(RedisSinkError::Definite(
                "internal: the fold asked for index state again after reading it".into(),
            )),
        }
    }

    /// Row records as the fold uses them: a record names the SKU holding the row and its
    /// quantities are that hash's (the record is not rewritten for quantity-only
    /// changes), so each record read gets its contribution from the holder's hash.
    /// `fields[i]` is the row field `values[i]` was read for; other values pass as read.
    async fn with_contributions<'a>(
        &mut self,
        fields: impl Iterator<Item = &'a str>,
        mut values: Vec<Option<String>>,
    ) -> Result<Vec<Option<String>>, RedisSinkError> {
        let mut patch = Vec::new();
        for (i, f) in fields.enumerate() {
            if let Some(rec) = values[i].as_deref().and_then(layout::RowRecord::decode)
                && let Some(h) = &rec.holder
            {
                patch.push((i, layout::sku_key(&self.settings.prefix, h), f, rec));
            }
        }
        if patch.is_empty() {
            return Ok(values);
        }
        let mut pipe = redis::pipe();
        for (_, key, f, _) in &patch {
            pipe.cmd("HGET").arg(key).arg(*f);
        }
        let contributions: Vec<Option<String>> = pipe
            .query_async(&mut self.con)
            .await
            .map_err(RedisSinkError::from_redis)?;
        for ((i, _, _, rec), c) in patch.into_iter().zip(contributions) {
            if let Some(r) = c.and_then(|c| rec.with_contribution(&c, self.settings.scale)) {
                values[i] = Some(r.encode());
            }
        }
        Ok(values)
    }

    /// Read index state ahead into a new fold's cache, up to `limit` entries: the row
    /// index of `tables` (holders or records) and the lookup values of `hops` hops, one
    /// bucket hash per round trip. A restart then folds its backlog without a read per
    /// cold row (each waits behind the apply call in flight); what does not fit is read
    /// when needed, as before. Call only while nothing is applied (no batch in flight).
    pub async fn warm(
        &mut self,
        fold: &mut crate::fold::Fold,
        tables: &[&str],
        hops: usize,
        limit: usize,
    ) -> Result<usize, RedisSinkError> {
        let prefix = self.settings.prefix.clone();
        let mut keys: Vec<(String, Option<usize>)> = Vec::new();
        for t in tables {
            for b in 0..layout::ROW_INDEX_BUCKETS {
                keys.push((layout::row_index_key(&prefix, t, b), None));
            }
        }
        for hop in 0..hops {
            for b in 0..layout::ROW_INDEX_BUCKETS {
                keys.push((layout::ref_key(&prefix, hop, b), Some(hop)));
            }
        }
        let mut n = 0;
        for (key, hop) in keys {
            if n >= limit {
                break;
            }
            let all: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut self.con)
                .await
                .map_err(RedisSinkError::from_redis)?;
            let (fields, values): (Vec<String>, Vec<Option<String>>) = all
                .into_iter()
                .take(limit - n)
                .map(|(f, v)| {
                    let f = match hop {
                        None => f,
                        Some(h) => layout::lookup_field(h, &f),
                    };
                    (f, Some(v))
                })
                .unzip();
            let values = match hop {
                None => {
                    self.with_contributions(fields.iter().map(String::as_str), values)
                        .await?
                }
                Some(_) => values,
            };
            for (f, v) in fields.into_iter().zip(values) {
                fold.warm(f, v);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every dependent of a referenced row (HSCAN of its dependents hash by prefix).
    async fn read_deps(
        &mut self,
        hop: usize,
        reference: &str,
    ) -> Result<Vec<String>, RedisSinkError> {
        let prefix = self.settings.prefix.clone();
        let key = layout::dep_key(&prefix, hop, reference);
        // the hash field of a dependent is the dep field after `d:<hop>:`
        let full = layout::dep_prefix(hop, reference);
        let start = full
            .find(':')
            .and_then(|i| full[i + 1..].find(':').map(|j| i + j + 2));
        let field_prefix = &full[start.unwrap_or(0)..];
        let pattern = format!("{}*", layout::glob_escape(field_prefix));
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, items): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.con)
                .await
                .map_err(RedisSinkError::from_redis)?;
            for pair in items.chunks(2) {
                if let Some(m) = pair[0].strip_prefix(field_prefix) {
                    out.push(m.to_string());
                }
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Clear a truncated indexed table's row index (once per truncate, see
    /// `ROW_INDEX_TRUNCATE_LUA`).
    pub async fn truncate_row_index(
        &mut self,
        table: &str,
        fence: crate::fold::batch::Fence,
    ) -> Result<(), RedisSinkError> {
        let prefix = self.settings.prefix.clone();
        let script = redis::Script::new(ROW_INDEX_TRUNCATE_LUA);
        if self.con.is_cluster() {
            // per bucket, each fenced by its slot's copy of `ri_truncated:<table>:<bucket>`
            // (per bucket: buckets share slots, and one mark per table and slot made the
            // second bucket's call skip as a replay)
            for b in 0..layout::ROW_INDEX_BUCKETS {
                let k = layout::row_index_key(&prefix, table, b);
                let _: i64 = script
                    .key(layout::slot_meta_key(&prefix, slot_of(k.as_bytes())))
                    .key(&k)
                    .arg(token_arg(self.settings.fence.token()))
                    .arg(fence.0.0.to_string())
                    .arg(fence.1)
                    .arg(format!("{table}:{b}"))
                    .invoke_async(&mut self.con)
                    .await
                    .map_err(RedisSinkError::from_redis)?;
                // its clearing gets the batch's end mark and floor, like any index write
                self.keep_unmarked(&[slot_of(k.as_bytes())]);
            }
            return Ok(());
        }
        let mut inv = script.prepare_invoke();
        inv.key(layout::meta_key(&prefix));
        for b in 0..layout::ROW_INDEX_BUCKETS {
            inv.key(layout::row_index_key(&prefix, table, b));
        }
        let (floor, link) = self.single_floor();
        inv.arg(token_arg(self.settings.fence.token()))
            .arg(fence.0.0.to_string())
            .arg(fence.1)
            .arg(table)
            .arg(floor);
        let _: i64 = inv
            .invoke_async(&mut self.con)
            .await
            .map_err(RedisSinkError::from_redis)?;
        self.settings.fence.chain.returned(link);
        Ok(())
    }

    async fn invoke(&mut self, cmd: redis::Cmd) -> Result<Applied, redis::RedisError> {
        let r = invoke_value(&mut self.con, cmd, APPLY_LUA).await?;
        let (applied, fenced, alerts): (u64, u64, u64) = redis::from_redis_value(r)?;
        Ok(Applied {
            applied,
            fenced,
            alerts,
            thin: 0,
        })
    }

    /// All SKUs with a hash, in one list (SCAN; for tools and tests: the daemon pages
    /// with [`Applier::sku_page`]).
    pub async fn all_skus(&mut self) -> Result<Vec<String>, RedisSinkError> {
        scan_skus(&mut self.con, &self.settings.prefix).await
    }

    /// One page of the SKUs Redis holds, from `at` (start with `(0, 0)`): the next
    /// position (`None`: done) and up to about a thousand SKUs. SCAN may name a SKU on
    /// two pages (and, on a cluster, a key a live reshard moves): callers' writes must be
    /// fenced. Memory follows the page, not every SKU ever seen.
    pub async fn sku_page(
        &mut self,
        at: ScanAt,
    ) -> Result<(Option<ScanAt>, Vec<String>), RedisSinkError> {
        sku_page(&mut self.con, &self.settings.prefix, at).await
    }
}

/// One page of the SKUs Redis holds (see [`Applier::sku_page`]).
pub async fn sku_page(
    con: &mut RedisCon,
    prefix: &str,
    at: ScanAt,
) -> Result<(Option<ScanAt>, Vec<String>), RedisSinkError> {
    let (next, keys) = con
        .scan_page(at, &layout::sku_key_pattern(prefix), 1000, Some("hash"))
        .await
        .map_err(RedisSinkError::from_redis)?;
    let skus = keys
        .iter()
        .filter_map(|k| layout::sku_of_key(prefix, k))
        .collect();
    Ok((next, skus))
}

/// Send an apply call; a Redis that forgot the script (restarted, flushed, a new cluster
/// primary) gets it loaded and the call sent again.
async fn invoke_value(
    con: &mut RedisCon,
    cmd: redis::Cmd,
    script: &str,
) -> Result<redis::Value, redis::RedisError> {
    match cmd.query_async(con).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script)
                .query_async::<redis::Value>(con)
                .await?;
            cmd.query_async(con).await
        }
        r => r,
    }
}

/// A cluster apply call's reply: its counts, and the change index and alert history
/// entries it reports (added to `changes` and `alerts`). The call's SKU hashes report
/// their LSNs in the order the call named them (first appearance in `group`).
fn parse_cluster_reply(
    v: redis::Value,
    prefix: &str,
    group: &[&Entry],
    changes: &mut Vec<(u64, String)>,
    alerts: &mut Vec<[String; 6]>,
) -> Result<Applied, redis::RedisError> {
    let (applied, fenced, n, lsns, raised): (u64, u64, u64, Vec<String>, Vec<String>) =
        redis::from_redis_value(v)?;
    let mut seen = std::collections::HashSet::with_capacity(group.len());
    let skus = group
        .iter()
        .map(|e| e.sku.as_str())
        .filter(|s| seen.insert(*s));
    for (sku, lsn) in skus.zip(&lsns) {
        if let Ok(lsn) = lsn.parse::<u64>() {
            changes.push((lsn, layout::sku_key(prefix, sku)));
        }
    }
    for a in raised.chunks_exact(6) {
        alerts.push([
            a[0].clone(),
            a[1].clone(),
            a[2].clone(),
            a[3].clone(),
            a[4].clone(),
            a[5].clone(),
        ]);
    }
    Ok(Applied {
        applied,
        fenced,
        alerts: n,
        thin: 0,
    })
}

/// `HGET <field>` of each SKU's hash, in one pipeline.
async fn hget_each(
    con: &mut RedisCon,
    prefix: &str,
    skus: &[String],
    field: &str,
) -> Result<Vec<Option<String>>, RedisSinkError> {
    if skus.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for sku in skus {
        pipe.cmd("HGET")
            .arg(layout::sku_key(prefix, sku))
            .arg(field);
    }
    pipe.query_async(con)
        .await
        .map_err(RedisSinkError::from_redis)
}

/// SCAN every SKU hash key and return the SKUs (on every primary of a cluster).
pub async fn scan_skus(con: &mut RedisCon, prefix: &str) -> Result<Vec<String>, RedisSinkError> {
    let keys = con
        .scan(&layout::sku_key_pattern(prefix), Some("hash"))
        .await
        .map_err(RedisSinkError::from_redis)?;
    let mut out: Vec<String> = keys
        .iter()
        .filter_map(|k| layout::sku_of_key(prefix, k))
        .collect();
    if con.is_cluster() {
        // a key moved by a live reshard can be seen on both nodes
        out.sort_unstable();
        out.dedup();
    }
    Ok(out)
}

pub use layout::glob_escape;

/// Where an apply call goes.
enum Call {
    /// A standalone Redis: the meta hash, the change index and the alert history are
    /// keys of the call.
    Single,
    /// One slot of a Redis Cluster: its meta copy is the call's first key; the caller
    /// writes the change index and the alert history from the reply.
    Slot(u16),
}

/// Encode one apply call (see `apply.lua`) as one EVALSHA: KEYS (meta hash, then each
/// SKU hash once) and the flat ARGV; arguments go straight into the command's buffer.
/// `floor` (the floor argument: an LSN, or a chained one, see [`CallChain`]) is checked
/// against the call's meta hash (or slot copy).
fn encode_call(
    s: &ApplySettings,
    call: &Call,
    entries: &[&Entry],
    end: Option<Lsn>,
    floor: &str,
    quiet: bool,
    sha: &str,
) -> redis::Cmd {
    let mut index: HashMap<&str, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(entries.len(), Default::default());
    let mut keys: Vec<&str> = Vec::with_capacity(entries.len());
    let key_idx: Vec<usize> = entries
        .iter()
        .map(|e| {
            *index.entry(e.sku.as_str()).or_insert_with(|| {
                keys.push(e.sku.as_str());
                keys.len() + 1 // Lua is 1-based and KEYS[1] is the meta hash
            })
        })
        .collect();
    let mut c = redis::cmd("EVALSHA");
    let cluster = matches!(call, Call::Slot(_));
    let users = if cluster {
        user_keys(&s.prefix, entries)
    } else {
        Vec::new()
    };
    c.arg(sha)
        .arg(keys.len() + users.len() + if cluster { 1 } else { 3 });
    match call {
        Call::Single => c.arg(layout::meta_key(&s.prefix)),
        Call::Slot(slot) => c.arg(layout::slot_meta_key(&s.prefix, *slot)),
    };
    for k in &keys {
        c.arg(layout::sku_key(&s.prefix, k));
    }
    for k in &users {
        c.arg(k);
    }
    if !cluster {
        c.arg(layout::changes_key(&s.prefix))
            .arg(layout::alerts_key(&s.prefix));
    }
    c.arg(s.keep_minutes)
        .arg(s.low_stock.saturating_mul(10i64.pow(s.scale)))
        .arg(if quiet { "1" } else { "0" })
        .arg(end.map(|e| e.0.to_string()).unwrap_or_default())
        .arg(token_arg(s.fence.token()))
        .arg(floor)
        .arg(s.scale)
        .arg(s.alert_history.max(1))
        .arg(s.alert_history_age_ms)
        .arg(if cluster {
            // every alert up to the writer's floor is in the history (see ALERTS_LUA)
            s.fence
                .floor
                .load(std::sync::atomic::Ordering::SeqCst)
                .to_string()
        } else {
            String::new()
        })
        .arg(s.counters.len());
    for name in &s.counters {
        c.arg(name);
    }
    let mut trace = Vec::new();
    for (e, ki) in entries.iter().zip(key_idx) {
        c.arg(ki)
            .arg(e.first.0.0)
            .arg(e.first.1)
            .arg(e.last.0.0)
            .arg(e.last.1)
            .arg(e.commit_ms)
            .arg(e.truncate.len());
        for t in &e.truncate {
            c.arg(layout::row_field_prefix(t));
        }
        c.arg(e.rows.len());
        for (f, op) in &e.rows {
            c.arg(f);
            match op {
                RowOp::Del => {
                    c.arg("D").arg("").arg("").arg("");
                }
                RowOp::Set {
                    location,
                    on_hand,
                    reserved,
                    ..
                } => {
                    let flag = |k: bool| if k { b'k' } else { b'v' };
                    let flags = [
                        flag(matches!(location, Field::Keep)),
                        flag(matches!(on_hand, Field::Keep)),
                        flag(matches!(reserved, Field::Keep)),
                    ];
                    c.arg(&flags[..]);
                    match location {
                        Field::Val(v) => c.arg(v),
                        Field::Keep => c.arg(""),
                    };
                    for n in [on_hand, reserved] {
                        match n {
                            Field::Val(v) => c.arg(v),
                            Field::Keep => c.arg(""),
                        };
                    }
                }
            }
        }
        trace.clear();
        encode_trace(&mut trace, e);
        c.arg(&trace[..]);
        c.arg(e.counters.len());
        for (k, v) in &e.counters {
            c.arg(&**k).arg(*v);
        }
        c.arg(e.buckets.len());
        for ((k, m), v) in &e.buckets {
            c.arg(&**k).arg(*m).arg(*v);
        }
        let chunks: usize = e
            .users
            .values()
            .map(|ids| ids.len().div_ceil(USERS_PER_PFADD))
            .sum();
        c.arg(chunks);
        for ((k, m), ids) in &e.users {
            for chunk in ids.chunks(USERS_PER_PFADD) {
                c.arg(&**k).arg(*m).arg(chunk.len());
                for id in chunk {
                    c.arg(&id.hex()[..]);
                }
            }
        }
    }
    c
}

/// Most user ids in one PFADD of a script (Lua's `unpack` has a stack limit): the apply
/// script's user groups and thin apply's PFADDs are sent in chunks of this many.
const USERS_PER_PFADD: usize = 500;

/// The values of the fields `f` from an HGETALL reply's `flat` list (name, value, ...),
/// into `out` (`None` where the hash has no such field, and for all of them where there
/// is no hash), as an HMGET of `f` answers. False if `flat` is not such a list.
fn pick_fields<'a>(
    flat: &[Option<&'a str>],
    f: &[std::borrow::Cow<str>],
    out: &mut Vec<Option<&'a str>>,
) -> bool {
    out.clear();
    if !flat.len().is_multiple_of(2) {
        return false;
    }
    for name in f {
        let mut found = None;
        for pair in flat.chunks_exact(2) {
            match pair {
                [Some(n), Some(v)] if *n == name.as_ref() => {
                    found = Some(*v);
                    break;
                }
                [Some(_), Some(_)] => {}
                _ => return false,
            }
        }
        out.push(found);
    }
    true
}

/// An HMGET reply's values into `out` (borrowed, not copied: this runs for every thin
/// entry), or `false` for anything but an array of UTF-8 strings and nils (an HGETALL
/// reply, a flat list of names and values, reads the same way).
fn hmget_reply<'v>(reply: &'v redis::Value, out: &mut Vec<Option<&'v str>>) -> bool {
    out.clear();
    let redis::Value::Array(items) = reply else {
        return false;
    };
    for x in items {
        out.push(match x {
            redis::Value::Nil => None,
            redis::Value::BulkString(b) => match std::str::from_utf8(b) {
                Ok(s) => Some(s),
                Err(_) => return false,
            },
            _ => return false,
        });
    }
    true
}

/// A thin call's arguments' count and bytes, about (it grows to hundreds of kB: sized
/// once).
fn thin_size(
    prefix: &str,
    entries: &[Entry],
    planned: &[&(usize, thin::ThinWrite)],
) -> (usize, usize) {
    let (mut nargs, mut bytes) = (8 + 2 * planned.len(), 256 + 2 * prefix.len());
    for (i, w) in planned {
        // (a cluster's declared distinct-user keys: one more argument each)
        nargs += 7 + 2 * w.set.len() + w.del.len() + 5 * w.keys.len();
        bytes += prefix.len() + entries[*i].sku.len() + 88 + w.set.bytes();
        bytes += w.del.iter().map(|f| f.len()).sum::<usize>()
            + (32 + prefix.len() + entries[*i].sku.len()) * w.keys.len();
    }
    (nargs, bytes)
}

/// On a Redis Cluster, the distinct-user keys the apply script may write for `entries`
/// (PFADD: each users group's counter and minute), declared after the SKU hashes though
/// the script names them itself. Declared, a key of a slot being migrated that is not on
/// the node the call reaches makes Redis answer TRYAGAIN or ASK before the script runs;
/// undeclared, the script ran on the importing node under the caller's ASKING and
/// created the key there while the old node still held it (a later MIGRATE of it then
/// fails with BUSYKEY). Keys it may DEL are not declared: on a cluster the script leaves
/// a pruned minute's key to its EXPIREAT instead.
fn user_keys(prefix: &str, entries: &[&Entry]) -> Vec<String> {
    let mut v: Vec<String> = entries
        .iter()
        .flat_map(|e| {
            e.users.keys().flat_map(move |(raw, minute)| {
                // a guarded '?name' counts under its name
                let c = raw.strip_prefix('?').unwrap_or(raw);
                [
                    layout::users_key(prefix, &e.sku, c),
                    layout::users_minute_key(prefix, &e.sku, c, *minute),
                ]
            })
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// A thin entry's distinct-user writes for `thin.lua`: the number of arguments that
/// follow, then `d <suffix>`, `p <suffix> <n> <id>...` (at most [`USERS_PER_PFADD`] ids)
/// or `e <suffix> <unix s>` each.
fn encode_key_ops<A: resp::Args>(c: &mut A, ops: &[thin::KeyOp]) {
    let n: usize = ops
        .iter()
        .map(|op| match op {
            thin::KeyOp::Del(_) => 2,
            thin::KeyOp::ExpireAt(..) => 3,
            thin::KeyOp::Add(_, ids) => ids.len().div_ceil(USERS_PER_PFADD) * 3 + ids.len(),
        })
        .sum();
    c.int(n);
    for op in ops {
        match op {
            thin::KeyOp::Del(k) => {
                c.bytes(b"d");
                c.bytes(k.as_bytes());
            }
            thin::KeyOp::ExpireAt(k, at) => {
                c.bytes(b"e");
                c.bytes(k.as_bytes());
                c.int(*at);
            }
            thin::KeyOp::Add(k, ids) => {
                for chunk in ids.chunks(USERS_PER_PFADD) {
                    c.bytes(b"p");
                    c.bytes(k.as_bytes());
                    c.int(chunk.len());
                    for id in chunk {
                        c.bytes(&id.hex());
                    }
                }
            }
        }
    }
}

/// An entry's trace as packed records (`<BI4ddddd`: flags, row index, on_hand, reserved,
/// threshold, LSN minus the entry's first LSN, commit ms). Binary, because the script
/// unpacks numbers without creating a Lua string per value; quantities are within
/// +-2^53 (the fold skips larger ones), so doubles hold them exactly.
fn encode_trace(out: &mut Vec<u8>, e: &Entry) {
    out.reserve(e.trace.len() * 45);
    for r in &e.trace {
        // the record holds the script's own flags (`fold::batch::trace_flags`)
        let eval = if r.eval { trace_flags::EVAL } else { 0 };
        out.push(r.flags | eval);
        out.extend_from_slice(&r.row.to_le_bytes());
        let [on, res, thr] = r.values;
        for v in [
            on as f64,
            res as f64,
            thr as f64,
            r.lsn.0.saturating_sub(e.first.0.0) as f64,
            r.commit_ms as f64,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// The meta hash, as read at startup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub applied_lsn: Option<Lsn>,
    pub system_id: Option<String>,
    pub timeline: Option<String>,
    pub fingerprint: Option<String>,
    pub bootstrap_done: bool,
    /// The mapped tables' identities at the last snapshot load (absent before 0.1's
    /// table fencing, or unreadable: then learned from the stream).
    pub tables: crate::fold::TableIdentities,
    /// The key layout it was built in (`layout`; `None` before layout 3).
    pub layout: Option<String>,
    /// Per partitioned stock table, the fingerprint of its partitions at the last
    /// snapshot load (see `pg::partitions`); empty when none is partitioned.
    pub partitions: std::collections::BTreeMap<String, String>,
    /// Since when the change index is complete (`changes_from`; absent before the index
    /// existed: see [`backfill_changes`]).
    pub changes_from: Option<Lsn>,
    /// A batch changing lookup state was being written and did not finish
    /// (`index_pending`): its replay cannot repair the lookup state.
    pub index_pending: bool,
    /// The most changes per piece Redis' pieces were cut with (`piece_changes`; absent
    /// before it was recorded): the pieces of a transaction replayed after a restart are
    /// fenced by their number, so they must be cut the same way.
    pub piece_changes: Option<u64>,
    /// The fingerprint of the publications Redis was built through (`publications`:
    /// their names and the row filters they put on mapped tables; absent before it was
    /// recorded).
    pub publications: Option<String>,
}

/// Read the meta hash; `None` when it does not exist.
pub async fn read_meta(con: &mut RedisCon, prefix: &str) -> Result<Option<Meta>, RedisSinkError> {
    let m: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(layout::meta_key(prefix))
        .query_async(con)
        .await
        .map_err(RedisSinkError::from_redis)?;
    if m.is_empty() {
        return Ok(None);
    }
    Ok(Some(Meta {
        applied_lsn: m.get("applied_lsn").and_then(|v| v.parse().ok()).map(Lsn),
        system_id: m.get("system_id").cloned(),
        timeline: m.get("timeline").cloned(),
        fingerprint: m.get("fingerprint").cloned(),
        bootstrap_done: m.get("bootstrap").map(String::as_str) == Some("done"),
        tables: m
            .get("tables")
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default(),
        layout: m.get("layout").cloned(),
        partitions: m
            .get("partitions")
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default(),
        changes_from: m.get("changes_from").and_then(|v| v.parse().ok()).map(Lsn),
        index_pending: m.get("index_pending").is_some_and(|v| !v.is_empty()),
        piece_changes: m.get("piece_changes").and_then(|v| v.parse().ok()),
        publications: m.get("publications").cloned(),
    }))
}

/// Build the change index of a Redis written by a release without it: every SKU hash
/// scored by its `lsn`, then meta `changes_from` = `applied`, so older catch-up tokens
/// (there are none) get 410 and newer ones are exact. Runs before streaming starts.
pub async fn backfill_changes(
    con: &mut RedisCon,
    prefix: &str,
    token: u64,
    applied: Lsn,
) -> Result<usize, RedisSinkError> {
    let zkey = layout::changes_key(prefix);
    // a page at a time: memory follows the page, not every SKU (a SKU on two pages is
    // scored twice, alike: ZADD GT)
    let mut n = 0;
    let mut at = Some(ScanAt::default());
    while let Some(pos) = at {
        let (next, skus) = sku_page(con, prefix, pos).await?;
        at = next;
        n += skus.len();
        backfill_page(con, prefix, &zkey, &skus).await?;
    }
    write_meta(
        con,
        prefix,
        token,
        &[("changes_from", applied.0.to_string())],
    )
    .await?;
    Ok(n)
}

/// Score one page of SKU hashes in the change index by their `lsn`.
async fn backfill_page(
    con: &mut RedisCon,
    prefix: &str,
    zkey: &str,
    skus: &[String],
) -> Result<(), RedisSinkError> {
    for chunk in skus.chunks(500) {
        let lsns = hget_each(con, prefix, chunk, "lsn").await?;
        let mut z = redis::cmd("ZADD");
        z.arg(zkey).arg("GT");
        for (sku, l) in chunk.iter().zip(lsns) {
            let l: u64 = l.and_then(|v| v.parse().ok()).unwrap_or(0);
            z.arg(l).arg(layout::sku_key(prefix, sku));
        }
        let _: i64 = z
            .query_async(con)
            .await
            .map_err(RedisSinkError::from_redis)?;
    }
    Ok(())
}

/// Meta fields written by a writer: refused unless meta `writer` is its token or absent
/// (then it becomes its token). KEYS[1] meta; ARGV[1] token ('' unfenced); field, value...
const WRITE_META_LUA: &str = r#"
local t = ARGV[1]
if t ~= '' then
  local w = redis.call('HGET', KEYS[1], 'writer')
  if w and w ~= t then return redis.error_reply('SKUSYNC_FENCED ' .. w) end
  redis.call('HSET', KEYS[1], 'writer', t)
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"#;

/// Write meta fields as the writer holding `token` (0: unfenced, for tools and tests).
pub async fn write_meta(
    con: &mut RedisCon,
    prefix: &str,
    token: u64,
    fields: &[(&str, String)],
) -> Result<(), RedisSinkError> {
    let script = redis::Script::new(WRITE_META_LUA);
    let mut inv = script.prepare_invoke();
    inv.key(layout::meta_key(prefix)).arg(token_arg(token));
    for (k, v) in fields {
        inv.arg(*k).arg(v);
    }
    inv.invoke_async::<i64>(con)
        .await
        .map(|_| ())
        .map_err(RedisSinkError::from_redis)
}

/// Take the fencing token (the caller holds its slot's PostgreSQL advisory lock): one
/// above the last token and at least the current unix ms, so a token given out before
/// Redis lost its meta hash, or before it came back older, is never given out again.
/// Written only when the meta hash exists (a missing one means a rebuild, whose first
/// meta write records the token). KEYS[1] meta; ARGV[1] unix ms.
const CLAIM_LUA: &str = r#"
local w = tonumber(redis.call('HGET', KEYS[1], 'writer') or '0') or 0
local t = math.max(w + 1, tonumber(ARGV[1]))
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'writer', string.format('%d', t))
end
return t
"#;

/// Become the writer (see [`CLAIM_LUA`]); returns the token.
pub async fn claim_writer(con: &mut RedisCon, prefix: &str) -> Result<u64, RedisSinkError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let token = redis::Script::new(CLAIM_LUA)
        .key(layout::meta_key(prefix))
        .arg(now)
        .invoke_async::<u64>(con)
        .await
        .map_err(RedisSinkError::from_redis)?;
    if con.is_cluster() {
        // Every slot's meta copy gets the token, where it exists: a missing copy means a
        // node lost its data, which the next write to that slot reports (a rebuild).
        // A few calls per primary (16,384 script calls cost Redis and skusync about a
        // tenth of a second at every start); slot by slot when the slot map is stale.
        if claim_by_primary(con, prefix, token).await {
            return Ok(token);
        }
        let slots: Vec<u16> = (0..SLOTS as u16).collect();
        for chunk in slots.chunks(2048) {
            let mut pipe = redis::pipe();
            for &slot in chunk {
                pipe.cmd("EVAL")
                    .arg(CLAIM_COPIES_LUA)
                    .arg(1)
                    .arg(layout::slot_meta_key(prefix, slot))
                    .arg(token)
                    .ignore();
            }
            pipe.query_async::<()>(con)
                .await
                .map_err(RedisSinkError::from_redis)?;
        }
    }
    Ok(token)
}

/// Claims every slot's meta copy, each primary's slots in calls of up to
/// [`CLAIM_PER_CALL`] (see [`CLAIM_COPIES_LUA`]); false when any call failed (a node that
/// no longer serves a slot refuses it), and the caller claims slot by slot. A call that
/// failed half way wrote only tokens the slot-by-slot claim writes again.
async fn claim_by_primary(con: &mut RedisCon, prefix: &str, token: u64) -> bool {
    let Some(nodes) = con.slots_by_primary().await else {
        return false;
    };
    for (node, slots) in &nodes {
        for chunk in slots.chunks(CLAIM_PER_CALL) {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(CLAIM_COPIES_LUA).arg(0).arg(token);
            for &slot in chunk {
                cmd.arg(layout::slot_meta_key(prefix, slot));
            }
            if let Err(e) = con.on_node::<i64>(Some(node), cmd).await {
                tracing::debug!(error = %e, "claiming a primary's slots in one call failed; claiming slot by slot");
                con.forget_slot_map();
                return false;
            }
        }
    }
    true
}

/// Meta hash field prefix of a cluster slot's recorded floor (`floor:<slot>` = LSN).
const FLOOR_FIELD: &str = "floor:";
/// The meta hash's and the slots' copies' field holding the last rebuild's mark.
pub const REBUILD_FIELD: &str = "rebuild";

/// Floors recorded per call (two Lua values each, far below what `unpack` takes).
const FLOORS_PER_CALL: usize = 1000;

/// On a Redis Cluster, read the slots' floors recorded in the meta hash (the highest
/// mark a writer saw each slot's meta copy hold, up to its last `applied_lsn`) into
/// `floors`; [`Applier::check_slots`] then compares them with the copies. Returns how
/// many were read (0 on a standalone Redis).
pub async fn load_slot_floors(
    con: &mut RedisCon,
    prefix: &str,
    floors: &SlotFloors,
) -> Result<usize, RedisSinkError> {
    if !con.is_cluster() {
        return Ok(0);
    }
    let meta: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(layout::meta_key(prefix))
        .query_async(con)
        .await
        .map_err(RedisSinkError::from_redis)?;
    // A floor above applied_lsn was recorded by an earlier chunk of a call whose last
    // chunk failed: writes never confirmed, which a replay restores. Capped, so that
    // losing them costs no rebuild.
    let applied = meta
        .get("applied_lsn")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let read: Vec<(u16, u64)> = meta
        .iter()
        .filter_map(|(f, v)| {
            let slot = f.strip_prefix(FLOOR_FIELD)?.parse::<u16>().ok()?;
            Some((slot, v.parse::<u64>().ok()?.min(applied)))
        })
        .filter(|(slot, _)| (*slot as usize) < SLOTS)
        .collect();
    floors.load(read.iter().copied());
    floors.set_rebuild_mark(meta.get(REBUILD_FIELD).filter(|m| !m.is_empty()).cloned());
    Ok(read.len())
}

/// Slots per claim call: Redis runs nothing else during a script, and this many take it
/// about a millisecond.
const CLAIM_PER_CALL: usize = 1024;

/// Slots' meta copies take the writer's token (ARGV[1]), where they exist: KEYS (one
/// slot's copy, routed by redis-rs) and ARGV[2..] (a primary's copies, undeclared: the
/// call is sent to that primary, which refuses one it does not serve).
const CLAIM_COPIES_LUA: &str = r#"
local n = 0
local function claim(k)
  if redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'writer', ARGV[1])
    n = n + 1
  end
end
for _, k in ipairs(KEYS) do claim(k) end
for i = 2, #ARGV do claim(ARGV[i]) end
return n
"#;

/// What a running writer checks of the meta hash periodically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterView {
    pub exists: bool,
    pub writer: Option<String>,
    pub applied_lsn: Option<Lsn>,
    pub bootstrap: Option<String>,
}

/// Read the meta fields a running writer checks (one HMGET).
pub async fn writer_view(con: &mut RedisCon, prefix: &str) -> Result<WriterView, RedisSinkError> {
    let (writer, applied, bootstrap, fingerprint): (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ) = redis::cmd("HMGET")
        .arg(layout::meta_key(prefix))
        .arg("writer")
        .arg("applied_lsn")
        .arg("bootstrap")
        .arg("fingerprint")
        .query_async(con)
        .await
        .map_err(RedisSinkError::from_redis)?;
    Ok(WriterView {
        exists: writer.is_some()
            || applied.is_some()
            || bootstrap.is_some()
            || fingerprint.is_some(),
        writer,
        applied_lsn: applied.and_then(|v| v.parse().ok()).map(Lsn),
        bootstrap,
    })
}

/// Reset a SKU hash before a snapshot load: drop everything derived from the database
/// (stock rows, totals, counters, buckets, fence) but keep the MQTT outbox marks and
/// pending alerts, and the key itself. Distinct-user HyperLogLogs are deleted.
///
/// A mark ahead of the fence (`ARGV[1]`, just below the new snapshot's consistent point)
/// comes from another history: a failover to a standby whose LSNs are behind the old
/// primary's. The mark script never moves a mark back, so such a SKU would stay unmarked
/// (and be republished over and over) until its LSN passed the old one: its marks are
/// dropped instead, costing one republish without a delta. On the same server every mark
/// is below a new slot's consistent point.
const RESET_LUA: &str = r#"
if ARGV[2] ~= '' then
  local w = redis.call('HGET', KEYS[1], 'writer')
  if w ~= ARGV[2] then return redis.error_reply('SKUSYNC_FENCED ' .. tostring(w)) end
end
local keep = {pub_lsn = true, pub_piece = true, pub_seq = true, pub_state = true, alerts = true,
  alert_state = true}
local at = ARGV[1]
local changed = 0
for i = 2, #KEYS do
  local key = KEYS[i]
  local fields = redis.call('HKEYS', key)
  local was = redis.call('HMGET', key, 'lsn', 'piece')
  local dropped = false
  for _, f in ipairs(fields) do
    if not keep[f] and f ~= 'lsn' and f ~= 'piece' then
      redis.call('HDEL', key, f)
      dropped = true
    end
  end
  if dropped or was[1] ~= at or was[2] ~= '-1' then changed = changed + 1 end
  -- u64 decimals without leading zeros: compare by length, then lexically
  local pl = redis.call('HGET', key, 'pub_lsn')
  if pl and (#pl > #at or (#pl == #at and pl > at)) then
    redis.call('HDEL', key, 'pub_lsn', 'pub_piece', 'pub_seq', 'pub_state')
  end
  redis.call('HSET', key, 'lsn', at, 'piece', '-1')
end
return changed
"#;

/// Reset every SKU hash (see [`RESET_LUA`]) and delete the distinct-user keys, with the
/// fence set just below the snapshot's consistent point; refused unless meta `writer`
/// is `token` (0: unfenced).
pub async fn reset_all(
    con: &mut RedisCon,
    prefix: &str,
    fence: Lsn,
    token: u64,
    floors: Option<&SlotFloors>,
) -> Result<usize, RedisSinkError> {
    crate::failpoint::pause("before-rebuild-reset").await;
    // The row index's truncation marks come from the history Redis held, whose LSNs may be
    // ahead of the server loaded now (a failover to a standby that was behind): a mark
    // ahead would skip a TRUNCATE's clearing. A cluster's recorded slot floors describe
    // the slot meta copies rewritten below. Both go first.
    let _: i64 = redis::Script::new(DROP_TRUNCATE_MARKS_LUA)
        .key(layout::meta_key(prefix))
        .arg(token_arg(token))
        .invoke_async(con)
        .await
        .map_err(RedisSinkError::from_redis)?;
    // On a cluster, each slot's meta copy starts over with this writer's token and the
    // reset's LSN as its applied_lsn; the writer's floor for each slot that holds SKU
    // hashes starts there, so a replica that missed the reset and took over before the
    // load (its copy older) is refused at the load's first call there.
    if con.is_cluster() {
        let mark = format!("{token}:{}", fence.0);
        reset_slot_metas(con, prefix, token, fence, &mark).await?;
        if let Some(f) = floors {
            // an equal mark, where the LSN alone cannot tell (a rebuild after a
            // PostgreSQL failover starts below the old copies' LSNs)
            f.set_rebuild_mark(Some(mark));
        }
    }
    // A SCAN page at a time, so memory follows the page, not every SKU Redis holds. One
    // server: a SCAN returns every key that exists throughout it, and nothing else writes
    // SKU hashes now. A cluster: a live reshard can hide a hash from a pass (moved from a
    // node not scanned yet to one scanned already); left as it was, the load would add to
    // its counters. Passes go on until one finds no hash left to reset (the script
    // counts the hashes it changed; resetting one twice changes nothing).
    let mut reset = 0;
    for pass in 0.. {
        let mut changed = 0;
        let mut at = Some(ScanAt::default());
        while let Some(pos) = at {
            let (next, skus) = sku_page(con, prefix, pos).await?;
            at = next;
            if let Some(f) = floors.filter(|_| con.is_cluster()) {
                for sku in &skus {
                    f.raise(slot_of(layout::sku_key(prefix, sku).as_bytes()), fence.0);
                }
            }
            changed += reset_hashes(con, prefix, &skus, fence, token).await?;
        }
        if pass == 0 {
            crate::failpoint::pause("after-rebuild-first-pass").await;
        }
        reset += changed;
        if !con.is_cluster() || changed == 0 {
            break;
        }
        if pass > 0 {
            tracing::info!(
                hashes = changed,
                "reset SKU hashes an earlier scan missed (a live reshard)"
            );
        }
    }
    unlink_matching(con, &layout::users_key_pattern(prefix)).await?;
    // The row index describes the rows the reset SKUs held: gone with them.
    unlink_matching(con, &layout::row_index_pattern(prefix)).await?;
    for p in layout::lookup_patterns(prefix) {
        unlink_matching(con, &p).await?;
    }
    // The change index comes from the history Redis held, whose LSNs may be ahead of the
    // server loaded now (a failover to a standby that was behind): a score ahead would
    // keep its SKU in every catch-up. Catch-up tokens from before the load answer 410
    // (`changes_from`), so nothing older is needed.
    let _: i64 = redis::cmd("UNLINK")
        .arg(layout::changes_key(prefix))
        .query_async(con)
        .await
        .map_err(RedisSinkError::from_redis)?;
    Ok(reset)
}

/// Reset these SKU hashes to `fence` (RESET_LUA): on a cluster one call per slot, named
/// with the slot's meta copy; on one server 500 per call. Returns how many it changed
/// (a hash reset already is not).
async fn reset_hashes(
    con: &mut RedisCon,
    prefix: &str,
    skus: &[String],
    fence: Lsn,
    token: u64,
) -> Result<usize, RedisSinkError> {
    let script = redis::Script::new(RESET_LUA);
    let groups: Vec<(String, Vec<&String>)> = if con.is_cluster() {
        let mut by_slot: std::collections::BTreeMap<u16, Vec<&String>> = Default::default();
        for sku in skus {
            by_slot
                .entry(slot_of(layout::sku_key(prefix, sku).as_bytes()))
                .or_default()
                .push(sku);
        }
        by_slot
            .into_iter()
            .map(|(slot, v)| (layout::slot_meta_key(prefix, slot), v))
            .collect()
    } else {
        skus.chunks(500)
            .map(|c| (layout::meta_key(prefix), c.iter().collect()))
            .collect()
    };
    if !groups.is_empty() {
        // EVALSHA below: load the script (on every primary of a cluster)
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(RESET_LUA)
            .query_async::<redis::Value>(con)
            .await
            .map_err(RedisSinkError::from_redis)?;
    }
    let mut changed = 0;
    for chunk in groups.chunks(256) {
        let mut pipe = redis::pipe();
        for (meta, group) in chunk {
            let c = pipe
                .cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(group.len() + 1)
                .arg(meta);
            for sku in group {
                c.arg(layout::sku_key(prefix, sku));
            }
            c.arg(fence.0.to_string()).arg(token_arg(token));
        }
        let n: Vec<usize> = pipe
            .query_async(con)
            .await
            .map_err(RedisSinkError::from_redis)?;
        changed += n.iter().sum::<usize>();
    }
    Ok(changed)
}

/// Delete the meta hash's `ri_truncated:<table>` marks and a cluster's recorded slot
/// floors (`floor:<slot>`). KEYS[1] meta; ARGV[1] the writer token ('' unfenced).
const DROP_TRUNCATE_MARKS_LUA: &str = r#"
if ARGV[1] ~= '' then
  local w = redis.call('HGET', KEYS[1], 'writer')
  if w ~= ARGV[1] then return redis.error_reply('SKUSYNC_FENCED ' .. tostring(w or 'none')) end
end
local n = 0
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 13) == 'ri_truncated:' or string.sub(f, 1, 6) == 'floor:' then
    redis.call('HDEL', KEYS[1], f)
    n = n + 1
  end
end
return n
"#;

/// Rewrite every slot's meta copy of a cluster: the writer's token and `fence` as its
/// `applied_lsn` (a rebuild starts; its load and the stream raise it).
async fn reset_slot_metas(
    con: &mut RedisCon,
    prefix: &str,
    token: u64,
    fence: Lsn,
    mark: &str,
) -> Result<(), RedisSinkError> {
    let slots: Vec<u16> = (0..SLOTS as u16).collect();
    for chunk in slots.chunks(2048) {
        let mut pipe = redis::pipe();
        for &slot in chunk {
            let k = layout::slot_meta_key(prefix, slot);
            pipe.cmd("DEL").arg(&k).ignore();
            pipe.cmd("HSET")
                .arg(&k)
                .arg("writer")
                .arg(token_arg(token).as_str())
                .arg("applied_lsn")
                .arg(fence.0)
                .arg(REBUILD_FIELD)
                .arg(mark)
                .ignore();
        }
        pipe.query_async::<()>(con)
            .await
            .map_err(RedisSinkError::from_redis)?;
    }
    Ok(())
}

/// The fence every meta-marking script starts with: KEYS[1] a meta hash (or a cluster
/// slot's copy) that must exist; ARGV[1] the writer token ('' unfenced) it must hold,
/// ARGV[2] the floor ('' unchecked) its `applied_lsn` must not be below; and `lsn_lt`.
/// (A macro, so that `concat!` makes each script one literal.)
macro_rules! fenced_by_meta {
    () => {
        r#"if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('SKUSYNC_NOMETA meta hash missing: Redis lost its data; a resync is needed')
end
local function lsn_lt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
-- ARGV[2]: an LSN, or 'LSN|last|this' (a standalone Redis's call chain, see `CallChain`)
local floor, chain_last, chain_this = string.match(ARGV[2], '^([^|]*)|?([^|]*)|?([^|]*)$')
if ARGV[1] ~= '' then
  local m = redis.call('HMGET', KEYS[1], 'writer', 'applied_lsn')
  if m[1] ~= ARGV[1] then return redis.error_reply('SKUSYNC_FENCED ' .. tostring(m[1] or 'none')) end
  if floor ~= '' and (not m[2] or lsn_lt(m[2], floor)) then
    return redis.error_reply('SKUSYNC_ROLLBACK ' .. tostring(m[2] or 'none'))
  end
  -- the stream's call chain on a standalone Redis (see `CallChain` in mod.rs): Redis must
  -- hold the writer's last call that returned; this call's number is kept at the highest
  if chain_this ~= '' then
    local held = tonumber(redis.call('HGET', KEYS[1], 'chain') or '')
    if chain_last ~= '' and (not held or held < tonumber(chain_last)) then
      return redis.error_reply('SKUSYNC_ROLLBACK ' .. tostring(m[2] or 'none'))
    end
    if chain_last == '' or not held or held < tonumber(chain_this) then
      redis.call('HSET', KEYS[1], 'chain', chain_this)
    end
  end
end
"#
    };
}

/// Writes row index updates (see `fold::Piece::ri`), after the SKU entries they follow
/// were applied; the last call of a batch records its end LSN. Fenced by the writer's
/// token and floor like the apply script. KEYS[1] meta, KEYS[2..] buckets; ARGV: token,
/// floor, end ('' none), then per bucket: n, n x (field, '=' .. SKU | '' to delete).
const ROW_INDEX_LUA: &str = concat!(
    fenced_by_meta!(),
    r#"
local a = 4
for k = 2, #KEYS do
  local n = tonumber(ARGV[a]); a = a + 1
  local set, del = {}, {}
  for _ = 1, n do
    local f, v = ARGV[a], ARGV[a + 1]; a = a + 2
    if v == '' then del[#del + 1] = f else set[#set + 1] = f; set[#set + 1] = string.sub(v, 2) end
  end
  if #del > 0 then redis.call('HDEL', KEYS[k], unpack(del)) end
  if #set > 0 then redis.call('HSET', KEYS[k], unpack(set)) end
end
if ARGV[3] ~= '' then
  local cur = redis.call('HGET', KEYS[1], 'applied_lsn')
  if not cur or lsn_lt(cur, ARGV[3]) then redis.call('HSET', KEYS[1], 'applied_lsn', ARGV[3]) end
end
return 1
"#
);

/// Adds a cluster's change index entries (`ZADD GT`: only ever raised) and records their
/// highest LSN in the change index's slot's meta copy, fenced by that copy like every
/// apply call. KEYS[1] the meta copy, KEYS[2] the change index; ARGV: token ('' unfenced),
/// the slot's floor ('' unchecked), the mark, then (score, member) pairs.
const CHANGES_LUA: &str = concat!(
    fenced_by_meta!(),
    r#"
if #ARGV > 3 then redis.call('ZADD', KEYS[2], 'GT', unpack(ARGV, 4)) end
local cur = redis.call('HGET', KEYS[1], 'applied_lsn')
if not cur or lsn_lt(cur, ARGV[3]) then redis.call('HSET', KEYS[1], 'applied_lsn', ARGV[3]) end
return 1
"#
);

/// Adds a cluster's alerts to the history (a stream), each once. The calls of a retry or
/// a replay report again the alerts their hashes hold past `indexed` (the writer's floor:
/// every alert up to it is in the history), in no LSN order across calls, so the
/// history's slot's meta copy records each alert past `indexed` it added, as a field
/// `alert:<lsn>:<type>:<SKU hash key>`, and drops those at or below `indexed` when that
/// rises (`alerts_indexed`, never lowered: a floor lowered after Redis came back older
/// replays alerts this history holds): it holds the alerts of the batches not yet
/// recorded. The call records its highest LSN in that copy, fenced by it like every
/// apply call. KEYS[1] the meta copy, KEYS[2] the history; ARGV: token ('' unfenced), the
/// slot's floor ('' unchecked), the mark, the history's length, its MINID cutoff (''
/// none), `indexed`, then (key, type, available, threshold, LSN, ts) per alert, in LSN
/// order.
const ALERTS_LUA: &str = concat!(
    fenced_by_meta!(),
    r#"
-- Trim the alert history exactly (at most `keep` entries; none older than `cutoff` unix
-- ms, 0 for no age limit) and record the greatest id dropped as the stream's
-- max-deleted-entry-id (XSETID): Redis' own trimming records none, and readers
-- (`/v1/alerts?since=`, webhooks) compare their position with it to learn they missed
-- alerts.
local function trim_history(key, keep, cutoff)
  local dropped
  local over = redis.call('XLEN', key) - keep
  if over > 0 then
    local r = redis.call('XRANGE', key, '-', '+', 'COUNT', over)
    dropped = r[#r][1]
    redis.call('XTRIM', key, 'MAXLEN', keep)
  end
  if cutoff > 0 then
    local c = string.format('%d', cutoff)
    local r = redis.call('XREVRANGE', key, '(' .. c .. '-0', '-', 'COUNT', 1)
    if #r > 0 then
      -- newer than any dropped by count (those were the oldest)
      dropped = r[1][1]
      redis.call('XTRIM', key, 'MINID', c)
    end
  end
  if dropped then
    local info = redis.call('XINFO', 'STREAM', key)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        redis.call('XSETID', key, info[i + 1], 'MAXDELETEDID', dropped)
      end
    end
  end
end
local indexed = ARGV[6]
local before = redis.call('HGET', KEYS[1], 'alerts_indexed')
-- a floor lowered since (Redis came back older: the replay reports again alerts this
-- history holds) does not lower what it holds
if before and lsn_lt(indexed, before) then indexed = before end
if before ~= indexed then
  local drop = {}
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    local l = string.match(f, '^alert:(%d+):')
    if l and not lsn_lt(indexed, l) then drop[#drop + 1] = f end
  end
  for i = 1, #drop, 1000 do
    redis.call('HDEL', KEYS[1], unpack(drop, i, math.min(#drop, i + 999)))
  end
  redis.call('HSET', KEYS[1], 'alerts_indexed', indexed)
end
for a = 7, #ARGV, 6 do
  local lsn = ARGV[a + 4]
  if lsn_lt(indexed, lsn)
      and redis.call('HSETNX', KEYS[1], 'alert:' .. lsn .. ':' .. ARGV[a + 1] .. ':' .. ARGV[a], '1') == 1 then
    redis.call('XADD', KEYS[2], '*', 'key', ARGV[a], 'type', ARGV[a + 1],
      'available', ARGV[a + 2], 'threshold', ARGV[a + 3], 'lsn', lsn, 'ts', ARGV[a + 5])
  end
end
trim_history(KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]) or 0)
local cur = redis.call('HGET', KEYS[1], 'applied_lsn')
if not cur or lsn_lt(cur, ARGV[3]) then redis.call('HSET', KEYS[1], 'applied_lsn', ARGV[3]) end
return 1
"#
);

/// Alerts per history call.
const ALERTS_PER_CALL: usize = 1000;

/// Sets or clears meta `index_pending` on a standalone Redis, fenced like the apply calls
/// (token, floor, chain). KEYS[1] meta; ARGV: token, floor argument, value ('' clears).
const INDEX_MARK_LUA: &str = concat!(
    fenced_by_meta!(),
    r#"
redis.call('HSET', KEYS[1], 'index_pending', ARGV[3])
return 1
"#
);

/// Clears a truncated table's row index, once: meta `ri_truncated:<table>` records the
/// truncate's fence, so a replay of it cannot erase what later transactions indexed.
/// KEYS[1] meta, KEYS[2..] the table's buckets; ARGV: token, commit LSN, piece, table.
const ROW_INDEX_TRUNCATE_LUA: &str = r#"
local function lsn_lt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
-- ARGV[5] (standalone): the floor argument, an LSN or 'LSN|last|this' (see `CallChain`)
local floor, chain_last, chain_this = string.match(ARGV[5] or '', '^([^|]*)|?([^|]*)|?([^|]*)$')
if ARGV[1] ~= '' then
  local m = redis.call('HMGET', KEYS[1], 'writer', 'applied_lsn')
  if m[1] ~= ARGV[1] then return redis.error_reply('SKUSYNC_FENCED ' .. tostring(m[1] or 'none')) end
  if floor ~= '' and (not m[2] or lsn_lt(m[2], floor)) then
    return redis.error_reply('SKUSYNC_ROLLBACK ' .. tostring(m[2] or 'none'))
  end
  if chain_this ~= '' then
    local held = tonumber(redis.call('HGET', KEYS[1], 'chain') or '')
    if chain_last ~= '' and (not held or held < tonumber(chain_last)) then
      return redis.error_reply('SKUSYNC_ROLLBACK ' .. tostring(m[2] or 'none'))
    end
    if chain_last == '' or not held or held < tonumber(chain_this) then
      redis.call('HSET', KEYS[1], 'chain', chain_this)
    end
  end
end
local f = 'ri_truncated:' .. ARGV[4]
local prev = redis.call('HGET', KEYS[1], f)
if prev then
  local pl, pp = string.match(prev, '^(%d+):(%d+)$')
  if pl and (lsn_lt(ARGV[2], pl) or (ARGV[2] == pl and tonumber(ARGV[3]) <= tonumber(pp))) then
    return 0
  end
end
redis.call('UNLINK', unpack(KEYS, 2))
redis.call('HSET', KEYS[1], f, ARGV[2] .. ':' .. ARGV[3])
return 1
"#;

/// UNLINK every key matching a SCAN pattern (one key per command: on a cluster they are
/// in many slots).
async fn unlink_matching(con: &mut RedisCon, pattern: &str) -> Result<(), RedisSinkError> {
    let keys = con
        .scan(pattern, None)
        .await
        .map_err(RedisSinkError::from_redis)?;
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("UNLINK").arg(k).ignore();
        }
        pipe.query_async::<()>(con)
            .await
            .map_err(RedisSinkError::from_redis)?;
    }
    Ok(())
}

/// Move the SKU hashes of layouts before 3 (`<prefix>:sku:<SKU>`) to their layout-3 keys,
/// keeping only what a rebuild keeps (the MQTT outbox marks, pending alerts and alert
/// state: so a SKU that vanished meanwhile is still cleared on the broker, and no alert
/// is lost), and delete the old distinct-user keys. One script call per key pair, atomic:
/// a crash leaves each SKU in the old place or the new, and running it again finishes
/// the rest (the old and new key spaces cannot overlap: `:sku:` against `:{`).
const MIGRATE_LUA: &str = r#"
local names = {'pub_lsn', 'pub_piece', 'pub_seq', 'pub_state', 'alerts', 'alert_state'}
local v = redis.call('HMGET', KEYS[1], unpack(names))
local w = {}
for i, name in ipairs(names) do
  if v[i] then w[#w + 1] = name; w[#w + 1] = v[i] end
end
if #w > 0 then redis.call('HSET', KEYS[2], unpack(w)) end
redis.call('DEL', KEYS[1])
return #w
"#;

/// Upgrade the keys of layouts before 3 (see [`MIGRATE_LUA`]); returns how many SKU hashes
/// moved. Runs before every snapshot load: nothing to do costs one SCAN.
pub async fn migrate_legacy_keys(
    con: &mut RedisCon,
    prefix: &str,
) -> Result<usize, RedisSinkError> {
    if con.is_cluster() {
        // layouts before 3 never ran on a cluster (and their key pairs span slots)
        return Ok(0);
    }
    let [skus, users] = layout::legacy_key_patterns(prefix);
    let script = redis::Script::new(MIGRATE_LUA);
    let mut moved = 0;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&skus)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("hash")
            .query_async(con)
            .await
            .map_err(RedisSinkError::from_redis)?;
        for k in &keys {
            let Some(sku) = layout::legacy_sku_of_key(prefix, k) else {
                continue;
            };
            let _: i64 = script
                .key(k)
                .key(layout::sku_key(prefix, sku))
                .invoke_async(con)
                .await
                .map_err(RedisSinkError::from_redis)?;
            moved += 1;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    unlink_matching(con, &users).await?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmget_replies_are_read_as_redis_rs_reads_them_or_refused() {
        use redis::Value::{Array, BulkString, Int, Nil, SimpleString};
        let mut out = Vec::new();
        let ok = Array(vec![
            BulkString(b"7".to_vec()),
            Nil,
            BulkString(b"".to_vec()),
        ]);
        assert!(hmget_reply(&ok, &mut out));
        let theirs: Vec<Option<String>> = redis::from_redis_value(ok.clone()).unwrap();
        let theirs: Vec<Option<&str>> = theirs.iter().map(|x| x.as_deref()).collect();
        assert_eq!(out, theirs);
        for refused in [
            Array(vec![BulkString(vec![0xff])]),
            Array(vec![Int(1)]),
            Nil,
            SimpleString("OK".into()),
        ] {
            assert!(!hmget_reply(&refused, &mut Vec::new()), "{refused:?}");
        }
    }

    #[test]
    fn a_cluster_node_is_recognised_by_its_info() {
        assert!(is_cluster("# Cluster\r\ncluster_enabled:1\r\n"));
        assert!(!is_cluster("# Cluster\r\ncluster_enabled:0\r\n"));
        assert!(!is_cluster(""));
    }

    /// The error redis-rs makes of a server's error reply `line`.
    fn reply(line: &str) -> redis::RedisError {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .expect("an error reply parses")
            .extract_error()
            .expect_err("an error reply is an error")
    }

    fn classify(line: &str) -> RedisSinkError {
        RedisSinkError::from_redis(reply(line))
    }

    #[test]
    fn replies_that_mean_not_now_are_transient() {
        for line in [
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "CLUSTERDOWN The cluster is down",
            // a live reshard: redis-rs follows them, a pipeline reply is sent again
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
            "NOREPLICAS Not enough good replicas to write.",
            "ERR max number of clients reached",
        ] {
            assert!(classify(line).is_transient(), "{line}");
        }
    }

    #[test]
    fn connection_trouble_is_transient() {
        for kind in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::TimedOut,
        ] {
            let e = redis::RedisError::from(std::io::Error::from(kind));
            assert!(RedisSinkError::from_redis(e).is_transient(), "{kind:?}");
        }
    }

    #[test]
    fn any_other_server_reply_is_definite() {
        for line in [
            "WRONGTYPE Operation against a key holding the wrong kind of value script: 3f2a, on @user_script:138.",
            "ERR user_script:138: attempt to index local 'x' (a nil value) script: 3f2a, on @user_script:138.",
            "ERR Error running script (call to f_3f2a): @user_script:138: bad argument",
            "CROSSSLOT Keys in request don't hash to the same slot",
            "NOSCRIPT No matching script. Please use EVAL.",
            "ERR unknown command 'EVALSHA', with args beginning with: 'abc' '2'",
            "READONLY You can't write against a read only replica.",
            "OOM command not allowed when used memory > 'maxmemory'.",
            "NOPERM User skusync has no permissions to run the 'evalsha' command",
            "WRONGPASS invalid username-password pair or user is disabled.",
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
            "SOMEFUTURECODE not known to anyone yet",
        ] {
            let e = classify(line);
            assert!(matches!(e, RedisSinkError::Definite(_)), "{line}: {e:?}");
        }
    }

    #[test]
    fn definite_messages_say_what_the_operator_must_do() {
        let cases = [
            (
                "READONLY You can't write against a read only replica.",
                "point redis.url at the primary",
            ),
            (
                "OOM command not allowed when used memory > 'maxmemory'.",
                "raise maxmemory",
            ),
            (
                "WRONGTYPE Operation against a key holding the wrong kind of value",
                "skusync resync",
            ),
            (
                "CROSSSLOT Keys in request don't hash to the same slot",
                "several cluster slots",
            ),
        ];
        for (line, fix) in cases {
            let m = classify(line).to_string();
            assert!(m.starts_with("Redis: "), "{m}");
            assert!(
                m.contains(line.split(' ').next().unwrap()),
                "code kept: {m}"
            );
            assert!(m.contains(fix), "{line}: {m}");
        }
    }

    #[test]
    fn an_unknown_command_reply_does_not_echo_its_arguments() {
        let m = classify(
            "ERR unknown command 'EVALSHA', with args beginning with: 'abc' 'SKU-42' 'WH-1'",
        )
        .to_string();
        assert!(m.contains("unknown command 'EVALSHA'"), "{m}");
        assert!(!m.contains("SKU-42") && !m.contains("WH-1"), "{m}");
    }

    #[test]
    fn the_scripts_own_refusals_keep_their_meaning() {
        assert!(matches!(
            classify("SKUSYNC_NOMETA meta hash missing: Redis lost its data; a resync is needed"),
            RedisSinkError::NoMeta
        ));
        let split = classify("SKUSYNC_SPLIT p:sku:A B holds part of a merged entry");
        assert!(
            matches!(&split, RedisSinkError::Split(key) if key == "p:sku:A B"),
            "{split:?}"
        );
        assert!(!split.is_transient());
    }

    #[test]
    fn a_split_message_leaves_the_sku_key_out() {
        let split = classify("SKUSYNC_SPLIT p:sku:SKU-42 holds part of a merged entry");
        let m = split.to_string();
        assert!(m.contains("SKUSYNC_SPLIT"), "{m}");
        assert!(!m.contains("SKU-42"), "{m}");
    }
}
