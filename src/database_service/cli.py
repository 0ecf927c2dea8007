"""``database-service serve | tenant | service | token | migrate | dead-letters | ingest-load``.

Administrative commands work on the database directly (the same components the server uses), so
they work whether or not a server is running; with the embedded PostgreSQL they use the same data
directory, and stop the embedded server afterwards only if they were the ones to start it.
``ingest-load`` only publishes (NATS JetStream and/or Kafka) to a running service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import uvicorn
import uvloop

from database_service.app import Application
from database_service.auth import ALL_TENANTS
from database_service.auth.tokens import everything
from database_service.config import ConfigError, Settings
from database_service.errors import DatabaseServiceError, NotFound
from database_service.tenancy.migrations import MigrationProgress

__all__ = ["main"]

log = logging.getLogger(__name__)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured signal after shutdown (SIGTERM would then kill us before the
    child servers stop); we install our own handlers that only ask it to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(settings: Settings) -> int:
    # Imported here: the front ends cost ~1 s of start-up that the admin commands do not need.
    from database_service.api.grpc import GrpcServer  # noqa: PLC0415
    from database_service.api.http.app import create_http_app  # noqa: PLC0415

    async with Application(settings) as core, GrpcServer(core) as grpc_server:
        # The guard's worker (large statements are parsed there) starts now, not on the first
        # large statement; admin commands never need it.
        await core.guard.start_worker()
        http = create_http_app(core)
        config = uvicorn.Config(
            http,
            host=settings.http_host,
            port=settings.http_port,
            log_level=settings.log_level.lower(),
            access_log=False,
            lifespan="off",
        )
        server = _Server(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        serve_task = asyncio.create_task(server.serve())
        while not server.started and not serve_task.done():  # noqa: ASYNC110 - no event to await
            await asyncio.sleep(0.05)
        if serve_task.done():
            await serve_task
            print("HTTP server failed to start; is the port in use?", file=sys.stderr)
            return 1
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://{settings.http_host}:{port}"
        admin_token_file = settings.data_dir / "admin.token"
        lines = [
            "Database Service is running.",
            f"  REST       {base}/api/v1/  (OpenAPI {base}/openapi.json, docs {base}/docs)",
            f"  gRPC       {settings.grpc_host}:{grpc_server.port}"
            "  (database_service.v1.DatabaseService, health, reflection)",
            f"  health     {base}/api/v1/health",
            f"  metrics    {base}/metrics",
            f"  PostgreSQL {core.endpoints.postgres_dsn.split('@')[-1]}"
            f"{' (embedded)' if settings.embedded_postgres else ''}",
            f"  NATS       {core.endpoints.nats_url or 'not configured'}",
            f"  Kafka      {settings.kafka_bootstrap or 'not configured'}",
        ]
        if settings.ingest_enabled and (core.endpoints.nats_url or settings.kafka_bootstrap):
            lines.append(
                f"  ingest     NATS {', '.join(settings.ingest_nats_subjects)}"
                + (f"; Kafka {', '.join(settings.ingest_kafka_topics)}"
                   if settings.kafka_bootstrap else "")
            )  # fmt: skip
        if settings.bootstrap_admin_token is None and admin_token_file.exists():
            lines.append(f"  admin token in {admin_token_file}")
        print("\n".join(lines), flush=True)
        await serve_task
    print("Database Service stopped.", flush=True)
    return 0


async def _with_core(settings: Settings, work: Callable[[Application], Awaitable[int]]) -> int:
    # Admin commands: no NATS, no tenant migrations and no partition maintenance at start.
    async with Application(
        settings,
        embedded_postgres_stops=False,
        start_nats=False,
        migrate_tenants_on_start=False,
        maintain_partitions=False,
    ) as core:
        return await work(core)


def _progress(step: MigrationProgress) -> None:
    r = step.result
    state = "ok" if r.ok else f"FAILED at {r.failed_version}: {r.error}"
    applied = ",".join(f"{v:04d}" for v in r.applied) or "up to date"
    print(
        f"[{step.done}/{step.total}] tenant {r.tenant_id}: {state}"
        f" ({applied}, {r.duration_ms:.0f} ms)",
        flush=True,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="database-service", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service (embedded back ends unless configured)")

    tenant = sub.add_parser("tenant", help="tenant lifecycle").add_subparsers(
        dest="action", required=True
    )
    create = tenant.add_parser("create")
    create.add_argument("tenant_id")
    create.add_argument("--connection-limit", type=int)
    create.add_argument("--statement-timeout-ms", type=int)
    tenant.add_parser("list")
    for name in ("suspend", "resume"):
        tenant.add_parser(name).add_argument("tenant_id")
    delete = tenant.add_parser("delete")
    delete.add_argument("tenant_id")
    delete.add_argument("--confirm", action="store_true", help="required: data is dropped")

    service = sub.add_parser("service", help="service identities").add_subparsers(
        dest="action", required=True
    )
    screate = service.add_parser("create")
    screate.add_argument("name")
    screate.add_argument("--tenants", required=True, help="comma-separated ids, or '*'")
    screate.add_argument("--scopes", required=True, help="comma-separated: read,write,ingest,admin")
    service.add_parser("list")
    for name in ("disable", "enable"):
        service.add_parser(name).add_argument("name")

    token = sub.add_parser("token", help="service tokens").add_subparsers(
        dest="action", required=True
    )
    issue = token.add_parser("issue")
    issue.add_argument("--service", required=True)
    issue.add_argument("--tenants", help="comma-separated ids or '*' (default: the service's)")
    issue.add_argument("--scopes", help="default: the service's scopes")
    issue.add_argument("--ttl", type=int, help="seconds (default DBSVC_TOKEN_DEFAULT_TTL_SECONDS)")
    issue.add_argument(
        "--register",
        action="store_true",
        help="create the service identity (no secret) if it does not exist",
    )

    migrate = sub.add_parser("migrate", help="apply pending migrations to every tenant")
    migrate.add_argument("--tenant", action="append", dest="tenants", help="only this tenant")

    dead = sub.add_parser("dead-letters", help="ingestion records that could not be stored")
    dead_sub = dead.add_subparsers(dest="action", required=True)
    dlist = dead_sub.add_parser("list", help="pending dead letters (--all: replayed ones too)")
    dlist.add_argument("--tenant")
    dlist.add_argument("--all", action="store_true", help="include the replayed ones")
    dlist.add_argument("--limit", type=_positive, default=50)
    replay = dead_sub.add_parser(
        "replay",
        help="feed pending dead letters through the store",
        description="Feed pending dead letters through the store again. Authorization is "
        "checked again first: a letter refused for authorization is never replayed, and any "
        "other only while the service that published it still exists, is active and holds "
        "ingest for its tenants. Refused letters stay pending; 'refusals' says why.",
    )
    replay.add_argument("ids", nargs="*", type=int, metavar="ID")
    replay.add_argument("--tenant", help="only this tenant's dead letters")
    replay.add_argument(
        "--all-pending", action="store_true", help="every pending one (of --tenant, if given)"
    )

    load = sub.add_parser(
        "ingest-load",
        help="publish generated ticks to the ingestion transports (benchmarks, demos)",
        description="Publish random-walk ticks of one tenant on NATS JetStream and/or Kafka as "
        "IngestBatch messages, the way producers do; the service need not run in this process.",
    )
    load.add_argument("--tenant", required=True)
    load.add_argument("--ticks", type=_positive, default=100_000)
    load.add_argument("--batch", type=_positive, default=1000, help="ticks per message")
    load.add_argument("--symbols", type=_positive, default=10)
    load.add_argument("--token", help="default: the bootstrap admin token")
    load.add_argument("--nats-url", help="default: DBSVC_NATS_URL or the embedded server's")
    load.add_argument("--kafka-bootstrap", help="host:port (default: DBSVC_KAFKA_BOOTSTRAP)")
    load.add_argument(
        "--transport",
        choices=("both", "nats", "kafka"),
        help="default: both when a Kafka bootstrap is known, otherwise nats",
    )
    load.add_argument("--rate", type=float, default=0, help="ticks per second (0: unlimited)")
    load.add_argument(
        "--seed",
        type=int,
        help="random walk and event ids; the same seed re-publishes the same events "
        "(default: a new one, printed in the summary)",
    )
    return parser


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return number


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        return await _serve(settings)
    if args.command == "ingest-load":
        return await _ingest_load(args, settings)
    replay = args.command == "dead-letters" and args.action == "replay"
    if replay and bool(args.ids) == args.all_pending:
        print("dead-letters replay: give IDs or --all-pending, not both", file=sys.stderr)
        return 2

    # The operator at this machine holds the data directory and the master key: a platform
    # administrator, named in the audit trail like any other caller.
    operator = everything(service=f"cli:{getpass.getuser()}")

    async def tenant(core: Application) -> int:
        admin = core.tenant_admin
        if args.action == "create":
            record = await admin.create(
                operator,
                args.tenant_id,
                connection_limit=args.connection_limit,
                statement_timeout_ms=args.statement_timeout_ms,
            )
            _print(record.public_dict())
        elif args.action == "list":
            _print([r.public_dict() for r in await admin.list(operator)])
        elif args.action == "suspend":
            _print((await admin.suspend(operator, args.tenant_id)).public_dict())
        elif args.action == "resume":
            _print((await admin.resume(operator, args.tenant_id)).public_dict())
        elif args.action == "delete":
            await admin.delete(operator, args.tenant_id, confirm=args.confirm)
            _print({"tenant_id": args.tenant_id, "deleted": True})
        return 0

    async def service(core: Application) -> int:
        admin = core.service_admin
        if args.action == "create":
            identity, secret = await admin.create(
                operator, args.name, tenants=_split(args.tenants), scopes=args.scopes
            )
            _print({**identity.public_dict(), "secret": secret})
        elif args.action == "list":
            _print([s.public_dict() for s in await admin.list(operator)])
        else:
            await admin.set_active(operator, args.name, args.action == "enable")
            _print({"service": args.name, "status": f"{args.action}d"})
        return 0

    async def token(core: Application) -> int:
        if args.register and not any(
            s.name == args.service for s in await core.service_admin.list(operator)
        ):
            if not args.tenants or not args.scopes:
                print("--register needs --tenants and --scopes", file=sys.stderr)
                return 2
            await core.service_admin.create(
                operator,
                args.service,
                tenants=_split(args.tenants),
                scopes=args.scopes,
                with_secret=False,
            )
        try:
            issued = await core.service_admin.issue_token(
                operator,
                args.service,
                tenants=_split(args.tenants) if args.tenants else None,
                scopes=args.scopes,
                ttl_seconds=args.ttl,
            )
        except NotFound:
            print(
                f"service {args.service!r} does not exist; create it with 'service create' "
                "or pass --register with --tenants and --scopes",
                file=sys.stderr,
            )
            return 2
        print(issued.token)
        return 0

    async def migrate(core: Application) -> int:
        report = await core.tenant_admin.migrate(operator, args.tenants, progress=_progress)
        print(
            f"control plane: {len(report.control_applied)} applied; tenants: "
            f"{len(report.tenants) - len(report.failed)} ok, {len(report.failed)} failed"
        )
        return 1 if report.failed else 0

    async def dead_letters(core: Application) -> int:
        admin = core.dead_letter_admin
        if args.action == "list":
            letters = await admin.list(
                operator, tenant_id=args.tenant, pending_only=not args.all, limit=args.limit
            )
            _print([letter.public_dict() for letter in letters])
            return 0
        report = await admin.replay(operator, args.ids or None, tenant_id=args.tenant)
        _print(report.to_dict())
        if report.refused:
            print(
                f"{report.refused} dead letter(s) refused (authorization, then or now): left "
                "pending, not stored; see 'refusals' for why and what to do",
                file=sys.stderr,
            )
        return 0

    handlers = {
        "tenant": tenant,
        "service": service,
        "token": token,
        "migrate": migrate,
        "dead-letters": dead_letters,
    }
    return await _with_core(settings, handlers[args.command])


async def _ingest_load(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: only this command publishes (nats-py and aiokafka are the client's extra).
    from database_service.ingest.loadgen import publish_load  # noqa: PLC0415
    from database_service_client import MarketDataPublisher  # noqa: PLC0415

    kafka_bootstrap = args.kafka_bootstrap or settings.kafka_bootstrap
    transport = args.transport or ("both" if kafka_bootstrap else "nats")
    if transport in ("both", "kafka") and not kafka_bootstrap:
        print(
            f"--transport {transport} needs --kafka-bootstrap (or DBSVC_KAFKA_BOOTSTRAP)",
            file=sys.stderr,
        )
        return 2
    nats_url = None
    if transport in ("both", "nats"):
        nats_url = args.nats_url or settings.nats_url or f"nats://127.0.0.1:{settings.nats_port}"
    if transport == "nats":
        kafka_bootstrap = None
    token = args.token
    if token is None:
        admin = settings.resolve_secrets().bootstrap_admin_token
        assert admin is not None  # resolve_secrets sets it
        token = admin.get_secret_value()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    # The service's configured subject and topic for trading data (the first of each list).
    subjects = settings.ingest_nats_subjects or ["database.trading-data"]
    topics = settings.ingest_kafka_topics or ["database-trading-data"]
    async with MarketDataPublisher(
        token,
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        producer="database-service ingest-load",
        nats_subjects={"trading": subjects[0]},
        kafka_topics={"trading": topics[0]},
    ) as publisher:
        summary, ok = await publish_load(
            publisher, tenant=args.tenant, ticks=args.ticks, batch=args.batch,
            symbols=args.symbols, seed=seed, rate=args.rate,
        )  # fmt: skip
    _print(summary)
    return 0 if ok else 1


def _split(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    return [ALL_TENANTS] if items == [ALL_TENANTS] else items


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"database-service: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if settings.event_loop == "uvloop":
            return uvloop.run(_run(args, settings))
        return asyncio.run(_run(args, settings))
    except DatabaseServiceError as exc:
        print(f"database-service: {exc.error_code}: {exc.message}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"database-service: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
