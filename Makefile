# skusync build entry points. `make test` is the single test entry point.

CARGO ?= cargo

.PHONY: all deps test build release fmt fmt-check clippy clean bench bench-smoke

all: build

deps:
	./.ci/install-deps

test: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --all-targets

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

# A few-second version that proves the benchmark still runs (CI).
bench-smoke: deps release
	python3 bench/bench.py --quick
