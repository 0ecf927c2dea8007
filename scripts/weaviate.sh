#!/usr/bin/env bash
# Build and locate a Weaviate server for the tests and benchmarks (no Docker, no release tarball):
# `go install` builds weaviate-server from the Go module proxy once (12-25 minutes on 2 cores, a
# ~170 MB binary) into a cache outside the repo, like the Kafka jars. The test fixture
# (tests/fix_weaviate.py) starts a private server per session from `path`; `start`/`stop` run a
# shared one for `make test`/benchmarks (DBSVC_TEST_WEAVIATE_URL, DBSVC_TEST_WEAVIATE_API_KEY).
# Usage: scripts/weaviate.sh install|path|start|stop|url|key|status
# Environment: WEAVIATE_VERSION (1.35.2), WEAVIATE_DIR (binary cache,
# $HOME/.cache/dbsvc-weaviate/$WEAVIATE_VERSION), WEAVIATE_STATE_DIR (.test-backends/weaviate),
# WEAVIATE_START_TIMEOUT (seconds, 90). CI=true: a missing binary that cannot be built fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${WEAVIATE_VERSION:-1.35.2}"
BIN_DIR="${WEAVIATE_DIR:-$HOME/.cache/dbsvc-weaviate/$VERSION}"
BIN="$BIN_DIR/weaviate-server"
ROOT="${WEAVIATE_STATE_DIR:-$PWD/.test-backends/weaviate}"
PIDFILE="$ROOT/weaviate.pid"
PORTFILE="$ROOT/port"
KEYFILE="$ROOT/api-key"
TIMEOUT="${WEAVIATE_START_TIMEOUT:-90}"

say() { echo "weaviate: $*" >&2; }
die() { say "$*"; exit 1; }

install() {
  if [ -x "$BIN" ]; then
    return 0
  fi
  command -v go >/dev/null || die "go not found: needed once to build weaviate-server $VERSION"
  mkdir -p "$BIN_DIR"
  say "building github.com/weaviate/weaviate/cmd/weaviate-server@v$VERSION into $BIN_DIR (12-25 min)"
  local started=$SECONDS
  # GOBIN only: Go's module and build caches stay in their default places (shared, reusable).
  GOBIN="$BIN_DIR" GOFLAGS="${GOFLAGS:-} -trimpath" \
    go install "github.com/weaviate/weaviate/cmd/weaviate-server@v$VERSION"
  [ -x "$BIN" ] || die "go install finished but $BIN is missing"
  say "built in $((SECONDS - started)) s: $BIN"
}

free_port() {
  "$PWD/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

running() {
  [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

start() {
  [ -x "$BIN" ] || install
  mkdir -p "$ROOT/data"
  if running; then
    say "already running on port $(cat "$PORTFILE")"
    return
  fi
  local http grpc gossip data raft raft_rpc key
  http="$(free_port)"; grpc="$(free_port)"; gossip="$(free_port)"; data="$(free_port)"
  raft="$(free_port)"; raft_rpc="$(free_port)"
  key="$("$PWD/.venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')"
  (umask 077; echo "$key" > "$KEYFILE")
  # CLUSTER_ADVERTISE_ADDR: without it the server picks an interface address (IPv6 here) and dies.
  env CLUSTER_HOSTNAME=node1 CLUSTER_ADVERTISE_ADDR=127.0.0.1 \
    CLUSTER_GOSSIP_BIND_PORT="$gossip" CLUSTER_DATA_BIND_PORT="$data" \
    RAFT_PORT="$raft" RAFT_INTERNAL_RPC_PORT="$raft_rpc" RAFT_JOIN="node1:$raft" RAFT_BOOTSTRAP_EXPECT=1 \
    GRPC_PORT="$grpc" PERSISTENCE_DATA_PATH="$ROOT/data" \
    AUTHENTICATION_ANONYMOUS_ACCESS_ENABLED=false AUTHENTICATION_APIKEY_ENABLED=true \
    AUTHENTICATION_APIKEY_ALLOWED_KEYS="$key" AUTHENTICATION_APIKEY_USERS=dbsvc \
    DEFAULT_VECTORIZER_MODULE=none DISABLE_TELEMETRY=true LOG_LEVEL=warning \
    nohup "$BIN" --host 127.0.0.1 --port "$http" --scheme http > "$ROOT/server.log" 2>&1 &
  echo $! > "$PIDFILE"
  echo "$http $grpc" > "$PORTFILE"
  local deadline=$((SECONDS + TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    if curl -fsS "http://127.0.0.1:$http/v1/.well-known/ready" >/dev/null 2>&1; then
      say "running on http port $http, grpc port $grpc"
      return
    fi
    running || die "exited during start (see $ROOT/server.log)"
    sleep 0.5
  done
  stop
  die "not ready after ${TIMEOUT}s (see $ROOT/server.log)"
}

stop() {
  if running; then
    local pid
    pid="$(cat "$PIDFILE")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE" "$PORTFILE" "$KEYFILE"
  rm -rf "$ROOT/data" # a run starts empty
}

case "${1:-}" in
  install)
    if ! install; then
      if [ "${CI:-}" = true ]; then exit 1; fi
      say "build failed: the Weaviate tests will be skipped"
    fi
    ;;
  path) echo "$BIN" ;;
  start) start ;;
  stop) stop ;;
  url) read -r http _ < "$PORTFILE"; echo "http://127.0.0.1:$http" ;;
  key) cat "$KEYFILE" ;;
  status) if running; then echo "running: $(cat "$PORTFILE")"; else echo "stopped"; exit 1; fi ;;
  *) echo "usage: $0 install|path|start|stop|url|key|status" >&2; exit 2 ;;
esac
