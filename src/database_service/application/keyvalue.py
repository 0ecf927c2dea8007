"""Key-value operations for services (the seed's ``"dragonflydb": {"operation": "set", …}``):
get, set, delete, incr, expire, mget — one use case for every front end.

The tenant is the caller's context (``TenantContext.tenant_id``: gRPC ``x-tenant-id``, the REST
body or header), never a part of the key: the store (``cache.kv``) puts every key the caller
names under that tenant's namespace, verbatim, so no key — separators, glob characters, braces,
NUL, another tenant's full namespaced key — reaches another tenant. A user id, when the request
carries one, does not narrow the namespace: the keys are the company's, as in the seed.

Reads (get, mget) need ``read`` for the tenant, writes (set, delete, incr, expire) ``write``;
the tenant must exist and be active (a suspended tenant's keys are kept but unreachable). Every
call is audited as ``kv.<operation>``, as the query core audits statements: ``ok``, ``denied``
(refused before the store did anything: scope, tenant, a bad key or value) or ``error`` (the
store could not: ``failed_precondition`` for incr of a non-integer, ``unavailable`` for Redis
down). Audit details name the operation and counts, never keys or values.

TTLs are milliseconds (``ttl_ms``); the seed's seconds are the client's to convert.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from database_service.application.access import Access
from database_service.auth import Principal, Scope
from database_service.cache import KeyValueStore
from database_service.errors import (
    DatabaseServiceError,
    InvalidParameters,
    InvalidRequest,
    InvalidText,
)
from database_service.observability.audit import AuditEvent, AuditLog
from database_service.query import TenantContext
from database_service.tenancy import TenantRegistry

__all__ = [
    "MAX_TTL_MS",
    "KeyValueCommand",
    "KeyValueOps",
    "KeyValueResult",
    "Operation",
    "operation_of",
]


class Operation(enum.StrEnum):
    GET = "get"
    SET = "set"
    DELETE = "delete"
    INCR = "incr"
    EXPIRE = "expire"
    MGET = "mget"


# Past this a TTL overflows Redis's expiry arithmetic (now in ms + TTL); JSON's safe integers.
MAX_TTL_MS = 2**53 - 1
_READS = frozenset({Operation.GET, Operation.MGET})
# What each operation takes besides its key(s): the other fields must be absent.
_TAKES: dict[Operation, frozenset[str]] = {
    Operation.GET: frozenset({"key"}),
    Operation.SET: frozenset({"key", "value", "ttl_ms"}),
    Operation.DELETE: frozenset({"key"}),
    Operation.INCR: frozenset({"key", "by"}),
    Operation.EXPIRE: frozenset({"key", "ttl_ms"}),
    Operation.MGET: frozenset({"keys"}),
}
_NEEDS: dict[Operation, frozenset[str]] = {
    Operation.GET: frozenset({"key"}),
    Operation.SET: frozenset({"key", "value"}),
    Operation.DELETE: frozenset({"key"}),
    Operation.INCR: frozenset({"key"}),
    Operation.EXPIRE: frozenset({"key", "ttl_ms"}),
    Operation.MGET: frozenset({"keys"}),
}


def operation_of(name: str) -> Operation:
    try:
        return Operation(name)
    except ValueError:
        known = ", ".join(o.value for o in Operation)
        raise InvalidParameters(f"unknown key-value operation; one of {known}") from None


@dataclass(frozen=True, slots=True)
class KeyValueCommand:
    """One operation as a front end received it (``None``: the field was not sent)."""

    operation: Operation
    key: bytes | str | None = None
    value: bytes | str | None = None
    ttl_ms: int | None = None
    by: int | None = None
    keys: Sequence[bytes | str] | None = None

    def check(self) -> None:
        """Refuse a field the operation does not take, or a missing one it needs."""
        given = {
            name
            for name in ("key", "value", "ttl_ms", "by", "keys")
            if getattr(self, name) is not None
        }
        extra = given - _TAKES[self.operation]
        if extra:
            raise InvalidParameters(
                f"{self.operation.value} does not take {', '.join(sorted(extra))}"
            )
        missing = _NEEDS[self.operation] - given
        if missing:
            raise InvalidParameters(f"{self.operation.value} needs {', '.join(sorted(missing))}")
        if self.ttl_ms is not None and not 0 < self.ttl_ms <= MAX_TTL_MS:
            raise InvalidParameters(f"ttl_ms must be 1 to {MAX_TTL_MS} (milliseconds)")


@dataclass(slots=True)
class KeyValueResult:
    """What an operation returned, by operation:

    - get: ``found`` and ``value`` (None when absent);
    - set: ``found`` True (stored);
    - delete: ``found`` — whether a key was deleted;
    - incr: ``number``, the value after it;
    - expire: ``found`` — whether the key existed (and now expires);
    - mget: ``values``, one per key in order (None when absent)."""

    operation: Operation
    found: bool = False
    value: bytes | None = None
    number: int | None = None
    values: list[bytes | None] = field(default_factory=list)


class KeyValueOps:
    """The use case: authorize for the tenant, run on the store, audit."""

    def __init__(
        self, access: Access, store: KeyValueStore, registry: TenantRegistry, audit: AuditLog
    ) -> None:
        self._access = access
        self._store = store
        self._registry = registry
        self._audit = audit

    async def execute(
        self, principal: Principal, ctx: TenantContext, command: KeyValueCommand
    ) -> KeyValueResult:
        """Run ``command`` for the caller's tenant (``ctx.tenant_id``)."""
        op = command.operation
        tenant_id = ctx.tenant_id
        action = f"kv.{op.value}"
        scope = Scope.READ if op in _READS else Scope.WRITE
        await self._access.require(principal, scope, action, tenant_id)
        try:
            command.check()
            await self._registry.get_active(tenant_id)  # unknown, suspended: refused
        except DatabaseServiceError as exc:
            await self._access.deny(principal, tenant_id, action, exc)
        try:
            result = await self._run(tenant_id, command)
        except InvalidRequest as exc:
            # Refused before the store did anything (a bad key or value).
            await self._access.deny(principal, tenant_id, action, exc)
        except DatabaseServiceError as exc:
            await self._record(principal, tenant_id, action, op, "error", exc.error_code)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            await asyncio.shield(
                self._record(principal, tenant_id, action, op, "cancelled", "cancelled")
            )
            raise
        await self._record(principal, tenant_id, action, op, "ok", None, _detail(command))
        return result

    async def _run(self, tenant_id: str, command: KeyValueCommand) -> KeyValueResult:
        store, op, key = self._store, command.operation, command.key
        result = KeyValueResult(op)
        if op is Operation.MGET:
            assert command.keys is not None
            result.values = await store.mget(tenant_id, list(command.keys))
            return result
        assert key is not None  # check() made sure
        if op is Operation.GET:
            result.value = await store.get(tenant_id, key)
            result.found = result.value is not None
        elif op is Operation.SET:
            assert command.value is not None
            await store.set(tenant_id, key, _utf8(command.value), ttl_ms=command.ttl_ms)
            result.found = True
        elif op is Operation.DELETE:
            result.found = await store.delete(tenant_id, key)
        elif op is Operation.INCR:
            result.number = await store.incr(
                tenant_id, key, 1 if command.by is None else command.by
            )
            result.found = True
        else:  # EXPIRE
            assert command.ttl_ms is not None
            result.found = await store.expire(tenant_id, key, command.ttl_ms)
        return result

    async def _record(
        self,
        principal: Principal,
        tenant_id: str,
        action: str,
        op: Operation,
        outcome: str,
        code: str | None,
        detail: str | None = None,
    ) -> None:
        await self._audit.record(
            AuditEvent(
                service=principal.service,
                tenant_id=tenant_id,
                action=action,
                statement_class="read" if op in _READS else "write",
                outcome=outcome,
                code=code or op.value,
                detail=detail,
            )
        )

    # --- one method per operation, for callers in Python ------------------------------------

    async def get(self, principal: Principal, ctx: TenantContext, key: bytes | str) -> bytes | None:
        result = await self.execute(principal, ctx, KeyValueCommand(Operation.GET, key=key))
        return result.value

    async def set(
        self,
        principal: Principal,
        ctx: TenantContext,
        key: bytes | str,
        value: bytes | str,
        *,
        ttl_ms: int | None = None,
    ) -> None:
        command = KeyValueCommand(Operation.SET, key=key, value=value, ttl_ms=ttl_ms)
        await self.execute(principal, ctx, command)

    async def delete(self, principal: Principal, ctx: TenantContext, key: bytes | str) -> bool:
        result = await self.execute(principal, ctx, KeyValueCommand(Operation.DELETE, key=key))
        return result.found

    async def incr(
        self, principal: Principal, ctx: TenantContext, key: bytes | str, by: int = 1
    ) -> int:
        result = await self.execute(principal, ctx, KeyValueCommand(Operation.INCR, key=key, by=by))
        assert result.number is not None
        return result.number

    async def expire(
        self, principal: Principal, ctx: TenantContext, key: bytes | str, ttl_ms: int
    ) -> bool:
        command = KeyValueCommand(Operation.EXPIRE, key=key, ttl_ms=ttl_ms)
        return (await self.execute(principal, ctx, command)).found

    async def mget(
        self, principal: Principal, ctx: TenantContext, keys: Sequence[bytes | str]
    ) -> list[bytes | None]:
        result = await self.execute(principal, ctx, KeyValueCommand(Operation.MGET, keys=keys))
        return result.values


def _utf8(value: bytes | str) -> bytes:
    """A value as bytes: text as UTF-8 (a lone surrogate is not text)."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidText("the value is not valid Unicode text (a lone surrogate)") from None
    return bytes(value)


def _detail(command: KeyValueCommand) -> str | None:
    """What the audit keeps of a call: counts and the TTL, never keys or values."""
    if command.keys is not None:
        return f"{len(command.keys)} keys"
    if command.ttl_ms is not None:
        return f"ttl_ms {command.ttl_ms}"
    return None
