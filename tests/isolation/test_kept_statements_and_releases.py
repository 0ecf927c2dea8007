"""What the query core keeps between requests and what it does after answering never crosses
tenants or users, through every front end.

- A kept statement's shape (its parameter types and result columns, worked out once per
  statement: ``query.boundary.StatementShapes``) belongs to the connection that prepared it,
  so to one tenant's login: the same text over two tenants' tables of different shapes answers
  each with its own columns, interleaved, and a table changed by one tenant changes nothing
  for the other.
- A connection whose session needs a reset goes back to the pool after the answer: a user id
  entered for one request is not seen by the next request, sent at once.
- A connection whose session needs no reset (a read that changed nothing) is kept for its
  login's next request, so for its own tenant only: two tenants' reads at once each see their
  own role, every time.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.tenancy import TenantRecord
from tests.isolation.fix_frontends import FrontEnd

pytestmark = pytest.mark.usefixtures("unchanged_victim")

TABLE = "shape_probe"
SELECT = f"SELECT * FROM {TABLE} ORDER BY id"
SCOPES = (Scope.READ, Scope.WRITE, Scope.ADMIN)


async def _table(door: FrontEnd, columns: str, row: str) -> None:
    """The tenant's own table (made by its own DDL, so it may change it)."""
    for sql in (
        f"DROP TABLE IF EXISTS {TABLE}",
        f"CREATE TABLE {TABLE} ({columns})",
        f"INSERT INTO {TABLE} VALUES {row}",
    ):
        done = await door.run(sql)
        assert done.ok, done


@pytest.fixture(scope="module")
async def other(core: Application) -> TenantRecord:
    """A second attacker-side tenant (not the victim: its rows are not secret)."""
    return await core.tenants.create(f"shapes_{secrets.token_hex(3)}")


@pytest.fixture
async def doors(
    core: Application, other: TenantRecord, front_end: FrontEnd
) -> AsyncIterator[tuple[FrontEnd, FrontEnd]]:
    second = await front_end.for_tenant(core, other.tenant_id, SCOPES)
    await _table(front_end, "id int PRIMARY KEY, v text", "(1, 'a')")
    await _table(second, "id int PRIMARY KEY, v text, extra text", "(1, 'c', 'cx')")
    yield front_end, second
    await second.close()


async def test_the_same_text_answers_each_tenant_with_its_own_columns(
    doors: tuple[FrontEnd, FrontEnd],
) -> None:
    a, c = doors
    for _ in range(8):  # over several pooled connections, the two tenants at once
        mine, theirs = await asyncio.gather(a.run(SELECT), c.run(SELECT))
        assert mine.ok and mine.rows == [[1, "a"]], mine
        assert theirs.ok and theirs.rows == [[1, "c", "cx"]], theirs


async def test_a_table_one_tenant_changes_changes_nothing_for_the_other(
    doors: tuple[FrontEnd, FrontEnd],
) -> None:
    a, c = doors
    for door in (a, c, a, c):  # both kept on the service's connections first
        assert (await door.run(SELECT)).ok
    altered = await a.run(f"ALTER TABLE {TABLE} ADD COLUMN w text DEFAULT 'new'")
    assert altered.ok, altered
    for _ in range(4):
        mine = await a.run(SELECT)
        assert mine.ok and mine.rows == [[1, "a", "new"]], mine
        theirs = await c.run(SELECT)
        assert theirs.ok and theirs.rows == [[1, "c", "cx"]], theirs


async def test_a_user_id_is_gone_before_the_next_request_gets_the_connection(
    front_end: FrontEnd,
) -> None:
    shown = "SELECT coalesce(current_setting('dbsvc.user_id', true), '')"
    for _ in range(5):
        as_user = await front_end.run(shown, user_id="u1")
        assert as_user.ok and as_user.rows == [["u1"]], as_user
        # At once: the connection's release (and its reset) may still be under way.
        company = await front_end.run(shown)
        assert company.ok and company.rows == [[""]], company


async def test_a_kept_connection_serves_only_its_own_tenant(
    doors: tuple[FrontEnd, FrontEnd],
) -> None:
    a, c = doors
    who = "SELECT current_user"
    mine: set[str] = set()
    theirs: set[str] = set()
    for _ in range(6):  # reads that change nothing: their connections are kept, both at once
        first, second = await asyncio.gather(a.run(who), c.run(who))
        assert first.ok and second.ok, (first, second)
        mine.add(first.rows[0][0])
        theirs.add(second.rows[0][0])
        row = await a.run(SELECT)  # at once, on the connection just kept
        assert row.ok and row.rows == [[1, "a"]], row
    assert len(mine) == 1 and len(theirs) == 1 and not mine & theirs
