"""Vector similarity: top-10 near-vector search through the service (client over gRPC) vs. the
same search straight on pgvector (asyncpg, same SQL, same ef_search), and HNSW recall@10 vs.
exact search on the same data.

One tenant holds --vectors (default 200,000) vectors of --dim (default 384) dimensions in one
cosine collection, among --tenants (default 3) tenants (the others hold a small collection of
the same name). Vectors are clustered like embeddings (200 random centres, uniform noise):
uniform random vectors in 384 dimensions have no near neighbours to find. They are loaded
through the service (gRPC UpsertObjects, batches of 1,000) into the collection with its HNSW
index dropped, then the index is built once as the owner (maintenance_work_mem 1 GB, one
parallel worker): building while loading costs an index insertion per row.

Recall@10: the service's answers against an exact scan (index scans off) for --queries queries.
Latency: closed loops of --seconds at concurrency 1 and 16, service vs. direct.

Then the same on Weaviate (unless --no-weaviate, or no weaviate-server is built: ``bash
scripts/weaviate.sh install``): a weaviate-server started by ``scripts/weaviate.sh`` (its state
under .test-backends/weaviate-bench, emptied after), a second service with
``DBSVC_WEAVIATE_URL``, the same vectors under the same ids loaded through it, its recall@10
against the exact answers found on pgvector, and the same latency loops: keys ``weaviate_*``.

    .venv/bin/python bench/vector.py [--vectors 200000] [--dim 384] [--no-weaviate]

The last line is one json object of the figures (``{"bench": "vector", ...}``, printed by
``harness.reporting``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from harness import closed_loop, p99, reporting, running_service  # bench/ is on sys.path

from database_service.stores.vector import CollectionInfo, Metric, SearchQuery
from database_service.stores.vector.pgvector import EF_SEARCH, PgVectorStore, table_name
from database_service.tenancy import quote_ident
from database_service_client import MultiDatabaseClient

CENTRES = 200
BATCH = 1000
COLLECTION = "Bench"


class Data:
    """Clustered vectors: a centre (uniform in [-1, 1]) plus uniform noise of ``spread``."""

    def __init__(self, dim: int, seed: int, spread: float = 1.0) -> None:
        self.dim = dim
        self.spread = spread
        self.rng = random.Random(seed)
        centres = random.Random(1)  # the same centres for the data and the queries
        self.centres = [[centres.uniform(-1, 1) for _ in range(dim)] for _ in range(CENTRES)]

    def vector(self) -> list[float]:
        rnd, spread = self.rng.random, self.spread
        centre = self.centres[int(rnd() * CENTRES)]
        return [c + (rnd() - 0.5) * spread for c in centre]


async def load(
    client: MultiDatabaseClient, data: Data, count: int, *, numbered: bool = False
) -> float:
    """``numbered``: the n-th vector's id is UUID(int=n), so that two stores loaded from the
    same Data hold the same objects under the same ids."""
    started = time.perf_counter()
    for start in range(0, count, BATCH):
        batch: list[dict[str, Any]] = [
            {"vector": data.vector()} for _ in range(min(BATCH, count - start))
        ]
        if numbered:
            for n, obj in enumerate(batch, start=start + 1):
                obj["id"] = str(uuid.UUID(int=n))
        await client.vector_upsert(COLLECTION, batch)
        if start and start % 50_000 == 0:
            print(f"  {start:,} loaded ({start / (time.perf_counter() - started):,.0f}/s)")
    return time.perf_counter() - started


class Shared:
    """What the Weaviate run reuses from the pgvector run: the queries and exact answers."""

    recall_queries: list[list[float]]
    exact_ids: list[set[str]]
    search_vectors: list[list[float]]


async def main(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    shared = Shared()
    await pgvector_run(args, figures, shared)
    if args.no_weaviate:
        return
    await weaviate_run(args, figures, shared)


async def pgvector_run(args: argparse.Namespace, figures: dict[str, Any], shared: Shared) -> None:
    dim = args.dim
    async with running_service(DBSVC_WORKERS="2") as service:
        tokens, schemas = {}, {}
        for i in range(args.tenants):
            schemas[i], tokens[i] = await service.tenant(f"vec{i}", ["read", "write", "admin"])
        clients = {
            i: MultiDatabaseClient(service.grpc, f"vec{i}", tokens[i], timeout=600) for i in tokens
        }
        for client in clients.values():
            await client.vector_create_collection(COLLECTION, dim)
        owner = await asyncpg.connect(service.dsn)
        schema = schemas[0]
        table = f"{quote_ident(schema)}.{quote_ident(table_name(COLLECTION))}"
        index = quote_ident(table_name(COLLECTION) + "_hnsw")
        # The neighbours: a small collection each, loaded with their index in place.
        for i in range(1, args.tenants):
            await load(clients[i], Data(dim, seed=100 + i), args.others)
        print(f"loading {args.vectors:,} vectors of {dim} dimensions into tenant vec0 ...")
        await owner.execute(f"DROP INDEX {quote_ident(schema)}.{index}")
        load_s = await load(clients[0], Data(dim, seed=7), args.vectors, numbered=True)
        print(f"loaded through the service in {load_s:.1f} s ({args.vectors / load_s:,.0f}/s)")
        started = time.perf_counter()
        await owner.execute("SET maintenance_work_mem = '1GB'")
        await owner.execute("SET max_parallel_maintenance_workers = 1")
        await owner.execute(
            f"CREATE INDEX {index} ON {table} USING hnsw (vector vector_cosine_ops)"
            " WITH (m = 16, ef_construction = 64)"
        )
        await owner.execute(f"ANALYZE {table}")
        build_s = time.perf_counter() - started
        print(f"HNSW index built in {build_s:.1f} s")
        figures |= {
            "vectors": args.vectors,
            "dimensions": dim,
            "tenants": args.tenants,
            "load_s": load_s,
            "load_per_s": args.vectors / load_s,
            "index_build_s": build_s,
            "ef_search": EF_SEARCH,
        }

        client = clients[0]
        queries = Data(dim, seed=99)
        recall_queries = [queries.vector() for _ in range(args.queries)]
        found = 0
        exact_sets = []
        async with owner.transaction():
            await owner.execute("SET LOCAL enable_indexscan = off")
            for query in recall_queries:
                hits = await client.vector_search(COLLECTION, query, limit=10)
                exact = await owner.fetch(
                    f"SELECT id FROM {table} ORDER BY vector <=> $1::real[]::vector LIMIT 10",
                    query,
                )
                exact_sets.append({r["id"] for r in exact})
                found += len({h["id"] for h in hits} & {str(r["id"]) for r in exact})
        recall = found / (10 * len(recall_queries))
        shared.recall_queries = recall_queries
        shared.exact_ids = [{str(i) for i in ids} for ids in exact_sets]
        print(f"recall@10 over {len(recall_queries)} queries: {recall:.4f} (ef_search {EF_SEARCH})")
        figures["recall_at_10"] = recall
        # The trade-off behind EF_SEARCH: recall straight on pgvector at other ef_search values.
        for ef in (40, 100, 400):
            async with owner.transaction():
                await owner.execute(f"SET LOCAL hnsw.ef_search = {ef}")
                got = 0
                for query, exact_ids in zip(recall_queries, exact_sets, strict=True):
                    rows = await owner.fetch(
                        f"SELECT id FROM {table} ORDER BY vector <=> $1::real[]::vector LIMIT 10",
                        query,
                    )
                    got += len({r["id"] for r in rows} & exact_ids)
            figures[f"recall_at_10_ef{ef}"] = got / (10 * len(recall_queries))
            print(f"  direct, ef_search {ef}: recall@10 {got / (10 * len(recall_queries)):.4f}")

        # The same statement the service runs, straight on pgvector (as the owner).
        info = CollectionInfo(COLLECTION, dim, Metric.COSINE, {})
        sql, _ = PgVectorStore.search_sql(info, SearchQuery([0.0] * dim, 10), table, '"public"')
        direct = await asyncpg.create_pool(
            service.dsn,
            min_size=16,
            max_size=16,
            server_settings={"hnsw.ef_search": str(EF_SEARCH)},
        )
        search_vectors = [queries.vector() for _ in range(500)]
        shared.search_vectors = search_vectors

        def direct_call(_: int) -> Any:
            async def call(i: int) -> Any:
                return await direct.fetch(sql, search_vectors[i % len(search_vectors)], 10)

            return call

        fast = MultiDatabaseClient(service.grpc, "vec0", tokens[0], timeout=60, connections=4)

        def service_call(_: int) -> Any:
            async def call(i: int) -> Any:
                return await fast.vector_search(
                    COLLECTION, search_vectors[i % len(search_vectors)], limit=10
                )

            return call

        for concurrency in (1, 16):
            for label, make in (("direct", direct_call), ("service", service_call)):
                rps, latencies = await closed_loop(
                    [make(w) for w in range(concurrency)], args.seconds
                )
                p50 = statistics.median(latencies)
                print(
                    f"  c{concurrency:<2} {label:<8} p50 {p50:7.2f} ms  p99 {p99(latencies):7.2f} ms"
                    f"  {rps:8.0f} searches/s"
                )
                prefix = "" if label == "service" else "direct_"
                figures |= {
                    f"{prefix}p50_ms_c{concurrency}": p50,
                    f"{prefix}p99_ms_c{concurrency}": p99(latencies),
                    f"{prefix}rps_c{concurrency}": rps,
                }
        figures["vs_pgvector_direct"] = figures["p50_ms_c1"] / figures["direct_p50_ms_c1"]
        figures["vs_pgvector_direct_p99_c16"] = figures["p99_ms_c16"] / figures["direct_p99_ms_c16"]
        figures["seed_target_ms"] = 50
        await direct.close()
        await fast.close()
        for c in clients.values():
            await c.close()
        await owner.close()


ROOT = Path(__file__).resolve().parent.parent


def _weaviate_built() -> bool:
    return Path(_weaviate("path", ROOT)).is_file()


def _weaviate(command: str, state: Path) -> str:
    return subprocess.run(
        ["bash", "scripts/weaviate.sh", command],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "WEAVIATE_STATE_DIR": str(state)},
        cwd=ROOT,
    ).stdout.strip()


async def weaviate_run(args: argparse.Namespace, figures: dict[str, Any], shared: Shared) -> None:
    """The same collection, queries and loops on a service whose vectors live on Weaviate."""
    if not await asyncio.to_thread(_weaviate_built):
        print("weaviate: no weaviate-server built (bash scripts/weaviate.sh install): skipped")
        figures["weaviate"] = "not built"
        return
    state = ROOT / ".test-backends" / "weaviate-bench"
    await asyncio.to_thread(_weaviate, "start", state)
    try:
        url, key = _weaviate("url", state), _weaviate("key", state)
        async with running_service(
            DBSVC_WORKERS="2", DBSVC_WEAVIATE_URL=url, DBSVC_WEAVIATE_API_KEY=key
        ) as service:
            _, token = await service.tenant("vec0", ["read", "write", "admin"])
            client = MultiDatabaseClient(service.grpc, "vec0", token, timeout=600)
            await client.vector_create_collection(COLLECTION, args.dim)
            print(f"weaviate: loading {args.vectors:,} vectors (HNSW built while loading) ...")
            load_s = await load(client, Data(args.dim, seed=7), args.vectors, numbered=True)
            print(f"weaviate: loaded in {load_s:.1f} s ({args.vectors / load_s:,.0f}/s)")
            found = 0
            for query, exact in zip(shared.recall_queries, shared.exact_ids, strict=True):
                hits = await client.vector_search(COLLECTION, query, limit=10)
                found += len({h["id"] for h in hits} & exact)
            recall = found / (10 * len(shared.recall_queries))
            print(f"weaviate: recall@10 {recall:.4f} (against pgvector's exact scan)")
            figures |= {
                "weaviate_load_s": load_s,
                "weaviate_load_per_s": args.vectors / load_s,
                "weaviate_recall_at_10": recall,
            }
            fast = MultiDatabaseClient(service.grpc, "vec0", token, timeout=60, connections=4)
            vectors = shared.search_vectors

            def service_call(_: int) -> Any:
                async def call(i: int) -> Any:
                    return await fast.vector_search(COLLECTION, vectors[i % len(vectors)], limit=10)

                return call

            for concurrency in (1, 16):
                rps, latencies = await closed_loop(
                    [service_call(w) for w in range(concurrency)], args.seconds
                )
                p50 = statistics.median(latencies)
                print(
                    f"  c{concurrency:<2} weaviate p50 {p50:7.2f} ms  p99 {p99(latencies):7.2f} ms"
                    f"  {rps:8.0f} searches/s"
                )
                figures |= {
                    f"weaviate_p50_ms_c{concurrency}": p50,
                    f"weaviate_p99_ms_c{concurrency}": p99(latencies),
                    f"weaviate_rps_c{concurrency}": rps,
                }
            headers = {"Authorization": f"Bearer {service.admin_token}"}
            async with httpx.AsyncClient(base_url=service.http, headers=headers) as http:
                document = (await http.get("/api/v1/health", params={"detailed": "true"})).json()
            entry = (document.get("dependencies") or {}).get("weaviate") or {}
            figures["weaviate_version"] = entry.get("version")
            await fast.close()
            await client.close()
    finally:
        await asyncio.to_thread(_weaviate, "stop", state)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--others", type=int, default=5_000, help="vectors of each other tenant")
    parser.add_argument("--queries", type=int, default=100, help="for recall")
    parser.add_argument("--seconds", type=float, default=10.0, help="per latency loop")
    parser.add_argument("--no-weaviate", action="store_true", help="pgvector only")
    with reporting("vector") as figures:
        asyncio.run(main(parser.parse_args(), figures))
