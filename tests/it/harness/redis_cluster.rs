//! A throwaway Redis Cluster on loopback: primaries and their replicas, each a
//! [`RedisServer`] with `--cluster-enabled yes`, joined by `redis-cli --cluster create`,
//! with the faults the cluster tests need (a manual failover, a primary SIGKILLed until its
//! replica takes over, a live reshard).

use std::process::{Command, Stdio};
use std::time::Duration;

use super::{RedisOptions, RedisServer, wait_until};

/// A running cluster. Dropping it kills every node.
pub struct RedisCluster {
    /// Every node, primaries and replicas, in start order. Roles change with failovers:
    /// ask [`primaries`](Self::primaries) and [`replica_of`](Self::replica_of).
    pub nodes: Vec<RedisServer>,
    /// Nodes that were SIGKILLed or are frozen (skipped by every query).
    down: Vec<bool>,
}

impl RedisCluster {
    /// `primaries` primaries with `replicas` replicas each (the test layout: 3 and 1),
    /// every slot assigned, every node agreeing; panics with the creation output or the
    /// node logs otherwise.
    pub fn start(primaries: usize, replicas: usize) -> Self {
        let n = primaries * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start_with(RedisOptions {
                    cluster: true,
                    ..Default::default()
                })
            })
            .collect();
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())));
        args.extend(["--cluster-replicas".into(), replicas.to_string()]);
        args.push("--cluster-yes".into());
        let (ok, text) = redis_cli(&args);
        assert!(
            ok && text.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed:\n{text}"
        );
        let cluster = RedisCluster {
            down: vec![false; n],
            nodes,
        };
        cluster.wait_agreed(Duration::from_secs(30));
        assert_eq!(
            cluster.primaries().len(),
            primaries,
            "primaries after create"
        );
        // A replica that has not synced cannot take over (a manual failover times out).
        let synced = wait_until(Duration::from_secs(30), || {
            cluster
                .up()
                .filter(|(_, n)| role(n) == "slave")
                .all(|(_, n)| {
                    n.try_cli(&["INFO", "replication"])
                        .is_ok_and(|s| s.contains("master_link_status:up"))
                })
        });
        assert!(synced, "the replicas never synced with their primaries");
        cluster
    }

    fn up(&self) -> impl Iterator<Item = (usize, &RedisServer)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.down[*i])
    }

    /// `redis://127.0.0.1:P/0` of the first running node: a seed for cluster clients.
    pub fn seed_url(&self) -> String {
        self.up().next().expect("a running node").1.url()
    }

    /// The node ID of node `i` (`CLUSTER MYID`).
    pub fn id(&self, i: usize) -> String {
        self.nodes[i].cli(&["CLUSTER", "MYID"]).trim().to_string()
    }

    /// Running nodes that are primaries owning slots, by index.
    pub fn primaries(&self) -> Vec<usize> {
        self.up()
            .filter(|(_, n)| role(n) == "master" && owns_slots(n))
            .map(|(i, _)| i)
            .collect()
    }

    /// The running replica following primary `p`.
    pub fn replica_of(&self, p: usize) -> Option<usize> {
        let port = self.nodes[p].port().to_string();
        self.up()
            .find(|(_, n)| {
                role(n) == "slave"
                    && n.cli(&["INFO", "replication"])
                        .lines()
                        .any(|l| l.trim() == format!("master_port:{port}"))
            })
            .map(|(i, _)| i)
    }

    /// Runs `redis-cli -c` (following MOVED and ASK) against a running primary.
    pub fn cli_c(&self, args: &[&str]) -> String {
        let port = self.nodes[self.primaries()[0]].port().to_string();
        let mut all = vec!["-c", "-h", "127.0.0.1", "-p", &port];
        all.extend_from_slice(args);
        let (ok, out) = redis_cli(&all);
        assert!(ok, "redis-cli -c {args:?}: {out}");
        out.trim_end().to_string()
    }

    /// Keys on every running primary.
    pub fn dbsize_total(&self) -> u64 {
        self.primaries()
            .into_iter()
            .map(|i| {
                self.nodes[i]
                    .cli(&["DBSIZE"])
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
            })
            .sum()
    }

    /// `CLUSTER FAILOVER` on `replica` (a coordinated switch, no writes lost); returns once
    /// it is a primary and every node agrees again. It starts only once the replica's view
    /// gives its primary the slots the primary says it owns: a replica takes over the
    /// slots it knows of, and one that missed a reshard's last slot would leave it
    /// uncovered.
    pub fn failover(&self, replica: usize) {
        if let Some(p) = self
            .primaries()
            .into_iter()
            .find(|p| self.replica_of(*p) == Some(replica))
        {
            let id = self.id(p);
            let known = wait_until(Duration::from_secs(30), || {
                let own = slots_in_view(&self.nodes[p].cli(&["CLUSTER", "NODES"]), &id);
                let seen = slots_in_view(&self.nodes[replica].cli(&["CLUSTER", "NODES"]), &id);
                !own.is_empty() && own == seen
            });
            assert!(
                known,
                "replica {replica} never saw its primary's slots:\n{}",
                self.views()
            );
        }
        self.nodes[replica].cli(&["CLUSTER", "FAILOVER"]);
        assert!(
            wait_until(Duration::from_secs(30), || role(&self.nodes[replica])
                == "master"),
            "node {replica} never became a primary:\n{}",
            self.nodes[replica].log_tail()
        );
        self.wait_agreed(Duration::from_secs(30));
    }

    /// SIGKILL node `i`; when it was a primary, returns once its replica took over (after
    /// the 5 s node timeout) and the cluster serves every slot again. Panics for a primary
    /// without a replica (its slots would stay uncovered).
    pub fn kill9(&mut self, i: usize) {
        let replica = if role(&self.nodes[i]) == "master" {
            Some(
                self.replica_of(i)
                    .expect("kill9: a primary without a replica"),
            )
        } else {
            None
        };
        self.nodes[i].kill9();
        self.down[i] = true;
        if let Some(r) = replica {
            assert!(
                wait_until(Duration::from_secs(30), || role(&self.nodes[r]) == "master"),
                "replica {r} was not promoted:\n{}",
                self.nodes[r].log_tail()
            );
        }
        self.wait_ok(Duration::from_secs(30));
    }

    /// SIGSTOP the replica of `primary` and cut its replication link, so it gets none of
    /// the writes from now on (what was already sent reaches it on waking); returns it.
    pub fn freeze_replica(&mut self, primary: usize) -> usize {
        let r = self.replica_of(primary).expect("freeze_replica: a replica");
        self.nodes[r].pause();
        self.nodes[primary].cli(&["CLIENT", "KILL", "TYPE", "replica"]);
        // skipped by every query meanwhile: a frozen node never answers
        self.down[r] = true;
        r
    }

    /// Make the replica of `primary` stop following while it keeps answering: the
    /// primary refuses its resync (an ACL without PSYNC and SYNC for the default user) and
    /// drops the link; returns it. (A frozen replica, as [`freeze_replica`] makes, hangs
    /// the calls redis-rs sends every node, such as SCRIPT LOAD.)
    pub fn unfollow_replica(&mut self, primary: usize) -> usize {
        let r = self
            .replica_of(primary)
            .expect("unfollow_replica: a replica");
        self.nodes[primary].cli(&["ACL", "SETUSER", "default", "-psync", "-sync"]);
        self.nodes[primary].cli(&["CLIENT", "KILL", "TYPE", "replica"]);
        r
    }

    /// The failover that loses writes: SIGKILL `primary`, wake its frozen `replica` and
    /// make it take over (`CLUSTER FAILOVER TAKEOVER`, no agreement needed) with the
    /// data it had when frozen; returns once the cluster serves every slot again.
    pub fn kill9_and_promote_stale_replica(&mut self, primary: usize, replica: usize) {
        self.nodes[primary].kill9();
        self.down[primary] = true;
        self.nodes[replica].resume();
        self.down[replica] = false;
        let promoted = wait_until(Duration::from_secs(30), || {
            let _ = self.nodes[replica].try_cli(&["CLUSTER", "FAILOVER", "TAKEOVER"]);
            std::thread::sleep(Duration::from_millis(300));
            role(&self.nodes[replica]) == "master"
        });
        assert!(
            promoted,
            "replica {replica} did not take over:\n{}",
            self.nodes[replica].log_tail()
        );
        self.wait_ok(Duration::from_secs(30));
    }

    /// Moves `slots` slots from primary `from` to primary `to` with
    /// `redis-cli --cluster reshard` (keys migrate with MIGRATE; clients see ASK and MOVED
    /// meanwhile). Blocks until done.
    pub fn reshard(&self, from: usize, to: usize, slots: usize) {
        let (ok, out) = redis_cli(&[
            "--cluster".to_string(),
            "reshard".into(),
            format!("127.0.0.1:{}", self.nodes[from].port()),
            "--cluster-from".into(),
            self.id(from),
            "--cluster-to".into(),
            self.id(to),
            "--cluster-slots".into(),
            slots.to_string(),
            "--cluster-yes".into(),
        ]);
        assert!(ok, "reshard failed:\n{out}");
        self.wait_agreed(Duration::from_secs(30));
    }

    /// Every running node says `cluster_state:ok`.
    pub fn wait_ok(&self, timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.up().all(|(_, n)| {
                n.try_cli(&["CLUSTER", "INFO"])
                    .is_ok_and(|s| s.contains("cluster_state:ok"))
            })
        });
        assert!(ok, "cluster never reached cluster_state:ok");
    }

    /// `cluster_state:ok` everywhere and `redis-cli --cluster check` passes (every slot
    /// covered, all nodes agree on the configuration, no slot left open).
    pub fn wait_agreed(&self, timeout: Duration) {
        self.wait_ok(timeout);
        let port = self.up().next().expect("a running node").1.port();
        let mut last = String::new();
        let ok = wait_until(timeout, || {
            let ok;
            (ok, last) = redis_cli(&["--cluster", "check", &format!("127.0.0.1:{port}")]);
            ok && !last.contains("[WARNING]") && !last.contains("[ERR]")
        });
        assert!(ok, "the nodes never agreed:\n{last}\n{}", self.views());
    }

    /// Every running node's `CLUSTER NODES`, for a failure message.
    fn views(&self) -> String {
        self.up()
            .map(|(i, n)| {
                let view = n.try_cli(&["CLUSTER", "NODES"]).unwrap_or_else(|e| e);
                format!("--- node {i} (port {}):\n{view}", n.port())
            })
            .collect()
    }
}

/// The slots (and slot ranges) the node with ID `id` serves in one node's `CLUSTER
/// NODES` output, leaving out slots being migrated or imported.
fn slots_in_view(view: &str, id: &str) -> Vec<String> {
    view.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .map(|l| {
            l.split_whitespace()
                .skip(8)
                .filter(|f| !f.starts_with('['))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `redis-cli` with `args`: whether it succeeded, and its stdout and stderr.
fn redis_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String) {
    let out = Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn redis-cli");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `master` or `slave`, from `ROLE` (empty when the node does not answer).
fn role(n: &RedisServer) -> String {
    n.try_cli(&["ROLE"])
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_default()
}

/// Whether the node's own line in `CLUSTER NODES` lists slots.
fn owns_slots(n: &RedisServer) -> bool {
    n.try_cli(&["CLUSTER", "NODES"]).is_ok_and(|s| {
        s.lines()
            .find(|l| l.contains("myself"))
            .is_some_and(|l| l.split_whitespace().count() > 8)
    })
}
