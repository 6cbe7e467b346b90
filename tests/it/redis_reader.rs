//! The publisher's own Redis reader (`sinks::redis::reader`) against a real Redis: what
//! it reads equals what redis-rs reads, through TLS, a password and a database; a wrong
//! password and a restarted Redis are clear errors it recovers from.

use std::collections::HashMap;

use skusync::sinks::redis::RedisCon;
use skusync::sinks::redis::reader::{HashReader, for_config};
use skusync::sinks::redis::resp::FlatHash;

use crate::harness::{RedisCluster, RedisOptions, RedisServer, TestCa};

/// HGETALL of each key, in one round as the publisher reads (`con`: its redis-rs
/// connection, which places a cluster's commands).
async fn read(
    reader: &HashReader,
    con: &RedisCon,
    keys: &[&str],
) -> Result<Vec<redis::RedisResult<FlatHash>>, redis::RedisError> {
    let mut p = redis::pipe();
    for k in keys {
        p.cmd("HGETALL").arg(*k);
    }
    let r = reader.round(con, &p).await?;
    Ok((0..r.len()).map(|i| r.hash(i)).collect())
}

async fn con(urls: &[String], cluster: bool, ca: Option<&std::path::Path>) -> RedisCon {
    let client = skusync::sinks::redis::client(urls, cluster, ca).unwrap();
    skusync::sinks::redis::connect(&client).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_reads_hashes_as_redis_rs_does_through_tls_a_password_and_a_database() {
    let mut ca = TestCa::new();
    let r = RedisServer::start_with(RedisOptions {
        password: Some("s3cret".into()),
        tls: Some(ca.issue_server_cert(&["localhost", "127.0.0.1"])),
        ..Default::default()
    });
    // odd field names and values, in database 3 only
    let odd = [
        "on_hand",
        "12",
        "loc:WH/1 {x}:on_hand",
        "-0.5",
        "ü#+",
        "",
        "pub_state",
        "{\"a\":1}\r\n",
    ];
    let mut args = vec!["-n", "3", "HSET", "p:sku:{A/1}"];
    args.extend(odd);
    r.cli(&args);
    r.cli(&["-n", "3", "SET", "p:str", "x"]);
    let url = r.url().replace("/0", "/3");
    assert!(url.starts_with("rediss://:s3cret@"));
    let ca_file = ca.ca_cert().to_path_buf();
    let reader = for_config(std::slice::from_ref(&url), false, Some(&ca_file))
        .expect("TLS with a verified certificate is read by skusync's reader");

    let mut con = con(std::slice::from_ref(&url), false, Some(&ca_file)).await;
    let got = read(&reader, &con, &["p:sku:{A/1}", "p:none", "p:str"])
        .await
        .expect("a round");
    let theirs: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("p:sku:{A/1}")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(theirs.len(), 4);
    assert_eq!(got[0].as_ref().unwrap(), &FlatHash::from(&theirs));
    assert_eq!(
        got[0].as_ref().unwrap().get("pub_state"),
        Some("{\"a\":1}\r\n")
    );
    assert!(
        got[1].as_ref().unwrap().is_empty(),
        "a missing key is an empty hash"
    );
    let e = got[2]
        .as_ref()
        .expect_err("a string key is the server's error");
    assert!(e.to_string().contains("WRONGTYPE"), "{e}");

    // the database is the URL's: database 0 does not hold the hash
    let zero = for_config(&[r.url()], false, Some(&ca_file)).unwrap();
    let got = read(&zero, &con, &["p:sku:{A/1}"]).await.unwrap();
    assert!(got[0].as_ref().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_authentication_error() {
    let r = RedisServer::start_with(RedisOptions {
        password: Some("right".into()),
        ..Default::default()
    });
    let con = con(&[r.url()], false, None).await;
    let url = r.url().replace(":right@", ":wrong@");
    let reader = for_config(&[url], false, None).unwrap();
    let e = read(&reader, &con, &["k"]).await.expect_err("refused");
    assert_eq!(e.kind(), redis::ErrorKind::AuthenticationFailed, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_after_a_redis_restart_succeed_at_once_on_fresh_connections() {
    let mut r = RedisServer::start();
    r.cli(&["HSET", "h", "a", "1"]);
    let reader = for_config(&[r.url()], false, None).unwrap();
    let con = con(&[r.url()], false, None).await;
    let a = |got: Result<Vec<redis::RedisResult<FlatHash>>, redis::RedisError>| {
        got.expect("a round")[0]
            .as_ref()
            .expect("a hash")
            .get("a")
            .map(str::to_string)
    };
    // three rounds at once leave three connections in the pool
    let (x, y, z) = tokio::join!(
        read(&reader, &con, &["h"]),
        read(&reader, &con, &["h"]),
        read(&reader, &con, &["h"])
    );
    assert_eq!(
        [a(x), a(y), a(z)],
        [Some("1".to_string()), Some("1".into()), Some("1".into())]
    );
    r.restart();
    r.cli(&["HSET", "h", "a", "2"]);
    // every pooled connection died with the old process: the first round that meets
    // one drops them all and reads on a fresh connection; no round fails
    for _ in 0..3 {
        assert_eq!(a(read(&reader, &con, &["h"]).await), Some("2".into()));
    }
}

#[test]
fn unverified_tls_is_read_through_redis_rs() {
    let some = |url: &str, cluster: bool| for_config(&[url.to_string()], cluster, None).is_some();
    assert!(some("redis://127.0.0.1:6390/0", false));
    assert!(some("redis://127.0.0.1:6390", true));
    assert!(some("redis+unix:///tmp/skusync-none.sock", false));
    assert!(
        !some("rediss://localhost:6390/0#insecure", false),
        "no verification: redis-rs' connection"
    );
}

/// On a cluster the reader sends each command to its slot's primary; after a reshard
/// the stale slot map's commands come back MOVED and go again through redis-rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_read_per_primary_and_a_moved_slot_is_read_through_redis_rs() {
    let c = RedisCluster::start(3, 0);
    let keys: Vec<String> = (0..60).map(|i| format!("p:sku:{{S{i}}}")).collect();
    for (i, k) in keys.iter().enumerate() {
        c.cli_c(&["HSET", k, "on_hand", &i.to_string(), "lsn", "7"]);
    }
    let urls = [c.seed_url()];
    let con = con(&urls, true, None).await;
    let reader = for_config(&urls, true, None).expect("a cluster is read by skusync's reader");
    let names: Vec<&str> = keys.iter().map(String::as_str).collect();
    let check = |got: Vec<redis::RedisResult<FlatHash>>| {
        assert_eq!(got.len(), keys.len());
        for (i, h) in got.into_iter().enumerate() {
            let h = h.unwrap();
            assert_eq!(
                h.get("on_hand"),
                Some(i.to_string().as_str()),
                "{}",
                keys[i]
            );
            assert_eq!(h.get("lsn"), Some("7"));
        }
    };
    check(read(&reader, &con, &names).await.unwrap());
    let p = c.primaries();
    c.reshard(p[0], p[1], 2000);
    check(read(&reader, &con, &names).await.unwrap());
    check(read(&reader, &con, &names).await.unwrap());
}
