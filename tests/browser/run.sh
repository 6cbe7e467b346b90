#!/usr/bin/env bash
# `make test-browser`: the live page's browser test (page.test.mjs) with the system
# Chromium. Skips (exit 0) only when Chromium or Node cannot be installed: not root and
# missing. As root they are installed by .ci/install-deps, and their absence is an error.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
chrome="${CHROMIUM:-/usr/bin/chromium}"

if [[ ! -x "$chrome" ]] || ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "SKIP browser test: chromium ($chrome) or node/npm missing and not root to install them"
        echo "     (as root: apt-get install -y chromium nodejs npm)"
        exit 0
    fi
    echo "test-browser: chromium ($chrome) or node/npm missing although root: run .ci/install-deps" >&2
    exit 1
fi

(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
(cd "$root/dist/demo" && npm ci --no-audit --no-fund --loglevel=error)
export SKUSYNC_BIN="${SKUSYNC_BIN:-$root/target/debug/skusync}"
export CHROMIUM="$chrome"
cd "$here"
exec node --test page.test.mjs
