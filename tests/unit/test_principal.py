"""Principal: who is the platform, and what is within a caller's own tenants and scopes."""

import pytest

from database_service.auth import ALL_TENANTS, Principal, Scope, parse_scopes
from database_service.auth.tokens import everything
from database_service.errors import PermissionDenied

READ, WRITE, ADMIN, INGEST, METRICS = (
    Scope.READ, Scope.WRITE, Scope.ADMIN, Scope.INGEST, Scope.METRICS,
)  # fmt: skip


def principal(tenants: set[str], scopes: set[Scope]) -> Principal:
    return Principal(service="svc", tenants=frozenset(tenants), scopes=frozenset(scopes))


def test_metrics_is_a_scope() -> None:
    assert parse_scopes(["metrics", "read"]) == {METRICS, READ}
    assert parse_scopes("metrics") == {METRICS}


def test_only_a_principal_over_every_tenant_is_the_platform() -> None:
    assert principal({ALL_TENANTS}, {READ}).is_platform
    assert everything().is_platform and METRICS in everything().scopes
    assert not principal({"a", "b"}, {ADMIN}).is_platform
    assert not principal(set(), {ADMIN}).is_platform


def test_platform_with_needs_one_of_the_scopes_over_every_tenant() -> None:
    assert principal({ALL_TENANTS}, {METRICS}).is_platform_with(METRICS, ADMIN)
    assert principal({ALL_TENANTS}, {ADMIN}).is_platform_with(METRICS, ADMIN)
    assert not principal({ALL_TENANTS}, {READ}).is_platform_with(METRICS, ADMIN)
    assert not principal({"a"}, {METRICS, ADMIN}).is_platform_with(METRICS, ADMIN)


def test_require_platform_refuses_a_tenant_admin() -> None:
    principal({ALL_TENANTS}, {ADMIN}).require_platform(ADMIN)
    with pytest.raises(PermissionDenied, match="every tenant"):
        principal({"a"}, {ADMIN}).require_platform(ADMIN)
    with pytest.raises(PermissionDenied):
        principal({ALL_TENANTS}, {READ}).require_platform(ADMIN, METRICS)


@pytest.mark.parametrize(
    ("tenants", "scopes", "covered"),
    [
        ({"a"}, {READ}, True),
        ({"a", "b"}, {READ, WRITE}, True),
        (set(), set(), True),
        ({"c"}, {READ}, False),  # another tenant
        ({"a", "c"}, {READ}, False),  # spanning into another tenant
        ({ALL_TENANTS}, {READ}, False),  # every tenant, although the caller holds a and b
        ({"a"}, {INGEST}, False),  # a scope the caller does not hold
        ({"a"}, {METRICS}, False),
    ],
)
def test_a_tenant_admin_covers_only_its_own_tenants_and_scopes(
    tenants: set[str], scopes: set[Scope], covered: bool
) -> None:
    caller = principal({"a", "b"}, {READ, WRITE, ADMIN})
    assert caller.covers(tenants, scopes) is covered


def test_the_platform_covers_every_tenant_but_only_its_scopes() -> None:
    platform = principal({ALL_TENANTS}, {READ, ADMIN})
    assert platform.covers({ALL_TENANTS, "x"}, {READ, ADMIN})
    assert platform.covers({"anyone"})
    assert not platform.covers({"anyone"}, {WRITE})


def test_can_act_for_own_tenants_or_every_tenant() -> None:
    assert principal({"a"}, set()).can_act_for("a")
    assert not principal({"a"}, set()).can_act_for("b")
    assert principal({ALL_TENANTS}, set()).can_act_for("b")


def test_grants_are_covered_but_never_held() -> None:
    # The bootstrap administrator's shape: admin over every tenant, data scopes grantable only.
    granting = Principal(
        service="boot",
        tenants=frozenset({ALL_TENANTS}),
        scopes=frozenset({ADMIN}),
        grants=frozenset({READ, INGEST}),
    )
    assert granting.covers({"a"}, {READ, INGEST, ADMIN})
    assert not granting.covers({"a"}, {WRITE})
    assert not granting.has_scope(READ)
    with pytest.raises(PermissionDenied, match="bootstrapping only"):
        granting.require(INGEST, "a")
    with pytest.raises(PermissionDenied, match="lacks the 'write' scope"):
        granting.require(WRITE, "a")
