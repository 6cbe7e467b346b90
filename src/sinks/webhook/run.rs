//! The webhook task: reads the alert history, drives a [`Queue`], POSTs, moves the cursor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sinks::redis::RedisCon;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Failed, Queue, StreamId, WebhookConfig, format_id, parse_id, signature};
use crate::config::Config;
use crate::sinks::layout;
use crate::telemetry::Role;

/// Alerts held per webhook at most (read ahead of delivery).
const WINDOW: usize = 256;
/// How often the history is polled when idle.
const POLL: Duration = Duration::from_millis(200);

/// Moves a webhook's cursor forward only (two instances may overlap during a failover).
const SET_CURSOR: &str = r"
local cur = redis.call('HGET', KEYS[1], 'cursor')
local function parse(s)
  local a, b = string.match(s or '', '^(%d+)-(%d+)$')
  return tonumber(a or '-1'), tonumber(b or '-1')
end
local ca, cb = parse(cur)
local na, nb = parse(ARGV[1])
if na > ca or (na == ca and nb > cb) then
  redis.call('HSET', KEYS[1], 'cursor', ARGV[1])
  return 1
end
return 0
";

/// Start one task per `[[webhook]]`; they deliver only while this instance streams
/// (holds the slot and the writer lock), and stop with `shutdown`.
pub fn spawn(
    cfg: &Config,
    shutdown: CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    if cfg.webhook.is_empty() {
        return Ok(Vec::new());
    }
    let rc = cfg
        .redis
        .as_ref()
        .ok_or("[[webhook]] needs a [redis] section")?;
    let redis = crate::sinks::redis::client(rc.url.all(), rc.cluster, rc.ca_file.as_deref())
        .map_err(|e| e.to_string())?;
    metrics::describe_counter!(
        "skusync_webhook_deliveries_total",
        "Webhook attempts by result: delivered, failed (retried) or dropped (retry budget spent)."
    );
    metrics::describe_counter!(
        "skusync_webhook_trimmed_total",
        "Times the alert history dropped alerts a webhook had not delivered yet."
    );
    metrics::describe_gauge!(
        "skusync_webhook_pending_alerts",
        "Alerts read from the history and not yet delivered or dropped."
    );
    let scale = cfg.quantity_scale();
    let mut out = Vec::new();
    for w in &cfg.webhook {
        let secret = crate::secret::read_key_file(
            &w.secret_file,
            &format!("webhook {:?}: secret_file", w.name),
        )?
        .into_bytes();
        if secret.len() < 32 {
            return Err(format!(
                "webhook {:?}: secret_file {} must hold at least 32 characters (e.g. `openssl rand -hex 32`)",
                w.name,
                w.secret_file.display()
            ));
        }
        // The ring provider, installed by the other TLS users of the process too.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(w.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("skusync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("webhook {:?}: {e}", w.name))?;
        for result in ["delivered", "failed", "dropped"] {
            metrics::counter!("skusync_webhook_deliveries_total", "webhook" => w.name.clone(), "result" => result)
                .absolute(0);
        }
        let task = Task {
            cfg: w.clone(),
            secret: Arc::new(secret),
            http,
            redis: redis.clone(),
            prefix: rc.prefix.clone(),
            scale,
        };
        let sd = shutdown.clone();
        out.push(tokio::spawn(async move { task.run(sd).await }));
    }
    Ok(out)
}

struct Task {
    cfg: WebhookConfig,
    secret: Arc<Vec<u8>>,
    http: reqwest::Client,
    redis: crate::sinks::redis::RedisClient,
    prefix: String,
    scale: u32,
}

/// How an attempt ended.
enum Attempt {
    Ok,
    /// Status or transport error, for the log; `Retry-After` seconds when given.
    Err(String, Option<u64>),
}

impl Task {
    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        // A new webhook starts at the end of the history as it is when skusync starts with
        // it (not with the backlog); done at once, whatever the role, so that no alert
        // raised after the start is skipped.
        loop {
            match self.init_cursor().await {
                Ok(()) => break,
                Err(e) => {
                    warn!(webhook = %self.cfg.name, error = %e, "webhook: Redis failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            if crate::telemetry::current_role() != Role::Streaming {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
            match self.deliver(&shutdown).await {
                // shut down, or no longer streaming: the loop above waits for the role
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    warn!(webhook = %self.cfg.name, error = %e, "webhook: Redis failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Deliver until shutdown (`Ok`) or the role is lost (`Ok` after a pause: the loop
    /// above waits), or Redis fails (`Err`).
    async fn deliver(&self, shutdown: &CancellationToken) -> Result<(), redis::RedisError> {
        let mut con = self.redis.open().await?;
        let key = layout::webhook_key(&self.prefix, &self.cfg.name);
        let alerts = layout::alerts_key(&self.prefix);
        let cursor = redis::cmd("HGET")
            .arg(&key)
            .arg("cursor")
            .query_async::<Option<String>>(&mut con)
            .await?
            .and_then(|c| parse_id(&c))
            .unwrap_or((0, 0));
        let clock = Instant::now();
        let now_ms = || clock.elapsed().as_millis() as u64;
        let mut q = Queue::new(cursor, WINDOW);
        let mut trimmed_seen: StreamId = (0, 0);
        let mut flight = FuturesUnordered::new();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if crate::telemetry::current_role() != Role::Streaming {
                // another instance takes over: it resumes from the cursor
                return Ok(());
            }
            if q.room() > 0 {
                self.read(&mut con, &alerts, &mut q, &mut trimmed_seen, now_ms())
                    .await?;
            }
            for (id, body) in q.due(now_ms(), self.cfg.concurrency) {
                flight.push(self.attempt(id, body));
            }
            let wait = q
                .next_due()
                .map(|d| Duration::from_millis(d.saturating_sub(now_ms())))
                .unwrap_or(POLL)
                .min(POLL);
            tokio::select! {
                Some((id, r)) = flight.next(), if !flight.is_empty() => {
                    self.settle(&mut q, id, r, now_ms());
                    // settle whatever else finished too, then move the cursor once
                    while let Some(Some((id, r))) = futures::FutureExt::now_or_never(flight.next()) {
                        self.settle(&mut q, id, r, now_ms());
                    }
                }
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
            metrics::gauge!("skusync_webhook_pending_alerts", "webhook" => self.cfg.name.clone())
                .set(q.pending() as f64);
            if let Some(c) = q.advance() {
                self.store_cursor(&mut con, &key, c).await?;
            }
        }
    }

    /// Sets the cursor of a webhook that has none to the history's last id.
    async fn init_cursor(&self) -> Result<(), redis::RedisError> {
        let mut con = self.redis.open().await?;
        let key = layout::webhook_key(&self.prefix, &self.cfg.name);
        let last: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
            .arg(layout::alerts_key(&self.prefix))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut con)
            .await?;
        let c = last
            .first()
            .and_then(|(id, _)| parse_id(id))
            .unwrap_or((0, 0));
        let set: bool = redis::cmd("HSETNX")
            .arg(&key)
            .arg("cursor")
            .arg(format_id(c))
            .query_async(&mut con)
            .await?;
        if set {
            info!(webhook = %self.cfg.name, cursor = %format_id(c), "webhook: new; starting at the end of the alert history");
        }
        Ok(())
    }

    async fn read(
        &self,
        con: &mut RedisCon,
        alerts: &str,
        q: &mut Queue,
        trimmed_seen: &mut StreamId,
        now_ms: u64,
    ) -> Result<(), redis::RedisError> {
        let from = q.read_from();
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(alerts)
            .arg(format!("({}", format_id(from)))
            .arg("+")
            .arg("COUNT")
            .arg(q.room());
        pipe.cmd("EXISTS").arg(alerts);
        type Entry = (String, Vec<(String, String)>);
        let (entries, exists): (Vec<Entry>, bool) = pipe.query_async(con).await?;
        if exists {
            // alerts after the read position trimmed from the history before delivery
            let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
                .arg("STREAM")
                .arg(alerts)
                .query_async(con)
                .await?;
            let deleted = crate::sinks::history::max_deleted_id(&info);
            if deleted > from && deleted > *trimmed_seen {
                *trimmed_seen = deleted;
                metrics::counter!("skusync_webhook_trimmed_total", "webhook" => self.cfg.name.clone())
                    .increment(1);
                warn!(webhook = %self.cfg.name, after = %format_id(from), up_to = %format_id(deleted),
                    "webhook: the alert history dropped alerts not yet delivered (raise alerts.history or history_max_age_s)");
                q.skip(deleted);
            }
        }
        for (id, fields) in entries {
            let Some(sid) = parse_id(&id) else { continue };
            let f: HashMap<String, String> = fields.into_iter().collect();
            match crate::sinks::history::alert_of_entry(&self.prefix, &id, &f, self.scale) {
                Some((sku, a)) => q.offer(
                    sid,
                    crate::sinks::mqtt::payload::alert_payload(&sku, &a, self.scale),
                    now_ms,
                ),
                None => q.skip(sid),
            }
        }
        Ok(())
    }

    /// One POST; never panics, never longer than the client's timeout.
    fn attempt(
        &self,
        id: StreamId,
        body: String,
    ) -> impl std::future::Future<Output = (StreamId, Attempt)> + use<> {
        let http = self.http.clone();
        let url = self.cfg.url.clone();
        let secret = self.secret.clone();
        async move {
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let alert_id = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_str().map(super::header_id))
                .unwrap_or_default();
            let sig = signature(&secret, unix, body.as_bytes());
            let r = http
                .post(&url)
                .header("Content-Type", "application/json")
                .header("Idempotency-Key", &alert_id)
                .header("X-Skusync-Alert-Id", &alert_id)
                .header("X-Skusync-Seq", format_id(id))
                .header("X-Skusync-Signature", sig)
                .body(body)
                .send()
                .await;
            let outcome = match r {
                Ok(resp) if resp.status().is_success() => Attempt::Ok,
                Ok(resp) => {
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    Attempt::Err(format!("HTTP {}", resp.status().as_u16()), retry_after)
                }
                Err(e) if e.is_timeout() => Attempt::Err("timed out".into(), None),
                Err(e) if e.is_connect() => Attempt::Err("connection failed".into(), None),
                // not the receiver's doing (e.g. a header value): logged apart from it
                Err(e) if e.is_builder() => {
                    Attempt::Err("the request could not be built".into(), None)
                }
                Err(_) => Attempt::Err("request failed".into(), None),
            };
            (id, outcome)
        }
    }

    fn settle(&self, q: &mut Queue, id: StreamId, r: Attempt, now_ms: u64) {
        let name = self.cfg.name.clone();
        match r {
            Attempt::Ok => {
                q.delivered(id);
                metrics::counter!("skusync_webhook_deliveries_total", "webhook" => name, "result" => "delivered")
                    .increment(1);
            }
            Attempt::Err(why, retry_after) => {
                let attempts = q.attempts(id);
                let mut delay = self.cfg.backoff(attempts);
                if let Some(s) = retry_after {
                    delay = delay.max(Duration::from_secs(s.min(self.cfg.max_backoff_ms / 1000)));
                }
                match q.failed(id, now_ms, self.cfg.max_attempts, delay) {
                    Failed::RetryAt(_) => {
                        metrics::counter!("skusync_webhook_deliveries_total", "webhook" => name, "result" => "failed")
                            .increment(1);
                        if attempts == 1 {
                            info!(webhook = %self.cfg.name, seq = %format_id(id), error = %why, "webhook: delivery failed; retrying with back-off");
                        }
                    }
                    Failed::Dropped => {
                        metrics::counter!("skusync_webhook_deliveries_total", "webhook" => name, "result" => "dropped")
                            .increment(1);
                        warn!(webhook = %self.cfg.name, seq = %format_id(id), attempts, error = %why,
                            "webhook: alert dropped after its retry budget");
                    }
                }
            }
        }
    }

    async fn store_cursor(
        &self,
        con: &mut RedisCon,
        key: &str,
        c: StreamId,
    ) -> Result<(), redis::RedisError> {
        let _: i64 = redis::Script::new(SET_CURSOR)
            .key(key)
            .arg(format_id(c))
            .invoke_async(con)
            .await?;
        Ok(())
    }
}
