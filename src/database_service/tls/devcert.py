"""A local CA with a server certificate and client certificates, for trying TLS and mutual TLS
on one machine (``database-service tls dev-cert``) and for the tests. Not for production: the
CA key sits next to the certificates it signs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DevCertificates", "make_dev_certificates"]

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class DevCertificates:
    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (cert, key)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Database Service development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)  # a reader never sees half a file


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
    now: dt.datetime,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def make_dev_certificates(
    directory: Path,
    *,
    hosts: list[str] | None = None,
    clients: list[str] | None = None,
    ca: tuple[Path, Path] | None = None,
) -> DevCertificates:
    """A CA (or the given one, as (cert, key) paths), a server certificate for ``localhost``,
    127.0.0.1, ::1 and ``hosts``, and a client certificate per name in ``clients`` (its
    subject ``CN=<name>,O=Database Service development``)."""
    now = dt.datetime.now(dt.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = ca or (directory / "ca.pem", directory / "ca-key.pem")
    if ca is not None:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path}: expected an EC key")
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue(
            _name("Database Service development CA"),
            ca_key,
            None,
            ca_key,
            [
                (x509.BasicConstraints(ca=True, path_length=0), True),
                (
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    True,
                ),
            ],
            now,
        )
        _write(ca_key_path, _key_pem(ca_key), private=True)
        _write(ca_cert_path, _cert_pem(ca_cert))

    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for host in ["127.0.0.1", "::1", *(hosts or [])]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        _name("localhost"),
        server_key,
        ca_cert,
        ca_key,
        [
            (x509.SubjectAlternativeName(names), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
        ],
        now,
    )
    server_cert_path, server_key_path = directory / "server.pem", directory / "server-key.pem"
    _write(server_key_path, _key_pem(server_key), private=True)
    _write(server_cert_path, _cert_pem(server))

    issued: dict[str, tuple[Path, Path]] = {}
    for client in clients or []:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            _name(client),
            key,
            ca_cert,
            ca_key,
            [
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
                (x509.BasicConstraints(ca=False, path_length=None), True),
            ],
            now,
        )
        cert_path = directory / f"client-{client}.pem"
        key_path = directory / f"client-{client}-key.pem"
        _write(key_path, _key_pem(key), private=True)
        _write(cert_path, _cert_pem(cert))
        issued[client] = (cert_path, key_path)
    return DevCertificates(
        directory, ca_cert_path, ca_key_path, server_cert_path, server_key_path, issued
    )
