"""The dead-letter table: records the pipeline could not store, with the reason and payload.

Written through the owner's pool (the control plane is not the tenants'), before the message
that carried the record is acknowledged, so a dead letter is never lost either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from database_service.tenancy import quote_ident

__all__ = ["DeadLetter", "DeadLetterStore", "NewDeadLetter"]


@dataclass(frozen=True, slots=True)
class NewDeadLetter:
    transport: str
    source: str
    code: str
    reason: str
    payload: bytes
    tenant_id: str | None = None
    event_id: str | None = None
    service: str | None = None  # who published it (a valid token's service), None without one


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    at: datetime
    transport: str
    source: str
    tenant_id: str | None
    event_id: str | None
    code: str
    reason: str
    payload: bytes
    replayed_at: datetime | None
    replay_result: str | None
    service: str | None = None  # the publishing service; None when there was no valid token

    def public_dict(self) -> dict[str, Any]:
        """What the CLI and REST show: everything but the payload's bytes."""
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "transport": self.transport,
            "source": self.source,
            "tenant_id": self.tenant_id,
            "event_id": self.event_id,
            "service": self.service,
            "code": self.code,
            "reason": self.reason,
            "payload_bytes": len(self.payload),
            "replayed_at": self.replayed_at.isoformat() if self.replayed_at else None,
            "replay_result": self.replay_result,
        }


_COLUMNS = [
    "transport", "source", "tenant_id", "event_id", "code", "reason", "payload", "service",
]  # fmt: skip
# What ``list`` reads: named, so a column another migration adds does not break ``DeadLetter``.
_READ = ", ".join(f'"{f.name}"' for f in dataclasses.fields(DeadLetter))


class DeadLetterStore:
    def __init__(self, pool: asyncpg.Pool, *, control_schema: str) -> None:
        self._pool = pool
        self._schema = control_schema
        self._table = f"{quote_ident(control_schema)}.dead_letters"

    async def add(self, letters: Sequence[NewDeadLetter]) -> None:
        if not letters:
            return
        async with self._pool.acquire() as conn:
            await conn.copy_records_to_table(
                "dead_letters",
                schema_name=self._schema,
                columns=_COLUMNS,
                records=[
                    (d.transport, d.source, d.tenant_id, d.event_id, d.code, d.reason[:2000],
                     d.payload, d.service)
                    for d in letters
                ],
            )  # fmt: skip

    async def list(
        self,
        *,
        tenant_id: str | None = None,
        pending_only: bool = True,
        limit: int = 100,
        ids: Sequence[int] | None = None,
    ) -> list[DeadLetter]:
        rows = await self._pool.fetch(
            f"SELECT {_READ} FROM {self._table}"
            " WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND (NOT $2 OR replayed_at IS NULL)"
            " AND ($3::bigint[] IS NULL OR id = ANY($3))"
            " ORDER BY id LIMIT $4",
            tenant_id,
            pending_only,
            list(ids) if ids is not None else None,
            limit,
        )
        return [DeadLetter(**dict(r)) for r in rows]

    async def mark_replayed(self, letter_id: int, result: str, *, done: bool) -> None:
        await self._pool.execute(
            f"UPDATE {self._table} SET replay_result = $2,"
            " replayed_at = CASE WHEN $3 THEN now() ELSE replayed_at END WHERE id = $1",
            letter_id,
            result,
            done,
        )

    async def counts(self) -> dict[str, int]:
        row = await self._pool.fetchrow(
            f"SELECT count(*) AS total, count(*) FILTER (WHERE replayed_at IS NULL) AS pending"
            f" FROM {self._table}"
        )
        assert row is not None
        return {"total": row["total"], "pending": row["pending"]}
