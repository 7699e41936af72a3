"""The client's timers, on a Clock: a pull that makes no progress (no answer at all, or a stream
that goes silent) fails after the stall timeout instead of blocking the host's deploys, and a
request the engine never answers fails after its timeout."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web._newclient import RequestGenerationFailed
from twisted.web.client import ResponseDone, ResponseFailed
from zope.interface import implementer

from deployer.docker import DockerClient
from deployer.errors import DockerUnavailable, PullFailed, PullStalled
from deployer.pulls import PULL_STALL_TIMEOUT, PullReader, Watchdog
from deployer.testing.agents import HangingAgent
from deployer.testing.memory_docker import MemoryDocker
from tests.helpers import fired

REPO = "registry.test:5000/myorg/foo"


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


# -- the watchdog and the reader ------------------------------------------------------------------


def test_the_watchdog_fires_after_a_silence_and_not_before() -> None:
    clock = Clock()
    fired_at: list[float] = []
    watchdog = Watchdog(clock, 10)
    watchdog.start(lambda: fired_at.append(clock.seconds()))
    for _ in range(5):
        clock.advance(9)
        watchdog.alive()
    assert fired_at == [] and not watchdog.expired
    clock.advance(10)
    assert fired_at == [55.0] and watchdog.expired
    watchdog.alive()  # too late: nothing more happens
    watchdog.stop()
    assert clock.getDelayedCalls() == []


def test_a_stopped_watchdog_never_fires() -> None:
    clock = Clock()
    watchdog = Watchdog(clock, 10)
    watchdog.start(lambda: pytest.fail("fired"))
    watchdog.stop()
    clock.advance(100)
    assert not watchdog.expired


def test_every_piece_of_the_stream_feeds_the_watchdog() -> None:
    clock = Clock()
    expired: list[bool] = []
    watchdog = Watchdog(clock, 300)
    watchdog.start(lambda: expired.append(True))
    reader = PullReader(f"{REPO}:qa", clock, watchdog)
    results: list[Any] = []
    reader.done.addBoth(results.append)
    reader.makeConnection(Transport())  # type: ignore[arg-type]
    for _ in range(5):
        clock.advance(250)
        reader.dataReceived(b'{"status":"Downloading","progressDetail":{"current":1},"id":"a"}\n')
    reader.dataReceived(b'{"status":"Extracting",')  # half a message is progress too
    clock.advance(299)
    assert expired == [] and results == []
    reader.dataReceived(b'"id":"a"}\n{"error":"unknown blob"}\n{"error":"second"}\n')
    reader.connectionLost(Failure(ResponseDone()))
    assert results == [None]
    assert reader.error == "unknown blob"  # the first error is kept
    clock.advance(301)
    assert expired == [True]  # the reader does not own the watchdog: the pull stops it


def test_a_reader_that_fails_stops_its_stream() -> None:
    reader = PullReader(f"{REPO}:qa", Clock())
    transport = Transport()
    results: list[Any] = []
    reader.done.addBoth(results.append)
    reader.makeConnection(transport)  # type: ignore[arg-type]
    reader.fail(PullStalled("stalled"))
    assert transport.stopped
    reader.connectionLost(Failure(ResponseFailed([Failure(Exception("stopped"))])))
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(PullStalled)


# -- pulls on the in-memory engine ----------------------------------------------------------------


class Engine:
    def __init__(self, stall: float = 30.0) -> None:
        self.clock = Clock()
        self.mem = MemoryDocker()
        self.client = DockerClient(self.clock, self.mem.agent(), pull_stall_timeout=stall)
        self.mem.add_image([f"{REPO}:qa"])
        self.mem.publish(f"{REPO}:qa")

    def pull(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.client.pull(f"{REPO}:qa"))


def test_the_default_stall_timeout_is_two_minutes() -> None:
    assert PULL_STALL_TIMEOUT == 120.0
    assert DockerClient(Clock(), HangingAgent()).pull_stall_timeout == 120.0


@pytest.mark.parametrize("answer", [False, True], ids=["no-headers", "silent-stream"])
def test_a_pull_without_progress_fails_after_the_stall_timeout(answer: bool) -> None:
    """``answer=False``: dockerd sends no headers while the registry hangs on the manifest;
    ``answer=True``: it answered and then the stream went silent."""
    engine = Engine(stall=30)
    engine.mem.slow_pull(f"{REPO}:qa", answer=answer)
    d = engine.pull()
    engine.clock.advance(29.9)
    assert not d.called
    assert engine.mem.pulls_in_progress == 1
    engine.clock.advance(0.1)
    stalled = r"no progress from registry registry\.test:5000 for 30 s"
    with pytest.raises(PullStalled, match=stalled):
        fired(d)
    engine.mem.flush()
    assert engine.mem.pulls_abandoned == [f"{REPO}:qa"]  # the connection was dropped
    assert engine.mem.pulls_in_progress == 0
    assert engine.clock.getDelayedCalls() == []
    # The engine is fine: the client needs no new version negotiation, the next pull works.
    calls = len(engine.mem.calls)
    engine.mem.clear_slow_pull(f"{REPO}:qa")
    fired(engine.pull())
    assert [p for _, p in engine.mem.calls[calls:]] == ["/v1.41/images/create"]


def test_a_stalled_pull_is_a_failed_pull() -> None:
    assert issubclass(PullStalled, PullFailed)


def test_a_pull_that_ends_leaves_no_timer() -> None:
    engine = Engine()
    fired(engine.pull())
    assert engine.clock.getDelayedCalls() == []


def test_a_slow_pull_that_keeps_answering_is_not_given_up() -> None:
    engine = Engine(stall=30)
    release: Deferred[None] = Deferred()
    engine.mem.slow_pull(f"{REPO}:qa", release, answer=False)
    d = engine.pull()
    engine.clock.advance(29)
    release.callback(None)  # the registry answers: the whole stream arrives
    fired(d)
    engine.clock.advance(60)
    assert engine.mem.pulls_abandoned == []


# -- requests the engine never answers ------------------------------------------------------------


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


class CutShortAgent(HangingAgent):
    """A cancelled request fails as the agent's does while it still writes the body."""

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        self.requests.append((method.decode(), uri.decode()))

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1
            d.errback(RequestGenerationFailed([Failure(CancelledError())]))

        return Deferred(cancel)


def test_a_request_cancelled_while_its_body_is_written_is_a_cancellation() -> None:
    client = DockerClient(Clock(), CutShortAgent())
    client._version = "1.41"
    d = Deferred.fromCoroutine(client.set_restart_policy("web", {"Name": "no"}))
    d.cancel()
    with pytest.raises(CancelledError):
        fired(d)
    assert client._version == "1.41", "the engine is not taken for gone"
