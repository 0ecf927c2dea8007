"""chDB in a process of its own, shared by every serving process of the instance.

Why its own process: chDB opens a data path in one process only (a second process gets
``Error initializing EmbeddedServer``, seen here), and the service runs several serving processes
(``DBSVC_WORKERS``); its library also costs ~350 MB of RSS, paid once here instead of once per
worker. Not for the GIL: a chDB query releases it (measured: a Python thread beside a query kept
98 % of its solo speed), so in-process would have served one worker well.

Protocol: a Unix socket ``<path>/host.sock``; each message a 4-byte big-endian length and a JSON
object. Requests ``{"op": "query"|"command"|"insert"|"version", …}``; answers ``{"ok": true,
"result": …}`` or ``{"ok": false, "message": …, "code": …}``.

Lifetime: the first serving process that needs ClickHouse and finds no host starts one
(``ChdbProcessStore``); the host takes an exclusive lock on ``<path>/host.lock`` (a second host
started in a race exits at once) and exits once it has had no client for ``idle_exit`` seconds
(every serving process keeps a connection open while it runs), so it never outlives the service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from database_service.stores.clickhouse import ClickHouseError, QueryResult

__all__ = ["ChdbProcessStore", "serve"]

_HEADER = struct.Struct(">I")
_MAX_MESSAGE = 1 << 30


async def _read(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > _MAX_MESSAGE:
        raise ValueError("message too large")
    return json.loads(await reader.readexactly(size))


def _frame(message: Any) -> bytes:
    body = json.dumps(message, default=str, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


def _lock(path: Path) -> Any:
    """The host's lock on ``path`` (held for the process's life), or None: another host has it."""
    path.mkdir(parents=True, exist_ok=True)
    lock = open(path / "host.lock", "w")  # noqa: SIM115 — held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


async def serve(path: Path, *, idle_exit: float = 10.0) -> None:
    from database_service.stores.clickhouse.embedded import ChdbStore  # noqa: PLC0415

    lock = _lock(path)  # before anything else runs on this loop: blocking is harmless
    if lock is None:
        return  # another host serves this path
    store = ChdbStore(path / "data")
    # One-part names the analytics guard leaves alone (a CTE's, out of its scope) resolve in the
    # session's default database: an empty one, set here so a restarted host has it too.
    await store.command("CREATE DATABASE IF NOT EXISTS dbsvc_empty")
    await store.command("USE dbsvc_empty")
    socket_path = path / "host.sock"
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    clients = 0
    last_client = time.monotonic()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal clients, last_client
        clients += 1
        try:
            while True:
                try:
                    request = await _read(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                writer.write(_frame(await _answer(store, request)))
                await writer.drain()
        finally:
            clients -= 1
            last_client = time.monotonic()
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(socket_path))
    os.chmod(socket_path, 0o600)
    try:
        # Polled: the condition is a duration without clients, not an event.
        while clients or time.monotonic() - last_client < idle_exit:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        await store.close()


async def _answer(store: Any, request: Mapping[str, Any]) -> dict[str, Any]:
    try:
        op = request["op"]
        if op == "query":
            r = await store.query(request["sql"], request.get("settings"))
            result: Any = {
                "columns": r.columns,
                "types": r.types,
                "rows": r.rows,
                "rows_read": r.rows_read,
                "bytes_read": r.bytes_read,
                "elapsed_s": r.elapsed_s,
            }
        elif op == "command":
            await store.command(request["sql"])
            result = None
        elif op == "insert":
            await store.insert_json(request["table"], request["lines"], request["token"])
            result = None
        elif op == "version":
            result = await store.version()
        else:
            return {"ok": False, "message": f"unknown op {op!r}", "code": None}
    except ClickHouseError as exc:
        return {"ok": False, "message": str(exc), "code": exc.code}
    except Exception as exc:  # a bad request: answered, the host stays up for the others
        return {"ok": False, "message": f"{type(exc).__name__}: {exc}", "code": None}
    return {"ok": True, "result": result}


class ChdbProcessStore:
    """The ``ClickHouseStore`` of a serving process: chDB's host process over its socket."""

    kind = "chdb"

    def __init__(
        self,
        path: Path,
        *,
        connections: int = 4,
        start_timeout: float = 60.0,
        idle_exit: float = 10.0,
    ) -> None:
        self.path = path
        self._idle_exit = idle_exit
        self._socket = path / "host.sock"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(connections)
        self._start_timeout = start_timeout
        self._started: subprocess.Popen[bytes] | None = None
        self._keepalive: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        deadline = time.monotonic() + self._start_timeout
        while True:
            try:
                return await asyncio.open_unix_connection(str(self._socket))
            except (FileNotFoundError, ConnectionRefusedError):
                if self._started is None or self._started.poll() is not None:
                    self._start_host()
                if time.monotonic() > deadline:
                    raise ClickHouseError("the chDB host process did not start") from None
                await asyncio.sleep(0.1)

    def _start_host(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        log = open(self.path / "host.log", "ab")  # noqa: SIM115 — the child's stderr
        self._started = subprocess.Popen(
            [
                *(sys.executable, "-m", "database_service.stores.clickhouse.host"),
                *(str(self.path), "--idle-exit", str(self._idle_exit)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a signal to this worker's group must not stop it
        )
        log.close()

    async def start(self) -> None:
        """Connect (starting the host if needed) and keep one connection open: the host lives
        while some serving process holds one."""
        if self._keepalive is None:
            _, self._keepalive = await self._connect()

    async def _call(self, request: dict[str, Any]) -> Any:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            reader, writer = conn
            try:
                writer.write(_frame(request))
                await writer.drain()
                answer = await _read(reader)
            except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
                writer.close()
                raise ClickHouseError(f"the chDB host process went away: {exc}") from None
            except BaseException:
                writer.close()  # cancelled mid-answer: the connection's state is unknown
                raise
            self._idle.append(conn)
        if not answer["ok"]:
            raise ClickHouseError(answer["message"], answer.get("code"))
        return answer["result"]

    async def query(self, sql: str, settings: Mapping[str, Any] | None = None) -> QueryResult:
        from decimal import Decimal  # noqa: PLC0415

        r = await self._call({"op": "query", "sql": sql, "settings": dict(settings or {})})
        # Decimals crossed the socket as JSON numbers (the host wrote them with str()).
        return QueryResult(
            columns=r["columns"],
            types=r["types"],
            rows=_decimals(r["rows"], r["types"], Decimal),
            rows_read=r["rows_read"],
            bytes_read=r["bytes_read"],
            elapsed_s=r["elapsed_s"],
        )

    async def command(self, sql: str) -> None:
        await self._call({"op": "command", "sql": sql})

    async def insert_json(self, table: str, lines: Sequence[str], dedup_token: str) -> None:
        await self._call(
            {"op": "insert", "table": table, "lines": list(lines), "token": dedup_token}
        )

    async def version(self) -> str:
        return str(await self._call({"op": "version"}))

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
        if self._keepalive is not None:
            self._keepalive.close()
            self._keepalive = None


def _decimals(rows: list[list[Any]], types: list[str], decimal: Any) -> list[list[Any]]:
    exact = [i for i, t in enumerate(types) if "Decimal" in t]
    if not exact:
        return rows
    for row in rows:
        for i in exact:
            if row[i] is not None:
                row[i] = decimal(str(row[i]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="chDB host process (started by the service)")
    parser.add_argument("path", type=Path)
    parser.add_argument("--idle-exit", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(serve(args.path, idle_exit=args.idle_exit))


if __name__ == "__main__":
    main()
