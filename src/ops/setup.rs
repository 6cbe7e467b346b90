//! `skusync setup [--print]`: the publications for the mapped tables, and nothing else
//! (`run` creates the slot together with its snapshot).

use super::{
    ConnectFailure, ConnectFailureKind, PubPlan, STOCK_PUBLISH, create_publication_sql, ident,
    plan_publications, table_ident,
};
use crate::config::Config;
use crate::pg::meta;
use std::collections::BTreeSet;
use std::io::Write;

/// The role `setup --print` proposes when the configured one is a superuser (or cannot be
/// told from one).
pub const DEFAULT_ROLE: &str = "skusync";

/// A role's attributes, as `pg_roles` has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleInfo {
    /// `rolsuper`.
    pub superuser: bool,
    /// `rolreplication`.
    pub replication: bool,
}

/// What a publication of the plan is in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubState {
    /// It does not exist.
    Missing,
    /// It exists; `all_tables` when it is `FOR ALL TABLES`; `missing` are the plan's
    /// tables it does not contain; `actions` the ones it publishes (insert, update,
    /// delete, truncate).
    Exists {
        all_tables: bool,
        missing: Vec<String>,
        actions: [bool; 4],
    },
}

/// The publish actions in `pg_publication` column order.
const ACTIONS: [&str; 4] = ["insert", "update", "delete", "truncate"];

/// What `setup --print` read from the database (when it could connect).
#[derive(Debug, Clone)]
pub struct DbState {
    /// `database on host:port as user`, for the header.
    pub source: String,
    /// The configured user's attributes.
    pub user: RoleInfo,
    /// The proposed role's attributes when it is another role that exists.
    pub proposed: Option<RoleInfo>,
    /// Each plan's publication, in plan order.
    pub publications: Vec<PubState>,
}

/// The role skusync should log in as: the configured user when it is no superuser (it
/// exists, or does not exist yet and is about to be created), else [`DEFAULT_ROLE`].
/// Without a connection a user named `postgres` (the usual superuser) counts as one.
pub fn proposed_role(user: &str, info: Option<RoleInfo>) -> String {
    match info {
        Some(i) if !i.superuser => user.to_string(),
        Some(_) => DEFAULT_ROLE.to_string(),
        None if user.is_empty() || user == "postgres" => DEFAULT_ROLE.to_string(),
        None => user.to_string(),
    }
}

/// The SQL a DBA reviews and runs (`psql -v ON_ERROR_STOP=1 -f setup.sql`). It reads the
/// database first, when it can: publications that exist are named in comments (with the
/// `ALTER PUBLICATION` for what they lack) instead of created again. The role section is
/// commented out: roles are cluster-wide and their password must not come from a config
/// file.
pub async fn print_sql(cfg: &Config) -> Result<String, String> {
    let plans = plan_publications(cfg)?;
    let user = cfg.pg_connect().map(|c| c.user).unwrap_or_default();
    let db = match super::pg_client_or_why(cfg).await {
        Ok((client, pgc)) => Ok(read_state(&client, &pgc, &plans, &user).await?),
        Err(e) => Err(e),
    };
    Ok(render_sql(cfg, &plans, &user, &db))
}

async fn read_state(
    client: &tokio_postgres::Client,
    pgc: &crate::pg::PgConnectConfig,
    plans: &[PubPlan],
    user: &str,
) -> Result<DbState, String> {
    let role = |name: String| async move {
        client
            .query_opt(
                "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = $1",
                &[&name],
            )
            .await
            .map(|r| {
                r.map(|r| RoleInfo {
                    superuser: r.get(0),
                    replication: r.get(1),
                })
            })
            .map_err(|e| meta::classify(e, pgc).to_string())
    };
    // logged in, so the configured user exists
    let user_info = role(user.to_string()).await?.unwrap_or(RoleInfo {
        superuser: false,
        replication: false,
    });
    let proposed = proposed_role(user, Some(user_info));
    let proposed = if proposed == user {
        None
    } else {
        role(proposed).await?
    };
    let mut publications = Vec::new();
    for p in plans {
        publications.push(publication_state(client, pgc, p).await?);
    }
    Ok(DbState {
        source: format!("database {} on {} as {user}", pgc.dbname, pgc.addr()),
        user: user_info,
        proposed,
        publications,
    })
}

/// Whether the plan's publication exists, what it lacks, and what it publishes.
pub async fn publication_state(
    client: &tokio_postgres::Client,
    pgc: &crate::pg::PgConnectConfig,
    p: &PubPlan,
) -> Result<PubState, String> {
    let row = client
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate \
             FROM pg_publication WHERE pubname = $1",
            &[&p.name],
        )
        .await
        .map_err(|e| meta::classify(e, pgc).to_string())?;
    let Some(row) = row else {
        return Ok(PubState::Missing);
    };
    let all_tables: bool = row.get(0);
    let missing = if all_tables {
        Vec::new()
    } else {
        missing_tables(client, pgc, p).await?
    };
    Ok(PubState::Exists {
        all_tables,
        missing,
        actions: [row.get(1), row.get(2), row.get(3), row.get(4)],
    })
}

/// The text of `setup --print` for `plans`, given what was read from the database (or
/// why nothing could be).
pub fn render_sql(
    cfg: &Config,
    plans: &[PubPlan],
    user: &str,
    db: &Result<DbState, ConnectFailure>,
) -> String {
    let mut out = String::new();
    out.push_str(
        "-- skusync setup: publications for the mapped tables.\n\
         -- Review, then run as the tables' owner or a superuser: psql -v ON_ERROR_STOP=1 -f setup.sql\n",
    );
    match db {
        Ok(s) => out.push_str(&format!(
            "-- Read from {}: what exists is named below and left as it is.\n",
            s.source
        )),
        Err(e) => out.push_str(&format!(
            "-- Could not read the database, so every statement is printed ({}).\n",
            e.message.replace('\n', " ")
        )),
    }
    out.push_str("--\n");
    // the role
    let info = match db {
        Ok(s) => Some(s.user),
        // a role the server says does not exist is no superuser
        Err(e) if e.kind == ConnectFailureKind::MissingRole => Some(RoleInfo {
            superuser: false,
            replication: false,
        }),
        Err(_) => None,
    };
    let role = proposed_role(user, info);
    // the proposed role's attributes, when it exists
    let existing = match db {
        Ok(s) if role == user => Some(s.user),
        Ok(s) => s.proposed,
        Err(_) => None,
    };
    out.push_str(
        "-- Least-privilege role for skusync (uncomment, set a password, and add a pg_hba.conf\n\
         -- line for it; logical replication matches the database column, not `replication`):\n",
    );
    if role != user && !user.is_empty() {
        let why = match info {
            Some(_) => "a superuser",
            None => "the usual superuser's name",
        };
        out.push_str(&format!(
            "-- (postgres.url logs in as {user}, {why}; skusync needs no more than the role\n\
             -- {role} below: create it and put {role} in postgres.url)\n"
        ));
    }
    match existing {
        Some(i) => {
            out.push_str(&format!("-- role {role} exists\n"));
            if i.superuser {
                out.push_str(&format!(
                    "-- role {role} is a superuser; skusync needs only LOGIN REPLICATION and these grants\n"
                ));
            } else if !i.replication {
                out.push_str(&format!("-- ALTER ROLE {} REPLICATION;\n", ident(&role)));
            }
        }
        None if matches!(db, Err(e) if e.kind == ConnectFailureKind::MissingRole) => {
            out.push_str(&format!("-- role {role} does not exist yet\n"));
        }
        None => {}
    }
    for line in super::role_sql(cfg, &role, existing.is_some()) {
        out.push_str(&format!("-- {line}\n"));
    }
    // the publications
    out.push_str("\nBEGIN;\n");
    for (n, p) in plans.iter().enumerate() {
        let state = db.as_ref().ok().and_then(|s| s.publications.get(n));
        match state {
            None | Some(PubState::Missing) => {
                out.push_str(&create_publication_sql(p));
                out.push('\n');
            }
            Some(PubState::Exists {
                all_tables,
                missing,
                actions,
            }) => {
                let name = ident(&p.name);
                if *all_tables {
                    out.push_str(&format!(
                        "-- publication {} exists (FOR ALL TABLES): it contains every mapped table\n",
                        p.name
                    ));
                } else if missing.is_empty() {
                    out.push_str(&format!(
                        "-- publication {} exists and contains {}\n",
                        p.name,
                        describe_tables(&p.tables)
                    ));
                } else {
                    out.push_str(&format!(
                        "-- publication {} exists; it lacks {}:\n",
                        p.name,
                        missing.join(", ")
                    ));
                    out.push_str(&format!(
                        "ALTER PUBLICATION {name} ADD TABLE {};\n",
                        missing
                            .iter()
                            .map(|t| table_ident(t))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                let need: Vec<&str> = p.publish.split(", ").collect();
                let lacks: Vec<&str> = ACTIONS
                    .iter()
                    .zip(actions)
                    .filter(|(a, has)| !**has && need.contains(a))
                    .map(|(a, _)| *a)
                    .collect();
                if !lacks.is_empty() {
                    let keep: Vec<&str> = ACTIONS
                        .iter()
                        .zip(actions)
                        .filter(|(a, has)| **has || need.contains(a))
                        .map(|(a, _)| *a)
                        .collect();
                    out.push_str(&format!(
                        "-- publication {} does not publish {}, which {} tables need:\n\
                         ALTER PUBLICATION {name} SET (publish = '{}');\n",
                        p.name,
                        lacks.join(", "),
                        if p.publish == STOCK_PUBLISH {
                            "stock"
                        } else {
                            "activity"
                        },
                        keep.join(", ")
                    ));
                }
            }
        }
    }
    out.push_str("COMMIT;\n");
    out
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
        let state = publication_state(&client, &pgc, p).await?;
        // Publishing updates and deletes of a table without a replica identity makes the
        // application's own UPDATE and DELETE on it fail: refuse before adding it.
        if p.publish != "insert" {
            let mut check: Vec<String> = match &state {
                PubState::Missing => p.tables.clone(),
                PubState::Exists {
                    all_tables: false,
                    missing,
                    ..
                } => missing.clone(),
                PubState::Exists { .. } => Vec::new(),
            };
            let widens =
                matches!(&state, PubState::Exists { actions, .. } if widens_updates(p, *actions));
            if widens {
                if matches!(
                    &state,
                    PubState::Exists {
                        all_tables: true,
                        ..
                    }
                ) {
                    return Err(format!(
                        "publication {} is FOR ALL TABLES and does not publish updates or deletes: setup will \
                         not make it publish them for every table of the database (each one without a replica \
                         identity would fail the application's UPDATE and DELETE). Give skusync its own \
                         publication (skusync setup --print shows one)",
                        p.name
                    ));
                }
                // every table already in it starts publishing updates and deletes too
                check.extend(members(&client, &pgc, &p.name).await?);
            }
            let bare = tables_without_identity(&client, &pgc, &check).await?;
            if !bare.is_empty() {
                return Err(format!(
                    "{} {} no replica identity (no primary key, or REPLICA IDENTITY NOTHING): once {} \
                     publication {}, which publishes updates and deletes, the application's UPDATE and DELETE \
                     on it fail. Give it one first, then run setup again: {}",
                    bare.join(", "),
                    if bare.len() == 1 { "has" } else { "have" },
                    if widens {
                        "it publishes them in"
                    } else {
                        "it is in"
                    },
                    p.name,
                    bare.iter()
                        .map(|t| format!(
                            "ALTER TABLE {} ADD PRIMARY KEY (...); -- or REPLICA IDENTITY FULL",
                            table_ident(t)
                        ))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
        }
        if let PubState::Exists { actions, .. } = &state
            && let Some(keep) = publish_fix(p, *actions)
        {
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} SET (publish = '{keep}');",
                    ident(&p.name)
                ))
                .await
                .map_err(|e| hint(meta::classify(e, &pgc)))?;
            let _ = writeln!(out, "publication {} exists: now publishes {keep}", p.name);
        }
        match state {
            PubState::Missing => {
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
            PubState::Exists {
                all_tables: true, ..
            } => {
                let _ = writeln!(
                    out,
                    "publication {} exists and covers all tables: nothing to do",
                    p.name
                );
            }
            PubState::Exists { missing, .. } if missing.is_empty() => {
                let _ = writeln!(out, "publication {} exists: up to date", p.name);
            }
            PubState::Exists { missing, .. } => {
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

/// The `publish` list an existing publication needs (what it has plus what the plan
/// needs), or `None` when it publishes everything the plan needs.
fn publish_fix(p: &PubPlan, actions: [bool; 4]) -> Option<String> {
    let need: Vec<&str> = p.publish.split(", ").collect();
    if ACTIONS
        .iter()
        .zip(actions)
        .all(|(a, has)| has || !need.contains(a))
    {
        return None;
    }
    let keep: Vec<&str> = ACTIONS
        .iter()
        .zip(actions)
        .filter(|(a, has)| *has || need.contains(a))
        .map(|(a, _)| *a)
        .collect();
    Some(keep.join(", "))
}

/// Whether the `publish` list the plan needs adds updates or deletes to what an existing
/// publication publishes.
fn widens_updates(p: &PubPlan, actions: [bool; 4]) -> bool {
    publish_fix(p, actions).is_some()
        && (p.publish.contains("update") && !actions[1]
            || p.publish.contains("delete") && !actions[2])
}

/// The tables an existing publication lists (`schema.name`).
async fn members(
    client: &tokio_postgres::Client,
    pgc: &crate::pg::PgConnectConfig,
    publication: &str,
) -> Result<Vec<String>, String> {
    let rows = client
        .query(
            "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| meta::classify(e, pgc).to_string())?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The tables of `tables` (`schema.name`; a partitioned table stands for its partitions)
/// with no replica identity: DEFAULT without a primary key, or NOTHING.
async fn tables_without_identity(
    client: &tokio_postgres::Client,
    pgc: &crate::pg::PgConnectConfig,
    tables: &[String],
) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for t in tables {
        let (schema, name) = t.split_once('.').unwrap_or(("public", t));
        let rows = client
            .query(
                "SELECT ln.nspname::text || '.' || lc.relname::text \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN LATERAL (SELECT relid FROM pg_partition_tree(c.oid) WHERE isleaf \
                               UNION SELECT c.oid WHERE c.relkind <> 'p') l ON true \
                 JOIN pg_class lc ON lc.oid = l.relid JOIN pg_namespace ln ON ln.oid = lc.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 \
                   AND (lc.relreplident = 'n' OR (lc.relreplident = 'd' AND NOT EXISTS \
                        (SELECT 1 FROM pg_index i WHERE i.indrelid = lc.oid AND i.indisprimary)))",
                &[&schema, &name],
            )
            .await
            .map_err(|e| meta::classify(e, pgc).to_string())?;
        for r in rows {
            let leaf: String = r.get(0);
            if !out.contains(&leaf) {
                out.push(leaf);
            }
        }
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "[postgres]\nurl = \"postgresql://postgres@h/d\"\n\
        publication = [\"skusync\", \"skusync_activity\"]\n\
        [[inventory]]\ntable = \"public.inventory\"\nsku = \"sku\"\non_hand = \"qty\"\n\
        [[activity]]\ntable = \"public.activity_log\"\nsku = \"sku\"\nkind = \"kind\"\n\
        [activity.counters]\nview = \"views\"\n";

    fn role(superuser: bool, replication: bool) -> RoleInfo {
        RoleInfo {
            superuser,
            replication,
        }
    }

    #[test]
    fn a_superuser_is_never_proposed_as_the_role() {
        assert_eq!(proposed_role("postgres", Some(role(true, true))), "skusync");
        assert_eq!(proposed_role("admin", Some(role(true, false))), "skusync");
        assert_eq!(proposed_role("app", Some(role(false, false))), "app");
        // unknown: the configured name, unless it is the usual superuser's
        assert_eq!(proposed_role("app", None), "app");
        assert_eq!(proposed_role("postgres", None), "skusync");
        assert_eq!(proposed_role("", None), "skusync");
    }

    #[test]
    fn existing_publications_are_named_and_only_what_they_lack_is_added() {
        let cfg = Config::parse(CONFIG).unwrap();
        let plans = plan_publications(&cfg).unwrap();
        let db = Ok(DbState {
            source: "database d on h:5432 as postgres".into(),
            user: role(true, true),
            proposed: None,
            publications: vec![
                PubState::Exists {
                    all_tables: false,
                    missing: vec![],
                    actions: [true; 4],
                },
                PubState::Exists {
                    all_tables: false,
                    missing: vec!["public.activity_log".into()],
                    actions: [true, false, false, false],
                },
            ],
        });
        let sql = render_sql(&cfg, &plans, "postgres", &db);
        for want in [
            "-- CREATE ROLE skusync LOGIN REPLICATION PASSWORD '...';",
            "-- GRANT SELECT ON public.inventory, public.activity_log TO skusync;",
            "postgres.url logs in as postgres, a superuser",
            "-- publication skusync exists and contains public.inventory\n",
            "-- publication skusync_activity exists; it lacks public.activity_log:\n\
             ALTER PUBLICATION skusync_activity ADD TABLE public.activity_log;\n",
        ] {
            assert!(sql.contains(want), "{want:?} missing:\n{sql}");
        }
        assert!(!sql.contains("CREATE PUBLICATION"), "{sql}");
        assert!(!sql.contains("TO postgres"), "{sql}");
    }

    #[test]
    fn an_existing_role_gets_grants_and_a_publication_lacking_actions_gets_them() {
        let cfg = Config::parse(&CONFIG.replace("postgres@", "app@")).unwrap();
        let plans = plan_publications(&cfg).unwrap();
        let db = Ok(DbState {
            source: "database d on h:5432 as app".into(),
            user: role(false, false),
            proposed: None,
            publications: vec![
                PubState::Exists {
                    all_tables: false,
                    missing: vec![],
                    actions: [true, false, false, false],
                },
                PubState::Missing,
            ],
        });
        let sql = render_sql(&cfg, &plans, "app", &db);
        for want in [
            "-- role app exists\n-- ALTER ROLE app REPLICATION;\n",
            "-- GRANT USAGE ON SCHEMA public TO app;",
            "ALTER PUBLICATION skusync SET (publish = 'insert, update, delete, truncate');",
            "CREATE PUBLICATION skusync_activity FOR TABLE public.activity_log WITH (publish = 'insert');",
        ] {
            assert!(sql.contains(want), "{want:?} missing:\n{sql}");
        }
        assert!(!sql.contains("CREATE ROLE"), "{sql}");
    }

    #[test]
    fn without_a_connection_everything_is_printed_for_the_configured_role() {
        let cfg = Config::parse(&CONFIG.replace("postgres@", "app@")).unwrap();
        let plans = plan_publications(&cfg).unwrap();
        let db = Err(ConnectFailure {
            message: "postgres.url: authentication as \"app\" failed: role \"app\" does not exist"
                .into(),
            kind: ConnectFailureKind::MissingRole,
        });
        let sql = render_sql(&cfg, &plans, "app", &db);
        assert!(sql.contains("Could not read the database"), "{sql}");
        assert!(sql.contains("-- role app does not exist yet"), "{sql}");
        assert!(
            sql.contains("-- CREATE ROLE app LOGIN REPLICATION PASSWORD '...';"),
            "{sql}"
        );
        assert_eq!(sql.matches("CREATE PUBLICATION").count(), 2, "{sql}");
    }
}
