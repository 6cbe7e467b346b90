//! `skusync verify` against a real PostgreSQL, Redis, Mosquitto and a running `skusync
//! run`: equal state exits 0, a hand-made difference exits 1 naming SKU and field (and
//! `--repair` fixes it), a moving stream gives no false differences, retention deletes are
//! "not verifiable", and a wrong retained MQTT state is found.

use crate::fold_oracle::*;
use crate::harness::MosquittoServer;
use crate::oracle::*;
use crate::support::*;
use skusync::sinks::layout;
use skusync::sinks::mqtt::sku_topic;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `skusync verify <args> --config <cfg>`: (exit code, stdout, stderr).
pub fn verify(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(skusync_bin())
        .arg("verify")
        .args(args)
        .arg("--config")
        .arg(cfg)
        .env_remove("RUST_LOG")
        .output()
        .expect("run skusync verify");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cfg_of(rig: &mut Rig) -> PathBuf {
    rig.daemon().cfg.clone()
}

/// The summary line, which must end every report.
fn summary(stdout: &str) -> &str {
    let last = stdout.lines().last().unwrap_or("");
    assert!(last.starts_with("verify: "), "no summary line:\n{stdout}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_after_a_drained_workload_exits_0_with_no_differences() {
    let seed = test_seed("verify_after_a_drained_workload_exits_0_with_no_differences");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("\n[limits]\nmax_sku_bytes = 16\n").await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 400, async |_: &mut Rig, _| {}).await;
    // Rows skusync skips must not count in the SQL side either.
    let long = "L".repeat(17);
    rig.exec(&format!(
        "INSERT INTO inventory VALUES ('{long}', 'WH-1', 5, 0);
         INSERT INTO activity_log (sku, kind, qty) VALUES ('{long}', 'view', 1),
           ('SKU-001', 'view', 2.5), ('SKU-001', 'view', NULL), (NULL, 'view', 1)"
    ))
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(45))
        .await;
    let cfg = cfg_of(&mut rig);
    let (code, out, err) = verify(&cfg, &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(!out.contains("DIFF"), "{out}");
    let s = summary(&out);
    assert!(s.contains(" 0 differences"), "{s}");
    let checked: usize = s
        .strip_prefix("verify: ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("SKU count");
    assert!(checked >= 30, "{s}");
    // --json carries the same verdict.
    let (code, out, _) = verify(&cfg, &["--json"]);
    assert_eq!(code, 0, "{out}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(j["differences"], serde_json::json!([]), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_sku_exits_1_naming_sku_and_field_and_repair_rebuilds_it() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    rig.exec(
        "INSERT INTO inventory VALUES ('o''neil x', 'WH-1', 10, 2), ('B-2', 'WH-2', 4, 0);
         INSERT INTO activity_log (sku, kind, qty) VALUES ('B-2', 'purchase', 3)",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let key = layout::sku_key("skusync", "o'neil x");
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("on_hand")
        .arg("999")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    let cfg = cfg_of(&mut rig);
    let (code, out, err) = verify(&cfg, &["--rounds", "2"]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.lines()
            .any(|l| l == r#"DIFF "o\'neil x" "on_hand" redis=999 sql=10"#),
        "{out}"
    );
    assert!(summary(&out).contains(" 1 differences"), "{out}");
    // Read-only: the corruption is still there.
    assert_eq!(
        hget(&mut rig.con, &key, "on_hand").await.as_deref(),
        Some("999")
    );

    // --repair: requests the rebuild and waits for it. A skusync that does not notice
    // bootstrap=stale while running rebuilds when restarted, so restart it if needed.
    let mut child = Command::new(skusync_bin())
        .args(["verify", "--repair", "--repair-wait", "120", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn verify --repair");
    let meta = layout::meta_key("skusync");
    let start = Instant::now();
    let mut stale_since: Option<Instant> = None;
    let mut restarted = false;
    while child.try_wait().expect("try_wait").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(150),
            "verify --repair hangs"
        );
        let b = hget(&mut rig.con, &meta, "bootstrap").await;
        if b.as_deref() == Some("stale") {
            let since = *stale_since.get_or_insert_with(Instant::now);
            if !restarted && since.elapsed() > Duration::from_secs(8) {
                rig.daemon().kill9_and_restart();
                restarted = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = child.wait_with_output().expect("verify output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        rig.daemon().stderr_all()
    );
    assert!(stale_since.is_some(), "verify --repair set bootstrap=stale");
    assert!(stdout.contains(r#"DIFF "o\'neil x" "on_hand""#), "{stdout}");
    assert!(stdout.contains("repair: "), "{stdout}");
    assert!(summary(&stdout).contains(" 0 differences"), "{stdout}");
    assert_eq!(
        hget(&mut rig.con, &key, "on_hand").await.as_deref(),
        Some("10")
    );
    let (code, out, _) = verify(&cfg, &[]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_under_a_running_workload_reports_no_false_differences() {
    let seed = test_seed("verify_under_a_running_workload_reports_no_false_differences");
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 200, async |_: &mut Rig, _| {}).await;
    let cfg = cfg_of(&mut rig);
    // Paced transactions on a connection of their own the whole time verify runs.
    let client = rig.pg.client("postgres").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let load = tokio::spawn(async move {
        let mut txns = 0usize;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            let sql = w.next_txn();
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{e:?}\n{sql}"));
            txns += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        txns
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for run in 0..4 {
        let c = cfg.clone();
        let (code, out, err) = tokio::task::spawn_blocking(move || verify(&c, &[]))
            .await
            .unwrap();
        eprintln!("run {run}: {}", summary(&out));
        assert_eq!(code, 0, "run {run} stdout:\n{out}\nstderr:\n{err}");
        assert!(!out.contains("DIFF"), "{out}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let txns = load.await.unwrap();
    eprintln!("{txns} transactions while verify ran");
    assert!(txns >= 20, "the workload ran while verify did ({txns})");
    rig.daemon().assert_alive("verifying");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_rows_deleted_by_retention_are_not_verifiable_not_differences() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync("").await;
    rig.exec(
        "INSERT INTO inventory VALUES ('R-1', 'WH-1', 3, 0);
         INSERT INTO activity_log (sku, kind, qty) VALUES
           ('R-1', 'view', 1), ('R-1', 'view', 1), ('R-1', 'view', 1), ('R-1', 'purchase', 2)",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    rig.exec("DELETE FROM activity_log WHERE kind = 'view' AND id % 3 <> 0")
        .await;
    let cfg = cfg_of(&mut rig);
    let (code, out, err) = verify(&cfg, &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("NOT-VERIFIABLE \"R-1\" \"views\" redis=3 sql=")),
        "{out}"
    );
    assert!(summary(&out).contains(" 1 not verifiable"), "{out}");
    // A lifetime total *below* SQL is a difference, not a retention effect.
    let _: () = redis::cmd("HSET")
        .arg(layout::sku_key("skusync", "R-1"))
        .arg("purchases")
        .arg("1")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    let (code, out, _) = verify(&cfg, &["--rounds", "2"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("DIFF \"R-1\" \"purchases\" redis=1 sql=2"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_mqtt_finds_a_retained_state_that_differs_from_redis() {
    let broker = MosquittoServer::start();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync(&format!(
        "\n[mqtt]\nurl = \"{}\"\ntopic_prefix = \"skusync\"\nmin_interval_ms = 50\n",
        broker.url()
    ))
    .await;
    rig.exec(
        "INSERT INTO inventory VALUES ('M/1', 'WH-1', 7, 1), ('M 2', 'WH-2', 3, 0);
         INSERT INTO activity_log (sku, kind, qty) VALUES ('M/1', 'view', 4)",
    )
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let start = Instant::now();
    loop {
        let m = crate::mqtt_e2e::retained_mismatches(&mut rig, &broker).await;
        if m.is_empty() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{m:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cfg = cfg_of(&mut rig);
    let (code, out, err) = verify(&cfg, &["--mqtt"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(summary(&out).contains("against MQTT"), "{out}");

    // A wrong retained state, published by hand with the same LSN.
    let topic = sku_topic("skusync", "M/1");
    let retained = broker.retained(&topic, Duration::from_secs(5));
    assert_eq!(retained.len(), 1, "{retained:?}");
    let mut j: serde_json::Value = serde_json::from_slice(&retained[0].1).expect("JSON");
    j["on_hand"] = serde_json::json!(70);
    broker.publish(&topic, j.to_string().as_bytes(), true);
    // And a retained state for a SKU Redis does not have.
    broker.publish(
        &sku_topic("skusync", "GHOST"),
        br#"{"v":1,"sku":"GHOST","on_hand":1,"reserved":0,"available":1}"#,
        true,
    );
    let (code, out, err) = verify(&cfg, &["--mqtt", "--rounds", "2"]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("DIFF \"M/1\" \"mqtt:on_hand\" redis=7 mqtt=70"),
        "{out}"
    );
    assert!(
        out.contains("DIFF \"GHOST\" \"mqtt:retained\" redis=absent mqtt=present"),
        "{out}"
    );
    // Without --mqtt, Redis still equals SQL.
    let (code, out, _) = verify(&cfg, &[]);
    assert_eq!(code, 0, "{out}");
}
