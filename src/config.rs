//! The TOML configuration. Every key is documented here and in the README; unknown keys
//! are errors, and every error names the key.

use crate::pg::connstr::PgConnectConfig;
use crate::sinks::layout;
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
    /// `[limits]`: bounds on what the database's rows can make skusync store.
    #[serde(default)]
    pub limits: LimitsConfig,
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

/// `[redis]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db` or `rediss://` for TLS. The password may
    /// instead come from `SKUSYNC_REDIS_PASSWORD`.
    pub url: String,
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://[user:password@]host:port` or `mqtts://` for TLS. The password may instead
    /// come from `SKUSYNC_MQTT_PASSWORD`.
    pub url: String,
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
    /// Largest MQTT packet skusync sends or accepts.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
}

/// `[alerts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Default low-stock threshold on `available` (per-SKU thresholds come from an
    /// inventory table's `low_stock` column when mapped).
    #[serde(default = "default_low_stock")]
    pub low_stock: i64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            low_stock: default_low_stock(),
        }
    }
}

/// `[[inventory]]`: one stock table.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryMap {
    /// `schema.table`.
    pub table: String,
    /// Column whose text form is the SKU.
    pub sku: String,
    /// Optional location column: stock is kept per (SKU, location) as well.
    #[serde(default)]
    pub location: Option<String>,
    /// Quantity on hand: int2/int4/int8/numeric holding whole numbers.
    pub on_hand: String,
    /// Optional reserved quantity (same types).
    #[serde(default)]
    pub reserved: Option<String>,
    /// Optional per-SKU low-stock threshold column (same types).
    #[serde(default)]
    pub low_stock: Option<String>,
}

/// `[[activity]]`: one append-only activity log.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActivityMap {
    /// `schema.table`.
    pub table: String,
    /// Column whose text form is the SKU.
    pub sku: String,
    /// Column whose value names the event kind.
    pub kind: String,
    /// Optional quantity column (whole numbers); else each row counts 1.
    #[serde(default)]
    pub quantity: Option<String>,
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
    /// HMAC key for user ids (else `SKUSYNC_USER_KEY`). Never logged.
    #[serde(default)]
    pub user_key: Option<String>,
}

/// `[postgres]`.
#[derive(Debug, Clone, Deserialize)]
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
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        Self::parse(&text)
            .map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.0)))
    }

    /// Parse and validate config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError(e.to_string().trim_end().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
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
        let valid_table = |t: &str| {
            t.split_once('.')
                .is_some_and(|(s, n)| !s.is_empty() && !n.is_empty() && !n.contains('.'))
        };
        for (i, m) in self.inventory.iter().enumerate() {
            if !valid_table(&m.table) {
                return err(format!(
                    "inventory[{i}].table: {:?} must be schema.table",
                    m.table
                ));
            }
            if !tables.insert(m.table.clone()) {
                return err(format!("inventory[{i}].table: {} is mapped twice", m.table));
            }
            for (k, v) in [
                ("sku", Some(&m.sku)),
                ("on_hand", Some(&m.on_hand)),
                ("location", m.location.as_ref()),
                ("reserved", m.reserved.as_ref()),
                ("low_stock", m.low_stock.as_ref()),
            ] {
                if v.is_some_and(|c| c.is_empty()) {
                    return err(format!("inventory[{i}].{k}: empty column name"));
                }
            }
        }
        // counter -> (first activity index, windows in seconds, counts distinct users),
        // merged over tables as `Mapping::counters` does
        let mut counters: std::collections::BTreeMap<String, (usize, Vec<u64>, bool)> =
            std::collections::BTreeMap::new();
        for (i, m) in self.activity.iter().enumerate() {
            if !valid_table(&m.table) {
                return err(format!(
                    "activity[{i}].table: {:?} must be schema.table",
                    m.table
                ));
            }
            if !tables.insert(m.table.clone()) {
                return err(format!("activity[{i}].table: {} is mapped twice", m.table));
            }
            if m.counters.is_empty() {
                return err(format!(
                    "activity[{i}].counters: map at least one event kind to a counter name"
                ));
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
            if m.user.is_some()
                && m.user_key.is_none()
                && std::env::var("SKUSYNC_USER_KEY")
                    .map(|k| k.is_empty())
                    .unwrap_or(true)
            {
                return err(format!(
                    "activity[{i}].user: mapping a user column needs an HMAC key: set activity[{i}].user_key or SKUSYNC_USER_KEY"
                ));
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
                let window = layout::window_name(c, w);
                let span = window[c.len() + 1..].to_string();
                names.push((window, format!("the {span} window of counter {c:?}")));
                if *users {
                    names.push((
                        crate::sinks::mqtt::users_name(c, w),
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
            if !(r.url.starts_with("redis://") || r.url.starts_with("rediss://")) {
                return err("redis.url: must start with redis:// or rediss://".into());
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
            if !(m.url.starts_with("mqtt://") || m.url.starts_with("mqtts://")) {
                return err("mqtt.url: must start with mqtt:// or mqtts://".into());
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
        Ok(())
    }

    /// Connection settings for the source database. `SKUSYNC_PG_PASSWORD` fills in a
    /// password missing from the URL.
    pub fn pg_connect(&self) -> Result<PgConnectConfig, ConfigError> {
        let mut c = PgConnectConfig::from_url(&self.postgres.url)
            .map_err(|e| ConfigError(e.to_string()))?;
        if let Ok(pw) = std::env::var("SKUSYNC_PG_PASSWORD")
            && url_has_no_password(&self.postgres.url)
        {
            c.password = Some(crate::pg::connstr::Password::new(pw));
        }
        c.max_message_bytes = self.postgres.max_message_bytes;
        Ok(c)
    }

    /// The status update interval.
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
    } else if layout::FIXED_FIELDS.contains(&c) || c.starts_with("pub") || c.starts_with("alert") {
        Some(
            "skusync keeps a field of that name in each SKU hash (names starting with \"pub\" or \"alert\" are reserved too)",
        )
    } else if crate::sinks::mqtt::STATE_MEMBERS.contains(&c) {
        Some("the MQTT state payload has a member of that name")
    } else {
        None
    }
}

fn url_has_no_password(url: &str) -> bool {
    url::Url::parse(url)
        .map(|u| u.password().is_none())
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let text = include_str!("../dist/skusync.toml");
        let c = Config::parse(text).unwrap_or_else(|e| panic!("dist/skusync.toml: {e}"));
        assert!(c.http.is_some() && c.mqtt.is_some() && c.redis.is_some());
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
            "pub_state",
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
            "user = \"uid\"\nuser_key = \"k\"",
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

    #[test]
    fn publication_may_be_a_list() {
        let c = Config::parse(
            "[postgres]\nurl = \"postgresql://u@h/d\"\npublication = [\"a\", \"b\"]\n",
        )
        .unwrap();
        assert_eq!(c.postgres.publication.names(), vec!["a", "b"]);
    }
}
