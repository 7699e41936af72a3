"""The engine's event stream (:mod:`deployer.events`), on a Clock with a scripted engine."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse
from zope.interface import implementer

from deployer.backoff import backoff
from deployer.docker import DockerClient
from deployer.errors import DockerUnavailable
from deployer.events import (
    WATCHED_ACTIONS,
    BadEvent,
    ContainerEvent,
    EngineEvents,
    since_param,
)
from deployer.testing.memory_docker import Healthcheck, MemoryDocker
from tests.helpers import fired

ID = "6053659050a2c87234fe67843fbcb1f09d37f691fe21ce4fcc3aa59e9869680c"


def message(action: str, time_nano: int, container_id: str = ID, name: str = "web",
            **attributes: str) -> dict[str, Any]:
    """An event as dockerd 20.10 sends it."""
    return {
        "status": action, "id": container_id, "from": "myorg/app:qa", "Type": "container",
        "Action": action,
        "Actor": {"ID": container_id,
                  "Attributes": {"image": "myorg/app:qa", "name": name, **attributes}},
        "scope": "local", "time": time_nano // 10**9, "timeNano": time_nano,
    }


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# -- parsing ------------------------------------------------------------------------------------


def test_start_event() -> None:
    event = ContainerEvent.from_json(message("start", 1_796_033_092_728_524_615))
    assert event == ContainerEvent(
        action="start", id=ID, name="web", image="myorg/app:qa",
        time_nano=1_796_033_092_728_524_615, exit_code=None,
        attributes={"image": "myorg/app:qa", "name": "web"},
    )
    assert event.verb == "start"
    assert event.health is None
    assert event.time == pytest.approx(1_796_033_092.7285246)


def test_die_event_has_its_exit_code() -> None:
    event = ContainerEvent.from_json(message("die", 5, exitCode="137"))
    assert event is not None and event.exit_code == 137


def test_a_die_event_with_a_strange_exit_code_has_none() -> None:
    event = ContainerEvent.from_json(message("die", 5, exitCode="x"))
    assert event is not None and event.exit_code is None


@pytest.mark.parametrize("status", ["healthy", "unhealthy", "starting"])
def test_health_status_event(status: str) -> None:
    event = ContainerEvent.from_json(message(f"health_status: {status}", 5))
    assert event is not None
    assert (event.verb, event.health) == ("health_status", status)


def test_exec_events_are_not_health() -> None:
    event = ContainerEvent.from_json(message("exec_start: /bin/sh -c test -f /tmp/healthy", 5))
    assert event is not None
    assert (event.verb, event.health) == ("exec_start", None)


def test_rename_event_has_both_names() -> None:
    event = ContainerEvent.from_json(message("rename", 5, name="web", oldName="/web-new"))
    assert event is not None and (event.name, event.old_name) == ("web", "web-new")


def test_events_of_other_objects_are_not_container_events() -> None:
    assert ContainerEvent.from_json({"Type": "image", "Action": "pull", "Actor": {"ID": "x"}}) \
        is None


def test_an_old_engine_event_without_actor_or_time_nano() -> None:
    event = ContainerEvent.from_json({"status": "start", "id": ID, "from": "app", "time": 7})
    assert event == ContainerEvent(action="start", id=ID, image="app", time_nano=7 * 10**9)


@pytest.mark.parametrize("obj", [
    {"Type": "container", "Action": "start"},
    {"Type": "container", "Actor": {"ID": ID}},
    {"Type": "container", "Action": "start", "Actor": "nonsense"},
])
def test_container_event_without_id_or_action(obj: dict[str, Any]) -> None:
    with pytest.raises(BadEvent):
        ContainerEvent.from_json(obj)


def test_since_param_keeps_nanoseconds() -> None:
    assert since_param(1_796_033_092_000_000_015) == "1796033092.000000015"


# -- the service --------------------------------------------------------------------------------


@implementer(IPushProducer)
class Transport:
    stopped = False
    disconnecting = False

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@attrs.define
class Stream:
    """One open ``/events`` answer: the reader the service gave it, and its transport."""

    protocol: Any = None
    transport: Transport = attrs.field(factory=Transport)

    def send(self, *objs: dict[str, Any]) -> None:
        for obj in objs:
            self.protocol.dataReceived(line(obj))

    def drop(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionLost("the engine went away")))

    def end(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))


@implementer(IResponse)
class Response:
    code = 200

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def deliverBody(self, protocol: Any) -> None:
        self.stream.protocol = protocol
        protocol.makeConnection(self.stream.transport)


class Engine:
    """Answers ``events()`` as scripted: a Stream, an error, or a Deferred left waiting."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, list[str]], str]] = []
        self.streams: list[Stream] = []
        self.errors: list[Exception] = []
        self.hang = False
        self.pending: list[Deferred[IResponse]] = []

    def events(self, filters: Mapping[str, list[str]], since: str = "") -> Deferred[IResponse]:
        self.calls.append((dict(filters), since))
        if self.errors:
            return fail(self.errors.pop(0))
        if self.hang:
            d: Deferred[IResponse] = Deferred()
            self.pending.append(d)
            return d
        stream = Stream()
        self.streams.append(stream)
        return succeed(Response(stream))


@attrs.define
class Recorder:
    events: list[ContainerEvent] = attrs.field(factory=list)
    resyncs: int = 0

    def on_event(self, event: ContainerEvent) -> None:
        self.events.append(event)

    def on_resync(self) -> None:
        self.resyncs += 1

    def actions(self) -> list[str]:
        return [e.action for e in self.events]


def service(clock: Clock, engine: Engine, **kw: Any) -> EngineEvents:
    return EngineEvents(clock, engine, retry=backoff(1.0, 4.0), **kw)


def test_one_stream_of_container_events_to_every_subscriber() -> None:
    clock, engine = Clock(), Engine()
    events = service(clock, engine)
    first, second = Recorder(), Recorder()
    events.subscribe(first.on_event, first.on_resync)
    events.subscribe(second.on_event)
    events.startService()
    assert engine.calls == [({"type": ["container"], "event": list(WATCHED_ACTIONS)}, "")]
    assert events.live
    assert first.resyncs == 1
    engine.streams[0].send(message("start", 10), message("health_status: healthy", 11))
    assert first.actions() == second.actions() == ["start", "health_status: healthy"]
    assert events.last_time_nano == 11
    assert events.subscribers == 2


def test_without_an_action_filter() -> None:
    clock, engine = Clock(), Engine()
    service(clock, engine, actions=None).startService()
    assert engine.calls == [({"type": ["container"]}, "")]


def test_events_of_other_kinds_and_unreadable_lines_are_skipped() -> None:
    clock, engine = Clock(), Engine()
    events = service(clock, engine)
    seen = Recorder()
    events.subscribe(seen.on_event)
    events.startService()
    stream = engine.streams[0]
    with capturedLogs() as logged:
        stream.protocol.dataReceived(b"{not json\n")
        stream.send({"Type": "network", "Action": "connect", "Actor": {"ID": "n"}},
                    {"Type": "container", "Action": "start"}, message("start", 3))
    assert seen.actions() == ["start"]
    assert events.live
    assert sum(e["log_level"] == LogLevel.warn for e in logged) == 2


def test_a_dropped_stream_resumes_since_the_last_event_without_repeating_it() -> None:
    clock, engine = Clock(), Engine()
    events = service(clock, engine)
    seen = Recorder()
    events.subscribe(seen.on_event, seen.on_resync)
    events.startService()
    engine.streams[0].send(message("start", 10), message("die", 20, exitCode="0"),
                           message("destroy", 20))
    with capturedLogs() as logged:
        engine.streams[0].drop()
    assert not events.live
    assert "the engine went away" in events.reason
    assert any("reconnecting in 1.0s" in e["log_format"].format(**e)
               if "delay" in e else False for e in logged)
    assert len(engine.calls) == 1
    clock.advance(1.0)
    assert engine.calls[1][1] == since_param(20)
    assert events.reconnects == 1
    assert seen.resyncs == 2
    # the engine sends what it remembers from that instant on: both events at 20 again
    engine.streams[1].send(message("die", 20, exitCode="0"), message("destroy", 20),
                           message("create", 20, container_id="b" * 64), message("start", 30))
    assert seen.actions() == ["start", "die", "destroy", "create", "start"]


def test_an_event_older_than_the_last_is_still_delivered() -> None:
    """An engine whose clock went back: nothing is dropped for being old."""
    clock, engine = Clock(), Engine()
    events = service(clock, engine)
    seen = Recorder()
    events.subscribe(seen.on_event)
    events.startService()
    engine.streams[0].send(message("start", 50), message("die", 40))
    assert seen.actions() == ["start", "die"]
    assert events.last_time_nano == 50


def test_reconnection_backs_off_while_the_engine_is_down_and_resets_after() -> None:
    clock, engine = Clock(), Engine()
    events = service(clock, engine)
    events.startService()
    engine.errors = [DockerUnavailable("down")] * 4
    engine.streams[0].end()  # a clean end is a drop too
    waits = []
    for _ in range(5):
        before = len(engine.calls)
        waited = 0.0
        while len(engine.calls) == before:
            clock.advance(0.5)
            waited += 0.5
        waits.append(waited)
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert events.live
    assert events.reconnects == 5
    engine.streams[1].drop()
    clock.advance(1.0)
    assert len(engine.calls) == 7


def test_a_failing_subscriber_is_logged_and_the_others_still_hear() -> None:
    clock, engine = Clock(), Engine()
    events = service(clock, engine)

    def broken(event: ContainerEvent) -> None:
        raise RuntimeError("subscriber bug")

    seen = Recorder()
    events.subscribe(broken)
    events.subscribe(seen.on_event)
    events.startService()
    with capturedLogs() as logged:
        engine.streams[0].send(message("start", 1), message("die", 2))
    assert seen.actions() == ["start", "die"]
    assert events.live
    failures = [e for e in logged if "log_failure" in e]
    assert len(failures) == 2
    assert failures[0]["log_failure"].check(RuntimeError)


def test_a_failing_deferred_of_a_subscriber_is_logged() -> None:
    clock, engine = Clock(), Engine()
    events = service(clock, engine)
    events.subscribe(lambda e: fail(RuntimeError("later")))
    events.startService()
    with capturedLogs() as logged:
        engine.streams[0].send(message("start", 1))
    assert [e["log_failure"].value.args for e in logged if "log_failure" in e] == [("later",)]


def test_a_cancelled_subscription_hears_nothing_more() -> None:
    clock, engine = Clock(), Engine()
    events = service(clock, engine)
    seen = Recorder()
    subscription = events.subscribe(seen.on_event, seen.on_resync)
    events.startService()
    engine.streams[0].send(message("start", 1))
    subscription.cancel()
    subscription.cancel()
    engine.streams[0].send(message("die", 2))
    engine.streams[0].drop()
    clock.advance(1.0)
    assert seen.actions() == ["start"]
    assert seen.resyncs == 1
    assert events.subscribers == 0


def test_a_subscriber_may_unsubscribe_another_while_an_event_is_delivered() -> None:
    clock, engine = Clock(), Engine()
    events = service(clock, engine)
    seen = Recorder()
    later: list[Any] = []
    first = events.subscribe(lambda e: later[0].cancel())
    later.append(events.subscribe(seen.on_event))
    events.startService()
    engine.streams[0].send(message("start", 1))
    first.cancel()
    assert seen.events == []  # subscribers hear in the order they came: it was gone by then
    assert events.subscribers == 0
    assert events.live


def test_stop_closes_the_stream() -> None:
    clock, engine = Clock(), Engine()
    events = service(clock, engine)
    events.startService()
    fired(events.stopService())
    assert engine.streams[0].transport.stopped
    assert not events.live and events.reason == "stopped"
    assert clock.getDelayedCalls() == []


def test_stop_while_waiting_to_reconnect() -> None:
    clock, engine = Clock(), Engine()
    events = service(clock, engine)
    events.startService()
    engine.streams[0].drop()
    assert clock.getDelayedCalls()
    fired(events.stopService())
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert len(engine.calls) == 1


def test_stop_while_the_request_is_in_flight() -> None:
    clock, engine = Clock(), Engine()
    engine.hang = True
    events = service(clock, engine)
    events.startService()
    d = events.stopService()
    assert engine.pending[0].called  # cancelled
    fired(d)
    assert clock.getDelayedCalls() == []


def test_stop_before_start() -> None:
    events = service(Clock(), Engine())
    assert fired(events.stopService()) is None


def test_an_answer_that_arrives_as_the_service_stops_is_closed() -> None:
    """The engine's answer wins the race with the cancellation of its request."""
    clock, stream = Clock(), Stream()

    class Racing(Engine):
        def events(self, filters: Mapping[str, list[str]], since: str = "") -> Any:
            self.calls.append((dict(filters), since))
            return Deferred(lambda d: d.callback(Response(stream)))

    engine = Racing()
    events = service(clock, engine)
    seen = Recorder()
    events.subscribe(seen.on_event, seen.on_resync)
    events.startService()
    fired(events.stopService())
    assert stream.transport.stopped
    assert seen.resyncs == 0
    assert not events.live


# -- over the in-memory engine ------------------------------------------------------------------


class OverMemory:
    """The service over the real client and the in-memory engine, on one Clock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.mem = MemoryDocker(clock=self.clock)
        self.client = DockerClient(self.clock, self.mem.agent())
        self.events = service(self.clock, self.client)  # type: ignore[arg-type]
        self.seen = Recorder()
        self.events.subscribe(self.seen.on_event, self.seen.on_resync)
        self.mem.add_image(["myorg/app:qa"], healthcheck=Healthcheck.shell("true", interval=5))

    def mine(self, container_id: str) -> list[str]:
        return [e.action for e in self.seen.events if e.id == container_id]


def test_over_the_engine_events_missed_while_the_stream_was_down_come_from_its_memory() -> None:
    o = OverMemory()
    o.events.startService()
    first = o.mem.run("first", "myorg/app:qa")
    assert o.events.live and o.mine(first) == ["create", "start"]
    with capturedLogs():
        assert o.mem.drop_event_streams() == 1  # the connection broke, the engine goes on
    assert not o.events.live
    o.mem.stop_container("first")
    second = o.mem.run("second", "myorg/app:qa")
    o.clock.advance(1.0)  # reconnects since the last event it had

    assert o.events.live and o.seen.resyncs == 2
    assert o.mine(first) == ["create", "start", "kill", "die", "stop"]
    assert o.mine(second) == ["create", "start"]
    o.clock.advance(4.0)
    assert o.mine(second) == ["create", "start", "health_status: healthy"]
    assert not [e for e in o.seen.events if e.verb.startswith("exec_")]


def test_over_the_engine_a_restarted_engine_remembers_nothing_and_says_resync() -> None:
    o = OverMemory()
    o.events.startService()
    kept = o.mem.run("kept", "myorg/app:qa", HostConfig={"RestartPolicy": {"Name": "always"}})
    with capturedLogs():
        o.mem.stop_engine()
        o.clock.advance(1.0)  # refused while it is away
        o.mem.start_engine()
        o.clock.advance(2.0)
    assert o.events.live and o.seen.resyncs == 2
    assert o.events.reconnects == 2
    # its stop went out before the stream closed; its start by the restarted engine is
    # remembered there, and sent on reconnection
    assert o.mine(kept) == ["create", "start", "kill", "die", "stop", "start"]
    assert o.mem.containers[kept].status == "running"
