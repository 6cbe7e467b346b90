//! MQTT sink: publishes each SKU's state from its Redis hash to an MQTT broker.
//!
//! MQTT is a projection of Redis, and Redis is its outbox: the replication slot never
//! waits on MQTT.
//!
//! # Topics
//!
//! * `<topic_prefix>/sku/<SKU>`: retained, QoS 1, the SKU's latest state (below). An empty
//!   retained payload (which clears the retained message) when the SKU is gone.
//! * `<topic_prefix>/alerts/<SKU>`: not retained, QoS 1, one message per alert.
//! * `<topic_prefix>/status`: retained `online` after connecting, `offline` as the Last Will
//!   and before a clean disconnect.
//! * `<topic_prefix>/epoch`: retained `<token>:<seq>` (random token, sequence number);
//!   see "Broker restarts".
//!
//! # SKU topic level
//!
//! A SKU is one topic level. Every UTF-8 byte outside printable ASCII (`0x21..=0x7E`: so
//! controls, NUL, space, DEL and all non-ASCII characters), and `%`, `/`, `+`, `#`, is
//! written as `%XX` (upper-case hex); the empty SKU is the single character `%`.
//! Decoding: a level that is exactly `%` is the empty SKU; otherwise replace each `%XX`
//! by the byte `XX` and read the bytes as UTF-8 (standard percent-decoding). Encoding is
//! injective, so distinct SKUs never share a topic. The payloads carry the real SKU.
//!
//! # State payload (compact JSON, format `v` 1)
//!
//! `v`, `sku`, `on_hand`, `reserved`, `available`; `locations`
//! (`{"WH-1":{"on_hand":6,"reserved":2}}`, only when there are locations); each activity
//! counter's lifetime total (`views`); each window's sum (`views_5m`, `purchases_1h`);
//! distinct users per window when the counter's table maps a user (`views_users_5m`); with
//! a `purchases` counter, `sell_rate_per_h` (units over the last 60 minutes) and
//! `stockout_eta_s` (`available * 3600 / sell_rate_per_h`, omitted when the rate is 0 or
//! nothing is available); `delta`: the numeric values minus those of this SKU's previous
//! acknowledged message (non-zero entries only, same shape, locations nested; a first
//! message's delta is its values); `lsn` and `prev_lsn` (commit LSNs `X/Y` of this and the
//! previous acknowledged message, `prev_lsn` omitted on the first); `piece` and
//! `prev_piece` (only when above 0: the state after a later piece of a transaction applied
//! in several; states order by (`lsn`, `piece`), absent meaning 0); `ts` (commit time,
//! RFC 3339 UTC with milliseconds). `v`, `sku` and the three stock totals are always
//! present (0 without stock tables); other absent features are omitted, never `null`.
//!
//! Window values age without new events: SKUs published with a non-zero window value are
//! rechecked once per minute, round robin, at most `window_republish_per_s` per second,
//! and republished when their window values changed. Such a message has `as_of` (the time
//! the windows were computed) and no `delta`.
//!
//! # Alert payload
//!
//! `{"v":1,"id":"<lsn>:<type>:<sku>","type":"low_stock"|"out_of_stock"|"back_in_stock",
//! "sku","available","threshold","lsn":"X/Y","ts"}`. Delivery is at least once; `id` is
//! stable so apps can drop duplicates.
//!
//! # Delivery
//!
//! A SKU is unpublished while its hash's (`lsn`, `piece`) differs from (`pub_lsn`,
//! `pub_piece`) or `alerts` is not empty. After the broker acknowledged (PUBACK success) a
//! state message read at (`L`, `P`), a Lua script sets `pub_lsn = L`, `pub_piece = P` and
//! `pub_state` (the published numeric values, the base of the next `delta`) unless the mark
//! is already at (`L`, `P`) or later, and `pub_seq` (see "Broker restarts"). After an
//! alert's PUBACK, a
//! Lua script removes exactly that alert (matched on `lsn` and `type`) from `alerts`, so
//! alerts the apply script appends meanwhile stay. After connecting, every unpublished
//! SKU is found by SCAN and published; a message lost with a connection is published again.
//! So messages are delivered at least once, and retained state converges to Redis.
//!
//! The throttle allows one message per SKU per `min_interval_ms`: the first change
//! publishes at once, later ones coalesce into one trailing publish of the state read
//! from Redis at that time (its `delta` covers all coalesced changes). At most one state
//! message per SKU is in flight; a SKU's messages never carry an older `lsn` than one
//! already sent. Other SKUs are not delayed.
//!
//! PUBACKs are matched to messages by order (rumqttc reports the packet id of each
//! request in the order they were queued). MQTT 5 is used so a refusing PUBACK (e.g. an
//! ACL denial, `NotAuthorized`) is seen: the message is counted as refused, logged, and
//! not marked published. Sessions are clean: on disconnect everything in flight is
//! considered lost. Reconnects back off exponentially from 100 ms to 10 s.
//!
//! # Broker restarts
//!
//! A broker restarted without persistence loses its retained messages; one restarted from
//! an older persistence file (Mosquitto autosaves every 30 minutes by default, and a crash
//! loses what came after) has the retained messages of that time. The retained epoch
//! message `<topic_prefix>/epoch` tells which: its payload is `<token>:<seq>` (a payload
//! without `:` is a token with sequence 0, the form before sequences).
//!
//! * While states are being acknowledged, the epoch is republished (retained, QoS 1) with
//!   `seq + 1` every [`EPOCH_INTERVAL`]; after its PUBACK, the meta hash's `mqtt_epoch` and
//!   `mqtt_epoch_seq` are set to it.
//! * Each acknowledgement mark also sets the SKU hash's `pub_seq` to the sequence of the
//!   last epoch sent before that state was sent (an acknowledged republish of the same
//!   state raises it).
//! * After connecting, skusync reads the retained epoch (waiting up to 1 s) and the meta
//!   hash. Token missing or different: every SKU is republished; once all are acknowledged,
//!   a new random token is published (retained) and then stored in the meta hash (only if
//!   the meta hash exists). Same token, broker sequence `B`: the scan for unpublished SKUs
//!   also republishes every SKU whose `pub_seq >= B` (when `B` is below `mqtt_epoch_seq`,
//!   the broker was restored from an older file: logged, and counted in
//!   [`Stats::epoch_rollbacks`]).
//!
//! Why that is enough: a broker handles one client's publishes in order and saves its whole
//! retained store at once, so a store that holds epoch `B` holds every message skusync
//! published before epoch `B` (or a later one on the same topic). A state marked with
//! `pub_seq = k` was sent after epoch `k` and before epoch `k + 1`, so only states with
//! `pub_seq >= B` can be missing. The cost: every reconnect republishes the SKUs
//! acknowledged since the last epoch the broker acknowledged (about [`EPOCH_INTERVAL`] of
//! changes; none after a clean shutdown, which sends a last epoch), and a rollback
//! republishes the SKUs acknowledged since the restored file was saved.
//!
//! # Sizes
//!
//! `max_packet_bytes` (default 64 KiB) is announced to the broker as the maximum packet
//! size. A state payload is a few hundred bytes plus about 50 bytes per location and 30
//! per counter or window, each again in `delta` when it changed (all of them in a first
//! message), so the default fits about 500 locations with short names; a payload that would
//! exceed `max_packet_bytes` minus topic and header overhead is not sent, since a partial
//! state would be wrong: it is counted as refused each time, logged as an error once when
//! the SKU becomes too large, and the SKU stays unpublished. Its alerts (a few hundred
//! bytes) are still sent.
//!
//! # Logging
//!
//! Logs carry no payload values and no user ids; SKUs only at debug level.

mod conn;
pub mod link;
pub mod payload;
mod run;
mod sched;
mod topic;
mod tracker;

pub use conn::{Broker, PASSWORD_ENV, parse_url};
pub use payload::{Kind, PendingAlert, StateMessage, alert_payload, parse_alerts, state_message};
pub use run::{EPOCH_INTERVAL, MARK_PUBLISHED, READ_GROUP};
pub use sched::{Aging, Scheduler, Want};
pub use topic::{EMPTY_SKU_LEVEL, decode_sku, encode_sku};
pub use tracker::AckTracker;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One activity counter as the payload needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSpec {
    /// Counter name (`views`).
    pub name: String,
    /// Windows in seconds (whole minutes).
    pub windows_secs: Vec<u64>,
    /// The counter's table maps a user column: publish distinct users per window.
    pub distinct_users: bool,
}

/// Everything the publisher needs from the configuration.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// `[mqtt]`.
    pub mqtt: crate::config::MqttConfig,
    /// Redis key prefix.
    pub redis_prefix: String,
    /// Every activity counter.
    pub counters: Vec<CounterSpec>,
    /// `purchases` when an activity maps a counter with that name.
    pub sell_counter: Option<String>,
    /// Decimal places of quantities (the mapping's largest `scale`).
    pub scale: u32,
    /// The default low-stock threshold (`[alerts] low_stock`), whole units.
    pub low_stock: i64,
    /// MQTT message expiry of alerts, seconds (0: none).
    pub alert_expiry_s: u32,
}

/// The payload spec of a configuration (also used by the HTTP API, with or without
/// `[mqtt]`).
pub fn payload_spec(cfg: &crate::config::Config) -> payload::Spec {
    let (counters, sell_counter) = counter_specs(cfg);
    payload::Spec {
        counters,
        sell_counter,
        scale: cfg.quantity_scale(),
        low_stock: cfg.alerts.low_stock,
    }
}

/// Every activity counter (merged over tables: union of windows; distinct users if any
/// maps a user) and the sell counter when mapped.
fn counter_specs(cfg: &crate::config::Config) -> (Vec<CounterSpec>, Option<String>) {
    let mut counters: Vec<CounterSpec> = Vec::new();
    for a in &cfg.activity {
        let mut windows: Vec<u64> = a
            .windows
            .iter()
            .filter_map(|w| crate::config::parse_window(w))
            .collect();
        windows.sort_unstable();
        windows.dedup();
        for name in a.counters.values() {
            match counters.iter_mut().find(|c| &c.name == name) {
                Some(c) => {
                    c.windows_secs.extend(&windows);
                    c.windows_secs.sort_unstable();
                    c.windows_secs.dedup();
                    c.distinct_users |= a.user.is_some();
                }
                None => counters.push(CounterSpec {
                    name: name.clone(),
                    windows_secs: windows.clone(),
                    distinct_users: a.user.is_some(),
                }),
            }
        }
    }
    let sell_counter = counters
        .iter()
        .any(|c| c.name == SELL_COUNTER)
        .then(|| SELL_COUNTER.to_string());
    (counters, sell_counter)
}

/// Name of the counter that gives the sell rate.
pub const SELL_COUNTER: &str = "purchases";

impl PublisherConfig {
    /// The publisher's config; `None` without `[mqtt]`. Counters mapped by several
    /// activity tables are merged (union of windows; distinct users if any maps a user).
    pub fn from_config(cfg: &crate::config::Config) -> Option<PublisherConfig> {
        let mqtt = cfg.mqtt.clone()?;
        let (counters, sell_counter) = counter_specs(cfg);
        Some(PublisherConfig {
            mqtt,
            redis_prefix: cfg
                .redis
                .as_ref()
                .map(|r| r.prefix.clone())
                .unwrap_or_else(|| "skusync".into()),
            counters,
            sell_counter,
            scale: cfg.quantity_scale(),
            low_stock: cfg.alerts.low_stock,
            alert_expiry_s: cfg.alerts.mqtt_expiry_s,
        })
    }
}

/// Publisher errors. Only configuration errors are returned (by [`spawn`]); the task
/// retries broker, network and Redis errors itself (with back-off) and returns `Ok` on
/// shutdown. Refused credentials are retried too (the broker's user list may be fixed
/// while skusync runs), logged as a warning on the first failure and every 20th.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// Invalid configuration (URL, CA file, sizes).
    #[error("mqtt config: {0}")]
    Config(String),
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// State messages (including clears and aging republishes) acknowledged.
    pub published: AtomicU64,
    /// Alert messages acknowledged.
    pub alerts_published: AtomicU64,
    /// Messages refused by the broker (PUBACK reason code) or too large to send.
    pub refusals: AtomicU64,
    /// Successful connections after the first.
    pub reconnects: AtomicU64,
    /// Full republishes started because the broker's epoch did not match.
    pub epoch_republishes: AtomicU64,
    /// Connections where the broker held our epoch token with a sequence below the one
    /// stored in Redis (restored from an older persistence file).
    pub epoch_rollbacks: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::published`].
    pub published: u64,
    /// See [`Stats::alerts_published`].
    pub alerts_published: u64,
    /// See [`Stats::refusals`].
    pub refusals: u64,
    /// See [`Stats::reconnects`].
    pub reconnects: u64,
    /// See [`Stats::epoch_republishes`].
    pub epoch_republishes: u64,
    /// See [`Stats::epoch_rollbacks`].
    pub epoch_rollbacks: u64,
}

impl Stats {
    /// Copies the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            published: self.published.load(Ordering::Relaxed),
            alerts_published: self.alerts_published.load(Ordering::Relaxed),
            refusals: self.refusals.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            epoch_republishes: self.epoch_republishes.load(Ordering::Relaxed),
            epoch_rollbacks: self.epoch_rollbacks.load(Ordering::Relaxed),
        }
    }
}

/// Longest [`MqttHandle::pause`] waits for the publisher's round to finish.
const PAUSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Default)]
struct Shared {
    /// Redis is being rebuilt: publish nothing (its states are partial).
    paused: AtomicBool,
    /// Pauses asked for, and the last the loop saw between its turns (`pause_ack`).
    pause_asked: std::sync::atomic::AtomicU64,
    pause_seen: std::sync::atomic::AtomicU64,
    pause_ack: Notify,
    changed: Mutex<HashSet<String>>,
    /// `changed` overflowed its cap and was dropped: scan Redis (the outbox) instead.
    overflow: AtomicBool,
    republish_all: AtomicBool,
    connected: AtomicBool,
    notify: Notify,
    stats: Stats,
    /// The apply is backed up (see [`MqttHandle::set_backed_up`]): publish rounds are
    /// spaced out.
    backed_up: AtomicBool,
}

/// Most SKUs remembered between publisher turns before falling back to a Redis scan.
pub const CHANGED_CAP: usize = 50_000;

/// Handle to the publisher task.
#[derive(Clone, Debug)]
pub struct MqttHandle {
    shared: Arc<Shared>,
}

impl MqttHandle {
    /// SKUs whose hashes changed (call after the Redis apply returned). Never blocks on
    /// MQTT. Pending SKUs are deduplicated and capped: past [`CHANGED_CAP`] the set is
    /// dropped and the publisher scans Redis for unpublished SKUs instead (Redis is the
    /// outbox), so memory stays bounded even when a bulk load touches millions of SKUs.
    pub fn changed(&self, skus: impl IntoIterator<Item = String>) {
        {
            let mut set = self
                .shared
                .changed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !self.shared.overflow.load(Ordering::Relaxed) {
                set.extend(skus);
                if set.len() > CHANGED_CAP {
                    set.clear();
                    set.shrink_to(1024);
                    self.shared.overflow.store(true, Ordering::SeqCst);
                }
            }
        }
        self.shared.notify.notify_one();
    }

    /// Whether the apply is backed up: the stream brings changes faster than Redis takes
    /// them (a large transaction, a backlog). The publisher then starts a round of
    /// reads at most every `mqtt.backed_up_round_ms`, leaving the cores (its own, Redis' and
    /// the broker's share) to the apply: the slot moves sooner, and what the broker
    /// lacks meanwhile is published from Redis once the apply is through.
    pub fn set_backed_up(&self, on: bool) {
        if self.shared.backed_up.swap(on, Ordering::Relaxed) && !on {
            self.shared.notify.notify_one();
        }
    }

    /// Republish every SKU hash (after Redis was rebuilt by a resync).
    pub fn republish_all(&self) {
        self.shared.republish_all.store(true, Ordering::SeqCst);
        self.shared.notify.notify_one();
    }

    /// Stop publishing states and alerts while Redis is rebuilt (reset and reloaded from
    /// a snapshot): its hashes are partial meanwhile and carry the snapshot's LSN, which
    /// the corrected final states share. Acknowledgements of messages already in flight
    /// are still recorded.
    ///
    /// Returns once the publisher is between turns: a round of reads and publishes under
    /// way finishes first (its hashes were read before the reset), so nothing it reads
    /// afterwards comes from a Redis being reset. Bounded: a publisher stuck on its broker
    /// must not hold the rebuild up (it checks the pause before its next round).
    pub async fn pause(&self) {
        let asked = self.shared.pause_asked.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.paused.store(true, Ordering::SeqCst);
        self.shared.notify.notify_one();
        let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
        loop {
            // registered before the check: an acknowledgement in between still wakes it
            let ack = self.shared.pause_ack.notified();
            // disconnected, the loop is not in a round (it only runs one connected)
            if self.shared.pause_seen.load(Ordering::SeqCst) >= asked || !self.is_connected() {
                return;
            }
            if tokio::time::timeout_at(deadline, ack).await.is_err() {
                tracing::warn!(
                    waited_ms = PAUSE_WAIT.as_millis() as u64,
                    "the mqtt publisher did not pause in time; the rebuild goes on (its next round sees the pause)"
                );
                return;
            }
        }
    }

    /// The rebuild finished: republish every SKU from the rebuilt Redis (SKUs the snapshot
    /// no longer holds are cleared).
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
        self.republish_all();
    }

    /// Connected to the broker (CONNACK received, not yet disconnected).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

pub(crate) fn status_topic(prefix: &str) -> String {
    format!("{prefix}/status")
}

pub(crate) fn epoch_topic(prefix: &str) -> String {
    format!("{prefix}/epoch")
}

/// The epoch message's payload: `<token>:<seq>`.
pub fn epoch_payload(token: &str, seq: u64) -> String {
    format!("{token}:{seq}")
}

/// Reads an epoch payload as (token, seq). A payload without a `:` followed by a decimal
/// is a bare token (written before sequences existed) with sequence 0.
pub fn parse_epoch(payload: &str) -> (&str, u64) {
    match payload.rsplit_once(':') {
        Some((token, seq)) if !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()) => {
            match seq.parse() {
                Ok(n) => (token, n),
                Err(_) => (payload, 0),
            }
        }
        _ => (payload, 0),
    }
}

/// The state topic of a SKU.
pub fn sku_topic(prefix: &str, sku: &str) -> String {
    format!("{prefix}/sku/{}", encode_sku(sku))
}

/// The alert topic of a SKU.
pub fn alert_topic(prefix: &str, sku: &str) -> String {
    format!("{prefix}/alerts/{}", encode_sku(sku))
}

/// Starts the publisher task. Fails only on configuration errors; the task connects (and
/// reconnects) by itself and returns on shutdown (after draining in-flight messages for up
/// to a few seconds and publishing `offline`) or on a definite error.
pub async fn spawn(
    cfg: PublisherConfig,
    redis: crate::sinks::redis::RedisCon,
    reader: Option<Arc<crate::sinks::redis::reader::HashReader>>,
    shutdown: CancellationToken,
) -> Result<(MqttHandle, tokio::task::JoinHandle<Result<(), MqttError>>), MqttError> {
    let env_pw = std::env::var(PASSWORD_ENV).ok();
    let mut options = Vec::new();
    for (i, url) in cfg.mqtt.url.all().iter().enumerate() {
        let broker = conn::parse_url(url, env_pw.clone()).map_err(|e| match e {
            MqttError::Config(m) if cfg.mqtt.url.all().len() > 1 => {
                MqttError::Config(m.replacen("mqtt.url", &format!("mqtt.url[{i}]"), 1))
            }
            e => e,
        })?;
        options.push(conn::options(&cfg.mqtt, &broker)?);
    }
    let shared = Arc::new(Shared::default());
    let handle = MqttHandle {
        shared: shared.clone(),
    };
    let task = run::Task::new(cfg, options, redis, reader, shared, shutdown);
    let join = tokio::spawn(task.run());
    Ok((handle, join))
}

#[cfg(test)]
mod epoch_tests {
    use super::*;

    #[test]
    fn an_epoch_payload_reads_back_as_its_token_and_sequence() {
        assert_eq!(parse_epoch(&epoch_payload("00ab", 42)), ("00ab", 42));
        assert_eq!(parse_epoch("00ab:0"), ("00ab", 0));
    }

    #[test]
    fn a_bare_token_from_before_sequences_reads_as_sequence_zero() {
        assert_eq!(parse_epoch("0123456789abcdef"), ("0123456789abcdef", 0));
    }

    #[test]
    fn a_malformed_epoch_sequence_is_part_of_the_token_so_it_never_matches() {
        assert_eq!(parse_epoch("ab:"), ("ab:", 0));
        assert_eq!(parse_epoch("ab:-1"), ("ab:-1", 0));
        assert_eq!(
            parse_epoch("ab:99999999999999999999"),
            ("ab:99999999999999999999", 0)
        );
        assert_eq!(parse_epoch(""), ("", 0));
    }
}
