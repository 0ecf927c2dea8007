"""TLS for the service's listeners: certificate files read again when they change, the gRPC and
HTTP server credentials built from them, client certificates read as service identities, and
a development CA (``database-service tls dev-cert``).

Names load on first use: authentication reads client certificates (``peer``) without paying
for the servers' imports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from database_service.lazy import lazy_exports

if TYPE_CHECKING:
    from database_service.tls.devcert import DevCertificates, make_dev_certificates
    from database_service.tls.material import CertificateFiles, TlsMaterial
    from database_service.tls.peer import PeerCertificate, peer_from_der, peer_from_pem
    from database_service.tls.servers import (
        TlsHttpProtocol,
        grpc_server_credentials,
        http_ssl_context,
    )

__all__ = [
    "CertificateFiles",
    "DevCertificates",
    "PeerCertificate",
    "TlsHttpProtocol",
    "TlsMaterial",
    "grpc_server_credentials",
    "http_ssl_context",
    "make_dev_certificates",
    "peer_from_der",
    "peer_from_pem",
]

_WHERE = {
    "CertificateFiles": "material",
    "TlsMaterial": "material",
    "DevCertificates": "devcert",
    "make_dev_certificates": "devcert",
    "PeerCertificate": "peer",
    "peer_from_der": "peer",
    "peer_from_pem": "peer",
    "TlsHttpProtocol": "servers",
    "grpc_server_credentials": "servers",
    "http_ssl_context": "servers",
}

__getattr__ = lazy_exports(__name__, _WHERE)
