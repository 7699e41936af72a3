"""Where the Docker engine listens and how to reach it: ``--docker``/``DOCKER_HOST`` parsed,
and an agent that sends every request to that one endpoint."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _FixedEndpoint:
    """Every request goes to one endpoint, whatever the URL's host says."""

    endpoint: IStreamClientEndpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self.endpoint


@attrs.frozen
class EngineAddress:
    """Where the engine listens: a unix socket ``path``, or ``host`` and ``port``."""

    path: str | None = None
    host: str | None = None
    port: int = 2375


def parse_engine_url(url: str) -> EngineAddress:
    """``unix:///path`` or ``tcp://host:port`` (the forms of ``-docker`` and DOCKER_HOST);
    :class:`ValueError` says what is wrong with anything else."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = parts.path or parts.netloc
        if not path:
            raise ValueError(f"no socket path in {url!r}")
        return EngineAddress(path=path)
    if parts.scheme in ("tcp", "http"):
        if not parts.hostname:
            raise ValueError(f"no host in {url!r}")
        try:
            port = parts.port or 2375
        except ValueError as e:
            raise ValueError(f"bad port in {url!r}: {e}") from None
        return EngineAddress(host=parts.hostname, port=port)
    raise ValueError(f"unsupported Docker endpoint {url!r}: use unix:///path or tcp://host:port")


def engine_endpoint(reactor: Any, url: str) -> IStreamClientEndpoint:
    address = parse_engine_url(url)
    if address.path is not None:
        return UNIXClientEndpoint(reactor, address.path, timeout=10)
    assert address.host is not None
    return HostnameEndpoint(reactor, address.host, address.port, timeout=10)


def engine_pool(reactor: Any) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    pool._factory.noisy = False
    return pool


def engine_agent(reactor: Any, url: str, pool: HTTPConnectionPool | None = None) -> IAgent:
    """An agent that sends every request to the engine at ``url``, whatever the request URL's
    host (requests are addressed as ``http://docker/...``)."""
    endpoint = engine_endpoint(reactor, url)
    return Agent.usingEndpointFactory(reactor, _FixedEndpoint(endpoint), pool=pool)
