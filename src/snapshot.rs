//! Loading Redis from a consistent snapshot (first start, or a resync).
//!
//! The rows of every mapped table are read with COPY inside the snapshot exported by a
//! replication slot, and folded exactly like one big insert-only transaction whose
//! commit LSN sits just below the slot's consistent point: the stream then continues
//! where the snapshot ends, and the fence lets every later transaction through. Nothing
//! is buffered beyond one piece; progress is logged for large tables.

use crate::fold::{Fold, Mapping, Rule};
use crate::lsn::Lsn;
use crate::pg::connstr::PgConnectConfig;
use crate::pg::error::PgError;
use crate::pg::meta;
use crate::pgoutput::Datum;
use crate::sinks::redis::{Applier, RedisSinkError};
use crate::txn::{ColumnDesc, Op, RelationDesc, ReplicaIdentity, TxnBegin, TxnCommit};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;

/// Why a snapshot load failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Redis(#[from] RedisSinkError),
    #[error("{0}")]
    Schema(String),
}

/// Counts of a finished load, and the identities of the tables it read.
#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    pub rows: u64,
    pub skus: u64,
    pub tables: crate::fold::TableIdentities,
    /// Fingerprints of the partitioned stock tables' partitions, as loaded.
    pub partitions: std::collections::BTreeMap<String, String>,
}

/// Read the relation as pgoutput would describe it: non-dropped, non-generated columns in
/// attnum order, with replica-identity key flags.
pub async fn describe(
    client: &tokio_postgres::Client,
    cfg: &PgConnectConfig,
    table: &str,
) -> Result<Option<RelationDesc>, PgError> {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let rows = client
        .query(
            "SELECT c.oid, c.relreplident::text, a.attname::text, a.atttypid, a.atttypmod, \
                    (c.relreplident = 'f' OR a.attnum = ANY(i.indkey)) AS is_key \
             FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             LEFT JOIN pg_index i ON i.indrelid = c.oid AND \
                  ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident)) \
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await
        .map_err(|e| meta::classify(e, cfg))?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let oid: u32 = first.get(0);
    let ri: String = first.get(1);
    let replica_identity = match ri.as_str() {
        "f" => ReplicaIdentity::Full,
        "n" => ReplicaIdentity::Nothing,
        "i" => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Default,
    };
    let columns = rows
        .iter()
        .map(|r| ColumnDesc {
            name: r.get(2),
            type_oid: r.get(3),
            type_modifier: r.get(4),
            is_key: r.get::<_, Option<bool>>(5).unwrap_or(false),
        })
        .collect();
    let mut desc = RelationDesc {
        oid,
        schema: schema.to_string(),
        name: name.to_string(),
        replica_identity,
        columns,
    };
    // as the stream reads them (see `Assembler::set_domains`)
    desc.resolve_domains(&meta::domain_bases(client, cfg).await?);
    Ok(Some(desc))
}

/// Load every mapped table from `snapshot` into Redis, fenced just below `at`. Calls
/// `tick` after each applied piece (for systemd's EXTEND_TIMEOUT and logs).
pub async fn load(
    cfg: &PgConnectConfig,
    snapshot: &str,
    at: Lsn,
    mapping: Arc<Mapping>,
    applier: &mut Applier,
    max_changes: u64,
    tick: &(dyn Fn(u64) + Send + Sync),
) -> Result<LoadStats, SnapshotError> {
    let client = meta::connect(cfg).await?;
    let sql = |e| meta::classify(e, cfg);
    // The same text forms the walsender produces (see pg::conn startup options).
    client
        .batch_execute(&format!(
            "SET datestyle = 'ISO, YMD'; SET timezone = 'UTC'; SET extra_float_digits = 3; SET intervalstyle = 'postgres'; \
             BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {};",
            crate::pg::conn::quote_literal(snapshot)
        ))
        .await
        .map_err(sql)?;
    let fence = Lsn(at.0.saturating_sub(1));
    let mut fold = Fold::new(mapping.clone(), max_changes);
    let now_us = crate::pg::wire::pg_now();
    fold.begin(&TxnBegin {
        xid: 0,
        commit_lsn: fence,
        commit_ts: now_us,
    });
    let mut stats = LoadStats::default();
    let mut seq = 0u64;
    let tables: Vec<String> = mapping.tables().map(str::to_string).collect();
    // Tables read by lookups load first: the mapped rows resolve through them.
    // A stock table that is also looked up (a movement -> its stock item) loads once, in
    // the first place: its rows feed both, as in the stream.
    let mut load_order: Vec<String> = Vec::new();
    for t in mapping
        .lookup_tables()
        .into_iter()
        .chain(tables.iter().map(String::as_str))
    {
        if !load_order.iter().any(|l| l == t) {
            load_order.push(t.to_string());
        }
    }
    // Read in the snapshot: the partitions whose rows this load reads.
    let stock: Vec<String> = mapping.inventory.iter().map(|m| m.table.clone()).collect();
    let trees = crate::pg::partitions::read(&client, cfg, &tables).await?;
    if let Some(problem) = trees.identity_problem(&stock) {
        return Err(SnapshotError::Schema(problem));
    }
    stats.partitions = trees.fingerprints(stock.iter().map(String::as_str));
    for table in load_order {
        let rel = describe(&client, cfg, &table)
            .await?
            .ok_or_else(|| {
                SnapshotError::Schema(format!(
                    "mapped table {table} does not exist: it was dropped or renamed (or the schema is not visible \
                     to this role); point the mapping at the table that holds the data now"
                ))
            })?;
        let rel = Arc::new(rel);
        fold.relation(&rel)
            .map_err(|e| SnapshotError::Schema(e.to_string()))?;
        let rule = mapping
            .resolve(&rel)
            .map_err(|e| SnapshotError::Schema(e.0))?;
        if let Some((problem, fix)) = lookup_key_problem(&client, cfg, &rule, &rel).await? {
            return Err(SnapshotError::Schema(format!(
                "{problem}; fix it with: {fix}"
            )));
        }
        // A stock table other tables look rows up through: the fold feeds its rows to the
        // lookup too (with the lookup's columns and `where`s), so every row is read and the
        // stock `where` is left to the fold, which applies it as it does to the stream.
        let also = match &rule {
            Rule::Inventory(_) => mapping
                .lookup_rule(&rel, &rel.qualified_name())
                .map_err(|e| SnapshotError::Schema(e.0))?,
            _ => None,
        };
        let needed: Vec<usize> = match rule {
            Rule::Inventory(r) => r
                .columns()
                .into_iter()
                .chain(also.iter().flat_map(|l| l.columns()))
                .collect(),
            Rule::Activity(r) => r.columns(),
            Rule::Lookup(l) => l.columns(),
            Rule::Unmapped => continue,
        };
        let mut needed = needed;
        needed.sort_unstable();
        needed.dedup();
        let estimate: f32 = client
            .query_one("SELECT reltuples FROM pg_class WHERE oid = $1", &[&rel.oid])
            .await
            .map_err(sql)?
            .get(0);
        let cols = needed
            .iter()
            .map(|&i| crate::pg::conn::quote_ident(&rel.columns[i].name))
            .collect::<Vec<_>>()
            .join(", ");
        // The mapping's filter, and the publications' row filters (the stream carries
        // only rows they pass, so the snapshot must load no others).
        let mut wheres: Vec<String> = mapping
            .filter_of(&table)
            .filter(|_| also.is_none())
            .and_then(|f| f.to_sql())
            .into_iter()
            .collect();
        if let Some(f) = crate::pg::publication::row_filter(
            &client,
            cfg,
            &mapping.publications,
            &rel.schema,
            &rel.name,
        )
        .await?
        {
            wheres.push(format!("({f})"));
        }
        let copy = format!(
            "COPY (SELECT {cols} FROM {}.{}{}) TO STDOUT",
            crate::pg::conn::quote_ident(&rel.schema),
            crate::pg::conn::quote_ident(&rel.name),
            if wheres.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", wheres.join(" AND "))
            }
        );
        let stream = client.copy_out(&copy).await.map_err(sql)?;
        futures::pin_mut!(stream);
        let mut buf = BytesMut::new();
        let started = Instant::now();
        let mut table_rows = 0u64;
        let mut pending: Vec<crate::fold::Piece> = Vec::new();
        // Rows are folded in runs, after one read of the index state they need (lookups).
        let mut run: Vec<crate::txn::Change> = Vec::new();
        loop {
            let chunk = stream.next().await.transpose().map_err(sql)?;
            let done = chunk.is_none();
            if let Some(c) = chunk {
                buf.extend_from_slice(&c);
            }
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line = buf.split_to(nl + 1).freeze();
                let fields = parse_copy_line(&line[..line.len() - 1])
                    .map_err(|e| SnapshotError::Schema(format!("COPY from {table}: {e}")))?;
                let mut tuple = vec![Datum::Null; rel.columns.len()];
                for (i, f) in needed.iter().zip(fields) {
                    tuple[*i] = f;
                }
                crate::txn::trim_padded(&rel, &mut tuple);
                run.push(crate::txn::Change {
                    op: Op::Insert,
                    rel: rel.clone(),
                    old: None,
                    new: Some(tuple),
                    seq,
                    commit_lsn: fence,
                });
                seq += 1;
                table_rows += 1;
                if run.len() < 512 {
                    continue;
                }
                fold_run(&mut fold, applier, &mut run, &mut pending).await?;
                report_skipped(&mut fold);
                if !pending.is_empty() {
                    stats.skus += apply_pending(&mut fold, applier, &mut pending).await?;
                    tick(stats.rows + table_rows);
                    tracing::info!(table = %table, rows_done = table_rows, rows_estimated = estimate.max(0.0) as u64, "snapshot progress");
                }
            }
            if done {
                fold_run(&mut fold, applier, &mut run, &mut pending).await?;
                stats.skus += apply_pending(&mut fold, applier, &mut pending).await?;
                break;
            }
        }
        stats.rows += table_rows;
        report_skipped(&mut fold);
        tracing::info!(table = %table, rows = table_rows, seconds = started.elapsed().as_secs_f64(), "snapshot table loaded");
    }
    if let Some(last) = fold.commit(&TxnCommit {
        xid: 0,
        commit_lsn: fence,
        end_lsn: at,
        commit_ts: now_us,
        changes: seq,
    }) {
        stats.skus += last.skus.len() as u64;
        if last.ri.is_empty() {
            applier
                .apply_pieces(std::slice::from_ref(&last), Some(at), true)
                .await?;
        } else {
            applier
                .apply_pieces(std::slice::from_ref(&last), None, true)
                .await?;
            applier.write_row_index(&last.ri, Some(at)).await?;
        }
    }
    client.batch_execute("COMMIT").await.map_err(sql)?;
    stats.tables = fold.tables().clone();
    Ok(stats)
}

/// A lookup's key must be unique in its table (a reference matches one row): `Some`
/// with the problem and the SQL that fixes it when no unique index or constraint covers
/// exactly that column.
pub async fn lookup_key_problem(
    client: &tokio_postgres::Client,
    cfg: &PgConnectConfig,
    rule: &Rule,
    rel: &RelationDesc,
) -> Result<Option<(String, String)>, SnapshotError> {
    let Rule::Lookup(l) = rule else {
        return Ok(None);
    };
    let kind: i8 = client
        .query_one(
            "SELECT relkind::\"char\" FROM pg_class WHERE oid = $1",
            &[&rel.oid],
        )
        .await
        .map_err(|e| meta::classify(e, cfg))?
        .get(0);
    if kind == b'p' as i8 {
        return Ok(Some((
            format!(
                "{} is partitioned; a table read by lookups cannot be (its changes arrive under its partitions' names)",
                l.table
            ),
            "-- look up through a table that is not partitioned".into(),
        )));
    }
    for h in &l.hops {
        let col = &rel.columns[h.key].name;
        let unique: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a \
                   ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                 WHERE i.indrelid = $1 AND i.indisunique AND i.indnkeyatts = 1 \
                   AND i.indpred IS NULL AND a.attname = $2)",
                &[&rel.oid, col],
            )
            .await
            .map_err(|e| meta::classify(e, cfg))?
            .get(0);
        if !unique {
            return Ok(Some((
                format!(
                    "the lookup key {col} of {} is not unique (no unique index on exactly that column), so a \
                     reference could match several rows",
                    l.table
                ),
                format!(
                    "ALTER TABLE {} ADD UNIQUE ({});  -- or name a unique column with the lookup's `key`",
                    crate::pg::ident::quote_table(&l.table),
                    crate::pg::conn::quote_ident(col)
                ),
            )));
        }
    }
    Ok(None)
}

/// Apply finished pieces, then their index state (where each indexed row is held, lookup
/// values and dependents), and let the fold forget what Redis now holds. Returns the SKU
/// entries applied.
async fn apply_pending(
    fold: &mut Fold,
    applier: &mut Applier,
    pending: &mut Vec<crate::fold::Piece>,
) -> Result<u64, SnapshotError> {
    let mut skus = 0;
    for p in pending.drain(..) {
        applier
            .apply_pieces(std::slice::from_ref(&p), None, true)
            .await?;
        if !p.ri.is_empty() {
            applier.write_row_index(&p.ri, None).await?;
        }
        skus += p.skus.len() as u64;
    }
    let g = fold.seal();
    fold.forget(g);
    Ok(skus)
}

/// Fold a run of snapshot rows, reading the index state they need as the fold asks.
async fn fold_run(
    fold: &mut Fold,
    applier: &mut Applier,
    run: &mut Vec<crate::txn::Change>,
    pending: &mut Vec<crate::fold::Piece>,
) -> Result<(), SnapshotError> {
    for (i, change) in run.iter().enumerate() {
        if let Some(p) = applier
            .fold_change(fold, change, run[i + 1..].iter())
            .await?
            .map_err(|e| SnapshotError::Schema(e.0))?
        {
            pending.push(p);
        }
    }
    run.clear();
    Ok(())
}

/// Counts and logs (rate-limited) the values the fold skipped, as the stream does: held
/// per run of rows, never per table, so a table of bad values costs no memory.
fn report_skipped(fold: &mut Fold) {
    for s in fold.take_skipped() {
        crate::telemetry::value_skipped(&s);
    }
}

/// Parse one line of COPY's text format into datums (`\N` is NULL; backslash escapes).
pub fn parse_copy_line(line: &[u8]) -> Result<Vec<Datum>, String> {
    let mut out = Vec::new();
    for field in line.split(|&b| b == b'\t') {
        if field == b"\\N" {
            out.push(Datum::Null);
            continue;
        }
        if !field.contains(&b'\\') {
            out.push(Datum::Text(Bytes::copy_from_slice(field)));
            continue;
        }
        let mut v = Vec::with_capacity(field.len());
        let mut i = 0;
        while i < field.len() {
            let b = field[i];
            if b != b'\\' {
                v.push(b);
                i += 1;
                continue;
            }
            let n = *field.get(i + 1).ok_or("trailing backslash")?;
            i += 2;
            match n {
                b'b' => v.push(8),
                b'f' => v.push(12),
                b'n' => v.push(b'\n'),
                b'r' => v.push(b'\r'),
                b't' => v.push(b'\t'),
                b'v' => v.push(11),
                b'0'..=b'7' => {
                    let mut x = u32::from(n - b'0');
                    for _ in 0..2 {
                        match field.get(i) {
                            Some(d @ b'0'..=b'7') => {
                                x = x * 8 + u32::from(d - b'0');
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    v.push(x as u8);
                }
                b'x' => {
                    let mut x = 0u32;
                    let mut k = 0;
                    while k < 2 {
                        match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                            Some(d) => {
                                x = x * 16 + d;
                                i += 1;
                                k += 1;
                            }
                            None => break,
                        }
                    }
                    v.push(x as u8);
                }
                other => v.push(other),
            }
        }
        out.push(Datum::Text(Bytes::from(v)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_format() {
        let d = parse_copy_line(b"a\\tb\t\\N\tx\\\\y\t\\101\\x42").unwrap();
        assert_eq!(
            d,
            vec![
                Datum::Text(Bytes::from_static(b"a\tb")),
                Datum::Null,
                Datum::Text(Bytes::from_static(b"x\\y")),
                Datum::Text(Bytes::from_static(b"AB")),
            ]
        );
        assert!(parse_copy_line(b"bad\\").is_err());
    }
}
