//! A throwaway Mosquitto broker child process on a free loopback port.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{ChildProc, TlsFiles, file_tail, free_port, log_stdio, port_open, wait_until};

/// User the harness itself authenticates as (for [`MosquittoServer::retained`]
/// and [`MosquittoServer::publish`]) when `users` is set; it gets
/// `topic readwrite #` appended to any ACL.
pub const HARNESS_USER: &str = "skusync-harness";

/// Options for [`MosquittoServer::start_with`].
#[derive(Clone, Debug, Default)]
pub struct MqttOptions {
    /// `persistence true` with `persistence_location` in the temp dir
    /// (saved on graceful stop; default `autosave_interval`).
    pub persistence: bool,
    /// Also open a websockets listener on [`MosquittoServer::ws_port`].
    pub websocket: bool,
    /// Password-file users (via `mosquitto_passwd -b`); when non-empty,
    /// anonymous access is off.
    pub users: Vec<(String, String)>,
    /// ACL file content (`acl_file`).
    pub acl: Option<String>,
    /// TLS on the main listener (`cafile`/`certfile`/`keyfile`).
    pub tls: Option<TlsFiles>,
    /// Lines appended last to `mosquitto.conf` (a bridge `connection` section).
    pub extra_conf: Vec<String>,
}

/// A running (or stopped) throwaway Mosquitto. Dropping it kills the process
/// and deletes the temp dir (`mosquitto.conf`, `mosquitto.log`, persistence).
pub struct MosquittoServer {
    dir: tempfile::TempDir,
    port: u16,
    ws_port: Option<u16>,
    opts: MqttOptions,
    harness_password: String,
    proc: ChildProc,
}

impl MosquittoServer {
    /// Starts an anonymous, non-persistent, plain-TCP broker.
    pub fn start() -> Self {
        Self::start_with(MqttOptions::default())
    }

    /// Starts a broker with `opts`; panics with the log tail on failure.
    pub fn start_with(opts: MqttOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skusync-mqtt-")
            .tempdir()
            .expect("tempdir");
        let harness_password = format!("pw-{}-{}", std::process::id(), free_port());
        let mut m = MosquittoServer {
            dir,
            port: 0,
            ws_port: None,
            opts,
            harness_password,
            proc: ChildProc::default(),
        };
        m.write_auth_files();
        let mut last = String::new();
        for _ in 0..5 {
            m.port = free_port();
            m.ws_port = m.opts.websocket.then(free_port);
            m.write_conf();
            match m.try_start() {
                Ok(()) => return m,
                Err(e) => last = e,
            }
        }
        panic!("mosquitto failed to start: {last}");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_auth_files(&self) {
        if !self.opts.users.is_empty() {
            let pwfile = self.path("passwd");
            fs::write(&pwfile, "").expect("create passwd");
            let mut users = self.opts.users.clone();
            users.push((HARNESS_USER.to_string(), self.harness_password.clone()));
            for (u, p) in &users {
                let out = Command::new("mosquitto_passwd")
                    .arg("-b")
                    .arg(&pwfile)
                    .arg(u)
                    .arg(p)
                    .stdin(Stdio::null())
                    .output()
                    .expect("spawn mosquitto_passwd");
                assert!(
                    out.status.success(),
                    "mosquitto_passwd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        if let Some(acl) = &self.opts.acl {
            let content = format!("{acl}\n\nuser {HARNESS_USER}\ntopic readwrite #\n");
            fs::write(self.path("acl"), content).expect("write acl");
        }
    }

    fn write_conf(&self) {
        let mut c = vec![
            // run as root when root (no privilege drop to a `mosquitto` user
            // that could not read our temp dir); ignored when not root
            "user root".to_string(),
            "per_listener_settings false".into(),
            format!("listener {} 127.0.0.1", self.port),
        ];
        if let Some(t) = &self.opts.tls {
            c.push(format!("cafile {}", t.ca_cert.display()));
            c.push(format!("certfile {}", t.cert.display()));
            c.push(format!("keyfile {}", t.key.display()));
        }
        if let Some(ws) = self.ws_port {
            c.push(format!("listener {ws} 127.0.0.1"));
            c.push("protocol websockets".into());
        }
        if self.opts.users.is_empty() {
            c.push("allow_anonymous true".into());
        } else {
            c.push("allow_anonymous false".into());
            c.push(format!("password_file {}", self.path("passwd").display()));
        }
        if self.opts.acl.is_some() {
            c.push(format!("acl_file {}", self.path("acl").display()));
        }
        if self.opts.persistence {
            c.push("persistence true".into());
            c.push(format!(
                "persistence_location {}/",
                self.dir.path().display()
            ));
        } else {
            c.push("persistence false".into());
        }
        c.push("log_dest stderr".into());
        c.push("log_type error".into());
        c.push("log_type warning".into());
        c.push("log_type notice".into());
        c.push("log_type information".into());
        c.extend(self.opts.extra_conf.iter().cloned());
        fs::write(self.path("mosquitto.conf"), c.join("\n") + "\n").expect("write conf");
    }

    fn try_start(&mut self) -> Result<(), String> {
        let (out, err) = log_stdio(&self.path("mosquitto.log"));
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.path("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn mosquitto: {e}"))?;
        self.proc = ChildProc::new(child);
        let (port, ws) = (self.port, self.ws_port);
        let ok = wait_until(Duration::from_secs(20), || {
            !self.proc.running() || (port_open(port) && ws.is_none_or(port_open))
        });
        if ok && self.proc.running() {
            Ok(())
        } else {
            self.proc.kill9();
            Err(self.log_tail())
        }
    }

    /// Starts again after [`stop`](Self::stop) / [`kill9`](Self::kill9), same ports.
    pub fn start_again(&mut self) {
        assert!(!self.proc.running(), "start_again: mosquitto is running");
        let mut last = String::new();
        for _ in 0..20 {
            match self.try_start() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("mosquitto restart failed: {last}");
    }

    /// Graceful stop + start (persistence is saved on SIGTERM).
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Graceful stop (SIGTERM, SIGKILL after 10 s).
    pub fn stop(&mut self) {
        self.proc.terminate(Duration::from_secs(10));
    }

    /// SIGKILL (crash simulation; unsaved persistence is lost).
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Rewrite the ACL file and make the running broker reload it (SIGHUP): connected
    /// clients keep their sessions.
    pub fn set_acl(&mut self, acl: &str) {
        self.opts.acl = Some(acl.to_string());
        self.write_auth_files();
        let pid = self.proc.pid().expect("mosquitto is running");
        super::signal(pid, "HUP");
    }

    /// SIGSTOP: the port stays open but nothing answers.
    pub fn pause(&mut self) {
        self.proc.pause();
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        self.proc.resume();
    }

    /// Main (MQTT, or MQTT over TLS) listener port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Websockets listener port; panics unless started with `websocket: true`.
    pub fn ws_port(&self) -> u16 {
        self.ws_port
            .expect("mosquitto started without websocket listener")
    }

    /// `mqtt://127.0.0.1:P`, or `mqtts://localhost:P` with TLS.
    pub fn url(&self) -> String {
        match &self.opts.tls {
            None => format!("mqtt://127.0.0.1:{}", self.port),
            Some(_) => format!("mqtts://localhost:{}", self.port),
        }
    }

    /// Connection flags for mosquitto_pub/mosquitto_sub as the harness user
    /// (host, port, TLS CA, credentials).
    pub fn client_args(&self) -> Vec<String> {
        let mut a = vec![
            "-p".to_string(),
            self.port.to_string(),
            "-V".into(),
            "mqttv311".into(),
        ];
        match &self.opts.tls {
            None => a.extend(["-h".into(), "127.0.0.1".into()]),
            Some(t) => a.extend([
                "-h".into(),
                "localhost".into(),
                "--cafile".into(),
                t.ca_cert.display().to_string(),
            ]),
        }
        if !self.opts.users.is_empty() {
            a.extend([
                "-u".into(),
                HARNESS_USER.into(),
                "-P".into(),
                self.harness_password.clone(),
            ]);
        }
        a
    }

    /// Publishes `payload` to `topic` (QoS 1) with mosquitto_pub as the harness user.
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        use std::io::Write;
        let mut c = Command::new("mosquitto_pub");
        c.args(self.client_args())
            .args(["-q", "1", "-t", topic, "-s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if retain {
            c.arg("-r");
        }
        let mut child = c.spawn().expect("spawn mosquitto_pub");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(payload)
            .expect("write payload");
        let out = child.wait_with_output().expect("mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub {topic} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// All retained messages matching `topic_filter`, as (topic, payload),
    /// sorted by topic.
    ///
    /// Runs `mosquitto_sub --retained-only -F '%x %t'` (hex payload, so binary
    /// payloads survive) subscribed to the filter plus a private sentinel
    /// topic, and publishes non-retained messages to the sentinel until the
    /// subscriber exits: the broker delivers all retained messages before the
    /// sentinel, so this returns as soon as they are complete. `timeout`
    /// bounds the whole operation (panics when exceeded). Other non-retained
    /// traffic on the filter also ends the read early.
    pub fn retained(&self, topic_filter: &str, timeout: Duration) -> Vec<(String, Vec<u8>)> {
        let sentinel = format!("skusync-harness/sentinel/{}", free_port());
        let secs = timeout.as_secs().max(1);
        let out_path = self.path(&format!("retained-{}.out", free_port()));
        let out_file = fs::File::create(&out_path).expect("create retained out");
        let mut sub = Command::new("mosquitto_sub")
            .args(self.client_args())
            .args(["-q", "1", "-t", topic_filter, "-t", &sentinel])
            .args(["--retained-only", "-W", &secs.to_string(), "-F", "%x %t"])
            .stdin(Stdio::null())
            .stdout(out_file)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mosquitto_sub");
        let deadline = std::time::Instant::now() + timeout + Duration::from_secs(2);
        let status = loop {
            if let Some(st) = sub.try_wait().expect("try_wait") {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = sub.kill();
                let _ = sub.wait();
                panic!("retained({topic_filter}): mosquitto_sub did not finish");
            }
            // Best effort: the subscriber may not be subscribed yet. QoS 1, so that the
            // broker queues it behind the retained states still waiting for an in-flight
            // slot (Mosquitto sends 20 at a time); a QoS 0 sentinel overtook them and cut
            // the list short when the subscriber was slow to acknowledge. Waited for at
            // most 1 s: a paused broker never acknowledges it.
            if let Ok(mut p) = Command::new("mosquitto_pub")
                .args(self.client_args())
                .args(["-q", "1", "-t", &sentinel, "-n"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                let until = std::time::Instant::now() + Duration::from_secs(1);
                while p.try_wait().ok().flatten().is_none() && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _ = p.kill();
                let _ = p.wait();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        if let Some(mut e) = sub.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        let text = fs::read_to_string(&out_path).unwrap_or_default();
        let _ = fs::remove_file(&out_path);
        assert!(
            status.success(),
            "retained({topic_filter}): mosquitto_sub exited with {status}: {stderr}\n{text}"
        );
        let mut v: Vec<(String, Vec<u8>)> = text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (hex, topic) = l.split_once(' ').unwrap_or((l, ""));
                (topic.to_string(), decode_hex(hex))
            })
            .filter(|(t, _)| *t != sentinel)
            .collect();
        v.sort();
        v
    }

    /// The last ~8 KiB of the broker log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.path("mosquitto.log"), 8192)
    }

    /// The temp dir (config, log, persistence).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The broker binary: `$SKUSYNC_MOSQUITTO`, else `mosquitto` on PATH, else
/// `/usr/sbin/mosquitto` (often not on a non-root PATH).
pub fn mosquitto_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SKUSYNC_MOSQUITTO") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("mosquitto").is_file() {
                return d.join("mosquitto");
            }
        }
    }
    PathBuf::from("/usr/sbin/mosquitto")
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex payload"))
        .collect()
}

impl Drop for MosquittoServer {
    fn drop(&mut self) {
        self.proc.kill9();
    }
}
