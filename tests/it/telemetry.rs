//! Observability and packaging, end to end: `skusync run` against real servers, its
//! `/metrics`, `/healthz` and `/readyz` endpoints, its sd_notify messages, SIGTERM with
//! work in flight, and the shipped SQL scripts and example files.
//!
//! The daemon connects as the least-privilege `skusync` role that `sql/setup.sql`
//! creates, so these tests also prove that role is enough.

use crate::harness::{MosquittoServer, PgServer, RedisServer, free_port};
use crate::oracle::*;
use redis::aio::MultiplexedConnection;
use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tables of the workload in `oracle.rs` (fractional quantities must be skipped, so
/// `qty` is numeric here; publications and grants come from `sql/setup.sql`).
const SCHEMA: &str = "
CREATE TABLE inventory (
  sku text NOT NULL, location text NOT NULL, on_hand int NOT NULL, reserved int NOT NULL DEFAULT 0,
  PRIMARY KEY (sku, location));
CREATE TABLE activity_log (
  id bigserial PRIMARY KEY, sku text, kind text NOT NULL, qty numeric,
  at timestamptz NOT NULL DEFAULT now());
";

fn repo_file(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn oracle() -> Oracle {
    crate::fold_oracle::public_oracle(Buckets::SumEqualsTotal)
}

/// A `skusync run` child with its stderr in a file.
struct Proc {
    child: Child,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(cfg: &Path, dir: &Path, env: &[(&str, String)]) -> Proc {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let stderr = dir.join(format!("skusync-{n}.stderr"));
        let mut cmd = Command::new(crate::support::skusync_bin());
        cmd.args(["run", "--config", cfg.to_str().expect("utf-8")])
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: cmd.spawn().expect("spawn skusync"),
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn assert_alive(&mut self, what: &str) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("skusync exited ({st}) while {what}\n{}", self.log());
        }
    }

    /// SIGTERM, then the exit code within `timeout` (None: still running).
    fn sigterm(&mut self, timeout: Duration) -> Option<i32> {
        crate::harness::signal(self.child.id(), "TERM");
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Servers with the schema, `sql/setup.sql` applied, and a config for the `skusync` role.
struct Rig {
    pg: PgServer,
    redis: RedisServer,
    /// Kept alive for the daemon.
    _mqtt: Option<MosquittoServer>,
    client: tokio_postgres::Client,
    con: MultiplexedConnection,
    dir: tempfile::TempDir,
    http_port: u16,
    cfg: PathBuf,
    oracle: Oracle,
    markers: u64,
}

impl Rig {
    async fn new(with_mqtt: bool) -> Rig {
        let pg = PgServer::start();
        pg.psql(SCHEMA);
        pg.psql(&repo_file("sql/setup.sql"));
        let redis = RedisServer::start();
        let mqtt = with_mqtt.then(MosquittoServer::start);
        let client = pg.client("postgres").await;
        let con = redis_connect(&redis.url()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let http_port = free_port();
        let oracle = oracle();
        let mut text = oracle.config_toml(
            &pg.url("skusync", "postgres"),
            "skusync",
            &["skusync", "skusync_activity"],
            &redis.url(),
        );
        text.push_str(&format!("\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n"));
        if let Some(m) = &mqtt {
            text.push_str(&format!(
                "\n[mqtt]\nurl = \"{}\"\nmin_interval_ms = 0\n",
                m.url()
            ));
        }
        let cfg = crate::support::write_config(dir.path(), &text);
        Rig {
            pg,
            redis,
            _mqtt: mqtt,
            client,
            con,
            dir,
            http_port,
            cfg,
            oracle,
            markers: 0,
        }
    }

    fn start(&self, env: &[(&str, String)]) -> Proc {
        Proc::spawn(&self.cfg, self.dir.path(), env)
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port, path)
    }

    /// Wait until `path` answers `status`; returns the body.
    async fn wait_status(
        &self,
        p: &mut Proc,
        path: &str,
        status: u16,
        timeout: Duration,
    ) -> String {
        let start = Instant::now();
        loop {
            p.assert_alive(&format!("waiting for {path} {status}"));
            match self.get(path) {
                Some((s, body)) if s == status => return body,
                last if start.elapsed() > timeout => {
                    panic!("{path}: want {status}, last {last:?}\n{}", p.log())
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("workload SQL failed: {e:?}\n{sql}"));
    }

    /// Insert a drain marker and wait until Redis has it.
    async fn drain(&mut self, p: &mut Proc, timeout: Duration) {
        self.markers += 1;
        let n = self.markers;
        self.exec(&WorkloadTables::public().marker_sql(n, "WH-1"))
            .await;
        let key = skusync::sinks::layout::sku_key(&self.oracle.prefix, &marker_sku(n));
        let start = Instant::now();
        while hget(&mut self.con, &key, "on_hand").await != Some(n.to_string()) {
            p.assert_alive("draining");
            assert!(
                start.elapsed() < timeout,
                "drain marker not applied after {timeout:?}\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn run_workload(&self, w: &mut Workload, statements: usize) {
        let target = w.statements + statements;
        while w.statements < target {
            let sql = w.next_txn();
            self.exec(&sql).await;
        }
    }
}

fn workload(test: &str) -> Workload {
    Workload::new(
        test_seed(test),
        WorkloadTables::public(),
        Workload::default_skus(),
        Workload::default_locations(),
    )
}

/// A blocking HTTP/1.1 GET: `(status, body)`, `None` when nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The value of the sample `name` (exact series text, labels included) in a scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        (series == name).then(|| value.parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_every_named_metric_with_sane_values_after_a_workload() {
    let mut rig = Rig::new(true).await;
    let mut p = rig.start(&[]);
    rig.wait_status(&mut p, "/readyz", 200, Duration::from_secs(40))
        .await;
    let mut w = workload("metrics_endpoint_reports_every_named_metric");
    rig.run_workload(&mut w, 300).await;
    rig.drain(&mut p, Duration::from_secs(30)).await;
    // the publisher acknowledges asynchronously; the lag poll runs every 10 s
    let start = Instant::now();
    let scrape = loop {
        let (status, body) = rig.get("/metrics").expect("/metrics answers");
        assert_eq!(status, 200);
        let published = sample(&body, "skusync_mqtt_published_total").unwrap_or(0.0);
        let puback = sample(&body, "skusync_commit_to_puback_seconds_count").unwrap_or(0.0);
        if published > 0.0 && puback > 0.0 {
            break body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no PUBACKs counted\n{body}\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for name in [
        "skusync_received_lsn_bytes",
        "skusync_confirmed_lsn_bytes",
        "skusync_slot_lag_bytes",
        "skusync_commit_to_redis_seconds_count",
        "skusync_commit_to_puback_seconds_count",
        "skusync_transactions_total",
        "skusync_rows_total",
        "skusync_sku_updates_total",
        "skusync_fenced_entries_total",
        "skusync_mqtt_published_total",
        "skusync_mqtt_refused_total",
        "skusync_alerts_raised_total",
        "skusync_alerts_published_total",
        "skusync_skipped_values_total",
        "skusync_unknown_activity_kinds_total",
        "skusync_unmapped_rows_total",
        "skusync_reconnects_total{server=\"postgres\"}",
        "skusync_reconnects_total{server=\"redis\"}",
        "skusync_reconnects_total{server=\"mqtt\"}",
        "skusync_resyncs_total",
        "skusync_backlog_channel_batches",
        "skusync_backlog_batch_entries",
        "skusync_streaming_bool",
        "skusync_apply_backed_up_bool",
        "skusync_apply_backed_up_total",
    ] {
        assert!(
            sample(&scrape, name).is_some(),
            "{name} missing from /metrics:\n{scrape}"
        );
    }
    let v = |n: &str| sample(&scrape, n).unwrap_or(-1.0);
    assert!(v("skusync_transactions_total") >= 20.0, "{scrape}");
    assert!(
        v("skusync_rows_total") >= v("skusync_transactions_total"),
        "{scrape}"
    );
    assert!(v("skusync_sku_updates_total") > 0.0, "{scrape}");
    assert!(v("skusync_commit_to_redis_seconds_count") > 0.0, "{scrape}");
    assert!(v("skusync_received_lsn_bytes") > 0.0, "{scrape}");
    assert!(v("skusync_confirmed_lsn_bytes") > 0.0, "{scrape}");
    assert!(
        v("skusync_confirmed_lsn_bytes") <= v("skusync_received_lsn_bytes"),
        "{scrape}"
    );
    assert_eq!(v("skusync_streaming_bool"), 1.0, "{scrape}");
    // the workload inserts unmapped kinds ("share") and fractional quantities
    assert!(v("skusync_unknown_activity_kinds_total") > 0.0, "{scrape}");
    assert!(v("skusync_skipped_values_total") > 0.0, "{scrape}");
    assert_eq!(v("skusync_resyncs_total"), 0.0, "{scrape}");
    assert!(v("skusync_slot_lag_bytes") >= 0.0, "{scrape}");
    // bounded labels: no SKU ever becomes a label
    assert!(!scrape.contains("SKU-0"), "a SKU leaked into /metrics");
    // logs carry no row values
    let log = p.log();
    assert!(
        !log.contains("SKU-0"),
        "a SKU leaked into the info log:\n{log}"
    );
    assert_eq!(rig.get("/healthz"), Some((200, "ok\n".into())));
    assert_eq!(rig.get("/nope").map(|r| r.0), Some(404));
    assert_eq!(p.sigterm(Duration::from_secs(20)), Some(0), "{}", p.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_200_while_streaming_and_503_after_redis_is_killed() {
    let mut rig = Rig::new(false).await;
    let mut p = rig.start(&[]);
    rig.wait_status(&mut p, "/readyz", 200, Duration::from_secs(40))
        .await;
    assert_eq!(rig.get("/healthz").map(|r| r.0), Some(200));
    rig.redis.kill9();
    let body = rig
        .wait_status(&mut p, "/readyz", 503, Duration::from_secs(15))
        .await;
    // (on failure the log tells why the pipeline was not streaming: seen once under load)
    assert!(body.contains("redis"), "{body}\n{}", p.log());
    // the process keeps running and stays live through the outage
    assert_eq!(rig.get("/healthz").map(|r| r.0), Some(200));
    rig.redis.start_again();
    rig.wait_status(&mut p, "/readyz", 200, Duration::from_secs(30))
        .await;
    let (_, scrape) = rig.get("/metrics").expect("/metrics");
    assert!(
        sample(&scrape, "skusync_reconnects_total{server=\"redis\"}").unwrap_or(0.0) >= 1.0,
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_for_a_standby_that_has_not_won_the_slot() {
    let rig = Rig::new(false).await;
    let mut first = rig.start(&[]);
    rig.wait_status(&mut first, "/readyz", 200, Duration::from_secs(40))
        .await;
    // a second instance on another port waits for the slot
    let port2 = free_port();
    let text = std::fs::read_to_string(&rig.cfg)
        .expect("config")
        .replace(&rig.http_port.to_string(), &port2.to_string());
    let dir2 = tempfile::tempdir().expect("tempdir");
    let cfg2 = crate::support::write_config(dir2.path(), &text);
    let mut second = Proc::spawn(&cfg2, dir2.path(), &[]);
    let start = Instant::now();
    loop {
        second.assert_alive("standing by");
        if let Some((503, body)) = http_get(port2, "/readyz")
            && body.contains("standby")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "second instance never reported standby\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http_get(port2, "/healthz").map(|r| r.0), Some(200));
    // once the first stops, the standby takes over and becomes ready
    assert_eq!(first.sigterm(Duration::from_secs(20)), Some(0));
    let start = Instant::now();
    while http_get(port2, "/readyz").map(|r| r.0) != Some(200) {
        second.assert_alive("taking over");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "standby did not take over\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_sends_ready_status_watchdog_and_stopping_on_sigterm() {
    let rig = Rig::new(false).await;
    let sock_path = rig.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (got, stop) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    got.lock().unwrap().extend(msg.lines().map(String::from));
                }
            }
        })
    };
    let has = |prefix: &str| got.lock().unwrap().iter().any(|l| l.starts_with(prefix));
    let mut p = rig.start(&[
        ("NOTIFY_SOCKET", sock_path.display().to_string()),
        ("WATCHDOG_USEC", "2000000".into()),
    ]);
    let start = Instant::now();
    while !(has("READY=1") && has("STATUS=streaming") && has("WATCHDOG=1")) {
        p.assert_alive("notifying");
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "missing notifications: {:?}\n{}",
            got.lock().unwrap(),
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the watchdog keeps pinging (every third of WATCHDOG_USEC)
    let pings = |g: &Vec<String>| g.iter().filter(|l| *l == "WATCHDOG=1").count();
    let before = pings(&got.lock().unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        pings(&got.lock().unwrap()) >= before + 2,
        "{:?}",
        got.lock().unwrap()
    );
    // SIGHUP reloads nothing and does not kill the process
    crate::harness::signal(p.child.id(), "HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.assert_alive("after SIGHUP");
    assert!(p.log().contains("reloads nothing"), "{}", p.log());
    assert_eq!(p.sigterm(Duration::from_secs(20)), Some(0), "{}", p.log());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    reader.join().expect("reader");
    let got = got.lock().unwrap().clone();
    assert!(got.iter().any(|l| l == "STOPPING=1"), "{got:?}");
    let ready = got.iter().position(|l| l == "READY=1").expect("READY=1");
    let stopping = got
        .iter()
        .position(|l| l == "STOPPING=1")
        .expect("STOPPING");
    assert!(ready < stopping, "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_work_in_flight_exits_0_and_a_restart_converges_to_the_oracle() {
    let mut rig = Rig::new(false).await;
    let mut p = rig.start(&[]);
    rig.wait_status(&mut p, "/readyz", 200, Duration::from_secs(40))
        .await;
    let mut w = workload("sigterm_with_work_in_flight");
    rig.run_workload(&mut w, 600).await;
    // keep writing while the daemon shuts down
    let client = rig.pg.client("postgres").await;
    let mut w2 = workload("sigterm_with_work_in_flight (concurrent)");
    let writer = tokio::spawn(async move {
        let mut txns = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            client.batch_execute(&w2.next_txn()).await.expect("txn");
            txns += 1;
        }
        txns
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let code = p.sigterm(Duration::from_secs(15));
    assert_eq!(code, Some(0), "SIGTERM exits 0\n{}", p.log());
    assert!(
        t0.elapsed() < Duration::from_secs(12),
        "slow exit: {:?}",
        t0.elapsed()
    );
    let txns = writer.await.expect("writer");
    eprintln!(
        "exited in {:?}; {txns} transactions written around it",
        t0.elapsed()
    );
    let mut p = rig.start(&[]);
    rig.drain(&mut p, Duration::from_secs(40)).await;
    let start = Instant::now();
    loop {
        let m = rig.oracle.mismatches(&rig.client, &mut rig.con).await;
        if m.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "Redis differs from the SQL aggregate:\n{}\n{}",
            format_mismatches(&m, 40),
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(p.sigterm(Duration::from_secs(20)), Some(0), "{}", p.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_heartbeat_runs_as_the_least_privilege_role() {
    let rig = Rig::new(false).await;
    let text = std::fs::read_to_string(&rig.cfg).expect("config").replace(
        "status_interval_ms = 200",
        "status_interval_ms = 200\nheartbeat_interval_ms = 1000",
    );
    std::fs::write(&rig.cfg, text).expect("config");
    let mut p = rig.start(&[]);
    rig.wait_status(&mut p, "/readyz", 200, Duration::from_secs(40))
        .await;
    let lsn = || rig.pg.psql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn");
    let confirmed = || {
        rig.pg.psql(
            "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'skusync'",
        )
    };
    let (w0, c0): (u64, u64) = (
        lsn().parse().expect("lsn"),
        confirmed().parse().expect("lsn"),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (w1, c1): (u64, u64) = (
        lsn().parse().expect("lsn"),
        confirmed().parse().expect("lsn"),
    );
    assert!(w1 > w0, "WAL did not advance on an idle server");
    assert!(c1 > c0, "the slot did not move with the heartbeat");
    assert!(!p.log().contains("WAL heartbeat failed"), "{}", p.log());
}

#[test]
fn setup_and_demo_schema_run_cleanly_under_psql_and_teardown_undoes_them() {
    let pg = PgServer::start();
    for _ in 0..2 {
        // idempotent: a second run changes nothing and does not fail
        pg.try_psql("postgres", &repo_file("sql/demo_schema.sql"))
            .unwrap_or_else(|e| panic!("demo_schema.sql: {e}"));
        pg.try_psql("postgres", &repo_file("sql/setup.sql"))
            .unwrap_or_else(|e| panic!("setup.sql: {e}"));
    }
    let role = pg.psql(
        "SELECT rolcanlogin, rolreplication, rolsuper FROM pg_roles WHERE rolname = 'skusync'",
    );
    assert_eq!(role, "t|t|f");
    let pubs = pg.psql(
        "SELECT pubname, pubinsert, pubupdate, pubdelete FROM pg_publication ORDER BY pubname",
    );
    assert_eq!(pubs, "skusync|t|t|t\nskusync_activity|t|f|f");
    let grants = pg.psql(
        "SELECT table_name, privilege_type FROM information_schema.role_table_grants \
         WHERE grantee = 'skusync' ORDER BY 1, 2",
    );
    assert_eq!(grants, "activity_log|SELECT\ninventory|SELECT");
    pg.psql("SELECT pg_create_logical_replication_slot('skusync', 'pgoutput')");
    pg.try_psql("postgres", &repo_file("sql/teardown.sql"))
        .unwrap_or_else(|e| panic!("teardown.sql: {e}"));
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'skusync'"),
        "0"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM pg_publication"), "0");
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_roles WHERE rolname = 'skusync'"),
        "0"
    );
}

#[test]
fn example_config_in_dist_parses() {
    let text = repo_file("dist/skusync.toml");
    let c = skusync::config::Config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.http.map(|h| h.listen.to_string()).as_deref(),
        Some("127.0.0.1:9187")
    );
    skusync::daemon::Daemon::new(skusync::config::Config::parse(&text).unwrap())
        .expect("the example config is runnable");
}

#[test]
fn mosquitto_acl_lets_skusync_write_its_tree_and_app_users_only_read_it() {
    use crate::harness::MqttOptions;
    let m = MosquittoServer::start_with(MqttOptions {
        users: vec![
            ("skusync".into(), "pw-skusync".into()),
            ("app".into(), "pw-app".into()),
            ("other".into(), "pw-other".into()),
        ],
        acl: Some(repo_file("docker/mosquitto/acl")),
        ..Default::default()
    });
    let publish = |user: &str, topic: &str| {
        let st = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &m.port().to_string(),
                "-V",
                "mqttv311",
            ])
            .args(["-u", user, "-P", &format!("pw-{user}"), "-q", "1", "-r"])
            .args(["-t", topic, "-m", user])
            .status()
            .expect("mosquitto_pub");
        assert!(st.success(), "{user} could not connect");
    };
    publish("skusync", "skusync/sku/A");
    publish("app", "skusync/sku/B");
    publish("other", "skusync/alerts/C");
    publish("app", "elsewhere/x");
    let got: Vec<String> = m
        .retained("#", Duration::from_secs(2))
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(got, vec!["skusync/sku/A".to_string()], "{}", m.log_tail());
    // app users read the tree
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &m.port().to_string(),
            "-V",
            "mqttv311",
        ])
        .args([
            "-u",
            "app",
            "-P",
            "pw-app",
            "-t",
            "skusync/#",
            "-C",
            "1",
            "-W",
            "5",
        ])
        .output()
        .expect("mosquitto_sub");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "skusync");
}

#[test]
fn docker_yaml_and_json_files_are_well_formed() {
    let files = [
        "docker/compose.yaml",
        "docker/prometheus.yml",
        "docker/alerts.yml",
        "docker/grafana/skusync-dashboard.json",
        "docker/grafana/provisioning/datasources/prometheus.yaml",
        "docker/grafana/provisioning/dashboards/skusync.yaml",
    ];
    let script = format!(
        "import json, sys, yaml\nfor f in {files:?}:\n    p = sys.argv[1] + '/' + f\n    (json.load if f.endswith('.json') else yaml.safe_load)(open(p))\n"
    );
    let out = Command::new("python3")
        .args(["-c", &script, env!("CARGO_MANIFEST_DIR")])
        .output();
    // On CI (`CI=true`) the checker must run: `.ci/install-deps` installs python3-yaml, so
    // a missing module is a broken setup, not a reason to pass.
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named 'yaml'") => {
            assert!(
                !ci,
                "python3 has no yaml module on CI: run .ci/install-deps (apt python3-yaml)"
            );
            eprintln!("skipped: python3 has no yaml module (apt install python3-yaml)");
        }
        Ok(o) => panic!("{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            assert!(!ci, "no python3 on CI: run .ci/install-deps ({e})");
            eprintln!("skipped: no python3 ({e})");
        }
    }
    // every metric the alert rules and the dashboard use is one skusync exports
    let exported = repo_file("src/telemetry.rs");
    for f in ["docker/alerts.yml", "docker/grafana/skusync-dashboard.json"] {
        let text = repo_file(f);
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(base) = word.strip_prefix("skusync_") {
                let base = base
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum");
                if base.is_empty() || word.starts_with("skusync_job") {
                    continue;
                }
                assert!(
                    exported.contains(&format!("\"skusync_{base}\"")),
                    "{f} uses {word}, which skusync does not export"
                );
            }
        }
    }
}

/// Open descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Soft RLIMIT_NOFILE up to the hard limit, so the test itself can hold its sockets.
fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
    }
    l.rlim_cur
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_http_connections_leave_skusync_streaming_with_bounded_descriptors() {
    const IDLE: usize = 2000;
    // the documented cap (README, [http]) and a little for reconnects
    const BOUND: usize = 64 + 16;
    let limit = raise_nofile();
    assert!(limit > IDLE as u64 + 200, "RLIMIT_NOFILE {limit} too low");
    let mut rig = Rig::new(false).await;
    let mut p = rig.start(&[]);
    rig.wait_status(&mut p, "/readyz", 200, Duration::from_secs(40))
        .await;
    let pid = p.child.id();
    let before = fd_count(pid);
    // idle clients: connect, send nothing, keep the socket
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        match std::net::TcpStream::connect(("127.0.0.1", rig.http_port)) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect #{}: {e}", idle.len()),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = fd_count(pid);
    assert!(
        during <= before + BOUND,
        "skusync holds {during} descriptors with {IDLE} idle HTTP clients (before: {before})"
    );
    // changes still reach Redis while the idle clients hold their sockets
    rig.drain(&mut p, Duration::from_secs(20)).await;
    assert!(fd_count(pid) <= before + BOUND);
    // once the idle ones have had their deadline, the endpoint answers again, even
    // though the test still holds every socket
    let start = Instant::now();
    while rig.get("/healthz").map(|r| r.0) != Some(200) {
        p.assert_alive("waiting for /healthz");
        assert!(
            start.elapsed() < skusync::http::DEADLINE + Duration::from_secs(10),
            "/healthz does not answer after the idle connections' deadline"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, scrape) = rig.get("/metrics").expect("/metrics");
    // not an exact count: on a loaded machine opening 2,000 sockets can outlast the
    // deadline, and the slots the first ones held go to later ones
    assert!(
        sample(&scrape, "skusync_http_rejected_total").unwrap_or(0.0) >= 1.0,
        "{scrape}"
    );
    drop(idle);
    assert_eq!(p.sigterm(Duration::from_secs(20)), Some(0), "{}", p.log());
}

/// Passwords with a quote, spaces, `$` and a backslash: `make-passwd.sh` must take them
/// as they are.
const AWKWARD_SKUSYNC_PW: &str = "it's a $ecret \\ pw";
const AWKWARD_APP_PW: &str = "app 'pw' $HOME \"x\"";

/// An MQTT 3.1.1 CONNECT packet (clean session, keep-alive 60 s).
fn mqtt_connect_packet(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let field = |v: &mut Vec<u8>, s: &str| {
        v.extend_from_slice(&(s.len() as u16).to_be_bytes());
        v.extend_from_slice(s.as_bytes());
    };
    let mut body = Vec::new();
    field(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 60]);
    field(&mut body, client_id);
    field(&mut body, user);
    field(&mut body, password);
    assert!(body.len() < 128, "one-byte remaining length");
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

/// Sends CONNECT on `s` and returns the CONNACK return code (0 = accepted), or None when
/// the broker closed the connection instead.
fn mqtt_handshake(s: &mut std::net::TcpStream, id: &str, user: &str, pw: &str) -> Option<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(&mqtt_connect_packet(id, user, pw)).ok()?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).ok()?;
    assert_eq!(ack[0], 0x20, "not a CONNACK: {ack:?}");
    Some(ack[3])
}

/// True when the MQTT connection `s` still answers a PINGREQ.
fn mqtt_alive(s: &mut std::net::TcpStream) -> bool {
    let mut resp = [0u8; 2];
    s.write_all(&[0xC0, 0]).is_ok() && s.read_exact(&mut resp).is_ok() && resp == [0xD0, 0]
}

/// CONNECT over MQTT-over-WebSockets; returns the socket and the CONNACK return code.
fn mqtt_ws_connect(port: u16, id: &str, user: &str, pw: &str) -> (std::net::TcpStream, u8) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("ws connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("websocket handshake");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // one masked binary frame (a zero mask leaves the payload as it is)
    let packet = mqtt_connect_packet(id, user, pw);
    let mut frame = vec![0x82, 0x80 | packet.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(&packet);
    s.write_all(&frame).unwrap();
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).expect("CONNACK frame");
    let mut payload = vec![0u8; (hdr[1] & 0x7f) as usize];
    s.read_exact(&mut payload).expect("CONNACK payload");
    assert_eq!(payload[0], 0x20, "not a CONNACK: {payload:?}");
    (s, payload[3])
}

/// The shipped `docker/mosquitto/mosquitto.conf` with its paths and ports made local;
/// `edit` may change it further. Returns the broker and its two ports.
fn shipped_broker(
    dir: &Path,
    edit: impl Fn(String) -> String,
) -> (crate::harness::ChildProc, u16, u16) {
    let (mqtt, ws) = (free_port(), free_port());
    let conf = repo_file("docker/mosquitto/mosquitto.conf")
        .replace("/mosquitto/config/", &format!("{}/", dir.display()))
        .replace("/mosquitto/data/", &format!("{}/", dir.display()))
        .replace("listener 1883", &format!("listener {mqtt} 127.0.0.1"))
        .replace("listener 9001", &format!("listener {ws} 127.0.0.1"));
    // as root, do not drop to a `mosquitto` user that cannot read the temp dir
    let conf = format!("user root\n{}", edit(conf));
    std::fs::write(dir.join("test.conf"), conf).unwrap();
    std::fs::write(dir.join("acl"), repo_file("docker/mosquitto/acl")).unwrap();
    let (out, err) = crate::harness::log_stdio(&dir.join("mosquitto.log"));
    let child = Command::new(crate::harness::mqtt::mosquitto_bin())
        .arg("-c")
        .arg(dir.join("test.conf"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn mosquitto");
    let proc = crate::harness::ChildProc::new(child);
    assert!(
        crate::harness::wait_until(Duration::from_secs(20), || {
            crate::harness::port_open(mqtt) && crate::harness::port_open(ws)
        }),
        "mosquitto did not start: {}",
        std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
    );
    (proc, mqtt, ws)
}

/// Runs `make-passwd.sh` into `dir` with the awkward passwords.
fn make_passwd(dir: &Path) {
    let out = Command::new("sh")
        .arg(repo_file_path("docker/mosquitto/make-passwd.sh"))
        .env("MQTT_PASSWD_DIR", dir)
        .env("SKUSYNC_MQTT_PASSWORD", AWKWARD_SKUSYNC_PW)
        .env("APP_MQTT_PASSWORD", AWKWARD_APP_PW)
        .output()
        .expect("run make-passwd.sh");
    assert!(
        out.status.success(),
        "make-passwd.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn repo_file_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn make_passwd_takes_passwords_with_quotes_spaces_and_dollars_and_the_broker_accepts_them() {
    let dir = tempfile::tempdir().unwrap();
    make_passwd(dir.path());
    let passwd = std::fs::read_to_string(dir.path().join("passwd")).unwrap();
    let apps = std::fs::read_to_string(dir.path().join("passwd-apps")).unwrap();
    assert!(passwd.starts_with("skusync:$7$"), "{passwd}");
    assert!(apps.starts_with("app:$7$"), "{apps}");
    assert!(
        !passwd.contains("ecret") && !apps.contains("HOME"),
        "plain text stored"
    );
    // without the variables it refuses instead of using a default password
    let out = Command::new("sh")
        .arg(repo_file_path("docker/mosquitto/make-passwd.sh"))
        .env("MQTT_PASSWD_DIR", dir.path())
        .env_remove("SKUSYNC_MQTT_PASSWORD")
        .env_remove("APP_MQTT_PASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SKUSYNC_MQTT_PASSWORD"));
    // the shell script passes no password on a command line
    let script = repo_file("docker/mosquitto/make-passwd.sh");
    assert!(!script.contains("mosquitto_passwd -b"), "{script}");

    let (_broker, mqtt, ws) = shipped_broker(dir.path(), |c| c);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", mqtt)).unwrap();
    assert_eq!(
        mqtt_handshake(&mut s, "skusync", "skusync", AWKWARD_SKUSYNC_PW),
        Some(0)
    );
    let mut wrong = std::net::TcpStream::connect(("127.0.0.1", mqtt)).unwrap();
    assert_ne!(
        mqtt_handshake(&mut wrong, "x", "skusync", "it's a"),
        Some(0)
    );
    let (_app, rc) = mqtt_ws_connect(ws, "phone-1", "app", AWKWARD_APP_PW);
    assert_eq!(rc, 0, "app user refused on the WebSocket listener");
}

#[test]
fn with_the_shipped_broker_config_an_app_user_cannot_take_skusyncs_client_id() {
    let dir = tempfile::tempdir().unwrap();
    make_passwd(dir.path());
    // skusync's session on its listener
    let connect_skusync = |port: u16| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(
            mqtt_handshake(&mut s, "skusync", "skusync", AWKWARD_SKUSYNC_PW),
            Some(0)
        );
        s
    };
    {
        let (_broker, mqtt, ws) = shipped_broker(dir.path(), |c| c);
        let mut skusync = connect_skusync(mqtt);
        // an app account does not exist on skusync's listener
        let mut app_tcp = std::net::TcpStream::connect(("127.0.0.1", mqtt)).unwrap();
        assert_ne!(
            mqtt_handshake(&mut app_tcp, "skusync", "app", AWKWARD_APP_PW),
            Some(0),
            "an app user connected to the skusync listener"
        );
        // on the apps' listener its client id becomes its user name
        let (mut app, rc) = mqtt_ws_connect(ws, "skusync", "app", AWKWARD_APP_PW);
        assert_eq!(rc, 0);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            mqtt_alive(&mut skusync),
            "skusync's session was taken over:\n{}",
            std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default()
        );
        let _ = app.flush();
    }
    // control: the same broker without use_username_as_clientid lets the app kick skusync,
    // so the check above can fail
    let (_broker, mqtt, ws) = shipped_broker(dir.path(), |c| {
        c.replace("use_username_as_clientid true", "")
    });
    let mut skusync = connect_skusync(mqtt);
    let (_app, rc) = mqtt_ws_connect(ws, "skusync", "app", AWKWARD_APP_PW);
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !mqtt_alive(&mut skusync),
        "takeover expected without the option"
    );
}

#[test]
fn compose_publishes_ports_on_loopback_unless_told_and_requires_every_password() {
    let compose = repo_file("docker/compose.yaml");
    let mut in_ports = false;
    let mut published = 0;
    for line in compose.lines() {
        let t = line.trim();
        if t.starts_with('#') {
            continue;
        }
        if t == "ports:" {
            in_ports = true;
            continue;
        }
        if in_ports && t.starts_with("- ") {
            let spec = t.trim_start_matches("- ").trim_matches('"');
            published += 1;
            assert!(
                spec.starts_with("127.0.0.1:")
                    || (spec.starts_with("${") && spec.contains(":-127.0.0.1}:")),
                "port published beyond loopback by default: {spec}"
            );
            continue;
        }
        in_ports = false;
        // a password variable has no fallback value: compose stops when it is unset
        if t.contains("PASSWORD") && t.contains("${") {
            assert!(t.contains(":?"), "password without `:?`: {t}");
            assert!(!t.contains(":-"), "password with a fallback: {t}");
        }
    }
    assert!(published >= 7, "found {published} published ports");
    assert!(
        compose.contains("${MQTT_WS_PUBLISH_ADDR:-127.0.0.1}:9001:9001"),
        "{compose}"
    );
    let conf = repo_file("docker/mosquitto/mosquitto.conf");
    assert!(conf.contains("use_username_as_clientid true"), "{conf}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_initdb_login_script_sets_a_password_with_quotes_without_argv() {
    use crate::harness::{PasswordEncryption, PgOptions};
    let pg = PgServer::start_with(PgOptions {
        hba: Some(vec!["host all all 127.0.0.1/32 scram-sha-256".into()]),
        password_encryption: Some(PasswordEncryption::ScramSha256),
        ..Default::default()
    });
    pg.psql("CREATE ROLE skusync LOGIN;");
    let pw = "it's a $ecret; DROP ROLE x; --";
    let out = Command::new("sh")
        .arg(repo_file_path("docker/initdb/03-skusync-login.sh"))
        .env("PATH", format!("{}:/usr/bin:/bin", pg.bin_dir().display()))
        .env("PGHOST", pg.socket_dir())
        .env("PGPORT", pg.port().to_string())
        .env("POSTGRES_USER", "postgres")
        .env("POSTGRES_DB", "postgres")
        .env("SKUSYNC_PG_PASSWORD", pw)
        .output()
        .expect("run 03-skusync-login.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !repo_file("docker/initdb/03-skusync-login.sh").contains("-v pw="),
        "password on psql's command line"
    );
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(pg.port())
        .user("skusync")
        .dbname("postgres")
        .password(pw);
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("log in with the password the script set");
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "skusync");
}

/// Values a snapshot skips are counted and logged as the stream's are: every one in
/// `skusync_skipped_values_total`, a line per table, column and reason at most every 10 s
/// (not a line per row), and held per run of rows rather than per table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_skips_are_counted_and_rate_limited_like_the_streams() {
    let rig = Rig::new(false).await;
    // fractional quantities: skusync counts whole units only
    rig.exec(
        "INSERT INTO activity_log (sku, kind, qty)
           SELECT 'S-' || (i % 10), 'purchase', 0.5 FROM generate_series(1, 5000) i",
    )
    .await;
    let mut p = rig.start(&[]);
    rig.wait_status(&mut p, "/readyz", 200, Duration::from_secs(40))
        .await;
    let (status, scrape) = rig.get("/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&scrape, "skusync_skipped_values_total"),
        Some(5000.0),
        "{scrape}"
    );
    let log = p.log();
    let lines = log.matches("value skipped").count();
    assert!(lines <= 2, "{lines} lines for 5000 skips:\n{log}");
}
