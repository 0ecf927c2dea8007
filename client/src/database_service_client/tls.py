"""TLS options for the client: trust, and a client certificate for mutual TLS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["TlsOptions"]


@dataclass(frozen=True)
class TlsOptions:
    """``ca_file``: the CA that signed the service's certificate (default: gRPC's trust roots,
    or the file named by ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``). ``cert_file``/``key_file``: a
    client certificate, for a service that identifies callers by certificate (mutual TLS).
    ``server_name``: the name to check the service's certificate against when it differs
    from the host dialled (an address behind a load balancer)."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
