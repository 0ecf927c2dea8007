"""ClickHouse, the analytics store (issue 12): one small ``Protocol`` and its two implementations.

- ``embedded.ChdbStore``: chDB, the ClickHouse engine in this process, data under
  ``<data_dir>/clickhouse``. Measured here (chdb 4.4 / chdb-core 26.9, 2 cores): a query releases
  the GIL (a Python thread spinning beside a 0.15 s single-threaded aggregation kept 98 % of its
  solo rate), so it runs on a worker thread of the serving process, not in a process of its own;
  importing chDB costs ~350 MB of RSS (its shared library), once per process that opens it.
- ``server.ClickHouseServerStore``: a ClickHouse server by URL (``DBSVC_CLICKHOUSE_URL``) through
  clickhouse-connect (HTTP). Untested against a server here: no modern server installs on these
  machines.

Both take SQL text and return rows; the analytics layer above (``database_service.analytics``)
decides what SQL they ever see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["ClickHouseError", "ClickHouseStore", "QueryResult"]


class ClickHouseError(Exception):
    """ClickHouse refused or failed a statement; ``code`` is ClickHouse's error code when known."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    rows_read: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    statistics: dict[str, Any] = field(default_factory=dict)


class ClickHouseStore(Protocol):
    """What the analytics layer needs from ClickHouse, whichever engine answers."""

    kind: str  # "chdb" or "server"

    async def query(self, sql: str, settings: Mapping[str, Any] | None = None) -> QueryResult:
        """Run one SELECT (or EXPLAIN/SHOW the layer above chose) and return its rows."""
        ...

    async def command(self, sql: str) -> None:
        """Run one statement that returns nothing (DDL, ALTER … DELETE)."""
        ...

    async def insert_json(self, table: str, lines: Sequence[str], dedup_token: str) -> None:
        """Insert ``lines`` (JSONEachRow: one JSON object a line) into ``table`` as one block.

        ``dedup_token`` is ClickHouse's ``insert_deduplication_token``: the same token inserted
        again (a replayed batch) is dropped by the engine, so a replay never doubles a row.
        """
        ...

    async def version(self) -> str: ...

    async def close(self) -> None: ...
