"""Cached reads answered again without their checks' coroutines: the result cache's fast path.

A cache hit on the query path costs what is around it — authentication, the tenant's state,
the SQL guard, scopes, the cache key and its generations — more than the lookup itself
(2026-12-05, ``bench/cache.py``: a hit 0.87 ms at concurrency 1 against a bare gRPC echo's
0.73 ms, about 70 µs of Python per hit, most of it coroutines that return at once because each
check is answered from a cache of its own). Every Python microsecond before the answer costs
about 1.4 µs of latency there (the echo with a busy loop added measures it).

A ``Replay`` is what one read that went the whole way (``QueryExecutor.execute``) established:
who asked (the principal its credential was verified as), for which tenant (its record) and
user, the statement's verdict, and the read's cache plan. It is kept under everything the
caller sent that the answer depends on (``ReplayKey``: the credential, the tenant and user
headers, the request message's bytes). ``QueryExecutor.replay`` answers the same request again
from L1 only while each of those still holds *as the whole way would find it now*: the
credential still verifies to the same principal object (``Authenticator.known``), the tenant's
record is the cached, active, same one (``TenantRegistry.known_active``), the tenant's schema
generation is unchanged, the plan has not expired, and L1 has a fresh entry for the key at the
current generations. Anything else — or a front end with mutual TLS or traces — goes the whole
way, which replaces the entry. A replay is audited, counted and recorded exactly as the hit it
repeats.

The same holds one level down for any statement, cached or not: a ``Checked`` is what the
checks before PostgreSQL (``QueryExecutor.authorize``) established for one statement text from
one caller — principal, tenant record, user, verdict — kept under the credential, the headers
and the text (``CheckedKey``; the parameters are not part of it, as no check reads them).
``QueryExecutor.checked`` gives it back only while the principal, the tenant's record and its
schema generation are the same as above; the statement then still runs, with the parameters
checked and bound as ever (2026-12-05, ``bench/query_cpu.py``: authentication, tenancy and the
guard as coroutines were about 6% of a PK lookup's CPU at concurrency 32).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

if TYPE_CHECKING:  # the executor imports this module
    from database_service.auth import Principal
    from database_service.query.caching import ReadPlan
    from database_service.query.executor import TenantContext
    from database_service.sqlguard import Classification
    from database_service.tenancy import TenantRecord

__all__ = [
    "KEPT_READS",
    "MAX_KEPT",
    "Checked",
    "CheckedKey",
    "Replay",
    "ReplayKey",
    "Replayed",
    "Replays",
    "shared_texts",
]

# The credential (the whole authorization value), the tenant and user headers as sent, and the
# request message's bytes (statement, parameters, cache options, encoding).
ReplayKey = tuple[str, str, str | None, bytes]


# Cached reads kept (plans and replays) unless told otherwise: the setting cache_kept_reads.
KEPT_READS = 65_536

# The longest request (bytes) or statement text (characters) kept as a key.
MAX_KEPT = 4096

# The credential, the tenant and user headers as sent, and the statement's text.
CheckedKey = tuple[str, str, str | None, str]


@dataclass(frozen=True, slots=True)
class Checked:
    principal: Principal
    tenant: TenantRecord
    ctx: TenantContext
    verdict: Classification
    schema_generation: int


@dataclass(frozen=True, slots=True)
class Replay(Checked):
    """What the checks established, and the cached read's statement and plan."""

    sql: str
    params: Sequence[Any]
    plan: ReadPlan


class Replayed(NamedTuple):
    """A replayed answer: the bytes its front end stored, and its summary's figures."""

    payload: bytes
    duration_ms: float
    age_ms: float


K = TypeVar("K", bound=tuple[Any, ...])
V = TypeVar("V")


def shared_texts(key: K) -> K:
    """``key`` with each of its strings the one copy of that text the process keeps
    (``sys.intern``), for a key kept long. Each request's headers and statement arrive as
    strings of their own: kept as they came, every kept read held its own copy of the
    credential (hundreds of characters), the tenant id and the statement, about 600 of the
    ~1,600 bytes it cost (2026-12-05, tracemalloc over 5,000 cached reads)."""
    return type(key)(sys.intern(part) if part.__class__ is str else part for part in key)


class Replays(Generic[K, V]):
    """The kept entries (``Replay``s, ``Checked``s), least recently used dropped first past
    ``max_entries``."""

    def __init__(self, max_entries: int = 16_384) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def keep(self, key: K, entry: V) -> None:
        """Keep ``entry`` under ``key``, unless the key's last part (a request's bytes, a
        statement's text) is longer than ``MAX_KEPT``: the memo is bounded by entries, and
        what a caller sends may be megabytes (16,384 of those would not fit in memory)."""
        if len(key[-1]) > MAX_KEPT:
            return
        key = shared_texts(key)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def drop(self, key: K) -> None:
        self._entries.pop(key, None)
