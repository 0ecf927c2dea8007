"""The query core's use of asyncpg's private API (``query.boundary.prepare_cached``,
``TenantConnection.follow_schema``) is checked here, so an asyncpg upgrade that changes it fails
this test rather than production."""

import inspect

import asyncpg


def test_asyncpg_still_prepares_through_its_statement_cache() -> None:
    prepare = asyncpg.Connection._prepare
    assert inspect.iscoroutinefunction(prepare)
    parameters = inspect.signature(prepare).parameters
    assert "query" in parameters and "use_cache" in parameters
    assert parameters["use_cache"].kind is inspect.Parameter.KEYWORD_ONLY


def test_asyncpg_still_drops_one_connections_statement_cache() -> None:
    drop = asyncpg.Connection._drop_local_statement_cache
    assert not inspect.iscoroutinefunction(drop)
    assert list(inspect.signature(drop).parameters) == ["self"]
