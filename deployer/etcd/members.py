"""The etcd members: which one is in use, and how the HTTP agent reaches each.

Members are used in the order of ``--etcd_nodes``. Writes, other requests, the watch and the
liveness check share the member in use (:attr:`Members.current`); a failure of that member, seen
by any of them, moves all of them to the next one.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


@attrs.define
class Members:
    """The etcd members, in the order given, and the one in use. A failure of the member in use
    moves every later request to the next one."""

    nodes: tuple[str, ...]
    current: int = 0

    def __attrs_post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("no etcd nodes given")
        self.nodes = tuple(n.rstrip("/") for n in self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def in_use(self) -> str:
        """The URL of the member in use."""
        return self.nodes[self.current]

    def in_turn(self) -> list[int]:
        """Every member once, starting with the one in use."""
        n = len(self.nodes)
        return [(self.current + i) % n for i in range(n)]

    def failed(self, index: int) -> None:
        """Member ``index`` failed: if it is the one in use, the next one is."""
        if index == self.current:
            self.current = (index + 1) % len(self.nodes)


@implementer(IAgentEndpointFactory)
@attrs.frozen
class MemberEndpoints:
    """How the agent reaches a member: directly when the URL names an IP address.

    ``HostnameEndpoint`` reports a refused connection only at its next attempt tick (0.3 s), so
    with it every dead member would delay the failover to the next one.
    """

    reactor: Any
    timeout: float

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii").strip("[]")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        if uri.scheme == b"https":
            tls = BrowserLikePolicyForHTTPS().creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(tls, endpoint)
        return endpoint
