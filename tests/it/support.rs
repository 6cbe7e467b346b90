//! Shared helpers for the integration tests: running the source in-process and
//! collecting what it delivers, and running the `skusync` binary.
#![allow(dead_code)]

use skusync::lsn::Lsn;
use skusync::pg::PgConnectConfig;
use skusync::source::{ProgressHandle, Source, SourceConfig, SourceError, SourceEvent};
use skusync::txn::{Event, TxnCommit};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One change as the tests look at it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub commit_lsn: Lsn,
    pub table: String,
    pub op: String,
    pub row: serde_json::Value,
}

/// A source running in the background with a consumer that records every change and
/// marks each transaction durable right after recording it.
pub struct RunningSource {
    pub shutdown: CancellationToken,
    pub progress: ProgressHandle,
    pub handle: JoinHandle<Result<(), SourceError>>,
    pub changes: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    pub commits: std::sync::Arc<std::sync::Mutex<Vec<TxnCommit>>>,
    pub sessions: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    consumer: JoinHandle<()>,
}

impl RunningSource {
    pub fn start(cfg: SourceConfig) -> RunningSource {
        let source = Source::new(cfg);
        let progress = source.progress();
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel::<Vec<SourceEvent>>(8);
        let handle = tokio::spawn(source.run(tx, shutdown.clone()));
        let changes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let commits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sessions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c2, m2, s2, p2) = (
            changes.clone(),
            commits.clone(),
            sessions.clone(),
            progress.clone(),
        );
        let consumer = tokio::spawn(async move {
            let mut open: Vec<Seen> = Vec::new();
            while let Some(batch) = rx.recv().await {
                for ev in batch {
                    match ev {
                        SourceEvent::Connected(_) => {
                            s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        SourceEvent::Reset => open.clear(),
                        SourceEvent::Event(Event::Change(c)) => open.push(Seen {
                            commit_lsn: c.commit_lsn,
                            table: c.rel.qualified_name(),
                            op: c.op.as_str().to_string(),
                            row: c.to_json().expect("typed values"),
                        }),
                        SourceEvent::Event(_) => {}
                        SourceEvent::Commit(c, t) => {
                            c2.lock().unwrap().append(&mut open);
                            m2.lock().unwrap().push(c);
                            p2.durable(t);
                        }
                    }
                }
            }
        });
        RunningSource {
            shutdown,
            progress,
            handle,
            changes,
            commits,
            sessions,
            consumer,
        }
    }

    /// Wait until `n` changes were recorded (panics after `timeout`).
    pub async fn wait_changes(&self, n: usize, timeout: Duration) -> Vec<Seen> {
        let start = Instant::now();
        loop {
            let got = self.changes.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < timeout,
                "only {} of {n} changes after {timeout:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) -> Result<(), SourceError> {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("source stops within 20 s")
            .expect("source task");
        let _ = self.consumer.await;
        r
    }
}

/// A source config for `url` with fast reconnects (tests kill things on purpose).
pub fn source_config(url: &str, slot: &str, publication: &str) -> SourceConfig {
    let conn = PgConnectConfig::from_url(url).expect("url");
    let mut c = SourceConfig::new(conn, slot, vec![publication.to_string()]);
    c.backoff_min = Duration::from_millis(100);
    c.backoff_max = Duration::from_secs(1);
    c.status_interval = Duration::from_millis(200);
    c
}

/// Write a config file into `dir` and return its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("skusync.toml");
    std::fs::write(&p, text).expect("write config");
    // it may hold a password: skusync refuses a readable file then
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod config");
    p
}

/// The `skusync` binary built for the tests.
pub fn skusync_bin() -> &'static str {
    env!("CARGO_BIN_EXE_skusync")
}

/// Run `skusync <args> --config <cfg>` to completion (a subcommand that exits on its own).
pub fn skusync_output(args: &[&str], cfg: &Path) -> std::process::Output {
    std::process::Command::new(skusync_bin())
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .expect("run skusync")
}

/// A running `skusync` process whose stdout lines arrive on a channel.
pub struct SkusyncProc {
    pub child: Child,
    pub lines: std_mpsc::Receiver<String>,
    pub stderr_path: PathBuf,
}

impl SkusyncProc {
    pub fn spawn(args: &[&str], dir: &Path) -> SkusyncProc {
        Self::spawn_env(args, dir, &[])
    }

    /// [`SkusyncProc::spawn`] with extra environment variables.
    pub fn spawn_env(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> SkusyncProc {
        let stderr_path = dir.join(format!("skusync-{}.stderr", std::process::id()));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = Command::new(skusync_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn skusync");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        SkusyncProc {
            child,
            lines,
            stderr_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Next stdout line within `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Send a signal and wait for exit; returns the exit code.
    pub fn signal_and_wait(&mut self, sig: &str, timeout: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Peak resident set size in KiB (VmHWM), while running.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

impl Drop for SkusyncProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// One HTTP/1.1 exchange as a test sees it.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {:?}", self.status, self.body))
    }
}

/// Send `method target` with `headers` to 127.0.0.1:`port` and read the whole reply (the
/// servers under test close the connection after one exchange).
pub fn http_request(port: u16, method: &str, target: &str, headers: &[(&str, &str)]) -> HttpReply {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpReply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// `GET target`.
pub fn http_get(port: u16, target: &str, headers: &[(&str, &str)]) -> HttpReply {
    http_request(port, "GET", target, headers)
}

/// Calls of `command` in an `INFO commandstats` reply (`scan`, `eval`, `script|load`);
/// `None` when Redis has not run it since its stats were reset.
pub fn command_calls(commandstats: &str, command: &str) -> Option<u64> {
    commandstats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
}
