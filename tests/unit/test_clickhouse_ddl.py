"""The ClickHouse-server path's DDL, as SQL: per-tenant users with pinned limits, grants on the
tenant's own database only, row policies on the shared tables; the replicated schema; and which
connection tenant SQL runs on (the tenant's own user on a server). No modern
ClickHouse server installs on these machines, so these statements are checked by ClickHouse's
own parser (chDB's, the same code as the server's) and by what they say — never run against a
server here."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from database_service.analytics.schema import (
    REPLICATED,
    SHARED_DATABASE,
    projection_upgrade_ddl,
    shared_ddl,
    tenant_database,
    tenant_view_ddl,
)
from database_service.analytics.service import Analytics, AnalyticsLimits
from database_service.analytics.tables import MERGE_TREE_ENGINES
from database_service.stores.clickhouse.host import ChdbProcessStore
from database_service.stores.clickhouse.server import (
    ClickHouseServerStore,
    password_sha256_hex,
    service_policy_ddl,
    tenant_access_ddl,
    tenant_drop_ddl,
    tenant_password,
)
from database_service.tenancy.secrets import derive_key

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
        engines=sorted(MERGE_TREE_ENGINES),
    )


def test_a_tenant_user_has_limits_it_cannot_change_and_rights_on_its_database_only() -> None:
    profile, user, revoke, grant, *rest = access()
    engines, policies = rest[: len(MERGE_TREE_ENGINES)], rest[len(MERGE_TREE_ENGINES) :]
    assert profile.startswith("CREATE SETTINGS PROFILE OR REPLACE `tenant_acme_limits`")
    for name, value in LIMITS.items():
        assert f"`{name}` = {value} CONST" in profile
    assert "allow_introspection_functions = 0 CONST" in profile
    assert "IDENTIFIED WITH sha256_hash BY 'abab" in user
    assert "DEFAULT DATABASE `tenant_acme` SETTINGS PROFILE `tenant_acme_limits`" in user
    assert revoke == "REVOKE ALL ON *.* FROM `tenant_acme`"
    # Its views and its own tables; DROP VIEW is not DROP TABLE, so its views stay.
    assert (
        grant
        == "GRANT SELECT, INSERT, CREATE TABLE, DROP TABLE ON `tenant_acme`.* TO `tenant_acme`"
    )
    assert engines == [
        f"GRANT TABLE ENGINE ON {e} TO `tenant_acme`" for e in sorted(MERGE_TREE_ENGINES)
    ]
    assert len(policies) == len(REPLICATED)
    for policy, table in zip(policies, REPLICATED, strict=True):
        assert policy == (
            f"CREATE ROW POLICY OR REPLACE `tenant_acme_rows` ON `{SHARED_DATABASE}`.`{table}`"
            " USING company_id = 'acme' AS PERMISSIVE TO `tenant_acme`"
        )


@pytest.mark.parametrize(
    "engine", ["File", "URL", "S3", "Distributed", "Merge", "Memory", "x; DROP"]
)
def test_only_merge_tree_engines_are_granted(engine: str) -> None:
    with pytest.raises(ValueError, match="MergeTree"):
        tenant_access_ddl(
            "acme",
            database="tenant_acme",
            shared_database=SHARED_DATABASE,
            shared_tables=[],
            password_sha256_hex="",
            limits={},
            engines=[engine],
        )


def test_tenant_passwords_derive_from_the_master_key_and_differ_per_tenant() -> None:
    key = derive_key("m" * 32, "clickhouse-tenant")
    a, b = tenant_password(key, "acme"), tenant_password(key, "bolt")
    assert a == tenant_password(key, "acme") and a != b and len(a) >= 40
    assert tenant_password(derive_key("n" * 32, "clickhouse-tenant"), "acme") != a
    assert password_sha256_hex(a) == hashlib.sha256(a.encode()).hexdigest()


def _analytics(store: Any, key: bytes | None) -> Analytics:
    # Only the connection choice is exercised: access, registry and audit are not reached.
    return Analytics(store, access=None, registry=None, audit=None, tenant_key=key)  # type: ignore[arg-type]


def test_tenant_sql_runs_as_the_tenants_own_user_on_a_server() -> None:
    """No server here: the store connects on first use, so which user it would log in as is
    checked without one."""
    key = derive_key("m" * 32, "clickhouse-tenant")
    service = ClickHouseServerStore("http://dbsvc:secret@clickhouse.example:8123/default")
    analytics = _analytics(service, key)
    runner = analytics.runner("acme")
    assert isinstance(runner, ClickHouseServerStore) and runner is not service
    assert runner.username == "tenant_acme" and service.username == "dbsvc"
    assert runner._password == tenant_password(key, "acme")
    assert runner._args == service._args  # the same server and database
    assert analytics.runner("acme") is runner and analytics.runner("bolt") is not runner
    # Its limits live in its settings profile (pinned); the statement carries none of them.
    assert set(analytics.run_settings()).isdisjoint(AnalyticsLimits().limit_settings())
    assert analytics.access_ddl("acme")[1].startswith("CREATE USER OR REPLACE `tenant_acme`")
    assert password_sha256_hex(tenant_password(key, "acme")) in analytics.access_ddl("acme")[1]
    analytics.forget("acme")
    assert analytics.runner("acme") is not runner  # a deleted tenant's login is not kept


def test_on_chdb_tenant_sql_runs_on_the_one_store_with_its_limits(tmp_path: Path) -> None:
    store = ChdbProcessStore(tmp_path)  # nothing starts until it is used
    analytics = _analytics(store, None)
    assert analytics.runner("acme") is store
    assert analytics.run_settings().items() >= AnalyticsLimits().limit_settings().items()


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
        *projection_upgrade_ddl("trading_ticks", "CREATE TABLE t (a Int8) ENGINE = MergeTree"),
        *tenant_view_ddl("acme"),
        *tenant_view_ddl("acme", definer=True),
    ]
    kinds = [parser(sql) for sql in statements]
    assert kinds[:2] == ["CreateSettingsProfileQuery", "CreateUserQuery (children 1)"]
    assert "GrantQuery" in kinds
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


def test_ticks_carry_their_pre_aggregates_and_older_tables_get_them_once() -> None:
    ticks = next(sql for sql in shared_ddl() if ".trading_ticks " in sql)
    assert "PROJECTION per_minute (SELECT" in ticks
    assert "PROJECTION per_price (SELECT" in ticks
    assert "deduplicate_merge_projection_mode = 'rebuild'" in ticks
    older = f"CREATE TABLE {SHARED_DATABASE}.trading_ticks (`time` DateTime64(6)) ENGINE = x"
    upgrade = projection_upgrade_ddl("trading_ticks", older)
    assert upgrade[0].endswith("MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild'")
    assert [s.split()[-1] for s in upgrade[1:] if "MATERIALIZE" in s] == ["per_minute", "per_price"]
    assert projection_upgrade_ddl("trading_ticks", ticks) == []
