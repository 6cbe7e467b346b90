//! The TOML configuration. Every key is documented here and in docs/configuration.md (the
//! test `tests/it/config_reference.rs` checks it); unknown keys are errors, and every error
//! names the key.

pub mod webhook;

use crate::names;
use crate::pg::connstr::PgConnectConfig;
use crate::secret::{Secret, credential, read_credential, redact_url};
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

/// A configuration error, already phrased for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[postgres]`: the source database.
    pub postgres: PostgresConfig,
    /// `[redis]`: where the counters live.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// `[mqtt]`: where mobile apps subscribe.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// `[[inventory]]`: stock tables (absolute quantities per row).
    #[serde(default)]
    pub inventory: Vec<InventoryMap>,
    /// `[[activity]]`: append-only activity logs (counted events).
    #[serde(default)]
    pub activity: Vec<ActivityMap>,
    /// `[alerts]`: low-stock thresholds.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// `[http]`: the monitoring endpoints (off when absent).
    #[serde(default)]
    pub http: Option<HttpConfig>,
    /// `[api]`: the clients' read-only catch-up endpoints (off when absent).
    #[serde(default)]
    pub api: Option<ApiConfig>,
    /// `[[webhook]]`: HTTP receivers of every alert (push bridges).
    #[serde(default)]
    pub webhook: Vec<webhook::WebhookConfig>,
    /// `[limits]`: bounds on what the database's rows can make skusync store.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The HMAC key from the systemd credential `user-key` (not a config key).
    #[serde(skip)]
    pub user_key_credential: Option<Secret<String>>,
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Longest SKU (UTF-8 bytes) skusync keeps; rows with a longer one count nowhere and
    /// are reported as skipped values. Activity rows create SKUs: if an application logs
    /// SKUs taken from URLs, this bounds what anonymous users can make skusync store.
    #[serde(default = "default_max_sku_bytes")]
    pub max_sku_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sku_bytes: default_max_sku_bytes(),
        }
    }
}

fn default_max_sku_bytes() -> usize {
    256
}

/// The largest `max_sku_bytes`: a percent-encoded SKU (3 bytes per byte at worst) must
/// fit an MQTT topic (65,535 bytes) with its prefix.
pub const MAX_SKU_BYTES_LIMIT: usize = 16_384;

/// `[http]`: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on, e.g. `127.0.0.1:9187`.
    pub listen: std::net::SocketAddr,
}

/// `[api]`: `/v1/sku`, `/v1/changes`, `/v1/alerts` for clients (see docs/mobile.md).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on, e.g. `0.0.0.0:8080`.
    pub listen: std::net::SocketAddr,
    /// Static bearer tokens accepted (any of them). With neither this nor `token_key_file`,
    /// the API is open.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// File holding the HMAC-SHA256 key of signed tokens (`skusync token` issues them).
    #[serde(default)]
    pub token_key_file: Option<std::path::PathBuf>,
    /// Requests per second allowed per client (token subject, else address), sustained.
    #[serde(default = "default_api_rate")]
    pub rate_per_s: f64,
    /// Requests a client may make at once above the rate.
    #[serde(default = "default_api_burst")]
    pub burst: u32,
    /// `Access-Control-Allow-Origin` sent to browsers (`"*"` or one origin); none when absent.
    #[serde(default)]
    pub cors_origin: Option<String>,
    /// Connections served at once; more are closed on accept.
    #[serde(default = "default_api_connections")]
    pub max_connections: usize,
    /// Connections from one address at once (trusted proxies excepted); more are closed
    /// on accept.
    #[serde(default = "default_api_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Proxies (addresses or CIDR blocks) whose `X-Forwarded-For` names the client for the
    /// rate limit; they are exempt from `max_connections_per_address`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

impl ApiConfig {
    /// `trusted_proxies` parsed (validated at load, so entries that do not parse are
    /// never here).
    pub fn trusted(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies
            .iter()
            .filter_map(|t| parse_net(t))
            .collect()
    }
}

/// An address (`10.0.0.1`, `::1`) or a CIDR block (`10.0.0.0/8`). An IPv4-mapped IPv6
/// block (`::ffff:10.0.0.0/104`) becomes the IPv4 one: peers are compared as IPv4.
fn parse_net(t: &str) -> Option<ipnet::IpNet> {
    let t = t.trim();
    let net = t
        .parse::<ipnet::IpNet>()
        .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .ok()?;
    Some(match net {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(ipnet::IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    })
}

fn default_api_rate() -> f64 {
    10.0
}
fn default_api_burst() -> u32 {
    40
}
fn default_api_connections() -> usize {
    256
}
fn default_api_connections_per_address() -> usize {
    32
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("token_key_file", &self.token_key_file)
            .field("rate_per_s", &self.rate_per_s)
            .field("burst", &self.burst)
            .field("cors_origin", &self.cors_origin)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_address",
                &self.max_connections_per_address,
            )
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

/// `[mqtt] format`: how payloads are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// Compact JSON (`application/json`).
    #[default]
    Json,
    /// CBOR, RFC 8949, with the same members (`application/cbor`).
    Cbor,
}

/// `[redis]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db` or `rediss://` for TLS. The password may
    /// instead come from `SKUSYNC_REDIS_PASSWORD`. With `cluster = true`, one seed node of
    /// the cluster or a list of them.
    pub url: Urls,
    /// `url` names a Redis Cluster (its seed nodes): SKU entries are applied per slot.
    #[serde(default)]
    pub cluster: bool,
    /// Key prefix: SKU hashes are `<prefix>:{<SKU>}` (see `sinks::layout`), the meta hash
    /// `<prefix>:meta`.
    #[serde(default = "default_name")]
    pub prefix: String,
    /// Most changes folded into one piece of a transaction before it is applied; bounds
    /// memory for huge transactions (pieces are fenced by (commit LSN, piece number)).
    #[serde(default = "default_piece_changes")]
    pub max_changes_per_piece: u64,
    /// Most SKU entries merged into one batch while backlogged (a batch goes to Redis as
    /// script calls of at most 500 entries, `daemon::CALL_ENTRIES`).
    #[serde(default = "default_batch_skus")]
    pub max_batch_skus: usize,
    /// CA file for `rediss://` (PEM); the system trust store when absent.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// `[mqtt]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://[user:password@]host:port` or `mqtts://` for TLS, or a list of them for
    /// failover (the first that answers is used). The password may instead come from
    /// `SKUSYNC_MQTT_PASSWORD`.
    pub url: Urls,
    /// MQTT client id (one active skusync per id).
    #[serde(default = "default_name")]
    pub client_id: String,
    /// Topics are `<topic_prefix>/sku/<SKU>`, `<topic_prefix>/alerts/<SKU>`, `<topic_prefix>/status`.
    #[serde(default = "default_name")]
    pub topic_prefix: String,
    /// Per-SKU publish throttle: at most one message per SKU per interval.
    #[serde(default = "default_min_interval")]
    pub min_interval_ms: u64,
    /// CA file for `mqtts://` (PEM); the system trust store when absent.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Most republishes per second of SKUs whose window values aged (no new events).
    #[serde(default = "default_age_rate")]
    pub window_republish_per_s: u32,
    /// While the apply is backed up (a large transaction, a backlog), the publisher
    /// starts a round of reads at most this often, leaving the cores to the apply; `0`
    /// publishes at full speed regardless.
    #[serde(default = "default_backed_up_round")]
    pub backed_up_round_ms: u64,
    /// Largest MQTT packet skusync sends or accepts.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// Payload encoding: `json` or `cbor`.
    #[serde(default)]
    pub format: PayloadFormat,
}

/// `mqtt.url` and `redis.url`: one URL or a list (brokers for failover, in order; the seed
/// nodes of a Redis Cluster). Dereferences to the first, which tools that talk to one
/// broker (`check`, `verify`) use.
#[derive(Clone, PartialEq, Eq)]
pub struct Urls(Vec<String>);

impl Urls {
    /// Every URL, in order (at least one).
    pub fn all(&self) -> &[String] {
        &self.0
    }
}

impl From<String> for Urls {
    fn from(s: String) -> Urls {
        Urls(vec![s])
    }
}

impl std::ops::Deref for Urls {
    type Target = str;
    fn deref(&self) -> &str {
        self.0.first().map_or("", String::as_str)
    }
}

impl<'de> Deserialize<'de> for Urls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Urls, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d)? {
            OneOrMany::One(s) => Ok(Urls(vec![s])),
            OneOrMany::Many(v) if v.is_empty() => {
                Err(serde::de::Error::custom("a list of at least one URL"))
            }
            OneOrMany::Many(v) => Ok(Urls(v)),
        }
    }
}

/// `[alerts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Default low-stock threshold on `available` (per-SKU thresholds come from an
    /// inventory table's `low_stock` column when mapped).
    #[serde(default = "default_low_stock")]
    pub low_stock: i64,
    /// Most alerts kept in the alert history (`/v1/alerts`, webhooks).
    #[serde(default = "default_alert_history")]
    pub history: u64,
    /// Oldest alert kept in the history, in seconds (0: bounded by count only).
    #[serde(default = "default_alert_history_age")]
    pub history_max_age_s: u64,
    /// MQTT message expiry of alert messages, in seconds (0: none).
    #[serde(default = "default_alert_expiry")]
    pub mqtt_expiry_s: u32,
}

fn default_alert_history() -> u64 {
    10_000
}
fn default_alert_history_age() -> u64 {
    7 * 86_400
}
fn default_alert_expiry() -> u32 {
    3600
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            low_stock: default_low_stock(),
            history: default_alert_history(),
            history_max_age_s: default_alert_history_age(),
            mqtt_expiry_s: default_alert_expiry(),
        }
    }
}

/// `[[inventory]]`: one stock table.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryMap {
    /// `schema.table`.
    pub table: String,
    /// Column whose text form is the SKU, or a lookup through a referenced table
    /// (`{ from = "public.variant", on = "variant_id", column = "sku" }`).
    pub sku: ValueSource,
    /// Optional location column (or lookup): stock is kept per (SKU, location) as well.
    #[serde(default)]
    pub location: Option<ValueSource>,
    /// Quantity on hand: int2/int4/int8/numeric holding whole numbers (or a list of
    /// such columns, summed).
    pub on_hand: Columns,
    /// Optional reserved quantity (same types; a list is summed).
    #[serde(default)]
    pub reserved: Option<Columns>,
    /// Optional per-SKU low-stock threshold column (same types).
    #[serde(default)]
    pub low_stock: Option<String>,
    /// Row filter: conditions ANDed (`["deleted_at IS NULL"]`); rows that fail count
    /// nowhere (see `filter`). Omitted from the fingerprint when empty.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<String>,
    /// Fractional digits its quantities may have (0 to 9); absent: whole numbers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<u32>,
}

/// A quantity: one column, or several whose values are summed
/// (`reserved = ["reserved_qty", "reserved_qty_for_production"]`, ERPNext's `tabBin`).
/// A row where any of them is unusable is skipped whole.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum Columns {
    One(String),
    Sum(Vec<String>),
}

impl Columns {
    /// The column names, in order.
    pub fn names(&self) -> &[String] {
        match self {
            Columns::One(c) => std::slice::from_ref(c),
            Columns::Sum(v) => v,
        }
    }

    /// For messages and metrics labels: `a` or `a+b`.
    pub fn label(&self) -> String {
        self.names().join("+")
    }
}

impl From<&str> for Columns {
    fn from(c: &str) -> Columns {
        Columns::One(c.to_string())
    }
}

/// A value of a mapped row: one of its columns, or a value taken from a referenced row.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum ValueSource {
    /// A column of the mapped table (its text form).
    Column(String),
    /// A lookup: `{ from, on, key, column, where, then }`.
    Lookup(Box<Lookup>),
}

impl ValueSource {
    /// The column, when the value is one of the mapped row's own.
    pub fn column(&self) -> Option<&str> {
        match self {
            ValueSource::Column(c) => Some(c),
            ValueSource::Lookup(_) => None,
        }
    }

    /// The lookup, when the value is taken from a referenced row.
    pub fn lookup(&self) -> Option<&Lookup> {
        match self {
            ValueSource::Column(_) => None,
            ValueSource::Lookup(l) => Some(l),
        }
    }

    /// For messages and metric labels: the column, or `on->table.column`.
    pub fn label(&self) -> String {
        match self {
            ValueSource::Column(c) => c.clone(),
            ValueSource::Lookup(l) => {
                let mut s = l.on.label();
                let mut hop = Some(&**l);
                while let Some(h) = hop {
                    s.push_str("->");
                    s.push_str(&h.from);
                    if let Some(c) = &h.column {
                        s.push('.');
                        s.push_str(c);
                    }
                    hop = h.then.as_deref();
                }
                s
            }
        }
    }
}

impl From<&str> for ValueSource {
    fn from(c: &str) -> ValueSource {
        ValueSource::Column(c.to_string())
    }
}

/// One hop of a lookup: the row of `from` whose `key` equals the value of `on`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Lookup {
    /// The referenced table, `schema.table`.
    pub from: String,
    /// The column holding the reference: of the mapped table on the first hop, of the
    /// previous hop's table after it; or `{ json, path }`, a member of a JSON column
    /// (activity tables, first hop).
    pub on: RefSource,
    /// The referenced table's column the reference matches (default: the single column
    /// of its replica identity's key, usually the primary key). Must be unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The column whose text is the value (required on the last hop; with `then` the
    /// value comes from the further hop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// Conditions on the referenced row (as a table's `where`); a row that fails
    /// resolves to nothing.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<String>,
    /// A further hop, whose `on` is a column of this hop's table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then: Option<Box<Lookup>>,
}

impl Lookup {
    /// The hops, first to last.
    pub fn hops(&self) -> Vec<&Lookup> {
        let mut v = vec![self];
        while let Some(n) = v.last().and_then(|h| h.then.as_deref()) {
            v.push(n);
        }
        v
    }
}

/// Where a lookup's reference comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum RefSource {
    /// A column (its text form).
    Column(String),
    /// A member of a json/jsonb column: `path` is a member name, or several joined by
    /// `.` (`"product.variant_id"`).
    Json { json: String, path: String },
}

impl RefSource {
    /// The column read (the JSON column for a JSON member).
    pub fn column(&self) -> &str {
        match self {
            RefSource::Column(c) => c,
            RefSource::Json { json, .. } => json,
        }
    }

    /// For messages: `col` or `col.path`.
    pub fn label(&self) -> String {
        match self {
            RefSource::Column(c) => c.clone(),
            RefSource::Json { json, path } => format!("{json}->{path}"),
        }
    }
}

/// Where an activity row's kind comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum KindSource {
    /// A column whose text is the kind.
    Column(String),
    /// The same kind for every row.
    Value {
        /// The kind, as a key of `[activity.counters]`.
        value: String,
    },
}

impl KindSource {
    /// The column, when the kind is read from one.
    pub fn column(&self) -> Option<&str> {
        match self {
            KindSource::Column(c) => Some(c),
            KindSource::Value { .. } => None,
        }
    }
}

/// `[[activity]]`: one append-only activity log.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActivityMap {
    /// `schema.table`.
    pub table: String,
    /// Column whose text form is the SKU, or a lookup (attributed when the row is
    /// inserted; `on` may be a JSON member: `on = { json = "properties", path = "variant_id" }`).
    pub sku: ValueSource,
    /// Column whose value names the event kind, or `{ value = "view" }`: every row of the
    /// table is that kind (a table per event type).
    pub kind: KindSource,
    /// Optional quantity column (whole numbers; a list is summed); else each row counts 1.
    #[serde(default)]
    pub quantity: Option<Columns>,
    /// Optional user column: only ever stored as a keyed HMAC (needs a key).
    #[serde(default)]
    pub user: Option<String>,
    /// Optional event time column (timestamp/timestamptz); else the commit time.
    #[serde(default)]
    pub time: Option<String>,
    /// Sliding windows, e.g. `["5m", "1h"]` (minutes or hours, at most 24h).
    #[serde(default)]
    pub windows: Vec<String>,
    /// Event kind value -> counter name.
    pub counters: std::collections::BTreeMap<String, String>,
    /// Count only rows whose SKU has stock rows in a mapped stock table when the event is
    /// applied; others count nowhere and create nothing (for logs whose SKU comes from
    /// untrusted input, e.g. a URL).
    #[serde(default)]
    pub known_skus_only: bool,
    /// Row filter, as for stock tables: rows that fail are not counted.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<String>,
    /// Fractional digits its quantities may have (0 to 9); absent: whole numbers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<u32>,
    /// HMAC key for user ids, at least 32 bytes (else the systemd credential `user-key`
    /// or `SKUSYNC_USER_KEY`). Only in a config file its owner alone can read. Never
    /// logged; never part of the mapping fingerprint (serialized as null).
    #[serde(default, serialize_with = "serialize_as_none")]
    pub user_key: Option<Secret<String>>,
}

/// Check a column-or-lookup value (`what` names the key in messages).
fn validate_source(what: &str, v: &ValueSource, activity: bool) -> Result<(), ConfigError> {
    let err = |m: String| Err(ConfigError(m));
    let l = match v {
        ValueSource::Column(c) if c.is_empty() => return err(format!("{what}: empty column name")),
        ValueSource::Column(_) => return Ok(()),
        ValueSource::Lookup(l) => l,
    };
    let hops = l.hops();
    if hops.len() > 4 {
        return err(format!("{what}: a lookup may have at most 4 hops"));
    }
    for (n, h) in hops.iter().enumerate() {
        let at = if n == 0 {
            what.to_string()
        } else {
            format!("{what}{}", ".then".repeat(n))
        };
        if !schema_table(&h.from) {
            return err(format!(
                "{at}.from: {:?} must be schema.table (no control characters)",
                h.from
            ));
        }
        match &h.on {
            RefSource::Column(c) if c.is_empty() => {
                return err(format!("{at}.on: empty column name"));
            }
            RefSource::Json { json, path } => {
                if !activity || n > 0 {
                    return err(format!(
                        "{at}.on: a JSON member as the reference is taken on the first hop of an \
                         [[activity]] table only (a stock row's references must be columns)"
                    ));
                }
                if json.is_empty() || path.is_empty() || path.split('.').any(str::is_empty) {
                    return err(format!(
                        "{at}.on: give the JSON column and a member path, e.g. {{ json = \"properties\", path = \"variant_id\" }}"
                    ));
                }
            }
            RefSource::Column(_) => {}
        }
        if h.key.as_deref() == Some("") {
            return err(format!("{at}.key: empty column name"));
        }
        let last = n + 1 == hops.len();
        match (&h.column, last) {
            (None, true) => {
                return err(format!(
                    "{at}.column: name the column of {} whose value is taken",
                    h.from
                ));
            }
            (Some(_), false) => {
                return err(format!(
                    "{at}.column: a hop followed by `then` takes no column (the value comes from the last hop)"
                ));
            }
            (Some(c), true) if c.is_empty() => {
                return err(format!("{at}.column: empty column name"));
            }
            _ => {}
        }
        if let Err(e) = crate::filter::Filter::parse(&h.filter) {
            return err(format!("{at}.{e}"));
        }
    }
    Ok(())
}

/// Serializes a secret as `null`, so the fingerprint of a mapping never covers it.
fn serialize_as_none<S: serde::Serializer, T>(_: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_none()
}

/// `[postgres]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgresql://user[:password]@host[:port]/db?sslmode=...`. The password may instead
    /// come from `SKUSYNC_PG_PASSWORD`, `PGPASSWORD` or a passfile.
    pub url: String,
    /// Logical replication slot name (`[a-z0-9_]`, at most 63 characters).
    #[serde(default = "default_name")]
    pub slot: String,
    /// Publication name, or a list of them.
    #[serde(default = "default_publications")]
    pub publication: Publications,
    /// pgoutput protocol version to request (1-4). 1 works on every supported server.
    #[serde(default = "default_proto")]
    pub proto_version: u32,
    /// How often to send a standby status update (confirmed LSN) to the server.
    #[serde(default = "default_status_ms")]
    pub status_interval_ms: u64,
    /// What to do when the slot lost WAL it needs (`wal_status = lost`, e.g. after
    /// `max_slot_wal_keep_size`): `stop` (default) or `resync` (drop it, take a fresh
    /// snapshot).
    #[serde(default)]
    pub on_slot_lost: OnSlotLost,
    /// Every this many ms, run `SELECT pg_logical_emit_message(false, 'skusync_heartbeat', '')`
    /// on an ordinary connection so WAL advances and the slot's confirmed position keeps
    /// moving while the mapped tables are quiet (idle servers, managed services whose
    /// other databases write WAL the slot must retain). 0 = off (default).
    #[serde(default)]
    pub heartbeat_interval_ms: u64,
    /// The largest replication message (one change, with its old row under REPLICA
    /// IDENTITY FULL) skusync accepts, in bytes; larger ones stop it with the SQL to fix
    /// it. Bounds the memory a single change can take.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// The password from the systemd credential `pg-password` (not a config key).
    #[serde(skip)]
    pub credential_password: Option<Secret<String>>,
}

// Hand-written Debug: the URLs may hold passwords (only scheme, host and port are shown).
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("proto_version", &self.proto_version)
            .field("status_interval_ms", &self.status_interval_ms)
            .field("on_slot_lost", &self.on_slot_lost)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("credential_password", &self.credential_password)
            .finish()
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.url.all().iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisConfig")
            .field("url", &urls)
            .field("cluster", &self.cluster)
            .field("prefix", &self.prefix)
            .field("max_changes_per_piece", &self.max_changes_per_piece)
            .field("max_batch_skus", &self.max_batch_skus)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.url.all().iter().map(|u| redact_url(u)).collect();
        f.debug_struct("MqttConfig")
            .field("url", &urls)
            .field("client_id", &self.client_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("min_interval_ms", &self.min_interval_ms)
            .field("ca_file", &self.ca_file)
            .field("window_republish_per_s", &self.window_republish_per_s)
            .field("backed_up_round_ms", &self.backed_up_round_ms)
            .field("max_packet_bytes", &self.max_packet_bytes)
            .field("format", &self.format)
            .finish()
    }
}

/// `postgres.on_slot_lost`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSlotLost {
    #[default]
    Stop,
    Resync,
}

/// One publication or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Publications {
    One(String),
    Many(Vec<String>),
}

impl Publications {
    /// As a list.
    pub fn names(&self) -> Vec<String> {
        match self {
            Publications::One(s) => vec![s.clone()],
            Publications::Many(v) => v.clone(),
        }
    }
}

fn default_name() -> String {
    "skusync".into()
}
fn default_publications() -> Publications {
    Publications::One("skusync".into())
}
fn default_proto() -> u32 {
    1
}
fn default_max_message_bytes() -> usize {
    crate::pg::wire::DEFAULT_MAX_FRAME
}
fn default_status_ms() -> u64 {
    1000
}
fn default_piece_changes() -> u64 {
    10_000
}
fn default_batch_skus() -> usize {
    10_000
}
fn default_min_interval() -> u64 {
    100
}
fn default_age_rate() -> u32 {
    200
}
fn default_backed_up_round() -> u64 {
    100
}
fn default_max_packet() -> usize {
    64 * 1024
}
fn default_low_stock() -> i64 {
    5
}

/// Parse a window like `5m`, `1h`, `120s` into seconds; whole minutes (`90s` is refused),
/// 1 minute to 24 hours.
pub fn parse_window(s: &str) -> Option<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    };
    (secs >= 60 && secs.is_multiple_of(60) && secs <= 86_400).then_some(secs)
}

impl Config {
    /// Read and validate a config file; systemd credentials come from
    /// `$CREDENTIALS_DIRECTORY` when it is set.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
        Self::load_with_credentials(path, creds.as_deref())
    }

    /// [`load`](Self::load) with an explicit credentials directory (`None`: no
    /// credentials). A credential fills what the file leaves out: `pg-password`,
    /// `redis-password` and `mqtt-password` the password of a URL that has none,
    /// `user-key` the HMAC key of mapped user columns without `user_key`.
    pub fn load_with_credentials(path: &Path, creds: Option<&Path>) -> Result<Config, ConfigError> {
        let in_file = |m: String| ConfigError(format!("config file {}: {m}", path.display()));
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        let mut cfg = Self::from_toml(&text).map_err(|e| in_file(e.0))?;
        cfg.refuse_key_in_readable_file(path)?;
        if let Some(dir) = creds {
            cfg.apply_credentials(dir).map_err(in_file)?;
        }
        cfg.validate().map_err(|e| in_file(e.0))?;
        Ok(cfg)
    }

    /// Parse and validate config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg = Self::from_toml(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(toml_error(text, &e)))
    }

    /// A secret written in the file (a `user_key`, a password in a URL) is no secret when
    /// others can read the file: refused, naming the first and where else to put it.
    fn refuse_key_in_readable_file(&self, path: &Path) -> Result<(), ConfigError> {
        let Some((key, instead)) = self.first_inline_secret() else {
            return Ok(());
        };
        let meta = std::fs::metadata(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        if let Some(mode) = crate::secret::readable_by_others(&meta) {
            return Err(ConfigError(format!(
                "config file {p}: {key}: the file can be read by group or others (mode {mode:04o}), so \
                 the secret in it is not secret. Run `chmod 600 {p}` (or 640, owned by root), or \
                 remove it and give it {instead}",
                p = path.display(),
            )));
        }
        Ok(())
    }

    /// The first secret written in the config itself: its key, and where else it can come
    /// from.
    fn first_inline_secret(&self) -> Option<(String, String)> {
        if let Some(i) = self.activity.iter().position(|a| a.user_key.is_some()) {
            return Some((
                format!("activity[{i}].user_key"),
                format!(
                    "as the systemd credential {} or in SKUSYNC_USER_KEY",
                    credential::USER_KEY
                ),
            ));
        }
        if self.api.as_ref().is_some_and(|a| !a.tokens.is_empty()) {
            return Some((
                "api.tokens".into(),
                "up: use signed tokens instead (api.token_key_file, a file mode 0600 or a \
                 systemd credential; `skusync token` issues them)"
                    .into(),
            ));
        }
        let elsewhere =
            |cred: &str, env: &str| format!("as the systemd credential {cred} or in {env}");
        if !url_has_no_password(&self.postgres.url) {
            return Some((
                "postgres.url".into(),
                elsewhere(credential::PG_PASSWORD, "SKUSYNC_PG_PASSWORD"),
            ));
        }
        if let Some(r) = &self.redis
            && r.url.all().iter().any(|u| !url_has_no_password(u))
        {
            return Some((
                "redis.url".into(),
                elsewhere(credential::REDIS_PASSWORD, "SKUSYNC_REDIS_PASSWORD"),
            ));
        }
        if let Some(m) = &self.mqtt
            && m.url.all().iter().any(|u| !url_has_no_password(u))
        {
            return Some((
                "mqtt.url".into(),
                elsewhere(credential::MQTT_PASSWORD, "SKUSYNC_MQTT_PASSWORD"),
            ));
        }
        None
    }

    /// Fill missing passwords and the HMAC key from the credentials in `dir`.
    fn apply_credentials(&mut self, dir: &Path) -> Result<(), String> {
        self.postgres.credential_password = read_credential(dir, credential::PG_PASSWORD)?;
        if let Some(r) = &mut self.redis
            && let Some(pw) = read_credential(dir, credential::REDIS_PASSWORD)?
        {
            let urls = r
                .url
                .all()
                .iter()
                .map(|u| url_with_password(u, &pw, "redis.url", credential::REDIS_PASSWORD))
                .collect::<Result<Vec<_>, _>>()?;
            r.url = Urls(urls);
        }
        if let Some(m) = &mut self.mqtt
            && let Some(pw) = read_credential(dir, credential::MQTT_PASSWORD)?
        {
            let urls = m
                .url
                .all()
                .iter()
                .map(|u| url_with_password(u, &pw, "mqtt.url", credential::MQTT_PASSWORD))
                .collect::<Result<Vec<_>, _>>()?;
            m.url = Urls(urls);
        }
        self.user_key_credential = read_credential(dir, credential::USER_KEY)?;
        Ok(())
    }

    /// The HMAC key for activity table `i`'s user column: `None` when no user column is
    /// mapped, an error when one is mapped and no key is set. From `user_key`, else the
    /// credential `user-key`, else `SKUSYNC_USER_KEY`; at least [`MIN_USER_KEY_BYTES`]
    /// bytes. Only what counts users needs it (`run`, `resync`): other commands use
    /// [`user_key_if_set`](Self::user_key_if_set).
    pub fn user_key(&self, i: usize) -> Result<Option<Secret<Vec<u8>>>, ConfigError> {
        if self.activity.get(i).is_none_or(|a| a.user.is_none()) {
            return Ok(None);
        }
        self.user_key_if_set(i)?.map(Some).ok_or_else(|| {
            ConfigError(format!(
                "activity[{i}].user: mapping a user column needs an HMAC key of at least \
                 {MIN_USER_KEY_BYTES} bytes: set activity[{i}].user_key (in a file only its \
                 owner can read), the systemd credential {}, or SKUSYNC_USER_KEY",
                credential::USER_KEY
            ))
        })
    }

    /// Every mapped user column's HMAC key ([`user_key`](Self::user_key) for each activity
    /// table): the check `run` and `resync` make before they start.
    pub fn require_user_keys(&self) -> Result<(), ConfigError> {
        (0..self.activity.len()).try_for_each(|i| self.user_key(i).map(|_| ()))
    }

    /// The HMAC key for activity table `i`'s user column when one is set (`None` when no
    /// user column is mapped or no key is given); a key that is set but too short is an
    /// error wherever it comes from.
    pub fn user_key_if_set(&self, i: usize) -> Result<Option<Secret<Vec<u8>>>, ConfigError> {
        let Some(a) = self.activity.get(i).filter(|a| a.user.is_some()) else {
            return Ok(None);
        };
        let env = std::env::var("SKUSYNC_USER_KEY").ok().map(Secret::new);
        let Some((key, from)) = [
            (a.user_key.as_ref(), format!("activity[{i}].user_key")),
            (
                self.user_key_credential.as_ref(),
                format!("the systemd credential {}", credential::USER_KEY),
            ),
            (env.as_ref(), "SKUSYNC_USER_KEY".to_string()),
        ]
        .into_iter()
        .find_map(|(k, from)| Some((k.filter(|k| !k.expose().is_empty())?, from))) else {
            return Ok(None);
        };
        let n = key.expose().len();
        if n < MIN_USER_KEY_BYTES {
            return Err(ConfigError(format!(
                "activity[{i}].user_key: the HMAC key from {from} is {n} bytes; it needs at \
                 least {MIN_USER_KEY_BYTES} (e.g. the 64 characters of `openssl rand -hex 32`)"
            )));
        }
        Ok(Some(Secret::new(key.expose().as_bytes().to_vec())))
    }

    /// Every value that may be a lookup, in config order (inventory `sku` and `location`,
    /// then activity `sku`): (config key, mapped table, whether a stock table, value).
    /// The order numbers the lookups' hops (see `fold::mapping::HopSpec`).
    pub fn value_sources(&self) -> impl Iterator<Item = (String, &str, bool, &ValueSource)> {
        self.inventory
            .iter()
            .enumerate()
            .flat_map(|(i, m)| {
                [("sku", Some(&m.sku)), ("location", m.location.as_ref())]
                    .into_iter()
                    .filter_map(move |(k, v)| {
                        Some((format!("inventory[{i}].{k}"), m.table.as_str(), true, v?))
                    })
            })
            .chain(self.activity.iter().enumerate().map(|(i, a)| {
                (
                    format!("activity[{i}].sku"),
                    a.table.as_str(),
                    false,
                    &a.sku,
                )
            }))
    }

    /// Tables read by lookups (each once, in config order).
    pub fn lookup_tables(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (_, _, _, v) in self.value_sources() {
            for h in v.lookup().map(|l| l.hops()).unwrap_or_default() {
                if !out.contains(&h.from) {
                    out.push(h.from.clone());
                }
            }
        }
        out
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.postgres;
        self.pg_connect()?;
        if p.slot.is_empty()
            || p.slot.len() > 63
            || !p
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(ConfigError(format!(
                "postgres.slot: {:?} is not a valid slot name (lower-case letters, digits and _, at most 63)",
                p.slot
            )));
        }
        let pubs = p.publication.names();
        if pubs.is_empty() || pubs.iter().any(|s| s.is_empty() || s.len() > 63) {
            return Err(ConfigError(
                "postgres.publication: give one or more publication names (at most 63 bytes each)"
                    .into(),
            ));
        }
        if !(1..=4).contains(&p.proto_version) {
            return Err(ConfigError(format!(
                "postgres.proto_version: {} is not a pgoutput protocol version (1-4)",
                p.proto_version
            )));
        }
        self.validate_mapping()?;
        if !((1 << 20)..=(1 << 31)).contains(&p.max_message_bytes) {
            return Err(ConfigError(
                "postgres.max_message_bytes: must be between 1048576 (1 MiB) and 2147483648 (2 GiB)".into(),
            ));
        }
        if !(100..=60_000).contains(&p.status_interval_ms) {
            return Err(ConfigError(
                "postgres.status_interval_ms: must be between 100 and 60000".into(),
            ));
        }
        if p.heartbeat_interval_ms != 0 && p.heartbeat_interval_ms < 1000 {
            return Err(ConfigError(
                "postgres.heartbeat_interval_ms: must be 0 (off) or at least 1000".into(),
            ));
        }
        if !(1..=MAX_SKU_BYTES_LIMIT).contains(&self.limits.max_sku_bytes) {
            return Err(ConfigError(format!(
                "limits.max_sku_bytes: must be between 1 and {MAX_SKU_BYTES_LIMIT}"
            )));
        }
        Ok(())
    }

    fn validate_mapping(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        let mut tables = std::collections::BTreeSet::new();
        for (i, m) in self.inventory.iter().enumerate() {
            if !schema_table(&m.table) {
                return err(format!(
                    "inventory[{i}].table: {:?} must be schema.table (no control characters)",
                    m.table
                ));
            }
            if !tables.insert(m.table.clone()) {
                return err(format!("inventory[{i}].table: {} is mapped twice", m.table));
            }
            for (k, v) in [("sku", Some(&m.sku)), ("location", m.location.as_ref())] {
                if let Some(v) = v {
                    validate_source(&format!("inventory[{i}].{k}"), v, false)?;
                }
            }
            for (k, v) in [("low_stock", m.low_stock.as_ref())]
                .into_iter()
                .chain(m.on_hand.names().iter().map(|c| ("on_hand", Some(c))))
                .chain(
                    m.reserved
                        .iter()
                        .flat_map(|r| r.names().iter().map(|c| ("reserved", Some(c)))),
                )
            {
                if v.is_some_and(|c| c.is_empty()) {
                    return err(format!("inventory[{i}].{k}: empty column name"));
                }
            }
            for (k, v) in [
                ("on_hand", Some(&m.on_hand)),
                ("reserved", m.reserved.as_ref()),
            ] {
                if v.is_some_and(|c| c.names().is_empty()) {
                    return err(format!("inventory[{i}].{k}: an empty list of columns"));
                }
            }
            if let Err(e) = crate::filter::Filter::parse(&m.filter) {
                return err(format!("inventory[{i}].{e}"));
            }
            if m.scale.is_some_and(|s| s > 9) {
                return err(format!("inventory[{i}].scale: must be between 0 and 9"));
            }
        }
        // counter -> (first activity index, windows in seconds, counts distinct users),
        // merged over tables as `Mapping::counters` does
        let mut counters: std::collections::BTreeMap<String, (usize, Vec<u64>, bool)> =
            std::collections::BTreeMap::new();
        for (i, m) in self.activity.iter().enumerate() {
            if !schema_table(&m.table) {
                return err(format!(
                    "activity[{i}].table: {:?} must be schema.table (no control characters)",
                    m.table
                ));
            }
            if !tables.insert(m.table.clone()) {
                return err(format!("activity[{i}].table: {} is mapped twice", m.table));
            }
            if let Err(e) = crate::filter::Filter::parse(&m.filter) {
                return err(format!("activity[{i}].{e}"));
            }
            validate_source(&format!("activity[{i}].sku"), &m.sku, true)?;
            if m.scale.is_some_and(|s| s > 9) {
                return err(format!("activity[{i}].scale: must be between 0 and 9"));
            }
            if m.counters.is_empty() {
                return err(format!(
                    "activity[{i}].counters: map at least one event kind to a counter name"
                ));
            }
            match &m.kind {
                KindSource::Column(c) if c.is_empty() => {
                    return err(format!("activity[{i}].kind: empty column name"));
                }
                KindSource::Value { value } if !m.counters.contains_key(value) => {
                    return err(format!(
                        "activity[{i}].kind: the constant kind {value:?} is not a key of [activity.counters], so no row would count"
                    ));
                }
                _ => {}
            }
            for w in &m.windows {
                if parse_window(w).is_none() {
                    return err(format!(
                        "activity[{i}].windows: {w:?} is not a window (whole minutes from 1m to 24h, e.g. \"5m\", \"1h\")"
                    ));
                }
            }
            for c in m.counters.values() {
                if let Some(why) = counter_name_problem(c) {
                    return err(format!(
                        "activity[{i}].counters: {c:?} cannot be a counter name: {why}"
                    ));
                }
                let e = counters.entry(c.clone()).or_insert((i, Vec::new(), false));
                for w in m.windows.iter().filter_map(|w| parse_window(w)) {
                    if !e.1.contains(&w) {
                        e.1.push(w);
                    }
                }
                e.2 |= m.user.is_some();
            }
            // a key that is set must be usable; a missing one only stops `run` and
            // `resync` (`require_user_keys`), the commands that count users
            self.user_key_if_set(i)?;
        }
        // A referenced table is followed in all its changes: an activity table (insert
        // only) cannot be one; a stock table can (Solidus stock items are counted, and
        // stock movements look up their variant through them).
        let activity_tables: std::collections::BTreeSet<&str> =
            self.activity.iter().map(|a| a.table.as_str()).collect();
        for (what, _, _, m) in self.value_sources() {
            for h in m.lookup().map(|l| l.hops()).unwrap_or_default() {
                if activity_tables.contains(h.from.as_str()) {
                    return err(format!(
                        "{what}: {} is an [[activity]] table, whose updates and deletes are not \
                         streamed; a lookup must read a table followed in all its changes",
                        h.from
                    ));
                }
            }
        }
        // A counter's window and distinct-user members in the MQTT payload must not
        // collide with another counter's (`views_5m` the counter, and the 5m window of
        // `views`).
        let mut members: std::collections::BTreeMap<String, String> =
            std::collections::BTreeMap::new();
        for (c, (i, windows, users)) in &counters {
            let mut names = vec![(c.clone(), format!("counter {c:?}"))];
            for &w in windows {
                let window = names::window_name(c, w);
                let span = window[c.len() + 1..].to_string();
                names.push((window, format!("the {span} window of counter {c:?}")));
                if *users {
                    names.push((
                        names::users_name(c, w),
                        format!("the {span} distinct users of counter {c:?}"),
                    ));
                }
            }
            for (name, what) in names {
                if let Some(other) = members.insert(name.clone(), what.clone()) {
                    return err(format!(
                        "activity[{i}].counters: {name:?} in the MQTT state payload would be both \
                         {other} and {what}: rename one of the counters"
                    ));
                }
            }
        }
        if let Some(r) = &self.redis {
            if let Some(u) = r
                .url
                .all()
                .iter()
                .find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
            {
                return err(format!(
                    "redis.url: {:?} must start with redis:// or rediss://",
                    redact_url(u)
                ));
            }
            if !r.cluster && r.url.all().len() > 1 {
                return err(
                    "redis.url: a list of URLs names the seed nodes of a Redis Cluster: \
                     set redis.cluster = true, or give one URL"
                        .into(),
                );
            }
            if r.prefix.is_empty() || r.prefix.contains(['{', '}']) {
                return err("redis.prefix: must be non-empty and contain no braces".into());
            }
            if r.max_changes_per_piece < 100 {
                return err("redis.max_changes_per_piece: must be at least 100".into());
            }
            if r.max_batch_skus == 0 {
                return err("redis.max_batch_skus: must be at least 1".into());
            }
        }
        if let Some(m) = &self.mqtt {
            for (i, u) in m.url.all().iter().enumerate() {
                if !(u.starts_with("mqtt://") || u.starts_with("mqtts://")) {
                    let at = if m.url.all().len() > 1 {
                        format!("mqtt.url[{i}]")
                    } else {
                        "mqtt.url".into()
                    };
                    return err(format!("{at}: must start with mqtt:// or mqtts://"));
                }
            }
            // A failover must not drop TLS: the next broker would get the password (one
            // credential or SKUSYNC_MQTT_PASSWORD fills every URL) and the data in clear.
            let urls = m.url.all();
            if urls.iter().any(|u| u.starts_with("mqtts://")) {
                for (i, u) in urls.iter().enumerate() {
                    let host = url::Url::parse(u)
                        .ok()
                        .and_then(|u| u.host_str().map(str::to_string))
                        .unwrap_or_default();
                    if u.starts_with("mqtt://") && !local_host(&host) {
                        return err(format!(
                            "mqtt.url[{i}]: a plaintext mqtt:// broker that is not on loopback in a list with mqtts:// brokers; a failover to it would send the password and the data in clear: use mqtts:// for every broker"
                        ));
                    }
                }
            }
            if m.topic_prefix.is_empty()
                || m.topic_prefix.contains(['+', '#'])
                || m.topic_prefix.ends_with('/')
            {
                return err(
                    "mqtt.topic_prefix: must be non-empty, without + or #, and not end with /"
                        .into(),
                );
            }
            if m.client_id.is_empty() {
                return err("mqtt.client_id: must not be empty".into());
            }
            if !(1024..=256 * 1024 * 1024).contains(&m.max_packet_bytes) {
                return err("mqtt.max_packet_bytes: must be between 1024 and 268435456".into());
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in self.webhook.iter().enumerate() {
            w.validate(&format!("webhook[{i}]"))?;
            if !names.insert(w.name.as_str()) {
                return err(format!("webhook[{i}].name: {:?} is used twice", w.name));
            }
        }
        if !(100..=1_000_000).contains(&self.alerts.history) {
            return err("alerts.history: must be between 100 and 1000000".into());
        }
        if let Some(a) = &self.api {
            if !(a.rate_per_s.is_finite() && a.rate_per_s > 0.0) {
                return err("api.rate_per_s: must be a positive number".into());
            }
            if a.burst == 0 {
                return err("api.burst: must be at least 1".into());
            }
            if a.max_connections == 0 {
                return err("api.max_connections: must be at least 1".into());
            }
            if a.max_connections_per_address == 0 {
                return err("api.max_connections_per_address: must be at least 1".into());
            }
            if let Some(bad) = a.trusted_proxies.iter().find(|t| parse_net(t).is_none()) {
                return err(format!(
                    "api.trusted_proxies: {bad:?} is neither an address nor a CIDR block (e.g. \"10.0.0.0/8\")"
                ));
            }
            if a.tokens
                .iter()
                .any(|t| t.len() < 16 || t.contains(char::is_whitespace))
            {
                return err(
                    "api.tokens: each token must be at least 16 characters, without spaces".into(),
                );
            }
            if let Some(o) = &a.cors_origin
                && (o.is_empty() || o.contains(['\r', '\n']))
            {
                return err("api.cors_origin: must be \"*\" or one origin".into());
            }
        }
        Ok(())
    }

    /// Connection settings for the source database. The systemd credential `pg-password`,
    /// else `SKUSYNC_PG_PASSWORD`, fills in a password missing from the URL.
    pub fn pg_connect(&self) -> Result<PgConnectConfig, ConfigError> {
        let mut c = PgConnectConfig::from_url(&self.postgres.url)
            .map_err(|e| ConfigError(e.to_string()))?;
        let fill = match &self.postgres.credential_password {
            Some(pw) => Some(pw.expose().clone()),
            None => std::env::var("SKUSYNC_PG_PASSWORD").ok(),
        };
        if let Some(pw) = fill
            && url_has_no_password(&self.postgres.url)
        {
            c.password = Some(crate::pg::connstr::Password::new(pw));
        }
        c.max_message_bytes = self.postgres.max_message_bytes;
        Ok(c)
    }

    /// The status update interval.
    /// Decimal places of every stored quantity: the largest `scale` of any mapped table
    /// (0: whole numbers; see `units`).
    pub fn quantity_scale(&self) -> u32 {
        self.inventory
            .iter()
            .map(|m| m.scale)
            .chain(self.activity.iter().map(|a| a.scale))
            .flatten()
            .max()
            .unwrap_or(0)
    }

    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.postgres.status_interval_ms)
    }
}

/// Why `c` cannot name a counter, if it cannot: its lifetime total is the SKU hash field
/// `<c>` and the state payload member `"<c>"`, so neither may exist for another reason.
fn counter_name_problem(c: &str) -> Option<&'static str> {
    if c.is_empty() {
        Some("it is empty")
    } else if c.contains(':') {
        Some("it contains ':' (the separator of prefixed SKU hash fields and keys)")
    } else if names::FIXED_FIELDS.contains(&c) || c.starts_with("pub") || c.starts_with("alert") {
        Some(
            "skusync keeps a field of that name in each SKU hash (names starting with \"pub\" or \"alert\" are reserved too)",
        )
    } else if names::STATE_MEMBERS.contains(&c) {
        Some("the MQTT state payload has a member of that name")
    } else {
        None
    }
}

/// Whether `host` (a URL's host, IPv6 in brackets or not) names this machine: a loopback
/// address, `localhost` or `*.localhost`. Decided on the name, never by resolving it.
pub fn local_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    let lower = h.to_ascii_lowercase();
    lower == "localhost"
        || lower.ends_with(".localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn url_has_no_password(url: &str) -> bool {
    url::Url::parse(url)
        .map(|u| u.password().is_none() && !u.query_pairs().any(|(k, _)| k == "password"))
        .unwrap_or(true)
}

/// Shortest HMAC key accepted for user columns: the SHA-256 output size.
pub const MIN_USER_KEY_BYTES: usize = 32;

/// `url` with password `pw` from credential `cred` when it has none (a password written
/// in the URL wins). Errors name `key` and never echo the URL.
fn url_with_password(
    url: &str,
    pw: &Secret<String>,
    key: &str,
    cred: &str,
) -> Result<String, String> {
    let Ok(mut u) = url::Url::parse(url) else {
        return Err(format!("{key}: not a valid URL"));
    };
    if u.password().is_some() {
        return Ok(url.to_string());
    }
    // Percent-encode every byte but letters and digits: the URL parsers decode it back,
    // and a '%' in the password cannot be mistaken for an escape.
    let enc =
        percent_encoding::utf8_percent_encode(pw.expose(), percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    u.set_password(Some(&enc))
        .map_err(|()| format!("{key}: has no host to give the password of credential {cred} to"))?;
    Ok(u.to_string())
}

/// A TOML error as "line L, column C, key K: message", without the source line the
/// `toml` crate's Display quotes (it may hold a password or key) and without the values
/// serde's messages quote ("invalid type: integer `3735928559`").
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let mut msg = e.message().trim().replace('\n', "; ");
    for prefix in ["invalid type: ", "invalid value: ", "unknown variant "] {
        if let Some(rest) = msg.strip_prefix(prefix)
            && let Some((_, expected)) = rest.split_once(", expected ")
        {
            msg = format!(
                "{}, expected {expected}",
                prefix.trim_end_matches([':', ' '])
            );
        }
    }
    let Some(span) = e.span() else {
        return msg;
    };
    let at = span.start.min(text.len());
    let at = (0..=at)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let before = &text[..at];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    // Belt and braces: should a message quote the value of the broken line, cut it out.
    if let Some((_, value)) = line.split_once('=') {
        let value = value.trim().trim_matches(['"', '\'']).trim();
        if value.chars().count() >= 4 && msg.contains(value) {
            msg = msg.replace(value, "<redacted>");
        }
    }
    let key = match toml_key_at(text, line_start) {
        Some(k) => format!(", key {k}"),
        None => String::new(),
    };
    format!("line {line_no}, column {column}{key}: {msg}")
}

/// The dotted key of the line starting at `line_start` (`activity[1].counters.view`), from
/// the table headers above it; `None` when the line holds no plain key. Only characters
/// a bare key may have are printed, so this never shows a value.
fn toml_key_at(text: &str, line_start: usize) -> Option<String> {
    let bare = |s: &str| {
        let s = s.trim();
        (!s.is_empty()
            && s.len() <= 64
            && s.split('.').all(|p| {
                let p = p.trim();
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            }))
        .then(|| s.split('.').map(str::trim).collect::<Vec<_>>().join("."))
    };
    let mut arrays: std::collections::BTreeMap<String, usize> = Default::default();
    let mut table: Option<String> = None;
    let header = |h: &str, arrays: &std::collections::BTreeMap<String, usize>| {
        let h = bare(h)?;
        // `[activity.counters]` after `[[activity]]` belongs to the last activity
        let first = h.split('.').next().unwrap_or("");
        Some(match arrays.get(first) {
            Some(n) => format!("{first}[{}]{}", n - 1, &h[first.len()..]),
            None => h,
        })
    };
    let mut offset = 0;
    for l in text.split_inclusive('\n') {
        let t = l.trim();
        let this_line = offset == line_start;
        if let Some(h) = t.strip_prefix("[[").and_then(|t| t.split("]]").next()) {
            if let Some(name) = bare(h) {
                *arrays.entry(name.clone()).or_insert(0) += 1;
                table = header(&name, &arrays);
            } else {
                table = None;
            }
        } else if let Some(h) = t.strip_prefix('[').and_then(|t| t.split(']').next()) {
            table = header(h, &arrays);
        } else if this_line {
            let k = bare(t.split_once('=')?.0)?;
            return Some(match &table {
                Some(tb) => format!("{tb}.{k}"),
                None => k,
            });
        }
        if this_line {
            return table;
        }
        offset += l.len();
        if offset > line_start {
            return None;
        }
    }
    table
}

/// A mapped or referenced table's name: `schema.table`, without control characters (names
/// are printed into SQL, comments of `setup --print` included, which a line break ends).
fn schema_table(t: &str) -> bool {
    !t.chars().any(char::is_control)
        && t.split_once('.')
            .is_some_and(|(s, n)| !s.is_empty() && !n.is_empty() && !n.contains('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failover_list_that_would_drop_tls_is_refused() {
        let base = "[postgres]\nurl = \"postgresql://u@h/d\"\n[mqtt]\n";
        let parse = |urls: &str| Config::parse(&format!("{base}url = {urls}\n"));
        let e = parse("[\"mqtts://core:8883\", \"mqtt://u:secret@edge:1883\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.url[1]") && e.contains("mqtts://"), "{e}");
        assert!(!e.contains("secret"), "the error shows no password: {e}");
        // plaintext on this machine, or plaintext everywhere (check warns), is the
        // operator's choice
        assert!(parse("[\"mqtts://core:8883\", \"mqtt://localhost:1883\"]").is_ok());
        assert!(parse("[\"mqtts://core:8883\", \"mqtt://[::1]:1883\"]").is_ok());
        assert!(parse("[\"mqtt://a:1883\", \"mqtt://b:1883\"]").is_ok());
    }

    #[test]
    fn mqtt_url_is_one_broker_or_a_failover_list() {
        let base = "[postgres]\nurl = \"postgresql://u@h/d\"\n[mqtt]\n";
        let one = Config::parse(&format!("{base}url = \"mqtt://a:1\"\n")).unwrap();
        let m = one.mqtt.unwrap();
        assert_eq!(m.url.all(), ["mqtt://a:1"]);
        assert_eq!(&*m.url, "mqtt://a:1");
        let two = Config::parse(&format!(
            "{base}url = [\"mqtt://127.0.0.1:1\", \"mqtts://b:2\"]\n"
        ))
        .unwrap();
        assert_eq!(
            two.mqtt.unwrap().url.all(),
            ["mqtt://127.0.0.1:1", "mqtts://b:2"]
        );
        assert!(Config::parse(&format!("{base}url = []\n")).is_err());
        let e = Config::parse(&format!("{base}url = [\"mqtt://a:1\", \"http://b\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.url[1]"), "{e}");
    }

    #[test]
    fn table_names_with_control_characters_are_refused() {
        // `setup --print` writes names into SQL comments, which a line break would end
        let base = "[postgres]\nurl = \"postgresql://u@h/d\"\n[[inventory]]\nsku = \"sku\"\non_hand = \"q\"\n";
        let bad = Config::parse(&format!(
            "{base}table = \"public.x\\nDROP TABLE public.orders;--\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("inventory[0].table") && bad.contains("control"),
            "{bad}"
        );
        assert!(Config::parse(&format!("{base}table = \"public.x\"\n")).is_ok());
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse("[postgres]\nurl = \"postgresql://u@127.0.0.1/ims\"\n").unwrap();
        assert_eq!(c.postgres.slot, "skusync");
        assert_eq!(c.postgres.publication.names(), vec!["skusync"]);
        assert_eq!(c.postgres.proto_version, 1);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "[postgres]\nurl = \"postgresql://u@h/d\"\nslott = \"x\"\n",
                "slott",
            ),
            (
                "[postgres]\nurl = \"postgresql://u@h/d\"\nslot = \"Bad-Name\"\n",
                "postgres.slot",
            ),
            ("[postgres]\nurl = \"mysql://u@h/d\"\n", "postgres.url"),
            (
                "[postgres]\nurl = \"postgresql://u@h/d\"\nproto_version = 9\n",
                "postgres.proto_version",
            ),
            ("[postgres]\n", "url"),
            (
                "[postgres]\nurl = \"postgresql://u@h/d\"\n[bogus]\n",
                "bogus",
            ),
        ];
        for (text, key) in cases {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn http_and_heartbeat_are_optional() {
        let c = Config::parse("[postgres]\nurl = \"postgresql://u@h/d\"\n").unwrap();
        assert!(c.http.is_none());
        assert_eq!(c.postgres.heartbeat_interval_ms, 0);
        let c = Config::parse(
            "[postgres]\nurl = \"postgresql://u@h/d\"\nheartbeat_interval_ms = 10000\n[http]\nlisten = \"127.0.0.1:9187\"\n",
        )
        .unwrap();
        assert_eq!(c.http.unwrap().listen.port(), 9187);
        assert_eq!(c.postgres.heartbeat_interval_ms, 10000);
        let e =
            Config::parse("[postgres]\nurl = \"postgresql://u@h/d\"\n[http]\nlisten = \"nope\"\n")
                .unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
    }

    #[test]
    fn the_example_config_in_dist_parses() {
        let text = include_str!("../../dist/skusync.toml");
        let c = Config::parse(text).unwrap_or_else(|e| panic!("dist/skusync.toml: {e}"));
        assert!(c.http.is_some() && c.mqtt.is_some() && c.redis.is_some());
    }

    #[test]
    fn the_commerce_examples_in_dist_parse_with_their_lookups() {
        for (name, text) in [
            ("saleor", include_str!("../../dist/examples/saleor.toml")),
            ("odoo", include_str!("../../dist/examples/odoo.toml")),
            ("solidus", include_str!("../../dist/examples/solidus.toml")),
        ] {
            let c = Config::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(c.inventory[0].sku.lookup().is_some(), "{name}");
            assert!(!c.lookup_tables().is_empty(), "{name}");
        }
    }

    /// A config with one activity table: `windows` (TOML array body), extra keys, and
    /// its counters (`kind = "name"` lines).
    fn activity(windows: &str, extra: &str, counters: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!(
            "[postgres]\nurl = \"postgresql://u@h/d\"\n[[activity]]\ntable = \"public.a\"\n\
             sku = \"sku\"\nkind = \"kind\"\nwindows = [{windows}]\n{extra}\n\
             [activity.counters]\n{counters}\n"
        ))
    }

    #[test]
    fn counter_names_that_are_sku_hash_fields_or_payload_members_are_rejected() {
        let names = [
            // SKU hash fields
            "on_hand",
            "reserved",
            "available",
            "rows",
            "lsn",
            "piece",
            "ts",
            "threshold",
            "alert_state",
            "alerts",
            "pub_lsn",
            "pub_piece",
            "pub_state",
            "pub_seq",
            "gone",
            "published",
            "alerting",
            // state payload members
            "v",
            "sku",
            "locations",
            "delta",
            "as_of",
            "prev_lsn",
            "prev_piece",
            "sell_rate_per_h",
            "stockout_eta_s",
            // not a field name at all
            "",
            "a:b",
        ];
        for name in names {
            let e = activity("\"5m\"", "", &format!("view = {name:?}"))
                .expect_err(name)
                .to_string();
            assert!(
                e.contains("activity[0].counters") && e.contains(&format!("{name:?}")),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn a_counter_named_like_another_counters_window_member_is_rejected() {
        let e = activity("\"5m\"", "", "view = \"views\"\nseen = \"views_5m\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"views_5m\"") && e.contains("the 5m window of counter \"views\""),
            "{e}"
        );
        let e = activity(
            "\"1h\"",
            "user = \"uid\"\nuser_key = \"0123456789abcdef0123456789abcdef\"",
            "view = \"views\"\nseen = \"views_users_1h\"",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("the 1h distinct users of counter \"views\""),
            "{e}"
        );
    }

    #[test]
    fn ordinary_counter_names_are_accepted() {
        activity(
            "\"5m\", \"1h\"",
            "",
            "view = \"views\"\nadd_to_cart = \"carts\"\npurchase = \"purchases\"\nbuy = \"purchases\"",
        )
        .unwrap();
        // the name of a window the counter does not have is free
        activity("\"1h\"", "", "view = \"views\"\nseen = \"views_5m\"").unwrap();
    }

    const PG_PW: &str = "pg-S3cret-pw";
    const KEY: &str = "DEADBEEF0123456789abcdefDEADBEEF";

    fn has_no_secret(s: &str) -> bool {
        !s.contains(PG_PW) && !s.contains("S3cret") && !s.contains(KEY) && !s.contains("DEADBEEF")
    }

    #[test]
    fn a_toml_error_never_prints_the_broken_line() {
        let url = format!("url = \"postgresql://skusync:{PG_PW}@db.example:5432/inv");
        let cases = [
            // the URL misses its closing quote
            (format!("[postgres]\n{url}\n"), "line 2", "postgres.url"),
            // a key written as a TOML (hex) integer: serde quotes the number
            (
                format!(
                    "[postgres]\n{url}\"\n[[activity]]\ntable = \"public.a\"\nsku = \"s\"\nkind = \"k\"\nuser_key = 0xDEADBEEF\n[activity.counters]\nv = \"views\"\n"
                ),
                "line 7",
                "activity[0].user_key",
            ),
            // the key misses its closing quote
            (
                format!(
                    "[postgres]\nurl = \"postgresql://u@h/d\"\n[[activity]]\ntable = \"public.a\"\n[[activity]]\nuser_key = \"{KEY}\n"
                ),
                "line 6",
                "activity[1].user_key",
            ),
            // a key where a number belongs
            (
                format!("[postgres]\nurl = \"postgresql://u@h/d\"\nproto_version = \"{KEY}\"\n"),
                "line 3",
                "postgres.proto_version",
            ),
            // an unknown variant
            (
                format!("[postgres]\nurl = \"postgresql://u@h/d\"\non_slot_lost = \"{KEY}\"\n"),
                "line 3",
                "postgres.on_slot_lost",
            ),
        ];
        for (text, line, key) in cases {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(has_no_secret(&e), "secret in: {e}");
            assert!(
                e.contains(line) && e.contains("column") && e.contains(&format!("key {key}")),
                "{key}: {e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn debug_of_a_config_shows_no_secret() {
        let text = format!(
            "[postgres]\nurl = \"postgresql://skusync:{PG_PW}@db.example:5432/inv\"\n\
             [redis]\nurl = \"redis://:S3cret-r@127.0.0.1:6379/0\"\n\
             [mqtt]\nurl = \"mqtt://u:S3cret-m@127.0.0.1:1883\"\n\
             [[activity]]\ntable = \"public.a\"\nsku = \"s\"\nkind = \"k\"\nuser = \"uid\"\n\
             user_key = \"{KEY}\"\n[activity.counters]\nv = \"views\"\n"
        );
        let mut c = Config::parse(&text).unwrap();
        c.user_key_credential = Some(Secret::new(KEY.into()));
        c.postgres.credential_password = Some(Secret::new(PG_PW.into()));
        let d = format!("{c:?} {:#?}", c);
        assert!(has_no_secret(&d), "{d}");
        assert!(
            d.contains("postgresql://db.example:5432") && d.contains("redis://127.0.0.1:6379"),
            "{d}"
        );
        let m = crate::fold::mapping::Mapping::from_config(&c).unwrap();
        let d = format!("{m:?}");
        assert!(has_no_secret(&d), "{d}");
        assert_eq!(
            m.activity[0].user_key.as_ref().unwrap().expose().hash("u"),
            crate::fold::hmac_user(KEY.as_bytes(), "u")
        );
    }

    #[test]
    fn the_mapping_fingerprint_does_not_cover_the_user_key() {
        let with = |key: &str| {
            let c = activity(
                "\"5m\"",
                &format!("user = \"uid\"\nuser_key = \"{key}\""),
                "view = \"views\"",
            )
            .unwrap();
            crate::fold::mapping::Mapping::from_config(&c)
                .unwrap()
                .fingerprint
        };
        assert_eq!(with(KEY), with(&"k".repeat(40)));
        let json = serde_json::to_string(
            &activity(
                "\"5m\"",
                &format!("user = \"uid\"\nuser_key = \"{KEY}\""),
                "view = \"views\"",
            )
            .unwrap()
            .activity,
        )
        .unwrap();
        assert!(
            json.contains("\"user_key\":null") && has_no_secret(&json),
            "{json}"
        );
    }

    #[test]
    fn a_short_user_key_is_refused_naming_the_key() {
        let e = activity(
            "\"5m\"",
            "user = \"uid\"\nuser_key = \"0xDEADBEEF\"",
            "view = \"views\"",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("activity[0].user_key")
                && e.contains("10 bytes")
                && e.contains("at least 32"),
            "{e}"
        );
        assert!(has_no_secret(&e), "{e}");
    }

    fn write_file(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    const ACTIVITY_WITH_USER: &str =
        "[[activity]]\ntable = \"public.a\"\nsku = \"s\"\nkind = \"k\"\nuser = \"uid\"\n";

    #[test]
    fn an_inline_user_key_in_a_file_others_can_read_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let text = format!(
            "[postgres]\nurl = \"postgresql://u@h/d\"\n{ACTIVITY_WITH_USER}user_key = \"{KEY}\"\n[activity.counters]\nv = \"views\"\n"
        );
        for mode in [0o644, 0o660, 0o604] {
            let p = write_file(d.path(), "c.toml", &text, mode);
            let e = Config::load_with_credentials(&p, None)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("activity[0].user_key")
                    && e.contains("chmod 600")
                    && e.contains("user-key")
                    && e.contains("SKUSYNC_USER_KEY"),
                "{e}"
            );
            assert!(has_no_secret(&e), "{e}");
        }
        let p = write_file(d.path(), "c.toml", &text, 0o600);
        let c = Config::load_with_credentials(&p, None).unwrap();
        assert_eq!(c.user_key(0).unwrap().unwrap().expose(), KEY.as_bytes());
        // 0640 only when root owns the file (root keeps it, the service's group reads it)
        let p = write_file(d.path(), "c.toml", &text, 0o640);
        let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&p).unwrap()) == 0;
        assert_eq!(Config::load_with_credentials(&p, None).is_ok(), root);
        // without an inline key a readable file is fine
        let p = write_file(
            d.path(),
            "c.toml",
            "[postgres]\nurl = \"postgresql://u@h/d\"\n",
            0o644,
        );
        Config::load_with_credentials(&p, None).unwrap();
    }

    #[test]
    fn a_password_in_a_url_of_a_file_others_can_read_is_refused() {
        let d = tempfile::tempdir().unwrap();
        for (text, key, cred) in [
            (
                "[postgres]\nurl = \"postgresql://u:hunter2@h/d\"\n".to_string(),
                "postgres.url",
                "pg-password",
            ),
            (
                "[postgres]\nurl = \"postgresql://u@h/d?password=hunter2\"\n".to_string(),
                "postgres.url",
                "pg-password",
            ),
            (
                "[postgres]\nurl = \"postgresql://u@h/d\"\n[redis]\nurl = \"redis://:hunter2@127.0.0.1:6379\"\n"
                    .to_string(),
                "redis.url",
                "redis-password",
            ),
            (
                "[postgres]\nurl = \"postgresql://u@h/d\"\n[mqtt]\n\
                 url = [\"mqtt://127.0.0.1:1883\", \"mqtt://s:hunter2@127.0.0.1:1884\"]\n"
                    .to_string(),
                "mqtt.url",
                "mqtt-password",
            ),
        ] {
            let p = write_file(d.path(), "c.toml", &text, 0o644);
            let e = Config::load_with_credentials(&p, None)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(key) && e.contains("chmod 600") && e.contains(cred),
                "{e}"
            );
            assert!(!e.contains("hunter2"), "{e}");
            let p = write_file(d.path(), "c.toml", &text, 0o600);
            Config::load_with_credentials(&p, None).unwrap();
        }
    }

    #[test]
    fn credentials_fill_missing_passwords_and_the_user_key() {
        let d = tempfile::tempdir().unwrap();
        let creds = d.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        write_file(&creds, "pg-password", "pg pw:@/%41\n", 0o400);
        write_file(&creds, "redis-password", "r pw:@/%41\n", 0o400);
        write_file(&creds, "mqtt-password", "m pw:@/%41\n", 0o400);
        write_file(&creds, "user-key", &format!("{KEY}\n"), 0o400);
        let text = format!(
            "[postgres]\nurl = \"postgresql://skusync@127.0.0.1/inv\"\n\
             [redis]\nurl = \"redis://127.0.0.1:6379/0\"\n\
             [mqtt]\nurl = \"mqtt://skusync@127.0.0.1:1883\"\n\
             {ACTIVITY_WITH_USER}[activity.counters]\nv = \"views\"\n"
        );
        let p = write_file(d.path(), "c.toml", &text, 0o644);
        let c = Config::load_with_credentials(&p, Some(&creds)).unwrap();
        assert_eq!(
            c.pg_connect().unwrap().password.unwrap().expose(),
            "pg pw:@/%41"
        );
        let redis = c.redis.as_ref().unwrap();
        let info = redis::IntoConnectionInfo::into_connection_info(&*redis.url).unwrap();
        assert_eq!(info.redis_settings().password(), Some("r pw:@/%41"));
        let broker = crate::sinks::mqtt::parse_url(&c.mqtt.as_ref().unwrap().url, None).unwrap();
        assert_eq!(broker.password.as_deref(), Some("m pw:@/%41"));
        assert_eq!(broker.user.as_deref(), Some("skusync"));
        assert_eq!(c.user_key(0).unwrap().unwrap().expose(), KEY.as_bytes());
        assert!(has_no_secret(&format!("{c:?}")) && !format!("{c:?}").contains("pw:"));
        // a password written in a URL wins over the credential
        let text = text.replace("redis://127", "redis://:inline@127");
        let p = write_file(d.path(), "c.toml", &text, 0o600);
        let c = Config::load_with_credentials(&p, Some(&creds)).unwrap();
        assert!(c.redis.unwrap().url.contains(":inline@"));
        // without credentials and without a key the file loads (status, tail, check do
        // not need the key), and what needs it says where a key may come from
        if std::env::var_os("SKUSYNC_USER_KEY").is_none() {
            let c = Config::load_with_credentials(&p, None).unwrap();
            assert!(c.user_key_if_set(0).unwrap().is_none());
            let e = c.require_user_keys().unwrap_err().to_string();
            assert!(
                e.contains("activity[0].user: mapping a user column needs an HMAC key")
                    && e.contains("user-key")
                    && e.contains("SKUSYNC_USER_KEY"),
                "{e}"
            );
            assert!(crate::fold::mapping::Mapping::from_config(&c).is_err());
            crate::fold::mapping::Mapping::without_user_keys(&c).unwrap();
        }
        // a short key from a credential is refused, naming where it came from
        write_file(&creds, "user-key", "short\n", 0o600);
        let e = Config::load_with_credentials(&p, Some(&creds))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("activity[0].user_key")
                && e.contains("credential user-key")
                && e.contains("5 bytes"),
            "{e}"
        );
    }

    #[test]
    fn publication_may_be_a_list() {
        let c = Config::parse(
            "[postgres]\nurl = \"postgresql://u@h/d\"\npublication = [\"a\", \"b\"]\n",
        )
        .unwrap();
        assert_eq!(c.postgres.publication.names(), vec!["a", "b"]);
    }
}
