//! Secrets stay out of output, and row values cannot forge log lines: config errors from
//! the real binary, the HMAC key rules, systemd credentials, `tail`'s user columns, the
//! systemd unit, and SKUs in logs.

use crate::fold_oracle::{PUBLIC_SCHEMA, PUBS, public_oracle};
use crate::harness::{MosquittoServer, PasswordEncryption, PgOptions, PgServer, RedisServer};
use crate::oracle::Buckets;
use crate::support::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PG_PW: &str = "pg-S3cret-pw";
const KEY: &str = "DEADBEEF0123456789abcdefDEADBEEF";

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

/// `skusync <args> --config <cfg>` with `envs`; (exit code, stdout, stderr).
fn run(args: &[&str], cfg: &Path, envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(skusync_bin());
    c.args(args)
        .arg("--config")
        .arg(cfg)
        .env_remove("RUST_LOG")
        .env_remove("SKUSYNC_USER_KEY")
        .env_remove("SKUSYNC_PG_PASSWORD")
        .env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().expect("run skusync");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const ACTIVITY_WITH_USER: &str = "[[activity]]\ntable = \"public.activity_log\"\nsku = \"sku\"\n\
     kind = \"kind\"\nuser = \"user_id\"\nwindows = [\"5m\"]\n";

#[test]
fn a_toml_error_never_prints_the_broken_line() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("url = \"postgresql://skusync:{PG_PW}@127.0.0.1:1/inv");
    let cases = [
        // the URL misses its closing quote
        (
            format!("[postgres]\n{url}\n"),
            "line 2, column",
            "postgres.url",
        ),
        // the key as a TOML hex integer (serde's message would quote it in decimal)
        (
            format!("[postgres]\n{url}\"\n{ACTIVITY_WITH_USER}user_key = 0xDEADBEEF\n"),
            "line 9, column",
            "activity[0].user_key",
        ),
        // the key misses its closing quote, on the same line as nothing else
        (
            format!("[postgres]\n{url}\"\n{ACTIVITY_WITH_USER}user_key = \"{KEY}\n"),
            "line 9, column",
            "activity[0].user_key",
        ),
    ];
    for (text, at, key) in cases {
        let cfg = write(dir.path(), "bad.toml", &text, 0o600);
        let (code, out, err) = run(&["check"], &cfg, &[]);
        assert_eq!(code, 2, "a config error exits 2: {err}");
        assert!(
            err.contains(&cfg.display().to_string())
                && err.contains(at)
                && err.contains(&format!("key {key}")),
            "file, line, column and key named: {err}"
        );
        for secret in [PG_PW, KEY, "DEADBEEF", "3735928559"] {
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{secret} printed:\n{out}\n{err}"
            );
        }
    }
}

#[test]
fn a_short_or_readable_inline_user_key_exits_2_saying_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "[postgres]\nurl = \"postgresql://u@127.0.0.1:1/d\"\npublication = [\"skusync\", \"skusync_activity\"]\n{ACTIVITY_WITH_USER}[activity.counters]\nview = \"views\"\n"
    );
    // too short, wherever it comes from
    let short = base.replace("windows", "user_key = \"0xDEADBEEF\"\nwindows");
    let cfg = write(dir.path(), "short.toml", &short, 0o600);
    let (code, _, err) = run(&["setup", "--print"], &cfg, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("activity[0].user_key")
            && err.contains("10 bytes")
            && err.contains("at least 32"),
        "{err}"
    );
    assert!(!err.contains("DEADBEEF"), "{err}");
    let cfg = write(dir.path(), "env.toml", &base, 0o644);
    let (code, _, err) = run(
        &["setup", "--print"],
        &cfg,
        &[("SKUSYNC_USER_KEY", "short-env-key")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("SKUSYNC_USER_KEY is 13 bytes"), "{err}");
    // a good key in the environment works with a readable file (the existing way)
    let (code, out, err) = run(&["setup", "--print"], &cfg, &[("SKUSYNC_USER_KEY", KEY)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("CREATE PUBLICATION") && !out.contains(KEY),
        "{out}"
    );
    // inline in a file others can read
    let inline = base.replace("windows", &format!("user_key = \"{KEY}\"\nwindows"));
    let cfg = write(dir.path(), "inline.toml", &inline, 0o644);
    let (code, out, err) = run(&["setup", "--print"], &cfg, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("activity[0].user_key")
            && err.contains(&format!("chmod 600 {}", cfg.display()))
            && err.contains("credential user-key")
            && err.contains("SKUSYNC_USER_KEY"),
        "{err}"
    );
    assert!(!err.contains(KEY) && !out.contains(KEY), "{err}");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = run(&["setup", "--print"], &cfg, &[]);
    assert_eq!(code, 0, "chmod 600 fixes it: {err}");
}

/// A password written in a URL of a config file others can read is no secret: every
/// command exits 2 naming the setting and the credential to use instead, never the
/// password; `chmod 600` fixes it.
#[test]
fn a_password_in_a_url_of_a_readable_config_exits_2_saying_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[postgres]\nurl = \"postgresql://u:{PG_PW}@127.0.0.1:1/d\"\npublication = [\"skusync\", \"skusync_activity\"]\n\
         {ACTIVITY_WITH_USER}[activity.counters]\nview = \"views\"\n"
    );
    let cfg = write(dir.path(), "skusync.toml", &text, 0o644);
    for cmd in [&["setup", "--print"][..], &["run"][..]] {
        let (code, out, err) = run(cmd, &cfg, &[("SKUSYNC_USER_KEY", KEY)]);
        assert_eq!(code, 2, "{cmd:?}: {err}");
        assert!(
            err.contains("postgres.url")
                && err.contains(&format!("chmod 600 {}", cfg.display()))
                && err.contains("credential pg-password")
                && err.contains("SKUSYNC_PG_PASSWORD"),
            "{err}"
        );
        assert!(!err.contains(PG_PW) && !out.contains(PG_PW), "{err}");
    }
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = run(&["setup", "--print"], &cfg, &[("SKUSYNC_USER_KEY", KEY)]);
    assert_eq!(code, 0, "chmod 600 fixes it: {err}");
}

#[test]
fn a_pg_password_credential_logs_in_where_the_url_has_no_password() {
    let pg = PgServer::start_with(PgOptions {
        hba: Some(vec![
            "host all all 127.0.0.1/32 scram-sha-256".into(),
            "host replication all 127.0.0.1/32 scram-sha-256".into(),
        ]),
        password_encryption: Some(PasswordEncryption::ScramSha256),
        ..Default::default()
    });
    pg.psql(&format!(
        "CREATE ROLE app LOGIN REPLICATION PASSWORD '{PG_PW}';"
    ));
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let cfg = write(
        dir.path(),
        "skusync.toml",
        &format!(
            "[postgres]\nurl = \"{}?sslmode=disable\"\n",
            pg.url("app", "postgres")
        ),
        0o644,
    );
    let creds_env = [("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())];
    let (_, out, _) = run(&["check"], &cfg, &creds_env);
    assert!(
        out.contains("FAIL postgres connection"),
        "no password, no login:\n{out}"
    );
    write(&creds, "pg-password", &format!("{PG_PW}\n"), 0o400);
    let (_, out, err) = run(&["check"], &cfg, &creds_env);
    assert!(
        out.lines().any(|l| l == "ok   postgres connection"),
        "the credential logs in:\n{out}\n{err}"
    );
    assert!(!out.contains(PG_PW) && !err.contains(PG_PW));
}

/// Spawn `skusync <args>` with stdout lines on a channel and stderr in a file.
fn spawn(args: &[&str], dir: &Path) -> SkusyncProc {
    SkusyncProc::spawn(args, dir)
}

#[test]
fn tail_prints_the_hmac_of_a_mapped_user_column_unless_raw() {
    let pg = PgServer::start();
    pg.psql(PUBLIC_SCHEMA);
    pg.psql("ALTER TABLE activity_log ADD COLUMN user_id text");
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[postgres]\nurl = \"{}?sslmode=disable\"\npublication = [\"skusync\", \"skusync_activity\"]\n\
         {ACTIVITY_WITH_USER}user_key = \"{KEY}\"\n[activity.counters]\nview = \"views\"\n",
        pg.url("postgres", "postgres")
    );
    let cfg = write(dir.path(), "skusync.toml", &text, 0o600);
    let expected = skusync::fold::hmac_user(KEY.as_bytes(), "alice@example.com").to_string();
    for (raw, want) in [(false, expected.as_str()), (true, "alice@example.com")] {
        let mut args = vec!["tail", "--config", cfg.to_str().unwrap()];
        if raw {
            args.push("--raw");
        }
        let mut tail = spawn(&args, dir.path());
        let ready = crate::harness::wait_until(Duration::from_secs(20), || {
            pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'skusync_tail_%' AND active") == "1"
        });
        assert!(ready, "tail started: {}", tail.stderr());
        pg.psql(
            "INSERT INTO activity_log (sku, kind, user_id) VALUES ('A', 'view', 'alice@example.com'), ('A', 'view', NULL)",
        );
        let mut lines = Vec::new();
        while lines.len() < 2 {
            let l = tail
                .next_line(Duration::from_secs(20))
                .unwrap_or_else(|| panic!("tail output: {}", tail.stderr()));
            lines.push(serde_json::from_str::<serde_json::Value>(&l).unwrap());
        }
        assert_eq!(lines[0]["new"]["user_id"], want, "raw={raw}: {lines:?}");
        assert_eq!(lines[1]["new"]["user_id"], serde_json::Value::Null);
        assert_eq!(lines[0]["new"]["sku"], "A", "other columns as they are");
        if !raw {
            assert!(!serde_json::to_string(&lines).unwrap().contains("alice"));
        }
        assert_eq!(
            tail.signal_and_wait("INT", Duration::from_secs(10)),
            Some(0)
        );
        assert!(crate::harness::wait_until(Duration::from_secs(10), || {
            pg.psql(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'skusync_tail_%'",
            ) == "0"
        }));
    }
}

/// Wait until `f` holds, polling every 100 ms.
fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_sku_with_a_newline_and_an_ansi_escape_cannot_forge_a_log_line() {
    let pg = PgServer::start();
    pg.psql(PUBLIC_SCHEMA);
    let redis = RedisServer::start();
    let mqtt = MosquittoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nmin_interval_ms = 10\n",
        public_oracle(Buckets::Ignore).config_toml(
            &pg.url("postgres", "postgres"),
            "skusync",
            PUBS,
            &redis.url()
        ),
        mqtt.port()
    );
    let cfg = write_config(dir.path(), &text);
    let stderr_path = dir.path().join("run.stderr");
    let mut child = Command::new(skusync_bin())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "skusync=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("spawn skusync");
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    // A SKU that, logged raw, ends the line and starts a forged one in red.
    let forged = "2026-01-01T00:00:00Z ERROR FORGED";
    let ansi = "\x1b[5;7m";
    let evil = |n: u8| format!("EVIL-{n}\n{forged} {ansi}x");
    let lit = |s: &str| s.replace('\'', "''");
    pg.psql(&format!(
        "INSERT INTO inventory VALUES ('{}', 'W1', 3, 0)",
        lit(&evil(1))
    ));
    // published: the SKU is in a debug line
    let published = wait_for(Duration::from_secs(60), || {
        stderr()
            .lines()
            .any(|l| l.contains("published") && l.contains("EVIL-1\\n2026"))
    });
    assert!(
        published,
        "the SKU's publish was logged, escaped:\n{}",
        stderr()
    );
    // a clobbered SKU hash: the SKU's key is in the fatal error
    let key = skusync::sinks::layout::sku_key("skusync", &evil(2));
    redis.cli(&["SET", &key, "not a hash"]);
    pg.psql(&format!(
        "INSERT INTO inventory VALUES ('{}', 'W1', 3, 0)",
        lit(&evil(2))
    ));
    let exited = wait_for(Duration::from_secs(60), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    let _ = child.kill();
    let _ = child.wait();
    let log = stderr();
    assert!(exited, "the clobbered key stops skusync:\n{log}");
    assert!(
        log.contains("Not a hash: \"skusync:{EVIL-2\\n2026"),
        "the key is named, escaped:\n{log}"
    );
    // The forged text only ever appears inside the escaped value, on the line that
    // logs it.
    for l in log.lines().filter(|l| l.contains("FORGED")) {
        assert!(
            l.contains("EVIL-") && !l.starts_with("2026-01-01T00:00:00Z"),
            "forged line: {l:?}"
        );
    }
    assert!(
        !log.contains(ansi),
        "raw terminal escape in the log:\n{log:?}"
    );
    assert!(
        log.contains("FORGED \\u{1b}[5;7mx"),
        "the escape is shown escaped:\n{log}"
    );
}

#[test]
fn the_systemd_unit_loads_credentials_runs_no_shell_and_is_hardened() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("dist/skusync.service")).unwrap();
    let active: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let exec: Vec<&&str> = active
        .iter()
        .filter(|l| l.starts_with("ExecStart="))
        .collect();
    assert_eq!(exec.len(), 1, "{exec:?}");
    assert!(
        exec[0].starts_with("ExecStart=/usr/local/bin/skusync run ")
            && !exec[0].contains("sh ")
            && !exec[0].contains("CREDENTIALS_DIRECTORY"),
        "the binary runs directly: {}",
        exec[0]
    );
    use skusync::secret::credential;
    for name in [
        credential::PG_PASSWORD,
        credential::REDIS_PASSWORD,
        credential::MQTT_PASSWORD,
        credential::USER_KEY,
    ] {
        let line = format!("LoadCredential={name}:/etc/skusync/credentials/{name}");
        assert!(active.contains(&line.as_str()), "{line} missing");
    }
    assert!(
        !active
            .iter()
            .any(|l| l.starts_with("Environment") && l.contains("SKUSYNC_")),
        "no secrets in the environment"
    );
    for setting in [
        "PrivateUsers=yes",
        "ProcSubset=pid",
        "LimitCORE=0",
        "IPAddressDeny=any",
        "IPAddressAllow=localhost",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "UMask=0077",
    ] {
        assert!(active.contains(&setting), "{setting} missing");
    }
    assert!(active.iter().any(|l| l.starts_with("LimitNOFILE=")));
    // systemd's own checks, with the unit pointing at the test binary
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: static checks only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("skusync.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/skusync", skusync_bin())).unwrap();
    let v = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let verr = String::from_utf8_lossy(&v.stderr);
    assert!(
        v.status.success() && verr.trim().is_empty(),
        "verify: {verr}"
    );
    let s = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&s.stdout);
    let overall = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no score: {out}"));
    let score: f64 = overall
        .split(": ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{overall}"));
    assert!(score < 2.0, "exposure must be OK or better: {overall}");
}
