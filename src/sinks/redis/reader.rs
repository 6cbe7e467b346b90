//! The publisher's read connections: commands packed by redis-rs go out as bytes, and
//! the replies come back delimited by [`resp`](super::resp) instead of parsed by
//! redis-rs (see that module for why). The one module that adapts `resp` to sockets.
//!
//! For a standalone Redis over TCP, a Unix socket or TLS (verified against
//! `redis.ca_file` or the system's roots). Not for a Redis Cluster (its reads follow the
//! slot map, which only redis-rs' connection knows) nor for `rediss://...#insecure`:
//! there [`HashReader::new`] says `None` and the publisher reads through redis-rs.
//!
//! Connections are pooled (one per read in flight), opened on demand with the URL's
//! user, password and database, and dropped after any error: the caller's round fails
//! like a redis-rs round that failed, and is read again after a pause.

use super::RedisClient;
use super::resp::{self, RespError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Idle connections kept for the next round.
const POOL: usize = 4;

/// Connecting (TCP, TLS, AUTH, SELECT) must finish within this, as redis-rs' must.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A round's replies must all arrive within this (redis-rs' response timeout here).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads at least this much room per socket read.
const READ_CHUNK: usize = 64 * 1024;

/// Where and how to connect.
struct Target {
    addr: Addr,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// AUTH and SELECT, packed, with the number of replies they take.
    hello: Option<(Vec<u8>, usize)>,
}

enum Addr {
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

/// The publisher's reader of a standalone Redis.
pub struct HashReader {
    target: Target,
    idle: Mutex<Vec<Conn>>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
}

/// One round's replies, in order.
pub struct Replies {
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl Replies {
    /// Reply `i` as bytes (one whole RESP reply).
    pub fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[start..self.ends[i]]
    }

    /// The number of replies.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Reply `i` as redis-rs would have returned it (for the few replies whose handling
    /// is shared with redis-rs' connections).
    /// An error reply is `Value::ServerError`, as in a pipeline that ignores errors.
    pub fn value(&self, i: usize) -> redis::RedisResult<redis::Value> {
        redis::parse_redis_value(self.get(i))
    }
}

impl HashReader {
    /// A reader for `client` (`ca_file`: `redis.ca_file`), or `None` where redis-rs'
    /// connection must be used (a cluster, TLS without verification, a root store that
    /// cannot be loaded).
    pub fn new(client: &RedisClient, ca_file: Option<&std::path::Path>) -> Option<HashReader> {
        let RedisClient::Single(c) = client else {
            return None;
        };
        let info = c.get_connection_info();
        let (addr, tls) = match info.addr() {
            redis::ConnectionAddr::Tcp(h, p) => (Addr::Tcp(h.clone(), *p), None),
            redis::ConnectionAddr::Unix(p) => (Addr::Unix(p.clone()), None),
            redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                ..
            } => {
                let source = match ca_file {
                    Some(p) => crate::pg::connstr::RootCert::File(p.to_path_buf()),
                    None => crate::pg::connstr::RootCert::System,
                };
                let roots = crate::pg::tls::root_store(&source, "redis.ca_file").ok()?;
                let cfg = rustls::ClientConfig::builder_with_provider(crate::pg::tls::provider())
                    .with_safe_default_protocol_versions()
                    .ok()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                let name = rustls::pki_types::ServerName::try_from(host.clone()).ok()?;
                (Addr::Tcp(host.clone(), *port), Some((Arc::new(cfg), name)))
            }
            _ => return None,
        };
        let s = info.redis_settings();
        let mut hello = redis::pipe();
        let mut n = 0;
        if let Some(pw) = s.password() {
            let auth = hello.cmd("AUTH");
            if let Some(user) = s.username() {
                auth.arg(user);
            }
            auth.arg(pw);
            n += 1;
        }
        if s.db() != 0 {
            hello.cmd("SELECT").arg(s.db());
            n += 1;
        }
        Some(HashReader {
            target: Target {
                addr,
                tls,
                hello: (n > 0).then(|| (hello.get_packed_pipeline(), n)),
            },
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Send `packed` (commands packed by redis-rs) and read `replies` replies. An error
    /// reply is a reply (see [`resp::error_of`]); a connection or protocol error fails
    /// the round.
    pub async fn round(&self, packed: &[u8], replies: usize) -> Result<Replies, redis::RedisError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match idle {
            Some(c) => c,
            None => tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
                .await
                .map_err(|_| io_error("connecting to Redis timed out".into()))??,
        };
        let out = tokio::time::timeout(RESPONSE_TIMEOUT, conn.round(packed, replies))
            .await
            .map_err(|_| io_error("Redis did not answer within 30 s".into()))??;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < POOL {
            idle.push(conn);
        }
        Ok(out)
    }

    async fn connect(&self) -> Result<Conn, redis::RedisError> {
        let io: Box<dyn Io> = match (&self.target.addr, &self.target.tls) {
            (Addr::Tcp(h, p), None) => {
                let s = tokio::net::TcpStream::connect((h.as_str(), *p)).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            (Addr::Tcp(h, p), Some((cfg, name))) => {
                let s = tokio::net::TcpStream::connect((h.as_str(), *p)).await?;
                s.set_nodelay(true)?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone());
                Box::new(tls.connect(name.clone(), s).await?)
            }
            (Addr::Unix(p), _) => Box::new(tokio::net::UnixStream::connect(p).await?),
        };
        let mut conn = Conn {
            io,
            buf: Vec::new(),
        };
        if let Some((packed, n)) = &self.target.hello {
            let r = conn.round(packed, *n).await?;
            for i in 0..r.len() {
                if let Some(e) = resp::error_of(r.get(i)) {
                    let kind = if e.starts_with("WRONGPASS") || e.starts_with("NOAUTH") {
                        redis::ErrorKind::AuthenticationFailed
                    } else {
                        redis::ErrorKind::Io
                    };
                    return Err(redis::RedisError::from((kind, "Redis refused", e)));
                }
            }
        }
        Ok(conn)
    }
}

impl Conn {
    async fn round(&mut self, packed: &[u8], replies: usize) -> Result<Replies, redis::RedisError> {
        self.io.write_all(packed).await?;
        self.io.flush().await?;
        let mut ends = Vec::with_capacity(replies);
        let mut pos = 0;
        while ends.len() < replies {
            if let Some(n) = resp::reply_len(&self.buf[pos..]).map_err(protocol)? {
                pos += n;
                ends.push(pos);
                continue;
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK {
                self.buf.reserve(READ_CHUNK);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(io_error("Redis closed the connection".into()));
            }
        }
        if pos != self.buf.len() {
            // bytes nobody asked for: the stream is out of step
            return Err(protocol(RespError::Malformed {
                at: pos,
                what: "more replies than commands",
            }));
        }
        Ok(Replies {
            buf: std::mem::take(&mut self.buf),
            ends,
        })
    }
}

fn io_error(what: String) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::other(what))
}

fn protocol(e: RespError) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Parse, "Redis reply", e.to_string()))
}

/// The publisher's reader for the configured Redis (see [`HashReader::new`]); `None`
/// also when the settings do not make a client (the pipeline reports those).
pub fn for_config(
    urls: &[String],
    cluster: bool,
    ca_file: Option<&std::path::Path>,
) -> Option<Arc<HashReader>> {
    let client = super::client(urls, cluster, ca_file).ok()?;
    HashReader::new(&client, ca_file).map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_reply_reads_as_a_server_error_as_in_a_pipeline_that_ignores_errors() {
        let r = Replies {
            buf: b":1\r\n-ERR boom\r\n*0\r\n".to_vec(),
            ends: vec![4, 15, 19],
        };
        assert_eq!(r.len(), 3);
        assert_eq!(r.get(1), b"-ERR boom\r\n");
        assert!(matches!(r.value(0), Ok(redis::Value::Int(1))));
        assert!(matches!(r.value(1), Ok(redis::Value::ServerError(_))));
        assert!(matches!(r.value(2), Ok(redis::Value::Array(a)) if a.is_empty()));
    }
}
