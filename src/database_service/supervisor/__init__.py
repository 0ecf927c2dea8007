"""Child servers the service starts itself when no external ones are configured, and the locks
and port checks that keep one instance per data directory.

Names load on first use: the command line checks locks and ports (cheap) before it pays for
pgserver's imports, and commands that start no server never pay for them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from database_service.lazy import lazy_exports

if TYPE_CHECKING:
    from database_service.supervisor.lock import AlreadyRunning, InstanceLock, UsageLock
    from database_service.supervisor.nats import EmbeddedNats, stop_orphaned_nats
    from database_service.supervisor.ports import (
        PortInUse,
        StartupError,
        bind_tcp,
        check_port_free,
        free_port,
    )
    from database_service.supervisor.postgres import EmbeddedPostgres

__all__ = [
    "AlreadyRunning",
    "EmbeddedNats",
    "EmbeddedPostgres",
    "InstanceLock",
    "PortInUse",
    "StartupError",
    "UsageLock",
    "bind_tcp",
    "check_port_free",
    "free_port",
    "stop_orphaned_nats",
]

_WHERE = {
    "AlreadyRunning": "lock",
    "InstanceLock": "lock",
    "UsageLock": "lock",
    "EmbeddedNats": "nats",
    "EmbeddedPostgres": "postgres",
    "PortInUse": "ports",
    "StartupError": "ports",
    "bind_tcp": "ports",
    "check_port_free": "ports",
    "free_port": "ports",
    "stop_orphaned_nats": "nats",
}


__getattr__ = lazy_exports(__name__, _WHERE)
