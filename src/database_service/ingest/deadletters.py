"""The dead-letter table: records the pipeline could not store, with the reason and payload.

Written through the owner's pool (the control plane is not the tenants'), before the message
that carried the record is acknowledged, so a dead letter is never lost either.

A letter is stored once: its idempotency key (``idempotency_key``: a digest of the code, tenant,
event id, publisher and payload; control migration 0006) is unique, and ``add`` inserts with
``ON CONFLICT DO NOTHING``. A poison record arrives on both transports by design, and again on
every redelivery; ``add`` returns only the letters it stored now, which are the ones to announce.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from database_service.tenancy import quote_ident

__all__ = ["DeadLetter", "DeadLetterStore", "NewDeadLetter", "idempotency_key"]

# Longest reason kept (the rest is cut).
MAX_REASON = 2000


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


def idempotency_key(letter: NewDeadLetter) -> bytes:
    """What makes two letters the same letter: code, tenant, event id, publisher and payload
    (not the transport, source or reason: the other transport's copy, a redelivery and a second
    failure of the same record are the same letter).

    sha256 over ``dbsvc-dead-letter\\0``, then each text field as ``<octets>:<UTF-8>`` (``-`` for
    NULL), then the payload. Control migration 0006 computes the same in SQL for the letters
    stored before it; change neither without the other."""
    digest = hashlib.sha256(b"dbsvc-dead-letter\0")
    for value in (letter.code, letter.tenant_id, letter.event_id, letter.service):
        if value is None:
            digest.update(b"-")
        else:
            raw = value.encode()
            digest.update(b"%d:%b" % (len(raw), raw))
    digest.update(letter.payload)
    return digest.digest()


def _storable(letter: NewDeadLetter) -> NewDeadLetter:
    """The letter as PostgreSQL can store it: text has no NUL (a record's tenant or event id
    may hold one, and one letter PostgreSQL refuses would hold up the whole batch's
    acknowledgement), the reason is cut to ``MAX_REASON``."""
    changes: dict[str, Any] = {}
    for name in ("transport", "source", "code", "reason", "tenant_id", "event_id", "service"):
        value = getattr(letter, name)
        if value is not None and "\0" in value:
            changes[name] = value.replace("\0", "\ufffd")
    if len(changes.get("reason", letter.reason)) > MAX_REASON:
        changes["reason"] = changes.get("reason", letter.reason)[:MAX_REASON]
    return dataclasses.replace(letter, **changes) if changes else letter


_COLUMNS = ("transport", "source", "tenant_id", "event_id", "code", "reason", "payload", "service")
# What ``list`` reads: named, so a column another migration adds does not break ``DeadLetter``.
_READ = ", ".join(f'"{f.name}"' for f in dataclasses.fields(DeadLetter))


class DeadLetterStore:
    def __init__(self, pool: asyncpg.Pool, *, control_schema: str) -> None:
        self._pool = pool
        self._schema = control_schema
        self._table = f"{quote_ident(control_schema)}.dead_letters"

    async def add(self, letters: Sequence[NewDeadLetter]) -> list[NewDeadLetter]:
        """Store the letters not stored before; returns those (as stored), in order."""
        if not letters:
            return []
        unique: dict[bytes, NewDeadLetter] = {}
        for storable in map(_storable, letters):
            unique.setdefault(idempotency_key(storable), storable)
        keys = list(unique)
        fresh = {
            row[0]
            for row in await self._pool.fetch(
                f"INSERT INTO {self._table} (transport, source, tenant_id, event_id, code, reason,"
                " payload, service, idempotency_key)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
                " $6::text[], $7::bytea[], $8::text[], $9::bytea[])"
                " ON CONFLICT (idempotency_key) DO NOTHING RETURNING idempotency_key",
                *([getattr(d, name) for d in unique.values()] for name in _COLUMNS),
                keys,
            )
        }
        return [unique[key] for key in keys if key in fresh]

    async def reachable(self, timeout: float = 2.0) -> bool:
        """Whether PostgreSQL answers the owner's pool now (``SELECT 1``): the pipeline waits
        without end only while it does not."""
        try:
            async with asyncio.timeout(timeout):
                await self._pool.fetchval("SELECT 1")
        except Exception:  # any failure is the answer
            return False
        return True

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
