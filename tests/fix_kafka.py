"""Apache Kafka for the tests: ``DBSVC_TEST_KAFKA_BOOTSTRAP`` (host:port), or the single-node
KRaft broker of ``scripts/kafka.sh``, shared by the test sessions that run at the same time.

Without the variable the session takes a lease on the broker (``kafka.sh acquire``), which starts
it when needed, and drops the lease at the end (``kafka.sh release``): a broker started by a lease
stops with the last lease, one started by hand (``kafka.sh start``) is left running. There is no
skip: a broker that cannot start fails the run. Tests share the broker, so each names its topics
and groups with ``kafka_topic_prefix``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "kafka.sh"


def kafka_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    bootstrap = os.environ.get("DBSVC_TEST_KAFKA_BOOTSTRAP")
    if bootstrap:
        yield bootstrap
        return
    lease = str(os.getpid())
    acquired = kafka_sh("acquire", lease)
    if acquired.returncode != 0:
        pytest.fail(f"scripts/kafka.sh could not start Kafka:\n{acquired.stderr}", pytrace=False)
    try:
        yield kafka_sh("url").stdout.strip()
    finally:
        kafka_sh("release", lease)


@pytest.fixture
def kafka_topic_prefix() -> str:
    """A prefix unique to this test for its topics and consumer groups: ``t<hex>-``."""
    return f"t{secrets.token_hex(4)}-"


class PrivateKafka:
    """A broker of one test's own (state dir and ports of its own), which it may stop and start:
    the shared broker must stay up for everyone else."""

    def __init__(self, state_dir: Path) -> None:
        from database_service.supervisor import free_port

        self.port = free_port()
        self.env = {
            **os.environ,
            "KAFKA_STATE_DIR": str(state_dir),
            "KAFKA_PORT": str(self.port),
            "KAFKA_CONTROLLER_PORT": str(free_port()),
        }

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, command: str) -> None:
        done = subprocess.run(
            ["bash", str(SCRIPT), command], cwd=ROOT, env=self.env, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"kafka.sh {command} (private broker) failed:\n{done.stderr}")

    def start(self) -> None:
        self._run("start")

    def stop(self) -> None:
        self._run("stop")


@pytest.fixture
def private_kafka(tmp_path: Path) -> Iterator[PrivateKafka]:
    broker = PrivateKafka(tmp_path / "kafka")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
