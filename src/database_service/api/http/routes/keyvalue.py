"""``POST /api/v1/kv/{operation}``: key-value operations (the seed's ``"dragonflydb"`` store) for
the caller's tenant — ``get``, ``set``, ``delete``, ``incr``, ``expire``, ``mget``.

Keys and values are JSON strings in ``encoding``: ``"utf-8"`` (the default: the string's UTF-8
bytes) or ``"base64"`` (binary keys and values, standard alphabet with padding). Answers carry
values in the request's encoding, except that a ``"utf-8"`` request whose values are not all
valid UTF-8 gets every value of the answer in base64; the answer's ``encoding`` always says
which. TTLs are milliseconds (``ttl_ms``).
"""

import base64
import binascii
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from database_service.api.http.deps import Authenticated, Core, TenantHeader, tenant_context
from database_service.application.keyvalue import KeyValueCommand, operation_of
from database_service.errors import InvalidParameters, InvalidRequest, InvalidText

router = APIRouter(tags=["key-value"])

Encoding = Literal["utf-8", "base64"]


class KeyValueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: StrictStr | None = Field(default=None, description="get, set, delete, incr, expire")
    keys: list[StrictStr] | None = Field(default=None, description="mget: at most 1000")
    value: StrictStr | None = Field(default=None, description="set: at most 1 MiB")
    ttl_ms: StrictInt | None = Field(
        default=None, description="set (absent: no expiry), expire: milliseconds, > 0"
    )
    by: StrictInt | None = Field(default=None, description="incr: a 64-bit integer (default 1)")
    encoding: Encoding = Field(default="utf-8", description="Of keys and values: utf-8 or base64")
    tenant_id: StrictStr | None = Field(default=None, description="Or the X-Tenant-Id header")
    company_id: StrictStr | None = Field(default=None, description="The seed's name: tenant_id")


class KeyValueResponse(BaseModel):
    operation: str
    found: bool = Field(
        description="get: the key exists; set: true; delete: a key was deleted; incr: true;"
        " expire: the key exists and now expires"
    )
    value: str | None = Field(default=None, description="get: the value (null when absent)")
    number: int | None = Field(default=None, description="incr: the value after it")
    values: list[str | None] | None = Field(default=None, description="mget: one per key")
    encoding: Encoding = Field(description="Of value and values")


def _bytes(text: str, encoding: Encoding, what: str) -> bytes:
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameters(f"{what} is not valid base64") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidText(f"{what} is not valid Unicode text (a lone surrogate)") from None


def _texts(values: list[bytes | None], encoding: Encoding) -> tuple[list[str | None], Encoding]:
    """The values as strings in ``encoding``; all in base64 when one is not valid UTF-8."""
    if encoding == "utf-8":
        try:
            return [None if v is None else v.decode("utf-8") for v in values], "utf-8"
        except UnicodeDecodeError:
            pass
    return [None if v is None else base64.b64encode(v).decode() for v in values], "base64"


@router.post("/api/v1/kv/{operation}", response_model=KeyValueResponse)
async def key_value(
    operation: str,
    body: KeyValueRequest,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """One key-value operation for the caller's tenant (``tenant_id``, ``company_id`` or the
    X-Tenant-Id header; when more than one is given they must agree). The tenant's keys are
    its own: any key, separators and braces included, is put under the tenant's namespace
    verbatim. Reads need the ``read`` scope for the tenant, writes ``write``."""
    op = operation_of(operation)
    if body.tenant_id and body.company_id and body.tenant_id != body.company_id:
        raise InvalidRequest("tenant_id and company_id in the body differ")
    ctx = tenant_context(request, principal, body.tenant_id or body.company_id, header=x_tenant_id)
    enc = body.encoding
    command = KeyValueCommand(
        op,
        key=None if body.key is None else _bytes(body.key, enc, "key"),
        value=None if body.value is None else _bytes(body.value, enc, "value"),
        ttl_ms=body.ttl_ms,
        by=body.by,
        keys=None if body.keys is None else [_bytes(k, enc, "a key") for k in body.keys],
    )
    result = await core.key_value.execute(principal, ctx, command)
    answer: dict[str, Any] = {"operation": op.value, "found": result.found, "encoding": enc}
    if result.number is not None:
        answer["number"] = result.number
    if op.value == "get":
        (answer["value"],), answer["encoding"] = _texts([result.value], enc)
    elif op.value == "mget":
        answer["values"], answer["encoding"] = _texts(result.values, enc)
    return answer
