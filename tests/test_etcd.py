"""Fast tests of deployer.etcd: key layout, the watch stream reader, group commit, failover and
backoff, resume and resync, against an in-memory etcd gateway driven through the real HTTP
client code (treq over RequestTraversalAgent) with a Clock."""

from __future__ import annotations

import base64
import itertools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectingCancelledError, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseNeverReceived
from twisted.web.iweb import IAgent, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from deployer.errors import EtcdUnavailable
from deployer.etcd import (
    MIN_RETRY_DELAY,
    WATCH_IDLE_TIMEOUT,
    Backoff,
    Etcd,
    EtcdConfig,
    InvalidKey,
    JSONLinesReader,
    KeyLayout,
    WatchService,
)
from deployer.model import Update
from deployer.reference import parse_reference
from tests.helpers import fired


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


# -- key layout -------------------------------------------------------------------------------

UPDATES = [
    Update(repository="myorg/foo", source="webhook", received=1.5),
    Update(repository="busybox", tag="latest", source="dockerhub", received=2.0, event_id="e1"),
    Update(repository="myorg/foo", registry="127.0.0.1:5000", tag="qa",
           digest="sha256:" + "0123456789abcdef" * 4, source="registry", received=3.25,
           event_id="5a0c"),
    Update(repository="*", source="repull", received=4.0),
]


@pytest.mark.parametrize("update", UPDATES, ids=lambda u: u.pattern)
def test_key_and_value_round_trip(update: Update) -> None:
    layout = KeyLayout("/deployer")
    key = layout.key(update)
    assert key == b"/deployer/" + update.pattern.encode()
    assert layout.decode(key, layout.value(update), now=99.0) == update
    value = json.loads(layout.value(update))
    assert set(value) == {"repository", "registry", "tag", "digest", "source", "received",
                          "event_id"}


path_component = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,8})?", fullmatch=True)


@given(
    path=st.lists(path_component, min_size=1, max_size=3).map("/".join),
    registry=st.none() | st.sampled_from(["127.0.0.1:5000", "registry.example.com", "localhost"]),
    tag=st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    received=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    event_id=st.none() | st.text(max_size=20),
)
def test_round_trip_any_valid_update(
    path: str, registry: str | None, tag: str | None, received: float, event_id: str | None
) -> None:
    # The familiar form is what the engine lists; take it from the reference grammar.
    ref = parse_reference(f"{registry}/{path}" if registry else path)
    update = Update(repository=ref.path, registry=ref.host, tag=tag, source="webhook",
                    received=received, event_id=event_id)
    layout = KeyLayout("/deployer")
    assert layout.decode(layout.key(update), layout.value(update), now=0.0) == update


def test_trailing_slash_in_prefix() -> None:
    layout = KeyLayout("/deployer//")
    assert layout.prefix == "/deployer"
    assert layout.key(UPDATES[0]) == b"/deployer/myorg/foo"
    watched = layout.watched()._marshal()
    assert unb64(watched["key"]) == b"/deployer/"
    assert unb64(watched["range_end"]) == b"/deployer0"  # '/' + 1: nothing of /deployer2/...


ODD_RECEIVED = [
    b'{"repository": "myorg/foo", "registry": null, "tag": "qa", "source": "x", "received": %s}'
    % raw
    for raw in (b"1e999", b"1" + b"0" * 400, b"NaN", b"true", b'"soon"')
]


@pytest.mark.parametrize("value", [b"anything", b"", b"1700000000", b"[1, 2]", b'{"x": 1}',
                                   b"\xff\xfe", b"[" * 100_000, *ODD_RECEIVED])
def test_operator_values_trigger_from_the_key(value: bytes) -> None:
    update = KeyLayout("/deployer").decode(b"/deployer/myorg/foo:qa", value, now=42.0)
    assert update == Update(repository="myorg/foo", tag="qa", source="etcd", received=42.0)


def test_a_value_describing_another_repository_is_not_trusted() -> None:
    layout = KeyLayout("/deployer")
    other = layout.value(Update(repository="myorg/other", source="webhook", received=1.0))
    assert layout.decode(b"/deployer/myorg/foo", other, now=5.0) == Update(
        repository="myorg/foo", source="etcd", received=5.0
    )
    bad_digest = json.dumps({"repository": "myorg/foo", "registry": None, "tag": None,
                             "digest": "nope", "source": "x", "received": 1}).encode()
    assert layout.decode(b"/deployer/myorg/foo", bad_digest, now=5.0).source == "etcd"


def test_a_digest_in_the_key_is_kept() -> None:
    digest = "sha256:" + "ab" * 32
    update = KeyLayout("/deployer").decode(b"/deployer/myorg/foo:qa@" + digest.encode(), b"x", 1.0)
    assert update is not None
    assert (update.repository, update.tag, update.digest) == ("myorg/foo", "qa", digest)


@pytest.mark.parametrize("key", [b"/deployer/_/lock/host1", b"/deployer/_", b"/deployer2/myorg/foo",
                                 b"/other/myorg/foo", b"/deployer"])
def test_reserved_and_foreign_keys_deliver_nothing(key: bytes) -> None:
    assert KeyLayout("/deployer").decode(key, b"x", now=1.0) is None


@pytest.mark.parametrize("key", [b"/deployer/", b"/deployer/Not A Repo",
                                 b"/deployer/myorg/foo:bad tag", b"/deployer/myorg//foo",
                                 b"/deployer/\xff\xfe", b"/deployer/_x"])
def test_invalid_keys_raise(key: bytes) -> None:
    with pytest.raises(InvalidKey):
        KeyLayout("/deployer").decode(key, b"x", now=1.0)


# -- the stream reader ------------------------------------------------------------------------

MESSAGES = [
    {"result": {"header": {"revision": "4"}, "created": True}},
    {"result": {"header": {"revision": "5"}, "events": [
        {"kv": {"key": b64(b"/deployer/myorg/foo"), "value": b64(b"x" * 300),
                "mod_revision": "5"}}]}},
    {"result": {"header": {"revision": "6"}, "events": [
        {"type": "DELETE", "kv": {"key": b64(b"/deployer/myorg/foo"), "mod_revision": "6"}}]}},
]
STREAM = b"".join(json.dumps(m).encode() + b"\n" for m in MESSAGES)


def reader_on(transport: StringTransport | None = None) -> tuple[JSONLinesReader, list[Any]]:
    got: list[Any] = []
    reader = JSONLinesReader(got.append)
    reader.makeConnection(transport or StringTransport())
    return reader, got


def test_reader_one_byte_at_a_time() -> None:
    reader, got = reader_on()
    for i in range(len(STREAM)):
        reader.dataReceived(STREAM[i : i + 1])
    assert got == MESSAGES
    reader.connectionLost(Failure(ResponseDone()))
    assert reader.done.called
    assert reader.done.result is None


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_reader_any_split(cuts: list[int]) -> None:
    reader, got = reader_on()
    bounds = [0, *sorted(cuts), len(STREAM)]
    for start, end in itertools.pairwise(bounds):
        reader.dataReceived(STREAM[start:end])
    assert got == MESSAGES


def test_reader_skips_blank_lines_and_crlf() -> None:
    reader, got = reader_on()
    reader.dataReceived(b'\n\r\n{"a": 1}\r\n\n{"b"')
    reader.dataReceived(b": 2}\n")
    assert got == [{"a": 1}, {"b": 2}]


def failure_of(d: Deferred[Any]) -> Failure:
    results: list[Any] = []
    d.addErrback(results.append)
    assert results and isinstance(results[0], Failure), f"{d} did not fail"
    return results[0]


def test_reader_fails_and_stops_on_a_line_that_is_not_a_json_object() -> None:
    transport = StringTransport()
    reader, got = reader_on(transport)
    reader.dataReceived(b'{"a": 1}\n[1, 2]\n{"b": 2}\n')
    assert got == [{"a": 1}]
    assert failure_of(reader.done).check(ValueError)
    assert transport.producerState == "stopped"
    reader.dataReceived(b'{"c": 3}\n')  # ignored once failed
    assert got == [{"a": 1}]


def test_reader_fails_when_the_handler_raises() -> None:
    def boom(message: dict[str, Any]) -> None:
        raise KeyError("boom")

    transport = StringTransport()
    reader = JSONLinesReader(boom)
    reader.makeConnection(transport)
    reader.dataReceived(b'{"a": 1}\n')
    assert failure_of(reader.done).check(KeyError)
    assert transport.producerState == "stopped"


def test_reader_end_inside_a_message_is_an_error() -> None:
    reader, _ = reader_on()
    reader.dataReceived(b'{"a": 1}\n{"b"')
    reader.connectionLost(Failure(ResponseDone()))
    assert failure_of(reader.done).check(ConnectionLost)


def test_reader_reads_a_last_object_without_newline_at_the_end() -> None:
    # What etcd's gateway sends when the member shuts down under a watch.
    reader, got = reader_on()
    last = b'{"error":{"grpc_code":14,"http_code":503,"message":"transport is closing"}}'
    reader.dataReceived(b'{"a": 1}\n' + last)
    assert got == [{"a": 1}]
    reader.connectionLost(Failure(ResponseDone()))
    assert got == [{"a": 1}, json.loads(last)]
    assert reader.done.result is None


def test_reader_fails_when_the_last_object_is_refused() -> None:
    def refuse(message: dict[str, Any]) -> None:
        if "error" in message:
            raise RuntimeError(message["error"]["message"])

    reader = JSONLinesReader(refuse)
    reader.makeConnection(StringTransport())
    reader.dataReceived(b'{"error": {"message": "transport is closing"}}')
    reader.connectionLost(Failure(ResponseDone()))
    assert failure_of(reader.done).check(RuntimeError)


def test_reader_passes_on_a_lost_connection() -> None:
    reader, _ = reader_on()
    reader.connectionLost(Failure(ConnectionLost("gone")))
    assert failure_of(reader.done).check(ConnectionLost)


def test_reader_cancel_stops_the_transport() -> None:
    transport = StringTransport()
    reader, _ = reader_on(transport)
    reader.done.cancel()
    assert transport.producerState == "stopped"
    failure_of(reader.done)


def test_reader_stops_a_body_that_arrives_after_it_failed() -> None:
    reader = JSONLinesReader(lambda m: None)
    reader.fail(ValueError("too late"))
    transport = StringTransport()
    reader.makeConnection(transport)
    assert transport.producerState == "stopped"
    failure_of(reader.done)


# -- an in-memory etcd gateway ----------------------------------------------------------------


@attrs.define(eq=False)
class FakeWatch:
    request: Request
    member: str
    key: bytes
    range_end: bytes
    start_revision: int
    open: bool = True

    def covers(self, key: bytes) -> bool:
        return self.key <= key < self.range_end

    def send(self, message: dict[str, Any]) -> None:
        if self.open:
            self.request.write(json.dumps(message).encode() + b"\n")

    def end(self) -> None:
        """A clean end of the stream."""
        if self.open:
            self.open = False
            self.request.finish()

    def drop(self) -> None:
        """The connection breaks."""
        self.open = False
        self.request.transport.loseConnection()


class FakeEtcd(Resource):
    """The JSON gateway of every member (told apart by the Host header), one shared store."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.revision = 1
        self.kvs: dict[bytes, dict[str, str]] = {}
        self.history: list[tuple[int, list[dict[str, Any]]]] = []
        self.compacted = 0
        self.txns: list[tuple[str, dict[bytes, bytes]]] = []
        self.ranges: list[tuple[str, dict[str, Any]]] = []
        self.watches: list[FakeWatch] = []
        self.hold = False
        self.held: list[tuple[Request, str, list[dict[str, Any]]]] = []
        self.silent: set[str] = set()
        self.reject: str | None = None
        self.requests: list[tuple[str, str, list[bytes] | None]] = []

    def header(self) -> dict[str, str]:
        return {"cluster_id": "1", "member_id": "2", "revision": str(self.revision),
                "raft_term": "2"}

    def render_POST(self, request: Request) -> bytes | int:
        member = (request.getHeader("host") or "").split(":")[0]
        body = json.loads(request.content.read())
        path = request.path.decode()
        self.requests.append(
            (member, path, request.requestHeaders.getRawHeaders(b"grpc-metadata-hasleader"))
        )
        if member in self.silent:
            return NOT_DONE_YET
        request.setHeader("content-type", "application/json")
        if path == "/v3/kv/txn":
            ops = body.get("success", [])
            keys = [unb64(op["request_put"]["key"]) for op in ops]
            if self.reject:
                return self.error(request, 400, 3, self.reject)
            if len(set(keys)) != len(keys):
                return self.error(request, 400, 3, "etcdserver: duplicate key given in txn request")
            if len(ops) > 128:
                return self.error(request, 400, 3, "etcdserver: too many operations in txn request")
            if self.hold:
                self.held.append((request, member, ops))
                return NOT_DONE_YET
            return json.dumps(self.apply(member, ops)).encode()
        if path == "/v3/kv/range":
            self.ranges.append((member, body))
            start, end = unb64(body["key"]), unb64(body["range_end"])
            kvs = [kv for key, kv in sorted(self.kvs.items()) if start <= key < end]
            answer = {"header": self.header(), "kvs": kvs, "count": str(len(kvs))}
            return json.dumps(answer).encode()
        if path == "/v3/watch":
            return self.watch(request, member, body["create_request"])
        request.setResponseCode(404)
        return b"404 page not found\n"

    def error(self, request: Request, status: int, code: int, message: str) -> bytes:
        request.setResponseCode(status)
        return json.dumps({"error": message, "message": message, "code": code}).encode()

    def apply(self, member: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        puts = {unb64(op["request_put"]["key"]): unb64(op["request_put"]["value"]) for op in ops}
        self.txns.append((member, puts))
        self.commit(puts)
        return {"header": self.header(), "succeeded": True,
                "responses": [{"response_put": {"header": {"revision": str(self.revision)}}}
                              for _ in ops]}

    def release(self) -> None:
        """Answer the held transactions."""
        held, self.held = self.held, []
        for request, member, ops in held:
            request.write(json.dumps(self.apply(member, ops)).encode())
            request.finish()

    def commit(self, puts: dict[bytes, bytes], deletes: tuple[bytes, ...] = ()) -> int:
        self.revision += 1
        events: list[dict[str, Any]] = []
        for key, value in puts.items():
            old = self.kvs.get(key)
            kv = {"key": b64(key), "value": b64(value), "mod_revision": str(self.revision),
                  "create_revision": old["create_revision"] if old else str(self.revision),
                  "version": str(int(old["version"]) + 1) if old else "1"}
            self.kvs[key] = kv
            events.append({"kv": kv})
        for key in deletes:
            self.kvs.pop(key, None)
            events.append({"type": "DELETE", "kv": {"key": b64(key),
                                                     "mod_revision": str(self.revision)}})
        self.history.append((self.revision, events))
        for w in self.watches:
            self.send_events(w, events)
        return self.revision

    def put(self, key: bytes, value: bytes) -> int:
        return self.commit({key: value})

    def delete(self, key: bytes) -> int:
        return self.commit({}, (key,))

    def compact(self, revision: int) -> None:
        self.compacted = revision
        self.history = [(rev, evs) for rev, evs in self.history if rev > revision]

    def send_events(self, w: FakeWatch, events: list[dict[str, Any]]) -> None:
        mine = [e for e in events if w.covers(unb64(e["kv"]["key"]))]
        if mine:
            w.send({"result": {"header": self.header(), "events": mine}})

    def watch(self, request: Request, member: str, create: dict[str, Any]) -> int:
        w = FakeWatch(request, member, unb64(create["key"]), unb64(create["range_end"]),
                      int(create.get("start_revision", 0) or 0))
        request.notifyFinish().addBoth(lambda _: setattr(w, "open", False))
        self.watches.append(w)
        w.send({"result": {"header": self.header(), "created": True}})
        if w.start_revision and w.start_revision <= self.compacted:
            w.send({"result": {"header": self.header(), "canceled": True,
                               "compact_revision": str(self.compacted)}})
            return NOT_DONE_YET
        for revision, events in self.history:
            if revision >= w.start_revision:
                self.send_events(w, events)
        return NOT_DONE_YET

    @property
    def open_watches(self) -> list[FakeWatch]:
        return [w for w in self.watches if w.open]


@implementer(IBodyProducer)
class SyncProducer:
    """Writes the whole body at once (treq's default producer needs a running reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@implementer(IAgent)
class FakeNetwork:
    """Routes requests to the fake gateway, except to members that are down (refused) and
    requests to a path in :attr:`hang`, which never answer: cancelling one fails it with the
    error that ``hang[path](host)`` makes, as an ``Agent`` does (it reports a cancelled request
    as ResponseNeverReceived, or ConnectingCancelledError while it connects)."""

    def __init__(self, resource: Resource, clock: Clock) -> None:
        self.inner = RequestTraversalAgent(resource)
        self.clock = clock
        self.down: set[str] = set()
        self.hang: dict[str, Callable[[str], Exception]] = {}
        self.log: list[tuple[float, str, str]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        parsed = URI.fromBytes(uri)
        host = parsed.host.decode()
        self.log.append((self.clock.seconds(), host, parsed.path.decode()))
        if host in self.down:
            return fail(ConnectionRefusedError(f"{host} is down"))
        error = self.hang.get(parsed.path.decode())
        if error is not None:
            return Deferred(lambda d: d.errback(error(host)))
        return self.inner.request(method, uri, headers, bodyProducer)

    def hosts(self, path: str) -> list[str]:
        return [host for _, host, p in self.log if p == path]


@attrs.define
class Rig:
    clock: Clock
    fake: FakeEtcd
    net: FakeNetwork
    etcd: Etcd

    def flush(self) -> None:
        for _ in range(3):
            self.net.inner.flush()

    def watch(self, on_update: Callable[[Update], object] | None = None) -> tuple[WatchService,
                                                                                 list[Update]]:
        got: list[Update] = []
        service = self.etcd.watch(on_update or got.append)
        service.startService()
        _STARTED.append(service)
        self.flush()
        return service, got


_STARTED: list[WatchService] = []


@pytest.fixture(autouse=True)
def _stop_watches() -> Iterator[None]:
    """Every watch a test started is stopped after it, rather than left suspended until the
    interpreter exits."""
    yield
    while _STARTED:
        service = _STARTED.pop()
        if service.running:
            service.stopService()


HOSTS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")


def make_rig(hosts: tuple[str, ...] = HOSTS[:1], **kw: Any) -> Rig:
    clock = Clock()
    clock.advance(1000)
    fake = FakeEtcd()
    net = FakeNetwork(fake, clock)
    config = EtcdConfig(nodes=tuple(f"http://{h}:2379" for h in hosts), prefix="/deployer",
                        dial_timeout=5.0, retry_delay=1.0)
    http = HTTPClient(net, data_to_body_producer=SyncProducer)
    etcd = Etcd(clock, config, http=http, rng=random.Random(7), **kw)
    return Rig(clock, fake, net, etcd)


def u(name: str, **kw: Any) -> Update:
    kw.setdefault("source", "test")
    kw.setdefault("received", 1.0)
    return Update(repository=name, **kw)


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- group commit ---------------------------------------------------------------------------


def test_writes_during_a_transaction_go_out_as_one() -> None:
    rig = make_rig()
    rig.fake.hold = True
    first = rig.etcd.record(u("myorg/first"))
    rig.flush()
    assert len(rig.fake.held) == 1
    rest = [rig.etcd.record(u(f"myorg/app{i}")) for i in range(50)]
    rig.flush()
    assert len(rig.fake.held) == 1, "nothing is sent while a transaction is in flight"
    assert not first.called

    rig.fake.release()
    rig.flush()
    assert fired(first) == 2
    assert not any(d.called for d in rest), "each caller waits for its own write"
    assert len(rig.fake.held) == 1
    rig.fake.hold = False
    rig.fake.release()
    rig.flush()
    assert [fired(d) for d in rest] == [3] * 50
    assert [len(puts) for _, puts in rig.fake.txns] == [1, 50]
    assert rig.etcd.transactions == 2
    assert set(rig.fake.txns[1][1]) == {f"/deployer/myorg/app{i}".encode() for i in range(50)}


def test_the_same_key_twice_in_a_batch_keeps_the_last() -> None:
    rig = make_rig()
    rig.fake.hold = True
    rig.etcd.record(u("myorg/first"))
    rig.flush()
    one = rig.etcd.record(u("myorg/foo", event_id="one"))
    other = rig.etcd.record(u("myorg/bar"))
    two = rig.etcd.record(u("myorg/foo", event_id="two"))
    rig.fake.hold = False
    rig.fake.release()
    rig.flush()
    assert fired(one) == fired(two) == fired(other) == 3
    _, puts = rig.fake.txns[1]
    assert set(puts) == {b"/deployer/myorg/foo", b"/deployer/myorg/bar"}
    assert json.loads(puts[b"/deployer/myorg/foo"])["event_id"] == "two"


def test_batches_are_capped() -> None:
    rig = make_rig(max_txn_ops=10)
    rig.fake.hold = True
    ds = [rig.etcd.record(u(f"myorg/app{i}")) for i in range(26)]
    rig.fake.hold = False
    for _ in range(5):
        rig.flush()
        rig.fake.release()
    rig.flush()
    assert [len(puts) for _, puts in rig.fake.txns] == [1, 10, 10, 5]
    assert [fired(d) for d in ds] == [2] + [3] * 10 + [4] * 10 + [5] * 5


def test_record_tries_members_in_turn() -> None:
    rig = make_rig(HOSTS)
    rig.net.down = {"10.0.0.1", "10.0.0.2"}
    assert fired(rig.etcd.record(u("myorg/foo"))) == 2
    assert rig.net.hosts("/v3/kv/txn") == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert rig.etcd.members.current == 2
    fired(rig.etcd.record(u("myorg/bar")))
    assert rig.net.hosts("/v3/kv/txn")[3:] == ["10.0.0.3"], "the next write starts where it works"


def test_record_fails_when_every_member_fails() -> None:
    rig = make_rig(HOSTS)
    rig.net.down = set(HOSTS)
    d = rig.etcd.record(u("myorg/foo"))
    with pytest.raises(EtcdUnavailable) as info:
        fired(d)
    for host in HOSTS:
        assert f"http://{host}:2379: ConnectionRefusedError" in str(info.value)
    rig.net.down = set()
    assert fired(rig.etcd.record(u("myorg/foo"))) == 2, "a later write is not stuck"


def test_a_member_that_does_not_answer_times_out() -> None:
    rig = make_rig(HOSTS[:2])
    rig.fake.silent = {"10.0.0.1"}
    d = rig.etcd.record(u("myorg/foo"))
    rig.flush()
    rig.clock.advance(4.9)
    rig.flush()
    assert not d.called
    rig.clock.advance(0.2)
    rig.flush()
    assert fired(d) == 2
    assert rig.net.hosts("/v3/kv/txn") == ["10.0.0.1", "10.0.0.2"]
    assert rig.etcd.members.current == 1

    rig.fake.silent = {"10.0.0.1", "10.0.0.2"}
    d = rig.etcd.record(u("myorg/bar"))
    rig.flush()
    rig.clock.advance(5.0)
    rig.flush()
    rig.clock.advance(5.0)
    rig.flush()
    with pytest.raises(EtcdUnavailable) as info:
        fired(d)
    assert "http://10.0.0.2:2379: timed out after 5s; http://10.0.0.1:2379: timed out" in str(
        info.value
    )


def test_a_refused_request_does_not_move_off_a_member() -> None:
    rig = make_rig(HOSTS[:2])
    rig.fake.reject = "etcdserver: request is too large"
    d = rig.etcd.record(u("myorg/foo"))
    rig.flush()
    with pytest.raises(EtcdUnavailable, match="request is too large"):
        fired(d)
    assert rig.etcd.members.current == 0


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_is_exponential_jittered_and_capped() -> None:
    backoff = Backoff(1.0, random.Random(3), cap=30.0)
    delays = [backoff.delay(n) for n in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(30.0, 2.0**n)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 30.0
    assert len({round(backoff.delay(5), 6) for _ in range(20)}) > 1, "jittered"
    assert Backoff(1.0, random.Random(3)).delay(10_000) <= 30.0


def test_backoff_has_a_floor() -> None:
    # A zero retry_delay would retry at once, forever: a busy loop while etcd is down.
    backoff = Backoff(0.0, random.Random(3), cap=30.0)
    delays = [backoff.delay(n) for n in range(12)]
    assert min(delays) >= MIN_RETRY_DELAY
    assert delays[-1] >= 15.0, "it still backs off exponentially from the floor"
    assert Backoff(1e-9, random.Random(3)).delay(0) >= MIN_RETRY_DELAY
    assert Backoff(0.0, random.Random(3), cap=0.0).delay(5) == MIN_RETRY_DELAY


def test_a_zero_retry_delay_is_not_a_busy_loop() -> None:
    rig = make_rig()
    rig.etcd.config.retry_delay = 0.0
    rig.net.down = {"10.0.0.1"}
    got: list[Update] = []
    service = rig.etcd.watch(got.append)
    attempts = 0

    def reconnected() -> None:
        nonlocal attempts
        attempts += 1
        if attempts > 200:
            raise RuntimeError("busy loop")  # ends the loop rather than hang the test

    service.on_reconnect = reconnected
    service.startService()
    _STARTED.append(service)
    for _ in range(100):
        rig.clock.advance(0.1)
        rig.flush()
    # 10 s of etcd down: delays from 0.1 s doubling (with jitter) make at most ~10 attempts.
    assert 3 <= attempts <= 12
    assert not service.live


# -- the watch --------------------------------------------------------------------------------


def test_catch_up_then_live() -> None:
    rig = make_rig()
    fake = rig.fake
    fake.put(b"/deployer/myorg/foo", b"anything")
    fake.put(b"/deployer/myorg/bar:qa", rig.etcd.layout.value(u("myorg/bar", tag="qa")))
    fake.put(b"/deployer/_/lock/host1", b"x")
    fake.put(b"/deployer/Bad Key", b"x")
    fake.put(b"/deployer2/myorg/other", b"x")
    service, got = rig.watch()
    assert sorted(x.pattern for x in got) == ["myorg/bar:qa", "myorg/foo"]
    assert service.live and service.reason == ""
    ((_, body),) = fake.ranges
    assert body.get("serializable") is True
    (w,) = fake.watches
    assert w.start_revision == fake.revision + 1
    assert w.key == b"/deployer/"

    fake.put(b"/deployer/myorg/new", b"x")
    fake.delete(b"/deployer/myorg/foo")
    fake.put(b"/deployer/_/status", b"x")
    rig.flush()
    assert [x.pattern for x in got[2:]] == ["myorg/new"]
    assert service.revision == fake.revision


def test_strong_consistency_reads_are_linearizable() -> None:
    rig = make_rig()
    rig.etcd.config.strong_consistency = True
    rig.watch()
    (_, body), = rig.fake.ranges
    assert "serializable" not in body


def test_resume_after_a_break_loses_nothing_and_repeats_nothing() -> None:
    rig = make_rig()
    service, got = rig.watch()
    rig.fake.put(b"/deployer/myorg/a", b"x")
    rig.flush()
    seen = rig.fake.revision
    rig.fake.open_watches[0].drop()
    rig.flush()
    assert not service.live
    assert service.reason.startswith("http://10.0.0.1:2379: ")
    rig.fake.put(b"/deployer/myorg/b", b"x")  # while the watch is down
    rig.clock.advance(1.0)  # the first backoff is at most retry_delay
    rig.flush()
    assert service.live
    assert service.reconnects == 1
    assert rig.fake.watches[-1].start_revision == seen + 1
    assert [x.pattern for x in got] == ["myorg/a", "myorg/b"]
    assert len(rig.fake.ranges) == 1, "a resume does not read everything again"


def test_the_gateways_last_error_is_the_reason() -> None:
    rig = make_rig()
    service, _ = rig.watch()
    w = rig.fake.open_watches[0]
    w.request.write(b'{"error":{"grpc_code":14,"message":"transport is closing"}}')
    w.end()
    rig.flush()
    assert not service.live
    assert "transport is closing" in service.reason


def test_a_clean_end_of_the_stream_also_resumes() -> None:
    rig = make_rig()
    service, _ = rig.watch()
    rig.fake.open_watches[0].end()
    rig.flush()
    assert not service.live
    assert "the watch stream ended" in service.reason
    rig.clock.advance(1.0)
    rig.flush()
    assert service.live


def test_events_seen_before_are_not_delivered_twice() -> None:
    rig = make_rig()
    _, got = rig.watch()
    rig.fake.commit({b"/deployer/myorg/a": b"x", b"/deployer/myorg/b": b"x"})
    rig.flush()
    w = rig.fake.open_watches[0]
    # The same revision again (a server replaying after a resume), then something new.
    rig.fake.send_events(w, rig.fake.history[-1][1])
    rig.fake.put(b"/deployer/myorg/c", b"x")
    rig.flush()
    assert [x.pattern for x in got] == ["myorg/a", "myorg/b", "myorg/c"]


def test_progress_notifications_advance_the_revision() -> None:
    rig = make_rig()
    service, _ = rig.watch()
    rig.fake.open_watches[0].send({"result": {"header": {"revision": "50"}}})
    rig.flush()
    assert service.revision == 50
    rig.fake.open_watches[0].drop()
    rig.flush()
    rig.clock.advance(1.0)
    rig.flush()
    assert rig.fake.watches[-1].start_revision == 51


def test_compaction_causes_a_full_resync() -> None:
    rig = make_rig()
    fake = rig.fake
    fake.put(b"/deployer/myorg/a", b"x")
    service, got = rig.watch()
    fake.put(b"/deployer/myorg/b", b"x")
    rig.flush()
    fake.open_watches[0].drop()
    rig.flush()
    fake.put(b"/deployer/myorg/c", b"x")
    fake.delete(b"/deployer/myorg/a")
    fake.compact(fake.revision)
    del got[:]
    rig.clock.advance(1.0)
    rig.flush()
    assert service.resyncs == 1
    assert len(fake.ranges) == 2
    assert sorted(x.pattern for x in got) == ["myorg/b", "myorg/c"]
    assert service.live
    assert fake.watches[-1].start_revision == fake.revision + 1
    fake.put(b"/deployer/myorg/d", b"x")
    rig.flush()
    assert got[-1].pattern == "myorg/d"
    assert len(got) == 3


def test_a_watch_error_or_cancel_reconnects() -> None:
    rig = make_rig()
    service, _ = rig.watch()
    rig.fake.open_watches[0].send({"result": {"header": {}, "canceled": True,
                                              "cancel_reason": "mvcc: required revision"}})
    rig.flush()
    assert not service.live
    assert "mvcc: required revision" in service.reason
    assert not rig.fake.open_watches, "the stream is closed"
    rig.clock.advance(1.0)
    rig.flush()
    assert service.live
    rig.fake.open_watches[0].send({"error": {"grpc_code": 14, "message": "unavailable"}})
    rig.flush()
    assert not service.live
    assert "unavailable" in service.reason


def test_failover_order_and_backoff() -> None:
    rig = make_rig(HOSTS, max_backoff=8.0)
    rig.net.down = set(HOSTS)
    service, _ = rig.watch()
    for _ in range(8):
        rig.clock.advance(8.0)
        rig.flush()
    attempts = [(t, host) for t, host, path in rig.net.log if path == "/v3/kv/range"]
    assert [host for _, host in attempts] == [HOSTS[i % 3] for i in range(len(attempts))]
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(attempts)]
    for n, gap in enumerate(gaps):
        ceiling = min(8.0, 2.0**n)
        assert ceiling / 2 <= gap <= ceiling + 8.0  # the clock moves in steps of 8 s
    assert not service.live
    assert service.reconnects == len(attempts) - 1

    rig.net.down = set()
    rig.clock.advance(8.0)
    rig.flush()
    assert service.live
    assert rig.etcd.members.current == len(attempts) % 3


def test_a_failed_watch_moves_record_too() -> None:
    rig = make_rig(HOSTS[:2])
    rig.watch()
    rig.net.down = {"10.0.0.1"}
    rig.fake.open_watches[0].drop()
    rig.flush()
    assert rig.etcd.members.current == 1
    fired(rig.etcd.record(u("myorg/foo")))
    assert rig.net.hosts("/v3/kv/txn") == ["10.0.0.2"]


def test_a_member_that_accepts_but_never_answers_times_out() -> None:
    rig = make_rig(HOSTS[:2])
    rig.fake.silent = {"10.0.0.1"}
    service, _ = rig.watch()
    assert not service.live
    rig.clock.advance(5.0)
    rig.flush()
    assert "timed out" in service.reason
    rig.clock.advance(1.0)
    rig.flush()
    assert service.live
    assert rig.etcd.members.current == 1


def test_a_silent_stream_is_presumed_dead() -> None:
    rig = make_rig()
    service, _ = rig.watch()
    assert service.live
    rig.clock.advance(WATCH_IDLE_TIMEOUT - 1)
    rig.fake.open_watches[0].send({"result": {"header": {"revision": "1"}}})
    rig.flush()
    rig.clock.advance(WATCH_IDLE_TIMEOUT - 1)
    rig.flush()
    assert service.live, "each message restarts the idle timer"
    rig.clock.advance(1)
    rig.flush()
    assert not service.live
    assert "no message from etcd for 660s" in service.reason
    assert not rig.fake.open_watches
    rig.clock.advance(1)
    rig.flush()
    assert service.live


def test_stop_during_backoff_and_while_live() -> None:
    rig = make_rig()
    rig.net.down = {"10.0.0.1"}
    service, _ = rig.watch()
    assert rig.clock.getDelayedCalls()
    assert fired(service.stopService()) is None
    assert not rig.clock.getDelayedCalls()
    assert service.reason == "stopped"

    rig.net.down = set()
    service, _ = rig.watch()
    assert service.live
    assert fired(service.stopService()) is None
    rig.flush()
    assert not rig.fake.open_watches, "the stream was closed"
    assert not service.live
    assert not rig.clock.getDelayedCalls()


def test_requests_ask_for_a_member_with_a_leader() -> None:
    # etcd's gateway fails these with "etcdserver: no leader" on a member cut off from its
    # leader, and ends a watch stream on one, instead of serving it silently.
    rig = make_rig()
    service, _ = rig.watch()
    assert service.live
    fired(rig.etcd.record(u("myorg/foo")))
    paths = {path: hasleader for _, path, hasleader in rig.fake.requests}
    assert paths == {"/v3/kv/range": [b"true"], "/v3/watch": [b"true"], "/v3/kv/txn": [b"true"]}


def test_no_leader_on_the_watch_stream_moves_to_the_next_member() -> None:
    rig = make_rig(HOSTS[:2])
    service, _ = rig.watch()
    w = rig.fake.open_watches[0]
    assert w.member == "10.0.0.1"
    w.request.write(b'{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader",'
                    b'"http_status":"Service Unavailable"}}')
    w.end()
    rig.flush()
    assert not service.live
    assert "no leader" in service.reason
    assert rig.etcd.members.current == 1
    rig.clock.advance(1.0)
    rig.flush()
    assert service.live
    assert rig.fake.open_watches[0].member == "10.0.0.2"


def response_never_received(host: str) -> Exception:
    return ResponseNeverReceived([Failure(CancelledError())])


def connecting_cancelled(host: str) -> Exception:
    return ConnectingCancelledError(IPv4Address("TCP", host, 2379))


@pytest.mark.parametrize("error", [response_never_received, connecting_cancelled])
@pytest.mark.parametrize("path", ["/v3/kv/range", "/v3/watch"])
def test_stop_while_a_request_never_answers(
    path: str, error: Callable[[str], Exception], logged: list[dict[str, Any]]
) -> None:
    # The agent reports the cancelled request as an ordinary failure; the watch must still end
    # rather than back off and retry, or the daemon never exits on SIGTERM.
    rig = make_rig(HOSTS[:2], max_backoff=1.0)
    rig.net.hang[path] = error
    service, _ = rig.watch()
    assert rig.net.hosts(path) == ["10.0.0.1"]
    assert not service.live
    stopped = service.stopService()
    rig.flush()
    assert fired(stopped) is None
    assert service.reason == "stopped"
    assert not rig.clock.getDelayedCalls()
    rig.clock.advance(60.0)
    rig.flush()
    assert service.reconnects == 0
    assert rig.net.hosts(path) == ["10.0.0.1"]
    assert rig.etcd.members.current == 0, "stopping is no failure of the member"
    assert not [e for e in logged if e.get("log_level") is not None
                and e["log_level"].name in ("warn", "error", "critical")]


def test_stop_from_the_update_callback_during_catch_up() -> None:
    rig = make_rig()
    rig.fake.put(b"/deployer/myorg/foo", b"x")
    stopped: list[Deferred[None]] = []
    service = rig.etcd.watch(lambda update: stopped.append(service.stopService()))
    service.startService()
    _STARTED.append(service)
    rig.flush()
    assert fired(stopped[0]) is None
    assert not rig.fake.watches, "no watch is opened after the stop"
    assert not service.live
    assert not rig.clock.getDelayedCalls()


def test_a_failing_callback_is_logged_and_the_watch_goes_on(logged: list[dict[str, Any]]) -> None:
    rig = make_rig()
    got: list[Update] = []

    def on_update(update: Update) -> object:
        got.append(update)
        if update.pattern == "myorg/raises":
            raise RuntimeError("broken handler")
        if update.pattern == "myorg/fails-later":
            return fail(RuntimeError("broken later"))
        return None

    service, _ = rig.watch(on_update)
    for name in (b"raises", b"fails-later", b"fine"):
        rig.fake.put(b"/deployer/myorg/" + name, b"x")
    rig.flush()
    assert [x.pattern for x in got] == ["myorg/raises", "myorg/fails-later", "myorg/fine"]
    assert service.live
    failures = [e["log_failure"].getErrorMessage() for e in logged if "log_failure" in e]
    assert "broken handler" in failures
    assert "broken later" in failures


def test_close_waits_for_writes_in_flight() -> None:
    rig = make_rig()
    rig.fake.hold = True
    d = rig.etcd.record(u("myorg/foo"))
    rig.flush()
    closed = Deferred.fromCoroutine(rig.etcd.close())
    assert not closed.called
    rig.fake.release()
    rig.flush()
    assert fired(d) == 2
    assert closed.called
