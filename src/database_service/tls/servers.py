"""Server-side TLS for gRPC and HTTP from ``CertificateFiles``: TLS 1.2 or later, the current
certificate for every new connection, and a verified client certificate (mutual TLS) handed
to the application.

gRPC asks a fetcher for new credentials at each handshake (``dynamic_ssl_server_credentials``).
Python's ssl has no such hook but the ClientHello callback (``sni_callback``, called for every
handshake, with or without SNI), which may swap the connection's context: it swaps in a
context built from the files whenever they changed.

Client certificates: gRPC can only require one or not ask (with a client CA, it requires one,
verified). HTTP asks for one and verifies what is sent, but lets a caller without one in
(``CERT_OPTIONAL``): load balancers' health probes and token-only callers keep working."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import grpc
from uvicorn.protocols.http.h11_impl import H11Protocol

from database_service.tls.material import CertificateFiles, TlsMaterial

__all__ = ["TlsHttpProtocol", "grpc_server_credentials", "http_ssl_context"]

log = logging.getLogger(__name__)


def _grpc_config(material: TlsMaterial) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key, material.cert_chain)], root_certificates=material.client_ca
    )


def grpc_server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    initial = files.material
    served = [initial.version]

    def fetch() -> Any:
        # Called by gRPC's own threads at each new connection; None keeps the current one.
        material = files.material
        if material.version == served[0]:
            return None
        served[0] = material.version
        return _grpc_config(material)

    return grpc.dynamic_ssl_server_credentials(
        _grpc_config(initial),
        fetch,
        require_client_authentication=initial.client_ca is not None,
    )


class _ReloadingContext:
    def __init__(self, files: CertificateFiles) -> None:
        self._files = files
        self._version = files.material.version
        self.context = self._build(files.material)

    def _build(self, material: TlsMaterial) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._files.cert, self._files.key)
        if material.client_ca is not None:
            context.load_verify_locations(cadata=material.client_ca.decode())
            context.verify_mode = ssl.CERT_OPTIONAL
        context.sni_callback = self._on_hello
        return context

    def _on_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        material = self._files.material
        if material.version != self._version:
            self._version = material.version  # one attempt per change, not per handshake
            try:
                self.context = self._build(material)
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS files changed but do not load for HTTP, still serving: %s", exc)
        if connection.context is not self.context:
            connection.context = self.context


def http_ssl_context(files: CertificateFiles) -> ssl.SSLContext:
    """The context HTTP listens with; it hands each handshake the current certificate."""
    return _ReloadingContext(files).context


ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class TlsHttpProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus the ASGI TLS extension (``scope["extensions"]["tls"]``) so
    the application sees a verified client certificate (uvicorn does not pass it on)."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        connection = transport.get_extra_info("ssl_object")
        if connection is None:
            return
        der = connection.getpeercert(binary_form=True)
        tls = {
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "tls_version": connection.version(),
        }
        inner: ASGIApp = self.app

        async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            scope["extensions"] = {**scope.get("extensions", {}), "tls": tls}
            await inner(scope, receive, send)

        self.app = app
