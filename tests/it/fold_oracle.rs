//! End-to-end oracle tests of `skusync run`: random workloads against a real PostgreSQL
//! and Redis, drained, then compared field by field with the SQL aggregate
//! (see `oracle.rs`). Seeds are printed; replay with `SKUSYNC_TEST_SEED=<seed>`.

use crate::harness::{PgServer, RedisServer};
use crate::oracle::*;
use crate::support::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const PUBLIC_SCHEMA: &str = "
CREATE TABLE inventory (
  sku text NOT NULL, location text NOT NULL, on_hand int NOT NULL, reserved int NOT NULL DEFAULT 0,
  PRIMARY KEY (sku, location));
CREATE TABLE activity_log (
  id bigserial PRIMARY KEY, sku text, kind text NOT NULL, qty numeric,
  at timestamptz NOT NULL DEFAULT now());
CREATE PUBLICATION skusync FOR TABLE inventory;
CREATE PUBLICATION skusync_activity FOR TABLE activity_log WITH (publish = 'insert');
";

pub const PUBS: &[&str] = &["skusync", "skusync_activity"];

pub fn public_oracle(buckets: Buckets) -> Oracle {
    Oracle {
        prefix: "skusync".into(),
        inventory: vec![InventorySpec {
            table: "public.inventory".into(),
            sku: "sku".into(),
            location: Some("location".into()),
            on_hand: "on_hand".into(),
            reserved: Some("reserved".into()),
        }],
        activity: vec![ActivitySpec {
            table: "public.activity_log".into(),
            sku: "sku".into(),
            kind: "kind".into(),
            quantity: Some("qty".into()),
            time: None,
            windows: vec!["5m".into(), "1h".into()],
            counters: vec![
                ("view".into(), "views".into()),
                ("add_to_cart".into(), "carts".into()),
                ("purchase".into(), "purchases".into()),
            ],
        }],
        buckets,
        filters: Default::default(),
        truth_filters: Default::default(),
        config_filters: Default::default(),
        sums: Default::default(),
        scale: 0,
    }
}

/// The `skusync run` process, restartable; each incarnation logs to its own directory.
pub struct Daemon {
    pub proc: Option<SkusyncProc>,
    pub cfg: PathBuf,
    pub dir: PathBuf,
    pub runs: usize,
}

impl Daemon {
    pub fn start(dir: &Path, cfg: PathBuf) -> Daemon {
        let mut d = Daemon {
            proc: None,
            cfg,
            dir: dir.to_path_buf(),
            runs: 0,
        };
        d.spawn();
        d
    }

    pub fn spawn(&mut self) {
        self.spawn_env(&[]);
    }

    /// Start the next incarnation with extra environment variables.
    pub fn spawn_env(&mut self, env: &[(&str, &str)]) {
        let run_dir = self.dir.join(format!("run{}", self.runs));
        std::fs::create_dir_all(&run_dir).expect("run dir");
        self.runs += 1;
        self.proc = Some(SkusyncProc::spawn_env(
            &["run", "--config", self.cfg.to_str().expect("utf-8 path")],
            &run_dir,
            env,
        ));
    }

    pub fn proc(&mut self) -> &mut SkusyncProc {
        self.proc.as_mut().expect("running")
    }

    /// All incarnations' stderr, labelled.
    pub fn stderr_all(&self) -> String {
        let mut s = String::new();
        for i in 0..self.runs {
            let d = self.dir.join(format!("run{i}"));
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().extension().is_some_and(|x| x == "stderr") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: String = text
                        .chars()
                        .rev()
                        .take(6000)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    s.push_str(&format!("--- run {i} stderr (tail) ---\n{tail}\n"));
                }
            }
        }
        s
    }

    /// Whether any incarnation's full stderr contains `needle`.
    pub fn stderr_contains(&self, needle: &str) -> bool {
        (0..self.runs).any(|i| self.run_stderr_contains(i, needle))
    }

    /// Whether incarnation `i`'s full stderr contains `needle`.
    fn run_stderr_contains(&self, i: usize, needle: &str) -> bool {
        std::fs::read_dir(self.dir.join(format!("run{i}")))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "stderr"))
            .any(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .contains(needle)
            })
    }

    /// Wait until the running incarnation streams (it may first wait as a standby for
    /// the writer lock of the one before).
    pub async fn wait_streaming(&self, timeout: Duration) {
        let t0 = Instant::now();
        while !self.run_stderr_contains(self.runs - 1, "skusync::source: streaming") {
            assert!(
                t0.elapsed() < timeout,
                "incarnation {} did not start streaming\n{}",
                self.runs - 1,
                self.stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every incarnation's full stderr, one text per file.
    fn stderr_texts(&self) -> Vec<String> {
        (0..self.runs)
            .flat_map(|i| {
                std::fs::read_dir(self.dir.join(format!("run{i}")))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter(|e| e.path().extension().is_some_and(|x| x == "stderr"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }

    /// Wait until any incarnation's stderr contains `needle`; panics with the logs after
    /// `timeout`.
    pub async fn wait_stderr(&self, needle: &str, timeout: Duration) {
        let t0 = Instant::now();
        while !self.stderr_contains(needle) {
            assert!(
                t0.elapsed() < timeout,
                "no {needle:?} in the log within {timeout:?}\n{}",
                self.stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until more than `seen` lines of all incarnations' stderr contain `needle`
    /// (a line an earlier incarnation logged does not count again).
    pub async fn wait_stderr_beyond(&self, needle: &str, seen: usize, timeout: Duration) {
        let t0 = Instant::now();
        while self.stderr_count(needle) <= seen {
            assert!(
                t0.elapsed() < timeout,
                "no new {needle:?} in the log within {timeout:?}\n{}",
                self.stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many lines of all incarnations' full stderr contain `needle`.
    pub fn stderr_count(&self, needle: &str) -> usize {
        self.stderr_texts()
            .iter()
            .map(|t| t.lines().filter(|l| l.contains(needle)).count())
            .sum()
    }

    /// The lines of all incarnations' full stderr that contain `needle`.
    pub fn stderr_lines(&self, needle: &str) -> String {
        self.stderr_texts()
            .iter()
            .flat_map(|t| {
                t.lines()
                    .filter(|l| l.contains(needle))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panics (with the logs) when the process exited.
    pub fn assert_alive(&mut self, what: &str) {
        if let Ok(Some(st)) = self.proc().child.try_wait() {
            panic!(
                "skusync run exited ({st}) while {what}\n{}",
                self.stderr_all()
            );
        }
    }

    /// Wait for the process to exit by itself; panics (with the logs) after `timeout`,
    /// saying it kept running `what`.
    pub async fn wait_exit(&mut self, timeout: Duration, what: &str) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.proc().child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                start.elapsed() < timeout,
                "skusync kept running {what} ({timeout:?})\n{}",
                self.stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn kill9_and_restart(&mut self) {
        let mut p = self.proc.take().expect("running");
        let _ = p.child.kill();
        let _ = p.child.wait();
        drop(p);
        self.spawn();
    }

    pub fn sigterm(&mut self) -> Option<i32> {
        self.proc().signal_and_wait("TERM", Duration::from_secs(30))
    }
}

/// Servers, connections and the running daemon of one test.
pub struct Rig {
    pub pg: PgServer,
    pub redis: RedisServer,
    pub client: tokio_postgres::Client,
    pub con: MultiplexedConnection,
    pub oracle: Oracle,
    pub daemon: Option<Daemon>,
    pub dir: tempfile::TempDir,
    pub markers: u64,
}

impl Rig {
    /// Start PostgreSQL with `schema` applied and Redis (skusync not started yet).
    pub async fn new(schema: &str, oracle: Oracle) -> Rig {
        let pg = PgServer::start();
        pg.psql(schema);
        let redis = RedisServer::start();
        let client = pg.client("postgres").await;
        let con = redis_connect(&redis.url()).await;
        Rig {
            pg,
            redis,
            client,
            con,
            oracle,
            daemon: None,
            dir: tempfile::tempdir().expect("tempdir"),
            markers: 0,
        }
    }

    /// Write the config and start `skusync run`; wait until bootstrap is done.
    pub async fn start_skusync(&mut self, extra_toml: &str) {
        let text = format!("{}{extra_toml}", self.config_text());
        self.start_with_config(&text).await;
    }

    /// The whole `skusync run` config of this rig's oracle, to edit before
    /// [`Rig::start_with_config`].
    pub fn config_text(&self) -> String {
        self.oracle.config_toml(
            &self.pg.url("postgres", "postgres"),
            "skusync",
            PUBS,
            &self.redis.url(),
        )
    }

    /// Start `skusync run` with config file `text` (mode 0600: it may hold an HMAC key)
    /// and wait for its bootstrap.
    pub async fn start_with_config(&mut self, text: &str) {
        let cfg = write_config(self.dir.path(), text);
        std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod config");
        self.daemon = Some(Daemon::start(self.dir.path(), cfg));
        self.wait_bootstrap(Duration::from_secs(40)).await;
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("skusync started")
    }

    pub async fn wait_bootstrap(&mut self, timeout: Duration) {
        let meta = skusync::sinks::layout::meta_key(&self.oracle.prefix);
        let start = Instant::now();
        loop {
            self.daemon().assert_alive("bootstrapping");
            if hget(&mut self.con, &meta, "bootstrap").await.as_deref() == Some("done") {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "no {meta} bootstrap=done after {timeout:?}\n{}",
                    self.daemon().stderr_all()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("workload SQL failed: {e:?}\n{sql}"));
    }

    /// Insert drain marker rows (via `tables`) and wait until the last is in Redis.
    pub async fn drain(&mut self, tables: &WorkloadTables, location: &str, timeout: Duration) {
        self.markers += 1;
        let n = self.markers;
        self.exec(&tables.marker_sql(n, location)).await;
        let key = skusync::sinks::layout::sku_key(&self.oracle.prefix, &marker_sku(n));
        let start = Instant::now();
        loop {
            self.daemon().assert_alive("draining");
            if hget(&mut self.con, &key, "on_hand").await == Some(n.to_string()) {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "drain marker {key} not applied after {timeout:?}\n{}",
                    self.daemon().stderr_all()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until Redis equals the SQL aggregate; panic with the differences otherwise.
    pub async fn assert_converges(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let m = self.oracle.mismatches(&self.client, &mut self.con).await;
            if m.is_empty() {
                return;
            }
            self.daemon().assert_alive("converging");
            if start.elapsed() > timeout {
                panic!(
                    "Redis differs from the SQL aggregate after {timeout:?}:\n{}\n{}",
                    format_mismatches(&m, 60),
                    self.daemon().stderr_all()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

pub fn public_workload(seed: u64) -> Workload {
    Workload::new(
        seed,
        WorkloadTables::public(),
        Workload::default_skus(),
        Workload::default_locations(),
    )
}

/// Run transactions until at least `statements` statements were generated, calling
/// `between(txn_index)` before each transaction.
pub async fn run_workload(
    rig: &mut Rig,
    w: &mut Workload,
    statements: usize,
    mut between: impl AsyncFnMut(&mut Rig, usize),
) {
    let target = w.statements + statements;
    let mut i = 0;
    while w.statements < target {
        between(rig, i).await;
        let sql = w.next_txn();
        rig.exec(&sql).await;
        i += 1;
    }
    eprintln!(
        "workload: {} statements in {} transactions ({} rolled back)",
        w.statements, w.txns, w.rollbacks
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workload_drains_to_exactly_the_sql_aggregate() {
    let seed = test_seed("random_workload_drains_to_exactly_the_sql_aggregate");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::SumEqualsTotal)).await;
    rig.start_skusync("").await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 2000, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
    let code = rig.daemon().sigterm();
    assert_eq!(
        code,
        Some(0),
        "SIGTERM exits 0\n{}",
        rig.daemon().stderr_all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_after_sigkill_do_not_double_count() {
    let seed = test_seed("replays_after_sigkill_do_not_double_count");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::SumEqualsTotal)).await;
    // /metrics shows the replays the fence skipped (per incarnation: scraped before each
    // kill and at the end)
    let http = crate::harness::free_port();
    rig.start_skusync(&format!("\n[http]\nlisten = \"127.0.0.1:{http}\"\n"))
        .await;
    let fenced_now =
        || crate::harness::scrape_metric(http, skusync::telemetry::FENCED).unwrap_or_default();
    let mut fenced = 0.0;
    let mut w = public_workload(seed);
    // kill points are transaction indices; ~2000 statements are ~300 transactions
    let mut krng = StdRng::seed_from_u64(seed ^ 0x5eed_c0de);
    // A SIGKILL at a random moment may land when nothing is in flight, so one crash is
    // certain to replay: the first incarnation aborts right after its k-th applied
    // batch, before that batch is confirmed (a failpoint).
    let first = format!("after-apply:{}", krng.random_range(2..=6));
    {
        let d = rig.daemon();
        let mut p = d.proc.take().expect("running");
        let _ = p.child.kill();
        let _ = p.child.wait();
        d.spawn_env(&[("SKUSYNC_FAILPOINT", &first)]);
        // The killed incarnation's writer lock can hold the new one as a standby for a
        // second; a workload sent meanwhile arrives as one backlog, applied in fewer
        // batches than the failpoint counts.
        d.wait_streaming(Duration::from_secs(20)).await;
    }
    let mut aborted = false;
    let kills = krng.random_range(3..=5);
    let mut at: Vec<usize> = (0..kills).map(|_| krng.random_range(60..280)).collect();
    at.sort_unstable();
    at.dedup();
    eprintln!("abort at {first}; SIGKILL before transactions {at:?}");
    let mut killed = 0;
    run_workload(&mut rig, &mut w, 2000, async |rig, i| {
        if !aborted && let Ok(Some(_)) = rig.daemon().proc().child.try_wait() {
            // the failpoint fired: restart without it
            aborted = true;
            rig.daemon().spawn();
        }
        if i < 60 {
            // paced, so that the first incarnation applies several batches
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if at.contains(&i) && !aborted {
            // the transactions so far are more than k batches: wait for the abort
            let start = Instant::now();
            while !matches!(rig.daemon().proc().child.try_wait(), Ok(Some(_))) {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "the failpoint {first} was not reached\n{}",
                    rig.daemon().stderr_all()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            aborted = true;
            rig.daemon().spawn();
        }
        if at.contains(&i) {
            // let it get somewhere first, at a random moment
            tokio::time::sleep(Duration::from_millis(krng.random_range(0..300))).await;
            fenced += fenced_now();
            rig.daemon().kill9_and_restart();
            killed += 1;
        }
    })
    .await;
    assert_eq!(killed, at.len());
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(40))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
    fenced += fenced_now();
    eprintln!("{fenced} replayed SKU entries fenced after {killed} SIGKILLs");
    assert!(rig.daemon().stderr_contains("failpoint reached"));
    // Without a replay the test proves nothing about double counting.
    assert!(
        fenced > 0.0,
        "no replay reached the fence after {killed} SIGKILLs\n{}",
        rig.daemon().stderr_all()
    );
    let code = rig.daemon().sigterm();
    assert_eq!(code, Some(0), "{}", rig.daemon().stderr_all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_mid_stream_triggers_a_resync_that_converges() {
    let seed = test_seed("flushall_mid_stream_triggers_a_resync_that_converges");
    // after a resync the snapshot's activity rows have no commit time: buckets not compared
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    let mut w = public_workload(seed);
    let flush_at = StdRng::seed_from_u64(seed ^ 0xf1u64).random_range(60..240);
    eprintln!("FLUSHALL before transaction {flush_at}");
    run_workload(&mut rig, &mut w, 2000, async |rig, i| {
        if i == flush_at {
            rig.redis.cli(&["FLUSHALL"]);
        }
    })
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(45))
        .await;
    rig.assert_converges(Duration::from_secs(15)).await;
    rig.daemon().assert_alive("after the resync");
}

const WMS_SCHEMA: &str = "
CREATE SCHEMA wms;
CREATE TABLE wms.stock_levels (
  item_code varchar(40) NOT NULL, bin smallint NOT NULL, warehouse text NOT NULL,
  qty numeric(12,0) NOT NULL, held smallint NOT NULL DEFAULT 0,
  PRIMARY KEY (item_code, warehouse, bin));
CREATE TABLE wms.events (
  id bigserial PRIMARY KEY, item_code text, ev text, amount numeric(10,2), at timestamptz);
CREATE PUBLICATION skusync FOR TABLE wms.stock_levels;
CREATE PUBLICATION skusync_activity FOR TABLE wms.events WITH (publish = 'insert');
";

fn wms_tables() -> WorkloadTables {
    WorkloadTables {
        inv: "wms.stock_levels".into(),
        sku: "item_code".into(),
        location: "warehouse".into(),
        on_hand: "qty".into(),
        reserved: "held".into(),
        extra_key: Some(("bin".into(), vec!["1".into(), "2".into()])),
        act: "wms.events".into(),
        act_sku: "item_code".into(),
        act_kind: "ev".into(),
        act_qty: "amount".into(),
        act_time: Some("at".into()),
        kinds: ["seen", "basket", "sold", "returned"]
            .map(String::from)
            .to_vec(),
        fractions: ["2.50", "0.01"].map(String::from).to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_names_and_types_work_by_config_alone() {
    let seed = test_seed("other_names_and_types_work_by_config_alone");
    let oracle = Oracle {
        prefix: "wms".into(),
        inventory: vec![InventorySpec {
            table: "wms.stock_levels".into(),
            sku: "item_code".into(),
            location: Some("warehouse".into()),
            on_hand: "qty".into(),
            reserved: Some("held".into()),
        }],
        activity: vec![ActivitySpec {
            table: "wms.events".into(),
            sku: "item_code".into(),
            kind: "ev".into(),
            quantity: Some("amount".into()),
            time: Some("at".into()),
            windows: vec!["5m".into(), "1h".into()],
            counters: vec![
                ("seen".into(), "views".into()),
                ("basket".into(), "carts".into()),
                ("sold".into(), "purchases".into()),
            ],
        }],
        buckets: Buckets::ExactByMinute,
        filters: Default::default(),
        truth_filters: Default::default(),
        config_filters: Default::default(),
        sums: Default::default(),
        scale: 0,
    };
    let mut rig = Rig::new(WMS_SCHEMA, oracle).await;
    // some rows before the start, bootstrapped from the snapshot
    rig.exec(
        "INSERT INTO wms.stock_levels VALUES ('pre-1', 1, 'north', 10, 1), ('pre-1', 2, 'north', 5, 2),
           ('pre-1', 1, 'south', 7, 0);
         INSERT INTO wms.events (item_code, ev, amount, at) VALUES ('pre-1', 'sold', 2.00, now()),
           ('pre-1', 'sold', 1.50, now()), ('pre-1', 'seen', NULL, now());",
    )
    .await;
    rig.start_skusync("").await;
    let skus: Vec<String> = [
        "a/b",
        "k:v",
        "ünï©ødé",
        "with space",
        "",
        "IT-1",
        "IT-2",
        "IT-3",
    ]
    .map(String::from)
    .to_vec();
    let locs: Vec<String> = ["north", "south", "east west"].map(String::from).to_vec();
    let mut w = Workload::new(seed, wms_tables(), skus, locs);
    run_workload(&mut rig, &mut w, 800, async |_, _| {}).await;
    rig.drain(&wms_tables(), "north", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaching_to_a_database_with_existing_rows_bootstraps_exactly() {
    let seed = test_seed("attaching_to_a_database_with_existing_rows_bootstraps_exactly");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand, reserved)
           SELECT 'pre-' || (i % 1000), 'WH-' || (i / 1000), (i * 7) % 500, (i * 3) % 20
           FROM generate_series(0, 4999) i;
         INSERT INTO inventory VALUES ('a/b', 'store 3', 9, 4), ('', 'WH-1', 1, 0), ('ünï©ødé', 'Köln:4', 3, 3);
         INSERT INTO activity_log (sku, kind, qty)
           SELECT 'pre-' || (i % 700), (ARRAY['view', 'add_to_cart', 'purchase', 'share'])[1 + i % 4],
                  CASE i % 10 WHEN 0 THEN NULL WHEN 1 THEN 1.5 ELSE (i % 4)::numeric END
           FROM generate_series(0, 4999) i;",
    )
    .await;
    rig.start_skusync("").await;
    rig.assert_converges(Duration::from_secs(20)).await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 500, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_skipped_and_counted_not_fatal() {
    const BAD_QTY: &str = "4321.987";
    let mut oracle = public_oracle(Buckets::Ignore);
    oracle.inventory.push(InventorySpec {
        table: "public.loose_stock".into(),
        sku: "sku_code".into(),
        location: Some("location".into()),
        on_hand: "on_hand".into(),
        reserved: None,
    });
    let schema = format!(
        "{PUBLIC_SCHEMA}
         CREATE TABLE loose_stock (id serial PRIMARY KEY, sku_code text, location text NOT NULL, on_hand int NOT NULL);
         -- The key (id) does not name the SKU: deletes need the full old row.
         ALTER TABLE loose_stock REPLICA IDENTITY FULL;
         ALTER PUBLICATION skusync ADD TABLE loose_stock;"
    );
    let mut rig = Rig::new(&schema, oracle).await;
    rig.start_skusync("").await;
    rig.exec(&format!(
        "INSERT INTO activity_log (sku, kind, qty) VALUES ('bad-1', 'purchase', NULL);
         INSERT INTO activity_log (sku, kind, qty) VALUES ('bad-1', 'purchase', {BAD_QTY});
         INSERT INTO loose_stock (sku_code, location, on_hand) VALUES (NULL, 'WH-1', 777777);
         INSERT INTO activity_log (sku, kind, qty) VALUES ('bad-1', 'purchase', 2);
         INSERT INTO loose_stock (sku_code, location, on_hand) VALUES ('good-1', 'WH-1', 5);"
    ))
    .await;
    let key = skusync::sinks::layout::sku_key("skusync", "good-1");
    let start = Instant::now();
    while hget(&mut rig.con, &key, "on_hand").await.as_deref() != Some("5") {
        rig.daemon().assert_alive("applying rows after bad values");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "good row after bad values not applied\n{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bad = skusync::sinks::layout::sku_key("skusync", "bad-1");
    assert_eq!(
        hget(&mut rig.con, &bad, "purchases").await.as_deref(),
        Some("2"),
        "only the good purchase counts"
    );
    rig.assert_converges(Duration::from_secs(10)).await;
    rig.daemon().assert_alive("after bad values");
    let log = rig.daemon().stderr_all();
    for needle in ["activity_log", "qty", "loose_stock", "sku_code"] {
        assert!(log.contains(needle), "stderr mentions {needle:?}:\n{log}");
    }
    for secret in [BAD_QTY, "777777"] {
        assert!(
            !log.contains(secret),
            "stderr must not contain the bad row's value {secret:?}:\n{log}"
        );
    }
}

/// The harness side alone (passes without `run`): the workloads execute, the oracle's
/// queries run on both schemas, the generated configs parse, and a Redis state written
/// from the truth compares equal while a perturbed one does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_smoke_workloads_run_and_truth_round_trips() {
    let seed = test_seed("oracle_smoke_workloads_run_and_truth_round_trips");
    let schema = format!(
        "{PUBLIC_SCHEMA}{}",
        WMS_SCHEMA.replace("skusync", "wms_pub")
    );
    let mut rig = Rig::new(&schema, public_oracle(Buckets::SumEqualsTotal)).await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 1000, async |_, _| {}).await;
    let wms = Oracle {
        prefix: "wms".into(),
        inventory: vec![InventorySpec {
            table: "wms.stock_levels".into(),
            sku: "item_code".into(),
            location: Some("warehouse".into()),
            on_hand: "qty".into(),
            reserved: Some("held".into()),
        }],
        activity: vec![ActivitySpec {
            table: "wms.events".into(),
            sku: "item_code".into(),
            kind: "ev".into(),
            quantity: Some("amount".into()),
            time: Some("at".into()),
            windows: vec!["5m".into()],
            counters: vec![("sold".into(), "purchases".into())],
        }],
        buckets: Buckets::ExactByMinute,
        filters: Default::default(),
        truth_filters: Default::default(),
        config_filters: Default::default(),
        sums: Default::default(),
        scale: 0,
    };
    let mut w2 = Workload::new(
        seed,
        wms_tables(),
        vec!["a/b".into(), "".into(), "IT-1".into()],
        vec!["north".into(), "south".into()],
    );
    run_workload(&mut rig, &mut w2, 500, async |_, _| {}).await;
    rig.exec(&WorkloadTables::public().marker_sql(1, "WH-1"))
        .await;
    rig.exec(&wms_tables().marker_sql(1, "north")).await;
    for o in [&rig.oracle, &wms] {
        let text = o.config_toml(
            &rig.pg.url("postgres", "postgres"),
            "skusync",
            PUBS,
            &rig.redis.url(),
        );
        skusync::config::Config::parse(&text)
            .unwrap_or_else(|e| panic!("generated config does not parse: {e}\n{text}"));
        let truth = o.truth(&rig.client).await;
        // The marker and at least one workload SKU (which ones, and whether any still has
        // stock rows, depends on the seed: seed 623399299133709072 deletes them all).
        assert!(truth.skus.len() >= 2, "{truth:?}");
        assert!(truth.with_stock_rows.contains(&marker_sku(1)));
        let mut state: RedisState = truth
            .skus
            .iter()
            .map(|(s, f)| {
                let mut f: std::collections::BTreeMap<String, String> =
                    f.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
                if o.buckets == Buckets::SumEqualsTotal {
                    for c in ["views", "carts", "purchases"] {
                        if let Some(v) = f.get(c).cloned() {
                            f.insert(format!("w:{c}:1"), v);
                        }
                    }
                }
                (s.clone(), f)
            })
            .collect();
        let m = o.compare(&truth, &state);
        assert!(m.is_empty(), "{}", format_mismatches(&m, 20));
        state.remove(&marker_sku(1));
        state
            .entry("ghost".into())
            .or_default()
            .insert("on_hand".into(), "1".into());
        let m = o.compare(&truth, &state);
        let fields: Vec<&str> = m.iter().map(|x| x.field.as_str()).collect();
        assert!(fields.contains(&"<hash>"), "{}", format_mismatches(&m, 20));
        assert!(
            m.iter().any(|x| x.sku == "ghost"),
            "{}",
            format_mismatches(&m, 20)
        );
    }
    // fractional and NULL quantities exist and are excluded
    let skipped = rig
        .pg
        .psql("SELECT count(*) FROM activity_log WHERE qty IS NULL OR qty <> trunc(qty)");
    assert_ne!(skipped, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_command_refuses_while_streaming_and_rebuilds_redis_when_stopped() {
    let seed = test_seed("resync_command_refuses_while_streaming_and_rebuilds_redis_when_stopped");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 300, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let cfg = rig.daemon().cfg.clone();
    let resync = |cfg: &Path| {
        std::process::Command::new(skusync_bin())
            .args(["resync", "--config", cfg.to_str().unwrap()])
            .output()
            .expect("run skusync resync")
    };
    // Only the active instance may rebuild Redis: with one streaming, refuse.
    let out = resync(&cfg);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
    // Damage Redis behind skusync's back, then rebuild it on demand.
    let key = skusync::sinks::layout::sku_key("skusync", &marker_sku(1));
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("on_hand")
        .arg("999999")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    assert!(
        !rig.oracle
            .mismatches(&rig.client, &mut rig.con)
            .await
            .is_empty(),
        "the oracle sees the damage"
    );
    let out = resync(&cfg);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = rig.oracle.mismatches(&rig.client, &mut rig.con).await;
    assert!(m.is_empty(), "{}", format_mismatches(&m, 20));
}

/// A transaction over 7,000 SKUs goes out as several apply calls (500 entries each, each
/// read ahead of the write before it); a SIGKILL soon after it (wherever it lands:
/// before, between or after those calls) and the replay that follows still converge to
/// the SQL aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_wider_than_one_script_call_converge_after_a_kill() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::SumEqualsTotal)).await;
    let http = crate::harness::free_port();
    rig.start_skusync(&format!("\n[http]\nlisten = \"127.0.0.1:{http}\"\n"))
        .await;
    rig.exec(
        "BEGIN;
         INSERT INTO inventory SELECT 'wide-' || g, 'WH-' || (g % 3), g % 40, g % 4
           FROM generate_series(1, 7000) g;
         INSERT INTO activity_log (sku, kind, qty)
           SELECT 'wide-' || g, 'view', 1 FROM generate_series(1, 7000) g;
         COMMIT;",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    rig.daemon().kill9_and_restart();
    // Then small transactions over the same SKUs.
    for round in 0..20 {
        rig.exec(&format!(
            "UPDATE inventory SET on_hand = on_hand + 1 WHERE sku LIKE 'wide-%{round}';
             INSERT INTO activity_log (sku, kind, qty)
               SELECT 'wide-' || g, 'view', 1 FROM generate_series({round} * 300, {round} * 300 + 2500) g;"
        ))
        .await;
    }
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(20)).await;
    // the restarted daemon read ahead (each round's 2,500 SKUs are five calls)
    let ahead = crate::harness::scrape_metric(http, skusync::telemetry::READ_AHEAD_CALLS);
    assert!(ahead.unwrap_or(0.0) >= 1.0, "read ahead: {ahead:?}");
    let code = rig.daemon().sigterm();
    assert_eq!(code, Some(0), "{}", rig.daemon().stderr_all());
}

/// A backlog committed well before skusync reads it (the walsender sends commits over
/// 500 ms old: catching up) is read in batches, at intervals rather than on every
/// wake-up, and nothing is left behind: a small commit after it still arrives (the source
/// no longer waits on the socket then; without the interval read this test times out),
/// and Redis equals the SQL aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_backlog_is_read_in_batches_and_converges() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::SumEqualsTotal)).await;
    rig.start_skusync("").await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    // Stopped, not paused: a paused reader's socket buffers would take the stream as it
    // is committed, and the walsender would not be sending old commits.
    let code = rig.daemon().sigterm();
    assert_eq!(code, Some(0), "{}", rig.daemon().stderr_all());
    // 3,000 single-row transactions (a few hundred KiB of stream), then an odd tail.
    // (The DO block goes alone: COMMIT inside it needs no enclosing transaction.)
    rig.exec(
        "INSERT INTO inventory SELECT 'old-' || g, 'WH-1', 100, 0 FROM generate_series(1, 50) g",
    )
    .await;
    rig.exec(
        "DO $$ BEGIN
           FOR i IN 1..3000 LOOP
             IF i % 2 = 0 THEN
               UPDATE inventory SET on_hand = on_hand - 1 WHERE sku = 'old-' || (i % 50 + 1);
             ELSE
               INSERT INTO activity_log (sku, kind, qty) VALUES ('old-' || (i % 50 + 1), 'view', 1);
             END IF;
             COMMIT;
           END LOOP;
         END $$",
    )
    .await;
    rig.exec("UPDATE inventory SET on_hand = 7 WHERE sku = 'old-1'")
        .await;
    // Old enough that the walsender sends every commit over 500 ms after it happened.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    rig.daemon().spawn();
    // Nothing newer is committed until batching is on: the source reaches its socket
    // wait with an old commit last (a fresh drain marker read in the same burst would
    // rightly count as caught up).
    let start = Instant::now();
    while !rig
        .daemon()
        .stderr_contains("catching up: reading the socket in batches")
    {
        rig.daemon().assert_alive("catching up");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the backlog was read in batches\n{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Small and fresh: only the interval read can take it.
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
    let code = rig.daemon().sigterm();
    assert_eq!(code, Some(0), "{}", rig.daemon().stderr_all());
}

/// `ALTER TABLE ... RENAME` swaps: the old table keeps its OID (and its place in the
/// publication) under a new name, and a new table takes the mapped name. Its changes
/// are neither dropped as unmapped nor counted beside the old rows: Redis is rebuilt
/// from the table that holds the name now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_swapped_in_by_rename_rebuilds_redis_from_it() {
    let seed = test_seed("a_table_swapped_in_by_rename_rebuilds_redis_from_it");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 200, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.exec(
        "ALTER TABLE inventory RENAME TO inventory_old;
         CREATE TABLE inventory (LIKE inventory_old INCLUDING ALL);
         INSERT INTO inventory SELECT sku, location, on_hand + 1000, reserved FROM inventory_old
           WHERE location <> 'WH-1';
         ALTER PUBLICATION skusync ADD TABLE inventory;
         UPDATE inventory_old SET on_hand = on_hand + 1;",
    )
    .await;
    run_workload(&mut rig, &mut w, 200, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(20)).await;
    assert!(
        rig.daemon()
            .stderr_contains("is now named public.inventory_old"),
        "the rebuild names its reason\n{}",
        rig.daemon().stderr_all()
    );
    rig.daemon().assert_alive("after the swap");
}

/// The public schema plus `loose_stock`, a stock table without a key (REPLICA IDENTITY
/// FULL), mapped beside `inventory`; skusync not started.
async fn full_identity_rig() -> Rig {
    let mut oracle = public_oracle(Buckets::Ignore);
    oracle.inventory.push(InventorySpec {
        table: "public.loose_stock".into(),
        sku: "sku_code".into(),
        location: Some("location".into()),
        on_hand: "on_hand".into(),
        reserved: None,
    });
    let schema = format!(
        "{PUBLIC_SCHEMA}
         CREATE TABLE loose_stock (sku_code text, location text NOT NULL, on_hand int NOT NULL);
         ALTER TABLE loose_stock REPLICA IDENTITY FULL;
         ALTER PUBLICATION skusync ADD TABLE loose_stock;"
    );
    Rig::new(&schema, oracle).await
}

/// With REPLICA IDENTITY FULL every column is part of a row's identity, so a column
/// added to the table changes how its rows are named: Redis is rebuilt rather than
/// counting an updated row under both names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_identity_table_gaining_a_column_does_not_double_count() {
    let mut rig = full_identity_rig().await;
    rig.start_skusync("").await;
    rig.exec(
        "INSERT INTO loose_stock SELECT 'loose-' || (i % 20), 'WH-' || (i % 3), i FROM generate_series(1, 60) i;",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
    rig.exec(
        "ALTER TABLE loose_stock ADD COLUMN note text;
         UPDATE loose_stock SET on_hand = on_hand + 100 WHERE on_hand % 2 = 0;
         DELETE FROM loose_stock WHERE on_hand % 5 = 0;",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(20)).await;
    rig.daemon().assert_alive("after the new column");
}

/// A mapped table renamed away (nothing under its name any more) cannot be rebuilt:
/// skusync stops and says what to fix rather than dropping its changes as unmapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_table_renamed_away_stops_with_what_to_fix() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    rig.exec(
        "INSERT INTO inventory VALUES ('A-1', 'WH-1', 5, 0);
         ALTER TABLE inventory RENAME TO stock_levels;
         UPDATE stock_levels SET on_hand = 6;",
    )
    .await;
    let status = rig
        .daemon()
        .wait_exit(Duration::from_secs(60), "after its table was renamed away")
        .await;
    assert!(!status.success(), "{status}");
    let log = rig.daemon().stderr_all();
    assert!(
        log.contains("is now named public.stock_levels")
            && log.contains("mapped table public.inventory does not exist"),
        "{log}"
    );
}

/// A change larger than `postgres.max_message_bytes` would come back on every reconnect:
/// skusync stops and says how to keep such values out of the stream, instead of
/// reconnecting forever behind a slot that never moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_over_the_message_cap_stops_with_the_sql_to_fix_it() {
    let schema = format!(
        "{PUBLIC_SCHEMA}
         CREATE TABLE product_notes (sku text PRIMARY KEY, body text);
         ALTER PUBLICATION skusync ADD TABLE product_notes;"
    );
    let mut rig = Rig::new(&schema, public_oracle(Buckets::Ignore)).await;
    let text = rig.config_text().replace(
        "status_interval_ms = 200\n",
        "status_interval_ms = 200\nmax_message_bytes = 1048576\n",
    );
    rig.start_with_config(&text).await;
    // Random bytes in hex: TOAST compression cannot shrink it below the cap.
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.exec(
        "INSERT INTO product_notes
           SELECT 'A-1', string_agg(md5(random()::text), '') FROM generate_series(1, 40000);",
    )
    .await;
    let status = rig
        .daemon()
        .wait_exit(Duration::from_secs(60), "past an oversized change")
        .await;
    assert!(!status.success(), "{status}");
    let log = rig.daemon().stderr_all();
    assert!(
        log.contains("exceeds postgres.max_message_bytes (1048576)")
            && log.contains("ALTER PUBLICATION"),
        "{log}"
    );
}

/// Dropping a mapped column stops skusync with the column, what to do, and where in
/// the stream it happened; nothing after it is folded without the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_mapped_column_stops_with_what_to_fix_and_where() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    rig.exec("INSERT INTO inventory VALUES ('A-1', 'WH-1', 5, 2);")
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.exec(
        "ALTER TABLE inventory DROP COLUMN reserved;
         UPDATE inventory SET on_hand = 6;",
    )
    .await;
    let status = rig
        .daemon()
        .wait_exit(Duration::from_secs(60), "without a mapped column")
        .await;
    assert!(!status.success(), "{status}");
    let log = rig.daemon().stderr_all();
    assert!(
        log.contains("mapped column public.inventory.reserved")
            && log.contains("restore it or fix the mapping")
            && log.contains("met in the transaction that commits at LSN"),
        "{log}"
    );
    let key = skusync::sinks::layout::sku_key("skusync", "A-1");
    assert_eq!(
        hget(&mut rig.con, &key, "on_hand").await.as_deref(),
        Some("5"),
        "the update after the drop was not applied without its column"
    );
}

/// Activity logs are often rotated by rename. Their rows are counted on insert, so the
/// new table is followed by name and the lifetime totals keep what was counted before
/// (a rebuild would recount them from the rows left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_an_activity_table_by_rename_keeps_its_counters() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    rig.exec(
        "INSERT INTO activity_log (sku, kind, qty) SELECT 'R-1', 'view', 1 FROM generate_series(1, 3);",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.exec(
        "ALTER TABLE activity_log RENAME TO activity_log_old;
         CREATE TABLE activity_log (LIKE activity_log_old INCLUDING ALL);
         ALTER PUBLICATION skusync_activity ADD TABLE activity_log;",
    )
    .await;
    rig.exec(
        "INSERT INTO activity_log (sku, kind, qty) SELECT 'R-1', 'view', 1 FROM generate_series(1, 2);",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let key = skusync::sinks::layout::sku_key("skusync", "R-1");
    let start = Instant::now();
    while hget(&mut rig.con, &key, "views").await.as_deref() != Some("5") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "views = {:?}, want 5 (3 before the rotation, 2 after)\n{}",
            hget(&mut rig.con, &key, "views").await,
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !rig.daemon().stderr_contains("rebuilding"),
        "{}",
        rig.daemon().stderr_all()
    );
    rig.daemon().assert_alive("after the rotation");
}

/// SCAN keys matching a pattern.
pub async fn keys_matching(
    con: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await
            .expect("SCAN");
        out.extend(keys);
        cursor = next;
        if cursor == 0 {
            return out;
        }
    }
}

/// Redis built by a release before key layout 3 (SKU hashes at `<prefix>:sku:<SKU>`,
/// no meta `layout`) is rebuilt once into the
/// current layout; the MQTT outbox marks move with each SKU (so a SKU that vanished
/// meanwhile can still be cleared on the broker) and no key of the old layout is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_in_an_earlier_key_layout_is_rebuilt_once() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand, reserved)
           SELECT 'U-' || i, 'WH-1', i, 0 FROM generate_series(1, 20) i;
         INSERT INTO activity_log (sku, kind, qty) VALUES ('U-1', 'view', 1);",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    assert_eq!(rig.daemon().sigterm(), Some(0));
    // Turn it into what a release before layout 3 left behind.
    let layout_keys = keys_matching(
        &mut rig.con,
        &skusync::sinks::layout::sku_key_pattern("skusync"),
    )
    .await;
    assert!(layout_keys.len() >= 20, "{layout_keys:?}");
    for k in &layout_keys {
        let Some(sku) = skusync::sinks::layout::sku_of_key("skusync", k) else {
            continue;
        };
        let _: () = redis::cmd("RENAME")
            .arg(k)
            .arg(format!("skusync:sku:{sku}"))
            .query_async(&mut rig.con)
            .await
            .expect("RENAME");
    }
    let _: () = redis::cmd("HSET")
        .arg("skusync:sku:VANISHED")
        .arg("pub_lsn")
        .arg("5")
        .arg("pub_state")
        .arg("{\"on_hand\":3}")
        .arg("on_hand")
        .arg("3")
        .query_async(&mut rig.con)
        .await
        .expect("HSET");
    let meta = skusync::sinks::layout::meta_key("skusync");
    let _: () = redis::cmd("HDEL")
        .arg(&meta)
        .arg("layout")
        .query_async(&mut rig.con)
        .await
        .expect("HDEL");
    rig.daemon().spawn();
    rig.exec("UPDATE inventory SET on_hand = on_hand + 1 WHERE sku LIKE 'U-%';")
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(20)).await;
    assert_eq!(
        hget(&mut rig.con, &meta, "layout").await.as_deref(),
        Some("3")
    );
    assert_eq!(
        keys_matching(&mut rig.con, "skusync:sku:*").await,
        Vec::<String>::new(),
        "no SKU hash of the old layout is left"
    );
    assert_eq!(
        keys_matching(&mut rig.con, "{skusync:sku:*").await,
        Vec::<String>::new()
    );
    let vanished = skusync::sinks::layout::sku_key("skusync", "VANISHED");
    assert_eq!(
        hget(&mut rig.con, &vanished, "pub_lsn").await.as_deref(),
        Some("5")
    );
    assert_eq!(hget(&mut rig.con, &vanished, "on_hand").await, None);
    assert_eq!(
        rig.daemon()
            .stderr_count("key layout of an earlier skusync"),
        1,
        "one rebuild\n{}",
        rig.daemon().stderr_all()
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
    rig.daemon().spawn();
    rig.exec("UPDATE inventory SET on_hand = on_hand + 1 WHERE sku = 'U-2';")
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(20)).await;
    assert_eq!(
        rig.daemon()
            .stderr_count("key layout of an earlier skusync"),
        1,
        "never again\n{}",
        rig.daemon().stderr_all()
    );
    rig.daemon().assert_alive("after the upgrade");
}

/// Replica-identity key values may hold any bytes, including the one earlier layouts
/// joined key columns with (0x1f): rows that only differ in where a value ends are
/// distinct rows, and each counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_values_holding_any_bytes_name_distinct_rows() {
    let mut oracle = public_oracle(Buckets::Ignore);
    oracle.inventory.push(InventorySpec {
        table: "public.bin_stock".into(),
        sku: "sku".into(),
        location: None,
        on_hand: "qty".into(),
        reserved: None,
    });
    let schema = format!(
        "{PUBLIC_SCHEMA}
         CREATE TABLE bin_stock (sku text, bin text, lot text, qty int NOT NULL, PRIMARY KEY (sku, bin, lot));
         ALTER PUBLICATION skusync ADD TABLE bin_stock;
         INSERT INTO bin_stock VALUES ('S1', E'W\\x1fX', '1', 5), ('S1', 'W', E'X\\x1f1', 7),
                                      ('S3', '', 'ab', 1), ('S3', 'a', 'b', 2), ('S3', 'ab', '', 4);"
    );
    let mut rig = Rig::new(&schema, oracle).await;
    rig.start_skusync("").await;
    rig.exec(
        "INSERT INTO bin_stock VALUES ('S2', E'W\\x1fX', '1', 10), ('S2', 'W', E'X\\x1f1', 20);
         UPDATE bin_stock SET qty = qty + 100 WHERE sku = 'S1' AND bin = 'W';
         DELETE FROM bin_stock WHERE sku = 'S3' AND bin = 'a';",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(20)).await;
    for (sku, want) in [("S1", "112"), ("S2", "30"), ("S3", "5")] {
        let key = skusync::sinks::layout::sku_key("skusync", sku);
        assert_eq!(
            hget(&mut rig.con, &key, "on_hand").await.as_deref(),
            Some(want),
            "{sku}"
        );
    }
}

/// One activity row dated far ahead (a typo'd year) must not move the SKU's window
/// forward: it counts at its commit time, and present events keep counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_event_time_counts_at_the_commit_and_keeps_the_window_live() {
    let mut oracle = public_oracle(Buckets::Ignore);
    oracle.activity[0].time = Some("at".into());
    let mut rig = Rig::new(PUBLIC_SCHEMA, oracle).await;
    rig.start_skusync("").await;
    rig.exec(
        "INSERT INTO activity_log (sku, kind, qty, at) VALUES ('F-1', 'view', 1, now() + interval '180 years');",
    )
    .await;
    rig.exec("INSERT INTO activity_log (sku, kind, qty) VALUES ('F-1', 'view', 1);")
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let key = skusync::sinks::layout::sku_key("skusync", "F-1");
    let now_min = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60) as i64;
    let h = hgetall(&mut rig.con, &key).await;
    assert_eq!(h.get("views").map(String::as_str), Some("2"), "{h:?}");
    let wmax: i64 = h["wmax:views"].parse().unwrap();
    assert!(
        (now_min - 2..=now_min + 1).contains(&wmax),
        "wmax {wmax}, now {now_min}: {h:?}"
    );
    let in_window: i64 = h
        .iter()
        .filter(|(f, _)| f.starts_with("w:views:"))
        .map(|(_, v)| v.parse::<i64>().unwrap())
        .sum();
    assert_eq!(in_window, 2, "both events are in the live window: {h:?}");
    assert!(
        rig.daemon()
            .stderr_contains("more than 5 minutes after the commit"),
        "{}",
        rig.daemon().stderr_all()
    );
}

/// Activity rows create SKUs: one longer than `limits.max_sku_bytes` (a SKU taken from a
/// URL, say) is skipped and reported, never stored; stock rows alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skus_longer_than_the_cap_are_skipped_and_reported() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("\n[limits]\nmax_sku_bytes = 16\n").await;
    let long = "X".repeat(17);
    rig.exec(&format!(
        "INSERT INTO activity_log (sku, kind, qty) VALUES ('{long}', 'view', 1), ('SHORT-1', 'view', 1);
         INSERT INTO inventory (sku, location, on_hand) VALUES ('{long}', 'WH-1', 5), ('SHORT-1', 'WH-1', 7);"
    ))
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let short = skusync::sinks::layout::sku_key("skusync", "SHORT-1");
    assert_eq!(
        hget(&mut rig.con, &short, "views").await.as_deref(),
        Some("1")
    );
    assert_eq!(
        hget(&mut rig.con, &short, "on_hand").await.as_deref(),
        Some("7")
    );
    let keys = keys_matching(&mut rig.con, "skusync:{XXXX*").await;
    assert!(keys.is_empty(), "{keys:?}");
    assert!(
        rig.daemon()
            .stderr_contains("SKU longer than max_sku_bytes"),
        "{}",
        rig.daemon().stderr_all()
    );
    assert!(
        !rig.daemon().stderr_contains(&long),
        "the SKU itself is never logged"
    );
}

/// `known_skus_only`: an activity table whose SKUs come from untrusted input counts only
/// SKUs that have stock rows when its transaction is applied; others get no hash at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activity_table_with_known_skus_only_counts_no_unknown_sku() {
    let schema = format!(
        "{PUBLIC_SCHEMA}
         CREATE TABLE url_views (id bigserial PRIMARY KEY, sku text, kind text NOT NULL);
         ALTER PUBLICATION skusync_activity ADD TABLE url_views;"
    );
    let mut rig = Rig::new(&schema, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync(
        "\n[[activity]]\ntable = \"public.url_views\"\nsku = \"sku\"\nkind = \"kind\"\n\
         known_skus_only = true\n[activity.counters]\nview = \"url_views\"\n",
    )
    .await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand) VALUES ('KNOWN-1', 'WH-1', 5);
         INSERT INTO url_views (sku, kind) VALUES ('KNOWN-1', 'view'), ('KNOWN-1', 'view'),
           ('GHOST-1', 'view'), ('GHOST-1', 'view'), ('GHOST-2', 'view');",
    )
    .await;
    rig.exec(
        "BEGIN;
         INSERT INTO inventory (sku, location, on_hand) VALUES ('GHOST-2', 'WH-1', 1);
         INSERT INTO url_views (sku, kind) VALUES ('GHOST-2', 'view');
         COMMIT;",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let key = |s: &str| skusync::sinks::layout::sku_key("skusync", s);
    assert_eq!(
        hget(&mut rig.con, &key("KNOWN-1"), "url_views")
            .await
            .as_deref(),
        Some("2")
    );
    assert!(
        keys_matching(&mut rig.con, &key("GHOST-1"))
            .await
            .is_empty(),
        "no hash for a SKU without stock"
    );
    assert_eq!(
        hget(&mut rig.con, &key("GHOST-2"), "url_views")
            .await
            .as_deref(),
        Some("1"),
        "the view before its stock existed counts nowhere, the one after it counts"
    );
    rig.daemon().assert_alive("after the workload");
}

/// Alerts are evaluated once per transaction: `BEGIN; TRUNCATE; INSERT ...; COMMIT`
/// that puts the same stock back raises nothing (it used to raise `out_of_stock`, then
/// `back_in_stock`, for every SKU); a TRUNCATE alone raises `out_of_stock` once per SKU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_truncated_and_refilled_in_one_transaction_raises_no_alert() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand) SELECT 'T-' || i, 'WH-1', 100 FROM generate_series(1, 5) i;",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let alerts = async |rig: &mut Rig, sku: &str| -> Vec<String> {
        let key = skusync::sinks::layout::sku_key("skusync", sku);
        let raw = hget(&mut rig.con, &key, "alerts")
            .await
            .unwrap_or_else(|| "[]".into());
        let v: Vec<serde_json::Value> = serde_json::from_str(&raw).expect("alerts JSON");
        v.iter()
            .map(|a| a["type"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert!(alerts(&mut rig, "T-1").await.is_empty());
    rig.exec(
        "BEGIN;
         TRUNCATE inventory;
         INSERT INTO inventory (sku, location, on_hand) SELECT 'T-' || i, 'WH-1', 100 FROM generate_series(1, 5) i;
         COMMIT;",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(20)).await;
    for i in 1..=5 {
        let sku = format!("T-{i}");
        assert_eq!(alerts(&mut rig, &sku).await, Vec::<String>::new(), "{sku}");
    }
    rig.exec("TRUNCATE inventory;").await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    for i in 1..=5 {
        let sku = format!("T-{i}");
        assert_eq!(alerts(&mut rig, &sku).await, ["out_of_stock"], "{sku}");
    }
}

/// A TRUNCATE over more SKUs than one SCAN page (the daemon clears and evaluates a page
/// at a time, so its memory follows the page): every SKU is cleared and alerted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_over_several_pages_of_skus_clears_and_alerts_every_one() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand) SELECT 'P-' || i, 'WH-1', 50 FROM generate_series(1, 3500) i;",
    )
    .await;
    rig.start_skusync("").await;
    rig.assert_converges(Duration::from_secs(30)).await;
    rig.exec("TRUNCATE inventory;").await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    let mut missing = Vec::new();
    for i in 1..=3500 {
        let key = skusync::sinks::layout::sku_key("skusync", &format!("P-{i}"));
        let raw = hget(&mut rig.con, &key, "alerts").await.unwrap_or_default();
        if !raw.contains("out_of_stock") {
            missing.push(i);
        }
    }
    assert!(
        missing.is_empty(),
        "no out_of_stock alert for P-{missing:?}"
    );
}

/// A `char(n)` SKU is the SKU without its pad spaces, as PostgreSQL compares and casts it:
/// stock in a `char(12)` column and activity in a `text` column land in one SKU, in the
/// snapshot and in the stream, and key-only deletes find their rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn char_n_skus_are_the_skus_without_their_pad_spaces() {
    let schema = PUBLIC_SCHEMA.replace(
        "CREATE TABLE inventory (\n  sku text NOT NULL, location text NOT NULL,",
        "CREATE TABLE inventory (\n  sku char(12) NOT NULL, location char(8) NOT NULL,",
    );
    assert!(schema.contains("char(12)"));
    let mut rig = Rig::new(&schema, public_oracle(Buckets::Ignore)).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand) VALUES ('A1', 'WH-1', 7), ('B2', 'WH-1', 3);
         INSERT INTO activity_log (sku, kind, qty) VALUES ('A1', 'view', 1);",
    )
    .await;
    rig.start_skusync("").await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand) VALUES ('A1', 'WH-2', 5);
         DELETE FROM inventory WHERE sku = 'B2';
         INSERT INTO activity_log (sku, kind, qty) VALUES ('A1', 'view', 1);",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let key = |s: &str| skusync::sinks::layout::sku_key("skusync", s);
    assert_eq!(
        hget(&mut rig.con, &key("A1"), "on_hand").await.as_deref(),
        Some("12")
    );
    assert_eq!(
        hget(&mut rig.con, &key("A1"), "views").await.as_deref(),
        Some("2")
    );
    assert_eq!(
        hget(&mut rig.con, &key("A1"), "loc:WH-2:on_hand")
            .await
            .as_deref(),
        Some("5")
    );
    assert_eq!(
        hget(&mut rig.con, &key("B2"), "on_hand").await.as_deref(),
        Some("0")
    );
    let padded = keys_matching(&mut rig.con, "skusync:{A1 *").await;
    assert!(padded.is_empty(), "padded SKU keys: {padded:?}");

    // A Redis built by a release that kept the pad spaces (no meta `publications`) is
    // rebuilt at the next start.
    assert_eq!(rig.daemon().sigterm(), Some(0));
    rig.redis.cli(&["HDEL", "skusync:meta", "publications"]);
    rig.daemon().spawn();
    rig.daemon()
        .wait_stderr(
            "char(n) values are now read without their pad spaces",
            Duration::from_secs(30),
        )
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    assert_eq!(
        hget(&mut rig.con, &key("A1"), "on_hand").await.as_deref(),
        Some("12")
    );
    assert_ne!(rig.redis.cli(&["HGET", "skusync:meta", "publications"]), "");
}
