"""Requests to etcd's v3 JSON gateway (``/v3/...``), each within ``--etcd_dial_timeout``, with
failover across the members.

:class:`Gateway` is the one place that speaks HTTP to etcd: a :class:`treq.client.HTTPClient`
over its own ``Agent`` and ``HTTPConnectionPool`` (unless one is given, as tests do). Three kinds
of request:

- :meth:`Gateway.call`: one POST to one member, its JSON answer within ``dial_timeout``
  (:class:`~deployer.errors.TimedOut` otherwise);
- :meth:`Gateway.request`: the same to the member in use, then to each next member in turn
  when one fails (a connection error, no answer in time, or a 5xx), each within
  ``dial_timeout``; :class:`~deployer.errors.EtcdUnavailable` once every member failed. An
  answer that refuses the request itself (a 4xx, e.g. ``etcdserver: requested lease not
  found``) is no fault of the member: it is raised at once as
  :class:`~deployer.errors.EtcdHTTPError`;
- :meth:`Gateway.open_stream`: a streamed answer (the watch), read by a
  :class:`~deployer.lines.JSONLinesReader`; only its response headers are bounded.

Every request carries ``Grpc-Metadata-hasleader: true`` (:data:`REQUIRE_LEADER`), which the
gateway passes on to etcd as gRPC metadata. A member that has lost its leader (cut off from the
rest of the cluster) then answers with ``etcdserver: no leader`` (HTTP 503) instead of serving
stale data, and ends a watch stream with that error after a few election timeouts instead of
keeping it open and silent while the rest of the cluster moves on. Either way the request fails
over to the next member.
"""

from __future__ import annotations

import json
from typing import Any

from treq import content
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from deployer.errors import EtcdError, EtcdHTTPError, EtcdUnavailable
from deployer.etcd._txaioetcd import Error
from deployer.etcd.members import MemberEndpoints, Members
from deployer.timeouts import cancel_after, is_cancellation

REQUIRE_LEADER = "Grpc-Metadata-hasleader"
"""The header (``true``) that makes etcd refuse requests and end watches on a member that has no
leader (see the module docstring)."""

EXPECTED_FAILURES: tuple[type[BaseException], ...] = (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    TimeoutError,
    EtcdError,
)
"""What a member that is down, slow or refusing makes requests fail with; anything else is
logged with its traceback."""


def describe(failure: BaseException) -> str:
    """A one-line reason for logs and ``/healthz``."""
    if isinstance(failure, ResponseFailed | ResponseNeverReceived | RequestTransmissionFailed):
        inner = [r.getErrorMessage() for r in failure.reasons]
        return f"{type(failure).__name__}: {'; '.join(inner)}"
    if isinstance(failure, TimeoutError):
        return str(failure) or "timed out"
    text = str(failure)
    return f"{type(failure).__name__}: {text}" if text else type(failure).__name__


def require_leader() -> Headers:
    return Headers({REQUIRE_LEADER: ["true"]})


async def json_answer(url: str, response: IResponse) -> dict[str, Any]:
    """The JSON object of a 200 answer; :class:`EtcdHTTPError` for anything else."""
    raw = await content(response)
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if response.code != 200 or not isinstance(obj, dict) or "error" in obj:
        error = Error._parse(obj) if isinstance(obj, dict) else Error(None, None)
        message = error.message or raw[:200].decode("utf-8", "replace")
        raise EtcdHTTPError(url, response.code, error.code, str(message))
    return obj


class Gateway:
    """etcd's JSON gateway on every member (see the module docstring). It owns its connection
    pool unless ``http`` is given."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        members: Members,
        dial_timeout: float,
        *,
        http: HTTPClient | None = None,
    ) -> None:
        self.reactor = reactor
        self.members = members
        self.dial_timeout = dial_timeout
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool._factory.noisy = False  # no "Starting factory" line per connection
            endpoints = MemberEndpoints(reactor, dial_timeout)
            http = HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool))
        self._http = http

    def call(
        self, url: str, path: str, body: dict[str, Any], timeout: float | None = None
    ) -> Deferred[dict[str, Any]]:
        """POST ``body`` to one member's gateway; the JSON answer, within ``timeout`` (default
        ``dial_timeout``)."""
        d = Deferred.fromCoroutine(self._call(url, path, body))
        return cancel_after(d, self.dial_timeout if timeout is None else timeout, self.reactor)

    async def _call(self, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._http.post(
            url + path, json=body, headers=require_leader(), allow_redirects=False
        )
        return await json_answer(url, response)

    def request(self, path: str, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """POST ``body`` to the member in use, failing over to the next members (see the module
        docstring); the JSON answer."""
        return Deferred.fromCoroutine(self._request(path, body))

    async def _request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reasons = []
        for index in self.members.in_turn():
            url = self.members.nodes[index]
            try:
                return await self.call(url, path, body)
            except EtcdHTTPError as e:
                if not e.member_failed:
                    raise
                why = describe(e)
            except Exception as e:
                if is_cancellation(e):
                    raise CancelledError() from e
                why = describe(e)
                if not isinstance(e, EXPECTED_FAILURES):
                    self.log.failure("unexpected error in etcd request {path} to {url}",
                                     Failure(), path=path, url=url)
            reasons.append(f"{url}: {why}")
            self.log.warn("etcd request {path} to {url} failed: {why}", path=path, url=url,
                          why=why)
            self.members.failed(index)
        raise EtcdUnavailable(
            f"no etcd member answered {path} within {self.dial_timeout:g}s each: "
            + "; ".join(reasons)
        )

    async def open_stream(
        self, url: str, path: str, body: dict[str, Any], reader: Protocol
    ) -> None:
        """POST ``body`` to one member and hand the streamed answer to ``reader``; fails if no
        response headers arrive within ``dial_timeout`` or the answer is not a 200."""
        d = self._http.post(
            url + path,
            json=body,
            headers=require_leader(),
            unbuffered=True,
            allow_redirects=False,
        )
        response = await cancel_after(d, self.dial_timeout, self.reactor)
        if response.code != 200:
            await json_answer(url, response)  # raises EtcdHTTPError
        response.deliverBody(reader)

    async def close(self) -> None:
        """Close the pool's connections (if the pool is this gateway's own)."""
        if self._pool is not None:
            await self._pool.closeCachedConnections()
