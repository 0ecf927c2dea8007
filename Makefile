# The two commands: `make run` and `make test`. Everything else supports them.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_PROJECT_ENVIRONMENT := $(VENV)
# rustup installs cargo here; maturin (the relay's build backend) looks for it on PATH.
export PATH := $(HOME)/.cargo/bin:$(PATH)
# The wire port's compiled relay (Rust: cargo and rustc needed; crates from crates.io).
NATIVE := $(wildcard native/wire/Cargo.toml native/wire/Cargo.lock native/wire/pyproject.toml native/wire/src/*.rs)

.PHONY: run test install lint typecheck proto services services-stop bench clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# The lock file is the single source of versions; --frozen refuses to drift from it.
$(BIN)/database-service: $(UV) pyproject.toml uv.lock client/pyproject.toml $(NATIVE)
	$(UV) sync --frozen --no-dev --quiet
	@touch $@

$(VENV)/.dev-installed: $(UV) pyproject.toml uv.lock client/pyproject.toml $(NATIVE)
	$(UV) sync --frozen --quiet
	@touch $@ $(BIN)/database-service

install: $(BIN)/database-service

# Analytics on embedded ClickHouse (chDB) is on for `make run` (it costs ~350 MB in a process of
# its own); `serve` alone leaves it off unless DBSVC_CLICKHOUSE_ENABLED or _URL says otherwise.
run: $(BIN)/database-service
	DBSVC_CLICKHOUSE_ENABLED=$${DBSVC_CLICKHOUSE_ENABLED:-true} $(BIN)/database-service serve

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src client/src tests bench scripts examples
	$(BIN)/ruff format --check src client/src tests bench scripts examples

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy

# Starts the back ends the suite talks to (embedded PostgreSQL 18 is started by the fixtures
# themselves; Debian's PostgreSQL 15 by scripts/), runs the suite against both, stops them.
test: $(VENV)/.dev-installed
	@bash scripts/test.sh

# Regenerates the protocol modules in client/ from proto/ (a test fails when they are stale).
proto: $(VENV)/.dev-installed
	$(BIN)/python scripts/proto.py

# Baseline vs. our path in one run, medians and ratios (see bench/*.py).
bench: $(VENV)/.dev-installed
	$(BIN)/python bench/query_core.py
	$(BIN)/python bench/grpc_query.py
	$(BIN)/python bench/candles.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/kafka_clients.py

# The back ends the tests use besides the embedded ones (Debian's PostgreSQL 15, Kafka), for
# running pytest by hand: DBSVC_TEST_POSTGRES_URL="$$(bash scripts/pg15.sh url)" \
#   DBSVC_TEST_KAFKA_BOOTSTRAP="$$(bash scripts/kafka.sh url)" .venv/bin/pytest
services:
	@bash scripts/pg15.sh start
	@bash scripts/kafka.sh start

services-stop:
	@bash scripts/pg15.sh stop
	@bash scripts/kafka.sh stop

clean:
	rm -rf $(VENV) $(TOOLS) .test-backends
