"""Reading a streamed HTTP response body of newline-delimited JSON objects.

Both streams the daemon reads are of this kind: the Docker engine's pull progress (and its
``/events``), and etcd's watch. :class:`JSONLinesReader` is a
:class:`~twisted.protocols.basic.LineReceiver` given to ``IResponse.deliverBody``: whatever the
TCP reads are cut into, each whole line that holds a JSON object goes to ``on_message``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

log = Logger()

MAX_LINE = 16 * 1024 * 1024
"""The longest message accepted, in bytes."""


class BadLine(ValueError):
    """A line that is not a JSON object, or one longer than the reader accepts."""


def parse_line(line: bytes) -> dict[str, Any] | None:
    """The JSON object on ``line``; None for a blank line; :class:`BadLine` otherwise."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise BadLine(f"not JSON: {line[:200]!r}") from e
    if not isinstance(obj, dict):
        raise BadLine(f"not a JSON object: {line[:200]!r}")
    return obj


class JSONLinesReader(LineReceiver):
    """Hands every JSON object of a response body to ``on_message``.

    ``strict``: a line that is not a JSON object fails the stream (etcd's watch, where such a
    line means the stream is broken); otherwise it is logged and skipped (pull progress, where
    it is harmless). If ``on_message`` raises, the stream is stopped and :attr:`done` fails with
    that error. At a clean end of the body (``ResponseDone``, or ``PotentialDataLoss`` for a
    body without a length), what is left after the last newline is read as a last object (etcd's
    gateway ends a stream with an error object and no newline), and :attr:`done` fires None; it
    fails with the reason when the body ends otherwise, or inside an object. Cancelling
    :attr:`done`, or :meth:`fail`, stops the stream.
    """

    delimiter = b"\n"

    def __init__(
        self,
        on_message: Callable[[dict[str, Any]], object],
        *,
        strict: bool = True,
        max_length: int = MAX_LINE,
        what: str = "stream",
    ) -> None:
        self._on_message = on_message
        self.strict = strict
        self.MAX_LENGTH = max_length
        self.what = what
        self.done: Deferred[None] = Deferred(lambda _: self._stop())

    def connectionMade(self) -> None:
        if self.done.called:  # failed or cancelled before the body arrived
            self._stop()

    def dataReceived(self, data: bytes) -> None:
        if not self.done.called:
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.done.called:
            return
        try:
            self._message(line)
        except Exception:
            self._fail(Failure())

    def _message(self, line: bytes) -> None:
        try:
            obj = parse_line(line.rstrip(b"\r"))
        except BadLine as e:
            if self.strict:
                raise
            log.warn("{what}: skipping an unreadable line: {why}", what=self.what, why=e)
            return
        if obj is not None:
            self._on_message(obj)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.fail(BadLine(f"{self.what}: a message longer than {self.MAX_LENGTH} bytes"))

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.done.called:
            return
        if not reason.check(ResponseDone, PotentialDataLoss):
            self.done.errback(reason)
            return
        rest, self._buffer = self._buffer, b""
        try:
            self._message(rest)
        except BadLine:
            self.done.errback(
                ConnectionLost(f"{self.what} ended inside a message: {rest[:200]!r}")
            )
        except Exception:
            self.done.errback(Failure())
        else:
            self.done.callback(None)

    def fail(self, error: Exception) -> None:
        """Stop the stream; :attr:`done` fails with ``error``."""
        self._fail(Failure(error))

    def _fail(self, failure: Failure) -> None:
        if not self.done.called:
            self.done.errback(failure)
        self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()
