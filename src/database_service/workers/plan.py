"""How many serving processes, and what share of each connection cap each one gets.

Pure functions of the settings (no I/O): the supervisor computes a worker's settings from them,
and unit tests read them as the rules. A cap of ``total`` connections is cut into ``count``
shares that add up to ``total``: every worker gets ``total // count``, and the first
``total % count`` workers (the primary first) one more. No share is below 1 (a worker without a
connection could not serve), so a cap smaller than the worker count is exceeded by at most
``count - total``: configure caps of at least the worker count (start-up warns otherwise).
One more floor: the primary worker's maintenance pool holds at least 2 connections (a partition
maintenance round reads the partition list while it holds its lock on another connection).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from database_service.config import Settings

__all__ = ["DIVIDED", "WorkerPlan", "divide", "resolve_count", "worker_overrides"]

# The caps PostgreSQL sees per process, divided between the workers: tenant connections across
# all pools, each tenant's pool, and the owner's four pools.
DIVIDED = (
    "pool_global_max",
    "pool_max_per_tenant",
    "pool_analytics_max_per_tenant",
    "pool_bulk_max_per_tenant",
    "admin_pool_size",
    "audit_pool_size",
    "maintenance_pool_size",
    "multidb_outbox_pool_size",
)


def resolve_count(settings: Settings) -> int:
    """``DBSVC_WORKERS``, 0 meaning one per core this process may run on."""
    if settings.workers:
        return settings.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def divide(total: int, count: int, index: int) -> int:
    """Worker ``index``'s share of ``total`` among ``count`` workers (at least 1)."""
    if not 0 <= index < count:
        raise ValueError(f"worker {index} of {count}")
    share = total // count + (1 if index < total % count else 0)
    return max(1, share)


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    index: int
    count: int

    @property
    def primary(self) -> bool:
        """The one worker that runs the ingestion consumers and partition maintenance."""
        return self.index == 0


# The smallest share the primary worker may get (it runs partition maintenance).
_PRIMARY_FLOOR = {"maintenance_pool_size": 2}


def worker_overrides(settings: Settings, plan: WorkerPlan) -> dict[str, int]:
    """The divided caps of one worker, as settings values."""
    shares = {
        name: divide(int(getattr(settings, name)), plan.count, plan.index) for name in DIVIDED
    }
    if plan.primary:
        for name, floor in _PRIMARY_FLOOR.items():
            shares[name] = max(shares[name], floor)
    return shares


def undersized(settings: Settings, count: int) -> list[str]:
    """The divided caps smaller than the worker count (each worker still gets one)."""
    return [
        f"DBSVC_{name.upper()}={getattr(settings, name)}"
        for name in DIVIDED
        if int(getattr(settings, name)) < count
    ]
