"""The use cases of statement statistics and the slow-query log, for every front end.

Who may do what (the model of ``application.observability``): a tenant's figures — its
statements, their plans — are read by a principal that may act for the tenant (its own services,
whatever their scopes) or by a platform principal holding ``metrics`` or ``admin``; kept
parameters only by a principal holding ``read`` for the tenant (its data); resetting a
tenant's figures or clearing its log needs ``admin`` over the tenant. The slow-query settings
need a platform administrator: the log's queue is shared by the tenants of a process, so a
tenant logging every statement would crowd the others' out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import asyncpg
import pglast

from database_service.application.access import Access
from database_service.auth import Principal, Scope
from database_service.errors import InvalidParameters
from database_service.statements.advice import IndexAdvisor
from database_service.statements.shared import SharedFigures
from database_service.statements.slowlog import SlowQueryLog, StatementSettings
from database_service.statements.stats import StatementStats
from database_service.tenancy import TenantRecord, TenantRegistry, validate_tenant_id

__all__ = ["ORDERS", "StatementAdmin"]

log = logging.getLogger(__name__)

ORDERS = ("total_ms", "calls", "mean_ms", "p99_ms", "rows", "errors")
_PGSS = (
    "SELECT s.query, sum(s.calls)::bigint AS calls, sum(s.total_exec_time) AS total_ms,"
    " sum(s.rows)::bigint AS rows FROM pg_stat_statements s"
    " JOIN pg_roles r ON r.oid = s.userid"
    " WHERE r.rolname = ANY($1::text[])"
    " AND s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " GROUP BY s.query"
)


class StatementAdmin:
    def __init__(
        self,
        access: Access,
        *,
        stats: StatementStats,
        shared: SharedFigures | None,
        slow_log: SlowQueryLog,
        registry: TenantRegistry,
        owner_pool: asyncpg.Pool,
        advisor: IndexAdvisor,
    ) -> None:
        self._access = access
        self._stats = stats
        self._shared = shared
        self._slow = slow_log
        self._registry = registry
        self._pool = owner_pool
        self._advisor = advisor

    async def _readable(self, principal: Principal, tenant_id: str, action: str) -> TenantRecord:
        tenant_id = validate_tenant_id(tenant_id)
        if not principal.is_platform_with(Scope.METRICS, Scope.ADMIN):
            await self._access.require_tenant(principal, tenant_id, action)
        return await self._registry.get(tenant_id)  # NotFound for an unknown tenant

    async def top(
        self, principal: Principal, tenant_id: str, *, limit: int = 20, order: str = "total_ms"
    ) -> dict[str, Any]:
        """The tenant's statements by ``order``, with pg_stat_statements' figures for the
        tenant's roles beside ours where the extension is installed."""
        if order not in ORDERS:
            raise InvalidParameters(f"order must be one of {', '.join(ORDERS)}, not {order!r:.40}")
        if not 1 <= limit <= 1000:
            raise InvalidParameters("limit must be 1 to 1000")
        tenant = await self._readable(principal, tenant_id, "statements.read")
        peers = (
            await asyncio.to_thread(self._shared.peers, tenant.tenant_id)
            if self._shared is not None
            else []
        )
        figures = self._stats.top(tenant.tenant_id, limit, order=order, peers=peers)
        statements = [f.to_dict() for f in figures]
        pgss = await self._pg_stat_statements(tenant)
        if pgss["available"]:
            by_fingerprint = pgss.pop("by_fingerprint")
            for entry in statements:
                theirs = by_fingerprint.get(entry["fingerprint"])
                if theirs is not None:
                    entry["pg_stat_statements"] = theirs
        return {
            "tenant_id": tenant.tenant_id,
            "order": order,
            "since": dt.datetime.fromtimestamp(
                self._stats.reset_at(tenant.tenant_id), dt.UTC
            ).isoformat(),
            # Figures of every live serving process of this instance (each shares its own
            # every couple of seconds); other instances keep their own.
            "scope": "instance",
            "processes": 1 + len(peers),
            "statements": statements,
            "pg_stat_statements": pgss,
        }

    async def _pg_stat_statements(self, tenant: TenantRecord) -> dict[str, Any]:
        """The extension's figures for the tenant's login roles, keyed by our fingerprint.
        Its own query ids differ from pg_query's fingerprints, so its (normalised) texts are
        fingerprinted here; entries matching none of ours (the service's own statements on the
        tenant's connections: BEGIN, the user context) are left out."""
        roles = [r for r in (tenant.role_name, tenant.user_role_name) if r]
        try:
            rows = await self._pool.fetch(_PGSS, roles)
        except asyncpg.UndefinedTableError:
            return {"available": False, "reason": "pg_stat_statements is not installed"}
        except asyncpg.ObjectNotInPrerequisiteStateError:
            return {
                "available": False,
                "reason": "pg_stat_statements is not in shared_preload_libraries",
            }
        except asyncpg.InsufficientPrivilegeError:
            return {"available": False, "reason": "the service may not read pg_stat_statements"}
        merged: dict[str, dict[str, Any]] = {}
        for row in rows:
            try:
                fingerprint = pglast.parser.fingerprint(row["query"])
            except pglast.parser.ParseError:
                continue
            kept = merged.setdefault(fingerprint, {"calls": 0, "total_ms": 0.0, "rows": 0})
            kept["calls"] += row["calls"]
            kept["total_ms"] += row["total_ms"]
            kept["rows"] += row["rows"]
        for kept in merged.values():
            kept["total_ms"] = round(kept["total_ms"], 3)
            kept["mean_ms"] = round(kept["total_ms"] / kept["calls"], 3) if kept["calls"] else 0
        return {"available": True, "by_fingerprint": merged}

    async def reset(self, principal: Principal, tenant_id: str) -> dict[str, Any]:
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "statements.reset", tenant_id)
        await self._registry.get(tenant_id)
        if self._shared is not None:
            self._shared.reset(tenant_id)
        else:
            self._stats.reset(tenant_id)
        await self._access.done(principal, "statements.reset", tenant_id)
        return {"tenant_id": tenant_id, "reset": True}

    async def slow_queries(
        self,
        principal: Principal,
        tenant_id: str,
        *,
        limit: int = 50,
        fingerprint: str | None = None,
    ) -> dict[str, Any]:
        if not 1 <= limit <= 1000:
            raise InvalidParameters("limit must be 1 to 1000")
        tenant = await self._readable(principal, tenant_id, "slow_queries.read")
        # Kept parameters are the tenant's data: shown to readers of its data only (not to
        # the bootstrap administrator, nor to a platform principal holding only metrics).
        values = principal.can_act_for(tenant.tenant_id) and principal.has_scope(Scope.READ)
        return {
            "tenant_id": tenant.tenant_id,
            "settings": self._slow.settings(tenant.tenant_id),
            "slow_queries": await self._slow.recent(
                tenant.tenant_id, limit, fingerprint=fingerprint, values=values
            ),
        }

    async def clear_slow_queries(self, principal: Principal, tenant_id: str) -> dict[str, Any]:
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "slow_queries.clear", tenant_id)
        await self._registry.get(tenant_id)
        cleared = await self._slow.clear(tenant_id)
        await self._access.done(principal, "slow_queries.clear", tenant_id)
        return {"tenant_id": tenant_id, "cleared": cleared}

    async def settings(self, principal: Principal, tenant_id: str) -> dict[str, Any]:
        tenant = await self._readable(principal, tenant_id, "statement_settings.read")
        return {"tenant_id": tenant.tenant_id, **self._slow.settings(tenant.tenant_id)}

    async def set_settings(
        self, principal: Principal, tenant_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Override the tenant's ``slow_query_ms`` and ``keep_parameters`` (those given in
        ``changes``; ``None``: back to the service's default; the others stay as they are)."""
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require_platform(
            principal, "statement_settings.set", tenant_id=tenant_id
        )
        await self._registry.get(tenant_id)
        unknown = set(changes) - {"slow_query_ms", "keep_parameters"}
        if unknown:
            raise InvalidParameters(f"unknown settings: {', '.join(sorted(unknown))}")
        current = await self._slow.own_settings(tenant_id)
        threshold = changes.get("slow_query_ms", current.slow_query_ms)
        keep = changes.get("keep_parameters", current.keep_parameters)
        if threshold is not None and (
            not isinstance(threshold, int | float) or not 0 <= threshold <= 86_400_000
        ):
            raise InvalidParameters("slow_query_ms must be 0 to 86400000 (or null: the default)")
        if keep is not None and not isinstance(keep, bool):
            raise InvalidParameters("keep_parameters must be true or false (or null: the default)")
        settings = await self._slow.set_settings(
            tenant_id, StatementSettings(None if threshold is None else float(threshold), keep)
        )
        await self._access.done(
            principal,
            "statement_settings.set",
            tenant_id,
            detail=f"slow_query_ms={threshold} keep_parameters={keep}",
        )
        return {"tenant_id": tenant_id, **settings}

    # --- index advice ----------------------------------------------------------------------

    async def index_advice(self, principal: Principal, tenant_id: str) -> dict[str, Any]:
        """Indexes that would serve the tenant's slow statements (readers of its figures)."""
        tenant = await self._readable(principal, tenant_id, "index_advice.read")
        return await self._advisor.advise(tenant)

    async def create_index(
        self, principal: Principal, tenant_id: str, table: str, columns: list[str]
    ) -> dict[str, Any]:
        """Build an index on the tenant's table: an explicit call of an administrator over the
        tenant (advice never creates one)."""
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "index.create", tenant_id)
        tenant = await self._registry.get(tenant_id)
        started = await self._advisor.create_index(tenant, table, columns)
        await self._access.done(principal, "index.create", tenant_id, detail=started["ddl"])
        return started

    async def index_status(self, principal: Principal, tenant_id: str, name: str) -> dict[str, Any]:
        tenant = await self._readable(principal, tenant_id, "index.read")
        return await self._advisor.index_status(tenant, name)
