#!/usr/bin/env bash
# `make demo`: installs what the demo needs, builds skusync in release mode, and runs the
# whole stack with a load generator (see stack.sh). Ctrl-C stops everything.
#
#   DEMO_DURATION=N   stop by itself after N seconds
#   SKUSYNC_BIN=path  use this skusync binary instead of building target/release/skusync
#   DEMO_RATE=tx/s    load generator rate (default 40)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

./.ci/install-deps
command -v pgbench >/dev/null || { echo "demo: pgbench missing (package postgresql-contrib or postgresql-client)" >&2; exit 1; }
command -v npm >/dev/null || { echo "demo: npm missing: apt-get install -y nodejs npm" >&2; exit 1; }
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
if [[ -z "${SKUSYNC_BIN:-}" ]]; then
    ${CARGO:-cargo} build --release
    export SKUSYNC_BIN="$root/target/release/skusync"
fi
exec "$here/stack.sh" --load
