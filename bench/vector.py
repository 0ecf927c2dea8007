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

    .venv/bin/python bench/vector.py [--vectors 200000] [--dim 384]

The last line is one json object of the figures (``{"bench": "vector", ...}``, printed by
``harness.reporting``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

import asyncpg
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


async def load(client: MultiDatabaseClient, data: Data, count: int) -> float:
    started = time.perf_counter()
    for start in range(0, count, BATCH):
        batch = [{"vector": data.vector()} for _ in range(min(BATCH, count - start))]
        await client.vector_upsert(COLLECTION, batch)
        if start and start % 50_000 == 0:
            print(f"  {start:,} loaded ({start / (time.perf_counter() - started):,.0f}/s)")
    return time.perf_counter() - started


async def main(args: argparse.Namespace, figures: dict[str, Any]) -> None:
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
        load_s = await load(clients[0], Data(dim, seed=7), args.vectors)
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--others", type=int, default=5_000, help="vectors of each other tenant")
    parser.add_argument("--queries", type=int, default=100, help="for recall")
    parser.add_argument("--seconds", type=float, default=10.0, help="per latency loop")
    with reporting("vector") as figures:
        asyncio.run(main(parser.parse_args(), figures))
