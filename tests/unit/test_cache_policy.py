"""Cacheability from the parse tree (cache/policy.py): what may be cached, why not, and which
relations a cached result depends on."""

from __future__ import annotations

import pytest

from database_service.cache import CachePolicy, analyse, expand_relations, parameters_cacheable

OWN = "t_abc"
SHARED = "shared"
SHARED_RELATIONS = frozenset({"market_data", "trading_ticks", "tenant_configurations"})
# What IMMUTABLE_FUNCTIONS_SQL returns, for the functions these cases use.
IMMUTABLE = frozenset(
    {
        "lower",
        "upper",
        "abs",
        "coalesce",
        "count",
        "sum",
        "max",
        "min",
        "unnest",
        "length",
        "generate_series",
        "array_agg",
        "row_number",
        "round",
        "jsonb_build_object",
        "substr",
    }
)


def verdict(sql: str, **extra: frozenset[str]):
    return analyse(
        sql,
        own_schema=OWN,
        shared_schema=SHARED,
        shared_relations=SHARED_RELATIONS,
        immutable_functions=IMMUTABLE,
        **extra,
    )


CACHEABLE = [
    ("select 1", set()),
    ("SELECT * FROM positions", {"t_abc.positions", "shared.positions"}),
    ("select * from t_abc.positions where account_id = $1", {"t_abc.positions"}),
    ("select * from shared.market_data", {"shared.market_data"}),
    (
        "select p.*, u.email from positions p join users u using (user_id)",
        {"t_abc.positions", "shared.positions", "t_abc.users", "shared.users"},
    ),
    (
        "select * from t_abc.positions p join shared.tenant_configurations c on true",
        {"t_abc.positions", "shared.tenant_configurations"},
    ),
    ("select a from t_abc.x union all select b from t_abc.y", {"t_abc.x", "t_abc.y"}),
    (
        "select * from t_abc.x where id in (select id from t_abc.y where z > 1)",
        {"t_abc.x", "t_abc.y"},
    ),
    (
        "with w as (select * from t_abc.x) select count(*) from w",
        {"t_abc.x", "t_abc.w", "shared.w"},
    ),
    ("values (1, 'a'), (2, 'b')", set()),
    ("select lower(name), count(*) from t_abc.users group by 1", {"t_abc.users"}),
    ("select * from generate_series(1, 10) g", set()),
    ("select * from unnest(array[1,2,3])", set()),
    ('select * from t_abc."Weird.Name"', {"t_abc.Weird.Name"}),
    ('select * from t_abc."quote""d"', {'t_abc.quote"d'}),
    ('select * from "t_abc"."MixedCase"', {"t_abc.MixedCase"}),
    ("select * from my_view", {"t_abc.my_view", "shared.my_view"}),
    ("select row_number() over (order by id) from t_abc.x", {"t_abc.x"}),
    ("select 'snow' as s, interval '1 day'", set()),
    ("select '2024-01-01'::date", set()),
    ("select pg_catalog.lower('X')", set()),
    ("table t_abc.x", {"t_abc.x"}),
    (
        "select * from t_abc.x where exists (select 1 from shared.market_data m)",
        {"t_abc.x", "shared.market_data"},
    ),
]


@pytest.mark.parametrize(("sql", "relations"), CACHEABLE)
def test_cacheable(sql: str, relations: set[str]) -> None:
    result = verdict(sql)
    assert result.cacheable, result.reason
    assert result.code is None
    assert result.relations == frozenset(relations)


REFUSED = [
    ("select now()", "volatile_function:now"),
    ("select random()", "volatile_function:random"),
    ("select clock_timestamp()", "volatile_function:clock_timestamp"),
    ("select txid_current()", "volatile_function:txid_current"),
    ("select nextval('s')", "volatile_function:nextval"),
    ("select currval('s')", "volatile_function:currval"),
    ("select * from t_abc.x where t > now() - interval '1 h'", "volatile_function:now"),
    ("select * from t_abc.x order by random()", "volatile_function:random"),
    ("select * from t_abc.x group by a having max(b) > random()", "volatile_function:random"),
    ("select * from generate_series(1, (random() * 10)::int)", "volatile_function:random"),
    ("select * from t_abc.x join lateral (select now()) n on true", "volatile_function:now"),
    ("with w as (select now()) select * from w", "volatile_function:now"),
    ("select (select random())", "volatile_function:random"),
    ("select * from pg_sleep(1)", "volatile_function:pg_sleep"),
    ("select current_timestamp", "volatile_function:current_timestamp"),
    ("select current_date", "volatile_function:current_date"),
    ("select localtime", "volatile_function:localtime"),
    ("select current_user", "volatile_function:current_user"),
    ("select session_user", "volatile_function:session_user"),
    ("select current_setting('x')", "volatile_function:current_setting"),
    ("select 'now'::timestamptz", "clock_literal"),
    ("select 'now'::date", "clock_literal"),
    ("select date 'today'", "clock_literal"),
    ("select timestamp with time zone 'tomorrow'", "clock_literal"),
    ("select * from t_abc.x where d = 'yesterday'", "clock_literal"),
    ("select 'NOW'::text::date", "clock_literal"),
    ("select 't_abc.x'::regclass", "volatile_cast:regclass"),
    ("with w as (insert into t_abc.x values (1) returning *) select * from w", "cte_write"),
    ("with w as (delete from t_abc.x returning *) select * from w", "cte_write"),
    ("with w as (update t_abc.x set a = 1 returning *) select 1", "cte_write"),
    ("select * from t_abc.x for update", "locking_clause"),
    ("select * from t_abc.x for share", "locking_clause"),
    ("select * into t_abc.y from t_abc.x", "select_into"),
    ("select * from t_abc.x tablesample system (10)", "tablesample"),
    ("select * from pg_catalog.pg_class", "system_relation"),
    ("select * from pg_class", "system_relation"),
    ("select * from information_schema.tables", "system_relation"),
    ("select * from other_schema.x", "unknown_relation"),
    ("select * from shared.not_a_shared_table", "unknown_relation"),
    ("select t_abc.my_func(1)", "tenant_function:my_func"),
    ("select * from shared.tick_price(1, 2)", "tenant_function:tick_price"),
    ("insert into t_abc.x values (1)", "not_read_only"),
    ("update t_abc.x set a = 1", "not_read_only"),
    ("delete from t_abc.x", "not_read_only"),
    ("explain (costs off) select 1", "not_select"),
    ("show timezone", "not_select"),
    ("select 1; select 2", "multiple_statements"),
    ("selec 1", "syntax_error"),
]


@pytest.mark.parametrize(("sql", "code"), REFUSED)
def test_refused(sql: str, code: str) -> None:
    result = verdict(sql)
    assert not result.cacheable
    assert result.code == code
    assert result.reason
    assert result.relations == frozenset()


def test_tenant_functions_and_volatile_relations() -> None:
    assert verdict("select lower(1)", tenant_functions=frozenset({"lower"})).code == (
        "tenant_function:lower"
    )
    refused = verdict(
        "select last_value from my_seq", volatile_relations=frozenset({"t_abc.my_seq"})
    )
    assert refused.code == "volatile_relation:t_abc.my_seq"


def test_overloaded_name_missing_from_immutable_set_is_refused() -> None:
    # date(timestamptz) is STABLE: IMMUTABLE_FUNCTIONS_SQL leaves 'date' out, so it is refused.
    assert verdict("select date(t) from t_abc.x").code == "volatile_function:date"


def test_parameters_that_read_the_clock() -> None:
    assert parameters_cacheable([1, "abc", None, b"now"])
    assert not parameters_cacheable(["now"])
    assert not parameters_cacheable([" Today "])


def test_expand_relations_follows_views_of_views() -> None:
    deps = {"t_abc.v2": ["t_abc.v1"], "t_abc.v1": ["t_abc.x", "shared.market_data"]}
    assert expand_relations({"t_abc.v2"}, deps) == {
        "t_abc.v2",
        "t_abc.v1",
        "t_abc.x",
        "shared.market_data",
    }


def test_policy_caches_verdicts_per_schema() -> None:
    policy = CachePolicy(
        shared_schema=SHARED,
        shared_relations=SHARED_RELATIONS,
        immutable_functions=IMMUTABLE,
        max_entries=2,
    )
    a = policy.analyse("select * from x", "t_a")
    b = policy.analyse("select * from x", "t_b")
    assert a.relations == {"t_a.x", "shared.x"}
    assert b.relations == {"t_b.x", "shared.x"}
    assert policy.analyse("select * from x", "t_a") is a
    assert (policy.hits, policy.misses) == (1, 2)
    policy.analyse("select 1", "t_a")  # evicts the least recently used (t_b's)
    assert policy.analyse("select * from x", "t_b") is not b
