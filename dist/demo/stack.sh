#!/usr/bin/env bash
# Starts the whole skusync demo stack under a fresh temp directory, all on free loopback
# ports: a throwaway PostgreSQL (wal_level=logical) with the demo catalogue, Redis,
# Mosquitto (TCP + WebSocket), skusync itself, the static live page, and (with --load) a
# pgbench load generator playing shoppers and the warehouse.
#
# Used by `make demo` (through demo.sh) and by the browser test. Needs a built skusync
# (SKUSYNC_BIN), the page's npm dependency (dist/demo/node_modules, `npm ci`) and the
# client library's committed build (clients/js/dist).
#
#   stack.sh [--load] [--duration N] [--quiet]
#
# Environment: SKUSYNC_BIN (default target/release/skusync), DEMO_DURATION (= --duration),
# DEMO_RATE (pgbench transactions/s, default 40), DEMO_SKUS (catalogue size, default 3000),
# SKUSYNC_PG_BIN (PostgreSQL bin dir).
#
# Prints machine-readable `DEMO_<NAME>=<value>` lines (DEMO_CONFIG is skusync's config,
# DEMO_USER_KEY_FILE the file holding its SKUSYNC_USER_KEY) and then `DEMO_READY` once the
# page is served and skusync has published its snapshot. Ctrl-C / SIGTERM / exit stops
# everything and removes the temp directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

load=0
quiet=0
duration="${DEMO_DURATION:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --load) load=1 ;;
        --no-load) load=0 ;;
        --quiet) quiet=1 ;;
        --duration) duration="$2"; shift ;;
        *) echo "stack.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

bin="${SKUSYNC_BIN:-$root/target/release/skusync}"
[[ "$bin" = /* ]] || bin="$root/$bin"
[[ -x "$bin" ]] || { echo "stack.sh: no skusync binary at $bin (build it or set SKUSYNC_BIN)" >&2; exit 1; }
mqttjs="$here/node_modules/mqtt/dist/mqtt.min.js"
[[ -f "$mqttjs" ]] || { echo "stack.sh: $mqttjs missing: run (cd dist/demo && npm ci)" >&2; exit 1; }
clientjs="$root/clients/js/dist"
[[ -f "$clientjs/index.js" ]] || { echo "stack.sh: $clientjs/index.js missing: run (cd clients/js && npm ci && npm run build)" >&2; exit 1; }
rate="${DEMO_RATE:-40}"
skus="${DEMO_SKUS:-3000}"
prefix=shop

pgbin="${SKUSYNC_PG_BIN:-}"
if [[ -z "$pgbin" ]]; then
    pgbin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
    [[ -n "$pgbin" ]] || pgbin="$(dirname "$(command -v initdb)")"
fi
mosquitto="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

say() { [[ $quiet -eq 1 ]] || echo "$@"; }

# ---- teardown ---------------------------------------------------------------------
tmp=""
pids=()
pg_started=0
cleaned=0
cleanup() {
    [[ $cleaned -eq 1 ]] && return
    cleaned=1
    trap '' INT TERM
    say "stopping..." >&2
    # skusync first (SIGTERM: it confirms what it applied and exits), then the rest
    local p
    for p in "${pids[@]:-}"; do
        [[ -n "$p" ]] || continue
        pkill -TERM -P "$p" 2>/dev/null || true # the load generator's pgbench
        kill -TERM "$p" 2>/dev/null || true
    done
    if [[ $pg_started -eq 1 ]]; then
        as_pg "$pgbin/pg_ctl" -D "$tmp/pg/data" stop -m immediate -w -t 10 >/dev/null 2>&1 || true
    fi
    for _ in $(seq 1 50); do
        local alive=0
        for p in "${pids[@]:-}"; do
            [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null && alive=1
        done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for p in "${pids[@]:-}"; do
        [[ -n "$p" ]] && kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    [[ -n "$tmp" && -d "$tmp" ]] && rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
    echo "stack.sh: $1" >&2
    if [[ -n "${2:-}" && -f "$2" ]]; then
        echo "--- $2 (tail) ---" >&2
        tail -n 30 "$2" >&2
    fi
    exit 1
}

# ---- helpers ----------------------------------------------------------------------
# N distinct free loopback ports (all bound at once, then released)
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port pid what log
    local i
    for i in $(seq 1 150); do
        port_open "$1" && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# PostgreSQL refuses to run as root: server commands run as `postgres` when root
if [[ "$(id -u)" -eq 0 ]]; then
    pguser=postgres
    id "$pguser" >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run the server as"
    as_pg() { setpriv --reuid="$pguser" --regid="$pguser" --init-groups -- env HOME=/tmp "$@"; }
else
    as_pg() { "$@"; }
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/skusync-demo.XXXXXX")"
chmod 755 "$tmp"
mkdir -p "$tmp/pg" "$tmp/www"
[[ "$(id -u)" -eq 0 ]] && chown "$pguser:" "$tmp/pg"

# ---- PostgreSQL ---------------------------------------------------------------------
as_pg "$pgbin/initdb" -D "$tmp/pg/data" -U postgres --auth=trust -E UTF8 --locale=C -N \
    >"$tmp/initdb.log" 2>&1 || die "initdb failed" "$tmp/initdb.log"
pg_port=""
for attempt in 1 2 3; do
    pg_port="$(free_ports 1)"
    cat >"$tmp/pg/data/demo.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$tmp/pg'
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
fsync = off
full_page_writes = off
logging_collector = off
log_min_messages = warning
EOF
    grep -q "include 'demo.conf'" "$tmp/pg/data/postgresql.conf" ||
        echo "include 'demo.conf'" >>"$tmp/pg/data/postgresql.conf"
    [[ "$(id -u)" -eq 0 ]] && chown "$pguser:" "$tmp/pg/data/demo.conf"
    pg_started=1
    if as_pg "$pgbin/pg_ctl" -D "$tmp/pg/data" -l "$tmp/pg/postgres.log" -w -t 30 start >/dev/null 2>&1; then
        break
    fi
    pg_started=0
    [[ $attempt -eq 3 ]] && die "postgres failed to start" "$tmp/pg/postgres.log"
done
export PGHOST=127.0.0.1 PGPORT="$pg_port" PGUSER=postgres PGDATABASE=postgres
psql_q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
psql_q -f "$here/../../sql/demo_schema.sql" >/dev/null
psql_q -v skus="$skus" -f "$here/seed.sql" >/dev/null
psql_q -f "$here/publications.sql" >/dev/null

# ---- Redis -------------------------------------------------------------------------
for attempt in 1 2 3; do
    redis_port="$(free_ports 1)"
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$tmp" --logfile "$tmp/redis.log" --daemonize no >/dev/null 2>&1 &
    redis_pid=$!
    if wait_port "$redis_port" "$redis_pid"; then pids+=("$redis_pid"); break; fi
    kill "$redis_pid" 2>/dev/null || true
    [[ $attempt -eq 3 ]] && die "redis-server failed to start" "$tmp/redis.log"
done

# ---- Mosquitto (TCP for skusync, WebSocket for the page) ----------------------------
for attempt in 1 2 3; do
    read -r mqtt_port ws_port < <(free_ports 2)
    sed -e "s|@USER@|$(id -un)|; s|@DIR@|$tmp|; s|@PORT@|$mqtt_port|; s|@WS_PORT@|$ws_port|" \
        "$here/mosquitto.conf.in" >"$tmp/mosquitto.conf"
    "$mosquitto" -c "$tmp/mosquitto.conf" >>"$tmp/mosquitto.out" 2>&1 &
    mqtt_pid=$!
    if wait_port "$mqtt_port" "$mqtt_pid" && wait_port "$ws_port" "$mqtt_pid"; then
        pids+=("$mqtt_pid")
        break
    fi
    kill "$mqtt_pid" 2>/dev/null || true
    [[ $attempt -eq 3 ]] && die "mosquitto failed to start" "$tmp/mosquitto.log"
done

# ---- skusync -----------------------------------------------------------------------
read -r metrics_port api_port < <(free_ports 2)
cat >"$tmp/skusync.toml" <<EOF
[http]
listen = "127.0.0.1:$metrics_port"

# the clients' catch-up API (docs/mobile.md); the page is served from another port
[api]
listen = "127.0.0.1:$api_port"
cors_origin = "*"

[postgres]
url = "postgresql://postgres@127.0.0.1:$pg_port/postgres?sslmode=disable"
slot = "skusync_demo"
publication = ["skusync", "skusync_activity"]
status_interval_ms = 500

[redis]
url = "redis://127.0.0.1:$redis_port/0"
prefix = "skusync"

[mqtt]
url = "mqtt://127.0.0.1:$mqtt_port"
client_id = "skusync-demo"
topic_prefix = "$prefix"
min_interval_ms = 200

[alerts]
low_stock = 10

[[inventory]]
table = "public.inventory"
sku = "sku"
location = "location"
on_hand = "on_hand"
reserved = "reserved"
low_stock = "low_stock"

[[activity]]
table = "public.activity_log"
sku = "sku"
kind = "kind"
quantity = "qty"
user = "user_id"
time = "at"
windows = ["5m", "1h"]
[activity.counters]
view = "views"
add_to_cart = "carts"
purchase = "purchases"
EOF
# the HMAC key for user ids comes from the environment, never the config file; kept in a
# file only this user can read, so `skusync status/tail/check` from another shell can use
# the same key (printed below as an export line that reads it)
(umask 077 && echo "demo-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" >"$tmp/user-key")
SKUSYNC_USER_KEY="$(cat "$tmp/user-key")" \
    "$bin" run --config "$tmp/skusync.toml" >"$tmp/skusync.log" 2>&1 &
skusync_pid=$!
pids=("$skusync_pid" "${pids[@]}")

# ready = snapshot loaded into Redis and published (retained status online)
ready=0
deadline=$((SECONDS + 90))
while (( SECONDS < deadline )); do
    kill -0 "$skusync_pid" 2>/dev/null || die "skusync exited" "$tmp/skusync.log"
    if [[ "$(redis-cli -p "$redis_port" HGET skusync:meta bootstrap 2>/dev/null)" == done ]] &&
        [[ "$(mosquitto_sub -h 127.0.0.1 -p "$mqtt_port" -t "$prefix/status" -C 1 -W 1 2>/dev/null)" == online ]]; then
        ready=1
        break
    fi
    sleep 0.2
done
[[ $ready -eq 1 ]] || die "skusync did not become ready" "$tmp/skusync.log"
wait_port "$api_port" "$skusync_pid" || die "skusync's [api] is not listening on $api_port" "$tmp/skusync.log"
api_url="http://127.0.0.1:$api_port"

# ---- the live page ------------------------------------------------------------------
cp "$here"/page/* "$tmp/www/"
cp "$mqttjs" "$tmp/www/mqtt.min.js"
mkdir -p "$tmp/www/skusync-client"
cp "$clientjs"/*.js "$tmp/www/skusync-client/" # ES modules, loaded by app.js
cat >"$tmp/www/config.js" <<EOF
// generated by dist/demo/stack.sh
window.SKUSYNC_DEMO = { url: "ws://127.0.0.1:$ws_port", api: "$api_url", prefix: "$prefix" };
EOF
psql -X -At -c "SELECT json_object_agg(sku, name) FROM products" >"$tmp/www/products.json"
for attempt in 1 2 3; do
    http_port="$(free_ports 1)"
    (cd "$tmp/www" && exec python3 -m http.server "$http_port" --bind 127.0.0.1) >"$tmp/http.log" 2>&1 &
    http_pid=$!
    if wait_port "$http_port" "$http_pid"; then pids+=("$http_pid"); break; fi
    kill "$http_pid" 2>/dev/null || true
    [[ $attempt -eq 3 ]] && die "page server failed to start" "$tmp/http.log"
done

# ---- load generator -----------------------------------------------------------------
if [[ $load -eq 1 ]]; then
    (
        cd "$here/load"
        while :; do
            # weights: views 55, add-to-cart 15, purchases 20, reserve/release 8,
            # restock 1, rolled-back checkout 1 (of 100)
            pgbench -n -c 4 -j 2 -R "$rate" -T 3600 -D skus="$skus" \
                -f view.sql@55 -f cart.sql@15 -f purchase.sql@20 -f reserve.sql@8 \
                -f restock.sql@1 -f rollback.sql@1 || sleep 1
        done
    ) >"$tmp/pgbench.log" 2>&1 &
    pids+=("$!")
fi

page_url="http://127.0.0.1:$http_port/"
cat <<EOF
DEMO_DIR=$tmp
DEMO_PG_PORT=$pg_port
DEMO_REDIS_PORT=$redis_port
DEMO_MQTT_PORT=$mqtt_port
DEMO_WS_PORT=$ws_port
DEMO_HTTP_PORT=$http_port
DEMO_METRICS_URL=http://127.0.0.1:$metrics_port/metrics
DEMO_API_URL=$api_url
DEMO_PAGE_URL=$page_url
DEMO_PREFIX=$prefix
DEMO_CONFIG=$tmp/skusync.toml
DEMO_USER_KEY_FILE=$tmp/user-key
DEMO_READY
EOF

if [[ $quiet -eq 0 ]]; then
    cat <<EOF

  skusync demo is running  ($skus SKUs in WH-BER WH-PAR WH-MAD WH-WAW$([[ $load -eq 1 ]] && echo ", load: $rate tx/s"))

  Live page (MQTT over WebSocket, like a mobile app):
      $page_url
  Watch the MQTT topics:
      mosquitto_sub -h 127.0.0.1 -p $mqtt_port -t '$prefix/#' -v
  Change stock yourself:
      psql -h 127.0.0.1 -p $pg_port -U postgres -c "UPDATE inventory SET on_hand = 0 WHERE sku = 'SKU-00007'"
  Metrics (Prometheus):
      http://127.0.0.1:$metrics_port/metrics
  Catch-up API (what the page fetches after every reconnect):
      curl '$api_url/v1/sku/SKU-00007'    curl '$api_url/v1/changes?limit=5'
  Redis state of one SKU:
      redis-cli -p $redis_port HGETALL 'skusync:{SKU-00007}'
  skusync's own commands on the demo (config $tmp/skusync.toml), from another shell:
      export SKUSYNC_CONFIG=$tmp/skusync.toml SKUSYNC_USER_KEY="\$(cat $tmp/user-key)"
      $bin status    # or: tail, check, verify
  Logs: $tmp/skusync.log $([[ $load -eq 1 ]] && echo "$tmp/pgbench.log")

  Ctrl-C stops everything.
EOF
fi

# ---- run until Ctrl-C, --duration, or skusync dying -------------------------------------
start=$SECONDS
while :; do
    kill -0 "$skusync_pid" 2>/dev/null || die "skusync exited" "$tmp/skusync.log"
    if [[ -n "$duration" ]] && (( SECONDS - start >= duration )); then
        say "demo: $duration s elapsed" >&2
        exit 0
    fi
    sleep 1 &
    wait $! || true
done
