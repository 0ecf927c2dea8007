"""Times a caller sends, checked before they reach a driver or PostgreSQL.

A ``datetime`` Python parsed can still be out of range once converted to UTC (year 1 at +05:00
is year 0; 9999-12-31 at -05:00 is year 10000): asyncpg converts every ``timestamptz``
parameter to UTC and raised ``OverflowError`` deep in the executor, a 500 for what a caller
sent. A protobuf ``Timestamp`` can hold seconds far outside years 1 to 9999, or nanos outside
a second, and ``ToDatetime`` raised ``ValueError``. Both are the caller's
``invalid_parameters`` here, before any work is done.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from database_service.errors import InvalidParameters

__all__ = ["in_utc", "timestamp_field", "utc_moment"]

# PostgreSQL takes timestamps to 294276 AD, Python to 9999: the narrower is Python's.
_RANGE = "between years 1 and 9999 in UTC"


def in_utc(moment: dt.datetime) -> dt.datetime:
    """An aware ``moment`` in UTC, or ``ValueError`` when it falls outside years 1 to 9999 there
    (what asyncpg sends every aware time as)."""
    try:
        return moment.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"out of range: it must be {_RANGE}") from None


def utc_moment(moment: dt.datetime, name: str) -> dt.datetime:
    """``moment`` in UTC (a naive one is taken as UTC), or ``invalid_parameters`` naming
    ``name`` when it falls outside what Python and the driver can represent."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    try:
        return in_utc(moment)
    except ValueError:
        raise InvalidParameters(f"{name} must be {_RANGE} (got {moment.isoformat()})") from None


def timestamp_field(message: Any, field: str) -> dt.datetime | None:
    """A ``google.protobuf.Timestamp`` field of a request as an aware UTC ``datetime``, None
    when unset; ``invalid_parameters`` when its seconds or nanos are out of range."""
    if not message.HasField(field):
        return None
    stamp = getattr(message, field)
    try:
        moment: dt.datetime = stamp.ToDatetime(tzinfo=dt.UTC)
    except (OverflowError, ValueError, OSError):
        raise InvalidParameters(
            f"{field} must be a valid timestamp {_RANGE}, nanos 0 to 999999999"
            f" (got seconds={stamp.seconds}, nanos={stamp.nanos})"
        ) from None
    return moment
