//! Webhooks against a real HTTP receiver on loopback that fails, times out, refuses one
//! SKU's alerts for good, and recovers; skusync SIGKILLed on the way. Every alert of the
//! history is delivered at least once (ids checked), signed; the refused ones are dropped
//! after their retry budget without holding up the others.

use crate::fold_oracle::*;
use crate::harness::free_port;
use crate::oracle::*;
use skusync::sinks::layout;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Ok,
    Fail503,
    Hang,
}

#[derive(Default)]
struct Received {
    /// Alert id -> number of times it was accepted.
    accepted: BTreeMap<String, usize>,
    attempts: usize,
    bad_signatures: usize,
    refused_poison: usize,
}

/// A receiver: answers by `mode`; alerts of SKU `POISON` always get 400.
struct Receiver {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    got: Arc<Mutex<Received>>,
}

impl Receiver {
    async fn start(secret: &'static str) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(Mode::Ok));
        let got = Arc::new(Mutex::new(Received::default()));
        let (m2, g2) = (mode.clone(), got.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                let (m, g) = (m2.clone(), g2.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // read the head, then the body by Content-Length
                    let (head, body) = loop {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_string();
                            let len: usize = head
                                .lines()
                                .find_map(|l| {
                                    let (n, v) = l.split_once(':')?;
                                    n.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse().ok())?
                                })
                                .unwrap_or(0);
                            while buf.len() < i + 4 + len {
                                let Ok(n) = sock.read(&mut chunk).await else {
                                    return;
                                };
                                if n == 0 {
                                    return;
                                }
                                buf.extend_from_slice(&chunk[..n]);
                            }
                            break (head, buf[i + 4..i + 4 + len].to_vec());
                        }
                    };
                    let mode = *m.lock().unwrap();
                    let header = |name: &str| {
                        head.lines().find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                    };
                    let alert: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    let status = {
                        let mut g = g.lock().unwrap();
                        g.attempts += 1;
                        // verify the signature as a receiver would
                        let sig = header("x-skusync-signature").unwrap_or_default();
                        let t: u64 = sig
                            .strip_prefix("t=")
                            .and_then(|r| r.split(',').next())
                            .and_then(|t| t.parse().ok())
                            .unwrap_or(0);
                        if sig != skusync::sinks::webhook::signature(secret.as_bytes(), t, &body) {
                            g.bad_signatures += 1;
                        }
                        // the headers carry the id percent-encoded (a SKU may hold a
                        // control character, which no header value can)
                        for h in ["idempotency-key", "x-skusync-alert-id"] {
                            let v = header(h).unwrap_or_default();
                            let id = percent_encoding::percent_decode_str(&v).decode_utf8_lossy();
                            assert_eq!(Some(&*id), alert["id"].as_str(), "{h}");
                        }
                        if alert["sku"] == "POISON" {
                            g.refused_poison += 1;
                            400
                        } else {
                            match mode {
                                Mode::Ok => {
                                    *g.accepted
                                        .entry(alert["id"].as_str().unwrap_or("").to_string())
                                        .or_default() += 1;
                                    200
                                }
                                Mode::Fail503 => 503,
                                Mode::Hang => 0,
                            }
                        }
                    };
                    if status == 0 {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        return;
                    }
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                });
            }
        });
        Receiver { port, mode, got }
    }

    fn set(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }
}

/// Alert ids in the history (what must be delivered), by SKU.
async fn history_ids(con: &mut redis::aio::MultiplexedConnection) -> Vec<(String, String)> {
    let entries: Vec<(String, BTreeMap<String, String>)> = redis::cmd("XRANGE")
        .arg(layout::alerts_key("skusync"))
        .arg("-")
        .arg("+")
        .query_async(con)
        .await
        .unwrap();
    entries
        .into_iter()
        .map(|(_, f)| {
            let sku = layout::sku_of_key("skusync", &f["key"]).unwrap();
            let lsn: u64 = f["lsn"].parse().unwrap();
            let id = format!("{}:{}:{sku}", skusync::lsn::Lsn(lsn), f["type"]);
            (sku, id)
        })
        .collect()
}

/// The webhook's secret file in the rig's directory (mode 0600: others may not read it).
fn secret_file(rig: &Rig, secret: &str) -> std::path::PathBuf {
    let p = rig.dir.path().join("webhook.secret");
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    p
}

/// Three transactions: low_stock, out_of_stock, back_in_stock (alerts are per transaction).
async fn moves(rig: &Rig, sku: &str) {
    for q in [3, 0, 40] {
        rig.exec(&format!(
            "UPDATE inventory SET on_hand = {q} WHERE sku = '{sku}'"
        ))
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_reaches_the_webhook_at_least_once_across_an_outage_and_a_sigkill() {
    const SECRET: &str = "a-webhook-secret-of-at-least-32-chars!";
    let rx = Receiver::start(SECRET).await;
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    let skus = ["W-1", "W-2", "W-3", "W-4", "POISON"];
    let rows: Vec<String> = skus
        .iter()
        .map(|s| format!("('{s}', 'WH-1', 50, 0)"))
        .collect();
    rig.exec(&format!("INSERT INTO inventory VALUES {}", rows.join(", ")))
        .await;
    let secret_file = secret_file(&rig, SECRET);
    let metrics_port = free_port();
    rig.start_skusync(&format!(
        "\n[http]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[[webhook]]\nname = \"push\"\nurl = \"http://127.0.0.1:{}/hook?token=gateway-token\"\nsecret_file = \"{}\"\ntimeout_ms = 300\nmax_attempts = 4\nbackoff_ms = 100\nmax_backoff_ms = 400\nconcurrency = 3\n",
        rx.port,
        secret_file.display()
    ))
    .await;
    // Receiver up: W-1's alerts go through.
    moves(&rig, "W-1").await;
    // The receiver refuses POISON for good; it must not hold up W-2 and later.
    moves(&rig, "POISON").await;
    moves(&rig, "W-2").await;
    let delivered = |n: &[&str], rx: &Receiver, ids: &[(String, String)]| {
        let g = rx.got.lock().unwrap();
        ids.iter()
            .filter(|(s, _)| n.contains(&s.as_str()))
            .all(|(_, id)| g.accepted.contains_key(id))
    };
    let wait_for = async |rig: &mut Rig, rx: &Receiver, n: &[&str], what: &str| {
        let start = Instant::now();
        loop {
            let ids = history_ids(&mut rig.con).await;
            if ids.iter().filter(|(s, _)| n.contains(&s.as_str())).count() == 3 * n.len()
                && delivered(n, rx, &ids)
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: not delivered: {ids:?}\n{:?}\n{}",
                rx.got.lock().unwrap().accepted,
                rig.daemon().stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for(&mut rig, &rx, &["W-1", "W-2"], "while POISON is refused").await;
    // POISON: refused 4 times per alert (the budget), then dropped, logged once each.
    let start = Instant::now();
    while rig
        .daemon()
        .stderr_count("alert dropped after its retry budget")
        < 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dropped = crate::harness::scrape_metric(
        metrics_port,
        "skusync_webhook_deliveries_total{webhook=\"push\",result=\"dropped\"}",
    );
    assert_eq!(dropped, Some(3.0));

    // Outage: 503s, then skusync SIGKILLed with alerts queued, then a receiver that hangs
    // (timeouts), then recovery.
    rx.set(Mode::Fail503);
    moves(&rig, "W-3").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    rig.daemon().kill9_and_restart();
    rx.set(Mode::Hang);
    moves(&rig, "W-4").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    rx.set(Mode::Ok);
    wait_for(
        &mut rig,
        &rx,
        &["W-1", "W-2", "W-3", "W-4"],
        "after the outage",
    )
    .await;
    {
        let g = rx.got.lock().unwrap();
        assert_eq!(
            g.bad_signatures, 0,
            "every request is signed with the secret"
        );
        assert!(
            g.refused_poison >= 3 * 4,
            "{} attempts at POISON",
            g.refused_poison
        );
        assert!(!g.accepted.keys().any(|i| i.ends_with(":POISON")));
        assert!(
            g.attempts > g.accepted.len(),
            "there were failures and retries"
        );
    }
    assert_eq!(
        rig.daemon()
            .stderr_count("alert dropped after its retry budget"),
        3
    );
    assert!(
        !rig.daemon().stderr_all().contains("gateway-token"),
        "the URL's token is not logged"
    );

    // the cursor moved past everything: a restart sends nothing again
    let before = rx.got.lock().unwrap().attempts;
    rig.daemon().kill9_and_restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rx.got.lock().unwrap().attempts,
        before,
        "nothing redelivered after the cursor"
    );
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// The webhook task pauses while skusync is not streaming (another instance may take
/// over) and goes on when it streams again: a PostgreSQL reconnect, which every brief
/// outage causes, used to end the task for good (no webhook until a restart, nothing
/// logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_go_on_after_a_postgresql_reconnect() {
    const SECRET: &str = "a-webhook-secret-of-at-least-32-chars!";
    let rx = Receiver::start(SECRET).await;
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    rig.exec("INSERT INTO inventory VALUES ('W-1', 'WH-1', 50, 0), ('W-2', 'WH-1', 50, 0)")
        .await;
    let secret_file = secret_file(&rig, SECRET);
    rig.start_skusync(&format!(
        "\n[[webhook]]\nname = \"push\"\nurl = \"http://127.0.0.1:{}/hook\"\nsecret_file = \"{}\"\ntimeout_ms = 300\nbackoff_ms = 100\n",
        rx.port,
        secret_file.display()
    ))
    .await;
    let wait_for = async |rig: &mut Rig, sku: &str| {
        let start = Instant::now();
        loop {
            let ids: Vec<String> = history_ids(&mut rig.con)
                .await
                .into_iter()
                .filter(|(s, _)| s == sku)
                .map(|(_, id)| id)
                .collect();
            let got = rx.got.lock().unwrap().accepted.clone();
            if ids.len() == 3 && ids.iter().all(|i| got.contains_key(i)) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{sku}: not delivered: {ids:?}\n{got:?}\n{}",
                rig.daemon().stderr_all()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    moves(&rig, "W-1").await;
    wait_for(&mut rig, "W-1").await;
    // the walsender ends: skusync reconnects (not streaming meanwhile)
    rig.exec(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'skusync'",
    )
    .await;
    rig.daemon()
        .wait_stderr(
            "replication interrupted; reconnecting",
            Duration::from_secs(20),
        )
        .await;
    moves(&rig, "W-2").await;
    wait_for(&mut rig, "W-2").await;
    assert_eq!(rig.daemon().sigterm(), Some(0));
}

/// A SKU may hold characters no HTTP header value can (a newline, ESC) and any unicode:
/// their alerts are delivered, the id percent-encoded in the headers. Before, the request
/// could not be built and every alert of such a SKU was retried, then dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_of_skus_with_control_characters_reach_the_webhook() {
    const SECRET: &str = "a-webhook-secret-of-at-least-32-chars!";
    let rx = Receiver::start(SECRET).await;
    let mut rig = Rig::new(PUBLIC_SCHEMA, public_oracle(Buckets::Ignore)).await;
    let skus = ["W\n1", "W\u{1b}[31m2", "Wé 3%"];
    for sku in skus {
        rig.exec(&format!(
            "INSERT INTO inventory VALUES ('{sku}', 'WH-1', 50, 0)"
        ))
        .await;
    }
    let secret_file = secret_file(&rig, SECRET);
    rig.start_skusync(&format!(
        "\n[[webhook]]\nname = \"push\"\nurl = \"http://127.0.0.1:{}/hook\"\nsecret_file = \"{}\"\ntimeout_ms = 300\nmax_attempts = 2\nbackoff_ms = 100\n",
        rx.port,
        secret_file.display()
    ))
    .await;
    for sku in skus {
        moves(&rig, sku).await;
    }
    let start = Instant::now();
    loop {
        let ids = history_ids(&mut rig.con).await;
        let got = rx.got.lock().unwrap().accepted.clone();
        if ids.len() == 3 * skus.len() && ids.iter().all(|(_, i)| got.contains_key(i)) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not delivered: {ids:?}\n{got:?}\n{}",
            rig.daemon().stderr_all()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rig.daemon().stderr_count("alert dropped"), 0);
    assert_eq!(rig.daemon().sigterm(), Some(0));
}
