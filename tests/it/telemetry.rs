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
    assert!(body.contains("redis"), "{body}");
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
