//! The clients' catch-up API (`[api]`; the contract is docs/mobile.md): `GET /v1/sku/<SKU>`,
//! `GET /v1/changes?since=`, `GET /v1/alerts?since=`. Read-only and answered from Redis
//! (the SKU hashes, the change index and the alert history the apply script writes),
//! never from PostgreSQL; so a standby instance serves it as well as the active one.
//!
//! Errors are one-line JSON objects and never 500: a Redis that cannot be reached or is
//! being rebuilt answers 503 with `Retry-After`.
//!
//! **Change tokens.** The change index scores each SKU hash key by the commit LSN of its
//! last change. A finished listing hands out `W - 1` (hex), `W` being meta `applied_lsn`
//! when the listing began: every transaction committed below `W` was applied then, so
//! every SKU it changed was listed (or is listed by the next call). A listing cut by
//! `limit` hands out a page token `S.W.L.M` (hex): continue after score `L`, member `M`
//! (ranks are recomputed from that value on every call, so SKUs moving meanwhile neither
//! shift nor hide others). A token below meta `changes_from` (the last rebuild) answers
//! 410.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sinks::redis::RedisCon;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ApiConfig, Config};
use crate::http::{Request, Response};
use crate::sinks::mqtt::payload::{self, Kind, Spec};
use crate::sinks::{history, layout};

/// SKU hashes read and rendered at a time for a `/v1/changes` page.
const CHANGES_CHUNK: usize = 50;
/// A `/v1/changes` page ends at the chunk that takes its body past this many bytes (its
/// `next` continues from there).
const CHANGES_BODY_BUDGET: usize = 1 << 20;

/// Default and largest `limit`.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 500;
/// Rate-limit buckets kept at most (clients idle longest are forgotten first).
const MAX_CLIENTS: usize = 10_000;
/// How long all of one request's Redis round trips (and its first connect) may take:
/// well inside the connection's deadline ([`crate::http::DEADLINE`]), so a slow Redis
/// gets a 503.
const REQUEST_BUDGET: Duration = Duration::from_secs(3);

/// One page of the change index after a position (see the module docs). KEYS[1] the
/// index; ARGV: since score, cursor score ('' for none), cursor member, count. Members of
/// one score are ordered bytewise, as Redis orders them (Lua's `<` follows the locale).
const PAGE_LUA: &str = r"
local k = KEYS[1]
local function lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local start
if ARGV[2] ~= '' then
  local lo = redis.call('ZCOUNT', k, '-inf', '(' .. ARGV[2])
  local hi = lo + redis.call('ZCOUNT', k, ARGV[2], ARGV[2])
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local m = redis.call('ZRANGE', k, mid, mid)[1]
    if lt(ARGV[3], m) then hi = mid else lo = mid + 1 end
  end
  start = lo
else
  start = redis.call('ZCOUNT', k, '-inf', ARGV[1])
end
return redis.call('ZRANGE', k, start, start + tonumber(ARGV[4]) - 1, 'WITHSCORES')
";

/// Everything a request needs.
struct Api {
    cfg: ApiConfig,
    spec: Spec,
    prefix: String,
    redis: crate::sinks::redis::RedisClient,
    con: tokio::sync::Mutex<Option<RedisCon>>,
    key: Option<Vec<u8>>,
    /// `api.trusted_proxies`.
    trusted: Vec<ipnet::IpNet>,
    limiter: Mutex<Limiter>,
    page: redis::Script,
}

/// Bind `[api] listen` and serve until `shutdown`.
pub async fn serve(
    cfg: &Config,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let Some(ac) = cfg.api.clone() else {
        return Err("no [api] section".into());
    };
    let rc = cfg
        .redis
        .as_ref()
        .ok_or("the [api] endpoints need a [redis] section")?;
    let redis = crate::sinks::redis::client(rc.url.all(), rc.cluster, rc.ca_file.as_deref())
        .map_err(|e| e.to_string())?;
    let key = match &ac.token_key_file {
        Some(p) => Some(read_key(p)?),
        None => None,
    };
    if key.is_none() && ac.tokens.is_empty() && !ac.listen.ip().is_loopback() {
        tracing::warn!(listen = %ac.listen, "the [api] endpoints accept anyone: set api.tokens or api.token_key_file");
    }
    let listener = TcpListener::bind(ac.listen)
        .await
        .map_err(|e| format!("api.listen {}: {e}", ac.listen))?;
    tracing::info!(listen = %ac.listen, "client API: /v1/sku /v1/changes /v1/alerts");
    metrics::describe_counter!(
        "skusync_api_rejected_total",
        "Client API connections closed on accept, by the limit reached (api.max_connections, api.max_connections_per_address)."
    );
    metrics::describe_counter!(
        "skusync_api_requests_total",
        "Client API requests answered, by status."
    );
    for limit in ["max_connections", "max_connections_per_address"] {
        metrics::counter!("skusync_api_rejected_total", "limit" => limit).absolute(0);
    }
    let trusted = ac.trusted();
    let limits = crate::http::Limits {
        max: ac.max_connections,
        per_address: Some(ac.max_connections_per_address),
        exempt: trusted.clone(),
        // a path holds a SKU percent-encoded (3 bytes per byte at worst), a page token
        // its hash key in hex (2 per byte of a tag that escapes `{`, `}`, `%` as 3)
        head_bytes: crate::http::MAX_REQUEST + 6 * cfg.limits.max_sku_bytes,
    };
    let api = Arc::new(Api {
        limiter: Mutex::new(Limiter::new(ac.rate_per_s, ac.burst)),
        cfg: ac,
        trusted,
        spec: crate::sinks::mqtt::payload_spec(cfg),
        prefix: rc.prefix.clone(),
        redis,
        con: tokio::sync::Mutex::new(None),
        key,
        page: redis::Script::new(PAGE_LUA),
    });
    Ok(crate::http::serve_with(
        listener,
        limits,
        |r| {
            let limit = match r {
                crate::http::Rejected::Total => "max_connections",
                crate::http::Rejected::PerAddress => "max_connections_per_address",
            };
            metrics::counter!("skusync_api_rejected_total", "limit" => limit).increment(1);
            if r == crate::http::Rejected::PerAddress {
                warn_per_address();
            }
        },
        shutdown,
        move |req| {
            let api = api.clone();
            async move {
                let r = api.handle(req).await;
                metrics::counter!("skusync_api_requests_total", "status" => r.status.to_string())
                    .increment(1);
                r
            }
        },
    ))
}

/// Logs, at most once a minute, that one address reached its connection cap: a slow or
/// greedy client, or a proxy not listed as one (all its clients share its address).
fn warn_per_address() {
    static LAST_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    if crate::telemetry::due(&LAST_MS, 60_000) {
        tracing::warn!(
            "connections from one address reached api.max_connections_per_address; if a proxy sits in front of the API, list it in api.trusted_proxies"
        );
    }
}

fn read_key(p: &std::path::Path) -> Result<Vec<u8>, String> {
    let text = crate::secret::read_key_file(p, "api.token_key_file")?;
    let k = text.as_str();
    if k.len() < 32 {
        return Err(format!(
            "api.token_key_file {}: the key must be at least 32 characters (e.g. `openssl rand -hex 32`)",
            p.display()
        ));
    }
    Ok(k.as_bytes().to_vec())
}

/// A signed bearer token: `v1.<subject>.<expiry unix s>.<hex HMAC-SHA256 of the rest>`.
pub fn sign_token(key: &[u8], subject: &str, expires_unix: u64) -> String {
    let body = format!("v1.{subject}.{expires_unix}");
    format!("{body}.{}", hex::encode(mac(key, &body)))
}

/// Issue a token with the key in `key_file` (the `skusync token` command).
pub fn issue_token(
    key_file: &std::path::Path,
    subject: &str,
    ttl: Duration,
) -> Result<String, String> {
    if !valid_subject(subject) {
        return Err("the subject must be 1-64 characters of A-Z a-z 0-9 _ -".into());
    }
    let key = read_key(key_file)?;
    let exp = crate::telemetry::unix_ms() as u64 / 1000 + ttl.as_secs();
    Ok(sign_token(&key, subject, exp))
}

fn valid_subject(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn mac(key: &[u8], body: &str) -> Vec<u8> {
    // any key length is valid for HMAC
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    m.update(body.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// Constant-time equality (tokens).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The client's address: the peer's, or when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not one (each proxy appends the address it was
/// reached from, so only entries a trusted proxy appended can be believed). An entry
/// that is not an address ends the walk at the last hop believed.
fn client_address(req: &Request, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut client = req.peer.ip().to_canonical();
    if !is_trusted(&client) {
        return client;
    }
    let forwarded: Vec<&str> = req
        .headers
        .iter()
        .filter(|(n, _)| n == "x-forwarded-for")
        .flat_map(|(_, v)| v.split(','))
        .collect();
    for entry in forwarded.iter().rev() {
        let e = entry.trim();
        let Some(ip) = e
            .parse::<IpAddr>()
            .ok()
            .or_else(|| e.parse::<SocketAddr>().ok().map(|a| a.ip()))
        else {
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(&client) {
            break;
        }
    }
    client
}

/// Who is asking, for the rate limit: `Err` is the 401.
fn authorize(
    tokens: &[String],
    key: Option<&[u8]>,
    header: Option<&str>,
    client: IpAddr,
    now_s: u64,
) -> Result<String, &'static str> {
    if tokens.is_empty() && key.is_none() {
        return Ok(format!("ip:{}", crate::http::address_key(client)));
    }
    let Some(h) = header else {
        return Err("missing bearer token");
    };
    let Some((scheme, token)) = h.split_once(' ') else {
        return Err("bad authorization header");
    };
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err("bad authorization header");
    }
    for t in tokens {
        if ct_eq(t.as_bytes(), token.as_bytes()) {
            let id = hex::encode(&mac(b"skusync-client", t)[..6]);
            return Ok(format!("token:{id}"));
        }
    }
    if let Some(key) = key {
        let parts: Vec<&str> = token.split('.').collect();
        if let [v, subject, exp, sig] = parts[..]
            && v == "v1"
            && valid_subject(subject)
        {
            let body = format!("v1.{subject}.{exp}");
            let good = hex::decode(sig).is_ok_and(|s| ct_eq(&s, &mac(key, &body)));
            if good {
                return match exp.parse::<u64>() {
                    Ok(e) if e > now_s => Ok(format!("sub:{subject}")),
                    _ => Err("token expired"),
                };
            }
        }
    }
    Err("bad token")
}

/// Token buckets per client.
struct Limiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, (f64, Instant)>,
}

impl Limiter {
    fn new(rate: f64, burst: u32) -> Limiter {
        Limiter {
            rate,
            burst: f64::from(burst),
            buckets: HashMap::new(),
        }
    }

    /// `Ok` to serve; `Err(seconds)` until the next request is allowed.
    fn take(&mut self, client: &str, now: Instant) -> Result<(), u64> {
        if self.buckets.len() >= MAX_CLIENTS && !self.buckets.contains_key(client) {
            // Forget clients whose buckets refilled (they lose nothing), then the oldest.
            let (rate, burst) = (self.rate, self.burst);
            self.buckets
                .retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < burst);
            if self.buckets.len() >= MAX_CLIENTS
                && let Some(k) = self
                    .buckets
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
            {
                self.buckets.remove(&k);
            }
        }
        let (tokens, at) = self
            .buckets
            .entry(client.to_string())
            .or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// The SKU of a `/v1/sku/<SKU>` path segment: exactly `%` is the empty SKU (as in topic
/// levels), anything else standard percent-decoding (either hex case, any byte escaped
/// or not), so the topic level, `encodeURIComponent` and a URL library's own escaping all
/// name the same SKU; `None` unless the bytes are UTF-8. (A `%` without two hex digits
/// stays a `%`.)
fn sku_of_path(enc: &str) -> Option<String> {
    if enc == crate::sinks::mqtt::EMPTY_SKU_LEVEL {
        return Some(String::new());
    }
    percent_encoding::percent_decode_str(enc)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

fn json_error(status: u16, msg: &str) -> Response {
    let body = serde_json::json!({ "error": msg }).to_string();
    Response::new(status, "application/json", body)
}

/// A change token (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChangeToken {
    /// Exclusive lower bound (a commit LSN); 0: the full listing.
    since: u64,
    /// Continue after (score, member), with the watermark of the listing's start.
    page: Option<(u64, u64, Vec<u8>)>,
    /// Meta `changes_from` when the token was given out (`~<hex>` at its end; absent in
    /// tokens of releases before it): a token from before a rebuild is refused, also
    /// when the rebuilt server's LSNs are lower (a failover to a standby that was behind).
    from: Option<u64>,
}

impl ChangeToken {
    fn parse(s: &str) -> Option<ChangeToken> {
        let hex_u64 = |p: &str| {
            (!p.is_empty() && p.len() <= 16)
                .then(|| u64::from_str_radix(p, 16).ok())
                .flatten()
        };
        let (s, from) = match s.split_once('~') {
            Some((s, f)) => (s, Some(hex_u64(f)?)),
            None => (s, None),
        };
        let parts: Vec<&str> = s.split('.').collect();
        match parts[..] {
            [a] => Some(ChangeToken {
                since: hex_u64(a)?,
                page: None,
                from,
            }),
            [a, w, l, m] => Some(ChangeToken {
                since: hex_u64(a)?,
                page: Some((hex_u64(w)?, hex_u64(l)?, hex::decode(m).ok()?)),
                from,
            }),
            _ => None,
        }
    }

    fn encode(&self) -> String {
        let from = self.from.map(|f| format!("~{f:x}")).unwrap_or_default();
        match &self.page {
            None => format!("{:x}{from}", self.since),
            Some((w, l, m)) => format!("{:x}.{w:x}.{l:x}.{}{from}", self.since, hex::encode(m)),
        }
    }
}

/// `limit`: default, or 1..=MAX_LIMIT.
fn parse_limit(req: &Request) -> Result<usize, Response> {
    match req.param("limit") {
        Err(crate::http::BadEncoding) => Err(json_error(400, "limit: bad encoding")),
        Ok(None) => Ok(DEFAULT_LIMIT),
        Ok(Some(v)) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(json_error(
                400,
                &format!("limit: must be a whole number from 1 to {MAX_LIMIT}"),
            )),
        },
    }
}

impl Api {
    async fn handle(&self, req: Request) -> Response {
        let resp = self.dispatch(&req).await;
        match &self.cfg.cors_origin {
            Some(o) => resp
                .with("Access-Control-Allow-Origin", o.clone())
                // without it a page's script cannot read them (back-off, revalidation)
                .with("Access-Control-Expose-Headers", "ETag, Retry-After")
                .with("Vary", "Origin"),
            None => resp,
        }
    }

    async fn dispatch(&self, req: &Request) -> Response {
        if req.method == "OPTIONS" {
            // CORS preflight: the browser asks before sending Authorization
            return Response::new(204, "text/plain", "")
                .with("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
                .with(
                    "Access-Control-Allow-Headers",
                    "Authorization, If-None-Match",
                )
                .with("Access-Control-Max-Age", "600");
        }
        if req.method != "GET" && req.method != "HEAD" {
            return json_error(405, "method not allowed: the API is read-only")
                .with("Allow", "GET, HEAD, OPTIONS");
        }
        let client = match authorize(
            &self.cfg.tokens,
            self.key.as_deref(),
            req.header("authorization"),
            client_address(req, &self.trusted),
            crate::telemetry::unix_ms() as u64 / 1000,
        ) {
            Ok(c) => c,
            Err(why) => return json_error(401, why).with("WWW-Authenticate", "Bearer"),
        };
        let limited = self
            .limiter
            .lock()
            .map(|mut l| l.take(&client, Instant::now()))
            .unwrap_or(Ok(()));
        if let Err(wait) = limited {
            return json_error(429, "rate limit: slow down").with("Retry-After", wait.to_string());
        }
        let routed = async {
            if let Some(enc) = req.path.strip_prefix("/v1/sku/") {
                self.sku(req, enc).await
            } else if req.path == "/v1/changes" {
                self.changes(req).await
            } else if req.path == "/v1/alerts" {
                self.alerts(req).await
            } else {
                Ok(json_error(
                    404,
                    "no such endpoint: /v1/sku/<SKU>, /v1/changes, /v1/alerts",
                ))
            }
        };
        // A request makes up to four round trips: one budget for them all makes a slow
        // Redis answer 503 before the connection's deadline cuts it off.
        let result = tokio::time::timeout(REQUEST_BUDGET, routed)
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "the request's Redis budget ran out",
                )))
            });
        result.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "client API: Redis");
            json_error(503, "Redis unavailable: try again").with("Retry-After", "1")
        })
    }

    /// A connection (made on first use, kept).
    async fn con(&self) -> Result<RedisCon, redis::RedisError> {
        let mut g = self.con.lock().await;
        if let Some(c) = &*g {
            return Ok(c.clone());
        }
        let c = self.redis.open().await?;
        *g = Some(c.clone());
        Ok(c)
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, redis::RedisError> {
        let mut con = self.con().await?;
        pipe.query_async(&mut con).await
    }

    /// Builds the JSON of each SKU from its hash (`None`: no hash), reading distinct
    /// users in one more round trip.
    async fn render(
        &self,
        items: Vec<(String, HashMap<String, String>)>,
        now_ms: i64,
    ) -> Result<Vec<Option<(String, String)>>, redis::RedisError> {
        let mut pipe = redis::pipe();
        let mut names = Vec::with_capacity(items.len());
        for (sku, fields) in &items {
            names.push(payload::users_queries(
                &self.spec,
                &self.prefix,
                sku,
                fields,
                now_ms,
                &mut pipe,
            ));
        }
        let counts: Vec<i64> = if names.iter().all(|n| n.replies() == 0) {
            Vec::new()
        } else {
            self.query(&pipe).await?
        };
        let mut counts = counts.into_iter();
        let mut out = Vec::with_capacity(items.len());
        for ((sku, fields), names) in items.into_iter().zip(names) {
            if fields.is_empty() {
                out.push(None);
                continue;
            }
            if payload::is_gone(&fields) {
                let rev = payload::rev_of(&fields, now_ms);
                out.push(Some((payload::gone_object(&sku, &rev), rev)));
                continue;
            }
            let users = names.counts(&mut counts);
            let msg =
                payload::state_message(&self.spec, &sku, &fields, &users, now_ms, Kind::Current);
            // the ETag: everything but the read time
            let unread = msg.payload.replacen(&msg.rev, "", 1);
            let tag = format!("{}-{:08x}", &msg.rev[..24], layout::fnv1a(&unread));
            out.push(Some((msg.payload, tag)));
        }
        Ok(out)
    }

    /// Meta `bootstrap`, `applied_lsn`, `changes_from`; `Err(503)` while rebuilding (or
    /// while a Redis of a release before the change index gets it built).
    async fn meta(&self) -> Result<Result<(u64, u64), Response>, redis::RedisError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(layout::meta_key(&self.prefix))
            .arg("bootstrap")
            .arg("applied_lsn")
            .arg("changes_from");
        let (m,): ((Option<String>, Option<u64>, Option<u64>),) = self.query(&pipe).await?;
        if m.0.as_deref() != Some("done") {
            return Ok(Err(json_error(
                503,
                "Redis is being rebuilt from a snapshot: try again",
            )
            .with("Retry-After", "5")));
        }
        let Some(from) = m.2 else {
            return Ok(Err(json_error(
                503,
                "the change index is being built: try again",
            )
            .with("Retry-After", "5")));
        };
        Ok(Ok((m.1.unwrap_or(0), from)))
    }

    async fn sku(&self, req: &Request, enc: &str) -> Result<Response, redis::RedisError> {
        let Some(sku) = sku_of_path(enc) else {
            return Ok(json_error(
                400,
                "the SKU in the path is not percent-encoded UTF-8 (encode it as in the topic)",
            ));
        };
        if let Err(r) = self.meta().await? {
            return Ok(r);
        }
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(layout::sku_key(&self.prefix, &sku));
        let (fields,): (HashMap<String, String>,) = self.query(&pipe).await?;
        let now = crate::telemetry::unix_ms();
        let Some((body, tag)) = self.render(vec![(sku, fields)], now).await?.pop().flatten() else {
            return Ok(json_error(404, "unknown SKU"));
        };
        let etag = format!("\"{tag}\"");
        let matches = req.header("if-none-match").is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == etag || t.trim() == format!("W/{etag}") || t.trim() == "*")
        });
        let status = if matches { 304 } else { 200 };
        Ok(Response::new(status, "application/json", body).with("ETag", etag))
    }

    async fn changes(&self, req: &Request) -> Result<Response, redis::RedisError> {
        let limit = match parse_limit(req) {
            Ok(l) => l,
            Err(r) => return Ok(r),
        };
        let token = match req.param("since") {
            Err(crate::http::BadEncoding) => return Ok(json_error(400, "since: bad encoding")),
            Ok(None) => None,
            Ok(Some(t)) => match ChangeToken::parse(&t) {
                Some(t) => Some(t),
                None => {
                    return Ok(json_error(
                        400,
                        "since: not a token from /v1/changes (send `next` back unchanged)",
                    ));
                }
            },
        };
        let (applied, from) = match self.meta().await? {
            Ok(m) => m,
            Err(r) => return Ok(r),
        };
        let token = token.unwrap_or(ChangeToken {
            since: 0,
            page: None,
            from: Some(from),
        });
        if token.from.is_some_and(|f| f != from)
            || (token.since != 0 && token.since.saturating_add(1) < from)
        {
            return Ok(json_error(
                410,
                "token older than the change index (Redis was rebuilt): take the full state, GET /v1/changes without since",
            ));
        }
        let watermark = token.page.as_ref().map_or(applied, |p| p.0);
        let mut inv = self.page.prepare_invoke();
        inv.key(layout::changes_key(&self.prefix)).arg(token.since);
        match &token.page {
            Some((_, l, m)) => inv.arg(*l).arg(&m[..]),
            None => inv.arg("").arg(""),
        };
        inv.arg(limit + 1);
        let mut con = self.con().await?;
        let raw: Vec<(Vec<u8>, f64)> = inv.invoke_async(&mut con).await?;
        let mut more = raw.len() > limit;
        let page: Vec<(Vec<u8>, u64)> = raw
            .into_iter()
            .take(limit)
            .map(|(m, s)| (m, s as u64))
            .collect();
        // SKU hashes are read and rendered a chunk at a time, and the page ends early
        // once the body passes its budget: a request's memory follows the chunk and the
        // budget, not `limit` times the largest hash (a SKU with thousands of rows).
        let mut jsons: Vec<String> = Vec::new();
        let mut body_bytes = 0usize;
        let mut last: Option<usize> = None;
        let now = crate::telemetry::unix_ms();
        for (c, chunk) in page.chunks(CHANGES_CHUNK).enumerate() {
            if body_bytes > CHANGES_BODY_BUDGET {
                break;
            }
            let mut items = Vec::with_capacity(chunk.len());
            let mut pipe = redis::pipe();
            for (member, _) in chunk {
                let key = String::from_utf8_lossy(member).into_owned();
                if let Some(sku) = layout::sku_of_key(&self.prefix, &key) {
                    pipe.cmd("HGETALL").arg(&key);
                    items.push(sku);
                }
            }
            let hashes: Vec<HashMap<String, String>> = if items.is_empty() {
                Vec::new()
            } else {
                self.query(&pipe).await?
            };
            let rendered = self
                .render(items.into_iter().zip(hashes).collect(), now)
                .await?;
            for (json, _) in rendered.into_iter().flatten() {
                body_bytes += json.len() + 1;
                jsons.push(json);
            }
            last = Some(c * CHANGES_CHUNK + chunk.len() - 1);
        }
        if let Some(l) = last
            && l + 1 < page.len()
        {
            more = true;
        }
        let page_end = last.and_then(|l| page.get(l));
        let next = match (more, page_end) {
            (true, Some((m, l))) => ChangeToken {
                since: token.since,
                page: Some((watermark, *l, m.clone())),
                from: Some(from),
            },
            _ => ChangeToken {
                since: watermark.saturating_sub(1).max(token.since),
                page: None,
                from: Some(from),
            },
        };
        let mut body = String::with_capacity(64 + body_bytes);
        body.push_str("{\"changes\":[");
        let mut first = true;
        for json in jsons {
            if !first {
                body.push(',');
            }
            first = false;
            body.push_str(&json);
        }
        body.push_str("],\"next\":");
        body.push_str(&serde_json::Value::from(next.encode()).to_string());
        body.push_str(",\"more\":");
        body.push_str(if more { "true" } else { "false" });
        body.push('}');
        Ok(Response::new(200, "application/json", body))
    }

    async fn alerts(&self, req: &Request) -> Result<Response, redis::RedisError> {
        let limit = match parse_limit(req) {
            Ok(l) => l,
            Err(r) => return Ok(r),
        };
        let since = match req.param("since") {
            Err(crate::http::BadEncoding) => return Ok(json_error(400, "since: bad encoding")),
            Ok(None) => None,
            Ok(Some(t)) => match history::parse_id(&t) {
                Some(id) => Some(id),
                None => {
                    return Ok(json_error(
                        400,
                        "since: not an alert seq (`<ms>-<n>`, from an alert or `next`)",
                    ));
                }
            },
        };
        let key = layout::alerts_key(&self.prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(&key);
        let start = match since {
            Some((a, b)) => format!("({a}-{b}"),
            None => "-".into(),
        };
        pipe.cmd("XRANGE")
            .arg(&key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(limit + 1);
        type Entry = (String, Vec<(String, String)>);
        let (exists, entries): (bool, Vec<Entry>) = self.query(&pipe).await?;
        if let Some(s) = since
            && exists
        {
            // Entries after `since` were trimmed: the client missed them.
            let mut p = redis::pipe();
            p.cmd("XINFO").arg("STREAM").arg(&key);
            let (info,): (HashMap<String, redis::Value>,) = self.query(&p).await?;
            let deleted = history::max_deleted_id(&info);
            if deleted > s {
                return Ok(json_error(
                    410,
                    "alerts after since were dropped from the history (bounded by alerts.history and history_max_age_s)",
                ));
            }
        }
        let mut last = since.map(|(a, b)| format!("{a}-{b}"));
        if since.is_none() && exists && entries.is_empty() {
            // Every alert was trimmed: `next` is past them, or the next call (`since`
            // 0-0, below what was dropped) would answer 410 again and again.
            let mut p = redis::pipe();
            p.cmd("XINFO").arg("STREAM").arg(&key);
            let (info,): (HashMap<String, redis::Value>,) = self.query(&p).await?;
            let deleted = history::max_deleted_id(&info);
            if deleted > (0, 0) {
                last = Some(history::format_id(deleted));
            }
        }
        let more = entries.len() > limit;
        let mut body = String::from("{\"alerts\":[");
        let mut first = true;
        for (id, fields) in entries.into_iter().take(limit) {
            let f: HashMap<String, String> = fields.into_iter().collect();
            last = Some(id.clone());
            let Some(a) = history::alert_of_entry(&self.prefix, &id, &f, self.spec.scale) else {
                continue;
            };
            if !first {
                body.push(',');
            }
            first = false;
            body.push_str(&payload::alert_payload(&a.0, &a.1, self.spec.scale));
        }
        body.push_str("],\"next\":");
        body.push_str(&serde_json::Value::from(last.unwrap_or_else(|| "0-0".into())).to_string());
        body.push_str(",\"more\":");
        body.push_str(if more { "true" } else { "false" });
        body.push('}');
        Ok(Response::new(200, "application/json", body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> IpAddr {
        "10.0.0.7".parse().unwrap()
    }

    fn via(peer: &str, forwarded: &[&str], trusted: &[&str]) -> String {
        let mut head = "GET /v1/changes HTTP/1.1\r\n".to_string();
        for f in forwarded {
            head.push_str(&format!("X-Forwarded-For: {f}\r\n"));
        }
        head.push_str("\r\n");
        let req = Request::parse(head.as_bytes(), peer.parse().unwrap()).unwrap();
        let trusted: Vec<ipnet::IpNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        client_address(&req, &trusted).to_string()
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        // untrusted peer: its header is ignored
        assert_eq!(via("203.0.113.9:1", &["198.51.100.1"], &[]), "203.0.113.9");
        assert_eq!(
            via("203.0.113.9:1", &["198.51.100.1"], &["10.0.0.0/8"]),
            "203.0.113.9"
        );
        // a trusted proxy names the client; a spoofed left part is skipped
        assert_eq!(
            via("10.0.0.2:1", &["1.2.3.4, 198.51.100.1"], &["10.0.0.0/8"]),
            "198.51.100.1"
        );
        // proxies in a chain, over several header lines, with a port, IPv4 in IPv6
        assert_eq!(
            via(
                "10.0.0.2:1",
                &["1.2.3.4", "198.51.100.1:443, 10.0.0.3"],
                &["10.0.0.0/8"]
            ),
            "198.51.100.1"
        );
        assert_eq!(
            via("[::ffff:10.0.0.2]:1", &["2001:db8::1"], &["10.0.0.2/32"]),
            "2001:db8::1"
        );
        // garbage ends the walk at the last hop believed; no header: the proxy
        assert_eq!(
            via("10.0.0.2:1", &["198.51.100.1, nonsense"], &["10.0.0.0/8"]),
            "10.0.0.2"
        );
        assert_eq!(
            via("10.0.0.2:1", &["nonsense, 10.0.0.5"], &["10.0.0.0/8"]),
            "10.0.0.5"
        );
        assert_eq!(via("10.0.0.2:1", &[], &["10.0.0.0/8"]), "10.0.0.2");
    }

    #[test]
    fn open_api_limits_by_address() {
        assert_eq!(
            authorize(&[], None, None, peer(), 0),
            Ok("ip:10.0.0.7".into())
        );
    }

    #[test]
    fn static_tokens_and_signed_tokens_are_checked() {
        let tokens = vec!["0123456789abcdef-static".to_string()];
        let key = b"k".repeat(32);
        let ok = authorize(
            &tokens,
            Some(&key),
            Some("Bearer 0123456789abcdef-static"),
            peer(),
            0,
        );
        assert!(ok.unwrap().starts_with("token:"));
        assert_eq!(
            authorize(&tokens, Some(&key), Some("Bearer nope"), peer(), 0),
            Err("bad token")
        );
        assert_eq!(
            authorize(&tokens, None, None, peer(), 0),
            Err("missing bearer token")
        );
        assert_eq!(
            authorize(&tokens, None, Some("Basic abc"), peer(), 0),
            Err("bad authorization header")
        );
        let t = sign_token(&key, "phone-1", 2_000);
        assert_eq!(
            authorize(&[], Some(&key), Some(&format!("bearer {t}")), peer(), 1_999),
            Ok("sub:phone-1".into())
        );
        assert_eq!(
            authorize(&[], Some(&key), Some(&format!("Bearer {t}")), peer(), 2_000),
            Err("token expired")
        );
        // another key, a changed subject or expiry: bad
        let other = sign_token(&b"x".repeat(32), "phone-1", 2_000);
        assert_eq!(
            authorize(&[], Some(&key), Some(&format!("Bearer {other}")), peer(), 0),
            Err("bad token")
        );
        let forged = t.replace(".2000.", ".9999.");
        assert_eq!(
            authorize(
                &[],
                Some(&key),
                Some(&format!("Bearer {forged}")),
                peer(),
                0
            ),
            Err("bad token")
        );
    }

    #[test]
    fn buckets_refill_at_the_rate() {
        let mut l = Limiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take("a", t0).is_ok());
        }
        assert_eq!(l.take("a", t0), Err(1));
        assert!(l.take("b", t0).is_ok(), "clients are limited apart");
        assert!(l.take("a", t0 + Duration::from_millis(600)).is_ok());
    }

    #[test]
    fn the_limiter_forgets_clients_beyond_its_cap() {
        let mut l = Limiter::new(1.0, 1);
        let t0 = Instant::now();
        for i in 0..MAX_CLIENTS + 5 {
            let _ = l.take(&format!("c{i}"), t0);
        }
        assert!(l.buckets.len() <= MAX_CLIENTS);
    }

    #[test]
    fn change_tokens_round_trip_and_reject_junk() {
        let t = ChangeToken {
            since: 0x1a3f2c8,
            page: Some((0x1a40000, 0x1a3f000, b"p:{a.b}".to_vec())),
            from: Some(0x1a00000),
        };
        assert_eq!(ChangeToken::parse(&t.encode()), Some(t));
        let f = ChangeToken {
            since: 5,
            page: None,
            from: None,
        };
        // a token of a release before `~<changes_from>`
        assert_eq!(ChangeToken::parse("5"), Some(f));
        let g = ChangeToken {
            since: 5,
            page: None,
            from: Some(3),
        };
        assert_eq!(ChangeToken::parse("5~3"), Some(g));
        for junk in [
            "",
            "x",
            "1.2",
            "1.2.3.zz",
            "11111111111111111",
            "-1",
            "1..2.3",
            "5~",
            "5~x",
            "5~1~2",
        ] {
            assert_eq!(ChangeToken::parse(junk), None, "{junk:?}");
        }
    }
}
