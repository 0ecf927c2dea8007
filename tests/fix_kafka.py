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
