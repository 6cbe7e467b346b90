//! PostgreSQL connections that cannot be downgraded: `require_auth`, `channel_binding`
//! (SCRAM-SHA-256-PLUS), no password to an unverified server, and frame caps before
//! authentication. Both connection kinds are tested: the replication connection and the
//! ordinary SQL connection (tokio-postgres under skusync's guarded stream).

use crate::harness::{PasswordEncryption, PgOptions, PgServer, TestCa, TlsFiles};
use skusync::pg::{PgConnectConfig, PgError, ReplConnection, meta};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the fake server saw from the client.
#[derive(Debug)]
struct Seen {
    /// The client sent its startup message.
    startup: bool,
    /// Every byte the client sent after the startup message, until it closed.
    after_startup: Vec<u8>,
}

/// A fake PostgreSQL on loopback for one connection: answers "N" to SSLRequest, reads
/// the startup message, sends `reply`, then records what the client sends until it
/// closes the connection (or 5 s pass).
async fn fake_server(reply: Vec<u8>) -> (u16, tokio::task::JoinHandle<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut seen = Seen {
            startup: false,
            after_startup: Vec::new(),
        };
        loop {
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).await.is_err() {
                return seen;
            }
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            if s.read_exact(&mut body).await.is_err() {
                return seen;
            }
            if body[..4] == 80877103u32.to_be_bytes() {
                s.write_all(b"N").await.unwrap();
                continue;
            }
            seen.startup = true;
            break;
        }
        let _ = s.write_all(&reply).await;
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            s.read_to_end(&mut seen.after_startup),
        )
        .await;
        seen
    });
    (port, task)
}

fn cleartext_request() -> Vec<u8> {
    vec![b'R', 0, 0, 0, 8, 0, 0, 0, 3]
}

fn md5_request() -> Vec<u8> {
    vec![b'R', 0, 0, 0, 12, 0, 0, 0, 5, 1, 2, 3, 4]
}

#[derive(Copy, Clone, Debug)]
enum Kind {
    Replication,
    Sql,
}

async fn connect(kind: Kind, url: &str) -> Result<(), PgError> {
    let cfg = PgConnectConfig::from_url(url)?;
    match kind {
        Kind::Replication => ReplConnection::connect(&cfg).await.map(|_| ()),
        Kind::Sql => meta::connect(&cfg).await.map(|_| ()),
    }
}

/// Connect `kind` to a fake server that sends `reply` after the startup message.
async fn against_fake(kind: Kind, reply: Vec<u8>, query: &str) -> (Result<(), PgError>, Seen) {
    let (port, server) = fake_server(reply).await;
    let url = format!("postgresql://sku:s3cret-pw@127.0.0.1:{port}/db?connect_timeout=5&{query}");
    let r = connect(kind, &url).await;
    (r, server.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_server_asking_for_a_cleartext_or_md5_password_gets_nothing() {
    let ca = TestCa::new();
    let verify_full = format!("sslmode=verify-full&sslrootcert={}", ca.ca_cert().display());
    for kind in [Kind::Replication, Kind::Sql] {
        for (method, request) in [("password", cleartext_request()), ("md5", md5_request())] {
            // Default sslmode (prefer, here answered "no TLS"), require_auth=scram-sha-256.
            let (r, seen) = against_fake(kind, request.clone(), "require_auth=scram-sha-256").await;
            let err = r.unwrap_err();
            assert!(
                matches!(err, PgError::Auth { .. }),
                "{kind:?} {method}: {err}"
            );
            assert!(err.to_string().contains("require_auth"), "{err}");
            assert!(!err.is_transient());
            assert!(seen.startup);
            assert!(
                seen.after_startup.is_empty(),
                "{kind:?} {method}: nothing may follow the request: {:?}",
                seen.after_startup
            );

            // Nothing in the URL: the server is not verified, so no cleartext/md5.
            let (r, seen) = against_fake(kind, request.clone(), "sslmode=prefer").await;
            let err = r.unwrap_err().to_string();
            assert!(err.contains("not verified"), "{kind:?} {method}: {err}");
            assert!(err.contains(&format!("require_auth={method}")), "{err}");
            assert!(!err.contains("s3cret-pw"), "{err}");
            assert!(seen.after_startup.is_empty(), "{kind:?} {method}");

            // verify-full: the server's "no TLS" ends it before the startup message.
            let (r, seen) = against_fake(kind, request.clone(), &verify_full).await;
            let err = r.unwrap_err();
            assert!(
                err.to_string().contains("does not accept TLS"),
                "{kind:?} {method}: {err}"
            );
            assert!(!seen.startup && seen.after_startup.is_empty());

            // Control: when the URL names the method, the password message does go out.
            let (r, seen) = against_fake(kind, request, &format!("require_auth={method}")).await;
            assert!(r.is_err(), "the fake server never finishes");
            assert_eq!(
                seen.after_startup.first(),
                Some(&b'p'),
                "{kind:?} {method}: a password message"
            );
            if method == "password" {
                assert!(
                    seen.after_startup.windows(9).any(|w| w == b"s3cret-pw"),
                    "cleartext really sent"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_auth_refuses_a_server_that_skips_authentication_unless_none_is_allowed() {
    // AuthenticationOk right away, then ReadyForQuery.
    let trust = [
        &[b'R', 0, 0, 0, 8, 0, 0, 0, 0][..],
        &[b'Z', 0, 0, 0, 5, b'I'][..],
    ]
    .concat();
    for kind in [Kind::Replication, Kind::Sql] {
        let (r, _) = against_fake(kind, trust.clone(), "require_auth=scram-sha-256").await;
        let err = r.unwrap_err();
        assert!(matches!(err, PgError::Auth { .. }), "{kind:?}: {err}");
        assert!(
            err.to_string().contains("did not ask for authentication"),
            "{err}"
        );
        let (r, _) = against_fake(kind, trust.clone(), "require_auth=scram-sha-256,none").await;
        // Past authentication the fake server has nothing more to say.
        assert!(
            !matches!(r, Err(PgError::Auth { .. })),
            "{kind:?}: none allowed: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_frame_header_before_authentication_fails_at_once() {
    for kind in [Kind::Replication, Kind::Sql] {
        // 2 GiB announced (and, separately, 1 MiB: under max_message_bytes but over
        // the 64 KiB allowed before the connection is ready); the bytes never come.
        for header in [[b'R', 0x80, 0, 0, 0], [b'E', 0, 0x10, 0, 0]] {
            let started = Instant::now();
            let (r, _) = against_fake(kind, header.to_vec(), "sslmode=disable").await;
            let err = r.unwrap_err();
            assert!(
                err.to_string()
                    .contains("before the connection was ready (at most 65536 bytes"),
                "{kind:?}: {err}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{kind:?}: refused on the header, not after waiting for the body"
            );
        }
    }
}

const PLUS_USER: &str = "plus_user";
const PLUS_PW: &str = "plus pw";

fn scram_tls_pg(files: &TlsFiles) -> PgServer {
    let pg = PgServer::start_with(PgOptions {
        tls: Some(files.clone()),
        hba: Some(vec![
            "hostssl all all 127.0.0.1/32 scram-sha-256".into(),
            "hostssl replication all 127.0.0.1/32 scram-sha-256".into(),
        ]),
        password_encryption: Some(PasswordEncryption::ScramSha256),
        ..Default::default()
    });
    pg.psql(&format!(
        "CREATE ROLE {PLUS_USER} LOGIN REPLICATION PASSWORD '{PLUS_PW}'"
    ));
    pg
}

fn plus_url(host: &str, port: u16, query: &str) -> String {
    format!("postgresql://{PLUS_USER}:plus%20pw@{host}:{port}/postgres?connect_timeout=5&{query}")
}

/// A man in the middle with a certificate the client trusts (same CA, right name): it
/// terminates the client's TLS and opens its own TLS session to the real server,
/// relaying bytes. Only channel binding can notice it.
async fn tls_relay(files: &TlsFiles, upstream_port: u16) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&files.ca_cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut down, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            tokio::spawn(async move {
                let mut req = [0u8; 8];
                down.read_exact(&mut req).await?;
                down.write_all(b"S").await?;
                let mut down = acceptor.accept(down).await?;
                let mut up = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await?;
                up.write_all(&req).await?;
                let mut answer = [0u8; 1];
                up.read_exact(&mut answer).await?;
                let name = ServerName::try_from("localhost").unwrap();
                let mut up = connector.connect(name, up).await?;
                tokio::io::copy_bidirectional(&mut down, &mut up).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_plus_binds_the_password_exchange_to_the_tls_session() {
    let mut ca = TestCa::new();
    let files = ca.issue_server_cert(&["localhost"]);
    let pg = scram_tls_pg(&files);
    let ca_path = ca.ca_cert().display().to_string();
    let verify_full = format!("sslmode=verify-full&sslrootcert={ca_path}");
    for kind in [Kind::Replication, Kind::Sql] {
        for q in [
            format!("{verify_full}&channel_binding=require"),
            // Binding protects even without certificate checks: it is what require adds.
            "sslmode=require&channel_binding=require".to_string(),
            format!("{verify_full}&require_auth=scram-sha-256&channel_binding=prefer"),
        ] {
            connect(kind, &plus_url("localhost", pg.port(), &q))
                .await
                .unwrap_or_else(|e| panic!("{kind:?} {q}: {e}"));
        }
        // The SQL connection really works over the guarded stream.
        if let Kind::Sql = kind {
            let cfg = PgConnectConfig::from_url(&plus_url(
                "localhost",
                pg.port(),
                &format!("{verify_full}&channel_binding=require"),
            ))
            .unwrap();
            let client = meta::connect(&cfg).await.unwrap();
            let row = client
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            assert!(row.get::<_, bool>(0), "the session is TLS");
        }
    }

    // A relay holding a certificate the client trusts: without binding the client cannot
    // tell (control), with binding the server's proof does not match and it fails.
    let relay = tls_relay(&ca.issue_server_cert(&["localhost"]), pg.port()).await;
    for kind in [Kind::Replication, Kind::Sql] {
        connect(
            kind,
            &plus_url(
                "localhost",
                relay,
                &format!("{verify_full}&channel_binding=disable"),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: the relay passes plain SCRAM: {e}"));
        let err = connect(
            kind,
            &plus_url(
                "localhost",
                relay,
                &format!("{verify_full}&channel_binding=prefer"),
            ),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, PgError::Auth { .. }),
            "{kind:?}: the relay breaks the binding: {err}"
        );
    }

    // A server without TLS: channel_binding=require cannot be met and sends nothing.
    let plain = PgServer::start_with(PgOptions {
        hba: Some(vec![
            "host all all 127.0.0.1/32 scram-sha-256".into(),
            "host replication all 127.0.0.1/32 scram-sha-256".into(),
        ]),
        password_encryption: Some(PasswordEncryption::ScramSha256),
        ..Default::default()
    });
    plain.psql(&format!(
        "CREATE ROLE {PLUS_USER} LOGIN REPLICATION PASSWORD '{PLUS_PW}'"
    ));
    for kind in [Kind::Replication, Kind::Sql] {
        connect(kind, &plus_url("127.0.0.1", plain.port(), "sslmode=prefer"))
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: plain SCRAM works: {e}"));
        let err = connect(
            kind,
            &plus_url(
                "127.0.0.1",
                plain.port(),
                "sslmode=prefer&channel_binding=require",
            ),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PgError::Auth { .. }), "{kind:?}: {err}");
        assert!(!err.is_transient());
    }
}
