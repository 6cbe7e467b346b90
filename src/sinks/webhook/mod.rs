//! Webhook sinks (`[[webhook]]`): every alert POSTed to an HTTP receiver, for push
//! bridges (FCM, APNs through a push gateway), paging and chat.
//!
//! **Durability contract.** The queue is the alert history in Redis (a stream written by
//! the apply script together with the alert, exactly once). Each webhook keeps a cursor
//! in Redis (`<prefix>:webhook:<name>`, field `cursor`): every alert up to it is finished
//! (delivered, or dropped after its retry budget). The cursor moves only past finished
//! alerts, so after a crash or restart everything after it is sent again: delivery is at
//! least once, and the alert `id` (also the `Idempotency-Key` header) lets the receiver
//! drop repeats. The queue is bounded by the history (`[alerts] history`, and
//! `history_max_age_s`): alerts trimmed from it before delivery are counted and logged.
//!
//! Deliveries run concurrently, so an alert the receiver keeps refusing (any non-2xx,
//! timeouts, connection errors) is retried with back-off until its attempts run out
//! without holding up the others (up to the queue's window of later alerts: memory stays
//! bounded); it is then logged once and counted as dropped.
//!
//! [`Queue`] is the delivery state machine (no I/O); `run` drives it.

mod run;

pub use run::spawn;

use std::collections::BTreeMap;
use std::time::Duration;

pub use crate::config::webhook::WebhookConfig;

pub use crate::sinks::history::{StreamId, format_id, parse_id};

/// The signature header's value: `t=<unix s>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`.
pub fn signature(key: &[u8], unix_s: u64, body: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    m.update(unix_s.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    format!("t={unix_s},v1={}", hex::encode(m.finalize().into_bytes()))
}

/// The alert `id` as the `Idempotency-Key` and `X-Skusync-Alert-Id` headers carry it:
/// every byte outside visible ASCII (`!`..`~`), and `%`, percent-encoded (`%0A`, `%C3%A9`).
/// A SKU may hold a control character, which no header value can; the body keeps the id
/// as it is, and ids of plain SKUs read the same in both.
pub fn header_id(id: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(id.len());
    for &b in id.as_bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// What became of an attempt that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Try again at (ms since the queue's clock origin).
    RetryAt(u64),
    /// The budget is spent: dropped (finished).
    Dropped,
}

#[derive(Debug)]
struct Item {
    body: String,
    attempts: u32,
    due_ms: u64,
    in_flight: bool,
}

/// The delivery state of one webhook: alerts read from the history and not finished,
/// in id order, with their attempts. Times are ms on the caller's clock.
#[derive(Debug)]
pub struct Queue {
    /// Everything up to here is finished.
    cursor: StreamId,
    /// The last id read from the history (`>= cursor`).
    read: StreamId,
    items: BTreeMap<StreamId, Item>,
    /// Finished ids above the cursor (the cursor moves to the greatest one below the
    /// oldest unfinished alert).
    done: std::collections::BTreeSet<StreamId>,
    window: usize,
}

impl Queue {
    /// A queue whose cursor (from Redis) is `cursor`, holding at most `window` alerts.
    pub fn new(cursor: StreamId, window: usize) -> Queue {
        Queue {
            cursor,
            read: cursor,
            items: BTreeMap::new(),
            done: Default::default(),
            window: window.max(1),
        }
    }

    /// The id after which the history is to be read next.
    pub fn read_from(&self) -> StreamId {
        self.read
    }

    /// How many more alerts may be read: the window holds the unfinished alerts and the
    /// finished ones past the cursor, so an alert retried for long (the oldest unfinished
    /// holds the cursor) lets `window` others through, not an unbounded number.
    pub fn room(&self) -> usize {
        self.window
            .saturating_sub(self.items.len() + self.done.len())
    }

    /// An alert read from the history (in id order, after [`read_from`](Self::read_from)).
    pub fn offer(&mut self, id: StreamId, body: String, now_ms: u64) {
        if id <= self.read {
            return;
        }
        self.read = id;
        self.items.insert(
            id,
            Item {
                body,
                attempts: 0,
                due_ms: now_ms,
                in_flight: false,
            },
        );
    }

    /// A history entry that is not an alert we can send (malformed): finished at once.
    pub fn skip(&mut self, id: StreamId) {
        if id > self.read {
            self.read = id;
            self.done.insert(id);
        }
    }

    /// Alerts due at `now_ms`, at most `max` minus those in flight; marked in flight.
    pub fn due(&mut self, now_ms: u64, max: usize) -> Vec<(StreamId, String)> {
        let busy = self.items.values().filter(|i| i.in_flight).count();
        let mut out = Vec::new();
        for (id, it) in self.items.iter_mut() {
            if busy + out.len() >= max {
                break;
            }
            if !it.in_flight && it.due_ms <= now_ms {
                it.in_flight = true;
                it.attempts += 1;
                out.push((*id, it.body.clone()));
            }
        }
        out
    }

    /// When the next alert not in flight is due, if any.
    pub fn next_due(&self) -> Option<u64> {
        self.items
            .values()
            .filter(|i| !i.in_flight)
            .map(|i| i.due_ms)
            .min()
    }

    /// The receiver accepted `id`.
    pub fn delivered(&mut self, id: StreamId) {
        if self.items.remove(&id).is_some() {
            self.done.insert(id);
        }
    }

    /// An attempt at `id` failed at `now_ms`; `delay` is the back-off before the next.
    pub fn failed(
        &mut self,
        id: StreamId,
        now_ms: u64,
        max_attempts: u32,
        delay: Duration,
    ) -> Failed {
        let Some(it) = self.items.get_mut(&id) else {
            return Failed::Dropped;
        };
        it.in_flight = false;
        if it.attempts >= max_attempts {
            self.items.remove(&id);
            self.done.insert(id);
            return Failed::Dropped;
        }
        it.due_ms = now_ms.saturating_add(delay.as_millis() as u64);
        Failed::RetryAt(it.due_ms)
    }

    /// Attempts made at `id` so far.
    pub fn attempts(&self, id: StreamId) -> u32 {
        self.items.get(&id).map_or(0, |i| i.attempts)
    }

    /// Moves the cursor past every finished alert before the oldest unfinished one;
    /// returns it when it moved.
    pub fn advance(&mut self) -> Option<StreamId> {
        let first = self.items.keys().next().copied();
        let mut next = None;
        while let Some(&d) = self.done.first() {
            if first.is_some_and(|f| d > f) {
                break;
            }
            self.done.pop_first();
            next = Some(d);
        }
        let next = next.filter(|n| *n > self.cursor)?;
        self.cursor = next;
        Some(next)
    }

    /// The cursor.
    pub fn cursor(&self) -> StreamId {
        self.cursor
    }

    /// Alerts not finished.
    pub fn pending(&self) -> usize {
        self.items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WebhookConfig {
        WebhookConfig {
            name: "push".into(),
            url: "https://gw.example/alerts".into(),
            secret_file: "/dev/null".into(),
            timeout_ms: 1000,
            max_attempts: 3,
            backoff_ms: 100,
            max_backoff_ms: 250,
            concurrency: 2,
        }
    }

    #[test]
    fn alerts_finished_behind_a_retried_one_count_in_the_window() {
        let c = cfg();
        let mut q = Queue::new((10, 0), 3);
        for n in 1..=3 {
            q.offer((10, n), format!("a{n}"), 0);
        }
        let sent = q.due(0, 3);
        assert_eq!(sent.len(), 3);
        // the oldest is refused, the others delivered: the cursor waits for it
        assert!(matches!(
            q.failed((10, 1), 0, c.max_attempts, c.backoff(1)),
            Failed::RetryAt(_)
        ));
        q.delivered((10, 2));
        q.delivered((10, 3));
        assert_eq!(q.advance(), None);
        assert_eq!(
            q.room(),
            0,
            "two finished and one unfinished fill the window"
        );
        // once it is finished, the cursor passes all three and the window empties
        q.due(1000, 3);
        q.delivered((10, 1));
        assert_eq!(q.advance(), Some((10, 3)));
        assert_eq!(q.room(), 3);
    }

    #[test]
    fn header_ids_encode_what_no_header_value_can_hold() {
        assert_eq!(
            header_id("0/16B3748:low_stock:SKU-1"),
            "0/16B3748:low_stock:SKU-1"
        );
        assert_eq!(header_id("0/1:out_of_stock:A\nB"), "0/1:out_of_stock:A%0AB");
        assert_eq!(
            header_id("0/1:low_stock:café 50%"),
            "0/1:low_stock:caf%C3%A9%2050%25"
        );
        assert_eq!(header_id("0/1:low_stock:\u{7f}\t"), "0/1:low_stock:%7F%09");
        for id in [
            "0/1:low_stock:",
            "0/1:low_stock:{x}/#+?",
            "0/1:low_stock:\u{1}\u{1b}[31m",
        ] {
            let h = header_id(id);
            assert!(reqwest::header::HeaderValue::from_str(&h).is_ok(), "{h}");
            assert_eq!(
                percent_encoding::percent_decode_str(&h)
                    .decode_utf8()
                    .unwrap(),
                id
            );
        }
    }

    #[test]
    fn a_refused_alert_does_not_hold_up_the_others_and_the_cursor_waits_for_it() {
        let c = cfg();
        let mut q = Queue::new((10, 0), 100);
        q.offer((11, 0), "a".into(), 0);
        q.offer((11, 1), "b".into(), 0);
        q.offer((12, 0), "c".into(), 0);
        let first = q.due(0, c.concurrency);
        assert_eq!(
            first.iter().map(|x| x.0).collect::<Vec<_>>(),
            [(11, 0), (11, 1)]
        );
        assert!(q.due(0, c.concurrency).is_empty(), "two in flight at most");
        // a is refused, b delivered: c goes next, a waits for its back-off
        assert_eq!(
            q.failed((11, 0), 0, c.max_attempts, c.backoff(1)),
            Failed::RetryAt(100)
        );
        q.delivered((11, 1));
        assert_eq!(q.advance(), None, "a is not finished");
        assert_eq!(
            q.due(0, 2).iter().map(|x| x.0).collect::<Vec<_>>(),
            [(12, 0)]
        );
        q.delivered((12, 0));
        assert_eq!(q.advance(), None);
        // a's budget runs out: dropped, and the cursor moves past everything
        for (t, attempt) in [(100, 2), (400, 3)] {
            let d = q.due(t, 2);
            assert_eq!(d.len(), 1);
            assert_eq!(q.attempts((11, 0)), attempt);
            let r = q.failed((11, 0), t, c.max_attempts, c.backoff(attempt));
            if attempt < 3 {
                assert_eq!(r, Failed::RetryAt(t + 200));
            } else {
                assert_eq!(r, Failed::Dropped);
            }
        }
        assert_eq!(q.advance(), Some((12, 0)));
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn the_cursor_stops_before_the_oldest_unfinished_alert() {
        let mut q = Queue::new((5, 3), 2);
        q.offer((6, 0), "x".into(), 0);
        q.offer((7, 2), "y".into(), 0);
        assert_eq!(q.room(), 0, "the window bounds what is read");
        q.offer((5, 3), "old".into(), 0);
        assert_eq!(
            q.pending(),
            2,
            "ids at or before the read position are ignored"
        );
        let _ = q.due(0, 5);
        q.delivered((6, 0));
        assert_eq!(q.advance(), Some((6, 0)));
        q.delivered((7, 2));
        assert_eq!(q.advance(), Some((7, 2)));
        q.skip((9, 0));
        assert_eq!(q.advance(), Some((9, 0)), "skipped entries are finished");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c = cfg();
        assert_eq!(c.backoff(1), Duration::from_millis(100));
        assert_eq!(c.backoff(2), Duration::from_millis(200));
        assert_eq!(c.backoff(3), Duration::from_millis(250));
        assert_eq!(c.backoff(99), Duration::from_millis(250));
    }

    #[test]
    fn config_is_checked() {
        assert!(cfg().validate("webhook[0]").is_ok());
        let bad = |f: fn(&mut WebhookConfig)| {
            let mut c = cfg();
            f(&mut c);
            c.validate("webhook[0]").unwrap_err().0
        };
        assert!(bad(|c| c.name = "Push!".into()).starts_with("webhook[0].name"));
        assert!(bad(|c| c.url = "ftp://x".into()).starts_with("webhook[0].url"));
        assert!(bad(|c| c.url = "not a url".into()).starts_with("webhook[0].url"));
        assert!(bad(|c| c.max_attempts = 0).contains("max_attempts"));
        assert!(bad(|c| c.max_backoff_ms = 1).starts_with("webhook[0].backoff_ms"));
        assert!(
            !format!(
                "{:?}",
                WebhookConfig {
                    url: "https://h/x?token=s3cret".into(),
                    ..cfg()
                }
            )
            .contains("s3cret")
        );
    }

    #[test]
    fn signatures_cover_time_and_body() {
        let s = signature(b"k", 1700000000, b"{}");
        assert!(s.starts_with("t=1700000000,v1="));
        assert_ne!(s, signature(b"k", 1700000001, b"{}"));
        assert_ne!(s, signature(b"k", 1700000000, b"{ }"));
        assert_eq!(s.len(), "t=1700000000,v1=".len() + 64);
    }
}
