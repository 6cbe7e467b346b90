//! `skusync run`: the daemon. Wires the data flow
//!
//! ```text
//! source (slot) -> fold -> Redis apply script -> durable tickets -> confirmed LSN
//!                                      \-> MQTT publisher (reads Redis, its outbox)
//! ```
//!
//! and decides at startup whether Redis can continue from the slot or must be rebuilt
//! from a snapshot (first start, lost data, a different database, a changed mapping).

mod apply;
mod pipeline;

use apply::Flight;

use crate::config::{Config, OnSlotLost};
use crate::fold::batch::Batch;
use crate::fold::{Fold, Mapping, RelationProblem};
use crate::lsn::Lsn;
use crate::pg::conn::{ReplConnection, SnapshotAction};
use crate::pg::connstr::PgConnectConfig;
use crate::pg::error::PgError;
use crate::pg::meta;
use crate::pg::partitions;
use crate::progress::{BACKLOG_LAG_MS, Ticket};
use crate::sinks::layout;
use crate::sinks::mqtt::{self, MqttHandle, PublisherConfig};
use crate::sinks::redis::{self as rsink, Applier, ApplySettings, RedisSinkError};
use crate::source::{ProgressHandle, Source, SourceConfig, SourceError, SourceEvent};
use crate::telemetry::{self, Role};
use crate::txn::Event;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The operator must act (message says how).
    #[error("{0}")]
    Definite(String),
    /// Worth retrying after a back-off.
    #[error("{0}")]
    Transient(String),
    /// The mapping does not fit the database (a missing table or column, a lookup key
    /// that is not unique), found before anything was written: exit 2, like a config error.
    #[error("{0}")]
    Config(String),
}

impl From<PgError> for DaemonError {
    fn from(e: PgError) -> Self {
        if e.is_transient() {
            DaemonError::Transient(e.to_string())
        } else {
            DaemonError::Definite(e.to_string())
        }
    }
}

impl From<RedisSinkError> for DaemonError {
    fn from(e: RedisSinkError) -> Self {
        // Fenced and Rollback: the next cycle takes the writer lock and token again, or
        // waits as a standby, and its startup checks rebuild Redis if it must.
        if e.is_transient()
            || matches!(
                e,
                RedisSinkError::NoMeta | RedisSinkError::Fenced(_) | RedisSinkError::Rollback(_)
            )
        {
            DaemonError::Transient(e.to_string())
        } else {
            DaemonError::Definite(e.to_string())
        }
    }
}

impl From<SourceError> for DaemonError {
    fn from(e: SourceError) -> Self {
        if e.is_transient() {
            DaemonError::Transient(e.to_string())
        } else {
            DaemonError::Definite(e.to_string())
        }
    }
}

impl From<crate::snapshot::SnapshotError> for DaemonError {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        match e {
            crate::snapshot::SnapshotError::Pg(p) => p.into(),
            crate::snapshot::SnapshotError::Redis(r) => r.into(),
            crate::snapshot::SnapshotError::Schema(s) => DaemonError::Definite(s),
        }
    }
}

/// Why Redis is rebuilt when the pieces are cut at another size than Redis' were: a
/// transaction applied in part before the restart replays cut differently, and its pieces'
/// fences (their numbers) would skip changes not applied or apply some twice.
fn piece_changes_why(was: Option<u64>, now: u64) -> String {
    format!(
        "redis.max_changes_per_piece changed: Redis' pieces were cut at {} changes, now {now} \
         (a transaction applied in part before the restart would replay cut differently)",
        was.map_or_else(|| "?".into(), |p| p.to_string())
    )
}

/// Why Redis is rebuilt when meta `index_pending` is set at a start.
const INDEX_PENDING: &str = "a batch that changed lookup state (lookup values, dependents, row \
     records) was interrupted between its Redis writes; a replay cannot repair that state";

enum Cycle {
    Shutdown,
    /// Run the startup checks again (e.g. Redis lost its data).
    Restart(String),
}

/// The daemon's state across restarts of its pipeline.
pub struct Daemon {
    cfg: Config,
    mapping: Arc<Mapping>,
    pgc: PgConnectConfig,
    redis: crate::sinks::redis::RedisClient,
    settings: ApplySettings,
    max_changes: u64,
    max_batch_skus: usize,
    /// Transactions up to here replay unmerged (raised when Redis refused a merged entry).
    split_floor: Lsn,
    /// The relation (OID) and reason of the last rebuild for a changed table identity,
    /// until that relation is announced matching: the same reason again means a loop.
    identity_rebuild: Option<(u32, String)>,
    /// What the publications let through to the mapped tables, read at this cycle's
    /// start ([`crate::pg::publication::fingerprint`]; meta `publications`).
    publications: String,
    /// When the streaming cycle last read the publications again, and the connection it
    /// reads them on (`lock_timeout` set).
    publications_checked: tokio::time::Instant,
    catalog: Option<tokio_postgres::Client>,
    /// Mapped relations the stream announced in this session (a second announcement
    /// may mean a publication changed).
    announced: std::collections::HashSet<u32>,
    /// A column skusync reads is a `char(n)` (read at this cycle's start): a Redis built
    /// before meta `publications` was recorded holds its values padded.
    reads_char_n: bool,
    /// The partition fingerprints Redis was built with (meta `partitions`).
    partitions_built: std::collections::BTreeMap<String, String>,
    /// The mapping was checked against the database (once, before the first write).
    preflight_done: bool,
    /// The newest holder generation whose batch (row index writes included) is applied.
    ri_done: u64,
    gate: Arc<AtomicU64>,
    mqtt: Option<MqttHandle>,
    mqtt_join: Option<tokio::task::JoinHandle<Result<(), mqtt::MqttError>>>,
    mqtt_token: Option<CancellationToken>,
    /// The session holding the slot's writer lock (a PostgreSQL advisory lock): while it
    /// lives, this instance is the only one that writes Redis or publishes.
    lease: Option<Lease>,
}

/// The session holding the writer lock, kept alive by pings. The server ends it (and so
/// frees the lock) when the pings stop for `LEASE_TIMEOUT`, even if its TCP connection
/// looks alive (a partition behind a proxy or NAT); its holder notices the same silence.
struct Lease {
    client: Arc<tokio_postgres::Client>,
    lost: Arc<std::sync::atomic::AtomicBool>,
    pinger: tokio::task::JoinHandle<()>,
}

impl Lease {
    async fn open(pgc: &PgConnectConfig) -> Result<Lease, DaemonError> {
        let client = Arc::new(meta::connect(pgc).await?);
        // Best effort: idle_session_timeout needs PostgreSQL 14; keepalives catch a
        // black-holed client on every version.
        let secs = LEASE_TIMEOUT.as_secs();
        if let Err(e) = client
            .batch_execute(&format!(
                "SET idle_session_timeout = '{secs}s'; SET tcp_keepalives_idle = 10; \
                 SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
            ))
            .await
        {
            tracing::warn!(error = %e, "cannot bound the writer lock session; a cut-off holder keeps the lock until TCP gives up");
        }
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, l) = (client.clone(), lost.clone());
        let pinger = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_PING).await;
                let ok = tokio::time::timeout(LEASE_PING, c.simple_query("SELECT 1"))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if !ok {
                    l.store(true, Ordering::SeqCst);
                    return;
                }
            }
        });
        Ok(Lease {
            client,
            lost,
            pinger,
        })
    }

    /// Whether the session may still hold the lock.
    fn alive(&self) -> bool {
        !self.client.is_closed() && !self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pinger.abort();
    }
}

/// The server ends a writer lock session silent for this long (`idle_session_timeout`):
/// a cut-off holder loses the lock after it, and a standby can take over.
const LEASE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the holder pings its lock session (and how long a ping may take).
const LEASE_PING: Duration = Duration::from_secs(5);

impl Daemon {
    /// Validate everything that can be checked without servers.
    pub fn new(cfg: Config) -> Result<Daemon, DaemonError> {
        let mapping = Arc::new(Mapping::from_config(&cfg).map_err(|e| DaemonError::Definite(e.0))?);
        if mapping.inventory.is_empty() && mapping.activity.is_empty() {
            return Err(DaemonError::Definite(
                "map at least one [[inventory]] or [[activity]] table".into(),
            ));
        }
        let rc = cfg
            .redis
            .clone()
            .ok_or_else(|| DaemonError::Definite("`run` needs a [redis] section".into()))?;
        let pgc = cfg.pg_connect().map_err(|e| DaemonError::Definite(e.0))?;
        // as `check` reports it: a non-loopback server whose identity is not checked
        // (libpq's default sslmode, `prefer`, even falls back to plaintext)
        if let Some(problem) = pgc.weak_tls() {
            tracing::warn!(
                problem = %problem,
                fix = "set sslmode=verify-full&sslrootcert=/path/to/ca.pem (or sslrootcert=system) in postgres.url",
                "postgres TLS does not verify the server"
            );
        }
        let redis = rsink::client(rc.url.all(), rc.cluster, rc.ca_file.as_deref())
            .map_err(|e| DaemonError::Definite(e.to_string()))?;
        let gate = Arc::new(AtomicU64::new(0));
        let settings = ApplySettings {
            prefix: rc.prefix.clone(),
            keep_minutes: mapping.keep_minutes(),
            low_stock: mapping.low_stock,
            scale: mapping.scale,
            counters: mapping.counters().into_iter().map(|(c, _, _)| c).collect(),
            alert_history: cfg.alerts.history,
            alert_history_age_ms: cfg.alerts.history_max_age_s.saturating_mul(1000),
            // What may be confirmed is what Redis holds: below it, Redis lost writes.
            fence: rsink::WriterFence {
                token: Default::default(),
                floor: gate.clone(),
                slots: Default::default(),
                chain: Default::default(),
            },
        };
        let max_changes = if mapping.hops.is_empty() {
            rc.max_changes_per_piece
        } else {
            (rc.max_changes_per_piece / 4).max(100)
        };
        Ok(Daemon {
            cfg,
            mapping,
            pgc,
            redis,
            settings,
            // A change of a table with lookups writes about four pieces of state (its
            // entry, its record, its dependents): smaller pieces keep memory where it was.
            max_changes,
            max_batch_skus: rc.max_batch_skus,
            split_floor: Lsn(0),
            identity_rebuild: None,
            publications: String::new(),
            publications_checked: tokio::time::Instant::now(),
            catalog: None,
            announced: Default::default(),
            reads_char_n: false,
            partitions_built: Default::default(),
            preflight_done: false,
            ri_done: 0,
            gate,
            mqtt: None,
            mqtt_join: None,
            mqtt_token: None,
            lease: None,
        })
    }

    fn prefix(&self) -> &str {
        &self.settings.prefix
    }

    /// Run until `shutdown` or a definite error.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), DaemonError> {
        let mut backoff = Duration::from_millis(250);
        let monitors = shutdown.child_token();
        self.spawn_monitors(&monitors);
        let result = loop {
            telemetry::heartbeat();
            if shutdown.is_cancelled() {
                break Ok(());
            }
            match self.cycle(&shutdown).await {
                Ok(Cycle::Shutdown) => break Ok(()),
                Ok(Cycle::Restart(why)) => {
                    tracing::warn!(reason = %why, "restarting the pipeline");
                    backoff = Duration::from_millis(250);
                }
                Err(DaemonError::Transient(e)) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "transient failure; retrying");
                    // sleep in steps so the watchdog heartbeat keeps advancing
                    let until = tokio::time::Instant::now() + backoff;
                    while tokio::time::Instant::now() < until && !shutdown.is_cancelled() {
                        telemetry::heartbeat();
                        tokio::select! {
                            _ = tokio::time::sleep_until(until.min(tokio::time::Instant::now() + Duration::from_secs(1))) => {}
                            _ = shutdown.cancelled() => {}
                        }
                    }
                    if shutdown.is_cancelled() {
                        break Ok(());
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(e) => break Err(e),
            }
        };
        monitors.cancel();
        self.stop_mqtt().await;
        result
    }

    /// Stop the MQTT publisher (it drains what is in flight first).
    async fn stop_mqtt(&mut self) {
        self.mqtt = None;
        if let Some(t) = self.mqtt_token.take() {
            t.cancel();
        }
        if let Some(j) = self.mqtt_join.take() {
            match tokio::time::timeout(Duration::from_secs(8), j).await {
                Ok(Ok(Err(e))) => {
                    tracing::warn!(error = %e, "MQTT publisher stopped with an error")
                }
                Err(_) => tracing::warn!("MQTT publisher did not stop within 8 s"),
                _ => {}
            }
        }
    }

    /// Hold the slot's writer lock, waiting as a standby while another instance holds it,
    /// then take a new fencing token. Returns false on shutdown. The lock (a session-level
    /// PostgreSQL advisory lock) makes rebuilds and streaming exclusive: PostgreSQL frees
    /// it when the holder's session ends, whether it stopped, crashed or was cut off. The
    /// token covers the one gap the lock leaves: a holder cut off from PostgreSQL but not
    /// from Redis, whose writes after a new holder's claim are refused by Redis.
    async fn ensure_lease(
        &mut self,
        con: &mut crate::sinks::redis::RedisCon,
        shutdown: &CancellationToken,
    ) -> Result<bool, DaemonError> {
        let key = writer_lock_key(&self.cfg.postgres.slot);
        let mut waiting = false;
        loop {
            if shutdown.is_cancelled() {
                return Ok(false);
            }
            if self.lease.as_ref().is_none_or(|l| !l.alive()) {
                self.lease = None;
                self.lease = Some(Lease::open(&self.pgc).await?);
            }
            let client = &self.lease.as_ref().expect("just set").client;
            // Re-entrant for the holder: also proves the session still reaches the server.
            let got = tokio::time::timeout(
                Duration::from_secs(10),
                client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]),
            )
            .await;
            match got {
                Ok(Ok(row)) if row.get::<_, bool>(0) => break,
                Ok(Ok(_)) => {
                    if !waiting {
                        // Never publish or write without the lock.
                        self.stop_mqtt().await;
                        telemetry::role(Role::Standby);
                        tracing::info!(slot = %self.cfg.postgres.slot, "another skusync instance holds the writer lock of this slot; waiting as standby");
                        waiting = true;
                    }
                }
                Ok(Err(e)) => {
                    self.lease = None;
                    return Err(meta::classify(e, &self.pgc).into());
                }
                Err(_) => {
                    self.lease = None;
                    return Err(DaemonError::Transient(
                        "the writer lock query got no answer within 10 s".into(),
                    ));
                }
            }
            for _ in 0..4 {
                telemetry::heartbeat();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown.cancelled() => return Ok(false),
                }
            }
        }
        let token = rsink::claim_writer(con, self.prefix()).await?;
        self.settings.fence.token.store(token, Ordering::SeqCst);
        self.settings.fence.chain.restart();
        // A cluster slot that lost writes while no writer ran is caught by the first
        // check of the floors recorded before (a rebuild, like one lost while running).
        // What the meta hash records replaces what this process held: another writer may
        // have rebuilt Redis meanwhile, and floors it never recorded cover only writes
        // that were not confirmed, which the stream replays anyway.
        self.settings.fence.slots.clear();
        let floors =
            rsink::load_slot_floors(con, self.prefix(), &self.settings.fence.slots).await?;
        if floors > 0 {
            tracing::debug!(
                slots = floors,
                "read the Redis Cluster slots' recorded floors"
            );
        }
        if waiting {
            tracing::info!(slot = %self.cfg.postgres.slot, "took the writer lock");
        }
        Ok(true)
    }

    /// Background monitors until `stop`: the slot-lag poll (every 10 s), a Redis probe
    /// (every 2 s, for `/readyz` while idle) and, when configured, the WAL heartbeat.
    fn spawn_monitors(&self, stop: &CancellationToken) {
        let (pgc, slot, stop2) = (
            self.pgc.clone(),
            self.cfg.postgres.slot.clone(),
            stop.clone(),
        );
        tokio::spawn(stop2.run_until_cancelled_owned(poll_slot_lag(pgc, slot)));
        let (redis, stop2) = (self.redis.clone(), stop.clone());
        tokio::spawn(stop2.run_until_cancelled_owned(probe_redis(redis)));
        let every = self.cfg.postgres.heartbeat_interval_ms;
        if every > 0 {
            let (pgc, stop2) = (self.pgc.clone(), stop.clone());
            tokio::spawn(
                stop2.run_until_cancelled_owned(emit_heartbeats(pgc, Duration::from_millis(every))),
            );
        }
    }

    /// One pass: the writer lock, startup checks, then stream until something ends it.
    /// Every mapped and referenced table exists and fits the mapping, and every lookup's
    /// key is unique, checked before anything is written (a slot, Redis): a problem is the
    /// operator's to fix ([`DaemonError::Config`]).
    async fn preflight(&mut self) -> Result<(), DaemonError> {
        let client = meta::connect(&self.pgc).await?;
        let mut tables: Vec<String> = self.mapping.tables().map(str::to_string).collect();
        for t in self.mapping.lookup_tables() {
            if !tables.iter().any(|x| x == t) {
                tables.push(t.to_string());
            }
        }
        let problem = |e: crate::snapshot::SnapshotError| match e {
            crate::snapshot::SnapshotError::Schema(s) => DaemonError::Config(s),
            e => DaemonError::from(e),
        };
        for t in tables {
            let Some(rel) = crate::snapshot::describe(&client, &self.pgc, &t).await? else {
                return Err(DaemonError::Config(format!(
                    "table {t}, named in the mapping, does not exist (or its schema is not visible to this \
                     role): create it, or fix the name in the configuration"
                )));
            };
            let rule = self
                .mapping
                .resolve(&rel)
                .map_err(|e| DaemonError::Config(e.0))?;
            let also = self
                .mapping
                .lookup_rule(&rel, &t)
                .map_err(|e| DaemonError::Config(e.0))?;
            for r in [Some(rule), also.map(crate::fold::Rule::Lookup)]
                .into_iter()
                .flatten()
            {
                if let Some((p, fix)) =
                    crate::snapshot::lookup_key_problem(&client, &self.pgc, &r, &rel)
                        .await
                        .map_err(problem)?
                {
                    return Err(DaemonError::Config(format!("{p}; fix it with: {fix}")));
                }
            }
        }
        self.preflight_done = true;
        Ok(())
    }

    async fn cycle(&mut self, shutdown: &CancellationToken) -> Result<Cycle, DaemonError> {
        if !self.preflight_done {
            self.preflight().await?;
        }
        let mut con = rsink::connect(&self.redis).await?;
        rsink::check_topology(&mut con).await?;
        if !self.ensure_lease(&mut con, shutdown).await? {
            return Ok(Cycle::Shutdown);
        }
        let client = meta::connect(&self.pgc).await?;
        // Checked at every cycle: a publication altered while skusync runs (an action
        // dropped, a partition added outside it) must stop it, not leave Redis drifting.
        if let Some(gap) = crate::ops::check::publication_gap(&self.cfg, &client, &self.pgc).await?
        {
            return Err(DaemonError::Config(gap));
        }
        // a literal no value can equal would silently filter nothing (or everything)
        if let Some(e) = crate::ops::filters::filter_refusal(&self.cfg, &client, &self.pgc).await? {
            return Err(DaemonError::Config(e));
        }
        self.publications = self.read_publications(&client).await?;
        self.reads_char_n = crate::ops::check::reads_char_n(&self.cfg, &client, &self.pgc).await?;
        let slot_name = self.cfg.postgres.slot.clone();
        let mut slot = meta::slot_state(&client, &self.pgc, &slot_name).await?;
        if let Some(s) = &slot {
            let db: String = client
                .query_one("SELECT current_database()::text", &[])
                .await
                .map_err(|e| DaemonError::from(meta::classify(e, &self.pgc)))?
                .get(0);
            if s.database.as_deref().is_some_and(|d| d != db) {
                return Err(DaemonError::Config(format!(
                    "replication slot {slot_name:?} (postgres.slot) belongs to database {:?}, not {db:?}: \
                     another skusync (or another tool) uses that name on this server. Give this instance \
                     its own slot name in postgres.slot",
                    s.database.as_deref().unwrap_or_default()
                )));
            }
        }
        if let Some(s) = &slot
            && s.wal_status.as_deref() == Some("lost")
        {
            match self.cfg.postgres.on_slot_lost {
                OnSlotLost::Stop => {
                    return Err(DaemonError::Definite(format!(
                        "replication slot {slot_name:?} lost WAL it needs (wal_status = lost), so changes were missed. \
                         Set postgres.on_slot_lost = \"resync\" to rebuild from a fresh snapshot automatically, or \
                         run: SELECT pg_drop_replication_slot('{slot_name}'); and restart skusync"
                    )));
                }
                OnSlotLost::Resync => {
                    tracing::warn!(slot = %slot_name, "slot lost WAL; dropping it and rebuilding from a fresh snapshot");
                    client
                        .execute("SELECT pg_drop_replication_slot($1)", &[&slot_name])
                        .await
                        .map_err(|e| DaemonError::from(meta::classify(e, &self.pgc)))?;
                    slot = None;
                }
            }
        }
        let meta = rsink::read_meta(&mut con, self.prefix()).await?;
        let mut bootstrap = slot.is_none();
        if let Some(s) = &slot {
            if s.active_pid.is_some() {
                // We hold the writer lock, so this is a walsender its former holder left
                // behind (it lasts until wal_sender_timeout): wait for the slot without
                // touching Redis. The checks run again once we win the slot.
                tracing::info!(slot = %slot_name, pid = ?s.active_pid, "slot is held by another process; waiting as standby");
                telemetry::role(Role::Standby);
            } else {
                let confirmed = s.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
                // Redis can come back older (restarted from a dump, a lagging replica
                // promoted) while a lost connection restarts the cycle before any write
                // was refused: the operator hears it all the same, whether the replay
                // from the slot repairs it or Redis is behind the slot and is rebuilt. (A
                // writer that caught it itself lowered the floor to what Redis held.)
                if let Some(m) = meta.as_ref().filter(|m| m.bootstrap_done) {
                    let applied = m.applied_lsn.unwrap_or(Lsn::ZERO).0;
                    let floor = self.gate.load(Ordering::SeqCst);
                    if applied < floor {
                        telemetry::redis_rollback_or_fenced(true);
                        tracing::warn!(
                            error = %RedisSinkError::Rollback(applied.to_string()),
                            floor,
                            "Redis came back older than this writer left it"
                        );
                    }
                }
                let why = match &meta {
                    None => Some(
                        "Redis has no skusync data (a new, flushed or evicted Redis)".to_string(),
                    ),
                    Some(m) if !m.bootstrap_done => {
                        Some("a previous snapshot load did not finish".into())
                    }
                    Some(m) if m.index_pending => Some(INDEX_PENDING.into()),
                    Some(m) if m.piece_changes.is_some_and(|p| p != self.max_changes) => {
                        Some(piece_changes_why(m.piece_changes, self.max_changes))
                    }
                    Some(m)
                        if m.fingerprint.as_deref() != Some(self.mapping.fingerprint.as_str()) =>
                    {
                        Some("the table mapping changed since Redis was built".into())
                    }
                    Some(m) if m.layout.as_deref() != Some(layout::LAYOUT_VERSION) => {
                        Some(earlier_layout(m.layout.as_deref()))
                    }
                    Some(m)
                        if m.publications
                            .as_deref()
                            .is_some_and(|p| p != self.publications) =>
                    {
                        Some(PUBLICATIONS_CHANGED.into())
                    }
                    // built by a release that kept char(n) pad spaces
                    Some(m) if m.publications.is_none() && self.reads_char_n => Some(
                        "char(n) values are now read without their pad spaces, and this Redis was built \
                         with them"
                            .into(),
                    ),
                    Some(m) if m.applied_lsn.unwrap_or(Lsn::ZERO) < confirmed => Some(format!(
                        "Redis is behind the slot (applied {} < confirmed {confirmed}): it lost writes",
                        m.applied_lsn.unwrap_or(Lsn::ZERO)
                    )),
                    _ => None,
                };
                if let Some(why) = why {
                    tracing::warn!(reason = %why, "rebuilding Redis from a fresh snapshot");
                    self.resync(&mut con, &client, &slot_name).await?;
                } else if let Some(m) = &meta {
                    if m.publications.is_none() {
                        // built before they were recorded (or just bootstrapped)
                        self.record_publications(&mut con).await?;
                    }
                    let applied = m.applied_lsn.unwrap_or(Lsn::ZERO);
                    self.gate.store(applied.0, Ordering::SeqCst);
                    if m.piece_changes.is_none() {
                        // a Redis built before the size was recorded: cut as configured now
                        rsink::write_meta(
                            &mut con,
                            self.prefix(),
                            self.settings.fence.token(),
                            &[("piece_changes", self.max_changes.to_string())],
                        )
                        .await?;
                    }
                    if m.changes_from.is_none() {
                        let n = rsink::backfill_changes(
                            &mut con,
                            self.prefix(),
                            self.settings.fence.token(),
                            applied,
                        )
                        .await?;
                        tracing::info!(
                            skus = n,
                            "built the change index of an earlier release's Redis"
                        );
                    }
                }
            }
        } else {
            bootstrap = true;
            tracing::info!(slot = %slot_name, "no replication slot yet: creating it and loading its snapshot");
        }
        drop(client);
        self.stream(con, bootstrap, shutdown).await
    }

    /// What the publications let through to the mapped tables now.
    async fn read_publications(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<String, DaemonError> {
        let tables: Vec<String> = crate::ops::check::wanted_tables(&self.cfg)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        Ok(crate::pg::publication::fingerprint(
            client,
            &self.pgc,
            &self.cfg.postgres.publication.names(),
            &tables,
        )
        .await?)
    }

    /// Record in meta what the publications let through (`publications`).
    async fn record_publications(
        &self,
        con: &mut crate::sinks::redis::RedisCon,
    ) -> Result<(), DaemonError> {
        rsink::write_meta(
            con,
            self.prefix(),
            self.settings.fence.token(),
            &[("publications", self.publications.clone())],
        )
        .await?;
        Ok(())
    }

    /// Rebuild Redis from a temporary slot's snapshot, then move the main slot to it.
    async fn resync(
        &mut self,
        con: &mut crate::sinks::redis::RedisCon,
        client: &tokio_postgres::Client,
        slot: &str,
    ) -> Result<(), DaemonError> {
        telemetry::role(Role::Resyncing);
        let mut repl = ReplConnection::connect(&self.pgc).await?;
        let system = repl.identify_system().await?;
        let temp = format!("skusync_resync_{}", std::process::id());
        let info = repl
            .create_slot(&temp, true, SnapshotAction::Export)
            .await?;
        let snapshot = info
            .snapshot_name
            .clone()
            .ok_or_else(|| DaemonError::Transient("no snapshot exported".into()))?;
        // The publisher must not project Redis while it is reset and reloaded (partial
        // states with the snapshot's LSN); it resumes right after the load with a full republish. Should
        // the load fail it stays paused: the next cycle rebuilds again.
        if let Some(m) = &self.mqtt {
            m.pause().await;
        }
        self.load(con, &snapshot, info.consistent_point, Some(&system))
            .await?;
        if let Some(m) = &self.mqtt {
            m.resume();
        }
        client
            .execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[&slot, &info.consistent_point.to_string()],
            )
            .await
            .map_err(|e| DaemonError::from(meta::classify(e, &self.pgc)))?;
        drop(repl); // drops the temporary slot
        telemetry::resync();
        Ok(())
    }

    /// Reset Redis and load a snapshot at `at` (shared by bootstrap and resync).
    async fn load(
        &self,
        con: &mut crate::sinks::redis::RedisCon,
        snapshot: &str,
        at: Lsn,
        system: Option<&crate::pg::SystemInfo>,
    ) -> Result<(), DaemonError> {
        load_snapshot(
            &self.pgc,
            &self.mapping,
            &self.settings,
            self.max_changes,
            con.clone(),
            snapshot,
            at,
            system,
            &self.gate,
            &self.publications,
        )
        .await
    }

    /// The server's `wal_sender_timeout` (`None`: unknown, or 0 = disabled), read on the
    /// writer lock's session when there is one.
    async fn wal_sender_timeout(&self) -> Option<Duration> {
        let owned;
        let client = match &self.lease {
            Some(l) => &*l.client,
            None => {
                owned = meta::connect(&self.pgc).await.ok()?;
                &owned
            }
        };
        match meta::wal_sender_timeout_ms(client, &self.pgc).await {
            Ok(0) => None,
            Ok(ms) => Some(Duration::from_millis(ms)),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read wal_sender_timeout; silence timeout left at its default");
                None
            }
        }
    }

    async fn stream(
        &mut self,
        con: crate::sinks::redis::RedisCon,
        bootstrap: bool,
        shutdown: &CancellationToken,
    ) -> Result<Cycle, DaemonError> {
        let mut sc = SourceConfig::new(
            self.pgc.clone(),
            &self.cfg.postgres.slot,
            self.cfg.postgres.publication.names(),
        );
        sc.proto_version = self.cfg.postgres.proto_version;
        sc.status_interval = self.cfg.status_interval();
        sc.confirm_gate = Some(self.gate.clone());
        sc.silence_timeout = silence_timeout(self.wal_sender_timeout().await, sc.status_interval);
        if bootstrap {
            let (pgc, mapping, settings, max_changes, con2, gate, mqtt, pubs) = (
                self.pgc.clone(),
                self.mapping.clone(),
                self.settings.clone(),
                self.max_changes,
                con.clone(),
                self.gate.clone(),
                self.mqtt.clone(),
                self.publications.clone(),
            );
            sc.bootstrap = Some(Arc::new(move |snapshot: String, at: Lsn, system| {
                let (pgc, mapping, settings, con2, gate, mqtt, pubs) = (
                    pgc.clone(),
                    mapping.clone(),
                    settings.clone(),
                    con2.clone(),
                    gate.clone(),
                    mqtt.clone(),
                    pubs.clone(),
                );
                Box::pin(async move {
                    // As in `resync`: the publisher (it outlives cycles, so it may be
                    // connected now: a slot dropped after it lost WAL, or missing after a
                    // failover) must not project Redis while it is reset and reloaded;
                    // it resumes with a full republish. A failed load leaves it paused
                    // for the next cycle's rebuild.
                    if let Some(m) = &mqtt {
                        m.pause().await;
                    }
                    load_snapshot(
                        &pgc,
                        &mapping,
                        &settings,
                        max_changes,
                        con2,
                        &snapshot,
                        at,
                        // recorded, so the stream's check finds the server it was built from
                        Some(&system),
                        &gate,
                        &pubs,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    if let Some(m) = &mqtt {
                        m.resume();
                    }
                    Ok(())
                })
            }));
        }
        let source = Source::new(sc);
        let progress = source.progress();
        let src_token = shutdown.child_token();
        // Small: each queued batch pins socket read buffers; backpressure reaches the
        // walsender through TCP instead.
        let (tx, rx) = mpsc::channel(8);
        let src = spawn_source(source, tx, src_token.clone());
        let applier = Applier::new(con, self.settings.clone()).with_reader(self.thin_reader());
        let result = self.pipeline(rx, applier, progress.clone()).await;
        // The pipeline is gone with whatever it had not applied: the source must not wait
        // (10 s) for those tickets before it stops. Confirms only what is durable.
        progress.release();
        // Whatever ended the pipeline, stop the source (it confirms what is durable).
        src_token.cancel();
        let src_result = match tokio::time::timeout(Duration::from_secs(15), src).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(SourceError::Pg(PgError::Protocol(format!(
                "source task: {e}"
            )))),
            Err(_) => Err(SourceError::Pg(PgError::Protocol(
                "source did not stop within 15 s".into(),
            ))),
        };
        if !shutdown.is_cancelled() {
            telemetry::role(Role::Starting);
        }
        match (result, src_result) {
            (Err(e), _) => Err(e),
            (Ok(Cycle::Restart(why)), _) => Ok(Cycle::Restart(why)),
            (Ok(Cycle::Shutdown), Err(SourceError::Bootstrap(e))) => {
                Ok(Cycle::Restart(format!("snapshot load failed: {e}")))
            }
            (Ok(Cycle::Shutdown), Err(e @ SourceError::SlotVanished { .. })) => Ok(Cycle::Restart(
                format!("{e}: rebuilding from a new slot's snapshot"),
            )),
            // Invalidated while streaming (`max_slot_wal_keep_size` passed while the slot
            // could not advance): the next cycle's checks apply `postgres.on_slot_lost`
            // (stop with the SQL to fix it, or drop the slot and rebuild).
            (Ok(Cycle::Shutdown), Err(e @ SourceError::SlotLost { .. })) => Ok(Cycle::Restart(
                format!("{e}: applying postgres.on_slot_lost"),
            )),
            // Gone between the startup checks and the first connect (a standby that waited
            // for a walsender its former holder left, on a server that then failed over):
            // the next cycle's checks create it and rebuild.
            (Ok(Cycle::Shutdown), Err(SourceError::SlotMissing { slot })) => {
                Ok(Cycle::Restart(format!(
                    "replication slot {slot:?} vanished before streaming started (a PostgreSQL \
                     failover, or dropped): rebuilding from a new slot's snapshot"
                )))
            }
            (Ok(Cycle::Shutdown), Err(e)) => Err(e.into()),
            (Ok(Cycle::Shutdown), Ok(())) => Ok(Cycle::Shutdown),
        }
    }

    /// Connections of thin apply's reads (see `Applier::with_reader`); `None`: they go
    /// on the apply connection.
    fn thin_reader(&self) -> Option<std::sync::Arc<crate::sinks::redis::reader::HashReader>> {
        let rc = self.cfg.redis.as_ref()?;
        crate::sinks::redis::reader::for_config(rc.url.all(), rc.cluster, rc.ca_file.as_deref())
    }

    async fn start_mqtt(&mut self, con: crate::sinks::redis::RedisCon) -> Result<(), DaemonError> {
        if self.mqtt.is_some() {
            return Ok(());
        }
        let Some(pc) = PublisherConfig::from_config(&self.cfg) else {
            return Ok(());
        };
        // The publisher has its own lifetime: it drains in-flight messages on shutdown.
        let token = CancellationToken::new();
        let reader = self.cfg.redis.as_ref().and_then(|rc| {
            crate::sinks::redis::reader::for_config(rc.url.all(), rc.cluster, rc.ca_file.as_deref())
        });
        let (h, j) = mqtt::spawn(pc, con, reader, token.clone())
            .await
            .map_err(|e| DaemonError::Definite(e.to_string()))?;
        telemetry::mqtt_configured();
        self.mqtt = Some(h);
        self.mqtt_join = Some(j);
        self.mqtt_token = Some(token);
        Ok(())
    }

    /// Consume the source's events until the channel closes (source stopped) or
    /// something needs a restart. At most one apply call is in flight: while Redis runs
    /// it, the next batch folds (and merges per SKU) here.
    async fn pipeline(
        &mut self,
        mut rx: mpsc::Receiver<Vec<SourceEvent>>,
        applier: Applier,
        progress: ProgressHandle,
    ) -> Result<Cycle, DaemonError> {
        let mut flight: Option<tokio::task::JoinHandle<Flight>> = None;
        let r = self
            .pipeline_loop(&mut rx, applier, &progress, &mut flight)
            .await;
        // Never leave an apply running behind the next session's start (it reads
        // `applied_lsn` to decide what may merge).
        if let Some(f) = flight.take()
            && let Ok(f) = f.await
            && f.result.is_ok()
        {
            f.tickets.durable(&progress);
        }
        // Whatever stopped the loop, nothing is backed up behind it any more.
        self.tell_backed_up(false);
        r
    }

    /// Whether the apply is backed up, to telemetry and to the publisher (which spaces
    /// its rounds out meanwhile: `MqttHandle::set_backed_up`).
    fn tell_backed_up(&self, on: bool) {
        telemetry::apply_backed_up(on);
        if let Some(m) = &self.mqtt {
            m.set_backed_up(on);
        }
    }
}

/// `skusync resync`: rebuild Redis from a fresh snapshot while no instance streams.
pub async fn resync_now(cfg: Config) -> Result<(), DaemonError> {
    let mut d = Daemon::new(cfg)?;
    let mut con = rsink::connect(&d.redis).await?;
    let client = meta::connect(&d.pgc).await?;
    let slot = d.cfg.postgres.slot.clone();
    match meta::slot_state(&client, &d.pgc, &slot).await? {
        None => {
            return Err(DaemonError::Definite(format!(
                "replication slot {slot:?} does not exist: `skusync run` creates it and loads Redis"
            )));
        }
        Some(s) if s.active_pid.is_some() => {
            return Err(DaemonError::Definite(format!(
                "replication slot {slot:?} is streamed by process {} (a running skusync): stop it first; \
                 only the active instance may rebuild Redis",
                s.active_pid.unwrap_or_default()
            )));
        }
        Some(_) => {}
    }
    // The writer lock: no running instance may stream or rebuild meanwhile.
    let key = writer_lock_key(&slot);
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await
        .map_err(|e| DaemonError::from(meta::classify(e, &d.pgc)))?
        .get(0);
    if !got {
        return Err(DaemonError::Definite(format!(
            "another skusync instance holds the writer lock of slot {slot:?}: stop it first, or ask it to \
             rebuild with `skusync verify --repair`"
        )));
    }
    let token = rsink::claim_writer(&mut con, d.prefix()).await?;
    d.settings.fence.token.store(token, Ordering::SeqCst);
    d.settings.fence.chain.restart();
    if let Some(gap) = crate::ops::check::publication_gap(&d.cfg, &client, &d.pgc).await? {
        return Err(DaemonError::Config(gap));
    }
    if let Some(e) = crate::ops::filters::filter_refusal(&d.cfg, &client, &d.pgc).await? {
        return Err(DaemonError::Config(e));
    }
    d.publications = d.read_publications(&client).await?;
    d.resync(&mut con, &client, &slot).await
}

/// How long the replication connection may stay silent before it is taken for dead: the
/// default, but at least the server's `wal_sender_timeout` and a status interval. While a
/// walsender decodes a large transaction that publishes nothing (a retention DELETE of an
/// unpublished table, say) it reads our status updates, and answers their reply requests,
/// only about every `wal_sender_timeout / 2`, and sends nothing else; cut earlier, the
/// transaction would be decoded again at every reconnect and the slot never pass it.
fn silence_timeout(wal_sender_timeout: Option<Duration>, status_interval: Duration) -> Duration {
    let floor = wal_sender_timeout.map_or(Duration::ZERO, |t| t + status_interval);
    crate::source::DEFAULT_SILENCE_TIMEOUT.max(floor)
}

/// The advisory lock key of a slot's writer: a stable 64-bit hash of its name, so every
/// instance configured for the slot (in this database) contends for the same lock.
fn writer_lock_key(slot: &str) -> i64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("skusync writer {slot}").as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Why a Redis in another key layout is rebuilt (logged once per rebuild).
fn earlier_layout(found: Option<&str>) -> String {
    format!(
        "Redis uses the key layout of an earlier skusync ({}; this build uses {}): rebuilding it once",
        found.map_or_else(|| "before 3".to_string(), |l| format!("layout {l}")),
        layout::LAYOUT_VERSION
    )
}

/// Mark Redis stale, so the restarted pipeline rebuilds it from a fresh snapshot.
async fn rebuild_next(
    con: &mut crate::sinks::redis::RedisCon,
    prefix: &str,
    token: u64,
    why: String,
) -> Result<Cycle, DaemonError> {
    rsink::write_meta(con, prefix, token, &[("bootstrap", "stale".into())]).await?;
    Ok(Cycle::Restart(why))
}

/// Why Redis is rebuilt when the publications' names or row filters changed.
const PUBLICATIONS_CHANGED: &str = "the publications (their names or the row filters they put on mapped tables) changed since Redis was built";

/// A schema problem met in the stream: definite, with the transaction it was met in.
fn schema_stop(e: crate::fold::SchemaError, commit: Option<Lsn>) -> DaemonError {
    match commit {
        Some(lsn) => DaemonError::Definite(format!(
            "{} (met in the transaction that commits at LSN {lsn})",
            e.0
        )),
        None => DaemonError::Definite(e.0),
    }
}

/// Reset Redis, load the snapshot, and mark the meta hash done at `at`.
#[allow(clippy::too_many_arguments)]
async fn load_snapshot(
    pgc: &PgConnectConfig,
    mapping: &Arc<Mapping>,
    settings: &ApplySettings,
    max_changes: u64,
    mut con: crate::sinks::redis::RedisCon,
    snapshot: &str,
    at: Lsn,
    system: Option<&crate::pg::SystemInfo>,
    gate: &Arc<AtomicU64>,
    publications: &str,
) -> Result<(), DaemonError> {
    let prefix = settings.prefix.as_str();
    let started = std::time::Instant::now();
    telemetry::role(Role::Resyncing);
    let token = settings.fence.token();
    // the slots' meta copies start over (reset_all): so do this writer's floors for them
    settings.fence.slots.clear();
    rsink::write_meta(
        &mut con,
        prefix,
        token,
        &[
            ("bootstrap", "loading".into()),
            ("fingerprint", mapping.fingerprint.clone()),
        ],
    )
    .await?;
    let migrated = rsink::migrate_legacy_keys(&mut con, prefix).await?;
    if migrated > 0 {
        tracing::info!(
            skus = migrated,
            layout = layout::LAYOUT_VERSION,
            "moved SKU hashes of an earlier key layout"
        );
    }
    // Before the reset drops the hashes' record of them. A transient error (a failover or
    // a reshard under way) fails the rebuild, which is tried again with the hashes as they
    // are; any other goes on without them (a history slot whose meta copy is gone, say,
    // would otherwise stop it for good; MQTT has those alerts anyway).
    match Applier::new(con.clone(), settings.clone())
        .add_unindexed_alerts()
        .await
    {
        Err(e) if e.is_transient() => return Err(e.into()),
        Ok(0) => {}
        Ok(n) => tracing::info!(
            alerts = n,
            "added the alerts a stopped process had not added to the alert history"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "could not add the alerts a stopped process had left to the alert history; they reached MQTT, not the history"
        ),
    }
    // (that write raised the history slot's floor, which the reset below starts over)
    settings.fence.slots.clear();
    let reset = rsink::reset_all(
        &mut con,
        prefix,
        Lsn(at.0.saturating_sub(1)),
        token,
        Some(&settings.fence.slots),
    )
    .await?;
    crate::failpoint::pause("after-rebuild-reset").await;
    // Fenced by the token; the floor does not apply: applied_lsn is rewritten at the end.
    let load_settings = ApplySettings {
        fence: settings.fence.without_floor(),
        ..settings.clone()
    };
    let mut applier = Applier::new(con.clone(), load_settings);
    let tick = |rows: u64| {
        // a long load (e.g. a resync from `cycle`) is progress for the watchdog too
        telemetry::heartbeat();
        let _ = crate::notify::extend_timeout(
            Duration::from_secs(60),
            &format!("loading snapshot: {rows} rows"),
        );
    };
    let stats = crate::snapshot::load(
        pgc,
        snapshot,
        at,
        mapping.clone(),
        &mut applier,
        max_changes,
        &tick,
    )
    .await?;
    let tables = serde_json::to_string(&stats.tables)
        .map_err(|e| DaemonError::Definite(format!("encoding table identities: {e}")))?;
    let mut fields = vec![
        ("bootstrap", "done".to_string()),
        ("index_pending", String::new()),
        ("applied_lsn", at.0.to_string()),
        // Catch-up tokens from before this load answer 410: the reset changed SKUs
        // the change index does not show.
        ("changes_from", at.0.to_string()),
        ("fingerprint", mapping.fingerprint.clone()),
        ("piece_changes", max_changes.to_string()),
        ("tables", tables),
        (
            rsink::REBUILD_FIELD,
            settings.fence.slots.rebuild_mark().unwrap_or_default(),
        ),
        ("layout", layout::LAYOUT_VERSION.to_string()),
        (
            "partitions",
            serde_json::to_string(&stats.partitions).unwrap_or_default(),
        ),
    ];
    if !publications.is_empty() {
        fields.push(("publications", publications.to_string()));
    }
    if let Some(s) = system {
        fields.push(("system_id", s.system_id.clone()));
        fields.push(("timeline", s.timeline.to_string()));
    }
    // A slot whose primary lost the load's writes to it (a failover to a replica that was
    // behind) must not be marked done: the stream would build on a partial slot.
    if let Some(e) = applier.check_slots().await? {
        return Err(e.into());
    }
    // (before `done`: a rebuild stopped in between is redone, and its reset drops them)
    applier.record_load_floors(at).await?;
    rsink::write_meta(&mut con, prefix, token, &fields).await?;
    // Redis holds exactly `at` now, even below an earlier floor (a rebuild from a server
    // that is behind the one before, after a PostgreSQL failover).
    gate.store(at.0, Ordering::SeqCst);
    tracing::info!(rows = stats.rows, skus_reset = reset, at = %at, seconds = started.elapsed().as_secs_f64(), "snapshot loaded");
    Ok(())
}

/// Poll the slot's lag every 10 s on an ordinary connection (reconnecting as needed).
async fn poll_slot_lag(pgc: PgConnectConfig, slot: String) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut t = tokio::time::interval(Duration::from_secs(10));
    loop {
        t.tick().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = meta::connect(&pgc).await.ok();
        }
        let Some(c) = &client else { continue };
        let q = "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1";
        match c.query_opt(q, &[&slot]).await {
            Ok(Some(row)) => {
                if let Ok(Some(lag)) = row.try_get::<_, Option<i64>>(0) {
                    telemetry::slot_lag(lag);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "slot lag query failed");
                client = None;
            }
        }
    }
}

/// PING Redis every 2 s so `/readyz` sees an outage even while no data flows.
async fn probe_redis(redis: crate::sinks::redis::RedisClient) {
    let mut con: Option<crate::sinks::redis::RedisCon> = None;
    let mut t = tokio::time::interval(Duration::from_secs(2));
    loop {
        t.tick().await;
        if con.is_none() {
            con = tokio::time::timeout(Duration::from_secs(2), rsink::connect(&redis))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some(c) = con.as_mut() else {
            telemetry::redis_failed();
            continue;
        };
        let ping = tokio::time::timeout(
            Duration::from_secs(2),
            redis::cmd("PING").query_async::<String>(c),
        )
        .await;
        match ping {
            Ok(Ok(_)) => telemetry::redis_ok(),
            _ => telemetry::redis_failed(),
        }
    }
}

/// `pg_logical_emit_message` every `every`, so WAL (and the slot) move on quiet servers.
async fn emit_heartbeats(pgc: PgConnectConfig, every: Duration) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut t = tokio::time::interval(every);
    let mut warned = false;
    loop {
        t.tick().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = meta::connect(&pgc).await.ok();
        }
        let Some(c) = &client else { continue };
        if let Err(e) = c
            .execute(
                "SELECT pg_logical_emit_message(false, 'skusync_heartbeat', '')",
                &[],
            )
            .await
        {
            if !warned {
                tracing::warn!(error = %e, "WAL heartbeat failed");
                warned = true;
            }
            client = None;
        } else {
            warned = false;
        }
    }
}

/// Run the source on a thread of its own, with its own single-threaded runtime. While
/// catching up it reads the socket every millisecond (see `ReplConnection::fill_now`); a
/// read that waits behind a long fold or apply step here lets the walsender fall back to
/// a segment per message, which costs it, and this process, twice the CPU. A thread of
/// its own is woken on time by the kernel instead.
fn spawn_source(
    source: Source,
    tx: mpsc::Sender<Vec<SourceEvent>>,
    token: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), SourceError>> {
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("skusync-source")
            .build()
            .map_err(|e| {
                SourceError::Pg(PgError::Protocol(format!(
                    "cannot start the source's runtime: {e}"
                )))
            })?;
        rt.block_on(source.run(tx, token))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_silence_timeout_covers_wal_sender_timeout() {
        let tick = Duration::from_secs(1);
        // PostgreSQL's default 60 s: a decoding walsender may be silent ~30 s
        assert_eq!(
            silence_timeout(Some(Duration::from_secs(60)), tick),
            Duration::from_secs(61)
        );
        // lowered below the default: the default (a black hole is caught in 15 s)
        assert_eq!(
            silence_timeout(Some(Duration::from_secs(5)), tick),
            crate::source::DEFAULT_SILENCE_TIMEOUT
        );
        // disabled (0) or unknown: the walsender answers every status update at once
        assert_eq!(
            silence_timeout(None, tick),
            crate::source::DEFAULT_SILENCE_TIMEOUT
        );
    }
}
