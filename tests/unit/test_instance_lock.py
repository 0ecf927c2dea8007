"""One serving instance per data directory, the usage lock that decides who may stop the
embedded PostgreSQL, and ports checked before anything starts."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from database_service.supervisor import (
    AlreadyRunning,
    InstanceLock,
    PortInUse,
    UsageLock,
    bind_tcp,
    check_port_free,
)


def test_a_second_instance_lock_names_the_holder_and_its_endpoints(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path / "data")
    first.acquire(REST="http://127.0.0.1:8080/api/v1/", gRPC="127.0.0.1:50051")
    first.describe(state="running", NATS="nats://127.0.0.1:4222")
    try:
        with pytest.raises(AlreadyRunning) as refused:
            InstanceLock(tmp_path / "data").acquire()
        message = str(refused.value)
        assert f"PID {os.getpid()}" in message
        for endpoint in (
            "http://127.0.0.1:8080/api/v1/",
            "127.0.0.1:50051",
            "nats://127.0.0.1:4222",
        ):
            assert endpoint in message
        assert str(tmp_path / "data") in message and "DBSVC_DATA_DIR" in message
        on_disk = json.loads((tmp_path / "data" / "instance.lock").read_text())
        assert on_disk["pid"] == os.getpid() and on_disk["state"] == "running"
    finally:
        first.release()
    again = InstanceLock(tmp_path / "data")
    again.acquire()  # released: free again, and the file is the same one (never replaced)
    again.release()


def test_the_usage_lock_tells_the_last_user(tmp_path: Path) -> None:
    one, two = UsageLock(tmp_path / "pg.lock"), UsageLock(tmp_path / "pg.lock")
    one.acquire_shared()
    two.acquire_shared()
    assert not one.last_user()  # two still uses the server: one must not stop it
    one.release()
    assert two.last_user()
    two.release()


def test_a_listening_port_is_refused_even_with_so_reuseport() -> None:
    # gRPC listens with SO_REUSEPORT by default; our check must still see the port as taken.
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortInUse) as refused:
            check_port_free("127.0.0.1", port, what="gRPC", setting="DBSVC_GRPC_PORT")
        assert f"gRPC port {port} on 127.0.0.1 is in use" in str(refused.value)
        assert "DBSVC_GRPC_PORT" in str(refused.value)
    check_port_free("127.0.0.1", 0, what="HTTP", setting="DBSVC_HTTP_PORT")  # 0: any port
    bind_tcp("127.0.0.1", port, what="HTTP", setting="DBSVC_HTTP_PORT").close()  # free again
