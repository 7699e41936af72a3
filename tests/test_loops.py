"""Fast tests of deployer.loops.LoopService: one coroutine loop from start to stop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from deployer.loops import LoopService
from tests.helpers import fired


class Waiting(LoopService):
    """Waits on one Deferred after another, for as long as it runs."""

    def __init__(self) -> None:
        self.steps: list[Deferred[None]] = []
        self.crashes: list[Failure] = []

    async def _run(self) -> None:
        while self.running:
            step: Deferred[None] = Deferred()
            self.steps.append(step)
            await step

    def _crashed(self, failure: Failure) -> None:
        self.crashes.append(failure)


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_starting_runs_the_loop_and_stopping_cancels_it() -> None:
    service = Waiting()
    service.startService()
    assert service.running and len(service.steps) == 1
    service.steps[0].callback(None)
    assert len(service.steps) == 2
    stopped = service.stopService()
    assert not service.running
    assert fired(stopped) is None, "fires once the loop has ended"
    assert service.steps[1].called, "what the loop awaited was cancelled"
    assert service.crashes == [], "a cancellation is no crash"
    assert len(service.steps) == 2


def test_a_loop_that_ends_on_its_own_is_stopped_at_once() -> None:
    service = Waiting()
    service.startService()
    service.running = False
    service.steps[0].callback(None)
    assert fired(service.stopService()) is None
    assert service.crashes == []


def test_stopping_a_service_never_started_fires_at_once() -> None:
    assert fired(Waiting().stopService()) is None


def test_a_failed_loop_goes_to_crashed() -> None:
    service = Waiting()
    service.startService()
    service.steps[0].errback(ValueError("a defect"))
    assert [f.getErrorMessage() for f in service.crashes] == ["a defect"]
    assert fired(service.stopService()) is None


def test_by_default_a_crash_is_logged(logged: list[LogEvent]) -> None:
    class Failing(LoopService):
        async def _run(self) -> None:
            raise ValueError("a defect")

    service = Failing()
    service.startService()
    failures = [e for e in logged if e.get("log_level") == LogLevel.critical]
    assert len(failures) == 1
    assert failures[0]["log_failure"].getErrorMessage() == "a defect"
    assert failures[0]["service"] is service
    assert fired(service.stopService()) is None


def test_a_service_can_run_again_after_a_stop() -> None:
    service = Waiting()
    service.startService()
    fired(service.stopService())
    service.startService()
    assert len(service.steps) == 2 and not service.steps[1].called
    fired(service.stopService())
    assert service.steps[1].called
