"""The client's timers, on a Clock: a pull whose stream goes silent fails after the stall timeout
instead of blocking every later round on the host, and a request the engine never answers fails
after its timeout."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from zope.interface import implementer

from deployer.docker import DockerClient, _PullReader
from deployer.errors import DockerUnavailable, PullFailed
from deployer.testing.agents import HangingAgent
from tests.helpers import fired


@implementer(IPushProducer)
class Transport:
    """The part of twisted.web's body transport (``TransportProxyProducer``) a reader uses."""

    stopped = False
    disconnecting = False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


def reader(clock: Clock, timeout: float = 300.0) -> tuple[_PullReader, list[Any], Transport]:
    results: list[Any] = []
    r = _PullReader("myorg/foo:qa", clock, timeout)
    r.done.addBoth(results.append)
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


def test_a_request_the_engine_never_answers_times_out_on_the_clients_clock() -> None:
    clock = Clock()
    agent = HangingAgent()
    client = DockerClient(clock, agent, request_timeout=60)
    d = Deferred.fromCoroutine(client.images())
    assert agent.requests == [("GET", "http://docker/version")]
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.1)  # /version is asked with 10 s
    with pytest.raises(DockerUnavailable, match="timed out after 10s"):
        fired(d)
    assert agent.cancelled == 1

    client._version = "1.41"
    d = Deferred.fromCoroutine(client.images())
    clock.advance(59.9)
    assert not d.called
    clock.advance(0.1)
    with pytest.raises(DockerUnavailable, match=r"GET /v1\.41/images/json: timed out after 60s"):
        fired(d)
    assert client._version is None  # asked again once the engine is back
    assert clock.getDelayedCalls() == []
