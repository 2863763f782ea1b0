"""Free TCP ports on 127.0.0.1, chosen at run time so parallel test runs never collide."""

from __future__ import annotations

import socket

__all__ = ["free_ports"]


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago.

    All ``n`` sockets are bound (port 0) before any is closed, so the ports are distinct.
    A port can in principle be taken by another process before the caller binds it;
    the window is small and the kernel hands out ephemeral ports round-robin.
    """
    if n < 0:
        raise ValueError(f"free_ports(n): n must be >= 0, got {n}")
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()
