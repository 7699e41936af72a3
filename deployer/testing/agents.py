"""Agents for tests and benchmarks: one that counts engine calls, one that never answers."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.iweb import IAgent
from zope.interface import implementer


@implementer(IAgent)
class CountingAgent:
    def __init__(self, agent: IAgent) -> None:
        self.agent = agent
        self.calls: list[tuple[str, str]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Any:
        path = uri.decode().split("://", 1)[-1].partition("/")[2].partition("?")[0]
        # drop the API version: /v1.41/containers/json -> containers/json
        first, _, rest = path.partition("/")
        if first.startswith("v") and first[1:2].isdigit():
            path = rest
        self.calls.append((method.decode(), path))
        return self.agent.request(method, uri, headers, bodyProducer)

    def count(self, method: str | None = None, prefix: str = "") -> int:
        return sum(
            1 for m, p in self.calls if (method is None or m == method) and p.startswith(prefix)
        )

    def summary(self) -> Counter[tuple[str, str]]:
        return Counter(self.calls)

    def reset(self) -> None:
        self.calls.clear()


@implementer(IAgent)
class HangingAgent:
    """An agent whose requests are never answered (an engine that accepted the connection and
    went silent); a cancelled request fails with ``CancelledError``, as an agent's does."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.cancelled = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        self.requests.append((method.decode(), uri.decode()))

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        return Deferred(cancel)
