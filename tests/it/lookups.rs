//! Lookups on a real commerce schema: Saleor's stock rows name their variant and
//! warehouse by id; the SKU and the location are taken from those rows. After a seeded
//! workload of renames, deletes, moves and faults, Redis and the retained MQTT states
//! equal a SQL join of the same tables.

use crate::fold_oracle::*;
use crate::harness::MosquittoServer;
use crate::mqtt_e2e::{mqtt_toml, retained_mismatches};
use crate::oracle::*;
use crate::support::{skusync_output, write_config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Saleor 3.23.28's warehouse and product tables (see the file's header).
const SALEOR_SCHEMA: &str = include_str!("schemas/saleor.sql");

/// The mapping of `dist/examples/saleor.toml`, as a test writes it.
const SALEOR_MAPPING: &str = include_str!("../../dist/examples/saleor.toml");

/// The truth: the join the mapping describes.
const SALEOR_TRUTH: &str = "
SELECT v.sku::text, w.slug::text, sum(s.quantity)::text, sum(s.quantity_allocated)::text
FROM warehouse_stock s
JOIN product_productvariant v ON v.id = s.product_variant_id
JOIN warehouse_warehouse w ON w.id = s.warehouse_id
WHERE v.sku IS NOT NULL
GROUP BY 1, 2";

/// An oracle with no mapping of its own: the config comes from the test, the truth from
/// a join ([`join_truth`]); its `compare` and `redis_state` are reused.
fn lookup_oracle() -> Oracle {
    let mut o = public_oracle(Buckets::Ignore);
    o.inventory.clear();
    o.activity.clear();
    o
}

/// Per SKU: totals and per-location totals from rows (sku, location, on_hand, reserved).
async fn join_truth(client: &tokio_postgres::Client, sql: &str, scale: u32) -> Truth {
    let mut t = Truth::default();
    for row in client.query(sql, &[]).await.expect(sql) {
        let sku: String = row.get(0);
        let loc: Option<String> = row.get(1);
        let oh = parse_units(&row.get::<_, String>(2), scale);
        let rs = parse_units(&row.get::<_, String>(3), scale);
        t.with_stock_rows.insert(sku.clone());
        let f = t.skus.entry(sku).or_default();
        *f.entry("on_hand".into()).or_default() += oh;
        *f.entry("reserved".into()).or_default() += rs;
        *f.entry("available".into()).or_default() += oh - rs;
        if let Some(l) = loc.filter(|l| !l.is_empty()) {
            *f.entry(format!("loc:{l}:on_hand")).or_default() += oh;
            *f.entry(format!("loc:{l}:reserved")).or_default() += rs;
        }
    }
    t
}

async fn assert_join_converges(
    rig: &mut Rig,
    truth_sql: &str,
    counters_sql: &str,
    timeout: Duration,
) {
    let start = Instant::now();
    loop {
        let mut truth = join_truth(&rig.client, truth_sql, rig.oracle.scale).await;
        if !counters_sql.is_empty() {
            for row in rig
                .client
                .query(counters_sql, &[])
                .await
                .expect(counters_sql)
            {
                let (sku, counter): (String, String) = (row.get(0), row.get(1));
                let v = parse_units(&row.get::<_, String>(2), rig.oracle.scale);
                *truth
                    .skus
                    .entry(sku)
                    .or_default()
                    .entry(counter)
                    .or_default() += v;
            }
        }
        let state = rig.oracle.redis_state(&mut rig.con).await;
        let m = rig.oracle.compare(&truth, &state);
        if m.is_empty() {
            return;
        }
        rig.daemon().assert_alive("converging");
        if start.elapsed() > timeout {
            panic!(
                "Redis differs from the SQL join after {timeout:?}:\n{}\n{}",
                format_mismatches(&m, 60),
                rig.daemon().stderr_all()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Commit `sql` (a marker row whose SKU `zz-drain-<n>` holds `n` on hand) and wait
/// until Redis holds it: everything committed before is applied.
async fn drain_marker(rig: &mut Rig, n: i64, sql: &str) {
    rig.exec(sql).await;
    let sku = format!("zz-drain-{n}");
    let key = skusync::sinks::layout::sku_key("skusync", &sku);
    let start = Instant::now();
    loop {
        rig.daemon().assert_alive("draining");
        if hget(&mut rig.con, &key, "on_hand").await == Some(n.to_string()) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "drain marker {sku} not applied\n{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The mapping part of an example configuration (after its `# ---- mapping ----` line).
fn mapping_of(example: &str) -> &str {
    example
        .split_once("# ---- mapping ----")
        .map(|(_, m)| m)
        .expect("an example has a mapping section")
}

/// A commerce schema under test: its DDL, existing rows, the mapping, the join that is
/// the truth, a random transaction and a drain marker.
struct Shop {
    schema: &'static str,
    seed: &'static str,
    /// Tables the DBA published before skusync came (setup adds the referenced ones).
    published: &'static str,
    mapping: &'static str,
    truth: &'static str,
    /// Activity truth: rows (sku, counter, total); empty: no activity tables.
    counters: &'static str,
    scale: u32,
    txn: fn(&mut StdRng, &mut u64) -> String,
    drain: fn(i64) -> String,
}

/// Existing rows, `check` (FAIL: referenced tables not published) then `setup`, a first
/// start, then a seeded workload with two SIGKILLs and a FLUSHALL; after each drain Redis
/// equals the join and the retained MQTT states equal Redis.
/// The rig's connection settings, then an example's mapping.
fn config_with(rig: &Rig, mapping: &str) -> String {
    rig.oracle.config_toml(
        &rig.pg.url("postgres", "postgres"),
        "skusync",
        &["skusync", "skusync_activity"],
        &rig.redis.url(),
    ) + mapping
}

/// The oracle compares the shops' counters: only their names matter (`compare` compares
/// those fields); set after the config was written, which is the test's own.
fn compare_shop_counters(rig: &mut Rig) {
    let mut a = public_oracle(Buckets::Ignore).activity;
    a[0].counters = ["views", "carts", "moved"]
        .iter()
        .map(|c| (c.to_string(), c.to_string()))
        .collect();
    rig.oracle.activity = a;
}

async fn run_shop(test: &str, shop: Shop) {
    let seed = test_seed(test);
    let mut oracle = lookup_oracle();
    oracle.scale = shop.scale;

    let mut rig = Rig::new(shop.schema, oracle).await;
    rig.exec(shop.seed).await;
    let broker = MosquittoServer::start();
    rig.exec(&format!(
        "CREATE PUBLICATION skusync FOR TABLE {};",
        shop.published
    ))
    .await;
    let cfg_text = config_with(&rig, mapping_of(shop.mapping)) + &mqtt_toml(&broker, 0);
    let cfg = write_config(rig.dir.path(), &cfg_text);
    if !shop.counters.is_empty() {
        compare_shop_counters(&mut rig);
    }
    let run = |args: &[&str]| skusync_output(args, &cfg);
    let check = run(&["check"]);
    let out = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(!check.status.success(), "{out}");
    assert!(
        out.contains("FAIL") && out.contains("ALTER PUBLICATION"),
        "{out}"
    );
    let setup = run(&["setup"]);
    assert!(setup.status.success(), "{setup:?}");
    let check = run(&["check"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // the existing rows, loaded by the first start's snapshot
    rig.daemon = Some(Daemon::start(rig.dir.path(), cfg.clone()));
    rig.wait_bootstrap(Duration::from_secs(40)).await;
    assert_join_converges(&mut rig, shop.truth, shop.counters, Duration::from_secs(20)).await;

    let mut rng = StdRng::seed_from_u64(seed);
    let mut serial = 0u64;
    let kills = [rng.random_range(20..120), rng.random_range(150..250)];
    let flush_at = rng.random_range(270..330);
    eprintln!("SIGKILL before transactions {kills:?}, FLUSHALL before {flush_at}");
    for i in 0..400 {
        if kills.contains(&i) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
            rig.daemon().kill9_and_restart();
        }
        if i == flush_at {
            rig.redis.cli(&["FLUSHALL"]);
        }
        let sql = (shop.txn)(&mut rng, &mut serial);
        rig.exec(&sql).await;
    }
    drain_marker(&mut rig, 1, &(shop.drain)(1)).await;
    assert_join_converges(&mut rig, shop.truth, shop.counters, Duration::from_secs(20)).await;
    let start = Instant::now();
    loop {
        let m = retained_mismatches(&mut rig, &broker).await;
        if m.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "retained messages differ from Redis:\n{}\n{}",
            m.join("\n"),
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // one more stretch without faults: referenced rows' changes applied by the stream alone
    for _ in 0..150 {
        let sql = (shop.txn)(&mut rng, &mut serial);
        rig.exec(&sql).await;
    }
    drain_marker(&mut rig, 2, &(shop.drain)(2)).await;
    assert_join_converges(&mut rig, shop.truth, shop.counters, Duration::from_secs(20)).await;
    let state: BTreeMap<_, _> = rig.oracle.redis_state(&mut rig.con).await;
    assert!(state.len() > 10, "{} SKUs", state.len());
    // `skusync verify` (its own SQL, joined through the lookups) agrees, MQTT included
    let verify = run(&["verify", "--mqtt", "--rounds", "3"]);
    assert!(
        verify.status.success(),
        "verify: {}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let code = rig.daemon().sigterm();
    assert_eq!(code, Some(0), "{}", rig.daemon().stderr_all());
}

fn saleor_drain(n: i64) -> String {
    format!(
        "BEGIN;
         INSERT INTO product_productvariant (id, sku, name, product_id, track_inventory, is_preorder,
           created_at, updated_at) VALUES ({id}, 'zz-drain-{n}', '', 1, true, false, now(), now());
         INSERT INTO warehouse_stock (warehouse_id, product_variant_id, quantity, quantity_allocated)
           SELECT id, {id}, {n}, 0 FROM warehouse_warehouse ORDER BY slug LIMIT 1;
         COMMIT;",
        id = 900_000 + n
    )
}

const SALEOR_SEED: &str = "
INSERT INTO account_address (first_name, last_name, company_name, street_address_1, street_address_2,
  city, city_area, postal_code, country, country_area, phone)
  VALUES ('', '', 'Shop', 'Main St 1', '', 'Berlin', '', '10115', 'DE', '', '');
INSERT INTO product_producttype (id, name, has_variants, is_shipping_required, weight, is_digital, slug, kind)
  VALUES (1, 'Shirts', true, true, 0, false, 'shirts', 'normal');
INSERT INTO product_product (id, name, slug, description_plaintext, search_document, search_index_dirty,
  product_type_id, created_at, updated_at)
  SELECT i, 'Product ' || i, 'product-' || i, '', '', false, 1, now(), now() FROM generate_series(1, 5) i;
INSERT INTO warehouse_warehouse (id, name, email, address_id, slug, click_and_collect_option, is_private)
  SELECT ('00000000-0000-0000-0000-00000000000' || i)::uuid, 'Warehouse ' || i, '', 1, 'wh-' || i,
    'disabled', false FROM generate_series(1, 4) i;
-- variants 1..40; every 7th has no SKU (Saleor allows NULL)
INSERT INTO product_productvariant (id, sku, name, product_id, track_inventory, is_preorder, created_at, updated_at)
  SELECT i, CASE WHEN i % 7 = 0 THEN NULL ELSE 'SKU-' || i END, '', 1 + i % 5, true, false, now(), now()
  FROM generate_series(1, 40) i;
INSERT INTO warehouse_stock (warehouse_id, product_variant_id, quantity, quantity_allocated)
  SELECT ('00000000-0000-0000-0000-00000000000' || (1 + (i % 3)))::uuid, 1 + i % 40, 10 + i % 17, i % 4
  FROM generate_series(0, 79) i ON CONFLICT DO NOTHING;
";

/// One random Saleor transaction (what the dashboard and checkout do to these tables).
fn saleor_txn(rng: &mut StdRng, serial: &mut u64) -> String {
    let mut sql = String::from("BEGIN;\n");
    for _ in 0..rng.random_range(1..=3) {
        *serial += 1;
        let g = *serial;
        let v = rng.random_range(1..=48);
        let w = rng.random_range(1..=4);
        let wid = format!("'00000000-0000-0000-0000-00000000000{w}'");
        sql.push_str(&match rng.random_range(0..100) {
            // stock levels change (the hot path)
            0..=39 => format!(
                "UPDATE warehouse_stock SET quantity = quantity + {}, quantity_allocated = {} \
                 WHERE product_variant_id = {v};\n",
                rng.random_range(-5..=8),
                rng.random_range(0..=3)
            ),
            40..=51 => format!(
                "INSERT INTO warehouse_stock (warehouse_id, product_variant_id, quantity, quantity_allocated) \
                 SELECT {wid}, {v}, {}, 0 WHERE EXISTS (SELECT 1 FROM product_productvariant WHERE id = {v}) \
                 ON CONFLICT DO NOTHING;\n",
                rng.random_range(0..30)
            ),
            52..=57 => format!(
                "DELETE FROM warehouse_stock WHERE product_variant_id = {v} AND warehouse_id = {wid};\n"
            ),
            // a row moves to another warehouse
            58..=62 => format!(
                "UPDATE warehouse_stock s SET warehouse_id = {wid} WHERE s.product_variant_id = {v} \
                 AND s.id = (SELECT min(id) FROM warehouse_stock WHERE product_variant_id = {v}) \
                 AND NOT EXISTS (SELECT 1 FROM warehouse_stock x WHERE x.product_variant_id = {v} AND x.warehouse_id = {wid});\n"
            ),
            // a SKU renamed, or cleared
            63..=74 => format!(
                "UPDATE product_productvariant SET sku = {}, updated_at = now() WHERE id = {v};\n",
                if rng.random_bool(0.15) {
                    "NULL".to_string()
                } else {
                    format!("'SKU-{v}-r{g}'")
                }
            ),
            // a change of a variant that is not its SKU
            75..=79 => format!("UPDATE product_productvariant SET name = 'n{g}' WHERE id = {v};\n"),
            // a variant deleted as Django does (its stock rows first), or created
            80..=85 => format!(
                "DELETE FROM warehouse_stock WHERE product_variant_id = {v};\n\
                 UPDATE product_product SET default_variant_id = NULL WHERE default_variant_id = {v};\n\
                 DELETE FROM product_productvariant WHERE id = {v};\n"
            ),
            86..=93 => format!(
                "INSERT INTO product_productvariant (id, sku, name, product_id, track_inventory, is_preorder, \
                 created_at, updated_at) VALUES ({v}, 'SKU-{v}-n{g}', '', 1, true, false, now(), now()) \
                 ON CONFLICT DO NOTHING;\n\
                 INSERT INTO warehouse_stock (warehouse_id, product_variant_id, quantity, quantity_allocated) \
                 SELECT {wid}, {v}, {}, 1 WHERE EXISTS (SELECT 1 FROM product_productvariant WHERE id = {v}) \
                 ON CONFLICT DO NOTHING;\n",
                rng.random_range(1..20)
            ),
            // a warehouse's slug renamed
            _ => format!("UPDATE warehouse_warehouse SET slug = 'wh-{w}-r{g}' WHERE id = {wid};\n"),
        });
    }
    sql.push_str(if rng.random_bool(0.05) {
        "ROLLBACK;\n"
    } else {
        "COMMIT;\n"
    });
    sql
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saleor_stock_follows_variant_and_warehouse_lookups_through_faults() {
    run_shop(
        "saleor_stock_follows_variant_and_warehouse_lookups_through_faults",
        Shop {
            schema: SALEOR_SCHEMA,
            seed: SALEOR_SEED,
            published: "warehouse_stock",
            mapping: SALEOR_MAPPING,
            truth: SALEOR_TRUTH,
            counters: "",
            scale: 0,
            txn: saleor_txn,
            drain: saleor_drain,
        },
    )
    .await;
}

/// Odoo 17.0's stock tables (see the file's header).
const ODOO_SCHEMA: &str = include_str!("schemas/odoo.sql");

/// The mapping of `dist/examples/odoo.toml`: two lookups, a filter on the location's,
/// decimals.
const ODOO_MAPPING: &str = include_str!("../../dist/examples/odoo.toml");

const ODOO_TRUTH: &str = "
SELECT p.default_code::text, l.complete_name::text, sum(q.quantity)::text, sum(q.reserved_quantity)::text
FROM stock_quant q
JOIN product_product p ON p.id = q.product_id
JOIN stock_location l ON l.id = q.location_id
WHERE p.default_code IS NOT NULL AND l.usage IN ('internal', 'transit') AND l.complete_name IS NOT NULL
GROUP BY 1, 2";

const ODOO_SEED: &str = "
INSERT INTO uom_category (id, name) VALUES (1, '{\"en_US\": \"Unit\"}'), (2, '{\"en_US\": \"Weight\"}');
INSERT INTO uom_uom (id, name, category_id, factor, rounding, active, uom_type)
  VALUES (1, '{\"en_US\": \"Units\"}', 1, 1, 0.01, true, 'reference'),
         (2, '{\"en_US\": \"kg\"}', 2, 1, 0.001, true, 'reference');
INSERT INTO product_category (id, name, complete_name) VALUES (1, 'All', 'All');
INSERT INTO product_template (id, name, detailed_type, type, categ_id, uom_id, uom_po_id, active, tracking)
  SELECT i, jsonb_build_object('en_US', 'Template ' || i), 'product', 'product', 1, 1 + i % 2, 1 + i % 2, true, 'none'
  FROM generate_series(1, 10) i;
-- variants 1..30: every 9th without an internal reference, 5 and 6 share one
INSERT INTO product_product (id, default_code, active, product_tmpl_id)
  SELECT i, CASE WHEN i % 9 = 0 THEN NULL WHEN i = 6 THEN 'FURN-5' ELSE 'FURN-' || i END, true, 1 + i % 10
  FROM generate_series(1, 30) i;
INSERT INTO stock_location (id, name, complete_name, usage, location_id, active) VALUES
  (1, 'WH', 'WH', 'view', NULL, true),
  (2, 'Stock', 'WH/Stock', 'internal', 1, true),
  (3, 'Shelf 1', 'WH/Stock/Shelf 1', 'internal', 2, true),
  (4, 'Customers', 'Partners/Customers', 'customer', NULL, true),
  (5, 'Inventory adjustment', 'Virtual Locations/Inventory adjustment', 'inventory', NULL, true),
  (6, 'Inter-warehouse transit', 'Physical Locations/Inter-warehouse transit', 'transit', NULL, true);
INSERT INTO stock_quant (product_id, company_id, location_id, quantity, reserved_quantity, in_date)
  SELECT 1 + i % 30, 1, 2 + i % 5, round((i % 23) * 1.25 - CASE WHEN i % 5 IN (2, 3) THEN 20 ELSE 0 END, 3),
    (i % 3) * 0.5, now()
  FROM generate_series(0, 99) i;
";

/// One random Odoo transaction on quants, products and locations.
fn odoo_txn(rng: &mut StdRng, serial: &mut u64) -> String {
    let mut sql = String::from("BEGIN;\n");
    for _ in 0..rng.random_range(1..=3) {
        *serial += 1;
        let g = *serial;
        let p = rng.random_range(1..=34);
        let l = rng.random_range(2..=6);
        let q = format!(
            "{}.{:03}",
            rng.random_range(-3..40),
            rng.random_range(0..1000)
        );
        sql.push_str(&match rng.random_range(0..100) {
            // quantities move (fractional: kilograms)
            0..=39 => format!(
                "UPDATE stock_quant SET quantity = quantity + {q}, reserved_quantity = {}.{} \
                 WHERE id = (SELECT min(id) FROM stock_quant WHERE product_id = {p});\n",
                rng.random_range(0..3),
                rng.random_range(0..10)
            ),
            40..=51 => format!(
                "INSERT INTO stock_quant (product_id, company_id, location_id, quantity, reserved_quantity, in_date) \
                 SELECT {p}, 1, {l}, {q}, 0, now() WHERE EXISTS (SELECT 1 FROM product_product WHERE id = {p});\n"
            ),
            // Odoo removes empty quants
            52..=57 => format!(
                "DELETE FROM stock_quant WHERE id = (SELECT max(id) FROM stock_quant WHERE product_id = {p});\n"
            ),
            58..=61 => format!(
                "UPDATE stock_quant SET location_id = {l} WHERE id = (SELECT min(id) FROM stock_quant WHERE product_id = {p});\n"
            ),
            // internal references renamed, cleared, or shared with another product
            62..=73 => format!(
                "UPDATE product_product SET default_code = {}, write_date = now() WHERE id = {p};\n",
                match rng.random_range(0..10) {
                    0 => "NULL".to_string(),
                    1 | 2 => format!("'FURN-{}'", rng.random_range(1..=5)),
                    _ => format!("'FURN-{p}-r{g}'"),
                }
            ),
            74..=77 => format!("UPDATE product_product SET active = NOT active WHERE id = {p};\n"),
            // a product deleted with its quants (the ORM unlinks them first), or created
            78..=82 => format!(
                "DELETE FROM stock_quant WHERE product_id = {p};\nDELETE FROM product_product WHERE id = {p};\n"
            ),
            83..=87 => format!(
                "INSERT INTO product_product (id, default_code, active, product_tmpl_id) \
                 VALUES ({p}, 'FURN-{p}-n{g}', true, 1) ON CONFLICT DO NOTHING;\n"
            ),
            // a template without stock deleted: the database cascades to its products
            88..=89 => format!(
                "DELETE FROM product_template t WHERE t.id = {} AND NOT EXISTS (SELECT 1 FROM stock_quant q \
                 JOIN product_product pp ON pp.id = q.product_id WHERE pp.product_tmpl_id = t.id);\n",
                rng.random_range(2..=10)
            ),
            // a location renamed, or turned from internal into another usage and back
            90..=94 => format!(
                "UPDATE stock_location SET complete_name = 'WH/Stock/Shelf {g}' WHERE id = {};\n",
                rng.random_range(2..=3)
            ),
            _ => format!(
                "UPDATE stock_location SET usage = CASE usage WHEN 'internal' THEN 'inventory' \
                 WHEN 'inventory' THEN 'internal' ELSE usage END WHERE id = {l};\n"
            ),
        });
    }
    sql.push_str(if rng.random_bool(0.05) {
        "ROLLBACK;\n"
    } else {
        "COMMIT;\n"
    });
    sql
}

fn odoo_drain(n: i64) -> String {
    format!(
        "BEGIN;
         INSERT INTO stock_location (id, name, complete_name, usage, active)
           VALUES (900, 'Drain', 'Drain', 'internal', true) ON CONFLICT DO NOTHING;
         INSERT INTO product_product (id, default_code, active, product_tmpl_id)
           VALUES ({id}, 'zz-drain-{n}', true, 1);
         INSERT INTO stock_quant (product_id, company_id, location_id, quantity, reserved_quantity, in_date)
           VALUES ({id}, 1, 900, {n}, 0, now());
         COMMIT;",
        id = 900_000 + n
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odoo_quants_follow_product_and_filtered_location_lookups_in_decimals() {
    run_shop(
        "odoo_quants_follow_product_and_filtered_location_lookups_in_decimals",
        Shop {
            schema: ODOO_SCHEMA,
            seed: ODOO_SEED,
            published: "stock_quant",
            mapping: ODOO_MAPPING,
            truth: ODOO_TRUTH,
            counters: "",
            scale: 3,
            txn: odoo_txn,
            drain: odoo_drain,
        },
    )
    .await;
}

/// Solidus 4.7's stock tables and the Ahoy 5.5 events table (see the file's header).
const SOLIDUS_SCHEMA: &str = include_str!("schemas/solidus.sql");

/// The mapping of `dist/examples/solidus.toml`: soft deletes, a where on each lookup, a
/// two-hop lookup (stock movement -> stock item -> variant) and a JSON reference.
const SOLIDUS_MAPPING: &str = include_str!("../../dist/examples/solidus.toml");

const SOLIDUS_TRUTH: &str = "
SELECT v.sku::text, l.name::text, sum(i.count_on_hand)::text, '0'
FROM spree_stock_items i
JOIN spree_variants v ON v.id = i.variant_id AND v.deleted_at IS NULL AND v.track_inventory = true
JOIN spree_stock_locations l ON l.id = i.stock_location_id AND l.active = true
WHERE i.deleted_at IS NULL AND l.name IS NOT NULL
GROUP BY 1, 2";

/// Events and movements reference variants 1-10, which are never renamed or deleted, so
/// the join with today's SKUs is what was attributed at insert (and by a rebuild).
const SOLIDUS_COUNTERS: &str = "
SELECT v.sku::text, 'moved', sum(m.quantity)::text
FROM spree_stock_movements m JOIN spree_stock_items i ON i.id = m.stock_item_id
JOIN spree_variants v ON v.id = i.variant_id
WHERE m.quantity IS NOT NULL GROUP BY 1
UNION ALL
SELECT v.sku::text, CASE e.name WHEN 'Viewed product' THEN 'views' ELSE 'carts' END, count(*)::text
FROM ahoy_events e JOIN spree_variants v ON v.id::text = e.properties ->> 'variant_id'
WHERE e.name IN ('Viewed product', 'Added to cart') GROUP BY 1, 2";

const SOLIDUS_SEED: &str = "
INSERT INTO spree_shipping_categories (id, name) VALUES (1, 'Default');
INSERT INTO spree_products (id, name, slug, shipping_category_id, created_at, updated_at)
  SELECT i, 'Product ' || i, 'product-' || i, 1, now(), now() FROM generate_series(1, 8) i;
-- variants 1..40; masters (every 8th) keep the default empty SKU; 12 and 13 share one
INSERT INTO spree_variants (id, sku, product_id, is_master, created_at, updated_at)
  SELECT i, CASE WHEN i % 8 = 0 THEN '' WHEN i = 13 THEN 'TEE-12' ELSE 'TEE-' || i END,
    1 + i % 8, i % 8 = 0, now(), now() FROM generate_series(1, 40) i;
INSERT INTO spree_stock_locations (id, name, code, active, created_at, updated_at)
  VALUES (1, 'Berlin', 'BER', true, now(), now()), (2, 'Hamburg', NULL, true, now(), now()),
         (3, 'Returns', 'RET', false, now(), now());
INSERT INTO spree_stock_items (id, stock_location_id, variant_id, count_on_hand, created_at, updated_at)
  SELECT i, 1 + i % 3, 1 + i % 40, i % 13, now(), now() FROM generate_series(1, 100) i
  WHERE i <= 40 OR i % 3 <> 0;
SELECT setval('spree_stock_items_id_seq', 1000);
INSERT INTO spree_stock_movements (stock_item_id, quantity, action, created_at, updated_at)
  SELECT 1 + i % 9, 1 + i % 4, 'received', now(), now() FROM generate_series(1, 30) i; -- items of variants 2-10
INSERT INTO ahoy_events (visit_id, user_id, name, properties, time)
  SELECT i, i % 7, CASE WHEN i % 3 = 0 THEN 'Added to cart' ELSE 'Viewed product' END,
    jsonb_build_object('variant_id', 1 + i % 10), now() FROM generate_series(1, 40) i;
";

/// One random Solidus transaction.
fn solidus_txn(rng: &mut StdRng, serial: &mut u64) -> String {
    let mut sql = String::from("BEGIN;\n");
    for _ in 0..rng.random_range(1..=3) {
        *serial += 1;
        let g = *serial;
        // variants 1..10 carry events; 11..44 are renamed, deleted and created
        let ev = rng.random_range(1..=10);
        let v = rng.random_range(11..=44);
        let l = rng.random_range(1..=3);
        let d = rng.random_range(-4..=9);
        sql.push_str(&match rng.random_range(0..100) {
            // stock moves: the item's count and a movement row (Spree::StockItem#adjust_count_on_hand)
            0..=29 => {
                let var = if rng.random_bool(0.5) { ev } else { v };
                format!(
                    "UPDATE spree_stock_items SET count_on_hand = count_on_hand + {d}, updated_at = now() \
                     WHERE id = (SELECT min(id) FROM spree_stock_items WHERE variant_id = {var} AND deleted_at IS NULL);\n\
                     INSERT INTO spree_stock_movements (stock_item_id, quantity, action, created_at, updated_at) \
                     SELECT min(id), {d}, 'adjust', now(), now() FROM spree_stock_items \
                     WHERE variant_id = {ev} AND deleted_at IS NULL HAVING min(id) IS NOT NULL;\n"
                )
            }
            30..=39 => format!(
                "INSERT INTO spree_stock_items (stock_location_id, variant_id, count_on_hand, created_at, updated_at) \
                 SELECT {l}, {v}, {}, now(), now() WHERE EXISTS (SELECT 1 FROM spree_variants WHERE id = {v}) \
                 AND NOT EXISTS (SELECT 1 FROM spree_stock_items WHERE variant_id = {v} AND stock_location_id = {l} \
                 AND deleted_at IS NULL);\n",
                rng.random_range(0..20)
            ),
            // a stock item soft-deleted (paranoia)
            40..=44 => format!(
                "UPDATE spree_stock_items SET deleted_at = now() WHERE variant_id = {v} AND stock_location_id = {l} \
                 AND deleted_at IS NULL;\n"
            ),
            // SKU edits: renamed, emptied, or made a duplicate
            45..=56 => format!(
                "UPDATE spree_variants SET sku = {}, updated_at = now() WHERE id = {v};\n",
                match rng.random_range(0..10) {
                    0 => "''".to_string(),
                    1 | 2 => format!("'TEE-{}'", rng.random_range(11..=14)),
                    _ => format!("'TEE-{v}-r{g}'"),
                }
            ),
            // a variant soft-deleted with its stock items, or restored; tracking switched
            57..=62 => format!(
                "UPDATE spree_variants SET deleted_at = now() WHERE id = {v};\n\
                 UPDATE spree_stock_items SET deleted_at = now() WHERE variant_id = {v} AND deleted_at IS NULL;\n"
            ),
            63..=66 => format!("UPDATE spree_variants SET deleted_at = NULL WHERE id = {v};\n"),
            67..=69 => format!("UPDATE spree_variants SET track_inventory = NOT track_inventory WHERE id = {v};\n"),
            // hard deletes (no FKs in Solidus: the application removes the items), and new variants
            70..=73 => format!(
                "DELETE FROM spree_stock_items WHERE variant_id = {v};\nDELETE FROM spree_variants WHERE id = {v};\n"
            ),
            74..=79 => format!(
                "INSERT INTO spree_variants (id, sku, product_id, created_at, updated_at) \
                 VALUES ({v}, 'TEE-{v}-n{g}', 1, now(), now()) ON CONFLICT DO NOTHING;\n"
            ),
            // locations renamed or (de)activated
            80..=83 => format!("UPDATE spree_stock_locations SET name = 'Store {g}' WHERE id = {l};\n"),
            84..=86 => format!("UPDATE spree_stock_locations SET active = NOT active WHERE id = {l};\n"),
            // storefront events (Ahoy), some for no or an unknown variant
            _ => format!(
                "INSERT INTO ahoy_events (visit_id, user_id, name, properties, time) VALUES ({g}, {}, '{}', '{}', now());\n",
                g % 5,
                if rng.random_bool(0.7) { "Viewed product" } else { "Added to cart" },
                match rng.random_range(0..10) {
                    0 => r#"{"page": "home"}"#.to_string(),
                    1 => r#"{"variant_id": 9999}"#.to_string(),
                    _ => format!(r#"{{"variant_id": {ev}}}"#),
                }
            ),
        });
    }
    sql.push_str(if rng.random_bool(0.05) {
        "ROLLBACK;\n"
    } else {
        "COMMIT;\n"
    });
    sql
}

fn solidus_drain(n: i64) -> String {
    format!(
        "BEGIN;
         INSERT INTO spree_variants (id, sku, product_id, created_at, updated_at)
           VALUES ({id}, 'zz-drain-{n}', 1, now(), now());
         INSERT INTO spree_stock_items (stock_location_id, variant_id, count_on_hand, created_at, updated_at)
           VALUES (1, {id}, {n}, now(), now());
         UPDATE spree_stock_locations SET active = true WHERE id = 1;
         COMMIT;",
        id = 900_000 + n
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn solidus_stock_and_ahoy_events_follow_soft_deletes_two_hops_and_json_references() {
    run_shop(
        "solidus_stock_and_ahoy_events_follow_soft_deletes_two_hops_and_json_references",
        Shop {
            schema: SOLIDUS_SCHEMA,
            seed: SOLIDUS_SEED,
            published: "spree_stock_items, spree_variants",
            mapping: SOLIDUS_MAPPING,
            truth: SOLIDUS_TRUTH,
            counters: SOLIDUS_COUNTERS,
            scale: 0,
            txn: solidus_txn,
            drain: solidus_drain,
        },
    )
    .await;
}

/// A stock table that is also looked up: Solidus' stock items carry the stock (`where
/// deleted_at IS NULL`) and are the first hop of a movement's SKU (no `where`). The
/// stream keeps counting movements of a soft-deleted item; a rebuild must read that
/// item too (for the lookup, not for the stock), or its movements stop counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_keeps_counting_movements_of_soft_deleted_stock_items() {
    let mut rig = Rig::new(SOLIDUS_SCHEMA, lookup_oracle()).await;
    rig.exec(SOLIDUS_SEED).await;
    rig.exec("CREATE PUBLICATION skusync FOR TABLE spree_stock_items, spree_variants;")
        .await;
    let cfg = write_config(
        rig.dir.path(),
        &config_with(&rig, mapping_of(SOLIDUS_MAPPING)),
    );
    compare_shop_counters(&mut rig);
    let setup = skusync_output(&["setup"], &cfg);
    assert!(setup.status.success(), "{setup:?}");
    rig.daemon = Some(Daemon::start(rig.dir.path(), cfg.clone()));
    rig.wait_bootstrap(Duration::from_secs(40)).await;
    assert_join_converges(
        &mut rig,
        SOLIDUS_TRUTH,
        SOLIDUS_COUNTERS,
        Duration::from_secs(20),
    )
    .await;

    // item 2 (variant 3, with seeded movements) soft-deleted, then moved again
    rig.exec(
        "UPDATE spree_stock_items SET deleted_at = now() WHERE id = 2;
         INSERT INTO spree_stock_movements (stock_item_id, quantity, action, created_at, updated_at)
           VALUES (2, 5, 'adjust', now(), now());",
    )
    .await;
    drain_marker(&mut rig, 1, &solidus_drain(1)).await;
    assert_join_converges(
        &mut rig,
        SOLIDUS_TRUTH,
        SOLIDUS_COUNTERS,
        Duration::from_secs(20),
    )
    .await;
    let key = skusync::sinks::layout::sku_key("skusync", "TEE-3");
    let moved = hget(&mut rig.con, &key, "moved").await;
    assert!(moved.is_some(), "TEE-3 counts its movements");

    assert_eq!(rig.daemon().sigterm(), Some(0));
    let out = skusync_output(&["resync"], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rig.daemon().spawn();
    rig.wait_bootstrap(Duration::from_secs(40)).await;
    drain_marker(&mut rig, 2, &solidus_drain(2)).await;
    assert_eq!(
        hget(&mut rig.con, &key, "moved").await,
        moved,
        "a rebuild counts the movements of a soft-deleted stock item as the stream did"
    );
    assert_join_converges(
        &mut rig,
        SOLIDUS_TRUTH,
        SOLIDUS_COUNTERS,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_that_does_not_fit_the_database_exits_2_before_writing_anything() {
    let mut rig = Rig::new(SALEOR_SCHEMA, lookup_oracle()).await;
    rig.exec(SALEOR_SEED).await;
    rig.exec("CREATE PUBLICATION skusync FOR TABLE warehouse_stock, product_productvariant, warehouse_warehouse; \
              CREATE PUBLICATION skusync_activity WITH (publish = 'insert');")
        .await;
    let base = rig.oracle.config_toml(
        &rig.pg.url("postgres", "postgres"),
        "skusync",
        &["skusync", "skusync_activity"],
        &rig.redis.url(),
    );
    let mapping = mapping_of(SALEOR_MAPPING);
    for (full, bad, want) in [
        // a key a key-only delete does not carry
        (
            false,
            mapping.replace(r#"column = "slug" }"#, r#"key = "name", column = "slug" }"#),
            "not in the replica identity",
        ),
        // a column the referenced table does not have
        (
            false,
            mapping.replace(r#"column = "sku""#, r#"column = "code""#),
            "product_productvariant.code",
        ),
        // a referenced table that does not exist
        (
            false,
            mapping.replace("public.warehouse_warehouse", "public.warehouses"),
            "public.warehouses",
        ),
        // with REPLICA IDENTITY FULL a delete carries every column, but the key must
        // still be unique (variant names repeat)
        (
            true,
            mapping.replace(r#"column = "sku" }"#, r#"key = "name", column = "sku" }"#),
            "not unique",
        ),
    ] {
        if full {
            rig.exec("ALTER TABLE product_productvariant REPLICA IDENTITY FULL;")
                .await;
        }
        let cfg = write_config(rig.dir.path(), &format!("{base}{bad}"));
        let out = skusync_output(&["run"], &cfg);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{want}: {err}");
        assert!(err.contains(want), "{want}: {err}");
        // nothing written: no slot, no Redis data
        let slots: i64 = rig
            .client
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(slots, 0, "{want}");
        let keys = crate::fold_oracle::keys_matching(&mut rig.con, "*").await;
        assert!(keys.is_empty(), "{want}: {keys:?}");
    }
}

/// Saleor's schema and seed plus `extra` SQL, the stock table published, `mapping` set
/// up and skusync started with its first snapshot loaded; the config's path.
async fn start_saleor(mapping: &str, extra: &str) -> (Rig, std::path::PathBuf) {
    let mut rig = Rig::new(SALEOR_SCHEMA, lookup_oracle()).await;
    rig.exec(SALEOR_SEED).await;
    rig.exec(&format!(
        "{extra}\nCREATE PUBLICATION skusync FOR TABLE warehouse_stock;"
    ))
    .await;
    let cfg = write_config(rig.dir.path(), &config_with(&rig, mapping));
    let setup = skusync_output(&["setup"], &cfg);
    assert!(setup.status.success(), "{setup:?}");
    rig.daemon = Some(Daemon::start(rig.dir.path(), cfg.clone()));
    rig.wait_bootstrap(Duration::from_secs(40)).await;
    (rig, cfg)
}

/// A restarted skusync reads the row index and lookup state ahead, in bulk: the row
/// records it caches must carry the quantities Redis holds now (a quantity-only change
/// does not rewrite a record), or a later rename would move stale quantities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_the_row_index_ahead_with_the_quantities_redis_holds() {
    let (mut rig, cfg) = start_saleor(mapping_of(SALEOR_MAPPING), "").await;
    assert_join_converges(&mut rig, SALEOR_TRUTH, "", Duration::from_secs(20)).await;

    // quantity-only changes: the records in Redis keep their old quantities
    rig.exec("UPDATE warehouse_stock SET quantity = quantity + 7, quantity_allocated = quantity_allocated + 1;")
        .await;
    drain_marker(&mut rig, 1, &saleor_drain(1)).await;
    // stopped cleanly (the slot confirms everything): the new process replays nothing,
    // so it knows those quantities only from what it reads ahead
    assert_eq!(rig.daemon().sigterm(), Some(0));
    rig.daemon = Some(Daemon::start(rig.dir.path(), cfg.clone()));
    // every other variant renamed: its rows move with the quantities they have now
    rig.exec("UPDATE product_productvariant SET sku = sku || '-renamed' WHERE id % 2 = 0;")
        .await;
    drain_marker(&mut rig, 2, &saleor_drain(2)).await;
    assert_join_converges(&mut rig, SALEOR_TRUTH, "", Duration::from_secs(20)).await;
    let state = rig.oracle.redis_state(&mut rig.con).await;
    assert!(state.keys().any(|k| k.ends_with("-renamed")), "{state:?}");
}

/// With the SKU looked up and the location a plain column, a row moved to another
/// location (its SKU and quantities unchanged) must have its record rewritten: after a
/// restart the record is all skusync knows of the row, and a rename moves the row with
/// the location the record holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_by_a_location_column_moves_with_it_after_a_restart_and_a_rename() {
    const LOC_LOOKUP: &str = r#"location = { from = "public.warehouse_warehouse", on = "warehouse_id", column = "slug" }"#;
    const TRUTH: &str = "
SELECT v.sku::text, s.warehouse_id::text, sum(s.quantity)::text, sum(s.quantity_allocated)::text
FROM warehouse_stock s
JOIN product_productvariant v ON v.id = s.product_variant_id
WHERE v.sku IS NOT NULL
GROUP BY 1, 2";
    let mapping = mapping_of(SALEOR_MAPPING);
    assert!(
        mapping.contains(LOC_LOOKUP),
        "the Saleor example maps the warehouse's slug"
    );
    let mapping = mapping.replace(LOC_LOOKUP, r#"location = "warehouse_id""#);
    let (mut rig, cfg) = start_saleor(&mapping, "").await;
    assert_join_converges(&mut rig, TRUTH, "", Duration::from_secs(20)).await;

    // the first warehouse's rows move to the fourth (which holds none): only the location
    // column changes
    rig.exec(
        "UPDATE warehouse_stock SET warehouse_id = '00000000-0000-0000-0000-000000000004' \
         WHERE warehouse_id = '00000000-0000-0000-0000-000000000001';",
    )
    .await;
    drain_marker(&mut rig, 1, &saleor_drain(1)).await;
    assert_join_converges(&mut rig, TRUTH, "", Duration::from_secs(20)).await;
    // stopped cleanly: the new process knows the rows only from their records in Redis
    assert_eq!(rig.daemon().sigterm(), Some(0));
    rig.daemon = Some(Daemon::start(rig.dir.path(), cfg.clone()));
    rig.exec("UPDATE product_productvariant SET sku = sku || '-renamed';")
        .await;
    drain_marker(&mut rig, 2, &saleor_drain(2)).await;
    assert_join_converges(&mut rig, TRUTH, "", Duration::from_secs(20)).await;
    let state = rig.oracle.redis_state(&mut rig.con).await;
    assert!(state.keys().any(|k| k.ends_with("-renamed")), "{state:?}");
}

/// A catalog import of more variants than a batch holds (`max_batch_skus`, 10,000), with
/// no stock yet, in one transaction: its pieces change only lookup state, so they carry
/// no SKU entry and no ticket until the commit, and are launched at the batch caps like
/// entries (`daemon::apply::tests::row_index_updates_alone_are_work_and_are_capped`).
/// This checks only that such mid-transaction flights converge: the rows stocked and
/// renamed afterwards still count exactly. (It passes with the caps reverted too: memory
/// is not measured.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_only_import_larger_than_a_batch_converges() {
    let (mut rig, _) = start_saleor(mapping_of(SALEOR_MAPPING), "").await;
    assert_join_converges(&mut rig, SALEOR_TRUTH, "", Duration::from_secs(20)).await;
    rig.exec(
        "INSERT INTO product_productvariant (id, sku, name, product_id, track_inventory, is_preorder,
           created_at, updated_at)
           SELECT i, 'IMP-' || i, '', 1, true, false, now(), now() FROM generate_series(5001, 17000) i;",
    )
    .await;
    rig.exec(
        "INSERT INTO warehouse_stock (warehouse_id, product_variant_id, quantity, quantity_allocated)
           SELECT '00000000-0000-0000-0000-000000000001', i, 4, 1 FROM generate_series(16901, 17000) i;
         UPDATE product_productvariant SET sku = sku || '-x' WHERE id BETWEEN 16951 AND 17000;",
    )
    .await;
    drain_marker(&mut rig, 1, &saleor_drain(1)).await;
    assert_join_converges(&mut rig, SALEOR_TRUTH, "", Duration::from_secs(30)).await;
    let state = rig.oracle.redis_state(&mut rig.con).await;
    assert!(state.keys().any(|k| k.ends_with("-x")), "{state:?}");
}

/// A crash between the Redis calls of one batch that moves rows by a lookup (here after
/// its first call of 500 SKU entries): SKU hashes already written no longer hold what the
/// moves read, so a replay cannot repair it. The batch was marked in flight; the start
/// after the crash finds the mark and rebuilds Redis, which then equals the join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_inside_a_batch_that_moves_rows_by_a_lookup_rebuilds_and_converges() {
    // 700 more variants with a stock row each: a rename of all is over 1,400 SKU entries
    let (mut rig, _) = start_saleor(
        mapping_of(SALEOR_MAPPING),
        "INSERT INTO product_productvariant (id, sku, name, product_id, track_inventory, is_preorder,
           created_at, updated_at)
           SELECT i, 'BULK-' || i, '', 1, true, false, now(), now() FROM generate_series(1001, 1700) i;
         INSERT INTO warehouse_stock (warehouse_id, product_variant_id, quantity, quantity_allocated)
           SELECT '00000000-0000-0000-0000-000000000001', i, 3, 0 FROM generate_series(1001, 1700) i;",
    )
    .await;
    // quantities only: the row records in Redis keep the old ones
    rig.exec("UPDATE warehouse_stock SET quantity = quantity + 7;")
        .await;
    drain_marker(&mut rig, 1, &saleor_drain(1)).await;
    assert_join_converges(&mut rig, SALEOR_TRUTH, "", Duration::from_secs(20)).await;
    // stopped cleanly, then started to abort after the first call of a split batch
    assert_eq!(rig.daemon().sigterm(), Some(0));
    rig.daemon()
        .spawn_env(&[("SKUSYNC_FAILPOINT", "between-calls:1")]);
    // renamed to sort after every old name: the entries moving rows out come first
    rig.exec("UPDATE product_productvariant SET sku = 'z-' || sku;")
        .await;
    let start = Instant::now();
    while !matches!(rig.daemon().proc().child.try_wait(), Ok(Some(_))) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the failpoint was not reached\n{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rig.daemon().stderr_contains("failpoint reached"));
    rig.daemon().spawn();
    drain_marker(&mut rig, 2, &saleor_drain(2)).await;
    assert_join_converges(&mut rig, SALEOR_TRUTH, "", Duration::from_secs(30)).await;
    assert!(
        rig.daemon()
            .stderr_contains("interrupted between its Redis writes"),
        "{}",
        rig.daemon().stderr_all()
    );
    let state = rig.oracle.redis_state(&mut rig.con).await;
    assert!(state.keys().any(|k| k.starts_with("z-")), "{state:?}");
}

/// A standby that wins the slot skips the startup checks and runs them when it
/// connects: among them the mark of a batch that changed lookup state and was cut off
/// between its Redis calls (`index_pending`, set here as such a crash leaves it). The
/// slot is held by another replication client while skusync starts, as a walsender its
/// former holder left behind holds it until `wal_sender_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_wins_a_held_slot_rebuilds_after_an_interrupted_lookup_batch() {
    let (mut rig, _cfg) = start_saleor(mapping_of(SALEOR_MAPPING), "").await;
    assert_join_converges(&mut rig, SALEOR_TRUTH, "", Duration::from_secs(20)).await;
    assert_eq!(rig.daemon().sigterm(), Some(0));
    let mut holder =
        std::process::Command::new(crate::harness::pg::find_bin_dir().join("pg_recvlogical"))
            .args([
                "-d",
                &rig.pg.url("postgres", "postgres"),
                "--slot",
                "skusync",
                "--start",
                "-f",
                "/dev/null",
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=skusync",
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn pg_recvlogical");
    let t0 = Instant::now();
    loop {
        let active: bool = rig
            .client
            .query_one(
                "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = 'skusync'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if active {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "pg_recvlogical never took the slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let meta = skusync::sinks::layout::meta_key("skusync");
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("index_pending")
        .arg("1")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    rig.daemon().spawn();
    rig.daemon()
        .wait_stderr("waiting as standby", Duration::from_secs(20))
        .await;
    let _ = holder.kill();
    let _ = holder.wait();
    // the connect rebuilds after the interrupted batch
    rig.daemon()
        .wait_stderr(
            "was interrupted between its Redis writes",
            Duration::from_secs(30),
        )
        .await;
    drain_marker(&mut rig, 1, &saleor_drain(1)).await;
    assert_join_converges(&mut rig, SALEOR_TRUTH, "", Duration::from_secs(20)).await;
    assert_eq!(
        hget(&mut rig.con, &meta, "index_pending").await.as_deref(),
        Some("")
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// A referenced table whose replica identity is a unique index other than its primary
/// key (`REPLICA IDENTITY USING INDEX`): a lookup without `key` matches that index's
/// column, in the stream and in `verify`'s SQL alike (verify took the primary key and
/// failed comparing a bigint id with the text reference).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_without_a_key_matches_the_replica_identity_index_in_verify_too() {
    const SCHEMA: &str = "
CREATE TABLE catalog_item (id bigserial PRIMARY KEY, code text NOT NULL, sku text);
CREATE UNIQUE INDEX catalog_item_code ON catalog_item (code);
ALTER TABLE catalog_item REPLICA IDENTITY USING INDEX catalog_item_code;
CREATE TABLE stock_level (
  item_code text NOT NULL, site text NOT NULL, qty int NOT NULL, held int NOT NULL DEFAULT 0,
  PRIMARY KEY (item_code, site));
CREATE PUBLICATION skusync FOR TABLE catalog_item, stock_level;
CREATE PUBLICATION skusync_activity WITH (publish = 'insert');
INSERT INTO catalog_item (code, sku) SELECT 'C' || i, 'SKU-' || i FROM generate_series(1, 20) i;
INSERT INTO stock_level SELECT 'C' || (1 + i % 20), 'site-' || (i % 3), i, i % 4 FROM generate_series(1, 60) i;
";
    const MAPPING: &str = r#"
[[inventory]]
table    = "public.stock_level"
sku      = { from = "public.catalog_item", on = "item_code", column = "sku" }
location = "site"
on_hand  = "qty"
reserved = "held"
"#;
    const TRUTH: &str = "
SELECT c.sku::text, s.site::text, sum(s.qty)::text, sum(s.held)::text
FROM stock_level s JOIN catalog_item c ON c.code = s.item_code
WHERE c.sku IS NOT NULL GROUP BY 1, 2";
    let mut rig = Rig::new(SCHEMA, lookup_oracle()).await;
    let cfg = write_config(rig.dir.path(), &config_with(&rig, MAPPING));
    rig.daemon = Some(Daemon::start(rig.dir.path(), cfg.clone()));
    rig.wait_bootstrap(Duration::from_secs(40)).await;
    assert_join_converges(&mut rig, TRUTH, "", Duration::from_secs(20)).await;
    // renames, a new item, a deleted one (its delete carries only the code)
    rig.exec(
        "UPDATE catalog_item SET sku = sku || '-b' WHERE id % 3 = 0;
         INSERT INTO catalog_item (code, sku) VALUES ('C21', 'SKU-21');
         INSERT INTO stock_level VALUES ('C21', 'site-1', 5, 1);
         DELETE FROM catalog_item WHERE code = 'C2';
         UPDATE stock_level SET qty = qty + 1 WHERE site = 'site-0';",
    )
    .await;
    drain_marker(
        &mut rig,
        1,
        "INSERT INTO catalog_item (code, sku) VALUES ('D1', 'zz-drain-1');
         INSERT INTO stock_level VALUES ('D1', 'site-0', 1, 0);",
    )
    .await;
    assert_join_converges(&mut rig, TRUTH, "", Duration::from_secs(20)).await;
    let verify = skusync_output(&["verify", "--rounds", "3"], &cfg);
    assert!(
        verify.status.success(),
        "verify: {}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}
