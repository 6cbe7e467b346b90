//! Row filters (`where`) on stock and activity tables, and a publication's own row
//! filter: rows that fail count nowhere, in the snapshot and in the stream alike; a stock
//! row that stops matching (soft-deleted, untracked) leaves its SKU, one that starts
//! matching (restored) comes back.

use crate::fold_oracle::*;
use crate::oracle::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE inventory (
  sku text NOT NULL, location text NOT NULL, on_hand int NOT NULL, reserved int NOT NULL DEFAULT 0,
  deleted_at timestamptz, \"isTracked\" boolean NOT NULL DEFAULT true, grade numeric(4,1) DEFAULT 1.0,
  PRIMARY KEY (sku, location));
CREATE TABLE activity_log (
  id bigserial PRIMARY KEY, sku text, kind text NOT NULL, qty numeric,
  at timestamptz NOT NULL DEFAULT now(), source text DEFAULT 'app');
-- the publication's own row filter (on a key column, as PostgreSQL requires for updates)
CREATE PUBLICATION skusync FOR TABLE inventory WHERE (location <> 'a/b');
CREATE PUBLICATION skusync_activity FOR TABLE activity_log WITH (publish = 'insert');
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_filters_count_only_matching_rows_in_the_snapshot_and_the_stream() {
    let seed = test_seed("row_filters_count_only_matching_rows_in_the_snapshot_and_the_stream");
    let mut oracle = public_oracle(Buckets::Ignore);
    oracle.filters.insert(
        "public.inventory".into(),
        vec![
            "deleted_at IS NULL".into(),
            "\"isTracked\" = true".into(),
            "grade >= 0.5".into(),
        ],
    );
    oracle.filters.insert(
        "public.activity_log".into(),
        vec!["source NOT IN ('bot', 'test')".into()],
    );
    oracle
        .truth_filters
        .insert("public.inventory".into(), vec!["location <> 'a/b'".into()]);
    let mut rig = Rig::new(SCHEMA, oracle).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand, reserved, deleted_at, \"isTracked\", grade)
           SELECT 'pre-' || (i % 30), (ARRAY['WH-1', 'WH-2', 'store 3', 'a/b'])[1 + i % 4], i % 50, i % 3,
                  CASE WHEN i % 5 = 0 THEN now() END, i % 7 <> 0, (i % 3) * 0.4
           FROM generate_series(0, 299) i ON CONFLICT DO NOTHING;
         INSERT INTO activity_log (sku, kind, qty, source)
           SELECT 'pre-' || (i % 30), (ARRAY['view', 'add_to_cart', 'purchase'])[1 + i % 3], i % 4,
                  (ARRAY['app', 'bot', NULL, 'test', 'web'])[1 + i % 5]
           FROM generate_series(0, 299) i;",
    )
    .await;
    rig.start_skusync("").await;
    rig.assert_converges(Duration::from_secs(20)).await;

    let t = WorkloadTables::public();
    let mut w = public_workload(seed);
    let mut r = StdRng::seed_from_u64(seed ^ 0xf117e5);
    let skus = Workload::default_skus();
    run_workload(&mut rig, &mut w, 1500, async |rig, i| {
        if i % 3 != 0 {
            return;
        }
        let sku = lit(&skus[r.random_range(0..skus.len())]);
        let sql = match r.random_range(0..7) {
            0 => format!("UPDATE inventory SET deleted_at = now() WHERE sku = {sku}"),
            1 => format!("UPDATE inventory SET deleted_at = NULL WHERE sku = {sku}"),
            2 => format!("UPDATE inventory SET \"isTracked\" = NOT \"isTracked\" WHERE sku = {sku}"),
            3 => format!("UPDATE inventory SET grade = {} WHERE sku = {sku}", r.random_range(0..3) as f64 * 0.3),
            // soft-delete and restore in one transaction, with a stock change between
            4 => format!(
                "BEGIN; UPDATE inventory SET deleted_at = now() WHERE sku = {sku};
                 UPDATE inventory SET on_hand = on_hand + 3 WHERE sku = {sku};
                 UPDATE inventory SET deleted_at = NULL WHERE sku = {sku}; COMMIT;"
            ),
            _ => format!(
                "INSERT INTO activity_log (sku, kind, qty, source) VALUES ({sku}, 'purchase', 1, {})",
                ["'bot'", "'test'", "NULL", "'app'"][r.random_range(0..4)]
            ),
        };
        rig.exec(&sql).await;
    })
    .await;
    rig.drain(&t, "WH-1", Duration::from_secs(30)).await;
    rig.assert_converges(Duration::from_secs(10)).await;

    // A SIGKILL and replay keep it exact.
    rig.daemon().kill9_and_restart();
    run_workload(&mut rig, &mut w, 300, async |_, _| {}).await;
    rig.exec("UPDATE inventory SET deleted_at = now() WHERE location = 'WH-2'")
        .await;
    rig.drain(&t, "WH-1", Duration::from_secs(30)).await;
    rig.assert_converges(Duration::from_secs(10)).await;
    // verify aggregates the rows the publication's filter lets through, as the stream
    // does: the rows at 'a/b' are no difference
    let cfg = rig.daemon().cfg.clone();
    let (code, out, err) = crate::verify::verify(&cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let code = rig.daemon().sigterm();
    assert_eq!(code, Some(0), "{}", rig.daemon().stderr_all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantities_summed_from_several_columns_stay_exact() {
    let seed = test_seed("quantities_summed_from_several_columns_stay_exact");
    let schema = PUBLIC_SCHEMA.replace(
        "reserved int NOT NULL DEFAULT 0,",
        "reserved int NOT NULL DEFAULT 0, reserved_prod bigint NOT NULL DEFAULT 0, inbound numeric(12,0) DEFAULT 0,",
    );
    let mut oracle = public_oracle(Buckets::Ignore);
    oracle.sums.insert(
        "reserved".into(),
        vec!["reserved".into(), "reserved_prod".into()],
    );
    oracle
        .sums
        .insert("on_hand".into(), vec!["on_hand".into(), "inbound".into()]);
    let mut rig = Rig::new(&schema, oracle).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand, reserved, reserved_prod, inbound)
           SELECT 'pre-' || (i % 30), 'WH-' || (i % 3), i % 50, i % 3, i % 5, i % 4
           FROM generate_series(0, 199) i ON CONFLICT DO NOTHING;",
    )
    .await;
    rig.start_skusync("").await;
    rig.assert_converges(Duration::from_secs(20)).await;
    let mut w = public_workload(seed);
    let mut r = StdRng::seed_from_u64(seed ^ 0x5);
    let skus = Workload::default_skus();
    run_workload(&mut rig, &mut w, 800, async |rig, i| {
        if i % 2 == 0 {
            let sku = lit(&skus[r.random_range(0..skus.len())]);
            let sql = format!(
                "UPDATE inventory SET reserved_prod = {}, inbound = {} WHERE sku = {sku}",
                r.random_range(0..9),
                r.random_range(0..4)
            );
            rig.exec(&sql).await;
        }
    })
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activity_table_of_one_event_kind_counts_with_a_constant_kind() {
    // A table per event type, as many shops log them: no kind column.
    let schema = "
CREATE TABLE inventory (sku text NOT NULL, location text NOT NULL, on_hand int NOT NULL,
  reserved int NOT NULL DEFAULT 0, PRIMARY KEY (sku, location));
CREATE TABLE product_views (id bigserial PRIMARY KEY, sku text NOT NULL, viewed_at timestamptz DEFAULT now());
CREATE PUBLICATION skusync FOR TABLE inventory;
CREATE PUBLICATION skusync_activity FOR TABLE product_views WITH (publish = 'insert');
INSERT INTO product_views (sku) SELECT 'V-' || (i % 3) FROM generate_series(1, 10) i;
";
    let mut oracle = public_oracle(Buckets::Ignore);
    oracle.activity.clear();
    let mut rig = Rig::new(schema, oracle).await;
    rig.start_skusync(
        "\n[[activity]]\ntable = \"public.product_views\"\nsku = \"sku\"\nkind = { value = \"view\" }\n\
         [activity.counters]\nview = \"views\"\n",
    )
    .await;
    rig.exec(
        "INSERT INTO product_views (sku) SELECT 'V-' || (i % 3) FROM generate_series(1, 20) i",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    for k in 0..3 {
        let sku = format!("V-{k}");
        let want: i64 = rig
            .client
            .query_one("SELECT count(*) FROM product_views WHERE sku = $1", &[&sku])
            .await
            .unwrap()
            .get(0);
        let key = skusync::sinks::layout::sku_key("skusync", &sku);
        assert_eq!(
            hget(&mut rig.con, &key, "views").await,
            Some(want.to_string()),
            "{sku}"
        );
    }
    // `skusync verify` computes the same with the constant
    let cfg = rig.daemon().cfg.clone();
    let (code, out, err) = crate::verify::verify(&cfg, &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
}

/// Rows at 'WH-1' and 'a/b', skusync started and converged behind the publication's
/// filter (`location <> 'a/b'`).
async fn started_behind_a_publication_filter() -> Rig {
    let mut oracle = public_oracle(Buckets::Ignore);
    oracle
        .truth_filters
        .insert("public.inventory".into(), vec!["location <> 'a/b'".into()]);
    let mut rig = Rig::new(SCHEMA, oracle).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand)
           SELECT 'pre-' || (i % 20), (ARRAY['WH-1', 'a/b'])[1 + i % 2], 1 + i % 9
           FROM generate_series(0, 99) i ON CONFLICT DO NOTHING;",
    )
    .await;
    rig.start_skusync("").await;
    rig.assert_converges(Duration::from_secs(20)).await;
    rig
}

/// Redis built through a publication's row filter holds only the rows it let through: a
/// restart after the filter changed rebuilds, as a changed mapping does, so the rows the
/// old filter held back count too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_publication_row_filter_rebuilds_redis_at_the_next_start() {
    let mut rig = started_behind_a_publication_filter().await;
    assert_eq!(rig.daemon().sigterm(), Some(0));

    // A Redis of a release that did not record them (no char(n) columns) records them
    // at the next start, without a rebuild.
    let recorded = rig.redis.cli(&["HGET", "skusync:meta", "publications"]);
    assert_eq!(recorded.len(), 24, "{recorded:?}");
    rig.redis.cli(&["HDEL", "skusync:meta", "publications"]);
    rig.daemon().spawn();
    rig.daemon().wait_streaming(Duration::from_secs(30)).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    assert_eq!(
        rig.redis.cli(&["HGET", "skusync:meta", "publications"]),
        recorded
    );
    assert_eq!(rig.daemon().stderr_count("rebuilding Redis"), 0);
    assert_eq!(rig.daemon().sigterm(), Some(0));

    rig.exec("ALTER PUBLICATION skusync SET TABLE inventory")
        .await;
    rig.oracle.truth_filters.clear();
    rig.daemon().spawn();
    rig.daemon()
        .wait_stderr(
            "the publications (their names or the row filters",
            Duration::from_secs(30),
        )
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    rig.exec("UPDATE inventory SET on_hand = on_hand + 1 WHERE location = 'a/b'")
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
}

/// A publication's row filter changed while skusync streams: the walsender announces the
/// table again before its next change, and skusync rebuilds Redis then (not at the next
/// start), so the rows the old filter held back count from that change on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_row_filter_changed_while_streaming_rebuilds_redis_at_once() {
    let mut rig = started_behind_a_publication_filter().await;
    rig.exec("ALTER PUBLICATION skusync SET TABLE inventory")
        .await;
    rig.oracle.truth_filters.clear();
    rig.exec("UPDATE inventory SET on_hand = on_hand + 1 WHERE location = 'a/b'")
        .await;
    rig.daemon()
        .wait_stderr(
            "the publications (their names or the row filters",
            Duration::from_secs(30),
        )
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    rig.daemon().assert_alive("after the rebuild");
}

/// Columns typed with a domain (`CREATE DOMAIN qty AS integer CHECK (...)`, and a domain
/// over it) are read as their base type, in the snapshot and the stream, and a filter on
/// one compares numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_typed_with_domains_are_read_as_their_base_types() {
    let seed = test_seed("columns_typed_with_domains_are_read_as_their_base_types");
    let schema = format!(
        "CREATE DOMAIN qty AS integer CHECK (VALUE > -1000000000);
         CREATE DOMAIN stock_qty AS qty;
         CREATE DOMAIN amount AS numeric(12, 2);
         {}",
        PUBLIC_SCHEMA
            .replace("on_hand int NOT NULL", "on_hand stock_qty NOT NULL")
            .replace("qty numeric,", "qty amount,")
    );
    assert!(schema.contains("on_hand stock_qty") && schema.contains("qty amount"));
    let mut oracle = public_oracle(Buckets::Ignore);
    oracle
        .filters
        .insert("public.inventory".into(), vec!["on_hand < 45".into()]);
    let mut rig = Rig::new(&schema, oracle).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand, reserved)
           SELECT 'pre-' || (i % 30), 'WH-' || (i % 3), i % 50, i % 3
           FROM generate_series(0, 199) i ON CONFLICT DO NOTHING;",
    )
    .await;
    rig.start_skusync("").await;
    rig.assert_converges(Duration::from_secs(20)).await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 600, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
    // a domain made while skusync streams: its Type message makes the source read the
    // domains again, so the column's new type is known without a restart
    rig.exec(
        "CREATE DOMAIN held_qty AS bigint;
         ALTER TABLE inventory ALTER COLUMN reserved TYPE held_qty;
         UPDATE inventory SET reserved = reserved + 1 WHERE location = 'WH-1';",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
    let runs = rig.daemon().runs;
    assert_eq!(runs, 1, "{}", rig.daemon().stderr_all());
    rig.daemon().assert_alive("after the new domain");
}

/// A filter compares the text PostgreSQL prints, in the snapshot as in the stream, so
/// Redis does not depend on which of them saw a row: on a `citext` column `<> 'gone'`
/// keeps `'Gone'` (SQL's citext `<>` drops it), and a `real` 0.1 is `IN (0.1, 0.5)`
/// (SQL widens it to double precision, where it is not 0.1). Before, the snapshot's SQL
/// dropped rows the stream keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_compare_printed_values_in_the_snapshot_as_in_the_stream() {
    let seed = test_seed("filters_compare_printed_values_in_the_snapshot_as_in_the_stream");
    let schema = format!(
        "CREATE EXTENSION citext;
         {}",
        PUBLIC_SCHEMA.replace(
            "reserved int NOT NULL DEFAULT 0,",
            "reserved int NOT NULL DEFAULT 0, state citext NOT NULL DEFAULT 'active', \
             factor real NOT NULL DEFAULT 0.5,"
        )
    );
    assert!(schema.contains("factor real"));
    let mut oracle = public_oracle(Buckets::Ignore);
    oracle.config_filters.insert(
        "public.inventory".into(),
        vec!["state <> 'gone'".into(), "factor IN (0.1, 0.5)".into()],
    );
    // the truth as skusync evaluates it
    oracle.filters.insert(
        "public.inventory".into(),
        vec![
            "state::text <> 'gone'".into(),
            "factor::text IN ('0.1', '0.5')".into(),
        ],
    );
    let mut rig = Rig::new(&schema, oracle).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand, reserved, state, factor)
           SELECT 'pre-' || (i % 30), 'WH-' || (i % 3), 1 + i % 50, i % 3,
                  (ARRAY['active', 'Active', 'gone', 'Gone'])[1 + i % 4],
                  (ARRAY[0.1, 0.5, 1])[1 + (i / 4) % 3]
           FROM generate_series(0, 199) i ON CONFLICT DO NOTHING;",
    )
    .await;
    // SQL's own comparison is narrower here, or the test proves nothing
    let narrower: i64 = rig
        .client
        .query_one(
            "SELECT count(*) FROM inventory WHERE (state::text <> 'gone' AND factor::text IN ('0.1', '0.5')) \
             AND NOT (state <> 'gone' AND factor IN (0.1, 0.5))",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(narrower >= 5, "{narrower}");
    rig.start_skusync("").await;
    rig.assert_converges(Duration::from_secs(20)).await;

    let mut w = public_workload(seed);
    let mut r = StdRng::seed_from_u64(seed ^ 0xc17e);
    let skus = Workload::default_skus();
    run_workload(&mut rig, &mut w, 900, async |rig, i| {
        if i % 3 != 0 {
            return;
        }
        let sku = lit(&skus[r.random_range(0..skus.len())]);
        let sql = match r.random_range(0..3) {
            0 => format!(
                "UPDATE inventory SET state = {} WHERE sku = {sku}",
                ["'active'", "'Gone'", "'gone'"][r.random_range(0..3)]
            ),
            1 => format!(
                "UPDATE inventory SET factor = {} WHERE sku = {sku}",
                ["0.1", "0.5", "'NaN'"][r.random_range(0..3)]
            ),
            _ => format!("UPDATE inventory SET on_hand = on_hand + 1 WHERE sku = {sku}"),
        };
        rig.exec(&sql).await;
    })
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
    // verify's SQL aggregate compares as the stream did
    let cfg = rig.daemon().cfg.clone();
    let (code, out, err) = crate::verify::verify(&cfg, &[]);
    assert_eq!(code, 0, "{out}{err}");
    rig.daemon().kill9_and_restart();
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
}
