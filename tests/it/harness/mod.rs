//! Throwaway PostgreSQL, Redis and Mosquitto servers for integration tests.
//!
//! Every server lives in its own temporary directory, listens on a free port
//! of 127.0.0.1 only, writes its logs to files in that directory and is
//! stopped and deleted on `Drop` (also when the test panics).
//!
//! When the tests run as root, processes that refuse root (PostgreSQL) run as
//! an unprivileged OS user (see [`RunAs`]).
#![allow(dead_code)]

pub mod mqtt;
pub mod pg;
pub mod ports;
pub mod proxy;
pub mod redis;
pub mod redis_cluster;
pub mod tls;

pub use mqtt::{MosquittoServer, MqttOptions};
pub use pg::{PasswordEncryption, PgOptions, PgServer, StopMode};
pub use ports::free_port;
pub use redis::{RedisOptions, RedisServer};
pub use redis_cluster::RedisCluster;
pub use tls::{TestCa, TlsFiles};

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An unprivileged OS user that children run as when the tests run as root.
#[derive(Clone, Debug)]
pub struct RunAs {
    /// User name (from /etc/passwd).
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Numeric primary group id.
    pub gid: u32,
}

/// True when the test process runs with effective uid 0.
pub fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The user to run servers as: `None` when not root; otherwise the
/// `postgres` user if it exists, else `nobody`.
pub fn run_as() -> Option<RunAs> {
    if !is_root() {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 4
                && f[0] == wanted
                && let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse())
            {
                return Some(RunAs {
                    name: wanted.to_string(),
                    uid,
                    gid,
                });
            }
        }
    }
    panic!("running as root but neither a `postgres` nor a `nobody` user exists");
}

/// Makes `cmd` run as the unprivileged user when root.
pub fn apply_run_as(cmd: &mut Command, who: &Option<RunAs>) {
    use std::os::unix::process::CommandExt;
    if let Some(u) = who {
        cmd.uid(u.uid).gid(u.gid);
    }
}

/// Recursively chowns `path` to the unprivileged user (no-op when not root).
pub fn chown_tree(path: &Path, who: &Option<RunAs>) {
    let Some(u) = who else { return };
    std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() && !path.is_symlink() {
        for entry in fs::read_dir(path).expect("read_dir").flatten() {
            chown_tree(&entry.path(), who);
        }
    }
}

/// Opens a log file for a child's stdout/stderr (appending).
pub fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let g = f.try_clone().expect("clone log fd");
    (Stdio::from(f), Stdio::from(g))
}

/// The last `max` bytes of a text file (lossy), for panic messages.
pub fn file_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("<no log at {}>", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Sends a signal (e.g. "STOP", "CONT", "TERM", "KILL") to a pid via kill(1).
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg("-s")
        .arg(sig)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(st, Ok(s) if s.success()) {
        eprintln!("harness: kill -s {sig} {pid} failed");
    }
}

/// True when the process exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // state is the field after the ")" closing the command name
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// True once something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Polls `f` every 20 ms until it returns true or `timeout` elapses.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server process that is our direct child (Redis, Mosquitto).
#[derive(Debug, Default)]
pub struct ChildProc {
    child: Option<Child>,
    paused: bool,
}

impl ChildProc {
    /// Wraps a freshly spawned child.
    pub fn new(child: Child) -> Self {
        Self {
            child: Some(child),
            paused: false,
        }
    }

    /// Process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the child has not exited.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGSTOP.
    pub fn pause(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
            self.paused = true;
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
            self.paused = false;
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; reaps the child.
    pub fn terminate(&mut self, grace: Duration) {
        if self.paused {
            self.resume();
        }
        let Some(mut c) = self.child.take() else {
            return;
        };
        if matches!(c.try_wait(), Ok(None)) {
            signal(c.id(), "TERM");
            let exited = wait_until(grace, || !matches!(c.try_wait(), Ok(None)));
            if !exited {
                let _ = c.kill();
            }
        }
        let _ = c.wait();
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.paused = false;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sum of every series of the metric `name` in skusync's `/metrics` on 127.0.0.1:`port`;
/// `None` when nothing answers or the metric is missing.
pub fn scrape_metric(port: u16, name: &str) -> Option<f64> {
    metric_in(&scrape_body(port)?, name)
}

/// skusync's whole `/metrics` answer on 127.0.0.1:`port` (`None` when nothing answers).
pub fn scrape_body(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Sum of every series of the metric `name` in a `/metrics` answer; `None` when missing.
pub fn metric_in(out: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in out.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        if series == name
            || series
                .strip_prefix(name)
                .is_some_and(|r| r.starts_with('{'))
        {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}
