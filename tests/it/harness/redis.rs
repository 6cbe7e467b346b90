//! A throwaway `redis-server` child process on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{ChildProc, TlsFiles, file_tail, free_port, log_stdio, wait_until};

/// Options for [`RedisServer::start_with`].
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// `appendonly yes` (AOF, `appendfsync everysec`) in the temp dir, so data
    /// survives [`RedisServer::restart`].
    pub persistence: bool,
    /// `requirepass`.
    pub password: Option<String>,
    /// Serve TLS only (`--port 0 --tls-port P`, client certs not required).
    pub tls: Option<TlsFiles>,
    /// `--cluster-enabled yes` (a lone node without slots: enough to be recognised; see
    /// [`RedisCluster`](super::RedisCluster) for a whole cluster), with a free cluster bus
    /// port of its own (the default, port + 10000, may be taken or out of range) and a
    /// 5 s node timeout (failovers in tests take seconds; shorter ones failed nodes over
    /// on their own on a loaded 2-core machine).
    pub cluster: bool,
}

/// A running (or stopped) throwaway Redis. Dropping it kills the process and
/// deletes the temp dir (`redis.log`, AOF files).
pub struct RedisServer {
    dir: tempfile::TempDir,
    port: u16,
    bus_port: u16,
    opts: RedisOptions,
    proc: ChildProc,
}

impl RedisServer {
    /// Starts Redis with default options (no persistence, no auth, no TLS).
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// Starts Redis with `opts`; panics with the log tail on failure.
    pub fn start_with(opts: RedisOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skusync-redis-")
            .tempdir()
            .expect("tempdir");
        let mut r = RedisServer {
            dir,
            port: 0,
            bus_port: 0,
            opts,
            proc: ChildProc::default(),
        };
        let mut last = String::new();
        for _ in 0..5 {
            r.port = free_port();
            r.bus_port = free_port();
            match r.try_start() {
                Ok(()) => return r,
                Err(e) => last = e,
            }
        }
        panic!("redis-server failed to start: {last}");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn try_start(&mut self) -> Result<(), String> {
        let mut c = Command::new("redis-server");
        c.args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--loglevel", "notice"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", ""]);
        match &self.opts.tls {
            None => {
                c.args(["--port", &self.port.to_string()]);
            }
            Some(t) => {
                c.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&t.cert)
                    .arg("--tls-key-file")
                    .arg(&t.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&t.ca_cert)
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        if self.opts.persistence {
            c.args(["--appendonly", "yes", "--appendfsync", "everysec"]);
        } else {
            c.args(["--appendonly", "no"]);
        }
        if let Some(pw) = &self.opts.password {
            c.args(["--requirepass", pw]);
        }
        if self.opts.cluster {
            c.args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(self.dir.path().join("nodes.conf"))
                .args(["--cluster-port", &self.bus_port.to_string()])
                .args(["--cluster-node-timeout", "5000"]);
        }
        let (out, err) = log_stdio(&self.log_path());
        c.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = c.spawn().map_err(|e| format!("spawn redis-server: {e}"))?;
        self.proc = ChildProc::new(child);
        let ok = wait_until(Duration::from_secs(20), || {
            if !self.proc.running() {
                return true;
            }
            self.try_cli(&["PING"]).is_ok_and(|s| s.trim() == "PONG")
        });
        if ok && self.proc.running() {
            Ok(())
        } else {
            self.proc.kill9();
            Err(self.log_tail())
        }
    }

    /// Starts again after [`stop`](Self::stop) / [`kill9`](Self::kill9) on the same port.
    pub fn start_again(&mut self) {
        assert!(!self.proc.running(), "start_again: redis is running");
        let mut last = String::new();
        for _ in 0..20 {
            match self.try_start() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("redis-server restart failed: {last}");
    }

    /// Graceful stop (SIGTERM; Redis flushes the AOF), then start again.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Graceful stop (SIGTERM, SIGKILL after 10 s).
    pub fn stop(&mut self) {
        self.proc.terminate(Duration::from_secs(10));
    }

    /// SIGKILL (crash simulation).
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// SIGSTOP: the port stays open but nothing answers.
    pub fn pause(&mut self) {
        self.proc.pause();
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        self.proc.resume();
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:P/0`, or `rediss://localhost:P/0` with TLS; includes
    /// `:password@` when a password is set.
    pub fn url(&self) -> String {
        let auth = match &self.opts.password {
            Some(pw) => format!(":{pw}@"),
            None => String::new(),
        };
        match &self.opts.tls {
            None => format!("redis://{auth}127.0.0.1:{}/0", self.port),
            Some(_) => format!("rediss://{auth}localhost:{}/0", self.port),
        }
    }

    /// Runs `redis-cli` (with port, password, TLS flags) and returns stdout;
    /// panics when redis-cli fails or replies with an error.
    pub fn cli(&self, args: &[&str]) -> String {
        match self.try_cli(args) {
            Ok(s) if !s.starts_with("ERR") && !s.starts_with("(error)") => s,
            Ok(s) => panic!("redis-cli {args:?} -> {s}"),
            Err(e) => panic!("redis-cli {args:?} failed: {e}"),
        }
    }

    /// Like [`cli`](Self::cli) without panicking on failure. The output is
    /// trimmed of its final newline; error replies come back as `Ok`.
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let mut c = Command::new("redis-cli");
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(t) = &self.opts.tls {
            c.args(["--tls", "--sni", "localhost", "--cacert"])
                .arg(&t.ca_cert);
        }
        if let Some(pw) = &self.opts.password {
            c.args(["-a", pw, "--no-auth-warning"]);
        }
        c.args(args).stdin(Stdio::null());
        let out = c.output().map_err(|e| format!("spawn redis-cli: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout)
                .trim_end_matches('\n')
                .to_string())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The last ~8 KiB of the Redis log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.log_path(), 8192)
    }

    /// The temp dir (Redis `dir`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.proc.kill9();
    }
}
