"""The service to PostgreSQL over TLS with ``sslmode=verify-full``: a PostgreSQL 15 (Debian's,
which ``make test`` installs) started here with ``ssl=on`` and a development CA's certificate,
accepting TCP logins only over TLS (``hostssl``). The control plane, the owner's pools and the
tenants' own logins all go over TLS; a wrong CA and plaintext are refused."""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from database_service.app import Application
from database_service.auth.tokens import everything
from database_service.config import Settings
from database_service.query import TenantContext
from database_service.supervisor import free_port
from database_service.tls import make_dev_certificates
from tests.fix_service import ADMIN_TOKEN, MASTER_KEY

BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = secrets.token_urlsafe(16)


def as_postgres(*command: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.getuid() == 0 else list(command)


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[tuple[str, Path, Path]]:
    """(DSN with verify-full, the CA, another CA) of a TLS-only PostgreSQL 15."""
    assert (BIN / "initdb").exists(), "postgresql-15 is installed by make test (scripts/pg15.sh)"
    root = Path(tempfile.mkdtemp(prefix="dbsvc-pgtls-"))
    try:
        certs = make_dev_certificates(root / "tls")
        other = make_dev_certificates(root / "other")
        data, sock, port = root / "data", root / "sock", free_port()
        sock.mkdir()
        if os.getuid() == 0:
            shutil.chown(root, "postgres")
            shutil.chown(sock, "postgres")
            for path in (root / "tls", certs.server_cert, certs.server_key):
                shutil.chown(path, "postgres")
        os.chmod(root, 0o755)
        subprocess.run(
            as_postgres(str(BIN / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth-local=trust", "--auth-host=scram-sha-256"),
            check=True, capture_output=True,
        )  # fmt: skip
        hba = "local all postgres trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n"
        subprocess.run(as_postgres("sh", "-c", f"printf '{hba}' > {data}/pg_hba.conf"), check=True)
        options = (
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on"
            f" -c ssl_cert_file={certs.server_cert} -c ssl_key_file={certs.server_key}"
        )
        subprocess.run(
            as_postgres(str(BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
                        "-o", options, "start"),
            check=True, capture_output=True,
        )  # fmt: skip
        try:
            subprocess.run(
                as_postgres(str(BIN / "psql"), "-h", str(sock), "-p", str(port), "-U",
                            "postgres", "-c",
                            f"CREATE ROLE dbsvc_owner SUPERUSER LOGIN PASSWORD '{PASSWORD}'"),
                check=True, capture_output=True,
            )  # fmt: skip
            dsn = (
                f"postgresql://dbsvc_owner:{PASSWORD}@localhost:{port}/postgres"
                f"?sslmode=verify-full&sslrootcert={certs.ca_cert}"
            )
            yield dsn, certs.ca_cert, other.ca_cert
        finally:
            subprocess.run(
                as_postgres(str(BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"),
                capture_output=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_the_service_runs_over_verify_full_tls(
    tls_postgres: tuple[str, Path, Path], tmp_path: Path
) -> None:
    dsn, _, _ = tls_postgres
    settings = Settings.load(
        postgres_url=dsn,
        data_dir=tmp_path,
        master_key=MASTER_KEY,
        bootstrap_admin_token=ADMIN_TOKEN,
        nats_embedded=False,
        grpc_port=0,
    )
    async with Application(settings, start_nats=False) as core:
        tenant = await core.tenants.create(f"tls_{secrets.token_hex(3)}")
        result = await core.executor.execute(
            everything(), TenantContext(tenant.tenant_id), "SELECT 41 + 1"
        )
        assert result.rows == [(42,)]
        # The tenant's own login (its role, its password) went over TLS 1.2 or later, as did
        # the owner's; the tenant cannot read pg_stat_ssl itself (the guard refuses it).
        logins = await core.owner_pool.fetch(
            "SELECT a.usename, s.ssl, s.version FROM pg_stat_ssl s"
            " JOIN pg_stat_activity a USING (pid) WHERE a.usename IN ($1, current_user)",
            tenant.role_name,
        )
        assert {r["usename"] for r in logins} == {tenant.role_name, "dbsvc_owner"}
        assert all(r["ssl"] and r["version"] in {"TLSv1.2", "TLSv1.3"} for r in logins), logins
        owner = await core.owner_pool.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        assert owner is True


async def test_a_server_certificate_from_another_ca_is_refused(
    tls_postgres: tuple[str, Path, Path],
) -> None:
    dsn, ca, other = tls_postgres
    with pytest.raises((ssl.SSLError, asyncpg.PostgresError, OSError)):
        await asyncpg.connect(dsn.replace(str(ca), str(other)), timeout=10)


async def test_plaintext_logins_are_refused(tls_postgres: tuple[str, Path, Path]) -> None:
    dsn, ca, _ = tls_postgres
    plain = dsn.replace(f"sslmode=verify-full&sslrootcert={ca}", "sslmode=disable")
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(plain, timeout=10)
