"""PostgreSQL stopped for 10 s while market data keeps arriving on both transports: the consumers
stop pulling, nothing acknowledged is lost, and ingestion resumes by itself."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from database_service.app import Application
from database_service.auth import Scope
from database_service.config import Settings
from database_service.supervisor import EmbeddedPostgres
from database_service_client import MarketDataPublisher, event_id_for, tick
from tests.fix_nats import NatsServer
from tests.fix_service import ADMIN_TOKEN, MASTER_KEY

N = 10_000


async def count(core: Application, tenant_id: str) -> int:
    return int(
        await core.owner_pool.fetchval(
            "SELECT count(*) FROM shared.trading_ticks WHERE company_id = $1", tenant_id
        )
    )


async def test_ingestion_survives_postgres_stopping_for_ten_seconds(
    nats_server: NatsServer, kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    topics = {
        "trading": f"{kafka_topic_prefix}trading",
        "analytics": f"{kafka_topic_prefix}analytics",
    }
    with tempfile.TemporaryDirectory(prefix="dbsvc-ingest-outage-") as tmp:
        pgdata = Path(tmp) / "pg"
        async with EmbeddedPostgres(pgdata, stop_on_exit=True) as pg:
            settings = Settings.load(
                postgres_url=pg.dsn,
                data_dir=Path(tmp) / "data",
                master_key=MASTER_KEY,
                bootstrap_admin_token=ADMIN_TOKEN,
                nats_url=nats_server.url,
                kafka_bootstrap=kafka_bootstrap,
                ingest_kafka_topics=list(topics.values()),
                ingest_kafka_group=f"{kafka_topic_prefix}group",
                ingest_kafka_dead_letter_topic=f"{kafka_topic_prefix}dead",
                ingest_ack_wait_seconds=3.0,
                ingest_batch_messages=4,
                pool_acquire_timeout_seconds=2.0,
            )
            async with Application(
                settings, start_nats=False, consume=True, maintain_partitions=False
            ) as core:
                await core.tenants.create("outage")
                await core.services.register(
                    "feed", tenants=["outage"], scopes=[Scope.INGEST], with_secret=False
                )
                token = core.tokens.issue(
                    "feed", tenants=["outage"], scopes=[Scope.INGEST], ttl_seconds=900
                )
                ticks = [
                    tick("outage", "EURUSD", 1_795_000_000_000_000 + i * 1000, bid=1.1,
                         ask=1.1002, volume=1, event_id=event_id_for("outage", i))
                    for i in range(N)
                ]  # fmt: skip
                publisher = MarketDataPublisher(
                    token, nats_url=nats_server.url, kafka_bootstrap=kafka_bootstrap,
                    kafka_topics=topics,  # type: ignore[arg-type]
                )  # fmt: skip
                async with publisher:

                    async def feed() -> None:  # ~14 s: records keep arriving during the outage
                        for at in range(0, N, 250):
                            await publisher.publish_ticks(ticks[at : at + 250], batch_size=250)
                            await asyncio.sleep(0.35)

                    feeding = asyncio.create_task(feed())
                    while await count(core, "outage") < 1_000:  # noqa: ASYNC110 - polling rows
                        await asyncio.sleep(0.05)
                    await asyncio.to_thread(pg._server.stop)
                    await asyncio.sleep(10)
                    during = core.ingest.stats("nats").state, core.ingest.stats("kafka").state
                    health = (await core.health.document())["dependencies"]["postgresql"]
                    async with EmbeddedPostgres(pgdata, stop_on_exit=False):
                        await feeding
                        for _ in range(300):
                            if await count(core, "outage") >= N:
                                break
                            await asyncio.sleep(0.2)
                        await asyncio.sleep(1)
                        stored = await count(core, "outage")
                        letters = await core.dead_letters.list(limit=10)
    assert "waiting_for_postgresql" in during, during
    assert health["status"] == "unhealthy"
    assert stored == N
    assert letters == []
