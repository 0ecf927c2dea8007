"""Bad input to the relationship graph through REST (raw bytes: Python's JSON reader takes
``NaN``, ``Infinity``, integers of any size, lone surrogates and deep nesting) and gRPC (JSON
in ``properties_json`` / ``value_json`` read by the same reader): refused with a stable code,
or written and read back as sent; never a server error, and nothing written when refused."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service_client._proto import graph_pb2 as gpb
from database_service_client._proto.graph_pb2_grpc import GraphServiceStub
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")

_SERVER = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}


def _deep(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


# Property documents as a caller writes them (JSON text).
PROPERTIES = {
    "nan": '{"n": NaN}',
    "infinity": '{"n": Infinity}',
    "big_int": '{"n": 100000000000000000000000000000}',
    "huge_int": '{"n": ' + "9" * 5000 + "}",
    "deep_300": '{"n": ' + _deep(300) + "}",
    "deep_2000": '{"n": ' + _deep(2000) + "}",
    "lone_surrogate_value": '{"n": "\\ud800"}',
    "lone_surrogate_name": '{"\\udc00": 1}',
    "nul_value": '{"n": "a\\u0000b"}',
    "nul_name": '{"a\\u0000b": 1}',
    "not_an_object": "[1, 2]",
    "empty_name": '{"": 1}',
}

# Walks with numbers and paths no search should take (REST body fields).
WALKS: dict[str, tuple[str, str]] = {
    "traverse_depth_huge": ("traverse", '{"start": "gv/a", "max_depth": 100000000000000000000}'),
    "traverse_depth_negative": ("traverse", '{"start": "gv/a", "min_depth": -3, "max_depth": -1}'),
    "traverse_limit_huge": ("traverse", '{"start": "gv/a", "limit": 100000000000000000000}'),
    "traverse_limit_negative": ("traverse", '{"start": "gv/a", "limit": -1}'),
    "traverse_filter_nan": (
        "traverse",
        '{"start": "gv/a", "vertex_filters": [{"field": "n", "op": "gt", "value": NaN}]}',
    ),
    "traverse_filter_deep": (
        "traverse",
        '{"start": "gv/a", "vertex_filters": [{"field": "n", "op": "eq", "value": '
        + _deep(2000)
        + "}]}",
    ),
    "traverse_filter_big_int": (
        "traverse",
        '{"start": "gv/a", "vertex_filters": [{"field": "n", "op": "in", "value":'
        " [100000000000000000000000000000]}]}",
    ),
    "traverse_filter_path_long": (
        "traverse",
        '{"start": "gv/a", "vertex_filters": [{"field": "' + ".".join(["a"] * 5000) + '",'
        ' "op": "eq", "value": 1}]}',
    ),
    "traverse_start_nul": ("traverse", '{"start": "gv/a\\u0000"}'),
    "shortest_default_weight_nan": (
        "shortest-path",
        '{"start": "gv/a", "end": "gv/b", "weight_attribute": "w", "default_weight": NaN}',
    ),
    "shortest_default_weight_infinity": (
        "shortest-path",
        '{"start": "gv/a", "end": "gv/b", "weight_attribute": "w", "default_weight": Infinity}',
    ),
    "shortest_default_weight_huge": (
        "shortest-path",
        '{"start": "gv/a", "end": "gv/b", "weight_attribute": "w", "default_weight": 1e308}',
    ),
    "shortest_depth_huge": (
        "shortest-path",
        '{"start": "gv/a", "end": "gv/b", "max_depth": 100000000000000000000}',
    ),
    "neighborhood_depth_huge": (
        "neighborhood",
        '{"start": "gv/a", "depth": 100000000000000000000}',
    ),
    "neighborhood_sum_of_text": (
        "neighborhood",
        '{"start": "gv/a", "aggregate": "sum", "field": "t"}',
    ),
}


@pytest.fixture
async def a_token(core: Application, tenants: Tenants) -> str:
    return await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE))


@pytest.fixture
async def a_graph(
    http: httpx.AsyncClient, tenants: Tenants, a_token: str
) -> AsyncIterator[dict[str, str]]:
    headers = {"Authorization": f"Bearer {a_token}", "X-Tenant-Id": tenants.a.tenant_id}
    response = await http.post(
        "/api/v1/graph/vertices",
        json={"vertices": [
            {"collection": "gv", "key": "a", "properties": {"n": 1, "t": "text", "w": 2}},
            {"collection": "gv", "key": "b", "properties": {"n": 2, "t": "more"}},
        ]},
        headers=headers,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    response = await http.post(
        "/api/v1/graph/edges",
        json={"edges": [{"collection": "ge", "_from": "gv/a", "_to": "gv/b"}]},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    yield headers


def _refused_cleanly(status: str, code: str | None) -> bool:
    return status not in _SERVER and not status.startswith("5") and code not in {None, "internal"}


@pytest.mark.parametrize("case", sorted(PROPERTIES))
async def test_vertex_properties_over_rest_are_refused_or_read_back(
    http: httpx.AsyncClient, a_graph: dict[str, str], case: str
) -> None:
    key = f"p_{case}"
    body = (
        '{"vertices": [{"collection": "gp", "key": "' + key + '", "properties": '
        + PROPERTIES[case] + "}]}"
    )  # fmt: skip
    response = await http.post(
        "/api/v1/graph/vertices",
        content=body.encode("utf-8", "surrogatepass"),
        headers={**a_graph, "Content-Type": "application/json"},
    )
    code = response.json().get("error", {}).get("code")
    if response.status_code == 200:
        read = await http.get(f"/api/v1/graph/vertices/gp/{key}", headers=a_graph)
        assert read.status_code == 200 or _refused_cleanly(
            str(read.status_code), read.json().get("error", {}).get("code")
        ), read.text[:300]
        await http.delete(f"/api/v1/graph/vertices/gp/{key}", headers=a_graph)
    else:
        assert _refused_cleanly(str(response.status_code), code), response.text[:300]
        read = await http.get(f"/api/v1/graph/vertices/gp/{key}", headers=a_graph)
        assert read.status_code == 404, read.text[:300]


@pytest.mark.parametrize("case", sorted(PROPERTIES))
async def test_vertex_properties_over_grpc_are_refused_or_read_back(
    grpc_target: str, tenants: Tenants, a_token: str, a_graph: dict[str, str], case: str
) -> None:
    metadata = (("authorization", f"Bearer {a_token}"), ("x-tenant-id", tenants.a.tenant_id))
    key = f"g_{case}"
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = GraphServiceStub(channel)
        vertex = gpb.GraphVertex(
            collection="gp",
            key=key,
            properties_json=PROPERTIES[case]
            .encode("utf-8", "surrogatepass")
            .decode("utf-8", "replace"),
        )
        try:
            await stub.UpsertVertices(
                gpb.UpsertVerticesRequest(vertices=[vertex]), metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            code = dict(exc.trailing_metadata() or ()).get("dbsvc-error-code")
            assert _refused_cleanly(exc.code().name, code), (exc.code(), exc.details())  # type: ignore[arg-type]
            return
        try:
            await stub.GetVertex(gpb.GraphDocumentRequest(id=f"gp/{key}"), metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = dict(exc.trailing_metadata() or ()).get("dbsvc-error-code")
            assert _refused_cleanly(exc.code().name, code), (exc.code(), exc.details())  # type: ignore[arg-type]
        await stub.DeleteVertex(gpb.GraphDocumentRequest(id=f"gp/{key}"), metadata=metadata)


@pytest.mark.parametrize("case", sorted(WALKS))
async def test_walks_with_numbers_and_paths_out_of_range_are_refused_cleanly(
    http: httpx.AsyncClient, a_graph: dict[str, str], case: str
) -> None:
    path, body = WALKS[case]
    response = await http.post(
        f"/api/v1/graph/{path}",
        content=body.encode(),
        headers={**a_graph, "Content-Type": "application/json"},
    )
    code = response.json().get("error", {}).get("code")
    assert response.status_code == 200 or _refused_cleanly(str(response.status_code), code), (
        response.text[:300]
    )
