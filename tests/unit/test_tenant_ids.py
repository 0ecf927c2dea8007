import pytest

from database_service.errors import InvalidTenantId
from database_service.tenancy import TenantNames, quote_ident, validate_tenant_id


@pytest.mark.parametrize("tenant_id", ["abc", "company_abc", "a1", "x" * 41, "ab_"])
def test_valid_tenant_ids_are_accepted(tenant_id: str) -> None:
    assert validate_tenant_id(tenant_id) == tenant_id


@pytest.mark.parametrize(
    "tenant_id",
    [
        "", "a", "A", "Abc", "1abc", "_abc", "abc-def", "abc def", "x" * 42, "abc;drop role x",
        "abc'--", 'abc"', "abc\n", "tenänt", "ab.c", None, 42, ["abc"],
    ],
)  # fmt: skip
def test_invalid_tenant_ids_are_rejected(tenant_id: object) -> None:
    with pytest.raises(InvalidTenantId, match="invalid tenant id"):
        validate_tenant_id(tenant_id)


def test_names_are_opaque_and_never_carry_the_tenant_id() -> None:
    first, second = TenantNames.new("acme_bank", "dbsvc_"), TenantNames.new("acme_bank", "dbsvc_")
    for names in (first, second):
        assert "acme" not in names.schema and "acme" not in names.role
        assert names.role.startswith("dbsvc_") and names.user_role == names.role + "_u"
        assert len(names.role) <= 63 and len(names.user_role) <= 63
    assert first.schema != second.schema and first.role != second.role


def test_quote_ident_doubles_quotes() -> None:
    assert quote_ident('a"b') == '"a""b"'
