//! Connection settings from a `postgresql://` URL, with libpq's environment fallbacks
//! (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`, `PGPASSFILE`,
//! `PGSSLMODE`, `PGSSLROOTCERT`) and `~/.pgpass`. The password is never printed.

use super::error::PgError;
use percent_encoding::percent_decode_str;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// libpq's `sslmode`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// libpq's `allow` is treated as `prefer`: TLS if the server offers it.
    Prefer,
    /// TLS required; the certificate is not verified (unless `sslrootcert` is given,
    /// which libpq treats as `verify-ca`).
    Require,
    /// TLS with the chain verified against `sslrootcert`.
    VerifyCa,
    /// `VerifyCa` plus the host name must match the certificate.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate chain is checked (so the server is who the CA
    /// says it is, and a man in the middle cannot answer in its place).
    pub fn verifies_server(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    fn parse(s: &str) -> Result<SslMode, PgError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(PgError::Config(format!(
                    "postgres.url: unknown sslmode {other:?}; use disable, prefer, require, verify-ca or verify-full"
                )));
            }
        })
    }
}

/// libpq's `channel_binding`: whether SCRAM must be bound to the TLS channel
/// (`SCRAM-SHA-256-PLUS`, `tls-server-end-point`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Never bind (plain `SCRAM-SHA-256`).
    Disable,
    /// Bind when the connection is TLS and the server offers `SCRAM-SHA-256-PLUS` (default).
    Prefer,
    /// Authentication must be SCRAM with channel binding; anything else is refused.
    Require,
}

impl ChannelBinding {
    fn parse(s: &str) -> Result<ChannelBinding, PgError> {
        Ok(match s {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            other => {
                return Err(PgError::Config(format!(
                    "postgres.url: unknown channel_binding {other:?}; use disable, prefer or require"
                )));
            }
        })
    }
}

/// An authentication method a server can ask for (libpq's `require_auth` names).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// `password`: the password in cleartext.
    Password,
    /// `md5`: an MD5 hash a listener can replay or brute-force.
    Md5,
    /// `gss` (skusync never completes it, but the name is accepted as in libpq).
    Gss,
    /// `sspi` (as `gss`).
    Sspi,
    /// `scram-sha-256` (with or without channel binding).
    ScramSha256,
    /// `none`: the server lets the client in without asking for anything.
    None,
}

impl AuthMethod {
    const ALL: [AuthMethod; 6] = [
        AuthMethod::Password,
        AuthMethod::Md5,
        AuthMethod::Gss,
        AuthMethod::Sspi,
        AuthMethod::ScramSha256,
        AuthMethod::None,
    ];

    /// The `require_auth` spelling.
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::Gss => "gss",
            AuthMethod::Sspi => "sspi",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::None => "none",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// libpq 16's `require_auth`: which methods the server may use. A comma list allows
/// exactly those; a list of `!method` allows everything else.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RequireAuth {
    allowed: u8,
    /// Set by a list without `!`: those methods were named as wanted.
    positive: bool,
}

impl Default for RequireAuth {
    fn default() -> Self {
        RequireAuth {
            allowed: AuthMethod::ALL.iter().fold(0, |a, m| a | m.bit()),
            positive: false,
        }
    }
}

impl RequireAuth {
    /// Parse libpq's syntax (`scram-sha-256`, `md5,password`, `!password,!md5`).
    pub fn parse(s: &str) -> Result<RequireAuth, PgError> {
        let bad = |why: String| PgError::Config(format!("postgres.url: require_auth: {why}"));
        if s.is_empty() {
            return Ok(RequireAuth::default());
        }
        let mut named = 0u8;
        let mut negated = None;
        for item in s.split(',') {
            let (neg, name) = match item.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, item),
            };
            if *negated.get_or_insert(neg) != neg {
                return Err(bad(
                    "negative (!method) and positive methods cannot be combined".into(),
                ));
            }
            let m = AuthMethod::ALL
                .into_iter()
                .find(|m| m.name() == name)
                .ok_or_else(|| {
                    bad(format!(
                        "unknown method {name:?}; use password, md5, gss, sspi, scram-sha-256 or none"
                    ))
                })?;
            if named & m.bit() != 0 {
                return Err(bad(format!("{name:?} is listed twice")));
            }
            named |= m.bit();
        }
        Ok(if negated == Some(true) {
            RequireAuth {
                allowed: RequireAuth::default().allowed & !named,
                positive: false,
            }
        } else {
            RequireAuth {
                allowed: named,
                positive: true,
            }
        })
    }

    /// Whether the server may use `m`.
    pub fn allows(&self, m: AuthMethod) -> bool {
        self.allowed & m.bit() != 0
    }

    /// Whether `m` was named in a positive list: the operator opted in to it, so a
    /// cleartext or md5 password may go over a connection whose server is not verified.
    pub fn explicitly_allows(&self, m: AuthMethod) -> bool {
        self.positive && self.allows(m)
    }

    /// The setting as libpq would spell it, for messages.
    pub fn describe(&self) -> String {
        if *self == RequireAuth::default() {
            return "(not set)".into();
        }
        let names: Vec<&str> = AuthMethod::ALL
            .into_iter()
            .filter(|m| self.allows(*m))
            .map(AuthMethod::name)
            .collect();
        if names.is_empty() {
            "(nothing allowed)".into()
        } else {
            names.join(",")
        }
    }
}

/// Where the server's CA comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// A password that never shows up in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wrap a secret.
    pub fn new(s: String) -> Password {
        Password(s)
    }

    /// The secret itself, for the authentication exchange only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// Where to connect and how.
#[derive(Clone, Debug)]
pub struct PgConnectConfig {
    /// Host name, IP address, or a directory holding the Unix socket (starts with `/`).
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Password>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<RootCert>,
    /// `channel_binding` (default `prefer`).
    pub channel_binding: ChannelBinding,
    /// `require_auth` (default: any method, subject to the cleartext/md5 rule in
    /// [`PgConnectConfig::password_method_allowed`]).
    pub require_auth: RequireAuth,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// Cap on one server message on the replication connection (`postgres.max_message_bytes`).
    pub max_message_bytes: usize,
}

impl PgConnectConfig {
    /// Parse a `postgresql://` (or `postgres://`) URL, filling gaps from the environment.
    pub fn from_url(url: &str) -> Result<PgConnectConfig, PgError> {
        Self::from_url_with_env(url, &|k| std::env::var(k).ok())
    }

    /// As [`from_url`](Self::from_url) with an explicit environment (for tests).
    pub fn from_url_with_env(
        url: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PgConnectConfig, PgError> {
        let bad = |why: &str| PgError::Config(format!("postgres.url: {why}"));
        let parsed = url::Url::parse(url).map_err(|e| bad(&format!("not a valid URL ({e})")))?;
        if parsed.scheme() != "postgresql" && parsed.scheme() != "postgres" {
            return Err(bad("must start with postgresql://"));
        }
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let mut host = parsed.host_str().map(|h| {
            // url keeps IPv6 brackets; sockets want them off.
            h.trim_start_matches('[').trim_end_matches(']').to_string()
        });
        let mut port = parsed.port();
        let mut user = (!parsed.username().is_empty()).then(|| decode(parsed.username()));
        let mut password = parsed.password().map(|p| Password(decode(p)));
        let path = parsed.path().trim_start_matches('/');
        let mut dbname = (!path.is_empty()).then(|| decode(path));
        let mut sslmode = None;
        let mut sslrootcert = None;
        let mut application_name = None;
        let mut passfile = None;
        let mut connect_timeout = None;
        let mut channel_binding = None;
        let mut require_auth = None;
        for (k, v) in parsed.query_pairs() {
            let v = v.into_owned();
            match k.as_ref() {
                "host" => host = Some(v),
                "port" => port = Some(v.parse().map_err(|_| bad("port is not a number"))?),
                "user" => user = Some(v),
                "password" => password = Some(Password(v)),
                "dbname" => dbname = Some(v),
                "sslmode" => sslmode = Some(SslMode::parse(&v)?),
                "sslrootcert" => sslrootcert = Some(v),
                "application_name" => application_name = Some(v),
                "channel_binding" => channel_binding = Some(ChannelBinding::parse(&v)?),
                "require_auth" => require_auth = Some(RequireAuth::parse(&v)?),
                "passfile" => passfile = Some(PathBuf::from(v)),
                "connect_timeout" => {
                    connect_timeout = Some(
                        v.parse::<u64>()
                            .map_err(|_| bad("connect_timeout must be whole seconds"))?,
                    )
                }
                // Harmless libpq options we do not need.
                "sslnegotiation" | "sslsni" | "target_session_attrs" | "options" => {}
                other => return Err(bad(&format!("unsupported parameter {other:?}"))),
            }
        }
        let host = host
            .or_else(|| env("PGHOST"))
            .unwrap_or_else(|| "localhost".into());
        let port = match port {
            Some(p) => p,
            None => match env("PGPORT") {
                Some(p) => p.parse().map_err(|_| bad("PGPORT is not a number"))?,
                None => 5432,
            },
        };
        let user = user
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .ok_or_else(|| bad("no user name: put it in the URL (postgresql://USER@host/db)"))?;
        let dbname = dbname
            .or_else(|| env("PGDATABASE"))
            .unwrap_or_else(|| user.clone());
        let sslmode = match sslmode {
            Some(m) => Some(m),
            None => env("PGSSLMODE").map(|m| SslMode::parse(&m)).transpose()?,
        };
        let sslrootcert = sslrootcert.or_else(|| env("PGSSLROOTCERT")).map(|s| {
            if s == "system" {
                RootCert::System
            } else {
                RootCert::File(PathBuf::from(s))
            }
        });
        let sslmode = match (sslmode, &sslrootcert) {
            // libpq 16+: the public trust store proves nothing without the host name check,
            // so `system` means verify-full and a weaker explicit mode is an error.
            (None | Some(SslMode::VerifyFull), Some(RootCert::System)) => SslMode::VerifyFull,
            (Some(m), Some(RootCert::System)) => {
                return Err(bad(&format!(
                    "sslmode={} cannot be used with sslrootcert=system (any publicly trusted \
                     certificate for any name would pass); use sslmode=verify-full or leave \
                     sslmode out",
                    m.name()
                )));
            }
            // libpq: a root certificate given with sslmode=require means verify-ca.
            (Some(SslMode::Require), Some(_)) => SslMode::VerifyCa,
            (Some(m), _) => m,
            (None, _) => SslMode::Prefer,
        };
        let channel_binding = channel_binding.unwrap_or(ChannelBinding::Prefer);
        let require_auth = require_auth.unwrap_or_default();
        if channel_binding == ChannelBinding::Require {
            if sslmode == SslMode::Disable {
                return Err(bad(
                    "channel_binding=require needs TLS, but sslmode=disable; use sslmode=verify-full",
                ));
            }
            if !require_auth.allows(AuthMethod::ScramSha256) {
                return Err(bad(&format!(
                    "channel_binding=require needs scram-sha-256, which require_auth={} excludes",
                    require_auth.describe()
                )));
            }
        }
        if password.is_none() {
            password = env("PGPASSWORD").map(Password);
        }
        if password.is_none() {
            let file = passfile
                .or_else(|| env("PGPASSFILE").map(PathBuf::from))
                .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")));
            if let Some(file) = file {
                password = passfile_lookup(&file, &host, port, &dbname, &user).map(Password);
            }
        }
        Ok(PgConnectConfig {
            host,
            port,
            user,
            dbname,
            password,
            sslmode,
            sslrootcert,
            channel_binding,
            require_auth,
            application_name: application_name.unwrap_or_else(|| "skusync".into()),
            connect_timeout: Duration::from_secs(connect_timeout.unwrap_or(10).max(1)),
            max_message_bytes: crate::pg::wire::DEFAULT_MAX_FRAME,
        })
    }

    /// `host:port` (or the socket path) for messages; never includes credentials.
    pub fn addr(&self) -> String {
        if self.is_unix_socket() {
            self.socket_path().display().to_string()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Why the connection to a non-local server is weaker than `verify-full`, if it is:
    /// for `skusync check`. A Unix socket or a loopback host has no network in between.
    pub fn weak_tls(&self) -> Option<String> {
        let local = self.is_unix_socket()
            || self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        (!local && self.sslmode != SslMode::VerifyFull).then(|| {
            format!(
                "{} is not a loopback host and sslmode={}: the server's identity is not fully \
                 checked, so a man in the middle can read or alter the change stream",
                self.host,
                self.sslmode.name()
            )
        })
    }

    /// Whether `host` names a Unix socket directory.
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The Unix socket file (`<dir>/.s.PGSQL.<port>`).
    pub fn socket_path(&self) -> PathBuf {
        Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port))
    }

    /// Whether to answer a server that asks for authentication method `m` (`None` when it
    /// lets the client in without asking). `Err` is the reason, naming the setting and
    /// the fix; nothing has been sent to the server then.
    ///
    /// Beyond `require_auth` and `channel_binding`, a cleartext or md5 password goes only
    /// to a server whose certificate was verified (`verify-ca`, `verify-full`) or over a
    /// Unix socket (the kernel delivers it to the socket's owner, no network in between),
    /// unless `require_auth` names the method: without verification a man in the middle
    /// can answer "no TLS" and ask for it, and an md5 answer can be relayed or
    /// brute-forced. SCRAM reveals nothing and is always fine.
    pub fn auth_request_allowed(&self, m: AuthMethod) -> Result<(), String> {
        if !self.require_auth.allows(m) {
            return Err(match m {
                AuthMethod::None => format!(
                    "the server did not ask for authentication, which require_auth={} does not \
                     allow (add none to require_auth if that server is meant to trust skusync)",
                    self.require_auth.describe()
                ),
                _ => format!(
                    "the server asks for {} authentication, which require_auth={} does not \
                     allow; nothing was sent (check pg_hba.conf on the server, or that you \
                     reach the right server)",
                    m.name(),
                    self.require_auth.describe()
                ),
            });
        }
        if self.channel_binding == ChannelBinding::Require && m != AuthMethod::ScramSha256 {
            return Err(format!(
                "the server asks for {} authentication, but channel_binding=require needs \
                 SCRAM-SHA-256-PLUS; nothing was sent (use scram-sha-256 in pg_hba.conf)",
                m.name()
            ));
        }
        if matches!(m, AuthMethod::Password | AuthMethod::Md5)
            && !self.sslmode.verifies_server()
            && !self.is_unix_socket()
            && !self.require_auth.explicitly_allows(m)
        {
            return Err(format!(
                "refusing to send the password with {m} authentication: the server is not \
                 verified (sslmode={mode}), so a man in the middle could be asking for it. \
                 Fix one of: use scram-sha-256 on the server (password_encryption and \
                 pg_hba.conf); or set sslmode=verify-full with sslrootcert in postgres.url; or \
                 accept the risk with require_auth={m} in postgres.url",
                m = m.name(),
                mode = self.sslmode.name()
            ));
        }
        Ok(())
    }

    /// The same settings as a tokio-postgres config for ordinary SQL connections.
    pub fn to_tokio_postgres(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .options(super::conn::TEXT_FORMS)
            .connect_timeout(self.connect_timeout)
            .ssl_mode(match self.sslmode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            })
            .channel_binding(match self.channel_binding {
                ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
                ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
                ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
            });
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        c
    }
}

/// Look up a password in a libpq passfile (`host:port:db:user:password`, `*` wildcards,
/// `\` escapes). Like libpq, a file readable by group or others is ignored.
pub fn passfile_lookup(file: &Path, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %file.display(),
            "password file has group or world access; ignoring it (chmod 0600 fixes this)"
        );
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    // libpq matches "localhost" for the default Unix socket.
    let host = if host.starts_with('/') {
        "localhost"
    } else {
        host
    };
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_passfile_line(line);
        if fields.len() != 5 {
            continue;
        }
        let want = [host, port.as_str(), db, user];
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_passfile_line(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().expect("non-empty").push(n);
                }
            }
            // The password is the last field and may contain ':' unescaped in practice.
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut().expect("non-empty").push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(url: &str, env: &[(&str, &str)]) -> Result<PgConnectConfig, PgError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PgConnectConfig::from_url_with_env(url, &|k| env.get(k).cloned())
    }

    #[test]
    fn parses_a_full_url() {
        let c = parse(
            "postgresql://sku%40sync:p%40ss@db.example:6543/ims?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
            &[],
        )
        .unwrap();
        assert_eq!(c.user, "sku@sync");
        assert_eq!(c.password.as_ref().unwrap().expose(), "p@ss");
        assert_eq!(c.host, "db.example");
        assert_eq!(c.port, 6543);
        assert_eq!(c.dbname, "ims");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(RootCert::File("/ca.pem".into())));
        assert_eq!(c.application_name, "x");
    }

    #[test]
    fn falls_back_to_environment() {
        let c = parse(
            "postgresql:///",
            &[
                ("PGHOST", "h"),
                ("PGPORT", "7"),
                ("PGUSER", "u"),
                ("PGPASSWORD", "pw"),
            ],
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.user.as_str()), ("h", 7, "u"));
        assert_eq!(c.dbname, "u");
        assert_eq!(c.password.unwrap().expose(), "pw");
        assert_eq!(c.sslmode, SslMode::Prefer);
    }

    #[test]
    fn require_with_root_cert_means_verify_ca() {
        let c = parse("postgresql://u@h/d?sslmode=require&sslrootcert=/x", &[]).unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyCa);
    }

    #[test]
    fn rejects_bad_settings_naming_them() {
        let e = parse("postgresql://u@h/d?sslmode=sometimes", &[]).unwrap_err();
        assert!(e.to_string().contains("sslmode"), "{e}");
        let e = parse("mysql://u@h/d", &[]).unwrap_err();
        assert!(e.to_string().contains("postgresql://"), "{e}");
        let e = parse("postgresql://u@h/d?bogus=1", &[]).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn require_auth_follows_libpq_16() {
        use AuthMethod::*;
        let r = RequireAuth::parse("scram-sha-256").unwrap();
        assert!(r.allows(ScramSha256) && !r.allows(Password) && !r.allows(None));
        let r = RequireAuth::parse("md5,password,none").unwrap();
        assert!(r.explicitly_allows(Md5) && r.explicitly_allows(Password) && r.allows(None));
        assert!(!r.allows(ScramSha256));
        let r = RequireAuth::parse("!password,!md5").unwrap();
        assert!(r.allows(ScramSha256) && r.allows(None) && !r.allows(Md5));
        assert!(
            !r.explicitly_allows(ScramSha256),
            "a negative list opts in to nothing"
        );
        for (bad, says) in [
            ("scram-sha-256,!md5", "combined"),
            ("md5,md5", "twice"),
            ("kerberos", "unknown method"),
        ] {
            let e = RequireAuth::parse(bad).unwrap_err().to_string();
            assert!(e.contains("require_auth") && e.contains(says), "{bad}: {e}");
        }
        assert_eq!(RequireAuth::parse("").unwrap(), RequireAuth::default());
    }

    #[test]
    fn cleartext_and_md5_need_a_verified_server_a_socket_or_an_explicit_require_auth() {
        use AuthMethod::*;
        let ok = |url: &str, m| parse(url, &[]).unwrap().auth_request_allowed(m);
        for m in [Password, Md5] {
            for mode in ["disable", "prefer", "require"] {
                let e = ok(&format!("postgresql://u@db.example/d?sslmode={mode}"), m).unwrap_err();
                assert!(e.contains(&format!("sslmode={mode}")), "{e}");
                assert!(e.contains(&format!("require_auth={}", m.name())), "{e}");
                assert!(e.contains("verify-full"), "{e}");
            }
            let url = format!(
                "postgresql://u@db.example/d?sslmode=require&require_auth={}",
                m.name()
            );
            assert_eq!(ok(&url, m), Ok(()));
            let url = "postgresql://u@db.example/d?sslmode=verify-full&sslrootcert=/ca";
            assert_eq!(ok(url, m), Ok(()));
            assert_eq!(ok("postgresql://u@x/d?host=/run/postgresql", m), Ok(()));
            let url = "postgresql://u@db.example/d?sslmode=require&require_auth=!none";
            assert!(ok(url, m).is_err(), "a negative list is not an opt-in");
        }
        assert_eq!(
            ok("postgresql://u@db.example/d?sslmode=disable", ScramSha256),
            Ok(())
        );
        let e = ok(
            "postgresql://u@h/d?sslmode=verify-full&sslrootcert=/ca&channel_binding=require",
            Password,
        )
        .unwrap_err();
        assert!(e.contains("channel_binding=require"), "{e}");
        let e = ok("postgresql://u@h/d?require_auth=scram-sha-256", None).unwrap_err();
        assert!(e.contains("did not ask"), "{e}");
    }

    #[test]
    fn channel_binding_is_parsed_and_checked_against_the_other_settings() {
        assert_eq!(
            parse("postgresql://u@h/d", &[]).unwrap().channel_binding,
            ChannelBinding::Prefer
        );
        let c = parse("postgresql://u@h/d?channel_binding=require", &[]).unwrap();
        assert_eq!(c.channel_binding, ChannelBinding::Require);
        let e = parse("postgresql://u@h/d?channel_binding=maybe", &[]).unwrap_err();
        assert!(e.to_string().contains("channel_binding"), "{e}");
        let e = parse(
            "postgresql://u@h/d?channel_binding=require&sslmode=disable",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("sslmode=disable"), "{e}");
        let e = parse(
            "postgresql://u@h/d?channel_binding=require&require_auth=md5",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("require_auth"), "{e}");
    }

    #[test]
    fn sslrootcert_system_means_verify_full_and_refuses_weaker_modes() {
        let c = parse("postgresql://u@h/d?sslrootcert=system", &[]).unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        let c = parse("postgresql://u@h/d", &[("PGSSLROOTCERT", "system")]).unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        for mode in ["disable", "prefer", "require", "verify-ca"] {
            let e = parse(
                &format!("postgresql://u@h/d?sslrootcert=system&sslmode={mode}"),
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(&format!("sslmode={mode}")), "{e}");
            assert!(e.contains("verify-full"), "{e}");
        }
        let e = parse(
            "postgresql://u@h/d?sslrootcert=system",
            &[("PGSSLMODE", "require")],
        )
        .unwrap_err();
        assert!(e.to_string().contains("sslrootcert=system"), "{e}");
    }

    #[test]
    fn weak_tls_is_anything_below_verify_full_to_a_remote_host() {
        let weak = |url: &str| parse(url, &[]).unwrap().weak_tls();
        assert!(
            weak("postgresql://u@db.example/d")
                .unwrap()
                .contains("sslmode=prefer")
        );
        assert!(weak("postgresql://u@10.0.0.5/d?sslmode=verify-ca&sslrootcert=/c").is_some());
        assert_eq!(weak("postgresql://u@db.example/d?sslrootcert=system"), None);
        assert_eq!(weak("postgresql://u@127.0.0.1/d?sslmode=disable"), None);
        assert_eq!(weak("postgresql://u@[::1]/d"), None);
        assert_eq!(weak("postgresql://u@localhost/d"), None);
        assert_eq!(weak("postgresql://u@x/d?host=/run/postgresql"), None);
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = parse("postgresql://u:hunter2@h/d", &[]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn reads_passfile_with_wildcards_and_escapes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(
            &f,
            "# c\nother:*:*:*:no\n127.0.0.1:5432:ims:sku:pa\\:ss:word\n",
        )
        .unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            passfile_lookup(&f, "127.0.0.1", 5432, "ims", "sku").as_deref(),
            Some("pa:ss:word")
        );
        assert_eq!(passfile_lookup(&f, "127.0.0.1", 5433, "ims", "sku"), None);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(passfile_lookup(&f, "127.0.0.1", 5432, "ims", "sku"), None);
    }
}
