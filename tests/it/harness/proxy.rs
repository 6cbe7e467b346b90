//! A small TCP fault proxy: listens on a free loopback port and forwards every connection
//! to a target port. Faults: a per-chunk delay, a stall (stop forwarding in both directions
//! without closing anything), and cutting all open connections.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Shared {
    delay_ms: AtomicU64,
    stalled: AtomicBool,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    accepted: AtomicUsize,
}

/// A running proxy; stops accepting and cuts its connections on drop.
pub struct Proxy {
    port: u16,
    target: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Forward `127.0.0.1:<port()>` to `127.0.0.1:<target>`.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                sh.accepted.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut c = sh.conns.lock().unwrap();
                    c.retain(|s| s.peer_addr().is_ok());
                    c.push(client.try_clone().expect("clone"));
                    c.push(server.try_clone().expect("clone"));
                }
                for (from, to) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    let sh = sh.clone();
                    std::thread::spawn(move || pump(from, to, &sh));
                }
            }
        });
        Proxy {
            port,
            target,
            shared,
        }
    }

    /// The port to connect to instead of the target.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn target(&self) -> u16 {
        self.target
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Delay every forwarded chunk by `d` (zero: none).
    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Stop forwarding (connections stay open, bytes wait) or resume.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Close every open connection (both sides see a reset/EOF); new ones are accepted.
    pub fn cut(&self) {
        for s in self.shared.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Rewrite `:<target>` in a URL to this proxy's port.
    pub fn url(&self, url: &str) -> String {
        url.replacen(&format!(":{}", self.target), &format!(":{}", self.port), 1)
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, sh: &Shared) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while sh.stalled.load(Ordering::SeqCst) && !sh.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let d = sh.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.stalled.store(false, Ordering::SeqCst);
        self.cut();
        // wake the accept loop
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
