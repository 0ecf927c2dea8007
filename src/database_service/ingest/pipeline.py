"""What both transports share: decode, authenticate, validate tenants, store, dead-letter.

A consumer hands ``process`` the messages it pulled and acknowledges them only after it returns:
by then every record is committed (stored, or found already stored) or committed as a dead
letter. While PostgreSQL is unreachable, ``process`` retries with backoff instead of returning,
so the consumer pulls nothing more: memory holds one batch at most, and ingestion resumes by
itself when PostgreSQL comes back. Any other failure of a tenant's records that may pass (a
deadlock, the tenant's login refused, an error nobody foresaw) is retried a few times, then the
records are dead-lettered (``retries_exhausted``) and the batch goes on: one tenant's trouble
never holds the consumer, and so every other tenant, for longer than that. A tenant that ran out
of retries gets one try per batch for a while (``failing_tenant_seconds``), not the full round.

A dead letter records the service whose token published it; ``replay`` (an operator's call, with
no producer token) re-checks that service's authority before storing anything again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import operator
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from database_service.auth import ALL_TENANTS, Authenticator, Principal, Scope, ServiceIdentity
from database_service.auth.tokens import everything
from database_service.errors import (
    DatabaseServiceError,
    FailedPrecondition,
    QueryError,
    TenantNotFound,
    TenantSuspended,
    Unavailable,
)
from database_service.ingest.deadletters import DeadLetter, DeadLetterStore, NewDeadLetter
from database_service.ingest.records import (
    BadPayload,
    Decoded,
    Rejected,
    Seen,
    TenantWork,
    decode,
    single_record_batch,
)
from database_service.ingest.writer import IngestWriter, is_transient
from database_service.observability import Metrics
from database_service.observability.tracing import (
    INGEST_RECORDS,
    INGEST_SOURCE,
    INGEST_TENANTS,
    INGEST_WRITE,
    TENANT_ID,
    Spans,
)
from database_service.query.boundary import postgres_errors
from database_service.tenancy import TenantRegistry
from database_service.tenancy.secrets import TenantLogins

if TYPE_CHECKING:
    from opentelemetry.trace import Span

DeadLetterSink = Callable[[Sequence[NewDeadLetter]], Awaitable[None]]

__all__ = [
    "NOT_ALLOWED",
    "DeadLetterSink",
    "Inbound",
    "IngestPipeline",
    "Prepared",
    "Publishers",
    "RecentEvents",
    "ReplayReport",
    "RetriesExhausted",
    "TenantSecretUnreadable",
    "TransportStats",
    "Verdict",
]

log = logging.getLogger(__name__)

# Dead-letter codes that say the publisher was not allowed to do what the letter holds: no valid
# token, a tenant or scope its token did not cover, a privilege PostgreSQL refused the tenant's
# role. ``replay`` never feeds such a letter through again, whoever holds what now.
NOT_ALLOWED = frozenset({"unauthenticated", "permission_denied", "insufficient_privilege"})
# The service name of the bootstrap admin token's principal: no directory entry stands behind it
# (it holds every scope for every tenant while the service is configured with it).
_BOOTSTRAP_ADMIN = everything().service


class RetriesExhausted(DatabaseServiceError):
    """Work that kept failing on an error that may pass (not PostgreSQL being unreachable):
    dead-lettered with this code, to replay once the cause (in the message) is gone."""

    code = "retries_exhausted"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class TenantSecretUnreadable(FailedPrecondition):
    """The tenant's sealed role secret does not open with this service's master key (the key
    differs from the one that sealed it): no write as the tenant can pass until that is fixed."""

    code = "tenant_secret_unreadable"


# How a failure is retried: without end while PostgreSQL is unreachable, a few times when it
# may pass, not at all when it will not.
_OUTAGE, _RETRY, _PERMANENT = "outage", "retry", "permanent"


def _failure(exc: Exception) -> str:
    if isinstance(exc, Unavailable) or (
        isinstance(exc, QueryError) and (exc.sqlstate or "")[:2] == "08"
    ):
        return _OUTAGE
    if isinstance(exc, DatabaseServiceError):
        return _RETRY if is_transient(exc) else _PERMANENT
    return _RETRY  # nobody foresaw it: a few tries, then a dead letter, never a stalled consumer


def _service_error(exc: Exception) -> DatabaseServiceError:
    if isinstance(exc, DatabaseServiceError):
        return exc
    return DatabaseServiceError(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class Inbound:
    """One transport message: its bytes, where it came from, its Authorization header, and
    its trace context headers (``traceparent``, ``tracestate``; only while traces are on)."""

    payload: bytes
    source: str
    authorization: str | None = None
    trace: Mapping[str, str] | None = None


class Verdict(enum.Enum):
    ACK = "ack"  # every record is stored or dead-lettered
    TERM = "term"  # the message itself is poison (dead-lettered whole): never redeliver


@dataclass(slots=True)
class TransportStats:
    """Live figures per transport, for the health document."""

    messages: int = 0
    records: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    errors: int = 0
    last_error: str | None = None
    last_batch_at: float | None = None
    lag: int | None = None
    state: str = "starting"
    partitions: list[str] = field(default_factory=list)  # Kafka: this member's assignment
    _rate_mark: tuple[float, int] = (0.0, 0)
    rate: float = 0.0

    def document(self) -> dict[str, Any]:
        now = time.monotonic()
        mark_at, mark_records = self._rate_mark
        if now - mark_at >= 1.0:
            if mark_at:
                self.rate = (self.records - mark_records) / (now - mark_at)
            self._rate_mark = (now, self.records)
        return {
            "state": self.state,
            "messages": self.messages,
            "records": self.records,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "dead_letters": self.dead_letters,
            "errors": self.errors,
            "last_error": self.last_error,
            "lag": self.lag,
            **({"partitions": self.partitions} if self.partitions else {}),
            "records_per_second": round(self.rate, 1),
            "seconds_since_last_batch": (
                round(now - self.last_batch_at, 1) if self.last_batch_at else None
            ),
        }


@dataclass(slots=True)
class ReplayReport:
    replayed: int = 0  # letters fed through the store again
    stored: int = 0
    duplicates: int = 0
    still_failing: int = 0
    refused: int = 0  # letters not fed through: authorization failed, then or now
    failures: list[dict[str, Any]] = field(default_factory=list)  # {id, reason}: still failing
    refusals: list[dict[str, Any]] = field(default_factory=list)  # {id, reason}: refused

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RecentEvents:
    """Records this instance saw committed lately, to skip the other transport's copy.

    Only an optimisation in front of the unique indexes (which are the guarantee), so keyed as
    they are, never more loosely: ticks and predictions by tenant, time and event id (the shared
    tables' unique ``(company_id, time, event_id)``), signals and rows by tenant and event id (the
    tenant's ``_ingest_events``). An event id alone would let one tenant's records hide another's
    with the same id (two tenants fed the same market data, or a producer that copies another
    tenant's predictable ids). Bounded by two generations of ``capacity / 2`` records and by age:
    the older generation is dropped when the newer fills or is ``max_age`` seconds old. A copy
    from the other transport comes within seconds; remembering more only held memory (about
    150 bytes a record: a steady 200 ticks/s grew the service by 2 MB a minute until the cap,
    ~40 MB). A copy later than that is still caught by the unique index."""

    def __init__(
        self,
        capacity: int,
        *,
        max_age: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._half = max(1, capacity // 2)
        self._max_age = max_age
        self._clock = clock
        # (tenant, kind) -> event id -> time_us (None for rows)
        self._new: dict[tuple[str, str], dict[str, int | None]] = {}
        self._old: dict[tuple[str, str], dict[str, int | None]] = {}
        self._size = 0
        self._since = clock()  # when the newer generation began

    def seen(self, tenant_id: str) -> Seen:
        """``seen(kind)`` for ``TenantWork.discard``, for one tenant."""
        generations = (self._new, self._old)

        def of(kind: str) -> list[dict[str, int | None]]:
            key = (tenant_id, kind)
            return [g[key] for g in generations if key in g]

        return of

    def remember(self, work: TenantWork, failed: frozenset[str] = frozenset()) -> None:
        """Note ``work``'s records as committed, but those whose event id is in ``failed``."""
        kinds: list[tuple[str, Iterable[tuple[str, int | None]]]] = [
            (kind, zip(records, map(_time_of, records.values()), strict=True))
            for kind, records in (("ticks", work.ticks), ("predictions", work.predictions))
            if records
        ]
        kinds += [("rows", dict.fromkeys(rows).items()) for rows in work.rows.values()]
        for kind, entries in kinds:
            seen = self._new.setdefault((work.tenant_id, kind), {})
            before = len(seen)
            seen.update(entries)
            if failed:  # rare: refused records stay unknown
                for event_id in failed:
                    seen.pop(event_id, None)
            self._size += len(seen) - before
        now = self._clock()
        if self._size >= self._half or now - self._since >= self._max_age:
            self._old, self._new, self._size, self._since = self._new, {}, 0, now


_time_of = operator.itemgetter(1)  # time_us in tick and prediction tuples (records.py)


@dataclass(slots=True)
class Publishers:
    """Which service published each record of a batch (its messages may carry different tokens),
    so that a record the store rejects is dead-lettered with its publisher.

    Kept per tenant; per event id only for a tenant whose records came from several services."""

    by_tenant: dict[str, str | None] = field(default_factory=dict)
    by_event: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def add(self, service: str | None, part: Decoded, batch: Decoded) -> None:
        """Note ``part`` (one message's records) before it is merged into ``batch``."""
        for tenant_id, work in part.work.items():
            if tenant_id not in self.by_tenant:
                self.by_tenant[tenant_id] = service
                continue
            events = self.by_event.get(tenant_id)
            if events is None:
                known = self.by_tenant[tenant_id]
                if known == service:
                    continue
                before = batch.work.get(tenant_id)
                events = self.by_event[tenant_id] = dict.fromkeys(
                    before.sources if before is not None else (), known
                )
            events.update(dict.fromkeys(work.sources, service))  # a later copy wins, as in merge

    def of(self, tenant_id: str | None, event_id: str | None) -> str | None:
        if tenant_id is None:
            return None
        events = self.by_event.get(tenant_id)
        if events is not None:
            return events.get(event_id) if event_id is not None else None
        return self.by_tenant.get(tenant_id)


@dataclass(slots=True)
class Prepared:
    """A batch authenticated and decoded, waiting to be stored."""

    transport: str
    messages: int
    started: float
    decoded: Decoded = field(default_factory=Decoded)
    dead: list[NewDeadLetter] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    source: str = ""
    publishers: Publishers = field(default_factory=Publishers)
    span: Span | None = None  # the batch's, from prepare to the end of store (traces on)


@dataclass(slots=True)
class _Outcome:
    stored: int = 0
    duplicates: int = 0
    rejected: list[Rejected] = field(default_factory=list)


class IngestPipeline:
    def __init__(
        self,
        *,
        writer: IngestWriter,
        dead_letters: DeadLetterStore,
        authenticator: Authenticator,
        registry: TenantRegistry,
        logins: TenantLogins,
        metrics: Metrics,
        require_token: bool,
        max_retry_delay: float = 5.0,
        recent_events: int = 262_144,
        max_attempts: int = 5,
        first_retry_delay: float = 0.1,
        failing_tenant_seconds: float = 60.0,
        spans: Spans | None = None,
    ) -> None:
        """``max_attempts`` tries (backoff from ``first_retry_delay`` doubling up to
        ``max_retry_delay``) for a tenant's records on an error that may pass, then they are
        dead-lettered; then for ``failing_tenant_seconds`` the tenant's records get one try each
        batch until one passes. While PostgreSQL is unreachable, tries do not count."""
        self._writer = writer
        self._dead = dead_letters
        self._auth = authenticator
        self._registry = registry
        self._logins = logins
        self._metrics = metrics
        self._require_token = require_token
        self._max_delay = max_retry_delay
        self._first_delay = first_retry_delay
        self._max_attempts = max(1, max_attempts)
        self._failing_seconds = failing_tenant_seconds
        self.transports: dict[str, TransportStats] = {}
        self._tenant_locks: dict[str, asyncio.Lock] = {}
        self._recent = RecentEvents(recent_events)
        self._failing: dict[str, float] = {}  # tenant -> when its retries last ran out
        # None when traces are off; the consumers read it too (they collect trace headers).
        self.spans = spans

    def stats(self, transport: str) -> TransportStats:
        stats = self.transports.get(transport)
        if stats is None:
            stats = self.transports[transport] = TransportStats()
        return stats

    async def process(
        self,
        transport: str,
        messages: Sequence[Inbound],
        *,
        announce: DeadLetterSink | None = None,
    ) -> list[Verdict]:
        """Store what the messages hold; returns one verdict per message, in order.

        ``announce`` publishes the dead letters on the transport's dead-letter subject or topic
        once they are committed to the table; it is best effort (the table is the record)."""
        return await self.store(await self.prepare(transport, messages), announce=announce)

    async def prepare(self, transport: str, messages: Sequence[Inbound]) -> Prepared:
        """The CPU half: authenticate and decode. A consumer runs it for the next batch while
        the previous one is being written (see ``consumer.Overlap``)."""
        prepared = Prepared(transport, len(messages), time.perf_counter())
        if self.spans is None:
            await self._prepare(prepared, messages)
            return prepared
        # The batch's span: a child of the first publisher's trace, linked to the others'.
        span = self.spans.batch(transport, [m.trace for m in messages], len(messages))
        try:
            with self.spans.use(span):
                await self._prepare(prepared, messages)
        except BaseException:
            span.end()
            raise
        decoded = prepared.decoded
        span.set_attribute(INGEST_RECORDS, decoded.records)
        span.set_attribute(INGEST_TENANTS, sorted(decoded.work))
        if len(decoded.work) == 1:
            span.set_attribute(TENANT_ID, next(iter(decoded.work)))
        prepared.span = span
        return prepared

    async def _prepare(self, prepared: Prepared, messages: Sequence[Inbound]) -> None:
        transport = prepared.transport
        source = ",".join(sorted({m.source for m in messages}))[:500]
        prepared.source = source
        principals: dict[str | None, Principal | DatabaseServiceError] = {}
        for message in messages:
            verdict, part, principal = await self._open(
                message, principals, prepared.dead, transport
            )
            prepared.verdicts.append(verdict)
            if part is not None:
                service = principal.service if principal is not None else None
                prepared.dead.extend(
                    self._letter(transport, source, r, service) for r in part.rejected
                )
                prepared.publishers.add(service, part, prepared.decoded)
                prepared.decoded.merge(part)

    async def store(
        self, prepared: Prepared, *, announce: DeadLetterSink | None = None
    ) -> list[Verdict]:
        """The I/O half: write the records and the dead letters, retrying until committed."""
        if self.spans is None or prepared.span is None:
            return await self._commit(prepared, announce)
        with self.spans.use(prepared.span, end=True):
            return await self._commit(prepared, announce)

    async def _commit(self, prepared: Prepared, announce: DeadLetterSink | None) -> list[Verdict]:
        transport, decoded, dead = prepared.transport, prepared.decoded, prepared.dead
        outcome = await self._store(transport, decoded)
        publishers = prepared.publishers
        dead.extend(
            self._letter(transport, prepared.source, r, publishers.of(r.tenant_id, r.event_id))
            for r in outcome.rejected
        )
        fresh: list[NewDeadLetter] = []

        async def add() -> None:
            fresh[:] = await self._dead.add(dead)

        if dead:
            error = await self._retry(transport, "dead letters", add, self._max_attempts)
            if error is not None:
                # Nothing is acknowledged: the messages come again (and dedupe) once it passes.
                raise error
        if fresh and announce is not None:  # the copies stored before were announced before
            try:
                await announce(fresh)
            except Exception as exc:  # best effort: the table is the record
                log.warning(
                    "%s: could not announce %d dead letters: %s", transport, len(fresh), exc
                )

        stats = self.stats(transport)
        stats.messages += prepared.messages
        stats.records += decoded.records
        stats.stored += outcome.stored
        stats.duplicates += outcome.duplicates
        stats.dead_letters += len(dead)
        stats.last_batch_at = time.monotonic()
        m = self._metrics
        m.ingest_messages.labels(transport).inc(prepared.messages)
        m.ingest_records.labels(transport, "stored").inc(outcome.stored)
        m.ingest_records.labels(transport, "duplicate").inc(outcome.duplicates)
        m.ingest_records.labels(transport, "dead_letter").inc(len(dead))
        for letter in dead:
            m.ingest_dead_letters.labels(transport, letter.code).inc()
        m.ingest_batch_records.labels(transport).observe(decoded.records)
        m.ingest_batch_seconds.labels(transport).observe(time.perf_counter() - prepared.started)
        if dead:
            log.warning(
                "%s: %d records dead-lettered (%s)",
                transport, len(dead), ", ".join(sorted({d.code for d in dead})),
            )  # fmt: skip
        return prepared.verdicts

    async def _open(
        self,
        message: Inbound,
        principals: dict[str | None, Principal | DatabaseServiceError],
        dead: list[NewDeadLetter],
        transport: str,
    ) -> tuple[Verdict, Decoded | None, Principal | None]:
        """Authenticate and decode one message; whole-message failures become dead letters.

        Records for a tenant the principal may not ingest for are moved to the part's rejected
        list; the principal is returned so that every letter names its publisher."""
        principal: Principal | None = None
        if self._require_token:
            known = principals.get(message.authorization)
            if known is None:

                async def authenticate() -> None:
                    try:
                        found: Principal | DatabaseServiceError = await self._auth.authenticate(
                            message.authorization
                        )
                    except DatabaseServiceError as exc:
                        if _failure(exc) != _PERMANENT:  # the directory lives in PostgreSQL
                            raise
                        found = exc
                    principals[message.authorization] = found

                error = await self._retry(
                    transport, "authentication", authenticate, self._max_attempts
                )
                if error is not None:  # the message is dead-lettered whole, with why
                    principals[message.authorization] = error
                known = principals[message.authorization]
            if isinstance(known, DatabaseServiceError):
                # No valid token: no publisher to record.
                dead.append(
                    NewDeadLetter(
                        transport, message.source, known.error_code, known.message,
                        message.payload,
                    )
                )  # fmt: skip
                return Verdict.TERM, None, None
            principal = known
        try:
            part = decode(message.payload)
        except BadPayload as exc:
            dead.append(
                NewDeadLetter(
                    transport, message.source, "bad_protobuf", str(exc), message.payload,
                    service=principal.service if principal is not None else None,
                )
            )  # fmt: skip
            return Verdict.TERM, None, principal
        if principal is not None:
            for tenant_id in list(part.work):
                try:
                    principal.require(Scope.INGEST, tenant_id)
                except DatabaseServiceError as exc:
                    part.rejected.extend(_reject_all(part.work.pop(tenant_id), exc))
        return Verdict.ACK, part, principal

    async def _store(self, transport: str, decoded: Decoded) -> _Outcome:
        outcome = _Outcome()

        async def one(work: TenantWork) -> None:
            # One writer per tenant in this instance: the other transport's copy of a batch
            # waits, then finds its records committed and skips the database (no lock waits or
            # deadlocks between two transactions inserting the same keys).
            tenant_id = work.tenant_id
            async with self._tenant_locks.setdefault(tenant_id, asyncio.Lock()):
                outcome.duplicates += work.discard(self._recent.seen(tenant_id))
                if not work.size:
                    return
                failing = self._failing.get(tenant_id)
                attempts = self._max_attempts
                if failing is not None and time.monotonic() - failing < self._failing_seconds:
                    attempts = 1  # it ran out of retries lately: no full round for every batch
                if self.spans is None:
                    error = await self._retry(
                        transport, f"tenant {tenant_id}", attempt_for(work), attempts
                    )
                else:
                    attributes: dict[str, str | int] = {
                        TENANT_ID: tenant_id,
                        INGEST_RECORDS: work.size,
                        INGEST_SOURCE: transport,
                    }
                    with self.spans.scope(INGEST_WRITE, attributes) as span:
                        error = await self._retry(
                            transport, f"tenant {tenant_id}", attempt_for(work), attempts
                        )
                        if error is not None:  # dead-lettered: failed, though nothing raised
                            self.spans.failed(span, error)
                if error is None:
                    self._failing.pop(tenant_id, None)
                    return
                if isinstance(error, RetriesExhausted):
                    self._failing[tenant_id] = time.monotonic()
                log.warning(
                    "%s: tenant %s: %d records dead-lettered: %s: %s",
                    transport, tenant_id, work.size, error.error_code, error.message,
                )  # fmt: skip
                outcome.rejected.extend(_reject_all(work, error))

        def attempt_for(work: TenantWork) -> Callable[[], Awaitable[None]]:
            async def attempt() -> None:
                try:
                    with postgres_errors(work.tenant_id):
                        tenant = await self._registry.get_active(work.tenant_id)
                except (TenantNotFound, TenantSuspended) as exc:
                    outcome.rejected.extend(_reject_all(work, exc))
                    return
                try:
                    login = self._logins.login(tenant)
                except ValueError as exc:  # SecretBox: sealed with another master key
                    raise TenantSecretUnreadable(
                        f"tenant {work.tenant_id!r}: {exc}; fix DBSVC_MASTER_KEY, then replay"
                    ) from exc
                try:
                    result = await self._writer.store(
                        login,
                        tenant.schema_name,
                        work,
                        limit_seconds=tenant.limits.statement_timeout_ms / 1000,
                    )
                except DatabaseServiceError as exc:
                    if (exc.sqlstate or "")[:2] == "28":  # login refused: suspended meanwhile?
                        self._registry.invalidate(work.tenant_id)  # the next try looks again
                    raise
                outcome.stored += result.stored
                outcome.duplicates += result.duplicates
                for event_id, error in result.rejected:
                    outcome.rejected.append(_rejected(work, event_id, error))
                # Committed now (stored, or found stored): remember for the other transport.
                self._recent.remember(work, frozenset(e for e, _ in result.rejected))

            return attempt

        await asyncio.gather(*(one(w) for w in decoded.work.values()))
        return outcome

    async def _retry(
        self,
        transport: str,
        what: str,
        attempt: Callable[[], Awaitable[None]],
        attempts: int,
    ) -> DatabaseServiceError | None:
        """Run ``attempt`` until it passes (None) or fails for good (the error to dead-letter
        with): a permanent error at once, one that may pass after ``attempts`` tries
        (``RetriesExhausted``). While PostgreSQL is unreachable (the owner's pool cannot reach it
        either), tries do not count: that is the backpressure, the consumer awaits us and pulls
        nothing meanwhile."""
        delay = self._first_delay
        tries = 0
        started = time.monotonic()
        stats = self.stats(transport)
        while True:
            try:
                with postgres_errors("-"):
                    await attempt()
            except Exception as exc:  # sorted below; nothing may stall the consumer
                failure = _failure(exc)
                error = _service_error(exc)
                if failure == _PERMANENT:
                    return error
                stats.errors += 1
                stats.last_error = f"{what}: {error.error_code}: {error.message}"[:300]
                self._metrics.ingest_errors.labels(transport, error.error_code).inc()
                if failure == _OUTAGE and not await self._dead.reachable():
                    stats.state = "waiting_for_postgresql"
                else:
                    tries += 1
                    if tries >= attempts:
                        if stats.state == "waiting_for_postgresql":
                            stats.state = "running"
                        return _exhausted(error, tries, time.monotonic() - started)
                log.warning("%s: %s: %s; retrying in %.2fs", transport, what, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_delay)
                continue
            stats.state = "running"
            return None

    @staticmethod
    def _letter(transport: str, source: str, r: Rejected, service: str | None) -> NewDeadLetter:
        return NewDeadLetter(
            transport, source, r.code, r.reason, r.payload, tenant_id=r.tenant_id,
            event_id=r.event_id, service=service,
        )  # fmt: skip

    async def replay(
        self, ids: Sequence[int] | None, *, tenant_id: str | None = None, limit: int = 10_000
    ) -> ReplayReport:
        """Feed pending dead letters through the store again (an operator's call: no token).

        Authorization is checked again first, since no producer token comes with a replay: a
        letter refused for authorization (``NOT_ALLOWED``) is never fed through as it is, and
        any other only while the service that published it still exists, is active and holds
        the ``ingest`` scope for every tenant its records name; a letter with no recorded
        publisher only where the pipeline requires no token. A refused letter stores nothing and
        stays pending, with why and what to do in ``replay_result``.

        A letter whose records are now stored (or were already) is marked replayed; one that
        still fails keeps its place with the new reason in ``replay_result``."""
        report = ReplayReport()
        identities: dict[str, ServiceIdentity | None] = {}  # one directory lookup per service
        for letter in await self._dead.list(
            tenant_id=tenant_id, pending_only=True, limit=limit, ids=ids
        ):
            decoded: Decoded | None = None
            unreadable = ""
            try:
                decoded = decode(letter.payload)
            except BadPayload as exc:
                unreadable = f"bad_protobuf: {exc}"
            refusal = await self._refusal(letter, decoded, identities)
            if refusal is not None:
                refusal = refusal[:2000]
                report.refused += 1
                report.refusals.append({"id": letter.id, "reason": refusal})
                log.warning("replay: dead letter %d refused: %s", letter.id, refusal)
                await self._dead.mark_replayed(letter.id, refusal, done=False)
                continue
            report.replayed += 1
            if decoded is None:
                result, done = unreadable, False
            else:
                outcome = await self._store("replay", decoded)
                report.stored += outcome.stored
                report.duplicates += outcome.duplicates
                problems = [*decoded.rejected, *outcome.rejected]
                done = not problems
                result = (
                    f"stored {outcome.stored}, duplicates {outcome.duplicates}"
                    if done
                    else "; ".join(f"{r.code}: {r.reason}" for r in problems)[:2000]
                )
            if not done:
                report.still_failing += 1
                report.failures.append({"id": letter.id, "reason": result})
            await self._dead.mark_replayed(letter.id, result, done=done)
        return report

    async def _refusal(
        self,
        letter: DeadLetter,
        decoded: Decoded | None,
        identities: dict[str, ServiceIdentity | None],
    ) -> str | None:
        """Why ``letter`` may not be fed through the store again, or None if it may."""
        tenants = sorted(decoded.work) if decoded is not None else []  # what would be stored
        named = set(tenants)
        if decoded is not None:
            named.update(r.tenant_id for r in decoded.rejected if r.tenant_id)
        if not named and letter.tenant_id:
            named.add(letter.tenant_id)
        remedy = f"publish again with a token that holds ingest for {_tenants(sorted(named))}"
        if letter.code in NOT_ALLOWED:
            return (
                f"refused: {letter.code} when published, and a record refused for "
                f"authorization is never replayed as it is; {remedy}"
            )
        if not tenants:
            return None  # nothing in it can be stored: it fails again, needing no authority
        if letter.service is None:
            return None if not self._require_token else f"refused: publisher unknown: {remedy}"
        problem = await self._publisher_problem(letter.service, tenants, identities)
        return None if problem is None else f"refused: {problem}; {remedy}"

    async def _publisher_problem(
        self, service: str, tenants: Sequence[str], identities: dict[str, ServiceIdentity | None]
    ) -> str | None:
        """What keeps ``service`` from ingesting for ``tenants`` now, or None."""
        if service not in identities:
            identities[service] = await self._auth.directory.find(service)
        identity = identities[service]
        if identity is None:
            if service == _BOOTSTRAP_ADMIN:
                return None  # the bootstrap admin token: every scope for every tenant
            return f"publisher service {service!r} no longer exists"
        if not identity.active:
            return f"publisher service {service!r} is disabled"
        if Scope.INGEST not in identity.scopes:
            return f"publisher service {service!r} no longer holds the ingest scope"
        if ALL_TENANTS in identity.tenants:
            return None
        missing = [t for t in tenants if t not in identity.tenants]
        if missing:
            return f"publisher service {service!r} may no longer act for {_tenants(missing)}"
        return None


def _exhausted(error: DatabaseServiceError, tries: int, seconds: float) -> RetriesExhausted:
    return RetriesExhausted(
        f"gave up after {tries} {'try' if tries == 1 else 'tries'} in {seconds:.1f} s:"
        f" {error.error_code}: {error.message}",
        sqlstate=error.sqlstate,
    )


def _tenants(tenant_ids: Sequence[str]) -> str:
    return ", ".join(tenant_ids) if tenant_ids else "the tenants its records name"


def _reject_all(work: TenantWork, exc: DatabaseServiceError) -> list[Rejected]:
    return [_rejected(work, event_id, exc) for event_id in work.sources]


def _rejected(work: TenantWork, event_id: str, exc: DatabaseServiceError) -> Rejected:
    reason = exc.message if exc.sqlstate is None else f"{exc.message} (SQLSTATE {exc.sqlstate})"
    return Rejected(
        exc.error_code,
        reason,
        single_record_batch(work.sources[event_id]),
        tenant_id=work.tenant_id,
        event_id=event_id,
    )
