//! The one module that adapts the sans-IO wire pieces to tokio: a replication connection
//! (`replication=database`) with TLS, authentication, simple queries, slot commands and
//! the CopyBoth stream.

use super::connstr::{AuthMethod, ChannelBinding, PgConnectConfig, SslMode};
use super::error::{PgError, ServerError};
use super::pace::ReadPacer;
use super::tls;
use super::wire::{self, Frame, ReplMessage};
use crate::lsn::Lsn;
use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend::Message, frontend};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Startup `options` of every connection: output functions run with these settings, so
/// the walsender's values and the ordinary sessions' (snapshot, filter checks, `verify`)
/// print alike: ISO dates, timestamps in UTC, round-trippable floats, PostgreSQL
/// intervals, whatever the server's or the role's defaults.
pub const TEXT_FORMS: &str =
    "-c datestyle=ISO,YMD -c timezone=UTC -c extra_float_digits=3 -c intervalstyle=postgres";

/// Read buffer size.
const READ_CHUNK: usize = 256 * 1024;
/// Cap on one server frame until the first ReadyForQuery. Before that the server (or
/// whoever answers in its place) has proven nothing, and nothing it legitimately sends
/// (authentication requests, parameter status, errors) comes near this.
pub const STARTUP_MAX_FRAME: usize = 64 * 1024;
/// The TCP receive buffer, fixed before connecting (Linux doubles it; autotuning off).
/// While the slot catches up, reads are paced (see [`ReadPacer`]): the socket is read
/// once a millisecond, a little less than the walsender sends, so the receive window
/// stays nearly closed and the walsender's one-`send`-per-message leaves as a few large
/// segments. A fixed, modest buffer keeps that window small; with autotuning, or fixed
/// only after the handshake, runs fell back to a segment per message more often.
/// See docs/performance.md.
const PACED_RCVBUF: u32 = 256 * 1024;

/// The byte stream to the server: TCP, TLS over TCP, or a Unix socket.
pub(crate) enum Transport {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Result row of a simple query: text values by column position.
#[derive(Debug, Clone)]
pub struct SimpleRow {
    pub columns: std::sync::Arc<Vec<String>>,
    pub values: Vec<Option<String>>,
}

impl SimpleRow {
    /// The value of the named column.
    pub fn get(&self, name: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == name)?;
        self.values.get(i)?.as_deref()
    }
}

/// `IDENTIFY_SYSTEM` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// `CREATE_REPLICATION_SLOT` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot_name: String,
    /// The LSN the stream starts at; the exported snapshot shows the database as of it.
    pub consistent_point: Lsn,
    /// Usable with `SET TRANSACTION SNAPSHOT` until the next command on this connection.
    pub snapshot_name: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` does with its snapshot.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it for other connections (`SET TRANSACTION SNAPSHOT`).
    Export,
    /// Don't create one.
    Nothing,
}

/// pgoutput options for `START_REPLICATION`.
#[derive(Clone, Debug)]
pub struct ReplicationOptions {
    pub proto_version: u32,
    pub publications: Vec<String>,
    /// Ask for `pg_logical_emit_message` messages (`messages 'true'`).
    pub messages: bool,
}

/// One item read from the CopyBoth stream.
#[derive(Debug)]
pub enum StreamItem {
    Message(ReplMessage),
    /// The server ended the stream (CopyDone).
    End,
}

/// A replication connection in walsender mode.
pub struct ReplConnection {
    io: Transport,
    rbuf: BytesMut,
    wbuf: BytesMut,
    addr: String,
    /// Frame cap in force: [`STARTUP_MAX_FRAME`] until ReadyForQuery, then
    /// `max_message_bytes`.
    max_frame: usize,
    /// `tls-server-end-point` data of the TLS session, when there is one and the
    /// certificate's signature names a hash.
    tls_end_point: Option<Vec<u8>>,
    server_version: String,
    backend_pid: i32,
    /// Reads are paced (see [`set_read_batching`](Self::set_read_batching)).
    batching: bool,
    pacer: ReadPacer,
    /// Bytes read from the socket so far: lets the source tell a silent server from a
    /// quiet one (see [`bytes_received`](Self::bytes_received)).
    received: u64,
}

/// Connect to the first address of `host` that answers, with the receive buffer fixed at
/// [`PACED_RCVBUF`] before the handshake (it sizes the window scale).
async fn connect_tcp(host: &str, port: u16, paced: bool) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // Best effort: a kernel that refuses keeps autotuning (correct, only costlier).
        if paced {
            let _ = sock.set_recv_buffer_size(PACED_RCVBUF);
        }
        match sock.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    }))
}

impl Transport {
    /// `tls-server-end-point` data of a TLS session (see [`tls::tls_server_end_point`]).
    pub(crate) fn tls_end_point(&self) -> Option<Vec<u8>> {
        match self {
            Transport::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| tls::tls_server_end_point(c)),
            _ => None,
        }
    }
}

/// Idle time before the first TCP keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the kernel drops the connection.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged before the kernel
/// drops the connection.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Let the kernel notice a peer that silently vanished (packets dropped, not reset): an
/// idle connection fails after about `KEEPALIVE_IDLE + KEEPALIVE_RETRIES x
/// KEEPALIVE_INTERVAL` (25 s), one with unacknowledged data after `TCP_USER_TIMEOUT`.
/// Without these a blocked read or write waits for the kernel's retransmission limit
/// (~15 min). Best effort: a kernel that refuses an option keeps its default.
fn set_dead_peer_timeouts(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT)) {
        tracing::debug!(error = %e, "TCP_USER_TIMEOUT not set");
    }
}

/// Connect (TCP with keepalives, or the Unix socket) and negotiate TLS per `sslmode`.
/// `paced` fixes the receive buffer for the replication stream's paced reads.
pub(crate) async fn open_transport(
    cfg: &PgConnectConfig,
    paced: bool,
) -> Result<Transport, PgError> {
    let addr = cfg.addr();
    let io_err = |source| PgError::Io {
        addr: addr.clone(),
        source,
    };
    if cfg.is_unix_socket() {
        // As libpq: no TLS over a Unix socket.
        return Ok(Transport::Unix(
            UnixStream::connect(cfg.socket_path())
                .await
                .map_err(io_err)?,
        ));
    }
    let tcp = connect_tcp(&cfg.host, cfg.port, paced)
        .await
        .map_err(io_err)?;
    tcp.set_nodelay(true).map_err(io_err)?;
    set_dead_peer_timeouts(&tcp);
    negotiate_tls(cfg, tcp).await
}

async fn negotiate_tls(cfg: &PgConnectConfig, mut tcp: TcpStream) -> Result<Transport, PgError> {
    let Some(tls_config) = tls::client_config(cfg)? else {
        return Ok(Transport::Tcp(tcp));
    };
    let addr = cfg.addr();
    let io_err = |source| PgError::Io {
        addr: addr.clone(),
        source,
    };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await.map_err(io_err)?;
    // Exactly one byte: anything more would be plaintext injected before the handshake.
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io_err)?;
    match answer[0] {
        b'S' => {
            let name = tls::server_name(&cfg.host)?;
            let connector = tokio_rustls::TlsConnector::from(tls_config);
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| PgError::Tls {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            Ok(Transport::Tls(Box::new(stream)))
        }
        b'N' if cfg.sslmode == SslMode::Prefer => Ok(Transport::Tcp(tcp)),
        b'N' => Err(PgError::Tls {
            addr,
            reason: "the server does not accept TLS connections but sslmode requires TLS \
                     (set ssl = on in postgresql.conf)"
                .into(),
        }),
        other => Err(PgError::Protocol(format!(
            "unexpected answer 0x{other:02x} to the TLS request"
        ))),
    }
}

impl ReplConnection {
    /// Connect, negotiate TLS per `sslmode`, start up in `replication=database` mode and
    /// authenticate (trust, cleartext, md5, SCRAM-SHA-256).
    pub async fn connect(cfg: &PgConnectConfig) -> Result<ReplConnection, PgError> {
        tokio::time::timeout(cfg.connect_timeout, Self::connect_inner(cfg))
            .await
            .map_err(|_| PgError::Io {
                addr: cfg.addr(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", cfg.connect_timeout),
                ),
            })?
    }

    async fn connect_inner(cfg: &PgConnectConfig) -> Result<ReplConnection, PgError> {
        let io = open_transport(cfg, true).await?;
        let tls_end_point = io.tls_end_point();
        let addr = cfg.addr();
        let mut conn = ReplConnection {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
            addr,
            max_frame: STARTUP_MAX_FRAME,
            tls_end_point,
            server_version: String::new(),
            backend_pid: 0,
            batching: false,
            pacer: ReadPacer::default(),
            received: 0,
        };
        conn.startup(cfg).await?;
        Ok(conn)
    }

    async fn startup(&mut self, cfg: &PgConnectConfig) -> Result<(), PgError> {
        let params = [
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("replication", "database"),
            ("client_encoding", "UTF8"),
            ("application_name", cfg.application_name.as_str()),
            // Output functions run in the walsender with these settings: pin the text forms
            // the decoder relies on (ISO timestamps in UTC, round-trippable floats).
            ("options", TEXT_FORMS),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)
            .map_err(|e| PgError::Config(format!("startup message: {e}")))?;
        self.flush().await?;
        let auth_err = |reason: String| PgError::Auth {
            user: cfg.user.clone(),
            reason,
        };
        let need_password = || {
            cfg.password.as_ref().ok_or_else(|| {
                auth_err(
                    "the server asks for a password but none was given (put it in the URL, \
                     PGPASSWORD, SKUSYNC_PG_PASSWORD or a passfile)"
                        .into(),
                )
            })
        };
        let allowed = |m: AuthMethod| cfg.auth_request_allowed(m).map_err(auth_err);
        let mut scram: Option<sasl::ScramSha256> = None;
        // Whether the server asked for anything, SCRAM ended with a verified server
        // signature, and that SCRAM was bound to the TLS channel.
        let mut asked = false;
        let mut scram_done = false;
        let mut bound = false;
        loop {
            match self
                .read_std()
                .await
                .map_err(|e| startup_error(e, &cfg.user))?
            {
                Message::AuthenticationOk => {
                    if !asked {
                        allowed(AuthMethod::None)?;
                    }
                    // An Ok in the middle of SCRAM would skip the server's proof.
                    if scram.is_some() && !scram_done {
                        return Err(auth_err(
                            "the server ended SCRAM authentication before proving it knows \
                             the password"
                                .into(),
                        ));
                    }
                    if cfg.channel_binding == ChannelBinding::Require && !bound {
                        return Err(auth_err(
                            "channel_binding=require, but the server did not authenticate with \
                             SCRAM-SHA-256-PLUS"
                                .into(),
                        ));
                    }
                    break;
                }
                Message::AuthenticationCleartextPassword => {
                    asked = true;
                    allowed(AuthMethod::Password)?;
                    let pw = need_password()?;
                    frontend::password_message(pw.expose().as_bytes(), &mut self.wbuf)
                        .map_err(|e| auth_err(e.to_string()))?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    asked = true;
                    allowed(AuthMethod::Md5)?;
                    let pw = need_password()?;
                    let hash = md5_hash(cfg.user.as_bytes(), pw.expose().as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                        .map_err(|e| auth_err(e.to_string()))?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    if asked {
                        return Err(PgError::Protocol(
                            "the server started a second authentication exchange".into(),
                        ));
                    }
                    asked = true;
                    allowed(AuthMethod::ScramSha256)?;
                    let pw = need_password()?;
                    let (mut has_scram, mut has_plus) = (false, false);
                    let mut mechs = body.mechanisms();
                    while let Some(m) =
                        mechs.next().map_err(|e| PgError::Protocol(e.to_string()))?
                    {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                        has_plus |= m == sasl::SCRAM_SHA_256_PLUS;
                    }
                    let end_point = self
                        .tls_end_point
                        .clone()
                        .filter(|_| cfg.channel_binding != ChannelBinding::Disable);
                    let (binding, mechanism) = match (end_point, has_plus, has_scram) {
                        (Some(ep), true, _) => (
                            sasl::ChannelBinding::tls_server_end_point(ep),
                            sasl::SCRAM_SHA_256_PLUS,
                        ),
                        _ if cfg.channel_binding == ChannelBinding::Require => {
                            return Err(auth_err(channel_binding_unavailable(
                                matches!(self.io, Transport::Tls(_)),
                                self.tls_end_point.is_some(),
                            )));
                        }
                        // "y": we could bind but the server did not offer it. A server
                        // that does support it then fails the exchange, so a man in the
                        // middle cannot strip SCRAM-SHA-256-PLUS from the list.
                        (Some(_), false, true) => {
                            (sasl::ChannelBinding::unrequested(), sasl::SCRAM_SHA_256)
                        }
                        (None, _, true) => {
                            (sasl::ChannelBinding::unsupported(), sasl::SCRAM_SHA_256)
                        }
                        _ => {
                            return Err(auth_err(
                                "the server offers no SASL mechanism skusync supports \
                                 (SCRAM-SHA-256)"
                                    .into(),
                            ));
                        }
                    };
                    bound = mechanism == sasl::SCRAM_SHA_256_PLUS;
                    let s = sasl::ScramSha256::new(pw.expose().as_bytes(), binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.wbuf)
                        .map_err(|e| auth_err(e.to_string()))?;
                    self.flush().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        PgError::Protocol("SASL continue without SASL start".into())
                    })?;
                    s.update(body.data())
                        .map_err(|e| auth_err(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)
                        .map_err(|e| auth_err(e.to_string()))?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| PgError::Protocol("SASL final without SASL start".into()))?;
                    // Verifies the server's signature: it proves it knows the password too.
                    s.finish(body.data())
                        .map_err(|e| auth_err(format!("SCRAM server signature: {e}")))?;
                    scram_done = true;
                }
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_) => {
                    return Err(auth_err(
                        "the server asks for GSS/Kerberos/SSPI, which skusync does not support; \
                         use scram-sha-256 in pg_hba.conf"
                            .into(),
                    ));
                }
                _ => {
                    return Err(PgError::Protocol(
                        "unexpected message during authentication".into(),
                    ));
                }
            }
        }
        loop {
            match self
                .read_std()
                .await
                .map_err(|e| startup_error(e, &cfg.user))?
            {
                Message::ParameterStatus(p) => {
                    if p.name().ok() == Some("server_version") {
                        self.server_version = p.value().unwrap_or("").to_string();
                    }
                }
                Message::BackendKeyData(k) => self.backend_pid = k.process_id(),
                Message::ReadyForQuery(_) => {
                    self.max_frame = cfg.max_message_bytes;
                    return Ok(());
                }
                Message::NoticeResponse(_) => {}
                _ => {
                    return Err(PgError::Protocol(
                        "unexpected message after authentication".into(),
                    ));
                }
            }
        }
    }

    /// The server's `server_version` (e.g. `15.19 (Debian 15.19-0+deb12u1)`).
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// The server's major version number (14, 15, ...), 0 when unknown.
    pub fn server_major(&self) -> u32 {
        self.server_version
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The walsender's process id (for `pg_stat_replication` / `pg_terminate_backend`).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        self.io
            .write_all(&self.wbuf)
            .await
            .map_err(|source| self.io_error(source))?;
        self.wbuf.clear();
        Ok(())
    }

    /// Read more bytes from the socket into the buffer. Cancel-safe: if the future is
    /// dropped, no data is lost.
    pub async fn fill(&mut self) -> Result<(), PgError> {
        self.reserve_read();
        let n = self
            .io
            .read_buf(&mut self.rbuf)
            .await
            .map_err(|source| self.io_error(source))?;
        if n == 0 {
            return Err(self.closed());
        }
        self.received += n as u64;
        Ok(())
    }

    /// Bytes read from the socket since the connection opened.
    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    /// Room for one large read. Growth follows the bytes already buffered (doubling a
    /// large partial frame), never a frame's announced length: an unauthenticated
    /// header cannot make skusync allocate, and a big frame still costs O(n) copying.
    fn reserve_read(&mut self) {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK.max(self.rbuf.len()));
        }
        // One huge row (a large value in any published table) grew the buffer; once it
        // is consumed, a small one takes over, so the peak is not kept until a reconnect.
        if self.rbuf.capacity() > 16 * READ_CHUNK && self.rbuf.len() < READ_CHUNK {
            let mut fresh = BytesMut::with_capacity(READ_CHUNK);
            fresh.extend_from_slice(&self.rbuf);
            self.rbuf = fresh;
        }
    }

    /// A socket error, naming the server.
    fn io_error(&self, source: std::io::Error) -> PgError {
        PgError::Io {
            addr: self.addr.clone(),
            source,
        }
    }

    /// A read returned end of file.
    fn closed(&self) -> PgError {
        self.io_error(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "server closed the connection",
        ))
    }

    async fn read_frame(&mut self) -> Result<Frame, PgError> {
        loop {
            if let Some(f) = wire::parse_frame(&mut self.rbuf, self.max_frame)? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Next non-replication message; an ErrorResponse becomes `PgError::Server`.
    async fn read_std(&mut self) -> Result<Message, PgError> {
        match self.read_frame().await? {
            Frame::Other(Message::ErrorResponse(body)) => {
                Err(PgError::Server(server_error(body.fields())))
            }
            Frame::Other(m) => Ok(m),
            _ => Err(PgError::Protocol(
                "unexpected CopyBoth frame outside replication".into(),
            )),
        }
    }

    /// Run a simple query (the only protocol walsenders accept) and collect its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleRow>, PgError> {
        frontend::query(sql, &mut self.wbuf).map_err(|e| PgError::Config(format!("query: {e}")))?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut columns = std::sync::Arc::new(Vec::new());
        let mut error = None;
        loop {
            match self.read_std().await {
                Err(PgError::Server(e)) => error = Some(e),
                Err(e) => return Err(e),
                Ok(Message::RowDescription(d)) => {
                    let mut names = Vec::new();
                    let mut fields = d.fields();
                    while let Some(f) = fields
                        .next()
                        .map_err(|e| PgError::Protocol(e.to_string()))?
                    {
                        names.push(f.name().to_string());
                    }
                    columns = std::sync::Arc::new(names);
                }
                Ok(Message::DataRow(r)) => {
                    let buf = r.buffer();
                    let mut values = Vec::with_capacity(columns.len());
                    let mut ranges = r.ranges();
                    while let Some(range) = ranges
                        .next()
                        .map_err(|e| PgError::Protocol(e.to_string()))?
                    {
                        values.push(match range {
                            Some(rg) => Some(
                                String::from_utf8(buf.get(rg).unwrap_or_default().to_vec())
                                    .map_err(|_| PgError::Protocol("non-UTF-8 value".into()))?,
                            ),
                            None => None,
                        });
                    }
                    rows.push(SimpleRow {
                        columns: columns.clone(),
                        values,
                    });
                }
                Ok(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(PgError::Server(e)),
                        None => Ok(rows),
                    };
                }
                Ok(_) => {} // CommandComplete, EmptyQueryResponse, notices.
            }
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, PgError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| PgError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |n: &str| {
            row.get(n)
                .ok_or_else(|| PgError::Protocol(format!("IDENTIFY_SYSTEM: no {n}")))
        };
        Ok(SystemInfo {
            system_id: field("systemid")?.to_string(),
            timeline: field("timeline")?
                .parse()
                .map_err(|_| PgError::Protocol("IDENTIFY_SYSTEM: bad timeline".into()))?,
            xlogpos: field("xlogpos")?
                .parse()
                .map_err(|_| PgError::Protocol("IDENTIFY_SYSTEM: bad xlogpos".into()))?,
            dbname: row.get("dbname").map(str::to_string),
        })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput`, with the snapshot
    /// choice in the syntax the server understands (the option list exists from PG15).
    pub async fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<SlotInfo, PgError> {
        let temp = if temporary { " TEMPORARY" } else { "" };
        let sql = if self.server_major() >= 15 {
            let s = match snapshot {
                SnapshotAction::Export => "export",
                SnapshotAction::Nothing => "nothing",
            };
            format!(
                "CREATE_REPLICATION_SLOT {}{temp} LOGICAL pgoutput (SNAPSHOT '{s}')",
                quote_ident(name)
            )
        } else {
            let s = match snapshot {
                SnapshotAction::Export => "EXPORT_SNAPSHOT",
                SnapshotAction::Nothing => "NOEXPORT_SNAPSHOT",
            };
            format!(
                "CREATE_REPLICATION_SLOT {}{temp} LOGICAL pgoutput {s}",
                quote_ident(name)
            )
        };
        let rows = self.simple_query(&sql).await?;
        let row = rows
            .first()
            .ok_or_else(|| PgError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        Ok(SlotInfo {
            slot_name: row.get("slot_name").unwrap_or(name).to_string(),
            consistent_point: row
                .get("consistent_point")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    PgError::Protocol("CREATE_REPLICATION_SLOT: bad consistent_point".into())
                })?,
            snapshot_name: row.get("snapshot_name").map(str::to_string),
        })
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), PgError> {
        let wait = if wait { " WAIT" } else { "" };
        self.simple_query(&format!(
            "DROP_REPLICATION_SLOT {}{wait}",
            quote_ident(name)
        ))
        .await
        .map(|_| ())
    }

    /// `START_REPLICATION SLOT ... LOGICAL start (...)`; on success the connection is in
    /// CopyBoth mode and [`recv`](Self::recv) yields the stream.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        opts: &ReplicationOptions,
    ) -> Result<(), PgError> {
        let pubs = opts
            .publications
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(",");
        let mut sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (\"proto_version\" '{}', \"publication_names\" {}",
            quote_ident(slot),
            opts.proto_version,
            quote_literal(&pubs),
        );
        if opts.messages {
            sql.push_str(", \"messages\" 'true'");
        }
        sql.push(')');
        frontend::query(&sql, &mut self.wbuf)
            .map_err(|e| PgError::Config(format!("query: {e}")))?;
        self.flush().await?;
        loop {
            match self.read_frame().await? {
                Frame::CopyBothResponse => return Ok(()),
                Frame::Other(Message::ErrorResponse(body)) => {
                    let err = server_error(body.fields());
                    // Drain to ReadyForQuery so the connection stays usable.
                    loop {
                        if let Frame::Other(Message::ReadyForQuery(_)) = self.read_frame().await? {
                            break;
                        }
                    }
                    return Err(PgError::Server(err));
                }
                Frame::Other(Message::NoticeResponse(_)) => {}
                _ => {
                    return Err(PgError::Protocol(
                        "unexpected reply to START_REPLICATION".into(),
                    ));
                }
            }
        }
    }

    /// Paced reads (while catching up) or a wake-up per message (live). TCP only, with or
    /// without TLS: over a Unix socket there are no segments to save, and pacing measured
    /// no cheaper for the walsender, only slower. A caller that turns it on stops waiting
    /// on [`fill`](Self::fill) and calls [`fill_now`](Self::fill_now) at intervals instead.
    pub fn set_read_batching(&mut self, on: bool) {
        if !matches!(self.io, Transport::Unix(_)) {
            if on && !self.batching {
                self.pacer = ReadPacer::default();
            }
            self.batching = on;
        }
    }

    /// Whether reads are paced.
    pub fn read_batching(&self) -> bool {
        self.batching
    }

    /// Bytes the next paced read asks for.
    pub fn paced_ask(&self) -> usize {
        self.pacer.ask()
    }

    /// One paced read: at most what the [`ReadPacer`] asks for, without waiting (a read
    /// that would wait is dropped; nothing is lost). Returns whether anything was read.
    pub fn fill_now(&mut self) -> Result<bool, PgError> {
        use bytes::BufMut;
        use futures::FutureExt;
        let ask = self.pacer.ask();
        self.reserve_read();
        self.rbuf.reserve(ask);
        let start = self.rbuf.len();
        let mut limited = (&mut self.rbuf).limit(ask);
        let r = self.io.read_buf(&mut limited).now_or_never();
        let got = self.rbuf.len() - start;
        match r {
            Some(Ok(0)) => return Err(self.closed()),
            Some(Err(source)) => return Err(self.io_error(source)),
            Some(Ok(_)) | None => {}
        }
        self.received += got as u64;
        self.pacer.observe(ask, got);
        Ok(got > 0)
    }

    /// Bytes read from the socket but not yet parsed.
    pub fn buffered_len(&self) -> usize {
        self.rbuf.len()
    }

    /// Next stream item already in the read buffer, without touching the socket. Lets the
    /// caller process a whole socket read as one batch before acknowledging.
    pub fn try_recv_buffered(&mut self) -> Result<Option<StreamItem>, PgError> {
        loop {
            match wire::parse_frame(&mut self.rbuf, self.max_frame)? {
                None => return Ok(None),
                Some(Frame::CopyData(b)) => {
                    return Ok(Some(StreamItem::Message(wire::parse_repl_message(b)?)));
                }
                Some(Frame::Other(Message::CopyDone)) => return Ok(Some(StreamItem::End)),
                Some(Frame::Other(Message::ErrorResponse(body))) => {
                    return Err(PgError::Server(server_error(body.fields())));
                }
                // Notices and parameter changes carry nothing for the stream.
                Some(Frame::Other(Message::NoticeResponse(_) | Message::ParameterStatus(_))) => {}
                Some(_) => {
                    return Err(PgError::Protocol(
                        "unexpected frame in CopyBoth stream".into(),
                    ));
                }
            }
        }
    }

    /// Next stream item, reading from the socket as needed. Cancel-safe.
    pub async fn recv(&mut self) -> Result<StreamItem, PgError> {
        loop {
            if let Some(item) = self.try_recv_buffered()? {
                return Ok(item);
            }
            self.fill().await?;
        }
    }

    /// Send a standby status update.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply: bool,
    ) -> Result<(), PgError> {
        wire::standby_status_update(
            write.0,
            flush.0,
            apply.0,
            wire::pg_now(),
            reply,
            &mut self.wbuf,
        );
        self.flush().await
    }

    /// End the stream cleanly: CopyDone, drain until ReadyForQuery, Terminate. The caller
    /// sends its final status update first.
    pub async fn finish(mut self) -> Result<(), PgError> {
        frontend::copy_done(&mut self.wbuf);
        self.flush().await?;
        let drain = async {
            loop {
                match self.read_frame().await? {
                    Frame::Other(Message::ReadyForQuery(_)) => return Ok::<_, PgError>(()),
                    Frame::Other(Message::ErrorResponse(body)) => {
                        return Err(PgError::Server(server_error(body.fields())));
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .map_err(|_| PgError::Protocol("server did not end the stream within 10 s".into()))??;
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
        Ok(())
    }
}

/// Build a typed server error from ErrorResponse fields.
pub fn server_error(
    mut fields: postgres_protocol::message::backend::ErrorFields<'_>,
) -> ServerError {
    let mut e = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => e.severity = v,
            b'S' if e.severity.is_empty() => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    e
}

/// Why `channel_binding=require` cannot be met.
pub(crate) fn channel_binding_unavailable(tls: bool, end_point: bool) -> String {
    let why = if !tls {
        "the connection is not TLS (the server does not have ssl = on, or sslmode=prefer fell back)"
    } else if !end_point {
        "the server certificate's signature algorithm (e.g. Ed25519 or RSA-PSS) has no \
         tls-server-end-point hash"
    } else {
        "the server does not offer SCRAM-SHA-256-PLUS (pg_hba.conf must use scram-sha-256, and \
         the role's password must be a SCRAM secret)"
    };
    format!("channel_binding=require, but {why}; nothing was sent")
}

/// Auth failures during startup are definite and deserve their own message.
fn startup_error(e: PgError, user: &str) -> PgError {
    match e {
        PgError::FrameTooLarge { len, max } => PgError::Protocol(format!(
            "the server sent a {len}-byte message before the connection was ready (at most \
             {max} bytes are accepted then): is this a PostgreSQL server?"
        )),
        PgError::Server(s) if s.code.starts_with("28") => PgError::Auth {
            user: user.to_string(),
            reason: s.message,
        },
        other => other,
    }
}

pub use super::ident::quote_ident;

/// Quote a string literal (standard_conforming_strings is always on in supported versions).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
