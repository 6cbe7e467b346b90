//! The broker's epoch and sweeps: after a connect, whether the broker holds what Redis
//! says it acknowledged (its retained epoch token), the sweep that clears retained states
//! Redis does not hold, and the scan that republishes what the broker lacks.

use super::*;

pub(super) const SET_EPOCH: &str = r"
-- KEYS[1] meta hash; ARGV[1] token, ARGV[2] sequence.
-- only into an existing meta hash: its absence means Redis is not bootstrapped
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'mqtt_epoch', ARGV[1], 'mqtt_epoch_seq', ARGV[2])
  return 1
end
return 0
";

#[derive(Debug)]
pub(super) enum EpochPhase {
    /// Subscribed to the epoch topic, waiting for its retained value.
    Waiting {
        until: Instant,
        seen: Option<String>,
    },
    /// Compared; publishing.
    Decided,
}

/// A sweep of the broker's retained states: after a connect and after a rebuild, the
/// retained states of SKUs that Redis does not hold (their clear was lost with Redis'
/// data, or published to a broker that lost it) are cleared, so that the retained
/// messages equal Redis, not only where Redis has a hash.
#[derive(Debug)]
pub(super) struct Sweep {
    /// Retained states arrive right after SUBACK; the sweep ends once they pause.
    pub(super) quiet_until: Instant,
    /// ...or at the latest here.
    pub(super) deadline: Instant,
    /// Retained SKUs not checked yet (checked a chunk at a time: memory follows the
    /// chunk, not every retained state the broker holds).
    pub(super) skus: Vec<String>,
    /// Retained states seen, and cleared, so far.
    pub(super) seen: usize,
    pub(super) cleared: usize,
}

/// Retained SKUs checked against Redis at once.
pub(super) const SWEEP_CHUNK: usize = 500;
/// The most a sweep holds while it may not check (Redis being rebuilt): past it, the sweep
/// stops and starts again once Redis is readable.
pub(super) const SWEEP_HOLD_MAX: usize = 10_000;

/// How long a sweep waits for the next retained state before it decides.
pub(super) const SWEEP_QUIET: Duration = Duration::from_millis(750);
/// The longest a sweep collects.
pub(super) const SWEEP_MAX: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(super) struct Scan {
    /// Where the SCAN goes on (on a cluster: the primaries as at its first page).
    pub(super) at: crate::sinks::redis::ScanAt,
    pub(super) force: bool,
    /// Also republish SKUs whose `pub_seq` is at least this (the broker's epoch sequence).
    pub(super) from_seq: Option<u64>,
}

impl Task {
    pub(super) fn maybe_publish_epoch(&mut self, client: &AsyncClient) {
        let done = self.scan.is_none() && self.outstanding.as_ref().is_some_and(|o| o.is_empty());
        if !done || self.draining {
            return;
        }
        self.outstanding = None;
        if !std::mem::take(&mut self.outstanding_full) {
            // a partial republish settled: the epoch may advance under the same token
            return;
        }
        let token = format!("{:016x}", rand::random::<u64>());
        self.send_epoch(client, token, true);
    }

    /// Publishes the epoch `<token>:<seq + 1>`; states sent from now on are marked with
    /// the new sequence.
    pub(super) fn send_epoch(&mut self, client: &AsyncClient, token: String, fresh: bool) {
        let seq = self.epoch_seq + 1;
        if client
            .try_publish_with_properties(
                crate::sinks::mqtt::epoch_topic(self.prefix()),
                QoS::AtLeastOnce,
                true,
                crate::sinks::mqtt::epoch_payload(&token, seq),
                payload::text_properties(),
            )
            .is_ok()
        {
            self.epoch_seq = seq;
            self.epoch_dirty = false;
            self.epoch_in_flight = true;
            self.next_epoch = Instant::now() + EPOCH_INTERVAL;
            self.epoch_token = Some(token.clone());
            self.tracker.queued(Msg::Epoch { token, seq, fresh });
        }
    }

    /// The periodic epoch: when states were sent since the last one, the broker holds our
    /// token, no full republish runs and the interval passed (`force`: at shutdown).
    pub(super) fn maybe_advance_epoch(&mut self, client: &AsyncClient, force: bool) {
        if !self.epoch_dirty
            || self.epoch_in_flight
            || self.outstanding.is_some()
            || !matches!(self.epoch, EpochPhase::Decided)
            || (!force && Instant::now() < self.next_epoch)
        {
            return;
        }
        if let Some(token) = self.epoch_token.clone() {
            self.send_epoch(client, token, false);
        }
    }

    /// Subscribe to every retained SKU state, to clear those Redis does not hold.
    pub(super) fn start_sweep(&mut self, client: &AsyncClient) {
        let filter = format!("{}/sku/+", self.prefix());
        // QoS 0: the broker sends the retained states once, with no acknowledgements to
        // keep; our own states come back too, but without the retain flag. A full request
        // channel: tried again at the next turn.
        self.restart_sweep = client.try_subscribe(filter, QoS::AtMostOnce).is_err();
        if !self.restart_sweep {
            let now = Instant::now();
            self.sweep = Some(Sweep {
                quiet_until: now + SWEEP_QUIET,
                deadline: now + SWEEP_MAX,
                skus: Vec::new(),
                seen: 0,
                cleared: 0,
            });
        }
    }

    /// A retained state arrived during a sweep: check a full chunk now, if Redis may be
    /// read (not while it is rebuilt: a loading Redis lacks hashes it will have); past
    /// [`SWEEP_HOLD_MAX`] unchecked, stop and sweep again later.
    pub(super) async fn sweep_retained(&mut self, client: &AsyncClient, sku: String) {
        if self.draining {
            // shutting down: no new clears
            return;
        }
        let Some(sweep) = self.sweep.as_mut() else {
            return;
        };
        sweep.skus.push(sku);
        sweep.seen += 1;
        sweep.quiet_until = (Instant::now() + SWEEP_QUIET).min(sweep.deadline);
        let held = sweep.skus.len();
        if held < SWEEP_CHUNK {
            return;
        }
        if self.may_read_redis() {
            if !self.sweep_chunk(client).await {
                self.stop_sweep(client);
            }
        } else if held >= SWEEP_HOLD_MAX {
            debug!(
                held,
                "sweep stopped while Redis is rebuilt; it runs again afterwards"
            );
            self.stop_sweep(client);
        }
    }

    /// Whether the sweep may read Redis now.
    fn may_read_redis(&self) -> bool {
        !self.shared.paused.load(std::sync::atomic::Ordering::SeqCst)
            && self.redis_pause_until.is_none_or(|p| p <= Instant::now())
    }

    /// End the sweep unfinished; it starts again when the publisher next may read Redis
    /// (a subscription left by a full request channel is harmless: only retained states
    /// are swept, and a new subscribe sends them again).
    fn stop_sweep(&mut self, client: &AsyncClient) {
        self.sweep = None;
        let _ = client.try_unsubscribe(format!("{}/sku/+", self.prefix()));
        self.restart_sweep = true;
    }

    /// Check the sweep's unchecked SKUs against Redis and clear the retained states of
    /// those without a hash. `false` when the sweep must stop (Redis failed, or the
    /// request channel is full).
    async fn sweep_chunk(&mut self, client: &AsyncClient) -> bool {
        let Some(sweep) = self.sweep.as_mut() else {
            return true;
        };
        let skus = std::mem::take(&mut sweep.skus);
        let mut cleared = 0usize;
        let mut ok = true;
        'chunks: for chunk in skus.chunks(SWEEP_CHUNK) {
            let mut pipe = redis::pipe();
            for sku in chunk {
                pipe.cmd("EXISTS")
                    .arg(layout::sku_key(&self.cfg.redis_prefix, sku));
            }
            let exists: Vec<bool> = match pipe.query_async(&mut self.redis).await {
                Ok(v) => v,
                Err(e) => {
                    // swept again once Redis answers (not at once: each try makes the
                    // broker send every retained state)
                    warn!(error = %e, "checking retained states against Redis failed");
                    self.redis_pause_until = Some(Instant::now() + REDIS_PAUSE * 4);
                    ok = false;
                    break;
                }
            };
            for (sku, there) in chunk.iter().zip(exists) {
                if !there {
                    // Sent before any later state of the SKU (one connection, in order).
                    let topic = crate::sinks::mqtt::sku_topic(self.prefix(), sku);
                    if client
                        .try_publish_with_properties(
                            topic,
                            QoS::AtLeastOnce,
                            true,
                            Vec::<u8>::new(),
                            payload::properties(self.cfg.mqtt.format, ("rev", ""), None),
                        )
                        .is_ok()
                    {
                        self.tracker.queued(Msg::Clear { sku: sku.clone() });
                        cleared += 1;
                    } else {
                        // The request channel is full (more clears than it holds): sweep
                        // again once these are acknowledged, for the rest.
                        debug!(cleared, "request channel full; sweeping again for the rest");
                        self.restart_sweep = true;
                        ok = false;
                        break 'chunks;
                    }
                }
            }
        }
        if let Some(sweep) = self.sweep.as_mut() {
            sweep.cleared += cleared;
        }
        ok
    }

    /// The retained states have arrived: clear those of SKUs without a Redis hash. Runs
    /// only while Redis is not being rebuilt (a loading Redis lacks hashes it will have).
    pub(super) async fn finish_sweep(&mut self, client: &AsyncClient) {
        if !self.sweep_chunk(client).await {
            self.stop_sweep(client);
            return;
        }
        let Some(sweep) = self.sweep.take() else {
            return;
        };
        let _ = client.try_unsubscribe(format!("{}/sku/+", self.prefix()));
        if sweep.cleared > 0 {
            info!(
                cleared = sweep.cleared,
                retained = sweep.seen,
                "cleared retained states of SKUs Redis does not hold"
            );
        } else {
            debug!(retained = sweep.seen, "retained states swept");
        }
    }

    /// Compares the broker's retained epoch with Redis and starts the scan.
    pub(super) async fn decide_epoch(&mut self, client: &AsyncClient, broker: Option<String>) {
        let stored: Result<(Option<String>, Option<String>), _> = redis::cmd("HMGET")
            .arg(layout::meta_key(&self.cfg.redis_prefix))
            .arg("mqtt_epoch")
            .arg("mqtt_epoch_seq")
            .query_async(&mut self.redis)
            .await;
        let (stored, stored_seq) = match stored {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "reading the mqtt epoch failed; retrying");
                self.epoch = EpochPhase::Waiting {
                    until: Instant::now() + REDIS_PAUSE,
                    seen: broker,
                };
                return;
            }
        };
        self.epoch = EpochPhase::Decided;
        let _ = client.try_unsubscribe(crate::sinks::mqtt::epoch_topic(self.prefix()));
        // An unreadable stored sequence counts as 0: a matching broker then gets every SKU
        // marked with a sequence again (once; the next epoch is stored).
        let stored_seq: u64 = stored_seq.and_then(|s| s.parse().ok()).unwrap_or(0);
        self.epoch_seq = self.epoch_seq.max(stored_seq);
        let stored_token = stored
            .as_deref()
            .map(|s| crate::sinks::mqtt::parse_epoch(s).0);
        let broker_epoch = broker.as_deref().map(crate::sinks::mqtt::parse_epoch);
        let matched = match (broker_epoch, stored_token) {
            (Some((b, _)), Some(s)) => b == s && !b.is_empty(),
            _ => false,
        };
        if let (true, Some((token, broker_seq))) = (matched, broker_epoch) {
            if broker_seq < stored_seq {
                warn!(
                    broker_seq,
                    stored_seq,
                    "broker holds an older epoch (restored from an older persistence file): republishing SKUs acknowledged since"
                );
                self.shared
                    .stats
                    .epoch_rollbacks
                    .fetch_add(1, Ordering::Relaxed);
                crate::telemetry::mqtt_epoch_rollback();
            } else {
                debug!(
                    broker_seq,
                    "mqtt epoch matches: publishing unpublished SKUs"
                );
            }
            self.epoch_seq = self.epoch_seq.max(broker_seq);
            self.epoch_token = Some(token.to_string());
            // SKUs acknowledged in epoch `broker_seq` or later may be missing on the broker.
            // Until each is acknowledged again the epoch must not advance: a later
            // sequence on the broker would hide them from the next connect's scan (a
            // crash or a lost link mid-scan). From the stored sequence when that is lower:
            // the broker took an epoch Redis never recorded (a kill before the store),
            // and states since were marked from the stored one, maybe on another broker.
            self.scan = Some(Scan {
                at: Default::default(),
                force: false,
                from_seq: Some(broker_seq.min(stored_seq)),
            });
            self.outstanding = Some(HashSet::new());
            self.outstanding_full = false;
        } else {
            info!("broker lacks our retained messages (epoch differs): republishing all SKUs");
            self.shared
                .stats
                .epoch_republishes
                .fetch_add(1, Ordering::Relaxed);
            self.scan = Some(Scan {
                at: Default::default(),
                force: true,
                from_seq: None,
            });
            self.outstanding = Some(HashSet::new());
            self.outstanding_full = true;
        }
    }

    pub(super) async fn scan_page(&mut self, client: &AsyncClient) {
        let Some(scan) = &self.scan else { return };
        let (at, force, from_seq) = (scan.at.clone(), scan.force, scan.from_seq);
        let pattern = layout::sku_key_pattern(&self.cfg.redis_prefix);
        let r = self.redis.scan_page(at, &pattern, SCAN_COUNT, None).await;
        let (next, keys) = match r {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "scanning SKU hashes failed; retrying");
                self.redis_pause_until = Some(Instant::now() + REDIS_PAUSE);
                if self.redis.is_cluster()
                    && let Some(s) = &mut self.scan
                {
                    // a primary of its list may be gone (a failover): start over with
                    // the primaries as they are then (the scan only asks for publishes)
                    s.at = Default::default();
                }
                return;
            }
        };
        let skus: Vec<String> = keys
            .iter()
            .filter_map(|k| layout::sku_of_key(&self.cfg.redis_prefix, k))
            .collect();
        if force {
            for sku in &skus {
                self.sched.request(sku, Want::Force);
                if let Some(o) = &mut self.outstanding {
                    o.insert(sku.clone());
                }
            }
        } else if !skus.is_empty() {
            let mut pipe = redis::pipe();
            for sku in &skus {
                pipe.cmd("HMGET")
                    .arg(layout::sku_key(&self.cfg.redis_prefix, sku))
                    .arg("lsn")
                    .arg("piece")
                    .arg("pub_lsn")
                    .arg("pub_piece")
                    .arg("alerts")
                    .arg("pub_seq");
            }
            let r: Result<Vec<Marks>, _> = pipe.query_async(&mut self.redis).await;
            match r {
                Ok(rows) => {
                    for (sku, (lsn, piece, pub_lsn, pub_piece, alerts, pub_seq)) in
                        skus.iter().zip(rows)
                    {
                        let exists = lsn.is_some() || pub_lsn.is_some() || alerts.is_some();
                        // Acknowledged at or after the broker's epoch: its copy may be
                        // older (absent pub_seq: marked before sequences, kept as is).
                        let maybe_lost = from_seq.is_some_and(|b| {
                            pub_seq
                                .as_deref()
                                .and_then(|s| s.parse::<u64>().ok())
                                .is_some_and(|s| s >= b)
                        });
                        if exists && maybe_lost {
                            self.sched.request(sku, Want::Force);
                            if let Some(o) = &mut self.outstanding {
                                o.insert(sku.clone());
                            }
                        } else if exists
                            && payload::unpublished(
                                lsn.as_deref(),
                                piece.as_deref(),
                                pub_lsn.as_deref(),
                                pub_piece.as_deref(),
                                alerts.as_deref(),
                            )
                        {
                            self.sched.request(sku, Want::Change);
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "reading publish marks failed; retrying");
                    self.redis_pause_until = Some(Instant::now() + REDIS_PAUSE);
                    return;
                }
            }
        }
        let Some(next) = next else {
            self.scan = None;
            if std::mem::take(&mut self.rescan) {
                self.scan = Some(Scan {
                    at: Default::default(),
                    force: false,
                    from_seq: None,
                });
            }
            self.maybe_publish_epoch(client);
            return;
        };
        if let Some(s) = &mut self.scan {
            s.at = next;
        }
    }
}
