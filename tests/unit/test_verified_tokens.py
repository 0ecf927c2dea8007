"""The authenticator keeps verified tokens (their signature checked once) and nothing more: a
disabled service, a revoked token and an expired token are refused as before. The directory here
is an in-memory stand-in for the control plane: this tests the cache's logic, not PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from database_service.auth import Scope, TokenCodec
from database_service.auth.identities import Authenticator, ServiceIdentity
from database_service.errors import Unauthenticated, Unavailable

KEY = b"k" * 32


class Directory:
    """What Authenticator asks of the service directory."""

    def __init__(self) -> None:
        self.active = True
        self.revoked_ids: set[tuple[str, str]] = set()
        self.finds = 0

    async def find(self, name: str) -> ServiceIdentity | None:
        self.finds += 1
        return ServiceIdentity(name, frozenset({"acme"}), frozenset(Scope), self.active, False)

    async def revoked(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.revoked_ids)


class CountingCodec(TokenCodec):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verified = 0

    def verify(self, token: str) -> Any:
        self.verified += 1
        return super().verify(token)


def authenticator(
    directory: Directory | None = None, **options: Any
) -> tuple[Authenticator, CountingCodec, Directory]:
    codec = CountingCodec(KEY, issuer="test", audience="urn:test")
    directory = directory or Directory()
    auth = Authenticator(
        codec,
        directory,  # type: ignore[arg-type]
        bootstrap_admin_token="x" * 32,
        cache_ttl=0.0,  # the directory is asked every time: only the signature is kept
        **options,
    )
    return auth, codec, directory


def test_a_token_signature_is_checked_once() -> None:
    auth, codec, _ = authenticator()
    token = codec.issue("svc", tenants=["acme"], scopes=[Scope.READ], ttl_seconds=600)

    async def run() -> None:
        for _ in range(5):
            principal = await auth.authenticate(f"Bearer {token}")
            assert principal.service == "svc" and principal.scopes == {Scope.READ}

    asyncio.run(run())
    assert codec.verified == 1


def test_a_kept_token_of_a_disabled_service_or_revoked_is_refused() -> None:
    auth, codec, directory = authenticator()
    token = codec.issue("svc", tenants=["acme"], scopes=[Scope.READ], ttl_seconds=600)

    async def run() -> None:
        await auth.authenticate(f"Bearer {token}")
        directory.active = False
        with pytest.raises(Unauthenticated, match="disabled"):
            await auth.authenticate(f"Bearer {token}")
        directory.active = True
        claims = codec.inspect(token)
        directory.revoked_ids.add((claims.service, claims.token_id))
        with pytest.raises(Unauthenticated, match="revoked"):
            await auth.authenticate(f"Bearer {token}")

    asyncio.run(run())


def test_a_kept_token_past_its_expiry_is_checked_again_and_refused() -> None:
    auth, codec, _ = authenticator()
    token = codec.issue("svc", tenants=["acme"], scopes=[Scope.READ], ttl_seconds=600)

    async def run() -> None:
        await auth.authenticate(f"Bearer {token}")
        (digest,) = auth._verified_tokens
        principal, _ = auth._verified_tokens[digest]
        auth._verified_tokens[digest] = (principal, 0.0)  # as if its expiry had passed
        await auth.authenticate(f"Bearer {token}")  # verified again (still valid for the codec)

    asyncio.run(run())
    assert codec.verified == 2


def test_kept_tokens_are_bounded() -> None:
    auth, codec, _ = authenticator(verified_tokens=3)
    tokens = [
        codec.issue("svc", tenants=["acme"], scopes=[Scope.READ], ttl_seconds=600) for _ in range(5)
    ]

    async def run() -> None:
        for token in tokens:
            await auth.authenticate(f"Bearer {token}")

    asyncio.run(run())
    assert len(auth._verified_tokens) == 3


def test_a_forged_token_is_never_kept() -> None:
    auth, _, _ = authenticator()
    other = TokenCodec(b"o" * 32, issuer="test", audience="urn:test")
    forged = other.issue("svc", tenants=["acme"], scopes=[Scope.ADMIN], ttl_seconds=600)

    async def run() -> None:
        for _ in range(2):
            with pytest.raises(Unauthenticated):
                await auth.authenticate(f"Bearer {forged}")

    asyncio.run(run())
    assert not auth._verified_tokens


class DownDirectory(Directory):
    """The directory with PostgreSQL going away and coming back."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def find(self, name: str) -> ServiceIdentity | None:
        if self.down:
            raise Unavailable("service directory: PostgreSQL connection failed")
        return await super().find(name)

    async def revoked(self) -> frozenset[tuple[str, str]]:
        if self.down:
            raise Unavailable("service directory: PostgreSQL connection failed")
        return await super().revoked()


def test_what_was_read_answers_while_postgres_is_unreachable() -> None:
    """Nothing can be disabled or revoked while PostgreSQL is down (both are writes to it), so
    the last identity and revocation list read keep answering, for ``stale_if_unavailable``;
    a revoked token stays refused; past the window, or with nothing read yet, Unavailable."""
    directory = DownDirectory()
    auth, codec, _ = authenticator(directory, stale_if_unavailable=0.3)
    good = codec.issue("svc", tenants=["acme"], scopes=[Scope.READ], ttl_seconds=600)
    bad = codec.issue("svc", tenants=["acme"], scopes=[Scope.READ], ttl_seconds=600)
    directory.revoked_ids.add(("svc", codec.verify(bad).token_id or ""))
    other = codec.issue("other", tenants=["acme"], scopes=[Scope.READ], ttl_seconds=600)

    async def run() -> None:
        assert (await auth.authenticate(f"Bearer {good}")).service == "svc"
        directory.down = True
        assert (await auth.authenticate(f"Bearer {good}")).service == "svc"
        with pytest.raises(Unauthenticated, match="revoked"):
            await auth.authenticate(f"Bearer {bad}")
        with pytest.raises(Unavailable):  # never read: no identity to stand in
            await auth.authenticate(f"Bearer {other}")
        await asyncio.sleep(0.35)
        with pytest.raises(Unavailable):  # past the window
            await auth.authenticate(f"Bearer {good}")
        directory.down = False
        assert (await auth.authenticate(f"Bearer {good}")).service == "svc"

    asyncio.run(run())


def test_a_revocation_list_never_read_is_not_an_empty_one() -> None:
    directory = DownDirectory()
    directory.down = True
    auth, _, _ = authenticator(directory)
    with pytest.raises(Unavailable):
        asyncio.run(auth.is_revoked("svc", "t1"))


class SlowDirectory(Directory):
    """A directory whose reads take a moment: calls that find a token due at once overlap."""

    async def find(self, name: str) -> ServiceIdentity | None:
        await asyncio.sleep(0.001)
        return await super().find(name)

    async def revoked(self) -> frozenset[tuple[str, str]]:
        await asyncio.sleep(0.001)
        return await super().revoked()


def test_a_token_verified_again_by_calls_at_once_stays_one_principal() -> None:
    """Each check of a kept token that is due (here every call: cache_ttl 0) ends with the
    principal object it resolved to before when nothing changed, however many calls check it
    at once: the result cache's replays know their caller by that object (a new one each
    time dropped every replay kept for the caller)."""
    auth, codec, directory = authenticator(SlowDirectory())
    token = codec.issue("svc", tenants=["acme"], scopes=[Scope.READ], ttl_seconds=600)
    authorization = f"Bearer {token}"

    async def run() -> None:
        first = await auth.authenticate(authorization)
        for _ in range(3):
            again = await asyncio.gather(*(auth.authenticate(authorization) for _ in range(8)))
            assert all(principal is first for principal in again)
        directory.revoked_ids.add(("svc", codec.verify(token).token_id or ""))
        refused = await asyncio.gather(
            *(auth.authenticate(authorization) for _ in range(4)), return_exceptions=True
        )
        assert all(isinstance(outcome, Unauthenticated) for outcome in refused)
        assert auth.known(authorization) is None
        assert authorization not in auth._principals  # refused now: nothing kept for it

    asyncio.run(run())
    assert directory.finds >= 4
