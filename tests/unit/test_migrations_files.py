from pathlib import Path

import pytest

from database_service.tenancy.migrations import load_migrations, render


def test_packaged_migrations_are_ordered_and_start_at_one() -> None:
    for kind in ("control", "tenant"):
        versions = [m.version for m in load_migrations(kind)]
        assert versions == sorted(versions) and versions[0] == 1


def test_duplicate_versions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("select 1")
    (tmp_path / "0001_b.sql").write_text("select 1")
    with pytest.raises(ValueError, match="duplicate"):
        load_migrations(tmp_path)


def test_render_fills_placeholders_and_refuses_unknown_ones() -> None:
    assert render("CREATE TABLE {{schema}}.t", {"schema": '"s"'}) == 'CREATE TABLE "s".t'
    with pytest.raises(KeyError, match="nope"):
        render("{{nope}}", {})
