#!/usr/bin/env python3
"""skusync benchmarks: catch-up throughput vs pg_recvlogical, commit-to-subscriber latency,
memory and CPU. Every figure is measured side by side with its baseline in the same run,
because these machines are noisy. Prints a table and writes target/bench/results.json.

Usage: bench/bench.py [--quick] [--skusync PATH]
  --quick   a few-second smoke version (CI runs it to prove the benchmark still works)
"""
import argparse, json, math, os, re, struct, pwd, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def machine_info():
    """What a figure in the docs must name: the CPU as the VM reports it (its name, family
    and model tell the VMs of these sessions apart), cores, memory, kernel."""
    cpu = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("model name", "cpu family", "model") and k not in cpu:
                    cpu[k] = v.strip()
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu.get("model name"), "cpu_family": cpu.get("cpu family"),
            "cpu_model": cpu.get("model"), "memory_gib": mem_gib, "kernel": os.uname().release}


def utc_now():
    """The time now, as results.json and the printed table give a run's start and end."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def pg_bin():
    if os.environ.get("SKUSYNC_PG_BIN"):
        return os.environ["SKUSYNC_PG_BIN"]
    vers = sorted((int(v), v) for v in os.listdir("/usr/lib/postgresql") if v.isdigit())
    return f"/usr/lib/postgresql/{vers[-1][1]}/bin"


# The broker's window of unacknowledged QoS 1 messages per client (Mosquitto's
# `max_inflight_messages`, which it announces to MQTT 5 clients as Receive Maximum;
# Mosquitto's default is 20). skusync keeps up to 512 in flight; `--broker-window 20`
# measures with the default.
BROKER_WINDOW = 20


class Stack:
    """Throwaway PostgreSQL, Redis and Mosquitto on free loopback ports."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="skusync-bench-")
        os.chmod(self.dir, 0o755)
        self.procs = []
        self.bin = pg_bin()
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.pg_port, self.redis_port, self.mqtt_port = free_port(), free_port(), free_port()

    def as_pg(self):
        if self.user is None:
            return None
        u = self.user
        return lambda: (os.setgid(u.pw_gid), os.setuid(u.pw_uid))

    def start(self):
        data = os.path.join(self.dir, "data")
        subprocess.run([f"{self.bin}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"],
                       check=True, stdout=subprocess.DEVNULL, preexec_fn=self.as_pg())
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write(f"""
listen_addresses = '127.0.0.1'
port = {self.pg_port}
unix_socket_directories = '{self.dir}'
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
shared_buffers = 256MB
fsync = off
synchronous_commit = on
max_wal_size = 4GB
""")
        subprocess.run([f"{self.bin}/pg_ctl", "-D", data, "-l", os.path.join(self.dir, "pg.log"), "-w", "start"],
                       check=True, stdout=subprocess.DEVNULL, preexec_fn=self.as_pg())
        self.procs.append(subprocess.Popen(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                            "--save", "", "--appendonly", "no", "--dir", self.dir],
                                           stdout=subprocess.DEVNULL))
        conf = os.path.join(self.dir, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {self.mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n"
                    f"set_tcp_nodelay true\nmax_inflight_messages {BROKER_WINDOW}\n")
            if os.geteuid() == 0:
                f.write("user root\n")
        self.procs.append(subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(100):
            if self.redis("PING") == "PONG":
                break
            time.sleep(0.05)

    def psql(self, sql, db="postgres"):
        r = subprocess.run([f"{self.bin}/psql", "-h", self.dir, "-p", str(self.pg_port), "-U", "postgres", "-d", db,
                            "-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", sql], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"psql: {r.stderr}\n{sql}")
        return r.stdout.strip()

    def redis(self, *args):
        r = subprocess.run(["redis-cli", "-p", str(self.redis_port), *args], capture_output=True, text=True)
        return r.stdout.strip()

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()
        subprocess.run([f"{self.bin}/pg_ctl", "-D", os.path.join(self.dir, "data"), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=self.as_pg())
        shutil.rmtree(self.dir, ignore_errors=True)


SCHEMA = """
CREATE TABLE inventory (sku text, location text, on_hand int NOT NULL, reserved int NOT NULL DEFAULT 0,
  PRIMARY KEY (sku, location));
CREATE TABLE activity_log (id bigserial PRIMARY KEY, sku text, kind text, qty int, user_id text,
  at timestamptz DEFAULT now());
INSERT INTO inventory SELECT 'SKU-' || g, 'WH-1', 1000000, 0 FROM generate_series(1, {skus}) g;
CREATE PUBLICATION skusync FOR TABLE inventory;
CREATE PUBLICATION skusync_activity FOR TABLE activity_log WITH (publish = 'insert');
"""


# SKUSYNC_BENCH_BACKED_UP_ROUND_MS sets `[mqtt] backed_up_round_ms` (how often the
# publisher starts a round while the apply is backed up; 0: never holds back).
BACKED_UP_ROUND = (f"backed_up_round_ms = {int(os.environ['SKUSYNC_BENCH_BACKED_UP_ROUND_MS'])}\n"
                   if os.environ.get("SKUSYNC_BENCH_BACKED_UP_ROUND_MS") else "")


def connection(st, min_interval_ms=100, http_port=None):
    """The servers' part of a config: PostgreSQL, Redis, MQTT (and /metrics)."""
    http = f"[http]\nlisten = \"127.0.0.1:{http_port}\"\n" if http_port else ""
    return http + f"""
[postgres]
url = "postgresql://postgres@127.0.0.1:{st.pg_port}/postgres?sslmode=disable"
publication = ["skusync", "skusync_activity"]
[redis]
url = "redis://127.0.0.1:{st.redis_port}/0"
[mqtt]
url = "mqtt://127.0.0.1:{st.mqtt_port}"
min_interval_ms = {min_interval_ms}
""" + BACKED_UP_ROUND


# The catch-up mappings (`--catchup-mappings`): `light` is one stock table without
# locations and one counter (no windows, no users); `medium` adds locations, a second
# counter and 5m/1h windows; `full` is the demo's (dist/demo): also distinct users
# through an HMAC of the user column, and three counters.
def catchup_mapping(location, activity, counters):
    """A catch-up mapping: the stock table (with or without locations), then the activity
    table's extra keys and counters."""
    loc = 'location = "location"\n' if location else ""
    return f"""
[[inventory]]
table = "public.inventory"
sku = "sku"
{loc}on_hand = "on_hand"
reserved = "reserved"
[[activity]]
table = "public.activity_log"
sku = "sku"
kind = "kind"
{activity}[activity.counters]
{counters}"""


WINDOWS = 'quantity = "qty"\nwindows = ["5m", "1h"]\n'
CATCHUP_MAPPINGS = {
    "light": catchup_mapping(False, "", 'view = "views"\n'),
    "medium": catchup_mapping(True, WINDOWS, 'view = "views"\npurchase = "purchases"\n'),
    "full": catchup_mapping(
        True,
        WINDOWS + 'user = "user_id"\nuser_key = "bench-user-key-0123456789abcdef0123456789abcdef"\n',
        'view = "views"\nadd_to_cart = "carts"\npurchase = "purchases"\n'),
}


def config(st, min_interval_ms=100, http_port=None, mapping="medium"):
    return connection(st, min_interval_ms, http_port) + CATCHUP_MAPPINGS[mapping]


def backlog(st, skus, txns):
    """`txns` single-row transactions, half activity inserts, half stock updates over
    `skus` SKUs (pgbench, 4 clients; each script run is two autocommit statements)."""
    script = os.path.join(st.dir, "backlog.sql")
    with open(script, "w") as f:
        f.write(f"\\set s random(1, {skus})\n"
                "\\set u random(1, 50000)\n"
                "INSERT INTO activity_log (sku, kind, qty, user_id) VALUES ('SKU-' || :s, 'view', 1, 'user-' || :u);\n"
                "UPDATE inventory SET on_hand = on_hand - 1 WHERE sku = 'SKU-' || :s AND location = 'WH-1';\n")
    subprocess.run([f"{st.bin}/pgbench", "-h", st.dir, "-p", str(st.pg_port), "-U", "postgres", "-n", "-c", "4",
                    "-j", "2", "-t", str(txns // 8), "-f", script, "postgres"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pg_recvlogical(st, host, slot, end):
    """Drain `slot` up to `end` into /dev/null (host: 127.0.0.1 for TCP, the socket
    directory for the Unix socket)."""
    subprocess.run([f"{st.bin}/pg_recvlogical", "-h", host, "-p", str(st.pg_port), "-U", "postgres",
                    "-d", "postgres", "-S", slot, "--start", "-E", end, "-f", "/dev/null",
                    "-o", "proto_version=1", "-o", "publication_names=skusync,skusync_activity", "--no-loop"],
                   check=True)


def classify_latencies(messages, min_interval):
    """Per state message `(recv seconds, topic, payload)`: (recv seconds, commit -> receive
    ms, held), held when the throttle held it back: the previous message for that SKU was
    sent less than `min_interval` ms before this commit (it waits by design)."""
    out = []
    last_send = {}
    for recv, topic, j in messages:
        if "ts" not in j or "as_of" in j:
            continue
        recv_ms = float(recv) * 1000
        commit_ms = time.mktime(time.strptime(j["ts"][:19], "%Y-%m-%dT%H:%M:%S")) * 1000 - time.timezone * 1000 \
            + int(j["ts"][20:23])
        prev = last_send.get(topic)
        out.append((float(recv), recv_ms - commit_ms, prev is not None and commit_ms - prev < min_interval))
        last_send[topic] = recv_ms
    return out


def split_latencies(messages, min_interval):
    """Commit -> receive latencies (ms) of state messages, split into (immediate, held):
    see `classify_latencies` (held ones are reported apart)."""
    immediate, held = [], []
    for _, lat, h in classify_latencies(messages, min_interval):
        (held if h else immediate).append(lat)
    return immediate, held


def perf_all_start(suffix=""):
    """SKUSYNC_BENCH_PERF_ALL=FILE: `perf record -a` (every process: walsender, Redis,
    broker, skusync) until perf_all_stop; where the machine's two cores go."""
    if not os.environ.get("SKUSYNC_BENCH_PERF_ALL"):
        return None
    return subprocess.Popen(["perf", "record", "-a", "-g", "-o", os.environ["SKUSYNC_BENCH_PERF_ALL"] + suffix],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_all_stop(p):
    if p:
        p.send_signal(signal.SIGINT)
        p.wait()


def proc_stats(pid):
    """(cpu seconds, peak RSS MiB) of a running process."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(parts[11]) + int(parts[12])) / tick
    hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return cpu, hwm


class Skusync:
    def __init__(self, exe, st, cfg_text, name):
        self.cfg = os.path.join(st.dir, f"{name}.toml")
        with open(self.cfg, "w") as f:
            f.write(cfg_text)
        os.chmod(self.cfg, 0o600)  # the full mapping's config holds an HMAC key
        # SKUSYNC_BENCH_LOG=info|debug keeps more of the log (target/bench/<name>.log).
        self.log_path = os.path.join(ROOT, "target/bench", f"{name}.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self.log = open(self.log_path, "w")
        # SKUSYNC_BENCH_WRAP="perf record -g -o perf.data --" profiles the measured runs
        # (the cluster benchmark's two: the cluster's, which runs second, is what stays in
        # a file both name).
        wrap = os.environ.get("SKUSYNC_BENCH_WRAP", "").split() if name.endswith("-measured") else []
        self.p = subprocess.Popen(wrap + [exe, "run", "--config", self.cfg, "--log",
                                         os.environ.get("SKUSYNC_BENCH_LOG", "warn")], stdout=subprocess.DEVNULL,
                                  stderr=self.log)

    def stats(self):
        return proc_stats(self.p.pid)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(20)
        except subprocess.TimeoutExpired:
            self.p.kill()


def wait(pred, timeout, what, log=None):
    """Poll `pred`; on timeout, the error carries the tail of the daemon's `log` (a
    path), so a failed run explains itself."""
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            tail = ""
            if log:
                with open(log, errors="replace") as f:
                    tail = "\n--- " + log + " (tail) ---\n" + "".join(f.readlines()[-30:])
            raise RuntimeError(f"timeout waiting for {what}{tail}")
        time.sleep(0.02)


def add_command_stats(stats, info):
    """Adds an `INFO commandstats` reply's {command: {calls, usec}} into `stats`."""
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            name, kv = line[8:].split(":", 1)
            d = dict(x.split("=") for x in kv.split(","))
            t = stats.setdefault(name, {"calls": 0, "usec": 0})
            t["calls"] += int(d["calls"])
            t["usec"] += int(d["usec"])
    return stats


def redis_command_stats(st):
    """{command: {calls, usec}} since the last CONFIG RESETSTAT."""
    return add_command_stats({}, st.redis("INFO", "commandstats"))


def top_commands(stats, since=None):
    """The six commands Redis spent most time in (minus `since`, an earlier sample)."""
    since = since or {}
    diff = {}
    for name, v in stats.items():
        b = since.get(name, {"calls": 0, "usec": 0})
        if v["calls"] > b["calls"]:
            diff[name] = {"calls": v["calls"] - b["calls"], "usec": v["usec"] - b["usec"]}
    return dict(sorted(diff.items(), key=lambda kv: -kv[1]["usec"])[:6])


def redis_top_commands(st):
    """Where Redis spent its time since the last CONFIG RESETSTAT (the apply script vs
    the publisher's reads and marks)."""
    return top_commands(redis_command_stats(st))


def lsn_int(s):
    hi, lo = s.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


class Resp:
    """A minimal Redis client on one socket: polling must not spawn processes (that costs
    the measured run CPU) or scan every key each time (that costs Redis)."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.f = self.s.makefile("rb")

    def __call__(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.s.sendall(b"".join(out))
        return self._read()

    def _read(self):
        line = self.f.readline()[:-2]
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            v = self.f.read(n + 2)[:-2]
            return v.decode()
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"RESP: {line!r}")

    def close(self):
        self.s.close()


class Published:
    """Whether every SKU hash's state was acknowledged by the broker (pub_lsn == lsn):
    the first check scans all hashes, later ones only those still pending."""

    SCAN = ("local out={} local c='0' repeat local r=redis.call('SCAN',c,'MATCH','skusync:{*}','COUNT',1000) "
            "c=r[1] for _,k in ipairs(r[2]) do local v=redis.call('HMGET',k,'lsn','pub_lsn','gone') "
            "if v[3]~='1' and v[1]~=v[2] then out[#out+1]=k end end until c=='0' return out")
    CHECK = ("local out={} for _,k in ipairs(KEYS) do local v=redis.call('HMGET',k,'lsn','pub_lsn','gone') "
             "if v[3]~='1' and v[1]~=v[2] then out[#out+1]=k end end return out")

    def __init__(self, port):
        self.r = Resp(port)
        self.pending = None

    def __call__(self):
        if self.pending is None:
            self.pending = self.r("EVAL", self.SCAN, 0)
        elif self.pending:
            # A slice per poll: checking thousands of keys every 20 ms would load the very
            # Redis being measured.
            head, rest = self.pending[:500], self.pending[500:]
            self.pending = self.r("EVAL", self.CHECK, len(head), *head) + rest
        return not self.pending


def arrivals_per_100ms(path, since, before_s=1.0):
    """Messages the subscriber received per 100 ms, from `before_s` before `since` (unix
    seconds: when the benchmark saw Redis hold the last batch, within its 20 ms polling)
    to the last: whether the tail is a steady stream (publish throughput) or waits (a
    stall). The first count is of [-1.0, -0.9)."""
    start = -round(before_s * 10)
    counts = {}
    with open(path, errors="replace") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            try:
                b = math.floor((float(head) - since) * 10)
            except (ValueError, OverflowError):
                continue
            if b >= start:  # the second before, and the tail
                counts[b] = counts.get(b, 0) + 1
    return [counts.get(b, 0) for b in range(start, max(counts, default=start - 1) + 1)]


def last_state_arrival(path):
    """When the last SKU's final state reached the subscriber (unix seconds): per
    topic, the first arrival of the `lsn` its last message carries."""
    first = {}  # topic -> (lsn, arrival of the first message with it)
    lsn_re = re.compile(r'"lsn":"([0-9A-F]+/[0-9A-F]+)"')
    with open(path, errors="replace") as f:
        for line in f:
            parts = line.split(" ", 2)
            if len(parts) < 3:
                continue
            m = lsn_re.search(parts[2])
            lsn = m.group(1) if m else ""
            prev = first.get(parts[1])
            if prev is None or prev[0] != lsn:
                first[parts[1]] = (lsn, float(parts[0]))
    return max((t for _, t in first.values()), default=None), len(first)


def published_when_quiet(st, sub_out, sample, quiet=0.3, timeout=300):
    """Wait until every SKU's state was acknowledged, checking only once the subscriber
    has received nothing for `quiet` seconds, and return `sample()` taken just before the
    check that succeeded. The check reads every SKU hash (a script over all of them, then
    the pending ones): polled while the last states stream out, it took Redis 2 ms per
    500 keys every 20 ms, and its first scan blocked Redis for tens of milliseconds, in
    the very tail being measured."""
    p = Published(st.redis_port)
    size, since, t0 = -1, time.time(), time.time()
    try:
        while True:
            now = time.time()
            n = os.path.getsize(sub_out)
            if n != size:
                size, since = n, now
            elif now - since >= quiet:
                got = sample()
                if p():
                    return got
                since = time.time()  # not yet: wait for the next quiet spell
            if now - t0 > timeout:
                raise RuntimeError("timeout waiting for MQTT acknowledged")
            time.sleep(0.02)
    finally:
        p.r.close()


def all_published(st):
    p = Published(st.redis_port)
    try:
        return p()
    finally:
        p.r.close()


class WalsenderCpu:
    """CPU seconds of the walsender serving `slot`, sampled until stopped: the server's
    cost of streaming to a client depends on how the client reads. Over TCP, also the
    segments it sent (`ss`): one per pgoutput message when the client is parked on the
    socket, far fewer when the client lets the sends queue."""

    def __init__(self, st, slot):
        import threading
        self.st, self.slot, self.cpu, self.segs, self.stop_ = st, slot, 0.0, 0, False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def segments(self):
        # the busiest server-side connection: the replication stream
        try:
            out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{self.st.pg_port} )"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return
        best = (0, 0)
        for tok in out.split():
            if tok.startswith("bytes_sent:"):
                sent = int(tok.split(":")[1])
            elif tok.startswith("segs_out:"):
                best = max(best, (sent, int(tok.split(":")[1])))
        self.segs = max(self.segs, best[1])

    def run(self):
        pid = None
        n = 0
        while not self.stop_:
            if pid is None:
                try:
                    out = self.st.psql(f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{self.slot}'")
                    pid = int(out) if out.strip() else None
                except Exception:
                    pid = None
            if pid is not None:
                try:
                    self.cpu = max(self.cpu, proc_stats(pid)[0])
                except OSError:
                    pid = None
            n += 1
            if n % 4 == 0:
                self.segments()
            time.sleep(0.05)

    def stop(self):
        self.stop_ = True
        self.t.join()
        return round(self.cpu, 2)


class CpuByProcess:
    """CPU seconds per kind of process while a load runs, sampled from /proc every 0.2 s
    (a process that exits keeps its last sample, so pgbench's short-lived backends count):
    the walsender, other PostgreSQL backends (pgbench's sessions), pgbench, skusync, Redis,
    the broker, the subscriber, and the machine's whole busy time from /proc/stat."""

    def __init__(self, st, skusync_pid):
        import threading
        self.own = {st.procs[0].pid: "redis", st.procs[1].pid: "broker", skusync_pid: "skusync"}
        self.first, self.last, self.kind = {}, {}, {}
        self.busy0 = self.busy()
        self.t0 = time.time()
        self.stop_ = False
        self.initial = True
        self.sample()
        self.initial = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    @staticmethod
    def busy():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

    def classify(self, pid, comm):
        if pid in self.own:
            return self.own[pid]
        if comm == "postgres":
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                return None
            if "walsender" in cmd:
                return "walsender"
            return "postgres_backends" if "[local]" in cmd or "127.0.0.1" in cmd else "postgres_other"
        return {"pgbench": "pgbench", "mosquitto_sub": "subscriber"}.get(comm)

    def sample(self):
        tick = os.sysconf("SC_CLK_TCK")
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            pid = int(d)
            try:
                raw = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            parts = raw.rsplit(")", 1)[1].split()
            cpu = (int(parts[11]) + int(parts[12])) / tick
            if pid not in self.kind:
                self.kind[pid] = self.classify(pid, comm)
                self.first[pid] = cpu if self.initial else 0.0
            self.last[pid] = cpu

    def run(self):
        while not self.stop_:
            time.sleep(0.2)
            self.sample()

    def stop(self):
        self.stop_ = True
        self.t.join()
        self.sample()
        out = {}
        for pid, k in self.kind.items():
            if k is not None:
                out[k] = out.get(k, 0.0) + self.last[pid] - self.first[pid]
        out["machine_busy"] = self.busy() - self.busy0
        out["wall"] = time.time() - self.t0
        return out


def catch_up(exe, quick, mapping="medium"):
    """Backlog of single-row transactions (half activity inserts, half stock updates),
    drained with one of the `MAPPINGS`."""
    skus = 1000 if quick else 10000
    txns = 4000 if quick else int(os.environ.get("SKUSYNC_BENCH_TXNS", 400000))
    st = Stack()
    st.start()
    try:
        st.psql(SCHEMA.format(skus=skus))
        # skusync creates its slot (and loads the empty snapshot), then stops: its slot
        # now waits at the same point as the others.
        s = Skusync(exe, st, config(st, mapping=mapping), "skusync")
        wait(lambda: st.redis("HGET", "skusync:meta", "bootstrap") == "done", 60, "bootstrap", s.log_path)
        wait(lambda: all_published(st), 60, "initial publish")
        s.stop()
        for slot in ("recvlogical", "recvlogical_unix", "ceiling"):
            st.psql(f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
        t0 = time.time()
        backlog(st, skus, txns)
        gen_s = time.time() - t0
        end = st.psql("SELECT pg_current_wal_lsn()")
        rows = txns
        res = {"mapping": mapping, "transactions": txns, "rows": rows, "skus": skus, "backlog_generation_s": round(gen_s, 2)}

        # Baseline: pg_recvlogical draining its slot to /dev/null, over TCP like skusync
        # (the ratio's baseline), then over the Unix socket (cheaper for its walsender).
        for slot, host, key in (("recvlogical", "127.0.0.1", "pg_recvlogical"),
                                ("recvlogical_unix", st.dir, "pg_recvlogical_unix")):
            t0 = time.time()
            perf_all = perf_all_start("-" + slot)  # the baseline's drain
            ws = WalsenderCpu(st, slot)
            pg_recvlogical(st, host, slot, end)
            took = time.time() - t0
            perf_all_stop(perf_all)
            res[f"{key}_walsender_cpu_s"] = ws.stop()
            if host == "127.0.0.1":
                res[f"{key}_walsender_tcp_segments"] = ws.segs
            res[f"{key}_s"] = round(took, 3)
            res[f"{key}_rows_per_s"] = round(rows / took)
        rl_s, rlu_s = res["pg_recvlogical_s"], res["pg_recvlogical_unix_s"]

        # skusync: Redis applied and every SKU's final state acknowledged by the broker.
        st.redis("CONFIG", "RESETSTAT")  # commandstats of the measured drain only
        # A subscriber: the clock stops when the last state reaches it. Line-buffered into
        # a file, so that killing it loses nothing and its timestamps are not delayed.
        sub_out = os.path.join(st.dir, "sub-catchup.txt")
        sub = subprocess.Popen(["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(st.mqtt_port),
                                "-t", "skusync/sku/+", "-q", "0", "-R", "-F", "%U %t %p"],
                               stdout=open(sub_out, "w"), stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        t0 = time.time()
        perf_all = perf_all_start()  # the measured drain
        s = Skusync(exe, st, config(st, mapping=mapping), "skusync-measured")
        ws = WalsenderCpu(st, "skusync")
        peak = [0.0]
        rc = Resp(st.redis_port)
        end_i = lsn_int(end)

        def drained():
            # Redis' applied LSN (the slot confirms it next): one round trip, no process.
            try:
                peak[0] = max(peak[0], s.stats()[1])
            except OSError:
                pass
            a = rc("HGET", "skusync:meta", "applied_lsn")
            return a is not None and int(a) >= end_i

        wait(drained, 900, "skusync drain")
        redis_s = time.time() - t0
        # CPU of each process from Redis applied to the last state acknowledged: the tail
        tail0 = [proc_stats(p)[0] for p in (s.p.pid, st.procs[0].pid, st.procs[1].pid)]
        tail_stats0 = redis_command_stats(st)
        res["skusync_walsender_cpu_s"] = ws.stop()
        res["skusync_walsender_tcp_segments"] = ws.segs
        tail1, tail_stats1 = published_when_quiet(st, sub_out, lambda: (
            [proc_stats(p)[0] for p in (s.p.pid, st.procs[0].pid, st.procs[1].pid)], redis_command_stats(st)))
        acked_s = time.time() - t0
        sub.kill()
        sub.wait()
        last, topics = last_state_arrival(sub_out)
        # SKUs the backlog never touched send nothing new (-R skips retained messages)
        res["subscriber_skus"] = topics
        sk_s = (last - t0) if last else acked_s
        # when the bench confirmed it (after the subscriber had been quiet for a while)
        res["skusync_outbox_checked_s"] = round(acked_s, 3)
        res["tail_s"] = round(sk_s - redis_s, 3)
        res["tail_arrivals_per_100ms"] = arrivals_per_100ms(sub_out, t0 + redis_s)
        # the publisher's Redis work for the last states (hash reads, distinct users, marks)
        res["tail_redis_top_commands"] = top_commands(tail_stats1, tail_stats0)
        res["tail_cpu_s"] = dict(zip(("skusync", "redis", "broker"), (round(b - a, 2) for a, b in zip(tail0, tail1))))
        perf_all_stop(perf_all)
        cpu, hwm = s.stats()
        s.stop()
        res["redis_top_commands"] = redis_top_commands(st)
        res["redis_cpu_s"] = round(proc_stats(st.procs[0].pid)[0], 2)
        res["skusync_redis_applied_s"] = round(redis_s, 3)
        res["skusync_s"] = round(sk_s, 3)
        res["skusync_rows_per_s"] = round(rows / sk_s)
        res["ratio_vs_pg_recvlogical"] = round(rl_s / sk_s, 2)
        res["ratio_vs_pg_recvlogical_unix"] = round(rlu_s / sk_s, 2)
        res["skusync_cpu_s"] = round(cpu, 2)
        res["skusync_cpu_us_per_row"] = round(cpu * 1e6 / rows, 2)
        res["skusync_peak_rss_mib"] = round(max(hwm, peak[0]), 1)

        # Server-side decode ceiling (no network).
        t0 = time.time()
        st.psql("SELECT count(*) FROM pg_logical_slot_get_binary_changes('ceiling', NULL, NULL, "
                "'proto_version', '1', 'publication_names', 'skusync,skusync_activity')")
        ce_s = time.time() - t0
        res["server_decode_ceiling_rows_per_s"] = round(rows / ce_s)
        return res
    finally:
        st.stop()


def start_cluster(st, n):
    """`n` cluster-enabled redis-servers (no replicas: the bench measures the primaries)
    joined by `redis-cli --cluster create`; returns their ports and processes."""
    ports, procs = [], []
    for i in range(n):
        port, bus = free_port(), free_port()
        d = os.path.join(st.dir, f"cluster-{i}")
        os.makedirs(d)
        procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", d, "--cluster-enabled", "yes",
                                       "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus),
                                       "--cluster-node-timeout", "5000"], stdout=subprocess.DEVNULL))
        ports.append(port)
    for p in ports:
        wait(lambda: subprocess.run(["redis-cli", "-p", str(p), "PING"], capture_output=True,
                                    text=True).stdout.strip() == "PONG", 10, "a cluster node")
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
                    "--cluster-yes"], check=True, stdout=subprocess.DEVNULL)
    for p in ports:
        wait(lambda: "cluster_state:ok" in subprocess.run(["redis-cli", "-p", str(p), "CLUSTER", "INFO"],
                                                          capture_output=True, text=True).stdout, 30, "cluster ok")
    return ports, procs


def cluster_catch_up(exe, quick, mapping="light"):
    """The catch-up backlog drained twice, side by side: into the stack's single Redis and
    into a 3-primary Redis Cluster (each skusync from its own slot at the same point);
    the clock stops when Redis (the meta hash) holds the backlog's end."""
    skus = 1000 if quick else 10000
    txns = 4000 if quick else int(os.environ.get("SKUSYNC_BENCH_TXNS", 400000))
    st = Stack()
    st.start()
    procs = []
    try:
        ports, procs = start_cluster(st, 3)
        st.psql(SCHEMA.format(skus=skus))
        single_cfg = config(st, mapping=mapping)
        cluster_cfg = single_cfg.replace(
            f'[redis]\nurl = "redis://127.0.0.1:{st.redis_port}/0"',
            '[redis]\ncluster = true\nurl = [' + ", ".join(f'"redis://127.0.0.1:{p}/0"' for p in ports) + "]"
        ).replace("[postgres]\n", '[postgres]\nslot = "skusync_cluster"\n')
        assert "cluster = true" in cluster_cfg and "skusync_cluster" in cluster_cfg
        cli_c = lambda *a: subprocess.run(["redis-cli", "-c", "-p", str(ports[0]), *a], capture_output=True,
                                          text=True).stdout.strip()
        for name, cfg, get in (("single", single_cfg, st.redis), ("cluster", cluster_cfg, cli_c)):
            s = Skusync(exe, st, cfg, f"skusync-{name}-boot")
            wait(lambda: get("HGET", "skusync:meta", "bootstrap") == "done", 60, "bootstrap", s.log_path)
            s.stop()
        backlog(st, skus, txns)
        end_i = lsn_int(st.psql("SELECT pg_current_wal_lsn()"))
        res = {"mapping": mapping, "transactions": txns, "rows": txns, "skus": skus, "primaries": len(ports)}
        node_cli = lambda port, *a: subprocess.run(["redis-cli", "-p", str(port), *a], capture_output=True,
                                                   text=True).stdout
        for name, cfg, get, pids in (("single", single_cfg, st.redis, [st.procs[0].pid]),
                                     ("cluster", cluster_cfg, cli_c, [p.pid for p in procs])):
            nodes = [st.redis_port] if name == "single" else ports
            for port in nodes:
                node_cli(port, "CONFIG", "RESETSTAT")  # commandstats of the measured drain only
            cpu0 = [proc_stats(p)[0] for p in pids]
            t0 = time.time()
            s = Skusync(exe, st, cfg, f"skusync-{name}-measured")

            def applied():
                a = get("HGET", "skusync:meta", "applied_lsn")
                return a.isdigit() and int(a) >= end_i

            wait(applied, 900, f"{name} drain", s.log_path)
            took = time.time() - t0
            cpu, _ = s.stats()
            s.stop()
            redis_cpu = [round(proc_stats(p)[0] - c, 2) for p, c in zip(pids, cpu0)]
            # every node's commands together: calls and Redis' own time in them
            stats = {}
            for port in nodes:
                add_command_stats(stats, node_cli(port, "INFO", "commandstats"))
            res[name] = {"s": round(took, 3), "rows_per_s": round(txns / took),
                         "skusync_cpu_us_per_row": round(cpu * 1e6 / txns, 2),
                         "redis_cpu_s": redis_cpu,
                         "redis_cpu_us_per_row_per_primary": [round(c * 1e6 / txns, 2) for c in redis_cpu],
                         "redis_top_commands": top_commands(stats)}
        res["cluster_vs_single"] = round(res["single"]["s"] / res["cluster"]["s"], 2)
        return res
    finally:
        for p in procs:
            p.kill()
            p.wait()
        st.stop()


def bulk(exe, quick):
    """One transaction of 1M rows (stock inserts), streamed with bounded memory."""
    n = int(os.environ.get("SKUSYNC_BENCH_BULK_ROWS", 20000 if quick else 1000000))
    st = Stack()
    st.start()
    try:
        st.psql(SCHEMA.format(skus=0))
        http = free_port()
        s = Skusync(exe, st, config(st, http_port=http), "skusync-measured")
        wait(lambda: st.redis("HGET", "skusync:meta", "bootstrap") == "done", 60, "bootstrap", s.log_path)
        time.sleep(0.5)
        idle_rss = s.stats()[1]
        st.psql("SELECT pg_create_logical_replication_slot('recvlogical', 'pgoutput')")
        st.psql(f"INSERT INTO inventory SELECT 'B-' || g, 'WH-' || (g % 5), g % 1000, 0 FROM generate_series(1, {n}) g")
        end = st.psql("SELECT pg_current_wal_lsn()")
        st.redis("CONFIG", "RESETSTAT")  # commandstats of the measured drain only
        redis_cpu0 = proc_stats(st.procs[0].pid)[0]
        t0 = time.time()
        peak = [0.0]
        rc = Resp(st.redis_port)
        end_i = lsn_int(end)

        def drained():
            peak[0] = max(peak[0], s.stats()[1])
            a = rc("HGET", "skusync:meta", "applied_lsn")
            return a is not None and int(a) >= end_i

        wait(drained, 900, "bulk drain")
        sk_s = time.time() - t0
        cpu, hwm = s.stats()
        redis_cpu = proc_stats(st.procs[0].pid)[0] - redis_cpu0
        top = redis_top_commands(st)
        # The publisher may publish much of it after the apply (it yields to a backed-up
        # apply): when the broker had acknowledged a state of every SKU.
        wait(lambda: metric(http, "skusync_mqtt_published_total") >= n, 900, "bulk publish", s.log_path)
        pub_s = time.time() - t0
        hwm = max(hwm, s.stats()[1])  # VmHWM: the peak over the publishing too
        s.stop()
        t0 = time.time()
        pg_recvlogical(st, "127.0.0.1", "recvlogical", end)  # over TCP, like skusync
        rl_s = time.time() - t0
        return {"rows": n, "skusync_redis_applied_s": round(sk_s, 3), "skusync_rows_per_s": round(n / sk_s),
                "pg_recvlogical_s": round(rl_s, 3), "pg_recvlogical_rows_per_s": round(n / rl_s),
                "ratio_vs_pg_recvlogical": round(rl_s / sk_s, 2), "skusync_peak_rss_mib": round(max(hwm, peak[0]), 1),
                "skusync_idle_rss_mib": round(idle_rss, 1), "skusync_cpu_us_per_row": round(cpu * 1e6 / n, 2),
                "skusync_all_published_s": round(pub_s, 3),
                "redis_cpu_us_per_row": round(redis_cpu * 1e6 / n, 2), "redis_top_commands": top}
    finally:
        st.stop()


def scrape(port):
    """skusync's /metrics text on 127.0.0.1:`port`."""
    import urllib.request
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def metric(port, name):
    """A counter's or gauge's value (summed over its series) from /metrics; 0 when absent."""
    total = 0.0
    for line in scrape(port).splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def histogram(port, name):
    """Cumulative bucket counts {le: count} of a Prometheus histogram from /metrics."""
    out = {}
    for line in scrape(port).splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def hist_percentiles(before, after):
    """p50/p95/p99 (bucket upper bounds, ms) of what was observed between two scrapes."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0) for le in les]
    total = counts[-1] if counts else 0
    res = {"n": int(total)}
    for p in (50, 95, 99):
        bound = None
        for le, c in zip(les, counts):
            if total and c >= p / 100 * total:
                bound = le
                break
        res[f"p{p}_ms_at_most"] = None if bound is None else (round(bound * 1000, 2) if bound != float("inf") else "inf")
    return res


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 2)


def cbor_decode(b):
    """A CBOR item (RFC 8949: the subset skusync writes: maps, arrays, text, integers,
    floats, booleans), enough to read `ts` from a state."""
    def item(i):
        ib = b[i]
        major, info = ib >> 5, ib & 31
        i += 1
        if major == 7:
            if info in (20, 21):
                return info == 21, i
            if info == 22:
                return None, i
            n = {25: 2, 26: 4, 27: 8}[info]
            fmt = {2: ">e", 4: ">f", 8: ">d"}[n]
            return struct.unpack(fmt, b[i:i + n])[0], i + n
        if info < 24:
            arg = info
        else:
            n = {24: 1, 25: 2, 26: 4, 27: 8}[info]
            arg = int.from_bytes(b[i:i + n], "big")
            i += n
        if major == 0:
            return arg, i
        if major == 1:
            return -1 - arg, i
        if major in (2, 3):
            v = b[i:i + arg]
            return (v.decode() if major == 3 else v), i + arg
        if major == 4:
            out = []
            for _ in range(arg):
                v, i = item(i)
                out.append(v)
            return out, i
        if major == 5:
            out = {}
            for _ in range(arg):
                k, i = item(i)
                v, i = item(i)
                out[k] = v
            return out, i
        raise ValueError(f"CBOR major type {major}")
    return item(0)[0]


def latency(exe, rate, quick, fmt="json", pg_protocol="prepared"):
    """Fixed-rate load (open loop, pgbench -R) and a subscriber timing each message;
    `fmt` is the payload format (`json` or `cbor`); `pg_protocol` is pgbench's query mode
    (`prepared`, as an application with a connection pool sends its statements, or
    `simple`: each statement parsed and planned again, about 30% more PostgreSQL CPU)."""
    skus = 10000
    secs = 3 if quick else 15
    min_interval = 100
    st = Stack()
    st.start()
    try:
        st.psql(SCHEMA.format(skus=skus))
        http_port = free_port()
        cfg = config(st, min_interval, http_port).replace("[[inventory]]", f'format = "{fmt}"\n[[inventory]]', 1)
        s = Skusync(exe, st, cfg, "skusync-measured")
        wait(lambda: st.redis("HGET", "skusync:meta", "bootstrap") == "done", 60, "bootstrap", s.log_path)
        wait(lambda: all_published(st), 120, "initial publish")
        before = histogram(http_port, "skusync_commit_to_redis_seconds")
        before_ack = histogram(http_port, "skusync_commit_to_puback_seconds")
        # -R: skip retained (stale) messages; -W: exit by itself, flushing its output
        # (a killed mosquitto_sub loses what it buffered for the pipe).
        # Into a file, not a pipe: a full pipe would block the subscriber and delay its
        # receive timestamps.
        sub_out = os.path.join(st.dir, f"sub-{rate}.txt")
        # JSON as it came (one line: compact JSON has no newline); CBOR in hex. The
        # subscriber shares the two cores: hex-formatting JSON cost it about twice the CPU.
        sub_format = "%U %t %x" if fmt == "cbor" else "%U %t %p"
        sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(st.mqtt_port), "-t", "skusync/sku/+",
                                "-q", "0", "-R", "-W", str(secs + 4), "-F", sub_format], stdout=open(sub_out, "w"),
                               stderr=subprocess.DEVNULL)  # -W says "Timed out" when it exits
        time.sleep(1.0)
        script = os.path.join(st.dir, "latency.sql")
        with open(script, "w") as f:
            f.write(f"\\set s random(1, {skus})\n"
                    "UPDATE inventory SET on_hand = on_hand - 1 WHERE sku = 'SKU-' || :s AND location = 'WH-1';\n")
        perf_all = perf_all_start(f"-{rate}")  # the load
        st.redis("CONFIG", "RESETSTAT")
        cpu = CpuByProcess(st, s.p.pid)
        pgb = subprocess.run([f"{st.bin}/pgbench", "-h", st.dir, "-p", str(st.pg_port), "-U", "postgres", "-n", "-c",
                              "4", "-j", "2", "-M", pg_protocol, "-R", str(rate), "-T", str(secs), "-f", script, "postgres"], check=True,
                             capture_output=True, text=True)
        cpu = cpu.stop()
        perf_all_stop(perf_all)
        done = re.search(r"number of transactions actually processed: (\d+)", pgb.stdout)
        done = int(done.group(1)) if done else rate * secs
        # Where the machine's two cores went during the load: µs of CPU per transaction,
        # per kind of process, and the share of both cores in use.
        cpu_us_per_tx = {k: round(v * 1e6 / done, 1) for k, v in cpu.items() if k not in ("wall", "machine_busy")}
        cpu_us_per_tx["machine"] = round(cpu["machine_busy"] * 1e6 / done, 1)
        busy_share = round(cpu["machine_busy"] / (cpu["wall"] * (os.cpu_count() or 1)), 3)
        top = redis_top_commands(st)
        # Redis' read and write events (about one per client round trip each)
        stats = dict(l.split(":", 1) for l in st.redis("INFO", "stats").splitlines() if ":" in l)
        round_trips = {k: round(int(stats.get(f"total_{k}_processed", 0)) / done, 2) for k in ("reads", "writes")}
        sub.wait(timeout=30)
        out = open(sub_out).read()
        after = histogram(http_port, "skusync_commit_to_redis_seconds")
        after_ack = histogram(http_port, "skusync_commit_to_puback_seconds")
        s.stop()
        messages = []
        for line in out.splitlines():
            try:
                recv, topic, payload = line.split(" ", 2)
                raw = bytes.fromhex(payload) if fmt == "cbor" else payload
                messages.append((recv, topic, cbor_decode(raw) if fmt == "cbor" else json.loads(raw)))
            except (ValueError, KeyError, IndexError, struct.error):
                continue
        immediate, held = split_latencies(messages, min_interval)
        if os.environ.get("SKUSYNC_BENCH_SERIES"):
            # SKUSYNC_BENCH_SERIES=1: the worst commit -> subscriber latency per 500 ms of
            # receive time, to tell a steady queue from stalls
            # (messages held back by the throttle left out, as in the percentiles)
            worst = {}
            for recv, lat, h in classify_latencies(messages, min_interval):
                if not h:
                    b = int(recv * 2)
                    worst[b] = max(worst.get(b, 0), round(lat))
            first = min(worst) if worst else 0
            print("series " + " ".join(f"{(b - first) / 2:.1f}:{worst[b]}" for b in sorted(worst)), file=sys.stderr)
        return {"rate_tx_per_s": rate, "format": fmt, "pg_protocol": pg_protocol, "seconds": secs, "skus": skus, "min_interval_ms": min_interval,
                "messages": len(immediate) + len(held),
                "immediate": {"n": len(immediate), "p50_ms": pct(immediate, 50), "p95_ms": pct(immediate, 95),
                              "p99_ms": pct(immediate, 99), "max_ms": pct(immediate, 100)},
                "throttled": {"n": len(held), "p50_ms": pct(held, 50), "p99_ms": pct(held, 99)},
                "commit_to_redis": hist_percentiles(before, after),
                # the broker's acknowledgement, as skusync sees it (the subscriber's own
                # receive follows it)
                "commit_to_puback": hist_percentiles(before_ack, after_ack),
                "transactions": done, "cpu_us_per_tx": cpu_us_per_tx, "cores_busy_share": busy_share,
                "redis_top_commands": top, "redis_events_per_tx": round_trips}
    finally:
        st.stop()


# Saleor's stock tables (tests/it/schemas/saleor.sql, release 3.23.28), seeded with one
# warehouse, `skus` variants and one stock row each; the flat twin keys its stock rows by
# (sku, location) and carries the SKU text.
SALEOR_SEED = """
INSERT INTO account_address (first_name, last_name, company_name, street_address_1, street_address_2, city, city_area,
  postal_code, country, country_area, phone) VALUES ('', '', 'Shop', 'Main St 1', '', 'Berlin', '', '10115', 'DE', '', '');
INSERT INTO product_producttype (id, name, has_variants, is_shipping_required, weight, is_digital, slug, kind)
  VALUES (1, 'T', true, true, 0, false, 't', 'normal');
INSERT INTO product_product (id, name, slug, description_plaintext, search_document, search_index_dirty, product_type_id,
  created_at, updated_at) VALUES (1, 'P', 'p', '', '', false, 1, now(), now());
INSERT INTO warehouse_warehouse (id, name, email, address_id, slug, click_and_collect_option, is_private)
  VALUES ('00000000-0000-0000-0000-000000000001', 'W', '', 1, 'wh-1', 'disabled', false);
INSERT INTO product_productvariant (id, sku, name, product_id, track_inventory, is_preorder, created_at, updated_at)
  SELECT g, 'SKU-' || g, '', 1, true, false, now(), now() FROM generate_series(1, {skus}) g;
INSERT INTO warehouse_stock (warehouse_id, product_variant_id, quantity, quantity_allocated)
  SELECT '00000000-0000-0000-0000-000000000001', 1 + (g - 1) % {skus}, 1000000, 0 FROM generate_series(1, {rows}) g
  ON CONFLICT DO NOTHING;
CREATE PUBLICATION skusync FOR TABLE warehouse_stock, product_productvariant, warehouse_warehouse;
CREATE PUBLICATION skusync_activity WITH (publish = 'insert');
"""

FLAT_STOCK = """
CREATE TABLE inventory (sku text, location text, on_hand int NOT NULL, reserved int NOT NULL DEFAULT 0,
  PRIMARY KEY (sku, location));
INSERT INTO inventory SELECT 'SKU-' || g, 'wh-1', 1000000, 0 FROM generate_series(1, {skus}) g;
CREATE PUBLICATION skusync FOR TABLE inventory;
CREATE PUBLICATION skusync_activity WITH (publish = 'insert');
"""

STOCK_MAPPINGS = {
    "flat": """
[[inventory]]
table = "public.inventory"
sku = "sku"
location = "location"
on_hand = "on_hand"
reserved = "reserved"
""",
    "saleor": open(os.path.join(ROOT, "dist/examples/saleor.toml")).read().split("# ---- mapping ----")[1],
}

STOCK_UPDATE = {
    "flat": "UPDATE inventory SET on_hand = on_hand - 1 WHERE sku = 'SKU-' || :s AND location = 'wh-1';\n",
    "saleor": "UPDATE warehouse_stock SET quantity = quantity - 1 WHERE product_variant_id = :s;\n",
}


def stock_config(st, mapping, min_interval_ms=100, http_port=None):
    return connection(st, min_interval_ms, http_port) + STOCK_MAPPINGS[mapping]


def stock_stack(mapping, skus, rows):
    st = Stack()
    st.start()
    if mapping == "saleor":
        with open(os.path.join(ROOT, "tests/it/schemas/saleor.sql")) as f:
            path = os.path.join(st.dir, "saleor.sql")
            with open(path, "w") as out:
                out.write(f.read())
        subprocess.run([f"{st.bin}/psql", "-h", st.dir, "-p", str(st.pg_port), "-U", "postgres", "-X", "-q",
                        "-v", "ON_ERROR_STOP=1", "-f", path], check=True, stdout=subprocess.DEVNULL)
        st.psql(SALEOR_SEED.format(skus=skus, rows=rows))
    else:
        st.psql(FLAT_STOCK.format(skus=skus))
    return st


def stock_catch_up(exe, mapping, quick):
    """The same backlog of single-row stock updates over 10k SKUs, drained by skusync with
    the flat mapping or Saleor's (SKU and location looked up)."""
    skus = 1000 if quick else 10000
    txns = 4000 if quick else int(os.environ.get("SKUSYNC_BENCH_TXNS", 400000))
    st = stock_stack(mapping, skus, skus)
    try:
        s = Skusync(exe, st, stock_config(st, mapping), "skusync")
        wait(lambda: st.redis("HGET", "skusync:meta", "bootstrap") == "done", 120, "bootstrap", s.log_path)
        wait(lambda: all_published(st), 120, "initial publish")
        s.stop()
        script = os.path.join(st.dir, "backlog.sql")
        with open(script, "w") as f:
            f.write(f"\\set s random(1, {skus})\n" + STOCK_UPDATE[mapping])
        subprocess.run([f"{st.bin}/pgbench", "-h", st.dir, "-p", str(st.pg_port), "-U", "postgres", "-n", "-c", "4",
                        "-j", "2", "-t", str(txns // 4), "-f", script, "postgres"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end_i = lsn_int(st.psql("SELECT pg_current_wal_lsn()"))
        t0 = time.time()
        s = Skusync(exe, st, stock_config(st, mapping), "skusync-measured")
        rc = Resp(st.redis_port)
        peak = [0.0]

        def drained():
            try:
                peak[0] = max(peak[0], s.stats()[1])
            except OSError:
                pass
            a = rc("HGET", "skusync:meta", "applied_lsn")
            return a is not None and int(a) >= end_i

        redis_cpu0 = proc_stats(st.procs[0].pid)[0]
        wait(drained, 900, "skusync drain", s.log_path)
        wait(Published(st.redis_port), 300, "MQTT acknowledged")
        took = time.time() - t0
        cpu, hwm = s.stats()
        redis_cpu = proc_stats(st.procs[0].pid)[0] - redis_cpu0
        s.stop()
        return {"mapping": mapping, "transactions": txns, "skus": skus, "skusync_s": round(took, 3),
                "redis_cpu_us_per_row": round(redis_cpu * 1e6 / txns, 2),
                "skusync_rows_per_s": round(txns / took), "skusync_cpu_us_per_row": round(cpu * 1e6 / txns, 2),
                "skusync_peak_rss_mib": round(max(hwm, peak[0]), 1)}
    finally:
        st.stop()


def stock_latency(exe, mapping, rate, quick):
    """Commit -> subscriber at a fixed rate of single-row stock updates (open loop)."""
    skus = 10000
    secs = 3 if quick else 15
    st = stock_stack(mapping, skus, skus)
    try:
        s = Skusync(exe, st, stock_config(st, mapping, 100, free_port()), "skusync-measured")
        wait(lambda: st.redis("HGET", "skusync:meta", "bootstrap") == "done", 120, "bootstrap", s.log_path)
        wait(lambda: all_published(st), 120, "initial publish")
        sub_out = os.path.join(st.dir, f"sub-{mapping}.txt")
        sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(st.mqtt_port), "-t", "skusync/sku/+",
                                "-q", "0", "-R", "-W", str(secs + 4), "-F", "%U %t %p"], stdout=open(sub_out, "w"),
                               stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        script = os.path.join(st.dir, "latency.sql")
        with open(script, "w") as f:
            f.write(f"\\set s random(1, {skus})\n" + STOCK_UPDATE[mapping])
        subprocess.run([f"{st.bin}/pgbench", "-h", st.dir, "-p", str(st.pg_port), "-U", "postgres", "-n", "-c", "4",
                        "-j", "2", "-R", str(rate), "-T", str(secs), "-f", script, "postgres"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sub.wait(timeout=30)
        s.stop()
        messages = []
        for line in open(sub_out).read().splitlines():
            try:
                recv, topic, payload = line.split(" ", 2)
                messages.append((recv, topic, json.loads(payload)))
            except ValueError:
                continue
        # as the main latency benchmark: messages the throttle held back are apart
        lats, held = split_latencies(messages, 100)
        return {"mapping": mapping, "rate_tx_per_s": rate, "seconds": secs, "messages": len(lats),
                "p50_ms": pct(lats, 50), "p99_ms": pct(lats, 99), "max_ms": pct(lats, 100),
                "throttled": len(held)}
    finally:
        st.stop()


def lookup_memory(exe, quick):
    """1M variants and 2M stock rows (Saleor's tables, two warehouses): peak RSS of the
    snapshot load and of streaming stock updates and SKU renames afterwards."""
    skus = 20000 if quick else 1000000
    rows = 2 * skus
    st = Stack()
    st.start()
    try:
        with open(os.path.join(ROOT, "tests/it/schemas/saleor.sql")) as f:
            path = os.path.join(st.dir, "saleor.sql")
            with open(path, "w") as out:
                out.write(f.read())
        subprocess.run([f"{st.bin}/psql", "-h", st.dir, "-p", str(st.pg_port), "-U", "postgres", "-X", "-q",
                        "-v", "ON_ERROR_STOP=1", "-f", path], check=True, stdout=subprocess.DEVNULL)
        st.psql(SALEOR_SEED.format(skus=skus, rows=skus))
        # a second warehouse holding every variant: 2 stock rows per variant
        st.psql("INSERT INTO warehouse_warehouse (id, name, email, address_id, slug, click_and_collect_option, "
                "is_private) VALUES ('00000000-0000-0000-0000-000000000002', 'W2', '', 1, 'wh-2', 'disabled', false); "
                "INSERT INTO warehouse_stock (warehouse_id, product_variant_id, quantity, quantity_allocated) "
                f"SELECT '00000000-0000-0000-0000-000000000002', g, 5, 0 FROM generate_series(1, {skus}) g;")
        t0 = time.time()
        s = Skusync(exe, st, stock_config(st, "saleor"), "skusync-measured")
        peak = [0.0]

        def sample():
            try:
                peak[0] = max(peak[0], s.stats()[1])
            except OSError:
                pass

        def loaded():
            sample()
            return st.redis("HGET", "skusync:meta", "bootstrap") == "done"

        wait(loaded, 3600, "snapshot load", s.log_path)
        load_s = time.time() - t0
        load_peak = max(peak[0], s.stats()[1])
        # streaming: stock updates over all variants, and SKU renames (each moves 2 rows)
        script = os.path.join(st.dir, "stream.sql")
        with open(script, "w") as f:
            f.write(f"\\set v random(1, {skus})\n"
                    "UPDATE warehouse_stock SET quantity = quantity + 1 WHERE product_variant_id = :v;\n"
                    "UPDATE product_productvariant SET sku = 'SKU-' || :v || '-' || random() WHERE id = :v;\n")
        txns = 2000 if quick else 100000
        subprocess.run([f"{st.bin}/pgbench", "-h", st.dir, "-p", str(st.pg_port), "-U", "postgres", "-n", "-c", "4",
                        "-j", "2", "-t", str(txns // 4), "-f", script, "postgres"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end_i = lsn_int(st.psql("SELECT pg_current_wal_lsn()"))
        rc = Resp(st.redis_port)

        def drained():
            sample()
            a = rc("HGET", "skusync:meta", "applied_lsn")
            return a is not None and int(a) >= end_i

        wait(drained, 3600, "stream drain", s.log_path)
        cpu, hwm = s.stats()
        s.stop()
        used = st.redis("INFO", "memory")
        redis_mib = next((int(l.split(":")[1]) / 2**20 for l in used.splitlines() if l.startswith("used_memory:")), 0)
        return {"variants": skus, "stock_rows": rows, "snapshot_load_s": round(load_s, 1),
                "snapshot_rows_per_s": round((rows + skus) / load_s), "peak_rss_mib_after_load": round(load_peak, 1),
                "streamed_transactions": txns, "peak_rss_mib": round(max(hwm, peak[0]), 1),
                "redis_used_mib": round(redis_mib, 1)}
    finally:
        st.stop()


def main():
    global BROKER_WINDOW
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skusync", default=os.path.join(ROOT, "target/release/skusync"))
    ap.add_argument("--only", default="catchup,bulk,cluster,latency")
    ap.add_argument("--catchup-mappings", default="light,full",
                    help="catch-up: the mappings to drain the backlog with (light, medium, full)")
    ap.add_argument("--cluster-mapping", default="light", choices=sorted(CATCHUP_MAPPINGS),
                    help="cluster: the catch-up mapping drained into a single Redis and a 3-primary cluster")
    ap.add_argument("--rates", default="1000,5000", help="latency: transactions/s to run, comma-separated")
    ap.add_argument("--formats", default="json", help="latency: payload formats to run (json,cbor)")
    ap.add_argument("--pg-protocol", default="prepared", choices=["prepared", "simple"],
                    help="latency: pgbench's query mode for the load (-M)")
    ap.add_argument("--latency-runs", type=int, default=1,
                    help="latency: runs per rate (single runs on these machines vary a lot)")
    ap.add_argument("--broker-window", type=int, default=BROKER_WINDOW,
                    help="Mosquitto's max_inflight_messages (its default is 20)")
    a = ap.parse_args()
    BROKER_WINDOW = a.broker_window
    results = {"machine": machine_info(), "skusync": os.path.realpath(a.skusync),
               "started_utc": utc_now(), "quick": a.quick,
               "broker_window": BROKER_WINDOW}
    only = a.only.split(",")
    if "catchup" in only:
        results["catch_up"] = [catch_up(a.skusync, a.quick, m) for m in a.catchup_mappings.split(",")]
    if "bulk" in only:
        results["bulk_1m"] = bulk(a.skusync, a.quick)
    if "cluster" in only:
        results["cluster"] = cluster_catch_up(a.skusync, a.quick, a.cluster_mapping)
    if "lookups" in only:
        # the same backlog with the flat mapping and Saleor's, side by side
        flat = stock_catch_up(a.skusync, "flat", a.quick)
        saleor = stock_catch_up(a.skusync, "saleor", a.quick)
        results["lookups"] = {"flat": flat, "saleor": saleor,
                              "saleor_vs_flat": round(saleor["skusync_rows_per_s"] / flat["skusync_rows_per_s"], 2),
                              "latency_1k": [stock_latency(a.skusync, m, 1000, a.quick) for m in ("flat", "saleor")]}
    if "lookups_memory" in only:
        results["lookups_memory"] = lookup_memory(a.skusync, a.quick)
    if "latency" in only:
        results["latency"] = [dict(latency(a.skusync, r, a.quick, fmt, a.pg_protocol), run=i + 1)
                              for fmt in a.formats.split(",")
                              for r in map(int, a.rates.split(",")) for i in range(a.latency_runs)]
    results["finished_utc"] = utc_now()
    os.makedirs(os.path.join(ROOT, "target/bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target/bench/results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    if a.quick:
        print("\nSMOKE RUN (--quick): proves the benchmark still runs; tiny backlog, possibly a debug build. "
              "The figures below are not measurements; `make bench` measures.")
    m = results["machine"]
    print(f"\nmachine    {m['cpu']} (family {m['cpu_family']}, model {m['cpu_model']}), {m['cores']} cores, "
          f"{m['memory_gib']} GiB, kernel {m['kernel']} | {results['started_utc']} to {results['finished_utc']} UTC | "
          f"{results['skusync']}")
    for c in results.get("catch_up", []):
        print(f"\ncatch-up   {c['mapping']:>6} pg_recvlogical {c['pg_recvlogical_rows_per_s']:>8} rows/s (Unix socket "
              f"{c['pg_recvlogical_unix_rows_per_s']}) | skusync (Redis+MQTT acked) {c['skusync_rows_per_s']:>8} rows/s | "
              f"ratio {c['ratio_vs_pg_recvlogical']}x (vs Unix socket {c['ratio_vs_pg_recvlogical_unix']}x) | ceiling "
              f"{c['server_decode_ceiling_rows_per_s']} rows/s | {c['skusync_cpu_us_per_row']} us CPU/row | "
              f"peak RSS {c['skusync_peak_rss_mib']} MiB | last state {c['tail_s']} s after Redis applied (CPU s "
              f"{c['tail_cpu_s']})")
    b = results.get("bulk_1m")
    if b:
        print(f"bulk       pg_recvlogical {b['pg_recvlogical_rows_per_s']:>8} rows/s | skusync (Redis) "
              f"{b['skusync_rows_per_s']:>8} rows/s | ratio {b['ratio_vs_pg_recvlogical']}x | peak RSS "
              f"{b['skusync_peak_rss_mib']} MiB | idle RSS {b['skusync_idle_rss_mib']} MiB | every state acknowledged "
              f"after {b['skusync_all_published_s']} s")
    cl = results.get("cluster")
    if cl:
        si, cu = cl["single"], cl["cluster"]
        print(f"cluster    {cl['mapping']} catch-up to Redis: single Redis {si['rows_per_s']} rows/s | "
              f"{cl['primaries']}-primary cluster {cu['rows_per_s']} rows/s | ratio {cl['cluster_vs_single']}x | "
              f"Redis CPU us/row {si['redis_cpu_us_per_row_per_primary']} vs per primary "
              f"{cu['redis_cpu_us_per_row_per_primary']} | skusync CPU us/row {si['skusync_cpu_us_per_row']} vs "
              f"{cu['skusync_cpu_us_per_row']}")
        for name, r in (("single", si), ("cluster", cu)):
            top = ", ".join(f"{c} {v['calls']} calls {v['usec'] / 1e6:.2f} s"
                            for c, v in r.get("redis_top_commands", {}).items())
            print(f"cluster    {cl['mapping']} {name:>7} Redis commands: {top}")
    lk = results.get("lookups")
    if lk:
        f, sl = lk["flat"], lk["saleor"]
        print(f"lookups    catch-up flat {f['skusync_rows_per_s']} rows/s ({f['skusync_cpu_us_per_row']} us CPU/row, "
              f"Redis {f['redis_cpu_us_per_row']}) | Saleor mapping {sl['skusync_rows_per_s']} rows/s "
              f"({sl['skusync_cpu_us_per_row']} us CPU/row, Redis {sl['redis_cpu_us_per_row']}) | "
              f"ratio {lk['saleor_vs_flat']}x | peak RSS {f['skusync_peak_rss_mib']} / {sl['skusync_peak_rss_mib']} MiB")
        for l in lk["latency_1k"]:
            print(f"lookups    {l['mapping']:>6} 1000 tx/s commit->subscriber p50 {l['p50_ms']} p99 {l['p99_ms']} "
                  f"max {l['max_ms']} ms ({l['messages']} msgs; {l['throttled']} throttled by design)")
    lm = results.get("lookups_memory")
    if lm:
        print(f"lookups    {lm['variants']} variants, {lm['stock_rows']} stock rows: snapshot {lm['snapshot_load_s']} s "
              f"({lm['snapshot_rows_per_s']} rows/s), peak RSS {lm['peak_rss_mib_after_load']} MiB after the load, "
              f"{lm['peak_rss_mib']} MiB after streaming {lm['streamed_transactions']} transactions | Redis "
              f"{lm['redis_used_mib']} MiB")
    for l in results.get("latency", []):
        i = l["immediate"]
        run = f" (run {l['run']})" if a.latency_runs > 1 else ""
        r = l["commit_to_redis"]
        ack = l["commit_to_puback"]
        print(f"latency    {l['format']:>4} {l['rate_tx_per_s']:>5} tx/s{run}  commit->subscriber p50 {i['p50_ms']} p95 {i['p95_ms']} "
              f"p99 {i['p99_ms']} max {i['max_ms']} ms ({i['n']} msgs; {l['throttled']['n']} throttled by design) | "
              f"commit->Redis p50 <= {r['p50_ms_at_most']} p95 <= {r['p95_ms_at_most']} p99 <= {r['p99_ms_at_most']} ms | "
              f"commit->PUBACK (throttled too) p50 <= {ack['p50_ms_at_most']} p95 <= {ack['p95_ms_at_most']} "
              f"p99 <= {ack['p99_ms_at_most']} ms")
        print(f"latency    {l['format']:>4} {l['rate_tx_per_s']:>5} tx/s{run}  {l['transactions']} transactions "
              f"(pgbench -M {l['pg_protocol']}); cores "
              f"{round(l['cores_busy_share'] * 100)}% busy; CPU us per transaction: "
              + ", ".join(f"{k} {v}" for k, v in sorted(l["cpu_us_per_tx"].items(), key=lambda kv: -kv[1])))
    if a.latency_runs > 1:
        for fmt in a.formats.split(","):
          for rate in map(int, a.rates.split(",")):
            p99s = sorted(l["immediate"]["p99_ms"] for l in results["latency"]
                          if l["rate_tx_per_s"] == rate and l["format"] == fmt)
            print(f"latency    {fmt:>4} {rate:>5} tx/s  commit->subscriber p99 over {len(p99s)} runs: median "
                  f"{statistics.median(p99s)} ms, {p99s[0]} to {p99s[-1]} ms")

if __name__ == "__main__":
    main()
