//! The Redis sink: applies folded pieces with one Lua script call per batch, exactly once
//! (fenced per SKU by commit LSN and piece), and keeps the meta hash.
//!
//! Durability contract: a batch is durable when the script returned; only then are its
//! transactions reported to the LSN tracker. The script also records the batch's end LSN
//! in the meta hash (`applied_lsn`), and refuses to run when the meta hash is missing
//! (FLUSHALL, eviction, a new Redis), which makes the pipeline resync.

use crate::fold::batch::{Batch, Entry, TraceOp};
use crate::fold::{Field, Piece, RowOp};
use crate::lsn::Lsn;
use crate::sinks::layout;
use redis::IntoConnectionInfo;
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::time::Duration;

/// The apply script (see `apply.lua`).
pub const APPLY_LUA: &str = include_str!("apply.lua");

/// Errors of the Redis sink.
#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    /// The meta hash is gone: Redis lost its data; rebuild from a snapshot.
    #[error("Redis lost skusync's data (meta hash missing): a resync is needed")]
    NoMeta,
    /// A merged entry straddles a SKU's fence: part of it was applied before (the
    /// horizon was wrong). Nothing was written; replay with a higher horizon.
    #[error("Redis: {0}")]
    Split(String),
    /// Connection trouble; retry.
    #[error("Redis: {0}")]
    Transient(String),
    /// Misconfiguration or a refused command; the operator must act.
    #[error("Redis: {0}")]
    Definite(String),
}

impl RedisSinkError {
    fn from_redis(e: redis::RedisError) -> RedisSinkError {
        let msg = e.to_string();
        if msg.contains("SKUSYNC_NOMETA") {
            return RedisSinkError::NoMeta;
        }
        if msg.contains("SKUSYNC_SPLIT") {
            return RedisSinkError::Split(msg);
        }
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || msg.contains("LOADING")
            || msg.contains("BUSY")
            || msg.contains("TRYAGAIN")
        {
            RedisSinkError::Transient(msg)
        } else if msg.contains("NOPERM")
            || msg.contains("WRONGPASS")
            || msg.contains("NOAUTH")
            || msg.contains("OOM")
            || msg.contains("READONLY")
        {
            RedisSinkError::Definite(msg)
        } else {
            RedisSinkError::Transient(msg)
        }
    }

    /// Whether retrying can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, RedisSinkError::Transient(_))
    }
}

/// Parameters of every apply call.
#[derive(Clone, Debug)]
pub struct ApplySettings {
    pub prefix: String,
    pub keep_minutes: i64,
    pub low_stock: i64,
    pub counters: Vec<String>,
}

/// Build a Redis client from the configured URL (`rediss://` uses rustls; `ca_file`
/// replaces the system roots; `SKUSYNC_REDIS_PASSWORD` fills a missing password).
pub fn client(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<redis::Client, RedisSinkError> {
    let mut info: redis::ConnectionInfo = url
        .into_connection_info()
        .map_err(|e| RedisSinkError::Definite(format!("redis.url: {e}")))?;
    if let Ok(pw) = std::env::var("SKUSYNC_REDIS_PASSWORD")
        && info.redis_settings().password().is_none()
    {
        let settings = info.redis_settings().clone().set_password(pw);
        info = info.set_redis_settings(settings);
    }
    let tls = url.starts_with("rediss://");
    match (tls, ca_file) {
        (true, Some(ca)) => {
            let root = std::fs::read(ca).map_err(|e| {
                RedisSinkError::Definite(format!("redis.ca_file {}: {e}", ca.display()))
            })?;
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                },
            )
            .map_err(|e| RedisSinkError::Definite(format!("redis.url: {e}")))
        }
        _ => redis::Client::open(info)
            .map_err(|e| RedisSinkError::Definite(format!("redis.url: {e}"))),
    }
}

/// A connection manager that reconnects in the background (commands that fail while it
/// does return errors; the pipeline retries whole batches, which the fence makes safe).
pub async fn connect(client: &redis::Client) -> Result<ConnectionManager, RedisSinkError> {
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_max_delay(Duration::from_secs(5))
        .set_number_of_retries(2);
    tokio::time::timeout(
        Duration::from_secs(10),
        client.get_connection_manager_with_config(cfg),
    )
    .await
    .map_err(|_| RedisSinkError::Transient("no connection within 10 s".into()))?
    .map_err(RedisSinkError::from_redis)
}

/// The apply script bound to a connection.
#[derive(Clone)]
pub struct Applier {
    con: ConnectionManager,
    script: redis::Script,
    settings: ApplySettings,
}

/// Result of one apply call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// SKU entries applied.
    pub applied: u64,
    /// SKU entries skipped by the fence (replays).
    pub fenced: u64,
    /// Low-stock alerts raised.
    pub alerts: u64,
}

impl std::ops::AddAssign for Applied {
    fn add_assign(&mut self, o: Applied) {
        self.applied += o.applied;
        self.fenced += o.fenced;
        self.alerts += o.alerts;
    }
}

impl Applier {
    /// Bind the script (EVALSHA, loaded on first NOSCRIPT) to a connection.
    pub fn new(con: ConnectionManager, settings: ApplySettings) -> Applier {
        Applier {
            con,
            script: redis::Script::new(APPLY_LUA),
            settings,
        }
    }

    /// The connection, for other commands.
    pub fn connection(&self) -> ConnectionManager {
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
        let cmd = encode_entries(&self.settings, entries, end, quiet, self.script.get_hash());
        self.invoke(cmd).await
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

    /// Clear truncated tables from the given SKU keys, fenced by the truncate piece.
    pub async fn truncate(
        &mut self,
        piece: &Piece,
        skus: &[String],
    ) -> Result<Applied, RedisSinkError> {
        self.apply(&Batch::truncate(piece, skus), None, false).await
    }

    async fn invoke(&mut self, cmd: redis::Cmd) -> Result<Applied, RedisSinkError> {
        let r: Result<(u64, u64, u64), redis::RedisError> = cmd.query_async(&mut self.con).await;
        let r = match r {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // A restarted or flushed Redis forgot the script: load it, send again.
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(APPLY_LUA)
                    .query_async::<String>(&mut self.con)
                    .await
                    .map_err(RedisSinkError::from_redis)?;
                cmd.query_async(&mut self.con).await
            }
            r => r,
        };
        let r = r.map_err(RedisSinkError::from_redis)?;
        Ok(Applied {
            applied: r.0,
            fenced: r.1,
            alerts: r.2,
        })
    }

    /// All SKUs with a hash (SCAN; for truncates and republishing).
    pub async fn all_skus(&mut self) -> Result<Vec<String>, RedisSinkError> {
        scan_skus(&mut self.con, &self.settings.prefix).await
    }
}

/// SCAN every SKU hash key and return the SKUs.
pub async fn scan_skus(
    con: &mut ConnectionManager,
    prefix: &str,
) -> Result<Vec<String>, RedisSinkError> {
    let pattern = format!("{}*", glob_escape(&layout::sku_key_prefix(prefix)));
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("hash")
            .query_async(con)
            .await
            .map_err(RedisSinkError::from_redis)?;
        out.extend(
            keys.iter()
                .filter_map(|k| layout::sku_of_key(prefix, k).map(str::to_string)),
        );
        cursor = next;
        if cursor == 0 {
            return Ok(out);
        }
    }
}

/// Escape glob metacharacters for SCAN MATCH.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Encode entries as one EVALSHA of the apply script: KEYS (meta hash, then each SKU
/// hash once) and the flat ARGV described in `apply.lua`. Arguments go straight into the
/// command's buffer: this runs for every batch.
pub fn encode_entries(
    s: &ApplySettings,
    entries: &[Entry],
    end: Option<Lsn>,
    quiet: bool,
    sha: &str,
) -> redis::Cmd {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
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
    c.arg(sha)
        .arg(keys.len() + 1)
        .arg(layout::meta_key(&s.prefix));
    for k in &keys {
        c.arg(layout::sku_key(&s.prefix, k));
    }
    c.arg(s.keep_minutes)
        .arg(s.low_stock)
        .arg(if quiet { "1" } else { "0" })
        .arg(end.map(|e| e.0.to_string()).unwrap_or_default())
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
            c.arg(t);
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
            c.arg(k).arg(*v);
        }
        c.arg(e.buckets.len());
        for ((k, m), v) in &e.buckets {
            c.arg(k).arg(*m).arg(*v);
        }
        // Lua's unpack has a stack limit: keep each PFADD modest.
        let chunks: usize = e.users.values().map(|ids| ids.len().div_ceil(500)).sum();
        c.arg(chunks);
        for ((k, m), ids) in &e.users {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            for chunk in ids.chunks(500) {
                c.arg(k).arg(*m).arg(chunk.len());
                for id in chunk {
                    c.arg(*id);
                }
            }
        }
    }
    c
}

/// Trace record flags (see `apply.lua`).
const T_DEL: u8 = 1;
const T_ON_KEEP: u8 = 2;
const T_RES_KEEP: u8 = 4;
const T_THR_SET: u8 = 8;
const T_THR_CLEAR: u8 = 16;
const T_EVAL: u8 = 32;
const T_NO_ROW: u8 = 64;

/// An entry's trace as packed records (`<BI4ddddd`: flags, row index, on_hand, reserved,
/// threshold, LSN minus the entry's first LSN, commit ms). Binary, because the script
/// unpacks numbers without creating a Lua string per value; quantities are within
/// +-2^53 (the fold skips larger ones), so doubles hold them exactly.
fn encode_trace(out: &mut Vec<u8>, e: &Entry) {
    out.reserve(e.trace.len() * 45);
    for r in &e.trace {
        let (mut flags, mut on, mut res, mut thr) = (0u8, 0i64, 0i64, 0i64);
        match &r.op {
            TraceOp::None => flags |= T_NO_ROW,
            TraceOp::Del => flags |= T_DEL,
            TraceOp::Set {
                on_hand,
                reserved,
                threshold,
            } => {
                match on_hand {
                    Field::Keep => flags |= T_ON_KEEP,
                    Field::Val(v) => on = *v,
                }
                match reserved {
                    Field::Keep => flags |= T_RES_KEEP,
                    Field::Val(v) => res = *v,
                }
                match threshold {
                    Field::Keep => {}
                    Field::Val(None) => flags |= T_THR_CLEAR,
                    Field::Val(Some(t)) => {
                        flags |= T_THR_SET;
                        thr = *t;
                    }
                }
            }
        }
        if r.eval {
            flags |= T_EVAL;
        }
        out.push(flags);
        out.extend_from_slice(&r.row.to_le_bytes());
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
}

/// Read the meta hash; `None` when it does not exist.
pub async fn read_meta(
    con: &mut ConnectionManager,
    prefix: &str,
) -> Result<Option<Meta>, RedisSinkError> {
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
    }))
}

/// Write meta fields.
pub async fn write_meta(
    con: &mut ConnectionManager,
    prefix: &str,
    fields: &[(&str, String)],
) -> Result<(), RedisSinkError> {
    let mut cmd = redis::cmd("HSET");
    cmd.arg(layout::meta_key(prefix));
    for (k, v) in fields {
        cmd.arg(*k).arg(v);
    }
    cmd.query_async::<()>(con)
        .await
        .map_err(RedisSinkError::from_redis)
}

/// Reset a SKU hash before a snapshot load: drop everything derived from the database
/// (stock rows, totals, counters, buckets, fence) but keep the MQTT outbox marks and
/// pending alerts, and the key itself. Distinct-user HyperLogLogs are deleted.
const RESET_LUA: &str = r#"
local keep = {pub_lsn = true, pub_state = true, alerts = true, alert_state = true}
for i, key in ipairs(KEYS) do
  local fields = redis.call('HKEYS', key)
  for _, f in ipairs(fields) do
    if not keep[f] then redis.call('HDEL', key, f) end
  end
  redis.call('HSET', key, 'lsn', ARGV[1], 'piece', '-1')
end
return #KEYS
"#;

/// Reset every SKU hash (see [`RESET_LUA`]) and delete the distinct-user keys, with the
/// fence set just below the snapshot's consistent point.
pub async fn reset_all(
    con: &mut ConnectionManager,
    prefix: &str,
    fence: Lsn,
) -> Result<usize, RedisSinkError> {
    let skus = scan_skus(con, prefix).await?;
    let script = redis::Script::new(RESET_LUA);
    for chunk in skus.chunks(500) {
        let mut inv = script.prepare_invoke();
        for sku in chunk {
            inv.key(layout::sku_key(prefix, sku));
        }
        inv.arg(fence.0.to_string());
        let _: i64 = inv
            .invoke_async(con)
            .await
            .map_err(RedisSinkError::from_redis)?;
    }
    // Distinct-user HyperLogLogs: `{<prefix>:sku:...}:u:...`.
    let pattern = format!("{{{}*", glob_escape(&layout::sku_key_prefix(prefix)));
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await
            .map_err(RedisSinkError::from_redis)?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(con)
                .await
                .map_err(RedisSinkError::from_redis)?;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(skus.len())
}
