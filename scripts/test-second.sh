#!/usr/bin/env bash
# The second of `make test`'s two runs (scripts/test.sh starts it beside the first, with
# DBSVC_TEST_REDIS_URL, DBSVC_TEST_WEAVIATE_URL and DBSVC_TEST_POSTGRES_URL unset): the
# end-to-end tests, then the integration and isolation suites again on Debian's PostgreSQL 15.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

echo "== pytest: end-to-end (database-service serve, embedded PostgreSQL 18)"
"$BIN/pytest" -q -p no:cacheprovider --durations=10 tests/e2e

echo "== pytest: PostgreSQL 15 (Debian) — integration and isolation"
bash scripts/pg15.sh start
# Vector collections need pgvector, which Debian has no package of for PostgreSQL 15: their tests
# (marked pgvector) run on the embedded 18 only; those on Weaviate (marked weaviate) do not depend
# on the PostgreSQL version and run in the first run.
# Suites whose subject is not PostgreSQL — the command line (a process per command), the brokers
# and their TLS, Redis, the ClickHouse host — run in the first run and not again here: they took
# about a fifth of this run and test nothing that depends on PostgreSQL's version.
DBSVC_TEST_POSTGRES_URL="$(bash scripts/pg15.sh url)" "$BIN/pytest" -q -p no:cacheprovider \
  --durations=15 -m "not pgvector and not weaviate" \
  --ignore=tests/integration/test_cli.py \
  --ignore=tests/integration/test_statements_cli.py \
  --ignore=tests/isolation/test_tokens_cli.py \
  --ignore=tests/integration/test_ingest_transports.py \
  --ignore=tests/integration/test_ingest_tls.py \
  --ignore=tests/integration/test_kafka_broker.py \
  --ignore=tests/integration/test_cache_redis.py \
  --ignore=tests/integration/test_clickhouse_host.py \
  tests/integration tests/isolation
