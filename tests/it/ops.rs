//! The operator commands (`check`, `setup`, `status`, `drop-slot`) against real servers.

use crate::harness::{
    MosquittoServer, MqttOptions, PasswordEncryption, PgOptions, PgServer, RedisOptions,
    RedisServer, free_port,
};
use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SCHEMA: &str = "
CREATE TABLE inventory (
  sku text NOT NULL, location text NOT NULL, on_hand int NOT NULL, reserved int NOT NULL DEFAULT 0,
  PRIMARY KEY (sku, location));
CREATE TABLE activity_log (
  id bigserial PRIMARY KEY, sku text, kind text NOT NULL, qty numeric,
  at timestamptz NOT NULL DEFAULT now());
INSERT INTO inventory VALUES ('A-1', 'main', 10, 2);
";

/// Servers of one test plus the config pieces that vary.
struct Rig {
    pg: PgServer,
    redis: RedisServer,
    dir: tempfile::TempDir,
    /// `user[:password]` in the Postgres URL.
    pg_user: String,
    redis_url: String,
    /// Replaces the inventory mapping's `sku` column.
    sku_column: String,
    /// More keys of the inventory mapping (`where = [...]`).
    inventory_extra: String,
    extra: String,
}

impl Rig {
    /// PostgreSQL with the schema (bounded WAL retention, so a good setup has no warnings)
    /// and a persistent Redis.
    fn new(mut opts: PgOptions) -> Rig {
        opts.extra_conf
            .insert(0, "max_slot_wal_keep_size = '1GB'".into());
        let pg = PgServer::start_with(opts);
        pg.psql(SCHEMA);
        let redis = RedisServer::start_with(RedisOptions {
            persistence: true,
            ..Default::default()
        });
        let redis_url = redis.url();
        Rig {
            pg,
            redis,
            dir: tempfile::tempdir().expect("tempdir"),
            pg_user: "postgres".into(),
            redis_url,
            sku_column: "sku".into(),
            inventory_extra: String::new(),
            extra: String::new(),
        }
    }

    fn config(&self) -> PathBuf {
        let text = format!(
            "[postgres]\nurl = \"postgresql://{user}@127.0.0.1:{port}/postgres?sslmode=disable\"\n\
             slot = \"skusync\"\npublication = [\"skusync\", \"skusync_activity\"]\nstatus_interval_ms = 200\n\n\
             [redis]\nurl = \"{redis}\"\n\n\
             [[inventory]]\ntable = \"public.inventory\"\nsku = \"{sku}\"\nlocation = \"location\"\n\
             on_hand = \"on_hand\"\nreserved = \"reserved\"\n{inventory_extra}\n\
             [[activity]]\ntable = \"public.activity_log\"\nsku = \"sku\"\nkind = \"kind\"\nquantity = \"qty\"\n\
             windows = [\"5m\"]\n[activity.counters]\nview = \"views\"\n{extra}",
            user = self.pg_user,
            port = self.pg.port(),
            redis = self.redis_url,
            sku = self.sku_column,
            inventory_extra = self.inventory_extra,
            extra = self.extra,
        );
        write_config(self.dir.path(), &text)
    }

    /// Run `skusync <args> --config <cfg>`; (exit code, stdout, stderr).
    fn skusync(&self, args: &[&str]) -> (i32, String, String) {
        skusync_cmd(args, &self.config())
    }

    fn check(&self) -> (i32, String) {
        let (code, out, err) = self.skusync(&["check"]);
        assert!(
            !out.contains("panicked") && !err.contains("panicked"),
            "{out}\n{err}"
        );
        (code, out)
    }

    /// Create the publications the way a DBA would: `setup --print` through psql.
    fn setup_by_print(&self) -> String {
        let (code, sql, err) = self.skusync(&["setup", "--print"]);
        assert_eq!(code, 0, "{err}");
        self.pg.psql(&sql);
        sql
    }
}

fn skusync_cmd(args: &[&str], cfg: &Path) -> (i32, String, String) {
    let out = Command::new(skusync_bin())
        .args(args)
        .arg("--config")
        .arg(cfg)
        .env_remove("RUST_LOG")
        .env_remove("SKUSYNC_USER_KEY")
        .output()
        .expect("run skusync");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts `check` fails and prints a FAIL line containing `problem` and the `fix` text.
fn assert_check_fails(rig: &Rig, problem: &str, fix: &str) {
    let (code, out) = rig.check();
    eprintln!("{out}");
    assert_eq!(code, 1, "check should fail:\n{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains(problem)),
        "no FAIL line with {problem:?}:\n{out}"
    );
    assert!(out.contains(fix), "fix {fix:?} missing:\n{out}");
}

/// A role `app` that may log in (trust auth), with the given attributes.
fn create_app_role(pg: &PgServer, attrs: &str) {
    pg.psql(&format!("CREATE ROLE app LOGIN {attrs};"));
}

#[test]
fn check_passes_on_a_good_setup_made_with_the_printed_sql() {
    let mut rig = Rig::new(PgOptions::default());
    let mqtt = MosquittoServer::start_with(MqttOptions {
        users: vec![("skusync".into(), "pw-skusync".into())],
        ..Default::default()
    });
    rig.pg_user = "app".into();
    rig.extra = format!(
        "\n[mqtt]\nurl = \"mqtt://skusync:pw-skusync@127.0.0.1:{}\"\n",
        mqtt.port()
    );
    let (_, sql, _) = rig.skusync(&["setup", "--print"]);
    // the DBA uncomments the least-privilege role section
    let sql: String = sql
        .lines()
        .map(|l| {
            l.strip_prefix("-- ")
                .filter(|r| r.starts_with("CREATE ROLE") || r.starts_with("GRANT"))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        sql.contains("CREATE ROLE app LOGIN REPLICATION PASSWORD"),
        "{sql}"
    );
    assert!(
        sql.contains("GRANT USAGE ON SCHEMA public TO app;"),
        "{sql}"
    );
    assert!(
        sql.contains("GRANT SELECT ON public.inventory, public.activity_log TO app;"),
        "{sql}"
    );
    rig.pg.psql(&sql);
    let (code, out) = rig.check();
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let (summary, checks) = lines.split_last().expect("output");
    assert!(summary.starts_with("ready: 0 failed, 0 warnings"), "{out}");
    for l in checks {
        assert!(l.starts_with("ok   "), "not ok: {l}\n{out}");
    }
    for c in [
        "postgres connection",
        "wal_level",
        "max_replication_slots",
        "max_wal_senders",
        "can replicate",
        "may SELECT public.inventory",
        "mapping public.activity_log",
        "publication skusync_activity exists",
        "publication covers public.inventory",
        "slot skusync",
        "redis connection",
        "redis persistence",
        "mqtt connection",
        "mqtt anonymous clients refused",
    ] {
        assert!(out.contains(c), "no {c:?} check:\n{out}");
    }
}

/// One publication for stock and activity tables with every action (a DBA's existing
/// `FOR ALL TABLES`, say) works for `run`: `check` warns and prints the two-publication
/// SQL instead of failing.
#[test]
fn check_warns_but_passes_for_one_publication_carrying_stock_and_activity_tables() {
    let rig = Rig::new(PgOptions::default());
    rig.pg
        .psql("CREATE PUBLICATION skusync FOR TABLE inventory, activity_log;");
    let cfg = rig.config();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "publication = [\"skusync\", \"skusync_activity\"]",
        "publication = \"skusync\"",
    );
    std::fs::write(&cfg, text).unwrap();
    let (code, out, err) = skusync_cmd(&["check"], &cfg);
    assert_eq!(code, 0, "a warning, not a failure:\n{out}{err}");
    assert!(out.contains("WARN publications"), "{out}");
    assert!(
        out.contains("CREATE PUBLICATION skusync_activity FOR TABLE public.activity_log WITH (publish = 'insert');"),
        "{out}"
    );
    assert!(
        out.contains("ok   publication covers public.activity_log"),
        "{out}"
    );
}

#[test]
fn check_fails_with_wal_level_replica() {
    let rig = Rig::new(PgOptions {
        extra_conf: vec!["wal_level = replica".into()],
        ..Default::default()
    });
    rig.setup_by_print();
    assert_check_fails(&rig, "wal_level", "ALTER SYSTEM SET wal_level = logical;");
}

#[test]
fn check_fails_for_a_role_without_replication() {
    let mut rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    create_app_role(&rig.pg, "");
    rig.pg
        .psql("GRANT SELECT ON public.inventory, public.activity_log TO app;");
    rig.pg_user = "app".into();
    assert_check_fails(&rig, "postgres role app", "ALTER ROLE app REPLICATION;");
}

#[test]
fn check_fails_for_a_missing_select_grant() {
    let mut rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    create_app_role(&rig.pg, "REPLICATION");
    rig.pg.psql("GRANT SELECT ON public.activity_log TO app;");
    rig.pg_user = "app".into();
    assert_check_fails(
        &rig,
        "may SELECT public.inventory",
        "GRANT SELECT ON public.inventory TO app;",
    );
}

#[test]
fn check_fails_for_a_missing_publication_and_prints_the_create_statement() {
    let rig = Rig::new(PgOptions::default());
    rig.pg
        .psql("CREATE PUBLICATION skusync FOR TABLE inventory;");
    assert_check_fails(
        &rig,
        "publication skusync_activity",
        "CREATE PUBLICATION skusync_activity FOR TABLE public.activity_log WITH (publish = 'insert');",
    );
}

#[test]
fn check_fails_for_a_mapped_table_not_in_the_publication() {
    let rig = Rig::new(PgOptions::default());
    rig.pg.psql(
        "CREATE PUBLICATION skusync;\n\
         CREATE PUBLICATION skusync_activity FOR TABLE activity_log WITH (publish = 'insert');",
    );
    assert_check_fails(
        &rig,
        "publication covers public.inventory",
        "ALTER PUBLICATION skusync ADD TABLE public.inventory;",
    );
}

/// `skusync run` until it exits (killed after `timeout`): (exit code, stderr).
fn run_until_exit(rig: &Rig, timeout: Duration) -> (Option<i32>, String) {
    let cfg = rig.config();
    let mut proc = SkusyncProc::spawn(
        &["run", "--config", cfg.to_str().expect("utf-8")],
        rig.dir.path(),
    );
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(Some(st)) = proc.child.try_wait() {
            return (st.code(), proc.stderr());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (
        proc.signal_and_wait("KILL", Duration::from_secs(5))
            .map(|_| -1),
        proc.stderr(),
    )
}

/// `run` stops with exit code 2 and an error containing `want`, before it made a slot
/// or wrote Redis.
fn assert_run_refuses(rig: &Rig, want: &str) {
    let (code, err) = run_until_exit(rig, Duration::from_secs(20));
    assert_eq!(code, Some(2), "run should refuse:\n{err}");
    assert!(err.contains(want), "{want:?} missing:\n{err}");
    assert_eq!(
        rig.pg
            .psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'skusync'"),
        "0"
    );
    assert_eq!(rig.redis.cli(&["EXISTS", "skusync:meta"]), "0");
}

#[test]
fn a_stock_table_in_an_insert_only_publication_fails_check_and_stops_run() {
    let rig = Rig::new(PgOptions::default());
    rig.pg.psql(
        "CREATE PUBLICATION skusync FOR TABLE inventory WITH (publish = 'insert');\n\
         CREATE PUBLICATION skusync_activity FOR TABLE activity_log WITH (publish = 'insert');",
    );
    let fix = "ALTER PUBLICATION skusync SET (publish = 'insert, update, delete, truncate');";
    assert_check_fails(&rig, "publication covers public.inventory", fix);
    // run would never see an UPDATE or DELETE: it must not start
    assert_run_refuses(&rig, fix);
    // setup mends the actions it needs, and run then streams
    let (code, out, err) = rig.skusync(&["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("publication skusync exists: now publishes insert, update, delete, truncate"),
        "{out}"
    );
    let (code, out) = rig.check();
    assert_eq!(code, 0, "{out}");
}

/// A text literal compares with the text PostgreSQL prints: one the column's type prints
/// otherwise (an upper-case uuid) or cannot read (an enum label that does not exist)
/// could never equal a value, so `check` fails naming the item and the printed form, and
/// `run` refuses to start; a `citext` column, whose `=` ignores case, gets a warning.
#[test]
fn a_filter_literal_the_column_type_prints_otherwise_fails_check_and_stops_run() {
    let mut rig = Rig::new(PgOptions::default());
    rig.pg.psql(
        "CREATE EXTENSION citext;
         CREATE TYPE stock_usage AS ENUM ('sale', 'internal');
         CREATE DOMAIN site AS uuid;
         ALTER TABLE inventory ADD COLUMN warehouse site, ADD COLUMN usage stock_usage,
           ADD COLUMN state citext, ADD COLUMN bin char(4), ADD COLUMN counted_at timestamptz,
           ADD COLUMN ip inet;
         -- the role's sessions print times in Berlin; skusync's pin UTC, as the stream does
         ALTER DATABASE postgres SET timezone TO 'Europe/Berlin';",
    );
    rig.setup_by_print();
    rig.inventory_extra =
        "where = [\"bin = 'B1'\", \"warehouse <> '5C0E2F6A-8B1D-4E7C-9A3B-2D4F6E8A0C1B'\"]\n"
            .into();
    assert_check_fails(
        &rig,
        "inventory[0].where[1] against the column's type",
        "write it as '5c0e2f6a-8b1d-4e7c-9a3b-2d4f6e8a0c1b' in inventory[0].where[1]",
    );
    assert_run_refuses(
        &rig,
        "inventory[0].where[1]: public.inventory.warehouse is site",
    );
    rig.inventory_extra = "where = [\"usage IN ('sale', 'transit')\"]\n".into();
    assert_check_fails(
        &rig,
        "'transit' is no value of public.inventory.usage",
        "inventory[0].where[0]",
    );
    assert_run_refuses(&rig, "invalid input value for enum stock_usage");
    // an inet's text cast adds the mask its replicated value lacks
    rig.inventory_extra = "where = [\"ip = '10.0.0.1'\"]\n".into();
    assert_check_fails(
        &rig,
        "whose text cast adds a mask",
        "publication row filter",
    );
    // the printed forms pass (a time as the stream prints it: UTC); the citext
    // comparison warns
    rig.inventory_extra = "where = [\"warehouse <> '5c0e2f6a-8b1d-4e7c-9a3b-2d4f6e8a0c1b'\", \
                           \"usage IN ('sale')\", \"state = 'active'\", \"bin = 'B1'\", \
                           \"counted_at <> '2025-01-01 00:00:00+00'\"]\n"
        .into();
    let (code, out) = rig.check();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("WARN")
            && l.contains("inventory[0].where[2]")
            && l.contains("ignores case")),
        "{out}"
    );
    assert!(
        !out.contains("where[0] against") && !out.contains("where[3]"),
        "{out}"
    );
}

const PARTITIONED: &str = "
DROP TABLE inventory;
CREATE TABLE inventory (
  sku text NOT NULL, location text NOT NULL, on_hand int NOT NULL, reserved int NOT NULL DEFAULT 0,
  PRIMARY KEY (sku, location)) PARTITION BY LIST (location);
CREATE TABLE inventory_main PARTITION OF inventory FOR VALUES IN ('main');
CREATE TABLE inventory_east PARTITION OF inventory FOR VALUES IN ('east');
CREATE PUBLICATION skusync_activity FOR TABLE activity_log WITH (publish = 'insert');
";

#[test]
fn a_partitioned_stock_table_with_a_partition_left_out_fails_check_and_stops_run() {
    let rig = Rig::new(PgOptions::default());
    rig.pg.psql(PARTITIONED);
    // the DBA published the partition that exists today; a later one is left out
    rig.pg
        .psql("CREATE PUBLICATION skusync FOR TABLE inventory_main;");
    let fix = "ALTER PUBLICATION skusync ADD TABLE public.inventory;";
    assert_check_fails(
        &rig,
        "partitions of public.inventory are in none of the publications skusync, skusync_activity: public.inventory_east",
        fix,
    );
    assert_run_refuses(&rig, "public.inventory_east");
    rig.pg.psql(fix);
    let (code, out) = rig.check();
    assert_eq!(code, 0, "{out}");
}

/// A column list set on the partitions of a mapped partitioned table (published one by
/// one) is checked against the mapped table's columns.
#[test]
fn a_column_list_on_partitions_leaving_out_a_mapped_column_fails_check() {
    let rig = Rig::new(PgOptions::default());
    rig.pg.psql(PARTITIONED);
    rig.pg.psql(
        "CREATE PUBLICATION skusync FOR TABLE inventory_main (sku, location, on_hand), \
         inventory_east (sku, location, on_hand);",
    );
    assert_check_fails(
        &rig,
        "publication skusync publishes the mapped columns of public.inventory_main: its column list leaves out reserved",
        "ALTER PUBLICATION skusync DROP TABLE public.inventory_main;",
    );
}

#[test]
fn row_filters_on_partitions_of_a_stock_table_fail_check_and_stop_run() {
    let rig = Rig::new(PgOptions::default());
    rig.pg.psql(PARTITIONED);
    rig.pg.psql(
        "CREATE PUBLICATION skusync FOR TABLE inventory_main WHERE (on_hand > 0), inventory_east;",
    );
    assert_check_fails(
        &rig,
        "partitions of public.inventory carry publication row filters of their own (public.inventory_main)",
        "publish_via_partition_root = true",
    );
    assert_run_refuses(&rig, "row filters of their own");
}

#[test]
fn a_slot_of_the_same_name_in_another_database_stops_run() {
    let rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    rig.pg.create_db("other");
    rig.pg.psql_db(
        "other",
        "SELECT 1 FROM pg_create_logical_replication_slot('skusync', 'pgoutput');",
    );
    let (code, err) = run_until_exit(&rig, Duration::from_secs(20));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("belongs to database \"other\", not \"postgres\""),
        "{err}"
    );
    assert_eq!(rig.redis.cli(&["EXISTS", "skusync:meta"]), "0");
}

#[test]
fn check_fails_for_a_wrong_column_name() {
    let mut rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    rig.sku_column = "sku_code".into();
    assert_check_fails(
        &rig,
        "mapping public.inventory",
        "mapped column public.inventory.sku_code (config key sku)",
    );
}

#[test]
fn check_accepts_a_surrogate_key_and_fails_a_table_without_any_key() {
    let rig = Rig::new(PgOptions::default());
    rig.pg.psql(
        "DROP TABLE inventory;\n\
         CREATE TABLE inventory (id serial PRIMARY KEY, sku text, location text, on_hand int, reserved int);",
    );
    rig.setup_by_print();
    // the row index attributes key-only deletes: no REPLICA IDENTITY FULL needed
    let (_, out) = rig.check();
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("mapping public.inventory")),
        "{out}"
    );
    rig.pg
        .psql("ALTER TABLE inventory DROP CONSTRAINT inventory_pkey;");
    assert_check_fails(
        &rig,
        "mapping public.inventory",
        "ALTER TABLE public.inventory REPLICA IDENTITY FULL;",
    );
}

#[test]
fn check_fails_for_an_unreachable_redis() {
    let mut rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    rig.redis_url = format!("redis://127.0.0.1:{}/0", free_port());
    assert_check_fails(&rig, "redis connection: redis.url", "");
}

#[test]
fn check_fails_for_a_wrong_postgres_password_without_echoing_it() {
    let mut rig = Rig::new(PgOptions {
        hba: Some(vec![
            "host all all 127.0.0.1/32 scram-sha-256".into(),
            "host replication all 127.0.0.1/32 scram-sha-256".into(),
        ]),
        password_encryption: Some(PasswordEncryption::ScramSha256),
        ..Default::default()
    });
    rig.pg
        .psql("CREATE ROLE app LOGIN REPLICATION PASSWORD 'right-pw';");
    rig.pg_user = "app:hunter2wrong".into();
    assert_check_fails(
        &rig,
        "postgres connection: postgres.url: authentication",
        "SKUSYNC_PG_PASSWORD",
    );
    let (_, out) = rig.check();
    assert!(!out.contains("hunter2wrong"), "password echoed:\n{out}");
    // the server does not say whether the role exists: the CREATE ROLE is offered too
    assert!(
        out.contains("-- if role app does not exist yet:\n     CREATE ROLE app LOGIN REPLICATION"),
        "{out}"
    );
}

#[test]
fn check_warns_about_unbounded_wal_and_a_volatile_redis() {
    let rig = Rig::new(PgOptions {
        extra_conf: vec!["max_slot_wal_keep_size = -1".into()],
        ..Default::default()
    });
    rig.setup_by_print();
    rig.redis.cli(&["CONFIG", "SET", "appendonly", "no"]);
    rig.redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let (code, out) = rig.check();
    assert_eq!(code, 0, "warnings do not fail:\n{out}");
    for fix in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf();",
        "CONFIG SET maxmemory-policy noeviction",
        "CONFIG SET appendonly yes",
    ] {
        assert!(out.contains(fix), "{fix:?} missing:\n{out}");
    }
    assert_eq!(
        out.lines().filter(|l| l.starts_with("WARN")).count(),
        3,
        "{out}"
    );
}

#[test]
fn unknown_config_key_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        dir.path(),
        "[postgres]\nurl = \"postgresql://u@127.0.0.1:1/d\"\nslott = \"x\"\n",
    );
    for cmd in ["check", "status", "setup", "drop-slot"] {
        let (code, _, err) = skusync_cmd(&[cmd], &cfg);
        assert_eq!(code, 2, "{cmd}: {err}");
        assert!(err.contains("slott"), "{cmd}: {err}");
    }
}

#[test]
fn setup_requires_a_second_publication_for_activity_tables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        dir.path(),
        "[postgres]\nurl = \"postgresql://u@127.0.0.1:1/d\"\n\
         [[activity]]\ntable = \"public.log\"\nsku = \"sku\"\nkind = \"kind\"\n\
         [activity.counters]\nview = \"views\"\n",
    );
    let (code, _, err) = skusync_cmd(&["setup", "--print"], &cfg);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("publication = [\"skusync\", \"skusync_activity\"]"),
        "{err}"
    );
}

#[test]
fn setup_creates_publications_adds_missing_tables_and_is_idempotent() {
    let rig = Rig::new(PgOptions::default());
    // a DBA already made the stock publication, empty
    rig.pg.psql("CREATE PUBLICATION skusync;");
    let (code, out, err) = rig.skusync(&["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("publication skusync exists: added public.inventory"),
        "{out}"
    );
    assert!(
        out.contains("created publication skusync_activity"),
        "{out}"
    );
    let (code, out, err) = rig.skusync(&["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("publication skusync exists: up to date"),
        "{out}"
    );
    assert!(
        out.contains("publication skusync_activity exists: up to date"),
        "{out}"
    );
    assert_eq!(
        rig.pg.psql(
            "SELECT string_agg(pubname || ':' || tablename, ',' ORDER BY pubname) FROM pg_publication_tables"
        ),
        "skusync:inventory,skusync_activity:activity_log"
    );
    assert_eq!(
        rig.pg.psql(
            "SELECT pubinsert, pubupdate FROM pg_publication WHERE pubname = 'skusync_activity'"
        ),
        "t|f"
    );
    let (code, out) = rig.check();
    assert_eq!(code, 0, "{out}");
}

/// Wait until the daemon finished its bootstrap (meta `bootstrap` = done).
/// `skusync run` started and past its bootstrap.
fn run_bootstrapped(rig: &Rig) -> SkusyncProc {
    let cfg = rig.config();
    let mut proc = SkusyncProc::spawn(
        &["run", "--config", cfg.to_str().expect("utf-8")],
        rig.dir.path(),
    );
    wait_bootstrap(rig, &mut proc);
    proc
}

/// Wait for a running `skusync run` to exit on its own: its exit code and stderr.
fn wait_exit(proc: &mut SkusyncProc, timeout: Duration) -> (Option<i32>, String) {
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = proc.child.try_wait() {
            return (st.code(), proc.stderr());
        }
        assert!(
            start.elapsed() < timeout,
            "run did not stop:\n{}",
            proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_bootstrap(rig: &Rig, proc: &mut SkusyncProc) {
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = proc.child.try_wait() {
            panic!("skusync run exited ({st}):\n{}", proc.stderr());
        }
        if rig.redis.cli(&["HGET", "skusync:meta", "bootstrap"]) == "done" {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no bootstrap:\n{}",
            proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn status_json_reports_slot_lag_and_redis_progress() {
    let rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    // before run: no slot -> exit 1
    let (code, out, err) = rig.skusync(&["status", "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["slot_exists"], false);

    let mut proc = run_bootstrapped(&rig);
    rig.pg
        .psql("INSERT INTO inventory VALUES ('B-2', 'main', 5, 0);");
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = rig.skusync(&["status", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    for f in [
        "slot",
        "slot_exists",
        "active_pid",
        "confirmed_lsn",
        "lag_bytes",
        "lag_seconds",
        "wal_status",
        "applied_lsn",
        "bootstrap",
        "last_publish",
        "ok",
    ] {
        assert!(v.get(f).is_some(), "no {f}: {v}");
    }
    assert_eq!(v["slot"], "skusync");
    assert_eq!(v["slot_exists"], true);
    assert!(v["active_pid"].is_i64(), "{v}");
    assert!(
        v["confirmed_lsn"].as_str().is_some_and(|s| s.contains('/')),
        "{v}"
    );
    assert!(v["lag_bytes"].is_i64(), "{v}");
    assert_eq!(v["bootstrap"], "done");
    assert!(
        v["applied_lsn"].as_str().is_some_and(|s| s.contains('/')),
        "{v}"
    );
    assert_eq!(v["ok"], true);
    // text form
    let (code, out, _) = rig.skusync(&["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("confirmed lsn:"), "{out}");
    // a lag bound of zero bytes trips once there is unconfirmed WAL
    rig.redis
        .cli(&["HSET", "skusync:meta", "last_publish_ms", "1764057600123"]);
    proc.signal_and_wait("KILL", Duration::from_secs(10));
    rig.pg
        .psql("INSERT INTO inventory VALUES ('C-3', 'main', 1, 0);");
    let (code, out, _) = rig.skusync(&["status", "--json", "--max-lag-bytes", "0"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["last_publish"], "2025-11-25T08:00:00.123Z");
    assert!(v["lag_seconds"].is_null(), "{v}");
}

#[test]
fn drop_slot_removes_the_slot_and_setup_publications_but_keeps_a_hand_made_one() {
    let rig = Rig::new(PgOptions::default());
    // the DBA made the stock publication by hand; setup makes the activity one
    rig.pg
        .psql("CREATE PUBLICATION skusync FOR TABLE inventory;");
    let (code, out, err) = rig.skusync(&["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut proc = run_bootstrapped(&rig);
    // bootstrap=done is written before START_REPLICATION: wait for the walsender
    let active = crate::harness::wait_until(Duration::from_secs(20), || {
        rig.pg
            .psql("SELECT count(*) FROM pg_replication_slots WHERE active")
            == "1"
    });
    assert!(active, "slot never active:\n{}", proc.stderr());
    // a frozen daemon keeps its walsender (and the slot) busy
    crate::harness::signal(proc.pid(), "STOP");
    let (code, out, err) = rig.skusync(&["drop-slot"]);
    crate::harness::signal(proc.pid(), "CONT");
    let _ = proc.child.kill();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("terminated walsender pid"), "{out}");
    assert!(out.contains("dropped replication slot skusync"), "{out}");
    assert!(
        out.contains("dropped publication skusync_activity"),
        "{out}"
    );
    assert!(out.contains("kept publication skusync"), "{out}");
    let _ = proc.child.wait();
    assert_eq!(
        rig.pg.psql("SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    assert_eq!(
        rig.pg
            .psql("SELECT string_agg(pubname, ',') FROM pg_publication"),
        "skusync"
    );
    // idempotent
    let (code, out, err) = rig.skusync(&["drop-slot"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("replication slot skusync does not exist"),
        "{out}"
    );
    assert!(
        out.contains("publication skusync_activity does not exist"),
        "{out}"
    );
}

/// Schemas, tables, columns and publications named with reserved words, upper case and
/// non-ASCII letters.
const AWKWARD_SCHEMA: &str = r#"
CREATE SCHEMA "union";
CREATE TABLE "union"."case" (
  "order" text NOT NULL, "select" text NOT NULL, "window" int NOT NULL, "desc" int NOT NULL DEFAULT 0,
  PRIMARY KEY ("order", "select"));
CREATE SCHEMA "Lager";
CREATE TABLE "Lager"."Aktivität" (
  id bigserial PRIMARY KEY, "Artikel" text, "größe" text NOT NULL, "user" numeric);
INSERT INTO "union"."case" VALUES ('A-1', 'main', 10, 2);
"#;

#[test]
fn setup_print_quotes_reserved_upper_case_and_unicode_names_and_the_daemon_streams_them() {
    let rig = Rig::new(PgOptions::default());
    rig.pg.psql(AWKWARD_SCHEMA);
    let text = format!(
        "[postgres]\nurl = \"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable\"\n\
         slot = \"select\"\npublication = [\"desc\", \"Order ü\"]\nstatus_interval_ms = 200\n\n\
         [redis]\nurl = \"{redis}\"\n\n\
         [[inventory]]\ntable = \"union.case\"\nsku = \"order\"\nlocation = \"select\"\n\
         on_hand = \"window\"\nreserved = \"desc\"\n\n\
         [[activity]]\ntable = \"Lager.Aktivität\"\nsku = \"Artikel\"\nkind = \"größe\"\nquantity = \"user\"\n\
         [activity.counters]\nview = \"views\"\n",
        port = rig.pg.port(),
        redis = rig.redis_url,
    );
    let cfg = write_config(rig.dir.path(), &text);
    let (code, sql, err) = skusync_cmd(&["setup", "--print"], &cfg);
    assert_eq!(code, 0, "{err}");
    for want in [
        "CREATE PUBLICATION \"desc\" FOR TABLE \"union\".\"case\" WITH",
        "CREATE PUBLICATION \"Order ü\" FOR TABLE \"Lager\".\"Aktivität\" WITH",
        // the superuser the config logs in as is not proposed as skusync's role
        "GRANT USAGE ON SCHEMA \"Lager\" TO skusync;",
    ] {
        assert!(sql.contains(want), "{want:?} missing:\n{sql}");
    }
    // what a DBA runs: psql with ON_ERROR_STOP (the harness's psql stops on errors)
    rig.pg.psql(&sql);
    assert_eq!(
        rig.pg.psql(
            "SELECT string_agg(pubname || ':' || schemaname || '.' || tablename, ',' ORDER BY pubname) \
             FROM pg_publication_tables"
        ),
        "Order ü:Lager.Aktivität,desc:union.case"
    );
    let (code, out, err) = skusync_cmd(&["check"], &cfg);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ready: 0 failed"), "{out}");

    let mut proc = SkusyncProc::spawn(
        &["run", "--config", cfg.to_str().expect("utf-8")],
        rig.dir.path(),
    );
    wait_bootstrap(&rig, &mut proc);
    assert_eq!(rig.redis.cli(&["HGET", "skusync:{A-1}", "on_hand"]), "10");
    rig.pg.psql(
        "INSERT INTO \"union\".\"case\" VALUES ('B-2', 'main', 5, 1);\n\
         INSERT INTO \"Lager\".\"Aktivität\" (\"Artikel\", \"größe\", \"user\") VALUES ('B-2', 'view', 1);",
    );
    let start = Instant::now();
    while rig.redis.cli(&["HGET", "skusync:{B-2}", "views"]) != "1"
        || rig.redis.cli(&["HGET", "skusync:{B-2}", "on_hand"]) != "5"
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "changes did not reach Redis:\n{}",
            proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    proc.signal_and_wait("TERM", Duration::from_secs(20));
}

#[test]
fn keyword_list_covers_the_servers() {
    let pg = PgServer::start();
    let words = pg.psql("SELECT word FROM pg_get_keywords() ORDER BY word");
    let missing: Vec<&str> = words
        .lines()
        .filter(|w| skusync::pg::ident::KEYWORDS.binary_search(w).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "keywords of this server missing from pg::ident::KEYWORDS: {missing:?}"
    );
    assert_eq!(skusync::pg::ident::quote_ident("union"), "\"union\"");
}

#[test]
fn check_warns_when_the_broker_lets_anonymous_clients_take_skusyncs_client_id() {
    let mut rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    // skusync has its own account, but the broker also lets anyone in
    let mqtt = MosquittoServer::start();
    rig.extra = format!(
        "\n[mqtt]\nurl = \"mqtt://skusync:pw@127.0.0.1:{}\"\n",
        mqtt.port()
    );
    let (code, out) = rig.check();
    assert_eq!(code, 0, "a warning does not fail:\n{out}");
    assert!(
        out.lines().any(|l| l.starts_with("WARN mqtt client id")
            && l.contains("\"skusync\"")
            && l.contains("without a password")),
        "{out}"
    );
    assert!(out.contains("allow_anonymous false"), "{out}");
    assert!(
        !out.contains("mqtt transport"),
        "loopback is not in clear:\n{out}"
    );
}

#[test]
fn check_fails_for_a_publication_column_list_that_leaves_out_a_mapped_column() {
    let rig = Rig::new(PgOptions::default());
    rig.pg.psql(
        "CREATE PUBLICATION skusync FOR TABLE inventory (sku, location, on_hand);\n\
         CREATE PUBLICATION skusync_activity FOR TABLE activity_log WITH (publish = 'insert');",
    );
    assert_check_fails(
        &rig,
        "publication skusync publishes the mapped columns of public.inventory",
        "ALTER PUBLICATION skusync DROP TABLE public.inventory; ALTER PUBLICATION skusync ADD TABLE public.inventory;",
    );
    let (_, out) = rig.check();
    assert!(
        out.contains("leaves out reserved,") || out.contains("leaves out reserved "),
        "{out}"
    );
}

/// `setup --print` as the superuser on a database where the publications partly exist:
/// it proposes a `skusync` role, names what exists, adds only what is missing, and the
/// SQL runs as printed.
#[test]
fn setup_print_proposes_a_skusync_role_and_names_the_publications_that_exist() {
    let rig = Rig::new(PgOptions::default());
    rig.pg.psql(
        "CREATE PUBLICATION skusync FOR TABLE inventory;\n\
         CREATE PUBLICATION skusync_activity WITH (publish = 'insert');",
    );
    let (code, sql, err) = rig.skusync(&["setup", "--print"]);
    assert_eq!(code, 0, "{err}");
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
    assert!(
        !sql.contains("ROLE postgres") && !sql.contains("TO postgres"),
        "{sql}"
    );
    // the DBA creates the proposed role too, and skusync logs in as it
    let sql: String = sql
        .lines()
        .map(|l| {
            l.strip_prefix("-- ")
                .filter(|r| r.starts_with("CREATE ROLE") || r.starts_with("GRANT"))
                .map(|r| r.replace("PASSWORD '...'", ""))
                .unwrap_or_else(|| l.to_string())
        })
        .collect::<Vec<_>>()
        .join("\n");
    rig.pg.psql(&sql);
    let cfg = rig.config();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("postgresql://postgres@", "postgresql://skusync@");
    std::fs::write(&cfg, text).unwrap();
    let (code, out, err) = skusync_cmd(&["check"], &cfg);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok   postgres role skusync can replicate"),
        "{out}"
    );
    // now the configured role exists and is no superuser: its grants, no CREATE
    let (code, sql, err) = skusync_cmd(&["setup", "--print"], &cfg);
    assert_eq!(code, 0, "{err}");
    assert!(sql.contains("-- role skusync exists\n"), "{sql}");
    assert!(
        !sql.contains("CREATE ROLE") && !sql.contains("ALTER ROLE"),
        "{sql}"
    );
    assert!(
        sql.contains("-- publication skusync_activity exists and contains public.activity_log"),
        "{sql}"
    );
}

/// A role that does not exist is a `CREATE ROLE` with its grants, not a password to set.
#[test]
fn check_suggests_creating_a_role_that_does_not_exist() {
    let mut rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    rig.pg_user = "app".into();
    assert_check_fails(
        &rig,
        "postgres connection: postgres.url: authentication as \"app\" failed: role \"app\" does not exist",
        "CREATE ROLE app LOGIN REPLICATION PASSWORD '...';",
    );
    let (_, out) = rig.check();
    for want in [
        "GRANT USAGE ON SCHEMA public TO app;",
        "GRANT SELECT ON public.inventory, public.activity_log TO app;",
        "pg_hba.conf",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(!out.contains("set the password"), "{out}");
}

/// With `user = ...` mapped and no HMAC key set, only `run` (and `resync`) refuse to
/// start; `check` reports the key as one FAIL among its other checks, `status`,
/// `setup --print` and `tail` work (tail hides the user column).
#[test]
fn only_run_needs_the_hmac_key_of_a_mapped_user_column() {
    let rig = Rig::new(PgOptions::default());
    rig.pg
        .psql("ALTER TABLE activity_log ADD COLUMN user_id text");
    rig.setup_by_print();
    let cfg = rig.config();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("windows = [", "user = \"user_id\"\nwindows = [");
    std::fs::write(&cfg, text).unwrap();
    let missing = "activity[0].user: mapping a user column needs an HMAC key";

    let (code, out, err) = skusync_cmd(&["check"], &cfg);
    assert_eq!(code, 1, "{out}{err}");
    let fails: Vec<&str> = out.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fails.len(), 1, "{out}");
    assert!(
        fails[0].starts_with("FAIL activity[0].user HMAC key") && fails[0].contains(missing),
        "{out}"
    );
    assert!(out.contains("export SKUSYNC_USER_KEY="), "{out}");
    for other in [
        "ok   postgres connection",
        "ok   mapping public.activity_log",
        "ok   redis connection",
    ] {
        assert!(
            out.contains(other),
            "the other checks run too: {other:?}\n{out}"
        );
    }

    let (code, out, err) = skusync_cmd(&["status"], &cfg);
    assert_eq!(code, 1, "no slot yet is 1, not a config error:\n{out}{err}");
    let (code, _, err) = skusync_cmd(&["setup", "--print"], &cfg);
    assert_eq!(code, 0, "{err}");

    let (code, _, err) = skusync_cmd(&["run"], &cfg);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(missing) && err.contains("SKUSYNC_USER_KEY"),
        "{err}"
    );
    let (code, _, err) = skusync_cmd(&["resync"], &cfg);
    assert_eq!(code, 2, "{err}");

    let cfg_arg = cfg.to_str().expect("utf-8");
    let mut tail = SkusyncProc::spawn_env(
        &["tail", "--config", cfg_arg],
        rig.dir.path(),
        &[("SKUSYNC_USER_KEY", "")],
    );
    let ready = crate::harness::wait_until(Duration::from_secs(20), || {
        rig.pg.psql(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'skusync_tail_%' AND active",
        ) == "1"
    });
    assert!(ready, "tail started: {}", tail.stderr());
    rig.pg.psql(
        "INSERT INTO activity_log (sku, kind, user_id) VALUES ('A-1', 'view', 'alice@example.com')",
    );
    let line = tail
        .next_line(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("tail output: {}", tail.stderr()));
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(v["new"]["user_id"], skusync::tail::HIDDEN_USER, "{line}");
    assert!(!line.contains("alice"), "{line}");
    assert!(
        tail.stderr().contains("activity[0].user: no HMAC key"),
        "{}",
        tail.stderr()
    );
    assert_eq!(
        tail.signal_and_wait("INT", Duration::from_secs(10)),
        Some(0)
    );

    // with a key, check is ready
    let out = Command::new(skusync_bin())
        .args(["check", "--config", cfg_arg])
        .env("SKUSYNC_USER_KEY", "0123456789abcdef0123456789abcdef")
        .output()
        .expect("run skusync");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("ok   activity[0].user HMAC key"), "{text}");
}

#[test]
fn setup_refuses_to_publish_a_table_without_a_replica_identity() {
    let rig = Rig::new(PgOptions::default());
    rig.pg
        .psql("ALTER TABLE inventory DROP CONSTRAINT inventory_pkey;");
    let (code, out, err) = rig.skusync(&["setup"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("public.inventory has no replica identity")
            && err.contains("ALTER TABLE public.inventory ADD PRIMARY KEY"),
        "{err}"
    );
    // nothing published it, so the application's writes still work
    assert_eq!(
        rig.pg
            .psql("SELECT count(*) FROM pg_publication_tables WHERE tablename = 'inventory'"),
        "0"
    );
    rig.pg
        .psql("UPDATE inventory SET on_hand = 11 WHERE sku = 'A-1';");
}

#[test]
fn a_publication_made_again_after_the_slots_position_stops_run_saying_how_to_rebuild() {
    let rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    let mut proc = run_bootstrapped(&rig);
    assert_eq!(
        proc.signal_and_wait("TERM", Duration::from_secs(30)),
        Some(0)
    );
    // the publication dropped, a change the slot has not passed, the publication made
    // again: it does not exist as of that change
    rig.pg.psql(
        "DROP PUBLICATION skusync_activity;\n\
         INSERT INTO inventory VALUES ('B-2', 'main', 5, 0);\n\
         CREATE PUBLICATION skusync_activity FOR TABLE activity_log WITH (publish = 'insert');",
    );
    let (code, err) = run_until_exit(&rig, Duration::from_secs(30));
    assert!(matches!(code, Some(c) if c > 0), "{code:?}\n{err}");
    assert!(
        err.contains("PostgreSQL before 18 reads publications as they were")
            && err.contains("SELECT pg_drop_replication_slot('skusync');"),
        "{err}"
    );
}

/// A publication dropped while skusync streams: the walsender fails at the next change,
/// and `run` stops saying the publication does not exist (not that it is newer than the
/// slot, which needs a rebuild).
#[test]
fn a_publication_dropped_while_streaming_stops_run_saying_it_does_not_exist() {
    let rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    let mut proc = run_bootstrapped(&rig);
    rig.pg.psql(
        "DROP PUBLICATION skusync_activity;\n\
         INSERT INTO inventory VALUES ('B-3', 'main', 5, 0);",
    );
    let (code, err) = wait_exit(&mut proc, Duration::from_secs(30));
    assert!(matches!(code, Some(c) if c > 0), "{code:?}\n{err}");
    assert!(
        err.contains("skusync_activity") && err.contains("does not exist; create it"),
        "{err}"
    );
    assert!(!err.contains("although it exists now"), "{err}");
}

/// An action dropped from a publication while skusync streams (`publish = 'insert'`):
/// the stock table's updates would never arrive, so `run` stops (exit 2) with the SQL
/// that fixes it, as at a start, within its periodic check of the publications.
#[test]
fn an_action_dropped_from_a_publication_while_streaming_stops_run() {
    let rig = Rig::new(PgOptions::default());
    rig.setup_by_print();
    let mut proc = run_bootstrapped(&rig);
    rig.pg
        .psql("ALTER PUBLICATION skusync SET (publish = 'insert');");
    let (code, err) = wait_exit(&mut proc, Duration::from_secs(40));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "ALTER PUBLICATION skusync SET (publish = 'insert, update, delete, truncate');"
        ),
        "{err}"
    );
}

#[test]
fn check_warns_when_no_slot_is_left_for_a_rebuilds_temporary_slot() {
    let mut opts = PgOptions::default();
    opts.extra_conf.push("max_replication_slots = 1".into());
    let rig = Rig::new(opts);
    rig.setup_by_print();
    let mut proc = run_bootstrapped(&rig);
    assert_eq!(
        proc.signal_and_wait("TERM", Duration::from_secs(30)),
        Some(0)
    );
    let (code, out) = rig.check();
    assert_eq!(code, 0, "warnings do not fail:\n{out}");
    assert!(
        out.lines().any(|l| l.starts_with("WARN")
            && l.contains("a rebuild of Redis needs a second, temporary slot")),
        "{out}"
    );
    assert!(
        out.contains("ALTER SYSTEM SET max_replication_slots = 3;"),
        "{out}"
    );
}

#[test]
fn setup_refuses_to_widen_a_publication_holding_a_table_without_a_replica_identity() {
    let rig = Rig::new(PgOptions::default());
    // a DBA's insert-only publication, with a keyless log table of the application in it
    rig.pg.psql(
        "CREATE TABLE audit_log (at timestamptz, note text);\n\
         CREATE PUBLICATION skusync FOR TABLE inventory, audit_log WITH (publish = 'insert');",
    );
    let (code, out, err) = rig.skusync(&["setup"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("public.audit_log has no replica identity")
            && err.contains("once it publishes them in publication skusync"),
        "{err}"
    );
    assert_eq!(
        rig.pg
            .psql("SELECT pubupdate FROM pg_publication WHERE pubname = 'skusync'"),
        "f"
    );
    rig.pg
        .psql("UPDATE audit_log SET note = 'x'; DELETE FROM audit_log;");
}

#[test]
fn status_and_check_report_a_slot_about_to_lose_wal() {
    let mut opts = PgOptions::default();
    // the smallest retention: one segment behind makes the slot unreserved
    opts.extra_conf
        .push("max_slot_wal_keep_size = '1MB'".into());
    opts.extra_conf.push("checkpoint_timeout = '1h'".into());
    opts.extra_conf.push("max_wal_size = '1GB'".into());
    let rig = Rig::new(opts);
    rig.setup_by_print();
    rig.pg
        .psql("SELECT 1 FROM pg_create_logical_replication_slot('skusync', 'pgoutput');");
    rig.pg.psql(
        "CREATE TABLE filler (x text);\n\
         INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 40000);\n\
         SELECT pg_switch_wal();",
    );
    assert_eq!(
        rig.pg
            .psql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'skusync'"),
        "unreserved"
    );
    let (code, out, err) = rig.skusync(&["status"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("is about to lose WAL (wal_status = unreserved"),
        "{out}"
    );
    let (_, out) = rig.check();
    assert!(
        out.lines()
            .any(|l| l.starts_with("WARN") && l.contains("is about to lose WAL it needs")),
        "{out}"
    );
}
