# skusync build entry points. `make test` is the single test entry point.

CARGO ?= cargo

.PHONY: all deps test test-js test-browser demo build release fmt fmt-check clippy deny clean bench bench-smoke

all: build

deps:
	./.ci/install-deps

test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	./.ci/deny
	$(CARGO) test --all-targets
	$(MAKE) test-js
	$(MAKE) test-browser
	$(MAKE) bench-smoke

# The TypeScript client library (clients/js): tsc build, unit tests (node --test, no broker
# or server needed; one test uses mosquitto when installed) and a check that the committed
# dist/ is what tsc makes of src/.
test-js:
	@command -v npm >/dev/null || { echo "test-js: node/npm missing (as root: apt-get install -y nodejs npm)" >&2; exit 1; }
	cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm test

# The live demo page in headless Chromium against a throwaway stack (debug build).
test-browser: deps build
	SKUSYNC_BIN=$(CURDIR)/target/debug/skusync ./tests/browser/run.sh

# The first five minutes: PostgreSQL + Redis + Mosquitto + skusync + load + live page.
# DEMO_DURATION=N stops after N seconds; SKUSYNC_BIN=path skips the release build.
demo:
	./dist/demo/demo.sh

build:
	$(CARGO) build

release:
	$(CARGO) build --release

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

# Dependency policy (deny.toml): licenses, bans, sources; advisories when a RustSec
# database is on the machine (see .ci/deny).
deny:
	./.ci/deny

clean:
	$(CARGO) clean

# Benchmarks (not tests): catch-up vs pg_recvlogical, the 1M-row transaction, a single
# Redis against a 3-primary cluster on the same backlog, latency at
# 1k and 5k tx/s. Prints a table and writes target/bench/results.json.
bench: deps release
	$(CARGO) bench --bench decode
	$(CARGO) bench --bench payload_sizes
	python3 bench/bench.py

# A few-second version that proves the benchmark still runs (CI; debug build, no timing
# asserted).
bench-smoke: build
	python3 bench/bench.py --quick --only catchup,cluster --skusync $(CURDIR)/target/debug/skusync

# Full fault matrix (more runs per cell, longer workloads); prints and writes
# target/chaos/results.md. Under 30 minutes on 2 cores.
.PHONY: chaos
chaos:
	rm -rf target/chaos/rows
	SKUSYNC_CHAOS_FULL=1 timeout 1800 $(CARGO) test --test it -- --test-threads=2 chaos:: ; rc=$$?; \
	mkdir -p target/chaos; \
	{ echo "| fault | runs | SKUs checked | mismatches | max recovery | LSN safety samples |"; \
	  echo "|---|---|---|---|---|---|"; cat target/chaos/rows/*.md; } > target/chaos/results.md; \
	cat target/chaos/results.md; exit $$rc

# The integration suite (replication, fold_oracle, mqtt_e2e) against PostgreSQL 14, 16,
# 17 and 18 from npm (.ci/pg-versions). CI runs only the default version.
PG_MAJORS ?= 14 16 17 18
.PHONY: test-pg-matrix
test-pg-matrix:
	./.ci/pg-versions $(PG_MAJORS)
	$(CARGO) test --test it --no-run
	@mkdir -p target/pg; : > target/pg/matrix.md; fail=0; \
	for v in $(PG_MAJORS); do \
	  echo "=== PostgreSQL $$v ==="; \
	  if SKUSYNC_PG_BIN=$(CURDIR)/target/pg/$$v/native/bin $(CARGO) test --test it -- --test-threads=2 \
	       replication:: fold_oracle:: mqtt_e2e:: > target/pg/test-$$v.log 2>&1; \
	  then echo "| $$v | passed | $$(grep -h 'test result' target/pg/test-$$v.log | tail -1) |" >> target/pg/matrix.md; \
	  else fail=1; echo "| $$v | FAILED | $$(grep -h '^test .* FAILED' target/pg/test-$$v.log | tr '\n' ' ') |" >> target/pg/matrix.md; fi; \
	done; cat target/pg/matrix.md; exit $$fail
