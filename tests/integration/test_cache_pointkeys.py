"""Point reads and keyed writes name a row the way PostgreSQL's triggers do: the service's
``row_name`` for a key equals the name in the trigger's notification, for every key type that
takes part (text, varchar, the integers, uuid, composite keys), whatever the values hold."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from database_service.query.pointkeys import key_text, keyed_write, point_read, row_name
from database_service.tenancy import TenantRecord, quote_ident
from tests.fix_pg import PgCluster
from tests.fix_service import TenantFactory


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("pkeys")


@pytest.fixture
async def owner(pg_cluster: PgCluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_cluster.dsn)
    yield conn
    await conn.close()


@pytest.mark.parametrize(
    ("columns", "key", "values"),
    [
        ("id int PRIMARY KEY", [("id", "integer")], [-42]),
        ("id bigint PRIMARY KEY", [("id", "bigint")], [2**62]),
        ("id smallint PRIMARY KEY", [("id", "smallint")], [7]),
        ("k text PRIMARY KEY", [("k", "text")], ["naïve|é\x1f:*{}\n' \"x"]),
        ("k varchar(40) PRIMARY KEY", [("k", "character varying")], ["Ω-7"]),
        ("u uuid PRIMARY KEY", [("u", "uuid")], [str(uuid.uuid4()).upper()]),
        (
            "a text, b int, PRIMARY KEY (a, b)",
            [("a", "text"), ("b", "integer")],
            ["left\x1fright", 3],
        ),
    ],
)
async def test_the_service_names_a_row_as_the_trigger_does(
    owner: asyncpg.Connection,
    tenant: TenantRecord,
    columns: str,
    key: list[tuple[str, str]],
    values: list[Any],
) -> None:
    schema = tenant.schema_name
    table = f"{quote_ident(schema)}.keyed"
    await owner.execute(f"CREATE TABLE {table} ({columns})")  # watched by the event trigger
    heard: asyncio.Queue[str] = asyncio.Queue()
    await owner.add_listener("dbsvc_invalidate", lambda *args: heard.put_nowait(args[3]))
    names = ", ".join(c for c, _ in key)
    marks = ", ".join(f"${i}" for i in range(1, len(key) + 1))
    sql = f"INSERT INTO keyed ({names}) VALUES ({marks})"
    await owner.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", *values)
    payloads = set()
    while len(payloads) < 2:
        payloads.add(await asyncio.wait_for(heard.get(), 5))
    rows = {p.split("|")[1] for p in payloads}
    write = keyed_write(sql)
    assert write is not None
    text = key_text(key, write.rows[0], values)
    assert text is not None
    assert rows == {f"{schema}.keyed", row_name(f"{schema}.keyed", text)}
    # A point read of that key names the same row.
    where = " AND ".join(f"{c} = ${i}" for i, (c, _) in enumerate(key, start=1))
    read = point_read(f"SELECT * FROM keyed WHERE {where}")
    assert read is not None
    assert key_text(key, read.equal, values) == text
