//! The SQL oracle for `skusync run`: the ground truth computed by aggregating the source
//! tables in SQL, compared field by field with the Redis hashes (see `src/sinks/layout.rs`),
//! and a seeded random workload generator.
//!
//! Comparison rules (the `run` contract):
//! - stock fields `on_hand`, `reserved`, `available`, `loc:<L>:on_hand`, `loc:<L>:reserved`
//!   and each counter's lifetime total: absent counts as 0;
//! - a SKU that has stock rows in SQL must have a hash;
//! - a hash whose SKU has no rows in SQL must hold only zeros in those fields;
//! - other fields (`lsn`, `ts`, `r:*`, alerts, ...) are not compared; window buckets
//!   `w:<counter>:<minute>` per [`Buckets`].
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One `[[inventory]]` mapping.
#[derive(Clone, Debug)]
pub struct InventorySpec {
    /// `schema.table`
    pub table: String,
    pub sku: String,
    pub location: Option<String>,
    pub on_hand: String,
    pub reserved: Option<String>,
}

/// One `[[activity]]` mapping.
#[derive(Clone, Debug)]
pub struct ActivitySpec {
    /// `schema.table`
    pub table: String,
    pub sku: String,
    pub kind: String,
    pub quantity: Option<String>,
    pub time: Option<String>,
    pub windows: Vec<String>,
    /// kind value -> counter name
    pub counters: Vec<(String, String)>,
}

/// How window buckets are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buckets {
    /// Not compared (e.g. after a snapshot, whose rows have no commit time).
    Ignore,
    /// Per SKU and counter, the sum of all `w:<counter>:*` equals the lifetime total
    /// (holds while no bucket aged out, i.e. a test shorter than the largest window).
    SumEqualsTotal,
    /// Every `w:<counter>:<minute>` equals the SQL sum grouped by the minute of the
    /// mapped time column (every activity spec must map `time`).
    ExactByMinute,
}

/// What to compare.
#[derive(Clone, Debug)]
pub struct Oracle {
    pub prefix: String,
    pub inventory: Vec<InventorySpec>,
    pub activity: Vec<ActivitySpec>,
    pub buckets: Buckets,
    /// `where` items per mapped table (`schema.table`): in the config, and ANDed into
    /// the SQL truth as written.
    pub filters: BTreeMap<String, Vec<String>>,
    /// Conditions of the SQL truth only (e.g. a publication's row filter).
    pub truth_filters: BTreeMap<String, Vec<String>>,
    /// `where` items of the config only, replacing `filters` there (the truth keeps
    /// `filters`): for a condition SQL evaluates otherwise than skusync does.
    pub config_filters: BTreeMap<String, Vec<String>>,
    /// Quantity names that stand for several summed columns (`reserved = [...]`).
    pub sums: BTreeMap<String, Vec<String>>,
    /// `scale` of every mapped table (0: whole numbers): quantities are compared in
    /// units of 10^-scale.
    pub scale: u32,
}

/// One difference between SQL and Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub sku: String,
    pub field: String,
    pub expected: String,
    pub got: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sku {:?} field {:?}: expected {}, got {}",
            self.sku, self.field, self.expected, self.got
        )
    }
}

/// Human-readable list (at most `max` lines).
pub fn format_mismatches(m: &[Mismatch], max: usize) -> String {
    let mut s = format!("{} mismatch(es):\n", m.len());
    for x in m.iter().take(max) {
        s.push_str(&format!("  {x}\n"));
    }
    if m.len() > max {
        s.push_str(&format!("  ... and {} more\n", m.len() - max));
    }
    s
}

/// The SQL ground truth.
#[derive(Clone, Debug, Default)]
pub struct Truth {
    /// SKU -> field -> value, for the compared fields (stock, counters, exact buckets).
    pub skus: BTreeMap<String, BTreeMap<String, i128>>,
    /// SKUs that have at least one stock row (their hash must exist).
    pub with_stock_rows: BTreeSet<String>,
}

/// Redis state: SKU -> field -> value.
pub type RedisState = BTreeMap<String, BTreeMap<String, String>>;

/// Whether a SKU hash holds nothing to project: `gone` is `1` (its last row and counter
/// went), or `piece` is `-1` (a rebuild reset it and the snapshot did not reload it; the
/// hash stays for its fence and outbox marks). Publishers clear such a SKU. Written out
/// here rather than calling skusync's `payload::is_gone`, so the oracle does not share
/// a mistake in it.
pub fn redis_says_gone(h: &BTreeMap<String, String>) -> bool {
    h.get("gone").map(String::as_str) == Some("1")
        || h.get("piece").map(String::as_str) == Some("-1")
}

/// `"schema"."table"` from `schema.table`.
pub fn qtable(t: &str) -> String {
    let (s, n) = t.split_once('.').expect("schema.table");
    format!("{}.{}", qident(s), qident(n))
}

/// A quoted identifier.
pub fn qident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A SQL string literal.
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A TOML basic string.
fn tstr(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

/// A decimal in units of 10^-`scale` (exact); `None` when it is not one or has more
/// fractional digits.
fn try_units(s: &str, scale: u32) -> Option<i128> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let frac = frac.trim_end_matches('0');
    if frac.len() > scale as usize || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let neg = int.starts_with('-');
    let mut v: i128 = int.trim_start_matches('-').parse().ok()?;
    for i in 0..scale as usize {
        v = v * 10 + frac.as_bytes().get(i).map_or(0, |b| i128::from(b - b'0'));
    }
    Some(if neg { -v } else { v })
}

pub fn parse_units(s: &str, scale: u32) -> i128 {
    try_units(s, scale)
        .unwrap_or_else(|| panic!("not a decimal with at most {scale} places: {s:?}"))
}

#[allow(dead_code)]
fn parse_int(s: &str) -> i128 {
    // sum() of numeric comes back as e.g. "12" or "12.00"
    let s = s.trim();
    let whole = match s.split_once('.') {
        Some((w, frac)) => {
            assert!(frac.bytes().all(|b| b == b'0'), "not whole: {s}");
            w
        }
        None => s,
    };
    whole
        .parse()
        .unwrap_or_else(|e| panic!("bad integer {s:?}: {e}"))
}

/// A multiplexed async Redis connection.
pub async fn redis_connect(url: &str) -> MultiplexedConnection {
    // A resync keeps Redis busy with long scripts: be patient (the default is short).
    let cfg = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(30)));
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .expect("connect to redis")
}

/// `HGETALL key` as strings (lossy); empty when the key is absent.
pub async fn hgetall(
    con: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> BTreeMap<String, String> {
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(con)
        .await
        .expect("HGETALL");
    pairs
        .into_iter()
        .map(|(f, v)| {
            (
                String::from_utf8_lossy(&f).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect()
}

/// `HGET key field`.
pub async fn hget(
    con: &mut impl redis::aio::ConnectionLike,
    key: &str,
    field: &str,
) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async::<Option<String>>(con)
        .await
        .expect("HGET")
}

fn is_stock_field(f: &str) -> bool {
    matches!(f, "on_hand" | "reserved" | "available")
        || (f.starts_with("loc:") && (f.ends_with(":on_hand") || f.ends_with(":reserved")))
}

impl Oracle {
    /// The mapping part of the config (`[[inventory]]` and `[[activity]]` tables).
    pub fn mapping_toml(&self) -> String {
        let mut s = String::new();
        for m in &self.inventory {
            s.push_str("\n[[inventory]]\n");
            s.push_str(&format!("table = {}\n", tstr(&m.table)));
            s.push_str(&format!("sku = {}\n", tstr(&m.sku)));
            if let Some(l) = &m.location {
                s.push_str(&format!("location = {}\n", tstr(l)));
            }
            s.push_str(&format!("on_hand = {}\n", self.columns_toml(&m.on_hand)));
            if let Some(r) = &m.reserved {
                s.push_str(&format!("reserved = {}\n", self.columns_toml(r)));
            }
            s.push_str(&self.where_toml(&m.table));
            if self.scale > 0 {
                s.push_str(&format!("scale = {}\n", self.scale));
            }
        }
        for a in &self.activity {
            s.push_str("\n[[activity]]\n");
            s.push_str(&format!("table = {}\n", tstr(&a.table)));
            s.push_str(&format!("sku = {}\n", tstr(&a.sku)));
            s.push_str(&format!("kind = {}\n", tstr(&a.kind)));
            if let Some(q) = &a.quantity {
                s.push_str(&format!("quantity = {}\n", tstr(q)));
            }
            if let Some(t) = &a.time {
                s.push_str(&format!("time = {}\n", tstr(t)));
            }
            s.push_str(&self.where_toml(&a.table));
            if self.scale > 0 {
                s.push_str(&format!("scale = {}\n", self.scale));
            }
            let w: Vec<String> = a.windows.iter().map(|w| tstr(w)).collect();
            s.push_str(&format!("windows = [{}]\n", w.join(", ")));
            s.push_str("[activity.counters]\n");
            for (k, c) in &a.counters {
                s.push_str(&format!("{} = {}\n", tstr(k), tstr(c)));
            }
        }
        s
    }

    fn columns_toml(&self, c: &str) -> String {
        match self.sums.get(c) {
            Some(v) => format!(
                "[{}]",
                v.iter().map(|c| tstr(c)).collect::<Vec<_>>().join(", ")
            ),
            None => tstr(c),
        }
    }

    /// A quantity in the SQL truth: the column, or the sum of the columns it stands for.
    fn column_sql(&self, c: &str) -> String {
        match self.sums.get(c) {
            Some(v) => format!(
                "({})",
                v.iter().map(|c| qident(c)).collect::<Vec<_>>().join(" + ")
            ),
            None => qident(c),
        }
    }

    fn where_toml(&self, table: &str) -> String {
        match self
            .config_filters
            .get(table)
            .or_else(|| self.filters.get(table))
        {
            Some(f) if !f.is_empty() => {
                let items: Vec<String> = f.iter().map(|w| tstr(w)).collect();
                format!("where = [{}]\n", items.join(", "))
            }
            _ => String::new(),
        }
    }

    /// The SQL truth's extra conditions for a table (` AND (...)` each).
    fn where_sql(&self, table: &str) -> String {
        self.filters
            .get(table)
            .into_iter()
            .chain(self.truth_filters.get(table))
            .flatten()
            .map(|w| format!(" AND ({w})"))
            .collect()
    }

    /// A whole `skusync run` config file.
    pub fn config_toml(
        &self,
        pg_url: &str,
        slot: &str,
        publications: &[&str],
        redis_url: &str,
    ) -> String {
        let pubs: Vec<String> = publications.iter().map(|p| tstr(p)).collect();
        format!(
            "[postgres]\nurl = {}\nslot = {}\npublication = [{}]\nstatus_interval_ms = 200\n\n\
             [redis]\nurl = {}\nprefix = {}\n{}",
            tstr(&format!("{pg_url}?sslmode=disable")),
            tstr(slot),
            pubs.join(", "),
            tstr(redis_url),
            tstr(&self.prefix),
            self.mapping_toml()
        )
    }

    fn counter_names(&self) -> BTreeSet<String> {
        self.activity
            .iter()
            .flat_map(|a| a.counters.iter().map(|(_, c)| c.clone()))
            .collect()
    }

    /// The ground truth, aggregated in SQL.
    pub async fn truth(&self, pg: &tokio_postgres::Client) -> Truth {
        let mut t = Truth::default();
        for m in &self.inventory {
            let loc = m
                .location
                .as_ref()
                .map(|l| format!("{}::text", qident(l)))
                .unwrap_or_else(|| "NULL::text".into());
            let res = m
                .reserved
                .as_ref()
                .map(|r| format!("coalesce({}, 0)", self.column_sql(r)))
                .unwrap_or_else(|| "0".into());
            let sql = format!(
                "SELECT {sku}::text, {loc}, sum({oh})::text, sum({res})::text FROM {tab} \
                 WHERE {sku} IS NOT NULL{w} GROUP BY 1, 2",
                w = self.where_sql(&m.table),
                sku = qident(&m.sku),
                oh = self.column_sql(&m.on_hand),
                tab = qtable(&m.table),
            );
            for row in pg.query(&sql, &[]).await.expect(&sql) {
                let sku: String = row.get(0);
                let loc: Option<String> = row.get(1);
                let oh = parse_units(&row.get::<_, String>(2), self.scale);
                let rs = parse_units(&row.get::<_, String>(3), self.scale);
                t.with_stock_rows.insert(sku.clone());
                let f = t.skus.entry(sku).or_default();
                *f.entry("on_hand".into()).or_default() += oh;
                *f.entry("reserved".into()).or_default() += rs;
                *f.entry("available".into()).or_default() += oh - rs;
                if let Some(l) = loc.filter(|_| m.location.is_some()) {
                    *f.entry(format!("loc:{l}:on_hand")).or_default() += oh;
                    *f.entry(format!("loc:{l}:reserved")).or_default() += rs;
                }
            }
        }
        for a in &self.activity {
            let kinds: Vec<String> = a.counters.iter().map(|(k, _)| lit(k)).collect();
            let counter_of: BTreeMap<&str, &str> = a
                .counters
                .iter()
                .map(|(k, c)| (k.as_str(), c.as_str()))
                .collect();
            let (val, filter) = match &a.quantity {
                Some(q) => (
                    format!("sum({}::numeric)", qident(q)),
                    format!(
                        "AND {q} IS NOT NULL AND {q}::numeric = trunc({q}::numeric, {s})",
                        q = qident(q),
                        s = self.scale
                    ),
                ),
                None => (
                    format!("count(*) * {}", 10i128.pow(self.scale)),
                    String::new(),
                ),
            };
            let minute = match (self.buckets, &a.time) {
                (Buckets::ExactByMinute, Some(tc)) => {
                    format!("floor(extract(epoch FROM {})/60)::bigint", qident(tc))
                }
                (Buckets::ExactByMinute, None) => panic!("ExactByMinute needs a time column"),
                _ => "NULL::bigint".into(),
            };
            let sql = format!(
                "SELECT {sku}::text, {kind}::text, {minute}, ({val})::text FROM {tab} \
                 WHERE {sku} IS NOT NULL AND {kind}::text IN ({kinds}) {filter}{w} GROUP BY 1, 2, 3",
                w = self.where_sql(&a.table),
                sku = qident(&a.sku),
                kind = qident(&a.kind),
                tab = qtable(&a.table),
                kinds = kinds.join(", "),
            );
            for row in pg.query(&sql, &[]).await.expect(&sql) {
                let sku: String = row.get(0);
                let kind: String = row.get(1);
                let min: Option<i64> = row.get(2);
                let v = parse_units(&row.get::<_, String>(3), self.scale);
                let c = counter_of[kind.as_str()];
                let f = t.skus.entry(sku).or_default();
                *f.entry(c.to_string()).or_default() += v;
                if let Some(min) = min {
                    *f.entry(format!("w:{c}:{min}")).or_default() += v;
                }
            }
        }
        t
    }

    /// Every SKU hash (SCAN + HGETALL).
    pub async fn redis_state(&self, con: &mut MultiplexedConnection) -> RedisState {
        let pattern = skusync::sinks::layout::sku_key_pattern(&self.prefix);
        let mut keys: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(con)
                .await
                .expect("SCAN");
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut out = RedisState::new();
        for k in keys {
            let ks = String::from_utf8_lossy(&k).into_owned();
            let Some(sku) = skusync::sinks::layout::sku_of_key(&self.prefix, &ks) else {
                continue;
            };
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
                .arg(&k)
                .query_async(con)
                .await
                .expect("HGETALL");
            let fields = pairs
                .into_iter()
                .map(|(f, v)| {
                    (
                        String::from_utf8_lossy(&f).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    )
                })
                .collect();
            out.insert(sku.to_string(), fields);
        }
        out
    }

    /// Compare the truth with the Redis state; an empty list means they agree.
    pub fn compare(&self, truth: &Truth, redis: &RedisState) -> Vec<Mismatch> {
        let counters = self.counter_names();
        let compared = |f: &str| {
            is_stock_field(f)
                || counters.contains(f)
                || (self.buckets == Buckets::ExactByMinute
                    && f.strip_prefix("w:")
                        .and_then(|r| r.split_once(':'))
                        .is_some_and(|(c, _)| counters.contains(c)))
        };
        let empty_t = BTreeMap::new();
        let empty_r = BTreeMap::new();
        let skus: BTreeSet<&String> = truth.skus.keys().chain(redis.keys()).collect();
        let mut out = Vec::new();
        for sku in skus {
            let exp = truth.skus.get(sku).unwrap_or(&empty_t);
            let got = redis.get(sku);
            if got.is_none() && truth.with_stock_rows.contains(sku) {
                out.push(Mismatch {
                    sku: sku.clone(),
                    field: "<hash>".into(),
                    expected: "present (SKU has stock rows)".into(),
                    got: "absent".into(),
                });
            }
            if let Some(g) = got
                && truth.with_stock_rows.contains(sku)
                && redis_says_gone(g)
            {
                out.push(Mismatch {
                    sku: sku.clone(),
                    field: "<gone>".into(),
                    expected: "not gone (SKU has stock rows)".into(),
                    got: "gone or reset (piece -1)".into(),
                });
            }
            let got = got.unwrap_or(&empty_r);
            let fields: BTreeSet<&str> = exp
                .keys()
                .map(|s| s.as_str())
                .chain(got.keys().map(|s| s.as_str()).filter(|f| compared(f)))
                .collect();
            for f in fields {
                let e = exp.get(f).copied().unwrap_or(0);
                let g = got.get(f);
                let ok = match g {
                    None => e == 0,
                    Some(v) => try_units(v, self.scale) == Some(e),
                };
                if !ok {
                    out.push(Mismatch {
                        sku: sku.clone(),
                        field: f.to_string(),
                        expected: e.to_string(),
                        got: g.cloned().unwrap_or_else(|| "<absent>".into()),
                    });
                }
            }
            if self.buckets == Buckets::SumEqualsTotal {
                for c in &counters {
                    let pre = format!("w:{c}:");
                    let mut sum: i128 = 0;
                    let mut bad = Vec::new();
                    for (f, v) in got.iter().filter(|(f, _)| f.starts_with(&pre)) {
                        match try_units(v, self.scale) {
                            Some(n) => sum += n,
                            None => bad.push(format!("{f}={v:?}")),
                        }
                    }
                    let e = exp.get(c.as_str()).copied().unwrap_or(0);
                    if sum != e || !bad.is_empty() {
                        out.push(Mismatch {
                            sku: sku.clone(),
                            field: format!("sum(w:{c}:*)"),
                            expected: e.to_string(),
                            got: format!(
                                "{sum}{}",
                                if bad.is_empty() {
                                    String::new()
                                } else {
                                    format!(" (unparseable: {})", bad.join(", "))
                                }
                            ),
                        });
                    }
                }
            }
        }
        out
    }

    /// The meta hash checks: `bootstrap` = `done`, `applied_lsn` a u64.
    pub async fn meta_mismatches(
        &self,
        con: &mut impl redis::aio::ConnectionLike,
    ) -> Vec<Mismatch> {
        let meta = hgetall(con, &skusync::sinks::layout::meta_key(&self.prefix)).await;
        let mut out = Vec::new();
        if meta.get("bootstrap").map(String::as_str) != Some("done") {
            out.push(Mismatch {
                sku: "<meta>".into(),
                field: "bootstrap".into(),
                expected: "done".into(),
                got: format!("{:?}", meta.get("bootstrap")),
            });
        }
        if meta
            .get("applied_lsn")
            .and_then(|v| v.parse::<u64>().ok())
            .is_none()
        {
            out.push(Mismatch {
                sku: "<meta>".into(),
                field: "applied_lsn".into(),
                expected: "a u64".into(),
                got: format!("{:?}", meta.get("applied_lsn")),
            });
        }
        out
    }

    /// Truth vs Redis, plus the meta checks.
    pub async fn mismatches(
        &self,
        pg: &tokio_postgres::Client,
        con: &mut MultiplexedConnection,
    ) -> Vec<Mismatch> {
        let truth = self.truth(pg).await;
        let state = self.redis_state(con).await;
        let mut m = self.meta_mismatches(con).await;
        m.extend(self.compare(&truth, &state));
        m
    }
}

/// The seed for a randomized test: `SKUSYNC_TEST_SEED` when set, else fresh; printed.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("SKUSYNC_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("SKUSYNC_TEST_SEED={s:?}: {e}")),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: seed {seed} (replay with SKUSYNC_TEST_SEED={seed})");
    seed
}

/// Tables and columns the workload writes (any names; values are emitted as literals
/// and cast by PostgreSQL).
#[derive(Clone, Debug)]
pub struct WorkloadTables {
    /// `schema.table` of the stock table.
    pub inv: String,
    pub sku: String,
    pub location: String,
    pub on_hand: String,
    pub reserved: String,
    /// Another key column and its possible values (e.g. `bin`, `["1", "2"]`).
    pub extra_key: Option<(String, Vec<String>)>,
    /// `schema.table` of the activity table.
    pub act: String,
    pub act_sku: String,
    pub act_kind: String,
    pub act_qty: String,
    /// Event time column, set to now() minus up to 4 minutes.
    pub act_time: Option<String>,
    /// Kind values to insert (mapped ones and at least one unmapped).
    pub kinds: Vec<String>,
    /// Fractional quantities to insert sometimes (must be skipped), e.g. `1.5`.
    pub fractions: Vec<String>,
}

impl WorkloadTables {
    /// The default schema's tables (`public.inventory`, `public.activity_log`).
    pub fn public() -> WorkloadTables {
        WorkloadTables {
            inv: "public.inventory".into(),
            sku: "sku".into(),
            location: "location".into(),
            on_hand: "on_hand".into(),
            reserved: "reserved".into(),
            extra_key: None,
            act: "public.activity_log".into(),
            act_sku: "sku".into(),
            act_kind: "kind".into(),
            act_qty: "qty".into(),
            act_time: None,
            kinds: ["view", "add_to_cart", "purchase", "share"]
                .map(String::from)
                .to_vec(),
            fractions: ["1.5", "0.25", "2.75"].map(String::from).to_vec(),
        }
    }

    /// The drain marker: a stock row for SKU `__drain_<n>__` with on_hand = `n`.
    pub fn marker_sql(&self, n: u64, location: &str) -> String {
        let mut cols = vec![
            qident(&self.sku),
            qident(&self.location),
            qident(&self.on_hand),
            qident(&self.reserved),
        ];
        let mut vals = vec![
            lit(&marker_sku(n)),
            lit(location),
            n.to_string(),
            "0".into(),
        ];
        if let Some((c, v)) = &self.extra_key {
            cols.push(qident(c));
            vals.push(lit(&v[0]));
        }
        format!(
            "INSERT INTO {} ({}) VALUES ({})",
            qtable(&self.inv),
            cols.join(", "),
            vals.join(", ")
        )
    }
}

/// SKU of drain marker `n`.
pub fn marker_sku(n: u64) -> String {
    format!("__drain_{n}__")
}

/// SKUs with bytes that matter in keys, URLs, topics and SQL.
pub const ODD_SKUS: &[&str] = &[
    "a/b",
    "x+y",
    "#1",
    "100%",
    "k:v",
    "with space",
    "ünï©ødé",
    "",
    "o'neil",
    "*glob?",
];

/// A seeded random workload: each call to [`Workload::next_txn`] yields one SQL script
/// (a transaction, committed or rolled back, or a single auto-committed statement).
pub struct Workload {
    pub rng: StdRng,
    pub t: WorkloadTables,
    pub skus: Vec<String>,
    pub locations: Vec<String>,
    /// Statements generated so far (including rolled-back ones).
    pub statements: usize,
    /// Transactions generated so far, and how many of them roll back.
    pub txns: usize,
    pub rollbacks: usize,
}

impl Workload {
    pub fn new(seed: u64, t: WorkloadTables, skus: Vec<String>, locations: Vec<String>) -> Self {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            t,
            skus,
            locations,
            statements: 0,
            txns: 0,
            rollbacks: 0,
        }
    }

    /// The default SKUs: [`ODD_SKUS`] and `SKU-000`..`SKU-029`.
    pub fn default_skus() -> Vec<String> {
        let mut v: Vec<String> = ODD_SKUS.iter().map(|s| s.to_string()).collect();
        v.extend((0..30).map(|i| format!("SKU-{i:03}")));
        v
    }

    /// The default locations.
    pub fn default_locations() -> Vec<String> {
        ["WH-1", "WH-2", "store 3", "Köln:4", "a/b"]
            .map(String::from)
            .to_vec()
    }

    fn pick<'a>(&mut self, v: &'a [String]) -> &'a str {
        &v[self.rng.random_range(0..v.len())]
    }

    fn sku(&mut self) -> String {
        let v = self.skus.clone();
        self.pick(&v).to_string()
    }

    fn loc(&mut self) -> String {
        let v = self.locations.clone();
        self.pick(&v).to_string()
    }

    fn extra(&mut self) -> Option<(String, String)> {
        let (c, vals) = self.t.extra_key.clone()?;
        let v = self.pick(&vals).to_string();
        Some((c, v))
    }

    fn qty(&mut self) -> String {
        let r = self.rng.random_range(0..100);
        if r < 15 {
            "NULL".into()
        } else if r < 25 && !self.t.fractions.is_empty() {
            let f = self.t.fractions.clone();
            self.pick(&f).to_string()
        } else {
            self.rng.random_range(0..=5).to_string()
        }
    }

    fn activity_row(&mut self) -> String {
        let sku = lit(&self.sku());
        let kinds = self.t.kinds.clone();
        let kind = lit(self.pick(&kinds));
        let qty = self.qty();
        match &self.t.act_time {
            Some(_) => {
                let secs = self.rng.random_range(0..240);
                format!("({sku}, {kind}, {qty}, now() - interval '{secs} seconds')")
            }
            None => format!("({sku}, {kind}, {qty})"),
        }
    }

    /// One random statement.
    pub fn statement(&mut self) -> String {
        self.statements += 1;
        let t = self.t.clone();
        let inv = qtable(&t.inv);
        let (sku_c, loc_c, oh_c, rs_c) = (
            qident(&t.sku),
            qident(&t.location),
            qident(&t.on_hand),
            qident(&t.reserved),
        );
        let r = self.rng.random_range(0..100);
        let sku = lit(&self.sku());
        let loc = lit(&self.loc());
        let extra = self.extra();
        let extra_where = extra
            .as_ref()
            .map(|(c, v)| format!(" AND {} = {}", qident(c), lit(v)))
            .unwrap_or_default();
        match r {
            0..30 => {
                let oh = self.rng.random_range(0..200);
                let rs = self.rng.random_range(0..=oh.min(20));
                let mut cols = vec![sku_c.clone(), loc_c.clone(), oh_c.clone(), rs_c.clone()];
                let mut vals = vec![sku, loc, oh.to_string(), rs.to_string()];
                let mut key = vec![sku_c.clone(), loc_c.clone()];
                if let Some((c, v)) = &extra {
                    cols.push(qident(c));
                    vals.push(lit(v));
                    key.push(qident(c));
                }
                format!(
                    "INSERT INTO {inv} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET \
                     {oh_c} = EXCLUDED.{oh_c}, {rs_c} = EXCLUDED.{rs_c}",
                    cols.join(", "),
                    vals.join(", "),
                    key.join(", ")
                )
            }
            30..45 => {
                let d = self.rng.random_range(-20..=20);
                let e = self.rng.random_range(-3..=3);
                format!(
                    "UPDATE {inv} SET {oh_c} = greatest(0, {oh_c} + {d}), \
                     {rs_c} = greatest(0, {rs_c} + {e}) \
                     WHERE {sku_c} = {sku} AND {loc_c} = {loc}{extra_where}"
                )
            }
            45..48 => format!(
                "UPDATE {inv} SET {rs_c} = {rs_c} + 1 WHERE {loc_c} = {loc} AND {rs_c} < 40"
            ),
            48..55 => {
                // key-changing update: move to another location
                let to = lit(&self.loc());
                let same_extra = t
                    .extra_key
                    .as_ref()
                    .map(|(c, _)| format!(" AND x.{c} = {inv}.{c}", c = qident(c)))
                    .unwrap_or_default();
                format!(
                    "UPDATE {inv} SET {loc_c} = {to} WHERE {sku_c} = {sku} AND {loc_c} = {loc} \
                     AND NOT EXISTS (SELECT 1 FROM {inv} x WHERE x.{sku_c} = {inv}.{sku_c} \
                     AND x.{loc_c} = {to}{same_extra})"
                )
            }
            55..60 => {
                // key-changing update: move to another SKU
                let to = lit(&self.sku());
                let same_extra = t
                    .extra_key
                    .as_ref()
                    .map(|(c, _)| format!(" AND x.{c} = {inv}.{c}", c = qident(c)))
                    .unwrap_or_default();
                format!(
                    "UPDATE {inv} SET {sku_c} = {to} WHERE {sku_c} = {sku} AND {loc_c} = {loc} \
                     AND NOT EXISTS (SELECT 1 FROM {inv} x WHERE x.{sku_c} = {to} \
                     AND x.{loc_c} = {inv}.{loc_c}{same_extra})"
                )
            }
            60..68 => format!("DELETE FROM {inv} WHERE {sku_c} = {sku} AND {loc_c} = {loc}"),
            68..70 => format!("DELETE FROM {inv} WHERE {sku_c} = {sku}"),
            _ => {
                let n = if self.rng.random_bool(0.3) {
                    self.rng.random_range(2..=6)
                } else {
                    1
                };
                let rows: Vec<String> = (0..n).map(|_| self.activity_row()).collect();
                let time_col = t
                    .act_time
                    .as_ref()
                    .map(|c| format!(", {}", qident(c)))
                    .unwrap_or_default();
                format!(
                    "INSERT INTO {} ({}, {}, {}{time_col}) VALUES {}",
                    qtable(&t.act),
                    qident(&t.act_sku),
                    qident(&t.act_kind),
                    qident(&t.act_qty),
                    rows.join(", ")
                )
            }
        }
    }

    /// One transaction as a script: a single auto-committed statement, or
    /// `BEGIN; ...; COMMIT` (or `ROLLBACK`, about 10%) with up to 12 statements.
    pub fn next_txn(&mut self) -> String {
        self.txns += 1;
        if self.rng.random_bool(0.2) {
            return format!("{};", self.statement());
        }
        let n = self.rng.random_range(2..=12);
        let mut s = String::from("BEGIN;\n");
        for _ in 0..n {
            s.push_str(&self.statement());
            s.push_str(";\n");
        }
        if self.rng.random_bool(0.1) {
            self.rollbacks += 1;
            s.push_str("ROLLBACK;");
        } else {
            s.push_str("COMMIT;");
        }
        s
    }
}

#[test]
fn oracle_compare_reports_both_sides() {
    let o = Oracle {
        prefix: "p".into(),
        inventory: vec![],
        activity: vec![ActivitySpec {
            table: "public.a".into(),
            sku: "sku".into(),
            kind: "kind".into(),
            quantity: None,
            time: None,
            windows: vec![],
            counters: vec![("view".into(), "views".into())],
        }],
        buckets: Buckets::Ignore,
        filters: Default::default(),
        truth_filters: Default::default(),
        config_filters: Default::default(),
        sums: Default::default(),
        scale: 0,
    };
    let mut truth = Truth::default();
    truth.with_stock_rows.insert("only-sql".into());
    truth.skus.insert(
        "only-sql".into(),
        [("on_hand".to_string(), 0i128), ("loc:A:on_hand".into(), 3)].into(),
    );
    truth
        .skus
        .insert("both".into(), [("views".to_string(), 2i128)].into());
    let mut redis = RedisState::new();
    redis.insert(
        "both".into(),
        [
            ("views".to_string(), "2".to_string()),
            ("lsn".into(), "99".into()),
            ("loc:B:reserved".into(), "1".into()),
        ]
        .into(),
    );
    redis.insert(
        "only-redis".into(),
        [
            ("on_hand".to_string(), "0".to_string()),
            ("views".into(), "1".into()),
        ]
        .into(),
    );
    let m = o.compare(&truth, &redis);
    let got: Vec<(String, String)> = m.iter().map(|x| (x.sku.clone(), x.field.clone())).collect();
    assert_eq!(
        got,
        vec![
            ("both".into(), "loc:B:reserved".into()),
            ("only-redis".into(), "views".into()),
            ("only-sql".into(), "<hash>".into()),
            ("only-sql".into(), "loc:A:on_hand".into()),
        ],
        "{}",
        format_mismatches(&m, 10)
    );
}

#[test]
fn workload_is_deterministic_for_a_seed() {
    let gen_ = |seed| {
        let mut w = Workload::new(
            seed,
            WorkloadTables::public(),
            Workload::default_skus(),
            Workload::default_locations(),
        );
        (0..50).map(|_| w.next_txn()).collect::<Vec<_>>()
    };
    assert_eq!(gen_(7), gen_(7));
    assert_ne!(gen_(7), gen_(8));
}
