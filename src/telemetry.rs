//! Telemetry as a spec: the pipeline's metrics are named here, and every event the
//! daemon reports goes through one function below that counts it (and logs it where a
//! log line is useful). The HTTP server's, the client API's and the webhooks' own metrics
//! are named in their modules (`http`, `api`, `sinks::webhook`); docs/operations.md lists
//! them all.
//!
//! Names follow `skusync_<noun>_<unit>[_total]`. Labels are bounded: `server`
//! (`postgres`, `redis`, `mqtt`) on reconnects, `reason` on writer refusals, and in the
//! other modules an HTTP status, a limit's name or a configured webhook's name. No SKU,
//! table, row value, user id or password ever becomes a label or a log field here.
//!
//! Besides metrics this module keeps the process [`Health`] (what `/readyz` and the
//! systemd watchdog look at) and sends the systemd notifications (`READY=1`, `STATUS=`,
//! `WATCHDOG=1`) through [`crate::notify`].

use crate::lsn::Lsn;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

/// Last LSN received from the server (WAL data or keepalive), as a number.
pub const RECEIVED_LSN: &str = "skusync_received_lsn_bytes";
/// LSN last reported to the server as flushed (the slot's confirmed position).
pub const CONFIRMED_LSN: &str = "skusync_confirmed_lsn_bytes";
/// `pg_current_wal_lsn() - confirmed_flush_lsn` of the slot, polled every 10 s.
pub const SLOT_LAG: &str = "skusync_slot_lag_bytes";
/// Commit time of a transaction to its Redis apply script returning.
pub const COMMIT_TO_REDIS: &str = "skusync_commit_to_redis_seconds";
/// Commit time of a published SKU state (hash field `ts`) to its PUBACK.
pub const COMMIT_TO_PUBACK: &str = "skusync_commit_to_puback_seconds";
/// Transactions received from the slot.
pub const TRANSACTIONS: &str = "skusync_transactions_total";
/// Row changes (insert/update/delete) of mapped and unmapped tables received.
pub const ROWS: &str = "skusync_rows_total";
/// SKU entries applied in Redis (`applied`), by the apply script or thin.
pub const SKU_UPDATES: &str = "skusync_sku_updates_total";
/// SKU entries the Redis fence skipped as replays (`fenced`).
pub const FENCED: &str = "skusync_fenced_entries_total";
/// Of the applied entries, those worked out by skusync and written thin
/// (`sinks::redis::thin`).
pub const THIN_ENTRIES: &str = "skusync_thin_entries_total";
/// Apply calls written with thin reads sent ahead of the previous call's write
/// (`Applier::plan_ahead`).
pub const READ_AHEAD_CALLS: &str = "skusync_read_ahead_calls_total";
/// State messages acknowledged by the broker.
pub const MQTT_PUBLISHED: &str = "skusync_mqtt_published_total";
/// Messages the broker refused (PUBACK reason) or that were too large to send.
pub const MQTT_REFUSED: &str = "skusync_mqtt_refused_total";
/// Reconnects to a broker that held an older epoch sequence than Redis recorded (restored
/// from an older persistence file): the SKUs acknowledged since were republished.
pub const MQTT_EPOCH_ROLLBACKS: &str = "skusync_mqtt_epoch_rollbacks_total";
/// Low-stock alerts raised by the Redis script.
pub const ALERTS_RAISED: &str = "skusync_alerts_raised_total";
/// Alert messages acknowledged by the broker.
pub const ALERTS_PUBLISHED: &str = "skusync_alerts_published_total";
/// Column values that could not be used and were skipped.
pub const SKIPPED_VALUES: &str = "skusync_skipped_values_total";
/// Activity rows whose kind maps to no counter.
pub const UNKNOWN_KINDS: &str = "skusync_unknown_activity_kinds_total";
/// Row changes of published tables no `[[inventory]]` or `[[activity]]` maps (ignored).
pub const UNMAPPED_ROWS: &str = "skusync_unmapped_rows_total";
/// Row changes that failed their table's `where` filter (they count nowhere).
pub const FILTERED_ROWS: &str = "skusync_filtered_rows_total";
/// Rows placed nowhere because a lookup did not resolve (a missing or filtered-out
/// referenced row, a NULL reference); they count once it resolves.
pub const UNRESOLVED_ROWS: &str = "skusync_unresolved_rows_total";
/// Changes of referenced rows that changed what they resolve to (their dependents move).
pub const LOOKUP_CHANGES: &str = "skusync_lookup_changes_total";
/// Reconnects, label `server` = `postgres` | `redis` | `mqtt`.
pub const RECONNECTS: &str = "skusync_reconnects_total";
/// Rebuilds of Redis from a fresh snapshot (after the first load).
pub const RESYNCS: &str = "skusync_resyncs_total";
/// Writes Redis refused, label `reason` = `rollback` (Redis lost writes: its
/// `applied_lsn` or writer token went back) | `fenced` (another instance took the token).
pub const WRITER_REFUSED: &str = "skusync_writer_refusals_total";
/// Batches waiting in the source -> pipeline channel.
pub const BACKLOG_CHANNEL: &str = "skusync_backlog_channel_batches";
/// SKU entries in the pipeline's pending apply batch.
pub const BACKLOG_BATCH: &str = "skusync_backlog_batch_entries";
/// 1 while streaming from the slot, else 0.
pub const STREAMING: &str = "skusync_streaming_bool";
/// 1 while the apply is backed up (it is applying a full batch: the stream brings changes
/// faster than Redis takes them) and the publisher spaces its rounds out, else 0.
pub const APPLY_BACKED_UP: &str = "skusync_apply_backed_up_bool";
/// Times the apply became backed up (a large transaction, a backlog).
pub const APPLY_BACKED_UP_SPELLS: &str = "skusync_apply_backed_up_total";

/// Histogram buckets in seconds, for both latency histograms.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// A server skusync talks to (the `server` label).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Server {
    Postgres,
    Redis,
    Mqtt,
}

impl Server {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Server::Postgres => "postgres",
            Server::Redis => "redis",
            Server::Mqtt => "mqtt",
        }
    }
}

/// What the daemon is doing (`STATUS=` and `/readyz`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Connecting and running the startup checks.
    Starting = 0,
    /// Another process holds the slot; waiting for it.
    Standby = 1,
    /// Rebuilding Redis from a snapshot (first load or resync).
    Resyncing = 2,
    /// Streaming from the slot.
    Streaming = 3,
}

impl Role {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Standby => "standby",
            Role::Resyncing => "resyncing",
            Role::Streaming => "streaming",
        }
    }
    fn from_u8(v: u8) -> Role {
        match v {
            1 => Role::Standby,
            2 => Role::Resyncing,
            3 => Role::Streaming,
            _ => Role::Starting,
        }
    }
}

/// Process health, shared by the daemon, the HTTP endpoints and the watchdog.
#[derive(Debug, Default)]
pub struct Health {
    role: AtomicU8,
    /// Monotonic ms of the last main-loop heartbeat.
    heartbeat_ms: AtomicU64,
    /// Monotonic ms of the last successful Redis call (apply or probe); 0 = never.
    redis_ok_ms: AtomicU64,
    /// The last Redis call failed.
    redis_down: AtomicBool,
    mqtt_configured: AtomicBool,
    mqtt_connected: AtomicBool,
    ready_sent: AtomicBool,
    slot_lag: AtomicI64,
    confirmed: AtomicU64,
}

/// The process-wide health.
pub fn health() -> &'static Health {
    static H: OnceLock<Health> = OnceLock::new();
    H.get_or_init(Health::default)
}

fn mono_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    // +1 so that 0 always means "never"
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// For log lines said at most every `every_ms`: true (and `last_ms` moved to now) when
/// that long has passed since the last time it was true; one caller wins a race.
pub fn due(last_ms: &std::sync::atomic::AtomicI64, every_ms: i64) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let now = unix_ms();
    let last = last_ms.load(Relaxed);
    now - last >= every_ms
        && last_ms
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
}

/// Now, in unix milliseconds (0 before 1970).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Install the Prometheus recorder (once per process) and describe every metric; later
/// calls return the same handle. Counters start at 0 so every name is scrapeable at once.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| b.install_recorder())
                .unwrap_or_else(|_| {
                    // another recorder is installed (tests): render from a detached one
                    PrometheusBuilder::new().build_recorder().handle()
                });
            describe_all();
            handle
        })
        .clone()
}

fn describe_all() {
    use metrics::Unit;
    describe_gauge!(
        RECEIVED_LSN,
        Unit::Bytes,
        "Last LSN received from the slot."
    );
    describe_gauge!(
        CONFIRMED_LSN,
        Unit::Bytes,
        "LSN last confirmed (flushed) to the slot."
    );
    describe_gauge!(
        SLOT_LAG,
        Unit::Bytes,
        "pg_current_wal_lsn() - confirmed_flush_lsn of the slot."
    );
    describe_histogram!(
        COMMIT_TO_REDIS,
        Unit::Seconds,
        "Transaction commit time to Redis apply returned."
    );
    describe_histogram!(
        COMMIT_TO_PUBACK,
        Unit::Seconds,
        "SKU state commit time to MQTT PUBACK."
    );
    for (name, help) in [
        (TRANSACTIONS, "Transactions received."),
        (ROWS, "Row changes received."),
        (SKU_UPDATES, "SKU entries applied in Redis."),
        (FENCED, "SKU entries skipped by the replay fence."),
        (
            THIN_ENTRIES,
            "SKU entries worked out by skusync and written thin.",
        ),
        (
            READ_AHEAD_CALLS,
            "Apply calls whose thin reads went out ahead of the previous call's write.",
        ),
        (MQTT_PUBLISHED, "State messages acknowledged by the broker."),
        (MQTT_REFUSED, "Messages refused by the broker or too large."),
        (
            MQTT_EPOCH_ROLLBACKS,
            "Brokers found holding an older epoch (an older persistence file); newer states republished.",
        ),
        (ALERTS_RAISED, "Low-stock alerts raised."),
        (
            ALERTS_PUBLISHED,
            "Alert messages acknowledged by the broker.",
        ),
        (SKIPPED_VALUES, "Unusable column values skipped."),
        (UNKNOWN_KINDS, "Activity rows of an unmapped kind."),
        (
            UNMAPPED_ROWS,
            "Row changes of published tables that no mapping names (ignored).",
        ),
        (
            FILTERED_ROWS,
            "Row changes that failed their table's where filter (counted nowhere).",
        ),
        (
            UNRESOLVED_ROWS,
            "Rows placed nowhere because a lookup did not resolve.",
        ),
        (
            LOOKUP_CHANGES,
            "Changes of referenced rows that changed what they resolve to.",
        ),
        (RESYNCS, "Redis rebuilds from a fresh snapshot."),
        (
            APPLY_BACKED_UP_SPELLS,
            "Times the apply became backed up (the publisher then spaces its rounds out).",
        ),
    ] {
        describe_counter!(name, help);
        counter!(name).absolute(0);
    }
    describe_counter!(
        WRITER_REFUSED,
        "Redis writes refused: rollback (Redis lost writes) or fenced (another writer)."
    );
    for r in ["rollback", "fenced"] {
        counter!(WRITER_REFUSED, "reason" => r).absolute(0);
    }
    describe_counter!(RECONNECTS, "Reconnects per server.");
    for s in [Server::Postgres, Server::Redis, Server::Mqtt] {
        counter!(RECONNECTS, "server" => s.as_str()).absolute(0);
    }
    describe_gauge!(BACKLOG_CHANNEL, "Batches waiting in the source channel.");
    describe_gauge!(BACKLOG_BATCH, "SKU entries in the pending apply batch.");
    describe_gauge!(STREAMING, "1 while streaming from the slot.");
    describe_gauge!(
        APPLY_BACKED_UP,
        "1 while the apply is backed up and the publisher spaces its rounds out."
    );
    for g in [
        RECEIVED_LSN,
        CONFIRMED_LSN,
        SLOT_LAG,
        BACKLOG_CHANNEL,
        BACKLOG_BATCH,
        STREAMING,
        APPLY_BACKED_UP,
    ] {
        gauge!(g).set(0.0);
    }
}

// ---- events -------------------------------------------------------------------------

/// The main loop is alive (pipeline tick, source tick, back-off step).
pub fn heartbeat() {
    health().heartbeat_ms.store(mono_ms(), Ordering::Relaxed);
}

/// The daemon's role changed. Sends `STATUS=` and, the first time the daemon streams or
/// waits as a standby, `READY=1`.
pub fn role(r: Role) {
    let h = health();
    let old = h.role.swap(r as u8, Ordering::Relaxed);
    gauge!(STREAMING).set(if r == Role::Streaming { 1.0 } else { 0.0 });
    let status = status_line();
    if matches!(r, Role::Streaming | Role::Standby) && !h.ready_sent.swap(true, Ordering::Relaxed) {
        let _ = crate::notify::ready(&status);
    } else if old != r as u8 {
        let _ = crate::notify::status(&status);
    }
}

/// The current role.
pub fn current_role() -> Role {
    Role::from_u8(health().role.load(Ordering::Relaxed))
}

/// `STATUS=` text: role, slot lag, confirmed LSN.
pub fn status_line() -> String {
    let h = health();
    format!(
        "{}; slot lag {} bytes; confirmed {}",
        current_role().as_str(),
        h.slot_lag.load(Ordering::Relaxed),
        Lsn(h.confirmed.load(Ordering::Relaxed))
    )
}

/// The source sent a standby status update with these positions.
pub fn positions(received: Lsn, confirmed: Lsn) {
    gauge!(RECEIVED_LSN).set(received.0 as f64);
    gauge!(CONFIRMED_LSN).set(confirmed.0 as f64);
    health().confirmed.fetch_max(confirmed.0, Ordering::Relaxed);
    heartbeat();
}

/// The slot's lag as polled from the server; refreshes `STATUS=`.
pub fn slot_lag(bytes: i64) {
    gauge!(SLOT_LAG).set(bytes as f64);
    health().slot_lag.store(bytes, Ordering::Relaxed);
    let _ = crate::notify::status(&status_line());
}

/// `n` transactions' commits arrived.
pub fn transactions(n: u64) {
    if n > 0 {
        counter!(TRANSACTIONS).increment(n);
    }
}

/// Fold counters advanced from `seen` to `now` (rows, unknown activity kinds).
pub fn fold_progress(now: &crate::fold::FoldStats, seen: &mut crate::fold::FoldStats) {
    counter!(ROWS).increment(now.rows.saturating_sub(seen.rows));
    counter!(UNKNOWN_KINDS).increment(now.unknown_kinds.saturating_sub(seen.unknown_kinds));
    counter!(UNMAPPED_ROWS).increment(now.unmapped_changes.saturating_sub(seen.unmapped_changes));
    counter!(FILTERED_ROWS).increment(now.filtered_rows.saturating_sub(seen.filtered_rows));
    counter!(UNRESOLVED_ROWS).increment(now.unresolved_rows.saturating_sub(seen.unresolved_rows));
    counter!(LOOKUP_CHANGES).increment(now.lookup_changes.saturating_sub(seen.lookup_changes));
    *seen = now.clone();
}

/// A value was skipped (logged with table, column, LSN and reason; never the value).
pub fn value_skipped(s: &crate::fold::Skipped) {
    counter!(SKIPPED_VALUES).increment(1);
    // A systematic problem (a clock ahead, a column of words) skips every row: log the
    // first of each table, column and reason, then at most one line per interval with
    // the number not logged since (the counter has every one).
    let Some(suppressed) = rate_limit((s.table.clone(), s.column.clone(), s.reason.clone())) else {
        return;
    };
    tracing::warn!(table = %s.table, column = %s.column, lsn = %s.lsn, reason = %s.reason,
        also_skipped_since_last_line = suppressed, "value skipped");
}

/// At most one "value skipped" line per table, column and reason in this interval.
const SKIP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// (table, column, reason) -> (last line, skips not logged since).
type SkipLog = std::sync::Mutex<
    std::collections::HashMap<(String, String, String), (Option<std::time::Instant>, u64)>,
>;

/// `None` when a line of `key` was logged within [`SKIP_LOG_INTERVAL`] (counted as not
/// logged); else the number not logged since the last line.
fn rate_limit(key: (String, String, String)) -> Option<u64> {
    let now = std::time::Instant::now();
    let mut seen = skip_log().lock().unwrap_or_else(|e| e.into_inner());
    let e = seen.entry(key).or_insert((None, 0));
    if e.0
        .is_some_and(|t| now.duration_since(t) < SKIP_LOG_INTERVAL)
    {
        e.1 += 1;
        return None;
    }
    let n = e.1;
    *e = (Some(now), 0);
    Some(n)
}

fn skip_log() -> &'static SkipLog {
    static L: OnceLock<SkipLog> = OnceLock::new();
    L.get_or_init(Default::default)
}

/// An apply call was written with the thin reads made ahead of it.
pub fn read_ahead_used() {
    counter!(READ_AHEAD_CALLS).increment(1);
}

/// The Redis apply script returned for transactions committed at `commit_unix_ms`
/// (commit time, how many transactions committed then): `sku_updates` SKU entries
/// applied, `fenced` skipped as replays, `alerts` raised.
pub fn redis_applied(
    sku_updates: u64,
    fenced: u64,
    thin: u64,
    alerts: u64,
    commit_unix_ms: &[(i64, u32)],
) {
    counter!(SKU_UPDATES).increment(sku_updates);
    counter!(FENCED).increment(fenced);
    counter!(THIN_ENTRIES).increment(thin);
    counter!(ALERTS_RAISED).increment(alerts);
    let now = unix_ms();
    // One registry lookup per call, not per transaction (this runs for every commit).
    let h = histogram!(COMMIT_TO_REDIS);
    // (commit time, transactions committed then)
    for &(c, n) in commit_unix_ms {
        h.record_many((now - c).max(0) as f64 / 1000.0, n as usize);
    }
    redis_ok();
}

/// A Redis call succeeded. After a failure this counts a reconnect.
pub fn redis_ok() {
    let h = health();
    h.redis_ok_ms.store(mono_ms(), Ordering::Relaxed);
    if h.redis_down.swap(false, Ordering::Relaxed) {
        reconnect(Server::Redis);
    }
}

/// A Redis call failed (the caller logs the error).
pub fn redis_failed() {
    health().redis_down.store(true, Ordering::Relaxed);
}

/// Backlog: batches in the source channel and entries in the pending batch.
pub fn backlog(channel_batches: usize, batch_entries: usize) {
    gauge!(BACKLOG_CHANNEL).set(channel_batches as f64);
    gauge!(BACKLOG_BATCH).set(batch_entries as f64);
}

/// The apply became backed up (`on`) or caught up again.
pub fn apply_backed_up(on: bool) {
    gauge!(APPLY_BACKED_UP).set(if on { 1.0 } else { 0.0 });
    if on {
        counter!(APPLY_BACKED_UP_SPELLS).increment(1);
        tracing::debug!("apply backed up: publisher rounds spaced out");
    } else {
        tracing::debug!("apply not backed up: publisher at full speed");
    }
}

/// Reconnected to `server`.
pub fn reconnect(server: Server) {
    counter!(RECONNECTS, "server" => server.as_str()).increment(1);
}

/// Redis refused a write: it lost writes (`rollback`) or another writer holds the token.
pub fn redis_rollback_or_fenced(rollback: bool) {
    let reason = if rollback { "rollback" } else { "fenced" };
    counter!(WRITER_REFUSED, "reason" => reason).increment(1);
}

/// Redis was rebuilt from a fresh snapshot.
pub fn resync() {
    counter!(RESYNCS).increment(1);
}

/// An MQTT publisher exists (so readiness requires its connection).
pub fn mqtt_configured() {
    health().mqtt_configured.store(true, Ordering::Relaxed);
}

/// The broker holds an older epoch than Redis recorded (logged by the publisher with
/// both sequences).
pub fn mqtt_epoch_rollback() {
    counter!(MQTT_EPOCH_ROLLBACKS).increment(1);
}

/// The MQTT connection went up or down; `reconnect` counts a connection after the first.
pub fn mqtt_connection(up: bool, reconnect_: bool) {
    health().mqtt_connected.store(up, Ordering::Relaxed);
    if up && reconnect_ {
        reconnect(Server::Mqtt);
    }
}

/// The publisher's read of a SKU hash failed (it pauses and retries): a round reads up
/// to hundreds of SKUs, so a Redis that is down logs a line per interval, not per SKU.
pub fn publisher_read_failed(e: &redis::RedisError) {
    let Some(suppressed) = rate_limit(("mqtt".into(), "read".into(), format!("{:?}", e.kind())))
    else {
        return;
    };
    tracing::warn!(error = %e, also_failed_since_last_line = suppressed,
        "reading a SKU hash for MQTT failed; retrying");
}

/// A state message was acknowledged; `commit_unix_ms` is the SKU hash's `ts` for state
/// changes (`None` for aging republishes, whose commit may be long past).
pub fn mqtt_state_acked(commit_unix_ms: Option<i64>) {
    counter!(MQTT_PUBLISHED).increment(1);
    if let Some(c) = commit_unix_ms {
        histogram!(COMMIT_TO_PUBACK).record((unix_ms() - c).max(0) as f64 / 1000.0);
    }
}

/// An alert message was acknowledged.
pub fn mqtt_alert_acked() {
    counter!(ALERTS_PUBLISHED).increment(1);
}

/// The broker refused a message.
pub fn mqtt_refused(what: &'static str, reason: &str) {
    counter!(MQTT_REFUSED).increment(1);
    // An ACL that denies skusync's writes refuses every message of every SKU: log the
    // first of each kind and reason, then at most one line per interval with the number
    // not logged since (the counter has every one). States are sent again later.
    let Some(suppressed) = rate_limit(("mqtt".into(), what.into(), reason.into())) else {
        return;
    };
    tracing::warn!(
        message_kind = what,
        reason,
        also_refused_since_last_line = suppressed,
        "broker refused a message (states are sent again later)"
    );
}

/// A SKU's `what` message (`state` or `alert`) of `bytes` (topic and payload) exceeds
/// the maximum packet size `max` and was not sent. Counted each time; logged when
/// `first` (the SKU just became too large), since a SKU stays too large for every change
/// until its state shrinks.
pub fn mqtt_too_large(what: &'static str, bytes: usize, max: usize, first: bool) {
    counter!(MQTT_REFUSED).increment(1);
    if first {
        tracing::error!(
            message_kind = what,
            bytes,
            max,
            "MQTT message exceeds the maximum packet size; not published (raise \
             mqtt.max_packet_bytes, or the broker's limit; logged once per SKU)"
        );
    }
}

// ---- readiness and watchdog ----------------------------------------------------------

/// Seconds without a successful Redis call after which `/readyz` fails.
pub const REDIS_STALE_SECS: u64 = 15;

/// `Ok` when ready: streaming from the slot, the last Redis call succeeded within
/// [`REDIS_STALE_SECS`] (an idle daemon probes Redis every 2 s), and MQTT connected when
/// configured. Otherwise a short reason.
pub fn readiness() -> Result<(), &'static str> {
    let h = health();
    match current_role() {
        Role::Streaming => {}
        Role::Standby => return Err("standby: another process holds the slot"),
        Role::Resyncing => return Err("resyncing: loading a snapshot"),
        Role::Starting => return Err("starting: not streaming yet"),
    }
    let ok = h.redis_ok_ms.load(Ordering::Relaxed);
    if h.redis_down.load(Ordering::Relaxed)
        || ok == 0
        || mono_ms().saturating_sub(ok) > REDIS_STALE_SECS * 1000
    {
        return Err("redis unavailable");
    }
    if h.mqtt_configured.load(Ordering::Relaxed) && !h.mqtt_connected.load(Ordering::Relaxed) {
        return Err("mqtt not connected");
    }
    Ok(())
}

/// Whether the main loop ticked within `within`.
pub fn alive(within: Duration) -> bool {
    let hb = health().heartbeat_ms.load(Ordering::Relaxed);
    hb != 0 && mono_ms().saturating_sub(hb) <= within.as_millis() as u64
}

/// Spawn the systemd watchdog task when `WATCHDOG_USEC` asks for one: it sends
/// `WATCHDOG=1` every third of the interval while the main loop's heartbeat advanced
/// within the interval. It does not look at Redis, Postgres or the broker: their outages
/// are retried by the daemon and must not turn into a restart loop.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = crate::notify::watchdog_interval()?;
    heartbeat();
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut t = tokio::time::interval(interval / 3);
        loop {
            t.tick().await;
            if alive(interval) {
                let _ = crate::notify::watchdog();
            } else {
                tracing::warn!("main loop stalled: withholding the watchdog ping");
            }
        }
    }))
}

/// SIGHUP reloads nothing: log that and keep running (its default action would kill the
/// process). Restart skusync to apply configuration changes.
pub fn ignore_sighup() {
    tokio::spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!(
                "SIGHUP received: skusync reloads nothing; restart it to apply configuration changes"
            );
        }
    });
}

/// Run the recorder's upkeep (histogram maintenance) every 5 s.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(5));
        loop {
            t.tick().await;
            handle.run_upkeep();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_name_follows_the_convention() {
        for n in [
            RECEIVED_LSN,
            CONFIRMED_LSN,
            SLOT_LAG,
            COMMIT_TO_REDIS,
            COMMIT_TO_PUBACK,
            TRANSACTIONS,
            ROWS,
            SKU_UPDATES,
            FENCED,
            THIN_ENTRIES,
            READ_AHEAD_CALLS,
            MQTT_PUBLISHED,
            MQTT_REFUSED,
            MQTT_EPOCH_ROLLBACKS,
            ALERTS_RAISED,
            ALERTS_PUBLISHED,
            SKIPPED_VALUES,
            UNKNOWN_KINDS,
            UNMAPPED_ROWS,
            FILTERED_ROWS,
            UNRESOLVED_ROWS,
            LOOKUP_CHANGES,
            RECONNECTS,
            RESYNCS,
            WRITER_REFUSED,
            BACKLOG_CHANNEL,
            BACKLOG_BATCH,
            STREAMING,
            APPLY_BACKED_UP,
            APPLY_BACKED_UP_SPELLS,
        ] {
            assert!(n.starts_with("skusync_"), "{n}");
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{n}"
            );
        }
    }

    #[test]
    fn not_ready_until_streaming() {
        // fresh process state: starting
        assert!(readiness().is_err());
    }
}
