"""What the query core calls when a statement ends: the statistics, and the slow-query log when
the statement was slow. Synchronous and O(1) on the request path: figures added in memory, a
threshold compared, a slow statement put on a bounded queue."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from database_service.results import StatementKind
from database_service.sqlguard import Classification
from database_service.statements.slowlog import SlowQuery, SlowQueryLog
from database_service.statements.stats import StatementStats
from database_service.tenancy import TenantRecord

__all__ = ["StatementRecorder"]


class StatementRecorder:
    __slots__ = ("_record", "_slow", "slow_log", "stats")

    def __init__(self, stats: StatementStats, slow_log: SlowQueryLog | None) -> None:
        self.stats = stats
        self.slow_log = slow_log
        self._record = stats.record
        self._slow = slow_log

    def done(
        self,
        tenant: TenantRecord,
        verdict: Classification,
        sql: str,
        params: Sequence[Any],
        duration_ms: float,
        rows: int,
        cache_hit: bool = False,
    ) -> None:
        self._record(tenant.tenant_id, verdict, duration_ms, rows, cache_hit=cache_hit)
        slow = self._slow
        if slow is not None and not cache_hit and slow.is_slow(tenant.tenant_id, duration_ms):
            slow.submit(
                SlowQuery(tenant, verdict, sql, params, duration_ms, rows, dt.datetime.now(dt.UTC))
            )

    def done_many(
        self,
        tenant: TenantRecord,
        verdict: Classification,
        sql: str,
        micros: Sequence[int],
        rows: int,
    ) -> None:
        """``done`` for statements of one verdict completed together (times in microseconds,
        rows summed): the wire port's relay books its statements so."""
        self.stats.record_many(tenant.tenant_id, verdict, micros, rows)
        slow = self._slow
        if slow is None or not micros or not slow.is_slow(tenant.tenant_id, max(micros) / 1000):
            return
        now = dt.datetime.now(dt.UTC)
        for us in micros:
            if slow.is_slow(tenant.tenant_id, us / 1000):
                slow.submit(SlowQuery(tenant, verdict, sql, (), us / 1000, 0, now))

    def failed(self, tenant_id: str, verdict: Classification) -> None:
        self._record(tenant_id, verdict, 0.0, 0, error=True)

    @staticmethod
    def bulk(command: str, table: str, columns: Sequence[str]) -> Classification:
        """The bulk paths run no SQL of the caller's: their figures are kept under a statement
        of their own, one per (operation, table, columns); logged slow without a plan."""
        text = f"{command} {table} ({', '.join(columns)})"
        return Classification(
            StatementKind.WRITE, command, fingerprint=f"bulk:{text}", normalized=text
        )
