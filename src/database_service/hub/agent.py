"""This instance's side of the Central Hub: register, heartbeat, apply the updates a heartbeat's
answer carries (``hub.contract`` is the contract). One agent per instance: the serving
instance's primary process runs it, as it runs partition maintenance.

The service never depends on the hub: a hub that is down, slow or answering nonsense costs a
log line and a counter, and the agent tries again with backoff (1 s doubling, capped at the
heartbeat interval); health shows ``unreachable`` with the last error meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from database_service.errors import InvalidParameters
from database_service.hub.contract import heartbeat_document, parse_updates, registration_document
from database_service.tenancy import TenantRecord
from database_service.tenancy.configuration import TenantConfig

__all__ = ["HubAgent"]

log = logging.getLogger(__name__)

Apply = Callable[[list[TenantConfig]], Awaitable[list[dict[str, Any]]]]


class HubError(Exception):
    """The hub answered, but not as the contract says (or not at all)."""


class HubAgent:
    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        instance_id: str,
        version: str,
        endpoints: Mapping[str, str],
        interval_s: float,
        tenants: Callable[[], Awaitable[list[TenantRecord]]],
        health: Callable[[], Awaitable[dict[str, Any]]],
        versions: Callable[[], Awaitable[dict[str, int]]],
        apply: Apply,
        max_ttl_ms: int,
        timeout_s: float = 5.0,
    ) -> None:
        self._url = url.rstrip("/")
        self._instance_id = instance_id
        self._version = version
        self._endpoints = dict(endpoints)
        self._interval = interval_s
        self._tenants = tenants
        self._health = health
        self._versions = versions
        self._apply = apply
        self._max_ttl_ms = max_ttl_ms
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout_s)
        self._started_at = dt.datetime.now(dt.UTC)
        self.registered = False
        self.heartbeats = 0
        self.failures = 0  # consecutive
        self.updates_applied = 0
        self.last_ok: dt.datetime | None = None
        self.last_error: str | None = None

    # --- the loop ------------------------------------------------------------------------

    async def run_forever(self) -> None:
        while True:
            try:
                await self.beat()
                delay = self._interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the hub's trouble is never the service's
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("central hub: %s", self.last_error)
                delay = min(self._interval, 2.0 ** min(self.failures - 1, 16))
            await asyncio.sleep(delay)

    async def beat(self) -> None:
        """Register when not registered, else one heartbeat (and register again when the hub
        forgot us); apply the updates its answer carries."""
        if not self.registered:
            await self.register()
        body = heartbeat_document(
            instance_id=self._instance_id,
            health=await self._health(),
            metrics={},
            tenants=await self._tenants(),
            config_versions=await self._versions(),
            at=dt.datetime.now(dt.UTC),
        )
        body["metrics"] = body["health"].get("performance_metrics", {})
        response = await self._http.post(
            f"{self._url}/api/v1/instances/{self._instance_id}/heartbeat", json=body
        )
        if response.status_code == 404:  # the hub restarted without our registration
            self.registered = False
            await self.register()
            response = await self._http.post(
                f"{self._url}/api/v1/instances/{self._instance_id}/heartbeat", json=body
            )
        _ok(response, "heartbeat")
        self.heartbeats += 1
        self.failures = 0
        self.last_error = None
        self.last_ok = dt.datetime.now(dt.UTC)
        answer = response.json() if response.content else {}
        updates = answer.get("updates") if isinstance(answer, dict) else None
        if updates:
            try:
                configs = parse_updates({"updates": updates}, max_ttl_ms=self._max_ttl_ms)
            except InvalidParameters as exc:
                raise HubError(f"the heartbeat's updates were refused: {exc}") from None
            results = await self._apply(configs)
            self.updates_applied += sum(r["outcome"] == "applied" for r in results)

    async def register(self) -> None:
        document = registration_document(
            instance_id=self._instance_id,
            version=self._version,
            endpoints=self._endpoints,
            tenants=await self._tenants(),
            started_at=self._started_at,
        )
        _ok(await self._http.post(f"{self._url}/api/v1/instances", json=document), "registration")
        self.registered = True
        log.info("central hub: registered as %s", self._instance_id)

    # --- observability -------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        if self.registered and self.failures == 0:
            status = "registered"
        elif self.failures:
            status = "unreachable"
        else:
            status = "registering"
        return {
            "status": status,
            "url": _without_credentials(self._url),
            "instance_id": self._instance_id,
            "heartbeat_seconds": self._interval,
            "heartbeats": self.heartbeats,
            "last_heartbeat": self.last_ok.isoformat() if self.last_ok else None,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
            "updates_applied": self.updates_applied,
        }

    async def aclose(self) -> None:
        await self._http.aclose()


def _ok(response: httpx.Response, what: str) -> None:
    if not 200 <= response.status_code < 300:
        raise HubError(f"{what}: the hub answered {response.status_code}")


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
