"""A ClickHouse server by URL (production), through clickhouse-connect over HTTP.

There the engine enforces isolation: each tenant gets a ClickHouse user that may read only its
own database of views, with row policies on the shared tables as a second wall
(``tenant_access_ddl``). The embedded chDB has no users, so there the analytics guard is the wall.

Untested against a server on these machines (no modern ClickHouse server installs here; Debian's
is a 2018 build): the DDL below is unit-tested as SQL text only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from database_service.stores.clickhouse import ClickHouseError, QueryResult

__all__ = [
    "ClickHouseServerStore",
    "password_sha256_hex",
    "service_policy_ddl",
    "tenant_access_ddl",
    "tenant_drop_ddl",
    "tenant_password",
    "tenant_user",
]

_IDENT = re.compile(r"^[a-z][a-z0-9_]*$")


def _ident(name: str) -> str:
    # Every name here is built from a validated tenant id; checked again because it is written
    # into DDL.
    if not _IDENT.fullmatch(name):
        raise ValueError(f"bad ClickHouse identifier {name!r}")
    return f"`{name}`"


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def tenant_user(tenant_id: str) -> str:
    """The ClickHouse user of a tenant (a validated id: letters, digits, '_')."""
    return f"tenant_{tenant_id}"


def tenant_password(key: bytes, tenant_id: str) -> str:
    """The tenant's ClickHouse password: derived from the service's master key (``key`` is
    ``derive_key(master_key, "clickhouse-tenant")``), so every instance computes the same one and
    nothing is stored; the server keeps only its SHA-256 (``tenant_access_ddl``). Another
    tenant's password cannot be derived without the master key."""
    digest = hmac.new(key, tenant_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def password_sha256_hex(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def tenant_access_ddl(
    tenant_id: str,
    *,
    database: str,
    shared_database: str,
    shared_tables: Sequence[str],
    password_sha256_hex: str,
    limits: Mapping[str, int | float | str],
    engines: Sequence[str] = (),
) -> list[str]:
    """The statements that give ``tenant_id`` its own ClickHouse user.

    - a settings profile pinning the per-query limits (``CONST``: the user cannot change them)
      and introspection off;
    - the user, with that profile and its database as default; on that database only:
      ``SELECT`` (its views, which are ``SQL SECURITY DEFINER``: reading one needs no grant on
      the shared tables behind it, and its own tables), ``INSERT``, ``CREATE TABLE`` and ``DROP
      TABLE`` (its own tables; ``DROP VIEW`` is another privilege, so its views stay), and the
      ``TABLE ENGINE`` grants of ``engines`` (the MergeTree family: a server that requires
      engine grants refuses File, URL, S3, … to it as the guard does); nothing on any other
      database;
    - a permissive row policy per shared table that shows the user its ``company_id`` only: a
      grant on a shared table given by mistake still shows it nothing else. Once a table has row
      policies, a user none names sees no row of it, so the service's own user has one too
      (``service_policy_ddl``).
    """
    user = _ident(tenant_user(tenant_id))
    profile = _ident(f"tenant_{tenant_id}_limits")
    db = _ident(database)
    shared = _ident(shared_database)
    constraints = [f"{_ident(k)} = {_setting(v)} CONST" for k, v in sorted(limits.items())] + [
        "allow_introspection_functions = 0 CONST"
    ]
    statements = [
        f"CREATE SETTINGS PROFILE OR REPLACE {profile} SETTINGS {', '.join(constraints)}",
        f"CREATE USER OR REPLACE {user} IDENTIFIED WITH sha256_hash BY "
        f"{_literal(password_sha256_hex)} DEFAULT DATABASE {db} SETTINGS PROFILE {profile}",
        f"REVOKE ALL ON *.* FROM {user}",
        f"GRANT SELECT, INSERT, CREATE TABLE, DROP TABLE ON {db}.* TO {user}",
    ]
    statements += [f"GRANT TABLE ENGINE ON {_engine(e)} TO {user}" for e in engines]
    for table in shared_tables:
        statements.append(
            f"CREATE ROW POLICY OR REPLACE {_ident(f'tenant_{tenant_id}_rows')} ON "
            f"{shared}.{_ident(table)} USING company_id = {_literal(tenant_id)} AS PERMISSIVE"
            f" TO {user}"
        )
    return statements


def _setting(value: int | float | str) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int | float):
        return repr(value)
    return _literal(value)


def _engine(name: str) -> str:
    if not re.fullmatch(
        r"(Replacing|Summing|Aggregating|Collapsing|VersionedCollapsing)?MergeTree", name
    ):
        raise ValueError(f"not a MergeTree family engine: {name!r}")
    return name


def service_policy_ddl(
    service_user: str, *, shared_database: str, shared_tables: Sequence[str]
) -> list[str]:
    """The service's own user reads every row of the shared tables (it replicates into them
    and defines the tenants' views)."""
    return [
        f"CREATE ROW POLICY OR REPLACE `dbsvc_service_rows` ON {_ident(shared_database)}."
        f"{_ident(table)} USING 1 AS PERMISSIVE TO {_ident(service_user)}"
        for table in shared_tables
    ]


def tenant_drop_ddl(
    tenant_id: str, *, shared_tables: Sequence[str], shared_database: str
) -> list[str]:
    user = _ident(f"tenant_{tenant_id}")
    statements = [
        f"DROP ROW POLICY IF EXISTS {_ident(f'tenant_{tenant_id}_rows')} ON "
        f"{_ident(shared_database)}.{_ident(t)}"
        for t in shared_tables
    ]
    statements += [
        f"DROP USER IF EXISTS {user}",
        f"DROP SETTINGS PROFILE IF EXISTS {_ident(f'tenant_{tenant_id}_limits')}",
    ]
    return statements


class ClickHouseServerStore:
    kind = "server"

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None):
        parts = urlsplit(url)
        self._url = url
        self.username = username or parts.username or "default"
        self._password = (password or "") if username else (parts.password or "")
        self._args: dict[str, Any] = {
            "host": parts.hostname or "localhost",
            "port": parts.port or (8443 if parts.scheme == "https" else 8123),
            "secure": parts.scheme == "https",
            "database": (parts.path or "/").strip("/") or "default",
        }
        self._connected: Any = None  # clickhouse-connect's client, made on first use

    def as_user(self, username: str, password: str) -> ClickHouseServerStore:
        """The same server, logged in as ``username`` (a tenant's own user): what it runs,
        the server checks against that user's grants, row policies and settings profile."""
        return ClickHouseServerStore(self._url, username=username, password=password)

    @property
    def _client(self) -> Any:
        # Connected on first use (on a worker thread, as every call here): clickhouse-connect
        # asks the server for its version when the client is made.
        if self._connected is None:
            import clickhouse_connect  # noqa: PLC0415 (only when a server is configured)

            self._connected = clickhouse_connect.get_client(
                **self._args, username=self.username, password=self._password
            )
        return self._connected

    async def query(self, sql: str, settings: Mapping[str, Any] | None = None) -> QueryResult:
        def _run() -> QueryResult:
            try:
                r = self._client.query(sql, settings=dict(settings or {}))
            except Exception as exc:
                raise ClickHouseError(str(exc).split("\n", 1)[0][:2000]) from None
            return QueryResult(
                columns=list(r.column_names),
                types=[t.name for t in r.column_types],
                rows=[list(row) for row in r.result_rows],
                rows_read=int(r.summary.get("read_rows", 0) or 0),
                bytes_read=int(r.summary.get("read_bytes", 0) or 0),
            )

        return await asyncio.to_thread(_run)

    async def command(self, sql: str) -> None:
        def _run() -> None:
            try:
                self._client.command(sql)
            except Exception as exc:
                raise ClickHouseError(str(exc).split("\n", 1)[0][:2000]) from None

        await asyncio.to_thread(_run)

    async def insert_json(self, table: str, lines: Sequence[str], dedup_token: str) -> None:
        if not lines:
            return
        body = "\n".join(lines)

        def _run() -> None:
            try:
                self._client.raw_insert(
                    table,
                    insert_block=body.encode(),
                    settings={
                        "insert_deduplication_token": dedup_token,
                        "date_time_input_format": "best_effort",
                        "input_format_skip_unknown_fields": 1,
                    },
                    fmt="JSONEachRow",
                )
            except Exception as exc:
                raise ClickHouseError(str(exc).split("\n", 1)[0][:2000]) from None

        await asyncio.to_thread(_run)

    async def version(self) -> str:
        r = await self.query("SELECT version()")
        return str(r.rows[0][0])

    async def close(self) -> None:
        if self._connected is not None:
            await asyncio.to_thread(self._connected.close)
            self._connected = None
