"""The parts of a multi-store operation are checked before anything runs (pure logic)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from database_service.errors import InvalidRequest, PermissionDenied
from database_service.multidb.parts import (
    KeyValuePart,
    NotSupported,
    Phase,
    StoreNotConfigured,
    VectorPart,
    bind_params,
    outbox_operation,
    parse_request,
    part_document,
)


def test_the_seeds_example_is_split_into_transaction_outbox_and_reads() -> None:
    request = parse_request(
        "abc",
        {
            "postgresql": {"query": "INSERT INTO t VALUES (:a)", "params": {"a": 1}},
            "dragonflydb": {"operation": "set", "key": "k", "value": {"x": 1}, "ttl": 300},
            "clickhouse": {"query": "SELECT 1"},
            "weaviate": {"operation": "upsert", "class": "C", "objects": [{"vector": [1.0]}]},
            "graph": {"operation": "traverse", "start": "users/u1"},
        },
    )
    assert [(p.name, p.phase) for p in request.parts] == [
        ("postgresql", Phase.TRANSACTION),
        ("dragonflydb", Phase.OUTBOX),
        ("clickhouse", Phase.READ),
        ("weaviate", Phase.OUTBOX),
        ("graph", Phase.READ),
    ]
    kv = request.parts[1].part
    assert isinstance(kv, KeyValuePart)
    command = kv.command()
    assert (command.value, command.ttl_ms) == (b'{"x":1}', 300_000)


def test_dict_params_bind_by_name_never_by_keys() -> None:
    assert bind_params("SELECT :b, :a, :b", {"a": 1, "b": 2}) == ("SELECT $1, $2, $1", [2, 1])
    assert bind_params("SELECT $b, $a", {"a": 1, "b": 2}) == ("SELECT $1, $2", [2, 1])
    # A dollar-quoted body is not a placeholder.
    assert bind_params("SELECT $x$ :a $x$, :a", {"a": 1}) == ("SELECT $x$ :a $x$, $1", [1])
    with pytest.raises(InvalidRequest, match="names no :name"):
        bind_params("SELECT $1", {"a": 1})
    with pytest.raises(InvalidRequest, match="does not hold"):
        bind_params("SELECT :missing", {"a": 1})


@pytest.mark.parametrize(
    ("operation", "error"),
    [
        ({}, InvalidRequest),
        ({"mongodb": {}}, StoreNotConfigured),
        ({"postgresql": "SELECT 1"}, InvalidRequest),
        ({"postgresql": {"query": "SELECT 1", "statements": ["SELECT 1"]}}, InvalidRequest),
        ({"postgresql": {"sql": "SELECT 1"}}, InvalidRequest),
        ({"dragonflydb": {"operation": "flushall"}}, InvalidRequest),
        ({"dragonflydb": {"operation": "get", "key": "k", "value": "v"}}, InvalidRequest),
        ({"dragonflydb": {"operation": "set", "key": "k", "value": "v", "ttl": 0}}, InvalidRequest),
        ({"dragonflydb": {"operation": "get", "key_base64": "!!"}}, InvalidRequest),
        ({"clickhouse": {"query": "INSERT INTO x VALUES (1)"}}, NotSupported),
        ({"clickhouse": {"query": "/* c */ ALTER TABLE x DELETE WHERE 1"}}, NotSupported),
        (
            {"vector": {"operation": "upsert", "class": "a.b", "objects": [{"vector": [1]}]}},
            InvalidRequest,
        ),
        ({"vector": {"operation": "upsert", "class": "C"}}, InvalidRequest),
        ({"vector": {"operation": "delete", "class": "C", "ids": ["x"]}}, InvalidRequest),
        (
            {"graph": {"operation": "upsert", "vertices": [{"collection": "a/b", "key": "k"}]}},
            InvalidRequest,
        ),
        ({"graph": {"operation": "delete"}}, InvalidRequest),
        (
            {
                "redis": {"operation": "get", "key": "k"},
                "dragonflydb": {"operation": "get", "key": "k"},
            },
            InvalidRequest,
        ),
        (
            {"dragonflydb": {"operation": "get", "key": "k", "company_id": "other"}},
            PermissionDenied,
        ),
    ],
)
def test_a_bad_part_is_refused_naming_it(operation: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_request("abc", operation)


def test_an_upserted_vector_object_gets_its_id_when_recorded() -> None:
    request = parse_request(
        "abc", {"vector": {"operation": "upsert", "class": "C", "objects": [{"vector": [1.0]}]}}
    )
    part = request.parts[0].part
    assert isinstance(part, VectorPart) and part.objects
    document = part_document(part)
    uuid.UUID(document["objects"][0]["id"])
    # Read back by the applier: the same object, the same id, whatever happens in between.
    again = outbox_operation("vector", document)
    assert isinstance(again, VectorPart) and again.objects
    assert again.objects[0].id == document["objects"][0]["id"]


def test_an_outbox_entry_for_a_store_the_applier_does_not_write_is_refused() -> None:
    for store in ("postgresql", "clickhouse", "mongodb"):
        with pytest.raises(InvalidRequest):
            outbox_operation(store, {"query": "SELECT 1"})


def test_store_targets_name_where_each_store_is_without_its_secrets() -> None:
    from database_service.multidb.outbox import store_targets

    one = store_targets(
        redis_url="redis://:s3cret@cache.internal:6379/0",
        clickhouse="/srv/dbsvc/clickhouse",
        weaviate_url=None,
        arangodb_url=None,
    )
    assert one["vector"] == "pgvector" and one["graph"] == "postgresql"
    assert one["dragonflydb"].startswith("redis:") and "s3cret" not in repr(one)
    # Another password for the same Redis is the same Redis; another host is another.
    same = store_targets(
        redis_url="redis://:other@cache.internal:6379/0",
        clickhouse="/srv/dbsvc/clickhouse",
        weaviate_url=None,
        arangodb_url=None,
    )
    assert same == one
    other = store_targets(
        redis_url="redis://cache2.internal:6379/0",
        clickhouse="/elsewhere/clickhouse",
        weaviate_url="http://weaviate:8080",
        arangodb_url=None,
    )
    assert other["dragonflydb"] != one["dragonflydb"]
    assert other["clickhouse"] != one["clickhouse"]
    assert other["vector"].startswith("weaviate:")
    assert (
        store_targets(redis_url=None, clickhouse=None, weaviate_url=None, arangodb_url=None)[
            "dragonflydb"
        ]
        == "embedded"
    )
