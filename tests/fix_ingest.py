"""Ingestion under test: service instances consuming a test's own NATS server and Kafka topics,
publishers for them, and waiting for rows to land."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service_client import MarketDataPublisher
from tests.fix_nats import NatsServer
from tests.fix_pg import PgCluster
from tests.fix_service import make_settings


@dataclass
class IngestEnv:
    """One test's transports: its nats-server, its Kafka topics and group on the shared broker."""

    core: Application
    cluster: PgCluster
    nats: NatsServer
    kafka_bootstrap: str
    prefix: str
    tmp: Path
    stack: contextlib.AsyncExitStack

    @property
    def topics(self) -> dict[str, str]:
        return {
            "trading": f"{self.prefix}database-trading-data",
            "analytics": f"{self.prefix}database-analytics-data",
        }

    def overrides(self, **extra: Any) -> dict[str, Any]:
        values: dict[str, Any] = {
            "nats_url": self.nats.url,
            "kafka_bootstrap": self.kafka_bootstrap,
            "ingest_kafka_topics": list(self.topics.values()),
            "ingest_kafka_group": f"{self.prefix}ingest",
            "ingest_kafka_dead_letter_topic": f"{self.prefix}database-dead-letter",
            "ingest_ack_wait_seconds": 5.0,
        }
        values.update(extra)
        return values

    async def instance(self, *, nats: bool = True, kafka: bool = True, **extra: Any) -> Application:
        """A service instance (its own Application) consuming this test's transports."""
        overrides = self.overrides(**extra)
        if not nats:
            overrides["nats_url"] = None
        if not kafka:
            overrides["kafka_bootstrap"] = None
        settings = make_settings(self.cluster, self.tmp / secrets.token_hex(3), **overrides)
        app = await self.stack.enter_async_context(
            Application(settings, start_nats=False, consume=True, maintain_partitions=False)
        )
        # Consumers connect in the background; a test publishes once the streams exist.
        transports = [t for t, on in (("nats", nats), ("kafka", kafka)) if on]
        deadline = time.monotonic() + 60
        while any(app.ingest.stats(t).state != "running" for t in transports):
            assert time.monotonic() < deadline, {t: app.ingest.stats(t) for t in transports}
            await asyncio.sleep(0.05)
        return app

    async def token(self, tenants: list[str]) -> str:
        name = f"ingest-{secrets.token_hex(4)}"
        await self.core.services.register(
            name, tenants=tenants, scopes=[Scope.INGEST], with_secret=False
        )
        return self.core.tokens.issue(name, tenants=tenants, scopes=[Scope.INGEST], ttl_seconds=900)

    def publisher(
        self, token: str, *, nats: bool = True, kafka: bool = True
    ) -> MarketDataPublisher:
        return MarketDataPublisher(
            token,
            nats_url=self.nats.url if nats else None,
            kafka_bootstrap=self.kafka_bootstrap if kafka else None,
            kafka_topics=self.topics,  # type: ignore[arg-type]
            producer="tests",
        )

    async def count_ticks(self, tenant_id: str) -> int:
        value = await self.core.owner_pool.fetchval(
            f"SELECT count(*) FROM {self.core.settings.shared_schema}.trading_ticks"
            " WHERE company_id = $1",
            tenant_id,
        )
        return int(value)

    async def wait_ticks(self, tenant_id: str, expected: int, timeout: float = 60.0) -> int:
        """Wait until the tenant has ``expected`` ticks, then a little longer to catch extras."""
        deadline = time.monotonic() + timeout
        count = await self.count_ticks(tenant_id)
        while count < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            count = await self.count_ticks(tenant_id)
        await asyncio.sleep(0.5)
        return await self.count_ticks(tenant_id)


IngestEnvFactory = Callable[[], Awaitable[IngestEnv]]


@pytest.fixture
async def ingest_env(
    core: Application,
    pg_cluster: PgCluster,
    nats_server: NatsServer,
    kafka_bootstrap: str,
    kafka_topic_prefix: str,
    tmp_path: Path,
) -> AsyncIterator[IngestEnv]:
    async with contextlib.AsyncExitStack() as stack:
        yield IngestEnv(
            core, pg_cluster, nats_server, kafka_bootstrap, kafka_topic_prefix, tmp_path, stack
        )
