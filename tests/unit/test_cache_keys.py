"""Cache keys (cache/keys.py): never shared across tenants, users, statements or parameter
types; Redis key namespacing."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest

from database_service.cache import (
    MAX_KV_KEY_BYTES,
    UncacheableParameter,
    canonical_statement,
    kv_key,
    result_key,
    tenant_prefix,
)
from database_service.errors import InvalidParameters, InvalidTenantId


def key(
    *params: object, tenant: str = "acme", user: str | None = None, sql: str = "select $1"
) -> str:
    return result_key(tenant, user, sql, list(params))


def test_canonical_text_ignores_layout_not_constants() -> None:
    assert canonical_statement("select 1") == canonical_statement("SELECT   1 -- comment")
    assert canonical_statement("select 1") != canonical_statement("select 2")
    assert canonical_statement("select 'a'") != canonical_statement("select 'b'")
    assert key(sql="select  *  FROM t") == key(sql="SELECT * from t")
    assert key(sql="select 1") != key(sql="select 2")
    assert key(sql='select * from "T"') != key(sql="select * from T")


def test_unparsable_text_is_only_equal_to_itself() -> None:
    assert canonical_statement("selec 1") != canonical_statement("selec  1")
    assert canonical_statement("selec 1").startswith("\x00raw\x00")


def test_tenants_and_users_never_share() -> None:
    keys = {
        key(1, tenant="acme"),
        key(1, tenant="acme2"),
        key(1, tenant="acme", user="u1"),
        key(1, tenant="acme", user="u2"),
        key(1, tenant="acme", user=""),
    }
    assert len(keys) == 5
    assert result_key("acme", None, "select 1", [], schema_version="1") != result_key(
        "acme", None, "select 1", []
    )


def test_typed_parameters_are_distinct() -> None:
    values: list[object] = [
        1,
        "1",
        1.0,
        True,
        None,
        b"1",
        Decimal("1"),
        Decimal("1.0"),
        0,
        False,
        "",
        b"",
        "true",
        -0.0,
        0.0,
        float("nan"),
        float("inf"),
        dt.datetime(2024, 1, 1),
        dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        dt.date(2024, 1, 1),
        dt.time(1, 2),
        dt.timedelta(seconds=1),
        uuid.UUID(int=1),
        "2024-01-01",
        [1],
        (1,),
        [[1]],
        ["1"],
        {"a": 1},
        {"a": "1"},
        [],
        {},
        [None],
        [1, 2],
        [12],
    ]
    keys = [key(v) for v in values]
    assert len(set(keys)) == len(values)


def test_field_boundaries_cannot_be_shifted() -> None:
    assert result_key("acme", None, "select $1, $2", ["ab", "c"]) != result_key(
        "acme", None, "select $1, $2", ["a", "bc"]
    )
    assert key("a", "b") != key("ab")
    assert key(["a", "b"]) != key(["ab"]) != key(["a"], ["b"])


def test_dict_order_matters_for_json() -> None:
    assert key({"a": 1, "b": 2}) != key({"b": 2, "a": 1})


def test_same_inputs_same_key() -> None:
    assert key(1, "x", [Decimal("2.5")]) == key(1, "x", [Decimal("2.5")])
    assert len(key(1)) == 64


def test_unknown_parameter_types_are_uncacheable() -> None:
    with pytest.raises(UncacheableParameter):
        key(object())


def test_kv_key_namespacing() -> None:
    assert kv_key("acme", "k") == b"dbsvc:{acme}:kv:k"
    assert kv_key("acme", b"\x00{b}*:") == b"dbsvc:{acme}:kv:\x00{b}*:"
    # A key spelling another tenant's namespaced key stays inside the caller's namespace.
    forged = kv_key("acme", "x}:kv:k")
    assert forged.startswith(tenant_prefix("acme") + b"kv:")
    assert forged != kv_key("acme", "k")
    assert kv_key("evil", "dbsvc:{acme}:kv:k") != kv_key("acme", "k")
    assert kv_key("acme", "k") != kv_key("acme", b"k\x00")


def test_kv_key_limits() -> None:
    assert kv_key("acme", "x" * MAX_KV_KEY_BYTES)
    with pytest.raises(InvalidParameters):
        kv_key("acme", "x" * (MAX_KV_KEY_BYTES + 1))
    with pytest.raises(InvalidParameters):
        kv_key("acme", "")
    with pytest.raises(InvalidTenantId):
        kv_key("Acme}", "k")
