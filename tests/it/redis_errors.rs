//! Redis refusing skusync's writes for good: `skusync run` stops with a message that
//! says what to fix, instead of retrying the same refused call for ever.

use crate::fold_oracle::*;
use crate::oracle::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sku_key_of_another_type_stops_the_daemon_naming_wrongtype_and_the_key() {
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('FINE', 'W1', 3, 0)")
        .await;
    rig.start_skusync("").await;
    // Another application clobbers the key of a SKU skusync is about to write.
    let key = skusync::sinks::layout::sku_key("skusync", "CLOBBERED");
    rig.redis.cli(&["SET", &key, "not a hash"]);
    rig.exec("INSERT INTO inventory VALUES ('CLOBBERED', 'LOC-SECRET-7', 424242, 0)")
        .await;
    let status = rig
        .daemon()
        .wait_exit(Duration::from_secs(30), "after Redis refused the write")
        .await;
    let log = rig.daemon().stderr_all();
    assert_eq!(status.code(), Some(1), "a definite error exits 1\n{log}");
    assert!(log.contains("WRONGTYPE"), "the reply is named\n{log}");
    assert!(
        log.contains(&format!("Not a hash: {key:?} (string)")),
        "the key and its type are named\n{log}"
    );
    assert!(log.contains("skusync resync"), "the fix is named\n{log}");
    let d = rig.daemon();
    assert!(
        !d.stderr_contains("Redis apply failed; retrying"),
        "a definite error is not retried\n{log}"
    );
    for value in ["LOC-SECRET-7", "424242"] {
        assert!(!d.stderr_contains(value), "row value {value} logged\n{log}");
    }
    assert_eq!(
        rig.redis.cli(&["GET", &key]),
        "not a hash",
        "the refused call wrote nothing"
    );
}

/// `redis.cluster` must say what the server is: a cluster node (a lone one, or a seed of
/// a real cluster of 3 primaries and 3 replicas) without `cluster = true`, or a
/// standalone server with it, would answer MOVED or refuse CLUSTER SLOTS in the middle of
/// the stream. `check` fails and `run` stops before writing anything or creating the
/// slot, both naming the setting to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_mode_that_does_not_match_the_server_is_refused_up_front_naming_the_setting() {
    use crate::harness::{RedisCluster, RedisOptions, RedisServer};
    let rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    let lone = RedisServer::start_with(RedisOptions {
        cluster: true,
        ..Default::default()
    });
    let cluster = RedisCluster::start(3, 1);
    let standalone = RedisServer::start();
    for (what, url, cluster_setting, fix) in [
        (
            "a lone cluster node",
            lone.url(),
            false,
            "redis.cluster = true",
        ),
        (
            "a seed of a 3-primary cluster",
            cluster.seed_url(),
            false,
            "redis.cluster = true",
        ),
        (
            "a standalone server with cluster = true",
            standalone.url(),
            true,
            "redis.cluster = false",
        ),
    ] {
        let mut text = rig.oracle.config_toml(
            &rig.pg.url("postgres", "postgres"),
            "skusync",
            &["skusync", "skusync_activity"],
            &url,
        );
        if cluster_setting {
            text = text.replacen("[redis]\n", "[redis]\ncluster = true\n", 1);
        }
        let cfg = crate::support::write_config(rig.dir.path(), &text);
        let check = crate::support::skusync_output(&["check"], &cfg);
        let out = String::from_utf8_lossy(&check.stdout);
        assert!(!check.status.success(), "{what}: {out}");
        assert!(out.contains("FAIL") && out.contains(fix), "{what}: {out}");
        // `run` must stop on its own (a daemon that retried would never exit): killed
        // after 30 s
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_skusync"))
            .args(["run", "--config"])
            .arg(&cfg)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("skusync run");
        let start = std::time::Instant::now();
        while child.try_wait().expect("wait").is_none() && start.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let daemon = child.wait_with_output().expect("output");
        let err = String::from_utf8_lossy(&daemon.stderr);
        assert_eq!(daemon.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(fix), "{what}: names the setting: {err}");
    }
    assert_eq!(lone.cli(&["DBSIZE"]).trim(), "0", "nothing written");
    assert_eq!(cluster.dbsize_total(), 0, "nothing written to the cluster");
    assert_eq!(standalone.cli(&["DBSIZE"]).trim(), "0", "nothing written");
    assert_eq!(
        rig.pg.psql("SELECT count(*) FROM pg_replication_slots"),
        "0",
        "no slot holds WAL for a pipeline that cannot run"
    );
}

/// A cluster that does not serve every slot: `check` fails naming it; `run` waits
/// (nothing written, nothing confirmed) and starts once the slots are assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_uncovered_slots_is_waited_for_and_used_once_served() {
    use crate::harness::{RedisOptions, RedisServer};
    let rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('BEFORE', 'W1', 3, 0)")
        .await;
    // a one-node cluster without slots
    let node = RedisServer::start_with(RedisOptions {
        cluster: true,
        ..Default::default()
    });
    let text = rig
        .oracle
        .config_toml(
            &rig.pg.url("postgres", "postgres"),
            "skusync",
            &["skusync", "skusync_activity"],
            &node.url(),
        )
        .replacen("[redis]\n", "[redis]\ncluster = true\n", 1);
    let cfg = crate::support::write_config(rig.dir.path(), &text);
    let check = crate::support::skusync_output(&["check"], &cfg);
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success(), "{out}");
    assert!(out.contains("FAIL") && out.contains("redis.url"), "{out}");
    let mut d = Daemon::start(rig.dir.path(), cfg);
    tokio::time::sleep(Duration::from_secs(5)).await;
    d.assert_alive("waiting for the cluster's slots");
    assert!(
        d.stderr_contains("does not serve every slot"),
        "the wait names the slots\n{}",
        d.stderr_all()
    );
    assert_eq!(node.cli(&["DBSIZE"]).trim(), "0", "nothing written yet");
    node.cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
    let mut con = skusync::sinks::redis::connect(
        &skusync::sinks::redis::client(&[node.url()], true, None).expect("client"),
    )
    .await;
    let start = std::time::Instant::now();
    let key = skusync::sinks::layout::sku_key("skusync", "BEFORE");
    loop {
        d.assert_alive("loading once the slots are served");
        if con.is_err() {
            con = skusync::sinks::redis::connect(
                &skusync::sinks::redis::client(&[node.url()], true, None).expect("client"),
            )
            .await;
        }
        // CLUSTERDOWN until the node has taken its slots
        if let Ok(c) = &mut con
            && redis::cmd("HGET")
                .arg(&key)
                .arg("on_hand")
                .query_async::<Option<String>>(c)
                .await
                .ok()
                .flatten()
                .as_deref()
                == Some("3")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nothing loaded after the slots were assigned\n{}",
            d.stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(d.sigterm(), Some(0), "{}", d.stderr_all());
}
