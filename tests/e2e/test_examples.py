"""The README's examples run as written against a live ``database-service serve``, in the order
the README gives them, twice (a second run finds what the first created), and the README shows
each one verbatim, so it cannot drift from what is tested."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_serve import Served

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent


def readme_examples() -> dict[str, str]:
    """``<!-- example: path -->`` followed by a fenced block, as the README has them."""
    text = (ROOT / "README.md").read_text()
    pattern = re.compile(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```\n", re.DOTALL)
    return {path: body for path, body in pattern.findall(text)}


def test_the_readme_shows_every_example_verbatim() -> None:
    shown = readme_examples()
    files = sorted(f"examples/{p.name}" for p in EXAMPLES.iterdir() if p.suffix in (".sh", ".py"))
    assert sorted(shown) == files
    for path, body in shown.items():
        assert body == (ROOT / path).read_text(), f"README's copy of {path} differs"


@pytest.fixture(scope="module")
def live() -> Iterator[Served]:
    with tempfile.TemporaryDirectory(prefix="dbsvc-examples-") as tmp:
        served = Served(Path(tmp) / "data")
        try:
            served.wait_healthy(timeout=180)  # two workers starting beside another suite
            yield served
            code, output = served.stop()
            assert code == 0, output
        finally:
            served.kill()  # only if it did not stop: its children would outlive a SIGKILL


def run(served: Served, command: list[str], **env: str) -> str:
    environment = {
        **served.env,
        # The examples say `.venv/bin/...` as `make run` leaves it; here the test's own venv.
        "DBSVC": str(BIN / "database-service"),
        "DBSVC_URL": served.base,
        "DBSVC_GRPC": f"127.0.0.1:{served.env['DBSVC_GRPC_PORT']}",
        "DBSVC_NATS": f"nats://127.0.0.1:{served.env['DBSVC_NATS_PORT']}",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        **env,
    }
    result = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def token(served: Served, *args: str) -> str:
    return run(served, [str(BIN / "database-service"), "token", "issue", *args]).strip()


@pytest.mark.parametrize("attempt", ["first run", "second run"])
def test_the_examples_run_as_written_against_a_live_service(live: Served, attempt: str) -> None:
    quick = run(live, ["bash", "examples/quickstart.sh"])
    # The read at the end returns the user the write put there.
    assert '"u1@abc.example"' in quick.splitlines()[-1], quick

    cli = run(live, ["bash", "examples/cli_quickstart.sh"])
    assert "token for 'reporting':" in cli, cli
    assert json.loads(cli[cli.index("[") : cli.index("]") + 1])[0]["tenant_id"] == "abc"

    ingest = token(
        live, "--service", "feed", "--register", "--tenants", "abc", "--scopes", "ingest"
    )
    published = run(live, [sys.executable, "examples/publish_ticks.py"], INGEST_TOKEN=ingest)
    assert "records=200" in published.replace(" ", ""), published

    service = token(
        live, "--service", "trading-engine", "--register", "--tenants", "abc",
        "--scopes", "read,write",
    )  # fmt: skip
    # Stored within about a second, as publish_ticks.py says; wait for it rather than race.
    end = dt.datetime.now(dt.UTC)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ticks = httpx.get(
            f"{live.base}/api/v1/timeseries/ticks",
            params={"symbol": "EURUSD", "start": (end - dt.timedelta(hours=1)).isoformat(),
                    "end": end.isoformat()},
            headers={"Authorization": f"Bearer {service}", "X-Tenant-Id": "abc"},
        )  # fmt: skip
        assert ticks.status_code == 200, ticks.text
        if len(ticks.text.splitlines()) >= 200:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the published ticks were not stored within 30 s")

    out = run(live, [sys.executable, "examples/client_quickstart.py"], SERVICE_TOKEN=service)
    assert "user u2 u2@abc.example" in out, out
    assert "streamed 100000 rows" in out and "health: healthy" in out, out
    ticks_line = next(line for line in out.splitlines() if line.startswith("ticks "))
    assert int(ticks_line.split()[1]) >= 200, out
