//! The clients' catch-up API (`[api]`, docs/mobile.md) against real PostgreSQL, Redis and
//! Mosquitto: a phone that was offline catches up to exactly Redis' state and gets every
//! alert it missed; bad requests get one-line JSON errors, never a 500; MQTT 5 properties
//! and CBOR payloads.

use crate::fold_oracle::*;
use crate::harness::{MosquittoServer, free_port};
use crate::mqtt_e2e::{Subscriber, mqtt_toml};
use crate::oracle::*;
use crate::support::{HttpReply, http_get, http_request};
use serde_json::Value;
use skusync::sinks::layout;
use skusync::sinks::mqtt::encode_sku;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

fn api_toml(port: u16, extra: &str) -> String {
    format!(
        "\n[api]\nlisten = \"127.0.0.1:{port}\"\ncors_origin = \"*\"\nrate_per_s = 1000.0\nburst = 1000\n{extra}"
    )
}

/// What a client holds: per SKU the message with the greatest `rev` (`None`: gone).
#[derive(Default)]
struct Held {
    skus: BTreeMap<String, (String, Option<Value>)>,
}

impl Held {
    /// Apply one state or gone object by the contract's ordering rule.
    fn apply(&mut self, v: &Value) {
        let sku = v["sku"].as_str().expect("sku").to_string();
        let rev = v["rev"].as_str().expect("rev").to_string();
        assert_eq!(rev.len(), 35, "{v}");
        if let Some((held, _)) = self.skus.get(&sku)
            && *held >= rev
        {
            return;
        }
        let state = (v.get("gone") != Some(&Value::Bool(true))).then(|| v.clone());
        self.skus.insert(sku, (rev, state));
    }

    fn live(&self) -> BTreeMap<&String, &Value> {
        self.skus
            .iter()
            .filter_map(|(k, (_, v))| v.as_ref().map(|v| (k, v)))
            .collect()
    }
}

/// Page through `/v1/changes` from `since` (None: the full state) with `limit`; returns
/// the last `next` and how many pages it took.
fn catch_up(port: u16, since: Option<&str>, limit: usize, held: &mut Held) -> (String, usize) {
    let mut since = since.map(str::to_string);
    let mut pages = 0;
    loop {
        let target = match &since {
            Some(t) => format!("/v1/changes?since={t}&limit={limit}"),
            None => format!("/v1/changes?limit={limit}"),
        };
        let r = http_get(port, &target, &[]);
        assert_eq!(r.status, 200, "{target}: {}", r.body);
        let j = r.json();
        let changes = j["changes"].as_array().expect("changes");
        assert!(changes.len() <= limit);
        for c in changes {
            held.apply(c);
        }
        pages += 1;
        since = Some(j["next"].as_str().expect("next").to_string());
        if j["more"] != Value::Bool(true) {
            return (since.unwrap(), pages);
        }
        assert!(pages < 10_000, "paging does not end");
    }
}

/// Every alert from `/v1/alerts` after `since`; returns them and the last `next`.
fn alerts_since(port: u16, since: Option<&str>) -> (Vec<Value>, String) {
    let mut out = Vec::new();
    let mut since = since.map(str::to_string);
    loop {
        let target = match &since {
            Some(s) => format!("/v1/alerts?since={s}&limit=3"),
            None => "/v1/alerts?limit=3".to_string(),
        };
        let r = http_get(port, &target, &[]);
        assert_eq!(r.status, 200, "{target}: {}", r.body);
        let j = r.json();
        out.extend(j["alerts"].as_array().expect("alerts").iter().cloned());
        since = Some(j["next"].as_str().expect("next").to_string());
        if j["more"] != Value::Bool(true) {
            return (out, since.unwrap());
        }
    }
}

/// The stock moves that raise low_stock, out_of_stock and back_in_stock on `sku`.
fn alert_moves(sku: &str) -> [String; 3] {
    [
        format!("UPDATE inventory SET on_hand = 3, reserved = 0 WHERE sku = '{sku}'"),
        format!("UPDATE inventory SET on_hand = 0 WHERE sku = '{sku}'"),
        format!("UPDATE inventory SET on_hand = 40 WHERE sku = '{sku}'"),
    ]
}

/// The held states equal Redis: stock and lifetime counters of every SKU, and no SKU
/// held that Redis has as gone or not at all.
async fn held_mismatches(rig: &mut Rig, held: &Held) -> Vec<String> {
    let state = rig.oracle.redis_state(&mut rig.con).await;
    let live = held.live();
    let mut out = Vec::new();
    for (sku, h) in &state {
        let gone = crate::oracle::redis_says_gone(h);
        match (live.get(sku), gone) {
            (None, true) => {}
            (Some(_), true) => out.push(format!("{sku:?}: gone in Redis, held by the client")),
            (None, false) => out.push(format!("{sku:?}: in Redis, not held by the client")),
            (Some(j), false) => {
                for f in [
                    "on_hand",
                    "reserved",
                    "available",
                    "views",
                    "carts",
                    "purchases",
                ] {
                    let want: i64 = h.get(f).and_then(|v| v.parse().ok()).unwrap_or(0);
                    let got = j.get(f).and_then(Value::as_i64).unwrap_or(0);
                    if want != got {
                        out.push(format!("{sku:?}.{f}: Redis {want}, client {got}"));
                    }
                }
                let lsn: u64 = h.get("lsn").and_then(|s| s.parse().ok()).unwrap_or(0);
                let rev = j["rev"].as_str().unwrap_or("");
                if !rev.starts_with(&format!("{lsn:016x}")) {
                    out.push(format!("{sku:?}: Redis lsn {lsn}, client rev {rev}"));
                }
            }
        }
    }
    for sku in live.keys() {
        if !state.contains_key(*sku) {
            out.push(format!("{sku:?}: held, not in Redis"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_subscriber_catches_up_through_changes_to_exactly_redis_and_gets_every_alert() {
    let seed = test_seed("an_offline_subscriber_catches_up");
    let broker = MosquittoServer::start();
    let port = free_port();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('ALERT-0', 'WH-1', 50, 0), ('ALERT/1', 'WH-1', 50, 0), ('ALERT{2}', 'WH-2', 50, 0)")
        .await;
    rig.start_skusync(&format!("{}{}", mqtt_toml(&broker, 20), api_toml(port, "")))
        .await;
    // An always-online subscriber sees every alert (at least once).
    let online = Subscriber::start(&broker, "skusync/alerts/+");
    let mut w = public_workload(seed);
    run_workload(&mut rig, &mut w, 300, async |_, _| {}).await;
    for m in alert_moves("ALERT-0") {
        rig.exec(&m).await;
    }
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;

    // The phone: the full state in small pages, and the alert history.
    let mut held = Held::default();
    let (token, pages) = catch_up(port, None, 7, &mut held);
    assert!(pages > 3, "paged ({pages} pages)");
    assert!(held_mismatches(&mut rig, &held).await.is_empty());
    let (before, alert_seq) = alerts_since(port, None);
    let ids_before: BTreeSet<String> = before
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        ids_before
            .iter()
            .any(|i| i.ends_with(":out_of_stock:ALERT-0")),
        "{ids_before:?}"
    );

    // Offline: more transactions, alerts on three SKUs, a SKU deleted, skusync SIGKILLed.
    run_workload(&mut rig, &mut w, 400, async |rig: &mut Rig, i: usize| {
        if i == 30 {
            rig.daemon().kill9_and_restart();
        }
    })
    .await;
    for sku in ["ALERT/1", "ALERT{2}"] {
        for m in alert_moves(sku) {
            rig.exec(&m).await;
        }
    }
    rig.exec("DELETE FROM inventory WHERE sku = 'ALERT-0'")
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(60))
        .await;
    rig.assert_converges(Duration::from_secs(30)).await;

    // Back online: catch up from the token, exactly to Redis.
    let (next, _) = catch_up(port, Some(&token), 5, &mut held);
    let m = held_mismatches(&mut rig, &held).await;
    assert!(m.is_empty(), "after catch-up:\n{}", m.join("\n"));
    assert!(
        held.skus.get("ALERT-0").is_some_and(|(_, s)| s.is_none()),
        "the deleted SKU came back as gone"
    );
    // Nothing changed since: the next catch-up is empty (or repeats, never misses).
    let (_, _) = catch_up(port, Some(&next), 50, &mut held);

    // Every alert raised while offline is in the history after the phone's last seq.
    let (missed, _) = alerts_since(port, Some(&alert_seq));
    let ids_missed: BTreeSet<String> = missed
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    let seq_of = |s: &str| -> (u64, u64) {
        let (a, b) = s.split_once('-').unwrap_or_else(|| panic!("seq {s:?}"));
        (a.parse().unwrap(), b.parse().unwrap())
    };
    for a in &missed {
        assert_eq!(a["v"], 2);
        assert!(
            seq_of(a["seq"].as_str().unwrap()) > seq_of(&alert_seq),
            "{a} after {alert_seq}"
        );
    }
    for sku in ["ALERT/1", "ALERT{2}"] {
        for kind in ["low_stock", "out_of_stock", "back_in_stock"] {
            assert!(
                ids_missed
                    .iter()
                    .any(|i| i.ends_with(&format!(":{kind}:{sku}"))),
                "{kind} of {sku} missing from {ids_missed:?}"
            );
        }
    }
    // ... and exactly the alerts the online subscriber saw after the phone went offline.
    let deadline = Instant::now() + Duration::from_secs(20);
    let online_ids = loop {
        let ids: BTreeSet<String> = online
            .messages()
            .iter()
            .filter_map(|(_, p)| serde_json::from_str::<Value>(p).ok())
            .filter_map(|a| a["id"].as_str().map(str::to_string))
            .collect();
        if ids.is_superset(&ids_missed) || Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let online_after: BTreeSet<String> = online_ids.difference(&ids_before).cloned().collect();
    assert_eq!(
        online_after, ids_missed,
        "history after the seq = alerts published meanwhile"
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_bad_requests_with_one_line_json_errors_and_never_500() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("api.key");
    std::fs::write(
        &key_file,
        "0123456789abcdef0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    // a key others can read is refused (`secret::read_key_file`)
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('a/b', 'WH-1', 9, 1), ('{x}', 'WH-1', 3, 0), ('ünï', 'WH-2', 4, 0), ('', 'WH-1', 2, 0), ('plain', 'WH-1', 5, 0), ('q?1 %', 'WH-1', 1, 0)")
        .await;
    let extra = format!(
        "tokens = [\"static-token-0123456789\"]\ntoken_key_file = \"{}\"\n",
        key_file.display()
    );
    rig.start_skusync(&api_toml(port, &extra)).await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let auth = [("Authorization", "Bearer static-token-0123456789")];
    let get = |t: &str| http_get(port, t, &auth);
    let mut statuses = Vec::new();
    let mut check = |r: HttpReply, want: u16, what: &str| {
        assert_eq!(r.status, want, "{what}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
        if want >= 400 {
            let j = r.json();
            assert!(
                j["error"]
                    .as_str()
                    .is_some_and(|e| !e.is_empty() && !e.contains('\n')),
                "{what}: {j}"
            );
            assert_eq!(j.as_object().unwrap().len(), 1, "{what}: one member");
        }
        statuses.push(r.status);
        r
    };

    // Authentication.
    check(http_get(port, "/v1/sku/plain", &[]), 401, "no token");
    check(
        http_get(
            port,
            "/v1/sku/plain",
            &[("Authorization", "Bearer wrong-token-0123456789")],
        ),
        401,
        "bad token",
    );
    let cfg = rig.dir.path().join("skusync.toml");
    let issue = |ttl: &str| {
        let out = std::process::Command::new(crate::support::skusync_bin())
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "token",
                "--subject",
                "phone-7",
                "--ttl",
                ttl,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let signed = issue("3600");
    check(
        http_get(
            port,
            "/v1/sku/plain",
            &[("Authorization", &format!("Bearer {signed}"))],
        ),
        200,
        "signed token",
    );
    let expired = issue("0");
    let r = check(
        http_get(
            port,
            "/v1/sku/plain",
            &[("Authorization", &format!("Bearer {expired}"))],
        ),
        401,
        "expired",
    );
    assert!(r.body.contains("expired"));

    // SKUs with odd characters, encoded like topic levels.
    for sku in ["a/b", "{x}", "ünï", "", "plain"] {
        let r = check(get(&format!("/v1/sku/{}", encode_sku(sku))), 200, sku);
        let j = r.json();
        assert_eq!(j["sku"], sku);
        assert_eq!(j["v"], 2);
        assert!(j.get("delta").is_none(), "no delta over HTTP");
        assert!(j["alert_state"].as_str().is_some(), "{j}");
    }
    // Any standard percent-encoding names the same SKU: what URL libraries send (fetch
    // escapes `{`, encodeURIComponent escapes more, some write lower-case hex).
    for (path, sku) in [
        ("/v1/sku/%7Bx%7D", "{x}"),
        ("/v1/sku/%7bx%7d", "{x}"),
        ("/v1/sku/a%2fb", "a/b"),
        ("/v1/sku/%c3%bcn%C3%AF", "ünï"),
        ("/v1/sku/q%3F1%20%25", "q?1 %"),
        ("/v1/sku/%70lain", "plain"),
    ] {
        let r = check(get(path), 200, path);
        assert_eq!(r.json()["sku"], sku, "{path}");
    }
    let r = check(get("/v1/sku/a%2Fb"), 200, "a/b");
    assert_eq!(
        (r.json()["on_hand"].clone(), r.json()["available"].clone()),
        (9.into(), 8.into())
    );
    // ETag
    let etag = r.header("etag").expect("etag").to_string();
    let r304 = http_get(port, "/v1/sku/a%2Fb", &[auth[0], ("If-None-Match", &etag)]);
    assert_eq!(r304.status, 304);
    assert!(r304.body.is_empty());
    rig.exec("UPDATE inventory SET on_hand = 10 WHERE sku = 'a/b'")
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let r = http_get(port, "/v1/sku/a%2Fb", &[auth[0], ("If-None-Match", &etag)]);
    assert_eq!(r.status, 200, "changed: the old ETag no longer matches");
    assert_eq!(r.json()["on_hand"], 10);

    // A browser's script may read the back-off and the validator.
    assert_eq!(
        get("/v1/sku/plain").header("access-control-expose-headers"),
        Some("ETag, Retry-After")
    );
    // Bad input.
    check(
        get(&format!("/v1/sku/{}", "x".repeat(20_000))),
        400,
        "a head over the limit",
    );
    check(get("/v1/sku/nope"), 404, "unknown SKU");
    check(get("/v1/sku/%FF%FE"), 400, "not UTF-8");
    check(get("/v1/changes?since=zz"), 400, "malformed token");
    check(get("/v1/changes?since=1.2"), 400, "malformed token");
    check(get("/v1/changes?limit=100000"), 400, "huge limit");
    check(get("/v1/changes?limit=0"), 400, "zero limit");
    check(get("/v1/changes?limit=-5"), 400, "negative limit");
    // A history that exists but was trimmed empty: `next` is past what was dropped, so
    // the next catch-up from it is no 410.
    rig.redis.cli(&["DEL", "skusync:alerts"]);
    rig.redis
        .cli(&["XADD", "skusync:alerts", "5-1", "bogus", "1"]);
    rig.redis.cli(&["XDEL", "skusync:alerts", "5-1"]);
    let r = check(get("/v1/alerts"), 200, "an emptied history");
    let next = r.json()["next"].as_str().unwrap().to_string();
    assert_ne!(next, "0-0");
    check(
        get(&format!("/v1/alerts?since={next}")),
        200,
        "from an emptied history",
    );
    check(
        get("/v1/alerts?since=0-0"),
        410,
        "from before what was dropped",
    );
    check(get("/v1/alerts?since=abc"), 400, "malformed seq");
    check(get("/v1/alerts?since=%ZZ"), 400, "bad encoding");
    check(get("/v2/anything"), 404, "unknown path");
    check(
        http_request(port, "POST", "/v1/changes", &auth),
        405,
        "read-only",
    );
    check(
        http_request(port, "DELETE", "/v1/sku/plain", &auth),
        405,
        "read-only",
    );
    let pre = http_request(port, "OPTIONS", "/v1/changes", &[]);
    assert_eq!(pre.status, 204, "CORS preflight needs no token");
    assert_eq!(pre.header("access-control-allow-origin"), Some("*"));
    assert!(
        pre.header("access-control-allow-headers")
            .unwrap()
            .contains("Authorization")
    );

    // A token from before a rebuild answers 410; the full state works.
    let r = check(get("/v1/changes"), 200, "full state");
    let old = r.json()["next"].as_str().unwrap().to_string();
    let meta = layout::meta_key("skusync");
    let from_before = hget(&mut rig.con, &meta, "changes_from").await;
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("bootstrap")
        .arg("stale")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let now = hget(&mut rig.con, &meta, "changes_from").await;
        let done = hget(&mut rig.con, &meta, "bootstrap").await.as_deref() == Some("done");
        if done && now != from_before {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no rebuild\n{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = check(
        get(&format!("/v1/changes?since={old}")),
        410,
        "token from before the rebuild",
    );
    assert!(r.body.contains("full state"));
    let r = check(get("/v1/changes"), 200, "full state after the rebuild");
    let n = r.json()["changes"].as_array().unwrap().len();
    assert!(n >= 6, "{n}");
    // A rebuild onto lower LSNs (a failover to a standby that was behind; simulated by
    // lowering `changes_from`): tokens from before it answer 410 too, though their LSNs
    // are above the new start, and so do page tokens of a full listing.
    let last = r.json()["next"].as_str().unwrap().to_string();
    let r = check(get("/v1/changes?limit=1"), 200, "a first page");
    assert_eq!(r.json()["more"], serde_json::json!(true));
    let page = r.json()["next"].as_str().unwrap().to_string();
    let from_now = hget(&mut rig.con, &meta, "changes_from").await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("changes_from")
        .arg("1")
        .query_async(&mut rig.con)
        .await
        .unwrap();
    check(
        get(&format!("/v1/changes?since={last}")),
        410,
        "a token from before a rebuild onto lower LSNs",
    );
    check(
        get(&format!("/v1/changes?since={page}")),
        410,
        "a page token from before it",
    );
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("changes_from")
        .arg(&from_now)
        .query_async(&mut rig.con)
        .await
        .unwrap();
    check(
        get(&format!("/v1/changes?since={last}")),
        200,
        "the token again after",
    );

    // The rate limit: a burst beyond it answers 429 with Retry-After.
    assert!(statuses.iter().all(|s| *s < 500), "{statuses:?}");
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_and_others_are_not_slowed() {
    let port = free_port();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync(&format!(
        "\n[api]\nlisten = \"127.0.0.1:{port}\"\nrate_per_s = 2.0\nburst = 5\ntokens = [\"client-one-0123456789\", \"client-two-0123456789\"]\n"
    ))
    .await;
    let one = [("Authorization", "Bearer client-one-0123456789")];
    let two = [("Authorization", "Bearer client-two-0123456789")];
    let codes: Vec<u16> = (0..12)
        .map(|_| http_get(port, "/v1/alerts", &one).status)
        .collect();
    assert!(codes[..5].iter().all(|c| *c == 200), "{codes:?}");
    assert!(codes.contains(&429), "{codes:?}");
    let r = http_get(port, "/v1/alerts", &one);
    if r.status == 429 {
        assert!(
            r.header("retry-after")
                .is_some_and(|v| v.parse::<u64>().is_ok())
        );
        assert!(r.json()["error"].as_str().unwrap().contains("rate"));
    }
    assert_eq!(
        http_get(port, "/v1/alerts", &two).status,
        200,
        "limited per client"
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// MQTT 5 publishes with their properties, from a rumqttc v5 subscriber.
struct Props {
    topic: String,
    payload: Vec<u8>,
    content_type: Option<String>,
    indicator: Option<u8>,
    expiry: Option<u32>,
    user: Vec<(String, String)>,
}

async fn subscribe_v5(
    broker: &MosquittoServer,
    filters: &[&str],
) -> std::sync::Arc<std::sync::Mutex<Vec<Props>>> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new(format!("props-{}", free_port()), "127.0.0.1", broker.port());
    o.set_clean_start(true);
    let (client, mut el) = AsyncClient::new(o, 64);
    for f in filters {
        client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
    }
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let o2 = out.clone();
    tokio::spawn(async move {
        let _keep = client;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let pr = p.properties.clone().unwrap_or_default();
                    o2.lock().unwrap().push(Props {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        content_type: pr.content_type,
                        indicator: pr.payload_format_indicator,
                        expiry: pr.message_expiry_interval,
                        user: pr.user_properties,
                    });
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbor_payloads_carry_the_same_members_and_mqtt5_properties_order_them() {
    let broker = MosquittoServer::start();
    let port = free_port();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('C/1', 'WH-1', 50, 2)")
        .await;
    rig.start_skusync(&format!(
        "{}format = \"cbor\"\n\n[alerts]\nmqtt_expiry_s = 120\n{}",
        mqtt_toml(&broker, 20),
        api_toml(port, "")
    ))
    .await;
    let got = subscribe_v5(&broker, &["skusync/sku/+", "skusync/alerts/+"]).await;
    for m in alert_moves("C/1") {
        rig.exec(&m).await;
    }
    rig.exec("INSERT INTO activity_log (sku, kind, qty) VALUES ('C/1', 'purchase', 2)")
        .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n_alerts = got
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.topic.starts_with("skusync/alerts/"))
            .count();
        let last_state = got
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|p| p.topic == "skusync/sku/C%2F1")
            .and_then(|p| skusync::sinks::mqtt::payload::decode(&p.payload));
        if n_alerts >= 3 && last_state.is_some_and(|s| s["purchases"] == 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all messages arrived: {:?}\n{}",
            got.lock()
                .unwrap()
                .iter()
                .map(|p| (
                    p.topic.clone(),
                    skusync::sinks::mqtt::payload::decode(&p.payload)
                ))
                .collect::<Vec<_>>(),
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let msgs = got.lock().unwrap();
    let mut last_rev = String::new();
    for p in msgs.iter().filter(|p| p.topic == "skusync/sku/C%2F1") {
        assert_eq!(p.content_type.as_deref(), Some("application/cbor"));
        assert_eq!(p.indicator, Some(0));
        assert_eq!(p.expiry, None, "states do not expire");
        assert!((0xa0..=0xbf).contains(&p.payload[0]), "a CBOR map");
        let v = skusync::sinks::mqtt::payload::decode(&p.payload).expect("CBOR");
        let rev = v["rev"].as_str().unwrap().to_string();
        assert_eq!(
            p.user,
            vec![("rev".to_string(), rev.clone())],
            "rev as a user property"
        );
        assert!(rev > last_rev, "in rev order");
        last_rev = rev;
    }
    let alerts: Vec<&Props> = msgs
        .iter()
        .filter(|p| p.topic == "skusync/alerts/C%2F1")
        .collect();
    let kinds: Vec<String> = alerts
        .iter()
        .map(|p| {
            assert_eq!(p.expiry, Some(120), "alerts expire");
            assert_eq!(p.content_type.as_deref(), Some("application/cbor"));
            let v = skusync::sinks::mqtt::payload::decode(&p.payload).expect("CBOR");
            assert_eq!(
                p.user,
                vec![("seq".to_string(), v["seq"].as_str().unwrap().to_string())]
            );
            v["type"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(kinds, ["low_stock", "out_of_stock", "back_in_stock"]);
    // The same members as the JSON the API serves for that state.
    let last = skusync::sinks::mqtt::payload::decode(
        &msgs
            .iter()
            .rev()
            .find(|p| p.topic == "skusync/sku/C%2F1")
            .unwrap()
            .payload,
    )
    .unwrap();
    drop(msgs);
    let http = http_get(port, "/v1/sku/C%2F1", &[]).json();
    let members = |v: &Value| -> BTreeSet<String> {
        v.as_object()
            .unwrap()
            .keys()
            .filter(|k| !matches!(k.as_str(), "delta" | "delta_from" | "as_of"))
            .cloned()
            .collect()
    };
    assert_eq!(members(&last), members(&http));
    for k in [
        "on_hand",
        "reserved",
        "available",
        "locations",
        "purchases",
        "threshold",
        "alert_state",
        "lsn",
    ] {
        assert_eq!(last[k], http[k], "{k}");
    }
    assert_eq!(http["alert_state"], "ok");
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// A Redis slower than the request's budget: `/v1/changes` makes three or four round
/// trips, each under its own timeout but together past the connection's 5 s deadline,
/// which used to cut the client off with no answer. It gets a 503 with `Retry-After`
/// instead, and answers again once Redis is quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_gets_a_503_before_the_connections_deadline() {
    let port = free_port();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('plain', 'WH-1', 5, 0)")
        .await;
    let proxy = crate::harness::proxy::Proxy::start(rig.redis.port());
    let url = rig.redis.url();
    let text = rig.config_text();
    assert!(text.contains(&url), "the config names Redis' URL");
    let text = text.replace(&url, &proxy.url(&url))
        + &api_toml(port, "tokens = [\"static-token-0123456789\"]\n");
    rig.start_with_config(&text).await;
    let auth = [("Authorization", "Bearer static-token-0123456789")];
    assert_eq!(http_get(port, "/v1/changes", &auth).status, 200);
    // each chunk waits 1 s each way: about 2 s per round trip
    proxy.set_delay(Duration::from_millis(1000));
    let t0 = Instant::now();
    let r = http_get(port, "/v1/changes", &auth);
    let took = t0.elapsed();
    proxy.set_delay(Duration::ZERO);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.header("retry-after").is_some(),
        "503 comes with Retry-After"
    );
    assert!(took < Duration::from_secs(5), "answered in {took:?}");
    let start = Instant::now();
    while http_get(port, "/v1/changes", &auth).status != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "answers again once Redis is quick"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// Connect to the API on 127.0.0.1:`port` from the loopback address `src` (Linux routes
/// all of 127.0.0.0/8 to lo, so each stands for a different client).
async fn connect_from(src: &str, port: u16) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    s.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}

/// One request from `src`; the status, or `None` when the connection was closed without
/// an answer (closed on accept).
async fn status_from(src: &str, port: u16, headers: &[(&str, &str)]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = connect_from(src, port).await;
    let mut req = "GET /v1/alerts HTTP/1.1\r\nHost: x\r\n".to_string();
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "no answer and not closed within 10 s");
    String::from_utf8_lossy(&raw)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_from_one_address_leaves_the_api_to_others_and_proxies_name_their_clients() {
    use tokio::io::AsyncWriteExt;
    let port = free_port();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.start_skusync(&format!(
        "\n[api]\nlisten = \"127.0.0.1:{port}\"\nrate_per_s = 0.01\nburst = 2\nmax_connections = 16\nmax_connections_per_address = 3\ntrusted_proxies = [\"127.0.0.3\"]\n"
    ))
    .await;
    // An attacker at 127.0.0.2 trickles request heads: it holds three slots, no more.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.2", port).await;
        s.write_all(b"GET /v1/al").await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        status_from("127.0.0.2", port, &[]).await,
        None,
        "a fourth connection from the same address is closed on accept"
    );
    assert_eq!(
        status_from("127.0.0.1", port, &[]).await,
        Some(200),
        "another address is served"
    );
    // A trusted proxy holds more than three, and its X-Forwarded-For names the client
    // for the rate limit: each client gets its own bucket of two.
    let mut proxied = Vec::new();
    for _ in 0..4 {
        let mut s = connect_from("127.0.0.3", port).await;
        s.write_all(b"GET /v1/al").await.unwrap();
        proxied.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut codes = Vec::new();
    for client in [
        "198.51.100.1",
        "198.51.100.1",
        "198.51.100.1",
        "198.51.100.2",
    ] {
        let xff = format!("203.0.113.66, {client}");
        codes.push(status_from("127.0.0.3", port, &[("X-Forwarded-For", &xff)]).await);
    }
    assert_eq!(
        codes,
        [Some(200), Some(200), Some(429), Some(200)],
        "per forwarded client"
    );
    // An untrusted peer's X-Forwarded-For is ignored: one bucket for the address.
    let mut codes = Vec::new();
    for client in ["198.51.100.3", "198.51.100.4", "198.51.100.5"] {
        codes.push(status_from("127.0.0.4", port, &[("X-Forwarded-For", client)]).await);
    }
    assert_eq!(codes, [Some(200), Some(200), Some(429)], "per address");
    assert!(
        rig.daemon()
            .stderr_contains("list it in api.trusted_proxies"),
        "the cap's first refusal says what a proxy needs"
    );
    drop((held, proxied));
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// A SKU near `limits.max_sku_bytes` (4,000 `{`, whose hash key escapes each as `%7B`): its
/// path and the `/v1/changes` page token that ends at it outgrow 8 KiB. The request head
/// limit follows `max_sku_bytes`; before, such a SKU could not be fetched and paging
/// stopped at it for good (a 400 the client does not retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sku_near_max_sku_bytes_is_fetched_and_paged_past() {
    let port = free_port();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec(
        "INSERT INTO inventory VALUES (repeat('{', 4000), 'WH-1', 3, 0), ('after', 'WH-1', 1, 0)",
    )
    .await;
    rig.start_skusync(&format!(
        "\n[limits]\nmax_sku_bytes = 4096\n{}",
        api_toml(port, "")
    ))
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let long = "{".repeat(4000);
    let r = http_get(port, &format!("/v1/sku/{}", "%7B".repeat(4000)), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["sku"], long.as_str());
    // page by one: every SKU is listed, the long one too, and paging goes on past it
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..20 {
        let q = match &next {
            Some(t) => format!("/v1/changes?limit=1&since={t}"),
            None => "/v1/changes?limit=1".to_string(),
        };
        let r = http_get(port, &q, &[]);
        assert_eq!(r.status, 200, "{q:.80}: {}", r.body);
        let j = r.json();
        for c in j["changes"].as_array().unwrap() {
            seen.push(c["sku"].as_str().unwrap().to_string());
        }
        next = Some(j["next"].as_str().unwrap().to_string());
        if j["more"] != true {
            break;
        }
    }
    assert!(seen.contains(&long), "the long SKU was listed");
    assert!(seen.contains(&"after".to_string()), "{seen:.100?}");
}

/// The alert history keeps `[alerts] history` alerts; a client whose `since` is older than
/// what is kept gets 410 (and lists the history again), one within it 200. Redis' own
/// trimming records nothing a reader can compare with (`max-deleted-entry-id` stays 0-0
/// after XTRIM), so the scripts trim exactly and record the greatest id they drop (XSETID
/// MAXDELETEDID). Before, such a client got 200 with the kept alerts and silently missed
/// the dropped ones, and a webhook never logged alerts trimmed before delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_older_than_the_kept_alert_history_answers_410() {
    let port = free_port();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('H-1', 'WH-1', 50, 0)")
        .await;
    rig.start_skusync(&format!(
        "\n[alerts]\nhistory = 100\n{}",
        api_toml(port, "")
    ))
    .await;
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    // out of stock, back in stock, ...: 105 alerts, one per transaction
    for i in 0..105 {
        let q = if i % 2 == 0 { 0 } else { 40 };
        rig.exec(&format!(
            "UPDATE inventory SET on_hand = {q} WHERE sku = 'H-1'"
        ))
        .await;
    }
    rig.drain(&WorkloadTables::public(), "WH-1", Duration::from_secs(30))
        .await;
    let xlen = rig.redis.cli(&["XLEN", "skusync:alerts"]);
    assert_eq!(xlen, "100", "trimmed to [alerts] history exactly");
    let first = rig
        .redis
        .cli(&["XRANGE", "skusync:alerts", "-", "+", "COUNT", "1"]);
    let first = first.lines().next().unwrap().to_string();
    // the last alert dropped, as the scripts recorded it
    let info = rig.redis.cli(&["XINFO", "STREAM", "skusync:alerts"]);
    let mut lines = info.lines();
    let dropped = loop {
        match lines.next() {
            Some("max-deleted-entry-id") => break lines.next().unwrap().to_string(),
            Some(_) => {}
            None => panic!("no max-deleted-entry-id: {info}"),
        }
    };
    assert_ne!(dropped, "0-0", "the trims recorded what they dropped");
    let (ms, n) = dropped.split_once('-').unwrap();
    let (ms, n): (u64, u64) = (ms.parse().unwrap(), n.parse().unwrap());
    assert!(
        (ms, n) < {
            let (a, b) = first.split_once('-').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        }
    );
    // seen up to the last alert dropped: nothing was missed
    let r = http_get(port, &format!("/v1/alerts?since={dropped}&limit=500"), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["alerts"].as_array().unwrap().len(), 100);
    // seen only up to an earlier one: the last one dropped was missed
    let before = if n > 0 {
        format!("{ms}-{}", n - 1)
    } else {
        format!("{}-99", ms - 1)
    };
    let r = http_get(port, &format!("/v1/alerts?since={before}"), &[]);
    assert_eq!(r.status, 410, "{}", r.body);
}

/// A `/v1/changes` page stops at about 1 MiB of body whatever its `limit` (SKUs with
/// hundreds of locations), and its `next` goes on from there: every SKU is listed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changes_page_past_its_byte_budget_ends_early_and_paging_lists_every_sku() {
    let port = free_port();
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec(
        "INSERT INTO inventory (sku, location, on_hand)
           SELECT 'BIG-' || s, 'store-' || l, 1 + l % 7 FROM generate_series(1, 400) s, generate_series(1, 100) l",
    )
    .await;
    rig.start_skusync(&api_toml(port, "")).await;
    let r = http_get(port, "/v1/changes?limit=500", &[]);
    assert_eq!(r.status, 200);
    assert!(r.body.len() < 2 << 20, "a page of {} bytes", r.body.len());
    let j = r.json();
    let first = j["changes"].as_array().unwrap().len();
    assert!(
        first < 400 && j["more"] == true,
        "{first} SKUs, more = {}",
        j["more"]
    );
    let mut held = Held::default();
    let (_, pages) = catch_up(port, None, 500, &mut held);
    assert!(pages >= 2, "{pages} pages");
    let live = held.live();
    let big: Vec<_> = live.keys().filter(|k| k.starts_with("BIG-")).collect();
    assert_eq!(big.len(), 400, "{} SKUs listed", big.len());
    for (_, v) in live.iter().filter(|(k, _)| k.starts_with("BIG-")) {
        assert_eq!(v["on_hand"], 397, "{v}");
    }
}
