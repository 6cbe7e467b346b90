//! Decimal quantities (`scale`): summed exactly, stored in Redis and published on MQTT
//! as decimal numbers, with alerts at decimal levels; values with more fractional digits
//! than the scale are skipped and counted.

use crate::fold_oracle::*;
use crate::harness::MosquittoServer;
use crate::mqtt_e2e::{Subscriber, mqtt_toml};
use crate::oracle::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skusync::sinks::layout;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decimal_quantities_are_summed_exactly_and_published_as_decimals() {
    let seed = test_seed("decimal_quantities_are_summed_exactly_and_published_as_decimals");
    let schema = PUBLIC_SCHEMA
        .replace("on_hand int NOT NULL", "on_hand numeric(14,3) NOT NULL")
        .replace(
            "reserved int NOT NULL DEFAULT 0",
            "reserved numeric(14,3) NOT NULL DEFAULT 0",
        );
    let mut oracle = public_oracle(Buckets::SumEqualsTotal);
    oracle.scale = 3;
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(&schema, oracle).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand, reserved)
           SELECT 'pre-' || (i % 20), 'WH-' || (i % 3), (i % 50) + 0.125 * (i % 8), 0.5 * (i % 3)
           FROM generate_series(0, 199) i ON CONFLICT DO NOTHING;
         INSERT INTO activity_log (sku, kind, qty)
           SELECT 'pre-' || (i % 20), 'purchase', 0.25 * (i % 5) FROM generate_series(0, 99) i;",
    )
    .await;
    let http = crate::harness::free_port();
    rig.start_skusync(&format!(
        "{}\n[alerts]\nlow_stock = 5\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
        mqtt_toml(&broker, 10)
    ))
    .await;
    // the snapshot's buckets have no commit minute: compare them after the stream only
    rig.oracle.buckets = Buckets::Ignore;
    rig.assert_converges(Duration::from_secs(20)).await;

    let mut w = public_workload(seed);
    let mut r = StdRng::seed_from_u64(seed ^ 0xdec);
    let skus = Workload::default_skus();
    run_workload(&mut rig, &mut w, 800, async |rig, i| {
        if i % 2 != 0 {
            return;
        }
        let sku = lit(&skus[r.random_range(0..skus.len())]);
        let sql = match r.random_range(0..4) {
            0 => format!(
                "UPDATE inventory SET on_hand = on_hand + {} WHERE sku = {sku}",
                ["0.125", "0.001", "-0.5", "2.75"][r.random_range(0..4)]
            ),
            1 => format!(
                "UPDATE inventory SET reserved = {} WHERE sku = {sku}",
                r.random_range(0..8) as f64 * 0.375
            ),
            // more decimals than the scale: skipped, never rounded
            2 => format!(
                "INSERT INTO activity_log (sku, kind, qty) VALUES ({sku}, 'purchase', 0.0005)"
            ),
            _ => format!(
                "INSERT INTO activity_log (sku, kind, qty) VALUES ({sku}, 'purchase', 1.125)"
            ),
        };
        rig.exec(&sql).await;
    })
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(10)).await;
    let skipped = crate::harness::scrape_metric(http, skusync::telemetry::SKIPPED_VALUES);
    assert!(
        skipped.unwrap_or(0.0) > 0.0,
        "too many decimals are skipped and counted"
    );

    // A decimal walk across the threshold: the state and the alert carry decimals.
    let sub = Subscriber::start(&broker, "skusync/alerts/#");
    rig.exec("INSERT INTO inventory VALUES ('DEC', 'W1', 7.25, 0)")
        .await;
    let key = layout::sku_key("skusync", "DEC");
    for on in ["7.25", "4.5"] {
        rig.exec(&format!(
            "UPDATE inventory SET on_hand = {on} WHERE sku = 'DEC'"
        ))
        .await;
        let start = Instant::now();
        while hget(&mut rig.con, &key, "on_hand").await.as_deref() != Some(on) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{on} not applied"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let start = Instant::now();
    let alert = loop {
        if let Some((_, p)) = sub
            .messages()
            .into_iter()
            .find(|(t, _)| t == "skusync/alerts/DEC")
        {
            break p;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no alert");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        alert.contains(r#""available":4.5,"#) && alert.contains(r#""type":"low_stock""#),
        "{alert}"
    );
    let start = Instant::now();
    loop {
        let msgs = broker.retained(
            &skusync::sinks::mqtt::sku_topic("skusync", "DEC"),
            Duration::from_secs(3),
        );
        if msgs.iter().any(|(_, p)| {
            let p = String::from_utf8_lossy(p);
            p.contains(r#""on_hand":4.5,"#) && p.contains(r#""available":4.5,"#)
        }) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "retained {msgs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // `skusync verify` agrees: Redis equals SQL and the retained states equal Redis.
    let cfg = rig.daemon().cfg.clone();
    let (code, out, err) = crate::verify::verify(&cfg, &["--mqtt", "--rounds", "3"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
}
