"""deployer.site: the HTTP server around the webhook app, driven byte by byte through real
``Site`` channels over ``StringTransport``s, with a ``Clock``: bodies refused before they are
read, and an access log without secrets."""

from __future__ import annotations

import json
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyChannel

from deployer.auth import TokenAuth
from deployer.metrics import Metrics
from deployer.model import Update
from deployer.site import (
    EVICTION_BURST,
    MAX_BODY,
    MAX_CONNECTIONS,
    RESERVED_FDS,
    ConnectionLimit,
    Drops,
    LimitedRequest,
    WebhookSite,
    connection_limit,
    mask_query,
    referer_origin,
)
from deployer.webhook import WebhookApp

TOKEN = "tok-5e3c8a1f"
START = 1_700_000_000.0


class RecordingSink:
    def __init__(self) -> None:
        self.updates: list[Update] = []

    async def accept(self, updates: Sequence[Update]) -> str:
        self.updates.extend(updates)
        return "Queued"


async def healthy() -> None:
    return None


class Front:
    """The webhook app with a recording sink and the token :data:`TOKEN`."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.sink = RecordingSink()
        self.app = WebhookApp(clock=self.clock, sink=self.sink, health=healthy,
                              auth=TokenAuth([TOKEN]))


# -- the access log -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, masked",
    [
        (b"/api/deploy", b"/api/deploy"),
        (b"/api/deploy?token=abc", b"/api/deploy?token=***"),
        (b"/api/deploy?x=1&token=abc&y", b"/api/deploy?x=***&token=***&***"),
        (b"/api/deploy?token=a=b&&", b"/api/deploy?token=***"),
        (b"/api/deploy?", b"/api/deploy?"),
        (b"/?token", b"/?***"),
        (b"/api/deploy?SECRET", b"/api/deploy?***"),
        (b"/api/deploy?=SECRET", b"/api/deploy?=***"),
        (b"http://user:SECRET@deployer.test/api/deploy?SECRET",
         b"http://deployer.test/api/deploy?***"),
        (b"http://deployer.test:4500/a@b", b"http://deployer.test:4500/a@b"),
    ],
)
def test_mask_query(uri: bytes, masked: bytes) -> None:
    assert mask_query(uri) == masked


query_text = st.text(st.characters(codec="ascii", exclude_characters="&=?#"), max_size=12)
secrets = st.text(st.characters(codec="ascii", exclude_characters="&=?#*"), min_size=4,
                  max_size=40)


@given(path=st.sampled_from([b"/api/deploy", b"/", b"/api/quay/events"]),
       pairs=st.lists(st.tuples(query_text, query_text | st.none()), min_size=1, max_size=5),
       secret=secrets, bare=st.booleans())
def test_mask_query_hides_every_value_and_bare_query(
    path: bytes, pairs: list[tuple[str, str | None]], secret: str, bare: bool
) -> None:
    keys = [k for k, v in pairs if v is not None]
    uri = path + b"?" + b"&".join(
        (k if v is None else f"{k}={v}").encode() for k, v in pairs
    )
    uri += (f"&{secret}" if bare else f"&token={secret}").encode()
    masked = mask_query(uri)
    assert masked.startswith(path + b"?")
    if not any(secret in k for k in keys):
        assert secret.encode() not in masked
    for part in masked.partition(b"?")[2].split(b"&"):
        assert part == b"***" or part.endswith(b"=***"), masked
        assert part.partition(b"=")[2] in (b"", b"***")


@pytest.mark.parametrize(
    "referer, kept",
    [
        (b"https://ci.example.com/job/7?token=SECRET", b"https://ci.example.com"),
        (b"https://user:SECRET@ci.example.com:8443/x", b"https://ci.example.com:8443"),
        (b"HTTP://CI.example.com/", b"http://ci.example.com"),
        (b"http://[::1]:4500/?SECRET", b"http://[::1]:4500"),
        (b"android-app://SECRET", None),
        (b"/relative?SECRET", None),
        (b"http://ci.example.com:port/SECRET", None),
        (b"https://ci.\xff.com/SECRET", None),
        (b"", None),
        (None, None),
    ],
)
def test_referer_origin(referer: bytes | None, kept: bytes | None) -> None:
    assert referer_origin(referer) == kept


@given(secret=secrets, scheme=st.sampled_from(["http", "https", "ftp", ""]),
       host=st.sampled_from(["ci.example.com", "10.0.0.1:8080", "[::1]", ""]))
def test_referer_never_keeps_more_than_scheme_and_host(
    secret: str, scheme: str, host: str
) -> None:
    for referer in (f"{scheme}://{host}/{secret}", f"{scheme}://{host}/?{secret}",
                    f"{scheme}://u:{secret}@{host}/", f"{scheme}://{host}?t={secret}"):
        kept = referer_origin(referer.encode())
        assert kept is None or secret.encode() not in kept or secret.lower() in host.lower()


def test_access_log_has_no_secret_and_only_answers_that_are_not_2xx(tmp_path: Path) -> None:
    """Through the daemon's own Site."""
    log_path = tmp_path / "access.log"
    clock = Clock()
    clock.advance(START)
    front = Front()
    site = WebhookSite(front.app.resource(), logPath=str(log_path), reactor=clock)
    site.doStart()
    try:
        for query, answer in ((f"token={TOKEN}&tag=qa", b"202"),
                              (f"token=not-{TOKEN}&tag=qa", b"401"),
                              ("BARESECRET", b"401")):
            channel, transport = connect(site)
            body = b'{"repository": "myorg/foo"}'
            channel.dataReceived(
                b"POST /api/deploy?" + query.encode() + b" HTTP/1.1\r\n"
                b"Host: deployer.test\r\nContent-Type: application/json\r\n"
                b"Referer: https://u:REFSECRET@ci.example.com/job?token=REFSECRET\r\n"
                b"User-Agent: ci/1\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\n\r\n" + body
            )
            assert transport.value().startswith(b"HTTP/1.1 " + answer + b" ")
    finally:
        site.doStop()
    lines = log_path.read_text().splitlines()
    assert len(lines) == 2, lines  # the 202 is not in the access log, the 401s are
    assert '"POST /api/deploy?token=***&tag=*** HTTP/1.1" 401' in lines[0]
    assert '"POST /api/deploy?*** HTTP/1.1" 401' in lines[1]
    for line in lines:
        assert '"https://ci.example.com" "ci/1"' in line
        for secret in (TOKEN, "BARESECRET", "REFSECRET"):
            assert secret not in line
    assert len(front.sink.updates) == 1


def test_a_request_shows_its_uri_masked() -> None:
    request = LimitedRequest(DummyChannel())
    request.method, request.uri, request.clientproto = b"GET", b"/x?SECRET", b"HTTP/1.1"
    assert "SECRET" not in repr(request)
    assert "/x?***" in repr(request)


# -- LimitedRequest: 413 before the body is read --------------------------------------------------


class Spy(Resource):
    """A leaf resource that records every request it is asked to render."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> bytes:
        self.bodies.append(request.content.read())
        return b"rendered"


def limited_site(resource: Any) -> Site:
    clock = Clock()
    site = Site(resource, reactor=clock)
    site.requestFactory = LimitedRequest
    return site


def connect(site: Site) -> tuple[Any, StringTransport]:
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    return channel, transport


def head(length: int | None = None, chunked: bool = False) -> bytes:
    lines = [b"POST /api/deploy HTTP/1.1", b"Host: deployer.test",
             b"Content-Type: application/json", b"Authorization: Bearer " + TOKEN.encode()]
    if length is not None:
        lines.append(b"Content-Length: " + str(length).encode())
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def assert_413(transport: StringTransport) -> None:
    raw = transport.value()
    status, _, rest = raw.partition(b"\r\n")
    assert status == b"HTTP/1.1 413 Payload Too Large"
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in headers
    assert json.loads(body) == {"error": f"body larger than {MAX_BODY} bytes"}
    assert raw.count(b"HTTP/1.1 ") == 1
    assert transport.disconnecting


@pytest.mark.parametrize("length", [MAX_BODY + 1, 2 * MAX_BODY, 10**15])
def test_content_length_over_the_limit_refused_before_the_body(length: int) -> None:
    spy = Spy()
    channel, transport = connect(limited_site(spy))
    channel.dataReceived(head(length))
    assert_413(transport)  # nothing of the body was sent
    # Whatever the client goes on sending is dropped.
    channel.dataReceived(b"x" * 65536)
    channel.connectionLost(Failure(ConnectionError("closed")))
    assert spy.bodies == []
    assert transport.value().count(b"HTTP/1.1 ") == 1


def test_chunked_body_growing_over_the_limit_is_refused() -> None:
    spy = Spy()
    channel, transport = connect(limited_site(spy))
    channel.dataReceived(head(chunked=True))
    piece = b"x" * 65536
    sent = 0
    while sent <= MAX_BODY:
        assert transport.value() == b""
        channel.dataReceived(chunk(piece))
        sent += len(piece)
    assert_413(transport)
    channel.dataReceived(chunk(piece) + b"0\r\n\r\n")
    channel.connectionLost(Failure(ConnectionError("closed")))
    assert spy.bodies == []


def test_one_chunk_over_the_limit_is_refused() -> None:
    spy = Spy()
    channel, transport = connect(limited_site(spy))
    channel.dataReceived(head(chunked=True) + chunk(b"y" * (MAX_BODY + 1)) + b"0\r\n\r\n")
    assert_413(transport)
    assert spy.bodies == []


def padded_deploy(size: int) -> bytes:
    body = b'{"repository": "myorg/foo"}'
    return body + b" " * (size - len(body))


@pytest.mark.parametrize("size", [MAX_BODY, MAX_BODY - 1, 1000])
def test_body_up_to_the_limit_is_served(size: int) -> None:
    front = Front()
    channel, transport = connect(limited_site(front.app.resource()))
    body = padded_deploy(size)
    channel.dataReceived(head(len(body)))
    for offset in range(0, len(body), 65536):
        channel.dataReceived(body[offset:offset + 65536])
    assert transport.value().startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert [u.pattern for u in front.sink.updates] == ["myorg/foo"]


def test_chunked_body_up_to_the_limit_is_served() -> None:
    front = Front()
    channel, transport = connect(limited_site(front.app.resource()))
    body = padded_deploy(MAX_BODY)
    channel.dataReceived(head(chunked=True))
    for offset in range(0, len(body), 100_000):
        channel.dataReceived(chunk(body[offset:offset + 100_000]))
    channel.dataReceived(b"0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert len(front.sink.updates) == 1


def test_refused_connection_does_not_disturb_the_next_one() -> None:
    front = Front()
    site = limited_site(front.app.resource())
    channel, transport = connect(site)
    channel.dataReceived(head(MAX_BODY + 1))
    assert_413(transport)
    channel.connectionLost(Failure(ConnectionError("closed")))
    channel, transport = connect(site)
    body = padded_deploy(100)
    channel.dataReceived(head(len(body)) + body)
    assert transport.value().startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert len(front.sink.updates) == 1


# -- a deadline for each request, with a Clock ---------------------------------------------------


TIMEOUT = 10.0


class HangingSink:
    """Accepts once :meth:`release` is called."""

    def __init__(self) -> None:
        self.pending: list[Deferred[None]] = []

    async def accept(self, updates: Sequence[Update]) -> str:
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        await d
        return "Queued"

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(None)


@attrs.define
class Server:
    """The daemon's site behind its connection limit, on a Clock; clients over
    StringTransports."""

    limit: int = 100
    clock: Clock = attrs.field(factory=Clock)
    sink: HangingSink = attrs.field(factory=HangingSink)
    metrics: Metrics = attrs.field(factory=lambda: Metrics(process=False))
    drops: Drops = attrs.field(init=False)
    factory: ConnectionLimit = attrs.field(init=False)
    _port: int = 40000

    def __attrs_post_init__(self) -> None:
        self.clock.advance(START)
        app = WebhookApp(clock=self.clock, sink=self.sink, health=healthy, auth=None)
        self.drops = Drops(self.clock, self.metrics, self.limit, TIMEOUT)
        site = WebhookSite(app.resource(), reactor=self.clock, request_timeout=TIMEOUT,
                           drops=self.drops)
        self.factory = ConnectionLimit(site, self.limit, self.drops)

    def connect(self) -> tuple[Any, StringTransport] | None:
        """A new client connection; None when it was closed at once."""
        self._port += 1
        address = IPv4Address("TCP", "127.0.0.1", self._port)
        protocol = self.factory.buildProtocol(address)
        if protocol is None:
            return None
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def dropped(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "deployer_http_connections_dropped_total", {"reason": reason})
        return value or 0.0


def lose(client: tuple[Any, StringTransport]) -> None:
    """The reactor's part: the connection is gone."""
    client[0].connectionLost(Failure(ConnectionDone()))


def deploy_request(body: bytes = b'{"repository": "myorg/foo"}') -> bytes:
    return (b"POST /api/deploy HTTP/1.1\r\nHost: deployer.test\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_a_trickling_client_is_dropped_at_the_deadline() -> None:
    server = Server()
    client = server.connect()
    assert client is not None
    protocol, transport = client
    request = deploy_request()
    for second in range(int(TIMEOUT) - 1):
        server.clock.advance(1)
        protocol.dataReceived(request[second:second + 1])  # one byte a second
        assert not transport.disconnecting, second
    server.clock.advance(0.999)
    assert not transport.disconnecting
    server.clock.advance(0.001)
    assert transport.disconnecting
    assert transport.value() == b""
    assert server.dropped("timeout") == 1
    assert server.sink.pending == []


def test_a_request_received_in_time_is_never_dropped_while_it_is_answered() -> None:
    server = Server()
    client = server.connect()
    assert client is not None
    protocol, transport = client
    server.clock.advance(TIMEOUT - 0.5)
    protocol.dataReceived(deploy_request())
    assert len(server.sink.pending) == 1
    server.clock.advance(10 * TIMEOUT)  # the sink takes its time: etcd is slow
    assert not transport.disconnecting
    server.sink.release()
    assert transport.value().startswith(b"HTTP/1.1 202 ")
    assert not transport.disconnecting
    # The next request on the connection has a deadline of its own, from the answer on.
    server.clock.advance(TIMEOUT - 0.5)
    assert not transport.disconnecting
    server.clock.advance(0.5)
    assert transport.disconnecting
    assert server.dropped("timeout") == 1


def test_each_request_on_a_connection_gets_the_whole_deadline() -> None:
    server = Server()
    client = server.connect()
    assert client is not None
    protocol, transport = client
    for _ in range(3):
        request = deploy_request()
        server.clock.advance(TIMEOUT - 1)
        protocol.dataReceived(request[:-1])
        server.clock.advance(0.5)
        protocol.dataReceived(request[-1:])
        server.sink.release()
    assert transport.value().count(b"HTTP/1.1 202 ") == 3
    assert not transport.disconnecting


# -- the connection limit ------------------------------------------------------------------------


def test_at_the_limit_the_connection_waiting_longest_makes_room() -> None:
    server = Server(limit=3)
    clients = [server.connect() for _ in range(3)]
    assert all(c is not None for c in clients)
    assert server.factory.open == 3
    newcomer = server.connect()
    assert newcomer is not None
    first = clients[0]
    assert first is not None and first[1].disconnected  # aborted
    assert [c[1].disconnected for c in clients[1:] if c] == [False, False]
    assert server.factory.open == 3
    lose(first)
    assert len(server.factory.protocols) == 3
    # The newcomer is served.
    newcomer[0].dataReceived(deploy_request())
    server.sink.release()
    assert newcomer[1].value().startswith(b"HTTP/1.1 202 ")
    assert server.dropped("evicted") == 1
    assert server.dropped("refused") == 0


def test_connections_being_answered_are_never_dropped_and_beyond_them_new_ones_are_refused(
) -> None:
    server = Server(limit=2)
    answered, waiting = server.connect(), server.connect()
    assert answered is not None and waiting is not None
    answered[0].dataReceived(deploy_request())  # now being answered: the sink hangs
    third = server.connect()
    assert third is not None
    assert waiting[1].disconnected and not answered[1].disconnected
    lose(waiting)
    third[0].dataReceived(deploy_request())
    assert server.connect() is None  # both are being answered
    assert server.dropped("refused") == 1
    server.sink.release()
    # Answered, they wait for their next request: the one waiting longest makes room.
    assert server.connect() is not None
    assert answered[1].disconnected and not third[1].disconnected


def test_connections_still_closing_are_bounded() -> None:
    server = Server(limit=EVICTION_BURST + 5)
    for _ in range(server.limit):
        assert server.connect() is not None
    made_room = [server.connect() for _ in range(EVICTION_BURST)]
    assert all(c is not None for c in made_room)
    assert len(server.factory.protocols) == server.limit + EVICTION_BURST
    assert server.connect() is None  # the evicted ones have not closed yet
    assert server.dropped("evicted") == EVICTION_BURST
    assert server.dropped("refused") == 1
    for wrapper in [w for w in server.factory.protocols if w.transport.disconnected]:
        wrapper.connectionLost(Failure(ConnectionDone()))
    assert len(server.factory.protocols) == server.limit
    assert server.connect() is not None


def test_drops_are_logged_once_a_minute_at_most() -> None:
    server = Server(limit=1)

    def gone() -> None:
        """The reactor's part: connections being closed are gone."""
        for wrapper in [w for w in server.factory.protocols if w.transport.disconnecting]:
            wrapper.connectionLost(Failure(ConnectionDone()))

    def connect() -> None:
        gone()
        server.connect()
        gone()

    with capturedLogs() as events:
        for _ in range(5):
            connect()
        server.clock.advance(TIMEOUT - 1)
        connect()
        server.clock.advance(TIMEOUT)  # the newest one times out
        server.clock.advance(60 - 2 * TIMEOUT)
        connect()  # the one that timed out has gone: room enough
        server.clock.advance(1)
        connect()
    lines = [formatEvent(e) for e in events if "dropping client connections" in formatEvent(e)]
    assert len(lines) == 2, lines
    assert lines[1] == (
        "dropping client connections: 1 without a whole request within --request_timeout 10s,"
        " 6 waiting for theirs at the limit of 1 connections, 0 refused at that limit (counts"
        " since start)"
    )


@pytest.mark.parametrize(
    ("nofile", "limit"),
    [(1024, 1024 - RESERVED_FDS), (65536, MAX_CONNECTIONS), (RESERVED_FDS + 10, 10),
     (RESERVED_FDS, 1), (resource.RLIM_INFINITY, MAX_CONNECTIONS)],
)
def test_connection_limit_stays_below_rlimit_nofile(nofile: int, limit: int) -> None:
    assert connection_limit(nofile) == limit


def test_connection_limit_of_this_process() -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert connection_limit() == connection_limit(soft)
