//! `skusync status [--json] [--max-lag-bytes N]`: where the slot and Redis stand, for an
//! operator or a monitoring script.

use crate::config::Config;
use crate::pg::meta;
use crate::sinks::layout;
use serde::Serialize;
use std::collections::HashMap;

/// Default `--max-lag-bytes`: 1 GiB of WAL behind.
pub const DEFAULT_MAX_LAG_BYTES: u64 = 1 << 30;

/// Everything `status` reports (`--json` prints exactly this object).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    /// Slot name from the config.
    pub slot: String,
    /// Whether the slot exists.
    pub slot_exists: bool,
    /// Process streaming the slot, if any.
    pub active_pid: Option<i32>,
    /// The slot's confirmed flush LSN (`X/Y`).
    pub confirmed_lsn: Option<String>,
    /// WAL bytes between the server's current LSN and the confirmed LSN.
    pub lag_bytes: Option<i64>,
    /// `replay_lag` of the slot's walsender, in seconds (null when inactive or unknown).
    pub lag_seconds: Option<f64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// `applied_lsn` from the Redis meta hash.
    pub applied_lsn: Option<String>,
    /// `bootstrap` from the Redis meta hash (`done` once a snapshot load finished).
    pub bootstrap: Option<String>,
    /// Last MQTT publish (meta `last_publish_ms`) as RFC 3339.
    pub last_publish: Option<String>,
    /// With `[redis] cluster = true`: the primaries serving the cluster's slots (null for a
    /// standalone Redis, or when it could not be read).
    pub redis_primaries: Option<usize>,
    /// Why Redis could not be read (null when it was read, or not configured).
    pub redis_error: Option<String>,
    /// Problems that make the exit code 1.
    pub problems: Vec<String>,
    /// True when `problems` is empty.
    pub ok: bool,
}

/// Gather the status. `Err` only when the configuration or the Postgres connection is
/// unusable (exit code 2); unhealthy states are `problems`.
pub async fn gather(cfg: &Config, max_lag_bytes: u64) -> Result<Status, String> {
    let (client, pgc) = super::pg_client(cfg).await?;
    let slot_name = cfg.postgres.slot.clone();
    let slot = meta::slot_state(&client, &pgc, &slot_name)
        .await
        .map_err(|e| e.to_string())?;
    let mut st = Status {
        slot: slot_name.clone(),
        ..Default::default()
    };
    match &slot {
        None => st.problems.push(format!(
            "replication slot {slot_name} does not exist (skusync run creates it)"
        )),
        Some(s) => {
            st.slot_exists = true;
            st.active_pid = s.active_pid;
            st.confirmed_lsn = s.confirmed_flush_lsn.map(|l| l.to_string());
            st.wal_status = s.wal_status.clone();
            if s.wal_status.as_deref() == Some("lost") {
                st.problems.push(format!(
                    "replication slot {slot_name} lost WAL (wal_status = lost)"
                ));
            }
            if s.wal_status.as_deref() == Some("unreserved") {
                st.problems.push(format!(
                    "replication slot {slot_name} is about to lose WAL (wal_status = unreserved: behind by \
                     more than max_slot_wal_keep_size)"
                ));
            }
            // pg_current_wal_lsn() fails on a standby; lag then stays unknown
            if let Ok(row) = client
                .query_one(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot_name],
                )
                .await
            {
                st.lag_bytes = row.get(0);
            }
            if let Some(pid) = s.active_pid
                && let Ok(Some(row)) = client
                    .query_opt(
                        "SELECT extract(epoch FROM replay_lag)::float8 FROM pg_stat_replication WHERE pid = $1",
                        &[&pid],
                    )
                    .await
            {
                st.lag_seconds = row.get(0);
            }
            if let Some(lag) = st.lag_bytes
                && lag > 0
                && lag as u64 > max_lag_bytes
            {
                st.problems.push(format!(
                    "lag of {lag} bytes exceeds --max-lag-bytes {max_lag_bytes}"
                ));
            }
        }
    }
    if let Some(rc) = &cfg.redis {
        match read_meta(rc, &mut st).await {
            Ok(m) => {
                st.applied_lsn = m
                    .get("applied_lsn")
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|l| crate::lsn::Lsn(l).to_string());
                st.bootstrap = m.get("bootstrap").cloned();
                st.last_publish = m
                    .get("last_publish_ms")
                    .and_then(|v| v.parse::<i64>().ok())
                    .and_then(super::unix_ms_to_rfc3339);
            }
            Err(e) => st.redis_error = Some(e),
        }
    }
    st.ok = st.problems.is_empty();
    Ok(st)
}

/// The meta hash; on a cluster also its primaries, and a problem when it does not serve
/// every slot.
async fn read_meta(
    rc: &crate::config::RedisConfig,
    st: &mut Status,
) -> Result<HashMap<String, String>, String> {
    let prefix = &rc.prefix;
    let client = crate::sinks::redis::client(rc.url.all(), rc.cluster, rc.ca_file.as_deref())
        .map_err(|e| e.to_string())?;
    let mut con = tokio::time::timeout(super::CONNECT_TIMEOUT, client.open())
        .await
        .map_err(|_| "redis.url: no connection".to_string())?
        .map_err(|e| format!("redis.url: {e}"))?;
    if con.is_cluster() {
        st.redis_primaries = con.primaries().await.ok().map(|p| p.len());
        if let Err(e) = crate::sinks::redis::check_topology(&mut con).await {
            st.problems.push(e.to_string());
        }
    }
    redis::cmd("HGETALL")
        .arg(layout::meta_key(prefix))
        .query_async(&mut con)
        .await
        .map_err(|e| format!("redis: {e}"))
}

/// Human-readable form: one `key: value` line each (`-` for unknown).
pub fn render_text(st: &Status) -> String {
    let o = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<14} {v}\n"));
    line(
        "slot:",
        format!(
            "{}{}",
            st.slot,
            if st.slot_exists { "" } else { " (missing)" }
        ),
    );
    line(
        "active pid:",
        st.active_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into()),
    );
    line("confirmed lsn:", o(&st.confirmed_lsn));
    line(
        "lag:",
        format!(
            "{} bytes, {} s",
            st.lag_bytes
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            st.lag_seconds
                .map(|x| format!("{x:.3}"))
                .unwrap_or_else(|| "-".into())
        ),
    );
    line("wal status:", o(&st.wal_status));
    line("applied lsn:", o(&st.applied_lsn));
    line("bootstrap:", o(&st.bootstrap));
    line("last publish:", o(&st.last_publish));
    if let Some(n) = st.redis_primaries {
        line("redis:", format!("cluster of {n} primaries"));
    }
    if let Some(e) = &st.redis_error {
        line("redis error:", e.clone());
    }
    for p in &st.problems {
        line("problem:", p.clone());
    }
    s
}
