//! The pipeline: events from the source are folded into pieces, batched, and applied
//! to Redis one batch at a time (see `apply`), while the stream keeps being read; the
//! checks a (re)connection and the status tick run live here too.

use super::apply::*;
use super::*;

impl Daemon {
    pub(super) async fn pipeline_loop(
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
        let over = |p: &Pending, k: usize| p.over(max_entries, max_steps, max_txns, k);
        let full = |p: &Pending| over(p, 1);
        // Reading stops (back-pressure) only at a multiple of the launch caps: while a
        // full batch is applied, the next keeps merging instead of stalling the stream,
        // so a backlog over few SKUs becomes fewer entries (Redis' cost is per entry).
        let hold = |p: &Pending| over(p, HOLD_FACTOR);
        let mut last_event = tokio::time::Instant::now();
        // The batch in flight was launched full: the stream brings changes faster than
        // Redis takes them. The publisher then spaces its rounds out (see
        // `MqttHandle::set_backed_up`); `backed_up` is what it was last told.
        let mut launched_full = false;
        let mut backed_up = false;
        // Redis is checked for lost writes, a new writer and a requested rebuild once the
        // stream is connected (a first snapshot load runs before that).
        let mut connected = false;
        let mut meta_checked = tokio::time::Instant::now();
        let mut partitions_checked = tokio::time::Instant::now();
        // Relations the catalog said are no partition of a mapped table (this session).
        let mut not_partitions: std::collections::HashSet<u32> = Default::default();
        // The transaction being read truncated a stock table (alerts at its commit).
        let mut truncated = false;
        // The xid of the transaction being read (its relations may be new partitions).
        let mut xid: Option<u32> = None;
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
                    launched_full = false;
                    *flight = Some(launch(&applier, &mut pending, self.mqtt.clone(), fold.seal()));
                    None
                }
                _ = tick.tick() => {
                    let backlog = rx.len();
                    if let Some(c) = self
                        .on_tick(
                            &mut fold,
                            &mut applier,
                            &pending,
                            flight.is_none(),
                            progress,
                            backlog,
                            connected,
                            &mut meta_checked,
                            &mut partitions_checked,
                        )
                        .await?
                    {
                        return Ok(c);
                    }
                    None
                }
            };
            if events.is_some() {
                last_event = tokio::time::Instant::now();
            }
            let mut commits = 0u64;
            let mut evs = events.unwrap_or_default().into_iter();
            while let Some(ev) = evs.next() {
                match ev {
                    SourceEvent::Connected(info) => {
                        if let Some(c) = self
                            .on_connected(
                                &info,
                                &mut fold,
                                &mut applier,
                                &mut pending,
                                flight.is_none(),
                            )
                            .await?
                        {
                            return Ok(c);
                        }
                        connected = true;
                        partitions_checked = tokio::time::Instant::now();
                        // what the catalog said in an earlier session may have changed
                        // (a table attached as a partition since)
                        not_partitions.clear();
                    }
                    SourceEvent::Reset => fold.reset(),
                    SourceEvent::Event(Event::Relation(r)) => {
                        if let Some(c) = self
                            .on_relation(&r, xid, &mut fold, &applier, &mut not_partitions)
                            .await?
                        {
                            return Ok(c);
                        }
                    }
                    SourceEvent::Event(Event::Begin(b)) => {
                        truncated = false;
                        xid = Some(b.xid);
                        fold.begin(&b);
                    }
                    SourceEvent::Event(Event::Change(c)) => {
                        // Rows of indexed stock tables (surrogate keys, lookups) are folded
                        // with what Redis' index holds for them: what the fold does not
                        // know is read for the rest of the chunk at once.
                        let ahead = evs.as_slice().iter().filter_map(|ev| match ev {
                            SourceEvent::Event(Event::Change(c)) => Some(c),
                            _ => None,
                        });
                        match applier.fold_change(&mut fold, &c, ahead).await {
                            Ok(Ok(Some(p))) => pending.push(p),
                            Ok(Ok(None)) => {}
                            Ok(Err(e)) => return Err(schema_stop(e, Some(c.commit_lsn))),
                            Err(e) if e.is_transient() => {
                                return Ok(Cycle::Restart(format!("reading the row index: {e}")));
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    SourceEvent::Event(Event::Truncate(t)) => {
                        if let Some(c) = self
                            .on_truncate(
                                &t,
                                &mut fold,
                                &mut applier,
                                &mut pending,
                                flight,
                                progress,
                                &mut truncated,
                            )
                            .await?
                        {
                            return Ok(c);
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
                            && let Some(c) = self
                                .evaluate_after_truncate(
                                    fence,
                                    c.commit_ts,
                                    &mut fold,
                                    &mut applier,
                                    &mut pending,
                                    flight,
                                    progress,
                                )
                                .await?
                        {
                            return Ok(c);
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
                launched_full = full(&pending);
                *flight = Some(launch(
                    &applier,
                    &mut pending,
                    self.mqtt.clone(),
                    fold.seal(),
                ));
            }
            let now_backed_up = launched_full && flight.is_some();
            if now_backed_up != backed_up {
                backed_up = now_backed_up;
                self.tell_backed_up(backed_up);
            }
            // Holders whose row index writes are done: Redis answers for them again.
            fold.forget(self.ri_done);
        }
    }

    /// Mark Redis for a rebuild from a fresh snapshot (meta `bootstrap = stale`) and
    /// restart the pipeline, saying why.
    /// The publications now against what Redis was built through: a table, a partition
    /// or an action they no longer publish stops `run` as at a start (exit 2, with the
    /// SQL that fixes it: PostgreSQL 18 only warns about a dropped publication and then
    /// streams nothing from it), and another row filter rebuilds. On a connection of its
    /// own with a lock timeout: the catalog functions lock published tables, and a
    /// migration holding one must not stall the stream (nor the writer lock's session).
    /// A check that cannot run is logged and runs again later.
    async fn publications_moved(
        &mut self,
        applier: &Applier,
    ) -> Result<Option<Cycle>, DaemonError> {
        self.publications_checked = tokio::time::Instant::now();
        // (kept between checks: one connection, not one every 10 s)
        let kept = self.catalog.take().filter(|c| !c.is_closed());
        let checked = async {
            let client = match kept {
                Some(c) => c,
                None => {
                    let c = meta::connect(&self.pgc).await?;
                    c.batch_execute("SET lock_timeout = '1s'")
                        .await
                        .map_err(|e| meta::classify(e, &self.pgc))?;
                    c
                }
            };
            let gap = crate::ops::check::publication_gap(&self.cfg, &client, &self.pgc).await?;
            let now = match gap {
                Some(_) => None,
                None => Some(self.read_publications(&client).await?),
            };
            Ok::<_, DaemonError>((gap, now, client))
        };
        let checked = checked.await.map(|(gap, now, client)| {
            self.catalog = Some(client);
            (gap, now)
        });
        match checked {
            Ok((Some(gap), _)) => Err(DaemonError::Config(gap)),
            Ok((None, Some(now))) if now != self.publications => self
                .rebuild(
                    &mut applier.connection(),
                    super::PUBLICATIONS_CHANGED.into(),
                )
                .await
                .map(Some),
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the publications now; checking again later");
                Ok(None)
            }
        }
    }

    async fn rebuild(
        &self,
        con: &mut crate::sinks::redis::RedisCon,
        why: String,
    ) -> Result<Cycle, DaemonError> {
        rebuild_next(con, self.prefix(), self.settings.fence.token(), why).await
    }

    /// The stream (re)connected: Redis must have been built from this database, on this
    /// timeline, with this layout and mapping, and hold everything the slot confirmed;
    /// otherwise it is rebuilt (`Some(cycle)`). Then the fold learns the tables and
    /// partitions Redis was built with, and MQTT starts. `idle`: no batch in flight.
    async fn on_connected(
        &mut self,
        info: &crate::source::StreamInfo,
        fold: &mut Fold,
        applier: &mut Applier,
        pending: &mut Pending,
        idle: bool,
    ) -> Result<Option<Cycle>, DaemonError> {
        fold.reset();
        self.announced.clear();
        let mut con = applier.connection();
        match rsink::read_meta(&mut con, self.prefix()).await? {
            None => return Ok(Some(Cycle::Restart("Redis lost its data".into()))),
            Some(m) => {
                if let Some(sys) = &m.system_id
                    && *sys != info.system_id
                {
                    return self
                        .rebuild(
                            &mut con,
                            format!(
                                "Redis was built from another database (system id {sys}, now {})",
                                info.system_id
                            ),
                        )
                        .await
                        .map(Some);
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
                    return self.rebuild(&mut con, format!(
                            "PostgreSQL is on timeline {} but Redis was built on timeline {t} (a failover or point-in-time recovery may have dropped transactions Redis holds)",
                            info.timeline
                        )).await.map(Some);
                }
                if !m.bootstrap_done {
                    return Ok(Some(Cycle::Restart(
                        "Redis holds an unfinished snapshot load".into(),
                    )));
                }
                // A standby that won the slot skipped the startup checks. A batch of ours
                // that changed lookup state would be in flight (`idle` false); with none,
                // the mark is another writer's batch cut off between its calls.
                if m.piece_changes.is_some_and(|p| p != self.max_changes) {
                    return self
                        .rebuild(
                            &mut con,
                            super::piece_changes_why(m.piece_changes, self.max_changes),
                        )
                        .await
                        .map(Some);
                }
                if m.index_pending && idle {
                    return self
                        .rebuild(&mut con, super::INDEX_PENDING.into())
                        .await
                        .map(Some);
                }
                if m.layout.as_deref() != Some(layout::LAYOUT_VERSION) {
                    return self
                        .rebuild(&mut con, earlier_layout(m.layout.as_deref()))
                        .await
                        .map(Some);
                }
                if m.publications
                    .as_deref()
                    .is_some_and(|p| p != self.publications)
                {
                    return self
                        .rebuild(&mut con, super::PUBLICATIONS_CHANGED.into())
                        .await
                        .map(Some);
                }
                if m.fingerprint.as_deref() != Some(self.mapping.fingerprint.as_str()) {
                    return self
                        .rebuild(
                            &mut con,
                            "the table mapping changed since Redis was built".into(),
                        )
                        .await
                        .map(Some);
                }
                // (a failed read is no pass: the cycle restarts and checks again)
                let st = match &self.lease {
                    Some(lease) => {
                        meta::slot_state(&lease.client, &self.pgc, &self.cfg.postgres.slot).await?
                    }
                    None => None,
                };
                if let Some(confirmed) = st.and_then(|s| s.confirmed_flush_lsn)
                    && m.applied_lsn.unwrap_or(Lsn::ZERO) < confirmed
                {
                    return self.rebuild(&mut con, format!(
                            "Redis is behind the slot (applied {} < confirmed {confirmed}): it lost writes",
                            m.applied_lsn.unwrap_or(Lsn::ZERO)
                        )).await.map(Some);
                }
                fold.expect_tables(m.tables.clone());
                self.partitions_built = m.partitions.clone();
                let trees = self.read_partitions().await?;
                if let Some(why) = self.partition_drift(&trees) {
                    return self.rebuild(&mut con, why).await.map(Some);
                }
                fold.set_partitions(trees.parents());
                // A new fold reads its hot index state in bulk rather than
                // row by row behind the apply calls of the catch-up.
                if idle && pending.is_empty() && fold.is_cold() {
                    let tables: Vec<&str> = self
                        .mapping
                        .inventory
                        .iter()
                        .map(|t| t.table.as_str())
                        .collect();
                    let limit = crate::fold::CACHE_ENTRIES * 3 / 4;
                    match applier
                        .warm(fold, &tables, self.mapping.hops.len(), limit)
                        .await
                    {
                        Ok(n) => tracing::debug!(
                            entries = n,
                            "read the row index and lookup state ahead"
                        ),
                        Err(e) if e.is_transient() => {
                            return Ok(Some(Cycle::Restart(format!("reading the row index: {e}"))));
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
                // What Redis holds is what may be confirmed, and the floor a rollback is
                // judged by (the startup checks seed it, but a standby that won the slot
                // skipped them); never lowered here.
                self.gate
                    .fetch_max(m.applied_lsn.unwrap_or(Lsn::ZERO).0, Ordering::SeqCst);
                // Transactions Redis may hold already replay unmerged.
                let horizon = m.applied_lsn.unwrap_or(Lsn(0)).max(self.split_floor);
                pending.batch.raise_horizon(horizon);
            }
        }
        // Ready only once the checks above passed (and their Redis writes
        // are done): a Redis lost in between restarts, not "streaming".
        telemetry::role(Role::Streaming);
        self.start_mqtt(applier.connection()).await?;
        Ok(None)
    }

    /// A relation announced by the stream: a partition attached to a stock table since
    /// Redis was built, or a stock table whose identity changed, rebuilds Redis
    /// (`Some(cycle)`); a schema the mapping cannot use stops. `not_partitions`: relations
    /// the catalog said are no partition of a mapped table (this session).
    async fn on_relation(
        &mut self,
        r: &crate::txn::RelationDesc,
        xid: Option<u32>,
        fold: &mut Fold,
        applier: &Applier,
        not_partitions: &mut std::collections::HashSet<u32>,
    ) -> Result<Option<Cycle>, DaemonError> {
        // A publication altered while streaming (a row filter changed, a table moved to
        // another publication) makes the walsender announce the table again before its
        // next change: Redis must hold what the publications let through now, so a change
        // rebuilds at once (before that change is applied), as at a start. (Only a second
        // announcement in a session: the first of each table is the session's start, which
        // the cycle checked.)
        if fold.knows(r)
            && !self.announced.insert(r.oid)
            && let Some(c) = self.publications_moved(applier).await?
        {
            return Ok(Some(c));
        }
        if !fold.knows(r) && !not_partitions.contains(&r.oid) {
            // Named by a partition attached since the partitions were read?
            let mut parent = self.mapped_parent(r.oid).await?;
            if parent.is_none()
                && let Some(xid) = xid
                && self.await_xact_ended(xid).await?
            {
                // created by this very transaction, which the catalog did not show yet
                parent = self.mapped_parent(r.oid).await?;
            }
            match parent {
                Some(parent) if self.mapping.inventory.iter().any(|m| m.table == parent) => {
                    // Its rows before the attach never reached the stream.
                    return self
                        .rebuild(
                            &mut applier.connection(),
                            format!(
                                "partition {} of stock table {parent} was attached after Redis was \
                             built; rebuilding Redis from a fresh snapshot",
                                r.qualified_name()
                            ),
                        )
                        .await
                        .map(Some);
                }
                // An activity table's: its inserts count from now on.
                Some(parent) => fold.add_partition(r.oid, &parent),
                None => {
                    not_partitions.insert(r.oid);
                }
            }
        }
        match fold.relation(r) {
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
                return self
                    .rebuild(
                        &mut applier.connection(),
                        format!("{why}; rebuilding Redis from a fresh snapshot"),
                    )
                    .await
                    .map(Some);
            }
        }
        Ok(None)
    }

    /// A TRUNCATE: everything pending is applied first, then the truncated tables' rows
    /// leave every SKU and the row index. `truncated` is set when a stock table was
    /// (its transaction's commit evaluates alerts over all SKUs).
    #[allow(clippy::too_many_arguments)]
    async fn on_truncate(
        &mut self,
        t: &crate::txn::Truncate,
        fold: &mut Fold,
        applier: &mut Applier,
        pending: &mut Pending,
        flight: &mut Option<tokio::task::JoinHandle<Flight>>,
        progress: &ProgressHandle,
        truncated: &mut bool,
    ) -> Result<Option<Cycle>, DaemonError> {
        let pieces = match fold.truncate(t) {
            Ok(p) => p,
            Err(RelationProblem::Schema(e)) => {
                return Err(schema_stop(e, fold.current_commit()));
            }
            Err(RelationProblem::Changed(why)) => {
                return self
                    .rebuild(
                        &mut applier.connection(),
                        format!("{why}; rebuilding Redis from a fresh snapshot"),
                    )
                    .await
                    .map(Some);
            }
        };
        for p in pieces {
            if p.truncate.is_empty() {
                pending.push(p);
                continue;
            }
            // Everything before it first; then the truncate over all SKUs.
            if let Some(c) = self
                .drain(applier, pending, flight, progress, fold.seal())
                .await?
            {
                return Ok(Some(c));
            }
            // the stream's calls, after the drain: in the chain (see `rsink::CallChain`)
            let mut chained = applier.clone().chained();
            // a page of SKUs at a time: memory follows the page, not every SKU in Redis
            let mut at = Some(crate::sinks::redis::ScanAt::default());
            while let Some(pos) = at {
                let (next, skus) = applier.sku_page(pos).await?;
                at = next;
                for chunk in skus.chunks(500) {
                    match chained.truncate(&p, chunk).await {
                        Ok(_) => {}
                        Err(RedisSinkError::NoMeta) => {
                            return Ok(Some(Cycle::Restart("Redis lost its data".into())));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                if let Some(m) = &self.mqtt {
                    m.changed(skus);
                }
            }
            // The rows are gone, and so is where they were held.
            for table in &p.truncate {
                chained
                    .truncate_row_index(table, (p.commit_lsn, p.piece))
                    .await?;
            }
            *truncated = true;
        }
        Ok(None)
    }

    /// The status tick: heartbeat and backlog gauges; the writer lock, Redis' writer view
    /// and the partitions checked at their intervals; keepalive-only progress recorded
    /// in Redis before it may be confirmed. `idle`: no batch in flight.
    #[allow(clippy::too_many_arguments)]
    async fn on_tick(
        &mut self,
        fold: &mut Fold,
        applier: &mut Applier,
        pending: &Pending,
        idle: bool,
        progress: &ProgressHandle,
        backlog: usize,
        connected: bool,
        meta_checked: &mut tokio::time::Instant,
        partitions_checked: &mut tokio::time::Instant,
    ) -> Result<Option<Cycle>, DaemonError> {
        telemetry::heartbeat();
        telemetry::backlog(backlog, pending.batch.len());
        if self.lease.as_ref().is_some_and(|l| !l.alive()) {
            self.lease = None;
            return Ok(Some(Cycle::Restart(
                "lost the writer lock session (PostgreSQL unreachable?): stopping writes".into(),
            )));
        }
        if connected && meta_checked.elapsed() >= META_CHECK {
            *meta_checked = tokio::time::Instant::now();
            if let Ok(v) = rsink::writer_view(&mut applier.connection(), self.prefix()).await
                && let Some(c) = self.check_writer_view(&v)
            {
                return Ok(Some(c));
            }
            // a cluster slot that lost its last writes and is not written again
            if let Ok(Some(e)) = applier.clone().check_slots().await {
                return Ok(Some(match e {
                    RedisSinkError::NoMeta => Cycle::Restart(
                        "a Redis Cluster node lost its data (a slot's meta copy is missing)".into(),
                    ),
                    e => self.writer_lost(e),
                }));
            }
        }
        if connected
            && self.publications_checked.elapsed() >= PUBLICATION_CHECK
            && let Some(c) = self.publications_moved(applier).await?
        {
            return Ok(Some(c));
        }
        if connected && partitions_checked.elapsed() >= PARTITION_CHECK {
            *partitions_checked = tokio::time::Instant::now();
            match self.read_partitions().await {
                Ok(trees) => {
                    if let Some(why) = self.partition_drift(&trees) {
                        return self.rebuild(&mut applier.connection(), why).await.map(Some);
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
        // Not before the session's checks ran (`on_connected`): a Redis that lost writes
        // would be given the slot's position first, and the loss hidden.
        if connected && pending.is_empty() && idle && flush.0 > self.gate.load(Ordering::SeqCst) {
            match applier.apply(&[], Some(flush), false).await {
                Ok(_) => {
                    telemetry::redis_ok();
                    self.gate.fetch_max(flush.0, Ordering::SeqCst)
                }
                Err(RedisSinkError::NoMeta) => {
                    return Ok(Some(Cycle::Restart("Redis lost its data".into())));
                }
                Err(e @ (RedisSinkError::Fenced(_) | RedisSinkError::Rollback(_))) => {
                    return Ok(Some(self.writer_lost(e)));
                }
                // e.g. READONLY: warning on every tick would hide it
                Err(e) if !e.is_transient() => return Err(e.into()),
                Err(e) => {
                    telemetry::redis_failed();
                    tracing::warn!(error = %e, "cannot record progress in Redis");
                    0
                }
            };
        }
        Ok(None)
    }

    /// Alerts once per transaction that truncated a stock table: after its final piece
    /// (`fence`), every SKU at its final level (a refilled table raises nothing).
    #[allow(clippy::too_many_arguments)]
    async fn evaluate_after_truncate(
        &mut self,
        fence: (Lsn, u32),
        commit_ts: i64,
        fold: &mut Fold,
        applier: &mut Applier,
        pending: &mut Pending,
        flight: &mut Option<tokio::task::JoinHandle<Flight>>,
        progress: &ProgressHandle,
    ) -> Result<Option<Cycle>, DaemonError> {
        // Alerts once per transaction: after its final piece, every SKU
        // at its final level (a refilled table raises nothing). Before
        // this transaction's ticket is queued, so it is not confirmed
        // until the evaluation is applied.
        if let Some(c) = self
            .drain(applier, pending, flight, progress, fold.seal())
            .await?
        {
            return Ok(Some(c));
        }
        let ms = crate::txn::value::pg_timestamp_to_unix_micros(commit_ts).div_euclid(1000);
        // after the drain: in the chain (see `rsink::CallChain`); a page at a time
        let mut chained = applier.clone().chained();
        let mut at = Some(crate::sinks::redis::ScanAt::default());
        while let Some(pos) = at {
            let (next, skus) = applier.sku_page(pos).await?;
            at = next;
            for chunk in skus.chunks(500) {
                match chained.evaluate(fence, ms, chunk).await {
                    Ok(_) => {}
                    Err(RedisSinkError::NoMeta) => {
                        return Ok(Some(Cycle::Restart("Redis lost its data".into())));
                    }
                    Err(e @ (RedisSinkError::Fenced(_) | RedisSinkError::Rollback(_))) => {
                        return Ok(Some(self.writer_lost(e)));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some(m) = &self.mqtt {
                m.changed(skus);
            }
        }
        Ok(None)
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
                f.tickets.durable(progress);
                telemetry::redis_applied(
                    applied.applied,
                    applied.fenced,
                    applied.thin,
                    applied.alerts,
                    f.commit_ms.runs(),
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
                // unmerged. Nothing of the refused call was written (entries of the batch
                // written before it, thin ones, are fenced and skipped). The restart is
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

    /// Wait until transaction `xid`, which the stream is delivering, has ended for new
    /// snapshots (see [`partitions::xact_ended`]); true when it had not at first. Bounded:
    /// past [`XACT_VISIBLE_WAIT`] the cycle restarts and the transaction replays, rather
    /// than its relations being taken for unmapped tables.
    async fn await_xact_ended(&self, xid: u32) -> Result<bool, DaemonError> {
        let client = self.catalog().await?;
        let start = tokio::time::Instant::now();
        let mut waited = false;
        while !partitions::xact_ended(&client, &self.pgc, xid).await? {
            if start.elapsed() >= XACT_VISIBLE_WAIT {
                return Err(DaemonError::Transient(format!(
                    "transaction {xid} was streamed {XACT_VISIBLE_WAIT:?} ago but new snapshots do not \
                     see it yet (a synchronous standby holding its commit?), so the catalog cannot say \
                     whether a relation it uses is a new partition of a mapped table; restarting to \
                     read it again"
                )));
            }
            waited = true;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(waited)
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
        if let RedisSinkError::Rollback(a) = &e {
            // The floor is what Redis holds now: nothing past it may be confirmed to the
            // slot (so the lost stretch can replay), and the next cycle does not count
            // this rollback a second time.
            self.gate
                .store(a.parse::<u64>().unwrap_or(0), Ordering::SeqCst);
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
