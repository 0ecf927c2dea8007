from pathlib import Path

import pytest

from database_service.config import ConfigError, Settings


def test_defaults_use_embedded_back_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBSVC_POSTGRES_URL", raising=False)
    settings = Settings.load()
    assert settings.embedded_postgres
    assert settings.nats_embedded


def test_environment_variables_configure_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBSVC_POSTGRES_URL", "postgresql://u:p@db/x")
    monkeypatch.setenv("DBSVC_HTTP_PORT", "9999")
    settings = Settings.load()
    assert not settings.embedded_postgres
    assert settings.http_port == 9999


def test_wrong_value_stops_start_up_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBSVC_HTTP_PORT", "not-a-port")
    with pytest.raises(ConfigError, match="DBSVC_HTTP_PORT"):
        Settings.load()


def test_short_master_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBSVC_MASTER_KEY", "short")
    with pytest.raises(ConfigError, match="DBSVC_MASTER_KEY"):
        Settings.load()


def test_unsafe_schema_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="DBSVC_SHARED_SCHEMA"):
        Settings.load(shared_schema='x"; drop')


def test_config_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "dbsvc.toml"
    config.write_text("http_port = 7070\npool_max_per_tenant = 3\n")
    monkeypatch.setenv("DBSVC_CONFIG_FILE", str(config))
    settings = Settings.load()
    assert (settings.http_port, settings.pool_max_per_tenant) == (7070, 3)


def test_environment_overrides_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "dbsvc.toml"
    config.write_text("http_port = 7070\n")
    monkeypatch.setenv("DBSVC_CONFIG_FILE", str(config))
    monkeypatch.setenv("DBSVC_HTTP_PORT", "7171")
    assert Settings.load().http_port == 7171


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBSVC_CONFIG_FILE", "/nonexistent/dbsvc.toml")
    with pytest.raises(ConfigError, match="DBSVC_CONFIG_FILE"):
        Settings.load()


def test_secrets_are_generated_once_and_kept(tmp_path: Path) -> None:
    first = Settings.load(data_dir=tmp_path).resolve_secrets()
    second = Settings.load(data_dir=tmp_path).resolve_secrets()
    assert first.master_key is not None and second.master_key is not None
    assert first.master_key.get_secret_value() == second.master_key.get_secret_value()
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600


def test_secrets_never_appear_in_repr() -> None:
    settings = Settings.load(master_key="m" * 40, bootstrap_admin_token="a" * 30)
    assert "m" * 40 not in repr(settings)
    assert "a" * 30 not in str(settings.model_dump())
