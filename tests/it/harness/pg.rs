//! A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free loopback port.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{RunAs, TlsFiles, apply_run_as, chown_tree, file_tail, free_port, pid_alive, run_as};

/// How to stop the server (`pg_ctl -m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// `-m fast`: roll back transactions, clean shutdown with checkpoint.
    Fast,
    /// `-m immediate`: abort, crash recovery on the next start.
    Immediate,
}

/// `password_encryption` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordEncryption {
    /// `md5`
    Md5,
    /// `scram-sha-256`
    ScramSha256,
}

/// Options for [`PgServer::start_with`].
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// Extra postgresql.conf lines (appended last, so they override defaults).
    pub extra_conf: Vec<String>,
    /// pg_hba.conf lines replacing the default trust rules. The harness always
    /// prepends `local all postgres trust` and `local replication postgres trust`
    /// so its own unix-socket tooling (psql, client) keeps working.
    pub hba: Option<Vec<String>>,
    /// Server certificate/key: sets `ssl=on` (and `ssl_ca_file`).
    pub tls: Option<TlsFiles>,
    /// Password for the `postgres` superuser (set after startup).
    pub superuser_password: Option<String>,
    /// `password_encryption` (server default when `None`).
    pub password_encryption: Option<PasswordEncryption>,
}

/// A running (or stopped) throwaway PostgreSQL cluster.
///
/// Layout of the temp dir: `data/` (PGDATA), `postgres.log`, the unix socket.
/// Dropping it stops the server immediately and deletes everything.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    opts: PgOptions,
    who: Option<RunAs>,
    running: bool,
}

/// Finds the PostgreSQL bin dir: `$SKUSYNC_PG_BIN`, `pg_config --bindir`
/// (only if it contains `initdb`), the highest `/usr/lib/postgresql/*/bin`,
/// else the directory of `initdb` on PATH.
pub fn find_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SKUSYNC_PG_BIN") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").exists(),
            "SKUSYNC_PG_BIN={} has no initdb",
            dir.display()
        );
        return dir;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(rd) = fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            let ver = e.file_name().to_string_lossy().parse::<u32>().ok();
            let bin = e.path().join("bin");
            if let Some(v) = ver
                && bin.join("initdb").exists()
                && best.as_ref().is_none_or(|(b, _)| v > *b)
            {
                best = Some((v, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return bin;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").exists() {
                return d;
            }
        }
    }
    panic!("no PostgreSQL binaries found (set SKUSYNC_PG_BIN or run .ci/install-deps)");
}

impl PgServer {
    /// Starts a cluster with the default options.
    pub fn start() -> Self {
        Self::start_with(PgOptions::default())
    }

    /// initdb + start with `opts`; panics (with the log tail) on failure.
    pub fn start_with(opts: PgOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skusync-pg-")
            .tempdir()
            .expect("tempdir");
        let who = run_as();
        chown_tree(dir.path(), &who);
        let mut pg = PgServer {
            dir,
            bin: find_bin_dir(),
            port: 0,
            opts,
            who,
            running: false,
        };
        pg.initdb();
        pg.write_hba();
        let mut last_err = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            pg.write_conf();
            match pg.try_start() {
                Ok(()) => {
                    pg.after_first_start();
                    return pg;
                }
                Err(e) => {
                    let bind_problem = e.contains("could not bind")
                        || e.contains("could not create any TCP/IP sockets")
                        || e.contains("already in use");
                    if !bind_problem {
                        panic!("postgres failed to start: {e}");
                    }
                    last_err = e;
                }
            }
        }
        panic!("postgres failed to start after 5 port attempts: {last_err}");
    }

    fn after_first_start(&mut self) {
        if let Some(pw) = self.opts.superuser_password.clone() {
            let pw = pw.replace('\'', "''");
            self.psql(&format!("ALTER ROLE postgres PASSWORD '{pw}'"));
        }
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(self.bin.join(prog));
        let lib = self.bin.join("../lib");
        if lib.is_dir() {
            let mut v = lib.into_os_string();
            if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
                v.push(":");
                v.push(old);
            }
            c.env("LD_LIBRARY_PATH", v);
        }
        c.current_dir(self.dir.path());
        c.env("PGCONNECT_TIMEOUT", "10");
        c.env_remove("PGDATA");
        c.env_remove("PGHOST");
        c.env_remove("PGPORT");
        c.env_remove("PGSERVICE");
        c.stdin(Stdio::null());
        c
    }

    /// A command for a server-side tool, run as the unprivileged user if root.
    fn server_cmd(&self, prog: &str) -> Command {
        let mut c = self.cmd(prog);
        apply_run_as(&mut c, &self.who);
        c.env("HOME", self.dir.path());
        c
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn initdb(&self) {
        let out = self
            .server_cmd("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .output()
            .expect("spawn initdb");
        if !out.status.success() {
            panic!(
                "initdb failed ({}):\n{}\n{}",
                self.bin.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn write_file(&self, path: &Path, content: &str) {
        fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        chown_tree(path, &self.who);
    }

    fn write_conf(&self) {
        let sock = self.dir.path().display().to_string();
        let mut c = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("port = {}", self.port),
            format!("unix_socket_directories = '{}'", sock.replace('\'', "''")),
            "wal_level = logical".into(),
            "max_replication_slots = 20".into(),
            "max_wal_senders = 20".into(),
            "max_connections = 100".into(),
            "fsync = off".into(),
            "synchronous_commit = on".into(),
            "full_page_writes = off".into(),
            "shared_buffers = 128MB".into(),
            "logging_collector = off".into(),
            "log_min_messages = warning".into(),
            "log_connections = off".into(),
            "log_line_prefix = '%m [%p] %u@%d '".into(),
        ];
        if let Some(pe) = self.opts.password_encryption {
            c.push(match pe {
                PasswordEncryption::Md5 => "password_encryption = 'md5'".into(),
                PasswordEncryption::ScramSha256 => "password_encryption = 'scram-sha-256'".into(),
            });
        }
        if let Some(t) = &self.opts.tls {
            c.push("ssl = on".into());
            c.push(format!("ssl_cert_file = '{}'", t.cert.display()));
            c.push(format!("ssl_key_file = '{}'", t.key.display()));
            c.push(format!("ssl_ca_file = '{}'", t.ca_cert.display()));
        }
        c.extend(self.opts.extra_conf.iter().cloned());
        let harness_conf = self.data_dir().join("harness.conf");
        self.write_file(&harness_conf, &(c.join("\n") + "\n"));
        let main = self.data_dir().join("postgresql.conf");
        let existing = fs::read_to_string(&main).expect("read postgresql.conf");
        if !existing.contains("include 'harness.conf'") {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&main)
                .expect("open postgresql.conf");
            writeln!(f, "\ninclude 'harness.conf'").expect("append include");
        }
    }

    fn write_hba(&self) {
        let lines = match &self.opts.hba {
            None => vec![
                "local all all trust".to_string(),
                "local replication all trust".into(),
                "host all all 127.0.0.1/32 trust".into(),
                "host replication all 127.0.0.1/32 trust".into(),
            ],
            Some(custom) => {
                let mut v = vec![
                    "local all postgres trust".to_string(),
                    "local replication postgres trust".into(),
                ];
                v.extend(custom.iter().cloned());
                v
            }
        };
        self.write_file(
            &self.data_dir().join("pg_hba.conf"),
            &(lines.join("\n") + "\n"),
        );
    }

    fn try_start(&mut self) -> Result<(), String> {
        let log = self.log_path();
        let before = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let out = self
            .server_cmd("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("spawn pg_ctl start");
        if out.status.success() {
            self.running = true;
            return Ok(());
        }
        // make sure nothing half-started lingers
        if let Some(pid) = self.postmaster_pid() {
            super::signal(pid, "KILL");
        }
        let all = fs::read(&log).unwrap_or_default();
        let new = String::from_utf8_lossy(&all[(before as usize).min(all.len())..]).into_owned();
        Err(format!(
            "pg_ctl start failed: {}{}\n--- log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            new
        ))
    }

    /// Starts the server again after [`stop`](Self::stop) or [`kill9`](Self::kill9),
    /// same port and data. Retries for a while (orphaned backends of a
    /// SIGKILLed postmaster may still hold shared memory).
    pub fn start_again(&mut self) {
        assert!(!self.running, "start_again: server is running");
        let mut last = String::new();
        for _ in 0..50 {
            match self.try_start() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("postgres restart failed: {last}");
    }

    /// Stops the server (`pg_ctl stop -m fast`).
    pub fn stop(&mut self) {
        self.stop_mode(StopMode::Fast);
    }

    /// Stops the server with the given mode.
    pub fn stop_mode(&mut self, mode: StopMode) {
        if !self.running {
            return;
        }
        let m = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let out = self
            .server_cmd("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", m, "-w", "-t", "60", "stop"])
            .output()
            .expect("spawn pg_ctl stop");
        if !out.status.success() {
            panic!(
                "pg_ctl stop -m {m} failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
        self.running = false;
    }

    /// Stop with `mode`, then start again on the same port.
    pub fn restart(&mut self, mode: StopMode) {
        self.stop_mode(mode);
        self.start_again();
    }

    /// SIGKILLs the postmaster (crash simulation) and waits until it is gone.
    /// Backends notice and exit on their own. Use [`start_again`](Self::start_again).
    pub fn kill9(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            super::signal(pid, "KILL");
            super::wait_until(Duration::from_secs(10), || !pid_alive(pid));
        }
        self.running = false;
    }

    /// Pid of this cluster's live postmaster (checked against /proc, so a
    /// stale postmaster.pid never makes us signal an unrelated process).
    fn postmaster_pid(&self) -> Option<u32> {
        let s = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        let pid: u32 = s.lines().next()?.trim().parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let data = self.data_dir();
        (pid_alive(pid) && cmdline.contains(data.to_str()?)).then_some(pid)
    }

    /// TCP port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Host to connect to over TCP: `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Directory of the unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `postgresql://user@127.0.0.1:PORT/db`
    pub fn url(&self, user: &str, db: &str) -> String {
        format!("postgresql://{user}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` with psql as `postgres` on db `postgres`; returns unaligned,
    /// tuples-only output (trailing newline trimmed). Panics with stderr on error.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// Like [`psql`](Self::psql) on database `db`.
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql on {db} failed: {e}\nSQL: {sql}"))
    }

    /// Runs `sql` (a script, fed on stdin, `ON_ERROR_STOP`) via the unix socket.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut c = self.cmd("psql");
        c.arg("-h")
            .arg(self.dir.path())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(pw) = &self.opts.superuser_password {
            c.env("PGPASSWORD", pw);
        }
        let mut child = c.spawn().map_err(|e| format!("spawn psql: {e}"))?;
        {
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(sql.as_bytes())
                .map_err(|e| format!("write psql stdin: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            let s = String::from_utf8_lossy(&out.stdout);
            Ok(s.trim_end_matches('\n').to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A tokio-postgres client connected as `postgres` to `db` over the unix
    /// socket (works whatever the hba rules). The connection task is spawned.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(self.dir.path())
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect_timeout(Duration::from_secs(10));
        if let Some(pw) = &self.opts.superuser_password {
            cfg.password(pw.as_str());
        }
        let (client, conn) = cfg
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {db}: {e}\n{}", self.log_tail()));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// `CREATE DATABASE name`.
    pub fn create_db(&self, name: &str) {
        self.psql(&format!(
            "CREATE DATABASE \"{}\"",
            name.replace('"', "\"\"")
        ));
    }

    /// The last ~8 KiB of the server log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log_path(), 8192)
    }

    /// PGDATA.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The PostgreSQL bin dir in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// True while the harness believes the server is up.
    pub fn is_running(&self) -> bool {
        self.running
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            {
                let ok = self
                    .server_cmd("pg_ctl")
                    .arg("-D")
                    .arg(self.data_dir())
                    .args(["-m", "immediate", "-w", "-t", "10", "stop"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !ok {
                    super::signal(pid, "KILL");
                }
            }
        }
        // TempDir's own drop removes the directory.
    }
}
