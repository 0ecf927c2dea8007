"""Certificate files, read again when they change: rotation without a restart.

A rotation writes new files while the service runs (cert-manager, an operator's script). Each
new TLS handshake asks whether the files changed (a ``stat`` of each at most once a second);
when they did and the new set loads (a certificate that matches its key, a readable CA), new
connections get it; established ones keep theirs. A half-written set does not load: the last
good one stays in use and the problem is logged once per change."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["CertificateFiles", "TlsMaterial"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """One consistent set: the server's chain and key (PEM), and the client CA if any."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    version: int  # counts successful loads; a reader compares it to what it built last


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def load_material(cert: Path, key: Path, client_ca: Path | None, version: int) -> TlsMaterial:
    """Read and check a set: raises ValueError (with the file named) if it cannot serve."""
    try:
        chain = cert.read_bytes()
        private = key.read_bytes()
        ca = client_ca.read_bytes() if client_ca is not None else None
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        leaf = x509.load_pem_x509_certificate(chain)
    except ValueError:
        raise ValueError(f"{cert}: not a PEM certificate") from None
    try:
        loaded = serialization.load_pem_private_key(private, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{key}: not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if loaded.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(
        encoding, public
    ):
        raise ValueError(f"{key} is not the key of the certificate in {cert}")
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            raise ValueError(f"{client_ca}: no PEM CA certificate") from None
    return TlsMaterial(chain, private, ca, version)


class CertificateFiles:
    """The configured files and the last set that loaded from them (thread-safe: gRPC asks
    from its own threads)."""

    def __init__(
        self, cert: Path, key: Path, client_ca: Path | None = None, *, recheck: float = 1.0
    ) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._recheck = recheck
        self._lock = threading.Lock()
        self._stamps = self._current_stamps()
        self._checked = time.monotonic()
        self._failed_stamps: tuple[object, ...] | None = None
        # The first load must succeed: a service that cannot serve TLS does not start.
        self._material = load_material(cert, key, client_ca, 1)

    def _current_stamps(self) -> tuple[object, ...]:
        return (_stamp(self.cert), _stamp(self.key), _stamp(self.client_ca))

    @property
    def material(self) -> TlsMaterial:
        """The current set, reloaded first if the files changed (checked at most every
        ``recheck`` seconds)."""
        now = time.monotonic()
        if now - self._checked < self._recheck:
            return self._material
        with self._lock:
            if now - self._checked < self._recheck:
                return self._material
            self._checked = now
            stamps = self._current_stamps()
            if stamps in (self._stamps, self._failed_stamps):
                return self._material
            try:
                material = load_material(
                    self.cert, self.key, self.client_ca, self._material.version + 1
                )
            except ValueError as exc:
                self._failed_stamps = stamps
                log.warning("TLS files changed but do not load, still serving the last: %s", exc)
                return self._material
            self._stamps, self._material = stamps, material
            log.info("TLS certificate reloaded from %s (version %d)", self.cert, material.version)
            return material
