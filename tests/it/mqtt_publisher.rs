//! The MQTT publisher against a real Redis and Mosquitto: Redis hashes are written
//! directly (standing in for the apply step), the broker is observed with mosquitto_sub.

use crate::support::command_calls;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skusync::config::MqttConfig;
use skusync::sinks::mqtt::{self, CounterSpec, MqttError, MqttHandle, PublisherConfig};
use skusync::sinks::redis::RedisCon as ConnectionManager;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::harness::{MosquittoServer, MqttOptions, RedisServer, TestCa, free_port};

const RP: &str = "t"; // Redis prefix
const TP: &str = "p"; // topic prefix

fn mqtt_config(url: String) -> MqttConfig {
    MqttConfig {
        url: url.into(),
        client_id: format!("skusync-test-{}", free_port()),
        topic_prefix: TP.into(),
        min_interval_ms: 100,
        ca_file: None,
        window_republish_per_s: 50,
        backed_up_round_ms: 100,
        max_packet_bytes: 64 * 1024,
        format: Default::default(),
    }
}

fn publisher_config(mqtt: MqttConfig) -> PublisherConfig {
    PublisherConfig {
        scale: 0,
        mqtt,
        redis_prefix: RP.into(),
        counters: vec![CounterSpec {
            name: "purchases".into(),
            windows_secs: vec![3600],
            distinct_users: false,
        }],
        sell_counter: Some("purchases".into()),
        low_stock: 5,
        alert_expiry_s: 3600,
    }
}

async fn redis(r: &RedisServer) -> ConnectionManager {
    ConnectionManager::Single(
        redis::Client::open(r.url())
            .expect("redis url")
            .get_connection_manager()
            .await
            .expect("redis connect"),
    )
}

struct Running {
    handle: MqttHandle,
    join: JoinHandle<Result<(), MqttError>>,
    shutdown: CancellationToken,
}

impl Running {
    async fn start(cfg: PublisherConfig, r: &RedisServer) -> Running {
        let shutdown = CancellationToken::new();
        // the publisher's hash reads on its own reader, as the daemon runs it
        let reader = skusync::sinks::redis::reader::for_config(&[r.url()], false, None);
        assert!(
            reader.is_some(),
            "a standalone Redis is read by skusync's reader"
        );
        let (handle, join) = mqtt::spawn(cfg, redis(r).await, reader, shutdown.clone())
            .await
            .expect("spawn publisher");
        Running {
            handle,
            join,
            shutdown,
        }
    }

    /// Started, connected, and past the epoch wait: changes publish from here on.
    async fn publishing(cfg: PublisherConfig, r: &RedisServer) -> Running {
        let p = Running::start(cfg, r).await;
        until("connected", Duration::from_secs(10), || {
            let c = p.handle.is_connected();
            async move { c.then_some(()) }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1200)).await; // past the epoch wait
        p
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.join)
            .await
            .expect("publisher stops in time")
            .expect("task")
            .expect("clean stop");
    }
}

async fn hset(con: &mut ConnectionManager, sku: &str, kv: &[(&str, String)]) {
    let mut c = redis::cmd("HSET");
    c.arg(skusync::sinks::layout::sku_key(RP, sku));
    for (k, v) in kv {
        c.arg(*k).arg(v);
    }
    c.query_async::<()>(con).await.expect("HSET");
}

/// The `i`-th change of SKU `HOT`: stock 10,000 - i at LSN 1,000 + i.
async fn set_hot(con: &mut ConnectionManager, i: u64) {
    hset(
        con,
        "HOT",
        &[
            ("on_hand", (10_000 - i).to_string()),
            ("available", (10_000 - i).to_string()),
            ("lsn", (1000 + i).to_string()),
        ],
    )
    .await;
}

async fn hget(con: &mut ConnectionManager, sku: &str, f: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(skusync::sinks::layout::sku_key(RP, sku))
        .arg(f)
        .query_async(con)
        .await
        .expect("HGET")
}

async fn meta(con: &mut ConnectionManager) {
    redis::cmd("HSET")
        .arg(format!("{RP}:meta"))
        .arg("applied_lsn")
        .arg("1")
        .query_async::<()>(con)
        .await
        .expect("meta");
}

/// Polls until `f` returns Some, panicking after `timeout`.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_published(con: &mut ConnectionManager, sku: &str, lsn: u64) {
    let want = lsn.to_string();
    until(&format!("pub_lsn {lsn}"), Duration::from_secs(20), || {
        let mut con = con.clone();
        let want = want.clone();
        async move { (hget(&mut con, sku, "pub_lsn").await.as_deref() == Some(&want)).then_some(()) }
    })
    .await
}

fn retained(m: &MosquittoServer, filter: &str) -> Vec<(String, Value)> {
    m.retained(filter, Duration::from_secs(5))
        .into_iter()
        .map(|(t, p)| {
            let v = if p.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&p)
                    .unwrap_or(Value::String(String::from_utf8_lossy(&p).into()))
            };
            (t, v)
        })
        .collect()
}

/// (retained flag, topic, payload) of one received message.
type Seen = (bool, String, Vec<u8>);

/// A live `mosquitto_sub` recording (retained flag, topic, payload) of every message.
struct Sub {
    child: Child,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Sub {
    fn start(m: &MosquittoServer, filter: &str) -> Sub {
        let probe = format!("probe/{}", free_port());
        let mut child = Command::new("mosquitto_sub")
            .args(m.client_args())
            .args(["-q", "1", "-t", filter, "-t", &probe, "-F", "%r %x %t"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_sub");
        let out = child.stdout.take().expect("stdout");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let mut it = line.splitn(3, ' ');
                let (Some(r), Some(hex), Some(t)) = (it.next(), it.next(), it.next()) else {
                    continue;
                };
                let bytes = (0..hex.len() / 2)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
                    .collect();
                s2.lock().unwrap().push((r == "1", t.to_string(), bytes));
            }
        });
        let sub = Sub { child, seen };
        // subscribed once a probe comes through
        let start = Instant::now();
        while !sub.messages().iter().any(|(_, t, _)| *t == probe) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "subscriber not ready"
            );
            m.publish(&probe, b"x", false);
            std::thread::sleep(Duration::from_millis(100));
        }
        sub
    }

    fn messages(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn on(&self, topic: &str) -> Vec<Vec<u8>> {
        self.messages()
            .into_iter()
            .filter(|(_, t, _)| t == topic)
            .map(|(_, _, p)| p)
            .collect()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes an empty retained message (mosquitto_pub -n -r), clearing the topic.
fn clear_retained(m: &MosquittoServer, topic: &str) {
    let st = Command::new("mosquitto_pub")
        .args(m.client_args())
        .args(["-q", "1", "-r", "-n", "-t", topic])
        .status()
        .expect("mosquitto_pub");
    assert!(st.success());
}

fn json_of(p: &[u8]) -> Value {
    serde_json::from_slice(p).expect("JSON payload")
}

/// The first state the subscriber got on `topic`, within 10 s.
async fn first_state(sub: &Sub, topic: &str) -> Value {
    let got = until("state delivered", Duration::from_secs(10), || {
        let v = sub.on(topic);
        async move { v.first().cloned() }
    })
    .await;
    json_of(&got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_subscriber_gets_exactly_the_current_state() {
    let r = RedisServer::start();
    let m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    hset(
        &mut con,
        "A/1",
        &[
            ("on_hand", "8".into()),
            ("reserved", "2".into()),
            ("available", "6".into()),
            ("loc:WH-1:on_hand", "8".into()),
            ("loc:WH-1:reserved", "2".into()),
            ("purchases", "4".into()),
            ("lsn", "4294967297".into()),
            ("ts", "1764061200123".into()),
        ],
    )
    .await;
    let p = Running::start(publisher_config(mqtt_config(m.url())), &r).await;
    // unpublished at startup: found by the scan without any changed() call
    wait_published(&mut con, "A/1", 4_294_967_297).await;
    assert!(p.handle.is_connected());

    let got = retained(&m, "p/sku/#");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "p/sku/A%2F1");
    let mut v = got[0].1.clone();
    let rev = v.as_object_mut().unwrap().remove("rev").unwrap();
    assert!(
        rev.as_str()
            .unwrap()
            .starts_with("000000010000000100000000"),
        "{rev}"
    );
    assert_eq!(
        v,
        json!({
            "v": 2, "sku": "A/1", "on_hand": 8, "reserved": 2, "available": 6,
            "locations": {"WH-1": {"on_hand": 8, "reserved": 2}},
            "purchases": 4, "purchases_1h": 0, "sell_rate_per_h": 0,
            "lsn": "1/1", "ts": "2025-11-25T09:00:00.123Z"
        }),
        "the first state has no base: no delta"
    );
    let st: Value =
        serde_json::from_str(&hget(&mut con, "A/1", "pub_state").await.unwrap()).unwrap();
    assert_eq!(st["on_hand"], 8);
    assert_eq!(st["loc:WH-1:on_hand"], 8);

    // a change: the retained message is replaced, delta against the acknowledged state
    hset(
        &mut con,
        "A/1",
        &[
            ("on_hand", "5".into()),
            ("available", "3".into()),
            ("loc:WH-1:on_hand", "5".into()),
            ("lsn", "4294967300".into()),
        ],
    )
    .await;
    p.handle.changed(["A/1".to_string()]);
    wait_published(&mut con, "A/1", 4_294_967_300).await;
    let got = retained(&m, "p/sku/#");
    assert_eq!(got.len(), 1);
    let v = &got[0].1;
    assert_eq!(v["on_hand"], 5);
    assert_eq!(v["lsn"], "1/4");
    assert_eq!(v["delta_from"], "000000010000000100000000");
    assert!(v["rev"].as_str().unwrap() > rev.as_str().unwrap());
    assert_eq!(
        v["delta"],
        json!({"on_hand": -3, "available": -3, "locations": {"WH-1": {"on_hand": -3}}})
    );

    // status and epoch are retained; the epoch is stored in the meta hash
    let status = m.retained("p/status", Duration::from_secs(5));
    assert_eq!(status, vec![("p/status".to_string(), b"online".to_vec())]);
    let epoch: Option<String> = until("epoch stored", Duration::from_secs(10), || {
        let mut con = con.clone();
        async move {
            redis::cmd("HGET")
                .arg("t:meta")
                .arg("mqtt_epoch")
                .query_async::<Option<String>>(&mut con)
                .await
                .unwrap()
                .map(Some)
        }
    })
    .await;
    let broker_epoch = m.retained("p/epoch", Duration::from_secs(5));
    let broker_epoch = String::from_utf8(broker_epoch[0].1.clone()).unwrap();
    let (token, seq) = mqtt::parse_epoch(&broker_epoch);
    assert_eq!(Some(token.to_string()), epoch);
    assert!(seq >= 1, "the epoch carries a sequence: {broker_epoch:?}");
    let stats = p.handle.stats().snapshot();
    assert_eq!(stats.published, 2);
    assert_eq!(stats.refusals, 0);

    // clean stop: offline is published (the will is not sent on a clean disconnect)
    p.stop().await;
    let status = m.retained("p/status", Duration::from_secs(5));
    assert_eq!(status, vec![("p/status".to_string(), b"offline".to_vec())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sale_on_one_sku_is_throttled_to_one_message_per_interval() {
    let r = RedisServer::start();
    let m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    let sub = Sub::start(&m, "p/sku/#");
    let p = Running::publishing(publisher_config(mqtt_config(m.url())), &r).await;

    let start = Instant::now();
    for i in 1..=1000u64 {
        set_hot(&mut con, i).await;
        p.handle.changed(["HOT".to_string()]);
        if i == 500 {
            hset(
                &mut con,
                "COLD",
                &[("on_hand", "1".into()), ("lsn", "7".into())],
            )
            .await;
            p.handle.changed(["COLD".to_string()]);
        }
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let flood = start.elapsed();
    wait_published(&mut con, "HOT", 2000).await;
    wait_published(&mut con, "COLD", 7).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = start.elapsed();
    let hot = sub.on("p/sku/HOT");
    eprintln!(
        "1000 changes in {flood:?}: {} messages for HOT, all published after {total:?}",
        hot.len()
    );
    let bound = total.as_millis() as usize / 100 + 2;
    assert!(
        hot.len() <= bound,
        "{} messages for HOT in {total:?} (flood {flood:?}), bound {bound}",
        hot.len()
    );
    assert!(hot.len() >= 2, "first publish at once plus a trailing one");
    let last = json_of(hot.last().unwrap());
    assert_eq!(last["on_hand"], 9000);
    assert_eq!(last["lsn"], "0/7D0");
    // the coalesced deltas add up to the whole change after the first state (which has
    // no acknowledged base, so no delta)
    assert!(json_of(&hot[0]).get("delta").is_none());
    let sum: i64 = hot[1..]
        .iter()
        .map(|p| json_of(p)["delta"]["on_hand"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(sum, 9000 - json_of(&hot[0])["on_hand"].as_i64().unwrap());
    let got = retained(&m, "p/sku/HOT");
    assert_eq!(got[0].1["on_hand"], 9000);
    assert_eq!(sub.on("p/sku/COLD").len(), 1);
    p.stop().await;
}

/// Without a throttle a SKU's next state is read as soon as the previous one is
/// acknowledged, in the round trip that also records that acknowledgement: each delta
/// must still be against the message before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_states_carry_deltas_against_the_message_before() {
    let r = RedisServer::start();
    let m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    let sub = Sub::start(&m, "p/sku/#");
    let mut mc = mqtt_config(m.url());
    mc.min_interval_ms = 0;
    let p = Running::publishing(publisher_config(mc), &r).await;

    for i in 1..=300u64 {
        set_hot(&mut con, i).await;
        p.handle.changed(["HOT".to_string()]);
        if i % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    wait_published(&mut con, "HOT", 1300).await;
    let hot: Vec<Value> = until(
        "the last state at the subscriber",
        Duration::from_secs(10),
        || {
            let hot: Vec<Value> = sub.on("p/sku/HOT").iter().map(|p| json_of(p)).collect();
            let done = hot.last().is_some_and(|v| v["on_hand"] == 9700);
            async move { done.then_some(hot) }
        },
    )
    .await;
    assert!(
        hot.len() >= 20,
        "only {} messages: the flood was coalesced",
        hot.len()
    );
    let mut prev: Option<&Value> = None;
    for v in &hot {
        let on = v["on_hand"].as_i64().unwrap();
        match prev {
            None => {}
            Some(pv) => {
                let held = pv["rev"].as_str().unwrap();
                assert!(v["rev"].as_str().unwrap() > held, "{v} after {pv}");
                assert_eq!(
                    v["delta_from"].as_str(),
                    Some(&held[..24]),
                    "{v} after {pv}"
                );
                let want = on - pv["on_hand"].as_i64().unwrap();
                assert_eq!(
                    v["delta"]["on_hand"].as_i64().unwrap_or(0),
                    want,
                    "{v} after {pv}"
                );
            }
        }
        prev = Some(v);
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_sku_clears_its_retained_message() {
    let r = RedisServer::start();
    let m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    hset(
        &mut con,
        "G",
        &[("on_hand", "3".into()), ("lsn", "10".into())],
    )
    .await;
    let p = Running::start(publisher_config(mqtt_config(m.url())), &r).await;
    wait_published(&mut con, "G", 10).await;
    assert_eq!(retained(&m, "p/sku/#").len(), 1);
    hset(
        &mut con,
        "G",
        &[
            ("on_hand", "0".into()),
            ("gone", "1".into()),
            ("lsn", "11".into()),
        ],
    )
    .await;
    p.handle.changed(["G".to_string()]);
    wait_published(&mut con, "G", 11).await;
    assert_eq!(retained(&m, "p/sku/#"), vec![]);
    assert_eq!(
        hget(&mut con, "G", "pub_state").await.as_deref(),
        Some("{}")
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_alerts_are_published_once_and_removed_after_ack_while_a_new_one_stays() {
    let r = RedisServer::start();
    let mut m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    let sub = Sub::start(&m, "p/alerts/#");
    hset(
        &mut con,
        "S 1",
        &[("on_hand", "9".into()), ("lsn", "5".into())],
    )
    .await;
    let p = Running::start(publisher_config(mqtt_config(m.url())), &r).await;
    wait_published(&mut con, "S 1", 5).await;

    // freeze the broker so the alert stays unacknowledged while another is appended
    m.pause();
    let a1 =
        r#"{"type":"low_stock","available":3,"threshold":5,"lsn":"123456789","ts":1764061200123}"#;
    let a2 = r#"{"type":"out_of_stock","available":0,"threshold":5,"lsn":"123456790","ts":1764061200200}"#;
    hset(
        &mut con,
        "S 1",
        &[
            ("on_hand", "3".into()),
            ("available", "3".into()),
            ("lsn", "123456789".into()),
            ("alerts", format!("[{a1}]")),
        ],
    )
    .await;
    p.handle.changed(["S 1".to_string()]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    hset(
        &mut con,
        "S 1",
        &[
            ("available", "0".into()),
            ("lsn", "123456790".into()),
            ("alerts", format!("[{a1},{a2}]")),
        ],
    )
    .await;
    m.resume();
    wait_published(&mut con, "S 1", 123_456_789).await;
    let left: Value = until("a1 removed", Duration::from_secs(10), || {
        let mut con = con.clone();
        async move {
            let a = hget(&mut con, "S 1", "alerts").await?;
            let v: Value = serde_json::from_str(&a).ok()?;
            (v.as_array()?.len() == 1).then_some(v)
        }
    })
    .await;
    assert_eq!(left[0]["type"], "out_of_stock", "the appended alert stays");

    // the next round publishes it and the field empties
    p.handle.changed(["S 1".to_string()]);
    wait_published(&mut con, "S 1", 123_456_790).await;
    until("alerts emptied", Duration::from_secs(10), || {
        let mut con = con.clone();
        async move {
            hget(&mut con, "S 1", "alerts")
                .await
                .is_none()
                .then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let msgs = sub.on("p/alerts/S%201");
    assert_eq!(msgs.len(), 2, "each alert once");
    assert_eq!(
        json_of(&msgs[0]),
        json!({"v":2,"id":"0/75BCD15:low_stock:S 1","type":"low_stock","sku":"S 1",
               "available":3,"threshold":5,"lsn":"0/75BCD15","ts":"2025-11-25T09:00:00.123Z"})
    );
    assert_eq!(json_of(&msgs[1])["id"], "0/75BCD16:out_of_stock:S 1");
    assert!(sub.messages().iter().all(|(retain, _, _)| !retain));
    assert_eq!(p.handle.stats().snapshot().alerts_published, 2);
    p.stop().await;
}

async fn three_skus(con: &mut ConnectionManager) -> HashMap<String, u64> {
    let mut want = HashMap::new();
    for (i, sku) in ["a", "b#", "c+d"].iter().enumerate() {
        let lsn = 100 + i as u64;
        hset(
            con,
            sku,
            &[("on_hand", (i + 1).to_string()), ("lsn", lsn.to_string())],
        )
        .await;
        want.insert(sku.to_string(), lsn);
    }
    want
}

/// A publisher with the default config on `r` and `m`, once [`three_skus`] are marked
/// published.
async fn three_skus_published(
    r: &RedisServer,
    m: &MosquittoServer,
) -> (ConnectionManager, Running) {
    let mut con = redis(r).await;
    meta(&mut con).await;
    let want = three_skus(&mut con).await;
    let p = Running::start(publisher_config(mqtt_config(m.url())), r).await;
    for (sku, lsn) in &want {
        wait_published(&mut con, sku, *lsn).await;
    }
    (con, p)
}

async fn epoch_stored(con: &ConnectionManager) -> String {
    until("epoch stored", Duration::from_secs(20), || {
        let mut con = con.clone();
        async move {
            redis::cmd("HGET")
                .arg("t:meta")
                .arg("mqtt_epoch")
                .query_async::<Option<String>>(&mut con)
                .await
                .unwrap()
        }
    })
    .await
}

fn assert_retained_equals_redis(m: &MosquittoServer) {
    let got = retained(m, "p/sku/#");
    let topics: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, vec!["p/sku/a", "p/sku/b%23", "p/sku/c%2Bd"]);
    for (i, (_, v)) in got.iter().enumerate() {
        assert_eq!(v["on_hand"], i as i64 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_without_persistence_gets_every_sku_again() {
    let r = RedisServer::start();
    let mut m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    let want = three_skus(&mut con).await;
    let p = Running::start(publisher_config(mqtt_config(m.url())), &r).await;
    for (sku, lsn) in &want {
        wait_published(&mut con, sku, *lsn).await;
    }
    let e1 = epoch_stored(&con).await;
    assert_retained_equals_redis(&m);
    assert_eq!(p.handle.stats().snapshot().epoch_republishes, 1);

    m.restart();
    assert_eq!(
        retained(&m, "p/sku/#"),
        vec![],
        "broker lost retained messages"
    );
    let start = Instant::now();
    until("new epoch", Duration::from_secs(30), || {
        let con = con.clone();
        let e1 = e1.clone();
        async move { (epoch_stored(&con).await != e1).then_some(()) }
    })
    .await;
    eprintln!(
        "full republish after broker restart took {:?}",
        start.elapsed()
    );
    assert_retained_equals_redis(&m);
    let s = p.handle.stats().snapshot();
    assert_eq!(s.epoch_republishes, 2);
    assert!(s.reconnects >= 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_with_persistence_needs_no_full_republish() {
    let r = RedisServer::start();
    let mut m = MosquittoServer::start_with(MqttOptions {
        persistence: true,
        ..Default::default()
    });
    let mut con = redis(&r).await;
    meta(&mut con).await;
    let want = three_skus(&mut con).await;
    let p = Running::start(publisher_config(mqtt_config(m.url())), &r).await;
    for (sku, lsn) in &want {
        wait_published(&mut con, sku, *lsn).await;
    }
    let e1 = epoch_stored(&con).await;
    let published = p.handle.stats().snapshot().published;

    m.stop();
    // a change while the broker is down is published after the reconnect
    hset(
        &mut con,
        "a",
        &[("on_hand", "1".into()), ("lsn", "200".into())],
    )
    .await;
    p.handle.changed(["a".to_string()]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.start_again();
    wait_published(&mut con, "a", 200).await;
    assert_retained_equals_redis(&m);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = p.handle.stats().snapshot();
    assert_eq!(s.epoch_republishes, 1, "epoch matched: no full republish");
    assert_eq!(s.published, published + 1, "only the changed SKU");
    assert!(s.reconnects >= 1);
    assert_eq!(epoch_stored(&con).await, e1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_password_auth_delivers_state_to_a_subscriber() {
    let mut ca = TestCa::new();
    let tls = ca.issue_server_cert(&["localhost"]);
    let m = MosquittoServer::start_with(MqttOptions {
        tls: Some(tls),
        users: vec![("skusync".into(), "p@ss:w/rd".into())],
        ..Default::default()
    });
    let r = RedisServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    let sub = Sub::start(&m, "p/sku/#");
    hset(
        &mut con,
        "T",
        &[("on_hand", "2".into()), ("lsn", "3".into())],
    )
    .await;
    let url = m
        .url()
        .replace("mqtts://", "mqtts://skusync:p%40ss%3Aw%2Frd@");
    let mut cfg = mqtt_config(url);
    cfg.ca_file = Some(ca.ca_cert().to_path_buf());
    let p = Running::start(publisher_config(cfg), &r).await;
    wait_published(&mut con, "T", 3).await;
    assert_eq!(first_state(&sub, "p/sku/T").await["on_hand"], 2);
    p.stop().await;
}

/// The publisher reads its hashes on its own reader; through a TLS Redis with a
/// password, as through the redis-rs connection it keeps for everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_with_a_password_is_read_and_published_from() {
    let mut ca = TestCa::new();
    let r = RedisServer::start_with(crate::harness::RedisOptions {
        password: Some("s3cret".into()),
        tls: Some(ca.issue_server_cert(&["localhost"])),
        ..Default::default()
    });
    let ca_file = ca.ca_cert().to_path_buf();
    let client = skusync::sinks::redis::client(&[r.url()], false, Some(&ca_file)).unwrap();
    let mut con = skusync::sinks::redis::connect(&client).await.unwrap();
    meta(&mut con).await;
    let m = MosquittoServer::start();
    let sub = Sub::start(&m, "p/sku/#");
    hset(
        &mut con,
        "T1",
        &[("on_hand", "7".into()), ("lsn", "3".into())],
    )
    .await;
    let reader = skusync::sinks::redis::reader::for_config(&[r.url()], false, Some(&ca_file));
    assert!(reader.is_some());
    let shutdown = CancellationToken::new();
    let cfg = publisher_config(mqtt_config(m.url()));
    let (handle, join) = mqtt::spawn(cfg, con.clone(), reader, shutdown.clone())
        .await
        .expect("spawn publisher");
    let p = Running {
        handle,
        join,
        shutdown,
    };
    wait_published(&mut con, "T1", 3).await;
    assert_eq!(first_state(&sub, "p/sku/T1").await["on_hand"], 7);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_refusal_is_detected_and_not_marked_published() {
    let m = MosquittoServer::start_with(MqttOptions {
        users: vec![("skusync".into(), "pw".into())],
        acl: Some(
            "user skusync\ntopic readwrite p/status\ntopic readwrite p/epoch\ntopic write p/alerts/#\n"
                .into(),
        ),
        ..Default::default()
    });
    let r = RedisServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    hset(
        &mut con,
        "X",
        &[("on_hand", "2".into()), ("lsn", "3".into())],
    )
    .await;
    let url = m.url().replace("mqtt://", "mqtt://skusync:pw@");
    let p = Running::start(publisher_config(mqtt_config(url)), &r).await;
    until("refusal counted", Duration::from_secs(15), || {
        let n = p.handle.stats().snapshot().refusals;
        async move { (n >= 1).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hget(&mut con, "X", "pub_lsn").await,
        None,
        "not marked published"
    );
    assert_eq!(retained(&m, "p/sku/#"), vec![]);
    assert_eq!(p.handle.stats().snapshot().published, 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_all_restores_every_retained_message() {
    let (r, m) = (RedisServer::start(), MosquittoServer::start());
    let (_con, p) = three_skus_published(&r, &m).await;
    // someone wiped two retained messages; Redis still says published
    clear_retained(&m, "p/sku/a");
    clear_retained(&m, "p/sku/b%23");
    assert_eq!(retained(&m, "p/sku/#").len(), 1);
    p.handle.republish_all();
    let start = Instant::now();
    while retained(&m, "p/sku/#").len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(10), "not republished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_retained_equals_redis(&m);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_above_10_kib_are_published_and_above_the_packet_limit_refused() {
    let r = RedisServer::start();
    let m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    let locs = |n: usize| -> Vec<(String, String)> {
        (0..n)
            .flat_map(|i| {
                [
                    (format!("loc:WAREHOUSE-{i:05}:on_hand"), "12345".to_string()),
                    (format!("loc:WAREHOUSE-{i:05}:reserved"), "1".to_string()),
                ]
            })
            .collect()
    };
    let set = |sku: &'static str, n: usize, lsn: u64| {
        let mut con = con.clone();
        let mut kv = locs(n);
        kv.push(("lsn".into(), lsn.to_string()));
        async move {
            let kv: Vec<(&str, String)> = kv.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            hset(&mut con, sku, &kv).await;
        }
    };
    set("BIG", 400, 1).await;
    set("HUGE", 2000, 2).await;
    let p = Running::start(publisher_config(mqtt_config(m.url())), &r).await;
    wait_published(&mut con, "BIG", 1).await;
    let got = m.retained("p/sku/BIG", Duration::from_secs(5));
    assert!(got[0].1.len() > 10 * 1024, "{} bytes", got[0].1.len());
    assert_eq!(
        json_of(&got[0].1)["locations"].as_object().unwrap().len(),
        400
    );
    until("oversized refused", Duration::from_secs(10), || {
        let n = p.handle.stats().snapshot().refusals;
        async move { (n >= 1).then_some(()) }
    })
    .await;
    assert_eq!(hget(&mut con, "HUGE", "pub_lsn").await, None);
    assert!(m.retained("p/sku/HUGE", Duration::from_secs(5)).is_empty());
    assert!(
        p.handle.is_connected(),
        "an oversized state does not break the connection"
    );
    p.stop().await;
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Waits for the next minute boundary, so up to ~60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aged_window_values_are_republished_with_as_of_and_no_delta() {
    // start early in a minute, so the first publish sees the bucket inside the window
    while unix_ms() % 60_000 > 45_000 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = RedisServer::start();
    let m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    let sub = Sub::start(&m, "p/sku/#");
    let minute = unix_ms().div_euclid(60_000);
    // the oldest minute of the 1h window: it leaves the window at the next minute
    hset(
        &mut con,
        "W",
        &[
            ("on_hand", "10".into()),
            ("available", "10".into()),
            ("purchases", "2".into()),
            (&format!("w:purchases:{}", minute - 59), "2".into()),
            ("lsn", "9".into()),
        ],
    )
    .await;
    let p = Running::start(publisher_config(mqtt_config(m.url())), &r).await;
    wait_published(&mut con, "W", 9).await;
    let first = json_of(&sub.on("p/sku/W")[0]);
    assert_eq!(first["purchases_1h"], 2);
    assert_eq!(first["sell_rate_per_h"], 2);
    assert_eq!(first["stockout_eta_s"], 18000);
    let aged = until("aging republish", Duration::from_secs(75), || {
        let msgs = sub.on("p/sku/W");
        async move { msgs.get(1).map(|p| json_of(p)) }
    })
    .await;
    assert_eq!(aged["purchases_1h"], 0);
    assert_eq!(aged["sell_rate_per_h"], 0);
    assert!(aged.get("stockout_eta_s").is_none());
    assert!(aged.get("delta").is_none());
    assert!(aged["as_of"].as_str().unwrap().ends_with('Z'));
    assert_eq!(aged["lsn"], "0/9");
    assert_eq!(aged["on_hand"], 10);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sub.on("p/sku/W").len(),
        2,
        "values at zero are not republished again"
    );
    assert_eq!(hget(&mut con, "W", "pub_lsn").await.as_deref(), Some("9"));
    p.stop().await;
}

/// The broker link runs on its own: 300 QoS 1 publishes go through the broker's
/// 20-message window (Mosquitto's default) while their owner reads no event at all (as
/// while it waits on a long Redis call). Driven only by its owner, the connection would
/// have sent none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_carries_publishes_while_their_owner_is_busy() {
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use skusync::sinks::mqtt::link::Link;

    let m = MosquittoServer::start();
    let opts = rumqttc::v5::MqttOptions::new("link-test", "127.0.0.1", m.port());
    let (client, mut link) = Link::start(opts, 512);
    link_event(&mut link, "CONNACK", |ev| {
        matches!(ev, Event::Incoming(Packet::ConnAck(_)))
    })
    .await;
    const N: usize = 300;
    for i in 0..N {
        client
            .try_publish(format!("link/{i}"), QoS::AtLeastOnce, true, "x")
            .expect("request channel has room");
    }
    // The owner reads nothing now (a blocking wait); the broker must still get every
    // message.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut got = 0;
    while got < N && Instant::now() < deadline {
        got = m.retained("link/#", Duration::from_secs(5)).len();
    }
    assert_eq!(got, N, "retained messages at the broker");
    // Then the owner finds every event, in order: N publishes and N acknowledgements.
    let (mut published, mut acked) = (0, 0);
    while published < N || acked < N {
        let ev = tokio::time::timeout(Duration::from_secs(5), link.next())
            .await
            .expect("events queued by the link")
            .expect("no connection error");
        match ev {
            Event::Outgoing(rumqttc::Outgoing::Publish(_)) => {
                assert!(acked <= published, "an acknowledgement before its publish");
                published += 1;
            }
            Event::Incoming(Packet::PubAck(_)) => acked += 1,
            _ => {}
        }
    }
}

/// The link pings the broker on its own: with a 5 s keep-alive (rumqttc's least) and no
/// traffic for 12 s (Mosquitto drops a client silent for 1.5 keep-alives), the
/// connection stays up, and a publish afterwards is acknowledged on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_link_keeps_its_connection_with_pings() {
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use skusync::sinks::mqtt::link::Link;

    let m = MosquittoServer::start();
    let mut opts = rumqttc::v5::MqttOptions::new("link-idle", "127.0.0.1", m.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut link) = Link::start(opts, 16);
    let mut pings = 0;
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut connacks = 0;
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline.into(), link.next()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => connacks += 1,
            Ok(Ok(Event::Incoming(Packet::PingResp(_)))) => pings += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the idle connection failed: {e}"),
            Err(_) => break,
        }
    }
    assert_eq!(connacks, 1, "one connection");
    assert!(pings >= 2, "pings answered while idle: {pings}");
    client
        .publish("idle/after", QoS::AtLeastOnce, true, "x")
        .await
        .unwrap();
    link_event(&mut link, "PUBACK on the same connection", |ev| {
        matches!(ev, Event::Incoming(Packet::PubAck(_)))
    })
    .await;
}

/// Waits (10 s at most) for the link's first event that `is` accepts; a connection
/// error fails the test.
async fn link_event(
    link: &mut skusync::sinks::mqtt::link::Link,
    what: &str,
    is: impl Fn(&rumqttc::v5::Event) -> bool,
) {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match link.next().await {
                Ok(ev) if is(&ev) => return,
                Ok(_) => {}
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        }
    });
    found
        .await
        .unwrap_or_else(|_| panic!("no {what} within 10 s"));
}

/// Item 9 of the reliability issue (confirmed): a publish queued after the connection
/// failed but before the publisher saw the error stayed in rumqttc's request channel and
/// went out first on the next connection, so every later `Outgoing::Publish` (and its
/// PUBACK) was matched to the request queued before it. The link drops such requests
/// before it reconnects: the first publish on the new connection is the first one queued
/// after the error was handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_queued_before_a_reconnect_is_never_sent_on_the_next_connection() {
    use rumqttc::Outgoing;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{Event, MqttOptions};
    use skusync::sinks::mqtt::link::Link;

    let mut broker = crate::harness::MosquittoServer::start();
    let mut opts = MqttOptions::new("link-test", "127.0.0.1", broker.port());
    opts.set_clean_start(true);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut link) = Link::start(opts, 16);
    let next = async |link: &mut Link| {
        tokio::time::timeout(Duration::from_secs(10), link.next())
            .await
            .expect("an event within 10 s")
    };
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = next(&mut link).await.expect("connects") {
            break;
        }
    }
    broker.kill9();
    // The link reports the error and waits; the publisher has not handled it yet and
    // queues one more publish.
    loop {
        if next(&mut link).await.is_err() {
            break;
        }
    }
    client
        .try_publish("t/stale", QoS::AtLeastOnce, true, "stale")
        .unwrap();
    broker.start_again();
    link.resume();
    let mut outgoing = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut fresh_sent = false;
    while Instant::now() < deadline {
        match next(&mut link).await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client
                    .try_publish("t/fresh", QoS::AtLeastOnce, true, "fresh")
                    .unwrap();
                fresh_sent = true;
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => outgoing.push(pkid),
            Ok(Event::Incoming(Packet::PubAck(_))) if fresh_sent => break,
            Ok(_) => {}
            Err(_) => link.resume(),
        }
    }
    assert_eq!(
        outgoing.len(),
        1,
        "only the publish queued after the reconnect goes out: {outgoing:?}"
    );
    let stale = broker.retained("t/stale", Duration::from_secs(2));
    assert!(
        stale.is_empty(),
        "the stale publish never reached the broker"
    );
    assert_eq!(broker.retained("t/fresh", Duration::from_secs(2)).len(), 1);
}

async fn meta_field(con: &mut ConnectionManager, f: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(format!("{RP}:meta"))
        .arg(f)
        .query_async(con)
        .await
        .expect("HGET meta")
}

/// The retained epoch payload as text.
fn retained_epoch(m: &MosquittoServer) -> Option<String> {
    m.retained("p/epoch", Duration::from_secs(5))
        .into_iter()
        .next()
        .map(|(_, p)| String::from_utf8_lossy(&p).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_mark_records_the_epoch_sequence_and_only_raises_it() {
    let r = RedisServer::start();
    let mut con = redis(&r).await;
    let key = skusync::sinks::layout::sku_key(RP, "s");
    hset(&mut con, "s", &[("lsn", "10".into())]).await;
    let mark = |lsn: &str, seq: Option<&str>| {
        let mut c = redis::cmd("EVAL");
        c.arg(mqtt::MARK_PUBLISHED)
            .arg(1)
            .arg(&key)
            .arg(lsn)
            .arg("0")
            .arg("{}");
        if let Some(s) = seq {
            c.arg(s);
        }
        c
    };
    let con2 = con.clone();
    let run = async |lsn: &str, seq: Option<&str>| {
        mark(lsn, seq)
            .query_async::<Vec<i64>>(&mut con2.clone())
            .await
            .expect("mark")
    };
    assert_eq!(run("10", Some("7")).await, vec![1]);
    assert_eq!(hget(&mut con, "s", "pub_seq").await.as_deref(), Some("7"));
    // the same state acknowledged again in a later epoch (a republish): raised
    assert_eq!(run("10", Some("9")).await, vec![0]);
    assert_eq!(hget(&mut con, "s", "pub_seq").await.as_deref(), Some("9"));
    // a late acknowledgement from an earlier epoch never lowers it
    assert_eq!(run("10", Some("8")).await, vec![0]);
    assert_eq!(hget(&mut con, "s", "pub_seq").await.as_deref(), Some("9"));
    // an older state is not marked at all
    assert_eq!(run("9", Some("12")).await, vec![0]);
    assert_eq!(hget(&mut con, "s", "pub_seq").await.as_deref(), Some("9"));
    // a newer state (the hash moved on) takes its own epoch's sequence
    hset(&mut con, "s", &[("lsn", "12".into())]).await;
    assert_eq!(run("11", Some("10")).await, vec![1]);
    assert_eq!(hget(&mut con, "s", "pub_seq").await.as_deref(), Some("10"));
    // callers without a sequence leave it alone
    assert_eq!(run("12", None).await, vec![1]);
    assert_eq!(hget(&mut con, "s", "pub_lsn").await.as_deref(), Some("12"));
    assert_eq!(hget(&mut con, "s", "pub_seq").await.as_deref(), Some("10"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_sequence_advances_while_states_are_acknowledged() {
    let (r, m) = (RedisServer::start(), MosquittoServer::start());
    let (mut con, p) = three_skus_published(&r, &m).await;
    let token = epoch_stored(&con).await;
    let seq_of = async |con: &mut ConnectionManager| -> u64 {
        meta_field(con, "mqtt_epoch_seq")
            .await
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let first = seq_of(&mut con).await;
    assert!(first >= 1, "the new token's epoch has a sequence");
    hset(
        &mut con,
        "a",
        &[("on_hand", "5".into()), ("lsn", "300".into())],
    )
    .await;
    p.handle.changed(["a".to_string()]);
    wait_published(&mut con, "a", 300).await;
    assert_eq!(
        hget(&mut con, "a", "pub_seq").await,
        Some(first.to_string()),
        "marked with the epoch it was sent in"
    );
    until("epoch sequence advanced", mqtt::EPOCH_INTERVAL * 3, || {
        let mut con = con.clone();
        async move { (seq_of(&mut con).await > first).then_some(()) }
    })
    .await;
    let seq = seq_of(&mut con).await;
    assert_eq!(epoch_stored(&con).await, token, "same token");
    assert_eq!(retained_epoch(&m), Some(format!("{token}:{seq}")));
    // nothing acknowledged since: the sequence stays
    tokio::time::sleep(mqtt::EPOCH_INTERVAL + Duration::from_secs(1)).await;
    assert_eq!(seq_of(&mut con).await, seq);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clean_stop_the_next_start_republishes_nothing() {
    let r = RedisServer::start();
    let m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    let want = three_skus(&mut con).await;
    let cfg = publisher_config(mqtt_config(m.url()));
    let p = Running::start(cfg.clone(), &r).await;
    for (sku, lsn) in &want {
        wait_published(&mut con, sku, *lsn).await;
    }
    epoch_stored(&con).await;
    // acknowledged just before the stop, well inside the epoch interval
    hset(
        &mut con,
        "a",
        &[("on_hand", "5".into()), ("lsn", "300".into())],
    )
    .await;
    p.handle.changed(["a".to_string()]);
    wait_published(&mut con, "a", 300).await;
    p.stop().await;

    let p2 = Running::publishing(cfg, &r).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = p2.handle.stats().snapshot();
    assert_eq!(
        s.published, 0,
        "the last epoch covered every acknowledged state"
    );
    assert_eq!(s.epoch_republishes, 0);
    assert_eq!(s.epoch_rollbacks, 0);
    p2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_go_by_sha_and_a_flushed_script_cache_loses_no_mark_and_republishes_nothing() {
    let (r, m) = (RedisServer::start(), MosquittoServer::start());
    let (mut con, p) = three_skus_published(&r, &m).await;
    epoch_stored(&con).await;
    // Redis forgets every script (as a restarted node or a promoted replica has none)
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    let before = p.handle.stats().snapshot().published;
    hset(
        &mut con,
        "a",
        &[("on_hand", "9".into()), ("lsn", "300".into())],
    )
    .await;
    p.handle.changed(["a".to_string()]);
    wait_published(&mut con, "a", 300).await;
    let errors: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(&mut con)
        .await
        .unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .unwrap();
    // (redis-rs answers a refused EVALSHA of its own with SCRIPT LOAD; the marks resend
    // the script with EVAL instead, so the refusal seen was the mark's)
    assert!(
        errors.contains("errorstat_NOSCRIPT") && command_calls(&stats, "script|load").is_none(),
        "the mark went by SHA and was refused: {errors}\n{stats}"
    );
    let sha = redis::Script::new(mqtt::MARK_PUBLISHED)
        .get_hash()
        .to_string();
    let cached: Vec<i64> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&sha)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(cached, vec![1], "the retry sent the script itself");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        p.handle.stats().snapshot().published - before,
        1,
        "only the changed SKU was published: the refused mark was recorded, not republished"
    );
    assert!(hget(&mut con, "a", "pub_state").await.is_some());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_written_before_sequences_is_read_without_a_republish() {
    let r = RedisServer::start();
    let m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    for (i, sku) in ["a", "b"].iter().enumerate() {
        let lsn = (100 + i).to_string();
        // acknowledged by an older skusync: no pub_seq
        hset(
            &mut con,
            sku,
            &[
                ("on_hand", "1".into()),
                ("lsn", lsn.clone()),
                ("pub_lsn", lsn),
                ("pub_piece", "0".into()),
            ],
        )
        .await;
    }
    redis::cmd("HSET")
        .arg(format!("{RP}:meta"))
        .arg("mqtt_epoch")
        .arg("00000000feedface")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    m.publish("p/epoch", b"00000000feedface", true);
    let p = Running::publishing(publisher_config(mqtt_config(m.url())), &r).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = p.handle.stats().snapshot();
    assert_eq!(s.epoch_republishes, 0, "the bare token matched");
    assert_eq!(s.published, 0, "nothing republished");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_holding_an_older_epoch_sequence_gets_only_the_later_skus_again() {
    let r = RedisServer::start();
    let m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    // "old" was acknowledged in epoch 3, "new" in epoch 5; the broker holds epoch 4
    for (sku, seq) in [("old", "3"), ("new", "5")] {
        hset(
            &mut con,
            sku,
            &[
                ("on_hand", "1".into()),
                ("lsn", "100".into()),
                ("pub_lsn", "100".into()),
                ("pub_piece", "0".into()),
                ("pub_seq", seq.into()),
            ],
        )
        .await;
    }
    redis::cmd("HSET")
        .arg(format!("{RP}:meta"))
        .arg("mqtt_epoch")
        .arg("00000000feedface")
        .arg("mqtt_epoch_seq")
        .arg("6")
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    m.publish("p/epoch", b"00000000feedface:4", true);
    let p = Running::publishing(publisher_config(mqtt_config(m.url())), &r).await;
    until("new republished", Duration::from_secs(10), || {
        let s = p.handle.stats().snapshot();
        async move { (s.published >= 1).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = p.handle.stats().snapshot();
    assert_eq!(
        s.published, 1,
        "only the SKU acknowledged at or after epoch 4"
    );
    assert_eq!(s.epoch_republishes, 0);
    assert_eq!(s.epoch_rollbacks, 1);
    let topics: Vec<String> = retained(&m, "p/sku/#")
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(topics, vec!["p/sku/new".to_string()]);
    // marked with a sequence above the broker's (the later epochs continue from 6)
    let seq: u64 = hget(&mut con, "new", "pub_seq")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(seq >= 6, "pub_seq {seq}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_the_broker_refused_is_unmarked_and_sent_again_once_it_is_allowed() {
    let acl = |sku_rule: &str| {
        format!(
            "user skusync\ntopic readwrite p/status\ntopic readwrite p/epoch\ntopic write p/alerts/#\n{sku_rule}"
        )
    };
    let mut m = MosquittoServer::start_with(MqttOptions {
        users: vec![("skusync".into(), "pw".into())],
        acl: Some(acl("")),
        ..Default::default()
    });
    let r = RedisServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    // Published to an earlier broker: Redis marks it published, so only a republish
    // that does not trust the mark sends it here.
    hset(
        &mut con,
        "X",
        &[
            ("on_hand", "2".into()),
            ("lsn", "3".into()),
            ("pub_lsn", "3".into()),
            ("pub_seq", "0".into()),
        ],
    )
    .await;
    let url = m.url().replace("mqtt://", "mqtt://skusync:pw@");
    let p = Running::start(publisher_config(mqtt_config(url)), &r).await;
    until("refusal counted", Duration::from_secs(15), || {
        let n = p.handle.stats().snapshot().refusals;
        async move { (n >= 1).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hget(&mut con, "X", "pub_lsn").await,
        None,
        "Redis no longer says published, so no epoch can hide it"
    );
    assert!(retained(&m, "p/sku/#").is_empty());
    // so the full republish completes, and its epoch is stored, while X is refused
    until("the epoch stored", Duration::from_secs(10), || {
        let mut con = con.clone();
        async move { meta_field(&mut con, "mqtt_epoch").await }
    })
    .await;
    // The operator fixes the ACL; the broker reloads it, the connection stays.
    m.set_acl(&acl("topic readwrite p/sku/#\n"));
    until(
        "the refused state retained",
        Duration::from_secs(20),
        || {
            let got = retained(&m, "p/sku/X");
            async move { got.first().map(|(_, v)| v["on_hand"] == 2).filter(|ok| *ok) }
        },
    )
    .await;
    wait_published(&mut con, "X", 3).await;
    assert!(p.handle.stats().snapshot().refusals >= 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_onto_lower_lsns_in_the_same_process_is_published() {
    let r = RedisServer::start();
    let m = MosquittoServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    hset(
        &mut con,
        "X",
        &[("on_hand", "1".into()), ("lsn", "1000".into())],
    )
    .await;
    let p = Running::start(publisher_config(mqtt_config(m.url())), &r).await;
    wait_published(&mut con, "X", 1000).await;
    // A PostgreSQL failover to a standby that was behind: Redis is rebuilt from its
    // snapshot, at an LSN below the one published.
    p.handle.pause().await;
    redis::cmd("DEL")
        .arg(skusync::sinks::layout::sku_key(RP, "X"))
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    hset(
        &mut con,
        "X",
        &[("on_hand", "7".into()), ("lsn", "500".into())],
    )
    .await;
    p.handle.resume();
    wait_published(&mut con, "X", 500).await;
    let got = retained(&m, "p/sku/X");
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].1["on_hand"], 7,
        "the rebuilt state, not the lost one"
    );
    p.stop().await;
}

/// Broker A took epoch `k` but a kill cut off its store in Redis (which holds `k - 1`);
/// skusync then published X's change to another broker of its list, marked with Redis'
/// sequence `k - 1` (stood in for here by writing that mark). Back on A, whose token
/// matches, the scan must start from Redis' sequence, not A's higher one: from A's, X
/// looks published and A keeps the old state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_marked_after_an_unrecorded_epoch_are_republished_to_the_broker_that_took_it() {
    let mut a = MosquittoServer::start_with(MqttOptions {
        persistence: true,
        ..Default::default()
    });
    let r = RedisServer::start();
    let mut con = redis(&r).await;
    meta(&mut con).await;
    hset(
        &mut con,
        "X",
        &[("on_hand", "1".into()), ("lsn", "3".into())],
    )
    .await;
    let p = Running::start(publisher_config(mqtt_config(a.url())), &r).await;
    wait_published(&mut con, "X", 3).await;
    p.stop().await;
    let k: u64 = meta_field(&mut con, "mqtt_epoch_seq")
        .await
        .expect("an epoch stored at the clean stop")
        .parse()
        .unwrap();
    assert!(k >= 1);
    a.restart();
    assert!(
        retained_epoch(&a).is_some_and(|e| e.ends_with(&format!(":{k}"))),
        "A keeps epoch {k}"
    );
    redis::cmd("HSET")
        .arg(format!("{RP}:meta"))
        .arg("mqtt_epoch_seq")
        .arg(k - 1)
        .query_async::<()>(&mut con)
        .await
        .unwrap();
    hset(
        &mut con,
        "X",
        &[
            ("on_hand", "9".into()),
            ("lsn", "10".into()),
            ("pub_lsn", "10".into()),
            ("pub_seq", (k - 1).to_string()),
        ],
    )
    .await;
    let p = Running::start(publisher_config(mqtt_config(a.url())), &r).await;
    until("X's change on A", Duration::from_secs(20), || {
        let got = retained(&a, "p/sku/X");
        async move { got.first().map(|(_, v)| v["on_hand"] == 9).filter(|ok| *ok) }
    })
    .await;
    p.stop().await;
}
