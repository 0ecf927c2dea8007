"""Admission for the client-credentials exchange: token buckets per client address and per
service name, and a bound on the exchanges in flight.

Each exchange costs one scrypt (~75 ms of a worker thread), whether the service exists or not.
The buckets keep one source, or many sources guessing one service's secret, from using that
capacity up; the in-flight bound keeps a flood from many sources from queueing without end.
Refusals are ``RateLimited`` (429 ``resource_exhausted`` with a Retry-After). A run of refusals
for one key is recorded (audited) at its first refusal and then at most once per
``record_interval``, with the number left unrecorded in between, so a flood does not become a
flood of audit rows. Memory is bounded: at most ``max_keys`` buckets per kind, least recently
used evicted first (an evicted bucket starts full again, which only loosens a limit).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from database_service.errors import ResourceExhausted

__all__ = ["ExchangeGate", "ExchangeLimits", "RateLimited", "TokenBuckets"]


class RateLimited(ResourceExhausted):
    """Over a rate limit: retry after ``retry_after`` seconds. ``record`` says whether this
    refusal is to be audited (``unrecorded``: refusals of the same run not audited since)."""

    def __init__(
        self, message: str, *, retry_after: float, record: bool = True, unrecorded: int = 0
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.record = record
        self.unrecorded = unrecorded

    @property
    def retry_after_seconds(self) -> int:
        """Whole seconds, at least 1 (the Retry-After header)."""
        return max(1, math.ceil(self.retry_after))


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    unrecorded: int = 0
    recorded_at: float = -math.inf


@dataclass(frozen=True, slots=True)
class Refusal:
    retry_after: float
    record: bool
    unrecorded: int


class TokenBuckets:
    """One token bucket per key: ``burst`` tokens, refilled at ``rate`` per second."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 10_000,
        record_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._max_keys = max_keys
        self._record_interval = record_interval
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> Refusal | None:
        """Take a token for ``key``: None when there was one, else how long until there is."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self._burst, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
            bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        retry_after = (1 - bucket.tokens) / self._rate
        if now - bucket.recorded_at >= self._record_interval:
            unrecorded, bucket.unrecorded, bucket.recorded_at = bucket.unrecorded, 0, now
            return Refusal(retry_after, True, unrecorded)
        bucket.unrecorded += 1
        return Refusal(retry_after, False, 0)


@dataclass(frozen=True, slots=True)
class ExchangeLimits:
    """Exchanges per second and burst, per client address and per service name; and how many
    may be in flight (hashing or waiting for a hashing thread) at once."""

    source_rate: float = 5.0
    source_burst: int = 20
    service_rate: float = 2.0
    service_burst: int = 20
    max_in_flight: int = 16


class ExchangeGate:
    def __init__(
        self, limits: ExchangeLimits, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._sources = TokenBuckets(limits.source_rate, limits.source_burst, clock=clock)
        self._services = TokenBuckets(limits.service_rate, limits.service_burst, clock=clock)
        self._in_flight = 0
        self._busy_recorded_at = -math.inf
        self._busy_unrecorded = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def admit(self, source: str | None, service: str) -> Iterator[None]:
        """Raise RateLimited, or hold an in-flight slot for the exchange."""
        if source is not None:
            refusal = self._sources.take(source)
            if refusal is not None:
                raise _limited(f"too many token requests from {source}", refusal)
        refusal = self._services.take(service)
        if refusal is not None:
            raise _limited(f"too many token requests for service {service!r}", refusal)
        if self._in_flight >= self.limits.max_in_flight:
            now = self._clock()
            if now - self._busy_recorded_at >= 1.0:
                refusal = Refusal(1.0, True, self._busy_unrecorded)
                self._busy_recorded_at, self._busy_unrecorded = now, 0
            else:
                refusal = Refusal(1.0, False, 0)
                self._busy_unrecorded += 1
            raise _limited("too many token requests in flight", refusal)
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1


def _limited(what: str, refusal: Refusal) -> RateLimited:
    seconds = max(1, math.ceil(refusal.retry_after))
    return RateLimited(
        f"{what}; retry in {seconds} s",
        retry_after=refusal.retry_after,
        record=refusal.record,
        unrecorded=refusal.unrecorded,
    )
