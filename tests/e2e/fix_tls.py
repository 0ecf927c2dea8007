"""``database-service serve`` over TLS with mutual TLS, for the TLS tests and the TLS isolation
attacks: a development CA, a server certificate, client certificates bound to two tenants'
services, one bound to nothing and one from another CA."""

from __future__ import annotations

import secrets
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from database_service.tls import DevCertificates, make_dev_certificates
from database_service_client import MultiDatabaseClient, TlsOptions
from tests.e2e.test_serve import BIN, Served

SUBJECT = "CN={},O=Database Service development"


@dataclass
class TlsService:
    served: Served
    certs: DevCertificates
    rogue: DevCertificates  # another CA: its client certificate is not trusted
    tenant_a: str
    tenant_b: str
    token_a: str
    token_b: str

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.served.port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.served.env['DBSVC_GRPC_PORT']}"

    def http(self, client: str | None = None, **options: object) -> httpx.Client:
        cert = self.certs.clients[client] if client else None
        return httpx.Client(
            base_url=self.https,
            verify=ssl.create_default_context(cafile=str(self.certs.ca_cert)),
            cert=(str(cert[0]), str(cert[1])) if cert else None,
            timeout=30,
            **options,  # type: ignore[arg-type]
        )

    def client(
        self, tenant: str, token: str | None, cert: str | None = None, *, rogue: bool = False
    ) -> MultiDatabaseClient:
        made = self.rogue if rogue else self.certs
        pair = made.clients[cert] if cert else (None, None)
        tls = TlsOptions(ca_file=self.certs.ca_cert, cert_file=pair[0], key_file=pair[1])
        return MultiDatabaseClient(self.grpc, tenant, token, tls=tls, retries=0)

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [str(BIN), *args], env=self.served.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture(scope="module", name="tls_service")
def tls_service_fixture() -> Iterator[TlsService]:
    with tempfile.TemporaryDirectory(prefix="dbsvc-tls-") as tmp:
        root = Path(tmp)
        certs = make_dev_certificates(
            root / "tls", clients=["svc-a", "svc-b", "stranger", "revoked"]
        )
        rogue = make_dev_certificates(root / "rogue", clients=["svc-a"])
        served = Served(
            root / "data",
            env={
                "DBSVC_TLS_CERT_FILE": str(certs.server_cert),
                "DBSVC_TLS_KEY_FILE": str(certs.server_key),
                "DBSVC_TLS_CLIENT_CA_FILE": str(certs.ca_cert),
                "DBSVC_TLS_REQUIRED": "true",
                "DBSVC_WORKERS": "2",
            },
        )
        try:
            served.base = f"https://127.0.0.1:{served.port}"
            served.wait_for_line("Database Service is running", timeout=90)
            service = TlsService(served, certs, rogue, "", "", "", "")
            suffix = secrets.token_hex(3)
            service.tenant_a, service.tenant_b = f"tls_a_{suffix}", f"tls_b_{suffix}"
            with service.http(headers=served.admin()) as admin:
                for tenant, name in ((service.tenant_a, "svc-a"), (service.tenant_b, "svc-b")):
                    created = admin.post("/api/v1/admin/schema/create", json={"tenant_id": tenant})
                    assert created.is_success, created.text
                    body = {
                        "service": name,
                        "tenants": [tenant],
                        "scopes": ["read", "write"],
                        "with_secret": False,
                    }
                    assert admin.post("/api/v1/admin/services", json=body).is_success
                    issued = admin.post("/api/v1/admin/tokens", json={"service": name})
                    token = issued.json()["access_token"]
                    if name == "svc-a":
                        service.token_a = token
                    else:
                        service.token_b = token
            for name in ("svc-a", "svc-b"):
                service.cli("service", "bind-certificate", name, SUBJECT.format(name))
            service.cli("service", "bind-certificate", "svc-a", SUBJECT.format("revoked"))
            yield service
        finally:
            served.kill()
