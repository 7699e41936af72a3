"""Following a pull: the engine's progress stream, and the watchdog that gives up on a pull that
makes no progress.

dockerd never gives up on a registry by itself: one that answers ``GET /v2/`` and then never
answers the manifest request keeps ``POST /images/create`` without even response headers, and
one that stops sending a layer keeps the stream open and silent. A :class:`Watchdog` started
with the request, fed by the response headers and by every piece of the progress stream, is
the one bound that covers both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from deployer.lines import JSONLinesReader

log = Logger()

PULL_STALL_TIMEOUT = 120.0
"""Seconds a pull may go without any sign of progress (no response headers yet, or nothing
more in its stream) before it is given up on."""

PROGRESS_LOG_INTERVAL = 5.0
"""Seconds between two debug lines about the progress of one pull."""


class Watchdog:
    """Calls ``expire`` once nothing has happened for ``seconds``: :meth:`alive` restarts the
    count, :meth:`stop` ends the watch. :attr:`expired` tells afterwards whether it fired."""

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self.expired = False
        self._call: IDelayedCall | None = None

    def start(self, expire: Callable[[], object]) -> None:
        def fire() -> None:
            self._call = None
            self.expired = True
            expire()

        self.stop()
        self._call = self.clock.callLater(self.seconds, fire)

    def alive(self) -> None:
        if self._call is not None and self._call.active():
            self._call.reset(self.seconds)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class PullReader(JSONLinesReader):
    """Reads the JSON lines of a pull (framed by :class:`JSONLinesReader`, unreadable lines
    skipped): keeps the first error the engine reports, logs progress sparingly, and tells the
    ``watchdog`` about every piece of the stream."""

    def __init__(self, repotag: str, clock: IReactorTime, watchdog: Watchdog | None = None) -> None:
        super().__init__(self._progress, strict=False, what=f"pull {repotag}")
        self.repotag = repotag
        self.clock = clock
        self.watchdog = watchdog
        self.error: str | None = None
        self.last_status = ""
        self.next_log = 0.0

    def dataReceived(self, data: bytes) -> None:
        if self.watchdog is not None:
            self.watchdog.alive()
        super().dataReceived(data)

    def _progress(self, msg: dict[str, Any]) -> None:
        if msg.get("error") or msg.get("errorDetail"):
            detail = msg.get("errorDetail") or {}
            if not isinstance(detail, dict):
                detail = {}
            message = msg.get("error") or detail.get("message")
            if self.error is None:
                self.error = str(message or "unknown pull error")
            return
        status = str(msg.get("status", ""))
        if "progressDetail" in msg and msg.get("progress"):
            now = self.clock.seconds()
            if now >= self.next_log:
                self.next_log = now + PROGRESS_LOG_INTERVAL
                log.debug("pull {repotag}: {status} {progress}", repotag=self.repotag,
                          status=status, progress=msg.get("progress"))
            return
        if status and status != self.last_status and not msg.get("id"):
            self.last_status = status
            log.info("pull {repotag}: {status}", repotag=self.repotag, status=status)
