//! `skusync check`: preflight against the real servers.
//!
//! One line per check, `ok   <check>`, `WARN <check>: <problem>` or
//! `FAIL <check>: <problem>`, each problem followed by the SQL or setting that fixes it
//! (indented). Only failures make the exit code non-zero: a failure means `run` would not
//! work; a warning means it works but something will hurt later (WAL retention, Redis
//! losing its data).

use super::{
    ConnectFailureKind, PubPlan, STOCK_PUBLISH, create_publication_sql, ident, plan_publications,
    schema_of, table_ident,
};
use crate::config::Config;
use crate::fold::Mapping;
use crate::pg::PgConnectConfig;
use crate::pg::conn::quote_literal;
use crate::pg::meta;
use crate::snapshot;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use tokio_postgres::Client;

/// Severity of one check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// Prints results as they come (a hanging server then shows where it hangs) and counts
/// failures.
pub struct Report<W: Write> {
    out: W,
    failures: usize,
    warnings: usize,
}

impl<W: Write> Report<W> {
    /// A report printing to `out`.
    pub fn new(out: W) -> Self {
        Report {
            out,
            failures: 0,
            warnings: 0,
        }
    }

    /// Print one result with its fix lines.
    pub fn line(&mut self, level: Level, check: &str, problem: &str, fix: &[String]) {
        let _ = match level {
            Level::Ok if problem.is_empty() => writeln!(self.out, "ok   {check}"),
            Level::Ok => writeln!(self.out, "ok   {check}: {problem}"),
            Level::Warn => writeln!(self.out, "WARN {check}: {problem}"),
            Level::Fail => writeln!(self.out, "FAIL {check}: {problem}"),
        };
        for f in fix {
            for l in f.lines() {
                let _ = writeln!(self.out, "     {l}");
            }
        }
        match level {
            Level::Ok => {}
            Level::Warn => self.warnings += 1,
            Level::Fail => self.failures += 1,
        }
    }

    fn ok(&mut self, check: &str) {
        self.line(Level::Ok, check, "", &[]);
    }

    fn ok_note(&mut self, check: &str, note: &str) {
        self.line(Level::Ok, check, note, &[]);
    }

    fn warn(&mut self, check: &str, problem: &str, fix: &[String]) {
        self.line(Level::Warn, check, problem, fix);
    }

    fn fail(&mut self, check: &str, problem: &str, fix: &[String]) {
        self.line(Level::Fail, check, problem, fix);
    }

    /// Number of failures so far.
    pub fn failures(&self) -> usize {
        self.failures
    }

    /// Number of warnings so far.
    pub fn warnings(&self) -> usize {
        self.warnings
    }
}

/// Run every check; returns true when `run` would work (no failures).
pub async fn run(cfg: &Config, out: impl Write) -> bool {
    let mut r = Report::new(out);
    check_user_keys(cfg, &mut r);
    check_postgres(cfg, &mut r).await;
    check_redis(cfg, &mut r).await;
    check_mqtt(cfg, &mut r).await;
    let (f, w) = (r.failures(), r.warnings());
    let _ = writeln!(
        r.out,
        "{}: {f} failed, {w} warnings",
        if f == 0 { "ready" } else { "not ready" }
    );
    f == 0
}

/// Each mapped user column has its HMAC key (`run` refuses to start without it; the other
/// commands do not need it).
fn check_user_keys<W: Write>(cfg: &Config, r: &mut Report<W>) {
    for (i, a) in cfg.activity.iter().enumerate() {
        if a.user.is_none() {
            continue;
        }
        let check = format!("activity[{i}].user HMAC key");
        match cfg.user_key(i) {
            Ok(_) => r.ok(&check),
            Err(e) => r.fail(
                &check,
                &e.0,
                &[
                    format!(
                        "export SKUSYNC_USER_KEY=...   # at least {} bytes, e.g. from `openssl rand -hex 32`",
                        crate::config::MIN_USER_KEY_BYTES
                    ),
                    "# or the systemd credential user-key (dist/skusync.service); keep the key: users".into(),
                    "# are counted as HMACs with it, and a new key counts a user seen before as new".into(),
                ],
            ),
        }
    }
}

async fn check_postgres<W: Write>(cfg: &Config, r: &mut Report<W>) {
    if let Some(problem) = cfg.pg_connect().ok().and_then(|c| c.weak_tls()) {
        let fix = "set sslmode=verify-full&sslrootcert=/path/to/ca.pem (or sslrootcert=system) in postgres.url";
        r.warn("postgres TLS", &problem, &[fix.into()]);
    }
    let (client, pgc) = match super::pg_client_or_why(cfg).await {
        Ok(c) => c,
        Err(e) => {
            let user = cfg.pg_connect().map(|c| c.user).unwrap_or_default();
            let create_role = || {
                let mut fix = super::role_sql(cfg, &user, false);
                fix.push(format!(
                    "-- as a superuser; then a pg_hba.conf line for {user} (logical replication matches the database column)"
                ));
                fix
            };
            let password = || -> Vec<String> {
                vec![
                    "set the password in postgres.url, SKUSYNC_PG_PASSWORD, PGPASSWORD or the passfile,".into(),
                    "and check the role's pg_hba.conf line (logical replication matches the database column)".into(),
                ]
            };
            let fix = match e.kind {
                ConnectFailureKind::MissingRole => create_role(),
                ConnectFailureKind::PasswordRefused => {
                    // under a password method the server does not say whether the role exists
                    let mut fix = password();
                    fix.push(format!("-- if role {user} does not exist yet:"));
                    fix.extend(create_role());
                    fix
                }
                ConnectFailureKind::Auth => password(),
                ConnectFailureKind::Other => vec![],
            };
            r.fail("postgres connection", &e.message, &fix);
            return;
        }
    };
    r.ok("postgres connection");
    if let Err(e) = postgres_checks(cfg, &client, &pgc, r).await {
        r.fail("postgres", &format!("query failed: {e}"), &[]);
    }
}

/// Server settings as `name -> setting`.
async fn settings(
    client: &Client,
    pgc: &PgConnectConfig,
) -> Result<BTreeMap<String, String>, String> {
    let rows = client
        .query(
            "SELECT name::text, setting::text FROM pg_settings WHERE name = ANY($1)",
            &[&vec![
                "wal_level",
                "max_replication_slots",
                "max_wal_senders",
                "max_slot_wal_keep_size",
            ]],
        )
        .await
        .map_err(|e| meta::classify(e, pgc).to_string())?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn postgres_checks<W: Write>(
    cfg: &Config,
    client: &Client,
    pgc: &PgConnectConfig,
    r: &mut Report<W>,
) -> Result<(), String> {
    let q = |e: tokio_postgres::Error| meta::classify(e, pgc).to_string();
    let set = settings(client, pgc).await?;
    let get = |k: &str| set.get(k).cloned().unwrap_or_default();
    let int = |k: &str| get(k).parse::<i64>().unwrap_or(0);
    let slot_name = &cfg.postgres.slot;
    let slot = meta::slot_state(client, pgc, slot_name)
        .await
        .map_err(|e| e.to_string())?;

    // a standby cannot make a logical slot before PostgreSQL 16, and skusync's slot on
    // one would not survive a promotion anyway: attach to the primary
    let (standby, version): (bool, i32) = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .map_err(q)?;
    if standby && version < 160_000 {
        r.fail(
            "postgres server",
            "is a standby (in recovery): PostgreSQL before 16 makes no logical slot there",
            &["-- point postgres.url at the primary".into()],
        );
    } else if standby {
        r.warn(
            "postgres server",
            "is a standby (in recovery): `skusync verify` needs the primary, and a slot made here does not \
             follow a failover",
            &["-- point postgres.url at the primary, unless streaming from this standby is meant".into()],
        );
    }

    // wal_level
    let wal_level = get("wal_level");
    if wal_level == "logical" {
        r.ok("postgres wal_level = logical");
    } else {
        r.fail(
            "postgres wal_level",
            &format!("is {wal_level}, logical decoding needs logical"),
            &[
                "ALTER SYSTEM SET wal_level = logical;".into(),
                "-- then restart PostgreSQL".into(),
            ],
        );
    }

    // free slots and senders
    let used_slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .map_err(q)?
        .get(0);
    let max_slots = int("max_replication_slots");
    if slot.is_some() && used_slots < max_slots {
        r.ok_note(
            "postgres max_replication_slots",
            &format!("slot {slot_name} exists ({used_slots} of {max_slots} used)"),
        );
    } else if slot.is_some() {
        // A rebuild loads its snapshot from a temporary slot of its own; without room for
        // it the rebuild would wait (and the slot's WAL grow) until a slot is freed.
        r.warn(
            "postgres max_replication_slots",
            &format!(
                "slot {slot_name} exists, but all {max_slots} slots are in use: a rebuild of Redis \
                 needs a second, temporary slot and would wait for one"
            ),
            &[
                format!(
                    "ALTER SYSTEM SET max_replication_slots = {};",
                    used_slots + 2
                ),
                "-- then restart PostgreSQL".into(),
            ],
        );
    } else if used_slots < max_slots {
        r.ok_note(
            "postgres max_replication_slots",
            &format!("{used_slots} of {max_slots} used"),
        );
    } else {
        r.fail(
            "postgres max_replication_slots",
            &format!("all {max_slots} slots are in use and skusync needs one"),
            &[
                format!(
                    "ALTER SYSTEM SET max_replication_slots = {};",
                    used_slots + 2
                ),
                "-- then restart PostgreSQL".into(),
            ],
        );
    }
    let used_senders: i64 = client
        .query_one(
            // pg_stat_activity hides other roles' backend types from a role without
            // pg_read_all_stats; the WAL senders' own view does not
            "SELECT count(*) FROM pg_stat_get_wal_senders()",
            &[],
        )
        .await
        .map_err(q)?
        .get(0);
    let max_senders = int("max_wal_senders");
    if used_senders < max_senders {
        r.ok_note(
            "postgres max_wal_senders",
            &format!("{used_senders} of {max_senders} used"),
        );
    } else {
        r.fail(
            "postgres max_wal_senders",
            &format!("all {max_senders} WAL senders are in use and skusync needs one"),
            &[
                format!("ALTER SYSTEM SET max_wal_senders = {};", used_senders + 2),
                "-- then restart PostgreSQL".into(),
            ],
        );
    }

    // role
    let role_row = client
        .query_one(
            "SELECT current_user::text, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(q)?;
    let role: String = role_row.get(0);
    let (repl, superuser): (bool, bool) = (role_row.get(1), role_row.get(2));
    if repl || superuser {
        r.ok(&format!("postgres role {role} can replicate"));
    } else {
        r.fail(
            &format!("postgres role {role}"),
            "lacks the REPLICATION attribute",
            &[format!("ALTER ROLE {} REPLICATION;", ident(&role))],
        );
    }

    // tables: existence, privileges, mapped columns and replica identity
    // the catalog check needs no HMAC key (its absence is reported on its own line)
    let mapping = Mapping::without_user_keys(cfg).map_err(|e| e.to_string())?;
    let mut present = BTreeSet::new();
    let mut all_tables: Vec<&str> = mapping.tables().collect();
    for t in mapping.lookup_tables() {
        if !all_tables.contains(&t) {
            all_tables.push(t);
        }
    }
    for table in all_tables {
        let desc = snapshot::describe(client, pgc, table)
            .await
            .map_err(|e| e.to_string())?;
        let Some(desc) = desc else {
            r.fail(
                &format!("table {table}"),
                "does not exist (or the schema is not visible to this role)",
                &["create it, or fix the table name in the mapping".into()],
            );
            continue;
        };
        present.insert(table.to_string());
        let privs = client
            .query_one(
                "SELECT has_table_privilege($1::oid, 'SELECT'), \
                        has_schema_privilege($2::text, 'USAGE')",
                &[&desc.oid, &schema_of(table)],
            )
            .await
            .map_err(q)?;
        let (select, usage): (bool, bool) = (privs.get(0), privs.get(1));
        if select && usage {
            r.ok(&format!("postgres role {role} may SELECT {table}"));
        } else {
            let mut fix = Vec::new();
            if !usage {
                fix.push(format!(
                    "GRANT USAGE ON SCHEMA {} TO {};",
                    ident(schema_of(table)),
                    ident(&role)
                ));
            }
            if !select {
                fix.push(format!(
                    "GRANT SELECT ON {} TO {};",
                    table_ident(table),
                    ident(&role)
                ));
            }
            r.fail(
                &format!("postgres role {role} may SELECT {table}"),
                "permission denied (the initial snapshot reads the table)",
                &fix,
            );
        }
        match mapping.resolve(&desc) {
            Ok(rule) => match snapshot::lookup_key_problem(client, pgc, &rule, &desc).await {
                Ok(None) => r.ok(&format!("mapping {table}")),
                Ok(Some((problem, fix))) => r.fail(&format!("mapping {table}"), &problem, &[fix]),
                Err(e) => return Err(e.to_string()),
            },
            Err(e) => {
                // the message carries its fix after "fix it with: "; show it as a fix line
                let msg = e.to_string();
                let (problem, fix) = match msg.split_once("fix it with: ") {
                    Some((p, f)) => (
                        p.trim_end().trim_end_matches(';').to_string(),
                        vec![f.to_string()],
                    ),
                    None => (msg.clone(), vec![]),
                };
                r.fail(&format!("mapping {table}"), &problem, &fix);
            }
        }
    }

    // partitioned stock tables: every leaf keyed like its table
    let stock: Vec<String> = cfg.inventory.iter().map(|m| m.table.clone()).collect();
    let all: Vec<String> = mapping.tables().map(str::to_string).collect();
    let trees = crate::pg::partitions::read(client, pgc, &all)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(problem) = trees.identity_problem(&stock) {
        let (p, fix) = problem
            .split_once("; give it the same identity: ")
            .map(|(p, f)| (p.to_string(), vec![f.to_string()]))
            .unwrap_or((problem.clone(), vec![]));
        r.fail("partitions keyed like their table", &p, &fix);
    } else if !trees.members.is_empty() {
        r.ok("partitions keyed like their table");
    }

    // publications
    publication_checks(cfg, client, pgc, &present, r).await?;
    column_list_checks(cfg, client, pgc, r).await?;
    let problems = crate::ops::filters::filter_problems(cfg, client, pgc)
        .await
        .map_err(|e| e.to_string())?;
    for p in &problems {
        let check = format!("{} against the column's type", p.at);
        if p.fatal {
            r.fail(&check, &p.problem, std::slice::from_ref(&p.fix));
        } else {
            r.warn(&check, &p.problem, std::slice::from_ref(&p.fix));
        }
    }

    // WAL retention bound
    let keep = get("max_slot_wal_keep_size");
    if keep == "-1" {
        r.warn(
            "postgres max_slot_wal_keep_size",
            "is -1 (unbounded): a stopped or abandoned skusync makes the server keep WAL until the disk is full",
            &["ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf();".into()],
        );
    } else if !keep.is_empty() {
        r.ok_note("postgres max_slot_wal_keep_size", &format!("{keep} MB"));
    }

    // the slot itself
    let drop_sql = format!(
        "SELECT pg_drop_replication_slot({});",
        quote_literal(slot_name)
    );
    match &slot {
        None => r.ok_note(
            &format!("slot {slot_name}"),
            "not created yet (skusync run creates it with its snapshot)",
        ),
        Some(s) => {
            let mut fine = true;
            if s.plugin.as_deref() != Some("pgoutput") || s.temporary {
                fine = false;
                r.fail(
                    &format!("slot {slot_name}"),
                    &format!(
                        "exists but is not a permanent pgoutput slot (plugin {})",
                        s.plugin.as_deref().unwrap_or("none: a physical slot")
                    ),
                    &[format!(
                        "{drop_sql}  -- or set postgres.slot to another name"
                    )],
                );
            } else if s.database.as_deref() != Some(pgc.dbname.as_str()) {
                fine = false;
                r.fail(
                    &format!("slot {slot_name}"),
                    &format!(
                        "belongs to database {} (the config connects to {})",
                        s.database.as_deref().unwrap_or("?"),
                        pgc.dbname
                    ),
                    &[
                        "set postgres.slot to another name, or fix the database in postgres.url"
                            .into(),
                    ],
                );
            }
            if s.wal_status.as_deref() == Some("lost") {
                fine = false;
                r.fail(
                    &format!("slot {slot_name}"),
                    "lost WAL it needs (wal_status = lost): changes were missed",
                    &[
                        format!("{drop_sql}  -- skusync run then recreates it and reloads Redis"),
                        "-- or set postgres.on_slot_lost = \"resync\"".into(),
                    ],
                );
            }
            if s.wal_status.as_deref() == Some("unreserved") {
                // past max_slot_wal_keep_size: the next checkpoint may remove WAL it needs
                fine = false;
                r.warn(
                    &format!("slot {slot_name}"),
                    "is about to lose WAL it needs (wal_status = unreserved: it is behind by more than \
                     max_slot_wal_keep_size); start or unblock skusync now",
                    &["-- or raise max_slot_wal_keep_size (ALTER SYSTEM SET ...; SELECT pg_reload_conf();)".into()],
                );
            }
            if let Some(pid) = s.active_pid {
                fine = false;
                let who = client
                    .query_opt(
                        "SELECT application_name::text, client_addr::text FROM pg_stat_activity WHERE pid = $1",
                        &[&pid],
                    )
                    .await
                    .map_err(q)?;
                let (app, addr): (Option<String>, Option<String>) =
                    who.map(|w| (w.get(0), w.get(1))).unwrap_or((None, None));
                r.warn(
                    &format!("slot {slot_name}"),
                    &format!(
                        "held by pid {pid} (application_name {}, client_addr {}); run will wait as a standby until it is released",
                        app.filter(|a| !a.is_empty()).as_deref().unwrap_or("unknown"),
                        addr.as_deref().unwrap_or("local")
                    ),
                    &[format!(
                        "-- if that process is not a live skusync: SELECT pg_terminate_backend({pid});"
                    )],
                );
            }
            if fine {
                r.ok_note(
                    &format!("slot {slot_name}"),
                    &format!(
                        "wal_status {}",
                        s.wal_status.as_deref().unwrap_or("unknown")
                    ),
                );
            }
        }
    }
    Ok(())
}

/// Every configured publication exists, and the mapped tables are published with the
/// actions they need (the union over the configured publications, as pgoutput does).
async fn publication_checks<W: Write>(
    cfg: &Config,
    client: &Client,
    pgc: &PgConnectConfig,
    present: &BTreeSet<String>,
    r: &mut Report<W>,
) -> Result<(), String> {
    let names = cfg.postgres.publication.names();
    let plans: Vec<PubPlan> = match plan_publications(cfg) {
        Ok(p) => p,
        Err(_) => {
            // One publication for stock and activity tables works (skusync reads only
            // the activity logs' inserts), but it publishes their updates and deletes:
            // the application's own UPDATE/DELETE on an activity log without a replica
            // identity key then fail, and the WAL decoded for them is wasted.
            let first = &names[0];
            let second = format!("{first}_activity");
            let tables: Vec<String> = cfg.activity.iter().map(|a| table_ident(&a.table)).collect();
            r.warn(
                "publications",
                &format!(
                    "one publication ({first}) carries the activity tables with every action; skusync works with it, \
                     but an insert-only publication of their own keeps the application's UPDATE/DELETE on them working"
                ),
                &[
                    format!(
                        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert');",
                        ident(&second),
                        tables.join(", ")
                    ),
                    format!("ALTER PUBLICATION {} DROP TABLE {};", ident(first), tables.join(", ")),
                    format!("-- and in the config: publication = [{first:?}, {second:?}]"),
                ],
            );
            Vec::new()
        }
    };
    let pubs = crate::pg::publication::actions(client, pgc, &names)
        .await
        .map_err(|e| e.to_string())?;
    for n in &names {
        if pubs.contains_key(n) {
            r.ok(&format!("publication {n} exists"));
        } else {
            let fix = match plans.iter().find(|p| &p.name == n) {
                Some(p) => vec![
                    create_publication_sql(p),
                    "-- (this is what skusync setup --print prints; skusync setup runs it)".into(),
                ],
                None => vec![format!(
                    "CREATE PUBLICATION {};  -- or remove it from postgres.publication",
                    ident(n)
                )],
            };
            r.fail(&format!("publication {n}"), "does not exist", &fix);
        }
    }
    for (table, stock) in wanted_tables(cfg) {
        if !present.contains(&table) {
            continue; // already reported as missing
        }
        let table = table.as_str();
        let target = target_publication(cfg, &plans, stock);
        let check = format!("publication covers {table}");
        let cov = crate::pg::publication::coverage(client, pgc, &names, &pubs, table)
            .await
            .map_err(|e| e.to_string())?;
        let Some(cov) = cov else {
            continue; // dropped since
        };
        if let Some((problem, fix)) = coverage_problem(
            table,
            stock,
            &cov,
            &names,
            &target,
            pubs.contains_key(&target),
        ) {
            r.fail(&check, &problem, &fix);
            continue;
        }
        r.ok(&check);
    }
    Ok(())
}

/// The tables skusync streams, each with whether it needs every action (stock and
/// referenced tables: every change of theirs moves what depends on them) or only inserts
/// (activity logs).
pub(crate) fn wanted_tables(cfg: &Config) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = cfg
        .inventory
        .iter()
        .map(|m| (m.table.clone(), true))
        .collect();
    for t in cfg.lookup_tables() {
        if !out.iter().any(|(x, _)| *x == t) {
            out.push((t, true));
        }
    }
    for a in &cfg.activity {
        if !out.iter().any(|(x, _)| *x == a.table) {
            out.push((a.table.clone(), false));
        }
    }
    out
}

/// Whether a column skusync reads (mapped, filtered on, a lookup hop's, or a key) is a
/// `char(n)`: its values are read without their pad spaces since 2026-12-08, so a Redis
/// built before holds them padded.
pub(crate) async fn reads_char_n(
    cfg: &Config,
    client: &Client,
    pgc: &PgConnectConfig,
) -> Result<bool, crate::pg::PgError> {
    for (table, _) in wanted_tables(cfg) {
        let Some(rel) = snapshot::describe(client, pgc, &table).await? else {
            continue;
        };
        let read = mapped_columns(cfg, &table);
        if rel.columns.iter().any(|c| {
            c.type_oid == crate::txn::value::oid::BPCHAR && (c.is_key || read.contains(&c.name))
        }) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The publication `setup` would put a table in.
fn target_publication(cfg: &Config, plans: &[PubPlan], stock: bool) -> String {
    plans
        .get(if stock { 0 } else { 1 })
        .map(|p| p.name.clone())
        .unwrap_or_else(|| cfg.postgres.publication.names()[0].clone())
}

/// The first mapped table the configured publications do not publish as skusync needs,
/// as an error naming the SQL that fixes it. `run` checks this at every cycle's start:
/// a change the slot never carries is one Redis never sees.
pub(crate) async fn publication_gap(
    cfg: &Config,
    client: &Client,
    pgc: &PgConnectConfig,
) -> Result<Option<String>, crate::pg::PgError> {
    let names = cfg.postgres.publication.names();
    let plans = plan_publications(cfg).unwrap_or_default();
    let pubs = crate::pg::publication::actions(client, pgc, &names).await?;
    for (table, stock) in wanted_tables(cfg) {
        let target = target_publication(cfg, &plans, stock);
        let Some(cov) =
            crate::pg::publication::coverage(client, pgc, &names, &pubs, &table).await?
        else {
            continue; // a missing table is the preflight's to report
        };
        if let Some((problem, fix)) = coverage_problem(
            &table,
            stock,
            &cov,
            &names,
            &target,
            pubs.contains_key(&target),
        ) {
            return Ok(Some(format!(
                "{problem}; fix it with: {} (or run `skusync check` for every problem)",
                fix.join(" ")
            )));
        }
    }
    Ok(None)
}

/// What is wrong with a mapped table's coverage by the publications, and the SQL that
/// fixes it; `None` when it is published as skusync needs (`stock`: every action, else
/// inserts). `target`: the publication `setup` would put it in (`exists`: it does).
pub(crate) fn coverage_problem(
    table: &str,
    stock: bool,
    cov: &crate::pg::publication::Coverage,
    names: &[String],
    target: &str,
    exists: bool,
) -> Option<(String, Vec<String>)> {
    use crate::pg::publication::Coverage;
    let add = |t: &str| {
        if exists {
            format!(
                "ALTER PUBLICATION {} ADD TABLE {};",
                ident(target),
                table_ident(t)
            )
        } else {
            format!("-- create publication {target} (skusync setup --print); it includes {t}")
        }
    };
    match cov {
        Coverage::NotPublished => Some((
            format!("{table} is in none of the publications {}", names.join(", ")),
            vec![add(table)],
        )),
        Coverage::PartitionsMissing(leaves) => Some((
            format!(
                "partitions of {table} are in none of the publications {}: {} (their changes would never reach skusync)",
                names.join(", "),
                leaves.join(", ")
            ),
            vec![
                add(table),
                "-- (a partitioned table in a publication publishes every partition, including later ones)".into(),
            ],
        )),
        Coverage::PartitionFilters(leaves) => Some((
            format!(
                "partitions of {table} carry publication row filters of their own ({}); skusync reads {table} as one table and cannot apply them",
                leaves.join(", ")
            ),
            vec![format!(
                "-- drop the partitions' filters, or publish {} with publish_via_partition_root = true and one filter on {table}",
                ident(target)
            )],
        )),
        Coverage::Covered(_) => {
            let need = if stock { [true; 4] } else { [true, false, false, false] };
            let missing = cov.missing_actions(need);
            if missing.is_empty() {
                return None;
            }
            let kind = if stock { "a stock" } else { "an activity" };
            let want = if stock { STOCK_PUBLISH } else { "insert" };
            Some((
                format!(
                    "{kind} table needs {want} published, but no configured publication containing it publishes {}",
                    missing.join(", ")
                ),
                vec![format!(
                    "ALTER PUBLICATION {} SET (publish = '{want}');  -- if {table} is in it; else ALTER PUBLICATION {} ADD TABLE {};",
                    ident(target),
                    ident(target),
                    table_ident(table)
                )],
            ))
        }
    }
}

/// Columns skusync reads from a mapped table (mapping and `where`).
pub(crate) fn mapped_columns(cfg: &Config, table: &str) -> Vec<String> {
    let filter_cols = |items: &[String]| -> Vec<String> {
        crate::filter::Filter::parse(items)
            .map(|f| f.columns().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let mut cols = Vec::new();
    let read = |v: &crate::config::ValueSource| match v {
        crate::config::ValueSource::Column(c) => c.clone(),
        crate::config::ValueSource::Lookup(l) => l.on.column().to_string(),
    };
    for m in cfg.inventory.iter().filter(|m| m.table == table) {
        cols.push(read(&m.sku));
        cols.extend(m.location.as_ref().map(read));
        cols.extend(m.on_hand.names().iter().cloned());
        cols.extend(m.reserved.iter().flat_map(|c| c.names().iter().cloned()));
        cols.extend(m.low_stock.clone());
        cols.extend(filter_cols(&m.filter));
    }
    for a in cfg.activity.iter().filter(|a| a.table == table) {
        cols.push(read(&a.sku));
        cols.extend(a.kind.column().map(str::to_string));
        cols.extend(a.quantity.iter().flat_map(|c| c.names().iter().cloned()));
        cols.extend(a.user.clone());
        cols.extend(a.time.clone());
        cols.extend(filter_cols(&a.filter));
    }
    // as a referenced table: each hop's key, value (or next reference) and filter
    for (_, _, _, v) in cfg.value_sources() {
        let Some(l) = v.lookup() else { continue };
        let hops = l.hops();
        for (n, h) in hops.iter().enumerate().filter(|(_, h)| h.from == table) {
            cols.extend(h.key.clone());
            cols.extend(h.column.clone());
            if let Some(next) = hops.get(n + 1) {
                cols.push(next.on.column().to_string());
            }
            cols.extend(filter_cols(&h.filter));
        }
    }
    cols.sort();
    cols.dedup();
    cols
}

/// A publication column list (PostgreSQL 15+) that leaves out a column skusync reads:
/// the stream would not carry it.
async fn column_list_checks<W: Write>(
    cfg: &Config,
    client: &Client,
    pgc: &PgConnectConfig,
    r: &mut Report<W>,
) -> Result<(), String> {
    let q = |e: tokio_postgres::Error| meta::classify(e, pgc).to_string();
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(q)?
        .get(0);
    if version < 150_000 {
        return Ok(());
    }
    let names = cfg.postgres.publication.names();
    // A partition published on its own (publish_via_partition_root off) may carry a
    // column list of its own: its columns are those of the first mapped table among it
    // and its ancestors (pg_partition_ancestors lists the relation first, then up). Joined by names, as the rest of check: no regclass cast, which
    // a least-privilege role may not be allowed.
    let rows = client
        .query(
            "SELECT pt.schemaname::text || '.' || pt.tablename::text, pt.pubname::text, pt.attnames::text[], \
                    ARRAY(SELECT an.nspname::text || '.' || ac.relname::text \
                          FROM pg_partition_ancestors(c.oid) a \
                          JOIN pg_class ac ON ac.oid = a.relid \
                          JOIN pg_namespace an ON an.oid = ac.relnamespace) \
             FROM pg_publication_tables pt \
             JOIN pg_namespace n ON n.nspname = pt.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
             WHERE pt.pubname = ANY($1)",
            &[&names],
        )
        .await
        .map_err(q)?;
    for row in rows {
        let (table, publication, published, ancestors): (
            String,
            String,
            Option<Vec<String>>,
            Vec<String>,
        ) = (row.get(0), row.get(1), row.get(2), row.get(3));
        let Some(published) = published else { continue };
        let wanted = wanted_tables(cfg);
        let mapped = ancestors
            .iter()
            .find(|a| wanted.iter().any(|(t, _)| t == *a))
            .unwrap_or(&table);
        let missing: Vec<String> = mapped_columns(cfg, mapped)
            .into_iter()
            .filter(|c| !published.contains(c))
            .collect();
        if missing.is_empty() {
            continue;
        }
        r.fail(
            &format!("publication {publication} publishes the mapped columns of {table}"),
            &format!(
                "its column list leaves out {}, which skusync reads (mapping or where)",
                missing.join(", ")
            ),
            &[format!(
                "ALTER PUBLICATION {p} DROP TABLE {t}; ALTER PUBLICATION {p} ADD TABLE {t};  -- or list those columns too",
                p = ident(&publication),
                t = table_ident(&table)
            )],
        );
    }
    Ok(())
}

async fn check_redis<W: Write>(cfg: &Config, r: &mut Report<W>) {
    let Some(rc) = &cfg.redis else {
        r.fail(
            "redis",
            "no [redis] section: skusync run needs redis.url",
            &["[redis]\nurl = \"redis://127.0.0.1:6379/0\"".into()],
        );
        return;
    };
    let client = match crate::sinks::redis::client(rc.url.all(), rc.cluster, rc.ca_file.as_deref())
    {
        Ok(c) => c,
        Err(e) => {
            r.fail("redis connection", &strip_redis_prefix(&e.to_string()), &[]);
            return;
        }
    };
    if let Ok(info) = redis::IntoConnectionInfo::into_connection_info(&*rc.url)
        && let redis::ConnectionAddr::Tcp(host, _) = info.addr()
        && let Some(problem) =
            cleartext_credentials(false, info.redis_settings().password().is_some(), host)
    {
        r.warn(
            "redis transport",
            &problem,
            &[
                "use rediss:// in redis.url (and redis.ca_file for a private CA)".into(),
                "# or reach Redis over loopback or a Unix socket".into(),
            ],
        );
    }
    let con = tokio::time::timeout(
        super::CONNECT_TIMEOUT,
        crate::sinks::redis::connect(&client),
    )
    .await;
    let mut con = match con {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let e = strip_redis_prefix(&e.to_string());
            let fix = if e.contains("WRONGPASS") || e.contains("NOAUTH") {
                vec!["set the password in redis.url or SKUSYNC_REDIS_PASSWORD".into()]
            } else {
                vec![]
            };
            let e = if e.starts_with("redis.") {
                e
            } else {
                format!("redis.url: {e}")
            };
            r.fail("redis connection", &e, &fix);
            return;
        }
        Err(_) => {
            r.fail(
                "redis connection",
                &format!(
                    "redis.url: no connection within {} s",
                    super::CONNECT_TIMEOUT.as_secs()
                ),
                &[],
            );
            return;
        }
    };
    match redis::cmd("PING").query_async::<String>(&mut con).await {
        Ok(_) => r.ok("redis connection"),
        Err(e) => {
            r.fail("redis connection", &format!("redis.url: {e}"), &[]);
            return;
        }
    }
    match crate::sinks::redis::check_topology(&mut con).await {
        Ok(()) if con.is_cluster() => r.ok("redis cluster: every slot served"),
        Ok(()) => {}
        Err(e) => {
            r.fail("redis mode", &strip_redis_prefix(&e.to_string()), &[]);
            return;
        }
    }
    // every primary of a cluster is asked; the first that differs is reported
    let nodes: Vec<Option<(String, u16)>> = match con.primaries().await {
        Ok(p) if !p.is_empty() => p.into_iter().map(Some).collect(),
        _ => vec![None],
    };
    let config_get = |key: &'static str| {
        let mut con = con.clone();
        let nodes = nodes.clone();
        async move {
            let mut first: Option<String> = None;
            for n in &nodes {
                let v = con
                    .on_node::<Vec<String>>(
                        n.as_ref(),
                        redis::cmd("CONFIG").arg("GET").arg(key).to_owned(),
                    )
                    .await
                    .map(|v| v.get(1).cloned().unwrap_or_default())?;
                match &first {
                    Some(f) if *f != v => return Ok(v),
                    None => first = Some(v),
                    _ => {}
                }
            }
            Ok::<String, redis::RedisError>(first.unwrap_or_default())
        }
    };
    match config_get("maxmemory-policy").await {
        Ok(p) if p == "noeviction" => r.ok("redis maxmemory-policy = noeviction"),
        Ok(p) => r.warn(
            "redis maxmemory-policy",
            &format!("is {p}: an eviction costs a full resync"),
            &[
                "CONFIG SET maxmemory-policy noeviction".into(),
                "# and in redis.conf: maxmemory-policy noeviction".into(),
            ],
        ),
        Err(e) => r.warn(
            "redis maxmemory-policy",
            &format!("could not be checked (CONFIG GET refused: {e})"),
            &["# make sure the server runs with maxmemory-policy noeviction".into()],
        ),
    }
    match (config_get("appendonly").await, config_get("save").await) {
        (Ok(aof), Ok(save)) if aof == "no" && save.trim().is_empty() => r.warn(
            "redis persistence",
            "neither AOF nor RDB snapshots: a Redis restart costs a full resync",
            &[
                "CONFIG SET appendonly yes".into(),
                "# and in redis.conf: appendonly yes".into(),
            ],
        ),
        (Ok(aof), Ok(_)) => r.ok_note(
            "redis persistence",
            if aof == "yes" {
                "appendonly yes"
            } else {
                "RDB snapshots only (appendonly yes loses less)"
            },
        ),
        (Err(e), _) | (_, Err(e)) => r.warn(
            "redis persistence",
            &format!("could not be checked (CONFIG GET refused: {e})"),
            &["# make sure the server persists its data (appendonly yes)".into()],
        ),
    }
}

fn strip_redis_prefix(s: &str) -> String {
    s.strip_prefix("Redis: ").unwrap_or(s).to_string()
}

async fn check_mqtt<W: Write>(cfg: &Config, r: &mut Report<W>) {
    let Some(mc) = &cfg.mqtt else {
        return;
    };
    let env_pw = std::env::var(crate::sinks::mqtt::PASSWORD_ENV).ok();
    let broker = match crate::sinks::mqtt::parse_url(&mc.url, env_pw.clone()) {
        Ok(b) => b,
        Err(e) => {
            r.fail("mqtt connection", &e.to_string(), &[]);
            return;
        }
    };
    // every broker of a failover list: each may get the password
    for url in mc.url.all() {
        let Ok(b) = crate::sinks::mqtt::parse_url(url, env_pw.clone()) else {
            continue;
        };
        if let Some(problem) = cleartext_credentials(b.tls, b.password.is_some(), &b.host) {
            r.warn(
                "mqtt transport",
                &problem,
                &[
                    "use mqtts:// in mqtt.url (and mqtt.ca_file for a private CA) with a TLS listener"
                        .into(),
                    "# or run the broker on this machine / reach it over loopback".into(),
                ],
            );
        }
    }
    let own_id = format!("{}-check-{}", mc.client_id, std::process::id());
    match mqtt_connect(mc, &broker, &own_id, true).await {
        Ok(()) => r.ok("mqtt connection"),
        Err((problem, fix)) => {
            r.fail("mqtt connection", &problem, &fix);
            return;
        }
    }
    // A broker that lets anyone in lets anyone connect as skusync's client id, which
    // disconnects skusync (MQTT session takeover) and publishes its `offline` will.
    // Accounts the broker does know cannot be probed from here: see docs/security.md,
    // "Securing the broker for mobile clients", for binding client ids to user names.
    let anon_id = format!("{}-check-anon-{}", mc.client_id, std::process::id());
    let anonymous = if broker.user.is_none() {
        true
    } else {
        mqtt_connect(mc, &broker, &anon_id, false).await.is_ok()
    };
    if anonymous {
        r.warn(
            "mqtt client id",
            &format!(
                "the broker accepts clients without a password: any of them can connect as \
                 client id {:?} and disconnect skusync",
                mc.client_id
            ),
            &[
                "# mosquitto.conf: allow_anonymous false, a password_file, and skusync's own user in mqtt.url".into(),
                "# and bind client ids to users (docs/security.md, Securing the broker for mobile clients)".into(),
            ],
        );
    } else {
        r.ok("mqtt anonymous clients refused");
    }
}

/// The warning for credentials sent without TLS to a host that is not this machine
/// (decided on the configured name: a loopback address, `localhost` or `*.localhost`).
fn cleartext_credentials(tls: bool, has_password: bool, host: &str) -> Option<String> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    (!tls && has_password && !crate::config::local_host(h)).then(|| {
        format!("the password goes in clear (no TLS) to {h}, which is not a loopback address")
    })
}

/// CONNECT/CONNACK with client id `id` (never skusync's own, so a running skusync keeps
/// its session), with the configured credentials or none.
async fn mqtt_connect(
    mc: &crate::config::MqttConfig,
    broker: &crate::sinks::mqtt::Broker,
    id: &str,
    credentials: bool,
) -> Result<(), (String, Vec<String>)> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
    let mut o = MqttOptions::new(id, broker.host.clone(), broker.port);
    o.set_clean_start(true);
    o.set_connection_timeout(super::CONNECT_TIMEOUT.as_secs());
    if let Some(u) = broker.user.as_ref().filter(|_| credentials) {
        o.set_credentials(u.clone(), broker.password.clone().unwrap_or_default());
    }
    if broker.tls {
        let tls = mqtt_tls(mc.ca_file.as_deref()).map_err(|e| (e, vec![]))?;
        o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
            std::sync::Arc::new(tls),
        )));
    }
    let (client, mut el) = AsyncClient::new(o, 4);
    let res = tokio::time::timeout(super::CONNECT_TIMEOUT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return Err((
                        format!("mqtt.url: the broker refused the connection ({code:?})"),
                        vec!["check the user and password in mqtt.url or SKUSYNC_MQTT_PASSWORD, and the broker's ACL".into()],
                    ));
                }
                Err(e) => return Err((format!("mqtt.url: {e}"), vec![])),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err((
            format!(
                "mqtt.url: no CONNACK within {} s",
                super::CONNECT_TIMEOUT.as_secs()
            ),
            vec![],
        ))
    });
    if res.is_ok() {
        let _ = client.disconnect().await;
        // let the DISCONNECT go out
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), el.poll()).await;
    }
    res
}

/// TLS for `mqtts://`: `mqtt.ca_file` or the system roots (as the publisher does).
pub(crate) fn mqtt_tls(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| format!("mqtt.ca_file {}: {e}", path.display()))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("mqtt.ca_file {}: {e}", path.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        return Err("mqtt.ca_file: no CA certificates (set mqtt.ca_file)".into());
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("mqtts: {e}"))
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::cleartext_credentials;

    #[test]
    fn a_password_in_clear_to_another_host_is_a_warning() {
        for host in [
            "redis.internal",
            "10.0.0.5",
            "[2001:db8::1]",
            "localhost.example",
        ] {
            let w = cleartext_credentials(false, true, host).expect(host);
            assert!(w.contains("in clear"), "{w}");
        }
    }

    #[test]
    fn tls_no_password_or_loopback_is_fine() {
        assert_eq!(cleartext_credentials(true, true, "redis.internal"), None);
        assert_eq!(cleartext_credentials(false, false, "redis.internal"), None);
        for host in [
            "localhost",
            "LOCALHOST",
            "db.localhost",
            "127.0.0.1",
            "127.1.2.3",
            "[::1]",
        ] {
            assert_eq!(cleartext_credentials(false, true, host), None, "{host}");
        }
    }
}
