"""TLS on every listener of ``database-service serve`` (two workers), with mutual TLS: HTTPS and
gRPC over TLS with a development CA, plaintext refused, TLS 1.2 at least, client certificates
as service identities (alone or with a token, which must agree), unknown, foreign and revoked
certificates refused, and a rotated certificate served without a restart."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import httpx
import pytest
from cryptography import x509

from database_service.tls import make_dev_certificates, peer_from_pem
from database_service_client import MultiDatabaseClient, Unauthenticated, Unavailable
from tests.e2e.fix_tls import TlsService, tls_service_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(300)


def served_certificate(
    port: int, ca: str, client: tuple[str, str] | None = None
) -> x509.Certificate:
    context = ssl.create_default_context(cafile=ca)
    if client:
        context.load_cert_chain(*client)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_https_serves_the_configured_certificate(tls_service: TlsService) -> None:
    with tls_service.http() as http:
        health = http.get("/api/v1/health")
    assert health.status_code == 200, health.text
    served = served_certificate(tls_service.served.port, str(tls_service.certs.ca_cert))
    expected = x509.load_pem_x509_certificate(tls_service.certs.server_cert.read_bytes())
    assert served.serial_number == expected.serial_number
    assert "https://" in tls_service.served.output() and "(TLS)" in tls_service.served.output()


async def test_plaintext_is_refused_on_both_listeners(tls_service: TlsService) -> None:
    async with httpx.AsyncClient(timeout=5) as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(f"http://127.0.0.1:{tls_service.served.port}/api/v1/health")
    async with MultiDatabaseClient(
        tls_service.grpc, tls_service.tenant_a, tls_service.token_a, retries=0, timeout=5
    ) as client:
        with pytest.raises(Unavailable):
            await client.fetch_all("SELECT 1")


def test_tls_older_than_1_2_is_refused(tls_service: TlsService) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(tls_service.certs.ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", tls_service.served.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="localhost")


async def test_grpc_with_a_bound_certificate_and_its_token(tls_service: TlsService) -> None:
    async with tls_service.client(tls_service.tenant_a, tls_service.token_a, "svc-a") as client:
        assert (await client.fetch_all("SELECT 41 + 1")).rows == [(42,)]


async def test_a_client_certificate_alone_identifies_its_service(tls_service: TlsService) -> None:
    async with tls_service.client(tls_service.tenant_a, None, "svc-a") as client:
        assert (await client.fetch_all("SELECT current_user IS NOT NULL")).rows == [(True,)]
    with tls_service.http("svc-a") as http:
        response = http.post(
            "/api/v1/query",
            json={"sql": "SELECT 1 AS one"},
            headers={"X-Tenant-Id": tls_service.tenant_a},
        )
    assert response.status_code == 200, response.text


async def test_token_and_certificate_must_name_the_same_service(tls_service: TlsService) -> None:
    async with tls_service.client(tls_service.tenant_b, tls_service.token_b, "svc-a") as client:
        with pytest.raises(Unauthenticated, match="client certificate"):
            await client.fetch_all("SELECT 1")
    with tls_service.http("svc-a") as http:
        response = http.post(
            "/api/v1/query",
            json={"sql": "SELECT 1"},
            headers={
                "X-Tenant-Id": tls_service.tenant_b,
                "Authorization": f"Bearer {tls_service.token_b}",
            },
        )
    assert response.status_code == 401, response.text


async def test_an_unbound_certificate_is_refused_and_audited(tls_service: TlsService) -> None:
    async with tls_service.client(tls_service.tenant_a, None, "stranger") as client:
        with pytest.raises(Unauthenticated, match="bound to no service"):
            await client.fetch_all("SELECT 1")
    # Audited like a refused token (the audit writer batches: give it a moment).
    deadline = time.monotonic() + 15
    found: list[dict[str, object]] = []
    while not found and time.monotonic() < deadline:
        with tls_service.http(headers=tls_service.served.admin()) as admin:
            events = admin.get("/api/v1/admin/audit", params={"limit": 200}).json()["events"]
        found = [e for e in events if "CN=stranger" in str(e.get("detail", ""))]
        await asyncio.sleep(0.5)
    assert found, "no audit event for the refused certificate"
    assert found[0]["outcome"] == "denied"


async def test_a_certificate_from_another_ca_fails_the_handshake(tls_service: TlsService) -> None:
    async with tls_service.client(
        tls_service.tenant_a, tls_service.token_a, "svc-a", rogue=True
    ) as client:
        with pytest.raises(Unavailable):
            await client.fetch_all("SELECT 1")
    rogue = ssl.create_default_context(cafile=str(tls_service.certs.ca_cert))
    rogue.load_cert_chain(*(str(p) for p in tls_service.rogue.clients["svc-a"]))
    async with httpx.AsyncClient(verify=rogue, timeout=10) as http:
        with pytest.raises(httpx.HTTPError):
            await http.get(f"{tls_service.https}/api/v1/health")


async def test_gRPC_requires_a_client_certificate_with_mutual_tls(tls_service: TlsService) -> None:
    async with tls_service.client(tls_service.tenant_a, tls_service.token_a) as client:
        with pytest.raises(Unavailable):
            await client.fetch_all("SELECT 1")


async def test_a_revoked_certificate_is_refused(tls_service: TlsService) -> None:
    async with tls_service.client(tls_service.tenant_a, None, "revoked") as client:
        assert (await client.fetch_all("SELECT 1")).rows == [(1,)]
        pem = tls_service.certs.clients["revoked"][0].read_bytes()
        tls_service.cli("service", "revoke-certificate", peer_from_pem(pem).fingerprint)
        deadline = time.monotonic() + 20  # each worker re-reads revocations within 5 s
        refused = 0
        while time.monotonic() < deadline and refused < 4:
            try:
                await client.fetch_all("SELECT 1")
                refused = 0
            except Unauthenticated as exc:
                assert "revoked" in exc.message
                refused += 1
        assert refused >= 4


async def test_a_rotated_certificate_is_served_without_a_restart(tls_service: TlsService) -> None:
    await asyncio.to_thread(_rotate_and_check, tls_service)
    async with tls_service.client(tls_service.tenant_a, tls_service.token_a, "svc-a") as client:
        assert (await client.fetch_all("SELECT 1")).rows == [(1,)]
    assert tls_service.served.process.poll() is None


def _rotate_and_check(tls_service: TlsService) -> None:
    certs = tls_service.certs
    client_pair = tuple(str(p) for p in certs.clients["svc-a"])
    grpc_port = int(tls_service.served.env["DBSVC_GRPC_PORT"])
    before = served_certificate(grpc_port, str(certs.ca_cert), client_pair)  # type: ignore[arg-type]
    rotated = make_dev_certificates(certs.directory, ca=(certs.ca_cert, certs.ca_key))
    expected = x509.load_pem_x509_certificate(rotated.server_cert.read_bytes()).serial_number
    assert expected != before.serial_number
    deadline = time.monotonic() + 15
    seen: set[int] = set()
    while time.monotonic() < deadline and seen != {expected}:
        seen = {
            served_certificate(port, str(certs.ca_cert), client_pair).serial_number  # type: ignore[arg-type]
            for port in (tls_service.served.port, grpc_port)
            for _ in range(4)  # both workers
        }
        time.sleep(0.3)
    assert seen == {expected}
