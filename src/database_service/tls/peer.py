"""A client certificate as the service reads it: its fingerprint (to revoke it) and the names
a service identity can be bound to — its subject in RFC 4514 form (``CN=trading-engine,O=Acme``)
and its subject alternative names as ``DNS:<name>``, ``URI:<uri>`` or ``EMAIL:<address>``.

Only certificates the TLS layer verified against the configured client CA get here."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["PeerCertificate", "peer_from_der", "peer_from_pem"]


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    fingerprint: str  # SHA-256 of the DER form, lower-case hex
    subject: str  # RFC 4514
    names: tuple[str, ...]  # subject, then "DNS:...", "URI:...", "EMAIL:..."


@functools.lru_cache(maxsize=1024)
def peer_from_der(der: bytes) -> PeerCertificate:
    """Parsed once per distinct certificate (a caller's certificate comes with every call)."""
    cert = x509.load_der_x509_certificate(der)
    subject = cert.subject.rfc4514_string()
    names = [subject]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names += [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
        names += [f"URI:{n}" for n in san.get_values_for_type(x509.UniformResourceIdentifier)]
        names += [f"EMAIL:{n}" for n in san.get_values_for_type(x509.RFC822Name)]
    return PeerCertificate(hashlib.sha256(der).hexdigest(), subject, tuple(names))


@functools.lru_cache(maxsize=1024)
def peer_from_pem(pem: bytes) -> PeerCertificate:
    return peer_from_der(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER))
