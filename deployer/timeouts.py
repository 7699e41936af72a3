"""Bounding how long the daemon waits, in one place and on an injected clock.

Two different things, named for what they do:

- :func:`cancel_after` gives up on the work: ``d`` is cancelled after ``seconds`` and fails with
  :class:`~deployer.errors.TimedOut`, whatever the cancelled request failed with (an agent turns
  a cancellation into ``ResponseNeverReceived``).
- :func:`wait_at_most` gives up only on waiting: the work goes on, and the caller learns whether
  it finished in time.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web._newclient import RequestGenerationFailed
from twisted.web.client import ResponseFailed

from deployer.errors import TimedOut

_T = TypeVar("_T")


def is_cancellation(error: BaseException) -> bool:
    """True for what a request fails with when its caller cancelled it: the agent reports a
    cancelled request as ``ResponseNeverReceived`` (a ``ResponseFailed``), or
    ``RequestGenerationFailed`` while it still sends the body, or ``ConnectingCancelledError``
    while it connects, rather than as ``CancelledError``. (A request given up by
    :func:`cancel_after` fails with ``TimedOut`` instead.)"""
    if isinstance(error, CancelledError | ConnectingCancelledError):
        return True
    if isinstance(error, ResponseFailed | RequestGenerationFailed):
        return bool(error.reasons) and all(r.check(CancelledError) for r in error.reasons)
    return False


def cancel_after(
    d: Deferred[_T], seconds: float, clock: IReactorTime, what: str = ""
) -> Deferred[_T]:
    """``d``, cancelled after ``seconds``; it then fails with :class:`TimedOut`."""

    def timed_out(result: _T | Failure, timeout: float) -> _T | Failure:
        if isinstance(result, Failure):
            prefix = f"{what}: " if what else ""
            return Failure(TimedOut(f"{prefix}timed out after {timeout:g}s"))
        return result

    return d.addTimeout(seconds, clock, onTimeoutCancel=timed_out)


async def wait_at_most(
    clock: IReactorTime, d: Deferred[Any], seconds: float
) -> tuple[bool, Any]:
    """``(True, result or Failure)`` if ``d`` fires within ``seconds``, else ``(False, None)``;
    ``d`` itself is left running either way (its later result is left to the callbacks the
    caller adds to it)."""
    waiter: Deferred[tuple[bool, Any]] = Deferred()

    def fired(result: Any) -> Any:
        if waiter.called:
            return result
        timer.cancel()
        waiter.callback((True, result))
        return None if isinstance(result, Failure) else result

    def late() -> None:
        waiter.callback((False, None))

    timer = clock.callLater(seconds, late)
    d.addBoth(fired)
    return await waiter
