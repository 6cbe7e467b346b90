#!/usr/bin/env python3
"""Where a one-entry apply call's Redis time goes, and what Lua operations cost.

Starts a throwaway redis-server (bench/apply_cost.py's) and calls src/sinks/redis/apply.lua
cut short after each of its parts (the argument table alone, the prelude, pass 0, the
hash loading, pass 2, pass 3, whole) with the same one-entry call: a stock row and one
trace record, as a live single-row update sends. Then times single Lua operations inside
one EVAL (a table constructor, a number turned into a string, tonumber, ...). Prints
Redis' own time per call (INFO commandstats), the minimum and median of --reps.

Usage: bench/apply_sections.py [--calls 2000] [--reps 3]
"""
import argparse, os, statistics, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from apply_cost import Redis, entry  # noqa: E402
from bench import ROOT  # noqa: E402

# (part, the marker the script is cut before; None: the whole script)
PARTS = [("arguments only", ""), ("+ prelude (fence, helpers)", "-- Pass 0"),
         ("+ pass 0 (index the entries)", "local base_fields"), ("+ load helpers", "-- Pass 1"),
         ("+ pass 1 (HMGET each hash)", "-- Pass 2"), ("+ pass 2 (trace, rows)", "-- Pass 3"),
         ("+ pass 3 (HSET, ZADD)", "if batch_end ~= ''"), ("whole script", None)]

OPS = [("loop step (baseline)", "local t for i=1,N do t = i end"),
       ("table, 17 named fields", "local t for i=1,N do t = {a=i,b=2,c=3,d=4,e=5,f=6,g=7,h=8,i=9,j=10,"
                                  "k=11,l=12,m=13,n=14,o=15,p=16,q=17} end"),
       ("table, 17 array items", "local t for i=1,N do t = {i,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17} end"),
       ("string .. string", "local s='WH-1' local t for i=1,N do t = 'loc:' .. s .. ':' end"),
       ("tostring(integer)", "local t for i=1,N do t = tostring(i) end"),
       ("string.format('%d')", "local t for i=1,N do t = string.format('%d', i) end"),
       ("tonumber(string)", "local t for i=1,N do t = tonumber('12345') end"),
       ("struct.unpack a trace record", "local s = struct.pack('<BI4ddddd', 32, 0, 1, 2, 3, 4, 5) "
                                        "local a for i=1,N do a = struct.unpack('<BI4ddddd', s, 1) end")]


def usec(r, name, per):
    for line in r("INFO", "commandstats").splitlines():
        if line.startswith(f"cmdstat_{name}:"):
            return float(line.split("usec=")[1].split(",")[0]) / per
    raise RuntimeError(f"no {name} in commandstats")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    src = open(os.path.join(ROOT, "src/sinks/redis/apply.lua")).read()
    r = Redis()
    try:
        r("HSET", "skusync:meta", "bootstrap", "done")
        minute, lsn = int(time.time() // 60), [1000]
        print(f"apply.lua, one entry per call (a stock row, one trace record), Redis time per call "
              f"(min / median of {a.reps}):")
        for name, marker in PARTS:
            body = src if marker is None else ("return 1" if marker == "" else src.split(marker)[0] + "\nreturn 1")
            sha, got = r("SCRIPT", "LOAD", body), []
            for _ in range(a.reps):
                r("CONFIG", "RESETSTAT")
                for _ in range(a.calls):
                    args = entry(2, 7, lsn[0], 1, False, minute)
                    lsn[0] += 100
                    # keep, low, quiet, end, writer, floor, scale, history count and age,
                    # indexed ('': a standalone Redis), counters (the header of apply.lua)
                    r("EVALSHA", sha, 4, "skusync:meta", "skusync:{SKU-7}", "skusync:changes", "skusync:alerts",
                      "60", "5", "0", str(lsn[0]), "", "", "0", "1000", "86400000", "", "2", "purchases", "views",
                      *args)
                got.append(usec(r, "evalsha", a.calls))
            print(f"  {name:32s} {min(got):6.1f} / {statistics.median(got):6.1f} us")
        n = 100000
        print(f"Lua operations inside one EVAL, Redis time per operation ({n} each):")
        for name, body in OPS:
            r("CONFIG", "RESETSTAT")
            r("EVAL", body.replace("N", str(n)) + " return 1", 0)
            print(f"  {name:32s} {usec(r, 'eval', n) * 1000:7.0f} ns")
    finally:
        r.stop()


if __name__ == "__main__":
    main()
