//! Relation (table schema) cache, fed by pgoutput `R` messages.
//!
//! The cache is per walsender session: pgoutput re-sends a relation's `R` message before
//! its first change in every new session and after DDL, so the cache is cleared on
//! reconnect and entries are replaced wholesale when a new `R` arrives.

use std::collections::HashMap;
use std::sync::Arc;

use crate::pgoutput;

/// A relation's `relreplident`: which old-row columns UPDATE/DELETE carry.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key (old key sent only when it changes, and on DELETE).
    Default,
    /// `n`: nothing; UPDATE/DELETE carry no old row.
    Nothing,
    /// `f`: the full old row.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// Maps the `relreplident` byte; `None` for a byte PostgreSQL does not define.
    pub fn from_byte(b: u8) -> Option<ReplicaIdentity> {
        match b {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }
}

/// One column of a cached relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnDesc {
    /// Column name.
    pub name: String,
    /// Type OID, used to type the column's text values (see [`super::parse_value`]).
    pub type_oid: u32,
    /// `atttypmod` (e.g. varchar length + 4), `-1` when none.
    pub type_modifier: i32,
    /// Part of the replica identity key (flag bit 1).
    pub is_key: bool,
}

/// A relation's schema as last described by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationDesc {
    /// Relation OID.
    pub oid: u32,
    /// Schema name (`pg_catalog` when the server sent an empty namespace).
    pub schema: String,
    /// Relation name.
    pub name: String,
    /// Which old-row columns UPDATE/DELETE carry.
    pub replica_identity: ReplicaIdentity,
    /// Columns in tuple order (dropped and generated columns are never sent).
    pub columns: Vec<ColumnDesc>,
}

impl RelationDesc {
    /// Columns typed with a domain take the domain's base type (`bases`: domain OID ->
    /// base type OID, from [`crate::pg::meta::domain_bases`]).
    pub fn resolve_domains(&mut self, bases: &std::collections::HashMap<u32, u32>) {
        if bases.is_empty() {
            return;
        }
        for c in &mut self.columns {
            if let Some(&b) = bases.get(&c.type_oid) {
                c.type_oid = b;
            }
        }
    }
}

/// Why a `Relation` message could not be turned into a [`RelationDesc`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelationError {
    /// `relreplident` was not one of `d`, `n`, `f`, `i`.
    #[error("unknown replica identity byte 0x{0:02X} (expected d, n, f or i)")]
    UnknownReplicaIdentity(u8),
    /// A name was not UTF-8 (the connection uses client_encoding UTF8, so this is corruption).
    #[error("{what} is not valid UTF-8")]
    NotUtf8 {
        /// Which name: "schema name", "relation name" or "column name".
        what: &'static str,
    },
}

fn utf8(b: &[u8], what: &'static str) -> Result<String, RelationError> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| RelationError::NotUtf8 { what })
}

impl RelationDesc {
    /// Builds a description from a decoded `R` message.
    pub fn from_message(r: &pgoutput::Relation) -> Result<RelationDesc, RelationError> {
        let replica_identity = ReplicaIdentity::from_byte(r.replica_identity)
            .ok_or(RelationError::UnknownReplicaIdentity(r.replica_identity))?;
        // pgoutput sends "" for pg_catalog to save bytes.
        let schema = if r.namespace.is_empty() {
            "pg_catalog".to_owned()
        } else {
            utf8(&r.namespace, "schema name")?
        };
        let name = utf8(&r.name, "relation name")?;
        let columns = r
            .columns
            .iter()
            .map(|c| {
                Ok(ColumnDesc {
                    name: utf8(&c.name, "column name")?,
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                    is_key: c.flags & 1 != 0,
                })
            })
            .collect::<Result<Vec<_>, RelationError>>()?;
        Ok(RelationDesc {
            oid: r.oid,
            schema,
            name,
            replica_identity,
            columns,
        })
    }

    /// `schema.name`, e.g. `public.inventory` (unquoted; for logs and config matching).
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Position of the column called `name` (exact, case-sensitive match).
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// Relation descriptions by OID for the current walsender session.
#[derive(Clone, Debug, Default)]
pub struct RelationCache {
    by_oid: HashMap<u32, Arc<RelationDesc>>,
}

impl RelationCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the description for `rel.oid`.
    pub fn insert(&mut self, rel: Arc<RelationDesc>) {
        self.by_oid.insert(rel.oid, rel);
    }

    /// The description for `oid`, if the server has sent one this session.
    pub fn get(&self, oid: u32) -> Option<&Arc<RelationDesc>> {
        self.by_oid.get(&oid)
    }

    /// Forgets everything (on reconnect: the new session re-sends `R` messages).
    pub fn clear(&mut self) {
        self.by_oid.clear();
    }

    /// Number of cached relations.
    pub fn len(&self) -> usize {
        self.by_oid.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.by_oid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rel_msg(ns: &'static [u8], ident: u8) -> pgoutput::Relation {
        pgoutput::Relation {
            xid: None,
            oid: 16384,
            namespace: Bytes::from_static(ns),
            name: Bytes::from_static(b"inventory"),
            replica_identity: ident,
            columns: vec![
                pgoutput::Column {
                    flags: 1,
                    name: Bytes::from_static(b"sku"),
                    type_oid: 25,
                    type_modifier: -1,
                },
                pgoutput::Column {
                    flags: 0,
                    name: Bytes::from_static(b"qty"),
                    type_oid: 23,
                    type_modifier: -1,
                },
            ],
        }
    }

    #[test]
    fn builds_description() {
        let d = RelationDesc::from_message(&rel_msg(b"public", b'f')).unwrap();
        assert_eq!(d.qualified_name(), "public.inventory");
        assert_eq!(d.replica_identity, ReplicaIdentity::Full);
        assert!(d.columns[0].is_key);
        assert!(!d.columns[1].is_key);
        assert_eq!(d.column_index("qty"), Some(1));
        assert_eq!(d.column_index("QTY"), None);
    }

    #[test]
    fn empty_namespace_is_pg_catalog() {
        let d = RelationDesc::from_message(&rel_msg(b"", b'd')).unwrap();
        assert_eq!(d.qualified_name(), "pg_catalog.inventory");
    }

    #[test]
    fn replica_identity_bytes() {
        for (b, want) in [
            (b'd', ReplicaIdentity::Default),
            (b'n', ReplicaIdentity::Nothing),
            (b'f', ReplicaIdentity::Full),
            (b'i', ReplicaIdentity::Index),
        ] {
            assert_eq!(
                RelationDesc::from_message(&rel_msg(b"public", b))
                    .unwrap()
                    .replica_identity,
                want
            );
        }
        assert_eq!(
            RelationDesc::from_message(&rel_msg(b"public", b'x')),
            Err(RelationError::UnknownReplicaIdentity(b'x'))
        );
    }

    #[test]
    fn rejects_non_utf8_names() {
        let mut m = rel_msg(b"public", b'd');
        m.columns[1].name = Bytes::from_static(b"\xff");
        assert_eq!(
            RelationDesc::from_message(&m),
            Err(RelationError::NotUtf8 {
                what: "column name"
            })
        );
        let mut m = rel_msg(b"\xc3", b'd');
        m.name = Bytes::from_static(b"ok");
        assert!(RelationDesc::from_message(&m).is_err());
    }

    #[test]
    fn cache_insert_replace_clear() {
        let mut c = RelationCache::new();
        assert!(c.is_empty());
        let d = RelationDesc::from_message(&rel_msg(b"public", b'd')).unwrap();
        c.insert(Arc::new(d.clone()));
        let mut d2 = d;
        d2.name = "renamed".into();
        c.insert(Arc::new(d2));
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(16384).unwrap().name, "renamed");
        assert!(c.get(1).is_none());
        c.clear();
        assert_eq!(c.len(), 0);
    }
}
