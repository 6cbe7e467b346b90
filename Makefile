# skusync build entry points. `make test` is the single test entry point.

CARGO ?= cargo

.PHONY: all deps test test-browser demo build release fmt fmt-check clippy clean bench bench-smoke

all: build

deps:
	./.ci/install-deps

test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --all-targets
	$(MAKE) test-browser
	$(MAKE) bench-smoke

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

clean:
	$(CARGO) clean

# Benchmarks (not tests): catch-up vs pg_recvlogical, the 1M-row transaction, latency at
# 1k and 5k tx/s. Prints a table and writes target/bench/results.json.
bench: deps release
	$(CARGO) bench --bench decode
	python3 bench/bench.py

# A few-second version that proves the benchmark still runs (CI; debug build, no timing
# asserted).
bench-smoke: build
	python3 bench/bench.py --quick --only catchup --skusync $(CURDIR)/target/debug/skusync
