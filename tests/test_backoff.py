"""Fast tests of deployer.backoff.retrying: the one retry loop, on a Clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock

from deployer.backoff import backoff, retrying
from tests.helpers import fired


class GiveUp(Exception):
    pass


def attempts(*outcomes: object) -> tuple[Callable[[], Awaitable[object]], list[int]]:
    """An attempt that raises or returns each of ``outcomes`` in turn, and the number of
    calls so far."""
    calls = [0]

    async def attempt() -> object:
        outcome = outcomes[calls[0]]
        calls[0] += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return attempt, calls


def test_retries_after_the_policys_delays_and_returns_what_the_attempt_did() -> None:
    clock = Clock()
    attempt, calls = attempts(ValueError("one"), KeyError("two"), ValueError("three"), "done")
    told: list[tuple[str, int, float]] = []
    d = Deferred.fromCoroutine(
        retrying(backoff(1.0, 3.0), clock, attempt, lambda e, n, delay: told.append(
            (str(e), n, delay)))
    )
    assert calls == [1]
    assert told == [("one", 1, 1.0)]
    clock.advance(0.99)
    assert calls == [1], "not before the delay"
    clock.advance(0.01)
    assert calls == [2]
    assert told[-1] == ("'two'", 2, 2.0)
    clock.advance(2.0)
    assert told[-1] == ("three", 3, 3.0), "capped"
    assert not d.called
    clock.advance(3.0)
    assert fired(d) == "done"
    assert calls == [4]
    assert not clock.getDelayedCalls()


def test_an_attempt_that_succeeds_at_once_waits_for_nothing() -> None:
    clock = Clock()
    told: list[object] = []
    d = Deferred.fromCoroutine(
        retrying(backoff(1.0, 3.0), clock, lambda: succeed(7), lambda *a: told.append(a))
    )
    assert fired(d) == 7
    assert told == []
    assert not clock.getDelayedCalls()


def test_the_report_gives_up_by_raising() -> None:
    clock = Clock()
    attempt, calls = attempts(ValueError("one"), ValueError("two"), "never")

    def failed(error: Exception, failures: int, delay: float) -> None:
        if failures == 2:
            raise GiveUp(str(error))

    d = Deferred.fromCoroutine(retrying(backoff(1.0, 3.0), clock, attempt, failed))
    clock.advance(1.0)
    with pytest.raises(GiveUp, match="two"):
        fired(d)
    assert calls == [2]
    assert not clock.getDelayedCalls()


def test_a_cancelled_attempt_is_not_retried() -> None:
    clock = Clock()
    attempt, calls = attempts(CancelledError(), "never")
    told: list[object] = []
    d = Deferred.fromCoroutine(
        retrying(backoff(1.0, 3.0), clock, attempt, lambda *a: told.append(a))
    )
    with pytest.raises(CancelledError):
        fired(d)
    assert calls == [1]
    assert told == []
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("while_", ["attempting", "waiting"])
def test_cancelling_ends_the_loop(while_: str) -> None:
    clock = Clock()
    pending: Deferred[str] = Deferred()
    calls = [0]

    def attempt() -> Deferred[str]:
        calls[0] += 1
        if while_ == "waiting":
            raise ValueError("down")
        return pending

    d = Deferred.fromCoroutine(retrying(backoff(1.0, 3.0), clock, attempt, lambda *a: None))
    assert bool(clock.getDelayedCalls()) == (while_ == "waiting")
    d.cancel()
    with pytest.raises(CancelledError):
        fired(d)
    assert not clock.getDelayedCalls()
    clock.advance(10.0)
    assert calls == [1]
