//! Smoke tests proving the harness servers start, answer, restart and clean up.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::{
    MosquittoServer, MqttOptions, PasswordEncryption, PgOptions, PgServer, RedisCluster,
    RedisOptions, RedisServer, StopMode, TestCa, port_open,
};

#[test]
fn pg_server_restarts_and_keeps_slots() {
    let mut pg = PgServer::start();
    assert_eq!(pg.psql("select 1"), "1");
    assert_eq!(pg.psql("show wal_level"), "logical");
    pg.psql("select 1 from pg_create_logical_replication_slot('s', 'pgoutput')");
    pg.create_db("inventory");
    pg.psql_db(
        "inventory",
        "create table t(id int primary key); insert into t values (1)",
    );
    assert!(pg.try_psql("postgres", "select * from nope").is_err());

    pg.restart(StopMode::Fast);
    assert_eq!(pg.psql("select slot_name from pg_replication_slots"), "s");
    pg.restart(StopMode::Immediate);
    assert_eq!(pg.psql_db("inventory", "select count(*) from t"), "1");
    pg.kill9();
    pg.start_again();
    assert_eq!(pg.psql("select slot_name from pg_replication_slots"), "s");
    assert!(
        pg.url("app", "inventory")
            .ends_with(&format!(":{}/inventory", pg.port()))
    );

    let data = pg.data_dir();
    let port = pg.port();
    drop(pg);
    assert!(!data.exists(), "temp dir removed");
    assert!(!port_open(port), "server stopped");
}

#[tokio::test]
async fn pg_server_accepts_scram_password_login() {
    let pg = PgServer::start_with(PgOptions {
        hba: Some(vec!["host all all 127.0.0.1/32 scram-sha-256".into()]),
        password_encryption: Some(PasswordEncryption::ScramSha256),
        superuser_password: Some("su-secret".into()),
        ..Default::default()
    });
    pg.psql("create role app login password 'app-secret'");
    assert_eq!(
        pg.psql("select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname='app'"),
        "t"
    );
    let conn = format!(
        "host=127.0.0.1 port={} user=app password=app-secret dbname=postgres",
        pg.port()
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .expect("scram login");
    tokio::spawn(connection);
    let row = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "app");

    let bad = conn.replace("app-secret", "wrong");
    assert!(
        tokio_postgres::connect(&bad, tokio_postgres::NoTls)
            .await
            .is_err()
    );

    // the harness's own superuser client still works
    let su = pg.client("postgres").await;
    let row = su.query_one("select 40 + 2", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
}

#[test]
fn pg_server_serves_tls_verified_by_test_ca() {
    let mut ca = TestCa::new();
    let tls = ca.issue_server_cert(&["localhost", "127.0.0.1"]);
    let pg = PgServer::start_with(PgOptions {
        tls: Some(tls.clone()),
        hba: Some(vec!["hostssl all all 127.0.0.1/32 trust".into()]),
        ..Default::default()
    });
    assert_eq!(pg.psql("show ssl"), "on");
    let conninfo = format!(
        "host=localhost hostaddr=127.0.0.1 port={} sslmode=verify-full sslrootcert={} user=postgres dbname=postgres",
        pg.port(),
        tls.ca_cert.display()
    );
    let out = Command::new(pg.bin_dir().join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ])
        .arg(&conninfo)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");

    // plain TCP is refused by the hostssl-only hba
    let out = Command::new(pg.bin_dir().join("psql"))
        .args(["-X", "-c", "select 1"])
        .arg(format!(
            "host=127.0.0.1 port={} sslmode=disable user=postgres dbname=postgres",
            pg.port()
        ))
        .output()
        .expect("psql");
    assert!(!out.status.success());
}

#[test]
fn redis_server_answers_and_persists_across_restart() {
    let mut r = RedisServer::start_with(RedisOptions {
        persistence: true,
        ..Default::default()
    });
    assert_eq!(r.cli(&["PING"]), "PONG");
    assert_eq!(r.url(), format!("redis://127.0.0.1:{}/0", r.port()));
    r.cli(&["SET", "sku:1", "7"]);
    r.restart();
    assert_eq!(r.cli(&["GET", "sku:1"]), "7");

    r.pause();
    r.resume();
    assert_eq!(r.cli(&["PING"]), "PONG");
    r.kill9();
    assert!(!port_open(r.port()));
    r.start_again();
    assert_eq!(r.cli(&["PING"]), "PONG");

    let dir: PathBuf = r.dir().to_path_buf();
    drop(r);
    assert!(!dir.exists());
}

#[test]
fn redis_cluster_of_three_primaries_survives_a_reshard_a_failover_and_a_primary_sigkill() {
    let mut c = RedisCluster::start(3, 1);
    assert_eq!(c.nodes.len(), 6);
    // keys spread over every primary; each write reaches its replica before a fault
    let keys: Vec<String> = (0..48).map(|i| format!("k{{{i}}}")).collect();
    for (i, k) in keys.iter().enumerate() {
        c.cli_c(&["SET", k, &i.to_string()]);
    }
    let all_present = |c: &RedisCluster| {
        keys.iter()
            .enumerate()
            .all(|(i, k)| c.cli_c(&["GET", k]) == i.to_string())
    };
    let primaries = c.primaries();
    for &p in &primaries {
        let n: u64 = c.nodes[p].cli(&["DBSIZE"]).parse().unwrap();
        assert!(n > 0, "primary {p} holds no key");
        assert_eq!(c.nodes[p].cli(&["WAIT", "1", "5000"]), "1", "replicated");
    }
    assert_eq!(c.dbsize_total(), 48);

    c.reshard(primaries[0], primaries[1], 2000);
    assert!(all_present(&c), "a key was lost by the reshard");
    assert_eq!(c.dbsize_total(), 48);

    let r = c.replica_of(primaries[1]).expect("a replica");
    c.failover(r);
    assert!(c.primaries().contains(&r), "the replica is a primary now");
    assert!(!c.primaries().contains(&primaries[1]));
    assert!(all_present(&c), "a key was lost by the failover");

    let victim = primaries[2];
    let heir = c.replica_of(victim).expect("a replica");
    c.kill9(victim);
    assert!(c.primaries().contains(&heir), "the replica took over");
    assert_eq!(c.primaries().len(), 3);
    assert!(all_present(&c), "a key was lost with the killed primary");
}

#[test]
fn redis_server_with_password_and_tls() {
    let mut ca = TestCa::new();
    let r = RedisServer::start_with(RedisOptions {
        password: Some("s3cret".into()),
        tls: Some(ca.issue_server_cert(&["localhost", "127.0.0.1"])),
        ..Default::default()
    });
    assert_eq!(r.cli(&["PING"]), "PONG");
    assert!(r.url().starts_with("rediss://:s3cret@localhost:"));
}

#[test]
fn mosquitto_returns_retained_messages_and_persists() {
    let mut m = MosquittoServer::start_with(MqttOptions {
        persistence: true,
        websocket: true,
        ..Default::default()
    });
    assert!(port_open(m.ws_port()));
    let out = Command::new("mosquitto_pub")
        .args(m.client_args())
        .args(["-r", "-q", "1", "-t", "stock/sku 1", "-m", "hello world"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.publish("stock/bin", &[0, 1, b'\n', 0xff], true);
    m.publish("other/x", b"x", true);

    let expected = vec![
        ("stock/bin".to_string(), vec![0, 1, b'\n', 0xff]),
        ("stock/sku 1".to_string(), b"hello world".to_vec()),
    ];
    assert_eq!(m.retained("stock/#", Duration::from_secs(10)), expected);
    assert!(m.retained("nothing/#", Duration::from_secs(10)).is_empty());

    m.restart();
    assert_eq!(m.retained("stock/#", Duration::from_secs(10)), expected);
    m.pause();
    m.resume();
    m.kill9();
    assert!(!port_open(m.port()));
    m.start_again();
    assert_eq!(m.url(), format!("mqtt://127.0.0.1:{}", m.port()));

    let dir = m.dir().to_path_buf();
    drop(m);
    assert!(!dir.exists());
}

#[test]
fn mosquitto_with_users_acl_and_tls_accepts_authenticated_clients() {
    let mut ca = TestCa::new();
    let tls = ca.issue_server_cert(&["localhost", "127.0.0.1"]);
    let m = MosquittoServer::start_with(MqttOptions {
        users: vec![("skusync".into(), "pw1".into())],
        acl: Some("user skusync\ntopic readwrite stock/#".into()),
        tls: Some(tls.clone()),
        ..Default::default()
    });
    assert!(m.url().starts_with("mqtts://localhost:"));
    let pubc = |user: &str, pw: &str, topic: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &m.port().to_string()])
            .arg("--cafile")
            .arg(&tls.ca_cert)
            .args([
                "-u", user, "-P", pw, "-r", "-q", "1", "-t", topic, "-m", "v",
            ])
            .output()
            .unwrap()
    };
    let ok = pubc("skusync", "pw1", "stock/a");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!pubc("skusync", "wrong", "stock/b").status.success());
    // denied by ACL: the broker accepts the connection but drops the message
    let _ = pubc("skusync", "pw1", "secret/c");
    let got = m.retained("#", Duration::from_secs(10));
    assert_eq!(got, vec![("stock/a".to_string(), b"v".to_vec())]);
}

#[test]
fn servers_are_cleaned_up_when_a_test_panics() {
    let mut seen = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let pg = PgServer::start();
        let r = RedisServer::start();
        let m = MosquittoServer::start();
        seen.push((pg.data_dir(), pg.port()));
        seen.push((r.dir().to_path_buf(), r.port()));
        seen.push((m.dir().to_path_buf(), m.port()));
        panic!("simulated test failure");
    }));
    assert!(result.is_err());
    assert_eq!(seen.len(), 3);
    for (dir, port) in seen {
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(!port_open(port), "port {port} still open");
    }
}

#[test]
#[should_panic(expected = "no_such_setting")]
fn pg_server_start_failure_reports_the_server_log() {
    PgServer::start_with(PgOptions {
        extra_conf: vec!["no_such_setting = 1".into()],
        ..Default::default()
    });
}
