//! Partitioned mapped tables, as the catalog describes them.
//!
//! A mapping names the partitioned parent; the stream may name its partitions instead
//! (`publish_via_partition_root = false`), and some changes never reach the stream at
//! all: `ATTACH PARTITION` of a table that already holds rows, `DETACH PARTITION`, and
//! (with `publish_via_partition_root = true`) a `TRUNCATE` of one partition. So skusync
//! reads the partition trees of the mapped tables from the catalog: to name every
//! partition's parent, and to notice, by a fingerprint of the leaves (OID and
//! relfilenode: a truncate gives a leaf new storage), that a stock table's rows changed
//! behind the stream. Redis is then rebuilt from a fresh snapshot.

use crate::pg::PgConnectConfig;
use crate::pg::error::PgError;
use crate::pg::meta;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// One partition (leaf or intermediate) of a mapped table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The mapped table it belongs to (`schema.table`, as configured).
    pub parent: String,
    pub oid: u32,
    /// `schema.table` of the partition itself.
    pub name: String,
    pub is_leaf: bool,
    pub relfilenode: u32,
    /// 0 for the mapped table itself, 1 for its partitions, 2 for theirs...
    pub level: i32,
    /// Its replica identity: `f` (FULL), `n` (NOTHING), or `d:`/`i:` and the key
    /// columns by name, sorted.
    pub identity: String,
}

/// The partitions of every mapped table that is partitioned (plain tables have none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trees {
    pub members: Vec<Member>,
}

impl Trees {
    /// Partition OID -> mapped parent, for the fold.
    pub fn parents(&self) -> impl Iterator<Item = (u32, &str)> {
        self.members
            .iter()
            .filter(|m| m.level > 0)
            .map(|m| (m.oid, m.parent.as_str()))
    }

    /// A leaf of one of `stock` whose replica identity differs from its mapped parent's:
    /// the old rows of its updates and deletes would not name the rows the snapshot
    /// stored. The message carries the SQL that fixes it.
    pub fn identity_problem(&self, stock: &[String]) -> Option<String> {
        let norm = |m: &Member| {
            if m.identity.starts_with('f') {
                "FULL".to_string()
            } else {
                let cols = m.identity.split_once(':').map_or("", |(_, c)| c);
                format!("key ({cols})")
            }
        };
        for root in self.members.iter().filter(|m| m.level == 0) {
            if !stock.contains(&root.parent) {
                continue;
            }
            for leaf in self
                .members
                .iter()
                .filter(|m| m.is_leaf && m.parent == root.parent)
            {
                let (a, b) = (norm(root), norm(leaf));
                if a != b {
                    return Some(format!(
                        "partition {} of stock table {} has replica identity {b}, the table has {a}: deletes \
                         and updates of its rows could not be matched with the rows skusync stored; give it \
                         the same identity: ALTER TABLE {} REPLICA IDENTITY {};",
                        leaf.name,
                        root.parent,
                        crate::pg::ident::quote_table(&leaf.name),
                        if a == "FULL" {
                            "FULL"
                        } else {
                            "DEFAULT  -- or USING INDEX <an index on the same columns>"
                        }
                    ));
                }
            }
        }
        None
    }

    /// Per partitioned table among `tables`, a fingerprint of its leaves' storage: it
    /// changes when a partition is attached, detached, dropped or truncated (or rewritten
    /// by VACUUM FULL or CLUSTER, which costs one needless rebuild).
    pub fn fingerprints<'a>(
        &self,
        tables: impl IntoIterator<Item = &'a str>,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for t in tables {
            let mut leaves: Vec<(u32, u32)> = self
                .members
                .iter()
                .filter(|m| m.parent == t && m.is_leaf)
                .map(|m| (m.oid, m.relfilenode))
                .collect();
            if self.members.iter().all(|m| m.parent != t) {
                continue;
            }
            leaves.sort_unstable();
            let mut h = Sha256::new();
            for (oid, node) in leaves {
                h.update(oid.to_be_bytes());
                h.update(node.to_be_bytes());
            }
            out.insert(t.to_string(), hex::encode(&h.finalize()[..12]));
        }
        out
    }
}

/// Read the partition trees of `tables` (configured `schema.table` names). Tables that
/// do not exist or are not partitioned contribute nothing.
pub async fn read(
    client: &tokio_postgres::Client,
    cfg: &PgConnectConfig,
    tables: &[String],
) -> Result<Trees, PgError> {
    let (schemas, names): (Vec<String>, Vec<String>) = tables
        .iter()
        .map(|t| {
            let (s, n) = t.split_once('.').unwrap_or(("public", t));
            (s.to_string(), n.to_string())
        })
        .unzip();
    // pg_partition_tree lists the mapped table itself at level 0.
    let rows = client
        .query(
            "SELECT m.s || '.' || m.n, t.relid::oid, pn.nspname::text || '.' || pc.relname::text, t.isleaf, \
                    pc.relfilenode::oid, t.level, pc.relreplident::text || ':' || coalesce(( \
                      SELECT string_agg(a.attname::text, ',' ORDER BY a.attname::text) \
                      FROM pg_index i JOIN pg_attribute a ON a.attrelid = pc.oid AND a.attnum = ANY(i.indkey) \
                      WHERE i.indrelid = pc.oid AND ((pc.relreplident = 'd' AND i.indisprimary) \
                            OR (pc.relreplident = 'i' AND i.indisreplident))), '') \
             FROM unnest($1::text[], $2::text[]) AS m(s, n) \
             JOIN pg_namespace n ON n.nspname = m.s \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = m.n AND c.relkind = 'p' \
             CROSS JOIN LATERAL pg_partition_tree(c.oid) t \
             JOIN pg_class pc ON pc.oid = t.relid \
             JOIN pg_namespace pn ON pn.oid = pc.relnamespace \
             ORDER BY 1, 2",
            &[&schemas, &names],
        )
        .await
        .map_err(|e| meta::classify(e, cfg))?;
    Ok(Trees {
        members: rows
            .iter()
            .map(|r| Member {
                parent: r.get(0),
                oid: r.get(1),
                name: r.get(2),
                is_leaf: r.get(3),
                relfilenode: r.get(4),
                level: r.get(5),
                identity: r.get(6),
            })
            .collect(),
    })
}

/// The mapped table that relation `oid` is a partition of (at any depth), if any: for a
/// relation the stream names that was not a partition when the trees were read.
pub async fn mapped_ancestor(
    client: &tokio_postgres::Client,
    cfg: &PgConnectConfig,
    oid: u32,
    tables: &[String],
) -> Result<Option<String>, PgError> {
    // pg_partition_ancestors lists the relation itself first, then its parents upwards.
    let rows = client
        .query(
            "SELECT n.nspname::text || '.' || c.relname::text \
             FROM pg_class r CROSS JOIN LATERAL pg_partition_ancestors(r.oid) WITH ORDINALITY a(relid, i) \
             JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE r.oid = $1 AND a.relid <> r.oid ORDER BY a.i",
            &[&oid],
        )
        .await
        .map_err(|e| meta::classify(e, cfg))?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .find(|name| tables.contains(name)))
}

/// Whether transaction `xid` (the 32 bits a pgoutput Begin carries) has ended for a
/// snapshot taken now. The walsender may send a transaction as soon as its commit record
/// is flushed, before the committing backend leaves the proc array (a synchronous standby
/// can hold it there for long): until then a catalog query does not see what it created,
/// such as a new partition.
pub async fn xact_ended(
    client: &tokio_postgres::Client,
    cfg: &PgConnectConfig,
    xid: u32,
) -> Result<bool, PgError> {
    let row = client
        .query_one(
            "SELECT pg_snapshot_xmax(s)::text, ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x) \
             FROM pg_current_snapshot() s",
            &[],
        )
        .await
        .map_err(|e| meta::classify(e, cfg))?;
    let xmax: String = row.get(0);
    let xip: Vec<String> = row.get(1);
    let num = |t: &str| {
        t.parse::<u64>()
            .map_err(|_| PgError::Protocol(format!("pg_current_snapshot gave xid {t:?}")))
    };
    let xip = xip
        .iter()
        .map(|t| num(t))
        .collect::<Result<Vec<u64>, _>>()?;
    Ok(ended_in_snapshot(xid, num(&xmax)?, &xip))
}

/// Whether 32-bit `xid` has ended in a snapshot with 64-bit `xmax` and in-progress list
/// `xip`: it precedes `xmax` (modulo 2^32: a transaction just streamed is far less than
/// 2^31 transactions old) and is not in progress.
pub fn ended_in_snapshot(xid: u32, xmax: u64, xip: &[u64]) -> bool {
    // the low 32 bits of a 64-bit xid are the xid itself
    let low = |x: u64| x as u32;
    let precedes = (xid.wrapping_sub(low(xmax)) as i32) < 0;
    precedes && !xip.iter().any(|&x| low(x) == xid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_has_ended_below_xmax_and_outside_the_in_progress_list() {
        assert!(ended_in_snapshot(100, 105, &[101, 103]));
        assert!(!ended_in_snapshot(101, 105, &[101, 103]));
        // xmax and later: not even started for the snapshot
        assert!(!ended_in_snapshot(105, 105, &[]));
        assert!(!ended_in_snapshot(106, 105, &[]));
        // across an epoch: the xid8 of xid 4294967290 in epoch 1, xmax in epoch 2
        let epoch2 = 2u64 << 32;
        assert!(ended_in_snapshot(4_294_967_290, epoch2 + 5, &[]));
        assert!(!ended_in_snapshot(
            4_294_967_290,
            epoch2 + 5,
            &[(1u64 << 32) + 4_294_967_290]
        ));
        assert!(!ended_in_snapshot(7, epoch2 + 5, &[]));
    }

    fn m(parent: &str, oid: u32, leaf: bool, node: u32) -> Member {
        Member {
            parent: parent.into(),
            oid,
            name: format!("p{oid}"),
            is_leaf: leaf,
            relfilenode: node,
            level: 1,
            identity: "d:id".into(),
        }
    }

    #[test]
    fn fingerprints_change_with_leaves_and_storage_only() {
        let a = Trees {
            members: vec![
                m("s.t", 1, true, 10),
                m("s.t", 2, false, 0),
                m("s.t", 3, true, 30),
            ],
        };
        let fa = a.fingerprints(["s.t", "s.plain"]);
        assert_eq!(fa.len(), 1, "plain tables have no fingerprint");
        // a truncate gives a leaf new storage
        let mut b = a.clone();
        b.members[2].relfilenode = 31;
        assert_ne!(b.fingerprints(["s.t"]), fa);
        // a detach
        let mut c = a.clone();
        c.members.remove(0);
        assert_ne!(c.fingerprints(["s.t"]), fa);
        // order does not matter; intermediate tables have no storage of their own
        let mut d = a.clone();
        d.members.reverse();
        d.members[1].relfilenode = 99;
        assert_eq!(d.fingerprints(["s.t"]), fa);
    }

    #[test]
    fn a_leaf_with_another_identity_than_its_table_is_named() {
        let mut root = m("s.t", 9, false, 0);
        root.level = 0;
        root.name = "s.t".into();
        let mut t = Trees {
            members: vec![root, m("s.t", 1, true, 10), m("s.t", 3, true, 30)],
        };
        assert_eq!(t.identity_problem(&["s.t".into()]), None);
        t.members[2].identity = "f:".into();
        let p = t.identity_problem(&["s.t".into()]).expect("a problem");
        assert!(
            p.contains("partition p3 of stock table s.t has replica identity FULL"),
            "{p}"
        );
        assert!(p.contains("ALTER TABLE p3 REPLICA IDENTITY DEFAULT"), "{p}");
        // activity tables have no identity to keep
        assert_eq!(t.identity_problem(&[]), None);
        // a root of FULL asks its leaves for FULL
        t.members[0].identity = "f:".into();
        t.members[2].identity = "f:".into();
        let p = t.identity_problem(&["s.t".into()]).expect("a problem");
        assert!(
            p.contains("partition p1") && p.contains("REPLICA IDENTITY FULL;"),
            "{p}"
        );
    }
}
