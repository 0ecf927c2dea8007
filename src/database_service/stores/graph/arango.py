"""The production graph: ArangoDB (``DBSVC_ARANGODB_URL``), one database per tenant.

A tenant's database is named after its opaque schema name (``dbsvc_<schema>``: no customer id
in the server's catalog), created with the tenant's first write; its collections are created as
they are first written (vertex collections as document collections, edge collections as edge
collections). Queries are ``aql.py``'s, with bind variables only, run on the tenant's database
handle: the database, not a filter, is the boundary between tenants.

python-arango is synchronous (requests); calls run in worker threads. It is an optional
dependency (``pip install database-service[arangodb]``): configuring a URL without it fails at
start with a clear message. No ArangoDB server can be installed where this was written: the AQL
is unit-tested as text (tests/unit/test_graph_aql.py), this module's calls are not exercised
against a server.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from database_service.errors import (
    DatabaseServiceError,
    GraphCollectionKind,
    GraphCollectionNotFound,
    InvalidParameters,
    ResultTooLarge,
    Unavailable,
    VertexNotFound,
)
from database_service.stores.graph import aql
from database_service.stores.graph.model import (
    Edge,
    GraphLimits,
    Neighborhood,
    NeighborhoodGroup,
    PathResult,
    ShortestPath,
    TraversalHit,
    TraversalResult,
    Traverse,
    Vertex,
    split_id,
)
from database_service.tenancy import TenantRecord

__all__ = ["ArangoGraphStore", "database_name"]

T = TypeVar("T")


def database_name(tenant: TenantRecord) -> str:
    return f"dbsvc_{tenant.schema_name}"


def _properties(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if not k.startswith("_")}


class ArangoGraphStore:
    name = "arangodb"

    def __init__(self, url: str, *, username: str, password: str, limits: GraphLimits) -> None:
        try:
            arango = importlib.import_module("arango")
        except ImportError as exc:
            raise RuntimeError(
                "DBSVC_ARANGODB_URL is set but python-arango is not installed"
                " (pip install 'database-service[arangodb]')"
            ) from exc
        self._client = arango.ArangoClient(hosts=url)
        self._username = username
        self._password = password
        self.limits = limits
        self._databases: dict[str, Any] = {}

    async def _call(self, work: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(work)
        except DatabaseServiceError:
            raise
        except Exception as exc:  # the driver's errors: server down, refused, timed out
            raise Unavailable(f"ArangoDB: {type(exc).__name__}: {exc}") from exc

    def _system(self) -> Any:
        return self._client.db("_system", username=self._username, password=self._password)

    def _db(self, tenant: TenantRecord, *, create: bool) -> Any:
        """The tenant's database handle (None: not created yet, and ``create`` is False)."""
        name = database_name(tenant)
        db = self._databases.get(name)
        if db is not None:
            return db
        system = self._system()
        if not system.has_database(name):
            if not create:
                return None
            system.create_database(name)
        db = self._databases[name] = self._client.db(
            name, username=self._username, password=self._password
        )
        return db

    @staticmethod
    def _ensure_collections(db: Any, names: set[str], edge: bool) -> None:
        for name in sorted(names):
            if not db.has_collection(name):
                db.create_collection(name, edge=edge)
                continue
            kind = db.collection(name).properties().get("type")
            if (kind == "edge") != edge:
                raise GraphCollectionKind(
                    f"{name!r} is a {kind} collection, not a {'edge' if edge else 'vertex'}"
                    " collection"
                )

    @staticmethod
    def _edge_collections(db: Any) -> list[str]:
        return sorted(
            c["name"]
            for c in db.collections()
            if c.get("type") == "edge" and not c.get("system") and not c["name"].startswith("_")
        )

    def _check_names(
        self, db: Any, vertices: Sequence[str], edges: Sequence[str], vertex_colls: Sequence[str]
    ) -> list[str]:
        """The vertices and collections exist; the edge collections to walk."""
        for vertex_id in vertices:
            collection, _ = split_id(vertex_id)
            if not db.has_collection(collection) or db.document(vertex_id) is None:
                raise VertexNotFound(f"no vertex {vertex_id!r}")
        known = self._edge_collections(db)
        for name in edges:
            if name not in known:
                raise GraphCollectionNotFound(f"no edge collection {name!r}")
        for name in vertex_colls:
            if not db.has_collection(name) or name in known:
                raise GraphCollectionNotFound(f"no vertex collection {name!r}")
        return list(edges) or known

    @staticmethod
    def _run(db: Any, query: aql.Aql) -> list[Any]:
        return list(db.aql.execute(query.query, bind_vars=query.bind_vars))

    # --- writes ---------------------------------------------------------------------------

    async def upsert_vertices(self, tenant: TenantRecord, vertices: Sequence[Vertex]) -> int:
        latest = {v.id: v for v in vertices}

        def work() -> int:
            db = self._db(tenant, create=True)
            self._ensure_collections(db, {v.collection for v in latest.values()}, edge=False)
            by_collection: dict[str, list[dict[str, Any]]] = {}
            for v in latest.values():
                by_collection.setdefault(v.collection, []).append({"_key": v.key, **v.properties})
            for name, documents in by_collection.items():
                db.collection(name).import_bulk(documents, on_duplicate="replace")
            return len(latest)

        return await self._call(work)

    async def upsert_edges(self, tenant: TenantRecord, edges: Sequence[Edge]) -> int:
        latest = {e.id: e for e in edges}

        def work() -> int:
            db = self._db(tenant, create=True)
            self._ensure_collections(db, {e.collection for e in latest.values()}, edge=True)
            ends = sorted({i for e in latest.values() for i in (e.from_id, e.to_id)})
            missing = self._run(db, aql.missing_vertices(ends))
            if missing:
                raise VertexNotFound(
                    "an edge's _from or _to is not a vertex of this tenant; write the vertices"
                    " first"
                )
            by_collection: dict[str, list[dict[str, Any]]] = {}
            for e in latest.values():
                by_collection.setdefault(e.collection, []).append(
                    {"_key": e.key, "_from": e.from_id, "_to": e.to_id, **e.properties}
                )
            for name, documents in by_collection.items():
                db.collection(name).import_bulk(documents, on_duplicate="replace")
            return len(latest)

        return await self._call(work)

    async def delete_vertex(self, tenant: TenantRecord, vertex_id: str) -> tuple[bool, int]:
        collection, _ = split_id(vertex_id)

        def work() -> tuple[bool, int]:
            db = self._db(tenant, create=False)
            if db is None or not db.has_collection(collection):
                return False, 0
            removed = 0
            for name in self._edge_collections(db):
                removed += sum(self._run(db, aql.remove_edges_of(name, vertex_id)))
            deleted = self._run(db, aql.remove_document(collection, vertex_id))
            return bool(deleted), removed

        return await self._call(work)

    async def delete_edge(self, tenant: TenantRecord, edge_id: str) -> bool:
        collection, _ = split_id(edge_id)

        def work() -> bool:
            db = self._db(tenant, create=False)
            if db is None or not db.has_collection(collection):
                return False
            return bool(self._run(db, aql.remove_document(collection, edge_id)))

        return await self._call(work)

    # --- reads ----------------------------------------------------------------------------

    async def get_vertex(self, tenant: TenantRecord, vertex_id: str) -> Vertex | None:
        collection, key = split_id(vertex_id)

        def work() -> Vertex | None:
            db = self._db(tenant, create=False)
            if db is None or not db.has_collection(collection):
                return None
            document = db.document(vertex_id)
            if document is None or "_from" in document:
                return None
            return Vertex(collection, key, _properties(document))

        return await self._call(work)

    async def get_edge(self, tenant: TenantRecord, edge_id: str) -> Edge | None:
        collection, key = split_id(edge_id)

        def work() -> Edge | None:
            db = self._db(tenant, create=False)
            if db is None or not db.has_collection(collection):
                return None
            document = db.document(edge_id)
            if document is None or "_from" not in document:
                return None
            return Edge(collection, key, document["_from"], document["_to"], _properties(document))

        return await self._call(work)

    def _visits_checked(self, visits: int) -> None:
        if visits >= self.limits.max_visits:
            raise ResultTooLarge(
                f"the traversal walked more than {self.limits.max_visits} paths; narrow it"
            )

    async def traverse(self, tenant: TenantRecord, query: Traverse) -> TraversalResult:
        def work() -> TraversalResult:
            db = self._db(tenant, create=False)
            if db is None:
                raise VertexNotFound(f"no vertex {query.start!r}")
            edges = self._check_names(
                db, [query.start], query.edge_collections, query.vertex_collections
            )
            [row] = self._run(db, aql.traverse(query, edges, self.limits.max_visits))
            self._visits_checked(row["visits"])
            hits = [
                TraversalHit(
                    Vertex(*split_id(h["v"]["_id"]), _properties(h["v"])),
                    h["depth"],
                    h["path"],
                    h["edges"],
                )
                for h in row["hits"][: query.limit]
            ]
            return TraversalResult(hits, truncated=len(row["hits"]) > query.limit)

        return await self._call(work)

    async def neighborhood(
        self, tenant: TenantRecord, query: Neighborhood
    ) -> list[NeighborhoodGroup]:
        def work() -> list[NeighborhoodGroup]:
            db = self._db(tenant, create=False)
            if db is None:
                raise VertexNotFound(f"no vertex {query.start!r}")
            edges = self._check_names(
                db, [query.start], query.edge_collections, query.vertex_collections
            )
            text = aql.neighborhood(query, edges, self.limits.max_visits, self.limits.max_results)
            [row] = self._run(db, text)
            self._visits_checked(row["visits"])
            if len(row["groups"]) > self.limits.max_results:
                raise ResultTooLarge(f"more than {self.limits.max_results} groups")
            return [NeighborhoodGroup(g["group"], g["count"], g["value"]) for g in row["groups"]]

        return await self._call(work)

    async def shortest_path(self, tenant: TenantRecord, query: ShortestPath) -> PathResult:
        def work() -> PathResult:
            db = self._db(tenant, create=False)
            if db is None:
                raise VertexNotFound(f"no vertex {query.start!r}")
            edges = self._check_names(db, [query.start, query.end], query.edge_collections, ())
            weighted = query.weight_path is not None
            if query.start == query.end:
                return PathResult(True, [query.start], [], 0.0 if weighted else None)
            rows = self._run(db, aql.shortest_path(query, edges))
            if not rows or len(rows) - 1 > query.max_depth:
                return PathResult(False, [], [])
            weights = [float(r["w"]) for r in rows[1:]]
            if any(w < 0 or not math.isfinite(w) for w in weights):
                raise InvalidParameters(
                    f"an edge on the path has a negative or non-finite weight at"
                    f" {query.weight_attribute!r}"
                )
            return PathResult(
                True,
                [r["v"] for r in rows],
                [r["e"] for r in rows[1:]],
                sum(weights) if weighted else None,
            )

        return await self._call(work)

    async def check(self) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            return {"status": "healthy", "embedded": False, "version": self._system().version()}

        try:
            return await asyncio.wait_for(self._call(work), 3)
        except Exception as exc:  # the health document must answer whatever the probe met
            return {"status": "unhealthy", "embedded": False, "error": str(exc)}

    async def aclose(self) -> None:
        self._client.close()
