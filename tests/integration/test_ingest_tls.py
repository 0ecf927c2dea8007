"""Ingestion over TLS: a nats-server serving TLS only (a development CA's certificate), the
service consuming it with ``DBSVC_NATS_TLS_CA_FILE`` and a publisher trusting the same CA;
a consumer that does not trust the CA never connects."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from database_service.supervisor import EmbeddedNats, free_port
from database_service.tls import DevCertificates, make_dev_certificates
from database_service_client import MarketDataPublisher
from tests.fix_ingest import IngestEnv
from tests.fix_service import TenantFactory
from tests.integration.test_ingest_transports import make_ticks


@pytest.fixture
async def tls_nats(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, DevCertificates]]:
    certs = make_dev_certificates(tmp_path / "tls")
    server = EmbeddedNats(
        tmp_path / "nats-tls", port=free_port(), tls=(certs.server_cert, certs.server_key)
    )
    async with server:
        yield server, certs


async def test_ticks_published_over_tls_are_stored(
    ingest_env: IngestEnv,
    new_tenant: TenantFactory,
    tls_nats: tuple[EmbeddedNats, DevCertificates],
) -> None:
    server, certs = tls_nats
    assert server.url.startswith("tls://")
    tenant = await new_tenant("nats_tls")
    token = await ingest_env.token([tenant.tenant_id])
    service = await ingest_env.instance(
        kafka=False, nats_url=server.url, nats_tls_ca_file=certs.ca_cert
    )
    trust = ssl.create_default_context(cafile=str(certs.ca_cert))
    async with MarketDataPublisher(
        token, nats_url=server.url, nats_tls=trust, producer="tests"
    ) as publisher:
        report = await publisher.publish_ticks(make_ticks(tenant.tenant_id, 500), batch_size=100)
    assert report.ok, report.to_dict()
    assert await ingest_env.wait_ticks(tenant.tenant_id, 500) == 500
    assert service.ingest.stats("nats").stored == 500
    health = await service.health.document()
    assert health["dependencies"]["nats"]["status"] == "healthy", health["dependencies"]


async def test_a_consumer_that_does_not_trust_the_ca_never_connects(
    ingest_env: IngestEnv, tls_nats: tuple[EmbeddedNats, DevCertificates]
) -> None:
    server, _ = tls_nats
    settings_ca = make_dev_certificates(ingest_env.tmp / "other").ca_cert
    # instance() waits for the consumer to run: it never does (the handshake fails).
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            ingest_env.instance(kafka=False, nats_url=server.url, nats_tls_ca_file=settings_ca),
            timeout=8,
        )
