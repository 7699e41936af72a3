"""The engine's event stream against a real private dockerd: what the engine sends through the
filter, ``since=`` replay, and a stream that outlives a restart of the engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from deployer.backoff import backoff
from deployer.docker import DockerClient
from deployer.events import WATCHED_ACTIONS, ContainerEvent, EngineEvents, since_param
from deployer.lines import JSONLinesReader
from tests.stack.docker_stack import Dockerd, StackError, build_image, run_container, unique
from tests.stack.health_images import build_health_image

pytestmark = pytest.mark.real


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` on the reactor (test-side only)."""
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise StackError(f"{what} did not happen within {timeout} s")
        await deferLater(reactor, 0.05)


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
async def test_the_filter_passes_health_and_lifecycle_but_not_exec(clean_dockerd: Dockerd) -> None:
    client = DockerClient.from_url(reactor, clean_dockerd.url)
    events = EngineEvents(reactor, client)
    seen = Recorder()
    events.subscribe(seen.on_event, seen.on_resync)
    events.startService()
    try:
        await until(lambda: events.live, 10, "the event stream")
        ref, name = f"{unique('app')}:qa", unique("c")
        await threads.deferToThread(build_health_image, clean_dockerd, ref, "v1")
        cid = await threads.deferToThread(run_container, clean_dockerd, ref, name)
        await until(lambda: seen.has(cid, "health_status: healthy"), 30, "healthy")
        await deferLater(reactor, 1.5)  # more probes run
        await clean_dockerd.acli("rename", name, name + "-x")
        await clean_dockerd.acli("rm", "-f", name + "-x")
        await until(lambda: seen.has(cid, "destroy"), 30, "destroy")
    finally:
        await events.stopService()
        await client.close()
    mine = [e for e in seen.events if e.id == cid]
    actions = [e.action for e in mine]
    assert actions[:2] == ["create", "start"]
    assert not [a for a in actions if a.startswith("exec_")]
    assert {e.verb for e in mine} <= set(WATCHED_ACTIONS)
    (rename,) = [e for e in mine if e.verb == "rename"]
    assert (rename.name, rename.old_name) == (name + "-x", name)
    (die,) = [e for e in mine if e.verb == "die"]
    assert die.exit_code == 137 and die.name == name + "-x"
    assert all(e.image == ref for e in mine)
    assert seen.resyncs == 1
    times = [e.time_nano for e in seen.events]
    assert times == sorted(times) and times[0] > 0


@pytest_twisted.ensureDeferred
async def test_since_replays_what_the_engine_remembers(clean_dockerd: Dockerd) -> None:
    client = DockerClient.from_url(reactor, clean_dockerd.url)
    try:
        ref = f"{unique('app')}:qa"
        await threads.deferToThread(build_image, clean_dockerd, ref, "v1")
        before = int(reactor.seconds() * 1e9) - 10**9  # the engine's clock is this host's
        cid = await threads.deferToThread(run_container, clean_dockerd, ref, unique("c"))
        received: list[dict[str, Any]] = []
        response = await client.events({"type": ["container"], "event": ["start"]},
                                       since=since_param(before))
        reader = JSONLinesReader(received.append, what="docker events")
        response.deliverBody(reader)
        await until(lambda: any(m.get("id") == cid for m in received), 10, "the replay")
        reader.done.cancel()
        reader.done.addErrback(lambda _: None)
    finally:
        await client.close()
    (start,) = [ContainerEvent.from_json(m) for m in received if m.get("id") == cid]
    assert start is not None and start.action == "start"
    assert start.time_nano >= before


@pytest_twisted.ensureDeferred
async def test_the_stream_survives_a_restart_of_the_engine(
    dockerd_factory: Callable[..., Dockerd],
) -> None:
    host = dockerd_factory()
    client = DockerClient.from_url(reactor, host.url)
    events = EngineEvents(reactor, client, retry=backoff(0.2, 1.0))
    seen = Recorder()
    events.subscribe(seen.on_event, seen.on_resync)
    events.startService()
    try:
        await until(lambda: events.live, 10, "the event stream")
        ref = f"{unique('app')}:qa"
        await threads.deferToThread(build_image, host, ref, "v1")
        before = await threads.deferToThread(run_container, host, ref, unique("c"))
        await until(lambda: seen.has(before, "start"), 10, "the first start event")

        await threads.deferToThread(host.stop)
        await until(lambda: not events.live, 10, "the stream to drop")
        await deferLater(reactor, 1.0)  # a few reconnections fail while the engine is away
        await threads.deferToThread(host.start)
        await until(lambda: events.live, 30, "the stream to come back")
        assert events.reconnects >= 2
        assert seen.resyncs >= 2

        after = await threads.deferToThread(run_container, host, ref, unique("c"))
        await until(lambda: seen.has(after, "start"), 10, "a start event after the restart")
    finally:
        await events.stopService()
        await client.close()
    assert seen.has(before, "die")  # the engine stopped it on its way down
    starts = [e for e in seen.events if e.action == "start" and e.id in (before, after)]
    assert [e.id for e in starts] == [before, after]  # nothing delivered twice
