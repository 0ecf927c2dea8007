"""The wire port's compiled relay (src/lib.rs); see database_service/pgwire/relay.py."""

from typing import Any

class Plane:
    def __init__(self, notify_fd: int) -> None: ...
    def delegate(
        self,
        session: int,
        fd: int,
        pool: int,
        class_: int,
        buffered: bytes,
        wanted: list[tuple[str, str, str]],
        limit_ms: int,
        margin_ms: int,
        pool_max: int,
        statements: list[tuple[bytes, bytes, bytes, int, bytes]],
        /,
    ) -> None: ...
    def recall(self, session: int, /) -> bool: ...
    def lend(
        self,
        pool: int,
        server: int,
        fd: int,
        applied: list[tuple[str, str]],
        prepared: list[bytes],
        prepared_bytes: int,
        prepared_max: int,
        /,
    ) -> None: ...
    def unavailable(self, pool: int, /) -> None: ...
    def reclaim(self, pool: int, /) -> None: ...
    def reclaim_idle(self) -> None: ...
    def held(self) -> list[tuple[int, int | None, float]]: ...
    def serving(self, session: int, /) -> int | None: ...
    def allow(self, class_: int, key: bytes, verdict: int, /) -> None: ...
    def forget(self, class_: int | None = None, /) -> None: ...
    def counts(self) -> tuple[int, int, int]: ...
    def take(self) -> list[tuple[Any, ...]]: ...
    def close(self) -> None: ...

def shape_of(text: bytes, /) -> tuple[bytes, bytes] | None: ...

class Front:
    """The gRPC port's front (src/front.rs); see database_service/api/grpc/front.py."""

    def __init__(
        self,
        fds: list[int],
        notify_fd: int,
        fast: list[str],
        backend: str,
        max_receive: int,
        max_send: int,
        max_streams: int,
        keepalive_ms: int,
        /,
    ) -> None: ...
    def take(
        self,
    ) -> tuple[
        list[tuple[int, int, tuple[tuple[str, str | bytes], ...], bytes, str, float]], list[int]
    ]: ...
    def answer(
        self,
        id: int,
        status: int,
        message: str,
        payload: bytes | None,
        trailers: Any,
        /,
    ) -> None: ...
    def stop(self) -> None: ...
    def counts(self) -> tuple[int, int, int]: ...
    def close(self) -> None: ...
