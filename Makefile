# The two commands: `make run` and `make test`. Everything else supports them.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: run test install lint typecheck pytest services services-stop bench clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# The lock file is the single source of versions; --frozen refuses to drift from it.
$(BIN)/database-service: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --no-dev --quiet
	@touch $@

$(VENV)/.dev-installed: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --quiet
	@touch $@ $(BIN)/database-service

install: $(BIN)/database-service

run: $(BIN)/database-service
	$(BIN)/database-service serve

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy

# Starts the back ends the suite talks to (embedded PostgreSQL 18 is started by the fixtures
# themselves; Debian's PostgreSQL 15 by scripts/), runs the suite against both, stops them.
test: $(VENV)/.dev-installed
	@bash scripts/test.sh

services: $(VENV)/.dev-installed
	@bash scripts/backends.sh start

services-stop:
	@bash scripts/backends.sh stop

clean:
	rm -rf $(VENV) $(TOOLS) .test-backends
