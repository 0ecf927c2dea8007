"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both sides, without channel
binding: the server side checks a client against a stored verifier (the port's clients), the
client side logs the port in to PostgreSQL as a tenant's role.

Only the verifier is ever stored (``tenancy.secrets.scram_sha256_verifier`` makes it): the
server side learns neither the password nor anything that would let it log in elsewhere.
Nonces are parameters so that the functions are tested against the RFC's vectors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

__all__ = [
    "ScramClient",
    "ScramError",
    "ScramServer",
    "Verifier",
    "parse_verifier",
]


class ScramError(Exception):
    """A malformed exchange or a wrong proof (SQLSTATE 28P01 for a wrong password)."""


@dataclass(frozen=True, slots=True)
class Verifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ScramError("invalid base64 in a SCRAM message") from None


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def parse_verifier(text: str) -> Verifier:
    """PostgreSQL's verifier format:
    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``."""
    try:
        method, rest = text.split("$", 1)
        head, keys = rest.split("$", 1)
        iterations, salt = head.split(":", 1)
        stored, server = keys.split(":", 1)
        if method != "SCRAM-SHA-256":
            raise ValueError(method)
        return Verifier(int(iterations), _unb64(salt), _unb64(stored), _unb64(server))
    except (ValueError, ScramError):
        raise ScramError("not a SCRAM-SHA-256 verifier") from None


def _attributes(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed SCRAM attribute {part[:20]!r}")
        out.setdefault(part[0], part[2:])
    return out


class ScramServer:
    """One server-side exchange: ``first`` takes the client-first-message and returns the
    server-first-message, ``final`` takes the client-final-message and returns the
    server-final-message, or raises ScramError when the proof is wrong."""

    def __init__(self, verifier: Verifier, *, nonce: str | None = None) -> None:
        self._verifier = verifier
        self._server_nonce = nonce or _b64(secrets.token_bytes(18))
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def first(self, client_first: str) -> str:
        # gs2 header: "n,," (no channel binding) or "y,," (client supports it, we do not);
        # "p=..." asks for channel binding, which this port does not offer.
        flag, _, rest = client_first.partition(",")
        if flag not in ("n", "y"):
            raise ScramError("channel binding is not supported: use SCRAM-SHA-256, not -PLUS")
        authzid, _, bare = rest.partition(",")
        if authzid:
            raise ScramError("an authorization identity is not supported")
        attributes = _attributes(bare)
        client_nonce = attributes.get("r", "")
        if not client_nonce or "m" in attributes:
            raise ScramError("the client-first-message has no nonce")
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        return self._server_first

    def final(self, client_final: str) -> str:
        without_proof, sep, proof_text = client_final.rpartition(",p=")
        if not sep:
            raise ScramError("the client-final-message has no proof")
        attributes = _attributes(without_proof)
        if attributes.get("c") not in ("biws", "eSws"):  # base64 of "n,," and "y,,"
            raise ScramError("unexpected channel binding in the client-final-message")
        if attributes.get("r") != self._nonce:
            raise ScramError("the client-final-message's nonce does not match")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        v = self._verifier
        proof = _unb64(proof_text)
        signature = _hmac(v.stored_key, auth_message)
        if len(proof) != len(signature):
            raise ScramError("password authentication failed")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key):
            raise ScramError("password authentication failed")
        return "v=" + _b64(_hmac(v.server_key, auth_message))


class ScramClient:
    """One client-side exchange with PostgreSQL (SASL mechanism SCRAM-SHA-256)."""

    def __init__(self, password: str, *, nonce: str | None = None) -> None:
        self._password = password
        self._client_nonce = nonce or _b64(secrets.token_bytes(18))
        self._first_bare = f"n=,r={self._client_nonce}"
        self._server_signature = b""

    def first(self) -> str:
        return "n,," + self._first_bare

    def final(self, server_first: str) -> str:
        attributes = _attributes(server_first)
        nonce, salt, iterations = attributes.get("r", ""), attributes.get("s"), attributes.get("i")
        if not nonce.startswith(self._client_nonce) or salt is None or iterations is None:
            raise ScramError("malformed server-first-message")
        salted = hashlib.pbkdf2_hmac(
            "sha256", self._password.encode(), _unb64(salt), int(iterations)
        )
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{server_first},{without_proof}".encode()
        signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={_b64(proof)}"

    def verify(self, server_final: str) -> None:
        """Raise unless the server proved it knows the verifier too."""
        attributes = _attributes(server_final)
        if "e" in attributes:
            raise ScramError(f"server refused: {attributes['e']}")
        if not hmac.compare_digest(_unb64(attributes.get("v", "")), self._server_signature):
            raise ScramError("the server's signature is wrong")
