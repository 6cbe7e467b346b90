//! The replication source: owns the replication connection, decodes and assembles
//! transactions, hands them downstream through a bounded channel, and reports the durable
//! LSN back to the server. Reconnects with exponential back-off on transient errors and
//! stops on definite ones.
//!
//! Within one process every transaction is delivered exactly once: after a reconnect the
//! server replays from the slot's confirmed LSN, and transactions already delivered are
//! skipped here by commit LSN. Across process restarts, replays past the confirmed LSN
//! reach the sinks, which fence them (the Redis apply script does).

use crate::lsn::Lsn;
use crate::pg::conn::{ReplConnection, ReplicationOptions, SnapshotAction, StreamItem, SystemInfo};
use crate::pg::connstr::PgConnectConfig;
use crate::pg::error::PgError;
use crate::pg::meta;
use crate::pg::pace::Busy;
use crate::pg::wire::ReplMessage;
use crate::pgoutput::{Decoder, Message};
use crate::progress::{BACKLOG_LAG_MS, Progress, Ticket};
use crate::txn::{AssembleError, Assembler, Event, TxnCommit};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// While catching up, the socket is read this often (see `ReplConnection::set_read_batching`).
const READ_INTERVAL: Duration = Duration::from_millis(1);

/// Which slot to stream from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// A permanent slot that must already exist.
    Existing,
    /// A temporary slot created on the replication connection (dropped with it). A
    /// reconnect cannot resume it, so its loss ends the stream.
    Temporary,
}

/// Loads a snapshot exported by a newly created slot: `(snapshot name, consistent
/// point, the server it came from)`. Runs while the replication connection waits, so the
/// snapshot stays valid.
pub type BootstrapHook = Arc<
    dyn Fn(String, Lsn, SystemInfo) -> futures::future::BoxFuture<'static, Result<(), String>>
        + Send
        + Sync,
>;

/// Settings of the source.
#[derive(Clone)]
pub struct SourceConfig {
    pub conn: PgConnectConfig,
    pub slot: String,
    pub slot_kind: SlotKind,
    pub publications: Vec<String>,
    pub proto_version: u32,
    /// Periodic standby status update interval.
    pub status_interval: Duration,
    /// Send the durable LSN as flush position. `false` reads a slot without moving it.
    pub confirm: bool,
    /// Capacity of the downstream channel, in batches.
    pub channel_batches: usize,
    /// Most events per batch.
    pub batch_events: usize,
    /// Back-off bounds for reconnects.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Create a missing slot (with an exported snapshot handed to this hook) instead of
    /// failing with `SlotMissing`.
    pub bootstrap: Option<BootstrapHook>,
    /// Upper bound for the confirmed LSN, kept by a sink that must record an LSN before
    /// it may be confirmed (the Redis meta hash's `applied_lsn`).
    pub confirm_gate: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// How long a shutdown waits for in-flight transactions to become durable before
    /// sending the final status update.
    pub drain_timeout: Duration,
    /// A replication connection on which nothing arrives for this long (but at least two
    /// status intervals; see [`dead_after`](Self::dead_after)) is taken for dead and
    /// reopened. After two silent intervals each status update asks the server for a
    /// reply, so a live server is never silent that long.
    pub silence_timeout: Duration,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("conn", &self.conn)
            .field("slot", &self.slot)
            .field("slot_kind", &self.slot_kind)
            .field("publications", &self.publications)
            .field("proto_version", &self.proto_version)
            .field("confirm", &self.confirm)
            .finish_non_exhaustive()
    }
}

impl SourceConfig {
    /// Defaults for everything but the connection, slot and publications.
    pub fn new(conn: PgConnectConfig, slot: &str, publications: Vec<String>) -> SourceConfig {
        SourceConfig {
            conn,
            slot: slot.to_string(),
            slot_kind: SlotKind::Existing,
            publications,
            proto_version: 1,
            status_interval: Duration::from_secs(1),
            confirm: true,
            channel_batches: 64,
            batch_events: 1024,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            bootstrap: None,
            confirm_gate: None,
            drain_timeout: Duration::from_secs(10),
            silence_timeout: DEFAULT_SILENCE_TIMEOUT,
        }
    }

    /// Silence after which the replication connection counts as dead:
    /// `max(2 x status_interval, silence_timeout)`.
    pub fn dead_after(&self) -> Duration {
        self.silence_timeout.max(self.status_interval * 2)
    }
}

/// Default [`SourceConfig::silence_timeout`]. A dropped (black-holed) connection is
/// detected within this plus one status interval, well before the kernel's TCP
/// retransmission limit (~15 min) would act. The daemon raises it to the server's
/// `wal_sender_timeout` (see `daemon::silence_timeout`).
pub const DEFAULT_SILENCE_TIMEOUT: Duration = Duration::from_secs(15);

/// What the source hands downstream, in stream order.
#[derive(Debug)]
pub enum SourceEvent {
    /// A replication session started (also after each reconnect).
    Connected(StreamInfo),
    /// The session broke inside a transaction: forget what was received of it; it will
    /// be delivered again in full.
    Reset,
    /// Begin, a change, a truncate, a relation or a logical message.
    Event(Event),
    /// A transaction ended. Mark the ticket durable (via [`ProgressHandle::durable`]) once
    /// its effects are applied; only then may the slot move past it.
    Commit(TxnCommit, Ticket),
}

/// Facts about a replication session.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    pub system_id: String,
    pub timeline: u32,
    pub server_version: String,
    /// The slot's confirmed LSN when streaming started.
    pub start_lsn: Lsn,
    /// Walsender PID.
    pub backend_pid: i32,
}

/// Shared handle for sinks to report durability.
#[derive(Clone)]
pub struct ProgressHandle(Arc<Mutex<Progress>>);

impl ProgressHandle {
    /// The transaction behind `ticket` is durable in every sink.
    pub fn durable(&self, ticket: Ticket) {
        self.lock().durable(ticket);
    }
    /// The transactions of tickets numbered `first..=last` are durable in every sink
    /// (see [`Progress::durable_seqs`]).
    pub fn durable_seqs(&self, first: u64, last: u64) {
        self.lock().durable_seqs(first, last);
    }
    /// The flush LSN the slot may be confirmed to.
    pub fn flush_lsn(&self) -> Lsn {
        self.lock().flush_lsn()
    }
    /// Milliseconds between the latest commit read and the walsender sending it: the
    /// backlog, measured on the server's clock.
    pub fn stream_lag_ms(&self) -> i64 {
        self.lock().stream_lag_ms()
    }
    /// Downstream is done: tickets it did not return never will (see [`Progress::release`]).
    pub fn release(&self) {
        self.lock().release();
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        // A poisoned lock means a sink thread panicked; its data is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why the source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("cannot decode the replication stream at LSN {lsn} (relation {relation}): {source}")]
    Decode {
        lsn: Lsn,
        /// The relation the message was about, when its header could still be read.
        relation: String,
        source: crate::pgoutput::DecodeError,
    },
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// Replaying the same WAL would meet the same message: definite.
    #[error(
        "a replication message of {len} bytes ({at}) exceeds postgres.max_message_bytes ({max}): one change \
         carries very large values. Raise postgres.max_message_bytes (up to 2 GiB), or keep those values \
         out of the stream: give the publication a column list without the large columns (ALTER \
         PUBLICATION <publication> SET TABLE <table> (<columns>); PostgreSQL 15 and later; not for a \
         REPLICA IDENTITY FULL table, whose column list must cover every column), or take that table \
         out of the publication"
    )]
    MessageTooLarge { at: String, len: usize, max: usize },
    #[error(
        "replication slot {slot:?} does not exist; `skusync run` creates it, or create it with \
         SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"
    )]
    SlotMissing { slot: String },
    /// The slot was there when this source first streamed and is gone at a reconnect (a
    /// PostgreSQL failover before version 17, or dropped): the daemon rebuilds in a new
    /// cycle, never inside a pipeline that still holds the old stream's state.
    #[error(
        "replication slot {slot:?} vanished while streaming (a PostgreSQL failover, or the slot \
         was dropped)"
    )]
    SlotVanished { slot: String },
    #[error(
        "replication slot {slot:?} has lost required WAL (wal_status = lost) and can no longer \
         stream; drop it (SELECT pg_drop_replication_slot('{slot}');) and resync"
    )]
    SlotLost { slot: String },
    #[error("replication slot {slot:?} is not a pgoutput slot (plugin {plugin:?})")]
    WrongPlugin { slot: String, plugin: String },
    #[error("the temporary slot was lost with its connection ({0})")]
    TemporarySlotLost(PgError),
    #[error(
        "publication \"{publication}\" does not exist; create it, e.g. \
         CREATE PUBLICATION {publication} FOR TABLE <tables>;"
    )]
    PublicationMissing { publication: String },
    /// The publication exists now but not at the slot's position (PostgreSQL before 18
    /// reads publications as of each decoded change): definite, the slot cannot pass it.
    #[error(
        "the walsender cannot stream from slot {slot:?}: {message}, although it exists now. PostgreSQL \
         before 18 reads publications as they were when each change was made, so a publication created \
         (or dropped and created again) after the slot's position does not exist for the changes before \
         it. Rebuild from a new slot: stop skusync, run SELECT pg_drop_replication_slot('{slot}'); and \
         start it again (it loads a fresh snapshot); or list in postgres.publication only publications \
         older than the slot's position"
    )]
    PublicationNewerThanSlot { slot: String, message: String },
    #[error("downstream stopped")]
    Downstream,
    #[error("loading the initial snapshot failed: {0}")]
    Bootstrap(String),
}

/// Domain OID -> base type OID, on an ordinary connection of its own.
async fn read_domains(
    conn: &PgConnectConfig,
) -> Result<std::collections::HashMap<u32, u32>, PgError> {
    meta::domain_bases(&meta::connect(conn).await?, conn).await
}

/// A walsender's "publication ... does not exist" (SQLSTATE 42704): its message, else
/// `None`.
fn publication_newer_than_slot(e: &SourceError) -> Option<String> {
    match e {
        SourceError::Pg(PgError::Server(se))
            if se.code == "42704" && se.message.starts_with("publication ") =>
        {
            Some(se.message.clone())
        }
        _ => None,
    }
}

impl SourceError {
    /// Whether a reconnect can help.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Pg(e) => e.is_transient(),
            // A failed load leaves the slot without a finished bootstrap: the daemon's
            // startup checks (not a plain reconnect) must resync.
            _ => false,
        }
    }
}

/// Best-effort name of the relation a (possibly malformed) change message refers to, for
/// error messages: Insert/Update/Delete/Relation carry the OID right after the tag (and
/// an xid inside a streamed block).
fn relation_of(data: &[u8], in_stream: bool, assembler: &Assembler) -> String {
    let at = if in_stream { 5 } else { 1 };
    match (data.first(), data.get(at..at + 4)) {
        (Some(b'I' | b'U' | b'D' | b'R'), Some(o)) => {
            let oid = u32::from_be_bytes([o[0], o[1], o[2], o[3]]);
            assembler
                .relations()
                .get(oid)
                .map(|r| r.qualified_name())
                .unwrap_or_else(|| format!("oid {oid}"))
        }
        _ => "unknown".into(),
    }
}

/// Send an assembled batch downstream before a session ends with an error.
async fn hand_over(tx: &mpsc::Sender<Vec<SourceEvent>>, batch: &mut Vec<SourceEvent>) {
    if !batch.is_empty() {
        let _ = tx.send(std::mem::take(batch)).await;
    }
}

/// The replication source.
pub struct Source {
    cfg: SourceConfig,
    progress: Arc<Mutex<Progress>>,
    /// Commit LSN of the last transaction delivered downstream in this process.
    delivered: Lsn,
    /// Inside a transaction that was delivered before a reconnect and is being skipped.
    skipping: bool,
    reconnects: u64,
    /// A session of this source has streamed: a slot missing now vanished under it.
    streamed: bool,
    /// Where the current session started: the slot's confirmed position then.
    session_start: Lsn,
    /// Domain OID -> base type OID, read at each session's start.
    domains: Arc<std::collections::HashMap<u32, u32>>,
}

enum SessionEnd {
    Shutdown,
    Error(SourceError),
}

impl Source {
    /// A source; nothing connects until [`run`](Self::run).
    pub fn new(cfg: SourceConfig) -> Source {
        Source {
            cfg,
            progress: Arc::new(Mutex::new(Progress::new(Lsn::ZERO))),
            delivered: Lsn::ZERO,
            skipping: false,
            reconnects: 0,
            streamed: false,
            session_start: Lsn::ZERO,
            domains: Default::default(),
        }
    }

    /// The handle sinks report durability to.
    pub fn progress(&self) -> ProgressHandle {
        ProgressHandle(self.progress.clone())
    }

    /// Stream until `shutdown` fires (then send the final confirmed LSN and end cleanly)
    /// or a definite error occurs. Transient errors reconnect with back-off.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<Vec<SourceEvent>>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut backoff = self.cfg.backoff_min;
        loop {
            let started = tokio::time::Instant::now();
            let end = self.session(&tx, &shutdown).await;
            match end {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Error(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    if self.cfg.slot_kind == SlotKind::Temporary {
                        if let SourceError::Pg(pg) = e {
                            return Err(SourceError::TemporarySlotLost(pg));
                        }
                        return Err(e);
                    }
                    // A session that streamed for a while earns a fresh back-off.
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = self.cfg.backoff_min;
                    }
                    let slot_busy = matches!(&e, SourceError::Pg(pg) if pg.is_slot_in_use());
                    if slot_busy {
                        tracing::info!(slot = %self.cfg.slot, "slot is streamed by another process; waiting as standby");
                        crate::telemetry::role(crate::telemetry::Role::Standby);
                    } else {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "replication interrupted; reconnecting");
                        crate::telemetry::reconnect(crate::telemetry::Server::Postgres);
                        // Not streaming until the next session starts: /readyz says so.
                        crate::telemetry::role(crate::telemetry::Role::Starting);
                    }
                    self.reconnects += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    let cap = if slot_busy {
                        Duration::from_secs(2)
                    } else {
                        self.cfg.backoff_max
                    };
                    backoff = (backoff * 2).min(cap);
                }
                SessionEnd::Error(SourceError::Downstream) if shutdown.is_cancelled() => {
                    return Ok(());
                }
                SessionEnd::Error(e) => return Err(e),
            }
        }
    }

    /// Number of reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    async fn session(
        &mut self,
        tx: &mpsc::Sender<Vec<SourceEvent>>,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let mut assembler = Assembler::new();
        let mut conn = match self.open(shutdown).await {
            Ok(Some((conn, info))) => {
                assembler.set_domains(self.domains.clone());
                self.streamed = true;
                self.session_start = info.start_lsn;
                if tx.send(vec![SourceEvent::Connected(info)]).await.is_err() {
                    return SessionEnd::Error(SourceError::Downstream);
                }
                conn
            }
            Ok(None) => return SessionEnd::Shutdown,
            Err(e) => return SessionEnd::Error(e),
        };
        self.skipping = false;
        let result = self.stream(&mut conn, &mut assembler, tx, shutdown).await;
        // A transaction being skipped was never registered or sent downstream.
        let open_txn = assembler.in_transaction() && !self.skipping;
        {
            let mut p = self.lock();
            if open_txn {
                p.abort_open();
            }
        }
        match result {
            Ok(()) => {
                // Shutdown: let downstream finish what it was handed, confirm what is
                // durable, then end the stream cleanly.
                let deadline = tokio::time::Instant::now() + self.cfg.drain_timeout;
                while self.lock().awaiting_downstream() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if self.lock().awaiting_downstream() {
                    tracing::warn!(
                        pending = self.lock().pending(),
                        "shutdown: transactions still not durable after {} s; confirming what is",
                        self.cfg.drain_timeout.as_secs()
                    );
                }
                let _ = self.send_status(&mut conn, true).await;
                if let Err(e) = conn.finish().await {
                    tracing::debug!(error = %e, "stream did not end cleanly");
                }
                if open_txn {
                    let _ = tx.try_send(vec![SourceEvent::Reset]);
                }
                SessionEnd::Shutdown
            }
            Err(e) => {
                if open_txn && tx.send(vec![SourceEvent::Reset]).await.is_err() {
                    return SessionEnd::Error(SourceError::Downstream);
                }
                SessionEnd::Error(self.explain(e).await)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connect, check the slot, start streaming. `None` when shut down meanwhile.
    async fn open(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<(ReplConnection, StreamInfo)>, SourceError> {
        let cfg = &self.cfg;
        let streamed = self.streamed;
        let connect = async {
            // Columns typed with a domain, read per session and before the replication
            // starts (a Type message for one created since reads them again). `tail`'s
            // temporary slot does without them when the role may not open a session.
            let domains = match read_domains(&cfg.conn).await {
                Ok(d) => d,
                Err(e) if cfg.slot_kind == SlotKind::Temporary => {
                    tracing::warn!(error = %e, "could not read the database's domains; columns typed with one read as text");
                    Default::default()
                }
                Err(e) => return Err(e.into()),
            };
            let mut conn = ReplConnection::connect(&cfg.conn).await?;
            let system = conn.identify_system().await?;
            let start_lsn = match cfg.slot_kind {
                SlotKind::Temporary => {
                    conn.create_slot(&cfg.slot, true, SnapshotAction::Nothing)
                        .await?
                        .consistent_point
                }
                SlotKind::Existing => {
                    let client = meta::connect(&cfg.conn).await?;
                    let state = match meta::slot_state(&client, &cfg.conn, &cfg.slot).await? {
                        Some(s) => s,
                        None if streamed => {
                            return Err(SourceError::SlotVanished {
                                slot: cfg.slot.clone(),
                            });
                        }
                        None => {
                            let Some(hook) = &cfg.bootstrap else {
                                return Err(SourceError::SlotMissing {
                                    slot: cfg.slot.clone(),
                                });
                            };
                            let slot = conn
                                .create_slot(&cfg.slot, false, SnapshotAction::Export)
                                .await?;
                            let snapshot = slot.snapshot_name.clone().ok_or_else(|| {
                                PgError::Protocol(
                                    "CREATE_REPLICATION_SLOT exported no snapshot".into(),
                                )
                            })?;
                            tracing::info!(slot = %cfg.slot, consistent_point = %slot.consistent_point, "created the replication slot; loading its snapshot");
                            // The replication connection stays idle meanwhile, which keeps
                            // the exported snapshot valid.
                            hook(snapshot, slot.consistent_point, system.clone())
                                .await
                                .map_err(SourceError::Bootstrap)?;
                            meta::slot_state(&client, &cfg.conn, &cfg.slot)
                                .await?
                                .ok_or_else(|| SourceError::SlotMissing {
                                    slot: cfg.slot.clone(),
                                })?
                        }
                    };
                    if state.plugin.as_deref() != Some("pgoutput") {
                        return Err(SourceError::WrongPlugin {
                            slot: cfg.slot.clone(),
                            plugin: state.plugin.unwrap_or_default(),
                        });
                    }
                    if state.wal_status.as_deref() == Some("lost") {
                        return Err(SourceError::SlotLost {
                            slot: cfg.slot.clone(),
                        });
                    }
                    state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO)
                }
            };
            // PostgreSQL 18's pgoutput only warns about a missing publication (and then
            // streams nothing from it); earlier versions fail START_REPLICATION. Check
            // first so every version stops with the same definite error.
            let existing: Vec<String> = conn
                .simple_query("SELECT pubname FROM pg_catalog.pg_publication")
                .await?
                .iter()
                .filter_map(|r| r.get("pubname").map(str::to_string))
                .collect();
            if let Some(missing) = cfg.publications.iter().find(|p| !existing.contains(p)) {
                return Err(SourceError::PublicationMissing {
                    publication: missing.clone(),
                });
            }
            let opts = ReplicationOptions {
                proto_version: cfg.proto_version,
                publications: cfg.publications.clone(),
                messages: false,
            };
            conn.start_replication(&cfg.slot, Lsn::ZERO, &opts).await?;
            let info = StreamInfo {
                system_id: system.system_id,
                timeline: system.timeline,
                server_version: conn.server_version().to_string(),
                start_lsn,
                backend_pid: conn.backend_pid(),
            };
            Ok::<_, SourceError>((conn, info, domains))
        };
        let (conn, info, domains) = tokio::select! {
            r = connect => r?,
            _ = shutdown.cancelled() => return Ok(None),
        };
        self.domains = Arc::new(domains);
        {
            let mut p = self.lock();
            // The tracker starts at the slot's position (first session only: later the
            // slot is at or behind what we confirmed).
            if p.pending() == 0 && p.flush_lsn() < info.start_lsn {
                *p = Progress::new(info.start_lsn);
            }
        }
        tracing::info!(
            slot = %self.cfg.slot,
            start_lsn = %info.start_lsn,
            server = %info.server_version,
            walsender_pid = info.backend_pid,
            "streaming"
        );
        Ok(Some((conn, info)))
    }

    /// A stream error as the operator should read it: a walsender's "publication ... does
    /// not exist" names a publication dropped (the catalog lacks it now) or one newer than
    /// the slot's position (the catalog has it).
    async fn explain(&self, e: SourceError) -> SourceError {
        let Some(message) = publication_newer_than_slot(&e) else {
            return e;
        };
        // `publication "name" does not exist` (the name printed as it is: matched against
        // the configured ones, which may hold a quote)
        if let Some(name) = self
            .cfg
            .publications
            .iter()
            .find(|n| message.contains(&format!("\"{n}\"")))
        {
            let exists = async {
                let client = meta::connect(&self.cfg.conn).await.ok()?;
                let row = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)",
                        &[&name],
                    )
                    .await
                    .ok()?;
                Some(row.get::<_, bool>(0))
            };
            if exists.await == Some(false) {
                return SourceError::PublicationMissing {
                    publication: name.to_string(),
                };
            }
        }
        SourceError::PublicationNewerThanSlot {
            slot: self.cfg.slot.clone(),
            message,
        }
    }

    async fn stream(
        &mut self,
        conn: &mut ReplConnection,
        assembler: &mut Assembler,
        tx: &mpsc::Sender<Vec<SourceEvent>>,
        shutdown: &CancellationToken,
    ) -> Result<(), SourceError> {
        let mut decoder = Decoder::new(self.cfg.proto_version, false);
        let mut tick = tokio::time::interval(self.cfg.status_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch: Vec<SourceEvent> = Vec::new();
        // Catching up (the latest commit reached us long after it happened) or busy
        // (thousands of commits per second): read the socket at intervals; otherwise wake
        // on every message for latency.
        let mut lagging = false;
        let mut busy = Busy::default();
        let clock = std::time::Instant::now();
        // The last message's position, for errors about the next one.
        let mut last_lsn = Lsn::ZERO;
        // When the server was last heard from (bytes arrived), checked at status ticks.
        let mut liveness = Liveness::new(conn.bytes_received());
        loop {
            // Drain what is buffered into one batch; only then wait on the socket.
            let mut reply_now = false;
            while batch.len() < self.cfg.batch_events {
                // On a connection error (e.g. the server's ErrorResponse buffered behind
                // XLogData: walsender terminated), hand downstream what was already
                // assembled: its commits count as delivered (`self.delivered`, tickets),
                // so dropping them would skip those transactions after the reconnect.
                let item = match conn.try_recv_buffered() {
                    Ok(Some(item)) => item,
                    Ok(None) => break,
                    Err(PgError::FrameTooLarge { len, max }) => {
                        hand_over(tx, &mut batch).await;
                        let at = if last_lsn == Lsn::ZERO {
                            "the first of this session, after the slot's confirmed position".into()
                        } else {
                            format!("after LSN {last_lsn}")
                        };
                        return Err(SourceError::MessageTooLarge { at, len, max });
                    }
                    Err(e) => {
                        hand_over(tx, &mut batch).await;
                        return Err(e.into());
                    }
                };
                match item {
                    StreamItem::End => {
                        hand_over(tx, &mut batch).await;
                        return Err(PgError::Protocol(
                            "server ended the replication stream".into(),
                        )
                        .into());
                    }
                    StreamItem::Message(ReplMessage::Keepalive { wal_end, reply, .. }) => {
                        self.lock().keepalive(Lsn(wal_end));
                        reply_now |= reply;
                    }
                    StreamItem::Message(ReplMessage::XLogData {
                        wal_start,
                        server_time,
                        data,
                        ..
                    }) => {
                        let lsn = Lsn(wal_start);
                        last_lsn = lsn;
                        let msg = decoder
                            .decode(&data)
                            .map_err(|source| SourceError::Decode {
                                lsn,
                                relation: relation_of(&data, decoder.in_stream, assembler),
                                source,
                            })?;
                        if let Message::Type { oid, .. } = &msg
                            && !self.domains.contains_key(oid)
                        {
                            // a type the session's map lacks (a domain created since)
                            self.domains = Arc::new(read_domains(&self.cfg.conn).await?);
                            assembler.set_domains(self.domains.clone());
                        }
                        let Some(event) = assembler.push(msg, lsn)? else {
                            continue;
                        };
                        match event {
                            Event::Begin(b) => {
                                // Delivered before a reconnect: its ticket is already with
                                // downstream, so neither register nor deliver it again.
                                self.skipping = b.commit_lsn <= self.delivered;
                                if !self.skipping {
                                    self.lock().begin();
                                    batch.push(SourceEvent::Event(Event::Begin(b)));
                                }
                            }
                            Event::Commit(c) => {
                                if !self.skipping {
                                    let lag_ms = server_time.saturating_sub(c.commit_ts) / 1000;
                                    lagging = lag_ms >= BACKLOG_LAG_MS;
                                    busy.commit(clock.elapsed().as_millis() as u64);
                                    let ticket = {
                                        let mut p = self.lock();
                                        p.set_stream_lag(lag_ms);
                                        p.commit(c.end_lsn)
                                    };
                                    self.delivered = c.commit_lsn;
                                    batch.push(SourceEvent::Commit(c, ticket));
                                }
                                self.skipping = false;
                            }
                            Event::Relation(r) => {
                                batch.push(SourceEvent::Event(Event::Relation(r)))
                            }
                            other => {
                                if !self.skipping {
                                    batch.push(SourceEvent::Event(other));
                                }
                            }
                        }
                    }
                }
            }
            // More bytes may already wait in the socket: take them before handing the batch
            // on (one poll, never a wait), so batches grow with a burst and stay small (low
            // latency) when the stream is quiet. Not while catching up: reads are paced.
            if batch.len() < self.cfg.batch_events && !reply_now && !conn.read_batching() {
                use futures::FutureExt;
                if let Some(r) = conn.fill().now_or_never() {
                    if let Err(e) = r {
                        // Assembled commits count as delivered: never drop them.
                        hand_over(tx, &mut batch).await;
                        return Err(e.into());
                    }
                    continue;
                }
            }
            // A batch cut at its size limit leaves frames in the buffer: go again.
            let full = batch.len() >= self.cfg.batch_events;
            if !batch.is_empty() {
                let out = std::mem::take(&mut batch);
                // Keep confirming while downstream is slow, so the walsender does not time
                // out; the socket is not read meanwhile (back-pressure).
                let mut out = Some(out);
                while let Some(b) = out.take() {
                    tokio::select! {
                        permit = tx.reserve() => match permit {
                            Ok(p) => p.send(b),
                            Err(_) => return Err(SourceError::Downstream),
                        },
                        _ = tick.tick() => {
                            if let Err(e) = self.send_status(conn, false).await {
                                let mut b = b;
                                hand_over(tx, &mut b).await;
                                return Err(e.into());
                            }
                            out = Some(b);
                        }
                        _ = shutdown.cancelled() => {
                            // `b`'s commits hold tickets registered in `Progress` that the
                            // shutdown drain in `session` waits for: dropping `b` left that
                            // wait running its full `drain_timeout` for tickets no one holds.
                            // Downstream reads until the channel closes, so hand `b` over
                            // (bounded); if that fails, stop waiting for tickets at all.
                            let sent = tokio::time::timeout(self.cfg.drain_timeout, tx.send(b)).await;
                            if !matches!(sent, Ok(Ok(()))) {
                                self.lock().release();
                            }
                            return Ok(());
                        }
                    }
                }
                // The socket was not read while downstream was busy: that silence is ours.
                liveness.reset(conn.bytes_received());
            }
            if reply_now {
                self.send_status(conn, false).await?;
            }
            if full {
                continue;
            }
            let was = conn.read_batching();
            let paced = lagging || busy.is_busy();
            if paced != was {
                // a no-op over Unix sockets (see `set_read_batching`)
                conn.set_read_batching(paced);
                match (was, conn.read_batching()) {
                    (false, true) if lagging => {
                        tracing::info!(slot = %self.cfg.slot, "catching up: reading the socket in batches")
                    }
                    (false, true) => {
                        tracing::debug!(slot = %self.cfg.slot, "busy: reading the socket in batches")
                    }
                    (true, false) => {
                        tracing::debug!(slot = %self.cfg.slot, "caught up: reading per message")
                    }
                    _ => {}
                }
            }
            tokio::select! {
                r = conn.fill(), if !conn.read_batching() => r?,
                // Catching up or busy: take what queued meanwhile. Nothing at all means
                // the backlog or the burst is gone: back to waking per message.
                _ = tokio::time::sleep(READ_INTERVAL), if conn.read_batching() => {
                    if !conn.fill_now()? {
                        lagging = false;
                        busy.quiet();
                    }
                }
                _ = tick.tick() => {
                    let silent = liveness.silent_for(conn.bytes_received());
                    let dead_after = self.cfg.dead_after();
                    if silent >= dead_after {
                        tracing::warn!(
                            slot = %self.cfg.slot,
                            silent_ms = silent.as_millis() as u64,
                            "nothing received from PostgreSQL; taking the replication connection for dead"
                        );
                        return Err(PgError::Io {
                            addr: self.cfg.conn.addr(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("nothing received for {} s", silent.as_secs()),
                            ),
                        }
                        .into());
                    }
                    // An idle walsender whose position is confirmed sends nothing by
                    // itself: ask for a keepalive so silence means a dead connection.
                    let probe = silent >= self.cfg.status_interval * 2;
                    self.send_status(conn, probe).await?
                }
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    async fn send_status(&self, conn: &mut ReplConnection, reply: bool) -> Result<(), PgError> {
        let (write, flush) = {
            let p = self.lock();
            (p.received_lsn(), p.flush_lsn())
        };
        let gate = (self.cfg.confirm_gate.as_ref())
            .map(|g| Lsn(g.load(std::sync::atomic::Ordering::SeqCst)));
        let flush = status_flush(flush, gate, self.cfg.confirm, self.session_start);
        let write = write.max(flush);
        if self.cfg.confirm {
            crate::telemetry::positions(write, flush);
        }
        // A write into a dead connection can block once the send buffer is full.
        let limit = self.cfg.dead_after();
        tokio::time::timeout(limit, conn.send_status(write, flush, flush, reply))
            .await
            .map_err(|_| PgError::Io {
                addr: self.cfg.conn.addr(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "a status update could not be sent within {} s",
                        limit.as_secs()
                    ),
                ),
            })?
    }
}

/// The flush position a status update reports: what is durable, at most the gate (what
/// the sink recorded), and none at all (0, which the server ignores) when that is below
/// where the session started. A sink that lost writes lowers its gate below the slot's
/// confirmed position; some PostgreSQL releases take any flush position as the new
/// confirmed one, which would hide the loss from the next start's check (Redis behind
/// the slot) and skip the commits between.
fn status_flush(durable: Lsn, gate: Option<Lsn>, confirm: bool, session_start: Lsn) -> Lsn {
    if !confirm {
        return Lsn::ZERO;
    }
    let flush = gate.map_or(durable, |g| durable.min(g));
    if flush < session_start {
        Lsn::ZERO
    } else {
        flush
    }
}

/// Tracks when the server was last heard from, by the connection's byte counter.
struct Liveness {
    seen: u64,
    heard: std::time::Instant,
}

impl Liveness {
    fn new(received: u64) -> Liveness {
        Liveness {
            seen: received,
            heard: std::time::Instant::now(),
        }
    }

    /// Start counting silence from now.
    fn reset(&mut self, received: u64) {
        *self = Liveness::new(received);
    }

    /// How long nothing has arrived, given the connection's byte counter now.
    fn silent_for(&mut self, received: u64) -> Duration {
        self.silent_at(received, std::time::Instant::now())
    }

    fn silent_at(&mut self, received: u64, now: std::time::Instant) -> Duration {
        if received != self.seen {
            self.seen = received;
            self.heard = now;
        }
        now.saturating_duration_since(self.heard)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_never_reports_a_flush_below_the_sessions_start() {
        use super::{Lsn, status_flush};
        let start = Lsn(1000);
        assert_eq!(
            status_flush(Lsn(1500), Some(Lsn(1200)), true, start),
            Lsn(1200)
        );
        assert_eq!(status_flush(Lsn(1500), None, true, start), Lsn(1500));
        // the sink lost writes: its gate fell below where the slot stood
        assert_eq!(
            status_flush(Lsn(1500), Some(Lsn(900)), true, start),
            Lsn::ZERO
        );
        assert_eq!(
            status_flush(Lsn(1000), Some(Lsn(1000)), true, start),
            Lsn(1000)
        );
        assert_eq!(
            status_flush(Lsn(1500), Some(Lsn(1200)), false, start),
            Lsn::ZERO
        );
    }

    use super::*;

    #[test]
    fn silence_counts_only_while_no_bytes_arrive() {
        let mut l = Liveness::new(0);
        let t0 = l.heard;
        let s = Duration::from_secs;
        assert_eq!(l.silent_at(0, t0 + s(5)), s(5));
        assert_eq!(l.silent_at(10, t0 + s(5)), s(0), "bytes arrived: heard now");
        assert_eq!(l.silent_at(10, t0 + s(8)), s(3));
        l.reset(10);
        assert!(l.silent_for(10) < s(1));
    }

    #[test]
    fn a_dead_connection_is_declared_after_the_larger_of_two_intervals_and_the_timeout() {
        let conn = PgConnectConfig::from_url("postgres://u@127.0.0.1/db").expect("url");
        let mut c = SourceConfig::new(conn, "s", vec!["p".into()]);
        assert_eq!(c.dead_after(), DEFAULT_SILENCE_TIMEOUT);
        c.status_interval = Duration::from_secs(10);
        assert_eq!(c.dead_after(), Duration::from_secs(20));
    }
}
