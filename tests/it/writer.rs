//! At most one writer, and a Redis that comes back older: the writer lock (a PostgreSQL
//! advisory lock per slot), the fencing token in meta `writer`, and the floor check
//! against `applied_lsn`. Real PostgreSQL and Redis; each test proves its fault landed.

use crate::fold_oracle::{
    Daemon, PUBLIC_SCHEMA, PUBS, Rig, public_oracle, public_workload, run_workload,
};
use crate::oracle::*;
use crate::support::*;
use std::time::{Duration, Instant};

async fn wait_stderr(rig: &mut Rig, needle: &str, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if rig.daemon().stderr_contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Redis restarted from an older dump while skusync runs (an RDB-only restart, an AOF
/// losing its last second, a lagging replica promoted behind the same address): the
/// slot already confirmed past what Redis lost. skusync notices without any new write
/// (its periodic look at the meta hash), rebuilds, and Redis ends equal to SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_comes_back_older_is_caught_and_rebuilt() {
    let seed = test_seed("a_redis_that_comes_back_older_is_caught_and_rebuilt");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::SumEqualsTotal)).await;
    rig.start_skusync("").await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 200, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.redis.cli(&["SAVE"]);
    let saved = rig.redis.cli(&["HGET", "skusync:meta", "applied_lsn"]);
    run_workload(&mut rig, &mut w, 200, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let before = rig.redis.cli(&["HGET", "skusync:meta", "applied_lsn"]);
    assert_ne!(saved, before, "the second workload moved applied_lsn");
    // SIGKILL: no save on the way down; it comes back with the older dump.
    rig.redis.kill9();
    rig.redis.start_again();
    assert_eq!(
        rig.redis.cli(&["HGET", "skusync:meta", "applied_lsn"]),
        saved,
        "Redis came back older (the fault landed)"
    );
    rig.con = redis_connect(&rig.redis.url()).await;
    assert!(
        wait_stderr(
            &mut rig,
            "Redis lost recent writes",
            Duration::from_secs(20)
        )
        .await,
        "noticed with no write to refuse\n{}",
        rig.daemon().stderr_all()
    );
    run_workload(&mut rig, &mut w, 200, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    assert!(
        rig.daemon().stderr_contains("Redis is behind the slot"),
        "the slot had confirmed past the loss: a rebuild\n{}",
        rig.daemon().stderr_all()
    );
    rig.daemon().assert_alive("after the repair");
}

/// A standalone Redis that loses one call of a batch, as a failover to a replica that
/// missed that call would: here restarted from a dump saved after the batch's first call,
/// while skusync waits after its second. The batch's next call is refused (the chain of
/// the stream's calls, `CallChain`) and the batch replays. Before, that call found
/// `applied_lsn` at the floor (only a batch's last call records its end), the end was
/// recorded over the hole, and the lost call's SKUs kept their old values for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_loses_one_call_of_a_batch_is_caught_by_the_next_call() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::SumEqualsTotal)).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand, reserved)
           SELECT 'C-' || i, 'WH-1', 10, 0 FROM generate_series(1, 1500) i",
    )
    .await;
    rig.start_skusync("").await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    assert_eq!(rig.daemon().sigterm(), Some(0));
    rig.daemon().spawn_env(&[(
        "SKUSYNC_FAILPOINT",
        "between-calls:1:3000,between-calls:2:8000",
    )]);
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    // one transaction over 1,500 SKUs: one batch of three calls
    rig.exec("UPDATE inventory SET on_hand = on_hand + 1 WHERE sku LIKE 'C-%'")
        .await;
    let pausing = "failpoint reached: pausing";
    rig.daemon()
        .wait_stderr_beyond(pausing, 0, Duration::from_secs(30))
        .await;
    rig.redis.cli(&["SAVE"]);
    rig.daemon()
        .wait_stderr_beyond(pausing, 1, Duration::from_secs(30))
        .await;
    // the second call is lost: Redis comes back with the dump from before it
    rig.redis.kill9();
    rig.redis.start_again();
    rig.con = redis_connect(&rig.redis.url()).await;
    rig.assert_converges(Duration::from_secs(60)).await;
    assert!(
        rig.daemon().stderr_contains("Redis lost recent writes"),
        "the third call was refused\n{}",
        rig.daemon().stderr_all()
    );
    rig.daemon().assert_alive("after the repair");
}

/// Two instances started at the same moment on an empty Redis: one takes the writer
/// lock and loads the snapshot, the other waits as a standby; nothing is loaded twice
/// and counters are exact. Then the active one is SIGKILLed: the standby takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_started_together_load_once_and_count_exactly_once() {
    let seed = test_seed("two_instances_started_together_load_once_and_count_exactly_once");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::SumEqualsTotal)).await;
    // Existing rows make the load take a while.
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand, reserved)
           SELECT 'P-' || i, 'WH-' || (i % 3), i % 50, i % 7 FROM generate_series(1, 3000) i;
         INSERT INTO activity_log (sku, kind, qty)
           SELECT 'P-' || (i % 500), 'view', 1 FROM generate_series(1, 3000) i;",
    )
    .await;
    let text = rig.oracle.config_toml(
        &rig.pg.url("postgres", "postgres"),
        "skusync",
        PUBS,
        &rig.redis.url(),
    );
    let cfg = write_config(rig.dir.path(), &text);
    let mut a = Daemon::start(&rig.dir.path().join("a"), cfg.clone());
    let b = Daemon::start(&rig.dir.path().join("b"), cfg);
    // The rig's helpers look at the daemon it holds.
    rig.daemon = Some(b);
    rig.wait_bootstrap(Duration::from_secs(60)).await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 300, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    let logs = format!("{}\n{}", a.stderr_all(), rig.daemon().stderr_all());
    assert_eq!(
        logs.matches("snapshot loaded").count(),
        1,
        "exactly one instance loaded Redis\n{logs}"
    );
    assert!(
        logs.contains("waiting as standby"),
        "the other one waited\n{logs}"
    );
    // Kill whichever is active; the other takes over and stays exact.
    let a_active = a.stderr_all().contains("snapshot loaded");
    let mut standby = if a_active {
        let _ = a.proc().child.kill();
        let _ = a.proc().child.wait();
        rig.daemon.take().expect("b")
    } else {
        let mut b = rig.daemon.take().expect("b");
        let _ = b.proc().child.kill();
        let _ = b.proc().child.wait();
        a
    };
    standby.assert_alive("before taking over");
    rig.daemon = Some(standby);
    assert!(
        wait_stderr(&mut rig, "took the writer lock", Duration::from_secs(30)).await,
        "the standby took over\n{}",
        rig.daemon().stderr_all()
    );
    run_workload(&mut rig, &mut w, 300, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
}

/// A writer cut off from PostgreSQL but not from Redis keeps applying what it has; once
/// another instance takes the token, Redis refuses those writes. Simulated by taking
/// the token by hand (what `claim_writer` does) while the daemon runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_a_replaced_writer_are_refused() {
    let seed = test_seed("writes_of_a_replaced_writer_are_refused");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::SumEqualsTotal)).await;
    rig.start_skusync("").await;
    let token: u64 = rig
        .redis
        .cli(&["HGET", "skusync:meta", "writer"])
        .parse()
        .expect("a writer token");
    // Another writer's token (higher, as claims are).
    rig.redis
        .cli(&["HSET", "skusync:meta", "writer", &(token + 10).to_string()]);
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 20, async |_, _| {}).await;
    assert!(
        wait_stderr(
            &mut rig,
            "written by another skusync instance",
            Duration::from_secs(20)
        )
        .await,
        "the write was refused\n{}",
        rig.daemon().stderr_all()
    );
    // This instance still holds the lock (no other exists): it takes a new token and
    // catches up from the slot, exactly.
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    let now: u64 = rig
        .redis
        .cli(&["HGET", "skusync:meta", "writer"])
        .parse()
        .expect("token");
    assert!(
        now > token + 10,
        "a fresh claim is above every earlier token"
    );
}
