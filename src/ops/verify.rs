//! `skusync verify [--mqtt] [--repair] [--json]`: compare every SKU hash in Redis (and with
//! `--mqtt` every retained state message) with the SQL aggregate of the mapped tables, on
//! a live database, without stopping skusync. Read-only unless `--repair`.
//!
//! # What is compared
//!
//! From SQL, per SKU, the totals a fresh snapshot would load: `on_hand`, `reserved`,
//! `available` and `loc:<LOC>:on_hand` / `loc:<LOC>:reserved` over the stock rows that
//! count (SKU not NULL and at most `limits.max_sku_bytes` bytes; quantities whole numbers
//! within ±2^53; a NULL or empty location counts in the totals only), and each activity
//! counter's lifetime total (rows whose kind maps to the counter, summing a whole
//! `quantity` or counting rows). Absent fields count as 0; a SKU with stock rows must have
//! a hash. Window buckets, distinct users, alerts and the outbox fields are not compared.
//!
//! An activity total higher in Redis than in SQL is *not verifiable* (retention deleted
//! rows skusync had counted, and activity counters never go down); so is any difference
//! of a counter fed by a `known_skus_only` table (SQL cannot tell which events found the
//! SKU stocked when they were applied).
//!
//! # Consistency while the stream moves
//!
//! Each round opens `REPEATABLE READ READ ONLY`, reads `pg_current_wal_insert_lsn()` as its
//! first statement (the snapshot sees only commits whose record ends at or before that
//! LSN `S`), aggregates, then waits (`--wait`) until Redis' `applied_lsn` (or the slot's
//! confirmed position) reaches `S`, and reads the hashes. A SKU whose fence `lsn` is `S` or
//! later changed after the snapshot: it is checked again in the next round with a fresh
//! snapshot. A SKU that differs is also checked again, and reported only when it still
//! differs (a commit can be in the WAL before `S` yet not yet visible to the snapshot).
//! After `--rounds` rounds, SKUs still moving are reported as *changing*, not verified; a
//! SKU that first differed in the last round gets one round more.

use crate::config::{Config, MqttConfig};
use crate::lsn::Lsn;
use crate::secret::log_value;
use crate::sinks::layout;
use crate::sinks::redis as rsink;
use crate::sinks::redis::RedisCon;
use crate::units;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Largest quantity magnitude skusync counts (see `fold::MAX_QUANTITY`).
const MAX_QUANTITY: u64 = crate::fold::MAX_QUANTITY;

/// How `verify` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait for skusync to apply up to a snapshot's LSN.
    pub wait: Duration,
    /// Most rounds (the first checks every SKU, later ones those still moving or
    /// differing), plus one that checks again SKUs that first differed in the last.
    pub rounds: u32,
    /// Also compare the retained MQTT state messages with Redis.
    pub mqtt: bool,
    /// On differences, request a rebuild (`bootstrap=stale`), wait for it, verify again.
    pub repair: bool,
    /// Longest wait for the rebuild `--repair` requested.
    pub repair_wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            wait: Duration::from_secs(60),
            rounds: 5,
            mqtt: false,
            repair: false,
            repair_wait: Duration::from_secs(600),
        }
    }
}

/// One field that differs (or cannot be verified).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The SKU (raw; escape it before printing).
    pub sku: String,
    /// Hash field (`on_hand`, `loc:WH-1:reserved`, `views`), `hash` for a missing hash,
    /// or `mqtt:<member>` for the retained message.
    pub field: String,
    /// The value in Redis (`absent` when missing).
    pub redis: String,
    /// What it is compared with: `sql` or `mqtt`.
    pub source: &'static str,
    /// The value in that source.
    pub value: String,
}

/// The result of one verification (`--json` prints it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Distinct SKUs compared (in SQL or Redis).
    pub skus_checked: usize,
    /// Rounds run.
    pub rounds: u32,
    /// Differences (exit code 1 when any).
    pub differences: Vec<Finding>,
    /// Activity totals that cannot be verified (Redis above SQL after retention deletes,
    /// or `known_skus_only` counters).
    pub not_verifiable: Vec<Finding>,
    /// SKUs that kept changing through every round (not verified).
    pub changing: Vec<String>,
    /// Retained messages and Redis SKUs compared with `--mqtt`.
    pub mqtt_checked: Option<usize>,
    /// The report before `--repair` rebuilt Redis, when it did.
    pub before_repair: Option<Box<Report>>,
}

impl Report {
    /// Whether everything compared is equal.
    pub fn ok(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Run `verify`. `Err` for configuration and connection problems (exit code 2).
pub async fn run(cfg: &Config, opts: &Options) -> Result<Report, String> {
    let rc = cfg
        .redis
        .as_ref()
        .ok_or("verify compares Redis with SQL: the config has no [redis] section")?;
    if opts.mqtt && cfg.mqtt.is_none() {
        return Err("--mqtt: the config has no [mqtt] section".into());
    }
    let (client, _) = super::pg_client(cfg).await?;
    let rclient = rsink::client(rc.url.all(), rc.cluster, rc.ca_file.as_deref())
        .map_err(|e| e.to_string())?;
    let mut con = rsink::connect(&rclient)
        .await
        .map_err(|e| format!("redis.url: {e}"))?;
    let first = verify_once(cfg, opts, &client, &mut con).await?;
    if !opts.repair || first.ok() {
        return Ok(first);
    }
    request_rebuild(&mut con, &rc.prefix).await?;
    tracing::info!(
        "verify: rebuild requested (bootstrap=stale); waiting up to {} s for skusync to finish it",
        opts.repair_wait.as_secs()
    );
    wait_rebuilt(&mut con, &rc.prefix, opts.repair_wait).await?;
    let mut after = verify_once(cfg, opts, &client, &mut con).await?;
    after.before_repair = Some(Box::new(first));
    Ok(after)
}

async fn verify_once(
    cfg: &Config,
    opts: &Options,
    client: &Client,
    con: &mut RedisCon,
) -> Result<Report, String> {
    let mut report = verify_redis(cfg, opts, client, con).await?;
    if let Some(mc) = cfg.mqtt.as_ref().filter(|_| opts.mqtt) {
        let prefix = &cfg
            .redis
            .as_ref()
            .map(|r| r.prefix.clone())
            .unwrap_or_default();
        let (n, diffs, changing) = verify_mqtt(cfg, mc, prefix, con, opts.rounds).await?;
        report.mqtt_checked = Some(n);
        report.differences.extend(diffs);
        for s in changing {
            if !report.changing.contains(&s) {
                report.changing.push(s);
            }
        }
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// SQL side

/// An identifier and a configured `schema.table` as SQL (the one place this module quotes).
fn qi(s: &str) -> String {
    super::ident(s)
}
fn qt(t: &str) -> String {
    super::table_ident(t)
}

/// How quantities are counted: at most `digits` fractional digits (the table's
/// `scale`), within ±2^53 units of 10^-`scale` (the mapping's).
#[derive(Clone, Copy)]
struct Digits {
    digits: u32,
    scale: u32,
}

impl Digits {
    fn of(table_scale: Option<u32>, scale: u32) -> Digits {
        Digits {
            digits: table_scale.unwrap_or(0),
            scale,
        }
    }

    /// The largest magnitude counted, in the column's own unit.
    fn max(&self) -> String {
        units::format(MAX_QUANTITY as i64, self.scale)
    }
}

/// `x` is a quantity skusync counts: not NULL, with no more fractional digits than the
/// table's scale, within ±2^53 units.
fn valid_column(col: &str, d: Digits) -> String {
    let c = qi(col);
    format!(
        "({c} IS NOT NULL AND {c}::numeric = trunc({c}::numeric, {}) AND abs({c}::numeric) <= {})",
        d.digits,
        d.max()
    )
}

/// Every summed column is a usable quantity, and so is their sum.
fn valid_quantity(cols: &crate::config::Columns, d: Digits) -> String {
    let mut parts: Vec<String> = cols.names().iter().map(|c| valid_column(c, d)).collect();
    if cols.names().len() > 1 {
        parts.push(format!("abs({}) <= {}", quantity_sql(cols), d.max()));
    }
    format!("({})", parts.join(" AND "))
}

/// The quantity of a row: a column, or the sum of several, as numeric.
fn quantity_sql(cols: &crate::config::Columns) -> String {
    let terms: Vec<String> = cols
        .names()
        .iter()
        .map(|c| format!("{}::numeric", qi(c)))
        .collect();
    format!("({})", terms.join(" + "))
}

/// The server's message of a driver error (its `Display` says only "db error").
fn pg_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

/// A table's `where` filter as SQL (the config was validated, so it parses).
fn row_filter(items: &[String]) -> Option<String> {
    crate::filter::Filter::parse(items)
        .ok()
        .and_then(|f| f.to_sql())
}

/// The SKU column qualifies: not NULL and not longer than `max_sku_bytes`.
fn valid_sku(col: &str, max_sku_bytes: usize) -> String {
    let c = qi(col);
    format!("{c} IS NOT NULL AND octet_length({c}::text) <= {max_sku_bytes}")
}

/// A mapped row's SKU or location as SQL over the row aliased `__t`: its column, or a
/// scalar subquery per lookup hop (the hop's `where` names the referenced table's
/// columns, which an unqualified name finds first).
fn source_sql(v: &crate::config::ValueSource, pubf: &PubFilters) -> String {
    use crate::config::{RefSource, ValueSource};
    let l = match v {
        ValueSource::Column(c) => return format!("__t.{}", qi(c)),
        ValueSource::Lookup(l) => l,
    };
    let hops = l.hops();
    // innermost first: the last hop's value, then wrap outwards
    let mut expr = String::new();
    for (n, h) in hops.iter().enumerate().rev() {
        let alias = format!("__h{n}");
        let value = match &h.column {
            Some(c) if n + 1 == hops.len() => format!("{alias}.{}", qi(c)),
            _ => format!("({expr})"),
        };
        let reference = match (&h.on, n) {
            (RefSource::Column(c), 0) => format!("__t.{}", qi(c)),
            (RefSource::Column(c), _) => format!("__h{}.{}", n - 1, qi(c)),
            (RefSource::Json { json, path }, _) => {
                let mut e = format!("__t.{}", qi(json));
                let parts: Vec<&str> = path.split('.').collect();
                for (i, p) in parts.iter().enumerate() {
                    let op = if i + 1 == parts.len() { "->>" } else { "->" };
                    e = format!("({e} {op} {})", crate::pg::conn::quote_literal(p));
                }
                e
            }
        };
        // named by `with_lookup_keys`
        let key = qi(h.key.as_deref().unwrap_or("id"));
        let key = format!("{alias}.{key}");
        // a JSON member is text: compare text forms (as skusync does)
        let cond = if matches!(h.on, RefSource::Json { .. }) {
            format!("{key}::text = {reference}")
        } else {
            format!("{key} = {reference}")
        };
        let mut filter = format!("WHERE {cond}");
        if let Some(w) = row_filter(&h.filter) {
            filter.push_str(&format!(" AND {w}"));
        }
        if let Some(w) = pubf.get(&h.from) {
            // the referenced table's publication filter: the snapshot loads no other rows
            filter.push_str(&format!(" AND ({w})"));
        }
        expr = format!("SELECT {value} FROM {} {alias} {filter}", qt(&h.from));
    }
    format!("({expr})")
}

/// The mapped tables with every lookup hop's `key` named: a hop without one matches the
/// referenced table's replica identity key (as the fold does), read from the catalog.
async fn with_lookup_keys(
    client: &tokio_postgres::Client,
    cfg: &Config,
) -> Result<
    (
        Vec<crate::config::InventoryMap>,
        Vec<crate::config::ActivityMap>,
    ),
    String,
> {
    async fn fill(
        client: &tokio_postgres::Client,
        v: &mut crate::config::ValueSource,
    ) -> Result<(), String> {
        let crate::config::ValueSource::Lookup(l) = v else {
            return Ok(());
        };
        let mut hop = Some(&mut **l);
        while let Some(h) = hop {
            if h.key.is_none() {
                // the replica identity's key, as the fold takes it (the stream knows no
                // other): the primary key, or the index REPLICA IDENTITY USING INDEX names
                let rows = client
                    .query(
                        "SELECT a.attname::text FROM pg_class c JOIN pg_index i ON i.indrelid = c.oid \
                           AND ((c.relreplident = 'd' AND i.indisprimary) \
                             OR (c.relreplident = 'i' AND i.indisreplident)) \
                         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) \
                         WHERE c.oid = to_regclass($1)",
                        &[&super::table_ident(&h.from)],
                    )
                    .await
                    .map_err(|e| format!("reading the replica identity of {}: {}", h.from, pg_text(&e)))?;
                match rows.as_slice() {
                    [one] => h.key = Some(one.get(0)),
                    _ => {
                        return Err(format!(
                            "{} has no single-column replica identity key; name the lookup's key",
                            h.from
                        ));
                    }
                }
            }
            hop = h.then.as_deref_mut();
        }
        Ok(())
    }
    let mut inventory = cfg.inventory.clone();
    for m in &mut inventory {
        fill(client, &mut m.sku).await?;
        if let Some(l) = &mut m.location {
            fill(client, l).await?;
        }
    }
    let mut activity = cfg.activity.clone();
    for a in &mut activity {
        fill(client, &mut a.sku).await?;
    }
    Ok((inventory, activity))
}

/// The aggregate of one `[[inventory]]` table: (sku, location, on_hand, reserved) per
/// SKU and location, over the rows a snapshot counts. `$1` (text[]) restricts the SKUs
/// when `only`.
fn stock_sql(
    m: &crate::config::InventoryMap,
    max_sku_bytes: usize,
    only: bool,
    scale: u32,
    pubf: &PubFilters,
) -> String {
    let d = Digits::of(m.scale, scale);
    let sku = source_sql(&m.sku, pubf);
    let loc = m
        .location
        .as_ref()
        .map(|l| format!("{}::text", source_sql(l, pubf)))
        .unwrap_or_else(|| "NULL::text".into());
    let mut filter = valid_quantity(&m.on_hand, d);
    let res = match &m.reserved {
        Some(r) => {
            filter.push_str(&format!(" AND {}", valid_quantity(r, d)));
            quantity_sql(r)
        }
        None => "0".into(),
    };
    if let Some(l) = &m.low_stock {
        // a row whose threshold is not usable is skipped whole, NULL means the default
        filter.push_str(&format!(
            " AND ({} IS NULL OR {})",
            qi(l),
            valid_column(l, d)
        ));
    }
    if let Some(w) = row_filter(&m.filter) {
        filter.push_str(&format!(" AND {w}"));
    }
    if let Some(w) = pubf.get(&m.table) {
        // the publications' row filter: the stream and the snapshot see no other rows
        filter.push_str(&format!(" AND ({w})"));
    }
    let mut outer = valid_sku("s", max_sku_bytes);
    if m.location.as_ref().is_some_and(|l| l.lookup().is_some()) {
        // a location that does not resolve places the row nowhere
        outer.push_str(" AND l IS NOT NULL");
    }
    if only {
        outer.push_str(" AND s::text = ANY($1)");
    }
    format!(
        "SELECT s::text, l, sum(oh)::text, sum(res)::text FROM \
         (SELECT {sku} AS s, {loc} AS l, {oh} AS oh, {res} AS res FROM {tab} __t WHERE {filter}) __x \
         WHERE {outer} GROUP BY 1, 2",
        oh = quantity_sql(&m.on_hand),
        tab = qt(&m.table),
    )
}

/// The aggregate of one `[[activity]]` table: (sku, kind, total) for the mapped kinds
/// (`$1`, text[]); `$2` (text[]) restricts the SKUs when `only`.
fn activity_sql(
    a: &crate::config::ActivityMap,
    max_sku_bytes: usize,
    only: bool,
    scale: u32,
    pubf: &PubFilters,
) -> String {
    let d = Digits::of(a.scale, scale);
    let sku = source_sql(&a.sku, pubf);
    // a constant kind is a literal (text the config validated; quoted as SQL text)
    let kind = match &a.kind {
        crate::config::KindSource::Column(c) => qi(c),
        crate::config::KindSource::Value { value } => crate::pg::conn::quote_literal(value),
    };
    let mut filter = format!("{kind}::text = ANY($1)");
    let val = match &a.quantity {
        Some(q) => {
            filter.push_str(&format!(" AND {}", valid_quantity(q, d)));
            quantity_sql(q)
        }
        None => "1".into(),
    };
    if let Some(w) = row_filter(&a.filter) {
        filter.push_str(&format!(" AND {w}"));
    }
    if let Some(w) = pubf.get(&a.table) {
        filter.push_str(&format!(" AND ({w})"));
    }
    let mut outer = valid_sku("s", max_sku_bytes);
    if only {
        outer.push_str(" AND s::text = ANY($2)");
    }
    format!(
        "SELECT s::text, k::text, sum(v)::text FROM \
         (SELECT {sku} AS s, {kind} AS k, {val} AS v FROM {tab} __t WHERE {filter}) __x \
         WHERE {outer} GROUP BY 1, 2",
        tab = qt(&a.table),
    )
}

/// A SKU's SQL totals.
#[derive(Debug, Default, Clone)]
struct SkuTruth {
    fields: BTreeMap<String, i128>,
    has_rows: bool,
}

/// A sum as text (`12`, `12.000`, `2.5`) in units of 10^-`scale`; the filters admit only
/// values with at most `scale` fractional digits.
fn parse_sum(s: &str, scale: u32) -> Result<i128, String> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let frac = frac.trim_end_matches('0');
    if frac.len() > scale as usize {
        return Err(format!("more fractional digits than scale {scale}: {s}"));
    }
    let text = if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    };
    units::parse(&text, scale)
        .map(i128::from)
        .ok_or_else(|| format!("bad sum {s}"))
}

/// Snapshot LSN and the SQL totals, read in one REPEATABLE READ snapshot.
/// The row filters the configured publications put on the tables skusync reads (mapped
/// and referenced), by configured table name.
type PubFilters = BTreeMap<String, String>;

async fn pub_filters(cfg: &Config, client: &Client) -> Result<PubFilters, String> {
    let mut out = PubFilters::new();
    for (table, _) in super::check::wanted_tables(cfg) {
        let (schema, name) = table.split_once('.').unwrap_or(("public", &table));
        let f = crate::pg::publication::row_filter_sql(
            client,
            &cfg.postgres.publication.names(),
            schema,
            name,
        )
        .await
        .map_err(|e| {
            format!(
                "reading the publications' row filter of {table}: {}",
                pg_text(&e)
            )
        })?;
        if let Some(f) = f {
            out.insert(table, f);
        }
    }
    Ok(out)
}

async fn sql_truth(
    cfg: &Config,
    client: &Client,
    only: Option<&[String]>,
) -> Result<(Lsn, BTreeMap<String, SkuTruth>), String> {
    let sql_err = |what: &str, e: tokio_postgres::Error| format!("{what}: {}", pg_text(&e));
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| sql_err("BEGIN", e))?;
    let result = async {
        // The snapshot is taken by this first statement: every commit it sees ends at or
        // before this LSN.
        let row = client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(|e| sql_err("pg_current_wal_insert_lsn() (verify needs the primary)", e))?;
        let s: String = row.get(0);
        let lsn: Lsn = s.parse().map_err(|e| format!("{e}"))?;
        let max = cfg.limits.max_sku_bytes;
        let scale = cfg.quantity_scale();
        let only_v: Vec<String> = only.map(<[String]>::to_vec).unwrap_or_default();
        let mut t: BTreeMap<String, SkuTruth> = BTreeMap::new();
        let (inventory, activity) = with_lookup_keys(client, cfg).await?;
        let pubf = pub_filters(cfg, client).await?;
        for m in &inventory {
            let sql = stock_sql(m, max, only.is_some(), scale, &pubf);
            let rows = if only.is_some() {
                client.query(&sql, &[&only_v]).await
            } else {
                client.query(&sql, &[]).await
            }
            .map_err(|e| sql_err(&format!("aggregating {}", m.table), e))?;
            for row in rows {
                let sku: String = row.get(0);
                let loc: Option<String> = row.get(1);
                let oh = parse_sum(&row.get::<_, String>(2), scale)?;
                let rs = parse_sum(&row.get::<_, String>(3), scale)?;
                let e = t.entry(sku).or_default();
                e.has_rows = true;
                let f = &mut e.fields;
                *f.entry("on_hand".into()).or_default() += oh;
                *f.entry("reserved".into()).or_default() += rs;
                *f.entry("available".into()).or_default() += oh - rs;
                // skusync keeps no location fields for a NULL or empty location
                if let Some(l) = loc.filter(|l| !l.is_empty()) {
                    *f.entry(format!("loc:{l}:on_hand")).or_default() += oh;
                    *f.entry(format!("loc:{l}:reserved")).or_default() += rs;
                }
            }
        }
        for a in &activity {
            let kinds: Vec<String> = a.counters.keys().cloned().collect();
            let sql = activity_sql(a, max, only.is_some(), scale, &pubf);
            let rows = if only.is_some() {
                client.query(&sql, &[&kinds, &only_v]).await
            } else {
                client.query(&sql, &[&kinds]).await
            }
            .map_err(|e| sql_err(&format!("aggregating {}", a.table), e))?;
            for row in rows {
                let sku: String = row.get(0);
                let kind: String = row.get(1);
                let v = parse_sum(&row.get::<_, String>(2), scale)?;
                if let Some(c) = a.counters.get(&kind) {
                    *t.entry(sku)
                        .or_default()
                        .fields
                        .entry(c.clone())
                        .or_default() += v;
                }
            }
        }
        Ok((lsn, t))
    }
    .await;
    // read-only: nothing to keep; a failed transaction must end too
    let _ = client.batch_execute("ROLLBACK").await;
    result
}

// ---------------------------------------------------------------------------------------
// Redis side

type Hash = HashMap<String, String>;

async fn read_meta(con: &mut RedisCon, prefix: &str) -> Result<Hash, String> {
    redis::cmd("HGETALL")
        .arg(layout::meta_key(prefix))
        .query_async(con)
        .await
        .map_err(|e| format!("redis: {e}"))
}

/// Wait until skusync applied everything up to `lsn` (Redis `applied_lsn`, or the slot's
/// confirmed position, which never passes what Redis holds).
async fn wait_applied(
    cfg: &Config,
    client: &Client,
    con: &mut RedisCon,
    prefix: &str,
    lsn: Lsn,
    wait: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let meta = read_meta(con, prefix).await?;
        if meta.is_empty() {
            return Err(format!(
                "Redis has no {}: skusync has not loaded a snapshot into it",
                layout::meta_key(prefix)
            ));
        }
        let bootstrap = meta.get("bootstrap").map(String::as_str).unwrap_or("");
        if bootstrap != "done" {
            return Err(format!(
                "Redis is being rebuilt (bootstrap={}); run verify once it is done",
                log_value(bootstrap)
            ));
        }
        let applied = meta
            .get("applied_lsn")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Lsn)
            .unwrap_or(Lsn::ZERO);
        if applied >= lsn {
            return Ok(());
        }
        let confirmed: Option<String> = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&cfg.postgres.slot],
            )
            .await
            .map_err(|e| format!("reading the slot: {}", pg_text(&e)))?
            .and_then(|r| r.get(0));
        if confirmed
            .and_then(|c| c.parse::<Lsn>().ok())
            .is_some_and(|c| c >= lsn)
        {
            return Ok(());
        }
        if start.elapsed() >= wait {
            return Err(format!(
                "skusync has not applied up to {lsn} within {} s (applied_lsn {applied}): \
                 is it running and caught up? (--wait sets the limit)",
                wait.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The hashes of `skus` (absent ones left out), pipelined.
async fn read_hashes(
    con: &mut RedisCon,
    prefix: &str,
    skus: &[String],
) -> Result<BTreeMap<String, Hash>, String> {
    let mut out = BTreeMap::new();
    for chunk in skus.chunks(200) {
        let mut p = redis::pipe();
        for s in chunk {
            p.cmd("HGETALL").arg(layout::sku_key(prefix, s));
        }
        let hashes: Vec<Vec<(Vec<u8>, Vec<u8>)>> = p
            .query_async(con)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        for (s, h) in chunk.iter().zip(hashes) {
            if h.is_empty() {
                continue;
            }
            let h: Hash = h
                .into_iter()
                .map(|(f, v)| {
                    (
                        String::from_utf8_lossy(&f).into_owned(),
                        String::from_utf8_lossy(&v).into_owned(),
                    )
                })
                .collect();
            out.insert(s.clone(), h);
        }
    }
    Ok(out)
}

/// Counter name -> whether a `known_skus_only` table feeds it.
fn counters(cfg: &Config) -> BTreeMap<String, bool> {
    let mut out: BTreeMap<String, bool> = BTreeMap::new();
    for a in &cfg.activity {
        for c in a.counters.values() {
            *out.entry(c.clone()).or_default() |= a.known_skus_only;
        }
    }
    out
}

fn is_stock_field(f: &str) -> bool {
    matches!(f, "on_hand" | "reserved" | "available")
        || (f.starts_with("loc:") && (f.ends_with(":on_hand") || f.ends_with(":reserved")))
}

/// Compare one SKU: (differences, not verifiable).
fn compare_sku(
    sku: &str,
    sql: Option<&SkuTruth>,
    redis: Option<&Hash>,
    counters: &BTreeMap<String, bool>,
    scale: u32,
) -> (Vec<Finding>, Vec<Finding>) {
    let mut diffs = Vec::new();
    let mut nv = Vec::new();
    let finding = |field: &str, redis: String, value: String| Finding {
        sku: sku.to_string(),
        field: field.to_string(),
        redis,
        source: "sql",
        value,
    };
    let has_rows = sql.is_some_and(|t| t.has_rows);
    match redis {
        None if has_rows => diffs.push(finding("hash", "absent".into(), "present".into())),
        // gone, or reset by a rebuild whose snapshot did not reload it (piece -1)
        Some(h) if has_rows && crate::sinks::mqtt::payload::is_gone(h) => {
            let redis = if h.get("gone").map(String::as_str) == Some("1") {
                "1"
            } else {
                "reset (piece -1)"
            };
            diffs.push(finding("gone", redis.into(), "0".into()))
        }
        _ => {}
    }
    let empty_t = BTreeMap::new();
    let empty_r = Hash::new();
    let t = sql.map(|t| &t.fields).unwrap_or(&empty_t);
    let h = redis.unwrap_or(&empty_r);
    let fields: BTreeSet<&str> = t
        .keys()
        .map(String::as_str)
        .chain(
            h.keys()
                .map(String::as_str)
                .filter(|f| is_stock_field(f) || counters.contains_key(*f)),
        )
        .collect();
    for f in fields {
        let want = t.get(f).copied().unwrap_or(0);
        let raw = h.get(f);
        let got = match raw {
            None => Some(0),
            Some(v) => units::parse(v, scale).map(i128::from),
        };
        if got == Some(want) {
            continue;
        }
        let shown = raw.cloned().unwrap_or_else(|| "absent".into());
        let want_text = i64::try_from(want)
            .map(|w| units::format(w, scale))
            .unwrap_or_else(|_| want.to_string());
        let x = finding(f, shown, want_text);
        match (counters.get(f), got) {
            // retention deleted counted rows: the lifetime total stays, SQL cannot show it
            (Some(_), Some(g)) if g > want => nv.push(x),
            (Some(true), Some(_)) => nv.push(x),
            _ => diffs.push(x),
        }
    }
    (diffs, nv)
}

/// The Redis-vs-SQL rounds.
async fn verify_redis(
    cfg: &Config,
    opts: &Options,
    client: &Client,
    con: &mut RedisCon,
) -> Result<Report, String> {
    let prefix = cfg.redis.as_ref().map(|r| r.prefix.as_str()).unwrap_or("");
    let counters = counters(cfg);
    let mut report = Report::default();
    // SKUs to check this round (None: all); SKUs that differed in the previous round.
    let mut pending: Option<Vec<String>> = None;
    let mut differed: BTreeSet<String> = BTreeSet::new();
    let mut moving: BTreeSet<String> = BTreeSet::new();
    let rounds = opts.rounds.max(1);
    // One round more than asked, for SKUs that first differed in the last: a difference
    // seen once may be a commit in the WAL before the snapshot's LSN yet not visible to it
    // (its transaction still ending, or waiting for a synchronous standby).
    for round in 1..=rounds + 1 {
        report.rounds = round;
        let (lsn, truth) = sql_truth(cfg, client, pending.as_deref()).await?;
        wait_applied(cfg, client, con, prefix, lsn, opts.wait).await?;
        let skus: Vec<String> = match &pending {
            None => {
                let mut all: BTreeSet<String> = rsink::scan_skus(con, prefix)
                    .await
                    .map_err(|e| format!("redis: {e}"))?
                    .into_iter()
                    .collect();
                all.extend(truth.keys().cloned());
                all.into_iter().collect()
            }
            Some(p) => p.clone(),
        };
        if round == 1 {
            report.skus_checked = skus.len();
        }
        let hashes = read_hashes(con, prefix, &skus).await?;
        let mut next = Vec::new();
        let mut now_differ = BTreeSet::new();
        if round <= rounds {
            // (the confirming round keeps what the last one found moving)
            moving.clear();
        }
        for sku in &skus {
            let h = hashes.get(sku);
            let fence = h
                .and_then(|h| h.get("lsn"))
                .and_then(|v| v.parse::<u64>().ok())
                .map(Lsn);
            if fence.is_some_and(|f| f >= lsn) {
                // changed after the snapshot: a fresh snapshot will tell
                moving.insert(sku.clone());
                next.push(sku.clone());
                continue;
            }
            let (diffs, nv) = compare_sku(sku, truth.get(sku), h, &counters, cfg.quantity_scale());
            if diffs.is_empty() {
                report.not_verifiable.extend(nv);
            } else if differed.contains(sku) {
                // differed twice with a settled fence: a real difference
                report.differences.extend(diffs);
                report.not_verifiable.extend(nv);
            } else {
                now_differ.insert(sku.clone());
                next.push(sku.clone());
            }
        }
        differed = now_differ;
        if round >= rounds {
            // past the rounds asked for, only first differences are checked again
            next.retain(|s| differed.contains(s));
        }
        if next.is_empty() {
            break;
        }
        pending = Some(next);
    }
    report.changing = moving.into_iter().collect();
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// --repair

async fn request_rebuild(con: &mut RedisCon, prefix: &str) -> Result<(), String> {
    let meta = layout::meta_key(prefix);
    // only an existing meta hash: creating one would make it look bootstrapped
    let set: i64 = redis::Script::new(
        "if redis.call('EXISTS', KEYS[1]) == 1 then \
           redis.call('HSET', KEYS[1], 'bootstrap', 'stale') return 1 end return 0",
    )
    .key(&meta)
    .invoke_async(con)
    .await
    .map_err(|e| format!("redis: {e}"))?;
    if set == 1 {
        Ok(())
    } else {
        Err(format!("Redis has no {meta}: nothing to repair"))
    }
}

async fn wait_rebuilt(con: &mut RedisCon, prefix: &str, wait: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let meta = read_meta(con, prefix).await?;
        if meta.get("bootstrap").map(String::as_str) == Some("done") {
            tracing::info!("verify: rebuild done after {} s", start.elapsed().as_secs());
            return Ok(());
        }
        if start.elapsed() >= wait {
            return Err(format!(
                "the rebuild did not finish within {} s (bootstrap={}): is skusync running? \
                 It rebuilds when it starts or notices bootstrap=stale",
                wait.as_secs(),
                log_value(meta.get("bootstrap").map(String::as_str).unwrap_or("")),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------
// --mqtt

/// Retained (and later live) state messages by topic, collected by a subscriber task.
#[derive(Default)]
struct Inbox {
    subscribed: bool,
    last_message: Option<Instant>,
    messages: HashMap<String, Vec<u8>>,
    error: Option<String>,
}

/// Subscribe to every SKU state topic and collect messages until the broker has sent its
/// retained ones (quiet for a second after the SUBACK, at most 20 s). The subscription
/// stays open for later rounds; drop the client to end it.
async fn subscribe(
    mc: &MqttConfig,
) -> Result<
    (
        rumqttc::v5::AsyncClient,
        std::sync::Arc<std::sync::Mutex<Inbox>>,
    ),
    String,
> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    use std::sync::{Arc, Mutex};
    let env_pw = std::env::var(crate::sinks::mqtt::PASSWORD_ENV).ok();
    let broker = crate::sinks::mqtt::parse_url(&mc.url, env_pw).map_err(|e| e.to_string())?;
    // An id of its own (the daemon keeps its session) and no Last Will (a verify that
    // dies must not mark skusync offline).
    let id = format!("{}-verify-{}", mc.client_id, std::process::id());
    let mut o = MqttOptions::new(id, broker.host.clone(), broker.port);
    o.set_clean_start(true);
    o.set_connection_timeout(super::CONNECT_TIMEOUT.as_secs());
    o.set_keep_alive(Duration::from_secs(30));
    let max = u32::try_from(mc.max_packet_bytes).unwrap_or(u32::MAX);
    o.set_max_packet_size(Some(max));
    if let Some(u) = &broker.user {
        o.set_credentials(u.clone(), broker.password.clone().unwrap_or_default());
    }
    if broker.tls {
        let tls = super::check::mqtt_tls(mc.ca_file.as_deref())?;
        o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    let (client, mut el) = AsyncClient::new(o, 16);
    let inbox = Arc::new(Mutex::new(Inbox::default()));
    let filter = format!("{}/sku/+", mc.topic_prefix);
    client
        .subscribe(filter, QoS::AtMostOnce)
        .await
        .map_err(|e| format!("mqtt: {e}"))?;
    let ib = inbox.clone();
    tokio::spawn(async move {
        loop {
            let ev = el.poll().await;
            let Ok(mut g) = ib.lock() else { return };
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    g.subscribed = true;
                    g.last_message = Some(Instant::now());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    g.messages.insert(topic, p.payload.to_vec());
                    g.last_message = Some(Instant::now());
                }
                Ok(_) => {}
                Err(e) => {
                    // one session only: a reconnect would hide messages lost meanwhile
                    g.error = Some(format!("mqtt.url: {e}"));
                    return;
                }
            }
        }
    });
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let g = inbox.lock().map_err(|_| "mqtt: subscriber failed")?;
        if let Some(e) = &g.error {
            return Err(e.clone());
        }
        let quiet = g
            .last_message
            .is_some_and(|t| t.elapsed() >= Duration::from_secs(1));
        if g.subscribed && quiet {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            if !g.subscribed {
                return Err("mqtt.url: no SUBACK within 20 s".into());
            }
            break;
        }
    }
    Ok((client, inbox))
}

/// Compare one SKU's retained message (`None`: none, or an empty one) with its hash.
/// `Err(())` when the publisher has not yet acknowledged the hash's state (`pub_lsn`
/// behind `lsn`): not comparable yet.
fn compare_retained(
    sku: &str,
    h: Option<&Hash>,
    payload: Option<&[u8]>,
    counter_names: &[String],
    scale: u32,
) -> Result<Vec<Finding>, ()> {
    let finding = |field: &str, redis: String, value: String| Finding {
        sku: sku.to_string(),
        field: format!("mqtt:{field}"),
        redis,
        source: "mqtt",
        value,
    };
    // the publisher clears a SKU Redis holds nothing for (gone, or reset by a rebuild)
    let gone = h.is_none_or(crate::sinks::mqtt::payload::is_gone);
    if let Some(h) = h {
        let lsn = h.get("lsn").map(String::as_str).unwrap_or("0");
        if Some(lsn) != h.get("pub_lsn").map(String::as_str) {
            return Err(());
        }
    }
    let Some(payload) = payload else {
        return Ok(if gone {
            vec![]
        } else {
            vec![finding("retained", "present".into(), "absent".into())]
        });
    };
    if gone {
        let what = if h.is_some() { "gone" } else { "absent" };
        return Ok(vec![finding("retained", what.into(), "present".into())]);
    }
    let h = h.ok_or(())?;
    let Some(j) = crate::sinks::mqtt::payload::decode(payload) else {
        return Ok(vec![finding("payload", "state".into(), "not JSON".into())]);
    };
    let mut out = Vec::new();
    if j.get("sku").and_then(|v| v.as_str()) != Some(sku) {
        out.push(finding("sku", "matches topic".into(), "differs".into()));
    }
    if let Some(l) = h.get("lsn").and_then(|v| v.parse::<u64>().ok()) {
        let want = Lsn(l).to_string();
        let got = j.get("lsn").and_then(|v| v.as_str()).unwrap_or("absent");
        if got != want {
            out.push(finding("lsn", want, got.to_string()));
        }
    }
    // In units (decimals are compared exactly, by their text).
    let int = |f: &str| h.get(f).and_then(|v| units::parse(v, scale)).unwrap_or(0);
    let member = |v: Option<&serde_json::Value>| {
        v.filter(|v| v.is_number())
            .and_then(|v| units::parse(&v.to_string(), scale))
            .unwrap_or(0)
    };
    let on = int("on_hand");
    let res = int("reserved");
    let avail = h
        .get("available")
        .and_then(|v| units::parse(v, scale))
        .unwrap_or(on - res);
    let mut numbers = vec![
        ("on_hand".to_string(), on),
        ("reserved".to_string(), res),
        ("available".to_string(), avail),
    ];
    for c in counter_names {
        numbers.push((c.clone(), int(c)));
    }
    for (f, want) in numbers {
        let got = member(j.get(&f));
        if got != want {
            out.push(finding(
                &f,
                units::format(want, scale),
                units::format(got, scale),
            ));
        }
    }
    // locations: the hash's loc fields against the payload's nested object
    let mut locs: BTreeMap<String, [i64; 2]> = BTreeMap::new();
    for (f, v) in h {
        if let Some(rest) = f.strip_prefix("loc:")
            && let Some((loc, what)) = rest.rsplit_once(':')
        {
            let i = match what {
                "on_hand" => 0,
                "reserved" => 1,
                _ => continue,
            };
            locs.entry(loc.to_string()).or_default()[i] = units::parse(v, scale).unwrap_or(0);
        }
    }
    let empty = serde_json::Map::new();
    let plocs = j
        .get("locations")
        .and_then(|v| v.as_object())
        .unwrap_or(&empty);
    let names: BTreeSet<&str> = locs
        .keys()
        .map(String::as_str)
        .chain(plocs.keys().map(String::as_str))
        .collect();
    for loc in names {
        let want = locs.get(loc).copied();
        let got = plocs.get(loc);
        for (i, what) in ["on_hand", "reserved"].iter().enumerate() {
            let w = want
                .map(|x| units::format(x[i], scale))
                .unwrap_or_else(|| "absent".into());
            let g = got
                .map(|o| units::format(member(o.get(*what)), scale))
                .unwrap_or_else(|| "absent".into());
            if w != g {
                out.push(finding(&format!("loc:{loc}:{what}"), w, g));
            }
        }
    }
    Ok(out)
}

/// Retained state vs Redis: (SKUs compared, differences, SKUs whose state was still
/// being published through every round).
async fn verify_mqtt(
    cfg: &Config,
    mc: &MqttConfig,
    prefix: &str,
    con: &mut RedisCon,
    rounds: u32,
) -> Result<(usize, Vec<Finding>, Vec<String>), String> {
    let (client, inbox) = subscribe(mc).await?;
    let topic_pre = format!("{}/sku/", mc.topic_prefix);
    let counter_names: Vec<String> = counters(cfg).into_keys().collect();
    let retained = |inbox: &std::sync::Mutex<Inbox>| -> Result<BTreeMap<String, Vec<u8>>, String> {
        let g = inbox.lock().map_err(|_| "mqtt: subscriber failed")?;
        if let Some(e) = &g.error {
            return Err(e.clone());
        }
        Ok(g.messages
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .filter_map(|(t, p)| {
                let sku = crate::sinks::mqtt::decode_sku(t.strip_prefix(&topic_pre)?)?;
                Some((sku, p.clone()))
            })
            .collect())
    };
    let mut pending: BTreeSet<String> = rsink::scan_skus(con, prefix)
        .await
        .map_err(|e| format!("redis: {e}"))?
        .into_iter()
        .collect();
    pending.extend(retained(&inbox)?.into_keys());
    let checked = pending.len();
    let mut diffs = Vec::new();
    let mut behind = Vec::new();
    for round in 1..=rounds.max(1) {
        let msgs = retained(&inbox)?;
        let list: Vec<String> = pending.iter().cloned().collect();
        let hashes = read_hashes(con, prefix, &list).await?;
        let last = round == rounds.max(1);
        let mut next = BTreeSet::new();
        diffs.clear();
        behind.clear();
        for sku in &list {
            match compare_retained(
                sku,
                hashes.get(sku),
                msgs.get(sku).map(Vec::as_slice),
                &counter_names,
                cfg.quantity_scale(),
            ) {
                Ok(d) if d.is_empty() => {}
                Ok(d) => {
                    // a newer message may be on its way to this subscriber
                    next.insert(sku.clone());
                    diffs.extend(d);
                }
                Err(()) => {
                    next.insert(sku.clone());
                    behind.push(sku.clone());
                }
            }
        }
        if next.is_empty() || last {
            break;
        }
        pending = next;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = client.disconnect().await;
    Ok((checked, diffs, behind))
}

// ---------------------------------------------------------------------------------------
// Output

fn render_into(s: &mut String, r: &Report) {
    for d in &r.differences {
        let _ = writeln!(
            s,
            "DIFF {:?} {:?} redis={} {}={}",
            log_value(&d.sku),
            log_value(&d.field),
            log_value(&d.redis),
            d.source,
            log_value(&d.value)
        );
    }
    for d in &r.not_verifiable {
        let _ = writeln!(
            s,
            "NOT-VERIFIABLE {:?} {:?} redis={} {}={} (activity total: rows deleted since counted, or known_skus_only)",
            log_value(&d.sku),
            log_value(&d.field),
            log_value(&d.redis),
            d.source,
            log_value(&d.value)
        );
    }
    for c in &r.changing {
        let _ = writeln!(
            s,
            "CHANGING {:?} (kept changing; not verified)",
            log_value(c)
        );
    }
    let _ = writeln!(
        s,
        "verify: {} SKUs checked{}, {} differences, {} not verifiable, {} changing ({} rounds)",
        r.skus_checked,
        r.mqtt_checked
            .map(|n| format!(" ({n} against MQTT)"))
            .unwrap_or_default(),
        r.differences.len(),
        r.not_verifiable.len(),
        r.changing.len(),
        r.rounds
    );
}

/// The human-readable report: one line per finding, then the summary line (with
/// `--repair`, the report before the rebuild first).
pub fn render_text(r: &Report) -> String {
    let mut s = String::new();
    if let Some(b) = &r.before_repair {
        render_into(&mut s, b);
        s.push_str("repair: Redis rebuilt from a fresh snapshot; verifying again\n");
    }
    render_into(&mut s, r);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truth(fields: &[(&str, i128)]) -> SkuTruth {
        SkuTruth {
            fields: fields.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            has_rows: true,
        }
    }

    fn hash(fields: &[(&str, &str)]) -> Hash {
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_counter_above_sql_is_not_verifiable_and_below_is_a_difference() {
        let c: BTreeMap<String, bool> = [("views".to_string(), false)].into();
        let t = truth(&[("on_hand", 3), ("views", 5)]);
        let (d, nv) = compare_sku(
            "s",
            Some(&t),
            Some(&hash(&[("on_hand", "3"), ("views", "7")])),
            &c,
            0,
        );
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(nv.len(), 1);
        let (d, _) = compare_sku(
            "s",
            Some(&t),
            Some(&hash(&[("on_hand", "3"), ("views", "4")])),
            &c,
            0,
        );
        assert_eq!(d[0].field, "views");
    }

    #[test]
    fn a_known_skus_only_counter_is_never_a_difference() {
        let c: BTreeMap<String, bool> = [("views".to_string(), true)].into();
        let t = truth(&[("views", 5)]);
        let (d, nv) = compare_sku("s", Some(&t), Some(&hash(&[("views", "2")])), &c, 0);
        assert!(d.is_empty());
        assert_eq!(nv.len(), 1);
    }

    #[test]
    fn stock_fields_absent_count_as_zero_and_extra_ones_differ() {
        let c = BTreeMap::new();
        let t = truth(&[("on_hand", 0), ("loc:A:on_hand", 2)]);
        let h = hash(&[
            ("loc:A:on_hand", "2"),
            ("loc:B:reserved", "1"),
            ("lsn", "9"),
        ]);
        let (d, nv) = compare_sku("s", Some(&t), Some(&h), &c, 0);
        assert!(nv.is_empty());
        let f: Vec<&str> = d.iter().map(|x| x.field.as_str()).collect();
        assert_eq!(f, ["loc:B:reserved"]);
        let (d, _) = compare_sku("s", Some(&t), None, &c, 0);
        assert_eq!(d[0].field, "hash");
        let (d, _) = compare_sku("s", None, Some(&hash(&[("on_hand", "x")])), &c, 0);
        assert_eq!((d[0].redis.as_str(), d[0].value.as_str()), ("x", "0"));
    }

    #[test]
    fn sums_parse_only_as_whole_numbers() {
        assert_eq!(parse_sum("12.000", 0), Ok(12));
        assert_eq!(parse_sum("-3", 0), Ok(-3));
        assert!(parse_sum("1.5", 0).is_err());
    }

    #[test]
    fn a_retained_message_is_compared_member_by_member() {
        let names = vec!["views".to_string()];
        let h = hash(&[
            ("on_hand", "5"),
            ("reserved", "1"),
            ("available", "4"),
            ("loc:W:on_hand", "5"),
            ("loc:W:reserved", "1"),
            ("views", "2"),
            ("lsn", "100"),
            ("pub_lsn", "100"),
        ]);
        let good = br#"{"v":1,"sku":"s","on_hand":5,"reserved":1,"available":4,"views":2,"locations":{"W":{"on_hand":5,"reserved":1}},"lsn":"0/64"}"#;
        assert_eq!(
            compare_retained("s", Some(&h), Some(good), &names, 0),
            Ok(vec![])
        );
        let bad = br#"{"v":1,"sku":"s","on_hand":6,"reserved":1,"available":4,"views":2,"locations":{"W":{"on_hand":5,"reserved":1}},"lsn":"0/64"}"#;
        let d = compare_retained("s", Some(&h), Some(bad), &names, 0).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(
            (
                d[0].field.as_str(),
                d[0].redis.as_str(),
                d[0].value.as_str()
            ),
            ("mqtt:on_hand", "5", "6")
        );
        // unpublished state: not comparable yet
        let mut h2 = h.clone();
        h2.insert("lsn".into(), "101".into());
        assert_eq!(
            compare_retained("s", Some(&h2), Some(good), &names, 0),
            Err(())
        );
        // gone in Redis, or reset by a rebuild and not reloaded: no retained message allowed
        let g = hash(&[("gone", "1"), ("lsn", "7"), ("pub_lsn", "7")]);
        let reset = hash(&[
            ("lsn", "7"),
            ("piece", "-1"),
            ("pub_lsn", "7"),
            ("pub_piece", "-1"),
        ]);
        for g in [g, reset] {
            assert_eq!(compare_retained("s", Some(&g), None, &names, 0), Ok(vec![]));
            assert_eq!(
                compare_retained("s", Some(&g), Some(good), &names, 0).unwrap()[0].field,
                "mqtt:retained"
            );
        }
    }

    #[test]
    fn the_report_escapes_skus_and_ends_with_a_summary() {
        let r = Report {
            skus_checked: 3,
            rounds: 1,
            differences: vec![Finding {
                sku: "a\nb".into(),
                field: "on_hand".into(),
                redis: "5".into(),
                source: "sql",
                value: "4".into(),
            }],
            ..Default::default()
        };
        let s = render_text(&r);
        assert_eq!(
            s,
            "DIFF \"a\\nb\" \"on_hand\" redis=5 sql=4\n\
             verify: 3 SKUs checked, 1 differences, 0 not verifiable, 0 changing (1 rounds)\n"
        );
    }

    #[test]
    fn the_aggregates_filter_what_skusync_skips() {
        let m = crate::config::InventoryMap {
            table: "public.inv".into(),
            sku: "Sku".into(),
            location: Some("loc".into()),
            on_hand: "on_hand".into(),
            reserved: None,
            low_stock: None,
            filter: vec!["deleted_at IS NULL".into()],
            scale: None,
        };
        let sql = stock_sql(&m, 256, true, 0, &PubFilters::new());
        assert!(sql.contains("AND (deleted_at IS NULL)"), "{sql}");
        assert!(sql.contains("__t.\"Sku\" AS s"), "{sql}");
        assert!(sql.contains("octet_length(s::text) <= 256"), "{sql}");
        assert!(
            sql.contains("abs(on_hand::numeric) <= 9007199254740992"),
            "{sql}"
        );
        assert!(sql.contains("= ANY($1)"), "{sql}");
    }

    #[test]
    fn a_lookup_is_a_scalar_subquery_per_hop_with_its_where() {
        let cfg = crate::config::Config::parse(
            r#"
[postgres]
url = "postgresql://u@h/d"
[[inventory]]
table = "public.movements"
sku = { from = "public.items", on = "itemId", key = "id", then = { from = "public.variants", on = "variant_id", key = "id", column = "sku", where = ["deleted_at IS NULL"] } }
location = { from = "public.wh", on = "wh_id", key = "id", column = "slug" }
on_hand = "qty"
"#,
        )
        .unwrap();
        let sql = stock_sql(&cfg.inventory[0], 256, false, 0, &PubFilters::new());
        assert!(
            sql.contains(
                "(SELECT (SELECT __h1.sku FROM public.variants __h1 WHERE __h1.id = __h0.variant_id AND \
                 (deleted_at IS NULL)) FROM public.items __h0 WHERE __h0.id = __t.\"itemId\")"
            ),
            "{sql}"
        );
        // a location that does not resolve places the row nowhere
        assert!(sql.contains("AND l IS NOT NULL"), "{sql}");
        // the publications' row filters, on the mapped table and on a referenced one
        let pubf = PubFilters::from([
            ("public.movements".to_string(), "(qty <> 0)".to_string()),
            ("public.wh".to_string(), "(active)".to_string()),
        ]);
        let sql = stock_sql(&cfg.inventory[0], 256, false, 0, &pubf);
        assert!(
            sql.contains("FROM public.wh __h0 WHERE __h0.id = __t.wh_id AND ((active))"),
            "{sql}"
        );
        assert!(sql.contains("AND ((qty <> 0))) __x"), "{sql}");
    }
}
