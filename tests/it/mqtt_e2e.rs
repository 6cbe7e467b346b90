//! MQTT end to end: PostgreSQL -> `skusync run` -> Redis -> Mosquitto. The retained
//! messages are a projection of Redis: after a drain they equal it, whatever was killed
//! or restarted on the way.

use crate::fold_oracle::*;
use crate::harness::{MosquittoServer, MqttOptions, free_port};
use crate::oracle::*;
use skusync::sinks::layout;
use skusync::sinks::mqtt::{decode_sku, sku_topic};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A live `mosquitto_sub` collecting `(topic, payload)` lines.
pub struct Subscriber {
    child: Child,
    lines: Arc<Mutex<Vec<(String, String)>>>,
}

impl Subscriber {
    pub fn start(broker: &MosquittoServer, filter: &str) -> Subscriber {
        let mut child = Command::new("mosquitto_sub")
            .args(broker.client_args())
            .args(["-t", filter, "-q", "1", "-F", "%t %p"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let (t, p) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                l2.lock().unwrap().push((t.to_string(), p.to_string()));
            }
        });
        // Give the subscription a moment to be in place.
        std::thread::sleep(Duration::from_millis(300));
        Subscriber { child, lines }
    }

    pub fn messages(&self) -> Vec<(String, String)> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn mqtt_toml(broker: &MosquittoServer, min_interval_ms: u64) -> String {
    format!(
        "\n[mqtt]\nurl = \"{}\"\ntopic_prefix = \"skusync\"\nmin_interval_ms = {min_interval_ms}\n",
        broker.url()
    )
}

fn as_i64(v: Option<&String>) -> i64 {
    v.and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Differences between the retained messages and the Redis hashes.
pub async fn retained_mismatches(rig: &mut Rig, broker: &MosquittoServer) -> Vec<String> {
    let state = rig.oracle.redis_state(&mut rig.con).await;
    retained_differences(&state, broker)
}

/// Differences between the retained messages and a Redis state (every SKU hash).
pub fn retained_differences(state: &RedisState, broker: &MosquittoServer) -> Vec<String> {
    let mut out = Vec::new();
    let mut retained: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    // An empty payload clears a retained message; anything else must decode, or it is a
    // difference (never silently skipped).
    for (t, p) in broker.retained("skusync/sku/+", Duration::from_secs(5)) {
        if p.is_empty() {
            continue;
        }
        let Some(sku) = t.strip_prefix("skusync/sku/").and_then(decode_sku) else {
            out.push(format!("{t:?}: topic does not name a SKU"));
            continue;
        };
        match serde_json::from_slice(&p) {
            Ok(j) => {
                retained.insert(sku, j);
            }
            Err(e) => out.push(format!(
                "{t:?}: retained payload is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&p)
            )),
        }
    }
    for (sku, h) in state {
        let gone = crate::oracle::redis_says_gone(h);
        match (retained.get(sku), gone) {
            (None, true) => {}
            (Some(_), true) => out.push(format!("{sku:?}: gone in Redis but still retained")),
            (None, false) => out.push(format!("{sku:?}: no retained message")),
            (Some(j), false) => {
                if j["sku"] != serde_json::json!(sku) {
                    out.push(format!("{sku:?}: payload sku {}", j["sku"]));
                }
                for f in [
                    "on_hand",
                    "reserved",
                    "available",
                    "views",
                    "carts",
                    "purchases",
                ] {
                    let want = as_i64(h.get(f));
                    let got = j.get(f).and_then(|v| v.as_i64()).unwrap_or(0);
                    if want != got {
                        out.push(format!("{sku:?}.{f}: Redis {want}, retained {got}"));
                    }
                }
                let lsn: u64 = h.get("lsn").and_then(|s| s.parse().ok()).unwrap_or(0);
                if j["lsn"] != serde_json::json!(skusync::lsn::Lsn(lsn).to_string()) {
                    out.push(format!("{sku:?}.lsn: Redis {lsn}, retained {}", j["lsn"]));
                }
            }
        }
    }
    for sku in retained.keys() {
        if !state.contains_key(sku) {
            out.push(format!("{sku:?}: retained but not in Redis"));
        }
    }
    out
}

async fn assert_retained_equals_redis(rig: &mut Rig, broker: &MosquittoServer, timeout: Duration) {
    let start = Instant::now();
    loop {
        let m = retained_mismatches(rig, broker).await;
        if m.is_empty() {
            return;
        }
        if start.elapsed() > timeout {
            panic!(
                "retained messages differ from Redis after {timeout:?}:\n{}\n{}",
                m.iter().take(40).cloned().collect::<Vec<_>>().join("\n"),
                rig.daemon().stderr_all()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_equals_redis_after_workload_with_broker_restarts_and_sigkill() {
    let seed =
        test_seed("retained_state_equals_redis_after_workload_with_broker_restarts_and_sigkill");
    let mut broker = MosquittoServer::start_with(MqttOptions {
        persistence: true,
        ..Default::default()
    });
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync(&mqtt_toml(&broker, 50)).await;
    let mut w = public_workload(seed);
    let mut step = 0;
    run_workload(&mut rig, &mut w, 1200, async |rig: &mut Rig, i: usize| {
        if i == 40 || i == 80 || i == 120 || i == 160 {
            step += 1;
            match step {
                1 => broker.restart(),
                2 => {
                    // A crash that loses the persistence file: the broker comes back
                    // with no retained messages at all (skusync's epoch check notices).
                    broker.kill9();
                    let db = broker.dir().join("mosquitto.db");
                    let _ = std::fs::remove_file(&db);
                    assert!(!db.exists());
                    broker.start_again();
                }
                3 => rig.daemon().kill9_and_restart(),
                _ => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    rig.daemon().kill9_and_restart();
                }
            }
        }
    })
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(45))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(30)).await;
    assert!(
        rig.daemon().stderr_contains("epoch differs"),
        "the broker that lost its retained messages was noticed and fully republished"
    );
    // A late subscriber gets exactly the current state (retained() subscribes afresh).
    let some_sku = rig
        .oracle
        .redis_state(&mut rig.con)
        .await
        .into_iter()
        .find(|(_, h)| !crate::oracle::redis_says_gone(h))
        .map(|(s, _)| s)
        .unwrap();
    let late = broker.retained(&sku_topic("skusync", &some_sku), Duration::from_secs(5));
    assert_eq!(late.len(), 1, "exactly one retained state for {some_sku:?}");
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_once_per_crossing_in_order_across_a_sigkill() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('WALK', 'W1', 20, 0)")
        .await;
    rig.start_skusync(&format!(
        "{}\n[alerts]\nlow_stock = 5\n",
        mqtt_toml(&broker, 10)
    ))
    .await;
    let sub = Subscriber::start(&broker, "skusync/alerts/#");
    let key = layout::sku_key("skusync", "WALK");
    // Walk down, bounce on the threshold, sell out, restock, and walk down again.
    let walk = [10, 5, 6, 5, 4, 0, 0, 3, 20, 2];
    for (i, on) in walk.into_iter().enumerate() {
        rig.exec(&format!(
            "UPDATE inventory SET on_hand = {on} WHERE sku = 'WALK'"
        ))
        .await;
        // Let this transaction reach Redis so each step is its own crossing.
        let start = Instant::now();
        while as_i64(hget(&mut rig.con, &key, "on_hand").await.as_ref()) != on {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "step {i} not applied"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if i == 5 {
            // SIGKILL right after selling out, maybe before the alert was acknowledged.
            rig.daemon().kill9_and_restart();
            rig.wait_bootstrap(Duration::from_secs(20)).await;
        }
    }
    let want = ["low_stock", "out_of_stock", "back_in_stock", "low_stock"];
    let start = Instant::now();
    loop {
        let msgs = sub.messages();
        let mut ids: Vec<String> = Vec::new();
        let mut types: Vec<String> = Vec::new();
        for (t, p) in &msgs {
            assert_eq!(t, "skusync/alerts/WALK");
            let j: serde_json::Value = serde_json::from_str(p).expect("alert JSON");
            let id = j["id"].as_str().unwrap().to_string();
            if !ids.contains(&id) {
                ids.push(id);
                types.push(j["type"].as_str().unwrap().to_string());
            }
        }
        if types == want {
            // Duplicates only ever repeat an id; never a second crossing.
            assert!(msgs.len() >= want.len());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20) && types.len() <= want.len(),
            "alert types {types:?}, want {want:?}\n{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Acknowledged alerts leave the Redis outbox (recorded in the publisher's next batch
    // of marks, so allow a moment).
    let start = Instant::now();
    loop {
        let left = hget(&mut rig.con, &key, "alerts").await;
        if left.as_deref().is_none_or(|a| a == "[]" || a == "{}") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "acknowledged alerts leave the outbox: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_updates_to_one_sku_in_a_second_are_throttled_and_end_exact() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('FLASH', 'W1', 5000, 0), ('OTHER', 'W1', 1, 0)")
        .await;
    rig.start_skusync(&mqtt_toml(&broker, 100)).await;
    let topic = sku_topic("skusync", "FLASH");
    let sub = Subscriber::start(&broker, &topic);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = sub.messages().len();
    // One simple-query string runs as one implicit transaction: make each its own.
    let sql: String = (0..1000)
        .map(|_| "BEGIN; UPDATE inventory SET on_hand = on_hand - 1 WHERE sku = 'FLASH'; COMMIT;\n")
        .collect();
    let chunk: String = sql.lines().take(50).map(|l| format!("{l}\n")).collect();
    let start = Instant::now();
    // 1000 transactions spread over about a second, as a flash sale would.
    for _ in 0..20 {
        rig.exec(&chunk).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed();
    rig.drain(&WorkloadTables::public(), "W1", Duration::from_secs(30))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let msgs = sub.messages();
        let last: serde_json::Value = msgs
            .last()
            .map(|(_, p)| serde_json::from_str(p).unwrap())
            .unwrap_or_default();
        if last["on_hand"] == 4000 {
            let commits = rig.oracle.redis_state(&mut rig.con).await;
            assert!(commits.contains_key("FLASH"));
            let n = msgs.len() - before;
            let window = elapsed + Duration::from_millis(300);
            let bound = window.as_millis() as usize / 100 + 3;
            eprintln!("1000 updates in {elapsed:?} -> {n} messages (bound {bound})");
            assert!(n <= bound, "{n} messages for 1000 updates in {elapsed:?}");
            assert!(
                n >= 3,
                "updates spread over {elapsed:?} publish more than once ({n})"
            );
            assert_eq!(last["available"], 4000);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "final state not published: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_of_a_sku_whose_state_exceeds_the_packet_limit_are_still_published() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    // 40 locations make a state of about 3 KB, well above a 1 KiB packet limit.
    let rows: Vec<String> = (0..40)
        .map(|i| format!("('WIDE', 'LOCATION-{i:02}', 10, 0)"))
        .collect();
    rig.exec(&format!(
        "INSERT INTO inventory VALUES {}, ('SMALL', 'W1', 10, 0)",
        rows.join(", ")
    ))
    .await;
    rig.start_skusync(&format!(
        "{}max_packet_bytes = 1024\n[alerts]\nlow_stock = 5\n",
        mqtt_toml(&broker, 10)
    ))
    .await;
    let alerts = Subscriber::start(&broker, "skusync/alerts/#");
    let key = layout::sku_key("skusync", "WIDE");
    // Below the threshold, then sold out: two crossings, two changes of a state too big.
    for (on, want) in [(3, "low_stock"), (0, "out_of_stock")] {
        rig.exec(&format!(
            "UPDATE inventory SET on_hand = CASE WHEN location = 'LOCATION-00' THEN {on} ELSE 0 END \
             WHERE sku = 'WIDE'"
        ))
        .await;
        let start = Instant::now();
        loop {
            let got = alerts.messages().into_iter().any(|(t, p)| {
                let j: serde_json::Value = serde_json::from_str(&p).expect("alert JSON");
                t == "skusync/alerts/WIDE" && j["type"] == want && j["available"] == on
            });
            if got {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no {want} alert for WIDE; got {:?}\n{}",
                alerts.messages(),
                rig.daemon().stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Acknowledged alerts leave the outbox even though the state never went out.
    let start = Instant::now();
    while hget(&mut rig.con, &key, "alerts")
        .await
        .is_some_and(|a| a != "[]")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "acknowledged alerts leave the outbox"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hget(&mut rig.con, &key, "pub_lsn").await, None);
    assert!(
        broker
            .retained(&sku_topic("skusync", "WIDE"), Duration::from_secs(2))
            .is_empty(),
        "the state too large for a packet is not published"
    );
    assert_eq!(
        broker
            .retained(&sku_topic("skusync", "SMALL"), Duration::from_secs(2))
            .len(),
        1,
        "other SKUs are published"
    );
    let d = rig.daemon();
    assert_eq!(
        d.stderr_count("exceeds the maximum packet size"),
        1,
        "logged once, not on every change\n{}",
        d.stderr_all()
    );
}

/// Start `skusync run` with `[redis] max_changes_per_piece` set and `[mqtt]` appended.
async fn start_with_pieces(rig: &mut Rig, broker: &MosquittoServer, per_piece: u64) {
    let text = rig.config_text().replacen(
        "[redis]\n",
        &format!("[redis]\nmax_changes_per_piece = {per_piece}\n"),
        1,
    ) + &mqtt_toml(broker, 0);
    rig.start_with_config(&text).await;
}

/// Item 1 of the reliability issue: every piece of a transaction applied in several
/// writes the same `lsn`, so a mark that recorded only the LSN took the state after the
/// first piece for the final one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_after_the_last_piece_of_a_split_transaction_is_the_one_retained() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('HOT', 'W1', 10, 0)")
        .await;
    start_with_pieces(&mut rig, &broker, 1000).await;
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(20)).await;
    // One transaction of 30k changes, cut into ~30 pieces; HOT changes in the first and
    // in the last, so the publisher sees (and the broker acknowledges) its state after
    // piece 0 long before the last piece is applied.
    rig.exec(
        "BEGIN;
         UPDATE inventory SET on_hand = 1 WHERE sku = 'HOT';
         INSERT INTO inventory SELECT 'B' || (i % 300), 'L' || (i / 300), 1, 0
           FROM generate_series(0, 29999) i;
         UPDATE inventory SET on_hand = 99, reserved = 7 WHERE sku = 'HOT';
         COMMIT;",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "W1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    let key = layout::sku_key("skusync", "HOT");
    let piece: i64 = hget(&mut rig.con, &key, "piece")
        .await
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert!(
        piece > 0,
        "HOT's last change landed in a later piece ({piece})"
    );
    assert_eq!(
        hget(&mut rig.con, &key, "on_hand").await.as_deref(),
        Some("99")
    );
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(20)).await;
    let hot = broker.retained(&sku_topic("skusync", "HOT"), Duration::from_secs(3));
    let j: serde_json::Value = serde_json::from_slice(&hot[0].1).unwrap();
    assert_eq!(
        (j["on_hand"].clone(), j["reserved"].clone()),
        (99.into(), 7.into())
    );
    assert_eq!(
        &j["rev"].as_str().unwrap()[16..24],
        format!("{piece:08x}"),
        "a later piece's state says which piece it is (in its rev)"
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// Item 8 of the reliability issue: a pipeline restart used to wait the source's whole
/// drain timeout (10 s) for the tickets of the batch it had just discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_restart_does_not_wait_for_the_tickets_it_discarded() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('A', 'W1', 5, 0)")
        .await;
    rig.start_skusync(&mqtt_toml(&broker, 0)).await;
    rig.drain(&WorkloadTables::public(), "W1", Duration::from_secs(30))
        .await;
    // Redis loses its data; the next transaction's apply call is refused (no meta hash)
    // with its ticket pending, and the daemon restarts to rebuild Redis.
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    let start = Instant::now();
    rig.exec("UPDATE inventory SET on_hand = 6 WHERE sku = 'A'")
        .await;
    rig.wait_bootstrap(Duration::from_secs(40)).await;
    let took = start.elapsed();
    assert!(
        rig.daemon().stderr_contains("lost its data"),
        "the restart was for the lost Redis data\n{}",
        rig.daemon().stderr_all()
    );
    assert!(
        took < Duration::from_secs(6),
        "restart and rebuild took {took:?} (the stall was 10 s)\n{}",
        rig.daemon().stderr_all()
    );
    rig.assert_converges(Duration::from_secs(20)).await;
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(20)).await;
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// Item 7 of the reliability issue: a SKU the rebuild's snapshot no longer holds is
/// cleared on the broker (empty retained message), not republished as zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sku_absent_from_a_rebuilds_snapshot_is_cleared_not_published_as_zeros() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('GHOST', 'W1', 5, 0), ('KEEP', 'W1', 3, 0)")
        .await;
    rig.start_skusync(&mqtt_toml(&broker, 0)).await;
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(20)).await;
    assert_eq!(
        broker
            .retained(&sku_topic("skusync", "GHOST"), Duration::from_secs(2))
            .len(),
        1
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
    // Deleted while nothing streams; the rebuild moves the slot past the delete, so only
    // the snapshot can tell that GHOST is gone.
    rig.exec("DELETE FROM inventory WHERE sku = 'GHOST'; UPDATE inventory SET on_hand = 4 WHERE sku = 'KEEP'")
        .await;
    resync(&mut rig);
    rig.daemon().spawn();
    rig.drain(&WorkloadTables::public(), "W1", Duration::from_secs(30))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ghost = broker.retained(&sku_topic("skusync", "GHOST"), Duration::from_secs(2));
        let keep = broker.retained(&sku_topic("skusync", "KEEP"), Duration::from_secs(2));
        let keep_ok = keep.first().is_some_and(|(_, p)| {
            serde_json::from_slice::<serde_json::Value>(p).unwrap()["on_hand"] == 4
        });
        if ghost.is_empty() && keep_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "GHOST retained {:?}, KEEP retained {:?}\n{}",
            ghost
                .first()
                .map(|(_, p)| String::from_utf8_lossy(p).into_owned()),
            keep.first()
                .map(|(_, p)| String::from_utf8_lossy(p).into_owned()),
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// A failover to a standby whose LSNs are behind the old primary's: the outbox marks
/// (`pub_lsn`) Redis kept from the old history are ahead of every LSN the rebuilt hashes
/// carry, and the mark script never moves a mark back. Simulated by a mark set far ahead
/// before a rebuild (PostgreSQL 15 drops logical slots on failover, so the slot is rebuilt
/// anyway). The rebuild drops such marks: the SKU is republished once and marked, not
/// left unmarked behind a mark no LSN of this server reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_ahead_of_a_rebuilt_servers_lsns_are_dropped_and_the_skus_marked_again() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('AHEAD', 'W1', 5, 0), ('KEEP', 'W1', 3, 0)")
        .await;
    rig.start_skusync(&mqtt_toml(&broker, 0)).await;
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(20)).await;
    assert_eq!(rig.daemon().sigterm(), Some(0));
    let key = layout::sku_key("skusync", "AHEAD");
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("pub_lsn")
        .arg("18446744073709551000")
        .arg("pub_piece")
        .arg("0")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    rig.exec("UPDATE inventory SET on_hand = 9 WHERE sku = 'AHEAD'")
        .await;
    resync(&mut rig);
    rig.daemon().spawn();
    rig.drain(&WorkloadTables::public(), "W1", Duration::from_secs(30))
        .await;
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lsn = hget(&mut rig.con, &key, "lsn").await;
        let pub_lsn = hget(&mut rig.con, &key, "pub_lsn").await;
        if lsn.is_some() && lsn == pub_lsn {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "AHEAD: lsn {lsn:?}, pub_lsn {pub_lsn:?}: the state was never marked\n{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let retained = broker.retained(&sku_topic("skusync", "AHEAD"), Duration::from_secs(2));
    let on_hand = retained
        .first()
        .map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).unwrap()["on_hand"].clone());
    assert_eq!(on_hand, Some(serde_json::json!(9)));
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// `skusync resync` with the rig's config (skusync stopped).
fn resync(rig: &mut Rig) {
    let cfg = rig.daemon().cfg.clone();
    let out = std::process::Command::new(crate::support::skusync_bin())
        .args(["resync", "--config", cfg.to_str().unwrap()])
        .output()
        .expect("run skusync resync");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mqtt_epoch_seq` from the meta hash (0 when absent).
async fn stored_epoch_seq(rig: &mut Rig) -> u64 {
    hget(&mut rig.con, &layout::meta_key("skusync"), "mqtt_epoch_seq")
        .await
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restored_from_an_older_persistence_file_gets_the_newer_states_republished() {
    let seed = test_seed(
        "a_broker_restored_from_an_older_persistence_file_gets_the_newer_states_republished",
    );
    let mut broker = MosquittoServer::start_with(MqttOptions {
        persistence: true,
        ..Default::default()
    });
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    let http = crate::harness::free_port();
    rig.start_skusync(&format!(
        "{}\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
        mqtt_toml(&broker, 50)
    ))
    .await;
    let sub = Subscriber::start(&broker, "skusync/sku/#");
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 300, async |_: &mut Rig, _: usize| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(45))
        .await;
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(30)).await;
    assert!(
        !sub.messages().is_empty(),
        "a live subscriber saw the states"
    );

    // A graceful stop saves the retained store: keep that file, as an autosave would.
    broker.stop();
    let db = broker.dir().join("mosquitto.db");
    let old_db = broker.dir().join("mosquitto.db.old");
    std::fs::copy(&db, &old_db).expect("broker saved its persistence file on SIGTERM");
    broker.start_again();
    let seq_at_save = stored_epoch_seq(&mut rig).await;

    // Minutes of acknowledged states the old file does not have.
    run_workload(&mut rig, &mut w, 400, async |_: &mut Rig, _: usize| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(45))
        .await;
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(30)).await;
    // Let the epoch sequence move past the saved one (a real autosave is older still);
    // not asserted here: the retained state below is what must hold.
    let start = Instant::now();
    while stored_epoch_seq(&mut rig).await <= seq_at_save
        && start.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A crash, and the broker comes back from the older file: same epoch token.
    broker.kill9();
    std::fs::copy(&old_db, &db).expect("restore the older persistence file");
    broker.start_again();

    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(30)).await;
    rig.assert_converges(Duration::from_secs(30)).await;
    // Under a loaded machine a retained read can come back partial: retry for long enough.
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(30)).await;
    assert!(
        crate::harness::scrape_metric(http, skusync::telemetry::MQTT_EPOCH_ROLLBACKS)
            .unwrap_or(0.0)
            >= 1.0,
        "the rollback is counted"
    );
    assert!(
        rig.daemon().stderr_contains("broker holds an older epoch"),
        "the rollback was noticed and logged\n{}",
        rig.daemon().stderr_all()
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// Whether the broker holds a retained state for `sku`.
fn retained_state(broker: &MosquittoServer, sku: &str) -> bool {
    !broker
        .retained(&sku_topic("skusync", sku), Duration::from_secs(2))
        .is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_states_of_skus_redis_does_not_hold_are_cleared_after_a_connect_and_a_rebuild() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('KEEP', 'W1', 3, 0)")
        .await;
    // A state retained by an earlier deployment whose clear never reached the broker.
    let ghost = br#"{"v":1,"sku":"OLD/1","on_hand":9,"reserved":0,"available":9}"#;
    broker.publish(&sku_topic("skusync", "OLD/1"), ghost, true);
    assert!(retained_state(&broker, "OLD/1"));
    rig.start_skusync(&mqtt_toml(&broker, 0)).await;
    let wait_cleared = async |rig: &mut Rig, sku: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while retained_state(&broker, sku) {
            assert!(
                Instant::now() < deadline,
                "{sku} still retained\n{}",
                rig.daemon().stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    wait_cleared(&mut rig, "OLD/1").await;
    assert!(retained_state(&broker, "KEEP"), "a SKU Redis holds stays");

    // Redis loses its data after a SKU's clear was recorded but before it was published:
    // the rebuild's snapshot no longer knows the SKU; the sweep after it clears it.
    broker.publish(&sku_topic("skusync", "LOST"), ghost, true);
    rig.redis.cli(&["FLUSHALL"]);
    rig.drain(&WorkloadTables::public(), "W1", Duration::from_secs(40))
        .await;
    wait_cleared(&mut rig, "LOST").await;
    assert!(retained_state(&broker, "KEEP"));
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(20)).await;
    // The clears were acknowledged as clears: an untracked one would have shifted every
    // later acknowledgement onto the wrong message (a state marked as acknowledged before
    // the broker had it).
    let log = rig.daemon().stderr_all();
    assert!(!log.contains("untracked outgoing publish"), "{log}");
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// Publish retained messages over one MQTT connection (QoS 1), all acknowledged on return
/// (mosquitto_pub per message is too slow for thousands).
async fn publish_retained_many(broker: &MosquittoServer, msgs: Vec<(String, Vec<u8>)>) {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new(
        format!("ghosts-{}", free_port()),
        "127.0.0.1",
        broker.port(),
    );
    o.set_clean_start(true);
    let (client, mut el) = AsyncClient::new(o, 256);
    let n = msgs.len();
    let sender = tokio::spawn(async move {
        for (t, p) in msgs {
            client
                .publish(t, QoS::AtLeastOnce, true, p)
                .await
                .expect("queue publish");
        }
        client
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < n {
        assert!(Instant::now() < deadline, "{acked} of {n} acknowledged");
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publishing ghosts: {e:?}"),
            Err(_) => panic!("no progress publishing ghosts ({acked} of {n})"),
        }
    }
    let client = sender.await.expect("sender");
    let _ = client.disconnect().await;
}

/// A broker holding more retained states than the sweep checks at once (500): it checks
/// them a chunk at a time as they arrive (memory follows the chunk), and every state of a
/// SKU Redis does not hold is cleared, none Redis holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_over_more_retained_states_than_a_chunk_clears_every_ghost() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec(
        "INSERT INTO inventory SELECT 'KEEP-' || i, 'W1', i, 0 FROM generate_series(1, 100) i",
    )
    .await;
    let ghost = br#"{"v":1,"sku":"x","on_hand":9,"reserved":0,"available":9}"#.to_vec();
    // (the harness reads at most about 1,020 retained states: Mosquitto's queue for its
    // QoS 1 subscriber)
    let ghosts: Vec<(String, Vec<u8>)> = (0..900)
        .map(|i| (sku_topic("skusync", &format!("GHOST/{i}")), ghost.clone()))
        .collect();
    publish_retained_many(&broker, ghosts).await;
    assert_eq!(
        broker
            .retained("skusync/sku/+", Duration::from_secs(20))
            .len(),
        900
    );
    rig.start_skusync(&mqtt_toml(&broker, 0)).await;
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(60)).await;
    let left = broker.retained("skusync/sku/+", Duration::from_secs(20));
    assert_eq!(left.len(), 100, "only the KEEP states are retained");
    assert!(left.iter().all(|(t, _)| t.contains("KEEP-")));
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// `[mqtt] url` as a list: skusync publishes to the first broker that answers, moves on
/// when it dies, and the broker it moves to (which holds none of skusync's states) gets
/// every SKU's state through the epoch check; and back again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_list_fails_over_and_the_next_broker_gets_every_state() {
    let seed = test_seed("a_broker_list_fails_over_and_the_next_broker_gets_every_state");
    let mut a = MosquittoServer::start();
    let mut b = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync(&format!(
        "\n[mqtt]\nurl = [\"{}\", \"{}\"]\ntopic_prefix = \"skusync\"\nmin_interval_ms = 20\n",
        a.url(),
        b.url()
    ))
    .await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 150, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    assert_retained_equals_redis(&mut rig, &a, Duration::from_secs(30)).await;
    assert!(
        b.retained("skusync/sku/+", Duration::from_secs(2))
            .is_empty(),
        "the second broker is not used while the first answers"
    );

    // The first broker dies: the second takes over and gets everything.
    a.kill9();
    run_workload(&mut rig, &mut w, 150, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    assert_retained_equals_redis(&mut rig, &b, Duration::from_secs(30)).await;
    assert!(rig.daemon().stderr_contains("mqtt: trying the next broker"));
    assert!(
        rig.daemon().stderr_contains("broker=mqtt.url[0]"),
        "the failing broker is named"
    );

    // And back: the first comes back empty, the second dies.
    a.start_again();
    b.kill9();
    run_workload(&mut rig, &mut w, 150, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    assert_retained_equals_redis(&mut rig, &a, Duration::from_secs(30)).await;
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// The fan-out topology of the README: skusync publishes to a core broker (with
/// persistence), two edge brokers bridge `<prefix>/#` from it (stock Mosquitto bridges with
/// persistent sessions), subscribers connect to the edges. Both edges hold every SKU's
/// retained state and carry live changes; after an edge restarts empty, and after the core
/// restarts while a SKU is deleted (its clear is queued for the bridges' sessions), both
/// converge to Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_bridged_from_a_core_broker_converge_to_redis() {
    let seed = test_seed("edges_bridged_from_a_core_broker_converge_to_redis");
    let mut core = MosquittoServer::start_with(MqttOptions {
        persistence: true,
        ..Default::default()
    });
    let edge = |n: usize, core_port: u16| {
        MosquittoServer::start_with(MqttOptions {
            extra_conf: vec![
                format!("connection core-to-edge-{n}"),
                format!("address 127.0.0.1:{core_port}"),
                "topic skusync/# in 1".into(),
                // a session the core keeps (and queues for) while the bridge is away
                "cleansession false".into(),
                format!("remote_clientid edge-{n}"),
                "restart_timeout 1".into(),
            ],
            ..Default::default()
        })
    };
    let mut e1 = edge(1, core.port());
    let e2 = edge(2, core.port());
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('FAN/OUT', 'WH-1', 50, 0), ('GOES', 'WH-1', 5, 0)")
        .await;
    rig.start_skusync(&mqtt_toml(&core, 20)).await;
    let live = Subscriber::start(&e2, "skusync/sku/+");
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 150, async |_, _| {}).await;
    rig.exec("UPDATE inventory SET on_hand = 77 WHERE sku = 'FAN/OUT'")
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    for (what, b) in [("core", &core), ("edge 1", &e1), ("edge 2", &e2)] {
        eprintln!("checking {what}");
        assert_retained_equals_redis(&mut rig, b, Duration::from_secs(30)).await;
    }
    let t0 = Instant::now();
    while !live
        .messages()
        .iter()
        .any(|(t, p)| t == "skusync/sku/FAN%2FOUT" && p.contains("\"on_hand\":77"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a live change reached the edge's subscriber"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An edge restarts empty: its bridge brings every retained state back.
    e1.restart();
    run_workload(&mut rig, &mut w, 100, async |_, _| {}).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    assert_retained_equals_redis(&mut rig, &e1, Duration::from_secs(30)).await;

    // The core restarts, and a SKU is deleted meanwhile: skusync publishes its clear once
    // the core is back, and the core queues it for each bridge's session.
    core.stop();
    rig.exec("DELETE FROM inventory WHERE sku = 'GOES'").await;
    run_workload(&mut rig, &mut w, 100, async |_, _| {}).await;
    core.start_again();
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;
    for (what, b) in [("core", &core), ("edge 1", &e1), ("edge 2", &e2)] {
        eprintln!("checking {what} after the core restarted");
        assert_retained_equals_redis(&mut rig, b, Duration::from_secs(30)).await;
    }
    assert!(
        e2.retained("skusync/sku/GOES", Duration::from_secs(2))
            .iter()
            .all(|(_, p)| p.is_empty()),
        "the deleted SKU is cleared on the edges too"
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// A counter whose table maps a user column publishes its distinct users per window
/// (`views_users_5m`) in the state message, counted from Redis' per-minute HyperLogLogs
/// of HMAC'd ids and read in the same round trip as the SKU's hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_users_per_window_are_published_in_the_state() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("ALTER TABLE activity_log ADD COLUMN user_id text")
        .await;
    let text = rig.config_text().replace(
        "windows = [",
        "user = \"user_id\"\nuser_key = \"0123456789abcdef0123456789abcdef\"\nwindows = [",
    ) + &mqtt_toml(&broker, 0);
    rig.start_with_config(&text).await;
    rig.exec(
        "INSERT INTO inventory VALUES ('U/1', 'W1', 5, 0), ('U/2', 'W1', 1, 0); \
         INSERT INTO activity_log (sku, kind, qty, user_id) VALUES \
         ('U/1', 'view', 1, 'alice'), ('U/1', 'view', 1, 'bob'), ('U/1', 'view', 1, 'alice'), \
         ('U/2', 'view', 1, 'carol'), ('U/2', 'view', 1, NULL)",
    )
    .await;
    let want = [("U/1", 3, 2), ("U/2", 2, 1)];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got: Vec<(i64, i64, i64)> = want
            .iter()
            .map(|(sku, _, _)| {
                let r = broker.retained(&sku_topic("skusync", sku), Duration::from_secs(2));
                let j: serde_json::Value = r
                    .first()
                    .and_then(|(_, p)| serde_json::from_slice(p).ok())
                    .unwrap_or_default();
                let n = |k: &str| j[k].as_i64().unwrap_or(-1);
                (n("views_5m"), n("views_users_5m"), n("views_users_1h"))
            })
            .collect();
        let expected: Vec<(i64, i64, i64)> = want.iter().map(|(_, v, u)| (*v, *u, *u)).collect();
        if got == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "(views_5m, views_users_5m, views_users_1h) of U/1, U/2: {got:?}, want {expected:?}\n{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// `skusync_apply_backed_up_bool`, `skusync_apply_backed_up_total` and
/// `skusync_mqtt_published_total` from one scrape (`None` while nothing answers).
fn backed_up_sample(port: u16) -> Option<(bool, f64, f64)> {
    use skusync::telemetry::{APPLY_BACKED_UP, APPLY_BACKED_UP_SPELLS, MQTT_PUBLISHED};
    let body = crate::harness::scrape_body(port)?;
    let v = |name: &str| crate::harness::metric_in(&body, name);
    Some((
        v(APPLY_BACKED_UP)? == 1.0,
        v(APPLY_BACKED_UP_SPELLS)?,
        v(MQTT_PUBLISHED).unwrap_or(0.0),
    ))
}

/// A transaction larger than the apply takes at once backs the apply up: while it is,
/// the publisher starts a round of reads (at most `READ_GROUP` SKUs) at most every
/// `mqtt.backed_up_round_ms`, so the cores go to the apply, and it still publishes (it never stops).
/// Once the apply is through, the rest is published: the retained messages end equal
/// to Redis, and nothing stays backed up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backed_up_apply_spaces_the_publisher_out_and_the_retained_states_converge() {
    use skusync::sinks::mqtt::READ_GROUP;
    // Mosquitto queues at most 1000 messages per client by default: the harness' retained
    // listing of 40k SKUs needs more.
    let broker = MosquittoServer::start_with(MqttOptions {
        extra_conf: vec!["max_queued_messages 0".into()],
        ..Default::default()
    });
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    // A round a second while backed up: far below what the publisher does unchecked,
    // even in a debug build.
    let round = Duration::from_secs(1);
    let http = crate::harness::free_port();
    // batches of 100 SKUs: the transaction below is 400 full batches
    let text = rig.config_text().replacen(
        "prefix = \"skusync\"\n",
        "prefix = \"skusync\"\nmax_batch_skus = 100\n",
        1,
    );
    assert!(text.contains("max_batch_skus = 100"), "{text}");
    rig.start_with_config(&format!(
        "{text}{}backed_up_round_ms = {}\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n",
        mqtt_toml(&broker, 100),
        round.as_millis()
    ))
    .await;
    // the first connect republishes everything (an empty Redis): let that finish first
    let t = Instant::now();
    while !rig.daemon().stderr_contains("mqtt epoch stored") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    let (backed, spells0, _) = loop {
        if let Some(s) = backed_up_sample(http) {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no /metrics");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!backed, "backed up before any load");
    rig.exec(
        "INSERT INTO inventory SELECT 'BULK-' || g, 'W1', g % 100, 0 FROM generate_series(1, 40000) g",
    )
    .await;
    // Spans between two scrapes that both saw the same spell of being backed up: the
    // states published in them, and their length.
    let (mut published, mut span, mut longest) = (0.0, Duration::ZERO, Duration::ZERO);
    let mut prev: Option<(Instant, bool, f64, f64)> = None;
    let mut spell_start: Option<Instant> = None;
    let mut spells;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let Some((b, n, p)) = backed_up_sample(http) else {
            panic!("/metrics stopped answering\n{}", rig.daemon().stderr_all());
        };
        let now = Instant::now();
        if let Some((t0, b0, n0, p0)) = prev
            && b0
            && b
            && n0 == n
        {
            published += p - p0;
            span += now - t0;
            longest = longest.max(now - spell_start.unwrap_or(t0));
        }
        if b && prev.is_none_or(|(_, b0, n0, _)| !b0 || n0 != n) {
            spell_start = Some(now);
        }
        prev = Some((now, b, n, p));
        spells = n;
        if !b && n > spells0 && sku_hash_exists(&mut rig, "BULK-40000").await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "apply not through after 120 s (backed up {b}, spells {n})\n{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "backed up {} times, {span:?} between scrapes (longest spell {longest:?}): {published} states published meanwhile",
        spells - spells0
    );
    assert!(spells > spells0, "a 40k-row transaction backs the apply up");
    assert!(
        longest >= Duration::from_millis(500),
        "the apply was backed up only for {longest:?}: too short to tell"
    );
    // Rounds that start within `span`, plus the in-flight ones started before it.
    let rounds = span.as_secs_f64() / round.as_secs_f64() + 2.0 * (spells - spells0 + 1.0);
    let bound = rounds * READ_GROUP as f64;
    assert!(
        published <= bound,
        "{published} states published in {span:?} of backed-up apply (bound {bound})"
    );
    assert!(
        published > 0.0,
        "the publisher never stops while the apply is backed up"
    );
    rig.drain(&WorkloadTables::public(), "W1", Duration::from_secs(60))
        .await;
    assert_retained_equals_redis(&mut rig, &broker, Duration::from_secs(60)).await;
    assert_eq!(backed_up_sample(http).map(|s| s.0), Some(false));
}

/// Whether the SKU's hash exists in Redis yet.
async fn sku_hash_exists(rig: &mut Rig, sku: &str) -> bool {
    let n: i64 = redis::cmd("HLEN")
        .arg(layout::sku_key("skusync", sku))
        .query_async(&mut rig.con)
        .await
        .unwrap_or(0);
    n > 0
}
