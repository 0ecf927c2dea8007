"""Database Service: a multi-tenant database gateway with isolation enforced by PostgreSQL."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("database-service")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["__version__"]
