"""What every RPC shares: who is calling, for which tenant, and how the call ends.

``rpc`` wraps each RPC: a request whose bytes did not decode (``Undecodable``, from the
deserializers ``server.py`` installs) is ``INVALID_ARGUMENT`` / ``invalid_request``; a service
error leaves with its status; PostgreSQL unreachable on a path without its own translation is
``UNAVAILABLE``; anything else is a bug, logged with its traceback, counted, audited and answered
``INTERNAL`` / ``internal`` without its text. Every call is counted and timed, and counted in the
tenant's figures once the caller may act for that tenant.

Every call is a request for the logs (``observability.logs``): its id is the caller's
``x-request-id`` when sane, else a new one, and goes back as trailing metadata ``x-request-id``
(whatever ends the call); every line logged during the call carries it, with the tenant once
``x-tenant-id`` is valid and the service once the caller is authenticated. A failed
authentication is logged, one line with its reason; never the credentials.

Metadata: ``authorization: Bearer <token>``, ``x-tenant-id``, optional ``x-user-id`` and
``x-request-id``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
from google.protobuf.message import DecodeError, Message

from database_service.api.grpc.front import PEER_HEADER
from database_service.api.grpc.status import abort_with
from database_service.auth import Principal
from database_service.errors import (
    DatabaseServiceError,
    InvalidRequest,
    Unauthenticated,
    Unavailable,
    caller_text_error,
    escaped_driver_error,
    unavailable,
)
from database_service.observability import AuditEvent
from database_service.observability.logs import REQUEST_ID_HEADER, bind, request_id_from
from database_service.observability.notices import Notices
from database_service.query import TenantContext
from database_service.query.replays import CheckedKey, ReplayKey
from database_service.tenancy import validate_tenant_id
from database_service.tls.peer import PeerCertificate, peer_from_pem

if TYPE_CHECKING:
    from database_service.app import Application

__all__ = ["Caller", "Undecodable", "peer_address", "rpc", "tolerant"]

log = logging.getLogger(__name__)

_SERVER_ERRORS = {"internal", "database_error", "unavailable", "connection_exception"}


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a request deserializer returns for bytes that are not the request message (invalid
    UTF-8 in a string field, a truncated varint, ...): ``rpc`` answers it INVALID_ARGUMENT.
    Raising in the deserializer instead would end the call as INTERNAL, unaudited."""

    message_type: str
    reason: str


def tolerant(parse: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    """A request deserializer that returns ``Undecodable`` instead of raising."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, UnicodeDecodeError) as exc:
            return Undecodable(message_type, str(exc))

    return deserialize


@dataclass(slots=True)
class _Call:
    """What is known about the current call, for the audit row, the tenant's figures and the
    log lines (as the request they belong to: ``logs.RequestInfo``)."""

    action: str = "grpc"
    service: str | None = None
    tenant_id: str | None = None  # set once the caller may act for it
    metadata: dict[str, Any] | None = None
    request_id: str = ""
    tenant: str | None = None  # for the logs: set once x-tenant-id is valid


_CALL: ContextVar[_Call] = ContextVar("dbsvc_grpc_call")


def _call() -> _Call:
    call = _CALL.get(None)
    if call is None:  # called outside rpc
        call = _Call()
        _CALL.set(call)
    return call


class Caller:
    """Reads the caller from a call's metadata through the core's authenticator."""

    def __init__(self, core: Application) -> None:
        self.core = core
        # gRPC asks for (and verifies) client certificates only with a client CA configured.
        self._mutual_tls = core.settings.tls_client_ca_file is not None

    async def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        authorization = _metadata(context).get("authorization")
        call = _call()
        try:
            principal = await self.core.authenticator.authenticate(
                authorization if isinstance(authorization, str) else None,
                _peer(context) if self._mutual_tls else None,
            )
        except Unauthenticated as exc:  # not Unavailable: PostgreSQL being down denies no one
            # The reason only: no message of Authenticator's holds the token it was given.
            log.info(
                "authentication failed (%s from %s): %s",
                call.action,
                peer_address(context),
                exc.message,
            )
            await self.core.access.denied(None, None, call.action, exc)
            raise
        call.service = principal.service
        return principal

    async def optional_principal(self, context: grpc.aio.ServicerContext) -> Principal | None:
        """The caller when it sent credentials (bad ones are refused), else None."""
        if _metadata(context).get("authorization") is None and (
            not self._mutual_tls or _peer(context) is None
        ):
            return None
        try:
            return await self.principal(context)
        except Unavailable:
            return None  # PostgreSQL is down: answer what anyone may see

    @staticmethod
    def tenant_header(context: grpc.aio.ServicerContext) -> str | None:
        tenant_id = _metadata(context).get("x-tenant-id")
        return tenant_id if isinstance(tenant_id, str) and tenant_id else None

    def known(
        self, context: grpc.aio.ServicerContext, request: Message
    ) -> tuple[Principal, ReplayKey] | None:
        """The caller, when its bearer token was verified before and that still holds
        (``Authenticator.known``), with what it sent that an answer depends on (for
        ``QueryExecutor.replay``); None: ``tenant`` decides. Never with mutual TLS (the client
        certificate is checked too)."""
        known = self._known(context)
        if known is None:
            return None
        principal, authorization, tenant_id, user_id = known
        return principal, (authorization, tenant_id, user_id, request.SerializeToString())

    def known_statement(
        self, context: grpc.aio.ServicerContext, sql: str
    ) -> tuple[Principal, CheckedKey] | None:
        """``known``, with what the checks of statement ``sql`` depend on (for
        ``QueryExecutor.checked``)."""
        known = self._known(context)
        if known is None:
            return None
        principal, authorization, tenant_id, user_id = known
        return principal, (authorization, tenant_id, user_id, sql)

    def _known(
        self, context: grpc.aio.ServicerContext
    ) -> tuple[Principal, str, str, str | None] | None:
        if self._mutual_tls:
            return None
        metadata = _metadata(context)
        authorization = metadata.get("authorization")
        tenant_id = metadata.get("x-tenant-id")
        user_id = metadata.get("x-user-id")
        if (
            authorization.__class__ is not str
            or tenant_id.__class__ is not str
            or (user_id is not None and user_id.__class__ is not str)
        ):
            return None
        principal = self.core.authenticator.known(authorization)
        if principal is None:
            return None
        return principal, authorization, tenant_id, user_id

    @staticmethod
    def replayed(principal: Principal, tenant_id: str) -> None:
        """What ``tenant`` notes of a call, for a call ``QueryExecutor.replay`` answered (its
        caller acted for the tenant before: ``execute`` checked it)."""
        call = _call()
        call.service = principal.service
        call.tenant = call.tenant_id = tenant_id

    @staticmethod
    def acting_for(principal: Principal, tenant_id: str) -> None:
        """Count this call in the tenant's figures, once the caller may act for it."""
        if principal.can_act_for(tenant_id):
            call = _call()
            call.tenant_id = call.tenant = tenant_id

    async def tenant(self, context: grpc.aio.ServicerContext) -> tuple[Principal, TenantContext]:
        """The caller and the tenant (and user) it names."""
        principal = await self.principal(context)
        metadata = _metadata(context)
        tenant_id = metadata.get("x-tenant-id")
        if not isinstance(tenant_id, str) or not tenant_id:
            raise InvalidRequest("the x-tenant-id metadata is required")
        user_id = metadata.get("x-user-id")
        ctx = TenantContext(
            validate_tenant_id(tenant_id), user_id if isinstance(user_id, str) else None
        )
        call = _call()
        call.tenant = ctx.tenant_id
        if principal.can_act_for(ctx.tenant_id):  # count the call in the tenant's figures
            call.tenant_id = ctx.tenant_id
        return principal, ctx


def peer_address(context: grpc.aio.ServicerContext) -> str:
    """The client's address (``ipv4:host:port``): for a call the compiled front relayed to
    grpcio's Unix socket, the one it names (the front drops any a client sends)."""
    peer: str = context.peer()
    if peer.startswith("unix:"):
        forwarded = _metadata(context).get(PEER_HEADER)
        if isinstance(forwarded, str):
            return forwarded
    return peer


def _peer(context: grpc.aio.ServicerContext) -> PeerCertificate | None:
    """The client certificate gRPC verified against the client CA, or None."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    return peer_from_pem(pem[0]) if pem else None


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, Any]:
    """The call's metadata as a dict, made once per call."""
    call = _call()
    if call.metadata is None:
        call.metadata = dict(context.invocation_metadata() or ())
    return call.metadata


class _RequestIdOnAbort:
    """The call's context for ``abort_with``, whose trailing metadata replaces what the call set
    before (gRPC's ``abort`` does): this one adds the request id to it."""

    def __init__(self, context: grpc.aio.ServicerContext, request_id: str) -> None:
        self._context = context
        self._request_id = request_id

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        trailing = (*trailing_metadata, (REQUEST_ID_HEADER, self._request_id))
        await self._context.abort(code, details, trailing_metadata=trailing)
        raise AssertionError("context.abort returns only by raising")  # for the type checker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Servicer:
    """What ``rpc`` needs of the servicer it wraps."""

    core: Application
    notices: Notices


def _answered(calls: list[tuple[_Servicer, str, float, _Call]]) -> None:
    """Unary calls answered ``ok`` in the last few milliseconds (``RequestWindow.later``, of
    the window of one application: the servicers' core), counted and timed together."""
    core = calls[0][0].core
    core.metrics.requests_done([("grpc", name, "ok", elapsed) for _, name, elapsed, _ in calls])
    record = core.window.record
    for _, _, elapsed, call in calls:
        record(elapsed, True, call.tenant_id)


def rpc(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Count, time and translate errors for one RPC, unary or streaming."""
    name = handler.__name__
    action = f"grpc.{name}"

    def record(servicer: _Servicer, started: float, code: str, call: _Call) -> None:
        recorded(servicer, time.perf_counter() - started, code, call)

    def recorded(servicer: _Servicer, elapsed: float, code: str, call: _Call) -> None:
        metrics = servicer.core.metrics
        metrics.request_done("grpc", name, code, elapsed)
        if code != "ok":
            metrics.errors.labels(code).inc()
        servicer.core.window.record(elapsed, code not in _SERVER_ERRORS, call.tenant_id)

    async def undecodable(servicer: _Servicer, request: Undecodable) -> InvalidRequest:
        exc = InvalidRequest(
            f"invalid request: not a valid {request.message_type} message ({request.reason})"
        )
        await servicer.core.access.denied(None, None, action, exc)
        return exc

    async def checked(servicer: _Servicer, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A client stream, with an undecodable message turned into InvalidRequest."""
        async for message in requests:
            if isinstance(message, Undecodable):
                raise await undecodable(servicer, message)
            yield message

    async def fail(
        servicer: _Servicer, context: Any, started: float, call: _Call, exc: Exception
    ) -> NoReturn:
        if isinstance(exc, DatabaseServiceError):
            error = exc
        elif (text := caller_text_error(exc)) is not None:
            error = text
        elif escaped_driver_error(exc):
            # Last resort: PostgreSQL unreachable on a path without its own translation is
            # still UNAVAILABLE, which clients retry, not UNKNOWN.
            servicer.notices.once(
                "postgres-unreachable",
                "PostgreSQL is unreachable (%s: %s); calls answer UNAVAILABLE until it is back:"
                " see the health document's dependencies.postgresql",
                type(exc).__name__,
                exc,
            )
            error = unavailable(name, exc)
        else:
            log.error("%s: unexpected error", name, exc_info=exc)
            servicer.core.metrics.unhandled.labels("grpc", name).inc()
            await servicer.core.audit.record(
                AuditEvent(
                    service=call.service,
                    tenant_id=call.tenant_id,
                    action=action,
                    outcome="error",
                    code="internal",
                    detail=type(exc).__name__,
                )
            )
            error = DatabaseServiceError("internal error: the service logged it")
        record(servicer, started, error.error_code, call)
        await abort_with(
            cast("grpc.aio.ServicerContext", _RequestIdOnAbort(context, call.request_id)), error
        )

    def start(call: _Call, context: Any) -> None:
        # Each RPC runs in its own task, so in its own context: nothing to reset afterwards.
        _CALL.set(call)
        call.request_id = request_id_from(_metadata(context).get(REQUEST_ID_HEADER))
        bind(call)
        # Trailing, not initial: setting it is free, sending initial metadata first is one more
        # write per call (an error's trailing metadata gets it in fail()).
        context.set_trailing_metadata(((REQUEST_ID_HEADER, call.request_id),))

    async def begin(servicer: _Servicer, call: _Call, request: Any, context: Any) -> Any:
        start(call, context)
        if isinstance(request, Undecodable):
            raise await undecodable(servicer, request)
        if hasattr(request, "__aiter__"):  # client streaming: check each message as it comes
            return checked(servicer, request)
        return request

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: _Servicer, request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            call = _Call(action=action)
            try:
                request = await begin(self, call, request, context)
                async for message in handler(self, request, context):
                    yield message
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(self, context, started, call, exc)
            record(self, started, "ok", call)

        return stream

    @functools.wraps(handler)
    async def unary(self: _Servicer, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        call = _Call(action=action)
        try:
            # begin() without its coroutine for the usual request: decoded, not a stream.
            if isinstance(request, Message):
                start(call, context)
            else:
                request = await begin(self, call, request, context)
            result = await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await fail(self, context, started, call, exc)
        # Counted once the answer is on its way, with the others of the next few
        # milliseconds: one callback for them all rather than one each.
        self.core.window.later(_answered, (self, name, time.perf_counter() - started, call))
        return result

    return unary
