"""The stores (and transports) the service knows, in one place.

Health reports every one of them — probed when this deployment configured it, ``not_configured``
otherwise — and clients learn from health which ones a deployment has. A new store is its
package under ``stores/`` (one small ``Protocol``, its embedded and production implementations),
a probe registered by the composition root, and its name here.
"""

from __future__ import annotations

__all__ = ["DATA_STORES", "KNOWN", "TRANSPORTS"]

# Where data lives (the seed's stores, PostgreSQL first), then how it arrives.
DATA_STORES = ("postgresql", "clickhouse", "dragonflydb", "weaviate", "arangodb")
TRANSPORTS = ("nats", "kafka")
KNOWN = (*DATA_STORES, *TRANSPORTS)
