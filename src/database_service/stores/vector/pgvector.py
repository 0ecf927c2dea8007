"""Vector collections in the service's PostgreSQL with pgvector (the embedded default).

A collection is a table ``vec_<name in lower case>`` in the tenant's own schema, created,
written and searched as the tenant's own login role (``QueryExecutor.own_session``): another
tenant's tables are out of reach the way all of them are, by PostgreSQL's privileges. Columns:
``id uuid`` (the primary key), ``vector vector(dimension)``, then one column per property
(text, bigint, double precision, boolean, timestamptz, uuid, text[]); an HNSW index on the
vector with the collection's metric (``vector_cosine_ops``, ``vector_l2_ops``,
``vector_ip_ops``); the table's comment holds the collection's name as given and its metric.
The catalog is the schema: properties and dimension are read back from the table's columns.

The extension is created by the service's owner (control migration 0013), in its own schema
(``public`` by default), whose name this store reads at start and puts, quoted, before every
type, operator and operator class it names: a tenant's ``search_path`` plays no part.

Search: ``ORDER BY vector <op> $query LIMIT k`` on the index, with ``hnsw.ef_search`` raised
for recall (``EF_SEARCH``, or 2·limit when more) and ``hnsw.iterative_scan = relaxed_order``
(pgvector 0.8) so that a filtered search keeps scanning the index until enough rows pass the
filter; the rows are sorted again by distance outside. Both are the database's defaults
(control migration 0013), so a search is one round trip; where they are not (or a larger
limit needs more), the search sets them in a transaction of its own.
Certainty (cosine only, as Weaviate defines it) is ``(1 + cosine similarity) / 2``, that is
``1 - distance / 2``; ``distance`` is pgvector's cosine distance, L2 distance, or negative inner
product (``dot``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import asyncpg

from database_service.auth import Principal
from database_service.errors import FailedPrecondition, InvalidRequest
from database_service.query import QueryExecutor, TenantContext
from database_service.query.executor import JOINED_SESSION, OwnSession
from database_service.results import StatementKind
from database_service.stores.vector.filters import compile_filter
from database_service.stores.vector.model import (
    MAX_BATCH,
    CollectionExists,
    CollectionInfo,
    CollectionNotFound,
    Hit,
    InvalidVector,
    Metric,
    PropertyType,
    SearchQuery,
    VectorObject,
    check_vector,
    collection_name,
    object_id,
    object_row,
)
from database_service.tenancy import quote_ident
from database_service.tenancy.ids import quote_literal

__all__ = ["EF_SEARCH", "PgVectorStore", "VectorStoreUnavailable", "table_name"]

log = logging.getLogger(__name__)

# ef_search for a search of up to EF_SEARCH/2 results: on 200,000 clustered vectors of 384
# dimensions (bench/vector.py), 100 candidates gave recall@10 of 0.93 to 0.97 from one index
# build to the next, 200 holds it above 0.95; pgvector's default is 40.
EF_SEARCH = 200
EF_SEARCH_MAX = 1000
# HNSW build parameters (pgvector's defaults, stated so the index is what the bench measured).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
_MARKER = "dbsvc.vector"
_OPCLASS = {
    Metric.COSINE: "vector_cosine_ops",
    Metric.L2: "vector_l2_ops",
    Metric.DOT: "vector_ip_ops",
}
_METRIC_OF = {v: k for k, v in _OPCLASS.items()}
_OPERATOR = {Metric.COSINE: "<=>", Metric.L2: "<->", Metric.DOT: "<#>"}
_COLUMN_TYPE = {
    PropertyType.TEXT: "text",
    PropertyType.INT: "bigint",
    PropertyType.NUMBER: "double precision",
    PropertyType.BOOL: "boolean",
    PropertyType.DATE: "timestamptz",
    PropertyType.UUID: "uuid",
    PropertyType.TEXT_ARRAY: "text[]",
}
# Back from the catalog (format_type's spelling).
_PROPERTY_OF = {
    **{v: k for k, v in _COLUMN_TYPE.items()},
    "timestamp with time zone": PropertyType.DATE,
}
# How long a collection's schema read from the catalog is used without reading it again (a
# drop and re-create elsewhere meanwhile is still refused by PostgreSQL, and forgets it).
_INFO_SECONDS = 5.0


class VectorStoreUnavailable(FailedPrecondition):
    code = "vector_store_unavailable"


def table_name(collection: str) -> str:
    """The table of a collection (names are case-insensitive: one table per lower-case name)."""
    return f"vec_{collection.lower()}"


def _certainty(metric: Metric, distance: float) -> float | None:
    return 1.0 - distance / 2.0 if metric is Metric.COSINE else None


class PgVectorStore:
    kind = "pgvector"

    def __init__(self, executor: QueryExecutor, owner_pool: asyncpg.Pool) -> None:
        self._executor = executor
        self._owner = owner_pool
        self.schema: str | None = None  # the extension's schema (None: not installed)
        self.version: str | None = None
        self.defaults_set = False
        self._infos: dict[tuple[str, str], tuple[CollectionInfo, float]] = {}

    async def start(self) -> None:
        row = await self._owner.fetchrow(
            "SELECT extnamespace::regnamespace::text AS schema, extversion FROM pg_extension"
            " WHERE extname = 'vector'"
        )
        if row is None:
            # Info, not a warning: an optional store this PostgreSQL lacks (health says
            # not_configured); every admin command would print it otherwise.
            log.info(
                "pgvector is not installed in this PostgreSQL: vector collections are"
                " unavailable (install it and run CREATE EXTENSION vector as its owner)"
            )
            return
        # regnamespace::text quotes the name when it needs it; the SQL here quotes it itself.
        self.schema = row["schema"].strip('"')
        self.version = row["extversion"]
        # Whether sessions start with the search settings (the database's defaults, control
        # migration 0013); otherwise every search sets them in a transaction of its own.
        # Read from the catalog: the owner's pooled sessions may predate the migration.
        defaults = await self._owner.fetchval(
            "SELECT setconfig FROM pg_db_role_setting WHERE setrole = 0 AND setdatabase ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        self.defaults_set = {
            f"hnsw.ef_search={EF_SEARCH}",
            "hnsw.iterative_scan=relaxed_order",
        } <= set(defaults or ())

    def _ext(self) -> str:
        if self.schema is None:
            raise VectorStoreUnavailable(
                "vector collections need pgvector, which this PostgreSQL does not have"
            )
        return quote_ident(self.schema)

    @contextlib.asynccontextmanager
    async def _session(
        self, principal: Principal, ctx: TenantContext, action: str, kind: StatementKind
    ) -> AsyncIterator[OwnSession]:
        self._ext()
        joined = JOINED_SESSION.get()
        if joined is not None and joined.tenant.tenant_id == ctx.tenant_id and ctx.user_id is None:
            # Inside a multi-store operation's transaction (its scopes already checked): the
            # write commits or rolls back with it.
            own: contextlib.AbstractAsyncContextManager[OwnSession] = contextlib.nullcontext(joined)
        else:
            own = self._executor.own_session(principal, ctx, action=f"vector.{action}", kind=kind)
        async with own as session:
            try:
                yield session
            except asyncpg.UndefinedTableError:
                raise CollectionNotFound("no such collection") from None
            except asyncpg.DataError as exc:
                # pgvector's dimension check, should a vector get past ours (a collection
                # re-created elsewhere with another dimension since we read its schema).
                self._infos.clear()
                raise InvalidVector(f"the vector does not fit the collection: {exc}") from None
            except (asyncpg.UndefinedColumnError, asyncpg.DatatypeMismatchError):
                self._infos.clear()
                raise FailedPrecondition(
                    "the collection changed while this request was made; try again"
                ) from None

    # --- the schema ------------------------------------------------------------------------

    async def _info(self, session: OwnSession, name: str, *, fresh: bool = False) -> CollectionInfo:
        key = (session.tenant.tenant_id, name.lower())
        kept = self._infos.get(key)
        if kept is not None and not fresh and kept[1] > time.monotonic():
            return kept[0]
        infos = await self._read_infos(session, table_name(name))
        if not infos:
            self._infos.pop(key, None)
            raise CollectionNotFound(f"collection {name!r} does not exist")
        self._infos[key] = (infos[0], time.monotonic() + _INFO_SECONDS)
        return infos[0]

    async def _read_infos(self, session: OwnSession, table: str | None) -> list[CollectionInfo]:
        """The collections in the tenant's schema (one when ``table`` is given) from the
        catalog, as the tenant reads it."""
        sql = (
            "SELECT c.relname, obj_description(c.oid, 'pg_class') AS comment,"
            " (SELECT o.opcname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
            "  JOIN pg_am m ON m.oid = i.relam JOIN pg_opclass o ON o.oid = x.indclass[0]"
            "  WHERE x.indrelid = c.oid AND m.amname = 'hnsw' ORDER BY i.oid LIMIT 1) AS opclass,"
            " array_agg(a.attname ORDER BY a.attnum) AS names,"
            " array_agg(format_type(a.atttypid, NULL) ORDER BY a.attnum) AS types,"
            " array_agg(a.atttypmod ORDER BY a.attnum) AS mods"
            " FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid"
            " WHERE c.relnamespace = $1::regnamespace AND c.relkind = 'r'"
            " AND c.relname LIKE 'vec\\_%' AND ($2::text IS NULL OR c.relname = $2)"
            " AND a.attnum > 0 AND NOT a.attisdropped"
            " GROUP BY c.oid, c.relname ORDER BY c.relname"
        )
        async with session.watch.statement():
            rows = await session.conn.fetch(sql, quote_ident(session.tenant.schema_name), table)
        infos = []
        for row in rows:
            info = _info_of(
                row["relname"],
                row["comment"],
                row["opclass"],
                row["names"],
                row["types"],
                row["mods"],
            )
            if info is not None:
                infos.append(info)
        return infos

    async def create_collection(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        dimension: int,
        metric: Metric,
        properties: Mapping[str, PropertyType],
    ) -> CollectionInfo:
        name = collection_name(name)
        ext = self._ext()
        async with self._session(principal, ctx, "create_collection", StatementKind.DDL) as s:
            table = f"{quote_ident(s.tenant.schema_name)}.{quote_ident(table_name(name))}"
            columns = [
                "id uuid PRIMARY KEY",
                f"vector {ext}.vector({int(dimension)}) NOT NULL",
                *(f"{quote_ident(p)} {_COLUMN_TYPE[k]}" for p, k in properties.items()),
            ]
            comment = json.dumps({"marker": _MARKER, "name": name, "metric": metric.value})
            try:
                async with s.watch.statement():
                    await s.conn.execute(
                        f"CREATE TABLE {table} ({', '.join(columns)});"
                        f" CREATE INDEX {quote_ident(table_name(name) + '_hnsw')} ON {table}"
                        f" USING hnsw (vector {ext}.{_OPCLASS[metric]})"
                        f" WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION});"
                        f" COMMENT ON TABLE {table} IS {quote_literal(comment)}"
                    )
            except (asyncpg.DuplicateTableError, asyncpg.DuplicateObjectError):
                raise CollectionExists(f"collection {name!r} exists") from None
            s.command = "CREATE COLLECTION"
        self._infos.pop((ctx.tenant_id, name.lower()), None)
        return CollectionInfo(name, dimension, metric, dict(properties), 0)

    async def list_collections(
        self, principal: Principal, ctx: TenantContext
    ) -> list[CollectionInfo]:
        async with self._session(principal, ctx, "list_collections", StatementKind.READ) as s:
            infos = await self._read_infos(s, None)
            s.command = f"LIST {len(infos)}"
        return infos

    async def get_collection(
        self, principal: Principal, ctx: TenantContext, name: str
    ) -> CollectionInfo:
        name = collection_name(name)
        async with self._session(principal, ctx, "get_collection", StatementKind.READ) as s:
            info = await self._info(s, name, fresh=True)
            async with s.watch.statement():
                count = await s.conn.fetchval(f"SELECT count(*) FROM {self._table(s, info)}")
            s.command = "GET COLLECTION"
        return CollectionInfo(info.name, info.dimension, info.metric, info.properties, count)

    async def drop_collection(self, principal: Principal, ctx: TenantContext, name: str) -> bool:
        name = collection_name(name)
        async with self._session(principal, ctx, "drop_collection", StatementKind.DDL) as s:
            try:
                info = await self._info(s, name, fresh=True)
            except CollectionNotFound:
                s.command = "DROP COLLECTION 0"
                return False
            async with s.watch.statement():
                await s.conn.execute(f"DROP TABLE {self._table(s, info)}")
            s.command = "DROP COLLECTION 1"
        self._infos.pop((ctx.tenant_id, name.lower()), None)
        return True

    @staticmethod
    def _table(session: OwnSession, info: CollectionInfo) -> str:
        schema = quote_ident(session.tenant.schema_name)
        return f"{schema}.{quote_ident(table_name(info.name))}"

    # --- objects ----------------------------------------------------------------------------

    async def upsert(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        objects: Sequence[Mapping[str, Any]],
    ) -> int:
        """Insert or replace objects (``{"id", "vector", "properties"}``; a missing id gets a
        new one; properties left out are null), all or none."""
        name = collection_name(name)
        if not objects:
            raise InvalidRequest("no objects to write")
        if len(objects) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} objects per batch")
        ext = self._ext()
        async with self._session(principal, ctx, "upsert", StatementKind.WRITE) as s:
            info = await self._info(s, name)
            names = list(info.properties)
            rows = [object_row(info, names, o, n) for n, o in enumerate(objects, start=1)]
            if len({r[0] for r in rows}) != len(rows):
                raise InvalidRequest("an object id appears twice in the batch")
            columns = ["id", "vector", *(quote_ident(p) for p in names)]
            values = ["$1", f"$2::real[]::{ext}.vector"] + [
                f"${i}" for i in range(3, len(names) + 3)
            ]
            updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns[1:])
            table = self._table(s, info)
            sql = (
                f"INSERT INTO {table} AS t ({', '.join(columns)}) VALUES ({', '.join(values)})"
                f" ON CONFLICT (id) DO UPDATE SET {updates}"
            )
            async with s.watch.statement():
                if len(rows) == 1:
                    await s.conn.execute(sql, *rows[0])
                else:
                    await s.conn.executemany(sql, rows)
            s.command = f"UPSERT {len(rows)}"
            s.written.append(f"{s.tenant.schema_name}.{table_name(info.name)}")
        return len(rows)

    def _properties_sql(self, info: CollectionInfo) -> str:
        return "".join(f", t.{quote_ident(p)}" for p in info.properties)

    async def get_objects(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        ids: Sequence[uuid.UUID],
        *,
        with_vector: bool,
    ) -> list[VectorObject]:
        name = collection_name(name)
        if not ids or len(ids) > MAX_BATCH:
            raise InvalidRequest(f"1 to {MAX_BATCH} ids")
        async with self._session(principal, ctx, "get", StatementKind.READ) as s:
            info = await self._info(s, name)
            vector = ", t.vector::real[]" if with_vector else ", NULL::real[]"
            sql = (
                f"SELECT t.id{vector}{self._properties_sql(info)} FROM {self._table(s, info)} t"
                " WHERE t.id = ANY($1::uuid[])"
            )
            async with s.watch.statement():
                rows = await s.conn.fetch(sql, [object_id(i) for i in ids])
            s.command = f"GET {len(rows)}"
        names = list(info.properties)
        found = {
            r[0]: VectorObject(
                r[0],
                list(r[1]) if r[1] is not None else None,
                {p: r[i] for i, p in enumerate(names, start=2)},
            )
            for r in rows
        }
        return [found[i] for i in dict.fromkeys(object_id(i) for i in ids) if i in found]

    async def delete_objects(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        *,
        ids: Sequence[uuid.UUID] | None,
        where: Mapping[str, Any] | None,
    ) -> int:
        """Delete by ids, or by a filter (one of them: a delete of everything is a drop)."""
        name = collection_name(name)
        if (ids is None) == (where is None):
            raise InvalidRequest("delete takes ids or a filter (where), one of them")
        if ids is not None and not 1 <= len(ids) <= MAX_BATCH:
            raise InvalidRequest(f"1 to {MAX_BATCH} ids")
        async with self._session(principal, ctx, "delete", StatementKind.WRITE) as s:
            info = await self._info(s, name)
            params: list[Any] = []
            if ids is not None:
                params.append([object_id(i) for i in ids])
                condition = "t.id = ANY($1::uuid[])"
            else:
                assert where is not None
                condition = compile_filter(where, info.properties, params)
            async with s.watch.statement():
                status = await s.conn.execute(
                    f"DELETE FROM {self._table(s, info)} t WHERE {condition}", *params
                )
            deleted = int(status.split()[-1])
            s.command = f"DELETE {deleted}"
            s.written.append(f"{s.tenant.schema_name}.{table_name(info.name)}")
        return deleted

    async def count(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        where: Mapping[str, Any] | None = None,
    ) -> int:
        name = collection_name(name)
        async with self._session(principal, ctx, "count", StatementKind.READ) as s:
            info = await self._info(s, name)
            params: list[Any] = []
            condition = compile_filter(where, info.properties, params) if where else "true"
            async with s.watch.statement():
                counted: int = await s.conn.fetchval(
                    f"SELECT count(*) FROM {self._table(s, info)} t WHERE {condition}", *params
                )
            s.command = f"COUNT {counted}"
        return counted

    # --- search -----------------------------------------------------------------------------

    async def search(
        self, principal: Principal, ctx: TenantContext, name: str, query: SearchQuery
    ) -> list[Hit]:
        name = collection_name(name)
        ext = self._ext()
        async with self._session(principal, ctx, "search", StatementKind.READ) as s:
            info = await self._info(s, name)
            sql, params = self.search_sql(info, query, self._table(s, info), ext)
            ef = min(max(EF_SEARCH, 2 * query.limit), EF_SEARCH_MAX)
            async with s.watch.statement():
                if ef == EF_SEARCH and self.defaults_set:
                    # The database's defaults (control migration 0013): one round trip.
                    rows = await s.conn.fetch(sql, *params)
                    s.stateless = True
                else:
                    async with s.conn.transaction():  # a savepoint in a read-only caller's
                        await s.conn.execute(
                            f"SET LOCAL hnsw.ef_search = {ef};"
                            " SET LOCAL hnsw.iterative_scan = relaxed_order"
                        )
                        rows = await s.conn.fetch(sql, *params)
            s.command = f"SEARCH {len(rows)}"
        names = list(info.properties)
        return [
            Hit(
                r[0],
                r[1],
                _certainty(info.metric, r[1]),
                {p: r[i] for i, p in enumerate(names, start=3)},
                list(r[2]) if r[2] is not None else None,
            )
            for r in rows
        ]

    @staticmethod
    def search_sql(
        info: CollectionInfo, query: SearchQuery, table: str, ext: str
    ) -> tuple[str, list[Any]]:
        """The statement of a search and its parameters (the query vector first)."""
        params: list[Any] = [check_vector(query.vector, info.dimension)]
        distance = f"t.vector OPERATOR({ext}.{_OPERATOR[info.metric]}) $1::real[]::{ext}.vector"
        condition = ""
        if query.where:
            condition = f" WHERE {compile_filter(query.where, info.properties, params)}"
        params.append(query.limit)
        vector = "t.vector::real[]" if query.with_vector else "NULL::real[]"
        props = "".join(f", t.{quote_ident(p)}" for p in info.properties)
        inner = (
            f"SELECT t.id, {distance} AS distance, {vector} AS vector{props}"
            f" FROM {table} t{condition} ORDER BY {distance} LIMIT ${len(params)}"
        )
        bound = _max_distance(info.metric, query)
        outer = ""
        if bound is not None:
            params.append(bound)
            outer = f" WHERE s.distance <= ${len(params)}"
        # Sorted again outside: a filtered search's iterative scan may return rows slightly
        # out of order (relaxed_order), and the threshold applies to the nearest k.
        return f"SELECT s.* FROM ({inner}) s{outer} ORDER BY s.distance", params

    # --- health -----------------------------------------------------------------------------

    async def check(self) -> dict[str, Any]:
        # Kept in PostgreSQL: spanning it with PostgreSQL is no cross-store operation.
        details: dict[str, Any] = {
            "implementation": "embedded pgvector",
            "embedded": True,
            "runs_on": "postgresql",
        }
        if self.schema is None:
            await self.start()  # installed since?
        if self.schema is None:
            # Not a fault of a running store: this deployment has none (health stays healthy).
            return {
                "status": "not_configured",
                **details,
                "note": "pgvector is not installed in this PostgreSQL (CREATE EXTENSION vector"
                " as its owner, then restart)",
            }
        # The planner's estimates (no scan of any tenant's table): objects as of the last
        # VACUUM/ANALYZE; the dimensions of the collections' vector columns.
        row = await self._owner.fetchrow(
            "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector') AS version,"
            " count(*) AS collections,"
            " coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint AS objects,"
            " count(DISTINCT c.relnamespace) AS tenants,"
            " coalesce(array_agg(DISTINCT a.atttypmod ORDER BY a.atttypmod)"
            "  FILTER (WHERE a.atttypmod > 0), '{}') AS dimensions"
            " FROM pg_class c LEFT JOIN pg_attribute a ON a.attrelid = c.oid"
            "  AND a.attname = 'vector' AND NOT a.attisdropped"
            " WHERE c.relkind = 'r' AND c.relname LIKE 'vec\\_%'"
            " AND obj_description(c.oid, 'pg_class') LIKE $1",
            f'{{"marker": "{_MARKER}"%',
        )
        assert row is not None
        return {
            "status": "healthy",
            **details,
            "extension_version": row["version"],
            "extension_schema": self.schema,
            "collections": row["collections"],
            "tenants_with_collections": row["tenants"],
            "objects_count": row["objects"],
            "objects_count_is_estimate": True,
            "vector_dimensions": list(row["dimensions"]),
        }


def _max_distance(metric: Metric, query: SearchQuery) -> float | None:
    bounds = []
    if query.certainty is not None:
        if metric is not Metric.COSINE:
            raise InvalidRequest("certainty applies to cosine collections; give a distance")
        bounds.append(2.0 * (1.0 - query.certainty))
    if query.distance is not None:
        bounds.append(query.distance)
    return min(bounds) if bounds else None


def _info_of(
    table: str,
    comment: str | None,
    opclass: str | None,
    names: Sequence[str],
    types: Sequence[str],
    mods: Sequence[int],
) -> CollectionInfo | None:
    """A collection from its table's comment and columns; None for a table that is not one
    (or that the tenant's own SQL changed past recognition). A table without its comment (a
    tenant export restored: exports carry no comments) is still one, named by its table in
    lower case, its metric that of its HNSW index."""
    try:
        meta = json.loads(comment) if comment else {"marker": _MARKER}
        if meta.get("marker") != _MARKER:
            return None
        name = collection_name(meta.get("name", table.removeprefix("vec_")))
        metric = Metric(meta["metric"]) if "metric" in meta else _METRIC_OF[opclass or ""]
    except (ValueError, KeyError, TypeError, AttributeError, InvalidRequest):
        return None
    columns = dict(zip(names, zip(types, mods, strict=True), strict=True))
    if columns.get("id", ("",))[0] != "uuid" or "vector" not in columns:
        return None
    dimension = columns["vector"][1]
    if dimension <= 0:
        return None
    properties = {
        n: _PROPERTY_OF[t]
        for n, (t, _) in columns.items()
        if n not in ("id", "vector") and t in _PROPERTY_OF
    }
    return CollectionInfo(name, dimension, metric, properties)
