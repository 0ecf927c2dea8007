#!/usr/bin/env bash
# Start/stop a throw-away single-node Apache Kafka broker (KRaft: broker and controller in one JVM,
# no ZooKeeper) for the tests and benchmarks. No Docker, no tarball: the broker's jars and their
# runtime dependencies come from Maven Central through `mvn` once, cached in $KAFKA_JARS_DIR.
# Usage: scripts/kafka.sh start|stop|url|status   (state under .test-backends/kafka)
#        scripts/kafka.sh acquire|release ID      (for test sessions, ID = their pid: see below)
# A broker started with `start` runs until `stop`. Test sessions and benchmarks share the broker
# through leases instead: `acquire ID` starts it if needed and records a lease; `release ID`
# drops it and stops the broker once no live lease is left, but only if a lease started it.
# Environment: KAFKA_PORT (19092), KAFKA_CONTROLLER_PORT (KAFKA_PORT+1), KAFKA_VERSION (4.1.2),
# KAFKA_JARS_DIR, KAFKA_HEAP_OPTS (-Xms256m -Xmx512m), KAFKA_JVM_OPTS (more JVM options),
# KAFKA_START_TIMEOUT (seconds, 90), KAFKA_STATE_DIR (.test-backends/kafka).
# Moving KAFKA_VERSION down needs a fresh state: rm -rf .test-backends/kafka
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${KAFKA_STATE_DIR:-$PWD/.test-backends/kafka}" # a second broker needs its own (and its own port)
DATA="$ROOT/data" # topic partitions
META="$ROOT/meta" # the KRaft metadata log; apart from DATA so the JVM locks it before anything
PIDFILE="$ROOT/kafka.pid"
LEASES="$ROOT/leases"
LEASE_STARTED="$ROOT/started-by-lease"
LOG="$ROOT/logs/server.log"      # the broker's log4j output
CONSOLE="$ROOT/logs/console.log" # the JVM's stdout/stderr (crashes, JVM warnings)
PORT="${KAFKA_PORT:-19092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((PORT + 1))}"
VERSION="${KAFKA_VERSION:-4.1.2}"
LOG4J_VERSION=2.24.3 # the log4j2 that Kafka 4.x depends on; this adds its slf4j 1.7 binding
JARS="${KAFKA_JARS_DIR:-$HOME/.cache/dbsvc-kafka/$VERSION}"
HEAP="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
JVM_OPTS="${KAFKA_JVM_OPTS:-}"
TIMEOUT="${KAFKA_START_TIMEOUT:-90}"

say() { echo "kafka: $*" >&2; }
die() { say "$*"; exit 1; }

lock() { # one start/stop/acquire/release at a time (parallel test sessions)
  mkdir -p "$ROOT"
  exec 9> "$ROOT/.lock"
  flock 9
}

running_pid() { # prints the pid of this state dir's broker; fails when there is none
  local pid
  if [ -f "$PIDFILE" ]; then
    pid="$(cat "$PIDFILE")"
    if [ -n "$pid" ] && grep -qa 'kafka\.Kafka' "/proc/$pid/cmdline" 2>/dev/null; then
      echo "$pid"
      return 0
    fi
  fi
  # no (valid) pid file: a broker on this state dir may still run; adopt it
  pid="$(pgrep -f -o "kafka\.Kafka $ROOT/server\.properties" 2>/dev/null)" || return 1
  echo "$pid" > "$PIDFILE"
  echo "$pid"
}

port_in_use() {
  if command -v ss >/dev/null; then
    [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
  else
    (exec 3<> "/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

ensure_jars() {
  [ -f "$JARS/.complete" ] && return 0
  command -v mvn >/dev/null || die "mvn not found: needed once to fetch kafka_2.13:$VERSION"
  say "fetching org.apache.kafka:kafka_2.13:$VERSION and its runtime dependencies into $JARS"
  local work
  work="$(mktemp -d)"
  cat > "$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.dbsvc</groupId>
  <artifactId>kafka-broker-jars</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
  rm -rf "$JARS.tmp"
  mkdir -p "$JARS.tmp"
  if ! mvn -B -q -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$JARS.tmp" > "$work/mvn.log" 2>&1 9>&-; then
    cat "$work/mvn.log" >&2
    rm -rf "$work" "$JARS.tmp"
    die "mvn could not fetch the broker's jars (log above)"
  fi
  rm -rf "$work"
  touch "$JARS.tmp/.complete"
  rm -rf "$JARS"
  mv "$JARS.tmp" "$JARS"
}

write_config() {
  mkdir -p "$DATA" "$META" "$ROOT/logs"
  cat > "$ROOT/server.properties" <<PROPS
# Written by scripts/kafka.sh on every start; edits are lost.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$DATA
metadata.log.dir=$META
num.partitions=4
default.replication.factor=1
auto.create.topics.enable=true
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=3
num.io.threads=4
log.retention.hours=24
log.segment.bytes=268435456
PROPS
  cat > "$ROOT/log4j2.properties" <<LOG4J
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $LOG
appender.file.filePattern = $LOG.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.state.name = state.change.logger
logger.state.level = warn
LOG4J
}

java_cmd() { # java_cmd MAIN ARGS...: sets JAVA_CMD, the broker's JVM logging to the state dir
  # shellcheck disable=SC2206  # HEAP and JVM_OPTS hold several options
  JAVA_CMD=(java $HEAP $JVM_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$ROOT/log4j2.properties" -Dkafka.logs.dir="$ROOT/logs"
    -cp "$JARS/*" "$@")
}

cds_opts() { # AppCDS: a class-data archive of the broker's classes, written when a broker first
  # exits cleanly (stop_locked moves it into place) and mapped by later starts: about 2 s of a
  # 5 s start. Per JDK build: the key is the JVM library's path and mtime. KAFKA_CDS=0: off.
  rm -f "$ROOT/cds-pending"
  [ "${KAFKA_CDS:-1}" = 1 ] || return 0
  find "$JARS" -maxdepth 1 -name 'cds-*.jsa.*' -mmin +60 -delete 2>/dev/null || true # stale
  local libjvm key
  libjvm="$(dirname "$(readlink -f "$(command -v java)")")/../lib/server/libjvm.so"
  [ -f "$libjvm" ] || return 0
  key="$(printf '%s %s' "$(readlink -f "$libjvm")" "$(stat -c %Y "$libjvm")" | md5sum | cut -c1-12)"
  if [ -f "$JARS/cds-$key.jsa" ]; then
    echo "-XX:SharedArchiveFile=$JARS/cds-$key.jsa -Xlog:cds*=error"
  else
    echo "$JARS/cds-$key.jsa $JARS/cds-$key.jsa.$$" > "$ROOT/cds-pending"
    echo "-XX:ArchiveClassesAtExit=$JARS/cds-$key.jsa.$$ -Xlog:cds*=error"
  fi
}

format_storage() {
  # Test sessions leave their topics behind; past ~500 of them a fresh, empty broker starts faster.
  if [ -f "$META/meta.properties" ] && [ -f "$DATA/meta.properties" ] \
      && [ "$(find "$DATA" -mindepth 1 -maxdepth 1 | wc -l)" -lt 2000 ]; then
    return 0
  fi
  rm -rf "$DATA" "$META" # half-formatted, from an older layout, or full of old topics
  mkdir -p "$DATA" "$META"
  local cluster_id
  # A Kafka cluster id is 16 random bytes in URL-safe base64 without padding.
  cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
  say "formatting $ROOT (cluster id $cluster_id)"
  # --cluster-id=…: an id may start with '-', which the tool would take for an option.
  java_cmd kafka.tools.StorageTool format "--cluster-id=$cluster_id" -c "$ROOT/server.properties"
  "${JAVA_CMD[@]}" >> "$ROOT/logs/format.log" 2>&1 9>&- \
    || { cat "$ROOT/logs/format.log" >&2; die "storage format failed"; }
}

python_bin() {
  if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi
}

# One Metadata v4 request on the PLAINTEXT listener (stdlib only): succeeds once the broker
# answers with itself among the live brokers, i.e. it is registered, unfenced and serving.
metadata_ok() {
  "$(python_bin)" - "$PORT" <<'PY' 2>/dev/null
import socket, struct, sys

port = int(sys.argv[1])
client = b"kafka.sh"
# header v1: api_key=3 (Metadata), api_version=4, correlation_id, client_id; body: topics=null,
# allow_auto_topic_creation=false
body = struct.pack(">hhih", 3, 4, 7, len(client)) + client + struct.pack(">i?", -1, False)
with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
    s.settimeout(3)
    s.sendall(struct.pack(">i", len(body)) + body)
    raw = b""
    while len(raw) < 4 or len(raw) < 4 + struct.unpack(">i", raw[:4])[0]:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(1)
        raw += chunk
# response header v0: correlation_id; body v4: throttle_time_ms, brokers[...]
correlation, _throttle, brokers = struct.unpack(">iii", raw[4:16])
sys.exit(0 if correlation == 7 and brokers >= 1 else 1)
PY
}

start_locked() { # succeeds with LAUNCHED=1 when this call started the broker
  LAUNCHED=0
  local pid
  if pid="$(running_pid)"; then
    say "already running on 127.0.0.1:$PORT (pid $pid)"
    return 0
  fi
  local port
  for port in "$PORT" "$CONTROLLER_PORT"; do
    port_in_use "$port" && die "port $port is taken by another process (set KAFKA_PORT)"
  done
  command -v java >/dev/null || die "java not found (Kafka $VERSION needs Java 17+)"
  ensure_jars
  write_config
  format_storage
  local started=$SECONDS
  say "starting Kafka $VERSION on 127.0.0.1:$PORT (controller $CONTROLLER_PORT), log $LOG"
  JVM_OPTS="$(cds_opts) $JVM_OPTS"
  java_cmd kafka.Kafka "$ROOT/server.properties"
  # setsid + nohup: the broker outlives the shell or test session that started it; setsid and
  # nohup exec, so $! is the JVM itself. 9>&-: the broker must not hold the start/stop lock.
  setsid nohup "${JAVA_CMD[@]}" < /dev/null >> "$CONSOLE" 2>&1 9>&- &
  pid=$!
  echo "$pid" > "$PIDFILE"
  while :; do
    if ! alive "$pid"; then
      tail -n 30 "$CONSOLE" "$LOG" >&2 2>/dev/null || true
      rm -f "$PIDFILE"
      die "the broker exited during startup; see $LOG and $CONSOLE"
    fi
    if port_in_use "$PORT" && metadata_ok; then
      break
    fi
    if [ $((SECONDS - started)) -ge "$TIMEOUT" ]; then
      tail -n 30 "$LOG" >&2 2>/dev/null || true
      rm -f "$ROOT/cds-pending" # no archive from a broker that never came up
      stop_locked
      die "the broker did not answer a metadata request within ${TIMEOUT}s; see $LOG"
    fi
    sleep 0.2
  done
  LAUNCHED=1
  say "running on 127.0.0.1:$PORT (pid $pid, ready in $((SECONDS - started))s)"
}

alive() { # a live process, not a zombie (the JVM is our own child on the start-timeout path)
  kill -0 "$1" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

stop_locked() {
  local pid clean=0
  if pid="$(running_pid)"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do # 30 s for a clean shutdown
      alive "$pid" || { clean=1; break; }
      sleep 0.2
    done
    if alive "$pid"; then
      say "pid $pid ignored SIGTERM for 30s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      while alive "$pid"; do sleep 0.1; done
    fi
    say "stopped (pid $pid)"
  fi
  local final tmp
  if [ -f "$ROOT/cds-pending" ] && read -r final tmp < "$ROOT/cds-pending"; then
    # only a JVM that exited on SIGTERM has written a whole archive
    if [ "$clean" = 1 ] && [ -s "$tmp" ]; then mv -f "$tmp" "$final"; else rm -f "$tmp"; fi
  fi
  rm -rf "$PIDFILE" "$LEASES" "$LEASE_STARTED" "$ROOT/cds-pending"
}

prune_leases() { # drops the leases of processes that are gone
  local lease
  for lease in "$LEASES"/*; do
    [ -e "$lease" ] || continue
    kill -0 "$(basename "$lease")" 2>/dev/null || rm -f "$lease"
  done
}

lease_id() {
  [[ "${1:-}" =~ ^[0-9]+$ ]] || die "usage: $0 acquire|release PID (the pid of the session)"
  echo "$1"
}

case "${1:-}" in
  start)
    lock
    start_locked
    rm -f "$LEASE_STARTED" # started or adopted by hand: leases never stop it
    ;;
  stop)
    [ -d "$ROOT" ] || exit 0
    lock
    stop_locked
    ;;
  acquire)
    id="$(lease_id "${2:-}")"
    lock
    start_locked
    if [ "$LAUNCHED" = 1 ]; then touch "$LEASE_STARTED"; fi
    mkdir -p "$LEASES"
    touch "$LEASES/$id"
    ;;
  release)
    id="$(lease_id "${2:-}")"
    [ -d "$ROOT" ] || exit 0
    lock
    rm -f "$LEASES/$id"
    prune_leases
    if [ -f "$LEASE_STARTED" ] && [ -z "$(ls -A "$LEASES" 2>/dev/null)" ]; then
      stop_locked
    fi
    ;;
  url) echo "127.0.0.1:$PORT" ;;
  status)
    if pid="$(running_pid)"; then
      echo "running on 127.0.0.1:$PORT (pid $pid)"
    else
      echo "stopped"
      exit 3
    fi
    ;;
  *) echo "usage: $0 start|stop|url|status|acquire PID|release PID" >&2; exit 2 ;;
esac
