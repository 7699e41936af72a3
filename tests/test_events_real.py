"""The engine's event stream, one suite on two engines (see tests/stack/two_engines.py): the
in-memory engine, and a real private dockerd (marked ``real``). What the engine sends through
the daemon's filter, ``since=`` replay, and a stream that outlives a restart of the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest_twisted
from twisted.internet.defer import Deferred

from deployer.events import WATCHED_ACTIONS, ContainerEvent, since_param
from deployer.lines import JSONLinesReader
from tests.stack.docker_stack import unique

if TYPE_CHECKING:
    from tests.stack.two_engines import Engine

pytest_plugins = ["tests.stack.two_engines"]  # the engine fixtures


class Recorder:
    def __init__(self) -> None:
        self.events: list[ContainerEvent] = []
        self.resyncs = 0

    def on_event(self, event: ContainerEvent) -> None:
        self.events.append(event)

    def on_resync(self) -> None:
        self.resyncs += 1

    def has(self, container_id: str, action: str) -> bool:
        return any(e.id == container_id and e.action == action for e in self.events)


@pytest_twisted.ensureDeferred
async def test_the_filter_passes_health_and_lifecycle_but_not_exec(engine: Engine) -> None:
    events = engine.events
    seen = Recorder()
    events.subscribe(seen.on_event, seen.on_resync)
    events.startService()
    await engine.until(lambda: events.live, 10, "the event stream")
    ref, name = f"{unique('app')}:qa", unique("c")
    await engine.build("healthy", ref, "v1")
    cid = await engine.run(ref, name)
    await engine.until(lambda: seen.has(cid, "health_status: healthy"), 30, "healthy")
    await engine.sleep(1.5)  # more probes run
    await engine.rename(name, name + "-x")
    await engine.remove(name + "-x")
    await engine.until(lambda: seen.has(cid, "destroy"), 30, "destroy")

    mine = [e for e in seen.events if e.id == cid]
    actions = [e.action for e in mine]
    assert actions == ["create", "start", "health_status: healthy", "rename", "kill", "die",
                       "destroy"]
    assert {e.verb for e in mine} <= set(WATCHED_ACTIONS)
    (rename,) = [e for e in mine if e.verb == "rename"]
    assert (rename.name, rename.old_name) == (name + "-x", name)
    (kill,) = [e for e in mine if e.verb == "kill"]
    assert kill.attributes["signal"] == "9"
    (die,) = [e for e in mine if e.verb == "die"]
    assert die.exit_code == 137 and die.name == name + "-x"
    assert all(e.image == ref for e in mine)
    assert all(e.attributes["version"] == "v1" for e in mine)  # the labels come along
    assert seen.resyncs == 1
    times = [e.time_nano for e in seen.events]
    assert times == sorted(times) and times[0] > 0


@pytest_twisted.ensureDeferred
async def test_since_replays_what_the_engine_remembers(engine: Engine) -> None:
    ref = f"{unique('app')}:qa"
    await engine.build("plain", ref, "v1")
    before = int(engine.now() * 1e9) - 10**9  # the engine's clock is this host's
    cid = await engine.run(ref, unique("c"))
    received: list[dict[str, Any]] = []
    response = await engine.settle(Deferred.fromCoroutine(engine.client.events(
        {"type": ["container"], "event": ["start"]}, since=since_param(before))))
    reader = JSONLinesReader(received.append, what="docker events")
    response.deliverBody(reader)
    await engine.until(lambda: any(m.get("id") == cid for m in received), 10, "the replay")
    reader.done.cancel()
    reader.done.addErrback(lambda _: None)
    (start,) = [ContainerEvent.from_json(m) for m in received if m.get("id") == cid]
    assert start is not None and start.action == "start"
    assert start.time_nano >= before
    # ...and exactly at its time: the replay holds the event itself
    response = await engine.settle(Deferred.fromCoroutine(engine.client.events(
        {"type": ["container"], "event": ["start"]}, since=since_param(start.time_nano))))
    again: list[dict[str, Any]] = []
    reader = JSONLinesReader(again.append, what="docker events")
    response.deliverBody(reader)
    await engine.until(lambda: any(m.get("id") == cid for m in again), 10, "the replay")
    reader.done.cancel()
    reader.done.addErrback(lambda _: None)
    assert again[0]["timeNano"] == start.time_nano


@pytest_twisted.ensureDeferred
async def test_the_stream_survives_a_restart_of_the_engine(own_engine: Engine) -> None:
    engine = own_engine
    events = engine.events
    seen = Recorder()
    events.subscribe(seen.on_event, seen.on_resync)
    events.startService()
    await engine.until(lambda: events.live, 10, "the event stream")
    ref = f"{unique('app')}:qa"
    await engine.build("plain", ref, "v1")
    before = await engine.run(ref, unique("c"))
    await engine.until(lambda: seen.has(before, "start"), 10, "the first start event")

    await engine.stop_engine()
    await engine.until(lambda: not events.live, 10, "the stream to drop")
    await engine.sleep(1.0)  # a few reconnections fail while the engine is away
    await engine.start_engine()
    await engine.until(lambda: events.live, 30, "the stream to come back")
    assert events.reconnects >= 2
    assert seen.resyncs >= 2

    after = await engine.run(ref, unique("c"))
    await engine.until(lambda: seen.has(after, "start"), 10, "a start event after the restart")
    assert seen.has(before, "die")  # the engine stopped it on its way down
    starts = [e for e in seen.events if e.action == "start" and e.id in (before, after)]
    assert [e.id for e in starts] == [before, after]  # nothing delivered twice
