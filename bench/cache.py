"""The result cache (issue #11): cached vs. uncached PK reads vs. a bare gRPC echo, hit ratio
under Zipf reads with writes, and the invalidation lag between two instances, in one run.

Setup: a private PostgreSQL and redis-server, and two ``database-service serve`` instances (A
and B) sharing both (the same master key and admin token, ``DBSVC_REDIS_URL`` set: L2 and
cluster-wide invalidation). One tenant, its ``users`` table filled with 100,000 rows.

- **Priming**: every one of the 100,000 keys read once, cached, through A — through the
  measured client's own channel, so the worker it talks to holds every key in L1 and Redis
  holds them in L2: the cache at steady state, as a worker that has served this client for a
  while has it. Without it a run of a few minutes measures mostly first reads: Zipf(1.1) over
  100,000 keys puts 11% of the reads outside the 10,000 hottest keys, so a cold cache keeps
  meeting keys it never saw for millions of reads (``--no-prime`` shows it).
  ``--prime-channels N`` spreads the priming over N channels (so over A's workers): each
  worker's L1 then holds about half the keys, and the mix's reads of the long tail that its
  worker did not prime are L2 hits, a Redis round trip each (about one read in six).
- **Mixed workload** on A: keys drawn Zipf(1.1) over the 100,000 rows (hot keys scattered over
  the table), 95% reads ``fetch_all(PK, [key], cache=300 s)``, 5% writes ``UPDATE users SET
  subscription_tier = $2 WHERE user_id = $1`` (to keys drawn uniformly over the table by
  default; ``--writes zipf`` sends them to the reads' hot keys, where no cache can reach 0.95: a
  key read 19 times per write misses at least once per write), closed loop at concurrency 8
  after a warm-up:
  hit ratio (hits / cached reads, from each result's ``.cache``), throughput, p50/p99 of hits,
  of misses and of writes. The same mix with the reads uncached gives the baseline. Every read
  is checked against the writes: a read that returns a value overwritten by a write that was
  acknowledged before the read was sent is counted as stale (the contract: an instance never
  serves a result older than its own acknowledged write). The trace of the run is replayed
  through an ideal cache (TTL, invalidation by row, or by relation) for the bound this key
  stream allows: a read that follows a write of its key is a miss however good the cache.
- **Latency at concurrency 1**: the same mix (hits' p50/p99), the bare gRPC echo of
  ``bench/grpc_query.py`` answering the service's own bytes for a cached hit, driven by the same
  client the same way, and the mix's reads alone (no writes, as the echo gets none), in
  ``C1_ROUNDS`` alternating rounds; then the same PK reads uncached. The issue's figure is the
  mix's (``cached_p50_ms``); the reads alone (``cached_reads_alone_p50_ms``) show what the
  writes' invalidations, which every worker of both instances handles, add to it.
- **Invalidation lag**: for keys no other load touches, read the key cached through B, write it
  through A, then read it through B (cached, round-robin over several channels) until the new
  value comes back: lag = from A's acknowledgment to B's answer with the new value. Then one
  more read per channel: any old value then is counted (``stale_after_new``).

The issue's targets (hit ratio ≥ 0.95, cached p50 ≤ 1.1x the echo's p50) are printed as met or
not. The last line is one JSON object of the figures (``{"bench": "cache", ...}``).

    .venv/bin/python bench/cache.py [--seconds 20] [--warmup 20] [--lag-trials 200]
        [--writes uniform|zipf] [--no-prime] [--prime-channels N] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import itertools
import random
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import httpx
import redis
import uvloop
from grpc_query import echo_server  # bench/ is on sys.path as a script
from harness import Service, p99, reporting, rss_bytes, running_service

from database_service.supervisor import free_port
from database_service_client import MultiDatabaseClient
from database_service_client._proto import database_service_pb2 as pb

KEYS = 100_000
ZIPF_S = 1.1
WRITE_SHARE = 0.05
C1_ROUNDS = 4  # alternations of the echo and the cache at c=1: the machine's load drifts
# Long: writes invalidate; the TTL is the last line of defence (the service's maximum is 300 s).
TTL = timedelta(seconds=300)
PRIME_CONCURRENCY = 32
POOL = 8
LAG_CHANNELS = 4
PK = "SELECT user_id, email, subscription_tier FROM users WHERE user_id = $1"
# subscription_tier is one of three (a CHECK): the email, unique, carries the write's number.
WRITE = "UPDATE users SET subscription_tier = $2, email = $3 WHERE user_id = $1"
TIERS = ("free", "pro", "enterprise")


def version_of(email: str) -> int:
    """The number of the write that set ``email`` (0: the row as loaded)."""
    local = email.partition("@")[0]
    return int(local.rpartition(".w")[2]) if ".w" in local else 0


def key_of(n: int) -> str:
    return f"u{n:06d}"


class Zipf:
    """Ranks 1..n with P(k) ∝ k^-s (a precomputed CDF, bisected), each rank a key of the
    table (a seeded permutation: the hot keys are scattered, not the first rows)."""

    def __init__(self, n: int, s: float, seed: int) -> None:
        self.cdf = list(itertools.accumulate(k**-s for k in range(1, n + 1)))
        self.keys = list(range(1, n + 1))
        random.Random(seed).shuffle(self.keys)

    def rank_key(self, rank: int) -> int:
        return self.keys[rank - 1]

    def draw(self, rng: random.Random) -> int:
        return self.keys[bisect.bisect_left(self.cdf, rng.random() * self.cdf[-1])]


@dataclass
class Writes:
    """Every write of the run, per key: (sent, acknowledged), and each value's write, to judge
    the reads after a phase (not while it runs: the check would add to the latencies)."""

    by_key: dict[int, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    acked: dict[int, float] = field(default_factory=dict)  # sequence → acknowledged
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def stale_reads(self, reads: list[tuple[int, str, float]]) -> int:
        """Reads (key, value, sent) whose value had been overwritten by a write sent after
        that value's write was acknowledged (so certainly committed after it) and acknowledged
        itself before the read was sent."""
        index: dict[int, tuple[list[float], list[float]]] = {}
        for key, writes in self.by_key.items():
            ordered = sorted(writes)
            suffix_min = list(itertools.accumulate(reversed([a for _, a in ordered]), min))
            index[key] = ([s for s, _ in ordered], suffix_min[::-1])
        stale = 0
        for key, value, sent in reads:
            if key not in index:
                continue
            version = version_of(value)
            base = -1.0 if version == 0 else self.acked.get(version, float("inf"))
            sents, earliest_ack = index[key]
            first = bisect.bisect_right(sents, base)
            stale += first < len(sents) and earliest_ack[first] < sent
        return stale


@dataclass
class Mix:
    """What a phase of the mixed workload measured."""

    seconds: float = 0.0
    by_status: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    writes: list[float] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    stale: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def reads(self) -> int:
        return sum(len(v) for v in self.by_status.values())

    @property
    def ops(self) -> int:
        return self.reads + len(self.writes)

    @property
    def rps(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def add(self, part: Mix) -> None:
        """``part``'s figures added to these (a phase measured in rounds)."""
        self.seconds += part.seconds
        self.stale += part.stale
        self.errors.update(part.errors)
        self.reasons.update(part.reasons)
        self.writes += part.writes
        for status, samples in part.by_status.items():
            self.by_status[status] += samples

    def hit_ratio(self) -> float:
        return len(self.by_status["hit"]) / self.reads if self.reads else 0.0


@dataclass
class Stats:
    p50: float
    p99: float
    n: int

    @staticmethod
    def of(samples: Sequence[float]) -> Stats:
        if not samples:
            return Stats(float("nan"), float("nan"), 0)
        return Stats(statistics.median(samples), p99(samples), len(samples))

    def text(self) -> str:
        return f"p50 {self.p50:7.3f} ms  p99 {self.p99:7.3f} ms  (n={self.n})"


class Workload:
    """The mix, run against A by one client (one channel, like the query-path bench)."""

    def __init__(
        self, client: MultiDatabaseClient, zipf: Zipf, seed: int, *, uniform_writes: bool = False
    ) -> None:
        self.client = client
        self.zipf = zipf
        self.uniform_writes = uniform_writes
        self.phases = itertools.count(seed)
        self.writes = Writes()
        self.trace: list[tuple[float, bool, int]] = []  # (sent, is_write, key), every phase

    async def prime(self, clients: Sequence[MultiDatabaseClient]) -> tuple[float, Counter[str]]:
        """Every key read once, cached, over ``clients`` (``PRIME_CONCURRENCY`` callers): the
        seconds it took and the reads by cache status."""
        keys = iter(range(1, KEYS + 1))
        statuses: Counter[str] = Counter()

        async def caller(c: int) -> None:
            client = clients[c % len(clients)]
            for key in keys:  # shared: each key once
                self.trace.append((time.perf_counter(), False, key))
                result = await client.fetch_all(PK, [key_of(key)], cache=TTL)
                statuses[result.cache or "uncached"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(PRIME_CONCURRENCY)))
        return time.perf_counter() - started, statuses

    async def run(
        self,
        concurrency: int,
        seconds: float,
        *,
        cached: bool,
        record: bool = True,
        writes: bool = True,
    ) -> Mix:
        mix = Mix()
        reads: list[tuple[int, str, float]] = []
        cache = TTL if cached else None
        deadline = time.perf_counter() + seconds
        phase = next(self.phases)

        async def worker(w: int) -> None:
            rng = random.Random(phase * 1000 + w)
            while time.perf_counter() < deadline:
                key = self.zipf.draw(rng)
                is_write = writes and rng.random() < WRITE_SHARE
                if is_write and self.uniform_writes:  # writes spread over the table
                    key = self.zipf.rank_key(rng.randint(1, KEYS))
                sent = time.perf_counter()
                self.trace.append((sent, is_write, key))
                try:
                    if is_write:
                        seq = next(self.writes.counter)
                        name = key_of(key)
                        tier = TIERS[seq % 3]
                        email = f"{name}.w{seq}@example.com"
                        await self.client.fetch_all(WRITE, [name, tier, email])
                        acked = time.perf_counter()
                        self.writes.acked[seq] = acked
                        self.writes.by_key[key].append((sent, acked))
                        mix.writes.append((acked - sent) * 1000)
                        continue
                    result = await self.client.fetch_all(PK, [key_of(key)], cache=cache)
                except Exception as exc:  # counted and shown, the run goes on
                    mix.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                    await asyncio.sleep(0.01)
                    continue
                latency = (time.perf_counter() - sent) * 1000
                status = result.cache or "uncached"
                mix.by_status[status].append(latency)
                if result.cache_reason:
                    mix.reasons[f"{status}: {result.cache_reason}"] += 1
                if record:
                    reads.append((key, result.rows[0][1] if result.rows else "", sent))

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        mix.seconds = time.perf_counter() - started
        mix.stale = self.writes.stale_reads(reads)
        return mix


def ideal_hit_ratio(
    trace: list[tuple[float, bool, int]],
    since: float,
    until: float,
    *,
    by_row: bool,
    ttl: float = TTL.total_seconds(),
) -> float:
    """The hit ratio of an ideal cache on this run's key stream (reads sent in [since, until),
    the cache filled by everything sent since the warm-up began): a read hits when the key was
    filled less than ``ttl`` ago and not written since (``by_row``) or when nothing of the table
    was (by relation)."""
    filled: dict[int, float] = {}
    table_written = float("-inf")
    row_written: dict[int, float] = {}
    hits = reads = 0
    for sent, is_write, key in sorted(trace):
        if is_write:
            row_written[key] = sent
            table_written = sent
            continue
        at = filled.get(key)
        written = row_written.get(key, float("-inf")) if by_row else table_written
        hit = at is not None and sent - at < ttl and written < at
        if since <= sent < until:
            reads += 1
            hits += hit
        if not hit:
            filled[key] = sent
    return hits / reads if reads else 0.0


# -- the setup ------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Any:
    """A private redis-server (no persistence) on a free port; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (bash scripts/redis.sh install)")
    with tempfile.TemporaryDirectory(prefix="dbsvc-bench-redis-") as tmp:
        port = free_port()
        process = subprocess.Popen(
            [
                *(binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp),
                *("--save", "", "--appendonly", "no", "--logfile", f"{tmp}/server.log"),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            for _ in range(500):
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                time.sleep(0.02)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


async def health(service: Service) -> dict[str, Any]:
    """The health document, in full (the admin token is a platform principal)."""
    headers = {"Authorization": f"Bearer {service.admin_token}"}
    async with httpx.AsyncClient(base_url=service.http, timeout=10, headers=headers) as http:
        body: dict[str, Any] = (await http.get("/api/v1/health")).json()
        return body


async def cache_state(name: str, service: Service) -> None:
    """What the instance says of its cache: requests by outcome, invalidations by source
    (all its workers, from /metrics), and one worker's invalidation channel and L1."""
    headers = {"Authorization": f"Bearer {service.admin_token}"}
    async with httpx.AsyncClient(base_url=service.http, timeout=10, headers=headers) as http:
        text = (await http.get("/metrics")).text
    counters = []
    for metric in text.splitlines():
        if metric.startswith(
            (
                "dbsvc_cache_requests_total",
                "dbsvc_cache_invalidations_total",
                "dbsvc_cache_replays_total",
            )
        ):
            label, value = metric.rsplit(" ", 1)
            counters.append(f"{label.removeprefix('dbsvc_cache_')}={float(value):g}")
    print(f"  instance {name}: {', '.join(counters)}")
    dragonfly = (await health(service)).get("dependencies", {}).get("dragonflydb", {})
    invalidation = dragonfly.get("invalidation", {})
    print(
        f"    one worker: invalidation {invalidation.get('status')}, messages"
        f" {invalidation.get('messages')}, last error {invalidation.get('last_error')!r},"
        f" notifications {dragonfly.get('postgres_notifications')}, L1 {dragonfly.get('l1')},"
        f" hit rate {dragonfly.get('hit_rate')}, generation mirror {invalidation.get('mirror')}"
    )


async def lag_metric(service: Service) -> tuple[float, float]:
    """The sum and count of B's ``dbsvc_cache_invalidation_lag_seconds`` (its own measure:
    from a write's commit elsewhere to the invalidation here)."""
    headers = {"Authorization": f"Bearer {service.admin_token}"}
    async with httpx.AsyncClient(base_url=service.http, timeout=10, headers=headers) as http:
        response = await http.get("/metrics")
    total = count = 0.0
    if response.status_code != 200:
        print(f"  (B's /metrics: HTTP {response.status_code})")
        return total, count
    for metric in response.text.splitlines():
        if metric.startswith("dbsvc_cache_invalidation_lag_seconds_sum"):
            total += float(metric.split()[-1])
        elif metric.startswith("dbsvc_cache_invalidation_lag_seconds_count"):
            count += float(metric.split()[-1])
    return total, count


async def recorded_hit(target: str, token: str, key: str) -> bytes:
    """The service's response bytes for a cached ``Query`` of ``key`` that hit (the echo's
    answer: the same bytes a hit sends, summary included)."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/database_service.v1.DatabaseService/Query",
            request_serializer=pb.QueryRequest.SerializeToString,
            response_deserializer=None,
        )
        request = pb.QueryRequest(
            sql=PK,
            row_encoding=pb.ROW_ENCODING_PACKED,
            cache_ttl_ms=int(TTL.total_seconds() * 1000),
        )
        request.params.add(string_value=key)
        metadata = (("authorization", f"Bearer {token}"), ("x-tenant-id", "bench"))
        response: bytes = b""
        for _ in range(3):
            response = await call(request, metadata=metadata)
            if pb.QueryResult.FromString(response).summary.cache == "hit":
                return response
        raise RuntimeError("the recorded read never hit the cache: the echo would be unfair")


async def closed(call: Callable[[int], Awaitable[Any]], seconds: float) -> list[float]:
    """One caller, each request when the last answered, for ``seconds``: latencies in ms."""
    latencies: list[float] = []
    for i in range(50):
        await call(i)
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        await call(i)
        latencies.append((time.perf_counter() - started) * 1000)
        i += 1
    return latencies


# -- the lag ---------------------------------------------------------------------------------


@dataclass
class Lag:
    lags_ms: list[float] = field(default_factory=list)
    polls: list[int] = field(default_factory=list)
    last_poll_ms: list[float] = field(default_factory=list)  # the poll that saw the new value
    primed_hits: int = 0
    primed: int = 0
    poll_statuses: Counter[str] = field(default_factory=Counter)
    stale_after_new: int = 0
    timeouts: int = 0


async def invalidation_lag(
    writer: MultiDatabaseClient, readers: list[MultiDatabaseClient], keys: list[str]
) -> Lag:
    lag = Lag()
    for trial, key in enumerate(keys):
        for reader in readers:  # cached on every channel of B (a miss, then a hit)
            for _ in range(2):
                got = await reader.fetch_all(PK, [key], cache=TTL)
            lag.primed += 1
            lag.primed_hits += got.cache == "hit"
        new = f"{key}.lag{trial}@example.com"
        await writer.fetch_all(WRITE, [key, TIERS[trial % 3], new])
        acked = time.perf_counter()
        polls = 0
        while True:
            reader = readers[polls % len(readers)]
            sent = time.perf_counter()
            got = await reader.fetch_all(PK, [key], cache=TTL)
            answered = time.perf_counter()
            polls += 1
            lag.poll_statuses[got.cache] += 1
            if got.rows and got.rows[0][1] == new:
                lag.lags_ms.append((answered - acked) * 1000)
                lag.polls.append(polls)
                lag.last_poll_ms.append((answered - sent) * 1000)
                break
            if answered - acked > 10:
                lag.timeouts += 1
                break
        for reader in readers:
            got = await reader.fetch_all(PK, [key], cache=TTL)
            if not got.rows or got.rows[0][1] != new:
                lag.stale_after_new += 1
    return lag


# -- the run ---------------------------------------------------------------------------------


def mix_lines(name: str, mix: Mix) -> None:
    statuses = ", ".join(f"{s} {len(v)}" for s, v in sorted(mix.by_status.items()))
    print(f"  {name}: {mix.rps:7.0f} ops/s ({mix.ops} ops: {statuses}, writes {len(mix.writes)})")
    for status, samples in sorted(mix.by_status.items()):
        print(f"    reads {status:<9} {Stats.of(samples).text()}")
    print(f"    writes          {Stats.of(mix.writes).text()}")
    for reason, n in mix.reasons.most_common(5):
        print(f"    reason: {reason} ({n})")
    for error, n in mix.errors.most_common(5):
        print(f"    ERROR: {error} ({n})")
    if mix.stale:
        print(f"    STALE reads (older than an acknowledged write): {mix.stale}")


async def main(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    seconds = args.seconds
    shared: dict[str, Any] = {
        "DBSVC_MASTER_KEY": secrets.token_urlsafe(48),
        "DBSVC_BOOTSTRAP_ADMIN_TOKEN": secrets.token_urlsafe(32),
        "DBSVC_POOL_MAX_PER_TENANT": str(POOL),
    }
    if args.workers is not None:
        shared["DBSVC_WORKERS"] = str(args.workers)
    async with contextlib.AsyncExitStack() as stack:
        shared["DBSVC_REDIS_URL"] = stack.enter_context(redis_server())
        a = await stack.enter_async_context(running_service(**shared))
        a = dataclasses.replace(a, admin_token=shared["DBSVC_BOOTSTRAP_ADMIN_TOKEN"])  # ours
        # B: its own process and data directory, A's PostgreSQL, secrets and Redis (the
        # harness starts a PostgreSQL of B's own too, left unused).
        b = await stack.enter_async_context(running_service(DBSVC_POSTGRES_URL=a.dsn, **shared))
        b = dataclasses.replace(b, admin_token=a.admin_token)  # the harness's is overridden
        await run(args, figures, a, b, seconds)


async def run(
    args: argparse.Namespace, figures: dict[str, Any], a: Service, b: Service, seconds: float
) -> None:
    schema, token = await a.tenant("bench", ["read", "write"])
    owner = await asyncpg.connect(a.dsn)
    await owner.execute(
        f"INSERT INTO {schema}.users (user_id, email, subscription_tier)"
        f" SELECT 'u' || lpad(g::text, 6, '0'), 'u' || lpad(g::text, 6, '0') || '@example.com',"
        " 'pro'"
        f" FROM generate_series(1, {KEYS}) g"
    )
    await owner.execute(f"ANALYZE {schema}.users")
    version = await owner.fetchval("SHOW server_version")
    await owner.close()
    for name, service in (("A", a), ("B", b)):
        state = (await health(service)).get("dependencies", {}).get("dragonflydb", {})
        print(f"instance {name}: {service.grpc}, dragonflydb {state.get('status')}")
    print(
        f"PostgreSQL {version}, {KEYS} keys, Zipf({ZIPF_S}), {WRITE_SHARE:.0%} writes,"
        f" TTL {TTL.total_seconds():g} s, {seconds:g} s per measurement"
    )
    zipf = Zipf(KEYS, ZIPF_S, seed=11)
    top = [zipf.cdf[k - 1] / zipf.cdf[-1] for k in (10, 100, 1000, 10_000)]
    print("  Zipf mass of the top 10/100/1,000/10,000 keys: " + " / ".join(f"{m:.3f}" for m in top))
    client = MultiDatabaseClient(a.grpc, "bench", token)
    load = Workload(client, zipf, seed=1, uniform_writes=args.writes == "uniform")
    figures["writes"] = args.writes

    if args.prime:
        channels = args.prime_channels
        print(
            f"Priming: each of the {KEYS:,} keys read once, cached"
            f" ({'the measured channel' if channels == 1 else f'{channels} channels'})"
        )
        others = [MultiDatabaseClient(a.grpc, "bench", token) for _ in range(channels - 1)]
        took, statuses = await load.prime([client, *others])
        for primer in others:
            await primer.close()
        print(f"  {took:.1f} s ({KEYS / took:,.0f} reads/s): {dict(statuses)}")
        figures["prime_s"] = took
    figures["primed"] = args.prime
    figures["prime_channels"] = args.prime_channels

    print(f"Warm-up: the cached mix at c=8 for {args.warmup:g} s")
    warm = await load.run(8, args.warmup, cached=True, record=False)
    mix_lines("warm-up", warm)

    print("Cached mix, c=8 (steady state)")
    since = time.perf_counter()
    cached8 = await load.run(8, seconds, cached=True)
    until = time.perf_counter()
    mix_lines("cached", cached8)
    hit_ratio = cached8.hit_ratio()
    by_row = ideal_hit_ratio(load.trace, since, until, by_row=True)
    by_relation = ideal_hit_ratio(load.trace, since, until, by_row=False)
    by_row_forever = ideal_hit_ratio(load.trace, since, until, by_row=True, ttl=float("inf"))
    print(
        f"  hit ratio {hit_ratio:.4f}; an ideal cache on this key stream: {by_row:.4f}"
        f" (invalidation by row), {by_relation:.4f} (by relation), {by_row_forever:.4f}"
        " (by row, no TTL: only first reads and reads after a write miss)"
    )
    if args.writes == "zipf":
        print(
            f"  (a read after a write of its key misses in any cache: {WRITE_SHARE:.0%} of the"
            f" operations on every key are writes, so no cache beats {1 - WRITE_SHARE:.2f} here)"
        )

    print("Uncached mix, c=8 (the same reads without cache=)")
    uncached8 = await load.run(8, seconds, cached=False)
    mix_lines("uncached", uncached8)

    # The echo answers what a hit sends; recorded on a hot key, after the mix cached it.
    small = await recorded_hit(a.grpc, token, key_of(zipf.rank_key(1)))
    rng = random.Random(7)

    def echo_call(c: MultiDatabaseClient) -> Callable[[int], Awaitable[Any]]:
        async def call(i: int) -> Any:
            return await c.fetch_all(PK, [key_of(zipf.draw(rng))], cache=TTL)

        return call

    print("Concurrency 1: the cached mix, the bare gRPC echo (same client, same calls) and the")
    print("mix's reads alone (no writes, as the echo's calls), in alternating rounds; then the")
    print("same PK reads uncached")
    cached1, reads1 = Mix(), Mix()
    echo_ms: list[float] = []
    async with echo_server(small, small) as echo_target:
        bare = MultiDatabaseClient(echo_target, "bench", token)
        for _ in range(C1_ROUNDS):
            echo_ms += await closed(echo_call(bare), seconds / C1_ROUNDS)
            cached1.add(await load.run(1, seconds / C1_ROUNDS, cached=True))
            reads1.add(await load.run(1, seconds / C1_ROUNDS, cached=True, writes=False))
        await bare.close()
    uncached1 = await load.run(1, seconds, cached=False)
    mix_lines("cached mix c=1", cached1)
    echo = Stats.of(echo_ms)
    print(f"  bare gRPC echo c=1        {echo.text()}")
    mix_lines("cached reads alone c=1", reads1)
    mix_lines("uncached mix c=1", uncached1)
    hits1 = Stats.of(cached1.by_status["hit"])
    reads_hits1 = Stats.of(reads1.by_status["hit"])
    plain1 = Stats.of(uncached1.by_status["uncached"])
    ratio = hits1.p50 / echo.p50
    print(
        f"  hits' p50 / the echo's: {ratio:.3f}x in the mix, {reads_hits1.p50 / echo.p50:.3f}x"
        " with the reads alone (the writes' invalidations, handled by every worker of both"
        " instances, are not the echo's to bear)"
    )

    print(f"Invalidation lag, B after a write through A: {args.lag_trials} trials")
    readers = [MultiDatabaseClient(b.grpc, "bench", token) for _ in range(LAG_CHANNELS)]
    writer = MultiDatabaseClient(a.grpc, "bench", token)
    cold = [key_of(zipf.rank_key(KEYS - i)) for i in range(args.lag_trials)]  # the Zipf tail
    before = await lag_metric(b)
    lag = await invalidation_lag(writer, readers, cold)
    after = await lag_metric(b)
    messages = after[1] - before[1]
    own_ms = (after[0] - before[0]) / messages * 1000 if messages else float("nan")
    for c in (*readers, writer):
        await c.close()
    lags = Stats.of(lag.lags_ms)
    print(
        f"  lag {lags.text()}  max {max(lag.lags_ms, default=float('nan')):.3f} ms;"
        f" polls to the new value: median {statistics.median(lag.polls or [0]):g},"
        f" max {max(lag.polls, default=0)}; that poll's own round trip"
        f" p50 {Stats.of(lag.last_poll_ms).p50:.3f} ms"
    )
    print(
        f"  B's own measure (commit elsewhere → invalidated here, dbsvc_cache_invalidation_lag"
        f"_seconds): mean {own_ms:.3f} ms over {messages:g} messages (Redis and PostgreSQL)"
    )
    print(
        f"  before each write B hit on {lag.primed_hits}/{lag.primed} channel primings;"
        f" polls answered {dict(lag.poll_statuses)}; timeouts (10 s) {lag.timeouts};"
        f" old value after the new one seen: {lag.stale_after_new}"
    )
    print("The instances' own figures")
    for name, service in (("A", a), ("B", b)):
        await cache_state(name, service)
        print(f"    RSS {rss_bytes(service.pid) / 1e6:.0f} MB")
    await client.close()

    met_hits = hit_ratio >= 0.95
    met_latency = ratio <= 1.1
    print("Targets of issue #11:")
    print(f"  hit ratio {hit_ratio:.4f} >= 0.95: {'met' if met_hits else 'NOT met'}")
    print(
        f"  cached p50 {hits1.p50:.3f} ms <= 1.1x echo p50 {echo.p50:.3f} ms"
        f" ({ratio:.2f}x): {'met' if met_latency else 'NOT met'}"
    )
    figures |= {
        "hit_ratio": hit_ratio,
        "hit_ratio_ideal_by_row": by_row,
        "hit_ratio_ideal_by_relation": by_relation,
        "hit_ratio_ideal_no_ttl": by_row_forever,
        "cached_p50_ms": hits1.p50,
        "cached_p99_ms": hits1.p99,
        "echo_p50_ms": echo.p50,
        "echo_p99_ms": echo.p99,
        "cached_vs_echo_p50": ratio,
        "cached_reads_alone_p50_ms": reads_hits1.p50,
        "cached_reads_alone_vs_echo_p50": reads_hits1.p50 / echo.p50,
        "uncached_p50_ms": plain1.p50,
        "uncached_p99_ms": plain1.p99,
        "cached_c8_rps": cached8.rps,
        "uncached_c8_rps": uncached8.rps,
        "cached_c8_hit_p50_ms": Stats.of(cached8.by_status["hit"]).p50,
        "cached_c8_hit_p99_ms": Stats.of(cached8.by_status["hit"]).p99,
        "cached_c8_miss_p50_ms": Stats.of(cached8.by_status["miss"]).p50,
        "uncached_c8_p50_ms": Stats.of(uncached8.by_status["uncached"]).p50,
        "uncached_c8_p99_ms": Stats.of(uncached8.by_status["uncached"]).p99,
        "write_c8_p50_ms": Stats.of(cached8.writes).p50,
        "invalidation_p50_ms": lags.p50,
        "invalidation_p99_ms": lags.p99,
        "invalidation_max_ms": max(lag.lags_ms, default=float("nan")),
        "invalidation_timeouts": lag.timeouts,
        "invalidation_service_mean_ms": own_ms,
        "stale_after_new": lag.stale_after_new,
        "stale_reads": cached8.stale + cached1.stale + reads1.stale,
        "errors": sum(m.errors.total() for m in (cached8, uncached8, cached1, reads1, uncached1)),
        "hit_ratio_met": met_hits,
        "cached_p50_met": met_latency,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    parser.add_argument("--warmup", type=float, default=20.0, help="the cached mix, unmeasured")
    parser.add_argument("--lag-trials", type=int, default=200)
    parser.add_argument("--workers", type=int, help="DBSVC_WORKERS of both instances")
    parser.add_argument(
        "--writes",
        choices=("zipf", "uniform"),
        default="uniform",
        help="which keys the 5%% writes go to: uniformly over the table (default), or the"
        " reads' Zipf (the hottest keys are written most: no cache can reach 0.95 then)",
    )
    parser.add_argument(
        "--no-prime",
        dest="prime",
        action="store_false",
        help="skip reading every key once before the warm-up (a cold cache: first reads miss)",
    )
    parser.add_argument(
        "--prime-channels",
        type=int,
        default=1,
        help="channels the priming reads go over: 1 (default) the measured client's own, so its"
        " worker holds every key; more spread the keys over A's workers",
    )
    arguments = parser.parse_args()
    if arguments.prime_channels < 1:
        parser.error("--prime-channels must be at least 1")
    with reporting("cache") as out:
        uvloop.run(main(arguments, out))
