"""``execute_multi_db_operation``: one call across the stores (gRPC ``MultiDatabase.Execute``,
REST ``POST /api/v1/multi-db``), and the administration of its outbox.

Semantics:

1. Every part is checked first (``multidb.parts``): an unknown store, a malformed part, a store
   this deployment has not configured, a ``company_id`` other than the caller's tenant, a scope
   the caller lacks — refused before anything runs, audited as ``multidb`` ``denied``.
2. The ``postgresql`` part runs in ONE transaction on the tenant's own login (the query core's
   ``transaction``: guard, scopes, limits, audit). In that same transaction the writes of the
   stores that live in this PostgreSQL (pgvector collections, the PostgreSQL graph: the tenant's
   schema) run through their use cases, joined to it by ``JOINED_SESSION`` — truly atomic,
   ``"atomic": true`` in the answer — and one outbox row is recorded per write of a store
   outside it (key-value set/delete/incr/expire; Weaviate or ArangoDB when configured by URL).
   Without a ``postgresql`` part the same happens in a transaction of its own on the same login.
   If the transaction fails (the PostgreSQL part, or a joined write), its error is the call's:
   nothing is recorded and nothing else runs.
3. After the commit, the request applies its own outbox entries (``Outbox.apply_now``); what it
   could not apply stays ``pending`` and the background applier retries it. Reads of other
   stores (key-value get/mget, vector search, graph traverse, ClickHouse SELECT) run directly.
4. The answer says per part ``applied`` / ``pending`` / ``failed`` (with ``reason`` and
   ``code``), with each store's result.

A request carrying a user id runs its transaction on the tenant's user-scoped login; its vector
and graph writes then go through the outbox (applied as the company, as those stores always
write).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any

from database_service.application.access import Access
from database_service.application.graphs import Graphs
from database_service.application.keyvalue import KeyValueOps, Operation
from database_service.application.vectors import VectorOps
from database_service.auth import Principal, Scope
from database_service.errors import (
    DatabaseServiceError,
    InvalidRequest,
    PermissionDenied,
    SqlRejected,
)
from database_service.jsonvalues import dumps
from database_service.multidb.outbox import EntryOutcome, Outbox, json_result
from database_service.multidb.parts import (
    CheckedPart,
    ClickHousePart,
    GraphPart,
    KeyValuePart,
    MultiDbRequest,
    PostgresPart,
    StoreNotConfigured,
    VectorPart,
    parse_request,
    part_document,
)
from database_service.query import QueryExecutor, TenantContext
from database_service.query.executor import JOINED_SESSION, OwnSession
from database_service.query.values import encode_value
from database_service.results import QueryResult, StatementKind
from database_service.tenancy import TenantRegistry

__all__ = ["MultiDatabase"]

_ACTION = "multidb"
_STATUSES = frozenset({"pending", "applied", "failed"})


class MultiDatabase:
    def __init__(
        self,
        access: Access,
        executor: QueryExecutor,
        registry: TenantRegistry,
        outbox: Outbox,
        *,
        key_value: KeyValueOps,
        vectors: VectorOps,
        graphs: Graphs,
        analytics: Any = None,  # analytics.service.Analytics, when ClickHouse is configured
    ) -> None:
        self._access = access
        self._executor = executor
        self._registry = registry
        self.outbox = outbox
        self._key_value = key_value
        self._vectors = vectors
        self._graphs = graphs
        self._analytics = analytics

    # --- the operation --------------------------------------------------------------------

    async def execute(
        self, principal: Principal, ctx: TenantContext, operation: Any
    ) -> dict[str, Any]:
        """Run ``operation`` (store name → part) for ``ctx.tenant_id``; the answer document."""
        tenant_id = ctx.tenant_id
        await self._access.require(principal, Scope.READ, _ACTION, tenant_id)
        try:
            request = parse_request(tenant_id, operation, clickhouse_writes=True)
            self._check_configured(request)
            for part in request.writes:
                if isinstance(part.part, ClickHousePart):
                    await self._check_insert(tenant_id, part.name, part.part)
            if request.writes and not principal.has_scope(Scope.WRITE):
                names = ", ".join(p.name for p in request.writes)
                raise PermissionDenied(f"the {names} part(s) write, which needs the write scope")
            await self._registry.get_active(tenant_id)
        except DatabaseServiceError as exc:
            await self._access.deny(principal, tenant_id, _ACTION, exc)
        operation_id = uuid.uuid4()
        # Writes of stores in this PostgreSQL join the transaction; the others go to the outbox.
        joined = [p for p in request.writes if self._joins(p, ctx)]
        outboxed = [p for p in request.writes if p not in joined]
        entries = [(p.store, p.name, part_document(p.part)) for p in outboxed]
        ids: list[int] = []
        written: dict[str, Any] = {}
        answer: dict[str, Any] = {"operation_id": str(operation_id), "stores": {}}
        stores: dict[str, Any] = answer["stores"]

        async def in_transaction(session: OwnSession) -> None:
            # Run again from scratch if the transaction is retried whole.
            token = JOINED_SESSION.set(session)
            try:
                for part in joined:
                    written[part.name] = await self.outbox.appliers.apply(
                        None, tenant_id, part.part, principal
                    )
            finally:
                JOINED_SESSION.reset(token)
            ids[:] = await self.outbox.record(session, operation_id, entries)

        postgres = request.postgres
        if postgres is not None:
            assert isinstance(postgres.part, PostgresPart)
            statements = postgres.part.statement_list()
            done = await self._executor.transaction(
                principal,
                ctx,
                statements,
                before_commit=in_transaction if request.writes else None,
            )
            stores[postgres.name] = {
                "status": "applied",
                "atomic": True,
                "result": (
                    _result_document(done.results[0])
                    if postgres.part.query is not None
                    else {"statements": [_result_document(r) for r in done.results]}
                ),
            }
        elif request.writes:
            async with self._executor.own_session(
                principal, ctx, action=_ACTION, kind=StatementKind.WRITE
            ) as session:
                await in_transaction(session)
                session.command = f"{len(joined)} joined, {len(ids)} recorded"
        for part in joined:
            stores[part.name] = {
                "status": "applied",
                "atomic": True,
                "result": json_result(written[part.name]),
            }
        self.outbox.recorded(p.store for p in outboxed)
        # Committed: from here on nothing raises for a part; each says what became of it.
        outcomes = await self.outbox.apply_now(ids)
        for part, outcome in zip(outboxed, outcomes, strict=True):
            stores[part.name] = _outcome_document(part, outcome)
        for part in request.reads:
            stores[part.name] = await self._read(principal, ctx, part)
        # In the caller's order.
        answer["stores"] = {p.name: stores[p.name] for p in request.parts}
        # What the audit keeps: each part's outcome (never keys, values or SQL).
        detail = " ".join(f"{name}={doc['status']}" for name, doc in answer["stores"].items())
        await self._access.done(principal, _ACTION, tenant_id, detail[:200])
        return answer

    def _joins(self, part: CheckedPart, ctx: TenantContext) -> bool:
        """Whether a write runs inside the operation's transaction: a store in this PostgreSQL
        (pgvector, the PostgreSQL graph), written as the company (a user id runs the
        transaction on the user's login: those writes then go through the outbox)."""
        if ctx.user_id is not None:
            return False
        if part.store == "vector":
            return getattr(self._vectors.store, "kind", "") == "pgvector"
        if part.store == "graph":
            return getattr(self._graphs.store, "name", "") == "postgresql"
        return False

    def _check_configured(self, request: MultiDbRequest) -> None:
        for part in request.parts:
            if part.store == "clickhouse" and self._analytics is None:
                raise StoreNotConfigured(
                    f"the {part.name} part: store 'clickhouse' is not configured in this deployment"
                )

    async def _check_insert(self, tenant_id: str, name: str, part: ClickHousePart) -> None:
        """A ClickHouse INSERT checked as ``Analytics.insert`` will check it — its shape, its
        parameters, a table of the tenant's own — before anything runs."""
        from database_service.analytics.schema import tenant_database  # noqa: PLC0415
        from database_service.analytics.tables import TableGuard  # noqa: PLC0415

        try:
            checked = await TableGuard(self._analytics.guard).check_insert(
                part.query, database=tenant_database(tenant_id)
            )
            checked.row([] if part.params is None else part.params)
            own = await self._analytics.own_tables(tenant_id)
            if checked.table not in own:
                raise SqlRejected(
                    f"{checked.table} is not one of this tenant's own ClickHouse tables"
                    f" ({', '.join(sorted(own)) or 'none: CREATE TABLE first'})"
                )
        except DatabaseServiceError as exc:
            exc.message = f"the {name} part: {exc.message}"
            raise

    async def _read(
        self, principal: Principal, ctx: TenantContext, checked: CheckedPart
    ) -> dict[str, Any]:
        part = checked.part
        try:
            result: Any
            if isinstance(part, KeyValuePart):
                kv = await self._key_value.execute(principal, ctx, part.command())
                if kv.operation is Operation.MGET:
                    result = [_b64(v) for v in kv.values]
                else:
                    result = _b64(kv.value)
                return {"status": "applied", "encoding": "base64", "result": result}
            if isinstance(part, VectorPart):
                request = part.model_dump(by_alias=True, exclude_none=True)
                for field in ("company_id", "tenant_id"):
                    request.pop(field, None)
                request["operation"] = "similarity_search"
                found = await self._vectors.similarity_search(principal, ctx, request)
                result = {
                    "class": found["class"],
                    "count": found["count"],
                    "results": [
                        {
                            "id": str(h.id),
                            "distance": h.distance,
                            "certainty": h.certainty,
                            "properties": {k: encode_value(v) for k, v in h.properties.items()},
                        }
                        for h in found["results"]
                    ],
                }
            elif isinstance(part, GraphPart):
                from database_service.stores.graph.model import (  # noqa: PLC0415
                    Traverse,
                    direction_of,
                )

                assert part.start is not None
                query = Traverse(
                    part.start,
                    direction_of(part.direction or "outbound"),
                    1 if part.min_depth is None else part.min_depth,
                    1 if part.max_depth is None else part.max_depth,
                    tuple(part.edge_collections or ()),
                    tuple(part.vertex_collections or ()),
                    (),
                    (),
                    1000 if part.limit is None else part.limit,
                )
                walked = await self._graphs.traverse(principal, ctx, query)
                # Through JSON text and back (dates and ids as text); the standard library's
                # reader, since a tenant's property may be an integer past 64 bits.
                result = json.loads(
                    dumps(
                        {"hits": [h.to_dict() for h in walked.hits], "truncated": walked.truncated}
                    )
                )
            else:
                assert isinstance(part, ClickHousePart)
                analytics = await self._analytics.query(principal, ctx, part.query)
                result = _result_document(analytics)
        except DatabaseServiceError as exc:
            return {"status": "failed", "reason": exc.message, "code": exc.error_code}
        return {"status": "applied", "result": result}

    # --- administration -------------------------------------------------------------------

    async def entries(
        self,
        principal: Principal,
        tenant_id: str,
        *,
        status: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The tenant's outbox entries (newest first): a platform administrator or the tenant's
        administrator."""
        action = "multidb.outbox.list"
        await self._access.require(principal, Scope.ADMIN, action, tenant_id)
        try:
            if status is not None and status not in _STATUSES:
                raise InvalidRequest("status is pending, applied or failed")
            if not 1 <= limit <= 1000:
                raise InvalidRequest("limit must be 1 to 1000")
            await self._registry.get(tenant_id)
        except DatabaseServiceError as exc:
            await self._access.deny(principal, tenant_id, action, exc)
        return await self.outbox.entries(tenant_id, status=status, limit=limit)

    async def retry(
        self, principal: Principal, tenant_id: str, entry_ids: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Failed entries of the tenant (``entry_ids``, or every one) pending again, and tried
        now; what became of each."""
        action = "multidb.outbox.retry"
        await self._access.require(principal, Scope.ADMIN, action, tenant_id)
        try:
            if entry_ids is not None and (
                len(entry_ids) > 1000
                or any(
                    isinstance(i, bool) or not isinstance(i, int) or not 0 < i < 2**63
                    for i in entry_ids
                )
            ):
                raise InvalidRequest("ids is a list of at most 1000 entry ids")
            await self._registry.get_active(tenant_id)
        except DatabaseServiceError as exc:
            await self._access.deny(principal, tenant_id, action, exc)
        retried = await self.outbox.retry(tenant_id, entry_ids)
        outcomes = [await self.outbox.apply(i) for i in retried]
        await self._access.done(principal, action, tenant_id, f"{len(retried)} entries")
        return {"retried": [o.document() for o in outcomes]}


def _outcome_document(part: CheckedPart, outcome: EntryOutcome) -> dict[str, Any]:
    document = outcome.document()
    if isinstance(part.part, KeyValuePart) and outcome.status == "applied":
        document["encoding"] = "base64"
    return document


def _b64(value: bytes | None) -> str | None:
    if value is None:
        return None
    return base64.b64encode(value).decode()


def _result_document(result: QueryResult) -> dict[str, Any]:
    """A statement's result as JSON: columns with their kinds (the client decodes values by
    them, as it does packed rows), rows as arrays."""
    return {
        "columns": [
            {"name": c.name, "type": c.type_name, "kind": c.kind.value} for c in result.columns
        ],
        "rows": [[_packed(v) for v in row] for row in result.rows],
        "row_count": result.row_count,
        "command": result.command,
    }


def _packed(value: Any) -> Any:
    """A value as the packed row form writes it (client ``unpack_rows`` reads it back)."""
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC).isoformat()
    return encode_value(value)
