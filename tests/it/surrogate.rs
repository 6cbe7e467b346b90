//! Stock tables keyed by a surrogate `id` (the default replica identity, no REPLICA
//! IDENTITY FULL): key-only deletes and SKU-changing updates are attributed through the
//! row index, exactly, across SIGKILLs, a TRUNCATE and a Redis that loses its data.

use crate::fold_oracle::*;
use crate::oracle::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE inventory (
  id bigserial PRIMARY KEY, sku text NOT NULL, location text NOT NULL,
  on_hand int NOT NULL, reserved int NOT NULL DEFAULT 0, UNIQUE (sku, location));
CREATE TABLE activity_log (
  id bigserial PRIMARY KEY, sku text, kind text NOT NULL, qty numeric,
  at timestamptz NOT NULL DEFAULT now());
CREATE PUBLICATION skusync FOR TABLE inventory;
CREATE PUBLICATION skusync_activity FOR TABLE activity_log WITH (publish = 'insert');
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surrogate_keyed_stock_rows_stay_exact_without_replica_identity_full() {
    let seed = test_seed("surrogate_keyed_stock_rows_stay_exact_without_replica_identity_full");
    let mut rig = Rig::new(SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand, reserved)
           SELECT 'pre-' || (i % 40), 'WH-' || (i % 5), i % 50, i % 3
           FROM generate_series(0, 299) i ON CONFLICT DO NOTHING;",
    )
    .await;
    rig.start_skusync("").await;
    rig.assert_converges(Duration::from_secs(20)).await;
    let mut w = public_workload(seed);
    let mut krng = StdRng::seed_from_u64(seed ^ 0x5u64);
    let mut kills: Vec<usize> = (0..3).map(|_| krng.random_range(10..200)).collect();
    kills.sort_unstable();
    eprintln!("SIGKILL before transactions {kills:?}");
    // the workload renames SKUs (UPDATE ... SET sku), moves locations and deletes by
    // SKU: under the default identity the stream names those rows by `id` alone
    run_workload(&mut rig, &mut w, 1500, async |rig, i| {
        if kills.contains(&i) {
            tokio::time::sleep(Duration::from_millis(krng.random_range(0..200))).await;
            rig.daemon().kill9_and_restart();
        }
    })
    .await;
    let t = WorkloadTables::public();
    rig.drain(&t, "WH-1", Duration::from_secs(40)).await;
    rig.assert_converges(Duration::from_secs(10)).await;
    let ri = crate::fold_oracle::keys_matching(&mut rig.con, "skusync:ri:*").await;
    assert!(!ri.is_empty(), "the row index is in Redis");

    // TRUNCATE and refill in one transaction, then more changes by id.
    rig.exec(
        "BEGIN; TRUNCATE inventory;
         INSERT INTO inventory (sku, location, on_hand) SELECT 'SKU-00' || (i % 9), 'WH-1', i FROM generate_series(1, 30) i
           ON CONFLICT DO NOTHING;
         COMMIT;",
    )
    .await;
    run_workload(&mut rig, &mut w, 400, async |_, _| {}).await;
    rig.drain(&t, "WH-1", Duration::from_secs(40)).await;
    rig.assert_converges(Duration::from_secs(10)).await;

    // Redis loses everything: the rebuild indexes the rows again.
    rig.redis.cli(&["FLUSHALL"]);
    run_workload(&mut rig, &mut w, 400, async |_, _| {}).await;
    rig.drain(&t, "WH-1", Duration::from_secs(60)).await;
    rig.assert_converges(Duration::from_secs(10)).await;
    let code = rig.daemon().sigterm();
    assert_eq!(code, Some(0), "{}", rig.daemon().stderr_all());
}

/// A crash between a batch's SKU entries and its row index writes (a failpoint, as a
/// SIGKILL there): the replay reads the row index as it was before the batch and folds
/// the same entries, which the fences skip. Repeated at several batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_sku_entries_and_the_row_index_loses_and_doubles_nothing() {
    let seed = test_seed("a_crash_between_the_sku_entries_and_the_row_index");
    let mut rig = Rig::new(SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    let mut w = public_workload(seed);
    let t = WorkloadTables::public();
    let mut crashes = 0;
    for round in 0..4 {
        // abort at the 2nd..5th batch that writes the row index
        let at = format!("before-row-index:{}", 2 + round);
        {
            let d = rig.daemon();
            let mut p = d.proc.take().expect("running");
            let _ = p.child.kill();
            let _ = p.child.wait();
            d.spawn_env(&[("SKUSYNC_FAILPOINT", &at)]);
        }
        let mut aborted = false;
        // (400 statements: on a loaded machine batches grow, and fewer of them reach the
        // failpoint's count)
        run_workload(&mut rig, &mut w, 400, async |rig, _| {
            if !aborted && let Ok(Some(_)) = rig.daemon().proc().child.try_wait() {
                aborted = true;
            }
            // paced, so that batches stay small and several of them write the index
            tokio::time::sleep(Duration::from_millis(3)).await;
        })
        .await;
        if !aborted {
            // let it reach the failpoint, or not
            tokio::time::sleep(Duration::from_millis(500)).await;
            aborted = matches!(rig.daemon().proc().child.try_wait(), Ok(Some(_)));
        }
        if aborted {
            crashes += 1;
        }
        // restart without the failpoint; the replay must be exact
        rig.daemon().spawn();
        rig.drain(&t, "WH-1", Duration::from_secs(40)).await;
        rig.assert_converges(Duration::from_secs(10)).await;
    }
    assert!(
        crashes >= 2,
        "the failpoint was reached in only {crashes} of 4 rounds\n{}",
        rig.daemon().stderr_all()
    );
    assert!(rig.daemon().stderr_contains("failpoint reached"));
}

/// Entries in the row index's buckets (one hash field per row).
async fn row_index_entries(rig: &mut Rig) -> i64 {
    let mut n = 0;
    for k in crate::fold_oracle::keys_matching(&mut rig.con, "skusync:ri:*").await {
        let len: i64 = redis::cmd("HLEN")
            .arg(&k)
            .query_async(&mut rig.con)
            .await
            .unwrap();
        n += len;
    }
    n
}

/// A rebuild starts the change index and the row index's truncation marks over: both
/// come from the history Redis held, whose LSNs may be ahead of the server loaded now
/// (a failover to a standby that was behind; simulated by a mark and a score set far
/// ahead). A mark ahead skipped a later TRUNCATE's clearing of the row index; a score
/// ahead kept its SKU in every catch-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_starts_the_change_index_and_truncation_marks_over() {
    let mut rig = Rig::new(SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand)
           SELECT 'pre-' || i, 'WH-1', i FROM generate_series(1, 20) i;",
    )
    .await;
    rig.start_skusync("").await;
    rig.assert_converges(Duration::from_secs(20)).await;
    assert_eq!(rig.daemon().sigterm(), Some(0));
    let meta = skusync::sinks::layout::meta_key("skusync");
    let changes = skusync::sinks::layout::changes_key("skusync");
    let ahead = skusync::sinks::layout::sku_key("skusync", "pre-1");
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("ri_truncated:public.inventory")
        .arg("18446744073709551000:0")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(&changes)
        .arg("1e19")
        .arg(&ahead)
        .query_async(&mut rig.con)
        .await
        .unwrap();
    let cfg = rig.daemon().cfg.clone();
    let out = crate::support::skusync_output(&["resync"], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        hget(&mut rig.con, &meta, "ri_truncated:public.inventory").await,
        None
    );
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(&changes)
        .arg(&ahead)
        .query_async(&mut rig.con)
        .await
        .unwrap();
    assert!(score.is_some_and(|s| s < 1e18), "score {score:?}");

    rig.daemon().spawn();
    rig.exec("TRUNCATE inventory;").await;
    let t = WorkloadTables::public();
    rig.drain(&t, "WH-1", Duration::from_secs(30)).await;
    rig.assert_converges(Duration::from_secs(10)).await;
    let rows: i64 = rig
        .client
        .query_one("SELECT count(*) FROM inventory", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        row_index_entries(&mut rig).await,
        rows,
        "the TRUNCATE cleared the row index"
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
}
