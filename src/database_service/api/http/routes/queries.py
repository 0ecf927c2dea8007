"""``POST /api/v1/query``: one statement for a tenant, run as that tenant's role.

The hot path of the REST front end, kept lean: the caller comes from a dependency that reads
the headers itself (no per-parameter header resolution), and the response body is built as bytes
here with orjson (timestamps, text and numbers in C: ``isoformat`` per value was half the cost
of a 1,000-row answer), without pydantic validating it against ``QueryResponse`` (which stays
the documented shape), and bounded by ``max_result_bytes``.
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from database_service.api.http.deps import authenticated, tenant_context
from database_service.api.http.errors import ErrorResponses
from database_service.api.http.middleware import replaying
from database_service.api.http.schemas import QueryRequest, QueryResponse
from database_service.app import Application
from database_service.auth import Principal
from database_service.errors import UNREACHABLE_ERRORS, DatabaseServiceError, ResultTooLarge
from database_service.jsonvalues import dumps
from database_service.query import QueryResult, encode_value
from database_service.query.caching import CacheOptions
from database_service.results import Column, ValueKind

router = APIRouter(tags=["query"])
PATH = "/api/v1/query"

# Values of these kinds orjson writes itself, as the stdlib would (timestamps: ``isoformat``).
_NATIVE = frozenset({ValueKind.INTEGER, ValueKind.TEXT, ValueKind.BOOLEAN, ValueKind.TIMESTAMP})
# Rows are encoded this many at a time, so a result past the byte cap is refused after at most
# one batch past it, and a large result is never held twice as one string.
_BATCH_ROWS = 256
_ONE_PART_BYTES = 65_536  # a smaller body goes out in one piece
_HEADERS: list[dict[str, Any]] = [
    {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}
    for name in ("authorization", "x-tenant-id", "x-user-id")
]


async def caller(request: Request) -> Principal:
    """The caller, or 401 (audited), from the Authorization header."""
    core: Application = request.app.state.core
    return await authenticated(request, core, request.headers.get("authorization"))


def _dumps(value: Any) -> bytes:
    # jsonvalues.dumps: the stdlib where orjson refuses (an integer beyond 64 bits in a JSON
    # value; a tenant's jsonb nested deeper than orjson writes: result_too_large past the
    # stdlib's limit too); timestamps left to orjson in a row are encoded by ``encode_value``.
    return dumps(value, default=encode_value)


def _row_encoder(columns: Sequence[Column]) -> Callable[[Sequence[Any]], list[Any]]:
    """A row as values orjson writes: copied as is (C), then only the columns that need it
    encoded in Python."""
    encoded = [i for i, c in enumerate(columns) if c.kind not in _NATIVE]
    if not encoded:
        return list

    def encode(row: Sequence[Any]) -> list[Any]:
        values = list(row)
        for i in encoded:
            values[i] = encode_value(values[i])
        return values

    return encode


def _row_batches(result: QueryResult, limit: int) -> Iterator[bytes]:
    """The rows as JSON in UTF-8, a batch at a time (``[..],[..]``), refused past ``limit``
    bytes: the executor's bound counts characters and raw bytes, a body counts UTF-8 and
    base64."""
    encode = _row_encoder(result.columns)
    rows = result.rows
    size = 0
    for start in range(0, len(rows), _BATCH_ROWS):
        text = _dumps([encode(row) for row in rows[start : start + _BATCH_ROWS]])[1:-1]
        size += len(text) + 1  # and a comma
        if size > limit:
            raise ResultTooLarge(
                f"the result is larger than {limit} bytes; add a LIMIT, select fewer columns or"
                " use the streaming gRPC API"
            )
        yield text


class _JsonParts(Response):
    """A JSON body sent as the parts it was built in: a large result is not copied once more
    into one string (its rows and their encoding, each at most about the cap, are what a
    request holds)."""

    media_type = "application/json"

    def __init__(self, parts: list[bytes]) -> None:
        size = sum(map(len, parts))
        if size <= _ONE_PART_BYTES:
            parts = [b"".join(parts)]
        self.parts = parts
        super().__init__(parts[0] if len(parts) == 1 else b"")
        if len(parts) > 1:
            self.headers["content-length"] = str(size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if len(self.parts) == 1:
            await super().__call__(scope, receive, send)
            return
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        for part in self.parts[:-1]:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": self.parts[-1]})


def _body(result: QueryResult, limit: int) -> list[bytes]:
    """The response document (``QueryResponse``) in parts; its rows bounded by ``limit``
    bytes."""
    columns = _dumps([{"name": c.name, "type": c.type_name} for c in result.columns])
    tail = _dumps(
        {
            "row_count": result.row_count,
            "command": result.command,
            "statement_class": result.kind.value,
            "duration_ms": round(result.duration_ms, 3),
        }
    )
    parts = [b'{"columns":%s,"rows":[' % columns]
    for batch in _row_batches(result, limit):
        parts += (batch, b",")
    if len(parts) > 1:
        parts.pop()  # the last comma
    parts.append(b"]," + tail[1:])
    return parts


async def _answer(
    request: Request, principal: Principal, body: QueryRequest, headers: Mapping[str, str]
) -> Response:
    core: Application = request.app.state.core
    ctx = tenant_context(
        request,
        principal,
        body.tenant_id,
        body.user_id or headers.get("x-user-id"),
        header=headers.get("x-tenant-id"),
    )
    limit = core.settings.max_result_bytes
    if not (body.cache_ttl_ms or body.allow_stale or core.executor.caches_by_rule(ctx.tenant_id)):
        result = await core.executor.execute(principal, ctx, body.sql, body.params)
        return _JsonParts(_body(result, limit))
    options = CacheOptions(
        ttl_ms=body.cache_ttl_ms,
        allow_stale=body.allow_stale,
        form="rest-json",
        encode=lambda r: b"".join(_body(r, limit)),
    )
    result = await core.executor.execute(principal, ctx, body.sql, body.params, cache=options)
    info = result.cache
    if info is None:  # not a read: the cache was not consulted
        return _JsonParts(_body(result, limit))
    cache = _dumps({k: v for k, v in dataclasses.asdict(info).items() if v is not None})
    payload = result.payload if result.payload is not None else b"".join(_body(result, limit))
    # The stored document with what the cache did first (a stored one never holds "cache").
    response = _JsonParts([b'{"cache":' + cache + b"," + payload[1:]])
    response.headers["x-cache"] = info.status
    return response


@router.post(PATH, response_model=QueryResponse, openapi_extra={"parameters": _HEADERS})
async def query(
    principal: Annotated[Principal, Depends(caller)],
    body: QueryRequest,
    request: Request,
) -> Response:
    """Run one SQL statement for a tenant, as that tenant's PostgreSQL role."""
    return await _answer(request, principal, body, request.headers)


# What the metrics and error middleware name a request by (``scope["route"].path``).
QUERY_ROUTE = next(r for r in router.routes if getattr(r, "path", None) == PATH)
_WANTED = {b"authorization", b"content-type", b"x-tenant-id", b"x-user-id"}


class QueryFastPath:
    """``POST /api/v1/query`` without FastAPI's routing, dependency solving and exception
    middleware, which cost more CPU per request than the query core (py-spy of ``serve`` under
    load). It answers only a request FastAPI would parse the same way and accept: a JSON body
    (orjson parses only what the stdlib parses the same way) that ``QueryRequest`` validates.
    Anything else (a body that is not JSON or not valid, another method or path) goes to the
    app, which answers as ever; so does every error's shape, since service errors are answered
    by the same ``ErrorResponses`` and anything else reaches ``InternalErrors``. Inside the
    metrics and error middleware, which see the route as FastAPI would have set it."""

    def __init__(self, app: ASGIApp, errors: ErrorResponses, route: BaseRoute) -> None:
        self.app = app
        self.errors = errors
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _WANTED and name.decode() not in headers:
                headers[name.decode()] = value.decode("latin-1")
        chunks = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        replay = replaying(raw, receive)

        body = _parsed(raw, headers.get("content-type"))
        if body is None:
            await self.app(scope, replay, send)
            return
        scope["route"] = self.route
        request = Request(scope, replay)
        try:
            core: Application = scope["app"].state.core
            principal = await authenticated(request, core, headers.get("authorization"))
            response = await _answer(request, principal, body, headers)
        except DatabaseServiceError as exc:
            response = self.errors.service(request, exc)
        except UNREACHABLE_ERRORS as exc:
            response = self.errors.driver(request, exc)
        await response(scope, replay, send)


def _parsed(raw: bytes, content_type: str | None) -> QueryRequest | None:
    """The body, when FastAPI would read it as JSON and accept it; else None."""
    if content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
        return None
    try:
        return QueryRequest.model_validate(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValidationError):
        return None
