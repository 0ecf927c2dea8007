#!/usr/bin/env bash
# Start/stop a throw-away redis-server for the test suite (no Docker): the cache's L2, key-value
# operations and cluster-wide invalidation run against it (DBSVC_TEST_REDIS_URL).
# Usage: scripts/redis.sh install|start|stop|url   (state under .data/redis-test)
# No persistence (--save '' --appendonly no): a run starts empty. Listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD/.data/redis-test"
PIDFILE="$ROOT/redis.pid"
PORTFILE="$ROOT/port"

ensure_installed() {
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis: installing Debian's redis-server" >&2
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
      echo "redis: redis-server missing and not root: install redis-server" >&2; exit 1
    fi
  fi
}

running() {
  [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

free_port() {
  "$PWD/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  ensure_installed
  mkdir -p "$ROOT"
  if running; then
    echo "redis: already running on port $(cat "$PORTFILE")" >&2
    return
  fi
  local port="${REDIS_TEST_PORT:-$(free_port)}"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$ROOT" --save '' --appendonly no \
    --daemonize yes --pidfile "$PIDFILE" --logfile "$ROOT/server.log" >/dev/null
  echo "$port" > "$PORTFILE"
  for _ in $(seq 1 100); do
    if redis-cli -p "$port" ping >/dev/null 2>&1; then
      echo "redis: running on port $port" >&2
      return
    fi
    sleep 0.05
  done
  echo "redis: did not answer on port $port (see $ROOT/server.log)" >&2
  exit 1
}

stop() {
  if running; then
    local pid
    pid="$(cat "$PIDFILE")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  fi
  rm -f "$PIDFILE" "$PORTFILE"
}

case "${1:-}" in
  install) ensure_installed ;;
  start) start ;;
  stop) stop ;;
  url) echo "redis://127.0.0.1:$(cat "$PORTFILE")/0" ;;
  *) echo "usage: $0 install|start|stop|url" >&2; exit 2 ;;
esac
