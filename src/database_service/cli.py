"""``database-service serve | tenant … | service … | token issue | migrate``.

Administrative commands work on the database directly (the same components the server uses), so
they work whether or not a server is running; with the embedded PostgreSQL they use the same data
directory, and stop the embedded server afterwards only if they were the ones to start it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import uvicorn
import uvloop

from database_service.app import Application
from database_service.auth import ALL_TENANTS, parse_scopes
from database_service.config import ConfigError, Settings
from database_service.errors import DatabaseServiceError
from database_service.tenancy import TenantLimits
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
        ]
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
    return parser


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        return await _serve(settings)

    async def tenant(core: Application) -> int:
        if args.action == "create":
            d = core.tenants.default_limits
            limits = TenantLimits(
                args.connection_limit or d.connection_limit,
                args.statement_timeout_ms or d.statement_timeout_ms,
            )
            _print((await core.tenants.create(args.tenant_id, limits)).public_dict())
        elif args.action == "list":
            _print([r.public_dict() for r in await core.registry.list()])
        elif args.action == "suspend":
            _print((await core.tenants.suspend(args.tenant_id)).public_dict())
        elif args.action == "resume":
            _print((await core.tenants.resume(args.tenant_id)).public_dict())
        elif args.action == "delete":
            await core.tenants.delete(args.tenant_id, confirm=args.confirm)
            _print({"tenant_id": args.tenant_id, "deleted": True})
        return 0

    async def service(core: Application) -> int:
        if args.action == "create":
            identity, secret = await core.services.register(
                args.name, tenants=_split(args.tenants), scopes=parse_scopes(args.scopes)
            )
            _print({**identity.public_dict(), "secret": secret})
        elif args.action == "list":
            _print([s.public_dict() for s in await core.services.list()])
        else:
            await core.services.set_active(args.name, args.action == "enable")
            _print({"service": args.name, "status": f"{args.action}d"})
        return 0

    async def token(core: Application) -> int:
        identity = await core.services.find(args.service)
        if identity is None:
            if not args.register:
                print(
                    f"service {args.service!r} does not exist; create it with 'service create' "
                    "or pass --register with --tenants and --scopes",
                    file=sys.stderr,
                )
                return 2
            if not args.tenants or not args.scopes:
                print("--register needs --tenants and --scopes", file=sys.stderr)
                return 2
            identity, _ = await core.services.register(
                args.service,
                tenants=_split(args.tenants),
                scopes=parse_scopes(args.scopes),
                with_secret=False,
            )
        tenants = _split(args.tenants) if args.tenants else sorted(identity.tenants)
        scopes = parse_scopes(args.scopes) if args.scopes else identity.scopes
        ttl = args.ttl or settings.token_default_ttl_seconds
        print(core.tokens.issue(identity.name, tenants=tenants, scopes=scopes, ttl_seconds=ttl))
        return 0

    async def migrate(core: Application) -> int:
        async with core.owner_pool.acquire() as conn:
            report = await core.migrator.migrate(conn, tenant_ids=args.tenants, progress=_progress)
        print(
            f"control plane: {len(report.control_applied)} applied; tenants: "
            f"{len(report.tenants) - len(report.failed)} ok, {len(report.failed)} failed"
        )
        return 1 if report.failed else 0

    handlers = {"tenant": tenant, "service": service, "token": token, "migrate": migrate}
    return await _with_core(settings, handlers[args.command])


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
