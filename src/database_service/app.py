"""Composition root: builds every component from Settings, starts them in order, stops them in
reverse. Nothing else in the package constructs long-lived objects.

``async with Application(settings) as app:`` gives a running service core (PostgreSQL reachable,
control plane migrated, pools and audit writer running); front ends are attached by ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import SecretStr

from database_service import __version__
from database_service.analytics.backfill import BackfillReport, backfill
from database_service.analytics.replicator import queue_tenant_deletion
from database_service.analytics.runtime import (
    AnalyticsRuntime,
    limits_of,
    open_store,
    start_analytics,
)
from database_service.analytics.service import Analytics
from database_service.application import (
    Access,
    DeadLetterAdmin,
    KeyValueOps,
    Observability,
    PartitionAdmin,
    ServiceAdmin,
    TenantAdmin,
    TimeSeries,
)
from database_service.application.backups import ClusterBackupAdmin
from database_service.application.graphs import GraphMetrics, Graphs
from database_service.application.hub import HubAdmin
from database_service.application.multidb import MultiDatabase
from database_service.application.tenant_backups import TenantBackupAdmin
from database_service.application.vectors import VectorMetrics, VectorOps
from database_service.auth import Authenticator, ExchangeLimits, ServiceDirectory, TokenCodec
from database_service.auth.status_links import StatusLinks
from database_service.auth.tokens import deployment_audience
from database_service.backup.cluster import ClusterBackups, WalReceiver, find_tools
from database_service.backup.tenant import BackupProgress, TenantBackups
from database_service.cache import (
    IMMUTABLE_FUNCTIONS_SQL,
    CachePolicy,
    Generations,
    KeyValueStore,
    LocalCache,
    PostgresInvalidationListener,
    PostgresKeyValueStore,
    RedisKeyValueStore,
    RemoteCache,
    ResultCache,
)
from database_service.config import Settings
from database_service.hub import HubAgent
from database_service.ingest import DeadLetterStore, IngestPipeline, IngestWriter
from database_service.loops import BackgroundLoops
from database_service.multidb.outbox import Outbox, OutboxMetrics, StoreAppliers, store_targets
from database_service.observability import (
    AuditLog,
    HealthReporter,
    Metrics,
    NatsProbe,
    PostgresProbe,
    RequestWindow,
)
from database_service.observability.health import DependencyProbe
from database_service.observability.tracing import Tracing
from database_service.postgres import TenantPools, create_owner_pool
from database_service.postgres.deadlines import Deadlines
from database_service.postgres.replicas import Replica, ReplicaSet
from database_service.query import QueryExecutor
from database_service.query.caching import CacheRules, ResultCaching
from database_service.sqlguard import SqlGuard
from database_service.statements import (
    IndexAdvisor,
    SharedFigures,
    SlowQueryLog,
    StatementAdmin,
    StatementStats,
)
from database_service.statements.recorder import StatementRecorder
from database_service.stores.graph import GraphStore
from database_service.stores.graph.model import GraphLimits
from database_service.stores.graph.postgres import PostgresGraphStore
from database_service.stores.vector import PgVectorStore, VectorProbe, VectorStore
from database_service.stores.vector.weaviate import WeaviateVectorStore
from database_service.supervisor import EmbeddedNats, EmbeddedPostgres
from database_service.tenancy import (
    MigrationReport,
    Migrator,
    SecretBox,
    TenantLimits,
    TenantManager,
    TenantRegistry,
    quote_ident,
)
from database_service.tenancy.secrets import TenantLogins, derive_key
from database_service.timeseries import PartitionManager, SeriesSpec

__all__ = ["Application", "Endpoints"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoints:
    postgres_dsn: str
    nats_url: str | None


def _secret(value: SecretStr | None) -> str | None:
    """An optional secret setting's value (the required ones are unwrapped where used)."""
    return None if value is None else value.get_secret_value()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class _PoolCollector:
    """Pool gauges read at scrape time, so they are never stale."""

    def __init__(self, pools: TenantPools) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        size = GaugeMetricFamily(
            "dbsvc_pool_connections", "Open connections per tenant pool.", labels=["tenant"]
        )
        in_use = GaugeMetricFamily(
            "dbsvc_pool_connections_in_use",
            "Connections in use per tenant pool.",
            labels=["tenant"],
        )
        for tenant, stats in self._pools.stats().items():
            size.add_metric([tenant], stats.size)
            in_use.add_metric([tenant], stats.in_use)
        total = GaugeMetricFamily(
            "dbsvc_pool_connections_open_total", "Open tenant connections across all pools."
        )
        total.add_metric([], self._pools.open_connections)
        cap = GaugeMetricFamily("dbsvc_pool_connections_max", "The global connection cap.")
        cap.add_metric([], self._pools.global_max)
        yield from (size, in_use, total, cap)


class _ReplicaCollector:
    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "dbsvc_replica_up", "1 while a read replica is in use.", labels=["replica"]
        )
        lag = GaugeMetricFamily(
            "dbsvc_replica_lag_seconds",
            "How long ago the primary passed the replica's replayed position.",
            labels=["replica"],
        )
        reads = GaugeMetricFamily(
            "dbsvc_replica_reads", "Reads a replica answered (this process).", labels=["replica"]
        )
        for replica in self._replicas.replicas:
            up.add_metric([replica.name], 1.0 if replica.up else 0.0)
            if replica.lag_ms != float("inf"):
                lag.add_metric([replica.name], replica.lag_ms / 1000)
            reads.add_metric([replica.name], replica.reads)
        yield from (up, lag, reads)


class _PartitionCollector:
    def __init__(self, manager: PartitionManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "dbsvc_partitions",
            "Partitions per time-series table (last maintenance).",
            labels=["table"],
        )
        for table, count in self._manager.partitions.items():
            gauge.add_metric([table], count)
        yield gauge
        lag = GaugeMetricFamily(
            "dbsvc_rollup_lag_seconds",
            "How far 1-minute candles trail the newest tick (last maintenance; 0 when in step).",
        )
        if self._manager.rollup_lag_seconds is not None:
            lag.add_metric([], self._manager.rollup_lag_seconds)
        yield lag


@dataclass
class CacheProbe:
    """The result cache's L2 (the seed's ``dependencies.dragonflydb``): Redis's state, or
    ``not_configured`` with L1 alone; and the invalidation channels either way."""

    cache: ResultCache
    listener: PostgresInvalidationListener
    configured: bool
    name: str = "dragonflydb"

    async def check(self) -> dict[str, Any]:
        if self.cache.remote is not None and self.cache.remote.state.status != "up":
            await self.cache.remote.ping()
        stats = self.cache.stats()
        details = {
            "invalidation": stats["invalidation"],
            "postgres_notifications": self.listener.status,
            "l1": stats["l1"],
            "hit_rate": stats["hit_rate"],
        }
        if not self.configured:
            return {
                "status": "not_configured",
                "note": "L1 only: no L2, invalidation across instances by PostgreSQL's"
                " notifications alone (set DBSVC_REDIS_URL)",
                **details,
            }
        state = stats["l2_state"]
        invalidation = stats["invalidation"]
        assert isinstance(state, dict) and isinstance(invalidation, dict)
        # Up only when both the entries (L2) and the invalidation channel answer: with the
        # channel down nothing is served from the cache (reads go to PostgreSQL).
        up = state.get("status") == "up" and invalidation.get("status") == "up"
        return {"status": "healthy" if up else "unhealthy", "l2": state, **details}


@dataclass
class GraphProbe:
    """The relationship graph (the seed's ``dependencies.arangodb``): ArangoDB probed when
    configured; the embedded PostgreSQL graph is healthy whenever PostgreSQL is, and says so."""

    store: GraphStore
    name: str = "arangodb"

    async def check(self) -> dict[str, Any]:
        return await self.store.check()


class Application:
    def __init__(
        self,
        settings: Settings,
        *,
        migrator: Migrator | None = None,
        embedded_postgres_stops: bool = True,
        start_nats: bool = True,
        migrate_tenants_on_start: bool = True,
        maintain_partitions: bool = True,
        consume: bool | None = None,
        postgres_supervisor: Any = None,
        nats_embedded: bool | None = None,
    ) -> None:
        self.settings = settings.resolve_secrets()
        self._migrator_override = migrator
        self._embedded_postgres_stops = embedded_postgres_stops
        self._start_nats = start_nats
        self._migrate_tenants = migrate_tenants_on_start
        self._maintain_partitions = maintain_partitions
        # Ingestion consumers run where the transports do (not in admin commands).
        self._consume = start_nats if consume is None else consume
        # A worker of a multi-process serve: the PostgreSQL at ``postgres_url`` is the embedded
        # one its supervisor runs; this object has ``problem`` and ``restarts`` for health.
        self._postgres_supervisor = postgres_supervisor
        # Whether the NATS at ``nats_url`` is an embedded one (a worker's: its supervisor's).
        self._nats_embedded = nats_embedded
        self._stack = contextlib.AsyncExitStack()
        self.startup_report: MigrationReport | None = None
        # The embedded PostgreSQL, if one is used (``problem`` says why it is down, if it is).
        self.embedded_postgres: EmbeddedPostgres | None = None
        # ClickHouse analytics (issue 12), when enabled.
        self.analytics: AnalyticsRuntime | None = None

    async def __aenter__(self) -> Application:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        s = self.settings
        stack = self._stack
        assert s.master_key is not None and s.bootstrap_admin_token is not None
        master_key = s.master_key.get_secret_value()
        # Traces first, so that they stop last: the spans of everything's shutdown are exported.
        # Off (no endpoint), this object installs nothing and its ``spans`` is None.
        self.tracing = Tracing.from_settings(s)
        stack.push_async_callback(self.tracing.shutdown)

        if s.postgres_url is None:
            # The serving process (embedded_postgres_stops) also restarts a PostgreSQL that dies.
            pg = await stack.enter_async_context(
                EmbeddedPostgres(
                    s.data_dir / "pg",
                    stop_on_exit=self._embedded_postgres_stops,
                    supervise=self._embedded_postgres_stops,
                )
            )
            self.embedded_postgres = pg
            dsn = pg.dsn
        else:
            dsn = s.postgres_url.get_secret_value()
        self.postgres_dsn = dsn  # the owner's (cluster backups run PostgreSQL's tools with it)
        # The owner's connections, in pools that cannot starve each other: the request path's
        # (tenant and service lookups, health, time limits), the audit writer's, the long
        # holders' (migrations, tenant lifecycle, partition maintenance), and the outbox's.
        self.owner_pool = await create_owner_pool(dsn, max_size=s.admin_pool_size)
        stack.push_async_callback(self.owner_pool.close)
        self.audit_pool = await create_owner_pool(dsn, max_size=s.audit_pool_size, purpose="audit")
        stack.push_async_callback(self.audit_pool.close)
        self.maintenance_pool = await create_owner_pool(
            dsn, max_size=s.maintenance_pool_size, purpose="maintenance"
        )
        stack.push_async_callback(self.maintenance_pool.close)
        # The outbox applier's: it holds an entry's row lock while a store applies the entry,
        # and the embedded key-value store writes through owner_pool (one pool for both held
        # every connection and waited for one more).
        self.outbox_pool = await create_owner_pool(
            dsn, max_size=s.multidb_outbox_pool_size, purpose="outbox"
        )
        stack.push_async_callback(self.outbox_pool.close)

        self.migrator = self._migrator_override or Migrator(
            control_schema=s.control_schema,
            shared_schema=s.shared_schema,
            group_role=s.tenant_group_role,
            role_prefix=s.tenant_role_prefix,
        )
        async with self.owner_pool.acquire() as conn:
            self.startup_report = await self.migrator.migrate(
                conn, tenant_ids=None if self._migrate_tenants else []
            )
        for failed in self.startup_report.failed:
            log.error("tenant %s: migration failed at start: %s", failed.tenant_id, failed.error)

        self.metrics = Metrics()
        self.metrics.gc.install()
        stack.callback(self.metrics.gc.remove)
        self.loops = BackgroundLoops(self.metrics.loop_restarts)
        self.window = RequestWindow()
        self.metrics.before_render(self.window.settle)
        self.secret_box = SecretBox(master_key)
        self.logins = TenantLogins(self.secret_box)  # one opened-secret cache for all paths
        self.registry = TenantRegistry(self.owner_pool, control_schema=s.control_schema)
        self.tenants = TenantManager(
            self.maintenance_pool,
            self.registry,
            self.migrator,
            self.secret_box,
            control_schema=s.control_schema,
            shared_schema=s.shared_schema,
            group_role=s.tenant_group_role,
            role_prefix=s.tenant_role_prefix,
            default_limits=TenantLimits(s.tenant_connection_limit, s.tenant_statement_timeout_ms),
        )
        self.services = ServiceDirectory(
            self.owner_pool, control_schema=s.control_schema, hash_threads=s.auth_hash_threads
        )
        stack.callback(self.services.close)
        self.tokens = TokenCodec(
            derive_key(master_key, "service-tokens"),
            issuer=s.token_issuer,
            audience=s.token_audience or deployment_audience(await self.services.deployment_id()),
            max_ttl_seconds=s.token_max_ttl_seconds,
        )
        self.authenticator = Authenticator(
            self.tokens,
            self.services,
            bootstrap_admin_token=s.bootstrap_admin_token.get_secret_value(),
        )
        self.audit = await stack.enter_async_context(
            AuditLog(
                self.audit_pool,
                control_schema=s.control_schema,
                metrics=self.metrics,
                start_loop=self.loops.start,
            )
        )
        self.pools = await stack.enter_async_context(
            self._tenant_pools(
                dsn,
                on_event=lambda tenant, event: self.metrics.pool_events.labels(event).inc(),
                spans=self.tracing.spans,
            )
        )
        self.tenants.on_change(self.pools.close_tenant)
        self.tenants.on_deleted(self._forget_deleted_tenant)
        # The purge of the tenant's ClickHouse data is queued in the delete's own transaction
        # (whether or not this instance runs analytics: another one may, or a later start), so
        # a crash right after the commit cannot leave its data there.
        control = s.control_schema
        self.tenants.on_deleting(
            lambda conn, tenant_id: queue_tenant_deletion(conn, control, tenant_id)
        )
        self.metrics.register(_PoolCollector(self.pools))
        await self.tenants.upgrade()
        user_context_key = derive_key(master_key, "user-context")
        # Also the PostgreSQL wire port's, which opens user-scoped transactions itself.
        self.user_context_key = user_context_key
        await self.owner_pool.execute(
            f"INSERT INTO {quote_ident(s.control_schema)}.user_context_key (key) VALUES ($1)"
            " ON CONFLICT (singleton) DO UPDATE SET key = EXCLUDED.key",
            user_context_key,
        )
        self.guard = SqlGuard(
            max_sql_bytes=s.max_sql_bytes,
            max_sql_tokens=s.max_sql_tokens,
            catalog_functions=[
                r["proname"]
                for r in await self.owner_pool.fetch(
                    "SELECT DISTINCT proname FROM pg_proc"
                    " WHERE pronamespace = 'pg_catalog'::regnamespace"
                )
            ],
        )
        stack.callback(self.guard.close)
        self.deadlines = Deadlines(
            self.owner_pool,
            grace_seconds=s.session_kill_grace_seconds,
            on_expired=lambda why: self.metrics.session_limits.labels(why).inc(),
        )
        stack.push_async_callback(self.deadlines.aclose)
        self.replicas = await self._replicas()
        self.result_cache, self.key_values, cache_probe = await self._cache(dsn)
        probes_before = [cache_probe]
        cache_rules = CacheRules(self.owner_pool, control_schema=s.control_schema)
        await cache_rules.load()
        self.caching = ResultCaching(
            self.result_cache,
            CachePolicy(
                shared_schema=s.shared_schema,
                shared_relations=frozenset(
                    r["relname"]
                    for r in await self.owner_pool.fetch(
                        "SELECT relname FROM pg_class WHERE relnamespace = $1::regnamespace",
                        s.shared_schema,
                    )
                ),
                immutable_functions=frozenset(
                    r["proname"] for r in await self.owner_pool.fetch(IMMUTABLE_FUNCTIONS_SQL)
                ),
            ),
            self.metrics,
            catalog=self.owner_pool,
            rules=cache_rules,
            shared_schema=s.shared_schema,
            max_ttl_ms=s.cache_max_ttl_ms,
            stale_max_age_s=s.cache_stale_max_age_seconds,
            kept_plans=s.cache_kept_reads,
        )
        await self._statements()
        self.executor = QueryExecutor(
            statements=self.statement_recorder,
            caching=self.caching,
            pools=self.pools,
            registry=self.registry,
            logins=self.logins,
            guard=self.guard,
            audit=self.audit,
            metrics=self.metrics,
            deadlines=self.deadlines,
            shared_schema=s.shared_schema,
            control_schema=s.control_schema,
            user_context_key=user_context_key,
            max_params=s.max_params,
            max_result_rows=s.max_result_rows,
            max_result_bytes=s.max_result_bytes,
            transaction_timeout_ms=s.tenant_transaction_timeout_ms,
            spans=self.tracing.spans,
            workload_statement_ms={
                "analytics": s.analytics_statement_timeout_ms,
                "bulk": s.bulk_statement_timeout_ms,
            },
            replicas=self.replicas,
            kept_reads=s.cache_kept_reads,
        )
        # What the executor books together (``QueryExecutor.book``) is booked before it is read.
        self.metrics.before_render(self.executor.book)
        self.statement_stats.before_read(self.executor.book)

        probes: list[DependencyProbe] = [
            PostgresProbe(
                self.owner_pool,
                embedded=s.postgres_url is None or self._postgres_supervisor is not None,
                supervisor=self.embedded_postgres or self._postgres_supervisor,
            ),
            *probes_before,
        ]
        # Vector collections: a Weaviate server when configured, else pgvector in this
        # PostgreSQL (not_configured where it has none).
        self.vector_store: VectorStore
        if s.weaviate_url is not None:
            weaviate = WeaviateVectorStore(
                s.weaviate_url,
                api_key=_secret(s.weaviate_api_key),
                registry=self.registry,
                audit=self.audit,
                timeout_seconds=s.weaviate_timeout_seconds,
                metrics_registry=self.metrics.registry,
            )
            await weaviate.start()
            stack.push_async_callback(weaviate.aclose)
            self.vector_store = weaviate
        else:
            pgvector = PgVectorStore(self.executor, self.owner_pool)
            await pgvector.start()
            self.vector_store = pgvector
        probes.append(VectorProbe(self.vector_store))
        nats_url = s.nats_url
        if nats_url is None and s.nats_embedded and self._start_nats:
            nats = await stack.enter_async_context(
                EmbeddedNats(s.data_dir / "nats", port=s.nats_port)
            )
            nats_url = nats.url
        # One TLS context for NATS (its files read once), shared by the probe and the consumer.
        nats_tls = s.nats_tls()
        if nats_url is not None:
            probes.append(
                await stack.enter_async_context(
                    NatsProbe(
                        nats_url,
                        embedded=s.nats_url is None
                        if self._nats_embedded is None
                        else self._nats_embedded,
                        tls=nats_tls,
                    )
                )
            )
        self.endpoints = Endpoints(postgres_dsn=dsn, nats_url=nats_url)
        self.dead_letters = DeadLetterStore(self.owner_pool, control_schema=s.control_schema)
        self.ingest = IngestPipeline(
            writer=IngestWriter(
                self.pools,
                shared_schema=s.shared_schema,
                deadlines=self.deadlines,
                parallel=min(s.ingest_write_parallelism, s.pool_max_per_tenant),
            ),
            dead_letters=self.dead_letters,
            authenticator=self.authenticator,
            registry=self.registry,
            logins=self.logins,
            metrics=self.metrics,
            require_token=s.ingest_require_token,
            spans=self.tracing.spans,
        )
        await self._start_consumers(nats_url, nats_tls, probes)
        await self._analytics(dsn, probes)
        retention = dt.timedelta(days=s.ts_retention_days)
        ahead = dt.timedelta(hours=s.ts_create_ahead_hours)
        self.partitions = PartitionManager(
            self.maintenance_pool,
            schema=s.shared_schema,
            specs=[
                SeriesSpec(
                    "trading_ticks",
                    dt.timedelta(seconds=s.ts_ticks_interval_seconds),
                    s.ts_ticks_company_partitions,
                    retention,
                    ahead,
                ),
                SeriesSpec(
                    "ai_predictions",
                    dt.timedelta(seconds=s.ts_predictions_interval_seconds),
                    0,
                    retention,
                    ahead,
                ),
            ],
            metrics=self.metrics,
            lock_timeout_ms=s.ts_maintenance_lock_timeout_ms,
        )
        if self._maintain_partitions:
            await self.partitions.maintain()  # partitions for now exist before the first request
            every = s.ts_maintenance_interval_seconds
            maintenance = self.loops.start(
                "partition-maintenance", lambda: self.partitions.run_forever(every)
            )
            stack.push_async_callback(_cancel, maintenance)
        self.metrics.register(_PartitionCollector(self.partitions))
        self.graph_store = await self._graph_store()
        stack.push_async_callback(self.graph_store.aclose)
        probes.append(GraphProbe(self.graph_store))
        self.health = HealthReporter(
            owner_pool=self.owner_pool,
            pools=self.pools,
            window=self.window,
            probes=probes,
            shared_schema=s.shared_schema,
            group_role=s.tenant_group_role,
            data_dir=s.data_dir,
            count_active_tenants=self.registry.count_active,
            cache_seconds=s.health_cache_seconds,
            loops=self.loops,
            cache_hit_rate=self._cache_hit_rate,
        )
        await self._cluster_backups()
        self._use_cases()
        self.health.sections["backups"] = self.backup_admin.status
        self.health.sections["central_hub"] = self.hub_admin.status
        if s.central_hub_url is not None and self._maintain_partitions:
            self._hub_agent()
        if self.replicas is not None:
            self.health.sections["replicas"] = self.replicas.document
        if self.wal_receiver is not None:
            for name, loop in (
                ("wal-archive", self.wal_receiver.run_forever),
                ("base-backups", self.backup_admin.run_schedule),
            ):
                stack.push_async_callback(_cancel, self.loops.start(name, loop))

    def _hub_agent(self) -> None:
        """Registration and heartbeats (one agent per instance: its primary process)."""
        s = self.settings
        assert s.central_hub_url is not None
        scheme = "https" if s.tls_cert_file is not None else "http"
        agent = HubAgent(
            s.central_hub_url,
            token=_secret(s.central_hub_token),
            instance_id=s.instance_id or f"{socket.gethostname()}:{s.http_port}",
            version=__version__,
            endpoints={
                "grpc": f"{s.grpc_host}:{s.grpc_port}",
                "http": f"{scheme}://{s.http_host}:{s.http_port}",
            },
            interval_s=s.central_hub_heartbeat_seconds,
            tenants=self.registry.list,
            health=self.health.document,
            versions=self.hub_admin.versions,
            apply=self.hub_admin.apply,
            max_ttl_ms=s.cache_max_ttl_ms,
        )
        self.hub_admin.agent = agent
        self._stack.push_async_callback(agent.aclose)
        self._stack.push_async_callback(_cancel, self.loops.start("central-hub", agent.run_forever))

    async def _statements(self) -> None:
        """Statement statistics (in memory, shared between the serving processes through the
        run directory) and the slow-query log (its plans taken by one background task)."""
        s, stack = self.settings, self._stack
        self.statement_stats = StatementStats(max_fingerprints=s.statement_stats_max_fingerprints)
        self.shared_statements = SharedFigures(
            self.statement_stats, s.data_dir / "run" / "statements"
        )
        self.slow_queries = SlowQueryLog(
            self.owner_pool,
            control_schema=s.control_schema,
            pools=self.pools,
            logins=self.logins,
            deadlines=self.deadlines,
            metrics=self.metrics,
            default_ms=s.slow_query_ms,
            keep_parameters=s.slow_query_keep_parameters,
            queue_size=s.slow_query_queue,
            max_entries=s.slow_query_max_entries,
            max_age_seconds=s.slow_query_max_age_seconds,
        )
        await self.slow_queries.load()
        self.statement_recorder = (
            StatementRecorder(self.statement_stats, self.slow_queries)
            if s.statement_stats
            else None
        )
        if self.statement_recorder is not None:
            for name, loop in (
                ("slow-query-log", self.slow_queries.run_forever),
                ("slow-query-settings", self.slow_queries.reload_forever),
                ("statement-figures", self.shared_statements.run_forever),
            ):
                stack.push_async_callback(_cancel, self.loops.start(name, loop))

    async def _analytics(self, dsn: str, probes: list[DependencyProbe]) -> None:
        """ClickHouse: the store, tenant SQL, replication from PostgreSQL, probe and metrics."""
        s = self.settings
        if not (s.clickhouse_enabled or s.clickhouse_url is not None):
            return
        store = open_store(s)
        self._stack.push_async_callback(store.close)
        analytics = Analytics(
            store,
            access=Access(self.audit),
            registry=self.registry,
            audit=self.audit,
            limits=limits_of(s),
            # A server: tenants' ClickHouse users log in with passwords derived from the master
            # key (the same on every instance, nothing stored; the server keeps a SHA-256).
            tenant_key=(
                derive_key(s.master_key.get_secret_value(), "clickhouse-tenant")
                if s.clickhouse_url is not None and s.master_key is not None
                else None
            ),
            retention_days=s.ts_retention_days,  # ticks and predictions, as in PostgreSQL
        )
        self.analytics = await start_analytics(
            s, store, analytics, dsn=dsn, owner_pool=self.owner_pool
        )
        probes.append(self.analytics)
        self.metrics.register(self.analytics)
        if s.clickhouse_replicate:
            replicator = self.analytics.replicator
            replication = self.loops.start("analytics-replication", replicator.run_forever)
            self._stack.push_async_callback(_cancel, replication)

    async def _forget_deleted_tenant(self, tenant_id: str) -> None:
        """A deleted tenant's keys go with it (a tenant created again under its id starts
        empty); its cached results cannot be reached again (their keys hold its schema)."""
        # Its statement figures too, in every serving process (a reset they all apply).
        self.shared_statements.reset(tenant_id)
        self.statement_stats.forget(tenant_id)
        if self.analytics is not None:
            await self.analytics.tenant_deleted(tenant_id)  # its ClickHouse data, in order
        purged = await self.key_values.purge(tenant_id)
        log.info("tenant %s deleted: %d key-value keys purged", tenant_id, purged)

    def _cache_hit_rate(self) -> float | None:
        rate = self.result_cache.stats()["hit_rate"]
        return round(rate, 4) if isinstance(rate, float) else None

    async def _cache(self, dsn: str) -> tuple[ResultCache, KeyValueStore, DependencyProbe]:
        """L1 always; with ``redis_url``, L2, cluster-wide invalidation and key-value operations
        in Redis (DragonflyDB in production). Every process listens to PostgreSQL's
        notifications of writes (whoever made them: control migration 0009's triggers)."""
        s, stack, metrics = self.settings, self._stack, self.metrics
        url = _secret(s.redis_url)
        timeout_s = s.cache_redis_timeout_ms / 1000
        generations = Generations(
            url,
            timeout_s=timeout_s,
            on_lag=metrics.cache_invalidation_lag_seconds.observe,
        )
        await generations.start()
        remote = (
            RemoteCache(
                url,
                tenant_quota_bytes=s.cache_tenant_quota_bytes,
                timeout_s=timeout_s,
                stale_keep_s=s.cache_stale_max_age_seconds,
            )
            if url is not None
            else None
        )
        cache = ResultCache(
            local=LocalCache(s.cache_l1_bytes, stale_max_age_s=s.cache_stale_max_age_seconds),
            generations=generations,
            remote=remote,
        )
        stack.push_async_callback(cache.aclose)

        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(dsn, server_settings={"application_name": "dbsvc-cache"})

        notifications = metrics.cache_invalidations.labels("notification")
        listener = PostgresInvalidationListener(
            connect,
            generations,
            control_schema=s.control_schema,
            on_notification=lambda tenant, relation: notifications.inc(),
        )
        await listener.start()
        stack.push_async_callback(listener.aclose)
        kv: KeyValueStore = (
            RedisKeyValueStore(url, tenant_max_bytes=s.kv_tenant_max_bytes)
            if url is not None
            else PostgresKeyValueStore(
                self.owner_pool,
                control_schema=s.control_schema,
                tenant_max_bytes=s.kv_tenant_max_bytes,
            )
        )
        stack.push_async_callback(kv.aclose)
        return cache, kv, CacheProbe(cache, listener, configured=url is not None)

    def _tenant_pools(self, dsn: str, **extra: Any) -> TenantPools:
        """Tenant pools on ``dsn`` (the primary, or a replica) as the settings size them."""
        s = self.settings
        return TenantPools(
            dsn,
            max_per_tenant=s.pool_max_per_tenant,
            workload_max={
                "analytics": s.pool_analytics_max_per_tenant,
                "bulk": s.pool_bulk_max_per_tenant,
            },
            workload_settings={
                "analytics": {"statement_timeout": str(s.analytics_statement_timeout_ms)},
                "bulk": {"statement_timeout": str(s.bulk_statement_timeout_ms)},
            },
            global_max=s.pool_global_max,
            idle_seconds=s.pool_idle_seconds,
            acquire_timeout=s.pool_acquire_timeout_seconds,
            start_loop=self.loops.start,
            **extra,
        )

    async def _replicas(self) -> ReplicaSet | None:
        """The read replicas of DBSVC_POSTGRES_REPLICA_URLS, each with its own owner pool
        (checks, ending sessions past their limits), tenant pools and deadlines; checked from
        now on. A replica down at start is simply out until a check finds it."""
        s, stack = self.settings, self._stack
        if not s.postgres_replica_urls:
            return None
        replicas = []
        for index, url in enumerate(s.postgres_replica_urls, start=1):
            dsn = url.get_secret_value()
            owner = await asyncpg.create_pool(
                dsn, min_size=0, max_size=2, server_settings={"application_name": "dbsvc-replica"}
            )
            stack.push_async_callback(owner.close)
            deadlines = Deadlines(owner, grace_seconds=s.session_kill_grace_seconds)
            stack.push_async_callback(deadlines.aclose)
            pools = await stack.enter_async_context(self._tenant_pools(dsn))
            replicas.append(
                Replica(f"replica-{index}", dsn, pools=pools, owner=owner, deadlines=deadlines)
            )
        replica_set = ReplicaSet(
            self.owner_pool,
            replicas,
            max_lag_ms=s.replica_max_lag_ms,
            check_interval=s.replica_check_interval_ms / 1000,
        )
        await replica_set.check()
        stack.push_async_callback(
            _cancel, self.loops.start("replica-checks", replica_set.run_forever)
        )
        self.metrics.register(_ReplicaCollector(replica_set))
        return replica_set

    async def backfill_analytics(
        self,
        tenants: Sequence[str] | None = None,
        progress: Callable[[BackupProgress], None] | None = None,
    ) -> BackfillReport:
        """The operator's backfill (``database-service analytics backfill``): queue the
        tenants' existing rows for the ClickHouse replicator, on the owner's pool (no caller to
        authorize: the operator at the machine)."""
        s = self.settings
        return await backfill(
            self.owner_pool,
            self.registry,
            control_schema=s.control_schema,
            shared_schema=s.shared_schema,
            tenants=tenants,
            progress=progress,
        )

    async def open_cluster_backups(self, directory: Path | None = None) -> ClusterBackups:
        """The cluster's backups in ``directory`` (default: DBSVC_BACKUP_DIR, else
        <data_dir>/backups), with PostgreSQL's programs of the server's major version."""
        s = self.settings
        version = await self.owner_pool.fetchval("SHOW server_version_num")
        tools = find_tools(int(version) // 10000, s.postgres_bin_dir)
        root = directory or s.backup_dir or s.data_dir / "backups"
        return ClusterBackups(root, self.postgres_dsn, tools)

    async def _cluster_backups(self) -> None:
        """On with DBSVC_BACKUP_DIR, in the serving instance's primary process only (the one
        that maintains partitions): one WAL archiver, one schedule."""
        self.cluster_backups: ClusterBackups | None = None
        self.wal_receiver: WalReceiver | None = None
        if self.settings.backup_dir is not None and self._maintain_partitions:
            self.cluster_backups = await self.open_cluster_backups()
            self.wal_receiver = WalReceiver(self.cluster_backups)

    async def _graph_store(self) -> GraphStore:
        """The relationship graph: ArangoDB when a URL is configured, else PostgreSQL tables in
        each tenant's schema (stores/graph)."""
        s = self.settings
        limits = GraphLimits(
            max_depth=s.graph_max_depth,
            max_results=s.graph_max_results,
            max_visits=s.graph_max_visits,
            statement_ms=s.graph_statement_timeout_ms,
        )
        if s.arangodb_url is not None:
            from database_service.stores.graph.arango import ArangoGraphStore  # noqa: PLC0415 - optional

            password = _secret(s.arangodb_password) or ""
            return ArangoGraphStore(
                s.arangodb_url.get_secret_value(),
                username=s.arangodb_username,
                password=password,
                limits=limits,
            )
        return PostgresGraphStore(
            self.pools,
            self.logins,
            self.deadlines,
            limits,
            transaction_ms=s.tenant_transaction_timeout_ms,
        )

    def _use_cases(self) -> None:
        """The application layer front ends call (each use case authorizes and audits itself);
        front ends reach nothing else of the core but the query executor and the settings."""
        s = self.settings
        self.access = Access(self.audit)
        self.tenant_admin = TenantAdmin(
            self.access,
            self.tenants,
            self.registry,
            self.migrator,
            self.maintenance_pool,
            cache_rules=self.caching.rules,
            tenant_data_elsewhere=[self.vector_store.drop_tenant]
            if isinstance(self.vector_store, WeaviateVectorStore)
            else [],
        )
        self.hub_admin = HubAdmin(
            self.access,
            self.tenants,
            self.owner_pool,
            control_schema=s.control_schema,
            cache_rules=self.caching.rules,
            max_ttl_ms=s.cache_max_ttl_ms,
        )
        self.service_admin = ServiceAdmin(
            self.access,
            self.services,
            self.tokens,
            self.authenticator,
            default_ttl_seconds=s.token_default_ttl_seconds,
            max_ttl_seconds=s.token_max_ttl_seconds,
            exchange_limits=ExchangeLimits(
                source_rate=s.auth_rate_per_source,
                source_burst=s.auth_burst_per_source,
                service_rate=s.auth_rate_per_service,
                service_burst=s.auth_burst_per_service,
                max_in_flight=s.auth_max_in_flight,
            ),
        )
        self.partition_admin = PartitionAdmin(
            self.access, self.partitions, self.registry, shared_schema=s.shared_schema
        )
        self.backup_admin = ClusterBackupAdmin(
            self.access,
            self.cluster_backups,
            self.wal_receiver,
            interval_hours=s.backup_interval_hours,
            keep=s.backup_keep,
        )
        self.timeseries = TimeSeries(self.executor, shared_schema=s.shared_schema)
        self.key_value = KeyValueOps(self.access, self.key_values, self.registry, self.audit)
        self.graphs = Graphs(
            self.access,
            self.graph_store,
            self.registry,
            self.audit,
            GraphMetrics(self.metrics.registry),
        )
        self.vectors = VectorOps(self.access, self.vector_store, VectorMetrics(self.metrics))
        # The PostgreSQL wire ports of this process register their admin view here when they
        # start (pgwire/server.py), for the REST admin view.
        self.pgwire_views: list[Callable[[Callable[[str], bool]], dict[str, object]]] = []
        # With several workers: the other workers' views, from their snapshots (each a
        # document as ``pgwire_views`` return them, unfiltered; workers/runtime.py).
        self.pgwire_peers: list[Callable[[], list[dict[str, Any]]]] = []
        self._multidb()
        self.observability = Observability(
            self.access,
            pgwire_views=self.pgwire_views,
            pgwire_peers=self.pgwire_peers,
            health=self.health,
            window=self.window,
            pools=self.pools,
            metrics=self.metrics,
            audit=self.audit,
            owner_pool=self.owner_pool,
            control_schema=s.control_schema,
            registry=self.registry,
        )
        assert s.master_key is not None
        self.status_links = StatusLinks(s.master_key.get_secret_value())
        self.dead_letter_admin = DeadLetterAdmin(self.access, self.dead_letters, self.ingest)
        # Per-tenant export and restore: files under <backup dir>/tenants, signed with a key of
        # their own derived from the master key.
        self.tenant_backups = TenantBackupAdmin(
            self.access,
            TenantBackups(
                pools=self.pools,
                logins=self.logins,
                registry=self.registry,
                manager=self.tenants,
                migrator=self.migrator,
                owner_pool=self.owner_pool,
                signing_key=derive_key(s.master_key.get_secret_value(), "tenant-backups"),
                directory=(s.backup_dir or s.data_dir / "backups") / "tenants",
                control_schema=s.control_schema,
                shared_schema=s.shared_schema,
                # On pgvector, collections are tables of the tenant's schema and go with them.
                vectors=self.vector_store
                if isinstance(self.vector_store, WeaviateVectorStore)
                else None,
            ),
        )
        self._stack.push_async_callback(self.tenant_backups.aclose)
        self.index_advisor = IndexAdvisor(
            self.owner_pool,
            control_schema=self.settings.control_schema,
            group_role=self.settings.tenant_group_role,
            pools=self.pools,
            logins=self.logins,
            deadlines=self.deadlines,
        )
        self._stack.push_async_callback(self.index_advisor.aclose)
        self.statement_admin = StatementAdmin(
            self.access,
            stats=self.statement_stats,
            shared=self.shared_statements,
            slow_log=self.slow_queries,
            registry=self.registry,
            owner_pool=self.owner_pool,
            advisor=self.index_advisor,
        )

    def _multidb(self) -> None:
        """``execute_multi_db_operation`` and its outbox: the applier loop runs in every
        serving process (entries are locked FOR UPDATE SKIP LOCKED, so each is applied by one)."""
        s = self.settings
        self.multidb_outbox = Outbox(
            self.outbox_pool,
            control_schema=s.control_schema,
            appliers=StoreAppliers(
                key_values=self.key_values,
                vectors=self.vectors,
                graphs=self.graphs,
                analytics=None if self.analytics is None else self.analytics.analytics,
                targets=store_targets(
                    redis_url=_secret(s.redis_url),
                    # Embedded chDB: this instance's own data; a server: its URL.
                    clickhouse=_secret(s.clickhouse_url)
                    or str((s.clickhouse_path or s.data_dir / "clickhouse").resolve()),
                    weaviate_url=s.weaviate_url,
                    arangodb_url=_secret(s.arangodb_url),
                ),
            ),
            metrics=OutboxMetrics(self.metrics),
            max_attempts=s.multidb_outbox_max_attempts,
            backoff_base_seconds=s.multidb_outbox_backoff_seconds,
            backoff_max_seconds=s.multidb_outbox_backoff_max_seconds,
            apply_timeout_seconds=s.multidb_outbox_apply_timeout_seconds,
            concurrency=s.multidb_outbox_pool_size,
        )
        self.multidb = MultiDatabase(
            self.access,
            self.executor,
            self.registry,
            self.multidb_outbox,
            key_value=self.key_value,
            vectors=self.vectors,
            graphs=self.graphs,
            analytics=None if self.analytics is None else self.analytics.analytics,
        )
        self.metrics.register(self.multidb_outbox.collector())
        self.health.sections["multidb_outbox"] = self.multidb_outbox.status
        outbox = self.multidb_outbox
        keep_seconds = s.multidb_outbox_keep_applied_hours * 3600

        async def applier() -> None:
            await outbox.run_forever(s.multidb_outbox_interval_seconds, keep_seconds)

        self._stack.push_async_callback(_cancel, self.loops.start("multidb-outbox", applier))

    async def _start_consumers(
        self, nats_url: str | None, nats_tls: ssl.SSLContext | None, probes: list[DependencyProbe]
    ) -> None:
        s = self.settings
        if not (self._consume and s.ingest_enabled):
            return
        # The transports (nats-py, aiokafka) load here: admin commands never pay for them.
        from database_service.ingest import (  # noqa: PLC0415
            IngestionProbe,
            JetStreamIngest,
            JetStreamSettings,
            KafkaIngest,
            KafkaProbe,
            KafkaSettings,
        )

        transports = []
        if nats_url is not None:
            await self._stack.enter_async_context(
                JetStreamIngest(
                    JetStreamSettings(
                        url=nats_url,
                        stream=s.ingest_nats_stream,
                        subjects=s.ingest_nats_subjects,
                        durable=s.ingest_nats_durable,
                        dead_letter_subject=s.ingest_nats_dead_letter_subject,
                        max_age_seconds=s.ingest_max_age_seconds,
                        ack_wait_seconds=s.ingest_ack_wait_seconds,
                        batch_messages=s.ingest_batch_messages,
                        max_ack_pending=s.ingest_max_ack_pending,
                        tls=nats_tls,
                    ),
                    self.ingest,
                )
            )
            transports.append("nats")
        if s.kafka_bootstrap is not None:
            kafka = KafkaIngest(
                KafkaSettings(
                    bootstrap=s.kafka_bootstrap,
                    topics=s.ingest_kafka_topics,
                    group=s.ingest_kafka_group,
                    dead_letter_topic=s.ingest_kafka_dead_letter_topic,
                    partitions=s.ingest_kafka_partitions,
                    max_records=s.ingest_batch_messages,
                    tls=s.kafka_tls(),
                ),
                self.ingest,
            )
            await self._stack.enter_async_context(kafka)
            transports.append("kafka")
            probes.append(KafkaProbe(kafka, s.kafka_bootstrap))
        if transports:
            probes.append(IngestionProbe(self.ingest, self.dead_letters, transports))
