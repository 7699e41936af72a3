"""A pull whose stream goes silent fails after the stall timeout instead of blocking every later
round on the host."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed

from deployer.docker import _PullReader
from deployer.errors import PullFailed


class Transport:
    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


def reader(clock: Clock, timeout: float = 300.0) -> tuple[_PullReader, list[Any], Transport]:
    results: list[Any] = []
    done: Deferred[None] = Deferred()
    done.addBoth(results.append)
    r = _PullReader(done, "myorg/foo:qa", clock, timeout)
    transport = Transport()
    r.makeConnection(transport)  # type: ignore[arg-type]
    return r, results, transport


def test_progress_keeps_a_pull_alive_and_silence_ends_it() -> None:
    clock = Clock()
    r, results, transport = reader(clock)
    for _ in range(5):
        clock.advance(250)
        r.dataReceived(b'{"status":"Downloading","progressDetail":{"current":1},"id":"a"}\n')
    assert results == [] and not transport.stopped
    clock.advance(299)
    assert results == []
    clock.advance(2)
    assert transport.stopped
    [failure] = results
    assert isinstance(failure, Failure)
    with pytest.raises(PullFailed, match="no progress for 300 s"):
        failure.raiseException()
    # The connection then ends as failed: nothing more happens, no unhandled error.
    r.connectionLost(Failure(ResponseFailed([Failure(Exception("stopped"))])))
    assert len(results) == 1


def test_a_pull_that_ends_cancels_its_watchdog() -> None:
    clock = Clock()
    r, results, _ = reader(clock, timeout=10)
    r.dataReceived(b'{"status":"Status: Image is up to date for myorg/foo:qa"}\n')
    r.connectionLost(Failure(ResponseDone()))
    assert results == [None]
    assert clock.getDelayedCalls() == []
