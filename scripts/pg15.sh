#!/usr/bin/env bash
# Start/stop a throw-away Debian PostgreSQL 15 cluster for the test suite (no Docker).
# Usage: scripts/pg15.sh install|start|stop|url   (state under .test-backends/pg15)
# Auth mirrors the embedded server: the postgres superuser is trusted on the private socket only;
# every other role (the tenants) must log in with its SCRAM password.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD/.test-backends/pg15"
DATA="$ROOT/data"
SOCK="$ROOT/sock"
PORT="${PG15_PORT:-54315}"
BIN=/usr/lib/postgresql/15/bin
# pg_stat_statements (postgresql-15's contrib) is loaded at start, so the statement statistics
# tests can show its figures beside the service's (they CREATE EXTENSION in their database).
PRELOAD="-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=top"

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_installed() {
  if [ ! -x "$BIN/initdb" ]; then
    echo "pg15: installing Debian's postgresql-15" >&2
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
    else
      echo "pg15: $BIN/initdb missing and not root: install postgresql-15" >&2; exit 1
    fi
  fi
  # hypopg: the index advice confirms its suggestions with hypothetical indexes (statements/).
  if [ ! -f /usr/share/postgresql/15/extension/hypopg.control ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "pg15: installing Debian's postgresql-15-hypopg" >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15-hypopg >/dev/null
    else
      echo "pg15: hypopg missing and not root: install postgresql-15-hypopg" >&2; exit 1
    fi
  fi
}

start() {
  ensure_installed
  mkdir -p "$ROOT"
  if [ "$(id -u)" = 0 ]; then chown postgres "$ROOT"; fi
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_postgres "$BIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      --encoding=UTF8 >/dev/null
  fi
  # Written at every start (a cluster made by an older version of this script gets new lines);
  # replication for the owner: the cluster backup tests run pg_basebackup and pg_receivewal.
  cat > "$ROOT/pg_hba.conf" <<'HBA'
local   all           postgres                  trust
local   replication   postgres                  trust
local   all           all                       scram-sha-256
host    all           all       127.0.0.1/32    scram-sha-256
HBA
  chown postgres "$ROOT/pg_hba.conf" 2>/dev/null || true
  as_postgres cp "$ROOT/pg_hba.conf" "$DATA/pg_hba.conf"
  as_postgres mkdir -p "$SOCK"
  if as_postgres "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    as_postgres "$BIN/pg_ctl" -D "$DATA" reload >/dev/null
  else
    as_postgres "$BIN/pg_ctl" -D "$DATA" -w -l "$ROOT/server.log" \
      -o "-p $PORT -k $SOCK -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off $PRELOAD" start >/dev/null
  fi
  echo "pg15: running on port $PORT (socket $SOCK)" >&2
}

stop() {
  if [ -f "$DATA/PG_VERSION" ]; then
    as_postgres "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

case "${1:-}" in
  install) ensure_installed ;;
  start) start ;;
  stop) stop ;;
  url) echo "postgresql://postgres@/postgres?host=$SOCK&port=$PORT" ;;
  *) echo "usage: $0 install|start|stop|url" >&2; exit 2 ;;
esac
