"""Names a package exports but loads on first use (PEP 562's module ``__getattr__``).

Some modules are expensive to import (nats-py and aiokafka take about a second, pgserver
more): a package lists where each such name lives, and a process that never touches one never
pays for it (an admin command does not start a consumer)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``where`` maps a name to the submodule that
    defines it. The name is imported on first access and kept in the package's namespace."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
