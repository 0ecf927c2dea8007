"""Every REST route, swept with bad input, as tenant A's administrator and as a platform
administrator: path parameters that name tenant B or are no name at all (NUL, non-UTF-8,
separators, globs, 5,000 characters), query parameters of the wrong type or out of range,
bodies of the wrong JSON type, with numbers no JSON should carry (``NaN``, ``Infinity``,
integers past 64 bits), lone surrogates, nesting thousands deep, and every declared body
field set to each of those in turn.

The routes are read from the app, so a route added later is swept too. What must hold for
every request: no server error (a 5xx other than 503) and B's secret never in an answer; and
for A, whatever it names, no 2xx for B. Routes that run long or change the platform for the
platform token (backups, restores, migrations, maintenance) are swept as A only; refusals
happen before anything runs there.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from database_service.api.http.routes import ROUTERS
from database_service.app import Application
from database_service.auth import Scope
from tests.isolation.fix_attack import SECRET, Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")

# A platform administrator's garbage must never run these for real (they back up the
# cluster, restore, migrate, change a tenant's lifecycle, or delete).
_PLATFORM_SKIPS = re.compile(
    r"/maintenance/|/migration|/restore|/suspend|/resume|/admin/tenants/\{tenant_id\}$"
    r"|/partitions/maintain|/attach|/detach|/statements/reset|/tokens/revoke|/hub/"
)

PATH_VALUES = [
    "{B}",
    "{B}%00",
    "a%00b",
    "%FF%FE",
    "..",
    "*",
    "t_%25",
    "%20",
    "x" * 5000,
    "00000000-0000-0000-0000-000000000000",
    "-1",
    "99999999999999999999999",
]
QUERY_VALUES = ["-1", "0", "99999999999999999999999", "1e309", "NaN", "abc", "%00", "{B}", ""]
BODIES = [
    "[]",
    '"x"',
    "null",
    '{"tenant_id": 1}',
    '{"tenant_id": "{B}"}',
    '{"a": NaN}',
    "[" * 5000 + "]" * 5000,
    "{",
    '{"\\ud800": 1}',
]
FIELD_VALUES = [
    "NaN",
    "Infinity",
    "-Infinity",
    "100000000000000000000000000000",
    '"\\ud800"',
    '"a\\u0000b"',
    "[]",
    "{}",
    '"{B}"',
    '"' + "x" * 70_000 + '"',
    "[" * 300 + "]" * 300,
]


def _routes() -> list[APIRoute]:
    """The app's routes, from the routers it is made of."""
    return [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]


ROUTES = [
    (method, route.path)
    for route in _routes()
    for method in sorted(route.methods or ())
    if route.path not in {"/status", "/status/fragment", "/status/login"}
]


def _fields(route_path: str, method: str) -> list[str]:
    for route in _routes():
        if route.path == route_path and method in (route.methods or ()):
            body = route.body_field
            if body is None:
                return []
            annotation: Any = body.field_info.annotation
            fields = getattr(annotation, "model_fields", {})
            return [f.alias or name for name, f in fields.items()]
    return []


def _queries(route_path: str, method: str) -> list[str]:
    for route in _routes():
        if route.path == route_path and method in (route.methods or ()):
            return [p.alias for p in route.dependant.query_params]
    return []


def _requests(method: str, path: str, b: str) -> list[tuple[str, dict[str, str], bytes | None]]:
    """(path, query, body) for every bad input this route takes."""
    names = re.findall(r"\{(\w+)\}", path)
    filled = [(path.format(**dict.fromkeys(names, "x")), {}, None)] if names else []
    out: list[tuple[str, dict[str, str], bytes | None]] = []
    for value in PATH_VALUES:
        concrete = path
        for name in names:
            concrete = concrete.replace("{" + name + "}", value.replace("{B}", b))
        if names:
            out.append((concrete, {}, None))
    plain = filled[0][0] if filled else path
    for name, value in itertools.product(_queries(path, method), QUERY_VALUES):
        out.append((plain, {name: value.replace("{B}", b)}, None))
    if method in {"POST", "PUT", "PATCH"}:
        for body in BODIES:
            out.append((plain, {}, body.replace("{B}", b).encode("utf-8", "surrogatepass")))
        for field, value in itertools.product(_fields(path, method), FIELD_VALUES):
            text = '{"' + field + '": ' + value.replace("{B}", b) + "}"
            out.append((plain, {}, text.encode("utf-8", "surrogatepass")))
    return out


def _server_error(response: httpx.Response) -> bool:
    return response.status_code >= 500 and response.status_code != 503


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
async def test_bad_input_to_every_route_is_refused_without_a_server_error(
    core: Application,
    http: httpx.AsyncClient,
    tenants: Tenants,
    admin_headers: dict[str, str],
    method: str,
    path: str,
) -> None:
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    a_token = await service_token(core, [a], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    platform = await service_token(core, ["*"], (Scope.READ, Scope.ADMIN, Scope.METRICS))
    callers = [("A", {"Authorization": f"Bearer {a_token}", "X-Tenant-Id": a})]
    if not _PLATFORM_SKIPS.search(path) and method in {"GET", "POST"}:
        callers.append(("platform", {"Authorization": f"Bearer {platform}"}))
    failures = []
    for (who, headers), (url, query, body) in itertools.product(
        callers, _requests(method, path, b)
    ):
        if who == "platform" and (b in url or (body and b.encode() in body)):
            continue  # a platform administrator may act for B: not an attack
        response = await http.request(
            method,
            url,
            params=query,
            content=body,
            headers={**headers, **({"Content-Type": "application/json"} if body else {})},
        )
        what = f"{who} {method} {url[:80]} {query} {(body or b'')[:80]!r}"
        assert SECRET not in response.text, f"victim data leaked: {what}"
        if _server_error(response):
            failures.append(f"{response.status_code} {what}: {response.text[:120]}")
        if who == "A" and "{tenant_id}" in path and b in url and response.status_code < 300:
            failures.append(f"A was answered {response.status_code} for B: {what}")
    assert not failures, "\n".join(failures[:20])
