"""deployer.site: the HTTP server around the webhook app, driven byte by byte through real
``Site`` channels over ``StringTransport``s, with a ``Clock``: bodies refused before they are
read, and an access log without secrets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyChannel

from deployer.auth import TokenAuth
from deployer.model import Update
from deployer.site import (
    MAX_BODY,
    LimitedRequest,
    WebhookSite,
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
