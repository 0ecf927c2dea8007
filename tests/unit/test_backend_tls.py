"""TLS settings for the back ends: the client contexts the settings make, and what Kafka's
clients are given."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from database_service.config import ConfigError, Settings
from database_service.ingest.kafka_group import KafkaSettings
from database_service.tls import make_dev_certificates


def kafka(tls: ssl.SSLContext | None) -> KafkaSettings:
    return KafkaSettings("broker:9093", ["t"], "g", "dead", 1, 10, tls=tls)


def test_kafka_is_plaintext_without_a_ca(tmp_path: Path) -> None:
    settings = Settings.load(data_dir=tmp_path)
    assert settings.kafka_tls() is None and settings.nats_tls() is None
    assert kafka(None).client_options() == {"bootstrap_servers": "broker:9093"}


def test_kafka_speaks_ssl_with_the_ca_and_a_client_certificate(tmp_path: Path) -> None:
    certs = make_dev_certificates(tmp_path / "tls", clients=["svc"])
    cert, key = certs.clients["svc"]
    settings = Settings.load(
        data_dir=tmp_path,
        kafka_tls_ca_file=certs.ca_cert,
        kafka_tls_cert_file=cert,
        kafka_tls_key_file=key,
        nats_tls_ca_file=certs.ca_cert,
    )
    context = settings.kafka_tls()
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    options = kafka(context).client_options()
    assert options["security_protocol"] == "SSL" and options["ssl_context"] is context
    assert settings.nats_tls() is not None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka_tls_cert_file": "c.pem"}, "go together"),
        (
            {"kafka_tls_cert_file": "c.pem", "kafka_tls_key_file": "k.pem"},
            "needs DBSVC_KAFKA_TLS_CA",
        ),
        ({"nats_tls_key_file": "k.pem"}, "go together"),
        ({"tls_cert_file": "c.pem"}, "go together"),
        ({"tls_required": True}, "DBSVC_TLS_REQUIRED"),
        ({"tls_client_ca_file": "ca.pem"}, "mutual TLS"),
    ],
)
def test_inconsistent_tls_settings_refuse_to_start(
    tmp_path: Path, values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.load(data_dir=tmp_path, **values)
