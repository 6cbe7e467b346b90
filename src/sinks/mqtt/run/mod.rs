//! The publisher task: the only part that does I/O (the broker link, Redis).
//!
//! One task queues every request itself, so the order of `Outgoing::Publish` events
//! matches the order of the tracker, and nothing is queued between a connection error
//! and the next CONNACK (rumqttc drops what it held then).
//!
//! The broker connection is a [`Link`] (its own task: rumqttc's protocol state machine
//! with I/O that writes every queued request at once), which hands the events over in
//! order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::sinks::redis::RedisCon;
use crate::sinks::redis::reader::HashReader;
use crate::sinks::redis::resp::FlatHash;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::link::Link;
use super::payload::{self, Kind, Spec};
use super::sched::{Aging, Scheduler, Want};
use super::tracker::AckTracker;
use super::{MqttError, PublisherConfig, Shared};
use crate::sinks::layout;

mod epoch;
mod marks;

use epoch::{EpochPhase, SET_EPOCH, SWEEP_QUIET, Scan, Sweep};
pub use marks::MARK_PUBLISHED;

/// Messages queued or in flight at most (the request channel is larger, so queueing
/// never blocks the publisher, which must also take the link's events).
const MAX_IN_FLIGHT: usize = 512;
/// Most MQTT events handled before the loop's Redis work.
const EVENT_BURST: usize = 512;
/// SKU hashes read per pipelined round trip.
pub const READ_GROUP: usize = 256;
/// Groups of at most this many SKUs are built on the publisher's own task, larger ones
/// on a blocking thread (see `read_group`).
const BUILD_INLINE: usize = 32;
const CHANNEL_CAP: usize = MAX_IN_FLIGHT + MAX_ALERTS_PER_ROUND + 16;
/// Alerts of one SKU sent per publish round; more go in the next round.
const MAX_ALERTS_PER_ROUND: usize = 32;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The most messages in flight when a stopped sweep starts again.
const SWEEP_RESTART_IN_FLIGHT: usize = 64;

/// How long to wait for the retained epoch after subscribing.
const EPOCH_WAIT: Duration = Duration::from_secs(1);
/// How often the epoch sequence advances while states are acknowledged. A broker restored
/// from an older persistence file gets the SKUs acknowledged since the epoch it holds
/// republished, so this bounds the republish on a reconnect, not correctness.
pub const EPOCH_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on waiting for in-flight acknowledgements at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a Redis error before trying again.
const REDIS_PAUSE: Duration = Duration::from_millis(500);
/// Keys per SCAN page; SKUs wanted at most before scanning further.
const SCAN_COUNT: usize = 500;
const SCAN_MAX_PENDING: usize = 10_000;
/// MQTT fixed header, topic length and properties (content type, format indicator,
/// expiry, the `rev`/`seq` user property), generously.
const PACKET_OVERHEAD: usize = 160;
/// How long acknowledgements may wait to be recorded in Redis for a read round to carry
/// them (one round trip instead of two); past this they go on their own.
const MARK_LINGER: Duration = Duration::from_millis(10);

const REMOVE_ALERT: &str = r"
-- KEYS[1] SKU hash; ARGV[1] alert lsn as stored; ARGV[2] alert type
local raw = redis.call('HGET', KEYS[1], 'alerts')
if not raw then return 0 end
local ok, arr = pcall(cjson.decode, raw)
if not ok or type(arr) ~= 'table' then return 0 end
local out, removed = {}, false
for _, a in ipairs(arr) do
  local l = a['lsn']
  if type(l) == 'number' then l = string.format('%.0f', l) else l = tostring(l) end
  if not removed and l == ARGV[1] and a['type'] == ARGV[2] then
    removed = true
  else
    out[#out + 1] = a
  end
end
if not removed then return 0 end
if #out == 0 then
  redis.call('HDEL', KEYS[1], 'alerts')
else
  redis.call('HSET', KEYS[1], 'alerts', cjson.encode(out))
end
return 1
";

/// `lsn`, `piece`, `pub_lsn`, `pub_piece`, `alerts`, `pub_seq` of a SKU hash.
type Marks = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// What a queued publish was.
#[derive(Debug)]
enum Msg {
    State {
        sku: String,
        lsn: u64,
        /// The hash's `piece` with `lsn`: together they identify the state.
        piece: i64,
        state: String,
        /// Commit time (hash field `ts`, unix ms) of a change message; `None` for aging.
        ts: Option<i64>,
        /// The epoch sequence when it was sent (its mark's `pub_seq`).
        seq: u64,
    },
    Alert {
        sku: String,
        lsn_raw: String,
        kind: String,
    },
    Status,
    /// A sweep's empty retained message for a SKU Redis does not hold.
    Clear {
        sku: String,
    },
    Epoch {
        token: String,
        seq: u64,
        /// The first epoch of a new token (after a full republish).
        fresh: bool,
    },
}

impl Msg {
    /// What it is, for logs and metrics.
    fn kind(&self) -> &'static str {
        match self {
            Msg::State { .. } => "state",
            Msg::Alert { .. } => "alert",
            Msg::Status => "status",
            Msg::Clear { .. } => "clear",
            Msg::Epoch { .. } => "epoch",
        }
    }
}

pub(super) struct Task {
    cfg: PublisherConfig,
    spec: Arc<Spec>,
    /// One per broker of `mqtt.url`, in order (failover).
    options: Vec<MqttOptions>,
    /// The broker connected to or tried last.
    broker: usize,
    redis: RedisCon,
    /// The hash reads' own connections (`None`: through `redis`; see `HashReader`).
    reader: Option<Arc<HashReader>>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    start: Instant,
    sched: Scheduler,
    aging: Aging,
    tracker: AckTracker<Msg>,
    connected: bool,
    ever_connected: bool,
    /// Connect attempts failed in a row.
    failures: u32,
    draining: bool,
    epoch: EpochPhase,
    sweep: Option<Sweep>,
    /// A rebuild finished: sweep again once Redis is readable.
    restart_sweep: bool,
    scan: Option<Scan>,
    /// Acknowledged messages not yet recorded in Redis (see `flush_marks`).
    marks: Vec<Msg>,
    /// When the oldest of `marks` was acknowledged.
    marks_since: Option<Instant>,
    /// When `last_publish_ms` was last written to the meta hash.
    last_publish_stamp: Option<Instant>,
    /// Another unpublished-scan is needed after the running one.
    rescan: bool,
    /// Scheduler size above which idle SKUs are pruned next.
    prune_at: usize,
    /// SKUs of a republish not yet acknowledged: every SKU after an epoch mismatch, or
    /// those acknowledged since the broker's epoch sequence when the token matched. The
    /// epoch does not advance meanwhile.
    outstanding: Option<HashSet<String>>,
    /// The republish under way is a full one: settled, it publishes a new epoch token
    /// (a partial one lets the epoch advance under the same token).
    outstanding_full: bool,
    redis_pause_until: Option<Instant>,
    /// Maximum packet size the broker announced in CONNACK.
    broker_max: Option<usize>,
    /// SKUs whose messages did not fit that size when last built (logged once each).
    oversized: HashSet<String>,
    next_aging: Instant,
    set_epoch: redis::Script,
    /// [`MARK_PUBLISHED`]'s SHA1, for EVALSHA: the script's 1.4 kB would otherwise go to
    /// Redis, and be hashed there, with every mark call (one per slot on a cluster).
    mark_sha: String,
    /// Whether the mark calls may go by SHA: false at first and after a node answered
    /// NOSCRIPT (a restart, a promoted replica), when the next round sends the script
    /// itself, which caches it on the nodes it reaches.
    mark_by_sha: bool,
    /// The epoch token the broker holds (matched or sent on this connection).
    epoch_token: Option<String>,
    /// Sequence of the epoch last sent (or found); marks record it as `pub_seq`. Never
    /// decreases, so marks only err on the side of republishing.
    epoch_seq: u64,
    /// States were sent since the last epoch.
    epoch_dirty: bool,
    epoch_in_flight: bool,
    /// Earliest time of the next periodic epoch.
    next_epoch: Instant,
    /// When the last round of reads started, on the scheduler's clock ([`Self::mono_ms`]);
    /// rounds are spaced out while the apply is backed up.
    last_round_ms: Option<u64>,
}

impl Task {
    pub(super) fn new(
        cfg: PublisherConfig,
        options: Vec<MqttOptions>,
        redis: RedisCon,
        reader: Option<Arc<HashReader>>,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
    ) -> Task {
        let spec = Arc::new(Spec {
            counters: cfg.counters.clone(),
            sell_counter: cfg.sell_counter.clone(),
            scale: cfg.scale,
            low_stock: cfg.low_stock,
        });
        let sched = Scheduler::new(cfg.mqtt.min_interval_ms);
        Task {
            cfg,
            spec,
            options,
            broker: 0,
            redis,
            reader,
            shared,
            shutdown,
            start: Instant::now(),
            sched,
            aging: Aging::default(),
            tracker: AckTracker::default(),
            connected: false,
            ever_connected: false,
            failures: 0,
            draining: false,
            epoch: EpochPhase::Decided,
            sweep: None,
            restart_sweep: false,
            scan: None,
            marks: Vec::new(),
            marks_since: None,
            last_publish_stamp: None,
            rescan: false,
            prune_at: 4096,
            outstanding: None,
            outstanding_full: false,
            redis_pause_until: None,
            broker_max: None,
            oversized: HashSet::new(),
            next_aging: Instant::now(),
            set_epoch: redis::Script::new(SET_EPOCH),
            mark_sha: redis::Script::new(MARK_PUBLISHED).get_hash().to_string(),
            mark_by_sha: false,
            epoch_token: None,
            epoch_seq: 0,
            epoch_dirty: false,
            epoch_in_flight: false,
            next_epoch: Instant::now(),
            last_round_ms: None,
        }
    }

    fn mono_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn prefix(&self) -> &str {
        &self.cfg.mqtt.topic_prefix
    }

    pub(super) async fn run(mut self) -> Result<(), MqttError> {
        let (client, mut el) = Link::start(self.options[0].clone(), CHANNEL_CAP);
        let mut backoff = BACKOFF_MIN;
        info!(client_id = %self.cfg.mqtt.client_id, "mqtt publisher starting");
        loop {
            self.ack_pause();
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    return self.drain(&client, &mut el).await;
                }
                ev = el.next() => match ev {
                    Ok(ev) => {
                        if matches!(ev, Event::Incoming(Packet::ConnAck(_))) {
                            backoff = BACKOFF_MIN;
                        }
                        self.on_event(&client, ev).await;
                        // Take every event that is already there (PUBACKs arrive in
                        // bursts) before the Redis work below: one round trip per burst,
                        // not per acknowledgement.
                        let mut failed = None;
                        for _ in 0..EVENT_BURST {
                            match el.try_next() {
                                Some(Ok(ev)) => self.on_event(&client, ev).await,
                                Some(Err(e)) => {
                                    failed = Some(e);
                                    break;
                                }
                                None => break,
                            }
                        }
                        if let Some(e) = failed {
                            self.on_disconnect(&e.to_string());
                            if !self.back_off(&el, &mut backoff).await {
                                return Ok(());
                            }
                        }
                    }
                    Err(e) => {
                        self.on_disconnect(&e.to_string());
                        if !self.back_off(&el, &mut backoff).await {
                            return Ok(());
                        }
                    }
                },
                _ = self.shared.notify.notified() => self.take_requests(),
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            if self.connected {
                self.work(&client).await;
            } else if self.marks_due(Instant::now()) {
                self.flush_marks().await;
            }
        }
    }

    /// Between turns: tell a waiting [`MqttHandle::pause`](super::MqttHandle::pause)
    /// that no round is under way.
    fn ack_pause(&self) {
        if self.shared.paused.load(Ordering::SeqCst) {
            let asked = self.shared.pause_asked.load(Ordering::SeqCst);
            if self.shared.pause_seen.swap(asked, Ordering::SeqCst) < asked {
                self.shared.pause_ack.notify_waiters();
            }
        }
    }

    /// Acknowledgements that waited long enough for a read round to carry them.
    fn marks_due(&self, now: Instant) -> bool {
        self.marks_since.is_some_and(|t| now >= t + MARK_LINGER)
    }

    /// Wait before reconnecting, then let the link connect again. False on shutdown. A
    /// connection that was up is retried on the same broker first; a connect that failed
    /// moves on to the next broker of `mqtt.url` (the first that answers is used; the
    /// epoch check then republishes what the new broker lacks).
    async fn back_off(&mut self, el: &Link, backoff: &mut Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => return false,
            _ = tokio::time::sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        if self.options.len() > 1 && self.failures > 0 {
            self.broker = (self.broker + 1) % self.options.len();
            let (host, port) = self.options[self.broker].broker_address();
            info!(broker = %format!("mqtt.url[{}]", self.broker), host = %host, port, "mqtt: trying the next broker");
            el.resume_with(self.options[self.broker].clone());
        } else {
            el.resume();
        }
        true
    }

    /// While the apply is backed up: when the next round of reads may start
    /// (`mqtt.backed_up_round_ms` after the last), on the scheduler's clock.
    fn next_round_ms(&self) -> Option<u64> {
        let gap = self.cfg.mqtt.backed_up_round_ms;
        if gap == 0 || !self.shared.backed_up.load(Ordering::Relaxed) {
            return None;
        }
        self.last_round_ms.map(|t| t.saturating_add(gap))
    }

    /// When the loop must wake up without an event.
    fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        let mut d = now + Duration::from_secs(3600);
        if let Some(t) = self.marks_since {
            d = d.min(t + MARK_LINGER);
        }
        if !self.connected || self.shared.paused.load(Ordering::SeqCst) {
            return d;
        }
        if let Some(sw) = &self.sweep {
            d = d.min(sw.quiet_until);
        }
        if let EpochPhase::Waiting { until, .. } = &self.epoch {
            return (*until).min(d);
        }
        if let Some(p) = self.redis_pause_until.filter(|p| *p > now) {
            return p.min(d);
        }
        let room = self.tracker.len() < MAX_IN_FLIGHT;
        if room {
            if self.scan.is_some() && self.sched.pending() < SCAN_MAX_PENDING {
                return now;
            }
            if let Some(due) = self.sched.next_due() {
                let due = due.max(self.next_round_ms().unwrap_or(0));
                d = d.min(self.start + Duration::from_millis(due));
            }
        }
        if !self.aging.is_empty() && self.cfg.mqtt.window_republish_per_s > 0 {
            d = d.min(self.next_aging);
        }
        if self.epoch_dirty && !self.epoch_in_flight && self.epoch_token.is_some() {
            d = d.min(self.next_epoch);
        }
        d
    }

    /// Moves `changed()` SKUs and a `republish_all()` request into the scheduler.
    fn take_requests(&mut self) {
        // Backpressure: take only what the scheduler has room for; the rest waits in the
        // (capped) set, or in Redis when the set overflowed.
        let room = SCAN_MAX_PENDING.saturating_sub(self.sched.pending());
        let skus: Vec<String> = {
            let mut set = self
                .shared
                .changed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if set.len() <= room {
                std::mem::take(&mut *set).into_iter().collect()
            } else {
                let take: Vec<String> = set.iter().take(room).cloned().collect();
                for s in &take {
                    set.remove(s);
                }
                take
            }
        };
        for sku in skus {
            self.sched.request(&sku, Want::Change);
        }
        if self.shared.overflow.swap(false, Ordering::SeqCst) {
            info!("too many changed SKUs to track; scanning Redis for unpublished ones");
            if self.scan.is_some() {
                self.rescan = true;
            } else {
                self.scan = Some(Scan {
                    at: Default::default(),
                    force: false,
                    from_seq: None,
                });
            }
        }
        // Forget SKUs that are idle: their hash lsn only grows, so nothing older can be
        // sent later. Keeps memory proportional to SKUs active within the interval.
        // Amortized: prune again only once the map doubled since (a full pass each turn
        // cost more than the publishing while thousands of SKUs stay active).
        if self.sched.len() > self.prune_at {
            self.sched.prune(self.mono_ms());
            self.prune_at = (self.sched.len() * 2).max(4096);
        }
        if self.shared.republish_all.swap(false, Ordering::SeqCst) {
            info!("republishing all SKUs (resync)");
            // the rebuilt hashes may carry LSNs below those sent before
            self.sched.forget_order();
            self.restart_sweep = true;
            self.scan = Some(Scan {
                at: Default::default(),
                force: true,
                from_seq: None,
            });
        }
    }

    fn on_disconnect(&mut self, why: &str) {
        if self.connected {
            self.failures = 0;
            warn!(error = %why, "mqtt connection lost");
        } else {
            self.failures += 1;
            // visible, but not once per back-off step
            let setting = if self.options.len() > 1 {
                format!("mqtt.url[{}]", self.broker)
            } else {
                "mqtt.url".into()
            };
            if self.failures == 1 || self.failures.is_multiple_of(20) {
                warn!(error = %why, broker = %setting, attempts = self.failures, "mqtt connect failed; retrying");
            } else {
                debug!(error = %why, broker = %setting, attempts = self.failures, "mqtt connect failed");
            }
        }
        self.connected = false;
        self.shared.connected.store(false, Ordering::SeqCst);
        crate::telemetry::mqtt_connection(false, false);
        // clean session: whatever was not acknowledged is gone; Redis still marks it
        for m in self.tracker.lose_all() {
            match m {
                Msg::State { sku, .. } | Msg::Alert { sku, .. } => self.sched.lost(&sku),
                // the sweep after the next connect clears it again
                Msg::Status | Msg::Clear { .. } | Msg::Epoch { .. } => {}
            }
        }
        self.scan = None;
        self.sweep = None;
        self.outstanding = None;
        self.epoch = EpochPhase::Decided;
        // decided again after the next CONNACK, from what that broker holds
        self.epoch_token = None;
        self.epoch_in_flight = false;
    }

    async fn on_event(&mut self, client: &AsyncClient, ev: Event) {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                // rumqttc fails the connection on a packet above the broker's maximum
                self.broker_max = ack
                    .properties
                    .and_then(|p| p.max_packet_size)
                    .and_then(|m| usize::try_from(m).ok());
                if self.ever_connected {
                    self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                crate::telemetry::mqtt_connection(true, self.ever_connected);
                self.ever_connected = true;
                self.connected = true;
                self.shared.connected.store(true, Ordering::SeqCst);
                info!("mqtt connected");
                if self.draining {
                    return;
                }
                let status = super::status_topic(self.prefix());
                if client
                    .try_publish_with_properties(
                        status,
                        QoS::AtLeastOnce,
                        true,
                        "online",
                        payload::text_properties(),
                    )
                    .is_ok()
                {
                    self.tracker.queued(Msg::Status);
                }
                let _ = client.try_subscribe(super::epoch_topic(self.prefix()), QoS::AtLeastOnce);
                self.epoch = EpochPhase::Waiting {
                    until: Instant::now() + EPOCH_WAIT,
                    seen: None,
                };
                self.start_sweep(client);
            }
            Event::Incoming(Packet::Publish(p)) => {
                if p.retain
                    && let Some(sweep) = self.sweep.as_mut()
                    && !p.payload.is_empty()
                    && let Ok(topic) = std::str::from_utf8(&p.topic)
                    && let Some(level) = topic
                        .strip_prefix(self.cfg.mqtt.topic_prefix.as_str())
                        .and_then(|t| t.strip_prefix("/sku/"))
                {
                    match super::decode_sku(level) {
                        Some(sku) => self.sweep_retained(client, sku).await,
                        None => {
                            sweep.quiet_until = (Instant::now() + SWEEP_QUIET).min(sweep.deadline);
                        }
                    }
                    return;
                }
                let epoch_topic = super::epoch_topic(self.prefix());
                if p.topic.as_ref() == epoch_topic.as_bytes()
                    && let EpochPhase::Waiting { seen, until } = &mut self.epoch
                {
                    *seen = Some(String::from_utf8_lossy(&p.payload).into_owned());
                    // the retained value arrives right after SUBACK: decide now
                    *until = Instant::now();
                }
            }
            // the guard records the mapping; it is false for every tracked publish
            Event::Outgoing(Outgoing::Publish(pkid)) if !self.tracker.sent(pkid) => {
                // Every publish is queued in the tracker: one that is not shifts the
                // acknowledgements of all later messages onto the wrong ones.
                warn!(pkid, "untracked outgoing publish");
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let ok = matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                );
                match self.tracker.acked(ack.pkid) {
                    Some(m) => self.on_ack(client, m, ok, ack.reason).await,
                    None => debug!(pkid = ack.pkid, "untracked puback"),
                }
            }
            _ => {}
        }
    }

    async fn on_ack(&mut self, client: &AsyncClient, m: Msg, ok: bool, reason: PubAckReason) {
        if !ok {
            self.shared.stats.refusals.fetch_add(1, Ordering::Relaxed);
            crate::telemetry::mqtt_refused(m.kind(), &format!("{reason:?}"));
        }
        match m {
            Msg::State {
                sku,
                lsn,
                piece,
                state,
                ts,
                seq,
            } => {
                if ok {
                    self.marks_since.get_or_insert_with(Instant::now);
                    self.marks.push(Msg::State {
                        sku: sku.clone(),
                        lsn,
                        piece,
                        state,
                        ts,
                        seq,
                    });
                    self.shared.stats.published.fetch_add(1, Ordering::Relaxed);
                    crate::telemetry::mqtt_state_acked(ts);
                } else {
                    debug!(sku = %crate::secret::log_value(&sku), ?reason, "refused state message");
                    let now = self.mono_ms();
                    self.sched.refused(&sku, now);
                    // Its mark may say published (another broker's, or this state's
                    // before the broker lost it), which a scan after the next epoch
                    // would trust: unmarked, every scan finds it, so it no longer holds
                    // a full republish (and the epoch) up. Marked still, it does.
                    if self.unmark(&sku).await {
                        self.settle(&sku);
                        self.maybe_publish_epoch(client);
                    }
                    return;
                }
                self.sched.state_acked(&sku);
                self.settle(&sku);
                self.maybe_publish_epoch(client);
            }
            Msg::Alert { sku, lsn_raw, kind } => {
                if ok {
                    self.marks_since.get_or_insert_with(Instant::now);
                    self.marks.push(Msg::Alert {
                        sku: sku.clone(),
                        lsn_raw,
                        kind,
                    });
                    self.shared
                        .stats
                        .alerts_published
                        .fetch_add(1, Ordering::Relaxed);
                    crate::telemetry::mqtt_alert_acked();
                } else {
                    debug!(sku = %crate::secret::log_value(&sku), ?reason, "refused alert");
                }
                self.sched.acked(&sku);
            }
            Msg::Status => {
                // refusal logged above
            }
            Msg::Clear { sku } => {
                if !ok {
                    debug!(sku = %crate::secret::log_value(&sku), ?reason, "refused clear");
                }
            }
            Msg::Epoch { token, seq, fresh } => {
                self.epoch_in_flight = false;
                if ok {
                    let r: Result<i64, _> = self
                        .set_epoch
                        .key(layout::meta_key(&self.cfg.redis_prefix))
                        .arg(&token)
                        .arg(seq)
                        .invoke_async(&mut self.redis)
                        .await;
                    match r {
                        Ok(_) if fresh => info!("mqtt epoch stored: full republish complete"),
                        Ok(_) => debug!(seq, "mqtt epoch stored"),
                        Err(e) => warn!(error = %e, "storing the mqtt epoch failed"),
                    }
                } else {
                    // the states sent before it still need an epoch the broker holds
                    self.epoch_dirty = true;
                }
            }
        }
    }

    /// Make Redis say `sku`'s state is not published (the broker refused it): the marks
    /// queued before go first, so none lands after. False when Redis could not be told.
    async fn unmark(&mut self, sku: &str) -> bool {
        self.flush_marks().await;
        if !self.marks.is_empty() {
            return false;
        }
        let r: Result<i64, _> = redis::cmd("HDEL")
            .arg(layout::sku_key(&self.cfg.redis_prefix, sku))
            .arg("pub_lsn")
            .arg("pub_piece")
            .arg("pub_seq")
            .query_async(&mut self.redis)
            .await;
        match r {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "could not mark a refused state unpublished; it holds the republish up until the broker takes it");
                false
            }
        }
    }

    /// A SKU of a full republish is done (acknowledged, refused, or nothing to send).
    fn settle(&mut self, sku: &str) {
        if let Some(o) = &mut self.outstanding {
            o.remove(sku);
        }
    }

    /// Everything the loop does while connected: epoch, scan, aging, publishes.
    async fn work(&mut self, client: &AsyncClient) {
        if self.draining {
            return;
        }
        // also here: a busy link can starve the notify branch of the select
        self.take_requests();
        let now = Instant::now();
        // A scan reads the publish marks: it must see every acknowledgement.
        if self.marks_due(now) || (self.scan.is_some() && !self.marks.is_empty()) {
            self.flush_marks().await;
        }
        if self.shared.paused.load(Ordering::SeqCst) {
            // Redis is being rebuilt; `resume` republishes everything afterwards.
            return;
        }
        if let EpochPhase::Waiting { until, seen } = &mut self.epoch {
            if *until > now {
                return;
            }
            let seen = seen.take();
            self.decide_epoch(client, seen).await;
            if matches!(self.epoch, EpochPhase::Waiting { .. }) {
                return;
            }
        }
        if self.redis_pause_until.is_some_and(|p| p > now) {
            return;
        }
        self.redis_pause_until = None;
        // (after a full request channel, once most of what was sent is acknowledged: each
        // subscribe makes the broker send every retained state again)
        if self.restart_sweep && self.tracker.len() <= SWEEP_RESTART_IN_FLIGHT {
            self.restart_sweep = false;
            self.start_sweep(client);
        }
        if self.sweep.as_ref().is_some_and(|s| now >= s.quiet_until) {
            self.finish_sweep(client).await;
        }
        if self.scan.is_some()
            && self.tracker.len() < MAX_IN_FLIGHT
            && self.sched.pending() < SCAN_MAX_PENDING
        {
            self.scan_page(client).await;
        }
        self.maybe_advance_epoch(client, false);
        let rate = self.cfg.mqtt.window_republish_per_s;
        if rate > 0 && !self.aging.is_empty() && self.next_aging <= now {
            let minute = layout::minute_of_ms(crate::telemetry::unix_ms());
            match self.aging.next(minute) {
                Some(sku) => {
                    self.sched.request(&sku, Want::Aging);
                    self.next_aging = now + Duration::from_secs(1) / rate;
                }
                None => self.next_aging = now + Duration::from_secs(1),
            }
        }
        // Groups overlap: while one group's states are built and published, the next
        // group's hashes are read. A group's read is sent only after the previous group's
        // hashes came back, so Redis runs the rounds in order: marks recorded by one
        // round come before the hashes read by the next.
        let mut queue: std::collections::VecDeque<GroupRead> = Default::default();
        let mut reading = 0;
        loop {
            // no new reads once a rebuild asked for a pause (what is read is published)
            while self.redis_pause_until.is_none() && !self.shared.paused.load(Ordering::SeqCst) {
                if let Some(rx) = queue.back_mut().and_then(|r| r.read.take()) {
                    // an error or a dropped task counts as done too
                    let _ = rx.await;
                }
                match self.start_read(reading) {
                    Some(r) => {
                        reading += r.group.len();
                        queue.push_back(r);
                    }
                    None => break,
                }
            }
            let Some(r) = queue.pop_front() else { break };
            reading -= r.group.len();
            if !self.finish_read(client, r).await {
                // a failed round: what is already being read is still published
                while let Some(r) = queue.pop_front() {
                    self.finish_read(client, r).await;
                }
                break;
            }
        }
    }

    /// Wait for a group's read and publish it; false when the round failed.
    async fn finish_read(&mut self, client: &AsyncClient, r: GroupRead) -> bool {
        let out = r.task.await.unwrap_or_else(|e| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "reading SKU hashes",
                e.to_string(),
            )))
        });
        self.publish_group(client, r.group, r.marks, out).await
    }

    /// Claim a group of ready SKUs (room permitting, `reading` SKUs being read already)
    /// and start reading their hashes and distinct-user counts on a task of its own.
    fn start_read(&mut self, reading: usize) -> Option<GroupRead> {
        // one clock read for the group (a read per SKU showed in the profile)
        let now = self.mono_ms();
        if self.next_round_ms().is_some_and(|t| t > now) {
            return None;
        }
        let mut group = Vec::new();
        while group.len() < READ_GROUP && self.tracker.len() + reading + group.len() < MAX_IN_FLIGHT
        {
            match self.sched.pop_ready(now) {
                Some(x) => group.push(x),
                None => break,
            }
        }
        if group.is_empty() {
            return None;
        }
        self.last_round_ms = Some(now);
        // Waiting acknowledgements are recorded first, in the same round trip: Redis runs
        // the pipeline in order, so the deltas are computed against the last acknowledged
        // states.
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let marks = self.queue_marks(&mut pipe);
        // The task gets a copy: if it panicked, the group kept here is requested again.
        let skus: Vec<(String, Want)> = group.clone();
        let (read_tx, read) = tokio::sync::oneshot::channel();
        let job = ReadJob {
            marks: marks.replies,
            skus,
            spec: Arc::clone(&self.spec),
            prefix: self.cfg.redis_prefix.clone(),
            format: self.cfg.mqtt.format,
        };
        let task = tokio::spawn(read_group(
            read_tx,
            self.redis.clone(),
            self.reader.clone(),
            pipe,
            job,
        ));
        Some(GroupRead {
            group,
            marks,
            read: Some(read),
            task,
        })
    }

    /// Publish a group read by [`start_read`](Self::start_read). False when the round
    /// failed (its SKUs are requested again, after a pause).
    async fn publish_group(
        &mut self,
        client: &AsyncClient,
        group: Vec<(String, Want)>,
        marks: marks::QueuedMarks,
        out: Result<ReadOut, redis::RedisError>,
    ) -> bool {
        let (marks_replies, hashes, now_ms) = match out {
            Ok(x) => x,
            Err(e) => {
                self.settle_marks(marks, None);
                for (sku, want) in group {
                    self.redis_failed(&sku, want, &e);
                }
                return false;
            }
        };
        self.settle_marks(marks, Some(marks_replies));
        let mut failed = false;
        let mut hashes = hashes.into_iter();
        for (sku, want) in group {
            if failed {
                // after a failed read (or a missing reply), like a failed round: again later
                self.sched.skipped(&sku);
                self.sched.request(&sku, want);
                continue;
            }
            match hashes.next() {
                Some(Ok(read)) => self.publish_sku(client, &sku, want, read, now_ms).await,
                Some(Err(e)) => {
                    self.redis_failed(&sku, want, &e);
                    failed = true;
                }
                None => {
                    self.sched.skipped(&sku);
                    self.sched.request(&sku, want);
                    failed = true;
                }
            }
        }
        !failed
    }

    /// Publish one SKU from its hash and the state message built from it (read and
    /// built for a whole group by [`read_group`]).
    async fn publish_sku(
        &mut self,
        client: &AsyncClient,
        sku: &str,
        want: Want,
        read: Read,
        now_ms: i64,
    ) {
        let Read { fields, built } = read;
        if fields.is_empty() {
            // no hash (never existed or removed): nothing to project
            self.sched.skipped(sku);
            self.settle(sku);
            return;
        }
        let lsn: u64 = fields.get("lsn").and_then(|v| v.parse().ok()).unwrap_or(0);
        if !self.sched.in_order(sku, lsn) {
            debug!(sku = %crate::secret::log_value(sku), "skipping a publish older than one already sent");
            self.sched.skipped(sku);
            self.settle(sku);
            return;
        }
        let piece = payload::piece_num(fields.get("piece"));
        let Some(Built { kind, msg, body }) = built else {
            // Redis says the broker has it already
            self.sched.skipped(sku);
            return;
        };
        let minute = layout::minute_of_ms(now_ms);
        let gone = payload::is_gone(&fields);
        if matches!(kind, Kind::Aging { .. }) && msg.windows == self.aging.fingerprint(sku) {
            // window values did not move: nothing to republish
            self.aging.checked(sku, minute);
            self.sched.skipped(sku);
            return;
        }
        let topic = super::sku_topic(self.prefix(), sku);
        let max = self.broker_max.map_or(self.cfg.mqtt.max_packet_bytes, |b| {
            b.min(self.cfg.mqtt.max_packet_bytes)
        });
        // MQTT topics are at most 65535 bytes; rumqttc drops the connection for a packet
        // above the maximum, so such a message must never be queued.
        let t_fits = |t: &str, n: usize| {
            t.len() <= usize::from(u16::MAX) && t.len() + n + PACKET_OVERHEAD <= max
        };
        let mut messages = 0u32;
        // Messages too large to send: (kind, bytes).
        let mut refused: Vec<(&'static str, usize)> = Vec::new();
        let format = self.cfg.mqtt.format;
        let state_sent = t_fits(&topic, body.len());
        if state_sent {
            if client
                .try_publish_with_properties(
                    topic,
                    QoS::AtLeastOnce,
                    true,
                    body,
                    payload::properties(format, ("rev", &msg.rev), None),
                )
                .is_err()
            {
                // the channel is sized above our own in-flight bound; closed only at shutdown
                self.sched.skipped(sku);
                self.sched.request(sku, want);
                return;
            }
            self.epoch_dirty = true;
            self.tracker.queued(Msg::State {
                sku: sku.to_string(),
                lsn,
                piece,
                state: msg.state.clone(),
                ts: match kind {
                    Kind::Change => fields.get("ts").and_then(|v| v.parse().ok()),
                    Kind::Aging { .. } | Kind::Current => None,
                },
                seq: self.epoch_seq,
            });
            messages += 1;
        } else {
            // A partial state would be wrong, so none is sent; the SKU's alerts are small
            // and still go out below.
            refused.push(("state", topic.len() + body.len()));
        }
        let (alerts, bad) = payload::parse_alerts(fields.get("alerts"), self.spec.scale);
        if bad > 0 {
            warn!(malformed = bad, "skipping malformed pending alerts");
        }
        let mut more_alerts = alerts.len() > MAX_ALERTS_PER_ROUND;
        // Built only when there are alerts: this runs for every state message.
        let alert_topic = if alerts.is_empty() {
            String::new()
        } else {
            super::alert_topic(self.prefix(), sku)
        };
        let expiry = (self.cfg.alert_expiry_s > 0).then_some(self.cfg.alert_expiry_s);
        for a in alerts.iter().take(MAX_ALERTS_PER_ROUND) {
            let body = payload::encode(format, &payload::alert_payload(sku, a, self.spec.scale));
            if !t_fits(&alert_topic, body.len()) {
                // stays in the outbox, like the state: only a huge SKU gets here
                refused.push(("alert", alert_topic.len() + body.len()));
                continue;
            }
            let props =
                payload::properties(format, ("seq", a.seq.as_deref().unwrap_or("")), expiry);
            if client
                .try_publish_with_properties(
                    alert_topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    body,
                    props,
                )
                .is_err()
            {
                more_alerts = true;
                break;
            }
            self.tracker.queued(Msg::Alert {
                sku: sku.to_string(),
                lsn_raw: a.lsn_raw.clone(),
                kind: a.kind.clone(),
            });
            messages += 1;
        }
        if refused.is_empty() {
            if !self.oversized.is_empty() {
                self.oversized.remove(sku);
            }
        } else {
            // Logged when the SKU becomes too large, not again on each change after.
            let first = self.oversized.insert(sku.to_string());
            for (i, (what, bytes)) in refused.iter().enumerate() {
                self.shared.stats.refusals.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::mqtt_too_large(what, *bytes, max, first && i == 0);
            }
            debug!(sku = %crate::secret::log_value(sku), refused = refused.len(), "messages too large for a packet");
        }
        debug!(sku = %crate::secret::log_value(sku), messages, "published");
        self.sched.sent(sku, lsn, messages, self.mono_ms());
        if more_alerts {
            self.sched.request(sku, Want::Change);
        }
        if !state_sent {
            // refused: done as far as a full republish is concerned
            self.settle(sku);
        } else if !gone {
            self.aging.published(sku, msg.windows, minute);
        } else {
            self.aging.published(sku, None, minute);
        }
    }

    fn redis_failed(&mut self, sku: &str, want: Want, e: &redis::RedisError) {
        crate::telemetry::publisher_read_failed(e);
        self.redis_pause_until = Some(Instant::now() + REDIS_PAUSE);
        self.sched.skipped(sku);
        self.sched.request(sku, want);
    }

    /// Shutdown: no new publishes; wait (bounded) for in-flight acknowledgements, then
    /// publish `offline` and disconnect cleanly.
    async fn drain(&mut self, client: &AsyncClient, el: &mut Link) -> Result<(), MqttError> {
        self.draining = true;
        if !self.connected {
            return Ok(());
        }
        info!(in_flight = self.tracker.len(), "mqtt publisher draining");
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        let waiting = |t: &Task| t.tracker.len();
        while waiting(self) > 0 && self.connected {
            match tokio::time::timeout_at(deadline, el.next()).await {
                Ok(Ok(ev)) => self.on_event(client, ev).await,
                Ok(Err(e)) => {
                    self.on_disconnect(&e.to_string());
                    return Ok(());
                }
                Err(_) => break,
            }
        }
        if self.connected {
            // A last epoch: after a clean stop, the next start finds nothing to republish.
            self.maybe_advance_epoch(client, true);
            let status = super::status_topic(self.prefix());
            if client
                .try_publish_with_properties(
                    status,
                    QoS::AtLeastOnce,
                    true,
                    "offline",
                    payload::text_properties(),
                )
                .is_ok()
            {
                self.tracker.queued(Msg::Status);
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while !self.tracker.is_empty() {
                match tokio::time::timeout_at(deadline, el.next()).await {
                    Ok(Ok(ev)) => self.on_event(client, ev).await,
                    _ => break,
                }
            }
            let _ = client.try_disconnect();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            loop {
                match tokio::time::timeout_at(deadline, el.next()).await {
                    Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(_)) => {}
                }
            }
        }
        // What the broker acknowledged is recorded before we go.
        self.flush_marks().await;
        self.connected = false;
        self.shared.connected.store(false, Ordering::SeqCst);
        info!("mqtt publisher stopped");
        Ok(())
    }
}

/// A group of SKUs whose hashes are being read.
struct GroupRead {
    group: Vec<(String, Want)>,
    marks: marks::QueuedMarks,
    /// Fires once the marks and hashes round trip returned.
    read: Option<tokio::sync::oneshot::Receiver<()>>,
    task: tokio::task::JoinHandle<Result<ReadOut, redis::RedisError>>,
}

/// What [`read_group`] reads and builds with.
struct ReadJob {
    /// Replies the marks queued in front of the hashes take.
    marks: usize,
    skus: Vec<(String, Want)>,
    spec: Arc<Spec>,
    prefix: String,
    format: crate::config::PayloadFormat,
}

/// A SKU's hash as read, and its state message when Redis says one is due.
struct Read {
    fields: FlatHash,
    built: Option<Built>,
}

/// A state message built off the publisher task.
struct Built {
    kind: Kind,
    msg: payload::StateMessage,
    /// The payload in the configured format.
    body: bytes::Bytes,
}

/// The marks' replies; per SKU of the group, in order, its hash and state message
/// (ending early at a hash that could not be read); the time they are for.
type ReadOut = (Vec<redis::Value>, Vec<Result<Read, redis::RedisError>>, i64);

/// The state message of a SKU read for `want`, unless Redis says the broker has it (a
/// change already acknowledged) or there is no hash.
fn build(
    spec: &Spec,
    format: crate::config::PayloadFormat,
    sku: &str,
    want: Want,
    fields: &FlatHash,
    users: &HashMap<String, i64>,
    now_ms: i64,
) -> Option<Built> {
    if fields.is_empty() {
        return None;
    }
    let unpublished = payload::unpublished(
        fields.get("lsn"),
        fields.get("piece"),
        fields.get("pub_lsn"),
        fields.get("pub_piece"),
        fields.get("alerts"),
    );
    if want == Want::Change && !unpublished {
        return None;
    }
    let kind = if want == Want::Aging && !unpublished {
        Kind::Aging { as_of_ms: now_ms }
    } else {
        Kind::Change
    };
    let msg = payload::state_message(spec, sku, fields, users, now_ms, kind);
    let body = payload::encode(format, &msg.payload);
    Some(Built { kind, msg, body })
}

/// Read a group: the marks and the hashes in one round trip, then the distinct-user
/// counts, which depend on the window buckets the hashes hold (a second round trip, only
/// when some window has events). The state messages are built on a blocking thread: the
/// publisher task shares the runtime's one worker with the pipeline, and building is
/// most of a publish's CPU.
async fn read_group(
    read: tokio::sync::oneshot::Sender<()>,
    mut redis: RedisCon,
    reader: Option<Arc<HashReader>>,
    mut pipe: redis::Pipeline,
    job: ReadJob,
) -> Result<ReadOut, redis::RedisError> {
    let ReadJob {
        marks,
        skus,
        spec,
        prefix,
        format,
    } = job;
    for (sku, _) in &skus {
        pipe.cmd("HGETALL").arg(layout::sku_key(&prefix, sku));
    }
    // The marks' replies, then the hashes (ours or redis-rs' parse, see `HashReader`).
    let (all, reads): (Vec<redis::Value>, Vec<Result<FlatHash, redis::RedisError>>) = match &reader
    {
        Some(r) => {
            let replies = r.round(&redis, &pipe).await;
            let _ = read.send(());
            let replies = replies?;
            let all = (0..marks.min(replies.len()))
                .map(|i| replies.value(i))
                .collect::<Result<Vec<_>, _>>()?;
            let reads = (all.len()..replies.len())
                .map(|i| replies.hash(i))
                .collect();
            (all, reads)
        }
        None => {
            let all: Result<Vec<redis::Value>, _> = pipe.query_async(&mut redis).await;
            let _ = read.send(());
            let mut all = all?;
            let reads = all.split_off(marks.min(all.len()));
            let reads = reads
                .into_iter()
                .map(|v| FlatHash::from_value(v).map_err(redis::RedisError::from))
                .collect();
            (all, reads)
        }
    };
    let now_ms = crate::telemetry::unix_ms();
    let mut hashes = Vec::with_capacity(skus.len());
    let mut users = redis::pipe();
    let mut queries = Vec::with_capacity(skus.len());
    // A hash that cannot be read ends the group: it and the SKUs after it are read again.
    let mut bad = None;
    for ((sku, _), r) in skus.iter().zip(reads) {
        match r {
            Ok(fields) => {
                queries.push(payload::users_queries(
                    &spec, &prefix, sku, &fields, now_ms, &mut users,
                ));
                hashes.push(fields);
            }
            Err(e) => {
                bad = Some(e);
                break;
            }
        }
    }
    // From here on the marks are recorded: a failure fails the group's SKUs (read again
    // after a pause), not the marks' replies.
    let hashes_len = hashes.len();
    let counts: Vec<i64> = if queries.iter().all(|q| q.replies() == 0) {
        Vec::new()
    } else {
        let counts = match &reader {
            Some(r) => r
                .round(&redis, &users)
                .await
                .and_then(|replies| (0..replies.len()).map(|i| replies.int(i)).collect()),
            None => users.query_async(&mut redis).await,
        };
        match counts {
            Ok(c) => c,
            Err(e) => return Ok((all, vec![Err(e)], now_ms)),
        }
    };
    let build_all = move || {
        let mut counts = counts.into_iter();
        let mut out: Vec<Result<Read, redis::RedisError>> = hashes
            .into_iter()
            .zip(queries)
            .zip(&skus)
            .map(|((fields, q), (sku, want))| {
                let users = q.counts(&mut counts);
                let built = build(&spec, format, sku, *want, &fields, &users, now_ms);
                Ok(Read { fields, built })
            })
            .collect();
        out.extend(bad.map(Err));
        out
    };
    // A small group is built here: handing it to another thread and back costs more
    // than building it (two wake-ups per group, most groups at live rates).
    let built = if hashes_len <= BUILD_INLINE {
        build_all()
    } else {
        tokio::task::spawn_blocking(build_all)
            .await
            .unwrap_or_else(|e| {
                vec![Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "building states",
                    e.to_string(),
                )))]
            })
    };
    Ok((all, built, now_ms))
}
