"""Dead letters: list them, replay them.

Both span tenants' ingestion and are the platform administrator's (the operator's CLI acts as
one); a tenant's administrator lists and replays its own tenant's letters. Replay itself re-checks
each letter's publisher (``IngestPipeline.replay``).
"""

from __future__ import annotations

from collections.abc import Sequence

from database_service.application.access import Access
from database_service.auth import Principal, Scope
from database_service.ingest import DeadLetter, DeadLetterStore, IngestPipeline, ReplayReport
from database_service.tenancy import validate_tenant_id

__all__ = ["DeadLetterAdmin"]


class DeadLetterAdmin:
    def __init__(self, access: Access, store: DeadLetterStore, pipeline: IngestPipeline) -> None:
        self._access = access
        self._store = store
        self._pipeline = pipeline

    async def _allowed(self, principal: Principal, tenant_id: str | None, action: str) -> None:
        if tenant_id is None:
            await self._access.require_platform(principal, action)
        else:
            await self._access.require(
                principal, Scope.ADMIN, action, validate_tenant_id(tenant_id)
            )

    async def list(
        self,
        principal: Principal,
        *,
        tenant_id: str | None = None,
        pending_only: bool = True,
        limit: int = 100,
    ) -> list[DeadLetter]:
        await self._allowed(principal, tenant_id, "dead_letters.list")
        return await self._store.list(tenant_id=tenant_id, pending_only=pending_only, limit=limit)

    async def replay(
        self,
        principal: Principal,
        ids: Sequence[int] | None,
        *,
        tenant_id: str | None = None,
    ) -> ReplayReport:
        action = "dead_letters.replay"
        # Without a tenant the ids may name any tenant's letters: the platform check covers that;
        # with one, the pipeline replays only that tenant's letters among the ids.
        await self._allowed(principal, tenant_id, action)
        report = await self._pipeline.replay(ids, tenant_id=tenant_id)
        await self._access.done(
            principal,
            action,
            tenant_id,
            f"replayed {report.replayed}, refused {report.refused}",
        )
        return report
