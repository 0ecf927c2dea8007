"""The parts of an ``execute_multi_db_operation`` call, checked before anything runs.

An operation is a JSON object: store name → part. Every part is validated here (pydantic,
``extra="forbid"``) and a bad one is refused as ``invalid_request`` naming the part, so nothing
runs unless every part is well formed. The same models re-check an outbox entry when the applier
reads it back (``outbox_operation``): what the applier does is only ever what a caller could ask
for here.

Stores and the names a part may be given:

- ``postgresql``: ``{"query", "params"}`` (a list binds ``$1``…, a mapping binds ``:name`` /
  ``$name`` placeholders by name) or ``{"statements": [...]}``; one transaction.
- ``dragonflydb`` (also ``redis``): ``{"operation": get|set|delete|incr|expire|mget, "key",
  "value" | "value_base64", "ttl" (seconds) | "ttl_ms", "by", "keys"}``.
- ``clickhouse``: ``{"query"}``: a read on the tenant's tables; or ``{"query": "INSERT INTO t
  (col, …) VALUES ($1 | :name, …)", "params"}``: one row into one of the tenant's own tables,
  through the outbox (``Analytics.insert``, the entry id its deduplication token). Other writes
  are refused (``not_supported``), and so is any write where ClickHouse takes none.
- ``vector`` (also ``weaviate``, ``pgvector``): ``{"operation": "upsert", "class", "objects":
  [{"id", "vector", "properties"}]}``, ``{"operation": "delete", "class", "ids" | "where"}``,
  ``{"operation": "similarity_search", "class", "vector", "limit", "certainty", "distance",
  "where", "tenant_filter"}``. An upserted object without an id gets one here, so applying the
  entry twice writes the same object.
- ``graph`` (also ``arangodb``): ``{"operation": "upsert", "vertices": [...], "edges": [...]}``,
  ``{"operation": "delete", "vertex_id" | "edge_id"}``, ``{"operation": "traverse", "start",
  "direction", "min_depth", "max_depth", "edge_collections", "vertex_collections", "limit"}``.

Any part may carry ``company_id`` (or ``tenant_id``), the seed's habit: it must be the caller's
tenant, or the whole operation is refused (``permission_denied``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from database_service.application.keyvalue import MAX_TTL_MS, KeyValueCommand, Operation
from database_service.errors import (
    DatabaseServiceError,
    FailedPrecondition,
    InvalidRequest,
    PermissionDenied,
)
from database_service.jsonvalues import check_json

__all__ = [
    "STORE_OF",
    "ClickHousePart",
    "GraphPart",
    "KeyValuePart",
    "MultiDbRequest",
    "NotSupported",
    "Part",
    "PostgresPart",
    "StoreNotConfigured",
    "VectorPart",
    "outbox_operation",
    "parse_request",
]

# The names a part may be given → the store that runs it.
STORE_OF: dict[str, str] = {
    "postgresql": "postgresql",
    "dragonflydb": "dragonflydb",
    "redis": "dragonflydb",
    "clickhouse": "clickhouse",
    "vector": "vector",
    "weaviate": "vector",
    "pgvector": "vector",
    "graph": "graph",
    "arangodb": "graph",
}
MAX_PARTS = len(STORE_OF)


class NotSupported(InvalidRequest):
    """A part this build cannot run (a ClickHouse write: no tenant-writable tables)."""

    code = "not_supported"


class StoreNotConfigured(FailedPrecondition):
    """A part names a store this deployment has not configured."""

    code = "not_configured"


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    company_id: StrictStr | None = None
    tenant_id: StrictStr | None = None


JsonParams = list[Any] | dict[str, Any] | None


class Statement(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: StrictStr = Field(alias="sql")
    params: JsonParams = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PostgresPart(_Part):
    query: StrictStr | None = None
    params: JsonParams = None
    statements: list[StrictStr | Statement] | None = None

    def statement_list(self) -> list[tuple[str, list[Any]]]:
        """The statements with their parameters in wire order (``:name``/``$name`` bound)."""
        if (self.query is None) == (self.statements is None):
            raise InvalidRequest("needs 'query' or 'statements' (one of them)")
        if self.query is not None:
            return [bind_params(self.query, self.params)]
        if self.params is not None:
            raise InvalidRequest("'params' goes with 'query'; each statement has its own")
        assert self.statements is not None
        if not self.statements:
            raise InvalidRequest("'statements' is empty")
        return [
            bind_params(s, None) if isinstance(s, str) else bind_params(s.query, s.params)
            for s in self.statements
        ]


class KeyValuePart(_Part):
    operation: Literal["get", "set", "delete", "incr", "expire", "mget"]
    key: StrictStr | None = None
    key_base64: StrictStr | None = None
    keys: list[StrictStr] | None = None
    keys_base64: list[StrictStr] | None = None
    value: Any = None
    value_base64: StrictStr | None = None
    ttl: StrictInt | StrictFloat | None = Field(default=None, description="seconds")
    ttl_ms: StrictInt | None = None
    by: StrictInt | None = None

    @property
    def is_write(self) -> bool:
        return self.operation not in {"get", "mget"}

    def command(self) -> KeyValueCommand:
        """The key-value use case's command (fields checked per operation there too)."""
        if self.key is not None and self.key_base64 is not None:
            raise InvalidRequest("give 'key' or 'key_base64', not both")
        if self.value is not None and self.value_base64 is not None:
            raise InvalidRequest("give 'value' or 'value_base64', not both")
        if self.ttl is not None and self.ttl_ms is not None:
            raise InvalidRequest("give 'ttl' (seconds) or 'ttl_ms', not both")
        if self.keys is not None and self.keys_base64 is not None:
            raise InvalidRequest("give 'keys' or 'keys_base64', not both")
        keys: list[bytes | str] | None = None if self.keys is None else list(self.keys)
        if self.keys_base64 is not None:
            keys = [_b64(k, "keys_base64") for k in self.keys_base64]
        key: bytes | str | None = self.key
        if self.key_base64 is not None:
            key = _b64(self.key_base64, "key_base64")
        value: bytes | str | None = None
        if self.value_base64 is not None:
            value = _b64(self.value_base64, "value_base64")
        elif isinstance(self.value, str):
            value = self.value
        elif self.value is not None:
            value = orjson.dumps(self.value)  # the seed passes the signal's dict: its JSON text
        ttl_ms = self.ttl_ms
        if self.ttl is not None:
            # Bounded before it is multiplied: 1e308 seconds is finite, its milliseconds not.
            if not 0 < self.ttl <= MAX_TTL_MS / 1000:
                raise InvalidRequest(f"ttl must be more than 0 and at most {MAX_TTL_MS // 1000} s")
            ttl_ms = max(1, math.ceil(self.ttl * 1000))  # rounded up: never 0
        command = KeyValueCommand(
            Operation(self.operation),
            key=key,
            value=value,
            ttl_ms=ttl_ms,
            by=self.by,
            keys=keys,
        )
        command.check()
        return command


_WRITE_START = re.compile(
    r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*(insert|alter|create|drop|truncate|delete|update|optimize"
    r"|rename|system|kill|grant|revoke|attach|detach|exchange)\b",
    re.IGNORECASE | re.DOTALL,
)


_INSERT_START = re.compile(r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*insert\b", re.I | re.DOTALL)


class ClickHousePart(_Part):
    query: StrictStr
    params: JsonParams = None

    @property
    def is_write(self) -> bool:
        return _WRITE_START.match(self.query) is not None

    def check(self, *, writes: bool = True) -> None:
        if not self.is_write:
            if self.params:
                raise InvalidRequest("a ClickHouse read takes no parameters: write literals")
            return
        if not writes:
            raise NotSupported(
                "ClickHouse writes are not supported by this deployment: analytics on ClickHouse"
                " has no tenant-writable tables here. Reads run."
            )
        if not _INSERT_START.match(self.query):
            raise NotSupported(
                "of ClickHouse writes, a multi-store operation takes INSERT into the tenant's own"
                " tables (create them through the analytics query API)"
            )
        if self.params is None:
            raise InvalidRequest("an INSERT takes 'params' (a list for $n, an object for :name)")


class VectorObjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = None
    vector: list[StrictFloat | StrictInt]
    properties: dict[str, Any] = Field(default_factory=dict)


class VectorPart(_Part):
    operation: Literal["upsert", "delete", "similarity_search", "search"]
    class_: StrictStr = Field(alias="class")
    objects: list[VectorObjectIn] | None = None
    ids: list[StrictStr] | None = None
    where: dict[str, Any] | None = None
    vector: list[StrictFloat | StrictInt] | None = None
    limit: StrictInt | None = None
    certainty: StrictFloat | StrictInt | None = None
    distance: StrictFloat | StrictInt | None = None
    tenant_filter: StrictStr | None = None
    with_vector: StrictBool | None = None

    @property
    def is_write(self) -> bool:
        return self.operation in {"upsert", "delete"}

    def check(self) -> None:
        from database_service.stores.vector.model import collection_name  # noqa: PLC0415

        collection_name(self.class_)  # refused now, not when the entry is applied
        given = {k for k, v in self.__dict__.items() if v is not None} - {
            "operation", "class_", "company_id", "tenant_id",
        }  # fmt: skip
        allowed = {
            "upsert": {"objects"},
            "delete": {"ids", "where"},
        }.get(
            self.operation,
            {"vector", "limit", "certainty", "distance", "where", "tenant_filter", "with_vector"},
        )
        extra = given - allowed
        if extra:
            raise InvalidRequest(f"{self.operation} does not take {', '.join(sorted(extra))}")
        if self.operation == "upsert" and not self.objects:
            raise InvalidRequest("upsert needs 'objects'")
        if self.operation == "delete" and (self.ids is None) == (self.where is None):
            raise InvalidRequest("delete needs 'ids' or 'where' (one of them)")
        if self.operation in {"similarity_search", "search"} and self.vector is None:
            raise InvalidRequest(f"{self.operation} needs 'vector'")
        for obj in self.objects or ():
            if obj.id is not None:
                _uuid(obj.id)
        for i in self.ids or ():
            _uuid(i)

    def with_ids(self) -> VectorPart:
        """The part with an id for every object to upsert: the outbox entry then writes the same
        objects however often it is applied."""
        if not self.objects:
            return self
        objects = [
            o if o.id is not None else o.model_copy(update={"id": str(uuid.uuid4())})
            for o in self.objects
        ]
        return self.model_copy(update={"objects": objects})


class VertexIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    collection: StrictStr
    key: StrictStr = Field(alias="_key")
    properties: dict[str, Any] = Field(default_factory=dict)


class EdgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    collection: StrictStr
    from_: StrictStr = Field(alias="from")
    to: StrictStr
    key: StrictStr | None = Field(default=None, alias="_key")
    properties: dict[str, Any] = Field(default_factory=dict)


class GraphPart(_Part):
    operation: Literal["upsert", "delete", "traverse"]
    vertices: list[VertexIn] | None = None
    edges: list[EdgeIn] | None = None
    vertex_id: StrictStr | None = None
    edge_id: StrictStr | None = None
    start: StrictStr | None = None
    direction: StrictStr | None = None
    min_depth: StrictInt | None = None
    max_depth: StrictInt | None = None
    edge_collections: list[StrictStr] | None = None
    vertex_collections: list[StrictStr] | None = None
    limit: StrictInt | None = None

    @property
    def is_write(self) -> bool:
        return self.operation != "traverse"

    def check(self) -> None:
        from database_service.stores.graph.model import (  # noqa: PLC0415 - the graph model
            Edge,
            Vertex,
            direction_of,
            split_id,
        )

        given = {k for k, v in self.__dict__.items() if v is not None} - {
            "operation", "company_id", "tenant_id",
        }  # fmt: skip
        allowed = {
            "upsert": {"vertices", "edges"},
            "delete": {"vertex_id", "edge_id"},
            "traverse": {
                "start", "direction", "min_depth", "max_depth", "edge_collections",
                "vertex_collections", "limit",
            },
        }[self.operation]  # fmt: skip
        extra = given - allowed
        if extra:
            raise InvalidRequest(f"{self.operation} does not take {', '.join(sorted(extra))}")
        if self.operation == "upsert":
            if not self.vertices and not self.edges:
                raise InvalidRequest("upsert needs 'vertices' or 'edges'")
            for v in self.vertices or ():
                Vertex.of(v.collection, v.key, v.properties)
            for e in self.edges or ():
                Edge.of(e.collection, e.from_, e.to, e.key, e.properties)
        elif self.operation == "delete":
            if (self.vertex_id is None) == (self.edge_id is None):
                raise InvalidRequest("delete needs 'vertex_id' or 'edge_id' (one of them)")
            split_id(self.vertex_id or self.edge_id or "")
        else:
            if self.start is None:
                raise InvalidRequest("traverse needs 'start'")
            split_id(self.start)
            if self.direction is not None:
                direction_of(self.direction)


Part = PostgresPart | KeyValuePart | ClickHousePart | VectorPart | GraphPart
_MODEL: dict[str, type[_Part]] = {
    "postgresql": PostgresPart,
    "dragonflydb": KeyValuePart,
    "clickhouse": ClickHousePart,
    "vector": VectorPart,
    "graph": GraphPart,
}


class Phase(enum.StrEnum):
    """Where a part runs: in the PostgreSQL transaction, recorded in the outbox and applied after
    the commit, or directly after the commit (reads)."""

    TRANSACTION = "transaction"
    OUTBOX = "outbox"
    READ = "read"


@dataclass(frozen=True, slots=True)
class CheckedPart:
    name: str  # as the caller named it
    store: str
    part: Part
    phase: Phase


@dataclass(frozen=True, slots=True)
class MultiDbRequest:
    parts: list[CheckedPart]

    @property
    def postgres(self) -> CheckedPart | None:
        return next((p for p in self.parts if p.store == "postgresql"), None)

    @property
    def writes(self) -> list[CheckedPart]:
        return [p for p in self.parts if p.phase is Phase.OUTBOX]

    @property
    def reads(self) -> list[CheckedPart]:
        return [p for p in self.parts if p.phase is Phase.READ]


def _pydantic_reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first.get("loc", ()))
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg"))


def check_part(name: str, store: str, raw: Any, *, clickhouse_writes: bool = True) -> Part:
    """One part, validated; errors name the part."""
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"the {name} part is a JSON object")
    if store != "postgresql":
        # The service writes these parts as JSON itself (the outbox, a key-value value, a
        # store's request): what a lenient reader let through (NaN, infinities, integers past
        # 64 bits, lone surrogates, nesting no writer takes) is refused here, before anything
        # runs, not half way or changed silently. PostgreSQL parameters bind as they are.
        check_json(dict(raw), f"the {name} part")
    try:
        part = _MODEL[store].model_validate(dict(raw))
        if isinstance(part, PostgresPart):
            part.statement_list()
        elif isinstance(part, KeyValuePart):
            part.command()
        elif isinstance(part, ClickHousePart):
            part.check(writes=clickhouse_writes)
        elif isinstance(part, VectorPart | GraphPart):
            part.check()
    except ValidationError as exc:
        raise InvalidRequest(f"the {name} part: {_pydantic_reason(exc)}") from None
    except DatabaseServiceError as exc:
        exc.message = f"the {name} part: {exc.message}"
        raise
    if isinstance(part, VectorPart):
        part = part.with_ids()
    return part  # type: ignore[return-value]


def parse_request(
    tenant_id: str, operation: Any, *, clickhouse_writes: bool = False
) -> MultiDbRequest:
    """Every part checked, in the caller's order; nothing has run yet. ``clickhouse_writes``:
    the deployment's ClickHouse takes inserts into tenants' own tables."""
    if not isinstance(operation, Mapping) or not operation:
        raise InvalidRequest("an operation is a JSON object of store name → part (none given)")
    if len(operation) > MAX_PARTS:
        raise InvalidRequest(f"at most {MAX_PARTS} parts")
    stores_seen: dict[str, str] = {}
    parts: list[CheckedPart] = []
    for name, raw in operation.items():
        store = STORE_OF.get(name)
        if store is None:
            known = ", ".join(sorted(STORE_OF))
            raise StoreNotConfigured(
                f"store {str(name)[:40]!r} is unknown to this service (known: {known})"
            )
        if store in stores_seen:
            raise InvalidRequest(f"the {name} and {stores_seen[store]} parts name the same store")
        stores_seen[store] = name
        if isinstance(raw, Mapping):
            for field in ("company_id", "tenant_id"):
                company = raw.get(field)
                if company is not None and company != tenant_id:
                    raise PermissionDenied(
                        f"the {name} part names company {str(company)[:60]!r}, but this call acts"
                        f" for {tenant_id!r}"
                    )
        part = check_part(name, store, raw, clickhouse_writes=clickhouse_writes)
        phase = Phase.READ
        if store == "postgresql":
            phase = Phase.TRANSACTION
        elif isinstance(part, KeyValuePart | VectorPart | GraphPart | ClickHousePart) and (
            part.is_write
        ):
            phase = Phase.OUTBOX
        parts.append(CheckedPart(name, store, part, phase))
    return MultiDbRequest(parts)


def outbox_operation(store: str, op: Any) -> Part:
    """An outbox entry's operation read back, checked as a request's part is (a row a tenant
    forged would meet the same rules)."""
    if store not in _MODEL or store == "postgresql":
        raise InvalidRequest(f"an outbox entry for store {store!r} cannot be applied")
    part = check_part(store, store, op)
    if not getattr(part, "is_write", False):
        raise InvalidRequest("an outbox entry is a write")
    return part


def part_document(part: Part) -> dict[str, Any]:
    """A part as the outbox keeps it (JSON; aliases, no absent fields, no company)."""
    return part.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude={"company_id", "tenant_id"}
    )


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} is not valid base64") from None


def _uuid(text: str) -> None:
    try:
        uuid.UUID(text)
    except ValueError:
        raise InvalidRequest(f"an object id is a UUID, not {text[:60]!r}") from None


# --- parameters by name ----------------------------------------------------------------------


def bind_params(sql: str, params: Any) -> tuple[str, list[Any]]:
    """``params`` in wire order: a list as it is; a mapping binds ``:name`` placeholders (the
    client's scanner: nothing in strings, comments or quoted identifiers, no cast) and
    ``$name`` ones — by name, never the keys as values."""
    from database_service_client.params import bind  # noqa: PLC0415 - shared with the client

    if params is None:
        return sql, []
    try:
        return bind(sql, params)
    except (KeyError, ValueError, TypeError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise InvalidRequest(f"params: {message}") from None
