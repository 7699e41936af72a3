"""The one retry delay of the daemon: capped exponential backoff, optionally jittered.

Built on Twisted's :func:`~twisted.application.internet.backoffPolicy` (the policy of
``ClientService``), with two additions that the daemon's retry loops need: a floor, so that a
zero base never turns a retry loop into a busy loop, and "equal jitter" (half the delay fixed,
half random), so that hosts that lost etcd together do not all come back in the same instant.

:func:`retrying` is the loop around such a policy: try, and after a failure wait the policy's
next delay on the clock, then try again.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

T = TypeVar("T")

RetryPolicy = Callable[[int], float]
"""Seconds to wait before retry number ``attempt`` (0 for the first retry)."""

FailureReport = Callable[[Exception, int, float], object]
"""Told ``(error, failures, delay)`` after each failed attempt: the error, how many attempts
have failed in a row (this one included), and the seconds until the next one."""


def backoff(
    base: float,
    cap: float,
    *,
    floor: float = 0.0,
    rng: random.Random | None = None,
    factor: float = 2.0,
) -> RetryPolicy:
    """Retry ``attempt`` waits ``min(cap, max(base, floor) * factor**attempt)`` seconds; with
    ``rng``, a random part of that: between half and all of it, never less than ``floor``."""
    ceiling = backoffPolicy(
        initialDelay=max(base, floor), maxDelay=cap, factor=factor, jitter=lambda: 0.0
    )
    if rng is None:
        return ceiling

    def jittered(attempt: int) -> float:
        delay = ceiling(attempt)
        return max(floor, delay / 2 + rng.uniform(0, delay / 2))

    return jittered


async def retrying(
    policy: RetryPolicy,
    clock: IReactorTime,
    attempt: Callable[[], Awaitable[T]],
    failed: FailureReport,
) -> T:
    """``await attempt()`` until it returns, and return what it did. After each failure,
    ``failed(error, failures, delay)`` is told (to log it, or to give up by raising), then the
    next attempt waits ``delay = policy(failures - 1)`` seconds on ``clock``.

    A :class:`~twisted.internet.defer.CancelledError` is not retried: cancelling the coroutine's
    Deferred, while it waits for an attempt or for the delay, ends the loop with it.
    """
    failures = 0
    while True:
        try:
            return await attempt()
        except CancelledError:
            raise
        except Exception as e:
            delay = policy(failures)
            failures += 1
            failed(e, failures, delay)
            await deferLater(clock, delay)
