"""The health document (seed: "Standardized Health Check"), built from live readings.

Every figure is measured: dependencies are probed, request figures come from the rolling window,
and ``tenant_isolation_status`` is a real check of the database (RLS forced on every shared table,
no tenant role able to bypass it). Stores that no issue has added yet are reported as
``not_configured``, never as healthy.

One document per instance: with several serving processes, whichever worker answers adds the
other workers' request figures and pools (from their snapshots, see ``RequestWindow.peers``)
to its own, and the ``workers`` section lists them all (pid, up, restarts) and names the worker
that answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import psutil

from database_service import __version__, stores
from database_service.errors import Unavailable, postgres_unavailable
from database_service.loops import BackgroundLoops
from database_service.observability.audit import AuditLog
from database_service.observability.window import RequestWindow
from database_service.postgres import TenantPools
from database_service.postgres.pools import PoolStats

__all__ = [
    "DependencyProbe",
    "HealthReporter",
    "NatsProbe",
    "PostgresProbe",
    "instance_pools",
    "performance_document",
    "pools_snapshot",
]

NOT_CONFIGURED = {"status": "not_configured"}


class DependencyProbe(Protocol):
    name: str

    async def check(self) -> dict[str, Any]: ...


@dataclass
class PostgresProbe:
    """A round trip to PostgreSQL; for the embedded server, also why it is down and what is being
    done about it (``supervisor``: the ``EmbeddedPostgres`` that restarts it)."""

    pool: asyncpg.Pool
    name: str = "postgresql"
    embedded: bool = False
    supervisor: Any = None  # has .problem (str | None) and .restarts (int)

    async def check(self) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            version = await asyncio.wait_for(self.pool.fetchval("SHOW server_version"), 3)
        except Exception as exc:  # whatever stops the probe, the health document must still answer
            down: dict[str, Any] = {
                "status": "unhealthy",
                "embedded": self.embedded,
                "error": f"{type(exc).__name__}: {exc}",
            }
            reason = getattr(self.supervisor, "problem", None)
            down["reason"] = reason or (
                "the embedded PostgreSQL does not answer; it is restarted when it stops"
                if self.embedded
                else "PostgreSQL (DBSVC_POSTGRES_URL) does not answer: check the server"
            )
            return down
        healthy: dict[str, Any] = {
            "status": "healthy",
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "server_version": version,
            "embedded": self.embedded,
        }
        if self.supervisor is not None:
            healthy["restarts"] = self.supervisor.restarts
        return healthy


@dataclass
class NatsProbe:
    """Keeps one client connection and reports round-trip time to the server."""

    url: str
    name: str = "nats"
    embedded: bool = False
    tls: ssl.SSLContext | None = None
    _client: Any = field(default=None, init=False)

    async def __aenter__(self) -> NatsProbe:
        import nats  # noqa: PLC0415 - only a process that probes NATS loads nats-py

        with contextlib.suppress(Exception):  # reported as unhealthy by check()
            self._client = await nats.connect(
                self.url,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                tls=self.tls,
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()

    async def check(self) -> dict[str, Any]:
        if self._client is None or not self._client.is_connected:
            return {"status": "unhealthy", "url": self.url, "error": "not connected"}
        started = time.perf_counter()
        try:
            await self._client.flush(timeout=2)
        except Exception as exc:
            return {"status": "unhealthy", "url": self.url, "error": str(exc)}
        return {
            "status": "healthy",
            "url": self.url,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "embedded": self.embedded,
        }


class HealthReporter:
    def __init__(
        self,
        *,
        owner_pool: asyncpg.Pool,
        pools: TenantPools,
        window: RequestWindow,
        probes: list[DependencyProbe],
        shared_schema: str,
        group_role: str,
        data_dir: Path,
        count_active_tenants: Callable[[], Awaitable[int]],
        cache_seconds: float = 1.0,
        loops: BackgroundLoops | None = None,
        cache_hit_rate: Callable[[], float | None] | None = None,
    ) -> None:
        self._loops = loops
        self._cache_hit_rate = cache_hit_rate
        # More sections of the detailed document, added by the parts that own them (cluster
        # backups): name → a cheap function of no arguments returning the section.
        self.sections: dict[str, Callable[[], dict[str, Any]]] = {}
        self._owner = owner_pool
        # Health may be asked for without credentials, as often as anyone likes: the document
        # is computed at most once per ``cache_seconds`` (per level of detail), and concurrent
        # askers share that one computation.
        self._cache_seconds = cache_seconds
        self._cached: dict[bool, tuple[float, dict[str, Any]]] = {}
        self._computing: dict[bool, asyncio.Lock] = {True: asyncio.Lock(), False: asyncio.Lock()}
        self._pools = pools
        self._window = window
        self._probes = probes
        self._shared = shared_schema
        self._group = group_role
        self._data_dir = data_dir
        self._count_active = count_active_tenants
        self._started = time.monotonic()
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading primes the counter

    async def isolation_status(self) -> dict[str, Any]:
        """RLS enabled and forced on every shared table; no tenant role can bypass it."""
        problems: list[str] = []
        tables = await self._owner.fetch(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
            self._shared,
        )
        for t in tables:
            if not (t["relrowsecurity"] and t["relforcerowsecurity"]):
                problems.append(f"RLS not forced on {self._shared}.{t['relname']}")
        risky = await self._owner.fetch(
            "SELECT r.rolname FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid"
            " JOIN pg_roles g ON g.oid = m.roleid WHERE g.rolname = $1"
            " AND (r.rolsuper OR r.rolbypassrls OR r.rolcreaterole OR r.rolcreatedb)",
            self._group,
        )
        problems.extend(f"tenant role {r['rolname']} can bypass isolation" for r in risky)
        return {
            "status": "healthy" if not problems else "unhealthy",
            "shared_tables_checked": len(tables),
            "problems": problems,
        }

    async def _postgres_details(self, active_tenants: int | None) -> dict[str, Any]:
        active = await self._owner.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        )
        pools = instance_pools(self._pools, self._window)
        return {
            "active_connections": active,
            # From the control plane, not by schema name: names are opaque and may change.
            "tenant_schemas": active_tenants,
            "tenant_pools": len(pools["tenants"]),
            "pool_connections_open": pools["open"],
            "pool_connections_in_use": sum(p["in_use"] for p in pools["tenants"].values()),
            "pool_global_max": pools["global_max"],
            # OLTP, analytics and bulk pools across tenants (per tenant: the performance
            # document): a report saturating the analytics pools shows here.
            "pool_workloads": _by_workload(pools["tenants"].values()),
        }

    def _system(self) -> dict[str, Any]:
        disk = psutil.disk_usage(str(self._data_dir if self._data_dir.exists() else Path.cwd()))
        cpu = self._process.cpu_percent(None)
        memory = self._process.memory_info().rss / 1_048_576
        # The other workers' processes too (their last snapshots): the instance's use.
        for other in self._window.peers.system() if self._window.peers is not None else []:
            cpu += float(other.get("cpu_usage_percent", 0.0))
            memory += float(other.get("memory_usage_mb", 0.0))
        return {
            "cpu_usage_percent": round(cpu, 1),
            "memory_usage_mb": round(memory, 1),
            "disk_usage_percent": disk.percent,
        }

    async def document(self, *, detailed: bool = True) -> dict[str, Any]:
        """The health document. ``detailed=False`` is what anyone may see: the service, its
        status and version and each dependency's status, with no tenant, role or schema name
        and no count of tenants, pools or connections (platform callers get the rest).
        Computed at most once per ``cache_seconds`` while the service is not unhealthy."""
        cached = self._cached.get(detailed)
        if cached is not None and time.monotonic() - cached[0] < self._cache_seconds:
            return cached[1]
        async with self._computing[detailed]:
            cached = self._cached.get(detailed)
            if cached is not None and time.monotonic() - cached[0] < self._cache_seconds:
                return cached[1]
            document = await self._document(detailed)
            # An unhealthy answer is not kept: recovery shows at once (a failing probe is cheap).
            if document["status"] != "unhealthy":
                self._cached[detailed] = (time.monotonic(), document)
            return document

    def invalidate(self) -> None:
        """Forget the cached documents (the next one is computed afresh)."""
        self._cached.clear()

    async def _document(self, detailed: bool) -> dict[str, Any]:
        checks = await asyncio.gather(*(p.check() for p in self._probes))
        dependencies: dict[str, Any] = dict.fromkeys(stores.KNOWN, NOT_CONFIGURED)
        for probe, result in zip(self._probes, checks, strict=True):
            dependencies[probe.name] = result
        postgres_ok = dependencies["postgresql"].get("status") == "healthy"
        isolation: dict[str, Any] = {"status": "unknown"}
        active_tenants: int | None = None
        details: dict[str, Any] = {}
        if postgres_ok:
            try:
                with postgres_unavailable("health"):
                    isolation = await self.isolation_status()
                    if detailed:
                        active_tenants = await self._count_active()
                        details = await self._postgres_details(active_tenants)
            except (Unavailable, asyncpg.PostgresError) as exc:
                # PostgreSQL went away between the probe and these reads, or refused one.
                postgres_ok = False
                dependencies["postgresql"] = {"status": "unhealthy", "error": str(exc)}
        others_ok = all(
            d.get("status") in {"healthy", "not_configured"} for d in dependencies.values()
        )
        restarting = self._loops.restarting if self._loops is not None else []
        workers = self._workers()
        # A worker starting or being replaced: the instance serves, with less than it has.
        workers_down = not all(p.get("up") for p in workers["processes"])
        if not postgres_ok or isolation.get("status") == "unhealthy":
            status = "unhealthy"
        elif not others_ok or restarting or workers_down:
            status = "degraded"
        else:
            status = "healthy"
        head = {
            "service_name": "database-service",
            "status": status,
            "timestamp": datetime.now(UTC).isoformat(),
            "version": __version__,
        }
        if not detailed:
            return {**head, "dependencies": {k: _public(v) for k, v in dependencies.items()}}
        perf = self._window.summary()
        return {
            **head,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "performance_metrics": {
                "response_time_ms": perf.response_time_ms,
                "p50_ms": perf.p50_ms,
                "p99_ms": perf.p99_ms,
                "throughput_rps": perf.throughput_rps,
                "error_rate_percent": perf.error_rate_percent,
                "requests_last_60s": perf.requests,
                # The result cache's, since start (the seed's field): None before any lookup.
                "cache_hit_rate": (
                    self._cache_hit_rate() if self._cache_hit_rate is not None else None
                ),
            },
            "system_resources": self._system(),
            "dependencies": dependencies,
            "tenant_context": {
                "active_tenants": active_tenants,
                "tenant_isolation_status": isolation.get("status"),
                "isolation_problems": isolation.get("problems", []),
            },
            "database_details": {
                "postgresql": details,
                **{store: _details(dependencies[store]) for store in stores.DATA_STORES[1:]},
            },
            "multi_db_performance": _multi_db(dependencies),
            "background_loops": self._loops.document() if self._loops is not None else {},
            "workers": workers,
            **{name: section() for name, section in self.sections.items()},
        }

    def _workers(self) -> dict[str, Any]:
        peers = self._window.peers
        if peers is not None:
            return peers.workers()
        pid = os.getpid()
        return {
            "count": 1,
            "answered_by": {"index": 0, "pid": pid},
            "restarts": 0,
            "processes": [{"index": 0, "pid": pid, "up": True, "restarts": 0}],
        }


def _details(dependency: dict[str, Any]) -> dict[str, Any]:
    """A store's details: what its probe reported beyond its status (``not_configured`` until
    a store is added)."""
    return {k: v for k, v in dependency.items() if k not in {"embedded"}}


def _multi_db(dependencies: dict[str, Any]) -> dict[str, Any]:
    """What crosses stores: which stores an operation can span, and how consistent that is."""
    # A store kept embedded in PostgreSQL (the graph's tables: "runs_on": "postgresql") is
    # PostgreSQL here: spanning it is no cross-store operation.
    configured = [
        name
        for name in stores.DATA_STORES
        if dependencies[name].get("status") != "not_configured"
        and (name == "postgresql" or dependencies[name].get("runs_on") != "postgresql")
    ]
    return {
        "stores_configured": configured,
        "cross_database_queries": {
            "possible": len(configured) > 1,
            "stores": configured,
        },
        # One store: every operation commits or rolls back in PostgreSQL alone.
        "transaction_consistency": "single_store" if len(configured) <= 1 else "per_store",
    }


def _public(dependency: dict[str, Any]) -> dict[str, Any]:
    """A dependency's status (whether it is embedded, and why it is down) without addresses,
    errors or counts."""
    public = {"status": dependency.get("status", "unknown")}
    if isinstance(dependency.get("embedded"), bool):
        public["embedded"] = dependency["embedded"]
    if isinstance(dependency.get("reason"), str):
        public["reason"] = dependency["reason"]
    return public


def performance_document(
    window: RequestWindow,
    pools: TenantPools,
    *,
    tenant_id: str | None = None,
    audit: AuditLog | None = None,
) -> dict[str, Any]:
    """Request figures of the last minute and the tenant pools, for ``GET
    /api/v1/metrics/performance`` and gRPC ``GetPerformanceMetrics``.

    Without ``tenant_id``: the service's figures and every pool (platform callers only). With it:
    that tenant's requests and its own pool, and nothing that names or counts other tenants."""
    s = window.summary(tenant_id)
    document: dict[str, Any] = {
        "window_seconds": window.seconds,
        "requests": s.requests,
        "throughput_rps": s.throughput_rps,
        "response_time_ms": s.response_time_ms,
        "p50_ms": s.p50_ms,
        "p99_ms": s.p99_ms,
        "error_rate_percent": s.error_rate_percent,
    }
    merged = instance_pools(pools, window)
    stats = merged["tenants"]
    if tenant_id is not None:
        stats = {tenant_id: stats[tenant_id]} if tenant_id in stats else {}
        document["tenant_id"] = tenant_id
    document["pools"] = stats
    document["pool_connections_open"] = (
        merged["open"] if tenant_id is None else sum(p["size"] for p in stats.values())
    )
    if tenant_id is None and audit is not None:
        document["audit_events_written"] = audit.written
        document["audit_queue_depth"] = audit.queued
    return document


def instance_pools(pools: TenantPools, window: RequestWindow) -> dict[str, Any]:
    """This process's tenant pools plus the other workers' (their last snapshots): per tenant
    ``{size, idle, in_use, max}`` summed over workers, the open connections and the cap."""
    merged = pools_snapshot(pools)
    tenants: dict[str, dict[str, Any]] = merged["tenants"]
    for peer in window.peers.pools() if window.peers is not None else []:
        merged["open"] += int(peer.get("open", 0))
        merged["global_max"] += int(peer.get("global_max", 0))
        for tenant, figures in peer.get("tenants", {}).items():
            mine = tenants.setdefault(tenant, {**_NO_POOL, "workloads": {}})
            _add_pool(mine, figures)
            for workload, theirs in figures.get("workloads", {}).items():
                _add_pool(mine["workloads"].setdefault(workload, dict(_NO_POOL)), theirs)
    return merged


_NO_POOL = {"size": 0, "idle": 0, "in_use": 0, "max": 0}


def _by_workload(tenants: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for figures in tenants:
        for workload, pool in figures.get("workloads", {}).items():
            _add_pool(total.setdefault(workload, dict(_NO_POOL)), pool)
    return total


def _add_pool(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    for key in _NO_POOL:
        mine[key] += int(theirs.get(key, 0))


def pools_snapshot(pools: TenantPools) -> dict[str, Any]:
    """This process's tenant pools, as ``instance_pools`` reads another worker's."""
    by_workload = pools.workload_stats()
    return {
        "open": pools.open_connections,
        "global_max": pools.global_max,
        "tenants": {
            tenant: {
                **_pool(p),
                # OLTP, analytics and bulk: a report saturating its pool shows here.
                "workloads": {w: _pool(q) for w, q in by_workload.get(tenant, {}).items()},
            }
            for tenant, p in pools.stats().items()
        },
    }


def _pool(p: PoolStats) -> dict[str, int]:
    return {"size": p.size, "idle": p.idle, "in_use": p.in_use, "max": p.max_size}
