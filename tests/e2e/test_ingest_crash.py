"""Nothing acknowledged is lost, nothing is stored twice: ``database-service serve`` SIGKILLed
while it ingests a backlog from both transports, then started again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.js.errors

from database_service.app import Application
from database_service.supervisor import free_port
from database_service_client import event_id_for, tick
from tests.fix_ingest import IngestEnv
from tests.fix_service import ADMIN_TOKEN, MASTER_KEY, TenantFactory

BIN = Path(sys.executable).parent / "database-service"
N = 20_000


def serve(env: IngestEnv, data_dir: Path) -> subprocess.Popen[bytes]:
    settings = env.overrides(ingest_batch_messages=2)
    variables = {
        "DBSVC_POSTGRES_URL": env.cluster.dsn,
        "DBSVC_TENANT_ROLE_PREFIX": env.cluster.role_prefix,
        "DBSVC_TENANT_GROUP_ROLE": env.cluster.group_role,
        "DBSVC_MASTER_KEY": MASTER_KEY,
        "DBSVC_BOOTSTRAP_ADMIN_TOKEN": ADMIN_TOKEN,
        "DBSVC_DATA_DIR": str(data_dir),
        "DBSVC_HTTP_PORT": str(free_port()),
        "DBSVC_GRPC_PORT": str(free_port()),
        "DBSVC_TS_CREATE_AHEAD_HOURS": "1",
    }
    for key, value in settings.items():
        text = json.dumps(value) if isinstance(value, list) else str(value)
        variables[f"DBSVC_{key.upper()}"] = text
    return subprocess.Popen(
        [str(BIN), "serve"],
        env={**os.environ, **variables},
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir.parent / "serve.log", "ab"),
    )


async def stream_ready(env: IngestEnv, process: subprocess.Popen[bytes], tmp: Path) -> None:
    """The instance created the JetStream stream (publishing before that would fail)."""
    nc = await nats.connect(env.nats.url)
    try:
        for _ in range(600):
            assert process.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            try:
                await nc.jetstream().consumer_info("DATABASE_INGEST", "database-service-ingest")
                return
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.1)
        raise AssertionError("the service never created its JetStream consumer")
    finally:
        await nc.close()


async def test_a_killed_instance_loses_nothing_and_duplicates_nothing(
    core: Application, ingest_env: IngestEnv, new_tenant: TenantFactory, tmp_path: Path
) -> None:
    tenant = await new_tenant("crash")
    token = await ingest_env.token([tenant.tenant_id])
    start = 1_795_000_000_000_000
    ticks = [
        tick(tenant.tenant_id, f"S{i % 3}", start + i * 1000, bid=1.0, ask=1.0002, volume=1,
             event_id=event_id_for(tenant.tenant_id, "crash", i))
        for i in range(N)
    ]  # fmt: skip
    first = serve(ingest_env, tmp_path / "one")
    try:
        await stream_ready(ingest_env, first, tmp_path)
        async with ingest_env.publisher(token) as publisher:
            report = await publisher.publish_ticks(ticks, batch_size=250)
        assert report.ok, report.to_dict()
        deadline = time.monotonic() + 90
        while (count := await ingest_env.count_ticks(tenant.tenant_id)) < N // 10:
            assert first.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first instance stored nothing"
            await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = await ingest_env.count_ticks(tenant.tenant_id)
    assert killed_at < N, "the backlog was done before the kill; the test proved nothing"

    second = serve(ingest_env, tmp_path / "two")
    try:
        stored = await ingest_env.wait_ticks(tenant.tenant_id, N, timeout=120)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    assert stored == N, f"killed at {killed_at} (first count {count}), then {stored}"
    distinct = await core.owner_pool.fetchval(
        f"SELECT count(DISTINCT event_id) FROM {core.settings.shared_schema}.trading_ticks"
        " WHERE company_id = $1",
        tenant.tenant_id,
    )
    assert distinct == N
