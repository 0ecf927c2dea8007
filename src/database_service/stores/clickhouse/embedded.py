"""chDB: the ClickHouse engine in this process (the embedded default).

Every call runs on a worker thread (``asyncio.to_thread``): chDB releases the GIL while the engine
works, so the event loop keeps serving. chDB has no access control (``CREATE USER`` is refused and
table functions read local files even under ``readonly``), so nothing reaches ``query`` that the
analytics guard (``database_service.analytics.guard``) has not allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from database_service.stores.clickhouse import ClickHouseError, QueryResult

__all__ = ["ChdbStore"]

_CODE = re.compile(r"Code: (\d+)\.")
_SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
# Numbers as JSON numbers (ClickHouse quotes 64-bit integers by default, for JavaScript).
_OUTPUT = {"output_format_json_quote_64bit_integers": 0, "output_format_json_quote_decimals": 0}


def _error(exc: Exception) -> ClickHouseError:
    text = str(exc)
    m = _CODE.search(text)
    return ClickHouseError(text.split("\n", 1)[0][:2000], int(m.group(1)) if m else None)


def settings_clause(settings: Mapping[str, Any] | None) -> str:
    """`` SETTINGS a = 1, b = 'x'`` from names and values the service chose (never a caller's)."""
    if not settings:
        return ""
    parts = []
    for name, value in settings.items():
        if not _SETTING_NAME.fullmatch(name):
            raise ValueError(f"bad setting name {name!r}")
        if isinstance(value, bool):
            parts.append(f"{name} = {int(value)}")
        elif isinstance(value, int | float):
            parts.append(f"{name} = {value}")
        else:
            parts.append(f"{name} = {string_literal(str(value))}")
    return " SETTINGS " + ", ".join(parts)


def string_literal(text: str) -> str:
    """A ClickHouse string literal: backslash and quote escaped, so the text stays one value."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class ChdbStore:
    kind = "chdb"

    def __init__(self, path: Path) -> None:
        from chdb import session  # noqa: PLC0415 — imported here: ~350 MB of shared library, only when enabled

        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._session = session.Session(str(path))  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()

    def _run(self, sql: str, fmt: str) -> Any:
        # One statement at a time, and a failed one followed by an empty query: chDB 26.9 keeps
        # the output a failed query had written (its header) and hands it to the *next* query
        # of the session, ahead of that query's own result (seen here: a limit error, then a
        # JSONCompact result with two documents). Serialised, the next query is our flush.
        with self._lock:
            try:
                return self._session.query(sql, fmt)  # type: ignore[no-untyped-call]
            except Exception as exc:  # chdb raises ChdbError/RuntimeError with ClickHouse's text
                with contextlib.suppress(Exception):
                    self._session.query("SELECT 1", "Null")  # type: ignore[no-untyped-call]
                raise _error(exc) from None

    def _query_sync(self, sql: str, settings: Mapping[str, Any] | None) -> QueryResult:
        # The settings are appended as the outermost SETTINGS clause; the guard refuses any
        # SETTINGS of the caller's, so these are the only ones in force.
        result = self._run(sql + settings_clause({**_OUTPUT, **(settings or {})}), "JSONCompact")
        raw = result.bytes()
        if not raw:
            return QueryResult([], [], [])
        doc = json.loads(raw, parse_float=Decimal)  # exact, as asyncpg gives numeric
        meta = doc.get("meta", [])
        return QueryResult(
            columns=[m["name"] for m in meta],
            types=[m["type"] for m in meta],
            rows=doc.get("data", []),
            rows_read=int(result.rows_read()),
            bytes_read=int(result.bytes_read()),
            elapsed_s=float(result.elapsed()),
            statistics=doc.get("statistics", {}),
        )

    async def query(self, sql: str, settings: Mapping[str, Any] | None = None) -> QueryResult:
        return await asyncio.to_thread(self._query_sync, sql, settings)

    async def command(self, sql: str) -> None:
        await asyncio.to_thread(self._run, sql, "TSV")

    def _insert_sync(self, table: str, lines: Sequence[str], token: str) -> None:
        if not lines:
            return
        body = "\n".join(lines)
        self._run(
            f"INSERT INTO {table} SETTINGS insert_deduplication_token = {string_literal(token)}, "
            "date_time_input_format = 'best_effort', input_format_skip_unknown_fields = 1 "
            f"FORMAT JSONEachRow\n{body}",
            "TSV",
        )

    async def insert_json(self, table: str, lines: Sequence[str], dedup_token: str) -> None:
        await asyncio.to_thread(self._insert_sync, table, lines, dedup_token)

    async def version(self) -> str:
        result = await self.query("SELECT version()")
        return str(result.rows[0][0])

    async def close(self) -> None:
        def _close() -> None:
            # Closing twice, or chDB already torn down at exit: nothing left to release.
            with contextlib.suppress(Exception):
                self._session.close()  # type: ignore[no-untyped-call]

        await asyncio.to_thread(_close)
