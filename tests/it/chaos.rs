//! Fault matrix: `skusync run` under SIGKILLs, server restarts/crashes/pauses, network
//! faults (through `harness::proxy`), slot invalidation and corrupted pgoutput frames.
//! Every cell ends with the oracle: Redis == SQL aggregate, retained MQTT == Redis, alert
//! duplicates only ever repeat an id with the same payload, and (sampled at random moments
//! throughout) the slot's `confirmed_flush_lsn` never passed the meta hash's `applied_lsn`.
//!
//! Short by default (one run per cell); `SKUSYNC_CHAOS_FULL=1` (`make chaos`) runs more
//! and longer. Each cell writes its row to `target/chaos/rows/`; `make chaos` assembles
//! `target/chaos/results.md`. Seeds are printed; replay with `SKUSYNC_TEST_SEED`.

use crate::fold_oracle::*;
use crate::harness::proxy::Proxy;
use crate::harness::{
    MosquittoServer, MqttOptions, PgOptions, PgServer, RedisOptions, RedisServer, StopMode,
};
use crate::mqtt_e2e::{Subscriber, retained_mismatches};
use crate::oracle::*;
use crate::support::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skusync::lsn::Lsn;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn full() -> bool {
    std::env::var("SKUSYNC_CHAOS_FULL").is_ok_and(|v| v == "1")
}

/// (runs per cell, statements per run)
fn scale() -> (usize, usize) {
    if full() { (3, 2500) } else { (1, 400) }
}

fn chaos_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("chaos")
}

/// One results-table row.
#[derive(Default, Debug)]
struct Row {
    runs: usize,
    skus: usize,
    mismatches: usize,
    max_recovery: Duration,
    lsn_samples: u64,
}

fn record(fault: &str, r: &Row) {
    let dir = chaos_dir().join("rows");
    let _ = std::fs::create_dir_all(&dir);
    let slug: String = fault
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let line = format!(
        "| {fault} | {} | {} | {} | {:.1} s | {} |\n",
        r.runs,
        r.skus,
        r.mismatches,
        r.max_recovery.as_secs_f64(),
        r.lsn_samples
    );
    eprintln!("CHAOS RESULT {line}");
    let _ = std::fs::write(dir.join(format!("{slug}.md")), line);
}

// ---------------------------------------------------------------------------------------
// LSN safety sampler

/// Samples `confirmed_flush_lsn` (PostgreSQL) then `applied_lsn` (Redis) at random moments;
/// since `applied_lsn` only grows, confirmed > applied is a real violation.
struct LsnChecker {
    stop: Arc<AtomicBool>,
    /// While set, samples are not judged: a fault that makes Redis lose writes puts it
    /// behind the slot on purpose until skusync repairs it.
    excused: Arc<AtomicBool>,
    samples: Arc<AtomicU64>,
    violations: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LsnChecker {
    fn start(pg_url: String, redis_url: String, seed: u64) -> LsnChecker {
        let stop = Arc::new(AtomicBool::new(false));
        let excused = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(AtomicU64::new(0));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let (st, sa, vi) = (stop.clone(), samples.clone(), violations.clone());
        let ex = excused.clone();
        let task = tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut pg: Option<tokio_postgres::Client> = None;
            let mut rc: Option<redis::aio::MultiplexedConnection> = None;
            let meta = skusync::sinks::layout::meta_key("skusync");
            while !st.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(10..150))).await;
                if pg.is_none() {
                    if let Ok(Ok((c, conn))) = tokio::time::timeout(
                        Duration::from_secs(1),
                        tokio_postgres::connect(&pg_url, tokio_postgres::NoTls),
                    )
                    .await
                    {
                        tokio::spawn(conn);
                        pg = Some(c);
                    } else {
                        continue;
                    }
                }
                if rc.is_none() {
                    let Ok(cl) = redis::Client::open(redis_url.as_str()) else {
                        continue;
                    };
                    match tokio::time::timeout(
                        Duration::from_secs(1),
                        cl.get_multiplexed_async_connection(),
                    )
                    .await
                    {
                        Ok(Ok(c)) => rc = Some(c),
                        _ => continue,
                    }
                }
                let q = pg.as_ref().unwrap().query_opt(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'skusync'",
                    &[],
                );
                let confirmed = match tokio::time::timeout(Duration::from_secs(1), q).await {
                    Ok(Ok(Some(row))) => row
                        .get::<_, Option<String>>(0)
                        .and_then(|s| s.parse::<Lsn>().ok()),
                    Ok(Ok(None)) => None,
                    _ => {
                        pg = None;
                        continue;
                    }
                };
                let con = rc.as_mut().unwrap();
                let applied: Option<String> = match tokio::time::timeout(
                    Duration::from_secs(1),
                    redis::cmd("HGET")
                        .arg(&meta)
                        .arg("applied_lsn")
                        .query_async(con),
                )
                .await
                {
                    Ok(Ok(v)) => v,
                    _ => {
                        rc = None;
                        continue;
                    }
                };
                let applied = applied.and_then(|s| s.parse::<u64>().ok()).map(Lsn);
                if let (Some(c), Some(a)) = (confirmed, applied)
                    && !ex.load(Ordering::SeqCst)
                {
                    sa.fetch_add(1, Ordering::SeqCst);
                    if c > a {
                        vi.lock()
                            .unwrap()
                            .push(format!("confirmed_flush_lsn {c} > applied_lsn {a}"));
                    }
                }
            }
        });
        LsnChecker {
            stop,
            excused,
            samples,
            violations,
            task,
        }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        (
            self.samples.load(Ordering::SeqCst),
            self.violations.lock().unwrap().clone(),
        )
    }
}

// ---------------------------------------------------------------------------------------
// MQTT observation

/// Alerts are observed by a live subscriber (connected to the broker directly, not via a
/// proxy): `crate::mqtt_e2e::Subscriber` on `skusync/alerts/#`.
/// Alert duplicates must repeat the same id with the same payload.
fn alert_violations(sub: &Subscriber) -> (usize, Vec<String>) {
    let mut by_id: BTreeMap<String, String> = BTreeMap::new();
    let mut bad = Vec::new();
    for (t, p) in sub.messages().iter() {
        if p.is_empty() {
            continue;
        }
        let Ok(j) = serde_json::from_str::<serde_json::Value>(p) else {
            bad.push(format!("{t}: not JSON: {p}"));
            continue;
        };
        let id = j["id"].as_str().unwrap_or_default().to_string();
        let want = format!(
            "{}:{}:{}",
            j["lsn"].as_str().unwrap_or("?"),
            j["type"].as_str().unwrap_or("?"),
            j["sku"].as_str().unwrap_or("?")
        );
        if id != want {
            bad.push(format!(
                "{t}: id {id:?} does not name its crossing {want:?}"
            ));
        }
        if let Some(prev) = by_id.insert(id.clone(), p.clone())
            && prev != *p
        {
            bad.push(format!("alert {id:?} repeated with another payload"));
        }
    }
    (by_id.len(), bad)
}

// ---------------------------------------------------------------------------------------
// The environment of one run

#[derive(Clone, Default)]
struct Setup {
    redis_persistence: bool,
    mqtt: Option<bool>, // Some(persistence)
    proxies: bool,
    /// Redis only behind a proxy (its address survives a failover), the LSN checker too.
    redis_proxy: bool,
    resyncs: bool, // buckets are not comparable after a resync
    pg_conf: Vec<String>,
    pg_extra: String,
}

struct Env {
    rig: Rig,
    broker: Option<MosquittoServer>,
    pg_proxy: Option<Proxy>,
    redis_proxy: Option<Proxy>,
    mqtt_proxy: Option<Proxy>,
    sub: Option<Subscriber>,
    checker: Option<LsnChecker>,
    recoveries: Vec<Duration>,
    big: u64,
    seed: u64,
}

impl Env {
    async fn new(s: &Setup, seed: u64) -> Env {
        let pg = PgServer::start_with(PgOptions {
            extra_conf: s.pg_conf.clone(),
            ..Default::default()
        });
        pg.psql(PUBLIC_SCHEMA);
        let redis = RedisServer::start_with(RedisOptions {
            persistence: s.redis_persistence,
            ..Default::default()
        });
        let client = pg.client("postgres").await;
        let con = redis_connect(&redis.url()).await;
        let buckets = if s.resyncs {
            Buckets::Ignore
        } else {
            Buckets::SumEqualsTotal
        };
        let rig = Rig {
            pg,
            redis,
            client,
            con,
            oracle: public_oracle(buckets),
            daemon: None,
            dir: tempfile::tempdir().expect("tempdir"),
            markers: 0,
        };
        let broker = s.mqtt.map(|persistence| {
            MosquittoServer::start_with(MqttOptions {
                persistence,
                ..Default::default()
            })
        });
        let (pg_proxy, redis_proxy, mqtt_proxy) = if s.proxies {
            (
                Some(Proxy::start(rig.pg.port())),
                Some(Proxy::start(rig.redis.port())),
                broker.as_ref().map(|b| Proxy::start(b.port())),
            )
        } else if s.redis_proxy {
            (None, Some(Proxy::start(rig.redis.port())), None)
        } else {
            (None, None, None)
        };
        Env {
            rig,
            broker,
            pg_proxy,
            redis_proxy,
            mqtt_proxy,
            sub: None,
            checker: None,
            recoveries: Vec::new(),
            big: 0,
            seed,
        }
    }

    fn config(&self, pg_extra: &str) -> String {
        let pg_url = self.rig.pg.url("postgres", "postgres");
        let redis_url = self.rig.redis.url();
        let pg_url = self
            .pg_proxy
            .as_ref()
            .map_or(pg_url.clone(), |p| p.url(&pg_url));
        let redis_url = self
            .redis_proxy
            .as_ref()
            .map_or(redis_url.clone(), |p| p.url(&redis_url));
        let mut text = self
            .rig
            .oracle
            .config_toml(&pg_url, "skusync", PUBS, &redis_url)
            .replacen("[postgres]\n", &format!("[postgres]\n{pg_extra}"), 1)
            // several pieces per big transaction: kills land between pieces too
            .replacen("[redis]\n", "[redis]\nmax_changes_per_piece = 3000\n", 1);
        if let Some(b) = &self.broker {
            let url = b.url();
            let url = self
                .mqtt_proxy
                .as_ref()
                .map_or(url.clone(), |p| p.url(&url));
            text.push_str(&format!(
                "\n[mqtt]\nurl = \"{url}\"\ntopic_prefix = \"skusync\"\nmin_interval_ms = 20\n"
            ));
        }
        text
    }

    async fn start(&mut self, s: &Setup) {
        let cfg = write_config(self.rig.dir.path(), &self.config(&s.pg_extra));
        self.rig.daemon = Some(Daemon::start(self.rig.dir.path(), cfg));
        self.rig.wait_bootstrap(Duration::from_secs(60)).await;
        if let Some(b) = &self.broker {
            self.sub = Some(Subscriber::start(b, "skusync/alerts/#"));
        }
        let redis_url = self.rig.redis.url();
        let redis_url = match (&self.redis_proxy, s.redis_proxy) {
            // the address that survives a failover
            (Some(p), true) => p.url(&redis_url),
            _ => redis_url,
        };
        self.checker = Some(LsnChecker::start(
            self.rig.pg.url("postgres", "postgres"),
            redis_url,
            self.seed ^ 0x15,
        ));
    }

    async fn workload(&mut self, w: &mut Workload, statements: usize) {
        let target = w.statements + statements;
        while w.statements < target {
            let sql = w.next_txn();
            self.rig.exec(&sql).await;
        }
    }

    /// The 20k-row transaction (plus activity rows), on its own connection; the task's
    /// result says whether it committed.
    fn big_txn(&mut self) -> tokio::task::JoinHandle<Result<(), String>> {
        self.big += 1;
        let k = self.big;
        let url = self.rig.pg.url("postgres", "postgres");
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            c.batch_execute(&format!(
                "BEGIN;
                     INSERT INTO inventory (sku, location, on_hand, reserved)
                       SELECT 'big-' || (i % 997), 'B{k}-' || (i / 997), i % 50, i % 3
                       FROM generate_series(1, 20000) i;
                     INSERT INTO activity_log (sku, kind, qty)
                       SELECT 'big-' || (i % 997), 'view', 1 FROM generate_series(1, 2000) i;
                     UPDATE inventory SET on_hand = on_hand + 1 WHERE location = 'B{k}-3';
                     COMMIT;"
            ))
            .await
            .map_err(|e| e.to_string())
        })
    }

    /// `pg_current_wal_lsn()`, as a number.
    fn wal_lsn(&self) -> u64 {
        let s = self.rig.pg.psql("SELECT pg_current_wal_lsn()");
        s.parse::<Lsn>().expect("an LSN").0
    }

    /// The Redis meta hash's `applied_lsn` (0 when unset).
    async fn applied_lsn(&mut self) -> u64 {
        let meta = skusync::sinks::layout::meta_key("skusync");
        hget(&mut self.rig.con, &meta, "applied_lsn")
            .await
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The commit LSN that last wrote the SKU hash of `sku` (0 when absent).
    async fn sku_lsn(&mut self, sku: &str) -> u64 {
        let key = skusync::sinks::layout::sku_key("skusync", sku);
        hget(&mut self.rig.con, &key, "lsn")
            .await
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    async fn reconnect_pg(&mut self) {
        self.rig.client = self.rig.pg.client("postgres").await;
    }

    async fn reconnect_redis(&mut self) {
        self.rig.con = redis_connect(&self.rig.redis.url()).await;
    }

    /// The fault just ended: time until a drain marker is in Redis (and, with MQTT, its
    /// retained state is published).
    async fn recover(&mut self, timeout: Duration) {
        let t0 = Instant::now();
        self.rig
            .drain(&WorkloadTables::public(), "WH-1", timeout)
            .await;
        if let Some(b) = &self.broker {
            let topic = skusync::sinks::mqtt::sku_topic("skusync", &marker_sku(self.rig.markers));
            let want = self.rig.markers as i64;
            loop {
                let got = b.retained(&topic, Duration::from_millis(300));
                let decoded: Vec<serde_json::Value> = got
                    .iter()
                    .filter(|(_, p)| !p.is_empty())
                    .map(|(t, p)| {
                        serde_json::from_slice(p).unwrap_or_else(|e| {
                            panic!(
                                "{t}: retained payload is not JSON ({e}): {:?}",
                                String::from_utf8_lossy(p)
                            )
                        })
                    })
                    .collect();
                if decoded.iter().any(|j| j["on_hand"].as_i64() == Some(want)) {
                    break;
                }
                assert!(
                    t0.elapsed() < timeout,
                    "marker {want} never retained\n{}",
                    self.rig.daemon().stderr_all()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let d = t0.elapsed();
        eprintln!("recovered in {d:?}");
        self.recoveries.push(d);
    }

    /// The final oracle; returns (SKUs checked, mismatches) and panics on any.
    async fn verify(&mut self) -> (usize, u64) {
        self.rig
            .drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
            .await;
        self.rig.assert_converges(Duration::from_secs(30)).await;
        let skus = self.rig.oracle.truth(&self.rig.client).await.skus.len();
        if let Some(b) = self.broker.take() {
            let start = Instant::now();
            loop {
                let m = retained_mismatches(&mut self.rig, &b).await;
                if m.is_empty() {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "retained differs from Redis:\n{}\n{}",
                    m.iter().take(30).cloned().collect::<Vec<_>>().join("\n"),
                    self.rig.daemon().stderr_all()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            self.broker = Some(b);
        }
        if let Some(s) = &self.sub {
            let (n, bad) = alert_violations(s);
            eprintln!("{n} distinct alerts observed");
            assert!(bad.is_empty(), "alert violations: {bad:#?}");
        }
        // `skusync verify`, the operators' oracle, agrees (read-only, with the retained
        // states when a broker is attached).
        let cfg = self.rig.daemon().cfg.clone();
        let mut args = vec!["--rounds", "3"];
        if self.broker.is_some() {
            args.push("--mqtt");
        }
        let (code, out, err) = crate::verify::verify(&cfg, &args);
        assert_eq!(code, 0, "skusync verify {args:?}:\n{out}\n{err}");
        let mut samples = 0;
        if let Some(c) = self.checker.take() {
            let (n, v) = c.finish().await;
            samples = n;
            assert!(v.is_empty(), "slot confirmed past Redis: {v:#?}");
            // a checker that never compared anything proves nothing
            assert!(n > 0, "the LSN safety sampler took no sample");
        }
        let log = full_log(self.rig.daemon());
        assert!(!log.contains("panicked"), "skusync panicked:\n{log}");
        (skus, samples)
    }
}

/// How many times the daemon said Redis lost writes: refused by the floor while running
/// ("Redis lost recent writes"), or found on a restarted cycle, below the floor it held
/// (same words) or behind the slot ("Redis is behind the slot", which rebuilds).
fn lost_writes_noticed(d: &Daemon) -> usize {
    let log = full_log(d);
    log.matches("Redis lost recent writes").count()
        + log.matches("Redis is behind the slot").count()
}

/// Every incarnation's complete stderr.
fn full_log(d: &Daemon) -> String {
    let mut s = String::new();
    for i in 0..d.runs {
        for e in std::fs::read_dir(d.dir.join(format!("run{i}")))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "stderr") {
                s.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    s
}

const RESYNC_LOG: &str = "rebuilding Redis from a fresh snapshot";

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill9,
    Kill9MidBigTxn,
    WalsenderTerminate,
    PgRestartFast,
    PgRestartImmediate,
    PgCrashMidBigTxn,
    RedisRestartPersistent,
    RedisRestartVolatile,
    /// SIGKILL with AOF `everysec` right after applies: the last second may be lost.
    RedisKill9Aof,
    /// Restarted from an RDB dump taken a workload earlier (RDB only): Redis comes back
    /// older while the slot has confirmed past it.
    RedisOlderDump,
    /// The primary SIGKILLed and a replica that fell behind promoted behind the same
    /// address (a proxy): Redis comes back older, through a failover.
    RedisReplicaPromoted,
    RedisPause,
    MqttRestart,
    MqttPause,
    ProxyCutAll,
    ProxyStall,
    ProxyDelay,
    PgBlackHole,
}

/// How long the PostgreSQL black hole lasts: long enough for the silence timeout (15 s
/// with the cell's wal_sender_timeout of 10 s) to fire by default, two minutes under `SKUSYNC_CHAOS_FULL=1`.
fn black_hole_duration() -> Duration {
    if full() {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(22)
    }
}

/// skusync must take a black-holed replication connection for dead within this (its
/// silence timeout is 15 s, checked at every 1 s status tick).
const DEAD_CONNECTION_BOUND: Duration = Duration::from_secs(20);

impl Fault {
    fn setup(self) -> Setup {
        use Fault::*;
        let mut s = Setup {
            redis_persistence: true,
            ..Default::default()
        };
        match self {
            RedisRestartVolatile => {
                s.redis_persistence = false;
                s.resyncs = true;
            }
            RedisKill9Aof => {
                s.mqtt = Some(true);
                s.resyncs = true;
            }
            RedisOlderDump => {
                s.redis_persistence = false;
                s.mqtt = Some(true);
                s.resyncs = true;
            }
            RedisReplicaPromoted => {
                s.redis_persistence = false;
                s.redis_proxy = true;
                s.mqtt = Some(true);
                s.resyncs = true;
            }
            MqttRestart | MqttPause => s.mqtt = Some(true),
            ProxyCutAll | ProxyStall | ProxyDelay => {
                s.proxies = true;
                s.mqtt = Some(true);
            }
            PgBlackHole => {
                s.proxies = true;
                s.mqtt = Some(true);
                // skusync allows the server's wal_sender_timeout of silence (see
                // `silence_within_wal_sender_timeout_keeps_the_replication_connection`):
                // at 10 s its own 15 s applies
                s.pg_conf = vec!["wal_sender_timeout = '10s'".into()];
            }
            _ => {}
        }
        s
    }

    /// Faults per run.
    fn count(self) -> usize {
        use Fault::*;
        let f = full();
        match self {
            Kill9 => 10,
            Kill9MidBigTxn => {
                if f {
                    4
                } else {
                    2
                }
            }
            // every path once: Redis, PostgreSQL, MQTT
            ProxyStall => 3,
            PgBlackHole => 1,
            RedisPause | MqttPause => {
                if f {
                    2
                } else {
                    1
                }
            }
            _ => {
                if f {
                    3
                } else {
                    2
                }
            }
        }
    }
}

async fn inject(env: &mut Env, w: &mut Workload, fault: Fault, i: usize, rng: &mut StdRng) {
    use Fault::*;
    match fault {
        Kill9 => {
            let sql = w.next_txn();
            env.rig.exec(&sql).await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
            env.rig.daemon().kill9_and_restart();
        }
        Kill9MidBigTxn => {
            let before = env.wal_lsn();
            env.big_txn()
                .await
                .expect("big txn task")
                .expect("the 20k-row transaction committed");
            // Kill once its first piece is in Redis, with the rest still to apply (up to
            // 20 ms later, so some kills also land between later pieces).
            let t0 = Instant::now();
            while env.sku_lsn("big-0").await <= before {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "skusync never started applying the 20k-row transaction\n{}",
                    env.rig.daemon().stderr_all()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
            let d = env.rig.daemon.as_mut().expect("daemon");
            let mut p = d.proc.take().expect("running");
            let _ = p.child.kill();
            let _ = p.child.wait();
            drop(p);
            // The kill hit the apply: one piece of the transaction is in Redis, but the
            // meta hash never recorded its end (applied_lsn stays at or below its commit).
            let commit = env.sku_lsn("big-0").await;
            let applied = env.applied_lsn().await;
            eprintln!("SIGKILL landed: big txn commit {commit}, applied_lsn {applied}");
            assert!(
                commit > before && applied <= commit,
                "the SIGKILL landed after the 20k-row transaction was fully applied \
                 (commit {commit}, applied_lsn {applied})"
            );
            env.rig.daemon().spawn();
        }
        WalsenderTerminate => {
            // Wait for a walsender to hold the slot, terminate it, and check both that it
            // was terminated and that a new one took its place.
            let active_pid = |env: &Env| {
                env.rig.pg.psql(
                    "SELECT coalesce(active_pid, 0) FROM pg_replication_slots
                     WHERE slot_name = 'skusync'",
                )
            };
            let t0 = Instant::now();
            let mut pid = active_pid(env);
            while pid == "0" || pid.is_empty() {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "no walsender holds the slot"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                pid = active_pid(env);
            }
            let done = env
                .rig
                .pg
                .psql(&format!("SELECT pg_terminate_backend({pid})"));
            assert_eq!(done, "t", "pg_terminate_backend({pid}) terminated nothing");
            env.workload(w, 20).await;
            let t0 = Instant::now();
            loop {
                let now = active_pid(env);
                if now != "0" && now != pid {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "no new walsender after terminating {pid}\n{}",
                    env.rig.daemon().stderr_all()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        PgRestartFast | PgRestartImmediate => {
            let mode = if matches!(fault, PgRestartFast) {
                StopMode::Fast
            } else {
                StopMode::Immediate
            };
            env.rig.pg.restart(mode);
            env.reconnect_pg().await;
        }
        PgCrashMidBigTxn => {
            let h = env.big_txn();
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..400))).await;
            env.rig.pg.kill9();
            let _ = h.await;
            env.rig.pg.start_again();
            env.reconnect_pg().await;
        }
        RedisRestartPersistent | RedisRestartVolatile => {
            let before = full_log(env.rig.daemon()).matches(RESYNC_LOG).count();
            env.rig.redis.restart();
            env.reconnect_redis().await;
            env.recover(Duration::from_secs(90)).await;
            let after = full_log(env.rig.daemon()).matches(RESYNC_LOG).count();
            if matches!(fault, RedisRestartVolatile) {
                assert!(
                    after > before,
                    "a Redis restart without persistence must log a resync\n{}",
                    env.rig.daemon().stderr_all()
                );
            } else {
                assert_eq!(
                    after,
                    before,
                    "a Redis restart with persistence needs no resync\n{}",
                    env.rig.daemon().stderr_all()
                );
            }
            return;
        }
        RedisKill9Aof => {
            // Under load: transactions committed just before the kill may be applied in
            // the second AOF did not write yet.
            for _ in 0..5 {
                let sql = w.next_txn();
                env.rig.exec(&sql).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
            // Losing the last second may put Redis behind the slot until skusync repairs
            // it: samples are judged again once a marker went through.
            if let Some(c) = &env.checker {
                c.excused.store(true, Ordering::SeqCst);
            }
            env.rig.redis.kill9();
            env.rig.redis.start_again();
            env.reconnect_redis().await;
            env.recover(Duration::from_secs(90)).await;
            if let Some(c) = &env.checker {
                c.excused.store(false, Ordering::SeqCst);
            }
        }
        RedisOlderDump => {
            let excuse = |env: &Env, on: bool| {
                if let Some(c) = &env.checker {
                    c.excused.store(on, Ordering::SeqCst);
                }
            };
            // Read before SAVE: keepalive-only progress may still move applied_lsn while
            // the dump is written, so the dump holds at least this.
            let saved = env.applied_lsn().await;
            env.rig.redis.cli(&["SAVE"]);
            env.workload(w, 50).await;
            env.recover(Duration::from_secs(60)).await;
            let before_kill = env.applied_lsn().await;
            assert!(before_kill > saved, "work after the dump");
            let refused = lost_writes_noticed(env.rig.daemon());
            excuse(env, true);
            env.rig.redis.kill9();
            env.rig.redis.start_again();
            env.reconnect_redis().await;
            // The fault landed: Redis came back older (unless skusync already noticed).
            let back = env.applied_lsn().await;
            assert!(
                back < before_kill || lost_writes_noticed(env.rig.daemon()) > refused,
                "Redis came back at applied_lsn {back}, not older than {before_kill}"
            );
            let t0 = Instant::now();
            while lost_writes_noticed(env.rig.daemon()) == refused {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "the older Redis was never noticed\n{}",
                    env.rig.daemon().stderr_all()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Judged again once the rebuild is done and a marker went through.
            env.recover(Duration::from_secs(90)).await;
            excuse(env, false);
        }
        RedisReplicaPromoted => {
            let excuse = |env: &Env, on: bool| {
                if let Some(c) = &env.checker {
                    c.excused.store(on, Ordering::SeqCst);
                }
            };
            let lost = |env: &mut Env| lost_writes_noticed(env.rig.daemon());
            let mut replica = RedisServer::start();
            replica.cli(&["REPLICAOF", "127.0.0.1", &env.rig.redis.port().to_string()]);
            let t0 = Instant::now();
            while !replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "the replica never synced"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            env.workload(w, 30).await;
            env.recover(Duration::from_secs(60)).await;
            // The replica stops following (as one that lags does) and the primary moves on.
            let at_split = env.applied_lsn().await;
            replica.cli(&["REPLICAOF", "NO", "ONE"]);
            env.workload(w, 50).await;
            env.recover(Duration::from_secs(60)).await;
            let before_kill = env.applied_lsn().await;
            assert!(before_kill > at_split, "work after the split");
            let refused = lost(env);
            excuse(env, true);
            // Failover: the primary dies, the replica takes its address.
            env.rig.redis.kill9();
            let p = env.redis_proxy.as_ref().expect("redis behind a proxy");
            p.retarget(replica.port());
            let cut = p.cut();
            std::mem::swap(&mut env.rig.redis, &mut replica);
            env.reconnect_redis().await;
            let back = env.applied_lsn().await;
            assert!(
                back < before_kill || lost(env) > refused,
                "the promoted replica is at applied_lsn {back}, not older than {before_kill} (cut {cut})"
            );
            let t0 = Instant::now();
            while lost(env) == refused {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "the promoted, older replica was never noticed\n{}",
                    env.rig.daemon().stderr_all()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            env.recover(Duration::from_secs(90)).await;
            excuse(env, false);
            // `replica` now holds the dead primary: dropped here.
        }
        RedisPause => {
            env.rig.redis.pause();
            let t = Instant::now();
            env.workload(w, 100).await;
            tokio::time::sleep(Duration::from_secs(8).saturating_sub(t.elapsed())).await;
            env.rig.redis.resume();
        }
        MqttRestart => {
            let b = env.broker.as_mut().unwrap();
            if i.is_multiple_of(2) {
                b.restart();
            } else {
                // crash losing the persistence file: no retained messages at all
                b.kill9();
                let _ = std::fs::remove_file(b.dir().join("mosquitto.db"));
                b.start_again();
            }
        }
        MqttPause => {
            env.broker.as_mut().unwrap().pause();
            env.workload(w, 100).await;
            tokio::time::sleep(Duration::from_secs(8)).await;
            env.broker.as_mut().unwrap().resume();
        }
        ProxyCutAll => {
            fn proxies(env: &Env) -> [(&'static str, &Option<Proxy>); 3] {
                [
                    ("PostgreSQL", &env.pg_proxy),
                    ("Redis", &env.redis_proxy),
                    ("MQTT", &env.mqtt_proxy),
                ]
            }
            let accepted: Vec<usize> = proxies(env)
                .into_iter()
                .map(|(_, p)| p.as_ref().map_or(0, |p| p.accepted()))
                .collect();
            for (name, p) in proxies(env) {
                if let Some(p) = p {
                    let cut = p.cut();
                    assert!(cut > 0, "{name}: the cut found no open connection");
                }
            }
            env.workload(w, 30).await;
            if let Some(p) = &env.pg_proxy {
                p.cut();
            }
            env.recover(Duration::from_secs(90)).await;
            // The cut connections were replaced: each path was dialled again.
            for ((name, p), before) in proxies(env).into_iter().zip(accepted) {
                if let Some(p) = p {
                    assert!(
                        p.accepted() > before,
                        "{name}: no new connection after the cut ({before} before)"
                    );
                }
            }
            return;
        }
        ProxyStall => {
            // one path at a time (round robin), 6 s each
            let p = [&env.redis_proxy, &env.pg_proxy, &env.mqtt_proxy][i % 3]
                .as_ref()
                .unwrap();
            let held = p.held();
            p.set_stalled(true);
            env.workload(w, 60).await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            let p = [&env.redis_proxy, &env.pg_proxy, &env.mqtt_proxy][i % 3]
                .as_ref()
                .unwrap();
            p.set_stalled(false);
            let path = ["Redis", "PostgreSQL", "MQTT"][i % 3];
            assert!(
                p.held() > held,
                "the {path} stall held no traffic: nothing was stalled"
            );
        }
        PgBlackHole => {
            let p = env.pg_proxy.as_ref().unwrap();
            let (held, accepted) = (p.held(), p.accepted());
            // Either watch may fire first: the replication connection's silence, or the
            // writer lock session's failed pings (both go through the black hole).
            let dead = |log: &str| {
                log.matches("taking the replication connection for dead")
                    .count()
                    + log.matches("lost the writer lock session").count()
            };
            let seen = dead(&full_log(env.rig.daemon()));
            let hole = black_hole_duration();
            let t0 = Instant::now();
            p.set_black_hole(true);
            env.workload(w, 60).await;
            let mut detected = None;
            while t0.elapsed() < hole {
                if detected.is_none() && dead(&full_log(env.rig.daemon())) > seen {
                    detected = Some(t0.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let p = env.pg_proxy.as_ref().unwrap();
            p.set_black_hole(false);
            eprintln!("black hole {hole:?}: dead connection detected after {detected:?}");
            assert!(p.held() > held, "the black hole held no traffic");
            let detected = detected.unwrap_or_else(|| {
                panic!(
                    "skusync did not notice the black-holed replication connection within {hole:?}\n{}",
                    env.rig.daemon().stderr_all()
                )
            });
            assert!(
                detected < DEAD_CONNECTION_BOUND,
                "dead connection detected after {detected:?} (bound {DEAD_CONNECTION_BOUND:?})"
            );
            env.recover(Duration::from_secs(90)).await;
            assert!(
                env.pg_proxy.as_ref().unwrap().accepted() > accepted,
                "skusync never reconnected through the proxy"
            );
            return;
        }
        ProxyDelay => {
            for p in [&env.pg_proxy, &env.redis_proxy, &env.mqtt_proxy]
                .into_iter()
                .flatten()
            {
                p.set_delay(Duration::from_millis(rng.random_range(5..60)));
            }
            env.workload(w, 150).await;
            for p in [&env.pg_proxy, &env.redis_proxy, &env.mqtt_proxy]
                .into_iter()
                .flatten()
            {
                p.set_delay(Duration::ZERO);
            }
        }
    }
    env.recover(Duration::from_secs(90)).await;
}

async fn cell(name: &str, fault: Fault) {
    let (runs, statements) = scale();
    let mut row = Row::default();
    for run in 0..runs {
        let seed = test_seed(&format!("chaos {name} run {run}"));
        let s = fault.setup();
        let mut env = Env::new(&s, seed).await;
        env.start(&s).await;
        let mut w = public_workload(seed);
        let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17);
        let n = fault.count();
        for i in 0..n {
            env.workload(&mut w, statements / (n + 1)).await;
            eprintln!("{name}: fault {i} of {n}");
            inject(&mut env, &mut w, fault, i, &mut rng).await;
        }
        env.workload(&mut w, statements / (n + 1)).await;
        let (skus, samples) = env.verify().await;
        row.runs += 1;
        row.skus += skus;
        row.lsn_samples += samples;
        row.max_recovery = row
            .max_recovery
            .max(env.recoveries.iter().copied().max().unwrap_or_default());
        if let Some(d) = env.rig.daemon.as_mut() {
            assert_eq!(d.sigterm(), Some(0), "{}", d.stderr_all());
        }
    }
    record(name, &row);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_skusync_sigkill_at_random_points() {
    cell("skusync SIGKILL x10 (0-300 ms)", Fault::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_skusync_sigkill_mid_20k_row_transaction() {
    cell("skusync SIGKILL mid 20k-row txn", Fault::Kill9MidBigTxn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_walsender_terminated() {
    cell("walsender terminated", Fault::WalsenderTerminate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_postgres_restart_fast() {
    cell("PostgreSQL restart (fast)", Fault::PgRestartFast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_postgres_restart_immediate() {
    cell("PostgreSQL restart (immediate)", Fault::PgRestartImmediate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_postgres_crash_mid_big_transaction() {
    cell(
        "PostgreSQL kill -9 mid 20k-row txn",
        Fault::PgCrashMidBigTxn,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_restart_with_persistence() {
    cell("Redis restart (AOF)", Fault::RedisRestartPersistent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_restart_without_persistence_resyncs() {
    cell(
        "Redis restart (no persistence: resync)",
        Fault::RedisRestartVolatile,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_sigkill_with_aof_everysec_under_load() {
    cell(
        "Redis SIGKILL (AOF everysec) under load, MQTT attached",
        Fault::RedisKill9Aof,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_restarted_from_an_older_dump() {
    cell(
        "Redis back from an older RDB dump, MQTT attached",
        Fault::RedisOlderDump,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_replica_promoted_behind_the_same_address() {
    cell(
        "Redis replica that fell behind promoted (primary SIGKILLed), MQTT attached",
        Fault::RedisReplicaPromoted,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_paused_8s() {
    cell("Redis SIGSTOP 8 s", Fault::RedisPause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_mosquitto_restart_with_and_without_persistence() {
    cell(
        "Mosquitto restart / crash losing its db",
        Fault::MqttRestart,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_mosquitto_paused() {
    cell("Mosquitto SIGSTOP 8 s", Fault::MqttPause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_network_cut_all_connections() {
    cell("proxy: cut all connections", Fault::ProxyCutAll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_network_stall() {
    cell("proxy: stall 6 s (Redis, PG, MQTT)", Fault::ProxyStall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_postgres_black_holed_is_detected_and_loses_nothing() {
    let name = format!(
        "proxy: PostgreSQL black hole {} s",
        black_hole_duration().as_secs()
    );
    cell(&name, Fault::PgBlackHole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_network_delay() {
    cell("proxy: 5-60 ms delay per chunk", Fault::ProxyDelay).await;
}

// ---------------------------------------------------------------------------------------
// Slot invalidation

const TINY_WAL: &[&str] = &[
    "max_slot_wal_keep_size = '1MB'",
    "max_wal_size = '32MB'",
    "min_wal_size = '32MB'",
];

/// Stop skusync, then generate WAL until the slot is `lost`.
async fn lose_the_slot(env: &mut Env) {
    assert_eq!(env.rig.daemon().sigterm(), Some(0));
    fill_wal_until_the_slot_is_lost(env).await;
}

/// Generate WAL until the slot is `lost` (the slot must not advance meanwhile).
async fn fill_wal_until_the_slot_is_lost(env: &mut Env) {
    for i in 0..200 {
        env.rig
            .exec(&format!(
                "INSERT INTO activity_log (sku, kind, qty) SELECT 'wal-filler', 'other', {i}
                   FROM generate_series(1, 2000);
                 SELECT pg_switch_wal();"
            ))
            .await;
        if i % 5 == 4 {
            env.rig.exec("CHECKPOINT").await;
            let st = env
                .rig
                .pg
                .psql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'skusync'");
            if st == "lost" {
                eprintln!("slot lost after {} WAL switches", i + 1);
                return;
            }
        }
    }
    panic!("slot never became lost");
}

/// A walsender decoding a large transaction that publishes nothing (a retention DELETE of
/// an unpublished table) reads status updates, and answers their reply requests, only
/// about every `wal_sender_timeout / 2`, and sends nothing else. skusync allows the
/// server's `wal_sender_timeout` (60 s here) of silence: 20 s of a stalled PostgreSQL path
/// pass without a reconnect. Before, 15 s cut the connection, and a transaction whose
/// decoding took longer was decoded again at every reconnect, the slot never passing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_within_wal_sender_timeout_keeps_the_replication_connection() {
    let seed = test_seed("silence_within_wal_sender_timeout_keeps_the_replication_connection");
    let s = Setup {
        proxies: true,
        pg_conf: vec!["wal_sender_timeout = '60s'".into()],
        ..Default::default()
    };
    let mut env = Env::new(&s, seed).await;
    env.start(&s).await;
    let mut w = public_workload(seed);
    env.workload(&mut w, 50).await;
    env.rig
        .drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let p = env.pg_proxy.as_ref().unwrap();
    p.set_stalled(true);
    tokio::time::sleep(Duration::from_secs(20)).await;
    env.pg_proxy.as_ref().unwrap().set_stalled(false);
    env.workload(&mut w, 50).await;
    env.verify().await;
    let log = full_log(env.rig.daemon());
    assert!(
        !log.contains("taking the replication connection for dead"),
        "20 s of silence under a 60 s wal_sender_timeout cut the connection\n{log}"
    );
    env.rig.daemon().assert_alive("after the silence");
}

/// The slot invalidated while skusync runs: Redis stalls (SIGSTOP), so the slot cannot
/// advance, and WAL passes `max_slot_wal_keep_size`; the walsender is terminated and the
/// reconnect finds the slot lost. With `on_slot_lost = "resync"` the next cycle drops it
/// and rebuilds. Before, the reconnect's error ended the process with the "stop" advice
/// although resync was configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_slot_invalidated_while_running_resyncs() {
    let seed = test_seed("chaos_slot_invalidated_while_running_resyncs");
    let (_, statements) = scale();
    let s = Setup {
        pg_conf: TINY_WAL.iter().map(|s| s.to_string()).collect(),
        redis_persistence: true,
        resyncs: true,
        pg_extra: "on_slot_lost = \"resync\"\n".into(),
        ..Default::default()
    };
    let mut env = Env::new(&s, seed).await;
    env.start(&s).await;
    let mut w = public_workload(seed);
    env.workload(&mut w, statements / 4).await;
    env.rig
        .drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    // the sampler reads Redis, which stalls now; a rebuild's slot starts ahead of it
    if let Some(c) = env.checker.take() {
        let (_, v) = c.finish().await;
        assert!(v.is_empty(), "{v:?}");
    }
    env.rig.redis.pause();
    env.workload(&mut w, statements / 8).await;
    fill_wal_until_the_slot_is_lost(&mut env).await;
    env.rig.redis.resume();
    env.workload(&mut w, statements / 8).await;
    env.verify().await;
    let log = full_log(env.rig.daemon());
    assert!(log.contains("slot lost WAL"), "resync logged\n{log}");
    env.rig.daemon().assert_alive("after the resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_slot_invalidated_while_down_stops_or_resyncs() {
    let seed = test_seed("chaos_slot_invalidated_while_down_stops_or_resyncs");
    let (_, statements) = scale();
    let s = Setup {
        pg_conf: TINY_WAL.iter().map(|s| s.to_string()).collect(),
        redis_persistence: true,
        resyncs: true,
        ..Default::default()
    };
    let mut env = Env::new(&s, seed).await;
    env.start(&s).await;
    let mut w = public_workload(seed);
    env.workload(&mut w, statements / 2).await;
    env.rig
        .drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    if let Some(c) = env.checker.take() {
        let (n, v) = c.finish().await;
        assert!(v.is_empty(), "{v:?}");
        assert!(n > 0, "the LSN safety sampler took no sample");
    }
    lose_the_slot(&mut env).await;
    env.workload(&mut w, statements / 4).await;
    // Default on_slot_lost = "stop": exits non-zero naming the slot and the fix.
    let t0 = Instant::now();
    env.rig.daemon().spawn();
    let code = loop {
        if let Ok(Some(st)) = env.rig.daemon().proc().child.try_wait() {
            break st.code();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "skusync did not stop on a lost slot\n{}",
            env.rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = env.rig.daemon().proc().stderr();
    assert_ne!(code, Some(0), "{log}");
    for needle in [
        "\"skusync\"",
        "wal_status = lost",
        "on_slot_lost = \\\"resync\\\"",
        "pg_drop_replication_slot('skusync')",
    ] {
        let plain = needle.replace("\\\"", "\"");
        assert!(
            log.contains(needle) || log.contains(&plain),
            "stop message names {plain:?}:\n{log}"
        );
    }
    assert!(!log.contains("panicked"), "{log}");
    // on_slot_lost = "resync": recovers from a fresh snapshot.
    let cfg = write_config(
        env.rig.dir.path(),
        &env.config("on_slot_lost = \"resync\"\n"),
    );
    env.rig.daemon().cfg = cfg;
    let t0 = Instant::now();
    env.rig.daemon().spawn();
    env.recover(Duration::from_secs(90)).await;
    let rec = t0.elapsed();
    // The marker can reach Redis inside the snapshot load itself, before the load records
    // its end (`bootstrap = done`, `applied_lsn` = the new slot's start): wait for that.
    let t1 = Instant::now();
    loop {
        let meta = skusync::sinks::layout::meta_key("skusync");
        let done = hget(&mut env.rig.con, &meta, "bootstrap").await.as_deref() == Some("done");
        let applied: u64 = hget(&mut env.rig.con, &meta, "applied_lsn")
            .await
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let confirmed: Option<Lsn> = env
            .rig
            .pg
            .psql(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'skusync'",
            )
            .parse()
            .ok();
        if done && confirmed.is_some_and(|c| applied >= c.0) {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "the rebuild never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The LSN sampler restarts only now: while the rebuilt slot's snapshot loads, its
    // confirmed LSN (the snapshot point) is ahead of the old `applied_lsn` in Redis, as on
    // any first bootstrap. A crash in that window is caught at startup ("Redis is behind
    // the slot") and resyncs again.
    env.checker = Some(LsnChecker::start(
        env.rig.pg.url("postgres", "postgres"),
        env.rig.redis.url(),
        seed,
    ));
    env.workload(&mut w, statements / 4).await;
    let (skus, samples) = env.verify().await;
    assert!(
        full_log(env.rig.daemon()).contains("slot lost WAL"),
        "resync logged"
    );
    record(
        "slot lost while down (stop, then on_slot_lost=resync)",
        &Row {
            runs: 1,
            skus,
            mismatches: 0,
            max_recovery: rec,
            lsn_samples: samples,
        },
    );
}

// ---------------------------------------------------------------------------------------
// Bad input on the wire

/// Truncated and corrupted pgoutput frames through the decoder and the assembler, exactly
/// as `source.rs` does it: an error naming the LSN, never a panic.
#[test]
fn chaos_corrupted_pgoutput_frames_give_an_lsn_error_not_a_panic() {
    use bytes::{Bytes, BytesMut};
    use skusync::pgoutput::{Column, Datum, Decoder, Message, Relation, encode};
    use skusync::source::SourceError;
    use skusync::txn::Assembler;
    let seed = test_seed("chaos_corrupted_pgoutput_frames_give_an_lsn_error_not_a_panic");
    let mut rng = StdRng::seed_from_u64(seed);
    let t = |s: &str| Datum::Text(Bytes::copy_from_slice(s.as_bytes()));
    let rel = Relation {
        xid: None,
        oid: 16384,
        namespace: Bytes::from_static(b"public"),
        name: Bytes::from_static(b"inventory"),
        replica_identity: b'd',
        columns: ["sku", "location", "on_hand", "reserved"]
            .iter()
            .enumerate()
            .map(|(i, n)| Column {
                flags: u8::from(i < 2),
                name: Bytes::copy_from_slice(n.as_bytes()),
                type_oid: if i < 2 { 25 } else { 23 },
                type_modifier: -1,
            })
            .collect(),
    };
    let msgs = [
        Message::Begin {
            final_lsn: 0x1000,
            commit_ts: 0,
            xid: 7,
        },
        Message::Relation(rel),
        Message::Insert {
            xid: None,
            rel: 16384,
            new: vec![t("A"), t("W1"), t("5"), t("1")],
        },
        Message::Commit {
            flags: 0,
            commit_lsn: 0x1000,
            end_lsn: 0x1010,
            commit_ts: 0,
        },
    ];
    let frames: Vec<Bytes> = msgs
        .iter()
        .map(|m| {
            let mut b = BytesMut::new();
            encode(m, false, false, &mut b);
            b.freeze()
        })
        .collect();
    let mut errors = 0;
    for case in 0..4000 {
        let victim = rng.random_range(0..frames.len());
        let mut bad = frames[victim].to_vec();
        match case % 3 {
            0 => bad.truncate(rng.random_range(0..bad.len())),
            1 => {
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..bad.len());
                    bad[i] = rng.random();
                }
            }
            _ => {
                let i = rng.random_range(0..=bad.len());
                bad.insert(i, rng.random());
            }
        }
        let mut decoder = Decoder {
            proto_version: 1,
            parallel_streaming: false,
            in_stream: false,
        };
        let mut asm = Assembler::new();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for (i, f) in frames.iter().enumerate() {
                let data = if i == victim {
                    Bytes::from(bad.clone())
                } else {
                    f.clone()
                };
                let lsn = Lsn(0x1000 + i as u64);
                let msg = decoder.decode(&data).map_err(|source| {
                    Box::new(SourceError::Decode {
                        lsn,
                        relation: "unknown".into(),
                        source,
                    })
                })?;
                asm.push(msg, lsn)
                    .map_err(|e| Box::new(SourceError::from(e)))?;
            }
            Ok::<(), Box<SourceError>>(())
        }));
        match res {
            Err(_) => panic!("panic on corrupted frame {bad:?} (case {case})"),
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                errors += 1;
                let s = e.to_string();
                assert!(
                    s.contains("LSN") || s.contains(&Lsn(0x1000 + victim as u64).to_string()),
                    "error without the LSN: {s}"
                );
            }
        }
    }
    eprintln!("{errors} of 4000 corrupted streams rejected with an LSN error");
    assert!(errors > 1000);
}

// ---------------------------------------------------------------------------------------
// High availability

fn mqtt_connects(broker: &MosquittoServer) -> usize {
    std::fs::read_to_string(broker.dir().join("mosquitto.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(" as skusync"))
        .count()
}

async fn wait_log(d: &Daemon, needle: &str, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if full_log(d).contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_standby_takes_over_after_sigkill_without_touching_the_broker_before() {
    let seed = test_seed("ha_standby_takes_over_after_sigkill");
    let (_, statements) = scale();
    let s = Setup {
        redis_persistence: true,
        mqtt: Some(true),
        ..Default::default()
    };
    let mut env = Env::new(&s, seed).await;
    env.start(&s).await;
    let mut w = public_workload(seed);
    env.workload(&mut w, statements / 3).await;
    env.recover(Duration::from_secs(30)).await;
    let connects = mqtt_connects(env.broker.as_ref().unwrap());
    assert!(connects >= 1, "active instance connected to the broker");
    let cfg = env.rig.daemon().cfg.clone();
    let mut standby = Daemon::start(&env.rig.dir.path().join("standby"), cfg);
    assert!(
        wait_log(&standby, "standby", Duration::from_secs(20)).await,
        "second instance waits as standby\n{}",
        full_log(&standby)
    );
    env.workload(&mut w, statements / 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        mqtt_connects(env.broker.as_ref().unwrap()),
        connects,
        "the standby must not connect to the broker before it wins the slot"
    );
    // SIGKILL the active one; the standby takes over.
    let mut active = env.rig.daemon.take().unwrap();
    let t0 = Instant::now();
    let _ = active.proc().child.kill();
    let _ = active.proc().child.wait();
    env.rig.daemon = Some(standby);
    env.workload(&mut w, 20).await;
    env.recover(Duration::from_secs(60)).await;
    let takeover = t0.elapsed();
    eprintln!("HA takeover (SIGKILL -> standby applied and published a new marker): {takeover:?}");
    env.workload(&mut w, statements / 3).await;
    let (skus, samples) = env.verify().await;
    assert!(
        mqtt_connects(env.broker.as_ref().unwrap()) > connects,
        "the standby connected after winning"
    );
    standby = env.rig.daemon.take().unwrap();
    assert_eq!(standby.sigterm(), Some(0));
    record(
        "HA: SIGKILL active, standby takes over",
        &Row {
            runs: 1,
            skus,
            mismatches: 0,
            max_recovery: takeover,
            lsn_samples: samples,
        },
    );
}

/// Defect 2 of the reliability review: a standby present while Redis loses skusync's
/// data twice (each loss makes the active instance rebuild; the standby must not rebuild
/// beside it) and the active instance is SIGKILLed (the standby takes over). Nothing is
/// counted twice: SQL, Redis, the retained states and `skusync verify` agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_standby_present_while_redis_loses_its_data_twice_and_the_active_is_sigkilled() {
    let seed = test_seed("ha_standby_redis_loses_data_twice_active_sigkilled");
    let (_, statements) = scale();
    let s = Setup {
        redis_persistence: true,
        mqtt: Some(true),
        ..Default::default()
    };
    let mut env = Env::new(&s, seed).await;
    env.start(&s).await;
    let mut w = public_workload(seed);
    env.workload(&mut w, statements / 4).await;
    let cfg = env.rig.daemon().cfg.clone();
    let mut standby = Daemon::start(&env.rig.dir.path().join("standby"), cfg);
    assert!(
        wait_log(&standby, "standby", Duration::from_secs(20)).await,
        "second instance waits as standby\n{}",
        full_log(&standby)
    );
    let mut recoveries = Vec::new();
    for loss in 0..2 {
        env.workload(&mut w, statements / 4).await;
        let t0 = Instant::now();
        env.rig.redis.cli(&["FLUSHALL"]);
        env.workload(&mut w, 20).await;
        env.recover(Duration::from_secs(60)).await;
        recoveries.push(t0.elapsed());
        eprintln!("Redis data loss {loss}: rebuilt in {:?}", t0.elapsed());
    }
    // The rebuilds were the active instance's: the standby never loaded a snapshot.
    assert_eq!(
        full_log(&standby).matches("snapshot loaded").count(),
        0,
        "the standby rebuilt beside the active instance\n{}",
        full_log(&standby)
    );
    let mut active = env.rig.daemon.take().unwrap();
    let loads = full_log(&active).matches("snapshot loaded").count();
    assert!(loads >= 3, "the first load and two rebuilds: {loads}");
    let t0 = Instant::now();
    let _ = active.proc().child.kill();
    let _ = active.proc().child.wait();
    env.rig.daemon = Some(standby);
    env.workload(&mut w, 20).await;
    env.recover(Duration::from_secs(60)).await;
    recoveries.push(t0.elapsed());
    env.workload(&mut w, statements / 4).await;
    let (skus, samples) = env.verify().await;
    standby = env.rig.daemon.take().unwrap();
    assert_eq!(standby.sigterm(), Some(0));
    record(
        "HA: standby present, Redis loses its data twice, active SIGKILLed",
        &Row {
            runs: 1,
            skus,
            mismatches: 0,
            max_recovery: recoveries.into_iter().max().unwrap_or_default(),
            lsn_samples: samples,
        },
    );
}

/// A partition between the active instance and PostgreSQL: the old walsender holds the
/// slot until `wal_sender_timeout`; measured with the proxy's stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_partition_walsender_holds_the_slot_until_wal_sender_timeout() {
    let seed = test_seed("ha_partition");
    let s = Setup {
        redis_persistence: true,
        proxies: true,
        pg_conf: vec!["wal_sender_timeout = '5s'".into()],
        ..Default::default()
    };
    let mut env = Env::new(&s, seed).await;
    env.start(&s).await;
    let mut w = public_workload(seed);
    env.workload(&mut w, 100).await;
    env.recover(Duration::from_secs(30)).await;
    // The standby talks to PostgreSQL directly.
    let direct = {
        let saved = env.pg_proxy.take();
        let text = env.config("");
        env.pg_proxy = saved;
        text
    };
    std::fs::create_dir_all(env.rig.dir.path().join("standby-cfg")).unwrap();
    let cfg_b = write_config(&env.rig.dir.path().join("standby-cfg"), &direct);
    std::fs::create_dir_all(env.rig.dir.path().join("standby")).unwrap();
    let standby = Daemon::start(&env.rig.dir.path().join("standby"), cfg_b);
    assert!(wait_log(&standby, "standby", Duration::from_secs(20)).await);
    let active_pid = || {
        env.rig.pg.psql(
            "SELECT coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = 'skusync'",
        )
    };
    let before = active_pid();
    let t0 = Instant::now();
    env.pg_proxy.as_ref().unwrap().set_stalled(true);
    let mut released = None;
    while t0.elapsed() < Duration::from_secs(60) {
        let now = active_pid();
        if now != before && released.is_none() && now == "0" {
            released = Some(t0.elapsed());
        }
        if now != before && now != "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = t0.elapsed();
    eprintln!(
        "partition: slot released after {released:?}, standby streaming after {takeover:?} (wal_sender_timeout 5s)"
    );
    assert!(
        takeover < Duration::from_secs(60),
        "standby never won the slot"
    );
    let mut old = env.rig.daemon.replace(standby).unwrap();
    env.workload(&mut w, 100).await;
    env.pg_proxy.as_ref().unwrap().set_stalled(false);
    env.recover(Duration::from_secs(60)).await;
    let (skus, samples) = env.verify().await;
    let _ = old.proc().child.kill();
    let _ = old.proc().child.wait();
    record(
        "HA: partition (stall, wal_sender_timeout 5 s) -> standby",
        &Row {
            runs: 1,
            skus,
            mismatches: 0,
            max_recovery: takeover,
            lsn_samples: samples,
        },
    );
}

/// A corrupted pgoutput message on the real replication stream (the proxy breaks a
/// change inside an XLogData frame): `skusync run` stops with an error naming the LSN and
/// the relation, never panics, never applies or confirms past it, and once the stream is
/// clean again a restart delivers the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_corrupted_frame_on_the_wire_stops_with_lsn_and_relation_and_loses_nothing() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    let proxy = Proxy::start_pg(rig.pg.port());
    let text = rig.oracle.config_toml(
        &proxy.url(&rig.pg.url("postgres", "postgres")),
        "skusync",
        PUBS,
        &rig.redis.url(),
    );
    let cfg = write_config(rig.dir.path(), &text);
    rig.daemon = Some(Daemon::start(rig.dir.path(), cfg.clone()));
    rig.wait_bootstrap(Duration::from_secs(40)).await;
    rig.exec("INSERT INTO inventory VALUES ('before', 'W1', 1, 0)")
        .await;
    rig.drain(&WorkloadTables::public(), "W1", Duration::from_secs(30))
        .await;

    proxy.corrupt_next_change();
    rig.exec("INSERT INTO inventory VALUES ('broken', 'W1', 7, 0)")
        .await;
    let commit: Lsn = rig.pg.psql("SELECT pg_current_wal_lsn()").parse().unwrap();
    let code = {
        let p = rig.daemon().proc();
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                break st.code();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "skusync kept running on a corrupted frame"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(proxy.corrupted(), 1);
    assert_eq!(code, Some(1), "a definite error");
    let log = rig.daemon().stderr_all();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("cannot decode the replication stream at LSN"),
        "{log}"
    );
    assert!(log.contains("relation public.inventory"), "{log}");
    // Nothing past the broken change was applied or confirmed.
    assert!(
        hget(
            &mut rig.con,
            &skusync::sinks::layout::sku_key("skusync", "broken"),
            "on_hand"
        )
        .await
        .is_none()
    );
    let confirmed: Lsn = rig
        .pg
        .psql("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'skusync'")
        .parse()
        .unwrap();
    assert!(
        confirmed < commit,
        "confirmed {confirmed} passed the broken change (< {commit})"
    );
    // The stream is clean again: a restart delivers the change.
    rig.daemon = Some(Daemon::start(rig.dir.path(), cfg));
    rig.drain(&WorkloadTables::public(), "W1", Duration::from_secs(40))
        .await;
    rig.assert_converges(Duration::from_secs(20)).await;
    assert_eq!(
        hget(
            &mut rig.con,
            &skusync::sinks::layout::sku_key("skusync", "broken"),
            "on_hand"
        )
        .await
        .as_deref(),
        Some("7")
    );
}

/// A PostgreSQL failover before version 17 drops the logical slot: the running
/// skusync's reconnect finds it gone. It rebuilds once, in a new cycle (never inside the
/// pipeline that holds the old stream's state), and records the server it loaded from,
/// so the stream's check does not rebuild a second time. The failover to another
/// timeline is simulated by recording another timeline in meta before the slot is
/// dropped under the running process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_streaming_is_rebuilt_once_and_the_server_recorded() {
    let seed = test_seed("a_slot_dropped_while_streaming_is_rebuilt_once");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 100, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let meta = skusync::sinks::layout::meta_key("skusync");
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("timeline")
        .arg("7")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    // end the walsender and drop the slot before skusync's reconnect takes it again
    let t0 = Instant::now();
    loop {
        let _ = rig
            .client
            .simple_query(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = 'skusync' AND active_pid IS NOT NULL",
            )
            .await;
        if rig
            .client
            .simple_query("SELECT pg_drop_replication_slot('skusync')")
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the slot stayed busy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.daemon()
        .wait_stderr("vanished while streaming", Duration::from_secs(30))
        .await;
    run_workload(&mut rig, &mut w, 100, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    rig.daemon().assert_alive("after the slot vanished");
    assert_eq!(
        hget(&mut rig.con, &meta, "timeline").await.as_deref(),
        Some("1"),
        "the load recorded the server's timeline"
    );
    assert_eq!(
        rig.daemon().stderr_count("snapshot loaded"),
        2,
        "the first start's load and one rebuild, not two:\n{}",
        rig.daemon().stderr_all()
    );
    assert_eq!(
        rig.daemon().stderr_count("but Redis was built on timeline"),
        0
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// The pieces of a transaction replayed after a restart are fenced by their number, so a
/// start that cuts them at another `max_changes_per_piece` than Redis' were cut at would
/// skip or double what a half-applied transaction held: Redis records the size and is
/// rebuilt once when it changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_piece_size_rebuilds_redis_once_at_the_next_start() {
    let seed = test_seed("a_changed_piece_size_rebuilds_redis_once_at_the_next_start");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 100, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let meta = skusync::sinks::layout::meta_key("skusync");
    assert_eq!(
        hget(&mut rig.con, &meta, "piece_changes").await.as_deref(),
        Some("10000")
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
    let text = rig
        .config_text()
        .replacen("[redis]\n", "[redis]\nmax_changes_per_piece = 200\n", 1);
    rig.daemon().cfg = write_config(rig.dir.path(), &text);
    rig.daemon().spawn();
    let why = "redis.max_changes_per_piece changed";
    rig.daemon().wait_stderr(why, Duration::from_secs(30)).await;
    run_workload(&mut rig, &mut w, 100, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    assert_eq!(
        hget(&mut rig.con, &meta, "piece_changes").await.as_deref(),
        Some("200")
    );
    // the same size again: no rebuild
    rig.daemon().kill9_and_restart();
    run_workload(&mut rig, &mut w, 50, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    assert_eq!(rig.daemon().stderr_count(why), 1);
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// Item 9 of the reliability issue: the timeline recorded in meta is compared at every
/// connect. A server on another timeline than Redis was built on (a promoted standby that
/// kept the slot, as PostgreSQL 17's failover slots do, or a point-in-time recovery) may
/// lack transactions Redis holds: Redis is rebuilt. Simulated by recording another
/// timeline in meta, since PostgreSQL 15 drops logical slots on failover (which rebuilds
/// anyway: the slot is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_built_on_another_postgres_timeline_is_rebuilt() {
    let seed = test_seed("redis_built_on_another_postgres_timeline_is_rebuilt");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 200, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let meta = skusync::sinks::layout::meta_key("skusync");
    assert_eq!(
        hget(&mut rig.con, &meta, "timeline").await.as_deref(),
        Some("1")
    );
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("timeline")
        .arg("7")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    rig.daemon().kill9_and_restart();
    let t0 = Instant::now();
    while !rig
        .daemon()
        .stderr_contains("PostgreSQL is on timeline 1 but Redis was built on timeline 7")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run_workload(&mut rig, &mut w, 200, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    assert_eq!(
        hget(&mut rig.con, &meta, "timeline").await.as_deref(),
        Some("1"),
        "the rebuild recorded the server's timeline"
    );
    assert_eq!(
        rig.daemon().stderr_count("but Redis was built on timeline"),
        1,
        "rebuilt once, not in a loop"
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
}
