//! The ordinary SQL connection (tokio-postgres) beside the replication connection: slot
//! state, server settings, and later snapshots. Same URL, same TLS rules.

use super::conn::{STARTUP_MAX_FRAME, Transport, channel_binding_unavailable, open_transport};
use super::connstr::{AuthMethod, ChannelBinding, PgConnectConfig};
use super::error::PgError;
use super::wire::{FrameGuard, GuardError};
use crate::lsn::Lsn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Client;
use tokio_postgres::tls::{ChannelBinding as TlsBinding, TlsConnect};

/// Open an ordinary SQL connection; its driver task runs in the background.
///
/// skusync opens the socket and negotiates TLS itself (the same code and rules as the
/// replication connection), then hands tokio-postgres a [`GuardedStream`]: frames above
/// the cap and authentication requests the URL's `require_auth` / cleartext rules refuse
/// stop the connection before tokio-postgres can act on them.
pub async fn connect(cfg: &PgConnectConfig) -> Result<Client, PgError> {
    tokio::time::timeout(cfg.connect_timeout, connect_inner(cfg))
        .await
        .map_err(|_| PgError::Io {
            addr: cfg.addr(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", cfg.connect_timeout),
            ),
        })?
}

async fn connect_inner(cfg: &PgConnectConfig) -> Result<Client, PgError> {
    let io = open_transport(cfg, false).await?;
    let end_point = io.tls_end_point();
    if cfg.channel_binding == ChannelBinding::Require && end_point.is_none() {
        return Err(PgError::Auth {
            user: cfg.user.clone(),
            reason: channel_binding_unavailable(matches!(io, Transport::Tls(_)), false),
        });
    }
    let stopped = Arc::new(Mutex::new(None));
    let stream = GuardedStream {
        io,
        guard: FrameGuard::new(STARTUP_MAX_FRAME, cfg.max_message_bytes),
        cfg: cfg.clone(),
        asked: false,
        end_point,
        stopped: stopped.clone(),
    };
    let mut pg = cfg.to_tokio_postgres();
    // TLS is already negotiated: "direct" makes tokio-postgres take the stream as it is
    // (no SSLRequest of its own), and through it the channel binding data.
    pg.ssl_mode(tokio_postgres::config::SslMode::Require)
        .ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
    let taken = |stopped: &Mutex<Option<PgError>>| stopped.lock().ok().and_then(|mut s| s.take());
    let (client, conn) = match pg.connect_raw(stream, AsIs).await {
        Ok(c) => c,
        Err(e) => return Err(taken(&stopped).unwrap_or_else(|| classify(e, cfg))),
    };
    let addr = cfg.addr();
    tokio::spawn(async move {
        if conn.await.is_err()
            && let Some(e) = taken(&stopped)
        {
            tracing::warn!(server = %addr, error = %e, "SQL connection stopped");
        }
    });
    Ok(client)
}

/// The plaintext stream under tokio-postgres (TLS already done), with a [`FrameGuard`]
/// on the read side.
pub struct GuardedStream {
    io: Transport,
    guard: FrameGuard,
    cfg: PgConnectConfig,
    /// Whether the server asked for any authentication method yet.
    asked: bool,
    end_point: Option<Vec<u8>>,
    /// The definite error behind a refused read, for [`connect`] to return instead of
    /// tokio-postgres' generic I/O error.
    stopped: Arc<Mutex<Option<PgError>>>,
}

impl GuardedStream {
    fn check(&mut self, bytes: &[u8]) -> Result<(), PgError> {
        let cfg = &self.cfg;
        let asked = &mut self.asked;
        let auth = |reason: String| PgError::Auth {
            user: cfg.user.clone(),
            reason,
        };
        let mut on_auth = |code: u32| {
            let method = match code {
                0 if *asked => return Ok(()),
                0 => AuthMethod::None,
                3 => AuthMethod::Password,
                5 => AuthMethod::Md5,
                10 => AuthMethod::ScramSha256,
                // SASL continue/final; GSS/SSPI and others, which tokio-postgres refuses.
                _ => return Ok(()),
            };
            *asked = true;
            cfg.auth_request_allowed(method)
        };
        self.guard.scan(bytes, &mut on_auth).map_err(|e| match e {
            GuardError::Refused(reason) => auth(reason),
            GuardError::TooLarge {
                len,
                max,
                ready: false,
            } => PgError::Protocol(format!(
                "the server sent a {len}-byte message before the connection was ready (at most \
                 {max} bytes are accepted then): is this a PostgreSQL server?"
            )),
            GuardError::TooLarge { len, max, .. } => PgError::Sql(format!(
                "a server message of {len} bytes on the SQL connection exceeds \
                 postgres.max_message_bytes ({max}); raise it if a row really is that large"
            )),
            GuardError::Malformed(m) => PgError::Protocol(m),
        })
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        // On an error the caller does not count these bytes as read (AsyncRead contract,
        // and tokio-util's FramedRead relies on it), so a refused frame is never parsed.
        if let Err(e) = this.check(&buf.filled()[before..]) {
            let msg = e.to_string();
            if let Ok(mut s) = this.stopped.lock() {
                *s = Some(e);
            }
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                msg,
            )));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tokio_postgres::tls::TlsStream for GuardedStream {
    fn channel_binding(&self) -> TlsBinding {
        match &self.end_point {
            Some(ep) => TlsBinding::tls_server_end_point(ep.clone()),
            None => TlsBinding::none(),
        }
    }
}

/// "Connects" by handing the already negotiated stream back.
struct AsIs;

impl TlsConnect<GuardedStream> for AsIs {
    type Stream = GuardedStream;
    type Error = std::io::Error;
    type Future = std::future::Ready<std::io::Result<GuardedStream>>;

    fn connect(self, stream: GuardedStream) -> Self::Future {
        std::future::ready(Ok(stream))
    }
}

/// Map a tokio-postgres error, keeping SQLSTATE-based classification.
pub fn classify(e: tokio_postgres::Error, cfg: &PgConnectConfig) -> PgError {
    if let Some(db) = e.as_db_error() {
        let s = super::error::ServerError {
            severity: db.severity().to_string(),
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
        };
        if s.code.starts_with("28") {
            return PgError::Auth {
                user: cfg.user.clone(),
                reason: s.message,
            };
        }
        return PgError::Server(s);
    }
    // tokio-postgres' own refusals (e.g. channel_binding=require unmet) are definite.
    let text = e.to_string();
    if let Some(reason) = text.strip_prefix("authentication error: ") {
        return PgError::Auth {
            user: cfg.user.clone(),
            reason: reason.to_string(),
        };
    }
    PgError::Sql(format!("{text} ({})", cfg.addr()))
}

/// A row of `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub slot_name: String,
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub temporary: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// Look up a slot by name.
pub async fn slot_state(
    client: &Client,
    cfg: &PgConnectConfig,
    slot: &str,
) -> Result<Option<SlotState>, PgError> {
    let row = client
        .query_opt(
            "SELECT slot_name::text, plugin::text, database::text, temporary, active_pid, \
                    confirmed_flush_lsn::text, restart_lsn::text, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| classify(e, cfg))?;
    Ok(row.map(|r| {
        let lsn = |i: usize| r.get::<_, Option<String>>(i).and_then(|s| s.parse().ok());
        SlotState {
            slot_name: r.get(0),
            plugin: r.get(1),
            database: r.get(2),
            temporary: r.get(3),
            active_pid: r.get(4),
            confirmed_flush_lsn: lsn(5),
            restart_lsn: lsn(6),
            wal_status: r.get(7),
        }
    }))
}

/// Each domain's base type (through domains over domains): columns typed with a domain
/// (`CREATE DOMAIN qty AS integer CHECK (VALUE >= 0)`) carry the domain's type OID in
/// the catalog and in pgoutput, and are read as their base type.
pub async fn domain_bases(
    client: &Client,
    cfg: &PgConnectConfig,
) -> Result<std::collections::HashMap<u32, u32>, PgError> {
    let rows = client
        .query(
            "WITH RECURSIVE d(oid, base) AS ( \
                 SELECT oid, typbasetype FROM pg_type WHERE typtype = 'd' \
                 UNION ALL \
                 SELECT d.oid, t.typbasetype FROM d JOIN pg_type t ON t.oid = d.base AND t.typtype = 'd') \
             SELECT d.oid, d.base FROM d JOIN pg_type b ON b.oid = d.base WHERE b.typtype <> 'd'",
            &[],
        )
        .await
        .map_err(|e| classify(e, cfg))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `wal_sender_timeout` in milliseconds (0 = disabled). Read on the ordinary connection
/// because some managed services refuse SHOW on replication connections.
pub async fn wal_sender_timeout_ms(client: &Client, cfg: &PgConnectConfig) -> Result<u64, PgError> {
    let row = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(|e| classify(e, cfg))?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}
