//! `skusync setup [--print]`: the publications for the mapped tables, and nothing else
//! (`run` creates the slot together with its snapshot).

use super::{PubPlan, create_publication_sql, ident, plan_publications, schema_of, table_ident};
use crate::config::Config;
use crate::pg::meta;
use std::collections::BTreeSet;
use std::io::Write;

/// The SQL a DBA reviews and runs (`psql -v ON_ERROR_STOP=1 -f setup.sql`) on a database
/// where the publications do not exist yet. The role section is commented out: roles are
/// cluster-wide and their password must not come from a config file.
pub fn print_sql(cfg: &Config) -> Result<String, String> {
    let plans = plan_publications(cfg)?;
    let role = cfg
        .pg_connect()
        .map(|c| c.user)
        .unwrap_or_else(|_| "skusync".into());
    let tables: Vec<String> = plans
        .iter()
        .flat_map(|p| p.tables.iter().map(|t| table_ident(t)))
        .collect();
    let schemas: BTreeSet<&str> = plans
        .iter()
        .flat_map(|p| p.tables.iter().map(|t| schema_of(t)))
        .collect();
    let mut out = String::new();
    out.push_str(
        "-- skusync setup: publications for the mapped tables.\n\
         -- Review, then run as the tables' owner or a superuser: psql -v ON_ERROR_STOP=1 -f setup.sql\n\
         --\n\
         -- Least-privilege role for skusync (uncomment, set a password, and add a pg_hba.conf\n\
         -- line for it; logical replication matches the database column, not `replication`):\n",
    );
    out.push_str(&format!(
        "-- CREATE ROLE {} LOGIN REPLICATION PASSWORD '...';\n",
        ident(&role)
    ));
    for s in &schemas {
        out.push_str(&format!(
            "-- GRANT USAGE ON SCHEMA {} TO {};\n",
            ident(s),
            ident(&role)
        ));
    }
    if !tables.is_empty() {
        out.push_str(&format!(
            "-- GRANT SELECT ON {} TO {};\n",
            tables.join(", "),
            ident(&role)
        ));
    }
    out.push_str("\nBEGIN;\n");
    for p in &plans {
        out.push_str(&create_publication_sql(p));
        out.push('\n');
    }
    out.push_str("COMMIT;\n");
    Ok(out)
}

/// Create the missing publications (marked with the setup comment) and add missing tables
/// to existing ones. Prints one line per action to `out`.
pub async fn run(cfg: &Config, out: &mut impl Write) -> Result<(), String> {
    let plans = plan_publications(cfg)?;
    let (client, pgc) = super::pg_client(cfg).await?;
    let hint = |e: crate::pg::PgError| {
        format!(
            "{e}\n(run `skusync setup --print` and have the tables' owner or a superuser run the SQL)"
        )
    };
    for p in &plans {
        let exists = client
            .query_opt(
                "SELECT puballtables FROM pg_publication WHERE pubname = $1",
                &[&p.name],
            )
            .await
            .map_err(|e| hint(meta::classify(e, &pgc)))?;
        match exists {
            None => {
                client
                    .batch_execute(&format!("BEGIN;\n{}\nCOMMIT;", create_publication_sql(p)))
                    .await
                    .map_err(|e| hint(meta::classify(e, &pgc)))?;
                let _ = writeln!(
                    out,
                    "created publication {} (publish = '{}') for: {}",
                    p.name,
                    p.publish,
                    describe_tables(&p.tables)
                );
            }
            Some(row) if row.get::<_, bool>(0) => {
                let _ = writeln!(
                    out,
                    "publication {} exists and covers all tables: nothing to do",
                    p.name
                );
            }
            Some(_) => {
                let missing = missing_tables(&client, &pgc, p).await?;
                if missing.is_empty() {
                    let _ = writeln!(out, "publication {} exists: up to date", p.name);
                    continue;
                }
                let sql = format!(
                    "ALTER PUBLICATION {} ADD TABLE {};",
                    ident(&p.name),
                    missing
                        .iter()
                        .map(|t| table_ident(t))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| hint(meta::classify(e, &pgc)))?;
                let _ = writeln!(
                    out,
                    "publication {} exists: added {}",
                    p.name,
                    missing.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// Tables of the plan that the (existing) publication does not contain yet.
pub async fn missing_tables(
    client: &tokio_postgres::Client,
    pgc: &crate::pg::PgConnectConfig,
    p: &PubPlan,
) -> Result<Vec<String>, String> {
    let rows = client
        .query(
            "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&p.name],
        )
        .await
        .map_err(|e| meta::classify(e, pgc).to_string())?;
    let have: BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
    Ok(p.tables
        .iter()
        .filter(|t| !have.contains(*t))
        .cloned()
        .collect())
}

fn describe_tables(t: &[String]) -> String {
    if t.is_empty() {
        "(no tables yet)".into()
    } else {
        t.join(", ")
    }
}
