"""How ``serve`` divides the connection caps between its workers (``workers.plan``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from database_service.config import Settings
from database_service.workers.plan import (
    DIVIDED,
    WorkerPlan,
    divide,
    resolve_count,
    undersized,
    worker_overrides,
)


def settings(**values: object) -> Settings:
    return Settings.load(data_dir=Path("/nonexistent"), **values)


@pytest.mark.parametrize(
    ("total", "count", "shares"),
    [
        (64, 2, [32, 32]),
        (5, 2, [3, 2]),  # the remainder goes to the first workers, the primary first
        (10, 3, [4, 3, 3]),
        (4, 4, [1, 1, 1, 1]),
        (2, 3, [1, 1, 1]),  # never below one: the cap is exceeded by count - total
    ],
)
def test_a_cap_is_cut_into_shares_that_add_up_to_it(
    total: int, count: int, shares: list[int]
) -> None:
    assert [divide(total, count, i) for i in range(count)] == shares
    if total >= count:
        assert sum(shares) == total


def test_each_worker_gets_its_share_of_every_cap_and_the_primary_can_maintain() -> None:
    configured = settings(
        pool_global_max=64,
        pool_max_per_tenant=5,
        admin_pool_size=4,
        audit_pool_size=2,
        maintenance_pool_size=2,
    )
    primary = worker_overrides(configured, WorkerPlan(0, 2))
    other = worker_overrides(configured, WorkerPlan(1, 2))
    assert set(primary) == set(DIVIDED)
    assert primary["pool_global_max"] + other["pool_global_max"] == 64
    assert primary["pool_max_per_tenant"] + other["pool_max_per_tenant"] == 5
    # Each workload's pool is divided too (2 each by default: one per worker).
    assert (primary["pool_analytics_max_per_tenant"], other["pool_bulk_max_per_tenant"]) == (1, 1)
    assert (primary["admin_pool_size"], other["admin_pool_size"]) == (2, 2)
    assert (primary["audit_pool_size"], other["audit_pool_size"]) == (1, 1)
    # Partition maintenance holds one connection and reads on another.
    assert (primary["maintenance_pool_size"], other["maintenance_pool_size"]) == (2, 1)
    assert WorkerPlan(0, 2).primary and not WorkerPlan(1, 2).primary


def test_caps_below_the_worker_count_are_named() -> None:
    # The admin pool (4) is not below 4 workers; the others are.
    assert undersized(settings(pool_max_per_tenant=2), 4) == [
        "DBSVC_POOL_MAX_PER_TENANT=2",
        "DBSVC_POOL_ANALYTICS_MAX_PER_TENANT=2",
        "DBSVC_POOL_BULK_MAX_PER_TENANT=2",
        "DBSVC_AUDIT_POOL_SIZE=2",
        "DBSVC_MAINTENANCE_POOL_SIZE=2",
        "DBSVC_MULTIDB_OUTBOX_POOL_SIZE=2",
    ]


def test_zero_workers_means_one_per_core() -> None:
    assert resolve_count(settings(workers=3)) == 3
    assert resolve_count(settings(workers=0)) == len(os.sched_getaffinity(0))


def test_a_share_of_a_worker_that_does_not_exist_is_an_error() -> None:
    with pytest.raises(ValueError):
        divide(10, 2, 2)
