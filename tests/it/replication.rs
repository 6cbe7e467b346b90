//! The replication core against a real PostgreSQL: auth, TLS, slots, the change stream,
//! `skusync tail`, reconnects and restarts.

use crate::harness::{PasswordEncryption, PgOptions, PgServer, StopMode, TestCa};
use crate::support::*;
use skusync::lsn::Lsn;
use skusync::pg::conn::SnapshotAction;
use skusync::pg::{PgConnectConfig, PgError, ReplConnection};
use skusync::source::SourceError;
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE inventory (
  sku text NOT NULL, location text NOT NULL, on_hand int NOT NULL, reserved smallint,
  price numeric(10,2), active bool, updated_at timestamptz, batch uuid, attrs jsonb, weight float8,
  PRIMARY KEY (sku, location));
CREATE TABLE other (id int PRIMARY KEY, v text);
CREATE PUBLICATION skusync FOR TABLE inventory;
";

fn pg_with_schema() -> PgServer {
    let pg = PgServer::start();
    pg.psql(SCHEMA);
    pg
}

fn create_slot(pg: &PgServer, slot: &str) {
    pg.psql(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_delivers_typed_inserts_updates_deletes_and_truncates() {
    let pg = pg_with_schema();
    create_slot(&pg, "s1");
    let src = RunningSource::start(source_config(
        &pg.url("postgres", "postgres"),
        "s1",
        "skusync",
    ));
    pg.psql(
        "BEGIN;
         INSERT INTO inventory VALUES ('SKU/1+#', 'WH-1', 10, 2, 19.99, true, '2026-11-25 08:00:00.123+00',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"color\":\"red\"}', 1.5);
         INSERT INTO inventory VALUES ('ß-ünï', 'WH-2', 5, NULL, NULL, false, NULL, NULL, NULL, NULL);
         COMMIT;
         INSERT INTO other VALUES (1, 'not published');
         UPDATE inventory SET on_hand = 7 WHERE sku = 'SKU/1+#';
         BEGIN; INSERT INTO inventory VALUES ('rolled-back', 'WH-1', 1); ROLLBACK;
         DELETE FROM inventory WHERE sku = 'ß-ünï';
         TRUNCATE inventory;
         INSERT INTO inventory VALUES ('after', 'WH-1', 1);",
    );
    let got = src.wait_changes(5, Duration::from_secs(20)).await;
    let ops: Vec<(&str, &str)> = got
        .iter()
        .map(|s| (s.op.as_str(), s.table.as_str()))
        .collect();
    assert_eq!(
        ops,
        vec![
            ("insert", "public.inventory"),
            ("insert", "public.inventory"),
            ("update", "public.inventory"),
            ("delete", "public.inventory"),
            ("insert", "public.inventory"),
        ],
        "no rolled-back or unpublished rows: {got:#?}"
    );
    let first = &got[0].row["new"];
    assert_eq!(first["sku"], "SKU/1+#");
    assert_eq!(first["on_hand"], 10);
    assert_eq!(first["reserved"], 2);
    assert_eq!(first["price"], "19.99", "numeric stays exact text");
    assert_eq!(first["active"], true);
    assert_eq!(first["batch"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(first["attrs"]["color"], "red");
    assert_eq!(first["weight"], 1.5);
    assert!(
        first["updated_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-11-25 08:00:00.123")
    );
    assert_eq!(got[1].row["new"]["sku"], "ß-ünï");
    assert!(got[1].row["new"]["reserved"].is_null());
    assert_eq!(got[0].commit_lsn, got[1].commit_lsn, "one transaction");
    assert!(got[2].commit_lsn > got[1].commit_lsn);
    assert_eq!(got[2].row["new"]["on_hand"], 7);
    // REPLICA IDENTITY DEFAULT: a delete carries the key only.
    assert_eq!(got[3].row["old"]["sku"], "ß-ünï");
    assert_eq!(got[3].row["old"]["location"], "WH-2");
    assert!(
        src.commits.lock().unwrap().len() >= 5,
        "the truncate has its own commit"
    );
    src.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_lsn_reaches_applied_commits_and_advances_on_idle_keepalives() {
    let pg = pg_with_schema();
    create_slot(&pg, "s2");
    let src = RunningSource::start(source_config(
        &pg.url("postgres", "postgres"),
        "s2",
        "skusync",
    ));
    pg.psql("INSERT INTO inventory VALUES ('a', 'w', 1)");
    src.wait_changes(1, Duration::from_secs(20)).await;
    let end = src.commits.lock().unwrap()[0].end_lsn;
    let confirmed = || {
        pg.psql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 's2'")
            .parse::<Lsn>()
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(10), || confirmed() >= end).await,
        "slot confirmed past the commit"
    );
    // Busy unrelated tables: the slot must keep advancing past the last published commit
    // (keepalives confirmed while idle), or WAL would pile up behind it.
    let before = confirmed();
    pg.psql("INSERT INTO other SELECT g, 'x' FROM generate_series(1, 1000) g;");
    assert!(
        eventually(Duration::from_secs(30), || confirmed() > before).await,
        "idle slot advanced with keepalives past {before}"
    );
    src.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_after_walsender_is_terminated_loses_and_repeats_nothing() {
    let pg = pg_with_schema();
    create_slot(&pg, "s3");
    let src = RunningSource::start(source_config(
        &pg.url("postgres", "postgres"),
        "s3",
        "skusync",
    ));
    let mut expected = 0;
    for round in 0..5 {
        pg.psql(&format!(
            "INSERT INTO inventory SELECT 'r{round}-' || g, 'w', g FROM generate_series(1, 200) g;
             INSERT INTO inventory VALUES ('single-{round}', 'w', 1);"
        ));
        expected += 201;
        // Terminate a live walsender each round (not one still connecting).
        assert!(
            eventually(Duration::from_secs(20), || {
                pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 's3' AND active_pid IS NOT NULL") == "1"
            })
            .await,
            "the source streams again"
        );
        pg.psql(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
             WHERE slot_name = 's3' AND active_pid IS NOT NULL",
        );
    }
    let got = src.wait_changes(expected, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_after = src.changes.lock().unwrap().clone();
    assert_eq!(got_after.len(), expected, "no change delivered twice");
    let mut skus: Vec<String> = got
        .iter()
        .map(|s| s.row["new"]["sku"].as_str().unwrap().to_string())
        .collect();
    skus.sort();
    skus.dedup();
    assert_eq!(skus.len(), expected, "every change exactly once");
    assert!(
        src.sessions.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "it did reconnect"
    );
    src.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_resumes_from_the_confirmed_lsn() {
    let mut pg = pg_with_schema();
    create_slot(&pg, "s4");
    let src = RunningSource::start(source_config(
        &pg.url("postgres", "postgres"),
        "s4",
        "skusync",
    ));
    pg.psql("INSERT INTO inventory VALUES ('before', 'w', 1)");
    src.wait_changes(1, Duration::from_secs(20)).await;
    pg.restart(StopMode::Fast);
    pg.psql("INSERT INTO inventory VALUES ('after-fast', 'w', 1)");
    src.wait_changes(2, Duration::from_secs(30)).await;
    pg.restart(StopMode::Immediate);
    pg.psql("INSERT INTO inventory VALUES ('after-immediate', 'w', 1)");
    let got = src.wait_changes(3, Duration::from_secs(30)).await;
    let skus: Vec<&str> = got
        .iter()
        .map(|s| s.row["new"]["sku"].as_str().unwrap())
        .collect();
    assert_eq!(skus, vec!["before", "after-fast", "after-immediate"]);
    src.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_slot_and_missing_publication_are_definite_errors() {
    let pg = pg_with_schema();
    let src = RunningSource::start(source_config(
        &pg.url("postgres", "postgres"),
        "nope",
        "skusync",
    ));
    let err = tokio::time::timeout(Duration::from_secs(20), src.handle)
        .await
        .expect("stops by itself")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, SourceError::SlotMissing { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("pg_create_logical_replication_slot"),
        "says how to fix: {err}"
    );

    create_slot(&pg, "s5");
    let src = RunningSource::start(source_config(
        &pg.url("postgres", "postgres"),
        "s5",
        "no_such_pub",
    ));
    pg.psql("INSERT INTO inventory VALUES ('x', 'w', 1)");
    let err = tokio::time::timeout(Duration::from_secs(20), src.handle)
        .await
        .expect("stops by itself")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("no_such_pub"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_slots_with_exported_snapshots_and_reuses_them() {
    let pg = pg_with_schema();
    pg.psql("INSERT INTO inventory VALUES ('pre', 'w', 1)");
    let cfg = PgConnectConfig::from_url(&pg.url("postgres", "postgres")).unwrap();
    let mut conn = ReplConnection::connect(&cfg).await.unwrap();
    let sys = conn.identify_system().await.unwrap();
    assert!(!sys.system_id.is_empty());
    assert_eq!(sys.timeline, 1);
    let slot = conn
        .create_slot("exported", false, SnapshotAction::Export)
        .await
        .unwrap();
    let snapshot = slot.snapshot_name.clone().expect("exported snapshot");
    // The snapshot is importable from an ordinary connection while the slot's connection
    // is idle, and shows the rows before the consistent point.
    let client = pg.client("postgres").await;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}';"
        ))
        .await
        .unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM inventory", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    client.batch_execute("COMMIT").await.unwrap();
    drop(conn);
    // Creating it again is an error that names the slot; reusing it streams from it.
    let mut conn = ReplConnection::connect(&cfg).await.unwrap();
    let err = conn
        .create_slot("exported", false, SnapshotAction::Nothing)
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42710"), "{err}");
    drop(conn);
    let src = RunningSource::start(source_config(
        &pg.url("postgres", "postgres"),
        "exported",
        "skusync",
    ));
    pg.psql("INSERT INTO inventory VALUES ('post', 'w', 1)");
    let got = src.wait_changes(1, Duration::from_secs(20)).await;
    assert_eq!(
        got[0].row["new"]["sku"], "post",
        "starts at the consistent point"
    );
    assert!(got[0].commit_lsn > slot.consistent_point);
    src.stop().await.unwrap();
}

fn auth_pg() -> PgServer {
    let pg = PgServer::start_with(PgOptions {
        hba: Some(vec![
            "host all trust_user 127.0.0.1/32 trust".into(),
            "host all md5_user 127.0.0.1/32 md5".into(),
            "host all scram_user 127.0.0.1/32 scram-sha-256".into(),
            "host all clear_user 127.0.0.1/32 password".into(),
            "host all all 127.0.0.1/32 scram-sha-256".into(),
        ]),
        password_encryption: Some(PasswordEncryption::ScramSha256),
        extra_conf: vec!["log_connections = on".into()],
        ..Default::default()
    });
    pg.psql(
        "CREATE ROLE trust_user LOGIN REPLICATION;
         CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scr@m pass';
         CREATE ROLE clear_user LOGIN REPLICATION PASSWORD 'clear';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5pass';",
    );
    pg
}

async fn identify(url: &str) -> Result<(), PgError> {
    let cfg = PgConnectConfig::from_url(url)?;
    let mut conn = ReplConnection::connect(&cfg).await?;
    conn.identify_system().await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_trust_cleartext_md5_and_scram() {
    let pg = auth_pg();
    let port = pg.port();
    let url = |user: &str, pw: &str| {
        format!("postgresql://{user}:{pw}@127.0.0.1:{port}/postgres?sslmode=disable")
    };
    identify(&format!(
        "postgresql://trust_user@127.0.0.1:{port}/postgres?sslmode=disable"
    ))
    .await
    .expect("trust");
    // Cleartext and md5 over a connection with no verified server only when the URL's
    // require_auth names the method (pg_security.rs covers the refusal in detail).
    identify(&format!(
        "{}&require_auth=password",
        url("clear_user", "clear")
    ))
    .await
    .expect("cleartext");
    identify(&format!("{}&require_auth=md5", url("md5_user", "md5pass")))
        .await
        .expect("md5");
    for user in ["clear_user", "md5_user"] {
        let err = identify(&url(user, "clear")).await.unwrap_err();
        assert!(matches!(err, PgError::Auth { .. }), "{err}");
        assert!(err.to_string().contains("require_auth="), "{err}");
    }
    identify(&url("scram_user", "scr%40m%20pass"))
        .await
        .expect("scram");
    let log = pg.log_tail();
    assert!(log.contains("method=md5"), "md5 really used:\n{log}");
    assert!(log.contains("method=scram-sha-256"), "scram really used");
    assert!(log.contains("method=password"), "cleartext really used");

    // A passfile works when the URL has no password.
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("pgpass");
    std::fs::write(
        &passfile,
        format!("127.0.0.1:{port}:*:scram_user:scr@m pass\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    identify(&format!(
        "postgresql://scram_user@127.0.0.1:{port}/postgres?sslmode=disable&passfile={}",
        passfile.display()
    ))
    .await
    .expect("passfile");

    // Wrong password: a definite auth error that does not echo the password.
    let err = identify(&url("scram_user", "wrong-secret"))
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::Auth { .. }), "{err}");
    assert!(!err.is_transient());
    assert!(!err.to_string().contains("wrong-secret"));
    let err = identify(&format!("{}&require_auth=md5", url("md5_user", "nope")))
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::Auth { .. }), "{err}");
    let err = identify(&format!(
        "postgresql://scram_user@127.0.0.1:{port}/postgres?sslmode=disable&passfile=/nonexistent"
    ))
    .await
    .unwrap_err();
    assert!(err.to_string().contains("password"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_follow_libpq_semantics() {
    let mut ca = TestCa::new();
    let files = ca.issue_server_cert(&["localhost"]);
    let pg = PgServer::start_with(PgOptions {
        tls: Some(files.clone()),
        hba: Some(vec![
            "hostssl all all 127.0.0.1/32 trust".into(),
            "hostnossl all all 127.0.0.1/32 reject".into(),
        ]),
        ..Default::default()
    });
    let port = pg.port();
    let ca_path = ca.ca_cert().display().to_string();
    let url = |host: &str, q: &str| format!("postgresql://postgres@{host}:{port}/postgres?{q}");
    identify(&url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca_path}"),
    ))
    .await
    .expect("verify-full with the right CA and name");
    identify(&url("127.0.0.1", "sslmode=require"))
        .await
        .expect("require encrypts without verifying");
    identify(&url("127.0.0.1", "sslmode=prefer"))
        .await
        .expect("prefer uses TLS when offered");
    identify(&url(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca_path}"),
    ))
    .await
    .expect("verify-ca ignores the host name");
    let err = identify(&url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca_path}"),
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(err, PgError::Tls { .. }),
        "name mismatch rejected: {err}"
    );
    let other_ca = TestCa::new();
    let err = identify(&url(
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            other_ca.ca_cert().display()
        ),
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(err, PgError::Tls { .. }),
        "unknown CA rejected: {err}"
    );
    assert!(!err.is_transient());
    let err = identify(&url("127.0.0.1", "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no encryption") || err.to_string().contains("pg_hba"),
        "{err}"
    );

    // A server without TLS: require fails clearly, prefer falls back.
    let plain = PgServer::start();
    let purl = |q: &str| {
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres?{q}",
            plain.port()
        )
    };
    identify(&purl("sslmode=prefer"))
        .await
        .expect("prefer falls back to plaintext");
    let err = identify(&purl("sslmode=require")).await.unwrap_err();
    assert!(err.to_string().contains("does not accept TLS"), "{err}");
}

#[test]
fn tail_prints_changes_as_json_lines_and_exits_cleanly_on_sigint() {
    let pg = pg_with_schema();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[postgres]\nurl = \"{}?sslmode=disable\"\n",
            pg.url("postgres", "postgres")
        ),
    );
    let mut tail = SkusyncProc::spawn(&["tail", "--config", cfg.to_str().unwrap()], dir.path());
    let ready = crate::harness::wait_until(Duration::from_secs(20), || {
        pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'skusync_tail_%' AND active")
            == "1"
    });
    assert!(ready, "tail created its temporary slot: {}", tail.stderr());
    pg.psql(
        "BEGIN;
         INSERT INTO inventory (sku, location, on_hand, price) VALUES ('A', 'W1', 3, 1.10), ('B', 'W1', 4, 2);
         COMMIT;
         BEGIN; INSERT INTO inventory (sku, location, on_hand) VALUES ('ROLLED', 'W1', 9); ROLLBACK;
         UPDATE inventory SET on_hand = 2 WHERE sku = 'A';
         DELETE FROM inventory WHERE sku = 'B';",
    );
    let mut lines = Vec::new();
    while lines.len() < 4 {
        let l = tail
            .next_line(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("tail output: {}", tail.stderr()));
        lines
            .push(serde_json::from_str::<serde_json::Value>(&l).expect("one JSON object per line"));
    }
    assert_eq!(lines[0]["op"], "insert");
    assert_eq!(lines[0]["table"], "public.inventory");
    assert_eq!(lines[0]["new"]["sku"], "A");
    assert_eq!(lines[0]["new"]["on_hand"], 3);
    assert_eq!(lines[0]["new"]["price"], "1.10");
    assert_eq!(lines[1]["new"]["sku"], "B");
    assert_eq!(
        lines[0]["lsn"], lines[1]["lsn"],
        "one transaction, one commit LSN"
    );
    assert_eq!(lines[0]["xid"], lines[1]["xid"]);
    assert!(lines[0]["commit_ts"].as_str().unwrap().ends_with('Z'));
    assert!(lines[0]["lsn"].as_str().unwrap().contains('/'));
    assert_eq!(lines[2]["op"], "update");
    assert_eq!(lines[2]["new"]["on_hand"], 2);
    assert_eq!(lines[3]["op"], "delete");
    assert_eq!(lines[3]["old"]["sku"], "B");
    assert!(lines.iter().all(|l| l["new"]["sku"] != "ROLLED"));
    assert!(
        tail.next_line(Duration::from_millis(500)).is_none(),
        "nothing for the rollback"
    );
    assert_eq!(
        tail.signal_and_wait("INT", Duration::from_secs(10)),
        Some(0),
        "{}",
        tail.stderr()
    );
    assert!(
        crate::harness::wait_until(Duration::from_secs(10), || {
            pg.psql(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'skusync_tail_%'",
            ) == "0"
        }),
        "the temporary slot is gone"
    );
}

#[test]
fn tail_from_slot_reads_without_confirming() {
    let pg = pg_with_schema();
    create_slot(&pg, "skusync");
    let before =
        pg.psql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'skusync'");
    pg.psql("INSERT INTO inventory VALUES ('x', 'w', 1)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[postgres]\nurl = \"{}?sslmode=disable\"\nstatus_interval_ms = 100\n",
            pg.url("postgres", "postgres")
        ),
    );
    let mut tail = SkusyncProc::spawn(
        &["tail", "--from-slot", "--config", cfg.to_str().unwrap()],
        dir.path(),
    );
    let line = tail
        .next_line(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{}", tail.stderr()));
    assert!(line.contains("\"x\""));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        tail.signal_and_wait("TERM", Duration::from_secs(10)),
        Some(0)
    );
    let after =
        pg.psql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'skusync'");
    assert_eq!(before, after, "--from-slot never moves the slot");
}

#[test]
fn million_row_transaction_streams_with_bounded_memory() {
    let pg = pg_with_schema();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[postgres]\nurl = \"{}?sslmode=disable\"\n",
            pg.url("postgres", "postgres")
        ),
    );
    let tail = SkusyncProc::spawn(&["tail", "--config", cfg.to_str().unwrap()], dir.path());
    assert!(crate::harness::wait_until(Duration::from_secs(20), || {
        pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'skusync_tail_%' AND active") == "1"
    }));
    pg.psql(
        "INSERT INTO inventory (sku, location, on_hand, reserved, price)
         SELECT 'SKU-' || g, 'WH-' || (g % 7), g % 1000, g % 10, (g % 100) + 0.99 FROM generate_series(1, 1000000) g;",
    );
    let mut n = 0usize;
    let mut peak = 0u64;
    while n < 1_000_000 {
        let line = tail
            .next_line(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("after {n} lines: {}", tail.stderr()));
        assert!(line.starts_with('{'));
        n += 1;
        if n.is_multiple_of(50_000) {
            peak = peak.max(tail.peak_rss_kib().unwrap_or(0));
        }
    }
    peak = peak.max(tail.peak_rss_kib().unwrap_or(0));
    eprintln!("1M-row transaction: peak RSS {} MiB", peak / 1024);
    assert!(
        peak > 0 && peak < 64 * 1024,
        "peak RSS {peak} KiB must stay under 64 MiB"
    );
}

/// Drain a backlog of `n` transactions with paced reads only (a short sleep, then
/// `fill_now`), counting commits; no read takes more than the pacer asked for.
async fn drain_paced(conn: &mut ReplConnection, n: usize, mode: &str) {
    use skusync::pg::conn::StreamItem;
    use skusync::pg::wire::ReplMessage;
    let mut commits = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while commits < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{commits} of {n} commits"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
        let (before, ask) = (conn.buffered_len(), conn.paced_ask());
        conn.fill_now().unwrap();
        let got = conn.buffered_len() - before;
        assert!(got <= ask, "{mode}: read {got} bytes, asked for {ask}");
        while let Some(item) = conn.try_recv_buffered().unwrap() {
            if let StreamItem::Message(ReplMessage::XLogData { data, .. }) = item
                && data.first() == Some(&b'C')
            {
                commits += 1;
            }
        }
    }
}

/// Paced reads (catching up) take the whole stream over TLS as over plain TCP: the
/// socket is read only by `fill_now` at intervals, each read bounded by the pacer's ask
/// (without the TLS path in `fill_now`, this times out with 0 commits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_reads_take_a_whole_backlog_over_tls_and_plain_tcp() {
    use skusync::pg::ReplicationOptions;
    let mut ca = TestCa::new();
    let files = ca.issue_server_cert(&["localhost"]);
    let pg = PgServer::start_with(PgOptions {
        tls: Some(files),
        ..Default::default()
    });
    pg.psql(SCHEMA);
    create_slot(&pg, "tls_paced");
    create_slot(&pg, "tcp_paced");
    let n = 3000;
    pg.psql(&format!(
        "INSERT INTO inventory (sku, location, on_hand) VALUES ('p', 'w', 0);
         DO $$ BEGIN FOR i IN 1..{n} LOOP
           UPDATE inventory SET on_hand = i WHERE sku = 'p'; COMMIT;
         END LOOP; END $$"
    ));
    let opts = ReplicationOptions {
        proto_version: 1,
        publications: vec!["skusync".into()],
        messages: false,
    };
    for (slot, mode) in [("tls_paced", "require"), ("tcp_paced", "disable")] {
        let url = format!(
            "postgresql://postgres@127.0.0.1:{}/postgres?sslmode={mode}",
            pg.port()
        );
        let cfg = PgConnectConfig::from_url(&url).unwrap();
        let mut conn = ReplConnection::connect(&cfg).await.unwrap();
        conn.start_replication(slot, Lsn(0), &opts).await.unwrap();
        conn.set_read_batching(true);
        assert!(conn.read_batching(), "{mode}: paced reads are on");
        // the INSERT and every UPDATE
        drain_paced(&mut conn, n + 1, mode).await;
    }
}
