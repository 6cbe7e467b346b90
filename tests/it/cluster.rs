//! skusync on a Redis Cluster: 3 primaries and 3 replicas on loopback
//! (`harness::RedisCluster`), `[redis] cluster = true` with a list of seed nodes. The
//! workload keeps writing while the cluster reshards, fails over and loses a primary to
//! SIGKILL; after the drain Redis (read node by node) equals the SQL aggregate and the
//! retained messages equal Redis.

use crate::fold_oracle::*;
use crate::harness::{MosquittoServer, PgServer, RedisCluster};
use crate::mqtt_e2e::{mqtt_toml, retained_differences};
use crate::oracle::*;
use crate::support::*;
use redis::aio::MultiplexedConnection;
use std::time::{Duration, Instant};

/// PostgreSQL with the public schema, a 3+3 cluster, a broker, and skusync's config.
struct ClusterRig {
    pg: PgServer,
    cluster: RedisCluster,
    broker: MosquittoServer,
    client: tokio_postgres::Client,
    oracle: Oracle,
    daemon: Option<Daemon>,
    dir: tempfile::TempDir,
    markers: u64,
}

impl ClusterRig {
    async fn new() -> ClusterRig {
        let pg = PgServer::start();
        pg.psql(PUBLIC_SCHEMA);
        let cluster = RedisCluster::start(3, 1);
        let broker = MosquittoServer::start();
        let client = pg.client("postgres").await;
        ClusterRig {
            pg,
            cluster,
            broker,
            client,
            oracle: public_oracle(Buckets::SumEqualsTotal),
            daemon: None,
            dir: tempfile::tempdir().expect("tempdir"),
            markers: 0,
        }
    }

    /// The config: the oracle's mapping, two seed nodes, `cluster = true`, the broker.
    fn config_text(&self) -> String {
        let seed = self.cluster.seed_url();
        let text =
            self.oracle
                .config_toml(&self.pg.url("postgres", "postgres"), "skusync", PUBS, &seed);
        let second = self.cluster.nodes[self.cluster.primaries()[1]].url();
        let with = text.replacen(
            &format!("[redis]\nurl = \"{seed}\""),
            &format!("[redis]\ncluster = true\nurl = [\"{seed}\", \"{second}\"]"),
            1,
        );
        assert_ne!(with, text, "the [redis] section was not found:\n{text}");
        format!("{with}{}", mqtt_toml(&self.broker, 0))
    }

    async fn start(&mut self) {
        self.start_with(|t| t).await;
    }

    /// [`ClusterRig::start`] with distinct users counted: `activity_log` gets a user
    /// column, mapped with an HMAC key.
    async fn start_counting_users(&mut self) {
        self.client
            .batch_execute("ALTER TABLE activity_log ADD COLUMN user_id text")
            .await
            .expect("user column");
        self.start_with(|t| {
            t.replace(
                "windows = [",
                "user = \"user_id\"\nuser_key = \"0123456789abcdef0123456789abcdef\"\nwindows = [",
            )
        })
        .await;
    }

    /// [`ClusterRig::start`] with the config text edited by `edit`.
    async fn start_with(&mut self, edit: impl FnOnce(String) -> String) {
        let cfg = write_config(self.dir.path(), &edit(self.config_text()));
        // it may hold an HMAC key
        std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod config");
        self.daemon = Some(Daemon::start(self.dir.path(), cfg));
        let meta = skusync::sinks::layout::meta_key(&self.oracle.prefix);
        let start = Instant::now();
        loop {
            self.daemon().assert_alive("bootstrapping on the cluster");
            if hget(&mut self.con().await, &meta, "bootstrap")
                .await
                .as_deref()
                == Some("done")
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no bootstrap on the cluster\n{}",
                self.daemon().stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("skusync started")
    }

    /// Restart skusync with `SKUSYNC_FAILPOINT=<point>`, run `sql` and wait until the
    /// failpoint aborts it (it stays stopped).
    async fn abort_at(&mut self, point: &str, sql: &str) {
        let d = self.daemon();
        let mut p = d.proc.take().expect("running");
        let _ = p.child.kill();
        let _ = p.child.wait();
        d.spawn_env(&[("SKUSYNC_FAILPOINT", point)]);
        d.wait_streaming(Duration::from_secs(30)).await;
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let start = Instant::now();
        while !matches!(self.daemon().proc().child.try_wait(), Ok(Some(_))) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the failpoint {point} was not reached\n{}",
                self.daemon().stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(self.daemon().stderr_contains("failpoint reached"));
    }

    /// A primary that does not serve the meta hash (whose own loss a restart catches
    /// anyway): the one serving it answers EXISTS, the others say MOVED.
    fn primary_without_the_meta_hash(&self) -> usize {
        let meta = skusync::sinks::layout::meta_key(&self.oracle.prefix);
        self.cluster
            .primaries()
            .into_iter()
            .find(|p| {
                self.cluster.nodes[*p]
                    .try_cli(&["EXISTS", &meta])
                    .is_ok_and(|r| r.contains("MOVED"))
            })
            .expect("a primary that does not serve the meta hash")
    }

    /// Mark Redis stale (meta `bootstrap`), as after a lost slot: the next start rebuilds.
    async fn mark_stale(&self) {
        let _: () = redis::cmd("HSET")
            .arg(skusync::sinks::layout::meta_key(&self.oracle.prefix))
            .arg("bootstrap")
            .arg("stale")
            .query_async(&mut self.con().await)
            .await
            .expect("mark stale");
    }

    /// The distinct users a SKU hash's `views` HyperLogLog counts (PFCOUNT).
    async fn users_counted(&self, key: &str) -> i64 {
        redis::cmd("PFCOUNT")
            .arg(format!("{key}:u:views"))
            .query_async(&mut self.con().await)
            .await
            .expect("PFCOUNT")
    }

    /// The alert history's entries (XRANGE), each as its fields, oldest first.
    async fn alert_history(&self) -> Vec<std::collections::HashMap<String, String>> {
        let v: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(skusync::sinks::layout::alerts_key(&self.oracle.prefix))
            .arg("-")
            .arg("+")
            .query_async(&mut self.con().await)
            .await
            .expect("XRANGE");
        v.into_iter().map(|(_, a)| a).collect()
    }

    /// The alert types the history holds for `sku`, oldest first.
    async fn alerts_of(&self, sku: &str) -> Vec<String> {
        let key = skusync::sinks::layout::sku_key(&self.oracle.prefix, sku);
        self.alert_history()
            .await
            .into_iter()
            .filter(|a| a.get("key") == Some(&key))
            .map(|a| a["type"].clone())
            .collect()
    }

    /// `n` transactions of `w`, one after another.
    async fn run(&mut self, w: &mut Workload, n: usize) {
        for _ in 0..n {
            let sql = w.next_txn();
            self.client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("workload SQL failed: {e:?}\n{sql}"));
        }
    }

    /// SIGTERM skusync; it must exit 0.
    fn stop_cleanly(&mut self) {
        let code = self.daemon().sigterm();
        assert_eq!(
            code,
            Some(0),
            "SIGTERM exits 0\n{}",
            self.daemon().stderr_all()
        );
    }

    /// A cluster connection (following MOVED and ASK) for single keys.
    async fn con(&self) -> redis::cluster_async::ClusterConnection {
        let seeds: Vec<String> = self
            .cluster
            .primaries()
            .into_iter()
            .map(|p| self.cluster.nodes[p].url())
            .collect();
        // bounded: a frozen node accepts connections and never answers
        redis::cluster::ClusterClientBuilder::new(seeds)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .build()
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("connect to the cluster")
    }

    /// Every SKU hash, read primary by primary (SCAN is per node).
    async fn redis_state(&self) -> RedisState {
        let mut all = RedisState::new();
        for p in self.cluster.primaries() {
            let mut con: MultiplexedConnection = redis_connect(&self.cluster.nodes[p].url()).await;
            for (sku, h) in self.oracle.redis_state(&mut con).await {
                let dup = all.insert(sku.clone(), h);
                assert!(dup.is_none(), "{sku:?} has a hash on two primaries");
            }
        }
        all
    }

    async fn mismatches(&self) -> Vec<Mismatch> {
        let truth = self.oracle.truth(&self.client).await;
        let state = self.redis_state().await;
        let mut m = self.oracle.meta_mismatches(&mut self.con().await).await;
        m.extend(self.oracle.compare(&truth, &state));
        m
    }

    /// Insert a drain marker and wait until Redis has it.
    async fn drain(&mut self, timeout: Duration) {
        self.markers += 1;
        let n = self.markers;
        self.client
            .batch_execute(&WorkloadTables::public().marker_sql(n, "WH-1"))
            .await
            .expect("marker");
        let key = skusync::sinks::layout::sku_key(&self.oracle.prefix, &marker_sku(n));
        let start = Instant::now();
        loop {
            self.daemon().assert_alive("draining");
            if hget(&mut self.con().await, &key, "on_hand").await == Some(n.to_string()) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "drain marker {key} not applied after {timeout:?}\n{}",
                self.daemon().stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// [`ClusterRig::assert_converges`] after a failover that lost a slot's writes, which
    /// skusync must have noticed (`what` says when).
    async fn assert_converges_after_a_lost_slot(&mut self, what: &str) {
        self.assert_converges(Duration::from_secs(60)).await;
        assert!(
            self.daemon()
                .stderr_contains("a Redis Cluster slot lost recent writes"),
            "{what}\n{}",
            self.daemon().stderr_all()
        );
    }

    /// Redis equals SQL, and the retained messages equal Redis, within `timeout`.
    async fn assert_converges(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let m = self.mismatches().await;
            let r = if m.is_empty() {
                retained_differences(&self.redis_state().await, &self.broker)
            } else {
                Vec::new()
            };
            if m.is_empty() && r.is_empty() {
                return;
            }
            self.daemon().assert_alive("converging");
            if start.elapsed() > timeout {
                panic!(
                    "the cluster differs after {timeout:?}:\n{}\nretained: {r:#?}\n{}",
                    format_mismatches(&m, 60),
                    self.daemon().stderr_all()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The default SKUs and SKUs with the bytes that delimit hash tags.
fn cluster_skus() -> Vec<String> {
    let mut v = Workload::default_skus();
    v.extend(["{", "}", "{}", "a{b}c", "{x}y", "}{"].map(String::from));
    v
}

/// The seeded workload of these tests: the public tables with [`cluster_skus`].
fn cluster_workload(seed: u64) -> Workload {
    Workload::new(
        seed,
        WorkloadTables::public(),
        cluster_skus(),
        Workload::default_locations(),
    )
}

/// Transactions from `w` on a connection of its own until `stop` is set; returns the
/// workload.
fn spawn_workload(
    pg_url: String,
    mut w: Workload,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Workload> {
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
            .await
            .expect("workload connection");
        tokio::spawn(conn);
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let sql = w.next_txn();
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("workload SQL failed: {e:?}\n{sql}"));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        w
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_stays_exact_through_a_reshard_a_failover_and_a_primary_sigkill() {
    let seed =
        test_seed("a_redis_cluster_stays_exact_through_a_reshard_a_failover_and_a_primary_sigkill");
    let mut rig = ClusterRig::new().await;
    // a snapshot to load: some rows before skusync starts
    let mut w = cluster_workload(seed);
    rig.run(&mut w, 40).await;
    rig.start().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let work = spawn_workload(rig.pg.url("postgres", "postgres"), w, stop.clone());
    let pause = || tokio::time::sleep(Duration::from_millis(1500));
    pause().await;

    let primaries = rig.cluster.primaries();
    tokio::task::block_in_place(|| rig.cluster.reshard(primaries[0], primaries[1], 3000));
    pause().await;
    let r = rig.cluster.replica_of(primaries[1]).expect("a replica");
    tokio::task::block_in_place(|| rig.cluster.failover(r));
    pause().await;
    let victim = rig.cluster.primaries()[2];
    tokio::task::block_in_place(|| rig.cluster.kill9(victim));
    pause().await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let w = work.await.expect("workload task");
    eprintln!(
        "workload: {} statements in {} transactions ({} rolled back)",
        w.statements, w.txns, w.rollbacks
    );
    assert!(
        w.txns > 100,
        "the workload ran during the faults: {}",
        w.txns
    );
    rig.drain(Duration::from_secs(90)).await;
    rig.assert_converges(Duration::from_secs(60)).await;
    // every key skusync wrote is in a slot of its SKU's tag: reading each SKU's hash and
    // its users through `redis-cli -c` works (the docs' example)
    let key = skusync::sinks::layout::sku_key("skusync", "a{b}c");
    assert!(
        rig.cluster
            .cli_c(&["HGET", &key, "lsn"])
            .parse::<u64>()
            .is_ok()
            || !rig
                .oracle
                .truth(&rig.client)
                .await
                .skus
                .contains_key("a{b}c"),
        "{key} readable with redis-cli -c"
    );
    // the change index (written after each slot's call) scores every SKU hash by its LSN
    let index: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(skusync::sinks::layout::changes_key("skusync"))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut rig.con().await)
        .await
        .expect("ZRANGE");
    let index: std::collections::BTreeMap<String, f64> = index.into_iter().collect();
    for (sku, h) in rig.redis_state().await {
        let key = skusync::sinks::layout::sku_key("skusync", &sku);
        let lsn: f64 = h.get("lsn").and_then(|l| l.parse().ok()).unwrap_or(-1.0);
        assert_eq!(index.get(&key), Some(&lsn), "{key} in the change index");
    }
    // `status` and `check` understand the cluster
    let cfg = rig.daemon().cfg.clone();
    let status = skusync_output(&["status", "--json"], &cfg);
    let j: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status --json");
    assert_eq!(j["redis_primaries"], 3, "{j}");
    assert_eq!(j["bootstrap"], "done", "{j}");
    let check = skusync_output(&["check"], &cfg);
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(out.contains("redis cluster: every slot served"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    rig.stop_cleanly();
}

/// A start claims every slot's meta copy for its writer token (so a replaced instance's
/// writes are refused in every slot), in a few script calls per primary rather than one
/// per slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_claims_every_slots_meta_copy_in_a_few_calls_per_primary() {
    let seed = test_seed("a_restart_claims_every_slots_meta_copy_in_a_few_calls_per_primary");
    let mut rig = ClusterRig::new().await;
    let mut w = cluster_workload(seed);
    rig.start().await;
    rig.run(&mut w, 30).await;
    rig.drain(Duration::from_secs(30)).await;
    rig.stop_cleanly();
    let meta = skusync::sinks::layout::meta_key(&rig.oracle.prefix);
    let old = hget(&mut rig.con().await, &meta, "writer").await;
    for p in rig.cluster.primaries() {
        rig.cluster.nodes[p].cli(&["CONFIG", "RESETSTAT"]);
    }
    rig.start().await;
    // `start` returns once Redis is bootstrapped, which the first instance already did:
    // read at once, the token raced the claim and could be the old one. The claim
    // writes the meta hash, then the copies, then the instance streams.
    rig.daemon().wait_streaming(Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let token = loop {
        let t = hget(&mut rig.con().await, &meta, "writer").await;
        if let Some(t) = t.filter(|t| Some(t) != old.as_ref()) {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted instance never claimed the writer token"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pattern = skusync::sinks::layout::slot_meta_pattern(&rig.oracle.prefix);
    let (mut copies, mut evals) = (0, 0u64);
    for p in rig.cluster.primaries() {
        let mut con: MultiplexedConnection = redis_connect(&rig.cluster.nodes[p].url()).await;
        let keys: Vec<String> = {
            let mut it = redis::AsyncCommands::scan_match::<_, String>(&mut con, &pattern)
                .await
                .expect("SCAN");
            let mut keys = Vec::new();
            while let Some(k) = futures::StreamExt::next(&mut it).await {
                keys.push(k.expect("a key"));
            }
            keys
        };
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.hget(k, "writer");
        }
        let writers: Vec<Option<String>> = pipe.query_async(&mut con).await.expect("HGETs");
        for (k, got) in keys.iter().zip(writers) {
            assert_eq!(
                got.as_deref(),
                Some(token.as_str()),
                "{k} holds the new token"
            );
        }
        copies += keys.len();
        let stats = rig.cluster.nodes[p].cli(&["INFO", "commandstats"]);
        evals += command_calls(&stats, "eval").unwrap_or(0);
    }
    assert_eq!(
        copies,
        skusync::sinks::layout::SLOTS,
        "every slot has its copy"
    );
    assert!(
        evals < 200,
        "the claim went a primary's slots at a time, not one call per slot: {evals} EVALs"
    );
    rig.stop_cleanly();
}

/// A primary that dies with writes its replica never got: the replica takes over older.
/// The slots it serves hold less than skusync recorded there (their meta copies' floor),
/// which skusync notices and repairs with a rebuild; Redis and the broker end exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_that_loses_writes_is_noticed_and_rebuilt() {
    let seed = test_seed("a_cluster_failover_that_loses_writes_is_noticed_and_rebuilt");
    let mut rig = ClusterRig::new().await;
    let mut w = cluster_workload(seed);
    rig.start().await;
    rig.run(&mut w, 100).await;
    rig.drain(Duration::from_secs(30)).await;
    let victim = rig.cluster.primaries()[0];
    let heir = rig.cluster.freeze_replica(victim);
    rig.run(&mut w, 200).await;
    rig.drain(Duration::from_secs(30)).await;
    tokio::task::block_in_place(|| rig.cluster.kill9_and_promote_stale_replica(victim, heir));
    rig.run(&mut w, 100).await;
    rig.drain(Duration::from_secs(120)).await;
    rig.assert_converges_after_a_lost_slot("the lost writes were noticed")
        .await;
    rig.stop_cleanly();
}

/// The same failover while skusync is stopped: the restarted process has written nothing
/// to those slots, so only the floors recorded in the meta hash with `applied_lsn`
/// (`floor:<slot>`) show that they hold less than was confirmed. The victim is a primary
/// that does not serve the meta hash (whose own loss a restart catches anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_that_loses_writes_while_skusync_is_stopped_is_noticed_at_restart() {
    use skusync::sinks::layout;
    let seed = test_seed(
        "a_cluster_failover_that_loses_writes_while_skusync_is_stopped_is_noticed_at_restart",
    );
    let mut rig = ClusterRig::new().await;
    let mut w = cluster_workload(seed);
    rig.start().await;
    rig.run(&mut w, 100).await;
    rig.drain(Duration::from_secs(30)).await;
    let meta = layout::meta_key(&rig.oracle.prefix);
    let victim = rig.primary_without_the_meta_hash();
    let heir = rig.cluster.freeze_replica(victim);
    rig.run(&mut w, 200).await;
    rig.drain(Duration::from_secs(30)).await;
    let recorded: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&meta)
        .query_async(&mut rig.con().await)
        .await
        .expect("HGETALL meta");
    assert!(
        recorded.keys().any(|f| f.starts_with("floor:")),
        "the slots' floors are recorded in the meta hash: {:?}",
        recorded.keys().collect::<Vec<_>>()
    );
    rig.stop_cleanly();
    tokio::task::block_in_place(|| rig.cluster.kill9_and_promote_stale_replica(victim, heir));
    rig.daemon().spawn();
    rig.drain(Duration::from_secs(120)).await;
    rig.assert_converges_after_a_lost_slot("the lost writes were noticed at the restart")
        .await;
    rig.stop_cleanly();
}

/// The primary serving `slot` and its node id, from `CLUSTER NODES`.
fn slot_owner(cluster: &RedisCluster, slot: u16) -> usize {
    let nodes = cluster.nodes[cluster.primaries()[0]].cli(&["CLUSTER", "NODES"]);
    let owner = nodes
        .lines()
        .find(|l| {
            l.split(' ').skip(8).any(|r| {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
            })
        })
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no node serves slot {slot}:\n{nodes}"));
    cluster
        .primaries()
        .into_iter()
        .find(|p| cluster.id(*p) == owner)
        .expect("a primary of the harness")
}

/// Start moving `slot` from the primary serving it to another one, as `redis-cli
/// --cluster reshard` does before it moves the slot's keys (`CLUSTER SETSLOT` IMPORTING
/// on the target, MIGRATING on the source); returns (source, target).
fn begin_migration(cluster: &RedisCluster, slot: u16) -> (usize, usize) {
    let src = slot_owner(cluster, slot);
    let dst = cluster
        .primaries()
        .into_iter()
        .find(|p| *p != src)
        .expect("another primary");
    let s = slot.to_string();
    cluster.nodes[dst].cli(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &cluster.id(src)]);
    cluster.nodes[src].cli(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &cluster.id(dst)]);
    (src, dst)
}

/// A live reshard that reaches a slot while its SKU gets its first distinct users: the
/// calls name a new HyperLogLog key there, which the migrating node does not hold.
/// Declared, Redis answers TRYAGAIN before the script runs (undeclared, the script failed
/// half way: "access a non local key"), and the call is sent again until the slot
/// settles: skusync neither stops nor loses a user or counts an event twice. The slot is
/// held migrating by hand (`CLUSTER SETSLOT`), as `redis-cli --cluster reshard` holds
/// each slot while it moves the slot's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_distinct_user_key_in_a_migrating_slot_waits_for_the_slot_and_loses_nothing() {
    use skusync::sinks::layout;
    let mut rig = ClusterRig::new().await;
    rig.start_counting_users().await;
    let sku = "RS/{1}";
    let key = layout::sku_key(&rig.oracle.prefix, sku);
    rig.client
        .batch_execute(&format!(
            "INSERT INTO inventory VALUES ('{sku}', 'WH-1', 5, 0)"
        ))
        .await
        .unwrap();
    rig.drain(Duration::from_secs(30)).await;
    let slot = layout::slot_of(key.as_bytes());
    let (src, dst) = begin_migration(&rig.cluster, slot);
    let s = slot.to_string();
    rig.client
        .batch_execute(&format!(
            "INSERT INTO activity_log (sku, kind, qty, user_id) VALUES \
             ('{sku}', 'view', 1, 'alice'), ('{sku}', 'view', 1, 'bob'), \
             ('{sku}', 'view', 1, 'alice'), ('{sku}', 'view', 1, 'carol')"
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    rig.daemon()
        .assert_alive("a slot migrating under a new distinct-user key");
    assert_eq!(
        rig.users_counted(&key).await,
        0,
        "the call waits while the slot migrates"
    );
    for n in [src, dst] {
        rig.cluster.nodes[n].cli(&["CLUSTER", "SETSLOT", &s, "STABLE"]);
    }
    rig.drain(Duration::from_secs(60)).await;
    rig.assert_converges(Duration::from_secs(60)).await;
    assert_eq!(
        rig.users_counted(&key).await,
        3,
        "alice, bob and carol, once each"
    );
    rig.stop_cleanly();
}

/// The other half of a live reshard: the slot's SKU hash and meta copy have moved to the
/// importing node and its distinct-user keys not yet. A call is then answered ASK;
/// undeclared, the user key would be created anew on the importing node (the script runs
/// there under the caller's ASKING) while the old node still held it, and moving the old
/// one would fail (BUSYKEY). Declared, Redis answers TRYAGAIN until they have moved too:
/// the reshard completes, and every user counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_that_moved_a_skus_hash_before_its_user_keys_completes_and_loses_nothing() {
    use skusync::sinks::layout;
    let mut rig = ClusterRig::new().await;
    rig.start_counting_users().await;
    let sku = "RS/{2}";
    let key = layout::sku_key(&rig.oracle.prefix, sku);
    rig.client
        .batch_execute(&format!(
            "INSERT INTO inventory VALUES ('{sku}', 'WH-1', 5, 0); \
             INSERT INTO activity_log (sku, kind, qty, user_id) VALUES \
             ('{sku}', 'view', 1, 'alice'), ('{sku}', 'view', 1, 'bob')"
        ))
        .await
        .unwrap();
    rig.drain(Duration::from_secs(30)).await;
    let slot = layout::slot_of(key.as_bytes());
    let (src, dst) = begin_migration(&rig.cluster, slot);
    let s = slot.to_string();
    let dst_id = rig.cluster.id(dst);
    let dst_port = rig.cluster.nodes[dst].port().to_string();
    let keys_in_slot = |c: &RedisCluster| -> Vec<String> {
        c.nodes[src]
            .cli(&["CLUSTER", "GETKEYSINSLOT", &s, "1000"])
            .lines()
            .map(str::to_string)
            .filter(|k| !k.is_empty())
            .collect()
    };
    let migrate = |c: &RedisCluster, keys: &[String]| {
        let mut args = vec!["MIGRATE", "127.0.0.1", &dst_port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().map(String::as_str));
        c.nodes[src].cli(&args)
    };
    let (users, first): (Vec<String>, Vec<String>) = keys_in_slot(&rig.cluster)
        .into_iter()
        .partition(|k| k.contains(":u:"));
    assert!(
        !users.is_empty() && first.contains(&key),
        "{users:?} {first:?}"
    );
    assert_eq!(
        migrate(&rig.cluster, &first),
        "OK",
        "the hash and the meta copy move first"
    );
    rig.client
        .batch_execute(&format!(
            "INSERT INTO activity_log (sku, kind, qty, user_id) VALUES \
             ('{sku}', 'view', 1, 'alice'), ('{sku}', 'view', 1, 'carol'), \
             ('{sku}', 'view', 1, 'dave')"
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    rig.daemon().assert_alive("a slot half moved");
    // the rest of the reshard: the user keys (a BUSYKEY here is the bug), then the owner
    assert_eq!(
        migrate(&rig.cluster, &keys_in_slot(&rig.cluster)),
        "OK",
        "the user keys move too"
    );
    for n in [dst, src] {
        rig.cluster.nodes[n].cli(&["CLUSTER", "SETSLOT", &s, "NODE", &dst_id]);
    }
    for n in rig.cluster.primaries() {
        if n != src && n != dst {
            rig.cluster.nodes[n].cli(&["CLUSTER", "SETSLOT", &s, "NODE", &dst_id]);
        }
    }
    rig.drain(Duration::from_secs(60)).await;
    rig.assert_converges(Duration::from_secs(60)).await;
    assert_eq!(
        rig.users_counted(&key).await,
        4,
        "alice, bob, carol and dave, once each"
    );
    rig.stop_cleanly();
}

/// SIGKILLs of skusync while it applies to the cluster: a batch's calls go to three
/// primaries at once, so a kill leaves some slots applied and others not. The restart
/// replays the batch: the applied slots skip it (fence), the others apply it, and nothing
/// is lost or counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_between_a_batchs_calls_to_different_primaries_lose_and_double_nothing() {
    use rand::{Rng, SeedableRng};
    let seed =
        test_seed("sigkills_between_a_batchs_calls_to_different_primaries_lose_and_double_nothing");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rig = ClusterRig::new().await;
    let w = cluster_workload(seed);
    rig.start().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let work = spawn_workload(rig.pg.url("postgres", "postgres"), w, stop.clone());
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(400..1500))).await;
        rig.daemon().kill9_and_restart();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let w = work.await.expect("workload task");
    assert!(
        w.txns > 100,
        "the workload ran during the kills: {}",
        w.txns
    );
    rig.drain(Duration::from_secs(90)).await;
    rig.assert_converges(Duration::from_secs(60)).await;
    rig.stop_cleanly();
}

/// A TRUNCATE clears every row index bucket of the table on a cluster, also buckets that
/// share a slot (256 buckets over 16,384 slots). Each
/// bucket's call is fenced by a mark in its slot's meta copy; a mark per table made the
/// second bucket of a slot skip its clearing, as a replay of the truncate would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_clears_every_row_index_bucket_of_a_cluster_slot() {
    use skusync::sinks::layout;
    use skusync::sinks::redis as rsink;
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster
        .primaries()
        .into_iter()
        .map(|p| cluster.nodes[p].url())
        .collect();
    let client = rsink::client(&seeds, true, None).unwrap();
    let con = client.open().await.unwrap();
    // a table with two buckets in one slot (CRC16 spreads one table's buckets well:
    // about one table name in sixteen has such a pair)
    let pair_of = |table: &str| {
        let mut by_slot = std::collections::HashMap::new();
        (0..layout::ROW_INDEX_BUCKETS).find_map(|b| {
            let slot = layout::slot_of(layout::row_index_key("skusync", table, b).as_bytes());
            by_slot.insert(slot, b).map(|a| (a, b))
        })
    };
    let (table, pair) = (0..10_000)
        .map(|i| format!("public.stock_{i}"))
        .find_map(|t| pair_of(&t).map(|p| (t, p)))
        .expect("a table with two buckets in one slot");
    let table = table.as_str();
    let mut c = con.clone();
    for b in [pair.0, pair.1] {
        let _: () = redis::cmd("HSET")
            .arg(layout::row_index_key("skusync", table, b))
            .arg(format!("r:{b}"))
            .arg("sku")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let settings = crate::apply_script::test_settings("skusync", &[]);
    let mut applier = rsink::Applier::new(con.clone(), settings);
    applier
        .truncate_row_index(table, (skusync::lsn::Lsn(100), 0))
        .await
        .unwrap();
    for b in [pair.0, pair.1] {
        let n: i64 = redis::cmd("EXISTS")
            .arg(layout::row_index_key("skusync", table, b))
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 0, "bucket {b} of the pair {pair:?} was cleared");
    }
}

/// A 3-primary cluster (no replicas) rebuilt for a writer under `prefix`: the meta hash,
/// every slot's meta copy with the writer's token, and apply settings fenced by it (each
/// call gets a fence of its own: a restarted writer's floors start empty).
struct FencedCluster {
    /// Runs while this lives.
    _cluster: RedisCluster,
    con: skusync::sinks::redis::RedisCon,
    settings: skusync::sinks::redis::ApplySettings,
    token: u64,
}

impl FencedCluster {
    async fn start(prefix: &str) -> FencedCluster {
        use skusync::sinks::layout;
        use skusync::sinks::redis as rsink;
        let cluster = RedisCluster::start(3, 0);
        let seeds: Vec<String> = cluster
            .primaries()
            .into_iter()
            .map(|p| cluster.nodes[p].url())
            .collect();
        let client = rsink::client(&seeds, true, None).unwrap();
        let mut con = client.open().await.unwrap();
        let _: () = redis::cmd("HSET")
            .arg(layout::meta_key(prefix))
            .arg("bootstrap")
            .arg("done")
            .query_async(&mut con)
            .await
            .unwrap();
        let token = rsink::claim_writer(&mut con, prefix).await.unwrap();
        rsink::reset_all(&mut con, prefix, skusync::lsn::Lsn(1), token, None)
            .await
            .unwrap();
        let settings = crate::apply_script::test_settings(prefix, &["views"]);
        let mut f = FencedCluster {
            _cluster: cluster,
            con,
            settings,
            token,
        };
        f.settings.fence = f.fence();
        f
    }

    /// A fresh fence with the writer's token and no floors.
    fn fence(&self) -> skusync::sinks::redis::WriterFence {
        skusync::sinks::redis::WriterFence {
            token: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(self.token)),
            ..Default::default()
        }
    }

    /// The settings with a fresh fence (what a restarted writer starts with).
    fn restarted(&self) -> skusync::sinks::redis::ApplySettings {
        skusync::sinks::redis::ApplySettings {
            fence: self.fence(),
            ..self.settings.clone()
        }
    }
}

/// Row index and lookup writes on a cluster record the batch's end in their slots' meta
/// copies and raise those slots' floors, also for a slot only an earlier piece of the
/// transaction wrote; the floors reach the meta hash with `applied_lsn`, and a restart
/// reads them back. A failover that loses only such writes is then caught by the slots'
/// check, as one that loses SKU hashes is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_index_writes_raise_their_slots_floors_which_a_restart_reads_back() {
    use skusync::lsn::Lsn;
    use skusync::sinks::layout;
    use skusync::sinks::redis as rsink;
    let p = "skusync";
    let fc = FencedCluster::start(p).await;
    let mut con = fc.con.clone();
    let settings = fc.settings.clone();
    let slot_of_field = |f: &str| {
        let (key, _) = layout::state_slot(p, f).expect("a row field");
        layout::slot_of(key.as_bytes())
    };
    let early = layout::row_field("public.stock", [Some("1")]);
    let late = (2..)
        .map(|i| layout::row_field("public.stock", [Some(i.to_string().as_str())]))
        .find(|f| slot_of_field(f) != slot_of_field(&early))
        .expect("a row in another slot");
    let mut applier = rsink::Applier::new(con.clone(), settings.clone());
    // a transaction in two pieces: the first writes `early`, the last `late` and the end
    applier
        .write_row_index([(&early, &Some("A".to_string()))], None)
        .await
        .unwrap();
    applier
        .write_row_index([(&late, &Some("B".to_string()))], Some(Lsn(500)))
        .await
        .unwrap();
    for f in [&early, &late] {
        let slot = slot_of_field(f);
        assert_eq!(settings.fence.slots.get(slot), 500, "slot {slot}'s floor");
        let copy: Option<String> = redis::cmd("HGET")
            .arg(layout::slot_meta_key(p, slot))
            .arg("applied_lsn")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(copy.as_deref(), Some("500"), "slot {slot}'s meta copy");
        let recorded: Option<String> = redis::cmd("HGET")
            .arg(layout::meta_key(p))
            .arg(format!("floor:{slot}"))
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(
            recorded.as_deref(),
            Some("500"),
            "slot {slot}'s recorded floor"
        );
    }
    // A TRUNCATE's clearing of each row index bucket is marked with the batch's end too.
    applier
        .truncate_row_index("public.stock", (Lsn(600), 0))
        .await
        .unwrap();
    applier
        .write_row_index(std::iter::empty(), Some(Lsn(600)))
        .await
        .unwrap();
    let bucket_slot = |b| layout::slot_of(layout::row_index_key(p, "public.stock", b).as_bytes());
    for b in [0, 17, 255] {
        assert_eq!(
            settings.fence.slots.get(bucket_slot(b)),
            600,
            "truncated bucket {b}'s slot"
        );
    }
    // A restarted writer reads the floors back: every copy holds its floor, until the
    // early slot's primary fails over to a replica that holds only an older mark.
    let again = fc.restarted();
    let read = rsink::load_slot_floors(&mut con, p, &again.fence.slots)
        .await
        .unwrap();
    assert!(read > 2, "the row slots' and the buckets' floors: {read}");
    let found = rsink::Applier::new(con.clone(), again.clone())
        .check_slots()
        .await
        .unwrap();
    assert!(found.is_none(), "nothing lost yet: {found:?}");
    let _: () = redis::cmd("HSET")
        .arg(layout::slot_meta_key(p, slot_of_field(&early)))
        .arg("applied_lsn")
        .arg("450")
        .query_async(&mut con)
        .await
        .unwrap();
    let found = rsink::Applier::new(con.clone(), again)
        .check_slots()
        .await
        .unwrap();
    assert!(
        matches!(found, Some(rsink::RedisSinkError::Rollback(_))),
        "the lost mark is caught: {found:?}"
    );
    // A batch that raised the floors of more slots than one Lua call can record (a
    // snapshot load, a catch-up over many SKUs) records them all.
    for slot in 0..6000u16 {
        settings.fence.slots.raise(slot, 650);
    }
    applier
        .write_row_index(std::iter::empty(), Some(Lsn(700)))
        .await
        .unwrap();
    let big = fc.restarted();
    let read = rsink::load_slot_floors(&mut con, p, &big.fence.slots)
        .await
        .unwrap();
    assert!(read >= 6000, "{read} floors recorded and read back");
    assert_eq!(big.fence.slots.get(5999), 650);
}

/// The change index's writes on a cluster record their highest LSN in its slot's meta
/// copy and raise that slot's floor, which goes to the meta hash with `applied_lsn`: a
/// failover that loses only change-index entries (a catch-up would then miss SKUs that
/// changed) is caught like one that loses SKU hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_index_writes_raise_their_slots_floor() {
    use crate::apply_script::stock_piece;
    use skusync::fold::batch::Batch;
    use skusync::lsn::Lsn;
    use skusync::sinks::layout;
    use skusync::sinks::redis as rsink;
    let p = "cix";
    let fc = FencedCluster::start(p).await;
    let mut con = fc.con.clone();
    let settings = fc.settings.clone();
    let mut applier = rsink::Applier::new(con.clone(), settings.clone());
    let mut batch = Batch::new(Lsn(0));
    for (k, lsn) in [(0, 800u64), (1, 801), (2, 802)] {
        batch.push(stock_piece(&format!("C{k}"), 10, lsn));
    }
    let entries = batch.take();
    applier
        .apply(&entries, Some(Lsn(900)), false)
        .await
        .unwrap();
    let changes = layout::changes_key(p);
    let slot = layout::slot_of(changes.as_bytes());
    let indexed: i64 = redis::cmd("ZCARD")
        .arg(&changes)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(indexed, 3, "every SKU indexed");
    assert!(
        settings.fence.slots.get(slot) >= 802,
        "the change index's slot {slot} has a floor: {}",
        settings.fence.slots.get(slot)
    );
    let copy: Option<u64> = redis::cmd("HGET")
        .arg(layout::slot_meta_key(p, slot))
        .arg("applied_lsn")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(copy.is_some_and(|c| c >= 802), "its meta copy: {copy:?}");
    let recorded: Option<u64> = redis::cmd("HGET")
        .arg(layout::meta_key(p))
        .arg(format!("floor:{slot}"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(
        recorded.is_some_and(|r| r >= 802),
        "recorded with applied_lsn: {recorded:?}"
    );
    // a failover that lost the change index's last writes (and its copy's mark)
    let _: () = redis::cmd("HSET")
        .arg(layout::slot_meta_key(p, slot))
        .arg("applied_lsn")
        .arg("700")
        .query_async(&mut con)
        .await
        .unwrap();
    let found = applier.check_slots().await.unwrap();
    assert!(
        matches!(found, Some(rsink::RedisSinkError::Rollback(_))),
        "caught: {found:?}"
    );
}

/// On a cluster the alert history is written after the slots' apply calls. An alert whose
/// writer dies before writing it reaches the history at the restart, and one whose writer
/// dies after writing it (before the batch is confirmed) is not added again: the replay's
/// calls, skipped by the fence, report the alerts still in their hashes, and the history's
/// slot copy records which it added. A backlog applied in two calls, whose first holds a
/// later transaction's alerts than the second (entries go in order of first change) and
/// both one transaction's, loses none either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_whose_writer_dies_around_the_history_write_is_in_the_history_once() {
    use skusync::sinks::layout;
    let mut rig = ClusterRig::new().await;
    rig.start().await;
    let skus = ["A{1}", "B/2+#"];
    let many: Vec<String> = (0..601).map(|i| format!("M-{i}")).collect();
    rig.client
        .execute(
            "INSERT INTO inventory (sku, location, on_hand) \
             SELECT s, 'WH-1', 10 FROM unnest($1::text[]) s",
            &[&skus
                .iter()
                .map(|s| s.to_string())
                .chain(many.clone())
                .collect::<Vec<_>>()],
        )
        .await
        .expect("stock");
    rig.drain(Duration::from_secs(30)).await;
    for (sku, point) in skus
        .iter()
        .zip(["before-cluster-alerts:1", "after-cluster-alerts:1"])
    {
        // out of stock: one alert
        rig.abort_at(
            point,
            &format!("UPDATE inventory SET on_hand = 0 WHERE sku = '{sku}'"),
        )
        .await;
        rig.daemon().spawn();
        rig.drain(Duration::from_secs(60)).await;
    }
    // A backlog: M-0..M-599 change first, M-600 sells out, then M-0..M-599 sell out in
    // one transaction; M-600's entry and the last 100 of the others go in the second call.
    rig.stop_cleanly();
    for sql in [
        "UPDATE inventory SET on_hand = 9 WHERE sku ~ '^M-' AND sku <> 'M-600'",
        "UPDATE inventory SET on_hand = 0 WHERE sku = 'M-600'",
        "UPDATE inventory SET on_hand = 0 WHERE sku ~ '^M-' AND sku <> 'M-600'",
    ] {
        rig.client.batch_execute(sql).await.expect("backlog");
    }
    rig.daemon().spawn();
    rig.drain(Duration::from_secs(60)).await;
    let history = rig.alert_history().await;
    let mut by_key: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for a in &history {
        by_key
            .entry(a["key"].as_str())
            .or_default()
            .push(a["type"].as_str());
    }
    for sku in skus.iter().copied().chain(many.iter().map(String::as_str)) {
        let key = layout::sku_key(&rig.oracle.prefix, sku);
        assert_eq!(
            by_key.get(key.as_str()).map(Vec::as_slice),
            Some(&["out_of_stock"][..]),
            "{sku}'s alerts ({} in the history)",
            history.len()
        );
    }
    rig.assert_converges(Duration::from_secs(60)).await;
    rig.stop_cleanly();
}

/// The alert history's record of what it added on a cluster goes by the highest writer's
/// floor it was given. After the floor is lowered (the meta hash's node came back older),
/// a replay's calls, skipped by the fence, report again alerts the history already holds
/// (their hashes keep them past the lowered floor), and none is added twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_the_writers_floor_was_lowered_adds_no_alert_twice() {
    use crate::apply_script::stock_piece;
    use skusync::fold::Piece;
    use skusync::fold::batch::Batch;
    use skusync::lsn::Lsn;
    use skusync::sinks::layout;
    use skusync::sinks::redis as rsink;
    use std::sync::atomic::Ordering::SeqCst;
    async fn apply(applier: &mut rsink::Applier, pieces: Vec<Piece>, end: u64) {
        let mut batch = Batch::new(Lsn(0));
        for p in pieces {
            batch.push(p);
        }
        let entries = batch.take();
        applier
            .apply(&entries, Some(Lsn(end)), false)
            .await
            .unwrap();
    }
    let p = "alr";
    let fc = FencedCluster::start(p).await;
    let settings = fc.settings.clone();
    let floor = settings.fence.floor.clone();
    let mut applier = rsink::Applier::new(fc.con.clone(), settings);
    apply(
        &mut applier,
        vec![stock_piece("X", 10, 100), stock_piece("Y{1}", 10, 101)],
        110,
    )
    .await;
    floor.store(110, SeqCst);
    apply(&mut applier, vec![stock_piece("X", 0, 200)], 210).await;
    // the next batch's history write drops its record of X's alert (at or below the floor)
    floor.store(210, SeqCst);
    apply(&mut applier, vec![stock_piece("Y{1}", 0, 300)], 310).await;
    // lowered, and X's transaction replayed: skipped, its alert reported again
    floor.store(110, SeqCst);
    apply(&mut applier, vec![stock_piece("X", 0, 200)], 210).await;
    let history: Vec<(String, std::collections::HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(layout::alerts_key(p))
        .arg("-")
        .arg("+")
        .query_async(&mut fc.con.clone())
        .await
        .expect("XRANGE");
    let got: Vec<(&str, &str)> = history
        .iter()
        .map(|(_, a)| (a["key"].as_str(), a["lsn"].as_str()))
        .collect();
    let (x, y) = (layout::sku_key(p, "X"), layout::sku_key(p, "Y{1}"));
    assert_eq!(got, [(x.as_str(), "200"), (y.as_str(), "300")]);
}

/// An alert whose writer dies before adding it to the history, when the restart rebuilds
/// Redis instead of replaying (here Redis was marked stale meanwhile): the rebuild first
/// adds to the history what the SKU hashes hold past the recorded `applied_lsn`, once,
/// before it resets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_whose_writer_dies_before_the_history_reaches_it_through_a_rebuild() {
    let mut rig = ClusterRig::new().await;
    rig.start().await;
    for sku in ["R/1", "S{2}"] {
        rig.client
            .execute(
                "INSERT INTO inventory (sku, location, on_hand) VALUES ($1, 'WH-1', 10)",
                &[&sku],
            )
            .await
            .expect("stock");
    }
    rig.drain(Duration::from_secs(30)).await;
    // S{2}'s alert is in the history before the kill; R/1's is not
    rig.client
        .batch_execute("UPDATE inventory SET on_hand = 0 WHERE sku = 'S{2}'")
        .await
        .expect("sell out");
    rig.drain(Duration::from_secs(30)).await;
    // (the drain marker's hash can be written before its batch's history write)
    let start = Instant::now();
    while rig.alerts_of("S{2}").await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "S{{2}}'s alert");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rig.abort_at(
        "before-cluster-alerts:1",
        "UPDATE inventory SET on_hand = 0 WHERE sku = 'R/1'",
    )
    .await;
    rig.mark_stale().await;
    rig.daemon().spawn();
    rig.daemon()
        .wait_stderr(
            "rebuilding Redis from a fresh snapshot",
            Duration::from_secs(30),
        )
        .await;
    rig.drain(Duration::from_secs(90)).await;
    // one rebuild: the history's write raised its slot's floor, which the rebuild's
    // reset starts over (left raised, the slots' check saw a rollback within 2 s)
    tokio::time::sleep(Duration::from_secs(3)).await;
    rig.drain(Duration::from_secs(30)).await;
    assert_eq!(
        rig.daemon()
            .stderr_count("rebuilding Redis from a fresh snapshot"),
        1,
        "{}",
        rig.daemon().stderr_all()
    );
    assert!(
        !rig.daemon()
            .stderr_contains("a Redis Cluster slot lost recent writes"),
        "{}",
        rig.daemon().stderr_all()
    );
    for sku in ["R/1", "S{2}"] {
        assert_eq!(rig.alerts_of(sku).await, ["out_of_stock"], "{sku}");
    }
    rig.assert_converges(Duration::from_secs(60)).await;
    rig.stop_cleanly();
}

/// The rebuild's first step (adding the alerts a killed process left in the SKU hashes)
/// is best effort: when it fails, here because the alert history's slot lost its meta
/// copy, the rebuild warns and goes on (it was a transient error retried forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_whose_alert_step_fails_warns_and_goes_on() {
    use skusync::sinks::layout;
    let mut rig = ClusterRig::new().await;
    rig.start().await;
    rig.client
        .batch_execute("INSERT INTO inventory (sku, location, on_hand) VALUES ('T', 'WH-1', 10)")
        .await
        .expect("stock");
    rig.drain(Duration::from_secs(30)).await;
    rig.abort_at(
        "before-cluster-alerts:1",
        "UPDATE inventory SET on_hand = 0 WHERE sku = 'T'",
    )
    .await;
    let prefix = rig.oracle.prefix.clone();
    let slot = layout::slot_of(layout::alerts_key(&prefix).as_bytes());
    let mut con = rig.con().await;
    let _: () = redis::cmd("DEL")
        .arg(layout::slot_meta_key(&prefix, slot))
        .query_async(&mut con)
        .await
        .expect("drop the history slot's meta copy");
    rig.mark_stale().await;
    rig.daemon().spawn();
    rig.daemon()
        .wait_stderr(
            "could not add the alerts a stopped process had left",
            Duration::from_secs(30),
        )
        .await;
    rig.drain(Duration::from_secs(90)).await;
    rig.assert_converges(Duration::from_secs(60)).await;
    assert_eq!(
        rig.daemon()
            .stderr_count("rebuilding Redis from a fresh snapshot"),
        1,
        "{}",
        rig.daemon().stderr_all()
    );
    rig.stop_cleanly();
}

/// The rebuild's alert step meets a transient error, here a live reshard of the alert
/// history's slot that has moved the slot's meta copy and not yet the history (Redis
/// answers the two-key write TRYAGAIN until the slot settles). The rebuild fails and is
/// tried again, with the SKU hashes' record of the alert intact: going on, the reset
/// would have dropped that record, and the alert with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_whose_alert_step_meets_a_reshard_waits_for_it_and_loses_no_alert() {
    use skusync::sinks::layout;
    let mut rig = ClusterRig::new().await;
    rig.start().await;
    rig.client
        .batch_execute("INSERT INTO inventory (sku, location, on_hand) VALUES ('T', 'WH-1', 10)")
        .await
        .expect("stock");
    rig.drain(Duration::from_secs(30)).await;
    rig.abort_at(
        "before-cluster-alerts:1",
        "UPDATE inventory SET on_hand = 0 WHERE sku = 'T'",
    )
    .await;
    let prefix = rig.oracle.prefix.clone();
    let slot = layout::slot_of(layout::alerts_key(&prefix).as_bytes());
    let (src, dst) = begin_migration(&rig.cluster, slot);
    let (s, dst_id) = (slot.to_string(), rig.cluster.id(dst));
    let dst_port = rig.cluster.nodes[dst].port().to_string();
    let migrate = |c: &RedisCluster, key: &str| {
        c.nodes[src].cli(&["MIGRATE", "127.0.0.1", &dst_port, key, "0", "5000"])
    };
    assert_eq!(
        migrate(&rig.cluster, &layout::slot_meta_key(&prefix, slot)),
        "OK",
        "the meta copy moves first"
    );
    rig.mark_stale().await;
    rig.daemon().spawn();
    rig.daemon()
        .wait_stderr(
            "rebuilding Redis from a fresh snapshot",
            Duration::from_secs(30),
        )
        .await;
    // past redis-rs' own retries of TRYAGAIN
    tokio::time::sleep(Duration::from_secs(15)).await;
    rig.daemon().assert_alive("a rebuild during a reshard");
    assert!(
        !rig.daemon()
            .stderr_contains("could not add the alerts a stopped process had left"),
        "{}",
        rig.daemon().stderr_all()
    );
    // the rest of the reshard
    let rest = rig.cluster.nodes[src].cli(&["CLUSTER", "GETKEYSINSLOT", &s, "1000"]);
    for key in rest.lines().filter(|k| !k.is_empty()) {
        assert_eq!(migrate(&rig.cluster, key), "OK", "{key}");
    }
    for n in rig.cluster.primaries() {
        rig.cluster.nodes[n].cli(&["CLUSTER", "SETSLOT", &s, "NODE", &dst_id]);
    }
    rig.drain(Duration::from_secs(90)).await;
    assert_eq!(rig.alerts_of("T").await, ["out_of_stock"]);
    rig.assert_converges(Duration::from_secs(60)).await;
    rig.stop_cleanly();
}

/// A failover that loses a rebuild's writes to a slot: the victim's replica stops
/// following right after the rebuild's reset (the process pauses there), so when it
/// takes over, its slots hold reset hashes and meta copies that lack the load. The
/// load's calls raised the writer's floors for those slots (the floors it shares with
/// the stream), so the first check or call there sees the loss and Redis is rebuilt
/// again; otherwise the stream went on over the reset hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_loses_a_rebuilds_writes_to_a_slot_is_noticed_and_rebuilt_again() {
    let seed =
        test_seed("a_failover_that_loses_a_rebuilds_writes_to_a_slot_is_noticed_and_rebuilt_again");
    let mut rig = ClusterRig::new().await;
    let mut w = cluster_workload(seed);
    rig.start().await;
    rig.run(&mut w, 100).await;
    rig.drain(Duration::from_secs(30)).await;
    let victim = rig.primary_without_the_meta_hash();
    rig.stop_cleanly();
    rig.mark_stale().await;
    let loaded = rig.daemon().stderr_count("snapshot loaded");
    rig.daemon()
        .spawn_env(&[("SKUSYNC_FAILPOINT", "after-rebuild-reset:1:4000")]);
    rig.daemon()
        .wait_stderr("failpoint reached: pausing", Duration::from_secs(60))
        .await;
    // the reset reaches the replica, then it stops following
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heir = rig.cluster.freeze_replica(victim);
    rig.daemon()
        .wait_stderr_beyond("snapshot loaded", loaded, Duration::from_secs(60))
        .await;
    tokio::task::block_in_place(|| rig.cluster.kill9_and_promote_stale_replica(victim, heir));
    rig.run(&mut w, 100).await;
    rig.drain(Duration::from_secs(120)).await;
    rig.assert_converges_after_a_lost_slot("the lost load was noticed")
        .await;
    rig.stop_cleanly();
}

/// A rebuild's reset must reach every SKU hash, but a live reshard can hide one from a
/// scan (moved from a primary not scanned yet to one scanned already). Here the hash is
/// away while the reset's first pass runs (deleted) and back right after (restored as it
/// was, the process paused after that pass): the reset passes again until a pass finds
/// no hash left to reset, so the load starts from a reset hash (left as it was, the load
/// adds its lifetime counters to the old ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_resets_a_hash_its_first_scan_missed() {
    use skusync::sinks::layout;
    let mut rig = ClusterRig::new().await;
    rig.start().await;
    rig.client
        .batch_execute(
            "INSERT INTO inventory (sku, location, on_hand) VALUES ('Q/{9}', 'WH-1', 10); \
             INSERT INTO activity_log (sku, kind, qty) VALUES \
             ('Q/{9}', 'view', 1), ('Q/{9}', 'view', 1), ('Q/{9}', 'purchase', 2)",
        )
        .await
        .expect("stock and activity");
    rig.drain(Duration::from_secs(30)).await;
    let key = layout::sku_key(&rig.oracle.prefix, "Q/{9}");
    let mut con = rig.con().await;
    let dump: Vec<u8> = redis::cmd("DUMP")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("DUMP");
    rig.stop_cleanly();
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("DEL");
    rig.mark_stale().await;
    let loaded = rig.daemon().stderr_count("snapshot loaded");
    rig.daemon()
        .spawn_env(&[("SKUSYNC_FAILPOINT", "after-rebuild-first-pass:1:3000")]);
    rig.daemon()
        .wait_stderr("failpoint reached: pausing", Duration::from_secs(60))
        .await;
    let _: () = redis::cmd("RESTORE")
        .arg(&key)
        .arg(0)
        .arg(dump)
        .query_async(&mut con)
        .await
        .expect("RESTORE");
    rig.daemon()
        .wait_stderr_beyond("snapshot loaded", loaded, Duration::from_secs(60))
        .await;
    rig.drain(Duration::from_secs(60)).await;
    rig.assert_converges(Duration::from_secs(60)).await;
    assert!(
        rig.daemon()
            .stderr_contains("reset SKU hashes an earlier scan missed"),
        "{}",
        rig.daemon().stderr_all()
    );
    rig.stop_cleanly();
}

/// The same loss while skusync is down, killed right after the rebuild, before the stream
/// recorded anything: the load's floors were recorded in the meta hash with the rebuild,
/// so the restart checks the slots against them and rebuilds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_loses_a_rebuilds_writes_while_skusync_is_down_is_noticed_at_restart() {
    let seed = test_seed(
        "a_failover_that_loses_a_rebuilds_writes_while_skusync_is_down_is_noticed_at_restart",
    );
    let mut rig = ClusterRig::new().await;
    let mut w = cluster_workload(seed);
    rig.start().await;
    rig.run(&mut w, 100).await;
    rig.drain(Duration::from_secs(30)).await;
    let victim = rig.primary_without_the_meta_hash();
    rig.stop_cleanly();
    rig.mark_stale().await;
    let loaded = rig.daemon().stderr_count("snapshot loaded");
    rig.daemon()
        .spawn_env(&[("SKUSYNC_FAILPOINT", "after-rebuild-reset:1:4000")]);
    rig.daemon()
        .wait_stderr("failpoint reached: pausing", Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heir = rig.cluster.freeze_replica(victim);
    rig.daemon()
        .wait_stderr_beyond("snapshot loaded", loaded, Duration::from_secs(60))
        .await;
    // killed before the stream records anything (a clean stop records the floors)
    let mut p = rig.daemon().proc.take().expect("running");
    let _ = p.child.kill();
    let _ = p.child.wait();
    tokio::task::block_in_place(|| rig.cluster.kill9_and_promote_stale_replica(victim, heir));
    rig.daemon().spawn();
    rig.run(&mut w, 100).await;
    rig.drain(Duration::from_secs(120)).await;
    rig.assert_converges_after_a_lost_slot("the lost load was noticed at the restart")
        .await;
    rig.stop_cleanly();
}

/// A replica that missed a rebuild's reset takes over before the load: its slots hold
/// the meta copies and SKU hashes from before the reset. The reset wrote its own LSN into
/// every copy and started the writer's floor there for the slots holding SKU hashes, so
/// the load's first call to the victim's slots is refused and Redis is rebuilt again;
/// without that, the load lands on the old hashes (lifetime counters counted twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_between_a_rebuilds_reset_and_its_load_is_noticed_and_rebuilt_again() {
    let seed =
        test_seed("a_failover_between_a_rebuilds_reset_and_its_load_is_noticed_and_rebuilt_again");
    let mut rig = ClusterRig::new().await;
    let mut w = cluster_workload(seed);
    rig.start().await;
    rig.run(&mut w, 150).await;
    rig.drain(Duration::from_secs(30)).await;
    let victim = rig.primary_without_the_meta_hash();
    rig.stop_cleanly();
    rig.mark_stale().await;
    let pauses = rig.daemon().stderr_count("failpoint reached: pausing");
    rig.daemon().spawn_env(&[(
        "SKUSYNC_FAILPOINT",
        "before-rebuild-reset:1:3000,after-rebuild-reset:1:15000",
    )]);
    // before the reset: the victim's replica (with the new writer's claim) stops following,
    // still answering
    rig.daemon()
        .wait_stderr_beyond(
            "failpoint reached: pausing",
            pauses,
            Duration::from_secs(60),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heir = rig.cluster.unfollow_replica(victim);
    // after the reset, before the load: it takes over
    rig.daemon()
        .wait_stderr_beyond(
            "failpoint reached: pausing",
            pauses + 1,
            Duration::from_secs(60),
        )
        .await;
    tokio::task::block_in_place(|| rig.cluster.kill9_and_promote_stale_replica(victim, heir));
    rig.run(&mut w, 100).await;
    rig.drain(Duration::from_secs(120)).await;
    rig.assert_converges_after_a_lost_slot("the reset the replica missed was noticed")
        .await;
    rig.stop_cleanly();
}

/// As above, after a PostgreSQL failover to a standby that was behind: the old copies'
/// `applied_lsn` is above the rebuild's LSN (written by hand here, for the victim's slots,
/// standing in for the old server's history), so the floor cannot tell them from reset
/// ones. The rebuild's mark can: the reset writes it into every copy, and the slots'
/// check before `done` refuses a copy without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_the_reset_is_noticed_by_the_rebuilds_mark_when_lsns_went_back() {
    use skusync::sinks::layout;
    let seed = test_seed(
        "a_replica_that_missed_the_reset_is_noticed_by_the_rebuilds_mark_when_lsns_went_back",
    );
    let mut rig = ClusterRig::new().await;
    let mut w = cluster_workload(seed);
    rig.start().await;
    rig.run(&mut w, 150).await;
    rig.drain(Duration::from_secs(30)).await;
    let prefix = rig.oracle.prefix.clone();
    let victim = rig.primary_without_the_meta_hash();
    rig.stop_cleanly();
    let mut con = rig.con().await;
    for sku in cluster_skus() {
        let slot = layout::slot_of(layout::sku_key(&prefix, &sku).as_bytes());
        if slot_owner(&rig.cluster, slot) == victim {
            let _: () = redis::cmd("HSET")
                .arg(layout::slot_meta_key(&prefix, slot))
                .arg("applied_lsn")
                .arg("999999999999")
                .query_async(&mut con)
                .await
                .expect("a copy ahead");
        }
    }
    rig.mark_stale().await;
    let pauses = rig.daemon().stderr_count("failpoint reached: pausing");
    rig.daemon().spawn_env(&[(
        "SKUSYNC_FAILPOINT",
        "before-rebuild-reset:1:3000,after-rebuild-reset:1:15000",
    )]);
    rig.daemon()
        .wait_stderr_beyond(
            "failpoint reached: pausing",
            pauses,
            Duration::from_secs(60),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heir = rig.cluster.unfollow_replica(victim);
    rig.daemon()
        .wait_stderr_beyond(
            "failpoint reached: pausing",
            pauses + 1,
            Duration::from_secs(60),
        )
        .await;
    tokio::task::block_in_place(|| rig.cluster.kill9_and_promote_stale_replica(victim, heir));
    rig.run(&mut w, 100).await;
    rig.drain(Duration::from_secs(120)).await;
    rig.assert_converges_after_a_lost_slot("the copies from before the reset were noticed")
        .await;
    rig.stop_cleanly();
}
