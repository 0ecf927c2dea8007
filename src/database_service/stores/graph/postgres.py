"""The embedded graph: tables in the tenant's own schema, read and written as the tenant's own
login (``TenantPools``), every round trip under a time limit kept from outside the session
(``Deadlines``), as ingestion writes.

PostgreSQL is the boundary: the statements name the tenant's schema, and run on a login that
can reach no other schema, so no id, collection name or filter a caller sends can reach another
tenant's graph — at worst it names a vertex the tenant does not have. The tables are created on
the first write by the tenant's role (``CREATE … IF NOT EXISTS``: the tenant owns its graph as it
owns the tables it creates through SQL); a read before any write finds no tables and answers as
for an empty graph. Reads run in READ ONLY transactions on the analytics pool (a traversal is
not an order's connection), writes on OLTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import asyncpg

from database_service.errors import (
    GraphCollectionKind,
    GraphCollectionNotFound,
    InvalidParameters,
    QueryError,
    ResultTooLarge,
    VertexNotFound,
)
from database_service.postgres.deadlines import Deadlines, SessionWatch
from database_service.postgres.pools import Connection, TenantConnection, TenantPools, Workload
from database_service.query.boundary import postgres_errors
from database_service.query.executor import JOINED_SESSION
from database_service.stores.graph.model import (
    Edge,
    GraphLimits,
    Neighborhood,
    NeighborhoodGroup,
    PathResult,
    ShortestPath,
    TraversalHit,
    TraversalResult,
    Traverse,
    Vertex,
    split_id,
)
from database_service.stores.graph.sql import GraphSql
from database_service.tenancy import TenantRecord
from database_service.tenancy.secrets import TenantLogins

__all__ = ["PostgresGraphStore"]

log = logging.getLogger(__name__)

_UNDEFINED_TABLE = "42P01"
_CREATE_RACES = (
    asyncpg.UniqueViolationError,
    asyncpg.DuplicateTableError,
    asyncpg.DuplicateObjectError,
)


class _NoGraph(Exception):
    """The tenant has no graph tables (nothing written yet, or it dropped them)."""


class PostgresGraphStore:
    name = "postgresql"

    def __init__(
        self,
        pools: TenantPools,
        logins: TenantLogins,
        deadlines: Deadlines,
        limits: GraphLimits,
        *,
        transaction_ms: int,
    ) -> None:
        self._pools = pools
        self._logins = logins
        self._deadlines = deadlines
        self.limits = limits
        self._transaction_ms = transaction_ms
        self._ready: set[str] = set()  # tenants whose tables this process has made sure of
        self._sql: dict[str, GraphSql] = {}

    def _statements(self, tenant: TenantRecord) -> GraphSql:
        sql = self._sql.get(tenant.schema_name)
        if sql is None:
            sql = self._sql[tenant.schema_name] = GraphSql(tenant.schema_name)
        return sql

    @contextlib.asynccontextmanager
    async def _session(
        self, tenant: TenantRecord, *, readonly: bool, workload: Workload, transaction: bool = True
    ) -> AsyncIterator[tuple[Connection, SessionWatch]]:
        """A transaction as the tenant, each round trip under the graph's statement limit (never
        more than the tenant's own), the whole under the transaction limit. Without
        ``transaction``: one statement of ours that changes nothing (a read whose checks are in
        the same statement), with no BEGIN and COMMIT round trips and no session reset."""
        login = self._logins.login(tenant)
        statement_s = min(self.limits.statement_ms, tenant.limits.statement_timeout_ms) / 1000
        total_s = max(statement_s, self._transaction_ms / 1000)
        with postgres_errors(tenant.tenant_id):
            async with self._pools.acquire(login, workload) as conn:
                watch = self._deadlines.watch(
                    conn, login.role, statement_seconds=statement_s, total_seconds=total_s
                )
                if not transaction:
                    try:
                        yield conn, watch
                    finally:
                        watch.close()
                    cast(TenantConnection, conn).skip_next_reset()
                    return
                tx = conn.transaction(
                    isolation="repeatable_read" if readonly else "read_committed",
                    readonly=readonly,
                )
                try:
                    async with watch.statement():
                        await tx.start()
                    yield conn, watch
                    async with watch.statement():
                        await tx.commit()
                except BaseException:
                    if watch.expired is None and not conn.is_closed():
                        with contextlib.suppress(Exception):
                            await tx.rollback()
                    raise
                finally:
                    watch.close()

    @contextlib.asynccontextmanager
    async def _reading(
        self, tenant: TenantRecord, *, transaction: bool = False
    ) -> AsyncIterator[tuple[Connection, SessionWatch, GraphSql]]:
        session = self._session(
            tenant, readonly=True, workload="analytics", transaction=transaction
        )
        try:
            async with session as (c, w):
                yield c, w, self._statements(tenant)
        except QueryError as exc:
            if exc.sqlstate == _UNDEFINED_TABLE:
                self._ready.discard(tenant.tenant_id)
                raise _NoGraph from exc
            raise

    async def _ensure(self, tenant: TenantRecord) -> None:
        if tenant.tenant_id in self._ready:
            return
        sql = self._statements(tenant)
        for attempt in (1, 2):
            try:
                session = self._session(tenant, readonly=False, workload="oltp")
                async with session as (conn, w), w.statement():
                    await conn.execute(sql.create)
                break
            except QueryError as exc:
                # Two first writes at once: one CREATE wins, the other meets its catalog rows.
                if attempt == 2 or not isinstance(exc.__cause__, _CREATE_RACES):
                    raise
        self._ready.add(tenant.tenant_id)

    @staticmethod
    async def _create_joined(conn: Connection, sql: GraphSql) -> None:
        """The graph's tables, made inside a caller's transaction. Two first writes at once:
        both run the script, and the loser's catalog insert waits for the winner's transaction
        and fails (``unique_violation`` on ``pg_type``) once it has committed, so the tables
        exist by then. The script runs in a savepoint so that failure is undone alone and the
        caller's transaction goes on with the winner's tables, instead of failing whole."""
        try:
            async with conn.transaction():  # a savepoint: the caller's transaction is open
                await conn.execute(sql.create)
        except _CREATE_RACES:
            pass

    @contextlib.asynccontextmanager
    async def _writing(
        self, tenant: TenantRecord
    ) -> AsyncIterator[tuple[Connection, SessionWatch, GraphSql]]:
        joined = JOINED_SESSION.get()
        if joined is not None and joined.tenant.tenant_id == tenant.tenant_id:
            # Inside a multi-store operation's transaction: the tables made if need be and the
            # write done there, committed or rolled back with it (never marked ready here: a
            # rollback takes the CREATE with it).
            sql = self._statements(tenant)
            # Errors as the store's own sessions give them (its callers map 23503 and 42P01).
            with postgres_errors(tenant.tenant_id):
                if tenant.tenant_id not in self._ready:
                    # Made already (committed by an earlier write): the script is not run
                    # again, since its CREATE INDEX IF NOT EXISTS takes a SHARE lock on the
                    # tables inside this transaction, and two operations writing the graph at
                    # once then deadlocked on each other's row locks.
                    async with joined.watch.statement():
                        made = await joined.conn.fetchval(
                            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL"
                            " AND to_regclass($3) IS NOT NULL",
                            sql.collections,
                            sql.vertices,
                            sql.edges,
                        )
                        if made:
                            self._ready.add(tenant.tenant_id)
                        else:
                            await self._create_joined(joined.conn, sql)
                try:
                    yield joined.conn, joined.watch, sql
                except QueryError as exc:
                    if exc.sqlstate == _UNDEFINED_TABLE:
                        self._ready.discard(tenant.tenant_id)
                    raise
            return
        await self._ensure(tenant)
        try:
            async with self._session(tenant, readonly=False, workload="oltp") as (c, w):
                yield c, w, self._statements(tenant)
        except QueryError as exc:
            if exc.sqlstate == _UNDEFINED_TABLE:  # the tenant dropped them: made again next time
                self._ready.discard(tenant.tenant_id)
            raise

    # --- writes ---------------------------------------------------------------------------

    async def _register(
        self, conn: Connection, watch: SessionWatch, sql: GraphSql, names: set[str], kind: str
    ) -> None:
        async with watch.statement():
            rows = await conn.fetch(sql.register, sorted(names), kind)
        for row in rows:
            if row["kind"] != kind:
                raise GraphCollectionKind(
                    f"{row['name']!r} is a {row['kind']} collection, not a {kind} collection"
                )

    async def upsert_vertices(self, tenant: TenantRecord, vertices: Sequence[Vertex]) -> int:
        latest = {v.id: v for v in vertices}  # one row per id: the last given wins
        async with self._writing(tenant) as (conn, watch, sql):
            await self._register(
                conn, watch, sql, {v.collection for v in latest.values()}, "vertex"
            )
            async with watch.statement():
                await conn.execute(
                    sql.upsert_vertices,
                    [v.collection for v in latest.values()],
                    [v.key for v in latest.values()],
                    [v.properties for v in latest.values()],
                )
        return len(latest)

    async def upsert_edges(self, tenant: TenantRecord, edges: Sequence[Edge]) -> int:
        latest = {e.id: e for e in edges}
        try:
            async with self._writing(tenant) as (conn, watch, sql):
                await self._register(
                    conn, watch, sql, {e.collection for e in latest.values()}, "edge"
                )
                ends = {split_id(i)[0] for e in latest.values() for i in (e.from_id, e.to_id)}
                await self._register(conn, watch, sql, ends, "vertex")
                async with watch.statement():
                    await conn.execute(
                        sql.upsert_edges,
                        [e.collection for e in latest.values()],
                        [e.key for e in latest.values()],
                        [e.from_id for e in latest.values()],
                        [e.to_id for e in latest.values()],
                        [e.properties for e in latest.values()],
                    )
        except QueryError as exc:
            if exc.sqlstate == "23503":
                raise VertexNotFound(
                    "an edge's _from or _to is not a vertex of this tenant; write the vertices"
                    " first",
                    detail=exc.detail,
                ) from exc
            raise
        return len(latest)

    async def delete_vertex(self, tenant: TenantRecord, vertex_id: str) -> tuple[bool, int]:
        async with self._writing(tenant) as (conn, watch, sql):
            async with watch.statement():
                removed = await conn.execute(sql.delete_vertex_edges, vertex_id)
            async with watch.statement():
                deleted = await conn.execute(sql.delete_vertex, vertex_id)
        return deleted != "DELETE 0", int(removed.split()[-1])

    async def delete_edge(self, tenant: TenantRecord, edge_id: str) -> bool:
        async with self._writing(tenant) as (conn, watch, sql), watch.statement():
            status = await conn.execute(sql.delete_edge, edge_id)
        return status != "DELETE 0"

    # --- reads ----------------------------------------------------------------------------

    async def get_vertex(self, tenant: TenantRecord, vertex_id: str) -> Vertex | None:
        collection, key = split_id(vertex_id)
        try:
            async with self._reading(tenant) as (conn, watch, sql), watch.statement():
                row = await conn.fetchrow(sql.get_vertex, vertex_id)
        except _NoGraph:
            return None
        return None if row is None else Vertex(collection, key, row["props"])

    async def get_edge(self, tenant: TenantRecord, edge_id: str) -> Edge | None:
        collection, key = split_id(edge_id)
        try:
            async with self._reading(tenant) as (conn, watch, sql), watch.statement():
                row = await conn.fetchrow(sql.get_edge, edge_id)
        except _NoGraph:
            return None
        if row is None:
            return None
        return Edge(collection, key, row["_from"], row["_to"], row["props"])

    async def _check_names(
        self,
        conn: Connection,
        watch: SessionWatch,
        sql: GraphSql,
        vertices: Sequence[str],
        edge_collections: Sequence[str],
        vertex_collections: Sequence[str],
    ) -> None:
        """The start (and end) vertices exist; the collections named exist, of their kind."""
        async with watch.statement():
            found = {r["id"] for r in await conn.fetch(sql.vertices_exist, list(vertices))}
            kinds = {
                r["name"]: r["kind"]
                for r in await conn.fetch(sql.kinds, [*edge_collections, *vertex_collections])
            }
        for vertex_id in vertices:
            if vertex_id not in found:
                raise VertexNotFound(f"no vertex {vertex_id!r}")
        for names, kind in ((edge_collections, "edge"), (vertex_collections, "vertex")):
            for name in names:
                if kinds.get(name) != kind:
                    raise GraphCollectionNotFound(f"no {kind} collection {name!r}")

    def _visits_checked(self, visits: int) -> None:
        if visits >= self.limits.max_visits:
            raise ResultTooLarge(
                f"the traversal walked more than {self.limits.max_visits} paths; narrow it"
                " (depth, edge collections, edge filters)"
            )

    async def traverse(self, tenant: TenantRecord, query: Traverse) -> TraversalResult:
        try:
            async with self._reading(tenant) as (conn, watch, sql):
                text, args = sql.traverse(query, self.limits.max_visits)
                async with watch.statement():
                    rows = await conn.fetch(text, *args)
        except _NoGraph:
            raise VertexNotFound(f"no vertex {query.start!r}") from None
        _checked(rows[0], [query.start], query.edge_collections, query.vertex_collections)
        self._visits_checked(rows[0]["visits"])
        rows = [r for r in rows if r["id"] is not None]
        hits = [
            TraversalHit(
                # The tenant owns these tables: an id it wrote without "collection/" still
                # reads back (as its own key), never an IndexError.
                Vertex(r["collection"], r["id"].partition("/")[2] or r["id"], r["props"]),
                r["depth"],
                list(r["path"]),
                list(r["edges"]),
            )
            for r in rows[: query.limit]
        ]
        return TraversalResult(hits, truncated=len(rows) > query.limit)

    async def neighborhood(
        self, tenant: TenantRecord, query: Neighborhood
    ) -> list[NeighborhoodGroup]:
        try:
            async with self._reading(tenant) as (conn, watch, sql):
                text, args = sql.neighborhood(
                    query, self.limits.max_visits, self.limits.max_results
                )
                async with watch.statement():
                    rows = await conn.fetch(text, *args)
        except _NoGraph:
            raise VertexNotFound(f"no vertex {query.start!r}") from None
        _checked(rows[0], [query.start], query.edge_collections, query.vertex_collections)
        self._visits_checked(rows[0]["visits"])
        rows = [r for r in rows if r["n"] is not None]
        if len(rows) > self.limits.max_results:
            raise ResultTooLarge(
                f"more than {self.limits.max_results} groups; group by a coarser property"
            )
        return [NeighborhoodGroup(r["grp"], r["n"], _number(r["value"])) for r in rows]

    async def shortest_path(self, tenant: TenantRecord, query: ShortestPath) -> PathResult:
        """Bidirectional breadth-first search, one query per level, the smaller frontier first,
        in one repeatable-read snapshot. Stops at the first level where the two searches meet
        (the best meeting vertex of that level), or past ``max_depth``."""
        try:
            async with self._reading(tenant, transaction=True) as (conn, watch, sql):
                await self._check_names(
                    conn, watch, sql, [query.start, query.end], query.edge_collections, ()
                )
                if query.start == query.end:
                    return PathResult(
                        True, [query.start], [], None if query.weight_path is None else 0.0
                    )
                weight_path = query.weight_path
                if weight_path is not None:
                    statement = sql.relax(
                        query.direction,
                        query.edge_collections,
                        query.edge_filters,
                        weight_path,
                        float(query.default_weight),
                    )
                    return await _weighted(conn, watch, query, statement, self.limits)
                statements = [
                    sql.expand(
                        forward,
                        query.direction,
                        query.edge_collections,
                        query.edge_filters,
                        meeting=meeting,
                    )
                    for meeting in (False, True)
                    for forward in (True, False)
                ]
                return await _bidirectional(conn, watch, query, statements, self.limits)
        except _NoGraph:
            raise VertexNotFound(f"no vertex {query.start!r}") from None

    async def check(self) -> dict[str, Any]:
        return {
            "status": "healthy",
            "embedded": True,
            "runs_on": "postgresql",
            "note": "the relationship graph is kept in PostgreSQL (tables in each tenant's"
            " schema); set DBSVC_ARANGODB_URL for ArangoDB",
            "max_depth": self.limits.max_depth,
            "max_results": self.limits.max_results,
        }

    async def aclose(self) -> None:
        return None


def _checked(
    row: Any, ids: Sequence[str], edge_collections: Sequence[str], vertex_collections: Sequence[str]
) -> None:
    """The checks a read's statement answered (``GraphSql._check``)."""
    if row["found"] < len(set(ids)):
        raise VertexNotFound(f"no vertex {ids[0]!r}")
    kinds = dict(k.split(":", 1) for k in row["kinds"] or ())
    for names, kind in ((edge_collections, "edge"), (vertex_collections, "vertex")):
        for name in names:
            if kinds.get(name) != kind:
                raise GraphCollectionNotFound(f"no {kind} collection {name!r}")


def _number(value: Any) -> int | float | None:
    if value is None:
        return None
    integral = value == value.to_integral_value()
    return int(value) if integral and abs(value) < 2**53 else float(value)


# Rows of one level read per round trip: the event loop gets a turn between batches, and no
# level is held whole (a hub vertex may have a million edges).
_LEVEL_BATCH = 2_000


async def _level(
    conn: Connection, watch: SessionWatch, text: str, args: Sequence[Any], room: int
) -> AsyncIterator[list[Any]]:
    """The rows of one level's statement ((id, here, there, ...), ordered by here then id, the
    order the searches take them in) in batches, at most ``room`` + 1 of them: one more than the
    search may still read, so it knows it went past its bound without reading the level
    whole. Needs the search's transaction (a cursor)."""
    # In code-point order, as Python compares the ids (ties between equal paths go the same way
    # whatever the database's collation).
    limited = (
        f'SELECT * FROM ({text}) AS level ORDER BY here COLLATE "C", id COLLATE "C"'
        f" LIMIT ${len(args) + 1}"
    )
    async with watch.statement():
        cursor = await conn.cursor(limited, *args, max(0, room) + 1)
        while True:
            batch = await cursor.fetch(_LEVEL_BATCH)
            if batch:
                yield batch
            if len(batch) < _LEVEL_BATCH:
                return


def _past_visits(limits: GraphLimits) -> ResultTooLarge:
    return ResultTooLarge(
        f"the search read more than {limits.max_visits} edges; narrow it"
        " (max_depth, edge collections, edge filters)"
    )


async def _bidirectional(
    conn: Connection,
    watch: SessionWatch,
    query: ShortestPath,
    statements: Sequence[tuple[str, list[Any]]],
    limits: GraphLimits,
) -> PathResult:
    """``statements``: expand forward, backward, then the same two asking for meetings only
    (``GraphSql.expand``)."""
    # parent[v] = (previous vertex, edge id) towards the side's origin; dist[v] = steps.
    parents: list[dict[str, tuple[str, str] | None]] = [{query.start: None}, {query.end: None}]
    dists: list[dict[str, int]] = [{query.start: 0}, {query.end: 0}]
    frontiers: list[list[str]] = [[query.start], [query.end]]
    depths = [0, 0]
    fetched = 0
    while frontiers[0] and frontiers[1] and depths[0] + depths[1] < query.max_depth:
        side = 0 if len(frontiers[0]) <= len(frontiers[1]) else 1
        other = 1 - side
        # First: does this level reach the other search? Then the level need not be read.
        text, args = statements[2 + side]
        best: tuple[int, str, str, str] | None = None
        meeting = (frontiers[side], list(dists[other]), *args[2:])
        async for batch in _level(conn, watch, text, meeting, limits.max_visits - fetched):
            fetched += len(batch)
            if fetched > limits.max_visits:
                raise _past_visits(limits)
            for edge_id, here, there in batch:
                total = depths[side] + 1 + dists[other][there]
                candidate = (total, there, here, edge_id)
                if best is None or candidate < best:
                    best = candidate
        if best is not None:
            _, there, here, edge_id = best
            parents[side][there] = (here, edge_id)
            return _joined(parents, there)
        text, args = statements[side]
        depths[side] += 1
        fresh: list[str] = []
        level = (frontiers[side], *args[1:])
        async for batch in _level(conn, watch, text, level, limits.max_visits - fetched):
            fetched += len(batch)
            if fetched > limits.max_visits:
                raise _past_visits(limits)
            for edge_id, here, there in batch:
                if there in parents[side]:
                    continue
                parents[side][there] = (here, edge_id)
                dists[side][there] = depths[side]
                fresh.append(there)
        frontiers[side] = fresh
    return PathResult(False, [], [])


async def _weighted(
    conn: Connection,
    watch: SessionWatch,
    query: ShortestPath,
    statement: tuple[str, list[Any]],
    limits: GraphLimits,
) -> PathResult:
    """Least total weight from start to end in at most ``max_depth`` edges: Bellman-Ford by
    rounds, one query per round (``GraphSql.relax``) for the vertices whose best weight changed
    in the round before. Each round relaxes from the previous round's values only, so a value
    found in round k is reached in at most k edges. Weights are not negative, so a vertex no
    lighter than the best arrival at ``end`` so far is never expanded. Ties: fewer edges."""
    text, args = statement
    # best[v] = (weight, edges); history[v] = the rounds v improved in, with its parent then.
    best: dict[str, tuple[float, int]] = {query.start: (0.0, 0)}
    history: dict[str, list[tuple[int, str | None, str | None]]] = {query.start: [(0, None, None)]}
    frontier = [query.start]
    fetched = 0
    for round_no in range(1, query.max_depth + 1):
        if not frontier:
            break
        target = best.get(query.end)
        improved: dict[str, tuple[float, int, str, str]] = {}
        level = (frontier, *args[1:])
        async for batch in _level(conn, watch, text, level, limits.max_visits - fetched):
            fetched += len(batch)
            if fetched > limits.max_visits:
                raise _past_visits(limits)
            for edge_id, here, there, weight in batch:
                if weight < 0 or not math.isfinite(weight):
                    raise InvalidParameters(
                        f"edge {edge_id!r} has weight {weight!r} at {query.weight_attribute!r};"
                        " a weighted shortest path needs finite weights >= 0"
                    )
                if there == query.start:
                    continue
                base_weight, base_edges = best[here]
                candidate = (base_weight + weight, base_edges + 1)
                if target is not None and candidate >= target:
                    continue
                current = improved.get(there)
                known = current[:2] if current is not None else best.get(there)
                if known is None or candidate < known:
                    improved[there] = (*candidate, here, edge_id)
        for number, (vertex, (weight, steps, here, edge_id)) in enumerate(improved.items()):
            best[vertex] = (weight, steps)
            history.setdefault(vertex, []).append((round_no, here, edge_id))
            if number % _LEVEL_BATCH == _LEVEL_BATCH - 1:
                await asyncio.sleep(0)  # a level may be a million vertices: others get turns
        # Nothing leaves the end vertex towards a lighter arrival at it.
        frontier = [v for v in improved if v != query.end]
    if query.end not in best:
        return PathResult(False, [], [])
    vertices = [query.end]
    edges: list[str] = []
    vertex, bound = query.end, query.max_depth
    while True:
        # The value ``vertex`` had when the round after it read it: its last improvement by then.
        round_no, here, edge_id = next(h for h in reversed(history[vertex]) if h[0] <= bound)
        if here is None or edge_id is None:
            break
        vertices.append(here)
        edges.append(edge_id)
        vertex, bound = here, round_no - 1
    vertices.reverse()
    edges.reverse()
    return PathResult(True, vertices, edges, best[query.end][0])


def _joined(parents: list[dict[str, tuple[str, str] | None]], meet: str) -> PathResult:
    head: list[str] = [meet]
    head_edges: list[str] = []
    step = parents[0][meet]
    while step is not None:
        head.append(step[0])
        head_edges.append(step[1])
        step = parents[0][step[0]]
    head.reverse()
    head_edges.reverse()
    step = parents[1][meet]
    while step is not None:
        head.append(step[0])
        head_edges.append(step[1])
        step = parents[1][step[0]]
    return PathResult(True, head, head_edges)
