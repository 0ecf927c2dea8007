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


def test_names_derive_schema_and_role_from_the_id() -> None:
    names = TenantNames.of("abc", "tenant_")
    assert (names.schema, names.role) == ("tenant_abc", "tenant_abc")


def test_quote_ident_doubles_quotes() -> None:
    assert quote_ident('a"b') == '"a""b"'
