"""The port's admin view, like PgBouncer's ``SHOW POOLS / CLIENTS / SERVERS / STATS``.

Served on the port itself: a client logging in to the database ``dbsvc-admin`` (a name no
tenant can have: tenant ids have no hyphen) with a service that holds the ``admin`` scope
gets a session that answers only those four statements (simple protocol), as text rows. A
platform admin (tenants ``*``) sees every tenant, a tenant admin only its own tenants'
rows. Nothing here reaches PostgreSQL: the figures are the port's own.
With several workers each answers with every worker's rows: its own, and the others' from
their last snapshots (``peers``, about a second old); the last column names the worker.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from database_service.pgwire import codec

if TYPE_CHECKING:
    from database_service.pgwire.server import PgWireServer

__all__ = ["ADMIN_DATABASE", "SHOW_KINDS", "answer", "peer_rows", "show", "tenant_of"]

ADMIN_DATABASE = "dbsvc-admin"
SHOW_KINDS = ("pools", "clients", "servers", "stats")
_SHOW = re.compile(r"^\s*show\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_TEXT_OID = 25

Table = tuple[list[str], list[list[object]]]


def tenant_of(row: Mapping[str, Any]) -> str:
    """The tenant a row of the view (as a document) is about."""
    return str(row.get("database") or row.get("tenant_id") or "")


def peer_rows(
    peers: Iterable[Mapping[str, Any]], kind: str, visible: Callable[[str], bool]
) -> list[dict[str, Any]]:
    """The other workers' rows of one view (their snapshots' documents), filtered by tenant."""
    rows: list[dict[str, Any]] = []
    for document in peers:
        found = document.get(kind)
        if isinstance(found, list):
            rows.extend(r for r in found if isinstance(r, dict) and visible(tenant_of(r)))
    return rows


def show(port: PgWireServer, kind: str, visible: Callable[[str], bool]) -> Table:
    """(columns, rows) of one view of this worker; ``visible(tenant_id)`` filters the rows by
    tenant. The last column is the worker's index."""
    columns, rows = _show(port, kind, visible)
    return [*columns, "worker"], [[*row, port.worker] for row in rows]


def _show(port: PgWireServer, kind: str, visible: Callable[[str], bool]) -> Table:
    # What the relay holds: (pool, connection, pid of the session running on it or None, idle s).
    held = port.relay.held() if port.relay is not None and kind != "stats" else []
    if kind == "pools":
        clients: dict[int, int] = {}
        for session in port.sessions.values():
            if session.server_pool is not None:
                clients[id(session.server_pool)] = clients.get(id(session.server_pool), 0) + 1
        for lender, _, pid, _ in held:
            if pid is not None:
                clients[id(lender)] = clients.get(id(lender), 0) + 1
        pools = [
            [p.login.tenant_id, p.login.role, clients.get(id(p), 0), len(p.waiters),
             p.open - len(p.idle), len(p.idle), p.max_size, "transaction"]
            for p in port.pools.all()
        ]  # fmt: skip
        columns = ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle",
                   "pool_size", "pool_mode"]  # fmt: skip
        return columns, [row for row in pools if visible(str(row[0]))]
    if kind == "clients":
        columns = ["type", "user", "database", "user_id", "state", "tls", "connect_time",
                   "pid", "server_pid"]  # fmt: skip
        rows: list[list[object]] = []
        # A session whose statement the relay runs now: active, on that server connection.
        running = {pid: server for _, server, pid, _ in held if pid is not None}
        for s in port.sessions.values():
            if s.tenant is None or not visible(s.tenant.tenant_id):
                continue
            on = s.server or running.get(s.pid)
            rows.append(
                ["C", s.principal.service if s.principal else None, s.tenant.tenant_id,
                 s.user_id, "active" if on else "idle", s.tls,
                 s.connected_at, s.pid, on.pid if on else None]
            )  # fmt: skip
        return columns, rows
    if kind == "servers":
        # age_seconds: since it was opened; idle_seconds: since it last went idle (an idle one
        # closes past DBSVC_PGWIRE_SERVER_IDLE_SECONDS, any past _LIFETIME_SECONDS of age).
        columns = ["type", "user", "database", "state", "pid", "prepared", "client",
                   "age_seconds", "idle_seconds"]  # fmt: skip
        rows = []
        now = time.monotonic()
        for session in port.sessions.values():
            server, pool = session.server, session.server_pool
            if server is None or pool is None or not visible(pool.login.tenant_id):
                continue
            client = session.principal.service if session.principal else None
            rows.append(["S", pool.login.role, pool.login.tenant_id, "active", server.pid,
                         len(server.prepared), client, round(now - server.opened, 1),
                         0.0])  # fmt: skip
        for lender, lent, pid, idle in held:  # the relay's: a session's statement, or idle
            if not visible(lender.login.tenant_id):
                continue
            owner = port.sessions.get(pid) if pid is not None else None
            client = owner.principal.service if owner and owner.principal else None
            rows.append(["S", lender.login.role, lender.login.tenant_id,
                         "active" if pid is not None else "idle", lent.pid,
                         len(lent.prepared), client, round(now - lent.opened, 1),
                         round(idle, 1)])  # fmt: skip
        for pool in port.pools.all():
            if not visible(pool.login.tenant_id):
                continue
            for server in pool.idle:
                rows.append(["S", pool.login.role, pool.login.tenant_id, "idle", server.pid,
                             len(server.prepared), None, round(now - server.opened, 1),
                             round(now - server.idle_since, 1)])  # fmt: skip
        return columns, rows
    if kind == "stats":
        columns = ["database", "user", "total_xact_count", "total_query_count",
                   "total_wait_time_us", "total_wait_count"]  # fmt: skip
        rows = [
            [p.login.tenant_id, p.login.role, p.transactions, p.queries,
             int(p.wait_seconds * 1_000_000), p.waits]
            for p in port.pools.all()
            if visible(p.login.tenant_id)
        ]  # fmt: skip
        return columns, rows
    raise KeyError(kind)


def answer(
    port: PgWireServer,
    sql: str,
    visible: Callable[[str], bool],
    peers: Iterable[Mapping[str, Any]] = (),
) -> bytes:
    """The admin session's answer to one Query: the view's rows (this worker's, then the
    other workers' from ``peers``), or an error (no ReadyForQuery)."""
    match = _SHOW.match(sql)
    kind = match.group(1).lower() if match else ""
    if kind not in SHOW_KINDS:
        return codec.error_response(
            "0A000",
            "the admin database answers only SHOW POOLS, SHOW CLIENTS, SHOW SERVERS and SHOW STATS",
            R="dbsvc:invalid_request",
        )
    columns, rows = show(port, kind, visible)
    out = bytearray(row_description(columns))
    for row in rows:
        out += data_row(row)
    for document in peer_rows(peers, kind, visible):
        out += data_row([document.get(column) for column in columns])
    out += codec.message(b"C", codec.cstring("SHOW"))
    return bytes(out)


def row_description(columns: Sequence[str]) -> bytes:
    body = struct.pack("!H", len(columns))
    for name in columns:
        body += codec.cstring(name) + struct.pack("!IhIhih", 0, 0, _TEXT_OID, -1, -1, 0)
    return codec.message(b"T", body)


def data_row(values: Sequence[object]) -> bytes:
    body = struct.pack("!H", len(values))
    for value in values:
        if value is None:
            body += struct.pack("!i", -1)
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        encoded = text.encode()
        body += struct.pack("!i", len(encoded)) + encoded
    return codec.message(b"D", body)
