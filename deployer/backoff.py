"""The one retry delay of the daemon: capped exponential backoff, optionally jittered.

Built on Twisted's :func:`~twisted.application.internet.backoffPolicy` (the policy of
``ClientService``), with two additions that the daemon's retry loops need: a floor, so that a
zero base never turns a retry loop into a busy loop, and "equal jitter" (half the delay fixed,
half random), so that hosts that lost etcd together do not all come back in the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.application.internet import backoffPolicy

RetryPolicy = Callable[[int], float]
"""Seconds to wait before retry number ``attempt`` (0 for the first retry)."""


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
