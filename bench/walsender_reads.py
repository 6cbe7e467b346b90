#!/usr/bin/env python3
"""What a replication client's read pattern costs the walsender (a diagnostic, not part of
`make bench`). One backlog, one pgoutput slot per run, each drained by a minimal raw
replication client reading in a different way; prints the walsender's CPU seconds and the
TCP segments the machine sent meanwhile (`TcpExt.TCPOrigDataSent`; run it on a quiet
machine).

  eager-tcp    recv as soon as anything arrives (what pg_recvlogical does)
  eager-unix   the same over the Unix socket
  paced        recv once a millisecond, asking what skusync's pacer asks (src/pg/pace.rs)
  paced-stall  the same, with a 30 ms pause every 300 ms (a slow pipeline step)

Usage: bench/walsender_reads.py [--txns N] [--reps N]
"""
import argparse, os, socket, struct, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Stack, SCHEMA, backlog, proc_stats  # noqa: E402

# src/pg/pace.rs
START, MIN, MAX, GROW_AFTER = 32 * 1024, 16 * 1024, 1024 * 1024, 32
RCVBUF = 256 * 1024


def startup(sock):
    params = b"user\0postgres\0database\0postgres\0replication\0database\0\0"
    body = struct.pack("!I", 196608) + params
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    buf = b""
    while b"Z\0\0\0\x05" not in buf:  # ReadyForQuery
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("server closed the connection during startup")
        buf += chunk


def segments_sent():
    lines = open("/proc/net/netstat").read().splitlines()
    for i in range(0, len(lines), 2):
        keys, vals = lines[i].split()[1:], lines[i + 1].split()[1:]
        if "TCPOrigDataSent" in keys:
            return int(vals[keys.index("TCPOrigDataSent")])
    return 0


def drain(st, slot, total, mode):
    if mode == "eager-unix":
        s = socket.socket(socket.AF_UNIX)
        s.connect(os.path.join(st.dir, f".s.PGSQL.{st.pg_port}"))
    else:
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode.startswith("paced"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # before the handshake
        s.connect(("127.0.0.1", st.pg_port))
    startup(s)
    s.settimeout(5)  # a miscounted end must not hang the run
    seg0 = segments_sent()
    t0 = time.time()
    q = (f"START_REPLICATION SLOT {slot} LOGICAL 0/0 "
         "(proto_version '1', publication_names 'skusync,skusync_activity')").encode() + b"\0"
    s.sendall(b"Q" + struct.pack("!I", len(q) + 4) + q)
    pid = None
    while pid is None:
        out = st.psql(f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'")
        pid = int(out) if out.strip() else None
    ask, full, got, last_stall, cpu = START, 0, 0, time.time(), 0.0
    while got < total:
        if mode.startswith("paced"):
            time.sleep(0.001)
            if mode == "paced-stall" and time.time() - last_stall > 0.3:
                time.sleep(0.03)
                last_stall = time.time()
            try:
                b = s.recv(ask)
            except socket.timeout:
                break
            if len(b) >= ask:
                full += 1
                if full >= GROW_AFTER:
                    ask, full = min(ask + ask // 4, MAX), 0
            else:
                ask, full = max(ask - ask // 4, MIN), 0
        else:
            try:
                b = s.recv(4 << 20)
            except socket.timeout:
                break
        if not b:
            break
        got += len(b)
        try:
            cpu = proc_stats(pid)[0]
        except OSError:
            pass
    took = time.time() - t0
    segs = segments_sent() - seg0
    s.close()
    return took, cpu, segs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--txns", type=int, default=200000)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    modes = ["eager-tcp", "eager-unix", "paced", "paced-stall"]
    st = Stack()
    st.start()
    try:
        st.psql(SCHEMA.format(skus=10000))
        slots = [(m, f"{m.replace('-', '_')}_{i}") for i in range(a.reps) for m in modes]
        st.psql("ALTER SYSTEM SET max_replication_slots = %d" % (len(slots) + 2))
        st.psql("ALTER SYSTEM SET max_wal_senders = %d" % (len(slots) + 2))
        subprocess.run([f"{st.bin}/pg_ctl", "-D", os.path.join(st.dir, "data"), "-w", "restart", "-l",
                        os.path.join(st.dir, "pg.log")], check=True, stdout=subprocess.DEVNULL, preexec_fn=st.as_pg())
        for _, slot in slots:
            st.psql(f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
        backlog(st, 10000, a.txns)
        # The stream's size, read from the slots' own view of it.
        end = st.psql("SELECT pg_current_wal_lsn()")
        # Each message also carries a CopyData header (5 bytes) and an XLogData header (25).
        row = st.psql(f"SELECT sum(length(data)), count(*) FROM pg_logical_slot_peek_binary_changes('{slots[0][1]}', "
                      f"'{end}', NULL, 'proto_version', '1', 'publication_names', 'skusync,skusync_activity')")
        size, n = map(int, row.split("|"))
        total = size + 30 * n - 64
        print(f"{a.txns} transactions, {size} bytes of pgoutput; congestion control "
              f"{open('/proc/sys/net/ipv4/tcp_congestion_control').read().strip()}")
        for mode, slot in slots:
            took, cpu, segs = drain(st, slot, total, mode)
            print(f"{mode:12} {took:6.2f} s  walsender CPU {cpu:5.2f} s  TCP segments {segs:8}", flush=True)
    finally:
        st.stop()


if __name__ == "__main__":
    main()
