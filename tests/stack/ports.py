"""Loopback ports for the processes under test.

A port found free is free only a moment: until the process that is given it binds it, any other
process may take it (an outgoing connection gets a port from the same range). The processes
that a fixture starts on ports of its own choosing are therefore started again on fresh ports
when their log says the address was in use (:func:`on_fresh_ports`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

#: Attempts of :func:`on_fresh_ports`.
ATTEMPTS = 3


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that were free a moment ago."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def address_in_use(log: str, ports: Iterable[int]) -> bool:
    """Whether a line of ``log`` says that one of ``ports`` on 127.0.0.1 could not be bound
    (in Go's wording, ``listen tcp 127.0.0.1:PORT: bind: address already in use``, or in
    Twisted's, ``Couldn't listen on 127.0.0.1:PORT: [Errno 98] Address already in use``)."""
    addresses = [f"127.0.0.1:{port}:" for port in ports]
    return any("address already in use" in line.lower() and any(a in line for a in addresses)
               for line in log.splitlines())


def on_fresh_ports(start: Callable[[bool], T], taken: Callable[[], bool],
                   attempts: int = ATTEMPTS) -> T:
    """``start(again)``, again while it fails and ``taken()`` says that one of its ports was in
    use: ``again`` is True then, and ``start`` picks fresh ports. Any other failure, and the
    last one, is raised."""
    for attempt in range(attempts):
        try:
            return start(attempt > 0)
        except Exception:
            if attempt == attempts - 1 or not taken():
                raise
    raise AssertionError("not reached")


__all__ = ["address_in_use", "free_port", "free_ports", "on_fresh_ports"]
