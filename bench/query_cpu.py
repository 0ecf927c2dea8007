"""The service's CPU per request on the gRPC query path: PK lookups, result-cache hits, and a
bare grpc-python echo (``grpc_query.py``'s) as the floor — measured in CPU seconds of the
serving process, not wall time, so that it means something on a shared machine.

The service runs as its own process (``database-service serve``, one worker) on a private
PostgreSQL; the echo in another process answering the service's own bytes. The client in this
process drives ``--requests`` calls of each kind at each concurrency, in alternating rounds,
reading the server process's user+system CPU (``harness.cpu_seconds``) before and after;
medians of the rounds.
``--profile pk|hit`` also records the service with py-spy (``--profile-seconds``) while it
serves that kind at concurrency 32 and prints the frames with the most samples.
``--baseline SRC`` also runs a second service from another source tree (``git archive <commit>
src | tar -x -C DIR`` and pass ``DIR/src``), measured in the same rounds: the ratio of the two,
round by round, is what a change saved, whatever the machine's load did meanwhile.

The last line is one JSON object of the figures (``{"bench": "query_cpu", ...}``).

    .venv/bin/python bench/query_cpu.py [--requests 2000] [--rounds 3] [--profile pk]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc_query  # bench/ is on sys.path as a script
import psutil
import uvloop
from harness import cpu_seconds, reporting, running_service

from database_service.supervisor import free_port
from database_service_client import MultiDatabaseClient

PK = grpc_query.PK
CACHED = dt.timedelta(seconds=300)
CONCURRENCIES = (1, 32)


async def drive(call: Callable[[int], Awaitable[Any]], requests: int, concurrency: int) -> None:
    """``requests`` calls, ``concurrency`` at a time (each worker sends its next when the last
    answered)."""
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            await call(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def cpu_per_request(
    process: psutil.Process,
    call: Callable[[int], Awaitable[Any]],
    requests: int,
    concurrency: int,
) -> float:
    """The server's CPU milliseconds per request over ``requests`` calls."""
    await drive(call, min(200, requests), concurrency)  # warm: channels, pools, caches
    before = cpu_seconds(process.pid)
    await drive(call, requests, concurrency)
    return (cpu_seconds(process.pid) - before) * 1000 / requests


@contextlib.asynccontextmanager
async def echo_process(small: bytes, large: bytes) -> AsyncIterator[tuple[str, int]]:
    """``grpc_query.py``'s echo in a process of its own: its target and pid."""
    with tempfile.TemporaryDirectory() as tmp:
        await asyncio.to_thread(Path(tmp, "small").write_bytes, small)
        await asyncio.to_thread(Path(tmp, "large").write_bytes, large)
        port = free_port()
        process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness is read below
            [
                sys.executable,
                grpc_query.__file__,
                "--echo-server",
                str(port),
                f"{tmp}/small",
                f"{tmp}/large",
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            await asyncio.to_thread(process.stdout.readline)
            yield f"127.0.0.1:{port}", process.pid
        finally:
            process.terminate()
            process.wait(10)


def top_frames(raw: str, count: int = 25) -> list[tuple[str, float, float]]:
    """From py-spy's collapsed stacks: the frames with the most samples, (frame, % of samples
    with it anywhere on the stack, % with it on top)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for stack_line in raw.splitlines():
        stack, _, samples = stack_line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    return [
        (frame, 100 * n / max(total, 1), 100 * own[frame] / max(total, 1))
        for frame, n in inclusive.most_common(count)
    ]


async def profile(
    pid: int, call: Callable[[int], Awaitable[Any]], seconds: float, out: Path
) -> None:
    recorder = subprocess.Popen(  # noqa: ASYNC220 - runs alongside the load below
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--format",
            "raw",
            "--rate",
            "200",
            "--duration",
            str(int(seconds)),
            "--pid",
            str(pid),
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.perf_counter()
    while recorder.poll() is None:
        await drive(call, 500, 32)
        if time.perf_counter() - started > seconds + 30:
            recorder.terminate()
    raw = await asyncio.to_thread(out.read_text)
    print(f"py-spy, {seconds:g} s: frame, % of samples (anywhere on the stack, on top)")
    for frame, anywhere, on_top in top_frames(raw):
        print(f"  {anywhere:5.1f} {on_top:5.1f}  {frame}")


@dataclass
class Served:
    """One service under measurement: its process and its client's calls."""

    process: psutil.Process
    client: MultiDatabaseClient
    pk: Callable[[int], Awaitable[Any]]
    hit: Callable[[int], Awaitable[Any]]


def key(i: int) -> str:
    return f"u{i % 100000 + 1:06d}"


@contextlib.asynccontextmanager
async def served(baseline: str | None = None) -> AsyncIterator[tuple[Served, bytes, bytes]]:
    """The service (``baseline``: from that source tree instead, put first on PYTHONPATH),
    its tenant and rows, and the bytes the echo answers."""
    env: dict[str, Any] = {"DBSVC_WORKERS": "1", "DBSVC_POOL_MAX_PER_TENANT": "8"}
    if baseline is not None:
        env["PYTHONPATH"] = baseline
    async with running_service(**env) as service:
        schema, token = await service.tenant("bench", ["read", "write"])
        await grpc_query.users(service.dsn, schema)
        client = MultiDatabaseClient(service.grpc, "bench", token)
        small = await grpc_query.recorded(service.grpc, token, PK, ["u000001"])
        large = await grpc_query.recorded(service.grpc, token, grpc_query.RANGE, [])

        async def pk(i: int) -> Any:
            return await client.fetch_all(PK, [key(i)])

        async def hit(i: int) -> Any:
            # 100 keys, read before the measurement: hits once warm.
            return await client.fetch_all(PK, [key(i % 100)], cache=CACHED)

        for i in range(100):
            assert (await hit(i)).cache in ("miss", "hit")
        assert (await hit(0)).cache == "hit"
        try:
            yield Served(psutil.Process(service.pid), client, pk, hit), small, large
        finally:
            await client.close()


async def main(
    requests: int,
    rounds: int,
    only_profile: str | None,
    seconds: float,
    baseline: str | None,
    concurrencies: list[int],
    figures: dict[str, Any],
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        ours, small, large = await stack.enter_async_context(served())
        if only_profile is not None:
            out = Path(tempfile.mkdtemp()) / f"{only_profile}.txt"
            call = ours.pk if only_profile == "pk" else ours.hit
            await profile(ours.process.pid, call, seconds, out)
            print(f"  collapsed stacks: {out}")
            return
        kinds: dict[str, tuple[psutil.Process, Callable[[int], Awaitable[Any]]]] = {}
        echo_target, echo_pid = await stack.enter_async_context(echo_process(small, large))
        echo_client = MultiDatabaseClient(echo_target, "bench", "-")
        stack.push_async_callback(echo_client.close)

        async def echo(i: int) -> Any:
            return await echo_client.fetch_all(PK, [key(i)])

        base = None
        if baseline is not None:
            base, _, _ = await stack.enter_async_context(served(baseline))
        # Each of ours next to the baseline's same kind: the pair sees the same load.
        kinds["echo"] = (psutil.Process(echo_pid), echo)
        kinds["pk"] = (ours.process, ours.pk)
        if base is not None:
            kinds["base_pk"] = (base.process, base.pk)
        kinds["hit"] = (ours.process, ours.hit)
        if base is not None:
            kinds["base_hit"] = (base.process, base.hit)
        # Alternating rounds: a change in the machine's load lands on every kind alike.
        samples: dict[str, list[float]] = collections.defaultdict(list)
        for round_number in range(rounds):
            # Every other round in reverse: each of a pair goes first as often as the other
            # (in a fixed order the paired ratios moved from run to run, 0.87-0.98x for one
            # change, by more than the change itself).
            order = list(kinds.items())
            if round_number % 2:
                order.reverse()
            for concurrency in concurrencies:
                for name, (process, call) in order:
                    samples[f"{name}_c{concurrency}"].append(
                        await cpu_per_request(process, call, requests, concurrency)
                    )
    print(f"server CPU ms per request, median of {rounds} rounds of {requests} requests")
    for concurrency in concurrencies:
        echo_ms = statistics.median(samples[f"echo_c{concurrency}"])
        for name in kinds:
            runs = samples[f"{name}_c{concurrency}"]
            ms = statistics.median(runs)
            spread = ", ".join(f"{s:.3f}" for s in runs)
            print(
                f"  c={concurrency:<3} {name:<8} {ms:6.3f} ms   {ms / echo_ms:4.2f}x echo"
                f"   ({spread})"
            )
            figures[f"{name}_c{concurrency}_cpu_ms"] = ms
        for name in ("pk", "hit"):
            figures[f"{name}_c{concurrency}_above_echo_cpu_ms"] = (
                statistics.median(samples[f"{name}_c{concurrency}"]) - echo_ms
            )
            if baseline is not None:
                # Paired by round: ours / the baseline's, measured back to back.
                ratios = [
                    o / b
                    for o, b in zip(
                        samples[f"{name}_c{concurrency}"],
                        samples[f"base_{name}_c{concurrency}"],
                        strict=True,
                    )
                ]
                figures[f"{name}_c{concurrency}_vs_baseline"] = statistics.median(ratios)
                print(
                    f"  c={concurrency:<3} {name:<8} vs baseline {statistics.median(ratios):5.3f}"
                    f" (median of per-round ratios)"
                )
    figures |= {"requests": requests, "rounds": rounds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", choices=["pk", "hit"], help="py-spy the service instead")
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument(
        "--baseline",
        metavar="SRC",
        help="also measure a service run from this source tree (e.g. `git archive` of an older"
        " commit's src/), in the same rounds",
    )
    parser.add_argument(
        "--concurrency", type=int, action="append", help="repeatable; default: 1 and 32"
    )
    args = parser.parse_args()
    # Its last line, printed by harness.reporting on exit (and on interruption):
    # {"bench": "query_cpu", ...the figures below}
    with reporting("query_cpu") as figures:
        uvloop.run(
            main(
                args.requests,
                args.rounds,
                args.profile,
                args.profile_seconds,
                args.baseline,
                args.concurrency or list(CONCURRENCIES),
                figures,
            )
        )
