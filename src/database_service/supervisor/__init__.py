"""Child servers the service starts itself when no external ones are configured, and the locks
and port checks that keep one instance per data directory.

Names load on first use: the command line checks locks and ports (cheap) before it pays for
pgserver's imports, and commands that start no server never pay for them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from database_service.supervisor.lock import AlreadyRunning, InstanceLock, UsageLock
    from database_service.supervisor.nats import EmbeddedNats
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
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
