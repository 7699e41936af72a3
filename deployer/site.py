"""The daemon's HTTP server around the webhook resource: request bodies limited before they are
read (:class:`LimitedRequest`), and an access log without secrets: query values, bare queries,
user names and passwords in the request URI and the ``Referer`` beyond its scheme and host are
left out."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web import http
from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from deployer.notify import redact_url

log = Logger()

#: The largest request body taken, in bytes.
MAX_BODY = 1024 * 1024


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
    masked = []
    for part in query.split(b"&"):
        if part:
            key, equals, _ = part.partition(b"=")
            masked.append(key + b"=***" if equals else b"***")
    return path + b"?" + b"&".join(masked)


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
    """The daemon's ``Site``: request bodies limited (:class:`LimitedRequest`), no form parsing
    (every endpoint takes JSON), the access log without secrets, and only answers that
    are not 2xx written to it: an accepted webhook already has its own log line naming what it
    accepted, and health checks and metric scrapes would drown everything else."""

    requestFactory = LimitedRequest

    def __init__(self, resource: IResource, **kwargs: Any) -> None:
        kwargs.setdefault("logFormatter", access_log_formatter)
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.noisy = False

    def log(self, request: http.Request) -> None:
        if 200 <= request.code < 300:
            return
        super().log(request)
