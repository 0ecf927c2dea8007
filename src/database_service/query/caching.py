"""The result cache on the query path: which reads are cached, under which key, and what a write
invalidates (the cache itself is ``database_service.cache``).

A read is cached only when the caller asks (``CacheOptions.ttl_ms``, capped by the settings)
and the statement is safe to cache (``cache.policy``: a SELECT calling only immutable functions,
every relation it reads known). Everything that happens before PostgreSQL sees a statement —
authentication, the tenant's state, the SQL guard, scopes — happens for a hit too; the cache
only replaces the round trip.

The key (``cache.keys.result_key``) is the tenant, the user id row-level security sees, the
statement's canonical text, the typed parameters, the front end's encoding of the result
(``CacheOptions.form``: gRPC packed, gRPC values, REST JSON) and the tenant's schema. Every
entry also depends on the tenant's ``#ddl`` generation, which DDL through the service moves on
(cluster-wide, like any other invalidation): a table's new shape is never answered with its
old one. The payload is that front end's encoded answer, so a hit
costs no re-encoding.

Writes: the query core calls ``written`` after every committed write (a statement, a
transaction, a bulk load) with the relations named in it, before the caller hears of the
commit: this process never serves a result older than a write it acknowledged. Other processes
and instances learn of it from PostgreSQL's notifications (every write, whoever makes it: the
triggers of control migration 0009) or from Redis (when configured), within the measured
invalidation lag. TTL bounds the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import pglast
from pglast import ast
from pglast.visitors import Visitor

from database_service.cache import (
    CachedResult,
    CachePolicy,
    Generations,
    ResultCache,
    Snapshot,
    UncacheableParameter,
    parameters_cacheable,
    result_key,
)
from database_service.errors import Unavailable
from database_service.observability.metrics import Metrics
from database_service.query.pointkeys import (
    KEY_TYPES,
    KEYED,
    key_text,
    keyed_write,
    point_read,
    row_name,
)
from database_service.query.replays import KEPT_READS, shared_texts
from database_service.results import CacheInfo, QueryResult, StatementKind
from database_service.tenancy import TenantRecord, quote_ident

__all__ = ["CacheOptions", "CacheRules", "ReadPlan", "ResultCaching", "written_relations"]

log = logging.getLogger(__name__)

_DDL = frozenset({"#ddl"})  # the tenant's DDL through the service: every entry depends on it
_Key = tuple[tuple[str, str], ...]  # a primary key's (column, format_type) in order
_KEYS_TTL_S = 30.0
_KEYS_MAX = 4096
# Read plans (``ReadPlan``; how many: ``kept_plans``, the setting cache_kept_reads): for how
# long, for statements up to what length, and for parameters of which exact types (values of
# other types can be equal across types — 1 == 1.0 == True — and must never share a plan: each
# has a key of its own). A plan lasts as long as the table key it was derived from
# (``_KEYS_TTL_S``): a point read keeps being named as the writes name its row. (5 s until
# 2026-12-05: a hot key's plan was made again every 5 s, and a read that repeats less often
# than that was never answered by a replay.)
_PLAN_TTL_S = _KEYS_TTL_S
_PLAN_MAX_SQL = 2048
_PLAN_TYPES = frozenset({str, int, type(None)})
# A table's primary key columns and types, and whether rows of other tables are read with it
# (an inheritance parent: a point read of it is not one table's key). Empty: no such table, a
# view, or no primary key.
_PRIMARY_KEY_SQL = """
SELECT a.attname AS name, format_type(a.atttypid, NULL) AS type,
       c.relkind = 'r' AND c.relhassubclass AS inherited
FROM pg_class c
JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
WHERE c.oid = to_regclass($1)
ORDER BY k.ord
"""


@dataclass(slots=True)
class TableKey:
    """A table's primary key as read from the catalogue (None: its point reads are not keyed)
    and until when it is trusted (``time.monotonic()``). Read again then: when it is unchanged
    the same object is trusted for another ``_KEYS_TTL_S``, so the plans made from it stay
    valid; when it changed, another object replaces it and theirs have expired."""

    key: _Key | None
    until: float


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """What ``ResultCaching.read`` derives from a request before it looks in the cache: its
    key, the generation names it depends on and its TTL. The same request (tenant, schema,
    user, statement, form, TTL, schema generation and parameters, typed) derives the same again
    until the inputs it read from outside the request may have changed: for a point read, the
    table's primary key (``table``: as long as it is read again unchanged); for the others,
    the policy's catalogue (views), so those are kept for ``_PLAN_TTL_S`` (``until``)."""

    key: str
    relations: frozenset[str]
    names: tuple[tuple[str, str], ...]  # Generations.names of the relations
    ttl_ms: int
    until: float  # time.monotonic()
    table: TableKey | None = None

    def valid(self, now: float) -> bool:
        """Whether the plan may still be used at ``now`` (``time.monotonic()``)."""
        table = self.table
        return (self.until if table is None else table.until) > now


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """What a caller asked of the cache for one read, and how its front end encodes a result."""

    ttl_ms: int = 0  # 0: not cached (the stale fallback may still answer)
    allow_stale: bool = False  # when PostgreSQL is unreachable, the last cached answer
    form: str = ""  # the front end's encoding: part of the key
    encode: Callable[[QueryResult], bytes] | None = None


class _Relations(Visitor):
    def __init__(self) -> None:
        self.names: list[tuple[str | None, str]] = []

    def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> None:
        self.names.append((node.schemaname, node.relname or ""))


def written_relations(sql: str, own_schema: str, shared_schema: str) -> frozenset[str]:
    """Every relation a write statement names, as ``schema.relation`` (an unqualified name as
    both the tenant's and the shared schema's: the search path picks one, invalidating both
    costs a miss at most). More than it writes (the relations it reads too): only misses."""
    try:
        tree = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return frozenset()
    walk = _Relations()
    for raw in tree:
        walk(raw)
    relations: set[str] = set()
    for schema, name in walk.names:
        if schema is None:
            relations.update((f"{own_schema}.{name}", f"{shared_schema}.{name}"))
        else:
            relations.add(f"{schema}.{name}")
    return frozenset(relations)


class CacheRules:
    """Each tenant's rules (control table ``cache_rules``: table name -> TTL), held in memory
    and read again every ``refresh_s`` (another instance's change takes effect within it; this
    instance's at once). ``ttl_ms``: what a read of ``relations`` is cached for by the rules —
    when every table it reads has a rule, the smallest TTL; else 0."""

    def __init__(self, pool: asyncpg.Pool, *, control_schema: str, refresh_s: float = 5.0) -> None:
        self._pool = pool
        self._table = f"{quote_ident(control_schema)}.cache_rules"
        self._refresh_s = refresh_s
        self._rules: dict[str, dict[str, int]] = {}
        self._loaded_at = -1e9
        self._loading = False

    def has_rules(self, tenant_id: str) -> bool:
        """Cheap, for the front ends' fast path (no rules: the cache is not consulted)."""
        self._refresh_soon()
        return tenant_id in self._rules

    def ttl_ms(self, tenant_id: str, relations: frozenset[str]) -> int:
        rules = self._rules.get(tenant_id)
        if not rules or not relations:
            return 0
        # "schema.table" (an unqualified name is listed as the tenant's and the shared one:
        # one of them is what PostgreSQL reads, and the rule names the table, not the schema).
        tables = {r.rsplit(".", 1)[-1] for r in relations if not r.startswith("#")}
        ttls = [rules.get(t) for t in tables]
        return min(t for t in ttls if t is not None) if tables and all(ttls) else 0

    def rules(self, tenant_id: str) -> dict[str, int]:
        return dict(self._rules.get(tenant_id, {}))

    async def load(self) -> None:
        rows = await self._pool.fetch(f"SELECT tenant_id, relation, ttl_ms FROM {self._table}")
        rules: dict[str, dict[str, int]] = {}
        for row in rows:
            rules.setdefault(row["tenant_id"], {})[row["relation"]] = row["ttl_ms"]
        self._rules = rules
        self._loaded_at = time.monotonic()

    async def replace(self, tenant_id: str, rules: dict[str, int]) -> None:
        """The tenant's rules, all of them, in one transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(f"DELETE FROM {self._table} WHERE tenant_id = $1", tenant_id)
            await conn.executemany(
                f"INSERT INTO {self._table} (tenant_id, relation, ttl_ms) VALUES ($1, $2, $3)",
                [(tenant_id, relation, ttl) for relation, ttl in rules.items()],
            )
        await self.load()

    def _refresh_soon(self) -> None:
        if self._loading or time.monotonic() - self._loaded_at < self._refresh_s:
            return
        self._loading = True

        async def refresh() -> None:
            try:
                await self.load()
            except Exception as exc:  # PostgreSQL away: keep the rules held, try again later
                log.debug("cache rules not reloaded: %s", exc)
                self._loaded_at = time.monotonic()
            finally:
                self._loading = False

        task = asyncio.get_running_loop().create_task(refresh())
        _REFRESHING.add(task)
        task.add_done_callback(_REFRESHING.discard)


_REFRESHING: set[asyncio.Task[None]] = set()  # strong references to running reloads


class ResultCaching:
    """The cache as the query core uses it."""

    def __init__(
        self,
        cache: ResultCache,
        policy: CachePolicy,
        metrics: Metrics,
        *,
        catalog: asyncpg.Pool,
        rules: CacheRules,
        shared_schema: str,
        max_ttl_ms: int,
        stale_max_age_s: float,
        kept_plans: int = KEPT_READS,
    ) -> None:
        self._catalog = catalog
        self.rules = rules
        # Per (schema, table, schema generation): its primary key's (column, type) when point
        # reads of it can be keyed (query/pointkeys.py), else None. Bounded; a table's key
        # changed by DDL outside the service is picked up after ``_KEYS_TTL_S``, when the key is
        # read again (``TableKey``).
        self._keys: OrderedDict[tuple[str, str, int], TableKey] = OrderedDict()
        self.cache = cache
        self.policy = policy
        self._metrics = metrics
        self._shared = shared_schema
        self._max_ttl_ms = max_ttl_ms
        self._stale_max_age_s = stale_max_age_s
        self._request_counters: dict[str, Any] = {}
        self._plans: OrderedDict[tuple[Any, ...], ReadPlan] = OrderedDict()
        self._plans_max = kept_plans

    def _counted(self, status: str, count: int = 1) -> None:
        """``count`` cache requests of ``status`` (the labelled child kept: ``labels()``
        locks)."""
        counter = self._request_counters.get(status)
        if counter is None:
            counter = self._request_counters[status] = self._metrics.cache_requests.labels(status)
        counter.inc(count)

    def replays_booked(self, count: int) -> None:
        """``count`` hits ``replayed`` answered, counted together (``QueryExecutor.book``)."""
        self._counted("hit", count)

    async def read(
        self,
        tenant: TenantRecord,
        user_id: str | None,
        sql: str,
        params: Sequence[Any],
        options: CacheOptions,
        schema_generation: int,
        load: Callable[[], Awaitable[QueryResult]],
        planned: Callable[[ReadPlan], None] | None = None,
    ) -> QueryResult:
        """The answer from the cache, or ``load``'s (stored when it may be). ``planned``: told
        the read's plan when the answer is a hit or was stored (what ``replayed`` takes)."""
        plan_key = None
        if (
            options.ttl_ms > 0
            and options.encode is not None
            and len(sql) <= _PLAN_MAX_SQL
            and all(type(p) in _PLAN_TYPES for p in params)
            # The key holds them: kept plans are bounded by entries, not by what callers send.
            and sum(len(p) for p in params if type(p) is str) <= _PLAN_MAX_SQL
        ):
            plan_key = (
                tenant.tenant_id, tenant.schema_name, user_id, sql, options.form, options.ttl_ms,
                schema_generation, tuple(params),
            )  # fmt: skip
            plan = self._plans.get(plan_key)
            if plan is not None:
                if plan.valid(time.monotonic()):
                    self._plans.move_to_end(plan_key)
                    return await self._cached(tenant, plan, options, load, planned)
                del self._plans[plan_key]
        key = self._key(tenant, user_id, sql, params, options, schema_generation)
        verdict = self.policy.analyse(sql, tenant.schema_name)
        ttl_ms = options.ttl_ms
        if ttl_ms == 0 and verdict.cacheable:
            ttl_ms = self.rules.ttl_ms(tenant.tenant_id, verdict.relations)
        ttl_ms = min(ttl_ms, self._max_ttl_ms)
        if ttl_ms <= 0 or options.encode is None:  # only the stale fallback asked for
            return await self._loaded(tenant, key, options, load, CacheInfo("off"))
        if not verdict.cacheable:
            return await self._loaded(
                tenant, key, options, load, CacheInfo("bypass", verdict.code, verdict.reason)
            )
        if key is None or not parameters_cacheable(params):
            reason = "a parameter is of a type or value that is not cached"
            return await self._loaded(
                tenant, key, options, load, CacheInfo("bypass", "parameters", reason)
            )
        relations = verdict.relations
        until = time.monotonic() + _PLAN_TTL_S
        table = None
        point = await self._point_names(tenant, sql, params, schema_generation)
        if point is not None:
            # This key's rows: other rows' writes leave it alone. Named after the table's key
            # as it is kept now: valid while that is (a write reads the key again too).
            relations, table = point
        relations = relations | _DDL
        names = Generations.names(tenant.tenant_id, relations)
        plan = ReadPlan(key, relations, names, ttl_ms, until, table)
        if plan_key is not None:
            self._plans[shared_texts(plan_key)] = plan
            if len(self._plans) > self._plans_max:
                self._plans.popitem(last=False)
        else:
            planned = None  # a plan that is not kept is not replayed either
        return await self._cached(tenant, plan, options, load, planned)

    def replayed(self, tenant_id: str, plan: ReadPlan) -> CachedResult | None:
        """The hit ``read`` would answer for ``plan`` (from a read it told ``planned``), when it
        is in this process's L1 and fresh, without awaiting anything; else None (``read``
        decides, L2 and PostgreSQL included). Counted as a hit like ``read``'s, by the caller
        (``replays_booked``: with the others of the next few milliseconds)."""
        if not plan.valid(time.monotonic()):
            return None
        return self.cache.local_unchanged(tenant_id, plan.key, plan.names)

    async def _cached(
        self,
        tenant: TenantRecord,
        plan: ReadPlan,
        options: CacheOptions,
        load: Callable[[], Awaitable[QueryResult]],
        planned: Callable[[ReadPlan], None] | None = None,
    ) -> QueryResult:
        """A cacheable read, planned: from the cache, else loaded and stored."""
        tenant_id, key, relations, ttl_ms = tenant.tenant_id, plan.key, plan.relations, plan.ttl_ms
        # L1 first, without a snapshot: one whose names the mirror no longer holds is still
        # served without reading them from Redis when they cannot have changed.
        hit = self.cache.local_unchanged(tenant_id, key, plan.names)
        snapshot: Snapshot | None = None
        if hit is None:
            snapshot = await self.cache.snapshot_of(tenant_id, plan.names)
            if snapshot is None:
                reason = (
                    "the relations' generation numbers cannot be trusted now (Redis slow, down"
                    " or reconnecting): served from PostgreSQL"
                )
                return await self._loaded(
                    tenant, key, options, load, CacheInfo("bypass", "detached", reason)
                )
            # L1 again only when it held an entry ``local_unchanged`` could not judge.
            held = (tenant_id, key) in self.cache.local
            hit = await self.cache.lookup(tenant_id, key, relations, snapshot=snapshot, local=held)
        if hit is not None:
            self._counted("hit")
            if planned is not None:
                planned(plan)
            return _answer(hit.payload, CacheInfo("hit", age_ms=hit.age_s() * 1000))
        assert snapshot is not None  # taken above: a hit without one has been answered

        async def fill() -> bytes:
            result = await load()
            encode = options.encode
            assert encode is not None  # checked above
            payload = encode(result)
            await self.cache.fill(tenant_id, key, snapshot, payload, ttl_ms / 1000)
            return payload

        try:
            payload = await self.cache.local.single_flight((tenant_id, key), fill)
        except Unavailable:
            stale = await self._stale(tenant, key, options)
            if stale is None:
                raise
            return stale
        self._counted("miss")
        if planned is not None:
            planned(plan)
        return _answer(payload, CacheInfo("miss"))

    async def written(
        self,
        tenant: TenantRecord,
        sql: str,
        params: Sequence[Any],
        schema_generation: int,
        *,
        ddl: bool = False,
    ) -> None:
        """A statement committed through this process: results that read what it wrote are
        invalid here when this returns (by key for a keyed write of a keyed table)."""
        relations = written_relations(sql, tenant.schema_name, self._shared)
        names = set(relations)
        if ddl:
            names |= _DDL
        keyed = await self._written_rows(tenant, sql, params, schema_generation)
        if keyed is None:
            names.update(f"{r}{KEYED}" for r in relations)
        else:
            names.update(keyed)
        await self._invalidate(tenant, frozenset(names))

    async def written_table(self, tenant: TenantRecord, relation: str) -> None:
        """A bulk load into ``relation`` (``schema.table``): every read of it."""
        await self._invalidate(tenant, frozenset({relation, f"{relation}{KEYED}"}))

    async def _invalidate(self, tenant: TenantRecord, names: frozenset[str]) -> None:
        if names:
            started = time.perf_counter()
            await self.cache.invalidate(tenant.tenant_id, names)
            self._metrics.cache_invalidations.labels("write").inc()
            self._metrics.cache_invalidate_seconds.observe(time.perf_counter() - started)

    async def _point_names(
        self, tenant: TenantRecord, sql: str, params: Sequence[Any], generation: int
    ) -> tuple[frozenset[str], TableKey] | None:
        """The generation names a point read depends on, and the table key they were derived
        from (they may be used while it is trusted); None: not a point read."""
        read = point_read(sql)
        if read is None:
            return None
        resolved = await self._table_key(tenant, read.schema, read.table, generation)
        if resolved is None:
            return None
        relation, key, table = resolved
        text = key_text(key, read.equal, params)
        if text is None:
            return None
        return frozenset({f"{relation}{KEYED}", row_name(relation, text)}), table

    async def _written_rows(
        self, tenant: TenantRecord, sql: str, params: Sequence[Any], generation: int
    ) -> set[str] | None:
        """The row names a keyed write wrote, or None when its rows are not known."""
        write = keyed_write(sql)
        if write is None:
            return None
        resolved = await self._table_key(tenant, write.schema, write.table, generation)
        if resolved is None:
            return None
        relation, key, _ = resolved
        columns = frozenset(c for c, _ in key)
        if write.set_columns & columns:
            return None  # a key changed: its new value is in the data
        if write.conflict_arbiter is not None and write.conflict_arbiter != columns:
            return None  # the row updated holds another unique value, any key
        names = {relation}
        for row in write.rows:
            text = key_text(key, row, params)
            if text is None:
                return None
            names.add(row_name(relation, text))
        return names

    async def _table_key(
        self, tenant: TenantRecord, schema: str | None, table: str, generation: int
    ) -> tuple[str, _Key, TableKey] | None:
        """The tenant's own table ``table`` (as the tenant's search path finds it), its
        primary key when its point reads can be keyed, and the ``TableKey`` it is kept as."""
        own = tenant.schema_name
        if schema not in (None, own):
            return None  # shared tables (and anything else): per table
        cache_key = (own, table, generation)
        now = time.monotonic()
        kept = self._keys.get(cache_key)
        if kept is None or kept.until < now:
            key = await self._load_key(own, table)
            now = time.monotonic()
            kept = self._keys.get(cache_key)  # as it is after the catalogue's answer
            if kept is not None and kept.key == key:
                # Unchanged: trusted again, with every plan made from it (before, each plan
                # expired with the key it was made from, all of a table's at the same moment:
                # every point read of a key read less often than every 30 s went the whole way).
                kept.until = max(kept.until, now + _KEYS_TTL_S)
                self._keys.move_to_end(cache_key)
            else:
                kept = self._keys[cache_key] = TableKey(key, now + _KEYS_TTL_S)
                while len(self._keys) > _KEYS_MAX:
                    self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(cache_key)
        key = kept.key
        return None if key is None else (f"{own}.{table}", key, kept)

    async def _load_key(self, schema: str, table: str) -> _Key | None:
        rows = await self._catalog.fetch(
            _PRIMARY_KEY_SQL, f"{quote_ident(schema)}.{quote_ident(table)}"
        )
        if not rows or rows[0]["inherited"] or any(r["type"] not in KEY_TYPES for r in rows):
            return None
        return tuple((r["name"], r["type"]) for r in rows)

    def _key(
        self,
        tenant: TenantRecord,
        user_id: str | None,
        sql: str,
        params: Sequence[Any],
        options: CacheOptions,
        schema_generation: int,
    ) -> str | None:
        try:
            return result_key(
                tenant.tenant_id,
                user_id,
                sql,
                params,
                schema_version=f"{options.form}|{tenant.schema_name}",
            )
        except UncacheableParameter:
            return None

    async def _loaded(
        self,
        tenant: TenantRecord,
        key: str | None,
        options: CacheOptions,
        load: Callable[[], Awaitable[QueryResult]],
        info: CacheInfo,
    ) -> QueryResult:
        """Uncached; the stale fallback still answers when PostgreSQL is unreachable."""
        self._counted(info.status)
        try:
            result = await load()
        except Unavailable:
            stale = await self._stale(tenant, key, options)
            if stale is None:
                raise
            return stale
        result.cache = info
        return result

    async def _stale(
        self, tenant: TenantRecord, key: str | None, options: CacheOptions
    ) -> QueryResult | None:
        if not options.allow_stale or key is None:
            return None
        kept = await self.cache.stale(tenant.tenant_id, key, max_age_s=self._stale_max_age_s)
        if kept is None:
            return None
        self._counted("stale")
        log.info("tenant %s: PostgreSQL unreachable, a stale answer served", tenant.tenant_id)
        return _answer(kept.payload, CacheInfo("stale", age_ms=kept.age_s() * 1000, stale=True))


def _answer(payload: bytes, info: CacheInfo) -> QueryResult:
    """An answer that is already encoded by its front end (``payload``)."""
    return QueryResult(
        columns=[],
        rows=[],
        command="",
        row_count=0,
        kind=StatementKind.READ,
        duration_ms=0.0,
        payload=payload,
        cache=info,
    )
