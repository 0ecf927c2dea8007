"""The ClickHouse-server path's DDL, as SQL: per-tenant users with pinned limits, grants on the
tenant's views only, row policies on the shared tables; and the replicated schema. No modern
ClickHouse server installs on these machines, so these statements are checked by ClickHouse's
own parser (chDB's, the same code as the server's) and by what they say — never run against a
server here."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from database_service.analytics.schema import (
    REPLICATED,
    SHARED_DATABASE,
    shared_ddl,
    tenant_database,
    tenant_view_ddl,
)
from database_service.stores.clickhouse.server import (
    service_policy_ddl,
    tenant_access_ddl,
    tenant_drop_ddl,
)

LIMITS = {"max_execution_time": 10, "max_memory_usage": 1 << 30, "max_rows_to_read": 10**9}


@pytest.fixture(scope="module")
def parser() -> Iterator[Any]:
    from chdb import session

    s = session.Session(tempfile.mkdtemp())  # type: ignore[no-untyped-call]

    def parse(sql: str) -> str:
        result = s.query("EXPLAIN AST " + sql, "TSVRaw")  # type: ignore[no-untyped-call]
        return str(result.bytes().decode().split("\n", 1)[0])

    yield parse
    s.close()  # type: ignore[no-untyped-call]


def access() -> list[str]:
    return tenant_access_ddl(
        "acme",
        database=tenant_database("acme"),
        shared_database=SHARED_DATABASE,
        shared_tables=list(REPLICATED),
        password_sha256_hex="ab" * 32,
        limits=LIMITS,
    )


def test_a_tenant_user_is_read_only_with_limits_it_cannot_change() -> None:
    profile, user, revoke, grant, *policies = access()
    assert profile.startswith("CREATE SETTINGS PROFILE OR REPLACE `tenant_acme_limits`")
    assert "readonly = 1 CONST" in profile
    for name, value in LIMITS.items():
        assert f"`{name}` = {value} CONST" in profile
    assert "IDENTIFIED WITH sha256_hash BY 'abab" in user
    assert "DEFAULT DATABASE `tenant_acme` SETTINGS PROFILE `tenant_acme_limits`" in user
    assert revoke == "REVOKE ALL ON *.* FROM `tenant_acme`"
    assert grant == "GRANT SELECT ON `tenant_acme`.* TO `tenant_acme`"  # its views, nothing else
    assert len(policies) == len(REPLICATED)
    for policy, table in zip(policies, REPLICATED, strict=True):
        assert policy == (
            f"CREATE ROW POLICY OR REPLACE `tenant_acme_rows` ON `{SHARED_DATABASE}`.`{table}`"
            " USING company_id = 'acme' AS PERMISSIVE TO `tenant_acme`"
        )


def test_the_service_user_keeps_every_row_once_tables_have_policies() -> None:
    (first, *_) = service_policy_ddl("dbsvc", shared_database=SHARED_DATABASE, shared_tables=["t"])
    assert first == (
        f"CREATE ROW POLICY OR REPLACE `dbsvc_service_rows` ON `{SHARED_DATABASE}`.`t`"
        " USING 1 AS PERMISSIVE TO `dbsvc`"
    )


def test_names_that_are_not_plain_identifiers_are_refused() -> None:
    for bad in ("acme`; DROP", "Acme", "a b"):
        with pytest.raises(ValueError):
            tenant_access_ddl(
                bad,
                database="tenant_x",
                shared_database=SHARED_DATABASE,
                shared_tables=[],
                password_sha256_hex="",
                limits={},
            )
        with pytest.raises(ValueError):
            tenant_database(bad)


def test_every_statement_parses_in_clickhouses_own_parser(parser: Any) -> None:
    statements = [
        *access(),
        *service_policy_ddl("dbsvc", shared_database=SHARED_DATABASE, shared_tables=["t"]),
        *tenant_drop_ddl("acme", shared_tables=list(REPLICATED), shared_database=SHARED_DATABASE),
        *shared_ddl(),
        *tenant_view_ddl("acme"),
        *tenant_view_ddl("acme", definer=True),
    ]
    kinds = [parser(sql) for sql in statements]
    assert kinds[:2] == ["CreateSettingsProfileQuery", "CreateUserQuery (children 1)"]
    assert all(kinds), kinds


def test_tenant_views_filter_by_tenant_and_read_the_newest_version() -> None:
    views = tenant_view_ddl("acme")
    assert views[0] == "CREATE DATABASE IF NOT EXISTS tenant_acme"
    for view in views[1:]:
        assert "WHERE company_id = 'acme'" in view
    history = next(v for v in views if ".trading_history " in v)
    assert "trading_history FINAL WHERE company_id = 'acme' AND _deleted = 0" in history
    assert all(v.startswith("CREATE OR REPLACE VIEW") for v in views[1:])
    assert "SQL SECURITY DEFINER" in tenant_view_ddl("acme", definer=True)[1]
