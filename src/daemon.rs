//! `skusync run`: the daemon. Wires the data flow
//!
//! ```text
//! source (slot) -> fold -> Redis apply script -> durable tickets -> confirmed LSN
//!                                      \-> MQTT publisher (reads Redis, its outbox)
//! ```
//!
//! and decides at startup whether Redis can continue from the slot or must be rebuilt
//! from a snapshot (first start, lost data, a different database, a changed mapping).

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
    redis: redis::Client,
    settings: ApplySettings,
    max_changes: u64,
    max_batch_skus: usize,
    /// Transactions up to here replay unmerged (raised when Redis refused a merged entry).
    split_floor: Lsn,
    /// The relation (OID) and reason of the last rebuild for a changed table identity,
    /// until that relation is announced matching: the same reason again means a loop.
    identity_rebuild: Option<(u32, String)>,
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
        let redis = rsink::client(&rc.url, rc.ca_file.as_deref())
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
        con: &mut redis::aio::ConnectionManager,
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
        if !self.ensure_lease(&mut con, shutdown).await? {
            return Ok(Cycle::Shutdown);
        }
        let client = meta::connect(&self.pgc).await?;
        let slot_name = self.cfg.postgres.slot.clone();
        let mut slot = meta::slot_state(&client, &self.pgc, &slot_name).await?;
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
                let why = match &meta {
                    None => Some(
                        "Redis has no skusync data (a new, flushed or evicted Redis)".to_string(),
                    ),
                    Some(m) if !m.bootstrap_done => {
                        Some("a previous snapshot load did not finish".into())
                    }
                    Some(m)
                        if m.fingerprint.as_deref() != Some(self.mapping.fingerprint.as_str()) =>
                    {
                        Some("the table mapping changed since Redis was built".into())
                    }
                    Some(m) if m.layout.as_deref() != Some(layout::LAYOUT_VERSION) => {
                        Some(earlier_layout(m.layout.as_deref()))
                    }
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
                    let applied = m.applied_lsn.unwrap_or(Lsn::ZERO);
                    self.gate.store(applied.0, Ordering::SeqCst);
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

    /// Rebuild Redis from a temporary slot's snapshot, then move the main slot to it.
    async fn resync(
        &mut self,
        con: &mut redis::aio::ConnectionManager,
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
            m.pause();
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
        con: &mut redis::aio::ConnectionManager,
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
        )
        .await
    }

    async fn stream(
        &mut self,
        con: redis::aio::ConnectionManager,
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
        if bootstrap {
            let (pgc, mapping, settings, max_changes, con2, gate) = (
                self.pgc.clone(),
                self.mapping.clone(),
                self.settings.clone(),
                self.max_changes,
                con.clone(),
                self.gate.clone(),
            );
            sc.bootstrap = Some(Arc::new(move |snapshot: String, at: Lsn| {
                let (pgc, mapping, settings, con2, gate) = (
                    pgc.clone(),
                    mapping.clone(),
                    settings.clone(),
                    con2.clone(),
                    gate.clone(),
                );
                Box::pin(async move {
                    load_snapshot(
                        &pgc,
                        &mapping,
                        &settings,
                        max_changes,
                        con2,
                        &snapshot,
                        at,
                        None,
                        &gate,
                    )
                    .await
                    .map_err(|e| e.to_string())
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
        let applier = Applier::new(con, self.settings.clone());
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
            (Ok(Cycle::Shutdown), Err(e)) => Err(e.into()),
            (Ok(Cycle::Shutdown), Ok(())) => Ok(Cycle::Shutdown),
        }
    }

    async fn start_mqtt(&mut self, con: redis::aio::ConnectionManager) -> Result<(), DaemonError> {
        if self.mqtt.is_some() {
            return Ok(());
        }
        let Some(pc) = PublisherConfig::from_config(&self.cfg) else {
            return Ok(());
        };
        // The publisher has its own lifetime: it drains in-flight messages on shutdown.
        let token = CancellationToken::new();
        let (h, j) = mqtt::spawn(pc, con, token.clone())
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
            for t in f.tickets {
                progress.durable(t);
            }
        }
        r
    }

    async fn pipeline_loop(
        &mut self,
        rx: &mut mpsc::Receiver<Vec<SourceEvent>>,
        mut applier: Applier,
        progress: &ProgressHandle,
        flight: &mut Option<tokio::task::JoinHandle<Flight>>,
    ) -> Result<Cycle, DaemonError> {
        let mut fold = Fold::new(self.mapping.clone(), self.max_changes);
        // Generations are the new fold's: a previous pipeline's must not make it forget.
        self.ri_done = 0;
        let mut fold_seen = crate::fold::FoldStats::default();
        let mut pending = Pending::default();
        let mut tick = tokio::time::interval(self.cfg.status_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_entries = self.max_batch_skus;
        let max_steps = self.max_batch_skus.saturating_mul(STEPS_PER_ENTRY);
        let max_txns = self.max_batch_skus.saturating_mul(TXNS_PER_ENTRY);
        // At `k` times the step and transaction caps (the entry cap bounds memory per SKU
        // and never stretches).
        let over = |p: &Pending, k: usize| {
            p.batch.len() >= max_entries
                || p.batch.steps() >= max_steps.saturating_mul(k)
                || p.tickets.len() >= max_txns.saturating_mul(k)
        };
        let full = |p: &Pending| over(p, 1);
        // Reading stops (back-pressure) only at a multiple of the launch caps: while a
        // full batch is applied, the next keeps merging instead of stalling the stream,
        // so a backlog over few SKUs becomes fewer entries (Redis' cost is per entry).
        let hold = |p: &Pending| over(p, HOLD_FACTOR);
        let mut last_event = tokio::time::Instant::now();
        // Redis is checked for lost writes, a new writer and a requested rebuild once the
        // stream is connected (a first snapshot load runs before that).
        let mut connected = false;
        let mut meta_checked = tokio::time::Instant::now();
        let mut partitions_checked = tokio::time::Instant::now();
        // Relations the catalog said are no partition of a mapped table (this session).
        let mut not_partitions: std::collections::HashSet<u32> = Default::default();
        // The transaction being read truncated a stock table (alerts at its commit).
        let mut truncated = false;
        loop {
            let full_now = hold(&pending);
            let events = tokio::select! {
                done = async { flight.as_mut().expect("guarded").await }, if flight.is_some() => {
                    *flight = None;
                    let done = done.map_err(|e| DaemonError::Transient(format!("apply task: {e}")))?;
                    if let Some(c) = self.complete(done, progress)? {
                        return Ok(c);
                    }
                    None
                }
                e = rx.recv(), if !full_now => match e {
                    Some(e) => Some(e),
                    None => {
                        // The source stopped: apply what is left so its final status
                        // confirms it.
                        if let Some(c) = self.drain(&applier, &mut pending, flight, progress, fold.seal()).await? {
                            return Ok(c);
                        }
                        return Ok(Cycle::Shutdown);
                    }
                },
                _ = tokio::time::sleep_until(last_event + LINGER), if flight.is_none() && !pending.is_empty() => {
                    *flight = Some(launch(&applier, &mut pending, self.mqtt.clone(), fold.seal()));
                    None
                }
                _ = tick.tick() => {
                    telemetry::heartbeat();
                    telemetry::backlog(rx.len(), pending.batch.len());
                    if self.lease.as_ref().is_some_and(|l| !l.alive()) {
                        self.lease = None;
                        return Ok(Cycle::Restart(
                            "lost the writer lock session (PostgreSQL unreachable?): stopping writes".into(),
                        ));
                    }
                    if connected && meta_checked.elapsed() >= META_CHECK {
                        meta_checked = tokio::time::Instant::now();
                        if let Ok(v) = rsink::writer_view(&mut applier.connection(), self.prefix()).await
                            && let Some(c) = self.check_writer_view(&v)
                        {
                            return Ok(c);
                        }
                    }
                    if connected && partitions_checked.elapsed() >= PARTITION_CHECK {
                        partitions_checked = tokio::time::Instant::now();
                        match self.read_partitions().await {
                            Ok(trees) => {
                                if let Some(why) = self.partition_drift(&trees) {
                                    return rebuild_next(
                                        &mut applier.connection(),
                                        self.prefix(),
                                        self.settings.fence.token(),
                                        why,
                                    )
                                    .await;
                                }
                                for (oid, parent) in trees.parents() {
                                    if fold.parent_of(oid).is_none() {
                                        fold.add_partition(oid, parent);
                                    }
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot read the mapped tables' partitions"),
                        }
                    }
                    // Keepalive-only progress: record it in Redis before it may be confirmed.
                    let flush = progress.flush_lsn();
                    if pending.is_empty() && flight.is_none() && flush.0 > self.gate.load(Ordering::SeqCst) {
                        match applier.apply(&[], Some(flush), false).await {
                            Ok(_) => { telemetry::redis_ok(); self.gate.fetch_max(flush.0, Ordering::SeqCst) }
                            Err(RedisSinkError::NoMeta) => return Ok(Cycle::Restart("Redis lost its data".into())),
                            Err(e @ (RedisSinkError::Fenced(_) | RedisSinkError::Rollback(_))) => return Ok(self.writer_lost(e)),
                            // e.g. READONLY: warning on every tick would hide it
                            Err(e) if !e.is_transient() => return Err(e.into()),
                            Err(e) => { telemetry::redis_failed(); tracing::warn!(error = %e, "cannot record progress in Redis"); 0 }
                        };
                    }
                    None
                }
            };
            if events.is_some() {
                last_event = tokio::time::Instant::now();
            }
            // Rows of indexed stock tables (surrogate keys, lookups) are folded with what
            // Redis' index holds for them: read what the fold does not know, in one round
            // trip per link of state.
            if let Some(evs) = &events {
                let changes: Vec<&crate::txn::Change> = evs
                    .iter()
                    .filter_map(|ev| match ev {
                        SourceEvent::Event(Event::Change(c)) => Some(c),
                        _ => None,
                    })
                    .collect();
                match applier.read_needs(&mut fold, &changes).await {
                    Ok(()) => {}
                    Err(e) if e.is_transient() => {
                        return Ok(Cycle::Restart(format!("reading the row index: {e}")));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let mut commits = 0u64;
            let mut recheck = false;
            for ev in events.into_iter().flatten() {
                match ev {
                    SourceEvent::Connected(info) => {
                        fold.reset();
                        let mut con = applier.connection();
                        match rsink::read_meta(&mut con, self.prefix()).await? {
                            None => return Ok(Cycle::Restart("Redis lost its data".into())),
                            Some(m) => {
                                if let Some(sys) = &m.system_id
                                    && *sys != info.system_id
                                {
                                    return rebuild_next(
                                        &mut con,
                                        self.prefix(),
                                        self.settings.fence.token(),
                                        format!(
                                            "Redis was built from another database (system id {sys}, now {})",
                                            info.system_id
                                        ),
                                    )
                                    .await;
                                }
                                // A new timeline: the server was promoted from a standby or
                                // recovered to a point in time. Transactions Redis holds may
                                // not exist on it (lost with the old primary), so Redis is
                                // rebuilt; PostgreSQL before 17 drops logical slots on
                                // failover anyway, which rebuilds too.
                                if let Some(t) = &m.timeline
                                    && m.system_id.as_deref() == Some(info.system_id.as_str())
                                    && *t != info.timeline.to_string()
                                {
                                    return rebuild_next(
                                        &mut con,
                                        self.prefix(),
                                        self.settings.fence.token(),
                                        format!(
                                            "PostgreSQL is on timeline {} but Redis was built on timeline {t} (a failover or point-in-time recovery may have dropped transactions Redis holds)",
                                            info.timeline
                                        ),
                                    )
                                    .await;
                                }
                                if !m.bootstrap_done {
                                    return Ok(Cycle::Restart(
                                        "Redis holds an unfinished snapshot load".into(),
                                    ));
                                }
                                // A standby that won the slot skipped the startup checks.
                                if m.layout.as_deref() != Some(layout::LAYOUT_VERSION) {
                                    return rebuild_next(
                                        &mut con,
                                        self.prefix(),
                                        self.settings.fence.token(),
                                        earlier_layout(m.layout.as_deref()),
                                    )
                                    .await;
                                }
                                if m.fingerprint.as_deref()
                                    != Some(self.mapping.fingerprint.as_str())
                                {
                                    return rebuild_next(
                                        &mut con,
                                        self.prefix(),
                                        self.settings.fence.token(),
                                        "the table mapping changed since Redis was built".into(),
                                    )
                                    .await;
                                }
                                if let Some(lease) = &self.lease
                                    && let Ok(Some(st)) = meta::slot_state(
                                        &lease.client,
                                        &self.pgc,
                                        &self.cfg.postgres.slot,
                                    )
                                    .await
                                    && let Some(confirmed) = st.confirmed_flush_lsn
                                    && m.applied_lsn.unwrap_or(Lsn::ZERO) < confirmed
                                {
                                    return rebuild_next(
                                        &mut con,
                                        self.prefix(),
                                        self.settings.fence.token(),
                                        format!(
                                            "Redis is behind the slot (applied {} < confirmed {confirmed}): it lost writes",
                                            m.applied_lsn.unwrap_or(Lsn::ZERO)
                                        ),
                                    )
                                    .await;
                                }
                                connected = true;
                                fold.expect_tables(m.tables.clone());
                                self.partitions_built = m.partitions.clone();
                                let trees = self.read_partitions().await?;
                                if let Some(why) = self.partition_drift(&trees) {
                                    return rebuild_next(
                                        &mut con,
                                        self.prefix(),
                                        self.settings.fence.token(),
                                        why,
                                    )
                                    .await;
                                }
                                fold.set_partitions(trees.parents());
                                partitions_checked = tokio::time::Instant::now();
                                // A new fold reads its hot index state in bulk rather than
                                // row by row behind the apply calls of the catch-up.
                                if flight.is_none() && pending.is_empty() && fold.is_cold() {
                                    let tables: Vec<&str> = self
                                        .mapping
                                        .inventory
                                        .iter()
                                        .map(|t| t.table.as_str())
                                        .collect();
                                    let limit = crate::fold::CACHE_ENTRIES * 3 / 4;
                                    match applier
                                        .warm(&mut fold, &tables, self.mapping.hops.len(), limit)
                                        .await
                                    {
                                        Ok(n) => tracing::debug!(
                                            entries = n,
                                            "read the row index and lookup state ahead"
                                        ),
                                        Err(e) if e.is_transient() => {
                                            return Ok(Cycle::Restart(format!(
                                                "reading the row index: {e}"
                                            )));
                                        }
                                        Err(e) => return Err(e.into()),
                                    }
                                }
                                if m.system_id.is_none() || m.timeline.is_none() {
                                    rsink::write_meta(
                                        &mut con,
                                        self.prefix(),
                                        self.settings.fence.token(),
                                        &[
                                            ("system_id", info.system_id.clone()),
                                            ("timeline", info.timeline.to_string()),
                                        ],
                                    )
                                    .await?;
                                }
                                // Transactions Redis may hold already replay unmerged.
                                let horizon = m.applied_lsn.unwrap_or(Lsn(0)).max(self.split_floor);
                                pending.batch.raise_horizon(horizon);
                            }
                        }
                        // Ready only once the checks above passed (and their Redis writes
                        // are done): a Redis lost in between restarts, not "streaming".
                        telemetry::role(Role::Streaming);
                        self.start_mqtt(applier.connection()).await?;
                    }
                    SourceEvent::Reset => fold.reset(),
                    SourceEvent::Event(Event::Relation(r)) => {
                        if !fold.knows(&r) && !not_partitions.contains(&r.oid) {
                            // Named by a partition attached since the partitions were read?
                            match self.mapped_parent(r.oid).await? {
                                Some(parent)
                                    if self.mapping.inventory.iter().any(|m| m.table == parent) =>
                                {
                                    // Its rows before the attach never reached the stream.
                                    return rebuild_next(
                                        &mut applier.connection(),
                                        self.prefix(),
                                        self.settings.fence.token(),
                                        format!(
                                            "partition {} of stock table {parent} was attached after Redis was \
                                             built; rebuilding Redis from a fresh snapshot",
                                            r.qualified_name()
                                        ),
                                    )
                                    .await;
                                }
                                // An activity table's: its inserts count from now on.
                                Some(parent) => fold.add_partition(r.oid, &parent),
                                None => {
                                    not_partitions.insert(r.oid);
                                }
                            }
                        }
                        match fold.relation(&r) {
                            Ok(()) => {
                                // The table the last rebuild was for now matches Redis.
                                if self
                                    .identity_rebuild
                                    .as_ref()
                                    .is_some_and(|(oid, _)| *oid == r.oid)
                                {
                                    self.identity_rebuild = None;
                                }
                            }
                            Err(RelationProblem::Schema(e)) => {
                                return Err(schema_stop(e, fold.current_commit()));
                            }
                            Err(RelationProblem::Changed(why)) => {
                                // Nothing of that table is folded under the new identity: Redis
                                // is rebuilt from a snapshot taken after the change, and the
                                // slot moves there, so the restart does not meet it again. If
                                // it does, the snapshot and the stream describe the table
                                // differently: rebuilding again would loop.
                                if self.identity_rebuild.as_ref() == Some(&(r.oid, why.clone())) {
                                    return Err(DaemonError::Definite(format!(
                                        "{why}, again right after Redis was rebuilt for the same reason: the snapshot \
                                     and the replication stream describe the table differently (generated columns \
                                     published by PostgreSQL 18?); stopping instead of rebuilding in a loop"
                                    )));
                                }
                                self.identity_rebuild = Some((r.oid, why.clone()));
                                return rebuild_next(
                                    &mut applier.connection(),
                                    self.prefix(),
                                    self.settings.fence.token(),
                                    format!("{why}; rebuilding Redis from a fresh snapshot"),
                                )
                                .await;
                            }
                        }
                    }
                    SourceEvent::Event(Event::Begin(b)) => {
                        truncated = false;
                        fold.begin(&b);
                    }
                    SourceEvent::Event(Event::Change(c)) => {
                        // After a change of a referenced table, later changes of the chunk
                        // may need state the chunk's read did not foresee (rare).
                        recheck |= fold.changes_lookups(&c);
                        if recheck {
                            match applier.read_needs(&mut fold, &[&c]).await {
                                Ok(()) => {}
                                Err(e) if e.is_transient() => {
                                    return Ok(Cycle::Restart(format!(
                                        "reading the row index: {e}"
                                    )));
                                }
                                Err(e) => return Err(e.into()),
                            }
                        }
                        if let Some(p) = fold
                            .change(&c)
                            .map_err(|e| schema_stop(e, Some(c.commit_lsn)))?
                        {
                            pending.push(p);
                        }
                    }
                    SourceEvent::Event(Event::Truncate(t)) => {
                        let pieces = match fold.truncate(&t) {
                            Ok(p) => p,
                            Err(RelationProblem::Schema(e)) => {
                                return Err(schema_stop(e, fold.current_commit()));
                            }
                            Err(RelationProblem::Changed(why)) => {
                                return rebuild_next(
                                    &mut applier.connection(),
                                    self.prefix(),
                                    self.settings.fence.token(),
                                    format!("{why}; rebuilding Redis from a fresh snapshot"),
                                )
                                .await;
                            }
                        };
                        for p in pieces {
                            if p.truncate.is_empty() {
                                pending.push(p);
                                continue;
                            }
                            // Everything before it first; then the truncate over all SKUs.
                            if let Some(c) = self
                                .drain(&applier, &mut pending, flight, progress, fold.seal())
                                .await?
                            {
                                return Ok(c);
                            }
                            let skus = applier.all_skus().await?;
                            for chunk in skus.chunks(500) {
                                match applier.truncate(&p, chunk).await {
                                    Ok(_) => {}
                                    Err(RedisSinkError::NoMeta) => {
                                        return Ok(Cycle::Restart("Redis lost its data".into()));
                                    }
                                    Err(e) => return Err(e.into()),
                                }
                            }
                            // The rows are gone, and so is where they were held.
                            for table in &p.truncate {
                                applier
                                    .truncate_row_index(table, (p.commit_lsn, p.piece))
                                    .await?;
                            }
                            if let Some(m) = &self.mqtt {
                                m.changed(skus);
                            }
                            truncated = true;
                        }
                    }
                    SourceEvent::Event(_) => {}
                    SourceEvent::Commit(c, ticket) => {
                        let last = fold.commit(&c);
                        let fence = last.as_ref().map(|p| (p.commit_lsn, p.piece));
                        if let Some(p) = last {
                            pending.push(p);
                        }
                        if std::mem::take(&mut truncated)
                            && let Some(fence) = fence
                        {
                            // Alerts once per transaction: after its final piece, every SKU
                            // at its final level (a refilled table raises nothing). Before
                            // this transaction's ticket is queued, so it is not confirmed
                            // until the evaluation is applied.
                            if let Some(c) = self
                                .drain(&applier, &mut pending, flight, progress, fold.seal())
                                .await?
                            {
                                return Ok(c);
                            }
                            let ms = crate::txn::value::pg_timestamp_to_unix_micros(c.commit_ts)
                                .div_euclid(1000);
                            let skus = applier.all_skus().await?;
                            for chunk in skus.chunks(500) {
                                match applier.evaluate(fence, ms, chunk).await {
                                    Ok(_) => {}
                                    Err(RedisSinkError::NoMeta) => {
                                        return Ok(Cycle::Restart("Redis lost its data".into()));
                                    }
                                    Err(
                                        e @ (RedisSinkError::Fenced(_)
                                        | RedisSinkError::Rollback(_)),
                                    ) => {
                                        return Ok(self.writer_lost(e));
                                    }
                                    Err(e) => return Err(e.into()),
                                }
                            }
                            if let Some(m) = &self.mqtt {
                                m.changed(skus);
                            }
                        }
                        pending.end = Some(pending.end.map_or(c.end_lsn, |e| e.max(c.end_lsn)));
                        pending.tickets.push(ticket);
                        pending.commit_ms.push(
                            crate::txn::value::pg_timestamp_to_unix_micros(c.commit_ts)
                                .div_euclid(1000),
                        );
                        commits += 1;
                    }
                }
                for s in fold.take_skipped() {
                    telemetry::value_skipped(&s);
                }
            }
            telemetry::transactions(commits);
            telemetry::fold_progress(&fold.stats, &mut fold_seen);
            telemetry::backlog(rx.len(), pending.batch.len());
            // Apply as soon as Redis is free: quiet streams get low latency. While the
            // slot is catching up (the walsender sends commits long after they happened)
            // keep merging until a cap, or until the source goes quiet (`LINGER`):
            // Redis' cost is per SKU entry, so fewer, larger calls leave the machine's
            // cores to decoding.
            if flight.is_none()
                && !pending.is_empty()
                && (full(&pending) || progress.stream_lag_ms() < BACKLOG_LAG_MS)
            {
                *flight = Some(launch(
                    &applier,
                    &mut pending,
                    self.mqtt.clone(),
                    fold.seal(),
                ));
            }
            // Holders whose row index writes are done: Redis answers for them again.
            fold.forget(self.ri_done);
        }
    }

    /// Record a finished apply call: its transactions become durable (confirmable; MQTT
    /// learned its SKUs call by call, see [`launch`]). Returns a restart when the call
    /// failed for good.
    fn complete(
        &mut self,
        f: Flight,
        progress: &ProgressHandle,
    ) -> Result<Option<Cycle>, DaemonError> {
        match f.result {
            Ok(applied) => {
                if let Some(end) = f.end {
                    self.gate.fetch_max(end.0, Ordering::SeqCst);
                }
                self.ri_done = self.ri_done.max(f.generation);
                for t in f.tickets {
                    progress.durable(t);
                }
                telemetry::redis_applied(
                    applied.applied,
                    applied.fenced,
                    applied.alerts,
                    &f.commit_ms,
                );
                Ok(None)
            }
            Err(RedisSinkError::NoMeta) => Ok(Some(Cycle::Restart(
                "Redis lost its data (meta hash missing)".into(),
            ))),
            Err(e @ (RedisSinkError::Fenced(_) | RedisSinkError::Rollback(_))) => {
                Ok(Some(self.writer_lost(e)))
            }
            Err(e @ RedisSinkError::Split(_)) => {
                // Redis held part of a merged entry: replay everything up to this batch
                // unmerged. Nothing of the refused call was written. The restart is
                // logged at WARN, so the SKU goes to its own debug line.
                if let RedisSinkError::Split(key) = &e {
                    tracing::debug!(key = %crate::secret::log_value(key), last_commit = %f.last_commit, "merged entry refused by this SKU's fence");
                }
                self.split_floor = self.split_floor.max(f.last_commit);
                Ok(Some(Cycle::Restart(format!(
                    "{e}; replaying without merging up to {} (the SKU is logged at debug)",
                    f.last_commit
                ))))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// What the periodic look at the meta hash means for the running writer: `None` when
    /// all is well.
    fn check_writer_view(&mut self, v: &rsink::WriterView) -> Option<Cycle> {
        if !v.exists {
            return Some(Cycle::Restart(
                "Redis lost its data (meta hash missing)".into(),
            ));
        }
        let ours = self.settings.fence.token();
        if ours != 0 && v.writer.as_deref() != Some(ours.to_string().as_str()) {
            let w = v.writer.clone().unwrap_or_else(|| "none".into());
            return Some(self.writer_lost(RedisSinkError::Fenced(w)));
        }
        let floor = self.gate.load(Ordering::SeqCst);
        if v.applied_lsn.is_none_or(|a| a.0 < floor) {
            let a = v
                .applied_lsn
                .map_or_else(|| "none".into(), |a| a.0.to_string());
            return Some(self.writer_lost(RedisSinkError::Rollback(a)));
        }
        if v.bootstrap.as_deref() != Some("done") {
            return Some(Cycle::Restart(format!(
                "a rebuild was requested (meta bootstrap = {})",
                v.bootstrap.as_deref().unwrap_or("none")
            )));
        }
        None
    }

    /// A session for catalog reads: the writer lock's when there is one.
    async fn catalog(&self) -> Result<Arc<tokio_postgres::Client>, DaemonError> {
        match &self.lease {
            Some(l) => Ok(l.client.clone()),
            None => Ok(Arc::new(meta::connect(&self.pgc).await?)),
        }
    }

    /// The mapped tables' partitions as the catalog has them now.
    async fn read_partitions(&self) -> Result<partitions::Trees, DaemonError> {
        let tables: Vec<String> = self.mapping.tables().map(str::to_string).collect();
        Ok(partitions::read(&*self.catalog().await?, &self.pgc, &tables).await?)
    }

    /// The mapped table a relation the stream names is a partition of, when the
    /// partitions read before did not list it (attached since).
    async fn mapped_parent(&self, oid: u32) -> Result<Option<String>, DaemonError> {
        let tables: Vec<String> = self.mapping.tables().map(str::to_string).collect();
        let client = self.catalog().await?;
        Ok(partitions::mapped_ancestor(&client, &self.pgc, oid, &tables).await?)
    }

    /// Why Redis no longer matches the stock tables' partitions, if it does not: a
    /// partition attached with rows, detached, dropped or truncated changes rows the
    /// stream never carries.
    fn partition_drift(&self, trees: &partitions::Trees) -> Option<String> {
        let now = trees.fingerprints(self.mapping.inventory.iter().map(|m| m.table.as_str()));
        if now == self.partitions_built {
            return None;
        }
        let mut which: Vec<&str> = now
            .keys()
            .chain(self.partitions_built.keys())
            .filter(|t| now.get(*t) != self.partitions_built.get(*t))
            .map(String::as_str)
            .collect();
        which.dedup();
        Some(format!(
            "the partitions of stock table {} changed since Redis was built (a partition was attached, \
             detached, dropped or truncated: changes the stream does not carry); rebuilding Redis from a \
             fresh snapshot",
            which.join(", ")
        ))
    }

    /// Redis refused a write: another writer holds the token, or Redis lost writes. Stop
    /// writing and restart: the next cycle takes the lock and a token again (or waits as a
    /// standby), resumes from the slot's confirmed position (what Redis lost past it
    /// replays, fenced) and rebuilds Redis if it is behind the slot.
    fn writer_lost(&mut self, e: RedisSinkError) -> Cycle {
        telemetry::redis_rollback_or_fenced(matches!(e, RedisSinkError::Rollback(_)));
        // A token below ours means Redis came back older, like a low applied_lsn.
        let ours = self.settings.fence.token();
        let rollback = match &e {
            RedisSinkError::Rollback(_) => true,
            RedisSinkError::Fenced(w) => w.parse::<u64>().is_ok_and(|w| w < ours) || w == "none",
            _ => false,
        };
        if !rollback {
            // Someone else took the token: it can only hold the lock if ours is gone.
            self.lease = None;
        }
        Cycle::Restart(if rollback {
            format!(
                "{e}: resuming from the slot's confirmed position, or rebuilding if Redis is behind it"
            )
        } else {
            format!("{e}")
        })
    }

    /// Wait for the call in flight, then apply what is pending, and wait for that too.
    async fn drain(
        &mut self,
        applier: &Applier,
        pending: &mut Pending,
        flight: &mut Option<tokio::task::JoinHandle<Flight>>,
        progress: &ProgressHandle,
        generation: u64,
    ) -> Result<Option<Cycle>, DaemonError> {
        for _ in 0..2 {
            if let Some(f) = flight.take() {
                let f = f
                    .await
                    .map_err(|e| DaemonError::Transient(format!("apply task: {e}")))?;
                if let Some(c) = self.complete(f, progress)? {
                    return Ok(Some(c));
                }
            }
            if !pending.is_empty() {
                *flight = Some(launch(applier, pending, self.mqtt.clone(), generation));
            }
        }
        Ok(None)
    }
}

/// Most entries per script call (a batch may take several calls).
const CALL_ENTRIES: usize = 500;
/// How often a running writer looks at the meta hash for lost writes, another writer or a
/// requested rebuild (apply calls check the first two on every write as well).
const META_CHECK: Duration = Duration::from_secs(2);
/// How often the mapped tables' partitions are compared with those Redis was built with.
const PARTITION_CHECK: Duration = Duration::from_secs(5);
/// Most stock steps per apply call, per allowed entry (`max_batch_skus`).
const STEPS_PER_ENTRY: usize = 5;
/// While catching up, how long the source may stay quiet before what is pending is
/// applied anyway.
const LINGER: Duration = Duration::from_millis(20);
/// Most transactions per apply call, per allowed entry (their tickets wait in memory).
const TXNS_PER_ENTRY: usize = 10;
/// While a batch is applied, the next may merge this many times the step and transaction
/// caps before the stream is paused.
const HOLD_FACTOR: usize = 4;

/// Start one apply call for everything pending; transient Redis errors are retried
/// inside (the fence makes retrying the same call safe). MQTT learns a call's SKUs as
/// soon as that call returned: publishing what Redis holds needs no confirmed LSN, and
/// the broker's work then overlaps the batch's later calls instead of following them.
fn launch(
    applier: &Applier,
    pending: &mut Pending,
    mqtt: Option<MqttHandle>,
    generation: u64,
) -> tokio::task::JoinHandle<Flight> {
    let entries = pending.batch.take();
    let mut ri = std::mem::take(&mut pending.ri);
    let write = std::mem::take(&mut pending.ri_write);
    ri.retain(|k, _| write.contains(k));
    let last_commit = entries.iter().map(|e| e.last.0).max().unwrap_or(Lsn(0));
    let end = pending.end.take();
    let tickets = std::mem::take(&mut pending.tickets);
    let commit_ms = std::mem::take(&mut pending.commit_ms);
    let mut applier = applier.clone();
    tokio::spawn(async move {
        // Script calls of at most CALL_ENTRIES entries, in order: each SKU's entry is
        // applied whole (its fence makes that exact), the encoded command stays small and
        // Redis is never blocked long for its other clients. The batch's end LSN is
        // recorded only by the last call.
        let chunks: Vec<&[crate::fold::batch::Entry]> = if entries.is_empty() {
            vec![&[]] // a keepalive-only batch still records its end LSN
        } else {
            entries.chunks(CALL_ENTRIES).collect()
        };
        let n = chunks.len();
        let result = async {
            let mut total = rsink::Applied::default();
            for (i, chunk) in chunks.into_iter().enumerate() {
                // With row index updates, the end LSN is recorded by their last write.
                let chunk_end = if i + 1 == n && ri.is_empty() { end } else { None };
                total += apply_retrying(&mut applier, chunk, chunk_end).await?;
                if let Some(m) = &mqtt {
                    let skus: BTreeSet<&str> = chunk.iter().map(|e| e.sku.as_str()).collect();
                    m.changed(skus.into_iter().map(str::to_string));
                }
            }
            // After every SKU entry of the batch: a replay of the batch reads the row
            // index as it was before it, and so folds the same entries (fenced).
            if !ri.is_empty() {
                failpoint("before-row-index");
                let mut delay = Duration::from_millis(100);
                loop {
                    match applier.write_row_index(&ri, end).await {
                        Err(e) if e.is_transient() => {
                            telemetry::redis_failed();
                            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Redis row index write failed; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                        r => break r?,
                    }
                }
            }
            if !entries.is_empty() {
                // applied, not yet confirmed: the restart replays this batch
                failpoint("after-apply");
            }
            Ok(total)
        }
        .await;
        Flight {
            generation,
            tickets,
            end,
            last_commit,
            commit_ms,
            result,
        }
    })
}

/// A crash point for tests, like a SIGKILL at that point: `SKUSYNC_FAILPOINT=<name>:<n>`
/// aborts the process the `n`th time `name` is reached (counted per process). Unset in
/// production; read once.
fn failpoint(name: &str) {
    static SPEC: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("SKUSYNC_FAILPOINT").ok()?;
        let (n, k) = v.rsplit_once(':')?;
        Some((n.to_string(), k.parse().ok()?))
    });
    if let Some((n, k)) = spec
        && n == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *k
    {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}

/// One script call; transient Redis errors are retried with backoff (the fence makes
/// sending the same call again safe).
async fn apply_retrying(
    applier: &mut Applier,
    entries: &[crate::fold::batch::Entry],
    end: Option<Lsn>,
) -> Result<rsink::Applied, RedisSinkError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match applier.apply(entries, end, false).await {
            Err(e) if e.is_transient() => {
                telemetry::redis_failed();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Redis apply failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            r => return r,
        }
    }
}

/// The batch being filled, with the tickets its transactions complete.
#[derive(Default)]
struct Pending {
    batch: Batch,
    /// Row index updates of the batch's pieces, final per row.
    ri: std::collections::HashMap<String, Option<String>, foldhash::fast::RandomState>,
    /// Fields of `ri` some piece changed beyond quantities (`Piece::ri_local`): only
    /// these are written.
    ri_write: std::collections::HashSet<String, foldhash::fast::RandomState>,
    tickets: Vec<Ticket>,
    end: Option<Lsn>,
    /// Commit times (unix ms) of the transactions, for the latency histogram.
    commit_ms: Vec<i64>,
}

impl Pending {
    /// Add a folded piece: its SKU entries to the batch, its row index updates here.
    fn push(&mut self, mut p: crate::fold::Piece) {
        // Not `append`: it rebuilds the whole map (O(n + m)), quadratic over a batch of
        // small transactions.
        let local = std::mem::take(&mut p.ri_local);
        for (k, v) in std::mem::take(&mut p.ri) {
            if !local.contains(&k) {
                self.ri_write.insert(k.clone());
                self.ri.insert(k, v);
            } else if let Some(w) = self.ri.get_mut(&k) {
                // written anyway for an earlier piece: with the latest quantities
                *w = v;
            }
            // else: only quantities moved; nothing to write (the hot path)
        }
        self.batch.push(p);
    }

    fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.tickets.is_empty()
    }
}

/// A finished apply call.
struct Flight {
    /// The fold's holder generation this batch sealed (see `Fold::seal`).
    generation: u64,
    tickets: Vec<Ticket>,
    end: Option<Lsn>,
    last_commit: Lsn,
    commit_ms: Vec<i64>,
    result: Result<rsink::Applied, RedisSinkError>,
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
    d.resync(&mut con, &client, &slot).await
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
    con: &mut redis::aio::ConnectionManager,
    prefix: &str,
    token: u64,
    why: String,
) -> Result<Cycle, DaemonError> {
    rsink::write_meta(con, prefix, token, &[("bootstrap", "stale".into())]).await?;
    Ok(Cycle::Restart(why))
}

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
    mut con: redis::aio::ConnectionManager,
    snapshot: &str,
    at: Lsn,
    system: Option<&crate::pg::SystemInfo>,
    gate: &Arc<AtomicU64>,
) -> Result<(), DaemonError> {
    let prefix = settings.prefix.as_str();
    let started = std::time::Instant::now();
    telemetry::role(Role::Resyncing);
    let token = settings.fence.token();
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
    let reset = rsink::reset_all(&mut con, prefix, Lsn(at.0.saturating_sub(1)), token).await?;
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
        ("applied_lsn", at.0.to_string()),
        // Catch-up tokens from before this load answer 410: the reset changed SKUs
        // the change index does not show.
        ("changes_from", at.0.to_string()),
        ("fingerprint", mapping.fingerprint.clone()),
        ("tables", tables),
        ("layout", layout::LAYOUT_VERSION.to_string()),
        (
            "partitions",
            serde_json::to_string(&stats.partitions).unwrap_or_default(),
        ),
    ];
    if let Some(s) = system {
        fields.push(("system_id", s.system_id.clone()));
        fields.push(("timeline", s.timeline.to_string()));
    }
    rsink::write_meta(&mut con, prefix, token, &fields).await?;
    gate.fetch_max(at.0, Ordering::SeqCst);
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
async fn probe_redis(redis: redis::Client) {
    let mut con: Option<redis::aio::ConnectionManager> = None;
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
