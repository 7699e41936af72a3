"""An in-memory etcd: the v3 JSON gateway (``/v3/...``) of a cluster, as a web resource.

Give the daemon's own client an agent over it (tests on a ``Clock``)::

    fake = FakeEtcd(clock)
    etcd = Etcd(clock, EtcdConfig(nodes=("http://10.0.0.1:2379",)), http=fake.http_client())

or serve it in a ``twisted.web.server.Site`` on a real port.

What it serves follows etcd 3.4's gateway as observed (tests/test_etcd_gateway.py runs one suite
against both): ``/v3/kv/range`` (a key, a range or a prefix; ``limit``, ``keys_only``,
``count_only``, ``sort_order`` and ``sort_target``, ``min_``/``max_create_revision`` and
``min_``/``max_mod_revision``, with ``count`` taken before those bounds; ``serializable`` is
accepted; only the current revision), ``/v3/kv/put`` (with or without a lease),
``/v3/kv/txn`` (``compare`` on ``version``, ``create_revision``, ``mod_revision``, ``value``
and ``lease``; ``request_put`` with or without a lease, ``request_range``,
``request_delete_range``; one revision per transaction that changes something; duplicate keys
and more than 128 operations refused), ``/v3/kv/deleterange``, ``/v3/kv/compaction``,
``/v3/watch`` (a stream of ``{"result": ...}`` lines: ``created``, events with
``mod_revision`` whose type is omitted for PUT and ``DELETE`` otherwise, the history from
``start_revision`` in one message, progress notifications every ``progress_interval`` seconds,
and ``canceled`` with ``compact_revision`` for a compacted start), and ``/v3/lease/grant``,
``keepalive``, ``revoke`` and ``timetolive``, leases expiring on the clock and deleting their
keys (:mod:`deployer.testing.fake_etcd_store` has the keyspace). Errors are ``{"error",
"message", "code"}`` with etcd's gRPC code and the gateway's HTTP status.

Members are told apart by the Host header (without the port). A test steers them with
:meth:`~FakeEtcd.freeze` (a member that accepts requests and never answers, as one stopped with
SIGSTOP: its watch streams go silent too, and get what they missed on :meth:`~FakeEtcd.thaw`),
:attr:`~FakeEtcd.down` (members whose connections the agents from :meth:`~FakeEtcd.agent`
refuse, as a member that is not running), :attr:`~FakeEtcd.hold` (transactions wait for
:meth:`~FakeEtcd.release`), :attr:`~FakeEtcd.reject` and :attr:`~FakeEtcd.max_requests` (the
requests beyond it are refused with ``etcdserver: too many requests``: code that spins fails
instead of looping). It finds every request in :attr:`~FakeEtcd.requests`,
:attr:`~FakeEtcd.txns`, :attr:`~FakeEtcd.ranges` and :attr:`~FakeEtcd.watches`. What is written
late (a released transaction, a watch event, a thawed member's backlog) reaches the agents'
clients at :meth:`~FakeEtcd.flush`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.web.client import URI
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from deployer.testing.fake_etcd_store import (
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    STATUS,
    EtcdStore,
    Events,
    GatewayError,
    as_int,
    unb64,
)
from deployer.testing.fake_etcd_watch import FakeWatch

__all__ = ["FakeEtcd", "FakeEtcdAgent", "FakeWatch", "GatewayError", "SyncProducer"]


class FakeEtcd(EtcdStore, Resource):
    """One etcd cluster's store, and the gateway of each of its members as one resource (see
    the module docstring). ``clock`` times lease expiry and progress notifications
    (``progress_interval`` seconds, etcd's default 10 minutes; None for none)."""

    isLeaf = True

    def __init__(self, clock: IReactorTime, progress_interval: float | None = 600.0) -> None:
        EtcdStore.__init__(self, clock)
        Resource.__init__(self)
        self.progress_interval = progress_interval
        self.watches: list[FakeWatch] = []
        self.silent: set[str] = set()
        self.down: set[str] = set()
        self.hold = False
        self.held: list[tuple[Request, str, dict[str, Any]]] = []
        self.reject: str | None = None
        self.max_requests: int | None = None
        self.requests: list[tuple[str, str, Sequence[bytes] | None]] = []
        self.txns: list[tuple[str, dict[bytes, bytes]]] = []
        self.ranges: list[tuple[str, dict[str, Any]]] = []
        self._agents: list[FakeEtcdAgent] = []
        self._routes: dict[str, Callable[[Request, str, dict[str, Any]], Any]] = {
            "/v3/kv/range": self._range, "/v3/kv/txn": self._txn,
            "/v3/kv/put": lambda r, m, body: self.kv_put(body),
            "/v3/kv/deleterange": lambda r, m, body: self.deleterange(body),
            "/v3/kv/compaction": lambda r, m, body: self.compaction(body),
            "/v3/watch": self._watch,
            "/v3/lease/grant": lambda r, m, body: self.grant(body),
            "/v3/lease/keepalive": self._keepalive,
            "/v3/lease/revoke": lambda r, m, body: self.revoke_request(body),
            "/v3/lease/timetolive": lambda r, m, body: self.timetolive(body),
        }

    # -- clients ------------------------------------------------------------------------------

    def agent(self) -> FakeEtcdAgent:
        """A new agent over this etcd (one client's connections: see :class:`FakeEtcdAgent`)."""
        agent = FakeEtcdAgent(self)
        self._agents.append(agent)
        return agent

    def http_client(self, agent: FakeEtcdAgent | None = None) -> HTTPClient:
        """A treq client over ``agent`` (a new one by default) that sends request bodies at
        once, so that a request made on a ``Clock`` is answered at once."""
        return HTTPClient(agent if agent is not None else self.agent(),
                          data_to_body_producer=SyncProducer)

    def flush(self) -> None:
        """Move what was written late to the clients of every agent from :meth:`agent`."""
        for agent in self._agents:
            agent.flush()

    def count(self, path: str) -> int:
        """How many requests to ``path`` reached a member (answered or not)."""
        return sum(1 for _, p, _ in self.requests if p == path)

    # -- members ------------------------------------------------------------------------------

    def freeze(self, member: str) -> None:
        """``member`` accepts requests and never answers them; its watch streams go silent."""
        self.silent.add(member)

    def thaw(self, member: str) -> None:
        """``member`` answers new requests again; its watch streams get what they missed."""
        self.silent.discard(member)
        for w in self.watches:
            if w.member == member:
                w.thaw()

    def release(self) -> None:
        """Apply and answer the transactions held while :attr:`hold` was set."""
        held, self.held = self.held, []
        for request, member, body in held:
            try:
                answer = self._apply_txn(member, body)
            except GatewayError as e:
                answer = self._error(request, e)
            request.write(json.dumps(answer).encode())
            request.finish()

    @property
    def open_watches(self) -> list[FakeWatch]:
        return [w for w in self.watches if w.open]

    # -- serving ------------------------------------------------------------------------------

    def render_POST(self, request: Request) -> bytes | int:
        member = (request.getHeader("host") or "").rsplit(":", 1)[0].strip("[]")
        path = request.path.decode()
        self.requests.append(
            (member, path, request.requestHeaders.getRawHeaders(b"grpc-metadata-hasleader"))
        )
        request.setHeader("content-type", "application/json")
        if self.max_requests is not None and len(self.requests) > self.max_requests:
            error = GatewayError(RESOURCE_EXHAUSTED, "etcdserver: too many requests")
            return json.dumps(self._error(request, error)).encode()
        if member in self.silent:
            return NOT_DONE_YET
        route = self._routes.get(path)
        if route is None:
            request.setResponseCode(404)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return b"Not Found\n"
        try:
            body = json.loads(request.content.read() if request.content else b"{}")
            if not isinstance(body, dict):
                raise GatewayError(INVALID_ARGUMENT, "json: cannot unmarshal into a request")
            answer = route(request, member, body)
        except ValueError as e:
            answer = self._error(request, GatewayError(INVALID_ARGUMENT, str(e)))
        except GatewayError as e:
            answer = self._error(request, e)
        if isinstance(answer, int):
            return answer
        return answer if isinstance(answer, bytes) else json.dumps(answer).encode()

    def _error(self, request: Request, e: GatewayError) -> dict[str, Any]:
        request.setResponseCode(STATUS.get(e.code, 500))
        return e.answer()

    def _range(self, request: Request, member: str, body: dict[str, Any]) -> dict[str, Any]:
        self.ranges.append((member, body))
        return self.range(body)

    def _txn(self, request: Request, member: str, body: dict[str, Any]) -> Any:
        if self.reject:
            raise GatewayError(INVALID_ARGUMENT, self.reject)
        self.check_txn(body)
        if self.hold:
            self.held.append((request, member, body))
            return NOT_DONE_YET
        return self._apply_txn(member, body)

    def _apply_txn(self, member: str, body: dict[str, Any]) -> dict[str, Any]:
        answer, puts = self.apply_txn(body)
        if puts:
            self.txns.append((member, puts))
        return answer

    def _keepalive(self, request: Request, member: str, body: dict[str, Any]) -> bytes:
        return json.dumps(self.keepalive(body)).encode() + b"\n"

    # -- watch --------------------------------------------------------------------------------

    def published(self, events: Events) -> None:
        for w in self.watches:
            self.send_events(w, events)

    def send_events(self, w: FakeWatch, events: Events) -> None:
        mine = [w.shown(e) for e in events if w.covers(unb64(e["kv"]["key"]))]
        if mine:
            w.send({"result": {"header": self.header(), "events": mine}})

    def _watch(self, request: Request, member: str, body: dict[str, Any]) -> int:
        create = body.get("create_request")
        if not isinstance(create, dict):
            raise GatewayError(INVALID_ARGUMENT, "the fake etcd serves only create_request")
        w = FakeWatch(request, member, unb64(create.get("key")), unb64(create.get("range_end")),
                      as_int(create.get("start_revision")), self.silent.__contains__)
        w.prev_kv = create.get("prev_kv") is True
        request.notifyFinish().addBoth(lambda _: w.closed())
        self.watches.append(w)
        w.send({"result": {"header": self.header(), "created": True}})
        if w.start_revision and w.start_revision < self.compacted:
            w.send({"result": {"header": self.header(revision=False), "canceled": True,
                               "compact_revision": str(self.compacted)}})
            return NOT_DONE_YET
        if w.start_revision:
            self.send_events(w, [e for rev, evs in self.history if rev >= w.start_revision
                                  for e in evs])
        if create.get("progress_notify") and self.progress_interval:
            self._progress(w)
        return NOT_DONE_YET

    def _progress(self, w: FakeWatch) -> None:
        def tick() -> None:
            if w.open:
                w.send({"result": {"header": self.header()}})
                self._progress(w)

        assert self.progress_interval is not None
        w.timer = self.clock.callLater(self.progress_interval, tick)


class FakeEtcdAgent(RequestTraversalAgent):
    """One client's connections to the members of a :class:`FakeEtcd` (a simulated host's
    network): a connection to a member in :attr:`FakeEtcd.down`, or to any member while
    :attr:`cut`, is refused; :attr:`paths` lists the path of every request, refused or not."""

    def __init__(self, fake: FakeEtcd) -> None:
        super().__init__(fake)
        self.fake = fake
        self.cut = False
        self.paths: list[str] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        parsed = URI.fromBytes(uri)
        self.paths.append(parsed.path.decode())
        host = parsed.host.decode().strip("[]")
        if self.cut or host in self.fake.down:
            return fail(ConnectionRefusedError(host, parsed.port))
        response: Deferred[IResponse] = super().request(method, uri, headers, bodyProducer)
        return response

    def count(self, path: str) -> int:
        """How many requests to ``path`` this client made."""
        return self.paths.count(path)


@implementer(IBodyProducer)
class SyncProducer:
    """Writes a request body at once (treq's default producer needs a running reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass
