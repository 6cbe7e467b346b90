//! A tiny HTTP/1.1 server for monitoring: `GET /metrics` (Prometheus text), `GET /healthz`
//! (200 `ok` while the process runs), `GET /readyz` (200 `ready`, or 503 with a short
//! reason; see [`crate::telemetry::readiness`]). `HEAD` works too. One request per
//! connection (`Connection: close`).
//!
//! The endpoint must never starve the daemon of file descriptors (PostgreSQL, Redis and
//! MQTT reconnects need them): at most [`MAX_CONNECTIONS`] connections are served at once
//! and a connection beyond that is closed as soon as it is accepted; each connection
//! gets [`DEADLINE`] for the whole exchange (request and response) and a request head of
//! at most [`MAX_REQUEST`] bytes.

use metrics_exporter_prometheus::PrometheusHandle;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Largest request head accepted (bytes).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time one connection may take, from accept to the last byte of the response.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;

/// A parsed request head.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `HEAD`, `OPTIONS`, ...
    pub method: String,
    /// The path, still percent-encoded.
    pub path: String,
    /// The query string (after `?`), still percent-encoded; empty when none.
    pub query: String,
    /// Header names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The client's address.
    pub peer: SocketAddr,
}

impl Request {
    /// A header's value (first of that name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A query parameter, percent-decoded; `Err` when its encoding is invalid.
    pub fn param(&self, name: &str) -> Result<Option<String>, BadEncoding> {
        for pair in self.query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == name {
                return percent_encoding::percent_decode_str(v)
                    .decode_utf8()
                    .map(|c| Some(c.into_owned()))
                    .map_err(|_| BadEncoding);
            }
        }
        Ok(None)
    }

    /// Parses a request head; `None` when it is not one.
    pub fn parse(head: &[u8], peer: SocketAddr) -> Option<Request> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
        let mut parts = lines.next()?.split(' ');
        let (method, target) = (parts.next()?, parts.next()?);
        if method.is_empty() || !target.starts_with('/') {
            return None;
        }
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut headers = Vec::new();
        for l in lines {
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':')?;
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        Some(Request {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            headers,
            peer,
        })
    }
}

/// A query parameter that is not percent-encoded UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadEncoding;

/// A response: status, content type, extra headers, body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Send the head only (`HEAD`, `304`).
    pub head_only: bool,
}

impl Response {
    /// A response with a body.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
            head_only: false,
        }
    }

    /// Adds a header.
    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Bind `addr` (errors are returned, so a taken port fails `run` at start) and serve
/// until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(listen = %listener.local_addr()?, "HTTP endpoints: /metrics /healthz /readyz");
    metrics::describe_counter!(
        "skusync_http_rejected_total",
        "HTTP connections closed on accept because the connection cap was reached."
    );
    metrics::counter!("skusync_http_rejected_total").absolute(0);
    let handle = std::sync::Arc::new(handle);
    Ok(serve_with(
        listener,
        Limits::total(MAX_CONNECTIONS),
        |_| metrics::counter!("skusync_http_rejected_total").increment(1),
        shutdown,
        move |req| {
            let h = handle.clone();
            async move { route(&req, &h) }
        },
    ))
}

/// How many connections [`serve_with`] serves at once.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once.
    pub max: usize,
    /// Connections from one address at once; `None`: no such limit. A client trickling
    /// request heads (slowloris) holds a slot for up to [`DEADLINE`]: this keeps one
    /// address from holding them all.
    pub per_address: Option<usize>,
    /// Peers `per_address` does not apply to (trusted proxies: they speak for many).
    pub exempt: Vec<ipnet::IpNet>,
    /// Largest request head accepted (bytes); [`MAX_REQUEST`] unless a path or query must
    /// hold more (the client API's SKUs and page tokens).
    pub head_bytes: usize,
}

impl Limits {
    /// Only a limit on all connections.
    pub fn total(max: usize) -> Limits {
        Limits {
            max,
            per_address: None,
            exempt: Vec::new(),
            head_bytes: MAX_REQUEST,
        }
    }
}

/// The address a client is counted by (connections, rate): IPv4 as is (an IPv4-mapped
/// IPv6 address as IPv4), IPv6 by its /64, the block one host or home network gets, so a
/// client cannot take a fresh count from every address of its own block.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Which limit closed a connection on accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// [`Limits::max`].
    Total,
    /// [`Limits::per_address`].
    PerAddress,
}

/// Connections open per address (only addresses with one open: at most `Limits::max`
/// entries). A guard gives its count back when its connection ends.
#[derive(Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

struct AddressGuard(std::sync::Arc<PerAddress>, IpAddr);

impl PerAddress {
    fn take(this: &std::sync::Arc<PerAddress>, ip: IpAddr, cap: usize) -> Option<AddressGuard> {
        let mut m = this.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(AddressGuard(this.clone(), ip))
    }
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Serve `listener` with `handler` until `shutdown`: at most `limits` connections at once
/// (one more is closed on accept and reported to `rejected`), [`DEADLINE`] per
/// connection, request heads of at most `limits.head_bytes`, one request per connection.
pub fn serve_with<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    rejected: fn(Rejected),
    shutdown: CancellationToken,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max));
    let open = std::sync::Arc::new(PerAddress::default());
    tokio::spawn(async move {
        loop {
            let (sock, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            // closing at once (instead of leaving it in the backlog) tells the client
            // and frees the descriptor; the slot frees when a served connection ends
            let ip = peer.ip().to_canonical();
            let guard = match limits.per_address {
                Some(cap) if !limits.exempt.iter().any(|n| n.contains(&ip)) => {
                    match PerAddress::take(&open, address_key(ip), cap) {
                        Some(g) => Some(g),
                        None => {
                            rejected(Rejected::PerAddress);
                            drop(sock);
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                rejected(Rejected::Total);
                drop(sock);
                continue;
            };
            let h = handler.clone();
            let head_bytes = limits.head_bytes;
            tokio::spawn(async move {
                match tokio::time::timeout(DEADLINE, connection(sock, peer, h, head_bytes)).await {
                    Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection"),
                    Err(_) => tracing::debug!("HTTP connection: deadline passed"),
                    Ok(Ok(())) => {}
                }
                drop(permit);
                drop(guard);
            });
        }
    })
}

async fn connection<F, Fut>(
    mut sock: TcpStream,
    peer: SocketAddr,
    handler: F,
    head_bytes: usize,
) -> std::io::Result<()>
where
    F: Fn(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let mut buf = Vec::with_capacity(512);
    let complete = {
        let mut chunk = [0u8; 1024];
        loop {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                break false;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                break true;
            }
            if buf.len() > head_bytes {
                break false;
            }
        }
    };
    let req = if complete {
        Request::parse(&buf, peer)
    } else {
        None
    };
    let mut resp = match req {
        Some(r) => {
            let head = r.method == "HEAD";
            let mut resp = handler(r).await;
            resp.head_only |= head;
            resp
        }
        // JSON like every other answer of the client API
        None => Response::new(
            400,
            "application/json",
            "{\"error\":\"malformed or oversized request head\"}\n",
        ),
    };
    if resp.status == 304 || resp.status == 204 {
        resp.head_only = true;
    }
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    for (n, v) in &resp.headers {
        out.push_str(n);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !resp.head_only {
        out.extend_from_slice(&resp.body);
    }
    sock.write_all(&out).await?;
    sock.shutdown().await
}

/// The monitoring routes.
fn route(req: &Request, handle: &PrometheusHandle) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::new(405, "text/plain", "method not allowed\n");
    }
    match req.path.as_str() {
        "/metrics" => Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        "/healthz" => Response::new(200, "text/plain", "ok\n"),
        "/readyz" => match crate::telemetry::readiness() {
            Ok(()) => Response::new(200, "text/plain", "ready\n"),
            Err(why) => Response::new(503, "text/plain", format!("{why}\n")),
        },
        _ => Response::new(404, "text/plain", "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let h = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let r = |head: &[u8]| Request::parse(head, peer).map(|q| route(&q, &h).status);
        assert_eq!(r(b"GET /healthz HTTP/1.1\r\n\r\n"), Some(200));
        assert_eq!(r(b"GET /nope HTTP/1.1\r\n\r\n"), Some(404));
        assert_eq!(r(b"POST /metrics HTTP/1.1\r\n\r\n"), Some(405));
        assert_eq!(r(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Some(200));
        assert_eq!(r(b"garbage\r\n\r\n"), None);
    }

    #[test]
    fn clients_are_counted_by_ipv4_address_and_ipv6_slash_64() {
        let k = |a: &str| address_key(a.parse().unwrap()).to_string();
        assert_eq!(k("10.1.2.3"), "10.1.2.3");
        assert_eq!(k("::ffff:10.1.2.3"), "10.1.2.3");
        assert_eq!(k("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(k("2001:db8:1:2:bbbb::9"), k("2001:db8:1:2::5"));
        assert_ne!(k("2001:db8:1:3::1"), k("2001:db8:1:2::1"));
    }

    #[test]
    fn request_heads_parse_headers_and_query() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let q = Request::parse(
            b"GET /v1/changes?since=ab%2Fc&limit=5 HTTP/1.1\r\nAuthorization: Bearer x\r\nIf-None-Match:  \"e\" \r\n\r\n",
            peer,
        )
        .unwrap();
        assert_eq!(q.path, "/v1/changes");
        assert_eq!(q.param("since"), Ok(Some("ab/c".into())));
        assert_eq!(q.param("limit"), Ok(Some("5".into())));
        assert_eq!(q.param("nope"), Ok(None));
        assert_eq!(q.header("authorization"), Some("Bearer x"));
        assert_eq!(q.header("if-none-match"), Some("\"e\""));
        assert!(
            Request::parse(b"GET /x?a=%FF HTTP/1.1\r\n\r\n", peer)
                .unwrap()
                .param("a")
                .is_err()
        );
    }
}
