#!/usr/bin/env python3
"""What the Redis apply script (src/sinks/redis/apply.lua) costs per SKU entry, by part.

Starts a throwaway redis-server on a free loopback port, loads the script and calls it
directly with synthetic entries shaped like a catch-up batch's (one stock row per SKU, a
trace of `--steps` stock changes, two counters and two window buckets), on hashes that
already hold a row. Prints Redis' own time per entry (INFO commandstats, which includes
the commands the script calls) for four shapes, interleaved and repeated: the cheapest
and the median of `--reps`, beside the same for `--baseline` (bench/apply_floor.lua: the
fence check and the writes alone) and the ratio. No skusync involved; change the script
and compare.

Usage: bench/apply_cost.py [--entries 500] [--calls 20] [--steps 7] [--reps 5] [--script FILE]
                           [--baseline FILE]
                           [--redis-config NAME=VALUE ...]
"""
import argparse, os, shutil, statistics, struct, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ROOT, Resp, free_port  # noqa: E402


class Redis:
    """A throwaway redis-server, spoken to with bench.py's RESP client."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="skusync-apply-cost-")
        port = free_port()
        self.p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir,
                                   "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                self.resp = Resp(port)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")

    def __call__(self, *args):
        return self.resp(*args)

    def stop(self):
        self.resp.close()
        self.p.terminate()
        self.p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def entry(k, sku, lsn, steps, activity, minute):
    """One entry in the script's argument format (see the header of apply.lua)."""
    e = [str(k), str(lsn), "0", str(lsn + 99), "0", "1796054937663", "0"]
    if steps:
        # flags 32: evaluate alerts after the record; far above any threshold
        trace = b"".join(struct.pack("<BIddddd", 32, 0, 999990 - i, 0, 0, i, 1796054937663) for i in range(steps))
        s = f"SKU-{sku}"  # row field of key (sku, location): see row_field in sinks/layout.rs
        e += ["1", f"r:16:public.inventory:{len(s)}:{s}4:WH-1", "vvv", "WH-1", str(999990 - steps + 1), "0", trace]
    else:
        e += ["0", b""]
    if activity:
        e += ["2", "purchases", "3", "views", "3",
              "2", "purchases", str(minute), "3", "views", str(minute), "3", "0"]
    else:
        e += ["0", "0", "0"]
    return e


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=500, help="entries per call (skusync sends at most 500)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--steps", type=int, default=7, help="stock changes merged into a stock entry")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--script", default=os.path.join(ROOT, "src/sinks/redis/apply.lua"),
                    help="the script to measure (a variant of apply.lua)")
    ap.add_argument("--baseline", default=os.path.join(ROOT, "bench/apply_floor.lua"),
                    help="measured side by side: the fence check and writes alone ('' for none)")
    ap.add_argument("--redis-config", action="append", default=[], metavar="NAME=VALUE",
                    help="CONFIG SET before the run (e.g. hash-max-listpack-entries=0); repeatable")
    a = ap.parse_args()
    r = Redis()
    try:
        for kv in a.redis_config:
            name, value = kv.split("=", 1)
            r("CONFIG", "SET", name, value)
        sha = r("SCRIPT", "LOAD", open(a.script).read())
        base = r("SCRIPT", "LOAD", open(a.baseline).read()) if a.baseline else None
        r("HSET", "skusync:meta", "bootstrap", "done")
        minute = int(time.time() // 60)
        lsn = [1000]
        skus = a.entries

        def run(steps, activity, sha=sha):
            r("CONFIG", "RESETSTAT")
            for _ in range(a.calls):
                keys, args = ["skusync:meta"], []
                for j in range(skus):
                    keys.append(f"skusync:{{SKU-{j}}}")
                    args += entry(j + 2, j, lsn[0], steps, activity, minute)
                    lsn[0] += 100
                keys += ["skusync:changes", "skusync:alerts"]
                # keep, low, quiet, end, writer, floor, scale, alert history count and age,
                # indexed ('': a standalone Redis), counters (the header of apply.lua)
                r("EVALSHA", sha, len(keys), *keys, "60", "5", "0", lsn[0], "", "", "0", "1000", "86400000", "",
                  "2", "purchases", "views", *args)
            for line in r("INFO", "commandstats").splitlines():
                if line.startswith("cmdstat_evalsha:"):
                    return float(line.split("usec=")[1].split(",")[0]) / (a.calls * skus)
            raise RuntimeError("no evalsha in commandstats")

        run(a.steps, True)  # every hash holds a row, counters and buckets from here on
        shapes = [("fence, load and write only", 0, False), (f"+ {a.steps} stock steps", a.steps, False),
                  ("+ 2 counters, 2 buckets", 0, True), ("both (a catch-up entry)", a.steps, True)]
        got = {name: [] for name, _, _ in shapes}
        floor = {name: [] for name, _, _ in shapes}
        for _ in range(a.reps):
            for name, steps, activity in shapes:
                got[name].append(run(steps, activity))
                if base:
                    floor[name].append(run(steps, activity, base))
        print(f"{os.path.basename(a.script)}, {a.entries} entries per call, Redis time per entry "
              f"(min / median of {a.reps})" + (f"; {os.path.basename(a.baseline)} in the same runs:" if base else ":"))
        for name, _, _ in shapes:
            v = got[name]
            line = f"  {name:32s} {min(v):6.1f} / {statistics.median(v):6.1f} us"
            if base:
                f = floor[name]
                line += f" | {min(f):5.1f} / {statistics.median(f):5.1f} us: {statistics.median(v) / statistics.median(f):4.1f}x"
            print(line)
    finally:
        r.stop()


if __name__ == "__main__":
    main()
