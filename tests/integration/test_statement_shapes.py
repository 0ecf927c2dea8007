"""The query core describes a kept statement once (its parameter types and result columns),
not on every execution, and describes it again once PostgreSQL's answer to it changed shape."""

import secrets

import asyncpg

from database_service.query.boundary import StatementShapes
from database_service.results import ValueKind
from tests.fix_pg import PgCluster


async def test_a_kept_statement_is_described_once_and_again_after_its_table_changes(
    pg_cluster: PgCluster,
) -> None:
    table = f"shapes_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(pg_cluster.dsn)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, px numeric)")
        shapes = StatementShapes(max_entries=4)
        sql = f"SELECT * FROM {table} WHERE id = $1"

        kept = await conn._prepare(sql, use_cache=True)
        types, columns = first = shapes.of(kept)
        assert [t.name for t in types] == ["int4"]
        assert [(c.name, c.type_name, c.kind) for c in columns] == [
            ("id", "int4", ValueKind.INTEGER),
            ("px", "numeric", ValueKind.DECIMAL),
        ]
        again = await conn._prepare(sql, use_cache=True)
        assert shapes.of(again) is first  # the same kept statement: not described again

        await conn.execute(f"ALTER TABLE {table} ADD COLUMN venue text")
        conn._drop_local_statement_cache()  # what follow_schema does after DDL
        changed = await conn._prepare(sql, use_cache=True)
        assert [c.name for c in shapes.of(changed)[1]] == ["id", "px", "venue"]
    finally:
        await conn.close()


async def test_shapes_are_bounded(pg_cluster: PgCluster) -> None:
    conn = await asyncpg.connect(pg_cluster.dsn)
    try:
        shapes = StatementShapes(max_entries=3)
        for n in range(10):
            shapes.of(await conn._prepare(f"SELECT {n} AS n", use_cache=True))
        assert len(shapes._shapes) == 3
    finally:
        await conn.close()
