# skusync build entry points. `make test` is the single test entry point.

CARGO ?= cargo

.PHONY: all deps test build release fmt fmt-check clippy clean

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
