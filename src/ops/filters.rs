//! The config's row filters (`where`) against the database's column types, read at
//! `check` and at every `run` cycle's start.
//!
//! The stream compares a text literal with the text PostgreSQL prints for a value, and
//! the snapshot compares the same way in SQL (`filter::Filter::to_sql`). A literal that
//! is not in that printed form (an upper-case `uuid`, a date `'2024-1-5'`, an enum label
//! that does not exist) can therefore never equal a value: the condition would silently
//! match nothing (`=`) or everything (`<>`). That is refused, with the printed form to
//! write instead. Columns whose SQL `=` is not byte equality (`citext`, a
//! nondeterministic collation) get a warning: the comparison is case-sensitive.

use crate::config::Config;
use crate::filter::{Filter, Literal, Test};
use crate::pg::{PgConnectConfig, PgError, meta};
use tokio_postgres::Client;

/// One filter item the database's types make wrong or surprising.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterProblem {
    /// The config key: `inventory[0].where[1]`, `inventory[0].sku.then.where[0]`.
    pub at: String,
    pub problem: String,
    pub fix: String,
    /// `run` refuses to start (else `check` only warns).
    pub fatal: bool,
}

/// Every `where` list of the config: (config key, table, items).
fn filters(cfg: &Config) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for (i, m) in cfg.inventory.iter().enumerate() {
        out.push((format!("inventory[{i}]"), m.table.clone(), m.filter.clone()));
    }
    for (i, a) in cfg.activity.iter().enumerate() {
        out.push((format!("activity[{i}]"), a.table.clone(), a.filter.clone()));
    }
    for (key, _, _, v) in cfg.value_sources() {
        let Some(l) = v.lookup() else { continue };
        for (n, h) in l.hops().iter().enumerate() {
            out.push((
                format!("{key}{}", ".then".repeat(n)),
                h.from.clone(),
                h.filter.clone(),
            ));
        }
    }
    out.retain(|(_, _, items)| !items.is_empty());
    out
}

/// What the database says about a filter column.
struct ColumnType {
    /// `format_type` of the column (`character varying(20)`, `public.qty`).
    sql: String,
    /// The name of its base type (through domains).
    base: String,
    deterministic: bool,
}

async fn column_type(
    client: &Client,
    pgc: &PgConnectConfig,
    table: &str,
    column: &str,
) -> Result<Option<ColumnType>, PgError> {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let row = client
        .query_opt(
            "WITH RECURSIVE t(oid, typtype, typbasetype, typname, depth) AS ( \
                 SELECT p.oid, p.typtype, p.typbasetype, p.typname::text, 0 FROM pg_type p \
                 WHERE p.oid = (SELECT a.atttypid FROM pg_attribute a \
                     JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND a.attnum > 0 \
                       AND NOT a.attisdropped) \
                 UNION ALL \
                 SELECT p.oid, p.typtype, p.typbasetype, p.typname::text, t.depth + 1 FROM t \
                 JOIN pg_type p ON p.oid = t.typbasetype WHERE t.typtype = 'd' AND t.depth < 32) \
             SELECT format_type(a.atttypid, a.atttypmod), \
                    (SELECT typname FROM t WHERE typtype <> 'd' LIMIT 1), \
                    coalesce(co.collisdeterministic, true) \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_collation co ON co.oid = a.attcollation \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND a.attnum > 0 \
               AND NOT a.attisdropped",
            &[&schema, &name, &column],
        )
        .await
        .map_err(|e| meta::classify(e, pgc))?;
    Ok(row.map(|r| ColumnType {
        sql: r.get(0),
        base: r.get::<_, Option<String>>(1).unwrap_or_default(),
        deterministic: r.get(2),
    }))
}

/// How PostgreSQL prints a literal read as the column's type: `Ok(text)`, or `Err(why)`
/// when it is no value of that type (a bad uuid, an enum label that does not exist, a
/// domain's check).
async fn printed(
    client: &Client,
    pgc: &PgConnectConfig,
    ty: &str,
    literal: &str,
) -> Result<Result<String, String>, PgError> {
    // `ty` is format_type's output: a type name quoted as SQL needs it
    match client
        .query_one(
            &format!("SELECT (CAST($1::text AS {ty}))::text"),
            &[&literal],
        )
        .await
    {
        Ok(r) => Ok(Ok(r.get::<_, Option<String>>(0).unwrap_or_default())),
        Err(e) => match e.as_db_error() {
            // data exceptions (22...), integrity violations (23...: a domain's CHECK), and
            // what names no object or may not be read (42...: a regclass literal, a type
            // in a schema the role may not use)
            Some(db) if db.code().code() == "42501" => Ok(Err(format!(
                "{} (grant the role USAGE on the type's schema)",
                db.message()
            ))),
            Some(db) if matches!(&db.code().code()[..2], "22" | "23" | "42") => {
                Ok(Err(db.message().to_string()))
            }
            _ => Err(meta::classify(e, pgc)),
        },
    }
}

/// Every filter item whose literal the column's type prints otherwise (fatal), and every
/// text comparison on a column whose SQL `=` ignores case (a warning). Tables and
/// columns that do not exist are left to the other checks.
pub(crate) async fn filter_problems(
    cfg: &Config,
    client: &Client,
    pgc: &PgConnectConfig,
) -> Result<Vec<FilterProblem>, PgError> {
    let mut out = Vec::new();
    for (key, table, items) in filters(cfg) {
        for (j, item) in items.iter().enumerate() {
            let Ok(f) = Filter::parse(std::slice::from_ref(item)) else {
                continue; // the config's validation reports it
            };
            let at = format!("{key}.where[{j}]");
            for c in &f.conditions {
                let lits: Vec<&str> = match &c.test {
                    Test::Cmp(_, l) => vec![l],
                    Test::In(v) | Test::NotIn(v) => v.iter().collect(),
                    Test::IsNull | Test::IsNotNull => vec![],
                }
                .into_iter()
                .filter_map(|l| match l {
                    Literal::Text(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect();
                if lits.is_empty() {
                    continue;
                }
                let Some(ty) = column_type(client, pgc, &table, &c.column).await? else {
                    continue;
                };
                if ty.base == "inet" {
                    // its text cast (what the snapshot compares) adds the mask its output
                    // (what the stream compares) leaves out: they cannot agree
                    out.push(FilterProblem {
                        at: at.clone(),
                        problem: format!(
                            "{table}.{} is {}, whose text cast adds a mask the replicated value \
                             lacks ('10.0.0.1' against '10.0.0.1/32'): skusync cannot compare it with a text literal",
                            c.column, ty.sql
                        ),
                        fix: "filter it with a publication row filter (the server evaluates it)".into(),
                        fatal: true,
                    });
                    continue;
                }
                for lit in lits {
                    let shown = crate::pg::conn::quote_literal(lit);
                    match printed(client, pgc, &ty.sql, lit).await? {
                        Ok(p) if p == lit => {}
                        Ok(p) => out.push(FilterProblem {
                            at: at.clone(),
                            problem: format!(
                                "{table}.{} is {}, which PostgreSQL prints {shown} as {}: skusync compares \
                                 the printed text, so no value equals {shown} as written",
                                c.column,
                                ty.sql,
                                crate::pg::conn::quote_literal(&p)
                            ),
                            fix: format!(
                                "write it as {} in {at}",
                                crate::pg::conn::quote_literal(&p)
                            ),
                            fatal: true,
                        }),
                        Err(why) => out.push(FilterProblem {
                            at: at.clone(),
                            problem: format!(
                                "{shown} is no value of {table}.{} ({}): {why}",
                                c.column, ty.sql
                            ),
                            fix: format!("fix the literal in {at}"),
                            fatal: true,
                        }),
                    }
                }
                if ty.base == "citext" || !ty.deterministic {
                    out.push(FilterProblem {
                        at: at.clone(),
                        problem: format!(
                            "{table}.{} is {}, whose = ignores case (or accents), but skusync compares the \
                             printed text byte for byte, in the snapshot and the stream alike",
                            c.column,
                            if ty.deterministic {
                                ty.sql.clone()
                            } else {
                                format!("{} with a nondeterministic collation", ty.sql)
                            }
                        ),
                        fix: "list every spelling, or filter with a publication row filter (the server applies SQL's =)"
                            .into(),
                        fatal: false,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The first filter item `run` must refuse, as the message of a config error.
pub(crate) async fn filter_refusal(
    cfg: &Config,
    client: &Client,
    pgc: &PgConnectConfig,
) -> Result<Option<String>, PgError> {
    Ok(filter_problems(cfg, client, pgc)
        .await?
        .into_iter()
        .find(|p| p.fatal)
        .map(|p| format!("{}: {}; {}", p.at, p.problem, p.fix)))
}
