//! What the configured publications publish of a mapped table, as PostgreSQL 15 decides
//! it: which actions, whether every partition is in, and their row filters.
//!
//! `check` reports it and `run` refuses to stream without it: a table the publications
//! leave out, an action they do not publish (`publish = 'insert'` on a stock table) or a
//! partition nobody added never reaches the slot, so Redis would drift with no error.
//!
//! The catalog is read by names (`pg_publication_tables` joined to `pg_class`), never by
//! casting a published table's name to `regclass`: that cast needs USAGE on its schema,
//! which a least-privilege role lacks for the tables of a `FOR ALL TABLES` publication.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::{PgConnectConfig, PgError, meta};

/// The actions a publication publishes, in pgoutput's order.
pub const ACTIONS: [&str; 4] = ["insert", "update", "delete", "truncate"];

/// A table's leaves (the table itself when it is not partitioned) and the publications
/// that publish each, through the leaf itself or a partitioned table above it up to the
/// mapped one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// `schema.name` of the leaf.
    pub name: String,
    /// The configured publications that publish it.
    pub publications: Vec<String>,
    /// Whether every publication that publishes the leaf does so through a row filter
    /// on a relation below the mapped table (the leaf, or a partitioned table between):
    /// the mapped table's snapshot reads it as one and cannot apply a filter that differs
    /// per partition. (One publication without such a filter publishes every row.)
    pub own_filter: bool,
}

/// What the configured publications do with one mapped table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coverage {
    /// Every leaf is published; the actions every one of them gets.
    Covered([bool; 4]),
    /// No leaf is published (or the table is published only under a partitioned table
    /// above it, whose name the stream would carry).
    NotPublished,
    /// Some partitions are published and these are not.
    PartitionsMissing(Vec<String>),
    /// These partitions carry row filters of their own.
    PartitionFilters(Vec<String>),
}

impl Coverage {
    /// The actions `need` asks for and the publications do not publish (empty when
    /// covered).
    pub fn missing_actions(&self, need: [bool; 4]) -> Vec<&'static str> {
        match self {
            Coverage::Covered(acts) => ACTIONS
                .iter()
                .zip(need.iter().zip(acts.iter()))
                .filter(|(_, (n, a))| **n && !**a)
                .map(|(name, _)| *name)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Folds a table's leaves into its coverage: an action counts only when every leaf gets
/// it (from any publication). `partitioned`: the table itself has partitions, so its
/// leaves' own row filters cannot be applied by its snapshot. A partitioned table with
/// no partitions yet holds no rows: it is covered (its first partition is checked when
/// it appears, which rebuilds).
pub fn coverage_of(
    leaves: &[Leaf],
    partitioned: bool,
    acts: &BTreeMap<String, [bool; 4]>,
) -> Coverage {
    if leaves.is_empty() {
        return Coverage::Covered([true; 4]);
    }
    let unpublished: Vec<String> = leaves
        .iter()
        .filter(|l| l.publications.is_empty())
        .map(|l| l.name.clone())
        .collect();
    if unpublished.len() == leaves.len() {
        return Coverage::NotPublished;
    }
    if !unpublished.is_empty() {
        return Coverage::PartitionsMissing(unpublished);
    }
    let filtered: Vec<String> = leaves
        .iter()
        .filter(|l| partitioned && l.own_filter)
        .map(|l| l.name.clone())
        .collect();
    if !filtered.is_empty() {
        return Coverage::PartitionFilters(filtered);
    }
    let mut all = [true; 4];
    for l in leaves {
        let mut mine = [false; 4];
        for p in &l.publications {
            let a = acts.get(p).copied().unwrap_or_default();
            for i in 0..4 {
                mine[i] |= a[i];
            }
        }
        for i in 0..4 {
            all[i] &= mine[i];
        }
    }
    Coverage::Covered(all)
}

/// The actions of each configured publication that exists.
pub async fn actions(
    client: &Client,
    cfg: &PgConnectConfig,
    publications: &[String],
) -> Result<BTreeMap<String, [bool; 4]>, PgError> {
    let rows = client
        .query(
            "SELECT pubname::text, pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication \
             WHERE pubname = ANY($1)",
            &[&publications],
        )
        .await
        .map_err(|e| meta::classify(e, cfg))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), [r.get(1), r.get(2), r.get(3), r.get(4)]))
        .collect())
}

/// The coverage of `table` (`schema.name`, `public` when unqualified) by the configured
/// publications. `None` when the table does not exist.
pub async fn coverage(
    client: &Client,
    cfg: &PgConnectConfig,
    publications: &[String],
    acts: &BTreeMap<String, [bool; 4]>,
    table: &str,
) -> Result<Option<Coverage>, PgError> {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let sql = |e| meta::classify(e, cfg);
    let Some(root) = client
        .query_opt(
            "SELECT c.oid, c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name],
        )
        .await
        .map_err(sql)?
    else {
        return Ok(None);
    };
    let (oid, partitioned): (u32, bool) = (root.get(0), root.get(1));
    // row filters exist from PostgreSQL 15 (pg_publication_tables.rowfilter)
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(sql)?
        .get(0);
    let rowfilter = if version >= 150_000 {
        "p.rowfilter"
    } else {
        "NULL::text"
    };
    // Each leaf under the table (the table itself when it has no partitions), with the
    // publications that list it or a partitioned table between it and the mapped one.
    let query = format!(
        // (both partition functions return no rows for a table that is no partition)
        "WITH t0 AS (SELECT relid, isleaf FROM pg_partition_tree($1::oid::regclass)), \
                  tree AS (SELECT relid, isleaf FROM t0 \
                           UNION ALL SELECT $1::oid::regclass, true WHERE NOT EXISTS (SELECT 1 FROM t0)) \
             SELECT ln.nspname::text || '.' || lc.relname::text, \
                    coalesce(array_agg(DISTINCT pt.pubname::text) FILTER (WHERE pt.pubname IS NOT NULL), '{{}}'), \
                    coalesce(bool_and(pt.relid <> $1::oid::regclass AND pt.rowfilter IS NOT NULL), false) \
             FROM tree l \
             JOIN pg_class lc ON lc.oid = l.relid JOIN pg_namespace ln ON ln.oid = lc.relnamespace \
             LEFT JOIN LATERAL ( \
                  SELECT p.pubname, a.relid, {rowfilter} AS rowfilter \
                  FROM (SELECT relid FROM pg_partition_ancestors(l.relid) UNION SELECT l.relid) a \
                  JOIN tree t ON t.relid = a.relid \
                  JOIN pg_class ac ON ac.oid = a.relid JOIN pg_namespace an ON an.oid = ac.relnamespace \
                  JOIN pg_publication_tables p ON p.schemaname = an.nspname AND p.tablename = ac.relname \
                  WHERE p.pubname = ANY($2)) pt ON true \
             WHERE l.isleaf \
             GROUP BY 1 ORDER BY 1"
    );
    let rows = client
        .query(&query, &[&oid, &publications])
        .await
        .map_err(sql)?;
    let leaves: Vec<Leaf> = rows
        .iter()
        .map(|r| Leaf {
            name: r.get(0),
            publications: r.get(1),
            own_filter: r.get(2),
        })
        .collect();
    Ok(Some(coverage_of(&leaves, partitioned, acts)))
}

/// A fingerprint of what the publications let through to the mapped `tables`: the
/// publications' names and the row filter each table gets. Redis built through other
/// publications holds other rows, so a change rebuilds it, as a changed mapping does.
pub async fn fingerprint(
    client: &Client,
    cfg: &PgConnectConfig,
    publications: &[String],
    tables: &[String],
) -> Result<String, PgError> {
    use sha2::Digest;
    let mut names = publications.to_vec();
    names.sort();
    let mut h = sha2::Sha256::new();
    for n in &names {
        h.update(n.as_bytes());
        h.update([0]);
    }
    for t in tables {
        let (schema, name) = t.split_once('.').unwrap_or(("public", t));
        let f = row_filter(client, cfg, publications, schema, name).await?;
        h.update([1]);
        h.update(t.as_bytes());
        h.update([0]);
        h.update(f.unwrap_or_default().as_bytes());
    }
    Ok(hex::encode(&h.finalize()[..12]))
}

/// The row filter the configured publications put on a table (PostgreSQL 15+): `None`
/// when any publication that lists it has none. Publications combine by OR. (A
/// partitioned table whose partitions carry their own filters is refused before any
/// snapshot: [`Coverage::PartitionFilters`].)
pub async fn row_filter(
    client: &Client,
    cfg: &PgConnectConfig,
    publications: &[String],
    schema: &str,
    name: &str,
) -> Result<Option<String>, PgError> {
    row_filter_sql(client, publications, schema, name)
        .await
        .map_err(|e| meta::classify(e, cfg))
}

/// [`row_filter`] with the driver's error (for `verify`, which reports it as text).
pub async fn row_filter_sql(
    client: &Client,
    publications: &[String],
    schema: &str,
    name: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    if version < 150_000 || publications.is_empty() {
        return Ok(None);
    }
    let rows = client
        .query(
            // ordered: the text is part of the fingerprint Redis records
            "SELECT rowfilter FROM pg_publication_tables \
             WHERE pubname = ANY($1) AND schemaname = $2 AND tablename = $3 ORDER BY pubname",
            &[&publications, &schema, &name],
        )
        .await?;
    let filters: Option<Vec<String>> = rows.iter().map(|r| r.get::<_, Option<String>>(0)).collect();
    Ok(match filters {
        Some(f) if !f.is_empty() => Some(
            f.iter()
                .map(|x| format!("({x})"))
                .collect::<Vec<_>>()
                .join(" OR "),
        ),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(name: &str, pubs: &[&str], own_filter: bool) -> Leaf {
        Leaf {
            name: name.into(),
            publications: pubs.iter().map(|p| p.to_string()).collect(),
            own_filter,
        }
    }

    fn acts() -> BTreeMap<String, [bool; 4]> {
        BTreeMap::from([
            ("all".to_string(), [true; 4]),
            ("ins".to_string(), [true, false, false, false]),
            ("upd".to_string(), [false, true, true, false]),
        ])
    }

    #[test]
    fn a_table_gets_the_union_of_its_publications_actions() {
        let c = coverage_of(&[leaf("public.t", &["ins", "upd"], false)], false, &acts());
        assert_eq!(c, Coverage::Covered([true, true, true, false]));
        assert_eq!(c.missing_actions([true; 4]), vec!["truncate"]);
        assert!(c.missing_actions([true, false, false, false]).is_empty());
    }

    #[test]
    fn one_published_partition_does_not_cover_its_table() {
        let c = coverage_of(
            &[
                leaf("public.s_2025", &["all"], false),
                leaf("public.s_2026", &[], false),
            ],
            true,
            &acts(),
        );
        assert_eq!(c, Coverage::PartitionsMissing(vec!["public.s_2026".into()]));
        let none = coverage_of(&[leaf("public.t", &[], false)], false, &acts());
        assert_eq!(none, Coverage::NotPublished);
    }

    #[test]
    fn a_partitioned_table_gets_only_the_actions_every_partition_gets() {
        let c = coverage_of(
            &[
                leaf("public.a", &["all"], false),
                leaf("public.b", &["ins"], false),
            ],
            true,
            &acts(),
        );
        assert_eq!(c, Coverage::Covered([true, false, false, false]));
    }

    #[test]
    fn row_filters_of_partitions_are_refused_but_a_plain_tables_are_not() {
        let c = coverage_of(
            &[
                leaf("public.a", &["all"], true),
                leaf("public.b", &["all"], false),
            ],
            true,
            &acts(),
        );
        assert_eq!(c, Coverage::PartitionFilters(vec!["public.a".into()]));
        let plain = coverage_of(&[leaf("public.t", &["all"], true)], false, &acts());
        assert_eq!(plain, Coverage::Covered([true; 4]));
    }

    #[test]
    fn a_partitioned_table_without_partitions_is_covered() {
        assert_eq!(
            coverage_of(&[], true, &acts()),
            Coverage::Covered([true; 4])
        );
    }
}
