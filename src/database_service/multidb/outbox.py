"""The transactional outbox of multi-store operations, and its applier.

Entries are written by ``record`` on the tenant's own connection, inside the transaction of the
operation's PostgreSQL part, through ``control.multidb_record`` (control migration 0016): the
function takes the tenant from the session's login, so an entry always belongs to the tenant
whose transaction wrote it. Everything else here runs on the owner's pool.

Applying an entry (``apply``): the row is locked (``FOR UPDATE SKIP LOCKED``: several worker
processes and the request that wrote it may try at once; one applies, the others pass), its
operation re-checked as a request's part, the store called in the entry's tenant's namespace
with that tenant's identity, and the row marked ``applied`` in the same transaction as the lock
— only after the store acknowledged. A crash between the store's acknowledgement and the mark
applies the entry again later, which has the effect of applying it once: key-value set, delete
and expire and vector and graph upserts and deletes are idempotent by key (an upserted vector
object got its id when the entry was recorded), and ``incr`` records the entry's id atomically
with the increment (``KeyValueStore.incr_once``), so a second application returns the first's
number without adding.

A failure the store may get over (``unavailable``, a timeout) is retried with exponential
backoff until ``max_attempts``; one it will not (a bad key, a collection that does not exist,
an increment of a non-integer) fails the entry at once. A failed entry is kept with its reason;
a platform administrator or the tenant's administrator lists and retries them
(``application.multidb``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from database_service.auth import Principal, Scope
from database_service.errors import (
    DRIVER_ERRORS,
    DatabaseServiceError,
    QueryError,
    Unavailable,
    postgres_unreachable,
)
from database_service.jsonvalues import dumps
from database_service.multidb.parts import (
    ClickHousePart,
    GraphPart,
    KeyValuePart,
    Part,
    StoreNotConfigured,
    VectorPart,
    outbox_operation,
)
from database_service.observability.metrics import Metrics
from database_service.postgres import Connection
from database_service.query import TenantContext
from database_service.query.executor import OwnSession
from database_service.tenancy.ids import quote_ident

__all__ = [
    "APPLY_DELAY_ENV",
    "EntryOutcome",
    "Outbox",
    "OutboxMetrics",
    "StoreAppliers",
]

log = logging.getLogger(__name__)

# A TEST HOOK, not a product feature: seconds the applier waits before applying any entry (the
# request's own, right after its commit, and the background loop's), so an end-to-end test can
# kill the process between commit and apply (tests/e2e/test_multidb_crash.py). Unset in
# production; read once when the service starts.
APPLY_DELAY_ENV = "DBSVC_TEST_MULTIDB_APPLY_DELAY_SECONDS"
# The identity entries are applied under: the entry's tenant only, read and write.
APPLIER_SERVICE = "multidb-outbox"


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    """What became of an entry: ``applied`` (``result``: the store's answer), ``pending``
    (will be retried: ``reason`` says why not yet) or ``failed`` (``reason``)."""

    entry_id: int
    store: str
    status: str
    reason: str | None = None
    code: str | None = None
    result: Any = None

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"status": self.status, "entry_id": self.entry_id}
        if self.reason is not None:
            doc["reason"] = self.reason
        if self.code is not None:
            doc["code"] = self.code
        if self.status == "applied":
            doc["result"] = self.result
        return doc


class OutboxMetrics:
    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.recorded = Counter(
            "dbsvc_multidb_outbox_recorded",
            "Outbox entries recorded (committed with their operation's PostgreSQL part), by store.",
            ["store"],
            registry=registry,
        )
        self.applied = Counter(
            "dbsvc_multidb_outbox_applied",
            "Outbox entries applied to their store, by store.",
            ["store"],
            registry=registry,
        )
        self.retried = Counter(
            "dbsvc_multidb_outbox_retries",
            "Outbox applications that failed and will be retried, by store and code.",
            ["store", "code"],
            registry=registry,
        )
        self.failed = Counter(
            "dbsvc_multidb_outbox_failed",
            "Outbox entries failed for good (kept, retryable by an administrator), by store.",
            ["store", "code"],
            registry=registry,
        )
        self.lag = Histogram(
            "dbsvc_multidb_outbox_apply_lag_seconds",
            "From an entry's commit to its store's acknowledgement, by store.",
            ["store"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=registry,
        )


class _Gauges:
    """The pending entries as the last pass of the applier saw them (read at scrape time)."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending = GaugeMetricFamily(
            "dbsvc_multidb_outbox_pending",
            "Outbox entries not yet applied (last applier pass).",
        )
        pending.add_metric([], self._outbox.pending)
        yield pending
        oldest = GaugeMetricFamily(
            "dbsvc_multidb_outbox_oldest_pending_seconds",
            "Age of the oldest pending outbox entry (last applier pass; 0 when none).",
        )
        oldest.add_metric([], self._outbox.oldest_pending_seconds or 0.0)
        yield oldest


# The stores an entry can be for (control migration 0016's CHECK).
OUTBOX_STORES = ("dragonflydb", "clickhouse", "vector", "graph")


def store_targets(
    *,
    redis_url: str | None,
    clickhouse: str | None,
    weaviate_url: str | None,
    arangodb_url: str | None,
) -> dict[str, str]:
    """Which instance of each store a process writes to, as a short digest of where it is (no
    secret goes in: a URL's user and password are left out). Processes of one deployment are
    configured alike and share every value; one configured otherwise (another Redis, its own
    embedded chDB) gets other values and never applies an entry to the wrong store."""

    def digest(kind: str, where: str | None) -> str:
        if where is None:
            return kind
        parts = urlsplit(where)
        place = (
            f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}" if parts.scheme else where
        )
        return f"{kind}:{hashlib.sha256(place.encode()).hexdigest()[:16]}"

    return {
        "dragonflydb": digest("redis", redis_url) if redis_url else "embedded",
        "clickhouse": digest("clickhouse", clickhouse),
        "vector": digest("weaviate", weaviate_url) if weaviate_url else "pgvector",
        "graph": digest("arangodb", arangodb_url) if arangodb_url else "postgresql",
    }


class StoreAppliers:
    """How an entry reaches its store, by store name; each call runs in the entry's tenant's
    namespace under the applier's identity for that tenant. The vector and graph entries go
    through their use cases, so whichever store backs them (pgvector or Weaviate, PostgreSQL or
    ArangoDB) plugs in there."""

    def __init__(
        self,
        *,
        key_values: Any,
        vectors: Any,
        graphs: Any,
        analytics: Any = None,
        targets: Mapping[str, str] | None = None,
    ) -> None:
        self.key_values = key_values  # cache.KeyValueStore
        self.vectors = vectors  # application.vectors.VectorOps
        self.graphs = graphs  # application.graphs.Graphs
        self.analytics = analytics  # analytics.service.Analytics, when ClickHouse is configured
        # Per store, which instance of it this process writes to (``store_targets``): entries
        # are recorded with it and applied only by processes with the same.
        self.targets: dict[str, str] = dict(targets or {})
        # ``store:target`` of every store, as entries this process may apply are marked: fixed
        # by the configuration, so built once rather than per entry applied.
        self._accepted = [f"{store}:{self.target(store)}" for store in OUTBOX_STORES]

    def target(self, store: str) -> str:
        return self.targets.get(store, "")

    def accepted(self) -> list[str]:
        return self._accepted

    async def apply(
        self,
        entry_id: int | None,
        tenant_id: str,
        part: Part,
        principal: Principal | None = None,
    ) -> Any:
        """Write ``part`` for ``tenant_id``: an outbox entry (``entry_id``; under the applier's
        identity for that tenant alone), or, with ``entry_id`` None, a part written inside the
        operation's own transaction (the caller's ``principal``)."""
        if principal is None:
            principal = Principal(
                service=APPLIER_SERVICE,
                tenants=frozenset({tenant_id}),
                scopes=frozenset({Scope.READ, Scope.WRITE}),
            )
        ctx = TenantContext(tenant_id)
        if isinstance(part, KeyValuePart):
            return await self._key_value(entry_id, tenant_id, part)
        if isinstance(part, ClickHousePart):
            if self.analytics is None:
                raise StoreNotConfigured("ClickHouse is not configured in this deployment")
            assert entry_id is not None  # ClickHouse writes always go through the outbox
            # The entry id is the insert's deduplication token: applied again, stored once.
            params = [] if part.params is None else part.params
            return await self.analytics.insert(
                tenant_id,
                part.query,
                params,
                dedup_token=f"outbox:{entry_id}",
                caller=APPLIER_SERVICE,  # audited as the outbox's insert
            )
        if isinstance(part, VectorPart):
            if part.operation == "upsert":
                objects = [o.model_dump(exclude_none=True) for o in part.objects or ()]
                return await self.vectors.upsert(principal, ctx, part.class_, objects)
            return await self.vectors.delete_objects(
                principal, ctx, part.class_, ids=part.ids, where=part.where
            )
        if isinstance(part, GraphPart):
            from database_service.stores.graph.model import Edge, Vertex  # noqa: PLC0415

            if part.operation == "upsert":
                written = {"vertices": 0, "edges": 0}
                if part.vertices:
                    vertices = [Vertex.of(v.collection, v.key, v.properties) for v in part.vertices]
                    written["vertices"] = await self.graphs.upsert_vertices(
                        principal, ctx, vertices
                    )
                if part.edges:
                    edges = [
                        Edge.of(e.collection, e.from_, e.to, e.key, e.properties)
                        for e in part.edges
                    ]
                    written["edges"] = await self.graphs.upsert_edges(principal, ctx, edges)
                return written
            if part.vertex_id is not None:
                found, edges_deleted = await self.graphs.delete_vertex(
                    principal, ctx, part.vertex_id
                )
                return {"deleted": found, "edges_deleted": edges_deleted}
            assert part.edge_id is not None
            return {"deleted": await self.graphs.delete_edge(principal, ctx, part.edge_id)}
        raise DatabaseServiceError(f"no applier for {type(part).__name__}")

    async def _key_value(self, entry_id: int | None, tenant_id: str, part: KeyValuePart) -> Any:
        command = part.command()
        store = self.key_values
        assert command.key is not None
        if command.operation == "set":
            assert command.value is not None
            await store.set(tenant_id, command.key, command.value, ttl_ms=command.ttl_ms)
            return True
        if command.operation == "delete":
            return await store.delete(tenant_id, command.key)
        if command.operation == "expire":
            assert command.ttl_ms is not None
            return await store.expire(tenant_id, command.key, command.ttl_ms)
        # incr: exactly once, whatever happens between the store and the mark.
        assert entry_id is not None  # key-value writes always go through the outbox
        number, _ = await store.incr_once(
            tenant_id, command.key, 1 if command.by is None else command.by, f"outbox:{entry_id}"
        )
        return number


class _Unexpected(DatabaseServiceError):
    """An applier's error that is not one of ours (a bug): retried with backoff, then failed."""

    code = "internal"


def _transient(exc: BaseException) -> bool:
    """A failure the store may get over (the entry stays pending and is tried again): the store
    unreachable, a timeout, PostgreSQL's serialization failures, cancels and lack of resources."""
    if isinstance(exc, Unavailable | TimeoutError | _Unexpected):
        return True
    sqlstate = exc.sqlstate if isinstance(exc, QueryError) else None
    return sqlstate is not None and (sqlstate[:2] in {"40", "53"} or sqlstate == "57014")


class Outbox:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        control_schema: str,
        appliers: StoreAppliers,
        metrics: OutboxMetrics,
        max_attempts: int = 10,
        backoff_base_seconds: float = 1.0,
        backoff_max_seconds: float = 300.0,
        apply_timeout_seconds: float = 10.0,
        batch: int = 100,
        concurrency: int = 2,
    ) -> None:
        control = quote_ident(control_schema)
        self._table = f"{control}.multidb_outbox"
        self._record_sql = f"SELECT {control}.multidb_record($1::uuid, $2, $3, $4::text::jsonb, $5)"
        self._pool = pool
        self.appliers = appliers
        self.metrics = metrics
        self.max_attempts = max_attempts
        self._backoff_base = backoff_base_seconds
        self._backoff_max = backoff_max_seconds
        self._timeout = apply_timeout_seconds
        self._batch = batch
        self._concurrency = max(1, concurrency)  # entries applied at once (the pool's size)
        self.pending = 0
        self.oldest_pending_seconds: float | None = None
        self.failed_entries = 0
        self.checked_at: float | None = None
        delay = os.environ.get(APPLY_DELAY_ENV)
        self.apply_delay = float(delay) if delay else 0.0

    def collector(self) -> Collector:
        return _Gauges(self)

    # --- recording (the tenant's connection, in its transaction) ----------------------------

    async def record(
        self,
        session: OwnSession,
        operation_id: uuid.UUID,
        entries: Sequence[tuple[str, str, Mapping[str, Any]]],
    ) -> list[int]:
        """One row per (store, part name, operation document), on the tenant's connection in
        its transaction; their ids, in order."""
        ids = []
        for store, part, op in entries:
            async with session.watch.statement():
                entry = await session.conn.fetchval(
                    self._record_sql,
                    operation_id,
                    store,
                    part,
                    dumps(op).decode(),  # as text: the document, not a string holding it
                    self.appliers.target(store),
                )
            ids.append(int(entry))
        return ids

    def recorded(self, stores: Iterable[str]) -> None:
        """Count entries once their transaction committed."""
        for store in stores:
            self.metrics.recorded.labels(store).inc()

    # --- applying (the owner's pool) --------------------------------------------------------

    def _backoff(self, attempts: int) -> float:
        return float(min(self._backoff_max, self._backoff_base * 2 ** max(0, attempts - 1)))

    async def apply(self, entry_id: int) -> EntryOutcome:
        """Apply one entry if it is pending and nobody else holds it; what became of it."""
        if self.apply_delay:
            await asyncio.sleep(self.apply_delay)  # the test hook (APPLY_DELAY_ENV)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                # As text: parsed here, where JSON too deep for any reader fails this entry
                # alone (the pool's jsonb codec would fail the fetch, and the applier with it).
                f"SELECT id, tenant_id, store, op::text AS op, attempts, created_at"
                f" FROM {self._table}"
                " WHERE id = $1 AND status = 'pending' AND store || ':' || target = ANY($2)"
                " FOR UPDATE SKIP LOCKED",
                entry_id,
                self.appliers.accepted(),
            )
            if row is None:
                return await self._current(conn, entry_id)
            return await self._apply_locked(conn, row)

    async def _current(self, conn: Connection, entry_id: int) -> EntryOutcome:
        row = await conn.fetchrow(
            f"SELECT id, store, status, last_error, result::text AS result FROM {self._table}"
            " WHERE id = $1",
            entry_id,
        )
        if row is None:
            return EntryOutcome(entry_id, "", "failed", "the entry no longer exists")
        if row["status"] == "pending":
            return EntryOutcome(entry_id, row["store"], "pending", "being applied elsewhere")
        result = _document(row["result"])
        return EntryOutcome(entry_id, row["store"], row["status"], row["last_error"], None, result)

    async def _apply_locked(self, conn: Connection, row: asyncpg.Record) -> EntryOutcome:
        entry_id, store, tenant_id = int(row["id"]), str(row["store"]), str(row["tenant_id"])
        attempts = int(row["attempts"]) + 1
        try:
            part = outbox_operation(store, _document(row["op"], strict=True))
        except DatabaseServiceError as exc:
            return await self._fail(conn, entry_id, store, attempts, exc.error_code, exc.message)
        except (ValueError, TypeError, RecursionError) as exc:
            # A row no request could have recorded (a tenant's direct login may call
            # multidb_record with any JSON): it can never apply, and must not stop the applier
            # on its way to every other tenant's entries.
            reason = f"the entry's operation is not a valid part ({type(exc).__name__})"
            return await self._fail(conn, entry_id, store, attempts, "invalid_request", reason)
        try:
            async with asyncio.timeout(self._timeout):
                result = await self.appliers.apply(entry_id, tenant_id, part)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            # PostgreSQL's errors through the shared mapping: unreachable is Unavailable, any
            # other keeps its SQLSTATE, which ``_transient`` reads (a deadlock is tried again, a
            # constraint violation is the entry's own failure).
            if postgres_unreachable(exc) or isinstance(exc, OSError):
                exc = Unavailable(f"a store was unreachable ({type(exc).__name__})")
            elif isinstance(exc, asyncpg.PostgresError):
                exc = QueryError(str(exc), sqlstate=exc.sqlstate)
            elif not isinstance(exc, DatabaseServiceError | TimeoutError):
                # A store's error nothing translated (a bug): logged with its traceback, and
                # tried again later like a transient failure, so it holds up nobody meanwhile.
                log.exception("outbox entry %d (%s): unexpected error", entry_id, store)
                exc = _Unexpected(f"unexpected error applying the entry ({type(exc).__name__})")
            if not _transient(exc):
                assert isinstance(exc, DatabaseServiceError)
                # The store refused the operation itself: trying again would not change that.
                return await self._fail(
                    conn, entry_id, store, attempts, exc.error_code, exc.message
                )
            code = exc.error_code if isinstance(exc, DatabaseServiceError) else "timeout"
            reason = exc.message if isinstance(exc, DatabaseServiceError) else "timed out"
            if attempts >= self.max_attempts:
                return await self._fail(conn, entry_id, store, attempts, code, reason)
            await conn.execute(
                f"UPDATE {self._table} SET attempts = $2, last_error = $3,"
                " next_attempt_at = clock_timestamp() + $4 * interval '1 second' WHERE id = $1",
                entry_id,
                attempts,
                _error_text(f"{code}: {reason}"),
                self._backoff(attempts),
            )
            self.metrics.retried.labels(store, code).inc()
            return EntryOutcome(entry_id, store, "pending", reason, code)
        document = json_result(result)
        applied_at = await conn.fetchval(
            f"UPDATE {self._table} SET status = 'applied', attempts = $2, last_error = NULL,"
            " result = $3::text::jsonb, applied_at = clock_timestamp() WHERE id = $1"
            " RETURNING applied_at - created_at",
            entry_id,
            attempts,
            dumps(document).decode(),
        )
        self.metrics.applied.labels(store).inc()
        if isinstance(applied_at, dt.timedelta):
            self.metrics.lag.labels(store).observe(applied_at.total_seconds())
        return EntryOutcome(entry_id, store, "applied", result=document)

    async def _fail(
        self, conn: Connection, entry_id: int, store: str, attempts: int, code: str, reason: str
    ) -> EntryOutcome:
        await conn.execute(
            f"UPDATE {self._table} SET status = 'failed', attempts = $2, last_error = $3"
            " WHERE id = $1",
            entry_id,
            attempts,
            _error_text(f"{code}: {reason}"),
        )
        self.metrics.failed.labels(store, code).inc()
        log.warning("outbox entry %d (%s) failed: %s: %s", entry_id, store, code, reason)
        return EntryOutcome(entry_id, store, "failed", reason, code)

    async def apply_now(self, entry_ids: Sequence[int]) -> list[EntryOutcome]:
        """A request's own entries, right after its commit, in order. The operation has
        committed: PostgreSQL lost now leaves its entries pending (the background applier takes
        them once it is back), never an error for the call."""
        outcomes = []
        for entry_id in entry_ids:
            try:
                outcomes.append(await self.apply(entry_id))
            except DRIVER_ERRORS as exc:
                log.warning("outbox entry %d left for the background applier: %s", entry_id, exc)
                outcomes.append(
                    EntryOutcome(
                        entry_id,
                        "",
                        "pending",
                        "PostgreSQL was unreachable after the commit; applied later",
                        "unavailable",
                    )
                )
        return outcomes

    async def apply_due(self) -> int:
        """Apply entries whose time has come (leftovers of a crash, retries); how many.

        Taken in turns across tenants (every tenant's oldest, then every tenant's second…) and
        applied one at a time per tenant, several tenants at once (``concurrency``): one
        tenant's slow entries (a store timing out on its writes, a table it keeps locked) or
        thousands of them hold up no other tenant's, as they did when the batch was one queue
        in id order."""
        rows = await self._pool.fetch(
            "SELECT id, tenant_id FROM (SELECT id, tenant_id,"
            " row_number() OVER (PARTITION BY tenant_id ORDER BY id) AS turn"
            f" FROM {self._table} WHERE status = 'pending'"
            " AND next_attempt_at <= clock_timestamp()"
            " AND store || ':' || target = ANY($2)) AS due ORDER BY turn, id LIMIT $1",
            self._batch,
            self.appliers.accepted(),
        )
        queues: dict[str, list[int]] = {}
        for row in rows:
            queues.setdefault(str(row["tenant_id"]), []).append(int(row["id"]))
        gate = asyncio.Semaphore(self._concurrency)
        done = 0

        async def tenant_queue(ids: list[int]) -> None:
            nonlocal done
            for entry_id in ids:
                async with gate:
                    try:
                        outcome = await self.apply(entry_id)
                    except asyncpg.PostgresError:
                        # This entry's statement failed, not PostgreSQL: the others still go.
                        log.exception("outbox entry %d could not be applied or marked", entry_id)
                        continue
                done += outcome.status == "applied"

        results = await asyncio.gather(
            *(tenant_queue(ids) for ids in queues.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result  # PostgreSQL unreachable: the loop's to report
        return done

    async def refresh_figures(self) -> None:
        row = await self._pool.fetchrow(
            f"SELECT count(*) FILTER (WHERE status = 'pending') AS pending,"
            " count(*) FILTER (WHERE status = 'failed') AS failed,"
            " extract(epoch FROM clock_timestamp() - min(created_at)"
            "   FILTER (WHERE status = 'pending'))::float8 AS oldest"
            f" FROM {self._table} WHERE status <> 'applied'"
        )
        assert row is not None
        self.pending = int(row["pending"])
        self.failed_entries = int(row["failed"])
        self.oldest_pending_seconds = row["oldest"]
        self.checked_at = time.time()

    async def run_forever(
        self, interval_seconds: float = 1.0, keep_applied_seconds: float = 86400.0
    ) -> None:
        """The background applier: leftovers after a crash or a restart, and retries; now and
        then (every 10 minutes) applied entries past their retention are deleted."""
        purged_at = 0.0
        while True:
            try:
                while await self.apply_due() >= self._batch:
                    pass  # more are due
                await self.refresh_figures()
                if time.monotonic() - purged_at > 600:
                    await self.purge_applied(keep_applied_seconds)
                    purged_at = time.monotonic()
            except DRIVER_ERRORS as exc:
                log.warning("outbox applier: PostgreSQL unreachable: %s", exc)
            await asyncio.sleep(interval_seconds)

    async def purge_applied(self, older_than_seconds: float) -> int:
        """Applied entries are history once the applier's figures no longer need them."""
        status = await self._pool.execute(
            f"DELETE FROM {self._table} WHERE status = 'applied'"
            " AND applied_at < clock_timestamp() - $1 * interval '1 second'",
            older_than_seconds,
        )
        return int(str(status).split()[-1])

    def status(self) -> dict[str, Any]:
        """The health document's section."""
        return {
            "pending": self.pending,
            "oldest_pending_seconds": (
                None
                if self.oldest_pending_seconds is None
                else round(self.oldest_pending_seconds, 3)
            ),
            "failed": self.failed_entries,
            "max_attempts": self.max_attempts,
            "checked_at": self.checked_at,
        }

    # --- administration (the use case authorizes) -------------------------------------------

    async def entries(
        self, tenant_id: str, *, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        rows = await self._pool.fetch(
            f"SELECT id, operation_id, store, part, op::text AS op, status, attempts, last_error,"
            " next_attempt_at, created_at, applied_at"
            f" FROM {self._table} WHERE tenant_id = $1 AND ($2::text IS NULL OR status = $2)"
            " ORDER BY id DESC LIMIT $3",
            tenant_id,
            status,
            limit,
        )
        return [
            {
                "id": int(r["id"]),
                "operation_id": str(r["operation_id"]),
                "store": r["store"],
                "part": r["part"],
                "operation": _document(r["op"]),
                "status": r["status"],
                "attempts": r["attempts"],
                "last_error": r["last_error"],
                "next_attempt_at": r["next_attempt_at"].isoformat(),
                "created_at": r["created_at"].isoformat(),
                "applied_at": None if r["applied_at"] is None else r["applied_at"].isoformat(),
            }
            for r in rows
        ]

    async def retry(self, tenant_id: str, entry_ids: Sequence[int] | None) -> list[int]:
        """Failed entries of ``tenant_id`` (those of ``entry_ids``, or all) pending again, with
        their attempts from zero; the ids made pending. Another tenant's ids match nothing."""
        rows = await self._pool.fetch(
            f"UPDATE {self._table} SET status = 'pending', attempts = 0,"
            " next_attempt_at = clock_timestamp()"
            " WHERE tenant_id = $1 AND status = 'failed' AND ($2::bigint[] IS NULL OR id = ANY($2))"
            " RETURNING id",
            tenant_id,
            None if entry_ids is None else list(entry_ids),
        )
        return sorted(int(r["id"]) for r in rows)

    async def operation_entries(self, operation_id: uuid.UUID) -> list[int]:
        rows = await self._pool.fetch(
            f"SELECT id FROM {self._table} WHERE operation_id = $1 ORDER BY id", operation_id
        )
        return [int(r["id"]) for r in rows]


def _document(text: str | None, *, strict: bool = False) -> Any:
    """A jsonb column read as text, parsed. Rows written by earlier versions hold a JSON string
    with the document's text in it: unwrapped. One no reader takes (a forged entry's operation
    nested thousands deep) raises ``ValueError`` when ``strict`` (the applier fails that
    entry), else is shown as what it is rather than failing the listing."""
    if text is None:
        return None
    try:
        value = orjson.loads(text)
        if isinstance(value, str) and value[:1] in ("{", "["):
            value = orjson.loads(value)
    except orjson.JSONDecodeError:
        if strict:
            raise
        return {"unreadable": "not JSON this service reads (nested too deeply)"}
    return value


def _error_text(text: str) -> str:
    """A reason as PostgreSQL text can hold it: a store's message may echo a caller's bytes
    (NUL, a lone surrogate), and an UPDATE that fails on them would leave the entry to be
    picked first again and again."""
    clean = text.replace("\x00", "\\0")[:1000]
    return clean.encode("utf-8", "replace").decode("utf-8")


def json_result(value: Any) -> Any:
    """A store's answer as JSON (the outbox keeps it; the caller gets it)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): json_result(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_result(v) for v in value]
    with contextlib.suppress(TypeError):
        orjson.dumps(value)
        return value
    return str(value)
