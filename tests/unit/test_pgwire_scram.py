"""SCRAM-SHA-256 against RFC 7677's example exchange, and against the service's verifiers."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from database_service.pgwire.scram import ScramClient, ScramError, ScramServer, parse_verifier
from database_service.tenancy.secrets import scram_sha256_verifier

# RFC 7677, section 3: user "user", password "pencil".
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
SERVER_FIRST = f"r={CLIENT_NONCE}{SERVER_NONCE},s={SALT},i=4096"
CLIENT_FINAL = (
    f"c=biws,r={CLIENT_NONCE}{SERVER_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def _rfc_verifier() -> str:
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", base64.b64decode(SALT), 4096)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored = base64.b64encode(hashlib.sha256(client_key).digest()).decode()
    server = base64.b64encode(hmac.digest(salted, b"Server Key", "sha256")).decode()
    return f"SCRAM-SHA-256$4096:{SALT}${stored}:{server}"


def test_the_client_side_reproduces_rfc_7677() -> None:
    client = ScramClient("pencil", nonce=CLIENT_NONCE)
    # PostgreSQL sends an empty user name in SCRAM (the startup packet names the user).
    assert client.first() == f"n,,n=,r={CLIENT_NONCE}"
    client._first_bare = f"n=user,r={CLIENT_NONCE}"  # the RFC's exchange names the user
    assert client.final(SERVER_FIRST) == CLIENT_FINAL
    client.verify(SERVER_FINAL)


def test_the_server_side_accepts_rfc_7677_and_proves_itself() -> None:
    server = ScramServer(parse_verifier(_rfc_verifier()), nonce=SERVER_NONCE)
    assert server.first(f"n,,n=user,r={CLIENT_NONCE}") == SERVER_FIRST
    assert server.final(CLIENT_FINAL) == SERVER_FINAL


def test_a_wrong_password_is_refused() -> None:
    server = ScramServer(parse_verifier(scram_sha256_verifier("right")))
    client = ScramClient("wrong")
    server_first = server.first(client.first())
    with pytest.raises(ScramError, match="password authentication failed"):
        server.final(client.final(server_first))


def test_both_sides_agree_on_a_service_verifier() -> None:
    server = ScramServer(parse_verifier(scram_sha256_verifier("s3cret")))
    client = ScramClient("s3cret")
    client.verify(server.final(client.final(server.first(client.first()))))


@pytest.mark.parametrize(
    "client_first",
    ["p=tls-server-end-point,,n=,r=abc", "n,a=other,n=,r=abc", "n,,n=", "garbage"],
)
def test_channel_binding_authzid_and_malformed_first_messages_are_refused(
    client_first: str,
) -> None:
    with pytest.raises(ScramError):
        ScramServer(parse_verifier(scram_sha256_verifier("x"))).first(client_first)


def test_a_replayed_final_message_with_another_nonce_is_refused() -> None:
    server = ScramServer(parse_verifier(_rfc_verifier()), nonce="other-nonce")
    server.first(f"n,,n=user,r={CLIENT_NONCE}")
    with pytest.raises(ScramError, match="nonce"):
        server.final(CLIENT_FINAL)


def test_a_server_with_a_wrong_signature_is_not_trusted() -> None:
    client = ScramClient("pencil", nonce=CLIENT_NONCE)
    client.final(SERVER_FIRST)
    with pytest.raises(ScramError):
        client.verify("v=" + base64.b64encode(b"x" * 32).decode())


def test_something_else_is_not_a_verifier() -> None:
    with pytest.raises(ScramError):
        parse_verifier("md5abcdef")
