"""``database-service serve`` as an operator runs it: embedded PostgreSQL and nats-server, healthy
within 30 s, clean shutdown on SIGINT/SIGTERM, and the same tenants after a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from database_service.supervisor import free_port

BIN = Path(sys.executable).parent / "database-service"


class Served:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        env = {
            **os.environ,
            "DBSVC_DATA_DIR": str(data_dir),
            "DBSVC_HTTP_PORT": str(self.port),
            "DBSVC_NATS_PORT": str(free_port()),
            "DBSVC_GRPC_PORT": str(free_port()),
        }
        env.pop("DBSVC_POSTGRES_URL", None)
        self.process = subprocess.Popen(
            [str(BIN), "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 30.0) -> dict[str, object]:
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

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        return code, self.output()

    def output(self) -> str:
        if self.process.poll() is None:
            return "(still running)"
        assert self.process.stdout is not None
        return self.process.stdout.read()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path / "data")
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


def postmaster_running(data_dir: Path) -> bool:
    pid_file = data_dir / "pg" / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_is_healthy_stops_cleanly_and_keeps_its_data(served: Served, tmp_path: Path) -> None:
    started = time.monotonic()
    doc = served.wait_healthy(timeout=30)
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
    assert not postmaster_running(served.data_dir)

    again = Served(served.data_dir)
    try:
        again.wait_healthy(timeout=30)
        tenants = httpx.get(f"{again.base}/api/v1/admin/tenants", headers=again.admin()).json()
        assert [t["tenant_id"] for t in tenants["tenants"]] == ["acme"]
        code, output = again.stop(signal.SIGTERM)
        assert code == 0, output
        assert not postmaster_running(served.data_dir)
    finally:
        if again.process.poll() is None:
            again.process.kill()


def test_a_wrong_setting_stops_start_up_with_its_name(tmp_path: Path) -> None:
    env = {**os.environ, "DBSVC_DATA_DIR": str(tmp_path), "DBSVC_POOL_GLOBAL_MAX": "zero"}
    result = subprocess.run(
        [str(BIN), "serve"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "DBSVC_POOL_GLOBAL_MAX" in result.stderr
