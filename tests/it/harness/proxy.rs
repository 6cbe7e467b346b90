//! A small TCP fault proxy: listens on a free loopback port and forwards every connection
//! to a target port. Faults: a per-chunk delay, a stall (stop forwarding in both directions
//! without closing anything), a black hole (a stall that also swallows closes and holds
//! new connections: nothing at all gets through, as when packets are dropped), cutting
//! all open connections, and (for PostgreSQL, see
//! [`Proxy::start_pg`]) corrupting the next pgoutput change inside an XLogData frame.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Shared {
    /// Where new connections go (see [`Proxy::retarget`]).
    target: AtomicU16,
    delay_ms: AtomicU64,
    stalled: AtomicBool,
    holed: AtomicBool,
    /// Chunks (or closes) that had to wait for a stall or a black hole to end.
    held: AtomicUsize,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    accepted: AtomicUsize,
    /// Server-to-client bytes are parsed as PostgreSQL frames.
    pg_frames: bool,
    /// Corrupt the next Insert/Update carried by an XLogData frame.
    corrupt_next: AtomicBool,
    corrupted: AtomicUsize,
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
        Self::start_with(target, false)
    }

    /// Like [`start`](Self::start) for a PostgreSQL server (use `sslmode=disable`): the
    /// server's frames are parsed so [`corrupt_next_change`](Self::corrupt_next_change) can
    /// break one pgoutput message on the replication stream.
    pub fn start_pg(target: u16) -> Proxy {
        Self::start_with(target, true)
    }

    fn start_with(target: u16, pg_frames: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Shared {
            pg_frames,
            target: AtomicU16::new(target),
            ..Default::default()
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let sh = sh.clone();
                // A black hole holds new connections too (their first bytes go nowhere).
                std::thread::spawn(move || {
                    hold(&sh, false);
                    let target = sh.target.load(Ordering::SeqCst);
                    forward(client, target, sh)
                });
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

    /// Send new connections to `port` from now on (a failover behind one address); open
    /// ones stay where they are until [`cut`](Self::cut).
    pub fn retarget(&self, port: u16) {
        self.shared.target.store(port, Ordering::SeqCst);
    }

    /// Connections accepted (and forwarded to the target) so far.
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

    /// Black hole on or off: nothing is forwarded in either direction, closes are not
    /// passed on and new connections wait, all without closing a socket (so neither side
    /// sees an error until its own timeouts fire). Held bytes flow once it is off, as
    /// retransmissions would.
    pub fn set_black_hole(&self, on: bool) {
        self.shared.holed.store(on, Ordering::SeqCst);
    }

    /// Chunks, closes and new connections that waited for a stall or a black hole: proof
    /// that one hit live traffic.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Close every open connection (both sides see a reset/EOF); new ones are accepted.
    /// Returns how many proxied connections were open (and are now cut).
    pub fn cut(&self) -> usize {
        let mut conns = self.shared.conns.lock().unwrap();
        // sockets are pushed in (client, server) pairs
        let open = conns.iter().filter(|s| s.peer_addr().is_ok()).count() / 2;
        for s in conns.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        open
    }

    /// Corrupt the next Insert/Update on a replication stream: its first tuple column kind
    /// byte becomes `x` (not `n`/`u`/`t`/`b`), leaving the relation OID readable.
    pub fn corrupt_next_change(&self) {
        self.shared.corrupt_next.store(true, Ordering::SeqCst);
    }

    /// pgoutput messages corrupted so far.
    pub fn corrupted(&self) -> usize {
        self.shared.corrupted.load(Ordering::SeqCst)
    }

    /// Rewrite `:<target>` in a URL to this proxy's port.
    pub fn url(&self, url: &str) -> String {
        url.replacen(&format!(":{}", self.target), &format!(":{}", self.port), 1)
    }
}

/// Connect to the target and pump both directions of one accepted connection.
fn forward(client: TcpStream, target: u16, sh: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
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
    for (from, to, from_server) in [
        (
            client.try_clone().expect("clone"),
            server.try_clone().expect("clone"),
            false,
        ),
        (server, client, true),
    ] {
        let sh = sh.clone();
        std::thread::spawn(move || {
            if from_server && sh.pg_frames {
                pump_pg_frames(from, to, &sh)
            } else {
                pump(from, to, &sh)
            }
        });
    }
}

/// Wait while a black hole (or, for data, a stall) is on, counting the chunk (or close,
/// or new connection) as held as soon as it has to wait. A close (`data == false`) only
/// waits for a black hole: a stall passes it on.
fn hold(sh: &Shared, data: bool) {
    let blocked = || sh.holed.load(Ordering::SeqCst) || (data && sh.stalled.load(Ordering::SeqCst));
    if blocked() && !sh.stop.load(Ordering::SeqCst) {
        sh.held.fetch_add(1, Ordering::SeqCst);
    }
    while blocked() && !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, sh: &Shared) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        hold(sh, true);
        let d = sh.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    hold(sh, false);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Forward whole PostgreSQL frames (tag, Int32 length, body), corrupting one pgoutput
/// change when asked. XLogData is CopyData `d` whose body is `w` + 24 header bytes + the
/// pgoutput message; an Insert/Update starts `I|U`, Int32 OID, then `N`/`K`/`O`, Int16
/// column count, then the first column's kind byte.
fn pump_pg_frames(mut from: TcpStream, mut to: TcpStream, sh: &Shared) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    'outer: loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        hold(sh, true);
        pending.extend_from_slice(&buf[..n]);
        let mut done = 0;
        while pending.len() - done >= 5 {
            let len = u32::from_be_bytes([
                pending[done + 1],
                pending[done + 2],
                pending[done + 3],
                pending[done + 4],
            ]) as usize;
            let total = 1 + len;
            if pending.len() - done < total {
                break;
            }
            let f = &mut pending[done..done + total];
            let body = 5;
            if f[0] == b'd'
                && f.len() > body + 25 + 8
                && f[body] == b'w'
                && matches!(f[body + 25], b'I' | b'U')
                && sh.corrupt_next.swap(false, Ordering::SeqCst)
            {
                // tag(1) + oid(4) + N/K/O(1) + ncols(2) -> first column kind
                f[body + 25 + 8] = b'x';
                sh.corrupted.fetch_add(1, Ordering::SeqCst);
            }
            done += total;
        }
        if done > 0 {
            if to.write_all(&pending[..done]).is_err() {
                break 'outer;
            }
            pending.drain(..done);
        }
    }
    hold(sh, false);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.stalled.store(false, Ordering::SeqCst);
        self.shared.holed.store(false, Ordering::SeqCst);
        self.cut();
        // wake the accept loop
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
