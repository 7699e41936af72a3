"""The daemon's HTTP server around the webhook resource: request bodies limited before they are
read (:class:`LimitedRequest`), and an access log without secrets (:func:`mask_query`)."""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger
from twisted.web import http
from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

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


class _MaskedURI:
    def __init__(self, request: IRequest) -> None:
        self._request = request
        self.uri = mask_query(request.uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def mask_query(uri: bytes) -> bytes:
    """The request URI for logs: ``?token=…`` (and every other query value) masked."""
    path, sep, query = uri.partition(b"?")
    if not sep:
        return uri
    masked = b"&".join(p.partition(b"=")[0] + b"=***" for p in query.split(b"&") if p)
    return path + b"?" + masked


def access_log_formatter(timestamp: str, request: IRequest) -> str:
    """Twisted's combined log format, without query strings (tokens travel there)."""
    line: str = combinedLogFormatter(timestamp, _MaskedURI(request))
    return line


class WebhookSite(Site):
    """The daemon's ``Site``: request bodies limited (:class:`LimitedRequest`), no form parsing
    (every endpoint takes JSON), query strings masked in the access log, and only answers that
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
