"""The relationship graph on PostgreSQL: 3-hop traversals and shortest paths on a scale-free
copy-trading network, straight SQL on asyncpg vs. the service (gRPC, MultiDatabaseClient).

Builds a network by preferential attachment (each new trader copies ``m`` traders chosen in
proportion to how many copy them already, plus one: a few traders are copied by thousands), with
at least 1,000,000 ``copies`` edges, and loads it with binary COPY into the tenant's graph tables
(which the service created on the tenant's first write). Then, for random traders:

- traverse3: every trader reachable in 1..3 ``copies`` steps (outbound: whom one copies,
  transitively), each once at its fewest steps;
- shortest path: between two random traders, either direction, at most 6 steps;
- weighted path: the least total copy ratio between the same pairs, outbound, at most 6 steps
  (the round-by-round Bellman-Ford search, one statement per round).

Each is timed as the service runs it (``graph_traverse`` / ``graph_shortest_path`` over gRPC)
and as the same statements run straight on asyncpg as the owner (the traversal's recursive CTE;
the shortest path's bidirectional search, one statement per level), in the same run; p50, p99
and the ratio are printed.

    .venv/bin/python bench/graph.py [--edges 1000000] [--m 5] [--runs 200]

The last line is one JSON object (``{"bench": "graph", "traverse3_p50_ms", ...}``, printed by
``harness.reporting``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
from harness import p99, reporting, running_service  # bench/ is on sys.path when run as a script

from database_service.stores.graph.model import Direction, GraphLimits, ShortestPath, Traverse
from database_service.stores.graph.postgres import _bidirectional, _weighted
from database_service.stores.graph.sql import GraphSql
from database_service_client import MultiDatabaseClient

SEED = 13
TENANT = "copytrade"
TIERS = ("free", "pro", "enterprise")


def network(edges: int, m: int, rng: random.Random) -> tuple[int, list[tuple[int, int]]]:
    """Preferential attachment: trader ``v`` copies ``m`` distinct earlier traders, each
    picked with probability proportional to (the traders copying it + 1)."""
    pool: list[int] = list(range(m + 1))  # each trader once, then once more per copier
    pairs: list[tuple[int, int]] = []
    v = m + 1
    while len(pairs) < edges:
        chosen: set[int] = set()
        while len(chosen) < m:
            chosen.add(pool[rng.randrange(len(pool))])
        for t in chosen:
            pairs.append((v, t))
            pool.append(t)
        pool.append(v)
        v += 1
    return v, pairs


class _NoLimit:
    """The baseline's stand-in for the service's session watch: no limits kept."""

    @contextlib.asynccontextmanager
    async def _statement(self) -> AsyncIterator[None]:
        yield

    def statement(self) -> Any:
        return self._statement()


async def timed(
    calls: list[Callable[[], Awaitable[Any]]],
) -> tuple[list[float], list[Any]]:
    samples, results = [], []
    for call in calls:
        started = time.perf_counter()
        results.append(await call())
        samples.append((time.perf_counter() - started) * 1000)
    return samples, results


def summary(label: str, base: list[float], ours: list[float], figures: dict[str, Any]) -> None:
    b50, o50 = statistics.median(base), statistics.median(ours)
    print(
        f"  {label:<14} asyncpg p50 {b50:7.2f} ms  p99 {p99(base):7.2f} ms   service p50"
        f" {o50:7.2f} ms  p99 {p99(ours):7.2f} ms   ratio {o50 / b50:5.2f}x"
    )
    figures |= {
        f"{label}_direct_p50_ms": b50,
        f"{label}_direct_p99_ms": p99(base),
        f"{label}_p50_ms": o50,
        f"{label}_p99_ms": p99(ours),
        f"{label}_ratio": o50 / b50,
    }


async def main(edges: int, m: int, runs: int, figures: dict[str, Any]) -> None:
    rng = random.Random(SEED)
    started = time.perf_counter()
    traders, pairs = network(edges, m, rng)
    print(f"network: {traders:,} traders, {len(pairs):,} copies edges", end="")
    print(f" (built in {time.perf_counter() - started:.1f} s)", flush=True)
    async with running_service(DBSVC_WORKERS="1") as service:
        schema, token = await service.tenant(TENANT, ["read", "write"])
        client = MultiDatabaseClient(service.grpc, TENANT, token, timeout=120)
        # The tenant's first write creates its graph tables (as its own role).
        await client.graph_upsert_vertices("users", [{"_key": "0"}, {"_key": "1"}])
        await client.graph_upsert_edges("copies", [{"_from": "users/1", "_to": "users/0"}])
        owner = await asyncpg.connect(service.dsn)
        sql = GraphSql(schema)
        await owner.execute(f"TRUNCATE {sql.edges}, {sql.vertices}")
        started = time.perf_counter()
        vertices = [
            (
                f"users/{i}",
                "users",
                json.dumps(
                    {"tier": TIERS[i % 3], "exposure": {"EURUSD": round(rng.random() * 1e5, 2)}}
                ),
            )
            for i in range(traders)
        ]
        await owner.copy_records_to_table(
            "_graph_vertices",
            schema_name=schema,
            columns=["id", "collection", "props"],
            records=vertices,
        )
        records = [
            (
                f"copies/{v}-{t}",
                "copies",
                f"users/{v}",
                f"users/{t}",
                json.dumps({"ratio": rng.randrange(1, 41) / 20}),  # 0.05 to 2.0
            )
            for v, t in pairs
        ]
        await owner.copy_records_to_table(
            "_graph_edges",
            schema_name=schema,
            columns=["id", "collection", "_from", "_to", "props"],
            records=records,
        )
        await owner.execute(f"VACUUM ANALYZE {sql.vertices}")
        await owner.execute(f"VACUUM ANALYZE {sql.edges}")
        load_s = time.perf_counter() - started
        print(f"loaded by COPY in {load_s:.1f} s ({len(pairs) / load_s:,.0f} edges/s)")
        top = await owner.fetchval(
            f"SELECT max(n) FROM (SELECT count(*) n FROM {sql.edges} GROUP BY _to) c"
        )
        print(f"the most copied trader has {top:,} copiers")
        figures |= {"traders": traders, "edges": len(pairs), "load_s": load_s, "max_in": top}

        limits = GraphLimits()
        starts = [f"users/{rng.randrange(traders)}" for _ in range(runs)]
        queries = [Traverse(s, Direction.OUTBOUND, 1, 3, ("copies",), limit=10_000) for s in starts]

        async def direct_traverse(q: Traverse) -> int:
            text, args = sql.traverse(q, limits.max_visits)
            return len(await owner.fetch(text, *args))

        async def service_traverse(q: Traverse) -> int:
            answer = await client.graph_traverse(
                q.start, max_depth=3, edge_collections=["copies"], limit=10_000
            )
            return len(answer["hits"])

        # The service's floor: a one-row read (get a vertex) through the same client.
        floor, _ = await timed([lambda s=s: client.graph_get_vertex(s) for s in starts])
        figures["get_vertex_p50_ms"] = statistics.median(floor)
        print(f"get_vertex through the service (its floor): p50 {statistics.median(floor):.2f} ms")
        for q in queries[:5]:  # warm both paths (plans, caches)
            await direct_traverse(q)
            await service_traverse(q)
        print(f"3-hop traversal from {runs} random traders (outbound copies):")
        base, counts = await timed([lambda q=q: direct_traverse(q) for q in queries])
        ours, ours_counts = await timed([lambda q=q: service_traverse(q) for q in queries])
        assert counts == ours_counts, "the service and the SQL disagree"
        print(f"  vertices reached: median {statistics.median(counts):.0f}, max {max(counts)}")
        summary("traverse3", base, ours, figures)

        ends = [f"users/{rng.randrange(traders)}" for _ in range(runs)]
        paths = [
            ShortestPath(s, e, Direction.ANY, 6, ("copies",))
            for s, e in zip(starts, ends, strict=True)
        ]
        statements = [
            sql.expand(forward, Direction.ANY, ("copies",), (), meeting=meeting)
            for meeting in (False, True)
            for forward in (True, False)
        ]

        async def direct_path(q: ShortestPath) -> int:
            async with owner.transaction(isolation="repeatable_read", readonly=True):
                found = await _bidirectional(
                    owner,
                    _NoLimit(),  # type: ignore[arg-type]
                    q,
                    statements,
                    limits,
                )
            return found.length if found.found else -1

        async def service_path(q: ShortestPath) -> int:
            answer = await client.graph_shortest_path(
                q.start, q.end, direction="any", max_depth=6, edge_collections=["copies"]
            )
            return len(answer["edges"]) if answer["found"] else -1

        for q in paths[:5]:
            await direct_path(q)
            await service_path(q)
        print(f"shortest path between {runs} random pairs (either direction, <= 6 steps):")
        base, lengths = await timed([lambda q=q: direct_path(q) for q in paths])
        ours, ours_lengths = await timed([lambda q=q: service_path(q) for q in paths])
        assert lengths == ours_lengths, "the service and the SQL disagree"
        found = [n for n in lengths if n >= 0]
        print(f"  found {len(found)}/{runs}, median length {statistics.median(found or [0]):.0f}")
        summary("shortest_path", base, ours, figures)
        figures["shortest_path_found"] = len(found)

        # Weighted by the copy ratio, outbound (whom one copies, transitively), <= 6 steps, to
        # one of the 100 earliest traders (outbound walks lead to earlier traders: a random end
        # is mostly unreachable, which would time only the search's exhaustion).
        weighted = [
            ShortestPath(
                s,
                f"users/{rng.randrange(min(traders, 100))}",
                Direction.OUTBOUND,
                6,
                ("copies",),
                weight_attribute="ratio",
            )
            for s in starts
        ]
        relax = sql.relax(Direction.OUTBOUND, ("copies",), (), ("ratio",), 1.0)

        async def direct_weighted(q: ShortestPath) -> float:
            async with owner.transaction(isolation="repeatable_read", readonly=True):
                found = await _weighted(owner, _NoLimit(), q, relax, limits)  # type: ignore[arg-type]
            return found.weight if found.weight is not None else -1.0

        async def service_weighted(q: ShortestPath) -> float:
            answer = await client.graph_shortest_path(
                q.start, q.end, max_depth=6, edge_collections=["copies"], weight_attribute="ratio"
            )
            return float(answer["weight"]) if answer["found"] else -1.0

        for q in weighted[:5]:
            await direct_weighted(q)
            await service_weighted(q)
        print(
            f"weighted shortest path (ratio) from {runs} random traders to early ones (outbound, <= 6):"
        )
        base, weights = await timed([lambda q=q: direct_weighted(q) for q in weighted])
        ours, ours_weights = await timed([lambda q=q: service_weighted(q) for q in weighted])
        assert weights == ours_weights, "the service and the SQL disagree"
        print(f"  found {sum(w >= 0 for w in weights)}/{runs}")
        summary("weighted_path", base, ours, figures)
        figures["weighted_path_found"] = sum(w >= 0 for w in weights)
        await client.close()
        await owner.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=1_000_000)
    parser.add_argument("--m", type=int, default=5, help="traders each new trader copies")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with reporting("graph") as figures:
        asyncio.run(main(args.edges, args.m, args.runs, figures))
