# kiln — the two commands a fresh machine needs: `make demo` and `make test`.
# Only the Rust toolchain is assumed; everything else is installed or started here.

SHELL := /bin/bash
CARGO ?= cargo
export KILN_TEST_PG_URL ?= postgres://postgres:postgres@127.0.0.1:5432/postgres

.PHONY: demo test services build lint bench fuzz chaos soak clean-test-dbs

## Run the embedded default end to end (SQLite + a local directory, no servers).
demo:
	$(CARGO) run -q -p kiln -- demo

## Start or install what the tests need, then run every test.
test: services build
	@if command -v cargo-nextest >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		echo "cargo-nextest not found: running cargo test"; \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

## PostgreSQL on 127.0.0.1:5432 (started, or installed with apt-get), the s3s-fs test server
## (installed with cargo when missing), Chromium and chromedriver for the browser test
## (apt-get), schemathesis for the OpenAPI test (PyPI, in a virtualenv), and stale test
## databases gone.
services:
	@scripts/ensure-postgres.sh
	@scripts/ensure-s3s.sh
	@scripts/ensure-chromium.sh
	@scripts/ensure-schemathesis.sh >/dev/null
	@$(MAKE) -s clean-test-dbs

## The binaries the end-to-end tests run (cargo test alone builds only test harnesses), built
## with the tests so that both share one feature resolution: built alone, the binaries would
## resolve dependencies' features without the dev-dependencies' (hyper's server half, serde's
## defaults ...), and the tests would then build most of the tree a second time.
build:
	$(CARGO) build --workspace --bins --tests

clean-test-dbs:
	@for db in $$(psql "$$KILN_TEST_PG_URL" -qAtc "SELECT datname FROM pg_database WHERE datname LIKE 'kiln\_test\_%' OR datname LIKE 'kiln\_e2e\_%'"); do \
		psql "$$KILN_TEST_PG_URL" -qc "DROP DATABASE IF EXISTS $$db WITH (FORCE)" >/dev/null; \
	done

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Benchmarks (release build; not part of the tests). Results go in docs/BENCHMARKS.md.
bench: services
	scripts/bench.sh

## Fuzz upload decoding and spec parsing (cargo-fuzz, installed when missing); FUZZ_SECONDS per
## target, default 60. Not part of `make test`.
fuzz:
	scripts/fuzz.sh

## Chaos: 3 workers, ~1,000 kits from 20 accounts, SIGKILLs, a PostgreSQL restart, an S3 outage
## and injected generator failures; bounded and self-stopping, loopback only (tests/tests/chaos.rs).
## CHAOS_SEED replays a run; CHAOS_KITS and CHAOS_FAULTS size it.
chaos: services build
	$(CARGO) nextest run --workspace --test chaos --run-ignored only --no-capture --profile chaos

## Soak: 20 minutes of steady Essentials orders (SOAK_RATE per second, 0.4) into two workers;
## latency, worker memory and dead tuples sampled each minute must stay flat (tests/tests/soak.rs).
soak: services build
	$(CARGO) nextest run --workspace --test soak --run-ignored only --no-capture --profile chaos
