#!/usr/bin/env python3
"""Redis' CPU per thin apply read done two ways, side by side on a throwaway
redis-server (loopback, a free port): an HMGET of the fields thin apply asks for in the
1M-row transaction of `bench.py --only bulk` (the fence, totals, threshold, alert state,
two counters, the row field and its location's three fields), and an HGETALL of the
whole hash. Each on hashes that do not exist yet (an import of new SKUs) and on hashes
that exist (10 fields, as such an import leaves them), in pipelined rounds of 500 as
skusync sends them. Only Redis' CPU (INFO cpu) is compared. The experiment behind
`WholeReads` in src/sinks/redis/mod.rs (docs/architecture.md, "Read").

    python3 bench/thin_reads.py [reads per variant, default 200000]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from redis_write_paths import BATCH, fields, pack, start_server  # noqa: E402

ASKED = ["lsn", "piece", "rows", "on_hand", "reserved", "gone", "threshold", "alert_state", "views", "purchases",
         "r:9:inventory:B-0|WH-1", "loc:WH-1:on_hand", "loc:WH-1:reserved", "loc:WH-1:rows"]


def reads(c, prefix, n, whole):
    for b in range(0, n, BATCH):
        out = [pack("HGETALL", f"{prefix}:{{B-{i}}}") if whole else pack("HMGET", f"{prefix}:{{B-{i}}}", *ASKED)
               for i in range(b, b + BATCH)]
        c.send(b"".join(out), len(out))


def fill(c, prefix, n):
    for b in range(0, n, BATCH):
        out = []
        for i in range(b, b + BATCH):
            args = ["HSET", f"{prefix}:{{B-{i}}}"]
            for f, v in fields(i):
                args += [f, v]
            out.append(pack(*args))
        c.send(b"".join(out), len(out))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
    n -= n % BATCH
    server, c = start_server()
    try:
        fill(c, "e", n)
        for rnd in (1, 2):
            for kind, prefix in (("new SKUs", "n"), ("existing", "e")):
                for name, whole in (("HMGET of 14 fields", False), ("HGETALL", True)):
                    c0 = c.cpu()
                    reads(c, prefix, n, whole)
                    us = (c.cpu() - c0) * 1e6 / n
                    print(f"round {rnd} {kind:9s} {name:18s} Redis CPU {us:.2f} us per read", flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
