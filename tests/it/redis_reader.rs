//! The publisher's own Redis reader (`sinks::redis::reader`) against a real Redis: what
//! it reads equals what redis-rs reads, through TLS, a password and a database; a wrong
//! password and a restarted Redis are clear errors it recovers from.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use skusync::sinks::redis::reader::{HashReader, for_config};
use skusync::sinks::redis::resp::{FlatHash, RespError};

use crate::harness::{RedisOptions, RedisServer, TestCa};

/// HGETALL of each key, packed as the publisher packs its reads.
fn hgetalls(keys: &[&str]) -> (Vec<u8>, usize) {
    let mut p = redis::pipe();
    for k in keys {
        p.cmd("HGETALL").arg(*k);
    }
    (p.get_packed_pipeline(), p.len())
}

async fn read(
    reader: &HashReader,
    keys: &[&str],
) -> Result<Vec<Result<FlatHash, RespError>>, redis::RedisError> {
    let (packed, n) = hgetalls(keys);
    let r = reader.round(&packed, n).await?;
    Ok((0..r.len()).map(|i| FlatHash::parse(r.get(i))).collect())
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

    let got = read(&reader, &["p:sku:{A/1}", "p:none", "p:str"])
        .await
        .expect("a round");
    let client = skusync::sinks::redis::client(&[url], false, Some(&ca_file)).unwrap();
    let mut con = skusync::sinks::redis::connect(&client).await.unwrap();
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
    match &got[2] {
        Err(RespError::Server(e)) => assert!(e.starts_with("WRONGTYPE"), "{e}"),
        other => panic!("a string key is the server's error, got {other:?}"),
    }

    // the database is the URL's: database 0 does not hold the hash
    let zero = for_config(&[r.url()], false, Some(&ca_file)).unwrap();
    let got = read(&zero, &["p:sku:{A/1}"]).await.unwrap();
    assert!(got[0].as_ref().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_authentication_error() {
    let r = RedisServer::start_with(RedisOptions {
        password: Some("right".into()),
        ..Default::default()
    });
    let url = r.url().replace(":right@", ":wrong@");
    let reader = for_config(&[url], false, None).unwrap();
    let e = read(&reader, &["k"]).await.expect_err("refused");
    assert_eq!(e.kind(), redis::ErrorKind::AuthenticationFailed, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_reads_again_once_a_restarted_redis_is_back() {
    let mut r = RedisServer::start();
    r.cli(&["HSET", "h", "a", "1"]);
    let reader = for_config(&[r.url()], false, None).unwrap();
    assert_eq!(
        read(&reader, &["h"]).await.unwrap()[0]
            .as_ref()
            .unwrap()
            .get("a"),
        Some("1")
    );
    r.restart();
    r.cli(&["HSET", "h", "a", "2"]);
    // the pooled connection died with the old process: at most that round fails
    let start = Instant::now();
    let mut failures = 0;
    loop {
        match read(&reader, &["h"]).await {
            Ok(got) => {
                assert_eq!(got[0].as_ref().unwrap().get("a"), Some("2"));
                break;
            }
            Err(e) => {
                failures += 1;
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "still failing: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(failures <= 1, "{failures} rounds failed after the restart");
}

#[test]
fn a_cluster_and_unverified_tls_are_read_through_redis_rs() {
    let some = |url: &str, cluster: bool| for_config(&[url.to_string()], cluster, None).is_some();
    assert!(some("redis://127.0.0.1:6390/0", false));
    assert!(some("redis+unix:///tmp/skusync-none.sock", false));
    assert!(
        !some("redis://127.0.0.1:6390", true),
        "a cluster follows the slot map"
    );
    assert!(
        !some("rediss://localhost:6390/0#insecure", false),
        "no verification: redis-rs' connection"
    );
}
