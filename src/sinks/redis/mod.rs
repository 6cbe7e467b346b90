//! The Redis sink: applies folded pieces with one Lua script call per batch, exactly once
//! (fenced per SKU by commit LSN and piece), and keeps the meta hash.
//!
//! Durability contract: a batch is durable when the script returned; only then are its
//! transactions reported to the LSN tracker. The script also records the batch's end LSN
//! in the meta hash (`applied_lsn`), and refuses to run when the meta hash is missing
//! (FLUSHALL, eviction, a new Redis), which makes the pipeline resync.

use crate::fold::batch::{Batch, Entry};
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
        let (keys, arg) = encode_entries(&self.settings, entries, end, quiet);
        self.invoke(keys, arg).await
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

    async fn invoke(&mut self, keys: Vec<String>, arg: String) -> Result<Applied, RedisSinkError> {
        let mut inv = self.script.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(arg);
        let r: (u64, u64, u64) = inv
            .invoke_async(&mut self.con)
            .await
            .map_err(RedisSinkError::from_redis)?;
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

/// Encode entries as the script's KEYS and ARGV[1] (format in `apply.lua`). The JSON is
/// written directly (no intermediate value tree): this runs for every batch.
pub fn encode_entries(
    s: &ApplySettings,
    entries: &[Entry],
    end: Option<Lsn>,
    quiet: bool,
) -> (Vec<String>, String) {
    use std::fmt::Write;
    let mut keys = vec![layout::meta_key(&s.prefix)];
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
    let steps: usize = entries.iter().map(|e| e.steps.len()).sum();
    let mut o = String::with_capacity(256 + entries.len() * 96 + steps * 96);
    let _ = write!(
        o,
        "{{\"keep\":\"{}\",\"low\":\"{}\",\"quiet\":{quiet},\"counters\":",
        s.keep_minutes, s.low_stock
    );
    json_str_array(&mut o, s.counters.iter().map(String::as_str));
    if let Some(e) = end {
        let _ = write!(o, ",\"end\":\"{}\"", e.0);
    }
    // cjson would decode an empty array as an object: only send non-empty ones.
    if !entries.is_empty() {
        o.push_str(",\"e\":[");
    }
    for (n, e) in entries.iter().enumerate() {
        let ki = *index.entry(e.sku.as_str()).or_insert_with(|| {
            keys.push(layout::sku_key(&s.prefix, &e.sku));
            keys.len() // Lua is 1-based: KEYS[i]
        });
        if n > 0 {
            o.push(',');
        }
        let _ = write!(
            o,
            "{{\"k\":{ki},\"f\":\"{}\",\"fp\":{},\"l\":\"{}\",\"p\":{},\"t\":\"{}\"",
            e.first.0.0, e.first.1, e.last.0.0, e.last.1, e.commit_ms
        );
        if !e.truncate.is_empty() {
            o.push_str(",\"x\":");
            json_str_array(&mut o, e.truncate.iter().map(String::as_str));
        }
        if !e.steps.is_empty() {
            o.push_str(",\"s\":[");
            for (i, st) in e.steps.iter().enumerate() {
                if i > 0 {
                    o.push(',');
                }
                let _ = write!(o, "[\"{}\",\"{}\",", st.lsn.0, st.commit_ms);
                if st.rows.is_empty() {
                    o.push_str("false");
                } else {
                    o.push('[');
                    for (i, (f, op)) in st.rows.iter().enumerate() {
                        if i > 0 {
                            o.push(',');
                        }
                        o.push('[');
                        json_str(&mut o, f);
                        if let RowOp::Set {
                            location,
                            on_hand,
                            reserved,
                            threshold,
                        } = op
                        {
                            o.push(',');
                            match location {
                                Field::Keep => o.push_str("false"),
                                Field::Val(v) => json_str(&mut o, v),
                            }
                            for n in [on_hand, reserved] {
                                match n {
                                    Field::Keep => o.push_str(",false"),
                                    Field::Val(v) => {
                                        let _ = write!(o, ",\"{v}\"");
                                    }
                                }
                            }
                            match threshold {
                                Field::Keep => o.push_str(",false"),
                                Field::Val(None) => o.push_str(",\"\""),
                                Field::Val(Some(t)) => {
                                    let _ = write!(o, ",\"{t}\"");
                                }
                            }
                        }
                        o.push(']');
                    }
                    o.push(']');
                }
                o.push_str(if st.eval { ",1]" } else { ",0]" });
            }
            o.push(']');
        }
        if !e.counters.is_empty() {
            o.push_str(",\"c\":[");
            for (i, (k, v)) in e.counters.iter().enumerate() {
                o.push_str(if i > 0 { ",[" } else { "[" });
                json_str(&mut o, k);
                let _ = write!(o, ",\"{v}\"]");
            }
            o.push(']');
        }
        if !e.buckets.is_empty() {
            o.push_str(",\"b\":[");
            for (i, ((k, m), v)) in e.buckets.iter().enumerate() {
                o.push_str(if i > 0 { ",[" } else { "[" });
                json_str(&mut o, k);
                let _ = write!(o, ",\"{m}\",\"{v}\"]");
            }
            o.push(']');
        }
        if !e.users.is_empty() {
            o.push_str(",\"u\":[");
            let mut i = 0;
            for ((k, m), ids) in &e.users {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                // Lua's unpack has a stack limit: keep each PFADD modest.
                for chunk in ids.chunks(500) {
                    o.push_str(if i > 0 { ",[" } else { "[" });
                    i += 1;
                    json_str(&mut o, k);
                    let _ = write!(o, ",\"{m}\",");
                    json_str_array(&mut o, chunk.iter().copied());
                    o.push(']');
                }
            }
            o.push(']');
        }
        o.push('}');
    }
    if !entries.is_empty() {
        o.push(']');
    }
    o.push('}');
    (keys, o)
}

/// Append `s` as a JSON string.
fn json_str(o: &mut String, s: &str) {
    // serde_json's escaping, without building a value.
    o.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

fn json_str_array<'a>(o: &mut String, items: impl Iterator<Item = &'a str>) {
    o.push('[');
    for (i, s) in items.enumerate() {
        if i > 0 {
            o.push(',');
        }
        json_str(o, s);
    }
    o.push(']');
}

/// The meta hash, as read at startup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub applied_lsn: Option<Lsn>,
    pub system_id: Option<String>,
    pub timeline: Option<String>,
    pub fingerprint: Option<String>,
    pub bootstrap_done: bool,
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
