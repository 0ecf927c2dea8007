import base64
import hashlib
import hmac

import pytest

from database_service.tenancy.secrets import SecretBox, scram_sha256_verifier


def test_sealed_secret_opens_with_the_same_master_key() -> None:
    box = SecretBox("m" * 40)
    sealed = box.seal("p@ss")
    assert "p@ss" not in sealed
    assert box.open(sealed) == "p@ss"


def test_sealed_secret_does_not_open_with_another_key() -> None:
    sealed = SecretBox("m" * 40).seal("p@ss")
    with pytest.raises(ValueError, match="master key"):
        SecretBox("n" * 40).open(sealed)


def test_scram_verifier_matches_rfc_5802() -> None:
    verifier = scram_sha256_verifier("secret", iterations=4096)
    scheme, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt_b64 = iterations_salt.split(":")
    stored_b64, server_b64 = keys.split(":")
    assert scheme == "SCRAM-SHA-256" and iterations == "4096"
    salted = hashlib.pbkdf2_hmac("sha256", b"secret", base64.b64decode(salt_b64), 4096)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    assert base64.b64decode(stored_b64) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(server_b64) == hmac.digest(salted, b"Server Key", "sha256")
