"""Listening ports, checked before anything starts: a port in use is a start-up error that names
the listener, the address and the setting to change, never a half-started service."""

from __future__ import annotations

import contextlib
import errno
import socket

__all__ = ["PortInUse", "StartupError", "bind_tcp", "check_port_free", "free_port"]


class StartupError(RuntimeError):
    """The service cannot start; the message says why and what to do (no traceback needed)."""


class PortInUse(StartupError):
    def __init__(self, what: str, host: str, port: int, setting: str, cause: OSError) -> None:
        self.what, self.host, self.port, self.setting = what, host, port, setting
        reason = "is in use" if cause.errno == errno.EADDRINUSE else f"cannot be bound ({cause})"
        super().__init__(
            f"{what} port {port} on {host} {reason}: another program (or another Database "
            f"Service) listens there. Stop it, or set {setting} to a free port."
        )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def bind_tcp(
    host: str, port: int, *, what: str, setting: str, reuse_port: bool = False
) -> socket.socket:
    """A TCP socket bound (not yet listening) to ``host:port``, or ``PortInUse``.

    SO_REUSEADDR lets a restart bind over connections of the previous run still in TIME_WAIT,
    not share a port someone listens on; SO_REUSEPORT is left off, so a listener that has it
    (gRPC sets it by default) still makes this bind fail — unless ``reuse_port``: a worker
    binding beside the others of its ``serve`` (the supervisor checked the port was free)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PortInUse(what, host, port, setting, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


def check_port_free(host: str, port: int, *, what: str, setting: str) -> None:
    """``PortInUse`` when something listens on ``host:port`` now (port 0 is always free)."""
    if port == 0:
        return
    bind_tcp(host, port, what=what, setting=setting).close()
