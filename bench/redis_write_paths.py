#!/usr/bin/env python3
"""Redis' CPU per entry for thin apply's write done two ways, side by side on a
throwaway redis-server (loopback, a free port): thin.lua as skusync calls it (500 new
SKU hashes of 10 fields per call, the change index, the meta hash), and the same writes
fenced by WATCH (the SKU keys and the meta hash), a read of the meta hash, and
MULTI/EXEC. Only Redis' CPU (INFO cpu) is compared; the client's own speed does not
enter it. The experiment behind docs/performance.md's bullet "MULTI/EXEC with WATCH
instead of thin.lua".

    python3 bench/redis_write_paths.py [entries per variant, default 200000]
"""
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 500


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += [b"$%d\r\n" % len(a), a, b"\r\n"]
    return b"".join(out)


class Client:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.f = self.s.makefile("rb")

    def read(self):
        line = self.f.readline()
        t = line[:1]
        if t in (b"+", b"-", b":"):
            return line.rstrip(b"\r\n")
        if t == b"$":
            n = int(line[1:])
            return None if n < 0 else self.f.read(n + 2)[:-2]
        if t == b"*":
            return [self.read() for _ in range(max(int(line[1:]), 0))]
        raise RuntimeError(f"unexpected reply {line!r}")

    def send(self, packed, replies):
        self.s.sendall(packed)
        return [self.read() for _ in range(replies)][-1]

    def cmd(self, *a):
        return self.send(pack(*a), 1)

    def cpu(self):
        info = self.cmd("INFO", "cpu").decode()
        d = dict(l.split(":", 1) for l in info.split("\r\n") if ":" in l)
        return float(d["used_cpu_user"]) + float(d["used_cpu_sys"])


def fields(i):
    q = str(i % 1000)
    return [("lsn", str(10**9 + i)), ("piece", "1"), ("rows", "1"), ("on_hand", q), ("reserved", "0"),
            (f"r:9:inventory:B-{i}|WH-1", f'["WH-1","{q}","0"]'), ("loc:WH-1:on_hand", q),
            ("loc:WH-1:reserved", "0"), ("loc:WH-1:rows", "1"), ("ts", "1700000000000")]


def thin_lua(c, sha, prefix, n):
    for b in range(0, n, BATCH):
        keys = ["m:meta"] + [f"{prefix}:{{B-{i}}}" for i in range(b, b + BATCH)] + ["m:changes"]
        argv = [str(10**9 + b + BATCH), "7", "", "0"]
        for k, i in enumerate(range(b, b + BATCH)):
            fs = fields(i)
            argv += [str(k + 2), "", "", str(10**9 + i), str(len(fs))]
            for f, v in fs:
                argv += [f, v]
            argv += ["0", "0"]
        r = c.cmd("EVALSHA", sha, len(keys), *keys, *argv)
        assert isinstance(r, list) and r[1] == [], r


def watch_multi(c, prefix, n):
    for b in range(0, n, BATCH):
        keys = [f"{prefix}:{{B-{i}}}" for i in range(b, b + BATCH)]
        out = [pack("WATCH", "m:meta", *keys), pack("HMGET", "m:meta", "writer", "applied_lsn"), pack("MULTI")]
        changed = []
        for k, i in zip(keys, range(b, b + BATCH)):
            args = ["HSET", k]
            for f, v in fields(i):
                args += [f, v]
            out.append(pack(*args))
            changed += [str(10**9 + i), k]
        out += [pack("ZADD", "m:changes", "GT", *changed),
                pack("HSET", "m:meta", "applied_lsn", str(10**9 + b + BATCH)), pack("EXEC")]
        r = c.send(b"".join(out), len(out))
        assert isinstance(r, list), r


def start_server():
    """A throwaway redis-server on a free loopback port (nothing saved), and a client of it."""
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    for _ in range(50):
        try:
            return server, Client(port)
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("redis-server did not start")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
    n -= n % BATCH
    server, c = start_server()
    try:
        with open(os.path.join(HERE, "..", "src", "sinks", "redis", "thin.lua")) as f:
            sha = c.cmd("SCRIPT", "LOAD", f.read()).decode()
        c.cmd("HSET", "m:meta", "writer", "7", "applied_lsn", "1")
        for rnd, prefix in ((1, "a"), (2, "b")):
            for name, run in (("thin.lua", lambda p: thin_lua(c, sha, p, n)),
                              ("WATCH+MULTI/EXEC", lambda p: watch_multi(c, p, n))):
                c0 = c.cpu()
                run(prefix + name[0])
                print(f"round {rnd} {name:17s} Redis CPU {(c.cpu() - c0) * 1e6 / n:.2f} us per entry", flush=True)
        stats = c.cmd("INFO", "commandstats").decode()
        for line in stats.split("\r\n"):
            if line.startswith(("cmdstat_watch", "cmdstat_exec", "cmdstat_evalsha", "cmdstat_hset", "cmdstat_zadd")):
                print(line)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
