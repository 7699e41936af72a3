"""The daemon's HTTP server around the webhook resource.

What a client may hold of the daemon is bounded, with the pieces Twisted ships:

- a request body, by :class:`LimitedRequest` (413 before a larger body is read);
- the time to send a whole request, headers and body, by :class:`DeadlineChannel`: Twisted's
  ``HTTPChannel`` timeout (a ``TimeoutMixin``) made a deadline that bytes trickling in do not
  push back (``--request_timeout``);
- the number of open connections, by :class:`ConnectionLimit`, a ``WrappingFactory`` kept
  below ``RLIMIT_NOFILE`` so that the listener never runs out of file descriptors.

The access log holds no secrets: query values, bare queries, user names and passwords in the
request URI and the ``Referer`` beyond its scheme and host are left out.
"""

from __future__ import annotations

import json
import resource
from collections import Counter
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet.interfaces import IAddress, IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import http
from twisted.web.http import HTTPChannel, combinedLogFormatter
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from deployer.metrics import Metrics
from deployer.notify import redact_url
from deployer.redact import masked_query

log = Logger()

#: The largest request body taken, in bytes.
MAX_BODY = 1024 * 1024
#: The default of ``--request_timeout``, in seconds.
REQUEST_TIMEOUT = 10.0
#: File descriptors kept free below ``RLIMIT_NOFILE`` for all that is not a client connection
#: (the engine, etcd, notifications, logs) and for connections that are being dropped.
RESERVED_FDS = 128
#: Client connections dropped to make room that may still be closing (they are gone at the next
#: turn of the reactor); beyond it new connections are refused. Part of :data:`RESERVED_FDS`.
EVICTION_BURST = 32
#: At most this many client connections, however high ``RLIMIT_NOFILE`` is.
MAX_CONNECTIONS = 4096
#: How often, at most, the log says that connections were dropped.
DROPS_LOG_INTERVAL = 60.0


class LimitedRequest(Request):
    """A request whose body may not exceed :data:`MAX_BODY`: a larger one is answered 413 as
    soon as its ``Content-Length`` (or, chunked, its size so far) shows it, before it is read."""

    max_body = MAX_BODY
    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        body = json.dumps({"error": f"body larger than {self.max_body} bytes"}).encode() + b"\n"
        log.info("refused a request body over {limit} bytes", limit=self.max_body)
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.channel.loseConnection()

    def __repr__(self) -> str:
        return (f"<{self.__class__.__name__} method={self.method!r}"
                f" uri={mask_query(self.uri)!r} clientproto={self.clientproto!r}>")


def connection_limit(nofile: int | None = None) -> int:
    """How many client connections to hold at most, given the soft ``RLIMIT_NOFILE``
    (this process's when None)."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, nofile - RESERVED_FDS))


class Drops:
    """Counts the client connections that the server drops, by reason, in the metrics, and says
    so in the log at most once every :data:`DROPS_LOG_INTERVAL` seconds."""

    def __init__(self, clock: IReactorTime, metrics: Metrics, limit: int,
                 request_timeout: float) -> None:
        self.clock = clock
        self.metrics = metrics
        self.limit = limit
        self.request_timeout = request_timeout
        self.counts: Counter[str] = Counter()
        self._next_log = float("-inf")

    def dropped(self, reason: str) -> None:
        """``reason``: ``timeout``, ``evicted`` or ``refused``."""
        self.counts[reason] += 1
        self.metrics.http_connections_dropped.labels(reason=reason).inc()
        now = self.clock.seconds()
        if now < self._next_log:
            return
        self._next_log = now + DROPS_LOG_INTERVAL
        log.warn(
            "dropping client connections: {timeout} without a whole request within"
            " --request_timeout {request_timeout:g}s, {evicted} waiting for theirs at the limit of"
            " {limit} connections, {refused} refused at that limit (counts since start)",
            timeout=self.counts["timeout"], evicted=self.counts["evicted"],
            refused=self.counts["refused"], request_timeout=self.request_timeout,
            limit=self.limit,
        )


class DeadlineChannel(HTTPChannel):
    """An ``HTTPChannel`` whose timeout (Twisted's ``TimeoutMixin``, ``timeOut`` seconds) is a
    deadline for each whole request, headers and body.

    It runs from the connection, or from the end of the previous answer, until the request has
    been received, and activity does not push it back: a client that trickles its request (one
    byte a second) is dropped all the same. While a request is being answered there is none.
    """

    #: True from the end of a request until its answer is sent.
    answering = False

    def resetTimeout(self) -> None:
        """Not reset by activity: a deadline, not an idle timeout."""

    def allContentReceived(self) -> None:
        self.answering = True
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Before the next request that may already be buffered is read.
        self.answering = False
        super().requestDone(request)

    def timeoutConnection(self) -> None:
        site = getattr(self, "site", None)
        if isinstance(site, WebhookSite) and site.drops is not None:
            site.drops.dropped("timeout")
        super().timeoutConnection()


class ConnectionLimit(WrappingFactory):
    """At most ``limit`` client connections at once (Twisted's ``WrappingFactory`` tracks them).

    A connection that arrives at the limit takes the place of the connection that has waited
    longest for its request (trickling, or idle between two requests): that one is dropped. When
    every connection is being answered, or :data:`EVICTION_BURST` dropped connections are still
    closing, the new connection is closed at once. The listener never holds more than ``limit +
    EVICTION_BURST`` connections.
    """

    def __init__(self, wrapped: Site, limit: int, drops: Drops) -> None:
        super().__init__(wrapped)
        self.limit = limit
        self.drops = drops
        self._evicted: set[ProtocolWrapper] = set()

    @property
    def open(self) -> int:
        """Connections held and not being dropped."""
        return len(self.protocols) - len(self._evicted)

    def buildProtocol(  # type: ignore[override]  # None closes the connection at once
        self, addr: IAddress | None
    ) -> ProtocolWrapper | None:
        if self.open >= self.limit:
            victim = None
            if len(self.protocols) < self.limit + EVICTION_BURST:
                victim = self._waiting_longest()
            if victim is None:
                self.drops.dropped("refused")
                return None
            self._evicted.add(victim)
            self.drops.dropped("evicted")
            cast(ITCPTransport, victim.transport).abortConnection()
        return super().buildProtocol(addr)

    def _waiting_longest(self) -> ProtocolWrapper | None:
        """The connection that has waited longest for a request, and is not closing yet."""
        for wrapper in self.protocols:  # in the order they connected
            if wrapper in self._evicted or wrapper.disconnecting:
                continue
            if not getattr(wrapper.wrappedProtocol, "answering", False):
                return wrapper
        return None

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        self._evicted.discard(p)


# -- the access log -------------------------------------------------------------------------------


def mask_query(uri: bytes) -> bytes:
    """The request URI for logs: every query value masked (``?token=***``), a bare query part
    too (``?***``), and the user name and password of an absolute URI left out."""
    path, sep, query = uri.partition(b"?")
    scheme, colon_slashes, rest = path.partition(b"://")
    if colon_slashes and b"/" not in scheme:
        authority, slash, tail = rest.partition(b"/")
        path = scheme + colon_slashes + authority.rpartition(b"@")[2] + slash + tail
    if not sep:
        return path
    return path + b"?" + masked_query(query.decode("latin-1")).encode("latin-1")


def referer_origin(value: bytes | None) -> bytes | None:
    """What the log keeps of a ``Referer``: its scheme, host and port, or nothing."""
    if not value:
        return None
    try:
        scheme = urlsplit(value.decode("ascii")).scheme.lower()
    except (UnicodeDecodeError, ValueError):
        return None
    if scheme not in ("http", "https"):
        return None
    origin = redact_url(value.decode("ascii"))
    return None if origin.startswith("<") else origin.encode("ascii")


class _ForTheLog:
    """A request as the access log may see it."""

    def __init__(self, request: IRequest) -> None:
        self._request = request
        self.uri = mask_query(request.uri)

    def getHeader(self, name: bytes) -> bytes | None:
        value: bytes | None = self._request.getHeader(name)
        return referer_origin(value) if name.lower() == b"referer" else value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def access_log_formatter(timestamp: str, request: IRequest) -> str:
    """Twisted's combined log format, without secrets (see :func:`mask_query` and
    :func:`referer_origin`)."""
    line: str = combinedLogFormatter(timestamp, _ForTheLog(request))
    return line


class WebhookSite(Site):
    """The daemon's ``Site``: request bodies limited (:class:`LimitedRequest`), a deadline for
    each request (:class:`DeadlineChannel`, ``request_timeout`` seconds), no form parsing
    (every endpoint takes JSON), the access log without secrets, and only answers that are not
    2xx written to it: an accepted webhook already has its own log line naming what it
    accepted, and health checks and metric scrapes would drown everything else. ``drops``
    counts the connections dropped at their deadline."""

    requestFactory = LimitedRequest
    # Twisted's default wraps the channel to switch to HTTP/2 when TLS negotiates it with ALPN;
    # the daemon serves HTTP/1.1 only.
    protocol = DeadlineChannel  # type: ignore[assignment]

    def __init__(self, resource: IResource, *, request_timeout: float = REQUEST_TIMEOUT,
                 drops: Drops | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("logFormatter", access_log_formatter)
        super().__init__(resource, parsePOSTFormSubmission=False, timeout=request_timeout,
                         **kwargs)
        self.drops = drops
        self.noisy = False

    def log(self, request: http.Request) -> None:
        if 200 <= request.code < 300:
            return
        super().log(request)
