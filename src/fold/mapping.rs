//! The configured mapping of tables and columns, and its resolution against the
//! relations the server announces. Resolution is where schema problems are found: a
//! dropped mapped column, an unusable type, a replica identity that cannot attribute
//! deletes. Those stop the stream before anything past them is confirmed.

use super::filter::{Filter, Kind as FilterKind, Resolved};
use crate::config::{ActivityMap, Config, ConfigError, InventoryMap, parse_window};
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
}

/// An activity table with parsed windows and its HMAC key.
#[derive(Debug, Clone)]
pub struct ActivitySpec {
    pub map: ActivityMap,
    pub windows_secs: Vec<u64>,
    /// HMAC key for user ids (present iff `user` is mapped; redacted in Debug).
    pub user_key: Option<crate::secret::Secret<Vec<u8>>>,
    /// Its row filter (empty: every row).
    pub filter: Filter,
}

impl Mapping {
    /// Build from the config (already validated by `Config::parse`).
    pub fn from_config(cfg: &Config) -> Result<Mapping, ConfigError> {
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
            let user_key = cfg.user_key(i)?;
            let filter =
                Filter::parse(&a.filter).map_err(|e| ConfigError(format!("activity[{i}].{e}")))?;
            activity.push(ActivitySpec {
                map: a.clone(),
                windows_secs,
                user_key,
                filter,
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
        Ok(Mapping {
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
                e.1 |= a.user_key.is_some();
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
            let sku = col("sku", &m.sku, None)?;
            let cols = |key: &str, c: &crate::config::Columns| {
                c.names()
                    .iter()
                    .map(|n| col(key, n, Some(&QUANTITY_TYPES)))
                    .collect::<Result<Vec<usize>, _>>()
            };
            let on_hand = cols("on_hand", &m.on_hand)?;
            let location = m
                .location
                .as_deref()
                .map(|c| col("location", c, None))
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
            // its key alone, and the row index says which SKU holds it.
            let indexed = !full && !key.contains(&sku);
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
                sku: col("sku", &m.sku, None)?,
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
    /// In the publication but not mapped: ignored (and counted).
    Unmapped,
}

/// Column positions of a stock table.
#[derive(Debug, Clone)]
pub struct InventoryRule {
    pub index: usize,
    pub table: String,
    pub sku: usize,
    pub location: Option<usize>,
    /// Summed columns.
    pub on_hand: Vec<usize>,
    pub reserved: Option<Vec<usize>>,
    pub low_stock: Option<usize>,
    /// Replica identity key columns (all columns with REPLICA IDENTITY FULL).
    pub key: Vec<usize>,
    /// REPLICA IDENTITY FULL: rows are named by a hash of all their values.
    pub full: bool,
    /// The key does not contain the SKU (a surrogate key): the row index in Redis says
    /// which SKU holds each row (see `Fold::unresolved`).
    pub indexed: bool,
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
    pub sku: usize,
    pub kind: Kind,
    /// Summed columns.
    pub quantity: Option<Vec<usize>>,
    pub user: Option<usize>,
    pub time: Option<usize>,
}
