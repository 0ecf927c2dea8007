"""Read replicas against a real streaming replica of the test server: pure reads go to it within
the lag bound (replay paused: past the bound, the primary answers), a caller reads its own
writes, a replica killed and started again under load fails no read, and health shows it."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.postgres.replicas import lsn_value
from database_service.query import TenantContext
from database_service.query.caching import CacheOptions
from database_service.supervisor import free_port
from database_service.supervisor.replica import restart_replica, start_replica, stop_replica
from database_service.tenancy import TenantRecord
from tests.fix_pg import PgCluster
from tests.fix_service import make_settings


@pytest.fixture(scope="module")
async def replicated(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Application, Path, int]]:
    """A core reading from a streaming replica of the test server (lag bound 60 s; tests
    lower it)."""
    directory = Path(tempfile.mkdtemp(prefix="dbsvc-replica-"))  # short: a socket lives there
    port = free_port()
    dsn = await start_replica(pg_cluster.admin_dsn, directory, port)
    replica_url = dsn.replace("/postgres?", f"/{pg_cluster.database}?")
    settings = make_settings(
        pg_cluster,
        tmp_path_factory.mktemp("replicas"),
        postgres_replica_urls=[replica_url],
        replica_max_lag_ms=60_000,
        replica_check_interval_ms=50,
    )
    try:
        async with Application(settings, start_nats=False, maintain_partitions=False) as app:
            yield app, directory, port
    finally:
        with contextlib.suppress(RuntimeError):
            await stop_replica(pg_cluster.admin_dsn, directory, mode="immediate")
        shutil.rmtree(directory, ignore_errors=True)


async def _tenant(app: Application) -> tuple[TenantRecord, Principal, TenantContext]:
    tenant = await app.tenants.create(f"rep_{secrets.token_hex(4)}")
    scopes = frozenset({Scope.READ, Scope.WRITE, Scope.ADMIN})
    principal = Principal("svc-rep", frozenset({tenant.tenant_id}), scopes)
    ctx = TenantContext(tenant.tenant_id)
    await app.executor.execute(principal, ctx, "CREATE TABLE quotes (id int PRIMARY KEY, v text)")
    return tenant, principal, ctx


async def _caught_up(app: Application, timeout: float = 30.0) -> None:
    """Until the replica is up and has replayed everything the primary has written."""
    assert app.replicas is not None
    target = lsn_value(await app.owner_pool.fetchval("SELECT pg_current_wal_lsn()::text"))
    replica = app.replicas.replicas[0]
    for _ in range(int(timeout / 0.05)):
        await app.replicas.check()
        if replica.up and replica.replay_lsn >= target:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the replica did not catch up: {replica.document()}")


async def _on_replica(app: Application, sql: str) -> None:
    assert app.replicas is not None
    owner = app.replicas.replicas[0].owner
    assert owner is not None
    await owner.execute(sql)


async def _read(app: Application, principal: Principal, ctx: TenantContext, key: int) -> Any:
    sql = "SELECT v FROM quotes WHERE id = $1"
    return [tuple(r) for r in (await app.executor.execute(principal, ctx, sql, [key])).rows]


async def test_reads_go_to_the_replica_within_the_lag_bound_and_to_the_primary_past_it(
    replicated: tuple[Application, Path, int],
) -> None:
    app, _, _ = replicated
    assert app.replicas is not None
    replica = app.replicas.replicas[0]
    tenant, principal, ctx = await _tenant(app)
    await _caught_up(app)
    # The table was made through the service: once replayed, the replica answers again.
    for _ in range(100):
        before = replica.reads
        assert await _read(app, principal, ctx, 1) == []
        if replica.reads == before + 1:
            break  # the replica answered (the tenant's own role works there)
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the replica never answered: {replica.document()}")

    await _on_replica(app, "SELECT pg_wal_replay_pause()")
    try:
        # Written on the primary behind the service's back: no read-your-writes mark.
        await app.owner_pool.execute(f"INSERT INTO {tenant.schema_name}.quotes VALUES (1, 'new')")
        await app.replicas.check()
        assert await _read(app, principal, ctx, 1) == []  # within 60 s: the replica's view
        app.replicas.max_lag_ms = 100
        await asyncio.sleep(0.3)
        await app.replicas.check()
        assert replica.lag_ms > 100 and replica.up
        reads = replica.reads
        assert await _read(app, principal, ctx, 1) == [("new",)]  # past the bound: the primary
        assert replica.reads == reads
    finally:
        app.replicas.max_lag_ms = 60_000
        await _on_replica(app, "SELECT pg_wal_replay_resume()")
    await _caught_up(app)
    assert await _read(app, principal, ctx, 1) == [("new",)]


async def test_a_caller_reads_its_own_writes(replicated: tuple[Application, Path, int]) -> None:
    app, _, _ = replicated
    assert app.replicas is not None
    replica = app.replicas.replicas[0]
    _, principal, ctx = await _tenant(app)
    await _caught_up(app)
    await _on_replica(app, "SELECT pg_wal_replay_pause()")
    try:
        for key in range(1, 6):  # each read right after its write, the replica stuck
            await app.executor.execute(
                principal, ctx, "INSERT INTO quotes VALUES ($1, 'mine')", [key]
            )
            assert await _read(app, principal, ctx, key) == [("mine",)]
        await app.executor.transaction(
            principal, ctx, [("UPDATE quotes SET v = 'changed' WHERE id = $1", [1])]
        )
        assert await _read(app, principal, ctx, 1) == [("changed",)]
    finally:
        await _on_replica(app, "SELECT pg_wal_replay_resume()")
    await _caught_up(app)
    await asyncio.sleep(0.1)  # the position after the last write is known by now
    reads = replica.reads
    assert await _read(app, principal, ctx, 1) == [("changed",)]
    assert replica.reads == reads + 1  # replayed: the replica answers the tenant again


async def test_a_replica_killed_and_started_again_under_load_fails_no_read(
    replicated: tuple[Application, Path, int], pg_cluster: PgCluster
) -> None:
    app, directory, port = replicated
    assert app.replicas is not None
    replica = app.replicas.replicas[0]
    _, principal, ctx = await _tenant(app)
    await app.executor.execute(principal, ctx, "INSERT INTO quotes VALUES (7, 'seven')")
    await _caught_up(app)
    await asyncio.sleep(0.1)
    failures: list[BaseException] = []
    answered = 0
    stop = asyncio.Event()

    async def reader() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                assert await _read(app, principal, ctx, 7) == [("seven",)]
                answered += 1
            except Exception as exc:  # counted: the point is that none happens
                failures.append(exc)
            await asyncio.sleep(0)

    readers = [asyncio.create_task(reader()) for _ in range(4)]
    try:
        await asyncio.sleep(0.5)
        serving = replica.reads
        assert serving > 0
        await stop_replica(pg_cluster.admin_dsn, directory, mode="immediate")
        await asyncio.sleep(1.0)
        assert not replica.up
        down_reads = replica.reads
        await asyncio.sleep(0.3)
        assert replica.reads == down_reads  # out: the primary answers
        await restart_replica(pg_cluster.admin_dsn, directory, port)
        for _ in range(400):
            if replica.up:
                break
            await asyncio.sleep(0.05)
        assert replica.up, replica.document()
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*readers)
    assert failures == []
    assert answered > 50 and replica.reads > down_reads  # put back: it answers again


async def test_health_shows_each_replica(replicated: tuple[Application, Path, int]) -> None:
    app, _, _ = replicated
    await _caught_up(app)
    document = await app.health.document()
    (shown,) = document["replicas"]["replicas"]
    assert shown["status"] == "healthy" and shown["lag_ms"] is not None


async def test_a_cached_read_is_filled_from_the_primary(
    replicated: tuple[Application, Path, int],
) -> None:
    """A replica's older view, once cached, would outlive the lag bound (until the TTL or the
    next write): the cache's fills read the primary."""
    app, _, _ = replicated
    assert app.replicas is not None
    replica = app.replicas.replicas[0]
    tenant, principal, ctx = await _tenant(app)
    await _caught_up(app)
    options = CacheOptions(
        ttl_ms=60_000, form="test", encode=lambda r: repr([tuple(x) for x in r.rows]).encode()
    )
    await _on_replica(app, "SELECT pg_wal_replay_pause()")
    try:
        await app.owner_pool.execute(f"INSERT INTO {tenant.schema_name}.quotes VALUES (3, 'x')")
        await app.replicas.check()
        reads = replica.reads
        sql = "SELECT v FROM quotes WHERE id = $1"
        filled = await app.executor.execute(principal, ctx, sql, [3], cache=options)
        assert filled.cache is not None and filled.cache.status == "miss"
        assert filled.payload == b"[('x',)]"  # the primary's, not the replica's
        assert replica.reads == reads
        assert await _read(app, principal, ctx, 3) == []  # uncached: the replica's view
    finally:
        await _on_replica(app, "SELECT pg_wal_replay_resume()")
