//! The configured mapping of tables and columns, and its resolution against the
//! relations the server announces. Resolution is where schema problems are found: a
//! dropped mapped column, an unusable type, a replica identity that cannot attribute
//! deletes. Those stop the stream before anything past them is confirmed.

use crate::config::{ActivityMap, Config, ConfigError, InventoryMap, parse_window};
use crate::filter::{Filter, Kind as FilterKind, Resolved};
use crate::txn::{RelationDesc, ReplicaIdentity, value::oid};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Whole-number column types for quantities.
const QUANTITY_TYPES: [u32; 4] = [oid::INT2, oid::INT4, oid::INT8, oid::NUMERIC];
/// Timestamp types for event times.
const TIME_TYPES: [u32; 2] = [oid::TIMESTAMP, oid::TIMESTAMPTZ];

/// The mapping, validated and ready to resolve relations.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub inventory: Vec<InventoryMap>,
    pub activity: Vec<ActivitySpec>,
    /// Default low-stock threshold.
    pub low_stock: i64,
    /// Longest SKU kept (bytes); rows with longer ones count nowhere.
    pub max_sku_bytes: usize,
    /// Identifies the mapping; a different one means Redis must be rebuilt.
    pub fingerprint: String,
    /// Row filters of the stock tables, by index (empty: every row).
    pub inventory_filters: Vec<Filter>,
    /// The publications streamed (their row filters apply to the snapshot too).
    pub publications: Vec<String>,
    /// Decimal places of every stored quantity: the largest `scale` of any table (0:
    /// whole numbers). Quantities are folded in units of 10^-scale.
    pub scale: u32,
    /// Every hop of every lookup, numbered in config order (inventory `sku`, `location`,
    /// then activity `sku`); a hop's number names its lookup state in Redis.
    pub hops: Vec<HopSpec>,
}

/// One hop of a lookup: rows of `from`, keyed by `key`, each resolving to the text of
/// `column` (the last hop) or to a reference into the next hop (`next`'s `on` column of
/// this table), when it passes `filter`.
#[derive(Debug, Clone)]
pub struct HopSpec {
    pub id: usize,
    pub from: String,
    /// Where the reference into this hop is read (a column of the mapped table or of the
    /// previous hop's table).
    pub on: crate::config::RefSource,
    pub key: Option<String>,
    pub column: Option<String>,
    pub filter: Filter,
    /// The next hop, if any.
    pub next: Option<usize>,
    /// The previous hop (`None`: the first, read from the mapped table).
    pub prev: Option<usize>,
    /// The config key it belongs to, for messages (`inventory[0].sku`).
    pub owner: String,
    /// The mapped table it serves.
    pub table: String,
    /// Whether the mapped table is a stock table (its rows follow the lookup's changes).
    pub stock: bool,
}

/// An activity table with parsed windows and its HMAC key.
#[derive(Debug, Clone)]
pub struct ActivitySpec {
    pub map: ActivityMap,
    pub windows_secs: Vec<u64>,
    /// The HMAC of user ids, keyed (present iff `user` is mapped, in a mapping built by
    /// [`Mapping::from_config`]; redacted in Debug).
    pub user_key: Option<crate::secret::Secret<super::UserHasher>>,
    /// Its row filter (empty: every row).
    pub filter: Filter,
    /// Kind -> the counter its rows count into, as entries name it.
    pub names: BTreeMap<String, CounterName>,
}

/// A counter as the fold writes it.
#[derive(Debug, Clone)]
pub struct CounterName {
    /// The name in entries: `?<counter>` for a `known_skus_only` table (the apply step
    /// counts such a name only for a SKU with stock rows).
    pub name: super::Name,
    /// Whether it has window buckets (a window is configured, or it is `purchases`,
    /// whose hour the state messages report).
    pub buckets: bool,
}

impl Mapping {
    /// Build from the config (already validated by `Config::parse`), with the HMAC key of
    /// every mapped user column: an error names the column whose key is missing. What the
    /// daemon folds with.
    pub fn from_config(cfg: &Config) -> Result<Mapping, ConfigError> {
        Self::build(cfg, true)
    }

    /// [`from_config`](Self::from_config) without reading any HMAC key (every
    /// `user_key` is `None`), for commands that only resolve the mapping against the
    /// catalog (`check`): they work before a key is set. Never fold with it.
    pub fn without_user_keys(cfg: &Config) -> Result<Mapping, ConfigError> {
        Self::build(cfg, false)
    }

    fn build(cfg: &Config, with_keys: bool) -> Result<Mapping, ConfigError> {
        let mut activity = Vec::new();
        for (i, a) in cfg.activity.iter().enumerate() {
            let windows_secs = a
                .windows
                .iter()
                .map(|w| {
                    parse_window(w).ok_or_else(|| {
                        ConfigError(format!("activity[{i}].windows: bad window {w:?}"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let user_key = if with_keys {
                cfg.user_key(i)?
                    .map(|k| crate::secret::Secret::new(super::UserHasher::new(k.expose())))
            } else {
                None
            };
            let filter =
                Filter::parse(&a.filter).map_err(|e| ConfigError(format!("activity[{i}].{e}")))?;
            let names = a
                .counters
                .iter()
                .map(|(kind, counter)| {
                    let name = if a.known_skus_only {
                        format!("?{counter}")
                    } else {
                        counter.clone()
                    };
                    let buckets = !windows_secs.is_empty() || counter == "purchases";
                    let name = CounterName {
                        name: name.into(),
                        buckets,
                    };
                    (kind.clone(), name)
                })
                .collect();
            activity.push(ActivitySpec {
                map: a.clone(),
                windows_secs,
                user_key,
                filter,
                names,
            });
        }
        // The fingerprint covers what changes the meaning of stored values, not secrets.
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&cfg.inventory).unwrap_or_default());
        h.update(
            serde_json::to_vec(
                &cfg.activity
                    .iter()
                    .map(|a| {
                        let mut a = a.clone();
                        a.user_key = None;
                        a
                    })
                    .collect::<Vec<_>>(),
            )
            .unwrap_or_default(),
        );
        // Which rows count at all.
        h.update(cfg.limits.max_sku_bytes.to_be_bytes());
        let fingerprint = hex::encode(&h.finalize()[..12]);
        let inventory_filters = cfg
            .inventory
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Filter::parse(&m.filter).map_err(|e| ConfigError(format!("inventory[{i}].{e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut hops = Vec::new();
        for (owner, table, stock, v) in cfg.value_sources() {
            let Some(l) = v.lookup() else { continue };
            let chain = l.hops();
            let first = hops.len();
            for (n, h) in chain.iter().enumerate() {
                let filter =
                    Filter::parse(&h.filter).map_err(|e| ConfigError(format!("{owner}: {e}")))?;
                hops.push(HopSpec {
                    id: first + n,
                    from: h.from.clone(),
                    on: h.on.clone(),
                    key: h.key.clone(),
                    column: h.column.clone(),
                    filter,
                    next: (n + 1 < chain.len()).then_some(first + n + 1),
                    prev: n.checked_sub(1).map(|p| first + p),
                    owner: owner.clone(),
                    table: table.to_string(),
                    stock,
                });
            }
        }
        Ok(Mapping {
            hops,
            inventory: cfg.inventory.clone(),
            inventory_filters,
            publications: cfg.postgres.publication.names(),
            scale: cfg.quantity_scale(),
            activity,
            low_stock: cfg.alerts.low_stock,
            max_sku_bytes: cfg.limits.max_sku_bytes,
            fingerprint,
        })
    }

    /// Every counter name with its windows and whether it counts distinct users.
    pub fn counters(&self) -> Vec<(String, Vec<u64>, bool)> {
        let mut out: BTreeMap<String, (Vec<u64>, bool)> = BTreeMap::new();
        for a in &self.activity {
            for c in a.map.counters.values() {
                let e = out.entry(c.clone()).or_default();
                for w in &a.windows_secs {
                    if !e.0.contains(w) {
                        e.0.push(*w);
                    }
                }
                e.1 |= a.map.user.is_some();
            }
        }
        out.into_iter().map(|(k, (w, u))| (k, w, u)).collect()
    }

    /// Minutes of window buckets to keep (the largest window, and an hour when a
    /// `purchases` counter feeds the sell rate).
    pub fn keep_minutes(&self) -> i64 {
        let mut keep = self
            .activity
            .iter()
            .flat_map(|a| a.windows_secs.iter())
            .max()
            .copied()
            .unwrap_or(0)
            / 60;
        if self.counters().iter().any(|(c, _, _)| c == "purchases") {
            keep = keep.max(60);
        }
        keep as i64
    }

    /// The row filter of a mapped table (empty when it has none or is not mapped).
    pub fn filter_of(&self, table: &str) -> Option<&Filter> {
        self.inventory
            .iter()
            .zip(&self.inventory_filters)
            .find(|(m, _)| m.table == table)
            .map(|(_, f)| f)
            .or_else(|| {
                self.activity
                    .iter()
                    .find(|a| a.map.table == table)
                    .map(|a| &a.filter)
            })
            .filter(|f| !f.conditions.is_empty())
    }

    /// All mapped table names.
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.inventory
            .iter()
            .map(|m| m.table.as_str())
            .chain(self.activity.iter().map(|a| a.map.table.as_str()))
    }

    /// Tables read by lookups (each once, in hop order).
    pub fn lookup_tables(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for h in &self.hops {
            if !out.contains(&h.from.as_str()) {
                out.push(&h.from);
            }
        }
        out
    }

    /// Whether a stock table takes a value through a lookup.
    pub fn has_lookups(&self, inventory_index: usize) -> bool {
        let m = &self.inventory[inventory_index];
        m.sku.lookup().is_some() || m.location.as_ref().is_some_and(|l| l.lookup().is_some())
    }

    /// The first hop of a mapped table's lookup for a config key (`sku`, `location`).
    pub(crate) fn first_hop(&self, table: &str, key: &str) -> Option<usize> {
        self.hops
            .iter()
            .find(|h| h.prev.is_none() && h.table == table && h.owner.ends_with(&format!(".{key}")))
            .map(|h| h.id)
    }

    /// The hops a mapped stock table also serves as a referenced table (a Solidus stock
    /// item is counted, and stock movements look up their variant through it): `None`
    /// when it serves none.
    pub fn lookup_rule(
        &self,
        rel: &RelationDesc,
        name: &str,
    ) -> Result<Option<LookupRule>, SchemaError> {
        if !self.hops.iter().any(|h| h.from == name) {
            return Ok(None);
        }
        match self.resolve_lookup(rel, name)? {
            Rule::Lookup(l) => Ok(Some(l)),
            _ => Ok(None),
        }
    }

    /// Resolve a referenced table's relation: its hops' key, value and filter columns.
    fn resolve_lookup(&self, rel: &RelationDesc, name: &str) -> Result<Rule, SchemaError> {
        let mut hops = Vec::new();
        let identity: Vec<usize> = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
            .collect();
        let full = rel.replica_identity == ReplicaIdentity::Full;
        for h in self.hops.iter().filter(|h| h.from == name) {
            let what = format!("{} lookup in {}", h.owner, name);
            let key = match &h.key {
                Some(k) => resolve_column(rel, name, &format!("{}.key", h.owner), k, None)?,
                None => match identity.as_slice() {
                    [one] if !full => *one,
                    _ => {
                        return Err(SchemaError(format!(
                            "{what}: {name} has no single-column primary key (or replica identity index) \
                             to match the reference; name the referenced column with `key = \"...\"`"
                        )));
                    }
                },
            };
            if !full && !identity.contains(&key) {
                return Err(SchemaError(format!(
                    "{what}: its key column {} is not in the replica identity of {name}, so a deleted row \
                     cannot be matched; fix it with: ALTER TABLE {} REPLICA IDENTITY USING INDEX <a unique \
                     index on that column>;",
                    rel.columns[key].name,
                    crate::pg::ident::quote_table(name)
                )));
            }
            let value = match (&h.column, h.next) {
                (Some(c), None) => {
                    resolve_column(rel, name, &format!("{}.column", h.owner), c, None)?
                }
                (_, Some(next)) => {
                    let on = self.hops[next].on.column();
                    resolve_column(rel, name, &format!("{}.then.on", h.owner), on, None)?
                }
                (None, None) => {
                    return Err(SchemaError(format!("{what}: no column to take")));
                }
            };
            let filter = resolve_filter(rel, name, &h.filter)?;
            hops.push(HopRule {
                hop: h.id,
                key,
                value,
                filter,
            });
        }
        Ok(Rule::Lookup(LookupRule {
            table: name.to_string(),
            hops,
        }))
    }

    /// A mapped row's value source resolved against its relation.
    fn resolve_attr(
        &self,
        rel: &RelationDesc,
        table: &str,
        key: &str,
        v: &crate::config::ValueSource,
    ) -> Result<Attr, SchemaError> {
        match v {
            crate::config::ValueSource::Column(c) => {
                Ok(Attr::Column(resolve_column(rel, table, key, c, None)?))
            }
            crate::config::ValueSource::Lookup(l) => {
                let hop = self.first_hop(table, key).ok_or_else(|| {
                    SchemaError(format!("internal: no lookup hop for {table} {key}"))
                })?;
                let on = match &l.on {
                    crate::config::RefSource::Column(c) => {
                        RefCol::Column(resolve_column(rel, table, &format!("{key}.on"), c, None)?)
                    }
                    crate::config::RefSource::Json { json, path } => {
                        let i = resolve_column(rel, table, &format!("{key}.on.json"), json, None)?;
                        let t = rel.columns[i].type_oid;
                        if t != oid::JSON && t != oid::JSONB {
                            return Err(SchemaError(format!(
                                "mapped column {table}.{json} (config key {key}.on.json) has type oid {t}; it must be json or jsonb"
                            )));
                        }
                        RefCol::Json(i, path.split('.').map(str::to_string).collect())
                    }
                };
                Ok(Attr::Lookup { hop, on })
            }
        }
    }

    /// Resolve a relation against the mapping.
    pub fn resolve(&self, rel: &RelationDesc) -> Result<Rule, SchemaError> {
        self.resolve_as(rel, rel.qualified_name())
    }

    /// Resolve a relation as the mapped table `name` (a partition as its mapped parent:
    /// its columns are found by name, their positions may differ from the parent's).
    pub fn resolve_as(&self, rel: &RelationDesc, name: String) -> Result<Rule, SchemaError> {
        if let Some((i, m)) = self
            .inventory
            .iter()
            .enumerate()
            .find(|(_, m)| m.table == name)
        {
            let col = |key: &str, col: &str, types: Option<&[u32]>| {
                resolve_column(rel, &name, key, col, types)
            };
            let sku = self.resolve_attr(rel, &name, "sku", &m.sku)?;
            let cols = |key: &str, c: &crate::config::Columns| {
                c.names()
                    .iter()
                    .map(|n| col(key, n, Some(&QUANTITY_TYPES)))
                    .collect::<Result<Vec<usize>, _>>()
            };
            let on_hand = cols("on_hand", &m.on_hand)?;
            let location = m
                .location
                .as_ref()
                .map(|v| self.resolve_attr(rel, &name, "location", v))
                .transpose()?;
            let reserved = m
                .reserved
                .as_ref()
                .map(|c| cols("reserved", c))
                .transpose()?;
            let low_stock = m
                .low_stock
                .as_deref()
                .map(|c| col("low_stock", c, Some(&QUANTITY_TYPES)))
                .transpose()?;
            let key: Vec<usize> = rel
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_key)
                .map(|(i, _)| i)
                .collect();
            let filter = resolve_filter(rel, &name, &self.inventory_filters[i])?;
            let full = rel.replica_identity == ReplicaIdentity::Full;
            if !full && key.is_empty() {
                return Err(SchemaError(format!(
                    "stock table {name} has no replica identity key, so deletes cannot be attributed to a \
                     row; give it a primary key, or fix it with: ALTER TABLE {} REPLICA IDENTITY FULL;",
                    crate::pg::ident::quote_table(&name)
                )));
            }
            // A key without the SKU (a surrogate `id`): deletes and updates name the row by
            // its key alone, and the row index says which SKU holds it. A row whose SKU or
            // location is looked up is indexed whatever its key: the index keeps its
            // references and values, which a change of a referenced row moves.
            let records =
                matches!(sku, Attr::Lookup { .. }) || matches!(location, Some(Attr::Lookup { .. }));
            if records && full {
                return Err(SchemaError(format!(
                    "stock table {name} takes its SKU or location through a lookup, which needs its rows named \
                     by a key; give it a primary key (REPLICA IDENTITY DEFAULT) instead of REPLICA IDENTITY FULL"
                )));
            }
            let indexed = !full && (records || !matches!(sku, Attr::Column(c) if key.contains(&c)));
            return Ok(Rule::Inventory(InventoryRule {
                index: i,
                table: name,
                sku,
                location,
                on_hand,
                reserved,
                low_stock,
                key,
                full,
                indexed,
                records,
                filter,
                scale: m.scale.unwrap_or(0),
            }));
        }
        if let Some((i, a)) = self
            .activity
            .iter()
            .enumerate()
            .find(|(_, a)| a.map.table == name)
        {
            let m = &a.map;
            let col = |key: &str, col: &str, types: Option<&[u32]>| {
                resolve_column(rel, &name, key, col, types)
            };
            let filter = resolve_filter(rel, &name, &a.filter)?;
            return Ok(Rule::Activity(ActivityRule {
                index: i,
                filter,
                scale: m.scale.unwrap_or(0),
                table: name.clone(),
                sku: self.resolve_attr(rel, &name, "sku", &m.sku)?,
                kind: match &m.kind {
                    crate::config::KindSource::Column(c) => Kind::Column(col("kind", c, None)?),
                    crate::config::KindSource::Value { value } => Kind::Constant(value.clone()),
                },
                quantity: m
                    .quantity
                    .as_ref()
                    .map(|c| {
                        c.names()
                            .iter()
                            .map(|n| col("quantity", n, Some(&QUANTITY_TYPES)))
                            .collect::<Result<Vec<usize>, _>>()
                    })
                    .transpose()?,
                user: m
                    .user
                    .as_deref()
                    .map(|c| col("user", c, None))
                    .transpose()?,
                time: m
                    .time
                    .as_deref()
                    .map(|c| col("time", c, Some(&TIME_TYPES)))
                    .transpose()?,
            }));
        }
        if self.hops.iter().any(|h| h.from == name) {
            return self.resolve_lookup(rel, &name);
        }
        Ok(Rule::Unmapped)
    }
}

/// Resolve a row filter's columns: each must be in the row image the stream carries,
/// and of a type its conditions can be evaluated on.
fn resolve_filter(
    rel: &RelationDesc,
    table: &str,
    filter: &Filter,
) -> Result<Option<Arc<Resolved>>, SchemaError> {
    if filter.conditions.is_empty() {
        return Ok(None);
    }
    let mut cols = Vec::new();
    for c in filter.columns() {
        let i = resolve_column(rel, table, "where", c, None)?;
        let kind = FilterKind::of(rel.columns[i].type_oid);
        filter
            .check_kind(c, kind)
            .map_err(|e| SchemaError(format!("{table} where: {e}")))?;
        cols.push((i, kind));
    }
    Ok(Some(Arc::new(Resolved {
        filter: filter.clone(),
        cols,
    })))
}

fn resolve_column(
    rel: &RelationDesc,
    table: &str,
    key: &str,
    col: &str,
    types: Option<&[u32]>,
) -> Result<usize, SchemaError> {
    let Some(i) = rel.column_index(col) else {
        return Err(SchemaError(format!(
            "mapped column {table}.{col} (config key {key}) is not in the replicated relation: it was dropped, renamed, \
             or excluded by the publication's column list; restore it or fix the mapping"
        )));
    };
    if let Some(types) = types {
        let t = rel.columns[i].type_oid;
        if !types.contains(&t) {
            return Err(SchemaError(format!(
                "mapped column {table}.{col} (config key {key}) has type oid {t}, which skusync cannot use here; \
                 it must be {}",
                if types == QUANTITY_TYPES {
                    "smallint, integer, bigint or numeric"
                } else {
                    "timestamp or timestamptz"
                }
            )));
        }
    }
    Ok(i)
}

/// A schema problem that stops the stream (definite: the operator must act).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

/// How changes of one relation are folded.
#[derive(Debug, Clone)]
pub enum Rule {
    Inventory(InventoryRule),
    Activity(ActivityRule),
    /// A table read by lookups: its rows resolve references of mapped rows.
    Lookup(LookupRule),
    /// In the publication but not mapped: ignored (and counted).
    Unmapped,
}

/// A mapped row's SKU or location: a column, or a lookup starting at `hop`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    Column(usize),
    Lookup { hop: usize, on: RefCol },
}

impl Attr {
    /// The column of the mapped row it reads.
    pub fn column(&self) -> usize {
        match self {
            Attr::Column(i)
            | Attr::Lookup {
                on: RefCol::Column(i) | RefCol::Json(i, _),
                ..
            } => *i,
        }
    }
}

impl InventoryRule {
    /// Every column its rows are folded from (key, SKU, location, quantities, filter).
    pub fn columns(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.key.clone();
        v.extend(self.filter.iter().flat_map(|f| f.cols.iter().map(|c| c.0)));
        v.push(self.sku.column());
        v.extend(self.location.as_ref().map(Attr::column));
        v.extend(self.low_stock);
        v.extend(&self.on_hand);
        v.extend(self.reserved.iter().flatten());
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl ActivityRule {
    /// Every column its rows are counted from.
    pub fn columns(&self) -> Vec<usize> {
        let mut v: Vec<usize> = [
            Some(self.sku.column()),
            match self.kind {
                Kind::Column(i) => Some(i),
                Kind::Constant(_) => None,
            },
            self.user,
            self.time,
        ]
        .into_iter()
        .flatten()
        .chain(self.quantity.iter().flatten().copied())
        .chain(self.filter.iter().flat_map(|f| f.cols.iter().map(|c| c.0)))
        .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl LookupRule {
    /// Every column its hops read (keys, values, filters).
    pub fn columns(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .hops
            .iter()
            .flat_map(|h| {
                [h.key, h.value]
                    .into_iter()
                    .chain(h.filter.iter().flat_map(|f| f.cols.iter().map(|c| c.0)))
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Where a reference is read in the mapped row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefCol {
    Column(usize),
    /// A JSON column and the member path.
    Json(usize, Vec<String>),
}

/// Column positions of a referenced table, per hop it serves.
#[derive(Debug, Clone)]
pub struct LookupRule {
    pub table: String,
    pub hops: Vec<HopRule>,
}

/// One hop's columns in its table.
#[derive(Debug, Clone)]
pub struct HopRule {
    pub hop: usize,
    pub key: usize,
    /// The value column (last hop) or the next hop's reference column.
    pub value: usize,
    pub filter: Option<Arc<Resolved>>,
}

/// Column positions of a stock table.
#[derive(Debug, Clone)]
pub struct InventoryRule {
    pub index: usize,
    pub table: String,
    pub sku: Attr,
    pub location: Option<Attr>,
    /// Summed columns.
    pub on_hand: Vec<usize>,
    pub reserved: Option<Vec<usize>>,
    pub low_stock: Option<usize>,
    /// Replica identity key columns (all columns with REPLICA IDENTITY FULL).
    pub key: Vec<usize>,
    /// REPLICA IDENTITY FULL: rows are named by a hash of all their values.
    pub full: bool,
    /// The key does not contain the SKU (a surrogate key): the row index in Redis says
    /// which SKU holds each row (see `Fold::needs`).
    pub indexed: bool,
    /// Its SKU or location is looked up: the row index keeps each row's record (where it
    /// counts, its references and values; see `layout::RowRecord`).
    pub records: bool,
    /// Its row filter: rows that fail it count nowhere.
    pub filter: Option<Arc<Resolved>>,
    /// Fractional digits its quantities may have.
    pub scale: u32,
}

/// Where an activity row's kind is read.
#[derive(Debug, Clone)]
pub enum Kind {
    Column(usize),
    Constant(String),
}

/// Column positions of an activity table.
#[derive(Debug, Clone)]
pub struct ActivityRule {
    pub index: usize,
    /// Its row filter: rows that fail it are not counted.
    pub filter: Option<Arc<Resolved>>,
    /// Fractional digits its quantities may have.
    pub scale: u32,
    pub table: String,
    pub sku: Attr,
    pub kind: Kind,
    /// Summed columns.
    pub quantity: Option<Vec<usize>>,
    pub user: Option<usize>,
    pub time: Option<usize>,
}
