"""Read replicas: which one may answer a read now, and their health.

``DBSVC_POSTGRES_REPLICA_URLS`` names streaming replicas (owner DSNs) of the primary. A pure
read (the guard's ``repeatable`` verdict: no function that writes) of a caller without a user
id may go to a replica when

- the replica is up (a check every ``check_interval`` seconds reads its replay position; a
  replica that fails a check, or a read, is taken out until a check succeeds again);
- it is within ``max_lag_ms``: the time since the primary was last at the position the replica
  has replayed (0 while it is caught up) — measured from the primary's WAL position, sampled at
  each check, so an idle primary never makes a replica look behind;
- it has replayed the tenant's last write made through this process (read your writes): a write
  marks its tenant *pending* at once (its reads go to the primary) until the primary's WAL
  position after the write is known, and from then on only replicas past that position answer
  it.

Everything else, and any read a replica cannot run (down, refused as read-only), goes to the
primary. Tenant roles and their secrets are the primary's (a physical replica copies the
catalog), so the tenant's own login, and its row-level security, apply there too. Each replica
has its own tenant pools, its own owner pool (checks, ending sessions past their limits) and its
own ``Deadlines``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from database_service.errors import DRIVER_ERRORS
from database_service.postgres.deadlines import Deadlines
from database_service.postgres.pools import TenantPools

__all__ = ["Replica", "ReplicaSet", "lsn_value"]

log = logging.getLogger(__name__)


def lsn_value(text: str | None) -> int:
    """A ``pg_lsn`` (``X/Y``) as a number (0 for none)."""
    if not text:
        return 0
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass
class Replica:
    name: str
    dsn: str = field(repr=False)
    pools: TenantPools | None = None
    owner: asyncpg.Pool | None = None
    deadlines: Deadlines | None = None
    up: bool = False
    replay_lsn: int = 0
    lag_ms: float = float("inf")
    paused: bool = False
    last_error: str | None = None
    last_check: float = 0.0
    reads: int = 0
    fallbacks: int = 0

    def document(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": "healthy" if self.up else "unhealthy",
            "lag_ms": None if self.lag_ms == float("inf") else round(self.lag_ms, 1),
            "replay_paused": self.paused,
            "reads": self.reads,
            "fallbacks_to_primary": self.fallbacks,
            "last_error": self.last_error,
        }


class ReplicaSet:
    def __init__(
        self,
        primary_owner: asyncpg.Pool,
        replicas: list[Replica],
        *,
        max_lag_ms: float,
        check_interval: float = 0.25,
    ) -> None:
        self._primary = primary_owner
        self.replicas = replicas
        self.max_lag_ms = max_lag_ms
        self._interval = check_interval
        # The primary's WAL position over the last minute: (monotonic time, position).
        self._history: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)
        # Read your writes, per tenant: writes whose position is being read, and the position
        # after the tenant's last write.
        self._pending: collections.Counter[str] = collections.Counter()
        self._written: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._next = 0

    # -- routing ---------------------------------------------------------------------------

    def choose(self, tenant_id: str) -> Replica | None:
        """A replica that may answer the tenant's pure read now, or None (the primary)."""
        if self._pending[tenant_id]:
            return None
        needed = self._written.get(tenant_id, 0)
        candidates = [
            r
            for r in self.replicas
            if r.up and r.lag_ms <= self.max_lag_ms and r.replay_lsn >= needed
        ]
        if not candidates:
            return None
        self._next += 1
        return candidates[self._next % len(candidates)]

    def wrote(self, tenant_id: str) -> None:
        """A write of the tenant's committed on the primary: its reads go there until a
        replica has replayed it."""
        self._pending[tenant_id] += 1
        task = asyncio.get_running_loop().create_task(self._position_after(tenant_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _position_after(self, tenant_id: str) -> None:
        try:
            for attempt in range(50):
                try:
                    position = lsn_value(
                        await self._primary.fetchval("SELECT pg_current_wal_lsn()::text")
                    )
                    break
                except DRIVER_ERRORS:
                    await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
            else:
                return  # still pending: the primary answers this tenant until it is back
            self._written[tenant_id] = max(self._written.get(tenant_id, 0), position)
        finally:
            self._pending[tenant_id] -= 1
            if self._pending[tenant_id] <= 0:
                del self._pending[tenant_id]

    def failed(self, replica: Replica, exc: BaseException) -> None:
        """A read the replica could not serve (the caller retries on the primary)."""
        replica.fallbacks += 1
        if not isinstance(exc, asyncpg.PostgresError) or _unreachable(exc):
            replica.up = False  # out until a check finds it again
            replica.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("replica %s taken out: %s", replica.name, replica.last_error)

    # -- health checks ---------------------------------------------------------------------

    async def run_forever(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval)

    async def check(self) -> None:
        now = time.monotonic()
        with contextlib.suppress(*DRIVER_ERRORS):
            position = lsn_value(await self._primary.fetchval("SELECT pg_current_wal_lsn()::text"))
            self._history.append((now, position))
        while self._history and self._history[0][0] < now - 60 and len(self._history) > 1:
            self._history.popleft()
        await asyncio.gather(*(self._check(r, now) for r in self.replicas))

    async def _check(self, replica: Replica, now: float) -> None:
        assert replica.owner is not None
        try:
            row = await replica.owner.fetchrow(
                "SELECT pg_is_in_recovery() AS recovering,"
                " pg_last_wal_replay_lsn()::text AS replayed,"
                " pg_is_wal_replay_paused() AS paused",
                timeout=max(1.0, self._interval * 4),
            )
        except DRIVER_ERRORS as exc:
            if replica.up:
                log.warning("replica %s is down: %s", replica.name, exc)
            replica.up, replica.lag_ms = False, float("inf")
            replica.last_error = f"{type(exc).__name__}: {exc}"[:300]
            return
        assert row is not None
        if not row["recovering"]:
            # Promoted (a failover elsewhere): not a replica of ours any more.
            replica.up, replica.last_error = False, "not in recovery (promoted?)"
            return
        replica.replay_lsn = lsn_value(row["replayed"])
        replica.paused = bool(row["paused"])
        replica.lag_ms = self._lag_ms(replica.replay_lsn, now)
        replica.last_check = now
        if not replica.up:
            log.info("replica %s is up (lag %.0f ms)", replica.name, replica.lag_ms)
        replica.up, replica.last_error = True, None

    def _lag_ms(self, replayed: int, now: float) -> float:
        """How long ago the primary was first past ``replayed`` (0: caught up)."""
        behind_since = None
        for at, position in reversed(self._history):
            if position <= replayed:
                break
            behind_since = at
        return 0.0 if behind_since is None else (now - behind_since) * 1000

    def document(self) -> dict[str, Any]:
        return {
            "max_lag_ms": self.max_lag_ms,
            "replicas": [r.document() for r in self.replicas],
        }


def _unreachable(exc: asyncpg.PostgresError) -> bool:
    state = getattr(exc, "sqlstate", "") or ""
    return state.startswith(("08", "57P"))
